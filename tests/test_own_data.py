"""One's own image-caption data end to end: generate, convert (a folder with captions.tsv,
WebDataset tar shards), train CLIP a few steps, evaluate retrieval on the validation split.

The data is made on the fly by tools/make_shapes.py: 64 coloured shapes of 32x32.
"""
import contextlib
import importlib.util
import io
import json
import math

import numpy as np
import pytest

from mmjax.data import make_dataset
from mmjax.data import image

import launch_helpers as lh

N = 64


def _shapes(out, *args):
  spec = importlib.util.spec_from_file_location("make_shapes",
                                                lh.REPO / "tools" / "make_shapes.py")
  make_shapes = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make_shapes)
  with contextlib.redirect_stdout(io.StringIO()):
    make_shapes.main([f"--output={out}", f"--num={N}", "--size=32", *args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """Both inputs converted into one data directory; a broken image and an empty caption
  in the folder, an image without its caption in the shards."""
  root = tmp_path_factory.mktemp("own_data")
  _shapes(root / "folder")
  (root / "folder" / "images" / "000003.png").write_bytes(b"not a png")
  lines = (root / "folder" / "captions.tsv").read_text().splitlines()
  lines[5] = lines[5].split("\t")[0] + "\t   "
  (root / "folder" / "captions.tsv").write_text("file\tcaption\n" + "\n".join(lines) + "\n")
  _shapes(root / "wds", "--format=webdataset", "--shards=2")
  data_dir = root / "tfds"
  folder = make_dataset.convert(str(root / "folder"), str(data_dir), "shapes_folder",
                                val_fraction=0.25, image_size=32)
  # The command line's arguments, on the shards (a glob), as the README shows them.
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    make_dataset.main([f"--input={root / 'wds'}/*.tar", f"--output_dir={data_dir}",
                       "--name=shapes_wds", "--val_fraction=0.25", "--image_size=24"])
  return data_dir, folder, stdout.getvalue()


def test_folder_conversion_reports_what_it_skipped(converted):
  data_dir, report, _ = converted
  assert report["skipped"] == {
      "empty caption": {"count": 1, "keys": ["images/000005.png"]},
      "unreadable image": {"count": 1, "keys": ["images/000003.png"]}}
  assert sum(report["splits"].values()) == N - 2
  assert json.loads((data_dir / "shapes_folder" / "conversion_report.json").read_text()) \
      == report


def test_shards_convert_and_read_with_tfds_data_source(converted):
  data_dir, _, stdout = converted
  assert "Skipped nothing." in stdout
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  sizes = {}
  for split in ("train", "validation"):
    source = tfds.data_source("shapes_wds", data_dir=str(data_dir), split=split)
    sizes[split] = len(source)
    example = source[0]
    assert example["image"].shape == (24, 24, 3) and example["image"].dtype == np.uint8
    assert example["caption"].decode().startswith("a ")
  assert sum(sizes.values()) == N and min(sizes.values()) > 0


def test_crops_are_reproducible_and_sized():
  images = np.random.default_rng(0).integers(0, 255, (4, 40, 30, 1), dtype=np.uint8)
  positions = np.arange(4)
  a = image.crop_and_resize(images, 16, positions=positions, seed=1, min_fraction=0.5,
                               channels=3)
  b = image.crop_and_resize(images, 16, positions=positions, seed=1, min_fraction=0.5,
                               channels=3)
  assert a.shape == (4, 16, 16, 3) and np.array_equal(a, b)
  centre = image.crop_and_resize(images, 30)  # Evaluation: the centred 30x30, as is.
  assert np.array_equal(centre, images[:, 5:35])


@pytest.mark.slow  # An end-to-end training run (on the converted synthetic folder).
def test_clip_trains_on_it_and_evaluates_retrieval(converted, tmp_path):
  # The shards' dataset; the folder's is read back by the conversion tests above.
  data_dir, _, _ = converted
  name = "shapes_wds"
  lh.run(f"experiments/clip_captions.py:smoke,name={name},data_dir={data_dir},image_size=16",
         tmp_path, devices=8, env={"MMJAX_CACHE_DIR": str(tmp_path / "cache")})
  last = lh.metrics(tmp_path)[-1]
  assert last["step"] == 4 and math.isfinite(last["train/loss"])
  assert "eval/zeroshot_top1" not in last  # No classes: retrieval only.
  for key in ("eval/i2t_recall@1", "eval/t2i_recall@1", "eval/i2t_recall@10"):
    assert 0.0 <= last[key] <= 1.0, key
  assert last["eval/i2t_recall@1"] <= last["eval/i2t_recall@5"] <= last["eval/i2t_recall@10"]
