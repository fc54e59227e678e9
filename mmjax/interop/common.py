"""What the checkpoint converters share: reading safetensors with NumPy, shape checks."""
import os
import re

import numpy as np


class CheckpointError(ValueError):
  """A weights file that is not the state dict expected, or whose shapes differ."""


def shape_of(x) -> tuple:
  """A shape (tuple or list) or an array -> the shape as a tuple of ints."""
  return tuple(x) if isinstance(x, (tuple, list)) else tuple(np.shape(x))


def mismatch(path, key, expected, found, hint="") -> CheckpointError:
  """The error for one key: its expected shape and the shape found (or "missing")."""
  found = "missing" if found is None else f"shape {tuple(found)}"
  return CheckpointError(f"{path}: key {key!r}: expected shape {tuple(expected)}, found {found}."
                         + (" " + hint if hint else ""))


def read_safetensors(path: str | os.PathLike, keys: bool = True) -> tuple[dict, dict]:
  """A safetensors file -> ({key: np.ndarray}, metadata); with keys=False only the shapes.

  A "module." prefix on every key (a data-parallel save) is removed.
  """
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No weights file at {path!r}.")
  try:
    with safe_open(path, framework="np") as f:
      metadata = f.metadata() or {}
      out = {}
      for name in f.keys():
        if keys:
          if f.get_slice(name).get_dtype() == "BF16":
            raise CheckpointError(f"{path}: {name!r} is bfloat16, which NumPy cannot hold; save "
                                  "the state dict as float32 or float16.")
          out[name] = f.get_tensor(name)
        else:
          out[name] = tuple(f.get_slice(name).get_shape())
  except CheckpointError:
    raise
  except Exception as e:  # safetensors raises its own error type for a corrupt file.
    raise CheckpointError(f"{path}: not a readable safetensors file ({e}). Convert a PyTorch "
                          "checkpoint with safetensors.torch.save_file(model.state_dict(), "
                          "path).") from e
  if out and all(k.startswith("module.") for k in out):
    out = {k[len("module."):]: v for k, v in out.items()}
  return out, metadata


def need(shapes: dict, key: str, rank: int, pattern: tuple, path: str, what: str) -> tuple:
  """The shape of `key`, which must be there with `rank` dimensions (else CheckpointError)."""
  s = shapes.get(key)
  if s is None or len(s) != rank:
    raise mismatch(path, key, pattern, s, f"Is this {what}? Its keys begin {sorted(shapes)[:3]}.")
  return s


def num_blocks(shapes: dict, prefix: str) -> int:
  """1 + the largest i among keys "<prefix><i>.…" (0 if none)."""
  pat = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = [int(m.group(1)) for k in shapes if (m := pat.match(k))]
  return max(found) + 1 if found else 0


def check_shapes(shapes: dict, expected: dict, path: str, extra_hint: str = "") -> None:
  """Raises CheckpointError at the first key missing or of another shape, then unexpected."""
  shapes = {k: shape_of(s) for k, s in shapes.items()}
  for key, shape in expected.items():
    if shapes.get(key) != tuple(shape):
      raise mismatch(path, key, shape, shapes.get(key))
  extra = [k for k in shapes if k not in expected]
  if extra:
    raise CheckpointError(f"{path}: unexpected key {extra[0]!r} (shape {shapes[extra[0]]}) among "
                          f"{len(extra)} not expected. {extra_hint}".rstrip())


def to_flat_params(state: dict, specs, dtype) -> dict:
  """{key: array} and specs (key, path, to_mmjax, ...) -> mmjax's nested parameter dict."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  return traverse_util.unflatten_dict(
      {spec[1]: np.asarray(spec[2](state[spec[0]]), dtype) for spec in specs})


def from_params(params, specs, dtype, what: str) -> dict:
  """mmjax parameters and specs (key, path, _, to_theirs, part) -> {key: array}.

  Entries sharing a key are concatenated along the first axis in `part` order.
  """
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  if set(params) == {"params"}:
    params = params["params"]
  flat = {k: np.asarray(x) for k, x in traverse_util.flatten_dict(dict(params)).items()}
  paths = {spec[1] for spec in specs}
  missing = [spec[1] for spec in specs if spec[1] not in flat]
  if missing:
    raise ValueError(f"export: parameter {'/'.join(missing[0])} is missing: are the params "
                     f"this {what}'s?")
  extra = sorted(set(flat) - paths)
  if extra:
    raise ValueError(f"export: parameter {'/'.join(extra[0])} has no place in {what}: are the "
                     "params this model's?")
  parts = {}
  for key, path, _, inv, part in specs:
    parts.setdefault(key, {})[part] = inv(flat[path])
  return {key: np.array(np.concatenate([p[i] for i in sorted(p)], axis=0) if len(p) > 1
                        else p[0], dtype, order="C")
          for key, p in parts.items()}
