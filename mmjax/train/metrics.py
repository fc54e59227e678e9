"""Metric writers: CLU (TensorBoard + logging) and one JSON line per step.

A run that starts (or resumes from step s) first drops the rows and TensorBoard
events after step 0 (or s): `truncate(workdir, s)`. The trainer writes a step's
metrics before its checkpoint, so whatever is killed when, no step is written twice.
"""
import glob
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
  def step(line):
    try:
      return json.loads(line)["step"]
    except ValueError:  # A line torn by a kill.
      return None
  with open(path, encoding="utf-8") as f:
    keep = [line for line in f if line.strip() and (s := step(line)) is not None
            and s <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def truncate_events(workdir: str, last_step: int):
  """Drops TensorBoard events after `last_step` from `<workdir>/events.out.tfevents.*`.

  Files left with no scalar or image events are deleted. A torn record at the end of a
  file (a killed writer) is dropped too.
  """
  paths = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  if not paths:
    return
  import tensorflow as tf  # Already imported by the TensorBoard writer.
  for path in paths:
    events, dropped = [], False
    try:
      for record in tf.data.TFRecordDataset(path):
        event = tf.compat.v1.Event.FromString(record.numpy())
        if event.step > last_step and event.HasField("summary"):
          dropped = True
        else:
          events.append(record.numpy())
    except tf.errors.DataLossError:
      dropped = True
    if not dropped:
      continue
    if not any(tf.compat.v1.Event.FromString(e).HasField("summary") for e in events):
      os.remove(path)
      continue
    tmp = path + ".tmp"
    with tf.io.TFRecordWriter(tmp) as w:
      for e in events:
        w.write(e)
    os.replace(tmp, path)


def truncate(workdir: str, last_step: int):
  """metrics.jsonl and TensorBoard events keep the steps <= `last_step` only."""
  truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), last_step)
  truncate_events(workdir, last_step)


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
