"""LoRA: low-rank adapters on a model's kernels, as a transform of its parameters.

An adapted kernel W (Dense [in, out], attention's [in, heads, head_dim] and
[heads, head_dim, out], Conv [kh, kw, in, out], or an Embed's table [vocab, width],
as PEFT adapts embeddings) gets two leaves beside it in its module, "lora_a" [in, rank] and "lora_b" [rank, out], and the model runs with

  W' = W + (alpha / rank) · reshape(lora_a @ lora_b, W.shape)

computed by `merge` before every apply. `lora_b` starts at zero, so W' = W exactly at
the start. Models are not edited: any parameter tree whose kernels' paths match
`targets` (regular expressions over "/"-joined paths, fully matched) can be adapted.

How a kernel reads as a matrix [in, out] (`matrix_shape`): the kernels of modules
named "query", "key" and "value" (MultiHeadAttention's, [in, heads, head_dim]) split
after their first axis; every other kernel before its last (a k x k Conv as the matrix
[kh·kw·in, out], as PEFT's Conv LoRA). A kernel under a module named "blocks" (a
scanned Encoder, `scan_layers`) has a leading [depth] axis: one adapter per layer.

  params = lora.add_adapters(params, lora.Spec(rank=8, alpha=16, targets=(...,)), rng)
  out = model.apply({"params": lora.merge(params, spec.scale)}, ...)
  base = lora.merge(params, spec.scale)   # adapters folded in: a plain parameter tree

The trainer freezes every leaf that is not an adapter (mmjax/train/optim.py); tasks are
adapted by mmjax/tasks/adapted.py. See docs/lora.md.
"""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

A, B = "lora_a", "lora_b"  # The adapter leaves' names, beside their module's "kernel".
ADAPTER_NAMES = (A, B)
KERNEL_NAMES = ("kernel", "embedding")  # The leaves LoRA adapts: Dense/Conv, Embed.
_SPLIT_AFTER_FIRST = ("query", "key", "value")  # DenseGeneral [in, heads, head_dim].
_SCANNED = "blocks"  # transformer.Encoder's scanned block: a leading [depth] axis.


@dataclasses.dataclass(frozen=True)
class Spec:
  """rank r, alpha (the update is scaled by alpha / r), targets (regexes over kernel paths)."""
  rank: int
  alpha: float
  targets: tuple[str, ...]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def spec_from_config(config) -> Spec | None:
  """`config.lora` -> Spec, or None when LoRA is off (no field, or rank 0).

  Raises ValueError (one line, naming the field) for a negative rank, no targets, a
  non-positive alpha, or a dropout other than 0.
  """
  c = config.get("lora") if hasattr(config, "get") else None
  if not c or not c.get("rank"):
    return None
  rank, targets = c.get("rank"), tuple(c.get("targets") or ())
  alpha = c.get("alpha") or rank
  if not isinstance(rank, int) or rank < 1:
    raise ValueError(f"config.lora.rank={rank!r}: use an integer >= 1 (0 turns LoRA off).")
  if not targets:
    raise ValueError("config.lora.targets is empty: give regexes over kernel paths, e.g. "
                     "('.*/attention/(query|key|value|out)/kernel',).")
  if alpha <= 0:
    raise ValueError(f"config.lora.alpha={alpha!r}: use a number > 0 (the update is scaled "
                     f"by alpha / rank).")
  if c.get("dropout"):
    raise ValueError(f"config.lora.dropout={c.get('dropout')!r}: adapters are merged into "
                     f"the kernels before the model runs, so there is no adapter branch to "
                     f"drop out; set it to 0 (docs/lora.md).")
  return Spec(int(rank), float(alpha), targets)


def _flat(params) -> dict[tuple[str, ...], object]:
  """{("a", "b", "kernel"): leaf} of a nested dict, in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): x
          for path, x in leaves}


def _unflat(flat: dict) -> dict:
  out = {}
  for path, x in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = x
  return out


def is_adapter(path: str) -> bool:
  """Whether a "/"-joined parameter path is a LoRA adapter leaf."""
  return path.rsplit("/", 1)[-1] in ADAPTER_NAMES


def has_adapters(tree) -> bool:
  """Whether a pytree holds LoRA adapter leaves."""
  if not isinstance(tree, dict) and not hasattr(tree, "items"):
    return False
  return any(path[-1] in ADAPTER_NAMES for path in _flat(tree))


def matrix_shape(path: str, shape) -> tuple[tuple[int, ...], int, int]:
  """(leading layer axes, in, out): how the kernel at `path` reads as a matrix."""
  parts = path.split("/")
  lead = 1 if _SCANNED in parts[:-1] else 0
  core = tuple(shape[lead:])
  n_in = 1 if parts[-2] in _SPLIT_AFTER_FIRST else len(core) - 1
  return tuple(shape[:lead]), math.prod(core[:n_in]), math.prod(core[n_in:])


def target_kernels(params, spec: Spec) -> list[str]:
  """The "/"-joined paths of the kernels `spec.targets` match, in tree order.

  Raises ValueError (one line) for a pattern that matches no kernel, naming what it
  did match or the model's kernels, and for a rank above a kernel's smaller side.
  """
  shapes = {"/".join(p): np.shape(x) for p, x in _flat(params).items()}
  kernels = [p for p in shapes if p.rsplit("/", 1)[-1] in KERNEL_NAMES]
  chosen = []
  for pattern in spec.targets:
    hits = [p for p in shapes if re.fullmatch(pattern, p)]
    hit_kernels = [p for p in hits if p in kernels]
    if not hit_kernels:
      if hits:
        what = (f"only leaves that are not kernels (e.g. {hits[0]!r}); LoRA adapts kernels "
                f"and embedding tables")
      elif kernels:
        what = f"no parameter; the model's kernels look like {kernels[0]!r}"
      else:
        what = "nothing: the model has no kernel (Dense, attention or Conv) to adapt"
      raise ValueError(f"config.lora.targets pattern {pattern!r} matches {what}.")
    chosen += [p for p in hit_kernels if p not in chosen]
  for p in chosen:
    _, n_in, n_out = matrix_shape(p, shapes[p])
    if spec.rank > min(n_in, n_out):
      raise ValueError(f"config.lora.rank={spec.rank} is larger than the smaller side of "
                       f"{p!r} ([{n_in}, {n_out}] as a matrix): use a rank <= "
                       f"{min(n_in, n_out)} or leave that kernel out of the targets.")
  return [p for p in kernels if p in chosen]


def add_adapters(params, spec: Spec, rng: jax.Array) -> dict:
  """`params` with "lora_a" (uniform in ±1/sqrt(in), as PEFT's default) and "lora_b"
  (zeros) beside each targeted kernel, in the kernel's dtype. Works under jit."""
  flat = _flat(params)
  out = dict(flat)
  for i, path in enumerate(target_kernels(params, spec)):
    key = tuple(path.split("/"))
    kernel = flat[key]
    lead, n_in, n_out = matrix_shape(path, kernel.shape)
    bound = 1.0 / math.sqrt(n_in)
    module = key[:-1]
    out[module + (A,)] = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, n_in, spec.rank),
                                            jnp.float32, -bound, bound).astype(kernel.dtype)
    out[module + (B,)] = jnp.zeros((*lead, spec.rank, n_out), kernel.dtype)
  return _unflat(out)


def merge(params, scale: float) -> dict:
  """A tree with adapters -> the plain tree, each adapted kernel W + scale·(A @ B).

  Computed in float32 and cast to the kernel's dtype; a tree without adapters comes
  back unchanged (the same object).
  """
  flat = _flat(params)
  if not any(k[-1] in ADAPTER_NAMES for k in flat):
    return params
  out = {}
  for key, x in flat.items():
    if key[-1] in ADAPTER_NAMES:
      continue
    module = key[:-1]
    if key[-1] in KERNEL_NAMES and module + (A,) in flat:
      a, b = flat[module + (A,)], flat[module + (B,)]
      delta = scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
      x = x + delta.reshape(x.shape).astype(x.dtype)
    out[key] = x
  return _unflat(out)


def strip(params) -> dict:
  """The tree without its adapters (the base the adapters were added to)."""
  return _unflat({k: x for k, x in _flat(params).items() if k[-1] not in ADAPTER_NAMES})


def adapters(params) -> dict:
  """Only the adapter leaves, as a nested dict."""
  return _unflat({k: x for k, x in _flat(params).items() if k[-1] in ADAPTER_NAMES})


def count(params) -> tuple[int, int]:
  """(adapter parameters, all parameters) of a tree."""
  flat = _flat(params)
  n = lambda keep: sum(int(np.prod(np.shape(x))) for k, x in flat.items() if keep(k))
  return n(lambda k: k[-1] in ADAPTER_NAMES), n(lambda k: True)
