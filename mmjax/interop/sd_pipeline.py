"""diffusers Stable Diffusion 1.x/2.x pipeline folders -> mmjax models, tokenizer, scheduler.

  pipe = sd_pipeline.load_pipeline("path/to/stable-diffusion-folder")
  images = pipe.generate(["a photo of a cat"], num_steps=25, seed=0)

The folder is what `StableDiffusionPipeline.save_pretrained` writes: model_index.json,
unet/ (UNet2DConditionModel: config.json + diffusion_pytorch_model.safetensors),
vae/ (AutoencoderKL), text_encoder/ (transformers CLIPTextModel: config.json +
model.safetensors), tokenizer/ (CLIPTokenizer) and scheduler/ (scheduler_config.json).
Each part also loads alone (`load_unet`, `load_text_encoder`, `load_vae`,
`load_tokenizer`, `load_scheduler`). Sizes come from the configs; weights are mapped by
name (diffusers' and transformers' module names are the mmjax models'), and every key
and shape is checked: a missing, unexpected or misshapen tensor raises CheckpointError
naming it. Configs with a block type or an option mmjax does not implement, other
pipeline classes (SDXL, ...), other component classes and folders that are not
pipelines (a VAE folder, a missing unet/) raise one error that names what was found and
what is supported. Weights are read with safetensors' NumPy API (float16 files are
widened to float32; bfloat16 files are refused), sharded files through their
*.safetensors.index.json; PyTorch pickles (*.bin) are not read.
"""
import json
import os
import re

import numpy as np

from mmjax.interop import common
from mmjax.interop import diffusers as diffusers_vae
from mmjax.interop.common import CheckpointError

PIPELINE_CLASSES = ("StableDiffusionPipeline",)
# Component -> (library, class) that model_index.json must name.
COMPONENTS = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "scheduler": ("diffusers", None),  # Checked by hf_schedulers.
}
# UNet2DConditionModel options that would change the network: the values implemented.
_UNET_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",), "dual_cross_attention": (False,),
    "class_embed_type": (None,), "addition_embed_type": (None,), "num_class_embeds": (None,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "time_cond_proj_dim": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "resnet_time_scale_shift": ("default",),
    "act_fn": ("silu",), "attention_type": ("default",), "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0),
    "mid_block_scale_factor": (1, 1.0), "timestep_post_act": (None,),
    "class_embeddings_concat": (False,), "addition_time_embed_dim": (None,),
    "reverse_transformer_layers_per_block": (None,), "num_attention_heads": (None,),
}
_INDEXED_NAMES = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
                  "downsamplers", "upsamplers", "to_out", "net", "layers")
_IGNORED_KEYS = ("embeddings.position_ids",)


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e}).") from e


def _config(folder: str, name: str = "config.json") -> dict:
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    found = sorted(os.listdir(folder)) if os.path.isdir(folder) else "no such folder"
    raise FileNotFoundError(f"{folder}: no {name} (found {found}).")
  return _read_json(path)


def _state_dict(folder: str, stem: str) -> tuple[dict, str]:
  """A component's safetensors weights (one file, a sharded index or the fp16 variant)."""
  candidates = [f"{stem}.safetensors", f"{stem}.safetensors.index.json",
                f"{stem}.fp16.safetensors", f"{stem}.fp16.safetensors.index.json"]
  for name in candidates:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    if not name.endswith(".index.json"):
      return common.read_safetensors(path)[0], path
    shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
    state = {}
    for shard in shards:
      state.update(common.read_safetensors(os.path.join(folder, shard))[0])
    return state, path
  found = sorted(os.listdir(folder))
  pickles = [f for f in found if f.endswith((".bin", ".ckpt", ".pt"))]
  hint = (f" It holds PyTorch pickles ({pickles[0]}): re-save it with "
          "save_pretrained(..., safe_serialization=True).") if pickles else ""
  raise FileNotFoundError(f"{folder}: no {stem}.safetensors (found {found}).{hint}")


def our_path(key: str) -> tuple[str, ...]:
  """A diffusers/transformers key -> its mmjax module path and leaf kind ("weight"/"bias"):
  "down_blocks.0.attentions.0.proj_in.weight" -> ("down_blocks_0", "attentions_0",
  "proj_in", "weight"). The inverse of `_their_key` up to the leaf's name."""
  head, _, leaf = key.rpartition(".")
  return tuple(re.sub(r"\.(\d+)(?=\.|$)", r"_\1", head).split(".")) + (leaf,)


def _their_key(path: tuple) -> str:
  """An mmjax parameter path -> the diffusers/transformers key it is read from."""
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  key = ".".join(path[:-1] + (leaf,))
  return re.sub(r"\b(" + "|".join(_INDEXED_NAMES) + r")_(\d+)\b", r"\1.\2", key)


def to_params(state: dict, model, inputs: tuple, where: str, what: str,
              dtype=np.float32) -> dict:
  """A state dict in diffusers'/transformers' names -> `model`'s parameters, checked.

  Keys map to mmjax paths by name ("down_blocks.0.resnets.1.conv1.weight" ->
  down_blocks_0/resnets_1/conv1/kernel); convolution kernels are transposed from
  [out, in, kh, kw] to [kh, kw, in, out], Dense kernels from [out, in] to [in, out].
  `inputs` are example arguments of `model` (their shapes only are used).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  target = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]
  target = traverse_util.flatten_dict(target)
  out = {}
  for key, value in state.items():
    if key.endswith(_IGNORED_KEYS):
      continue
    head, _, leaf = key.rpartition(".")
    module = tuple(re.sub(r"\.(\d+)(?=\.|$)", r"_\1", head).split("."))
    names = ("bias",) if leaf == "bias" else ("kernel", "scale", "embedding")
    path = next((module + (n,) for n in names if module + (n,) in target), None)
    if path is None or leaf not in ("weight", "bias"):
      raise CheckpointError(f"{where}: unexpected key {key!r} (shape {np.shape(value)}): "
                            f"{what} of this config has no such tensor.")
    want = target[path].shape
    if path[-1] == "kernel" and len(want) == 4:
      theirs = (want[3], want[2], want[0], want[1])
      convert = lambda x: x.transpose(2, 3, 1, 0)
    elif path[-1] == "kernel":
      theirs, convert = want[::-1], lambda x: x.T
    else:
      theirs, convert = want, lambda x: x
    if tuple(np.shape(value)) != tuple(theirs):
      raise common.mismatch(where, key, theirs, np.shape(value),
                            f"Does config.json describe these weights ({what})?")
    out[path] = np.asarray(convert(np.asarray(value)), dtype)
  missing = [p for p in target if p not in out]
  if missing:
    raise common.mismatch(where, _their_key(missing[0]), _their_shape(target[missing[0]],
                                                                      missing[0]), None,
                          f"{len(missing)} tensors of {what} are missing.")
  return traverse_util.unflatten_dict(out)


def _their_shape(struct, path):
  s = tuple(struct.shape)
  if path[-1] == "kernel":
    return (s[3], s[2], s[0], s[1]) if len(s) == 4 else s[::-1]
  return s


def _per_block(value, n: int, key: str, where: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n or not all(isinstance(v, int) for v in value):
      raise CheckpointError(f"{where}: {key}={value!r}: one int per block ({n}) is supported.")
    return tuple(value)
  return (int(value),) * n


def unet_kwargs(config: dict, where: str = "unet/config.json") -> dict:
  """A UNet2DConditionModel config -> mmjax.models.sd_unet.UNet2DConditionModel's kwargs."""
  from mmjax.models import sd_unet  # pylint: disable=import-outside-toplevel
  cls = config.get("_class_name", "UNet2DConditionModel")
  if cls != "UNet2DConditionModel":
    raise CheckpointError(f"{where}: a {cls} config; supported: UNet2DConditionModel.")
  for key, allowed in _UNET_FIXED.items():
    if config.get(key, allowed[0]) not in allowed:
      raise CheckpointError(f"{where}: {key}={config[key]!r} is not supported by mmjax's "
                            f"UNet2DConditionModel (supported: {allowed}).")
  only_cross = config.get("only_cross_attention", False)
  if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
    raise CheckpointError(f"{where}: only_cross_attention={only_cross!r} is not supported "
                          "(supported: False).")
  channels = tuple(config["block_out_channels"])
  n = len(channels)
  down, up = tuple(config["down_block_types"]), tuple(config["up_block_types"])
  for kind, allowed, name in ((down, sd_unet.DOWN_BLOCKS, "down_block_types"),
                              (up, sd_unet.UP_BLOCKS, "up_block_types")):
    bad = [b for b in kind if b not in allowed]
    if bad:
      raise CheckpointError(f"{where}: {name} has {bad[0]!r}, which mmjax does not implement "
                            f"(supported: {allowed}).")
    if len(kind) != n:
      raise CheckpointError(f"{where}: {len(kind)} {name} for {n} block_out_channels.")
  groups = config.get("norm_num_groups", 32)
  cross = config.get("cross_attention_dim", 1280)
  if groups is None or not isinstance(cross, int):
    raise CheckpointError(f"{where}: norm_num_groups={groups!r}, cross_attention_dim="
                          f"{cross!r}: one int each is supported.")
  transformer_layers = config.get("transformer_layers_per_block", 1)
  return dict(
      block_out_channels=channels, down_block_types=down, up_block_types=up,
      layers_per_block=_per_block(config.get("layers_per_block", 2), n, "layers_per_block",
                                  where),
      heads=_per_block(config.get("attention_head_dim", 8), n, "attention_head_dim", where),
      transformer_layers=_per_block(transformer_layers, n, "transformer_layers_per_block",
                                    where),
      cross_attention_dim=cross, in_channels=config.get("in_channels", 4),
      out_channels=config.get("out_channels", 4),
      use_linear_projection=bool(config.get("use_linear_projection", False)),
      groups=groups, eps=config.get("norm_eps", 1e-5),
      flip_sin_to_cos=config.get("flip_sin_to_cos", True),
      freq_shift=config.get("freq_shift", 0), downsample_padding=config.get(
          "downsample_padding", 1), conv_in_kernel=config.get("conv_in_kernel", 3),
      conv_out_kernel=config.get("conv_out_kernel", 3),
      center_input_sample=config.get("center_input_sample", False))


def load_unet(folder: str | os.PathLike, dtype=np.float32):
  """A diffusers unet/ folder -> (UNet2DConditionModel, params, its config)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmjax.models import sd_unet  # pylint: disable=import-outside-toplevel
  folder = os.fspath(folder)
  config = _config(folder)
  model = sd_unet.UNet2DConditionModel(**unet_kwargs(config, os.path.join(folder,
                                                                          "config.json")))
  state, path = _state_dict(folder, "diffusion_pytorch_model")
  f = 2 ** (len(model.block_out_channels) - 1)
  inputs = (jnp.zeros((1, f, f, model.in_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 1, model.cross_attention_dim)))
  return model, to_params(state, model, inputs, path, "a UNet2DConditionModel", dtype), config


def text_encoder_kwargs(config: dict, where: str = "text_encoder/config.json") -> dict:
  """A transformers CLIPTextConfig dict -> mmjax.models.clip_text.CLIPTextModel's kwargs."""
  from mmjax.models import clip_text  # pylint: disable=import-outside-toplevel
  archs = config.get("architectures") or ["CLIPTextModel"]
  if config.get("model_type", "clip_text_model") != "clip_text_model" or archs != [
      "CLIPTextModel"]:
    raise CheckpointError(f"{where}: a {config.get('model_type')} {archs} config; supported: "
                          "CLIPTextModel (model_type clip_text_model).")
  act = config.get("hidden_act", "quick_gelu")
  if act not in clip_text.HF_ACTIVATIONS:
    raise CheckpointError(f"{where}: hidden_act={act!r} is not supported (supported: "
                          f"{sorted(clip_text.HF_ACTIVATIONS)}).")
  if config.get("use_attention_mask"):
    raise CheckpointError(f"{where}: use_attention_mask=True is not supported.")
  return dict(vocab_size=config.get("vocab_size", 49408),
              hidden_size=config.get("hidden_size", 512),
              intermediate_size=config.get("intermediate_size", 2048),
              num_heads=config.get("num_attention_heads", 8),
              num_layers=config.get("num_hidden_layers", 12),
              max_positions=config.get("max_position_embeddings", 77),
              activation=clip_text.HF_ACTIVATIONS[act],
              eps=config.get("layer_norm_eps", 1e-5))


def load_text_encoder(folder: str | os.PathLike, dtype=np.float32):
  """A transformers CLIPTextModel folder -> (CLIPTextModel, params, its config).

  Keys with and without the "text_model." prefix (transformers 4 and 5) are read.
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmjax.models import clip_text  # pylint: disable=import-outside-toplevel
  folder = os.fspath(folder)
  config = _config(folder)
  model = clip_text.CLIPTextModel(**text_encoder_kwargs(config, os.path.join(folder,
                                                                             "config.json")))
  state, path = _state_dict(folder, "model")
  state = {k[len("text_model."):] if k.startswith("text_model.") else k: v
           for k, v in state.items()}
  inputs = (jnp.zeros((1, 1), jnp.int32),)
  return model, to_params(state, model, inputs, path, "a CLIPTextModel", dtype), config


def load_vae(folder: str | os.PathLike, dtype=np.float32):
  """A diffusers vae/ folder -> (AutoencoderKL, params, its config).

  The config's scaling_factor (default 0.18215) and shift_factor (default none) are in
  the returned config; latents are decoded as vae.decode(latents / scaling_factor +
  shift_factor).
  """
  folder = os.fspath(folder)
  where = os.path.join(folder, "config.json")
  config = _config(folder)
  cls = config.get("_class_name", "AutoencoderKL")
  blocks = set(config.get("down_block_types", [])) | set(config.get("up_block_types", []))
  if cls != "AutoencoderKL" or not blocks <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
    raise CheckpointError(f"{where}: a {cls} with blocks {sorted(blocks)}; supported: "
                          "AutoencoderKL of DownEncoderBlock2D / UpDecoderBlock2D.")
  config = dict(config)
  config.setdefault("scaling_factor", 0.18215)
  config["shift_factor"] = config.get("shift_factor") or 0.0
  path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  if not os.path.isfile(path):
    _state_dict(folder, "diffusion_pytorch_model")  # Raises, naming what is there.
  model, params = diffusers_vae.load_vae(path, groups=config.get("norm_num_groups", 32),
                                         dtype=dtype)
  return model, params, config


def load_tokenizer(folder: str | os.PathLike, max_length: int | None = None):
  """A CLIPTokenizer folder -> mmjax.interop.hf_tokenizer.PretrainedTokenizer."""
  from mmjax.interop import hf_tokenizer  # pylint: disable=import-outside-toplevel
  return hf_tokenizer.PretrainedTokenizer(folder, max_length)


def load_scheduler(folder: str | os.PathLike, override: str | None = None):
  """A scheduler/ folder -> mmjax.diffusion.hf_schedulers.Scheduler (see its from_config)."""
  from mmjax.diffusion import hf_schedulers  # pylint: disable=import-outside-toplevel
  folder = os.fspath(folder)
  return hf_schedulers.from_config(_config(folder, "scheduler_config.json"), override,
                                   os.path.join(folder, "scheduler_config.json"))


def _what_folder(folder: str) -> str:
  """A short description of a folder that is not a pipeline, for the error."""
  for name in ("config.json", "scheduler_config.json", "tokenizer_config.json"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      try:
        config = _read_json(path)
      except CheckpointError:
        continue
      cls = config.get("_class_name") or (config.get("architectures") or [None])[0] or (
          config.get("tokenizer_class"))
      return f"a {cls} folder ({name})"
  return f"a folder holding {sorted(os.listdir(folder))[:8]}"


def check_pipeline_folder(folder: str | os.PathLike) -> dict:
  """Raises unless `folder` is a supported SD pipeline folder; returns model_index.json."""
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"No pipeline folder at {folder!r}.")
  index_path = os.path.join(folder, "model_index.json")
  layout = ("a Stable Diffusion 1.x/2.x pipeline folder as StableDiffusionPipeline."
            "save_pretrained writes it: model_index.json, unet/, vae/, text_encoder/, "
            "tokenizer/, scheduler/")
  if not os.path.isfile(index_path):
    raise CheckpointError(f"{folder} is {_what_folder(folder)}, not a pipeline: no "
                          f"model_index.json. Expected {layout}.")
  index = _read_json(index_path)
  cls = index.get("_class_name")
  if cls not in PIPELINE_CLASSES:
    parts = sorted(k for k in index if not k.startswith("_"))
    raise CheckpointError(f"{index_path}: a {cls} (components {parts}); supported: "
                          f"{PIPELINE_CLASSES} (SD 1.x/2.x).")
  for part, (library, classes) in COMPONENTS.items():
    entry = index.get(part)
    sub = os.path.join(folder, part)
    if not entry or entry[0] is None or not os.path.isdir(sub):
      raise CheckpointError(f"{folder}: no {part}/ (model_index.json: {part}={entry!r}); "
                            f"expected {layout}.")
    if classes is not None and (entry[0] != library or entry[1] not in classes):
      raise CheckpointError(f"{index_path}: {part} is {entry!r}; supported: "
                            f"{[[library, c] for c in classes]}.")
  return index
