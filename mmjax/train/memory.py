"""Host memory a training batch needs, checked before the first batch is read.

`check_batch_memory(task, config)` reads two examples of the task's training source,
preprocesses them as training does, and multiplies their size by the local batch:
a batch is held at least twice on the host (the one being assembled and the one on
its way to the devices; on a CPU the devices' memory is the host's too). Above the
memory available (`available_bytes`) the run is refused in one line before any batch
is read, instead of spinning for minutes and failing with a traceback. The estimate
is a lower bound (prefetched batches and intermediate copies come on top): what it
refuses cannot fit.
"""
import logging
import os

import numpy as np

# Batches held at once at the least: the one being read and the one being trained on.
_COPIES = 2


def available_bytes() -> int | None:
  """Host memory this process can still take: psutil's `available` if psutil is
  installed, else /proc/meminfo's MemAvailable, else free pages (`os.sysconf`);
  lowered to a cgroup (v2) limit's headroom where one is set. None if unknown."""
  available = None
  try:
    import psutil  # pylint: disable=import-outside-toplevel  # Optional.
    available = int(psutil.virtual_memory().available)
  except ImportError:
    try:
      with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
          if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
      pass
    if available is None:
      try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
      except (ValueError, OSError, AttributeError):
        pass
  try:
    with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
      limit = f.read().strip()
    with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
      current = int(f.read().strip())
    if limit != "max":
      headroom = int(limit) - current
      available = headroom if available is None else min(available, headroom)
  except (OSError, ValueError):
    pass
  return available


def example_bytes(task, n: int = 2) -> float | None:
  """Bytes of one preprocessed training example of `task` (after `task.setup()`), from
  `n` examples of `task.train_source` through `task.train_preprocess`; None for a task
  that makes its batches another way (its own `train_dataset`)."""
  from mmjax.tasks import base  # pylint: disable=import-outside-toplevel
  task = getattr(task, "inner", task)  # A LoRA-adapted task batches as the task it wraps.
  source = getattr(task, "train_source", None)
  if (source is None or type(task).train_dataset is not base.Task.train_dataset
      or len(source) == 0):
    return None
  n = min(n, len(source))
  examples = [source[i] for i in range(n)]
  batch = {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}
  batch["position"] = np.arange(n)
  out = task.train_preprocess(batch)
  leaves = out.values() if isinstance(out, dict) else [out]
  return sum(np.asarray(v).nbytes for v in leaves) / n


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
    if n < 1024 or unit == "PB":
      return f"{n:.3g} {unit}"
    n /= 1024
  return f"{n:.3g} PB"


def check_batch_memory(task, config, process_count: int = 1, available: int | None = None):
  """Raises guards.ConfigError (one line) when this process's share of
  `config.global_batch_size` cannot fit in the host's available memory.

  `available`: bytes (default `available_bytes()`); nothing is checked when it, or
  the size of an example (`example_bytes`), is unknown.
  """
  from mmjax.train import guards  # pylint: disable=import-outside-toplevel
  per_example = example_bytes(task)
  available = available_bytes() if available is None else available
  if per_example is None or available is None:
    return
  local = config.global_batch_size // max(process_count, 1)
  need = per_example * local * _COPIES
  logging.info("A training batch of %d examples takes about %s of host memory (%s "
               "available).", local, _size(per_example * local), _size(available))
  if need > available:
    fits = max(int(available // (per_example * _COPIES)) * max(process_count, 1), 1)
    raise guards.ConfigError(
        f"config.global_batch_size={config.global_batch_size} needs at least "
        f"{_size(need)} of host memory ({_size(per_example)} per preprocessed example, "
        f"{local} examples per process, {_COPIES} batches at once), and this host has "
        f"{_size(available)} available. Lower config.global_batch_size (below about "
        f"{fits}).")
