"""Hugging Face transformers CLIPModel and SiglipModel folders <-> mmjax CLIP parameters.

  model, params = hf_clip.load("clip-vit-base-patch32")  # config.json + model.safetensors
  out = model.apply({"params": params}, images_nhwc, tokens)
  hf_clip.export(params, model, "exported")               # transformers loads it back

A folder is what `save_pretrained` writes: `config.json` and `model.safetensors` (or the
shards of `model.safetensors.index.json`), read with safetensors' NumPy API, no PyTorch.
Every size, head count, activation and LayerNorm epsilon comes from config.json (fields
absent from it take transformers' defaults, as `save_pretrained` leaves out defaults);
the tensors' shapes are then checked against it, and the first key that differs raises
CheckpointError with the shape expected and the shape found.

CLIPModel is OpenAI's layout (`openai_layout=True`), the text pooled at the first
`eos_token_id` (at the highest id for the legacy `eos_token_id` 2). SiglipModel is mmjax's
own image layout pooled by attention (`image_pool="map"`), a bidirectional text tower
read at its last position and projected with a bias, no image projection, and a
`logit_bias`; its images are normalised with mean 0.5 and std 0.5. Not covered: single
towers (CLIPVisionModel, SiglipTextModel, ...), SigLIP 2 and towers without SigLIP's
attention-pooling head. Both towers must share one activation and one epsilon, as every
released CLIP and SigLIP does.
"""
import json
import os

import numpy as np

from mmjax.interop import common
from mmjax.interop.common import CheckpointError

# transformers' defaults for the fields config.json may leave out, per model_type.
_DEFAULTS = {
    "clip": {
        "top": {"projection_dim": 512, "logit_scale_init_value": 2.6592},
        "text_config": {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                        "num_hidden_layers": 12, "num_attention_heads": 8,
                        "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                        "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406,
                        "eos_token_id": 49407, "projection_dim": 512},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                          "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3,
                          "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                          "layer_norm_eps": 1e-5, "projection_dim": 512},
    },
    "siglip": {
        "top": {},
        "text_config": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 3072,
                        "num_hidden_layers": 12, "num_attention_heads": 12,
                        "max_position_embeddings": 64, "hidden_act": "gelu_pytorch_tanh",
                        "layer_norm_eps": 1e-6, "pad_token_id": 1, "bos_token_id": 49406,
                        "eos_token_id": 49407, "projection_size": None},
        "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                          "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3,
                          "image_size": 224, "patch_size": 16,
                          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
                          "vision_use_head": True},
    },
}
ARCHITECTURES = {"clip": "CLIPModel", "siglip": "SiglipModel"}
# transformers' hidden_act -> mmjax's activation (see mmjax.nn.transformer.ACTIVATIONS).
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact",
                "gelu_pytorch_tanh": "gelu", "gelu_new": "gelu"}
_TO_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu_exact": "gelu",
                     "gelu": "gelu_pytorch_tanh"}
# Images: mean and std per channel, as the models' image processors normalise them.
NORMALISATION = {"clip": ((0.48145466, 0.4578275, 0.40821073),
                          (0.26862954, 0.26130258, 0.27577711)),
                 "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
_LEGACY_EOS = 2  # CLIP configs before transformers 4.31: pool at the highest id.
# Integer buffers that checkpoints of older transformers versions hold; not weights.
BUFFER_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def read_config(folder: str | os.PathLike) -> dict:
  """A CLIPModel / SiglipModel folder's config.json, transformers' defaults filled in.

  Returns {"model_type": "clip" | "siglip", "text_config": {...}, "vision_config": {...},
  and the top-level fields}. Raises CheckpointError for another kind of folder.
  """
  folder = os.fspath(folder)
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{folder}: no config.json; a Hugging Face CLIPModel or SiglipModel "
                          "folder is what save_pretrained writes (config.json + "
                          "model.safetensors).")
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  kind = raw.get("model_type")
  if kind not in _DEFAULTS:
    arch = ",".join(raw.get("architectures") or []) or "?"
    raise CheckpointError(f"{folder}: config.json has model_type={kind!r} (architectures "
                          f"{arch}); supported: 'clip' (CLIPModel) and 'siglip' (SiglipModel).")
  return read_config_dict(raw)


def _square(value, name: str, folder: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise CheckpointError(f"{folder}: vision_config.{name}={list(value)}: only square "
                            "images and patches are supported.")
    value = value[0]
  return int(value)


def _tower_options(config: dict, folder: str) -> tuple[str, float]:
  """The activation and LayerNorm epsilon the two towers share."""
  acts = {t: config[t]["hidden_act"] for t in ("text_config", "vision_config")}
  eps = {t: float(config[t]["layer_norm_eps"]) for t in ("text_config", "vision_config")}
  for tower, act in acts.items():
    if act not in _ACTIVATIONS:
      raise CheckpointError(f"{folder}: {tower}.hidden_act={act!r}; supported: "
                            f"{sorted(_ACTIVATIONS)}.")
  if len({_ACTIVATIONS[a] for a in acts.values()}) > 1 or len(set(eps.values())) > 1:
    raise CheckpointError(f"{folder}: the towers differ in hidden_act {acts} or layer_norm_eps "
                          f"{eps}; mmjax's CLIP has one of each.")
  return _ACTIVATIONS[acts["text_config"]], eps["text_config"]


def clip_kwargs(config: dict, folder: str = "config") -> dict:
  """A config from `read_config` -> mmjax.models.CLIP's keyword arguments."""
  kind, t, v = config["model_type"], config["text_config"], config["vision_config"]
  activation, eps = _tower_options(config, folder)
  patch = _square(v["patch_size"], "patch_size", folder)
  size = _square(v["image_size"], "image_size", folder)
  if size % patch or int(v.get("num_channels", 3)) != 3:
    raise CheckpointError(f"{folder}: vision_config image_size={size}, patch_size={patch}, "
                          f"num_channels={v.get('num_channels')}: the image size must be a "
                          "multiple of the patch and the images RGB.")
  for tower, c in (("text_config", t), ("vision_config", v)):
    if c["hidden_size"] % c["num_attention_heads"]:
      raise CheckpointError(f"{folder}: {tower}.hidden_size={c['hidden_size']} does not split "
                            f"into num_attention_heads={c['num_attention_heads']}.")
  kwargs = dict(
      image_variant=f"hf/{patch}",
      image_dims=(v["hidden_size"], v["num_hidden_layers"], v["intermediate_size"],
                  v["num_attention_heads"]),
      text_width=t["hidden_size"], text_depth=t["num_hidden_layers"],
      text_heads=t["num_attention_heads"], text_mlp_dim=t["intermediate_size"],
      max_text_len=t["max_position_embeddings"], text_vocab_size=t["vocab_size"],
      activation=activation, layernorm_epsilon=eps)
  if kind == "clip":
    eos = t["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) and len(eos) == 1 else eos
    if not isinstance(eos, int):
      raise CheckpointError(f"{folder}: text_config.eos_token_id={eos!r}: one id is needed.")
    legacy = eos == _LEGACY_EOS
    kwargs.update(image_pool="tok", embed_dim=config["projection_dim"], openai_layout=True,
                  text_pool="argmax" if legacy else "eos",
                  text_eos_id=None if legacy else eos)
  else:
    if not v.get("vision_use_head", True):
      raise CheckpointError(f"{folder}: vision_config.vision_use_head=False: a SiglipModel "
                            "without the attention-pooling head has no image embedding; "
                            "supported: vision_use_head=True.")
    if t["projection_size"] != v["hidden_size"]:
      raise CheckpointError(f"{folder}: text_config.projection_size={t['projection_size']} "
                            f"differs from vision_config.hidden_size={v['hidden_size']}.")
    kwargs.update(image_pool="map", embed_dim=v["hidden_size"], sigmoid=True,
                  text_pool="last", text_causal=False, text_proj_bias=True,
                  image_projection=False, clamp_logit_scale=False)
  return kwargs


def image_size(config: dict) -> int:
  return _square(config["vision_config"]["image_size"], "image_size", "config")


# --- The mapping: (HF key, mmjax path, to mmjax, to HF, part of the key), and shapes ---

def _identity(x):
  return x


def _transpose(x):
  return x.T


def _specs_and_shapes(config: dict) -> tuple[list, dict]:
  """One spec per mmjax leaf, and transformers' key -> shape, in transformers' order."""
  kind, t, v = config["model_type"], config["text_config"], config["vision_config"]
  specs, shapes = [], {}

  def add(key, path, shape, fwd=_identity, inv=_identity, part=0):
    specs.append((key, tuple(path.split("/")), fwd, inv, part))
    shapes[key] = tuple(shape)

  def ln(key, path, w):
    add(key + ".weight", path + "/scale", (w,))
    add(key + ".bias", path + "/bias", (w,))

  def dense(key, path, n_in, n_out, bias=True):
    add(key + ".weight", path + "/kernel", (n_out, n_in), _transpose, _transpose)
    if bias:
      add(key + ".bias", path + "/bias", (n_out,))

  def qkv(key, path, name, w, heads):
    d = w // heads
    add(key + ".weight", f"{path}/{name}/kernel", (w, w), lambda x: x.T.reshape(w, heads, d),
        lambda k: k.reshape(w, w).T)
    add(key + ".bias", f"{path}/{name}/bias", (w,), lambda x: x.reshape(heads, d),
        lambda k: k.reshape(w))

  def out(key, path, w, heads):
    d = w // heads
    add(key + ".weight", f"{path}/out/kernel", (w, w), lambda x: x.T.reshape(heads, d, w),
        lambda k: k.reshape(w, w).T)
    add(key + ".bias", f"{path}/out/bias", (w,))

  def encoder(prefix, path, c):
    w, heads, mlp = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"]
    for i in range(c["num_hidden_layers"]):
      b, j = f"{prefix}.encoder.layers.{i}.", f"{path}/encoder/block{i}"
      for name in ("q", "k", "v"):
        qkv(f"{b}self_attn.{name}_proj", j + "/attention",
            {"q": "query", "k": "key", "v": "value"}[name], w, heads)
      out(b + "self_attn.out_proj", j + "/attention", w, heads)
      ln(b + "layer_norm1", j + "/ln1", w)
      dense(b + "mlp.fc1", j + "/mlp/fc1", w, mlp)
      dense(b + "mlp.fc2", j + "/mlp/fc2", mlp, w)
      ln(b + "layer_norm2", j + "/ln2", w)

  tw, vw = t["hidden_size"], v["hidden_size"]
  p = _square(v["patch_size"], "patch_size", "config")
  grid = image_size(config) // p
  add("text_model.embeddings.token_embedding.weight", "text_tower/token_embedding/embedding",
      (t["vocab_size"], tw))
  add("text_model.embeddings.position_embedding.weight", "text_tower/pos_embedding",
      (t["max_position_embeddings"], tw))
  encoder("text_model", "text_tower", t)
  ln("text_model.final_layer_norm", "text_tower/encoder/ln_final", tw)
  if kind == "siglip":
    dense("text_model.head", "text_proj", tw, t["projection_size"])
  conv = lambda x: x.transpose(2, 3, 1, 0)
  conv_inv = lambda x: x.transpose(3, 2, 0, 1)
  if kind == "clip":
    add("vision_model.embeddings.class_embedding", "image_tower/cls", (vw,),
        lambda x: x.reshape(1, 1, vw), lambda x: x.reshape(vw))
    add("vision_model.embeddings.patch_embedding.weight", "image_tower/embedding/kernel",
        (vw, 3, p, p), conv, conv_inv)
    add("vision_model.embeddings.position_embedding.weight", "image_tower/pos_embedding",
        (grid**2 + 1, vw), lambda x: x[None], lambda x: x[0])
    ln("vision_model.pre_layrnorm", "image_tower/ln_pre", vw)
  else:
    add("vision_model.embeddings.patch_embedding.weight", "image_tower/embedding/kernel",
        (vw, 3, p, p), conv, conv_inv)
    add("vision_model.embeddings.patch_embedding.bias", "image_tower/embedding/bias", (vw,))
    add("vision_model.embeddings.position_embedding.weight", "image_tower/pos_embedding",
        (grid**2, vw), lambda x: x[None], lambda x: x[0])
  encoder("vision_model", "image_tower", v)
  ln("vision_model.post_layernorm", "image_tower/encoder/ln_final", vw)
  if kind == "siglip":
    h, heads, d = "vision_model.head.", v["num_attention_heads"], vw // v["num_attention_heads"]
    add(h + "probe", "image_tower/head/probe", (1, 1, vw))
    for part, name in enumerate(("query", "key", "value")):
      rows = slice(part * vw, (part + 1) * vw)
      add(h + "attention.in_proj_weight", f"image_tower/head/attention/{name}/kernel",
          (3 * vw, vw), lambda x, r=rows: x[r].T.reshape(vw, heads, d),
          lambda k: k.reshape(vw, vw).T, part)
      add(h + "attention.in_proj_bias", f"image_tower/head/attention/{name}/bias", (3 * vw,),
          lambda x, r=rows: x[r].reshape(heads, d), lambda k: k.reshape(vw), part)
    out(h + "attention.out_proj", "image_tower/head/attention", vw, heads)
    ln(h + "layernorm", "image_tower/head/ln", vw)
    dense(h + "mlp.fc1", "image_tower/head/mlp/fc1", vw, v["intermediate_size"])
    dense(h + "mlp.fc2", "image_tower/head/mlp/fc2", v["intermediate_size"], vw)
    scalar = lambda x: np.reshape(x, ())
    add("logit_scale", "logit_scale", (1,), scalar, lambda x: np.reshape(x, (1,)))
    add("logit_bias", "logit_bias", (1,), scalar, lambda x: np.reshape(x, (1,)))
  else:
    dense("visual_projection", "image_proj", vw, config["projection_dim"], bias=False)
    dense("text_projection", "text_proj", tw, config["projection_dim"], bias=False)
    add("logit_scale", "logit_scale", ())
  return specs, shapes


def read_state_dict(folder: str | os.PathLike, keys: bool = True) -> dict:
  """model.safetensors (or its shards) -> {key: np.ndarray}; with keys=False the shapes."""
  folder = os.fspath(folder)
  single = os.path.join(folder, "model.safetensors")
  index = single + ".index.json"
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      files = [os.path.join(folder, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    present = sorted(os.listdir(folder))
    hint = (" PyTorch .bin weights: save them again with save_pretrained(..., "
            "safe_serialization=True)." if "pytorch_model.bin" in present else "")
    raise CheckpointError(f"{folder}: no model.safetensors (found {present[:8]}).{hint}")
  state = {}
  for path in files:
    part, _ = common.read_safetensors(path, keys, ignore=BUFFER_KEYS)
    state.update(part)
  return state


def check_shapes(shapes: dict, config: dict, folder: str) -> None:
  """Raises CheckpointError at the first key missing, of another shape, or unexpected."""
  _, expected = _specs_and_shapes(config)
  shapes = {k: common.shape_of(s) for k, s in shapes.items()}
  if config["model_type"] == "clip" and shapes.get("logit_scale") == (1,):
    shapes["logit_scale"] = ()
  common.check_shapes(shapes, expected, os.path.join(folder, "model.safetensors"),
                      f"Is it the {ARCHITECTURES[config['model_type']]} that config.json "
                      "describes?")


def model_from_folder(folder: str | os.PathLike, **overrides):
  """The mmjax CLIP of a folder, from config.json and the tensors' shapes (no weights read)."""
  folder = os.fspath(folder)
  config = read_config(folder)
  check_shapes(read_state_dict(folder, keys=False), config, folder)
  from mmjax.models import clip  # pylint: disable=import-outside-toplevel
  return clip.CLIP(**clip_kwargs(config, folder), **overrides)


def load(folder: str | os.PathLike, *, dtype=np.float32):
  """A transformers CLIPModel / SiglipModel folder -> (mmjax CLIP, params).

  model.apply({"params": params}, images [b, h, w, 3], tokens [b, len]) gives
  transformers' normalised image and text embeddings (get_image_features and
  get_text_features, L2-normalised); images NHWC, normalised as NORMALISATION says.
  """
  folder = os.fspath(folder)
  config = read_config(folder)
  state = read_state_dict(folder)
  check_shapes(state, config, folder)
  if config["model_type"] == "clip" and np.shape(state["logit_scale"]) == (1,):
    state["logit_scale"] = state["logit_scale"].reshape(())
  specs, _ = _specs_and_shapes(config)
  from mmjax.models import clip  # pylint: disable=import-outside-toplevel
  return clip.CLIP(**clip_kwargs(config, folder)), common.to_flat_params(state, specs, dtype)


def _family(model) -> str:
  if (model.image_pool == "map" and model.text_pool == "last" and not model.text_causal
      and model.text_proj_bias and not model.image_projection and model.sigmoid):
    return "siglip"
  if (model.openai_layout and model.image_pool == "tok" and model.text_causal
      and not model.text_proj_bias and model.image_projection and not model.sigmoid
      and model.text_pool in (None, "argmax", "eos")):
    return "clip"
  raise ValueError("export: this CLIP has neither Hugging Face CLIPModel's layout "
                   "(openai_layout=True, image_pool='tok', softmax) nor SiglipModel's "
                   "(image_pool='map', text_pool='last', text_causal=False, "
                   "text_proj_bias=True, image_projection=False, sigmoid=True).")


def export(params, model, folder: str | os.PathLike, dtype=np.float32) -> dict:
  """mmjax CLIP parameters -> a folder transformers' CLIPModel / SiglipModel loads.

  Writes config.json and model.safetensors into `folder` (created); returns the config.
  The family is the model's layout (see `_family`). Checked from the PyTorch side by
  tools/make_hf_fixtures.py.
  """
  from mmjax.models import vit  # pylint: disable=import-outside-toplevel
  kind = _family(model)
  if model.activation not in _TO_HF_ACTIVATION:
    raise ValueError(f"export: activation={model.activation!r} has no transformers "
                     f"counterpart; use one of {sorted(_TO_HF_ACTIVATION)}.")
  params = params["params"] if set(params) == {"params"} else params
  v = vit.parse_variant(model.image_variant, model.image_dims)
  pos = params.get("image_tower", {}).get("pos_embedding")
  if pos is None or np.ndim(pos) != 3:
    raise ValueError("export: params have no image_tower/pos_embedding [1, tokens, width]: "
                     "are they this CLIP's parameters?")
  grid = int(round((np.shape(pos)[1] - int(kind == "clip")) ** 0.5))
  eps = model.layernorm_epsilon or (1e-5 if model.openai_layout else 1e-6)
  act = _TO_HF_ACTIVATION[model.activation]
  text = {"vocab_size": model.text_vocab_size, "hidden_size": model.text_width,
          "intermediate_size": model.text_mlp_dim, "num_hidden_layers": model.text_depth,
          "num_attention_heads": model.text_heads,
          "max_position_embeddings": model.max_text_len, "hidden_act": act,
          "layer_norm_eps": eps}
  vision = {"hidden_size": v["width"], "intermediate_size": v["mlp_dim"],
            "num_hidden_layers": v["depth"], "num_attention_heads": v["num_heads"],
            "num_channels": 3, "image_size": grid * v["patch"], "patch_size": v["patch"],
            "hidden_act": act, "layer_norm_eps": eps}
  if kind == "clip":
    pool = model.text_pool or "argmax"
    text["eos_token_id"] = _LEGACY_EOS if pool == "argmax" else model.text_eos_id
    if text["eos_token_id"] is None:
      from mmjax.data import tokenizer  # pylint: disable=import-outside-toplevel
      text["eos_token_id"] = tokenizer.EOS
    text["bos_token_id"] = text["pad_token_id"] = None  # Unused by the model.
    text["projection_dim"] = vision["projection_dim"] = model.embed_dim
    config = {"architectures": ["CLIPModel"], "model_type": "clip",
              "projection_dim": model.embed_dim, "logit_scale_init_value": 2.6592}
  else:
    text["projection_size"] = model.embed_dim
    text["bos_token_id"] = text["pad_token_id"] = text["eos_token_id"] = None  # Unused.
    vision["vision_use_head"] = True
    config = {"architectures": ["SiglipModel"], "model_type": "siglip"}
  config.update(text_config=text, vision_config=vision)
  full = read_config_dict(config)
  specs, shapes = _specs_and_shapes(full)
  state = common.from_params(params, specs, dtype, f"a {ARCHITECTURES[kind]}")
  common.check_shapes(state, shapes, "export")
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  common.save_safetensors(state, os.path.join(folder, "model.safetensors"), {"format": "pt"})
  tmp = os.path.join(folder, f"config.json.tmp{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
  os.replace(tmp, os.path.join(folder, "config.json"))
  return config


def read_config_dict(raw: dict) -> dict:
  """A config.json's content -> `read_config`'s result (defaults filled in)."""
  kind = raw["model_type"]
  config = {**_DEFAULTS[kind]["top"], **raw}
  for tower in ("text_config", "vision_config"):
    config[tower] = {**_DEFAULTS[kind][tower], **(raw.get(tower) or {})}
  if kind == "siglip" and config["text_config"].get("projection_size") is None:
    config["text_config"]["projection_size"] = config["text_config"]["hidden_size"]
  return config
