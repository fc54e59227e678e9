r"""Bytes of a run's latest checkpoint, by part: parameters (adapters apart), optimizer
state, the rest. Read from the checkpoint's metadata (shape x dtype of every array, the
in-memory size; nothing is restored), so it works for any run without its config.

  python tools/checkpoint_bytes.py workdirs/clip_lora [workdirs/clip_mnist ...]

Prints one line per workdir: the step, parameters (adapter parameters), optimizer
state, other state, in bytes, and the optimizer state's share of the first workdir's
when several are given (e.g. a LoRA run against a full-training run of the same model).
"""
import argparse
import os

import numpy as np
import orbax.checkpoint as ocp

from mmjax import runs

ADAPTER_NAMES = ("lora_a", "lora_b")  # mmjax.lora's leaf names.


def _leaves(tree, path=()):
  """(path, leaf metadata) of a nested dict/list metadata tree."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, path + (str(k),))
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _leaves(v, path + (str(i),))
  elif tree is not None:
    yield path, tree


def _nbytes(leaf) -> int:
  shape = tuple(getattr(leaf, "shape", ()) or ())
  return int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize


def checkpoint_bytes(workdir: str, step: int | None = None) -> dict[str, int]:
  """{"step", "params", "adapters", "opt_state", "other"}: bytes of the checkpoint of
  `step` (None: the latest) in `workdir`/checkpoints, from its metadata. "adapters" is
  the part of "params" in LoRA adapter leaves.

  Raises FileNotFoundError when the workdir has no checkpoint.
  """
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir!r} has no checkpoints/ folder: give a run's workdir.")
  mngr = ocp.CheckpointManager(directory)
  step = mngr.latest_step() if step is None else step
  mngr.close()
  if step is None:
    raise FileNotFoundError(f"{directory} holds no checkpoint yet.")
  metadata = runs.state_metadata(os.path.join(directory, str(step), "state"))
  out = {"step": int(step), "params": 0, "adapters": 0, "opt_state": 0, "other": 0}
  for path, leaf in _leaves(dict(metadata)):
    n = _nbytes(leaf)
    part = path[0] if path[0] in ("params", "opt_state") else "other"
    out[part] += n
    if part == "params" and path[-1] in ADAPTER_NAMES:
      out["adapters"] += n
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", help="runs' --workdir folders")
  args = parser.parse_args()
  first = None
  for workdir in args.workdirs:
    b = checkpoint_bytes(workdir)
    share = "" if first is None else f", {b['opt_state'] / first:.2%} of the first's"
    first = b["opt_state"] if first is None else first
    print(f"{workdir}: step {b['step']}: params {b['params']:,} B (adapters "
          f"{b['adapters']:,} B), optimizer state {b['opt_state']:,} B{share}, other "
          f"{b['other']:,} B")


if __name__ == "__main__":
  main()
