"""TensorBoard events without TensorFlow: what TensorBoard reads back, and truncation on
resume. (That the trainer imports no TensorFlow: test_import.py.)"""
import io
import sys
import types

import numpy as np
import PIL.Image
import pytest

# TensorBoard reads with TensorFlow when it is installed, else with its own stub; this
# module (TensorBoard's switch for that) makes it use the stub, as where TensorFlow is
# absent, and spares importing TensorFlow.
sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
from tensorboard.backend.event_processing import (  # pylint: disable=wrong-import-position
    event_accumulator)

from mmjax.train import metrics

import launch_helpers as lh

FIXTURE = lh.REPO / "tests" / "fixtures" / "events" / "events.out.tfevents.clu"

SCALARS = {1: {"train/loss": 2.5, "train/accuracy": np.float32(0.125)},
           7: {"train/loss": 0.75, "eval/accuracy": 0.96875, "eval/seconds": 1e-3}}
_rng = np.random.default_rng(0)
IMAGES = {7: {"eval/samples": _rng.integers(0, 256, (3, 4, 5, 1), dtype=np.uint8),
              "eval/reconstructions": _rng.integers(0, 256, (2, 3, 6, 3), dtype=np.uint8)}}


def _write(logdir):
  writer = metrics.TensorBoardWriter(str(logdir))
  for step, scalars in SCALARS.items():
    writer.write_scalars(step, scalars)
  for step, images in IMAGES.items():
    writer.write_images(step, images)
  writer.close()


def _read(path) -> dict:
  """{tag: (plugin, [(step, value)])}: floats for scalars, decoded [n, h, w, c] for images."""
  acc = event_accumulator.EventAccumulator(str(path), size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
    values = []
    for event in acc.Tensors(tag):
      proto = event.tensor_proto
      if plugin == "scalars":
        values.append((event.step, np.frombuffer(proto.tensor_content, np.float32).item()))
      else:
        w, h, *pngs = proto.string_val
        decoded = [np.asarray(PIL.Image.open(io.BytesIO(p))) for p in pngs]
        decoded = np.stack([d[..., None] if d.ndim == 2 else d for d in decoded])
        assert decoded.shape[1:3] == (int(h), int(w))
        values.append((event.step, decoded))
    out[tag] = (plugin, values)
  return out


def _expected() -> dict:
  out = {}
  for step, scalars in SCALARS.items():
    for tag, v in scalars.items():
      out.setdefault(tag, ("scalars", []))[1].append((step, float(np.float32(v))))
  for step, images in IMAGES.items():
    for tag, v in images.items():
      out.setdefault(tag, ("images", []))[1].append((step, v))
  return out


def _assert_same(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  for tag, (plugin, values) in want.items():
    assert got[tag][0] == plugin, tag
    assert [s for s, _ in got[tag][1]] == [s for s, _ in values], tag
    for (_, a), (_, b) in zip(got[tag][1], values):
      np.testing.assert_array_equal(a, b, err_msg=tag)


def test_tensorboard_reads_the_scalars_and_images_written(tmp_path):
  _write(tmp_path)
  _assert_same(_read(tmp_path), _expected())


def test_events_read_as_those_clu_and_tensorflow_wrote():
  """tools/make_events_fixture.py wrote the same metrics with CLU's TensorFlow writer."""
  _assert_same(_read(FIXTURE), _expected())


def _steps(path) -> list[int]:
  acc = event_accumulator.EventAccumulator(str(path), size_guidance={"tensors": 0})
  acc.Reload()
  return sorted({e.step for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag)})


def test_truncate_drops_later_steps_and_a_torn_record(tmp_path):
  _write(tmp_path)
  (path,) = tmp_path.glob("events.out.tfevents.*")
  whole = path.read_bytes()
  with open(path, "ab") as f:  # A writer killed halfway through a record.
    f.write(whole[-40:-10])
  metrics.truncate_events(str(tmp_path), 7)
  assert path.read_bytes() == whole  # Only the torn bytes went.
  metrics.truncate_events(str(tmp_path), 3)
  assert _steps(tmp_path) == [1]
  got = _read(tmp_path)
  assert sorted(got) == ["train/accuracy", "train/loss"] and got["train/loss"][1] == [(1, 2.5)]
  metrics.truncate_events(str(tmp_path), 0)
  assert not list(tmp_path.glob("events.out.tfevents.*"))  # Nothing left but the header.


def test_writers_in_one_directory_use_files_of_their_own(tmp_path):
  a, b = metrics.TensorBoardWriter(str(tmp_path)), metrics.TensorBoardWriter(str(tmp_path))
  a.write_scalars(1, {"x": 1.0})
  b.write_scalars(2, {"x": 2.0})
  a.close()
  b.close()
  assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
  assert _steps(tmp_path) == [1, 2]


def test_images_that_are_not_uint8_are_refused(tmp_path):
  writer = metrics.TensorBoardWriter(str(tmp_path))
  with pytest.raises(ValueError, match="uint8"):
    writer.write_images(1, {"x": np.zeros((1, 2, 2, 1), np.float32)})
