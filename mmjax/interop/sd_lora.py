"""diffusers / PEFT LoRA files for Stable Diffusion, in and out.

The file is what `StableDiffusionPipeline.save_lora_weights` writes and
`load_lora_weights` reads: `pytorch_lora_weights.safetensors` (in a folder, or named
directly) with PEFT's keys

  unet.<module>.lora_A.weight   [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
  unet.<module>.lora_B.weight   [out, r] or [out, r, 1, 1]
  text_encoder.<module>.lora_A.weight ...  ("text_model." after the prefix is optional)

and the safetensors metadata "lora_adapter_metadata" (PEFT's LoraConfig per part:
"unet.r", "unet.lora_alpha", ...). In mmjax the adapters are the leaves "lora_a"
[in, r] and "lora_b" [r, out] beside the kernels of an sd task's parameters
{"unet", "text_encoder", ...} (mmjax/lora.py): a Conv2d's lora_A [r, in, kh, kw]
becomes the matrix [kh·kw·in, r], as mmjax reads a convolution kernel. mmjax has one
scale alpha / r for a model, so a file whose parts differ in r or alpha, or that uses
rank or alpha patterns, DoRA or rsLoRA, is refused in one line. Without metadata,
alpha = r (scale 1), as diffusers reads such a file.

  params, spec = sd_lora.load("my_lora", pipe_params)   # adapters beside the kernels
  merged = lora.merge(params, spec.scale)                 # plain pipeline parameters
  sd_lora.save("out_dir", params, spec)                  # what load_lora_weights reads
"""
import json
import os
import re

import numpy as np

from mmjax import lora
from mmjax.interop import common
from mmjax.interop import sd_pipeline

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
PARTS = ("unet", "text_encoder")
_UNSUPPORTED = {"rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
                "use_dora": "DoRA", "use_rslora": "rsLoRA"}


def _file(path: str) -> str:
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no LoRA file (a folder with {WEIGHT_NAME}, or the "
                            f".safetensors file itself).")
  return path


def _module_path(key: str) -> tuple[str, ...]:
  """"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" -> mmjax's module path."""
  return sd_pipeline.our_path(key.removeprefix("text_model.") + ".weight")[:-1]


def _their_module(path: tuple[str, ...]) -> str:
  return sd_pipeline._their_key(path + ("kernel",))[:-len(".weight")]  # pylint: disable=protected-access


def _spec_from_metadata(meta: dict, ranks: set[int], path: str, targets) -> lora.Spec:
  found = {}
  for part in PARTS:
    if f"{part}.r" not in meta:
      continue
    for field, what in _UNSUPPORTED.items():
      if meta.get(f"{part}.{field}"):
        raise ValueError(f"{path}: the {part}'s adapters use {what} ({field}), which "
                         f"mmjax's LoRA does not implement.")
    found[part] = (int(meta[f"{part}.r"]), float(meta[f"{part}.lora_alpha"]))
  if len(set(found.values())) > 1:
    raise ValueError(f"{path}: its parts have different rank/alpha ({found}); mmjax uses "
                     f"one scale alpha / rank for a model.")
  if len(ranks) != 1:
    raise ValueError(f"{path}: adapters of ranks {sorted(ranks)}; mmjax uses one rank.")
  rank = ranks.pop()
  r, alpha = next(iter(found.values())) if found else (rank, float(rank))
  if r != rank:
    raise ValueError(f"{path}: its metadata says rank {r}, its tensors have rank {rank}.")
  return lora.Spec(rank, alpha, tuple(targets))


def load(path: str, params: dict) -> tuple[dict, lora.Spec]:
  """A LoRA file -> (`params` with its adapters beside their kernels, the Spec).

  `params`: an sd task's / StableDiffusion's parameters {"unet": ..., "text_encoder":
  ...}. Raises ValueError (one line) for a key that names no kernel of `params`, a
  shape that does not fit it, or a file in another LoRA format.
  """
  path = _file(path)
  state, metadata = common.read_safetensors(path)
  meta = json.loads((metadata or {}).get(METADATA_KEY) or "{}")
  flat = lora._flat(params)  # pylint: disable=protected-access
  out, ranks, targets = dict(flat), set(), []
  pairs = {}
  for key, value in state.items():
    m = re.fullmatch(r"(unet|text_encoder)\.(.+)\.lora_([AB])\.weight", key)
    if not m:
      raise ValueError(f"{path}: key {key!r} is not a diffusers/PEFT LoRA key "
                       f"('unet.<module>.lora_A.weight'); other LoRA formats (kohya's "
                       f"'lora_unet_...', '.alpha' keys) are not read.")
    pairs.setdefault((m.group(1),) + _module_path(m.group(2)), {})[m.group(3)] = value
  for module, ab in pairs.items():
    kernel = flat.get(module + ("kernel",))
    where = f"{path}: {'.'.join(module)}"
    if kernel is None or set(ab) != {"A", "B"}:
      raise ValueError(f"{where}: " + ("no such kernel in the pipeline" if kernel is None
                                       else "lora_A and lora_B must both be there") + ".")
    a, b = np.asarray(ab["A"], np.float32), np.asarray(ab["B"], np.float32)
    rank = a.shape[0]
    a = a.transpose(2, 3, 1, 0).reshape(-1, rank) if a.ndim == 4 else a.T  # [in, r]
    b = b.reshape(b.shape[0], rank).T  # [r, out]
    name = "/".join(module) + "/kernel"
    _, n_in, n_out = lora.matrix_shape(name, np.shape(kernel))
    if a.shape != (n_in, rank) or b.shape != (rank, n_out):
      raise ValueError(f"{where}: adapters {a.shape} x {b.shape} do not fit the kernel "
                       f"[{n_in}, {n_out}] (as a matrix): a LoRA file for another model?")
    out[module + (lora.A,)] = a.astype(kernel.dtype)
    out[module + (lora.B,)] = b.astype(kernel.dtype)
    ranks.add(rank)
    targets.append(re.escape(name))
  if not pairs:
    raise ValueError(f"{path}: no adapters in it.")
  return lora._unflat(out), _spec_from_metadata(meta, ranks, path, targets)  # pylint: disable=protected-access


def load_into_pipeline(pipeline: str, path: str) -> tuple[dict, lora.Spec]:
  """(the pipeline folder's {"unet", "text_encoder"} parameters with the file's
  adapters, the Spec): for tools and tests."""
  _, unet, _ = sd_pipeline.load_unet(os.path.join(pipeline, "unet"))
  _, text, _ = sd_pipeline.load_text_encoder(os.path.join(pipeline, "text_encoder"))
  return load(path, {"unet": unet, "text_encoder": text})


def save(out: str, params: dict, spec: lora.Spec) -> str:
  """Writes the adapters of `params` (an sd task's tree) as `out`/pytorch_lora_weights.
  safetensors with diffusers' keys and metadata; returns the file's path."""
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  flat = lora._flat(params)  # pylint: disable=protected-access
  state, modules = {}, {p: set() for p in PARTS}
  for key, a in flat.items():
    if key[-1] != lora.A or key[0] not in PARTS:
      continue
    module = key[:-1]
    shape = np.shape(flat[module + ("kernel",)])
    a, b = np.asarray(a, np.float32), np.asarray(flat[module + (lora.B,)], np.float32)
    rank = a.shape[-1]
    if len(shape) == 4:  # Conv [kh, kw, in, out]: lora_A a kh x kw conv, lora_B 1x1.
      kh, kw, n_in, n_out = shape
      a_t = a.reshape(kh, kw, n_in, rank).transpose(3, 2, 0, 1)
      b_t = b.T.reshape(n_out, rank, 1, 1)
    else:
      a_t, b_t = a.T, b.T
    their = _their_module(module[1:])
    state[f"{key[0]}.{their}.lora_A.weight"] = np.ascontiguousarray(a_t)
    state[f"{key[0]}.{their}.lora_B.weight"] = np.ascontiguousarray(b_t)
    # PEFT's target_modules: the module's own name, with its index ("to_out.0").
    modules[key[0]].add(re.search(r"[^.]+(\.\d+)?$", their).group())
  if not state:
    raise ValueError("The parameters hold no LoRA adapters under 'unet' or 'text_encoder'.")
  meta = {}
  for part, names in modules.items():
    if names:
      meta.update({f"{part}.r": spec.rank, f"{part}.lora_alpha": spec.alpha,
                   f"{part}.target_modules": sorted(names), f"{part}.peft_type": "LORA",
                   f"{part}.bias": "none", f"{part}.rank_pattern": {},
                   f"{part}.alpha_pattern": {}, f"{part}.use_dora": False,
                   f"{part}.use_rslora": False})
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, WEIGHT_NAME)
  st_numpy.save_file(state, path, metadata={"format": "pt", METADATA_KEY: json.dumps(
      meta, indent=2, sort_keys=True)})
  return path
