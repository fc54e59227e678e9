"""Evaluation over a whole split: per-batch sums, accumulated, divided once."""
from typing import Callable

import jax

from mmjax.train import sharding as sharding_lib


def sum_over_batches(batch_sums: Callable, dataset, mesh) -> dict[str, float]:
  """Runs `batch_sums(batch) -> {name: scalar sum}` (jitted) over every batch.

  `dataset` yields this process's part of each global eval batch (with a `mask`);
  returns the totals over the whole split, the same on every process.
  """
  totals = None
  for local in dataset:
    sums = batch_sums(sharding_lib.global_batch(local, mesh))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  return {k: float(v) for k, v in jax.device_get(totals).items()}


def means(totals: dict[str, float], prefix: str = "eval/") -> dict[str, float]:
  """{"loss": s, "accuracy": s, "count": n} -> {"eval/loss": s / n, "eval/accuracy": s / n}."""
  n = totals["count"]
  return {prefix + k: v / n for k, v in totals.items() if k != "count"}
