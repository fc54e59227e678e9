"""One entry point for pretrained CLIP-like weights: whichever supported layout a path holds.

  pre = load_pretrained("siglip-base-patch16-224")  # or an open_clip file, a CLIP folder
  print(pre.describe())  # "...: a Hugging Face SiglipModel folder (config.json + ...)"
  emb = pre.model.apply({"params": pre.params}, images_nhwc, pre.tokenizer().encode(texts))

Layouts (`LAYOUTS`): an open_clip / OpenAI ViT CLIP safetensors file (mmjax.interop.open_clip),
a transformers CLIPModel folder and a SiglipModel folder (mmjax.interop.hf_clip). Anything
else, or a folder whose files disagree with its config, raises CheckpointError naming what
was found and what is supported.
"""
import dataclasses
import json
import os
from typing import Any

import numpy as np

from mmjax.interop import common
from mmjax.interop.common import CheckpointError

LAYOUTS = {
    "open_clip": "an open_clip / OpenAI ViT CLIP state dict (a .safetensors file)",
    "hf_clip": "a Hugging Face CLIPModel folder (config.json + model.safetensors)",
    "hf_siglip": "a Hugging Face SiglipModel folder (config.json + model.safetensors)",
}
_SUPPORTED = "; ".join(LAYOUTS.values())


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """What `load_pretrained` found: the layout, the mmjax CLIP, its parameters (None when
  only the model was asked for), the image size and normalisation it expects."""
  kind: str  # A key of LAYOUTS.
  path: str
  model: Any  # mmjax.models.clip.CLIP
  params: dict | None
  image_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]

  def describe(self) -> str:
    return f"{self.path}: {LAYOUTS[self.kind]}"

  def has_tokenizer(self) -> bool:
    """Whether the folder carries a tokenizer `tokenizer()` reads (HF folders only)."""
    from mmjax.interop import hf_tokenizer  # pylint: disable=import-outside-toplevel
    return self.kind != "open_clip" and hf_tokenizer.has_tokenizer(self.path)

  def tokenizer(self, context_length: int | None = None):
    """The folder's tokenizer (hf_tokenizer.PretrainedTokenizer), rows of `context_length`
    (default: the model's positions). open_clip files carry none: use data.bpe."""
    if self.kind == "open_clip":
      raise CheckpointError(f"{self.path}: an open_clip file carries no tokenizer; use "
                            "mmjax.data.bpe.ClipTokenizer with bpe_simple_vocab_16e6.txt.gz.")
    from mmjax.interop import hf_tokenizer  # pylint: disable=import-outside-toplevel
    return hf_tokenizer.PretrainedTokenizer(self.path, context_length or self.model.max_text_len)


def detect(path: str | os.PathLike) -> str:
  """The layout at `path` (a key of LAYOUTS), from file names and config.json only."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No pretrained weights at {path!r}; supported: {_SUPPORTED}.")
  if os.path.isfile(path):
    if not path.endswith(".safetensors"):
      raise CheckpointError(f"{path}: a file that is not .safetensors; supported: "
                            f"{_SUPPORTED}.")
    shapes, _ = common.read_safetensors(path, keys=False)
    if any(k.startswith(("text_model.", "vision_model.")) for k in shapes):
      raise CheckpointError(f"{path}: a Hugging Face state dict without its config.json: give "
                            "the folder that holds both (what save_pretrained writes).")
    return "open_clip"
  config_path = os.path.join(path, "config.json")
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      try:
        config = json.load(f)
      except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not JSON ({e}).") from e
    kind = {"clip": "hf_clip", "siglip": "hf_siglip"}.get(config.get("model_type"))
    if kind:
      return kind
    found = (f"model_type={config.get('model_type')!r}, architectures="
             f"{config.get('architectures') or config.get('_class_name')}")
    raise CheckpointError(f"{path}: a folder whose config.json has {found}; supported: "
                          f"{_SUPPORTED}.")
  found = sorted(os.listdir(path))
  what = ("a diffusers pipeline folder (model_index.json)" if "model_index.json" in found
          else f"a folder without config.json (holding {found[:8]})")
  raise CheckpointError(f"{path}: {what}; supported: {_SUPPORTED}.")


def load_pretrained(path: str | os.PathLike, *, weights: bool = True,
                    quick_gelu: bool | None = None, vision_heads: int | None = None,
                    text_heads: int | None = None, dtype=np.float32) -> Pretrained:
  """Any supported layout at `path` -> Pretrained (see `detect` and LAYOUTS).

  weights=False reads only the headers and config (the model, image size and
  normalisation; params None). quick_gelu, vision_heads and text_heads are what an open_clip
  file may not record (see mmjax.interop.open_clip); a Hugging Face folder's config.json
  says them, and giving them for one is an error.
  """
  path = os.fspath(path)
  kind = detect(path)
  if kind == "open_clip":
    from mmjax.interop import open_clip  # pylint: disable=import-outside-toplevel
    from mmjax.data import image  # pylint: disable=import-outside-toplevel
    kwargs = dict(quick_gelu=quick_gelu, vision_heads=vision_heads, text_heads=text_heads)
    if weights:
      model, params = open_clip.load(path, dtype=dtype, **kwargs)
    else:
      model, params = open_clip.model_from_file(path, **kwargs), None
    size = open_clip.read_config(path)["vision_cfg"]["image_size"]
    mean, std = image.CLIP_MEAN, image.CLIP_STD
  else:
    given = {k: v for k, v in dict(quick_gelu=quick_gelu, vision_heads=vision_heads,
                                   text_heads=text_heads).items() if v is not None}
    if given:
      raise ValueError(f"{path}: {LAYOUTS[kind]} gives its activation and heads in config.json; "
                       f"leave {sorted(given)} unset.")
    from mmjax.interop import hf_clip  # pylint: disable=import-outside-toplevel
    if weights:
      model, params = hf_clip.load(path, dtype=dtype)
    else:
      model, params = hf_clip.model_from_folder(path), None
    config = hf_clip.read_config(path)
    size = hf_clip.image_size(config)
    mean, std = _hf_normalisation(path, config["model_type"])
  return Pretrained(kind, path, model, params, int(size), tuple(mean), tuple(std))


def _hf_normalisation(folder: str, model_type: str):
  """preprocessor_config.json's image_mean / image_std, else the family's defaults."""
  from mmjax.interop import hf_clip  # pylint: disable=import-outside-toplevel
  mean, std = hf_clip.NORMALISATION[model_type]
  path = os.path.join(folder, "preprocessor_config.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      settings = json.load(f)
    mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
  return tuple(float(x) for x in mean), tuple(float(x) for x in std)
