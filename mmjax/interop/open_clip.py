"""OpenAI / open_clip ViT CLIP state dicts (safetensors) <-> mmjax CLIP parameters.

  model, params = open_clip.load("ViT-B-32.safetensors", quick_gelu=True)
  out = model.apply({"params": params}, images_nhwc, tokens)  # tokens: data.bpe.ClipTokenizer
  open_clip.export(params, model, "exported.safetensors")    # open_clip loads it back

The files are read and written with safetensors' NumPy API: no PyTorch. Sizes (widths,
depths, MLP widths, patch, image size, context length, vocabulary, embedding width) come
from the tensors' shapes, so B/32, B/16, L/14 and other ViT sizes load alike. Two things
are not in the shapes: the activation (`quick_gelu=True` for OpenAI's weights and
open_clip's "-quickgelu" models, False for open_clip's others) and the head counts
(`vision_heads`, `text_heads`). By default the heads are width / 64, as in every open_clip
ViT config, except 16 image-tower heads for the widths 1280, 1408, 1664 and 1792 (ViT-H,
-g, -bigG, -e). Files written by `export` record both in their metadata, and `load`
reads them from there.

Layouts read: open_clip's `CLIP` ("visual.*", "transformer.*", "token_embedding.weight",
...), its `CustomTextCLIP` with a built-in text tower ("text.*"), either with a "module."
prefix. Not covered: ResNet image towers, timm or Hugging Face towers, attention pooling, and
configs whose pooling is not in the shapes (CLIPA's average pooling, the "worldwide"
models' text pooled at a tokenizer's EOS id): those load, but give other embeddings.
A file that is not such a state dict, or whose shapes disagree, raises CheckpointError
naming the first key that differs with the shape expected and the shape found; so does
a tensor that is not floating point, and metadata that is malformed or contradicts the
shapes (the shapes decide the sizes; the metadata only adds what they cannot say).
"""
import json
import os

import numpy as np

from mmjax.interop import common
from mmjax.interop.common import CheckpointError  # pylint: disable=unused-import

# OpenAI's JIT archives carry these scalars beside the weights; open_clip drops them too.
_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")
METADATA_KEY = "mmjax.open_clip_config"
_WHAT = "an open_clip / OpenAI CLIP ViT state dict"


def read_state_dict(path: str | os.PathLike, keys: bool = True) -> tuple[dict, dict]:
  """A safetensors file -> ({key: np.ndarray}, metadata); with keys=False only the shapes.

  The "module." prefix of a data-parallel save is removed, and so is "text." of
  open_clip's CustomTextCLIP layout; OpenAI's scalar entries are dropped.
  """
  out, metadata = common.read_safetensors(path, keys, ignore=_IGNORED_KEYS)
  out = {k[len("text."):] if k.startswith("text.") else k: v for k, v in out.items()}
  for k in ("logit_scale", "logit_bias"):  # open_clip's nonscalar_logit_scale: shape [1].
    if k in out and common.shape_of(out[k]) == (1,):
      out[k] = () if not keys else out[k].reshape(())
  return out, metadata


def _mlp_ratio(mlp_dim: int, width: int) -> float:
  """mlp_dim / width, nudged so that open_clip's int(width * ratio) gives mlp_dim back."""
  ratio = mlp_dim / width
  while int(width * ratio) < mlp_dim:
    ratio = float(np.nextafter(ratio, np.inf))
  return ratio


def infer_config(shapes: dict, path: str = "state dict") -> dict:
  """{key: shape or array} -> open_clip's model config (embed_dim, vision_cfg, text_cfg).

  Head counts and the activation are not in the shapes; see `load`.
  """
  shapes = {k: common.shape_of(v) for k, v in shapes.items()}

  def need(key, rank, pattern):
    return common.need(shapes, key, rank, pattern, path, _WHAT)

  vw, channels, p, p2 = need("visual.conv1.weight", 4, ("vision_width", 3, "patch", "patch"))
  if channels != 3 or p != p2:
    raise common.mismatch(path, "visual.conv1.weight", (vw, 3, p, p), (vw, channels, p, p2))
  n_pos, _ = need("visual.positional_embedding", 2, ("1 + grid**2", vw))
  grid = int(round((n_pos - 1) ** 0.5))
  if grid * grid + 1 != n_pos:
    raise common.mismatch(path, "visual.positional_embedding", ("1 + grid**2", vw), (n_pos, _))
  vision_mlp = need("visual.transformer.resblocks.0.mlp.c_fc.weight", 2, ("mlp_dim", vw))[0]
  vocab, tw = need("token_embedding.weight", 2, ("vocab_size", "text_width"))
  ctx = need("positional_embedding", 2, ("context_length", tw))[0]
  text_mlp = need("transformer.resblocks.0.mlp.c_fc.weight", 2, ("mlp_dim", tw))[0]
  embed_dim = need("text_projection", 2, (tw, "embed_dim"))[1]
  return {
      "embed_dim": int(embed_dim),
      "vision_cfg": {"image_size": int(grid * p), "patch_size": int(p), "width": int(vw),
                     "layers": common.num_blocks(shapes, "visual.transformer.resblocks."),
                     "mlp_ratio": _mlp_ratio(vision_mlp, vw)},
      "text_cfg": {"context_length": int(ctx), "vocab_size": int(vocab), "width": int(tw),
                   "layers": common.num_blocks(shapes, "transformer.resblocks."),
                   "mlp_ratio": _mlp_ratio(text_mlp, tw)},
      "logit_bias": "logit_bias" in shapes,
  }


def expected_shapes(config: dict) -> dict:
  """open_clip's state-dict keys for `config` -> their shapes, in open_clip's order."""
  v, t, e = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
  vw, tw, p = v["width"], t["width"], v["patch_size"]
  grid = v["image_size"] // p

  def blocks(prefix, w, layers, mlp):
    out = {}
    for i in range(layers):
      b = f"{prefix}{i}."
      out.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,),
                  b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,),
                  b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                  b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                  b + "mlp.c_fc.weight": (mlp, w), b + "mlp.c_fc.bias": (mlp,),
                  b + "mlp.c_proj.weight": (w, mlp), b + "mlp.c_proj.bias": (w,)})
    return out

  out = {"positional_embedding": (t["context_length"], tw), "text_projection": (tw, e),
         "logit_scale": ()}
  if config.get("logit_bias"):
    out["logit_bias"] = ()
  out.update({"visual.class_embedding": (vw,), "visual.positional_embedding": (grid**2 + 1, vw),
              "visual.proj": (vw, e), "visual.conv1.weight": (vw, 3, p, p),
              "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,)})
  out.update(blocks("visual.transformer.resblocks.", vw, v["layers"],
                    int(vw * v["mlp_ratio"])))
  out.update({"visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,)})
  out.update(blocks("transformer.resblocks.", tw, t["layers"], int(tw * t["mlp_ratio"])))
  out.update({"token_embedding.weight": (t["vocab_size"], tw), "ln_final.weight": (tw,),
              "ln_final.bias": (tw,)})
  return out


def check_shapes(shapes: dict, config: dict, path: str = "state dict") -> None:
  """Raises CheckpointError at the first key missing, of another shape, or unexpected."""
  common.check_shapes(shapes, expected_shapes(config), path,
                      "An open_clip ViT CLIP of this size has no such key; ResNet, timm, "
                      "Hugging Face or attention-pooled towers are not supported.")


# --- The mapping: (open_clip key, mmjax path, to mmjax, to open_clip, part of the key) ---

def _identity(x):
  return x


def _transpose(x):
  return x.T


def _specs(config: dict, vision_heads: int, text_heads: int) -> list:
  """One entry per mmjax leaf: (key, path, to_mmjax, to_open_clip, part)."""
  v, t = config["vision_cfg"], config["text_cfg"]
  specs = []

  def add(key, path, fwd=_identity, inv=_identity, part=0):
    specs.append((key, tuple(path.split("/")), fwd, inv, part))

  def ln(key, path):
    add(key + ".weight", path + "/scale")
    add(key + ".bias", path + "/bias")

  def blocks(prefix, path, w, layers, heads):
    d = w // heads
    for i in range(layers):
      b, j = f"{prefix}{i}.", f"{path}/block{i}"
      ln(b + "ln_1", j + "/ln1")
      for part, name in enumerate(("query", "key", "value")):
        rows = slice(part * w, (part + 1) * w)
        add(b + "attn.in_proj_weight", f"{j}/attention/{name}/kernel",
            lambda x, r=rows: x[r].T.reshape(w, heads, d), lambda k: k.reshape(w, w).T, part)
        add(b + "attn.in_proj_bias", f"{j}/attention/{name}/bias",
            lambda x, r=rows: x[r].reshape(heads, d), lambda k: k.reshape(w), part)
      add(b + "attn.out_proj.weight", f"{j}/attention/out/kernel",
          lambda x: x.T.reshape(heads, d, w), lambda k: k.reshape(w, w).T)
      add(b + "attn.out_proj.bias", f"{j}/attention/out/bias")
      ln(b + "ln_2", j + "/ln2")
      add(b + "mlp.c_fc.weight", f"{j}/mlp/fc1/kernel", _transpose, _transpose)
      add(b + "mlp.c_fc.bias", f"{j}/mlp/fc1/bias")
      add(b + "mlp.c_proj.weight", f"{j}/mlp/fc2/kernel", _transpose, _transpose)
      add(b + "mlp.c_proj.bias", f"{j}/mlp/fc2/bias")

  vw = v["width"]
  add("visual.class_embedding", "image_tower/cls", lambda x: x.reshape(1, 1, vw),
      lambda x: x.reshape(vw))
  add("visual.positional_embedding", "image_tower/pos_embedding", lambda x: x[None],
      lambda x: x[0])
  add("visual.conv1.weight", "image_tower/embedding/kernel",
      lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))
  ln("visual.ln_pre", "image_tower/ln_pre")
  blocks("visual.transformer.resblocks.", "image_tower/encoder", vw, v["layers"], vision_heads)
  ln("visual.ln_post", "image_tower/encoder/ln_final")
  add("visual.proj", "image_proj/kernel")
  add("token_embedding.weight", "text_tower/token_embedding/embedding")
  add("positional_embedding", "text_tower/pos_embedding")
  blocks("transformer.resblocks.", "text_tower/encoder", t["width"], t["layers"], text_heads)
  ln("ln_final", "text_tower/encoder/ln_final")
  add("text_projection", "text_proj/kernel")
  add("logit_scale", "logit_scale")
  if config.get("logit_bias"):
    add("logit_bias", "logit_bias")
  return specs


# Image-tower widths whose open_clip configs have 16 heads rather than width / 64.
_VISION_HEADS = {1280: 16, 1408: 16, 1664: 16, 1792: 16}


def _heads(width: int, heads: int | None, tower: str) -> int:
  if heads is None:
    heads = _VISION_HEADS.get(width, width // 64) if tower == "vision" else width // 64
  if heads < 1 or width % heads:
    config_value = "width / head_width" if tower == "vision" else "heads"
    raise CheckpointError(f"The {tower} tower's width {width} does not split into {heads} "
                          f"heads: pass {tower}_heads= (the open_clip config's {config_value}).")
  return heads


def clip_kwargs(config: dict, quick_gelu: bool, vision_heads: int, text_heads: int) -> dict:
  """open_clip's config -> mmjax.models.CLIP's keyword arguments (openai_layout=True)."""
  v, t = config["vision_cfg"], config["text_cfg"]
  return dict(
      image_variant=f"clip/{v['patch_size']}", image_pool="tok",
      image_dims=(v["width"], v["layers"], int(v["width"] * v["mlp_ratio"]), vision_heads),
      text_width=t["width"], text_depth=t["layers"], text_heads=text_heads,
      text_mlp_dim=int(t["width"] * t["mlp_ratio"]), max_text_len=t["context_length"],
      text_vocab_size=t["vocab_size"], embed_dim=config["embed_dim"],
      sigmoid=bool(config.get("logit_bias")), openai_layout=True,
      activation="quick_gelu" if quick_gelu else "gelu_exact")


# Sizes that both the shapes and `export`'s metadata give: the metadata must agree.
_SHAPE_FIELDS = ("embed_dim", "vision_cfg.image_size", "vision_cfg.patch_size",
                 "vision_cfg.width", "vision_cfg.layers", "text_cfg.context_length",
                 "text_cfg.vocab_size", "text_cfg.width", "text_cfg.layers")


def saved_config(path: str, metadata: dict, config: dict) -> dict | None:
  """The config `export` wrote into the metadata, checked against `config` (inferred from
  the shapes); None if there is none. Raises CheckpointError if it is malformed or
  contradicts the shapes."""
  saved = common.metadata_config(
      path, metadata, METADATA_KEY,
      required={"quick_gelu": bool, "vision_cfg.head_width": int, "text_cfg.heads": int},
      optional={"vision_cfg.mlp_ratio": float, "text_cfg.mlp_ratio": float},
      inferred={f: common.lookup(config, f) for f in _SHAPE_FIELDS})
  if saved is None:
    return None
  for tower, heads in (("vision_cfg", "head_width"), ("text_cfg", "heads")):
    width, n = config[tower]["width"], saved[tower][heads]
    if width % n:
      raise common.metadata_error(path, METADATA_KEY, f"has {tower}.{heads}={n}, which does "
                                  f"not divide the width {width} that the shapes give")
    ratio = saved[tower].get("mlp_ratio")
    if ratio is not None and int(width * ratio) != int(width * config[tower]["mlp_ratio"]):
      raise common.metadata_error(
          path, METADATA_KEY, f"says {tower}.mlp_ratio={ratio!r} (an MLP width of "
          f"{int(width * ratio)}), but the tensors' shapes give "
          f"{int(width * config[tower]['mlp_ratio'])}")
  return saved


def read_config(path: str | os.PathLike) -> dict:
  """The open_clip config of a weights file from its shapes (and metadata, if exported here).

  E.g. read_config(path)["vision_cfg"]["image_size"], the resolution the model expects.
  Metadata that contradicts the shapes raises CheckpointError.
  """
  path = os.fspath(path)
  shapes, metadata = read_state_dict(path, keys=False)
  config = infer_config(shapes, path)
  saved = saved_config(path, metadata, config)
  if saved is not None:
    config = {**config, **saved, "vision_cfg": {**config["vision_cfg"], **saved["vision_cfg"]},
              "text_cfg": {**config["text_cfg"], **saved["text_cfg"]},
              "logit_bias": config["logit_bias"]}
  return config


def load(path: str | os.PathLike, *, quick_gelu: bool | None = None,
         vision_heads: int | None = None, text_heads: int | None = None,
         dtype=np.float32):
  """A safetensors open_clip / OpenAI ViT CLIP state dict -> (mmjax CLIP, params).

  Args:
    path: the .safetensors file.
    quick_gelu: True for OpenAI's weights and open_clip's "-quickgelu" models, False for
      the other open_clip models. Read from the file's metadata when `export` wrote it.
    vision_heads, text_heads: attention heads; by default the metadata's, or as open_clip's
      configs have them (see the module's docstring).
    dtype: the parameters' dtype (float16 files are widened to float32 by default).

  Returns:
    (model, params): model.apply({"params": params}, images [b, h, w, 3], tokens [b, ctx])
    gives open_clip's normalised image and text embeddings; images are NHWC, normalised
    as open_clip's preprocessing does (mean/std of OpenAI's data).
  """
  path = os.fspath(path)
  state, metadata = read_state_dict(path)
  config = infer_config(state, path)
  check_shapes(state, config, path)
  model, (vision_heads, text_heads) = _model(path, config, metadata, quick_gelu, vision_heads,
                                             text_heads)
  return model, to_params(state, config, vision_heads, text_heads, dtype)


def model_from_file(path: str | os.PathLike, *, quick_gelu: bool | None = None,
                    vision_heads: int | None = None, text_heads: int | None = None):
  """The mmjax CLIP that `load(path, ...)` would return, from the file's shapes only.

  Cheap: reads the safetensors header, not the weights. Same arguments as `load`.
  """
  path = os.fspath(path)
  shapes, metadata = read_state_dict(path, keys=False)
  config = infer_config(shapes, path)
  check_shapes(shapes, config, path)
  return _model(path, config, metadata, quick_gelu, vision_heads, text_heads)[0]


def _model(path, config, metadata, quick_gelu, vision_heads, text_heads):
  """(mmjax CLIP, (vision_heads, text_heads)) for an inferred config and the file's metadata."""
  saved = saved_config(path, metadata, config)
  if saved is not None:
    quick_gelu = saved["quick_gelu"] if quick_gelu is None else quick_gelu
    vision_width, head_width = config["vision_cfg"]["width"], saved["vision_cfg"]["head_width"]
    vision_heads = vision_heads or vision_width // head_width
    text_heads = text_heads or saved["text_cfg"]["heads"]
  if quick_gelu is None:
    raise ValueError(f"{path}: say which activation the model uses: quick_gelu=True for "
                     "OpenAI's weights and open_clip's '-quickgelu' models, quick_gelu=False "
                     "for open_clip's others (their config's 'quick_gelu').")
  vision_heads = _heads(config["vision_cfg"]["width"], vision_heads, "vision")
  text_heads = _heads(config["text_cfg"]["width"], text_heads, "text")
  from mmjax.models import clip  # pylint: disable=import-outside-toplevel
  model = clip.CLIP(**clip_kwargs(config, quick_gelu, vision_heads, text_heads))
  return model, (vision_heads, text_heads)


def to_params(state: dict, config: dict, vision_heads: int, text_heads: int,
              dtype=np.float32) -> dict:
  """A checked open_clip state dict {key: array} -> mmjax CLIP's parameter tree."""
  return common.to_flat_params(state, _specs(config, vision_heads, text_heads), dtype)


def export(params, model, path: str | os.PathLike, dtype=np.float32) -> dict:
  """mmjax CLIP parameters -> an open_clip state dict in a safetensors file; returns its config.

  `model` is the CLIP module (openai_layout=True, image_pool="tok"). open_clip loads the
  file into `open_clip.model.CLIP(**config)` (config as returned, less "quick_gelu" moved
  to the constructor's argument of that name): see tools/make_interop_fixtures.py.
  """
  from mmjax.models import vit  # pylint: disable=import-outside-toplevel
  if not getattr(model, "openai_layout", False) or model.image_pool != "tok":
    raise ValueError("export writes open_clip's ViT CLIP layout: the model needs "
                     "openai_layout=True and image_pool='tok' (mmjax's own layout has no "
                     "open_clip counterpart).")
  if model.activation not in ("quick_gelu", "gelu_exact"):
    raise ValueError(f"activation={model.activation!r} has no open_clip counterpart: use "
                     "'quick_gelu' or 'gelu_exact'.")
  params = params["params"] if set(params) == {"params"} else params
  v = vit.parse_variant(model.image_variant, model.image_dims)
  pos = params.get("image_tower", {}).get("pos_embedding")
  if pos is None or np.ndim(pos) != 3:
    raise ValueError("export: params have no image_tower/pos_embedding [1, 1 + grid**2, width]: "
                     "are they this CLIP's parameters?")
  grid = int(round((np.shape(pos)[1] - 1) ** 0.5))
  config = {
      "embed_dim": model.embed_dim, "quick_gelu": model.activation == "quick_gelu",
      "vision_cfg": {"image_size": grid * v["patch"], "patch_size": v["patch"],
                     "width": v["width"], "layers": v["depth"],
                     "head_width": v["width"] // v["num_heads"],
                     "mlp_ratio": _mlp_ratio(v["mlp_dim"], v["width"])},
      "text_cfg": {"context_length": model.max_text_len, "vocab_size": model.text_vocab_size,
                   "width": model.text_width, "heads": model.text_heads,
                   "layers": model.text_depth,
                   "mlp_ratio": _mlp_ratio(model.text_mlp_dim, model.text_width)},
  }
  shape_config = {**config, "logit_bias": model.sigmoid}
  specs = _specs(shape_config, v["num_heads"], model.text_heads)
  state = common.from_params(params, specs, dtype, "an open_clip CLIP")
  check_shapes(state, shape_config, "export")
  common.save_safetensors(state, path, {"format": "pt", METADATA_KEY: json.dumps(config)})
  return config


def config_kwargs(config) -> dict:
  """`load`'s and `model_from_file`'s quick_gelu, vision_heads and text_heads, from a
  task's config (the fields that say what a file may not record)."""
  return {k: config.get(k) for k in ("quick_gelu", "vision_heads", "text_heads")}
