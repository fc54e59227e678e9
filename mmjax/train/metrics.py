"""Metric writers: CLU (TensorBoard + logging) and one JSON line per step."""
import json
import os
from typing import Any, Mapping

import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines to a file; scalars only."""

  def __init__(self, path: str):
    self._path = path
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def truncate_jsonl(path: str, last_step: int):
  """Drops lines after `last_step`: a resumed run rewrites the steps it lost."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def create_writer(workdir: str, is_main_process: bool) -> metric_writers.MetricWriter:
  """TensorBoard + logging + `<workdir>/metrics.jsonl` on process 0, logging elsewhere."""
  if not is_main_process:
    return metric_writers.create_default_writer(just_logging=True, asynchronous=False)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
  ])


def read_jsonl(path: str) -> list[dict[str, float]]:
  """All rows of a metrics.jsonl file, in order."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
