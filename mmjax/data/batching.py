"""Training and evaluation batches of a source, read through Grain, split by process.

Batches are built the same way in training and evaluation: a Grain dataset of
*batches of indices*, each process keeping every `process_count`-th local batch of
`global_batch_size / process_count` indices, and one vectorised gather reads them.
So the global batch at step s holds the same examples in the same order whatever
the number of processes and devices, and the iterator state (one integer per
process) is all a checkpoint needs to resume the exact data order. Training
shuffles with one NumPy permutation per epoch, drawn from (seed, epoch), rather than
Grain's per-element `shuffle`, whose Python cost per example is a noticeable share of
a small model's step.
"""
import dataclasses
import functools
import math
import sys
from typing import Callable

import grain
import numpy as np

from mmjax.data.sources import Batch, gather

@dataclasses.dataclass(frozen=True)
class Sharding:
  """Which part of every global batch this process reads."""
  process_index: int = 0
  process_count: int = 1


def local_batch_size(global_batch_size: int, sharding: Sharding) -> int:
  if global_batch_size % sharding.process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by the "
                     f"{sharding.process_count} processes; choose a multiple of "
                     f"{sharding.process_count}.")
  return global_batch_size // sharding.process_count


def train_dataset(source, *, global_batch_size: int, seed: int,
                  preprocess: Callable[[Batch], Batch], sharding: Sharding = Sharding(),
                  prefetch: int = 4) -> grain.IterDataset:
  """Endless training batches: shuffled by seed, reshuffled each epoch.

  `preprocess` receives the gathered examples plus `position`, each example's place
  in the endless stream (0, 1, 2, ... across epochs): a seed for per-example
  randomness (caption templates, augmentation) that does not depend on how many
  processes read the stream.

  Returns an IterDataset of this process's share, `{key: [local_batch, ...]}`. Its
  iterator has `get_state()`/`set_state()`, saved with every checkpoint.
  """
  local = local_batch_size(global_batch_size, sharding)
  n = len(source)

  def read(j: int) -> Batch:
    # This process's j-th local batch is local batch k of the whole stream.
    k = j * sharding.process_count + sharding.process_index
    positions = k * local + np.arange(local)
    epochs, offsets = np.divmod(positions, n)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):  # One epoch, or two where a batch straddles them.
      at = epochs == epoch
      indices[at] = epoch_permutation(seed, int(epoch), n)[offsets[at]]
    return preprocess({**gather(source, indices), "position": positions})

  ds = grain.MapDataset.range(sys.maxsize).map(read)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch))


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of examples 0..n-1 in `epoch` of a run seeded `seed`: [n] int64."""
  order = np.random.default_rng([seed, epoch]).permutation(n)
  order.flags.writeable = False  # Cached and shared: never modified.
  return order


def eval_dataset(source, *, global_batch_size: int, preprocess: Callable[[Batch], Batch],
                 sharding: Sharding = Sharding()) -> grain.MapDataset:
  """The whole split exactly once, in order, in global batches of a fixed size.

  `preprocess` receives the examples plus `position`, their index in the split.
  The last global batch is padded with copies of example 0; `batch["mask"]` is
  1.0 for real examples and 0.0 for padding, so metrics weighted by it count every
  example once.
  """
  local = local_batch_size(global_batch_size, sharding)
  n = len(source)
  padded = math.ceil(n / global_batch_size) * global_batch_size

  def read(indices: np.ndarray) -> Batch:
    valid = indices < n
    batch = preprocess({**gather(source, np.where(valid, indices, 0)), "position": indices})
    batch["mask"] = valid.astype(np.float32)
    return batch

  ds = grain.MapDataset.range(padded).batch(local)
  return ds[sharding.process_index::sharding.process_count].map(read)
