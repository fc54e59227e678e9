"""Evaluation over a whole split: batches, per-batch sums accumulated, divided once."""
from typing import Callable

import jax

from mmjax.data import batching
from mmjax import parallel


def check_eval_batch(batch_size: int, mesh) -> int:
  """`batch_size`, after checking that it splits over the mesh (ValueError if not)."""
  parallel.check_batch_size(batch_size, mesh, "eval_batch_size")
  return batch_size


def eval_batches(source, batch_size: int, preprocess: Callable):
  """This process's part of every global batch of `source`, once, with a `mask`."""
  return batching.eval_dataset(
      source, global_batch_size=batch_size, preprocess=preprocess,
      sharding=batching.Sharding(jax.process_index(), jax.process_count()))


def global_batches(dataset, mesh):
  """Each local batch of an eval dataset as a global batch sharded over `mesh`."""
  for local in dataset:
    yield parallel.global_batch(local, mesh)


def sum_over_batches(batch_sums: Callable, dataset, mesh) -> dict[str, float]:
  """Runs `batch_sums(batch) -> {name: scalar sum}` (jitted) over every batch.

  `dataset` yields this process's part of each global eval batch (with a `mask`);
  returns the totals over the whole split, the same on every process.
  """
  totals = None
  for batch in global_batches(dataset, mesh):
    sums = batch_sums(batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return {k: float(v) for k, v in jax.device_get(totals).items()}


def means(totals: dict[str, float], prefix: str = "eval/") -> dict[str, float]:
  """{"loss": s, "accuracy": s, "count": n} -> {"eval/loss": s / n, "eval/accuracy": s / n}."""
  n = totals["count"]
  return {prefix + k: v / n for k, v in totals.items() if k != "count"}
