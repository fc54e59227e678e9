"""diffusers AutoencoderKL state dicts (safetensors) <-> mmjax AutoencoderKL parameters.

  model, params = diffusers.load_vae("diffusion_pytorch_model.safetensors")
  mean, logvar = model.apply({"params": params}, images_nhwc, method=model.encode)
  images = model.apply({"params": params}, latents, method=model.decode)

Stable Diffusion's KL-f8 VAE (e.g. sd-vae-ft-mse, or the "vae" folder of an SD 1.x/2.x
repository) and other diffusers AutoencoderKLs built from DownEncoderBlock2D /
UpDecoderBlock2D load alike: channels, levels, blocks per level, latent and image
channels come from the shapes. The GroupNorm group count is not in the shapes
(`groups`, 32 in every diffusers VAE config). Latents are the posterior's; diffusion
models see them multiplied by the config's `scaling_factor` (0.18215 for SD 1.x/2.x).

Attention weights under diffusers' older names (query, key, value, proj_attn) and as
1x1 convolutions are read too. Not covered: the original CompVis/LDM key names
("encoder.down.0.block.0..."; convert them with diffusers first), VAEs without quant
convs or mid-block attention in only one of encoder and decoder, and video/3-D VAEs.
Tensors that are not floating point, and metadata that is malformed or contradicts
the shapes, raise CheckpointError.
"""
import json
import os

import numpy as np

from mmjax.interop import common
from mmjax.interop.common import CheckpointError  # pylint: disable=unused-import

METADATA_KEY = "mmjax.diffusers_config"
_WHAT = "a diffusers AutoencoderKL state dict"
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_state_dict(path: str | os.PathLike, keys: bool = True) -> tuple[dict, dict]:
  """A safetensors file -> ({key: array or shape}, metadata), attention keys renamed."""
  out, metadata = common.read_safetensors(path, keys)
  renamed = {}
  for k, v in out.items():
    head, _, tail = k.rpartition(".")  # tail: weight or bias.
    block, _, name = head.rpartition(".")
    if ".attentions." in block and name in _OLD_ATTENTION_NAMES:
      k = f"{block}.{_OLD_ATTENTION_NAMES[name]}.{tail}"
      if len(common.shape_of(v)) == 4 and common.shape_of(v)[2:] == (1, 1):  # 1x1 conv.
        v = common.shape_of(v)[:2] if not keys else v[:, :, 0, 0]
    renamed[k] = v
  return renamed, metadata


def infer_config(shapes: dict, path: str = "state dict") -> dict:
  """{key: shape or array} -> diffusers' AutoencoderKL config (the keys that shape it)."""
  shapes = {k: common.shape_of(v) for k, v in shapes.items()}

  def need(key, rank, pattern):
    return common.need(shapes, key, rank, pattern, path, _WHAT)

  c0, in_channels = need("encoder.conv_in.weight", 4, ("channels", "in_channels", 3, 3))[:2]
  levels = common.num_blocks(shapes, "encoder.down_blocks.")
  layers = common.num_blocks(shapes, "encoder.down_blocks.0.resnets.")
  block_out = [need(f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 4,
                    (f"block_out_channels[{i}]", "in", 3, 3))[0] for i in range(max(levels, 1))]
  latent2 = need("encoder.conv_out.weight", 4, ("2 * latent_channels", block_out[-1], 3, 3))[0]
  out_channels = need("decoder.conv_out.weight", 4, ("out_channels", block_out[0], 3, 3))[0]
  return {"in_channels": int(in_channels), "out_channels": int(out_channels),
          "block_out_channels": [int(c) for c in block_out], "layers_per_block": int(layers),
          "latent_channels": int(latent2) // 2,
          "use_quant_conv": "quant_conv.weight" in shapes,
          "use_post_quant_conv": "post_quant_conv.weight" in shapes,
          "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in shapes}


def _conv(o, i, k=3):
  return {"weight": (o, i, k, k), "bias": (o,)}


def _norm(c):
  return {"weight": (c,), "bias": (c,)}


def _layout(config: dict) -> dict:
  """diffusers key prefix -> (mmjax path, kind, {suffix: shape}) in diffusers' order."""
  ch, layers = config["block_out_channels"], config["layers_per_block"]
  lat, n = config["latent_channels"], len(ch)
  out = {}

  def conv(key, path, o, i, k=3):
    out[key] = (path, "conv", _conv(o, i, k))

  def norm(key, path, c):
    out[key] = (path, "norm", _norm(c))

  def resnet(key, path, i, o):
    norm(f"{key}.norm1", f"{path}/norm1", i)
    conv(f"{key}.conv1", f"{path}/conv1", o, i)
    norm(f"{key}.norm2", f"{path}/norm2", o)
    conv(f"{key}.conv2", f"{path}/conv2", o, o)
    if i != o:
      conv(f"{key}.conv_shortcut", f"{path}/shortcut", o, i, 1)

  def middle(key, path, c):
    resnet(f"{key}.resnets.0", f"{path}/mid_block", c, c)
    if config["mid_block_add_attention"]:
      a = f"{key}.attentions.0"
      norm(f"{a}.group_norm", f"{path}/mid_attention/norm", c)
      for name, j in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "out")):
        out[f"{a}.{name}"] = (f"{path}/mid_attention/attention/{j}", j, {"weight": (c, c),
                                                                         "bias": (c,)})
    resnet(f"{key}.resnets.1", f"{path}/mid_block2", c, c)

  conv("encoder.conv_in", "encoder/conv_in", ch[0], config["in_channels"])
  c = ch[0]
  for level in range(n):
    for i in range(layers):
      resnet(f"encoder.down_blocks.{level}.resnets.{i}", f"encoder/down{level}_block{i}", c,
             ch[level])
      c = ch[level]
    if level < n - 1:
      conv(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder/down{level}_downsample",
           c, c)
  middle("encoder.mid_block", "encoder", c)
  norm("encoder.conv_norm_out", "encoder/norm_out", c)
  conv("encoder.conv_out", "encoder/conv_out", 2 * lat, c)
  conv("decoder.conv_in", "decoder/conv_in", ch[-1], lat)
  middle("decoder.mid_block", "decoder", ch[-1])
  c = ch[-1]
  for k in range(n):
    level = n - 1 - k
    for i in range(layers + 1):
      resnet(f"decoder.up_blocks.{k}.resnets.{i}", f"decoder/up{level}_block{i}", c, ch[level])
      c = ch[level]
    if level > 0:
      conv(f"decoder.up_blocks.{k}.upsamplers.0.conv", f"decoder/up{level}_upsample", c, c)
  norm("decoder.conv_norm_out", "decoder/norm_out", c)
  conv("decoder.conv_out", "decoder/conv_out", config["out_channels"], c)
  if config["use_quant_conv"]:
    conv("quant_conv", "encoder/quant_conv", 2 * lat, 2 * lat, 1)
  if config["use_post_quant_conv"]:
    conv("post_quant_conv", "decoder/post_quant_conv", lat, lat, 1)
  return out


def expected_shapes(config: dict) -> dict:
  """diffusers' state-dict keys for `config` -> their shapes."""
  return {f"{key}.{suffix}": shape for key, (_, _, shapes) in _layout(config).items()
          for suffix, shape in shapes.items()}


def check_shapes(shapes: dict, config: dict, path: str = "state dict") -> None:
  """Raises CheckpointError at the first key missing, of another shape, or unexpected."""
  common.check_shapes(shapes, expected_shapes(config), path,
                      "A diffusers AutoencoderKL of this size has no such key.")


def _specs(config: dict) -> list:
  """One entry per mmjax leaf: (key, path, to_mmjax, to_diffusers, part)."""
  specs = []
  for key, (path, kind, _) in _layout(config).items():
    path = tuple(path.split("/"))
    if kind == "conv":
      specs.append((f"{key}.weight", path + ("kernel",), lambda x: x.transpose(2, 3, 1, 0),
                    lambda x: x.transpose(3, 2, 0, 1), 0))
    elif kind == "norm":
      specs.append((f"{key}.weight", path + ("scale",), lambda x: x, lambda x: x, 0))
    elif kind == "out":  # Linear [c, c] -> DenseGeneral [heads=1, c, c].
      specs.append((f"{key}.weight", path + ("kernel",), lambda x: x.T[None],
                    lambda x: x[0].T, 0))
    else:  # query, key, value: Linear [c, c] -> DenseGeneral [c, heads=1, c].
      specs.append((f"{key}.weight", path + ("kernel",), lambda x: x.T[:, None],
                    lambda x: x[:, 0].T, 0))
    if kind in ("query", "key", "value"):
      specs.append((f"{key}.bias", path + ("bias",), lambda x: x[None], lambda x: x[0], 0))
    else:
      specs.append((f"{key}.bias", path + ("bias",), lambda x: x, lambda x: x, 0))
  return specs


def model_kwargs(config: dict, groups: int = 32) -> dict:
  """diffusers' config -> mmjax.models.AutoencoderKL's keyword arguments."""
  from mmjax.models import autoencoder  # pylint: disable=import-outside-toplevel
  ch = config["block_out_channels"]
  if any(c % ch[0] for c in ch):
    raise CheckpointError(f"block_out_channels {ch} are not multiples of the first, as "
                          "mmjax's channel_mult needs.")
  if config["use_quant_conv"] != config["use_post_quant_conv"]:
    raise CheckpointError("A VAE with only one of quant_conv and post_quant_conv is not "
                          "supported.")
  if any(c % groups for c in ch):
    raise CheckpointError(f"Channels {ch} do not split into groups={groups}: pass the "
                          "config's norm_num_groups as groups=.")
  return dict(autoencoder.DIFFUSERS_LAYOUT, channels=ch[0],
              channel_mult=tuple(c // ch[0] for c in ch),
              num_res_blocks=config["layers_per_block"],
              latent_channels=config["latent_channels"], out_channels=config["out_channels"],
              groups=groups, mid_attention=config["mid_block_add_attention"],
              quant_convs=config["use_quant_conv"])


def to_params(state: dict, config: dict, dtype=np.float32) -> dict:
  """A checked diffusers state dict {key: array} -> mmjax AutoencoderKL's parameter tree."""
  return common.to_flat_params(state, _specs(config), dtype)


def load_vae(path: str | os.PathLike, *, groups: int | None = None, dtype=np.float32):
  """A diffusers AutoencoderKL safetensors file -> (mmjax AutoencoderKL, params).

  Args:
    path: the .safetensors file (diffusers names it diffusion_pytorch_model.safetensors).
    groups: GroupNorm groups (diffusers' norm_num_groups): 32, or the file's metadata
      when `export_vae` wrote it.
    dtype: the parameters' dtype (float16 files are widened to float32 by default).
  """
  from mmjax.models import autoencoder  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  state, metadata = read_state_dict(path)
  config = infer_config(state, path)
  check_shapes(state, config, path)
  saved = common.metadata_config(path, metadata, METADATA_KEY,
                                 required={"norm_num_groups": int}, inferred=config)
  if groups is None:
    groups = 32 if saved is None else saved["norm_num_groups"]
  elif isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
    raise ValueError(f"groups={groups!r}: GroupNorm's group count, an integer >= 1 (the "
                     "config's norm_num_groups, 32 in diffusers' VAEs).")
  model = autoencoder.AutoencoderKL(**model_kwargs(config, groups))
  return model, to_params(state, config, dtype)


def export_vae(params, model, path: str | os.PathLike, dtype=np.float32) -> dict:
  """mmjax AutoencoderKL parameters (diffusers' layout) -> a diffusers safetensors file.

  Returns the diffusers config (AutoencoderKL(**config) loads the file), also written to
  the file's metadata.
  """
  if not (model.mid_attention and model.decoder_extra_block and model.pad == 0
          and tuple(map(tuple, model.downsample_padding)) == ((0, 1), (0, 1))):
    raise ValueError("export_vae writes diffusers' layout: the model needs "
                     "AutoencoderKL(**autoencoder.DIFFUSERS_LAYOUT, ...) options.")
  params = params["params"] if set(params) == {"params"} else params
  in_channels = np.shape(params["encoder"]["conv_in"]["kernel"])[2]
  n = len(model.channel_mult)
  config = {"in_channels": int(in_channels), "out_channels": model.out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [model.channels * m for m in model.channel_mult],
            "layers_per_block": model.num_res_blocks, "latent_channels": model.latent_channels,
            "norm_num_groups": model.groups, "use_quant_conv": model.quant_convs,
            "use_post_quant_conv": model.quant_convs,
            "mid_block_add_attention": model.mid_attention}
  state = common.from_params(params, _specs(config), dtype, "a diffusers AutoencoderKL")
  check_shapes(state, config, "export")
  common.save_safetensors(state, path, {"format": "pt", METADATA_KEY: json.dumps(config)})
  return config
