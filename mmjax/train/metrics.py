"""Metric writers: TensorBoard events, logging, and one JSON line per step.

TensorBoard events are written with tensorboardX's protocol buffers and event writer, so
no TensorFlow is imported, in the format of TensorFlow's `tf.summary`: one tensor
summary per scalar (plugin "scalars", float32) and per set of images (plugin "images",
[width, height, png, png, ...] strings), which TensorBoard reads as before.

A run that starts (or resumes from step s) first drops the rows and TensorBoard
events after step 0 (or s): `truncate(workdir, s)`; damaged lines of metrics.jsonl
(not UTF-8, torn, not a row) go too, the file as it was kept as
`metrics.jsonl.damaged`. The trainer writes a step's
metrics before its checkpoint, so whatever is killed when, no step is written twice.
"""
import abc
import glob
import io
import itertools
import json
import logging
import os
import struct
import time
from typing import Any, Iterator, Mapping

import numpy as np
import PIL.Image
from tensorboardX import event_file_writer, record_writer
from tensorboardX.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2


class MetricWriter(abc.ABC):
  """Writes a step's scalars (and images) somewhere."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    """`scalars`: name -> number."""

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    """`images`: name -> uint8 [n, h, w, c] (c 1, 3 or 4) or [h, w, c]."""

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter(MetricWriter):
  """Writes to each of `writers` in turn."""

  def __init__(self, writers: list[MetricWriter]):
    self._writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self._writers:
      w.write_images(step, images)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


class LoggingWriter(MetricWriter):
  """Logs `[step] name=value, ...` at INFO, names sorted."""

  def write_scalars(self, step, scalars):
    values = [f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
              for k, v in sorted(scalars.items())]
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step, images):
    logging.info("[%d] Got images: %s.", step, {k: np.shape(v) for k, v in images.items()})


class JsonlWriter(MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines to a file; scalars only."""

  def __init__(self, path: str):
    self._path = path
    self._file = open(path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step), **{k: float(np.asarray(v)) for k, v in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


_WRITER_IDS = itertools.count()


class TensorBoardWriter(MetricWriter):
  """`<logdir>/events.out.tfevents.<time>.<host>.<pid>.<n>`: scalars and images.

  Writes synchronously (each call appends its records to the file; `flush` syncs it).
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self._events = event_file_writer.EventsWriter(
        os.path.join(logdir, "events"), f".{os.getpid()}.{next(_WRITER_IDS)}")

  def _write(self, step: int, tag: str, tensor, plugin: str):
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin))
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, tensor=tensor, metadata=metadata)])
    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary))

  def write_scalars(self, step, scalars):
    for tag, value in scalars.items():
      data = np.asarray(value, np.float32).reshape(()).tobytes()
      self._write(step, tag, tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                                                    tensor_content=data), "scalars")

  def write_images(self, step, images):
    for tag, value in images.items():
      value = np.asarray(value)
      value = value[None] if value.ndim == 3 else value
      if value.dtype != np.uint8:
        raise ValueError(f"Images {tag!r} are {value.dtype}; convert them to uint8 [n, h, w, c].")
      _, h, w, _ = value.shape
      strings = [str(w).encode(), str(h).encode()] + [_png(image) for image in value]
      shape = tensor_shape_pb2.TensorShapeProto(
          dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(strings))])
      self._write(step, tag, tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING,
                                                    tensor_shape=shape,
                                                    string_val=strings), "images")

  def flush(self):
    self._events.flush()

  def close(self):
    self._events.close()


def _png(image: np.ndarray) -> bytes:
  """uint8 [h, w, c] -> PNG bytes."""
  buf = io.BytesIO()
  PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
  return buf.getvalue()


def _step_of(line: bytes) -> int | None:
  """The step of a metrics.jsonl line; None if the line is damaged (not UTF-8, not
  JSON, not an object with an integer step)."""
  try:
    row = json.loads(line.decode("utf-8"))
  except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors.
    return None
  step = row.get("step") if isinstance(row, dict) else None
  return step if isinstance(step, int) and not isinstance(step, bool) else None


def _free_name(path: str) -> str:
  n, candidate = 0, path
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.{n}"
  return candidate


def filter_jsonl(path: str, keep) -> int:
  """Keeps the lines of a metrics.jsonl file whose step `keep(step)` accepts.

  Damaged lines (bytes that are not UTF-8, a torn line, a line that is not a row) are
  dropped too: the file as it was is first copied to `<path>.damaged` (or
  `.damaged.1`, ...) and one warning names both. Returns how many damaged lines were
  dropped.
  """
  if not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    data = f.read()
  lines = [line for line in data.splitlines(keepends=True) if line.strip()]
  steps = [_step_of(line) for line in lines]
  damaged = [i + 1 for i, s in enumerate(steps) if s is None]
  keep_lines = [line if line.endswith(b"\n") else line + b"\n"
                for line, s in zip(lines, steps) if s is not None and keep(s)]
  if damaged:
    copy = _free_name(f"{path}.damaged")
    with open(copy, "wb") as f:
      f.write(data)
    logging.warning("%s: dropped %d damaged line(s) (line %s%s: not UTF-8 JSON rows); "
                    "the file as it was is kept in %s.", path, len(damaged), damaged[0],
                    "" if len(damaged) == 1 else ", ...", copy)
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.writelines(keep_lines)
  os.replace(tmp, path)
  return len(damaged)


def truncate_jsonl(path: str, last_step: int):
  """Drops lines after `last_step` (a resumed run rewrites the steps it lost) and
  damaged lines (`filter_jsonl`)."""
  filter_jsonl(path, lambda s: s <= last_step)


def _records(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file, up to a torn or corrupt one (a killed writer)."""
  with open(path, "rb") as f:
    while header := f.read(12):
      if len(header) < 12 or _crc(header[8:]) != record_writer.masked_crc32c(header[:8]):
        raise _TornRecord
      (length,) = struct.unpack("<Q", header[:8])
      data, footer = f.read(length), f.read(4)
      if (len(data) < length or len(footer) < 4
          or _crc(footer) != record_writer.masked_crc32c(data)):
        raise _TornRecord
      yield data


class _TornRecord(Exception):
  pass


def _crc(four_bytes: bytes) -> int:
  return struct.unpack("<I", four_bytes)[0]


def truncate_events(workdir: str, last_step: int, *, only=None):
  """Drops TensorBoard events after `last_step` from `<workdir>/events.out.tfevents.*`
  (with `only`, the events at step `only` instead).

  Files left with no scalar or image events are deleted. A torn record at the end of a
  file (a killed writer) is dropped too.
  """
  drop = (lambda s: s > last_step) if only is None else (lambda s: s == only)
  paths = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  if not paths:
    return
  for path in paths:
    events, dropped = [], False
    try:
      for record in _records(path):
        event = event_pb2.Event.FromString(record)
        if drop(event.step) and event.HasField("summary"):
          dropped = True
        else:
          events.append(record)
    except _TornRecord:
      dropped = True
    if not dropped:
      continue
    if not any(event_pb2.Event.FromString(e).HasField("summary") for e in events):
      os.remove(path)
      continue
    tmp = path + ".tmp"
    w = record_writer.RecordWriter(tmp)
    for e in events:
      w.write(e)
    w.close()
    os.replace(tmp, path)


def truncate(workdir: str, last_step: int):
  """metrics.jsonl and TensorBoard events keep the steps <= `last_step` only."""
  truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), last_step)
  truncate_events(workdir, last_step)


def drop_step(workdir: str, step: int):
  """metrics.jsonl and TensorBoard events lose their rows at `step` (a repeated
  evaluation of the same checkpoint replaces its rows)."""
  filter_jsonl(os.path.join(workdir, "metrics.jsonl"), lambda s: s != step)
  truncate_events(workdir, step, only=step)


def create_writer(workdir: str, is_main_process: bool) -> MetricWriter:
  """TensorBoard + logging + `<workdir>/metrics.jsonl` on process 0, logging elsewhere."""
  if not is_main_process:
    return LoggingWriter()
  return MultiWriter([LoggingWriter(), TensorBoardWriter(workdir),
                      JsonlWriter(os.path.join(workdir, "metrics.jsonl"))])


def read_jsonl(path: str) -> list[dict[str, float]]:
  """All rows of a metrics.jsonl file, in order."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
