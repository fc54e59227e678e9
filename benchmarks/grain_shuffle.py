r"""Grain's own shuffle against mmjax's per-epoch permutation: time per batch of indices,
and whether an iterator restored from its state resumes exactly. One JSON line per way.

  python benchmarks/grain_shuffle.py --batch 128 --examples 60000

"permutation" is the index path of mmjax's training batches (`train_dataset` in the
data pipeline): batch j of the endless stream is `epoch_permutation(seed, epoch)` at
positions j*b ... j*b+b-1, one NumPy permutation per epoch, cached. "grain_shuffle" is
`grain.MapDataset.range(n).shuffle(seed).repeat().batch(b)`. Only indices are made (no
reading), so the numbers are the shuffle's own cost.
"""
import argparse
import functools
import json
import sys
import time

import grain
import numpy as np


def permutation_batches(n: int, b: int, seed: int) -> grain.MapDataset:
  @functools.lru_cache(maxsize=4)
  def perm(epoch):
    return np.random.default_rng([seed, epoch]).permutation(n)

  def batch(j):
    positions = j * b + np.arange(b)
    epochs, offsets = np.divmod(positions, n)
    out = np.empty_like(positions)
    for epoch in np.unique(epochs):
      at = epochs == epoch
      out[at] = perm(int(epoch))[offsets[at]]
    return out

  return grain.MapDataset.range(sys.maxsize).map(batch)


def grain_shuffle_batches(n: int, b: int, seed: int) -> grain.MapDataset:
  return grain.MapDataset.range(n).shuffle(seed=seed).repeat().batch(b)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--examples", type=int, default=60000)
  parser.add_argument("--batches", type=int, default=400)
  args = parser.parse_args()
  for name, make in (("permutation", permutation_batches),
                     ("grain_shuffle", grain_shuffle_batches)):
    ds = make(args.examples, args.batch, 0)
    ds[0]  # The first epoch's set-up.
    t = time.perf_counter()
    for j in range(1, args.batches + 1):
      ds[j]
    per_batch = (time.perf_counter() - t) / args.batches
    it = iter(ds.to_iter_dataset())
    for _ in range(7):
      next(it)
    state, expected = it.get_state(), next(it)
    again = iter(make(args.examples, args.batch, 0).to_iter_dataset())
    again.set_state(state)
    print(json.dumps({"way": name, "us_per_batch": round(per_batch * 1e6, 1),
                      "batch": args.batch, "resumes_exactly": bool(
                          np.array_equal(np.asarray(expected), np.asarray(next(again))))}))


if __name__ == "__main__":
  main()
