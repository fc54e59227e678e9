"""The first checkpoint save of a process: Orbax's replica-parallel array saving against
mmjax's handler (mmjax.train.checkpoints, replica-parallel off), on fake CPU devices.

A tree of `--leaves` replicated arrays, each of another shape, is saved twice through
each; prints JSON with the seconds of the first and second saves. Each variant runs in
its own process, so neither inherits the other's compiled programs.

  python benchmarks/checkpoint_save.py --devices 8 --leaves 180
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _child(variant: str, devices: int, leaves: int) -> dict:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from mmjax.train import checkpoints  # pylint: disable=import-outside-toplevel

  mesh = jax.make_mesh((devices,), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = {f"w{i}": jax.device_put(np.ones((64, i + 1), np.float32), replicated)
          for i in range(leaves)}
  seconds = []
  with tempfile.TemporaryDirectory() as root:
    if variant == "mmjax":
      mngr = checkpoints.manager(root, keep=3)
      save = lambda step: mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(tree)))
    else:
      mngr = ocp.CheckpointManager(root)
      save = lambda step: mngr.save(step, args=ocp.args.StandardSave(tree))
    for step in (1, 2):
      start = time.perf_counter()
      save(step)
      mngr.wait_until_finished()
      seconds.append(round(time.perf_counter() - start, 3))
    mngr.close()
  return {"first_save_s": seconds[0], "second_save_s": seconds[1]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--leaves", type=int, default=180)
  parser.add_argument("--variant", choices=("orbax_default", "mmjax"), default=None)
  args = parser.parse_args()
  if args.variant:
    print(json.dumps(_child(args.variant, args.devices, args.leaves)))
    return
  result = {"devices": args.devices, "leaves": args.leaves}
  for variant in ("mmjax", "orbax_default"):
    out = subprocess.run([sys.executable, __file__, f"--variant={variant}",
                          f"--devices={args.devices}", f"--leaves={args.leaves}"],
                         check=True, capture_output=True, text=True).stdout
    result[variant] = json.loads(out.strip().splitlines()[-1])
  print(json.dumps(result))


if __name__ == "__main__":
  main()
