"""Regenerates tests/fixtures/events/: TensorBoard events as CLU and TensorFlow wrote them.

mmjax wrote its TensorBoard events with CLU's writer (`tf.summary`) until it moved to
tensorboardX, which needs no TensorFlow. This script writes, with CLU and TensorFlow, the
scalars and images that tests/test_metrics_events.py writes with mmjax's writer, so the
test can check that TensorBoard reads the same tags, steps, values and pixels from both.

CLU is no dependency of mmjax. Run in an environment with mmjax's test dependencies
(TensorFlow among them) and CLU, from the repository root:

  python3 -m venv /tmp/clu-venv && /tmp/clu-venv/bin/pip install -e ".[test]" clu
  /tmp/clu-venv/bin/python tools/make_events_fixture.py
"""
import glob
import os
import pathlib
import shutil
import sys

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "events"
sys.path.insert(0, str(OUT.parents[1]))

from test_metrics_events import IMAGES, SCALARS  # pylint: disable=wrong-import-position


def main():
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  tmp = OUT / "tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  writer = metric_writers.create_default_writer(str(tmp), asynchronous=False)
  for step, scalars in SCALARS.items():
    writer.write_scalars(step, scalars)
  for step, images in IMAGES.items():
    writer.write_images(step, images)
  writer.close()
  (path,) = glob.glob(str(tmp / "events.out.tfevents.*"))
  for old in OUT.glob("events.out.tfevents.*"):
    old.unlink()
  os.replace(path, OUT / "events.out.tfevents.clu")
  shutil.rmtree(tmp)
  print("wrote", OUT / "events.out.tfevents.clu")


if __name__ == "__main__":
  main()
