"""What the checkpoint converters share: reading safetensors with NumPy, shape checks.

Every loader reads its file with `read_safetensors` (a readable file of floating-point
tensors) and, where an exporter wrote a config into the file's metadata, parses it
with `metadata_config` (a JSON object of the fields and kinds the loader needs, agreeing
with what the tensors' shapes give). Both raise CheckpointError: one line naming the
file and what to change. mmjax's exporters write with `save_safetensors`: the file
appears whole (temp file + rename) and carries the SHA-256 of its tensors
(CHECKSUM_KEY), which `read_safetensors` checks.
"""
import hashlib
import json
import math
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


# The metadata entry holding the SHA-256 of a file's tensors (`tensors_digest`).
CHECKSUM_KEY = "mmjax.sha256"


def tensors_digest(state: dict) -> str:
  """SHA-256 over each tensor's name, dtype, shape and bytes, in name order."""
  h = hashlib.sha256()
  for name in sorted(state):
    array = np.ascontiguousarray(state[name])
    h.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
    h.update(array.view(np.uint8).reshape(-1).data if array.size else b"")
  return h.hexdigest()


def save_safetensors(state: dict, path: str | os.PathLike, metadata: dict) -> None:
  """Writes {name: np.ndarray} with `metadata` plus the tensors' SHA-256 (CHECKSUM_KEY)
  to a temporary file beside `path`, then renames it: never half a file at `path`."""
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    st_numpy.save_file(state, tmp, metadata={**metadata, CHECKSUM_KEY: tensors_digest(state)})
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# safetensors dtype names that NumPy holds as floating point.
FLOAT_DTYPES = ("F16", "F32", "F64")


def read_safetensors(path: str | os.PathLike, keys: bool = True,
                     ignore: tuple[str, ...] = ()) -> tuple[dict, dict]:
  """A safetensors file -> ({key: np.ndarray}, metadata); with keys=False only the shapes.

  Every tensor must be floating point (float16, float32 or float64): an integer or
  boolean tensor would be cast to the parameters' dtype without a word, and bfloat16
  has no NumPy dtype. `ignore`: keys dropped unread, whatever their dtype (buffers
  such as OpenAI's integer "context_length"). A "module." prefix on every key (a
  data-parallel save) is removed. Where the metadata holds CHECKSUM_KEY (mmjax's
  exports), the tensors read must match it (keys=True). Raises CheckpointError (one
  line) for a missing file, one that is not safetensors, a tensor of another dtype,
  or tensors that differ from their checksum.
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
        if name.removeprefix("module.") in ignore:
          continue
        tensor = f.get_slice(name)
        dtype = tensor.get_dtype()
        if dtype == "BF16":
          raise CheckpointError(f"{path}: {name!r} is bfloat16, which NumPy cannot hold; save "
                                "the state dict as float32 or float16.")
        if dtype not in FLOAT_DTYPES:
          raise CheckpointError(
              f"{path}: {name!r} holds {dtype} values, not floating-point weights: save the "
              "state dict with float32 or float16 tensors only (is this a weights file?).")
        out[name] = f.get_tensor(name) if keys else tuple(tensor.get_shape())
      if keys and CHECKSUM_KEY in metadata:  # All the tensors, the ignored ones too.
        everything = {n: out[n] if n in out else f.get_tensor(n) for n in f.keys()}
        if tensors_digest(everything) != metadata[CHECKSUM_KEY]:
          raise CheckpointError(
              f"{path}: its tensors differ from the SHA-256 written with them "
              f"({CHECKSUM_KEY}): the file is damaged or was edited. Export it again, or "
              f"restore it from a copy.")
  except CheckpointError:
    raise
  except Exception as e:  # safetensors raises its own error type for a corrupt file.
    raise CheckpointError(f"{path}: not a readable safetensors file ({e}). Convert a PyTorch "
                          "checkpoint with safetensors.torch.save_file(model.state_dict(), "
                          "path).") from e
  if out and all(k.startswith("module.") for k in out):
    out = {k[len("module."):]: v for k, v in out.items()}
  return out, metadata


MISSING = object()  # What `lookup` returns for an absent field.
_KINDS = {bool: "true or false", int: "an integer >= 1", float: "a finite number > 0",
          "ints": "a non-empty list of integers >= 1", str: "a string"}


def _has_kind(value, kind) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
  if kind is float:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)
  if kind == "ints":
    return isinstance(value, list) and bool(value) and all(_has_kind(v, int) for v in value)
  if kind is str:
    return isinstance(value, str)
  raise ValueError(f"unknown kind {kind!r}: use one of {list(_KINDS)}")


def _same(a, b) -> bool:
  """JSON values equal, True not 1 and lists compared element by element."""
  if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
    return (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b)
            and all(_same(x, y) for x, y in zip(a, b)))
  if isinstance(a, bool) or isinstance(b, bool):
    return type(a) is type(b) and a == b
  return a == b


def lookup(config: dict, field: str):
  """config["a"]["b"] for field "a.b"; `MISSING` if any part is absent or not an object."""
  node = config
  for part in field.split("."):
    if not isinstance(node, dict) or part not in node:
      return MISSING
    node = node[part]
  return node



def metadata_error(path, key: str, what: str) -> CheckpointError:
  """One line: the file, its metadata entry, what is wrong with it and what to change."""
  return CheckpointError(
      f"{path}: metadata {key!r} {what}. Re-export the file with mmjax (its export writes "
      "a consistent entry), or save its tensors again without metadata "
      "(safetensors.numpy.save_file(safetensors.numpy.load_file(path), path)).")


def metadata_config(path, metadata: dict, key: str, *, required: dict | None = None,
                    optional: dict | None = None, inferred: dict | None = None
                    ) -> dict | None:
  """The config an exporter wrote as JSON under metadata[key], checked; None without one.

  Args:
    path: the weights file (for the message).
    metadata: the file's metadata ({str: str}, as `read_safetensors` returns it).
    key: the metadata entry, e.g. "mmjax.open_clip_config".
    required: {dotted field ("vision_cfg.width"): kind}: each must be there with its
      kind. Kinds: int (an integer >= 1), float (a finite number > 0), bool, str,
      "ints" (a non-empty list of integers >= 1).
    optional: the same for fields that may be absent.
    inferred: {dotted field: value} that the tensors' shapes give: where the entry has
      the field, its value must be equal (True is not 1; lists element by element).

  Returns:
    The parsed JSON object, or None if the metadata has no `key`.

  Raises:
    CheckpointError (one line naming the file, the entry, the field and what to change)
    if the entry is not JSON, not an object, lacks a required field, has one of another
    kind, or contradicts the shapes.
  """
  if key not in metadata:
    return None
  try:
    saved = json.loads(metadata[key])
  except (TypeError, ValueError) as e:
    raise metadata_error(path, key, f"is not JSON ({e})") from e
  if not isinstance(saved, dict):
    raise metadata_error(path, key, f"is {type(saved).__name__}, not a JSON object")
  for fields, must in ((required or {}, True), (optional or {}, False)):
    for field, kind in fields.items():
      value = lookup(saved, field)
      if value is MISSING:
        if must:
          raise metadata_error(path, key, f"lacks the field {field!r} ({_KINDS[kind]})")
      elif not _has_kind(value, kind):
        raise metadata_error(path, key, f"has {field}={value!r}, not {_KINDS[kind]}")
  for field, value in (inferred or {}).items():
    said = lookup(saved, field)
    if said is not MISSING and not _same(said, value):
      raise metadata_error(path, key, f"says {field}={said!r}, but the tensors' shapes give "
                           f"{value!r}")
  return saved


def need(shapes: dict, key: str, rank: int, pattern: tuple, path: str, what: str) -> tuple:
  """The shape of `key`, which must be there with `rank` dimensions, none of them 0 (else
  CheckpointError)."""
  s = shapes.get(key)
  if s is None or len(s) != rank or 0 in s:
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
