r"""The train step's finiteness check over many leaves: compile time and ms per call; one
JSON line.

  python benchmarks/finite_check.py --leaves 600

`checkpoints.all_finite` (a float32 sum per leaf, is the total finite?) against
`checkpoints.exactly_finite` (is-finite per element, all() per leaf): both on the same
`--leaves` random-shaped float32 arrays (1-3 dims of 1-63), compiled once each, then
timed over `--calls` calls after a warm-up; each also checked to find one NaN.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--leaves", type=int, default=600)
  parser.add_argument("--calls", type=int, default=20)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np
  from mmjax.train import checkpoints

  rng = np.random.default_rng(0)
  shapes = [tuple(int(s) for s in rng.integers(1, 64, rng.integers(1, 4)))
            for _ in range(args.leaves)]
  tree = [jnp.ones(s, jnp.float32) for s in shapes]
  broken = list(tree)
  broken[len(tree) // 2] = broken[len(tree) // 2].at[(0,) * len(shapes[len(tree) // 2])].set(
      jnp.nan)
  row = {"leaves": args.leaves, "elements": int(sum(np.prod(s) for s in shapes)),
         "backend": jax.default_backend()}
  for name in ("all_finite", "exactly_finite"):
    fn = getattr(checkpoints, name)
    t = time.perf_counter()
    compiled = fn.lower(tree).compile()
    compile_s = time.perf_counter() - t
    assert bool(compiled(tree)) and not bool(compiled(broken))
    jax.block_until_ready(compiled(tree))
    t = time.perf_counter()
    for _ in range(args.calls):
      out = compiled(tree)
    jax.block_until_ready(out)
    row[name] = {"compile_s": round(compile_s, 2),
                 "ms": round(1e3 * (time.perf_counter() - t) / args.calls, 3)}
  print(json.dumps(row))


if __name__ == "__main__":
  main()
