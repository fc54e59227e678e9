"""The input pipeline (mmjax/data): sources, sharding, epochs, eval coverage, resume, errors."""
import os
import shutil

import numpy as np
import pytest

from mmjax.data import batching
from mmjax.data import image
from mmjax.data import sources


def _source(n=100):
  return sources.ArraySource({"x": np.arange(n), "y": np.arange(n) * 10})


def _ident(batch):
  return {k: v for k, v in batch.items() if k != "position"}


def _take(ds, k):
  it = iter(ds)
  return [next(it) for _ in range(k)]


def test_process_shards_concatenate_to_the_single_process_batch():
  src = _source()
  whole = _take(batching.train_dataset(src, global_batch_size=8, seed=3, preprocess=_ident), 30)
  parts = [_take(batching.train_dataset(src, global_batch_size=8, seed=3, preprocess=_ident,
                                        sharding=batching.Sharding(p, 2)), 30) for p in range(2)]
  for s in range(30):
    np.testing.assert_array_equal(whole[s]["x"], np.concatenate([parts[0][s]["x"], parts[1][s]["x"]]))
    assert parts[0][s]["x"].shape == (4,)


def test_each_epoch_is_a_new_permutation():
  src = _source(64)
  batches = _take(batching.train_dataset(src, global_batch_size=16, seed=0, preprocess=_ident), 8)
  epoch1 = np.concatenate([b["x"] for b in batches[:4]])
  epoch2 = np.concatenate([b["x"] for b in batches[4:]])
  assert sorted(epoch1) == list(range(64)) and sorted(epoch2) == list(range(64))
  assert not np.array_equal(epoch1, epoch2)
  positions = [next(iter(batching.train_dataset(
      src, global_batch_size=16, seed=0, preprocess=lambda b: b)))["position"]]
  np.testing.assert_array_equal(positions[0], np.arange(16))
  other_seed = _take(batching.train_dataset(src, global_batch_size=16, seed=1, preprocess=_ident), 4)
  assert not np.array_equal(epoch1, np.concatenate([b["x"] for b in other_seed]))


def test_batches_straddling_epochs_take_each_epochs_own_order():
  src = _source(10)
  stream = np.concatenate([b["x"] for b in _take(
      batching.train_dataset(src, global_batch_size=4, seed=5, preprocess=_ident), 10)])
  for epoch in range(4):  # 40 examples: epochs 0-3, batches 2 and 7 straddle two of them.
    np.testing.assert_array_equal(stream[10 * epoch:10 * (epoch + 1)],
                                  batching.epoch_permutation(5, epoch, 10))
  assert len({tuple(stream[i:i + 10]) for i in range(0, 40, 10)}) == 4


def test_iterator_state_resumes_the_exact_batches():
  ds = batching.train_dataset(_source(), global_batch_size=8, seed=0, preprocess=_ident)
  it = iter(ds)
  for _ in range(17):
    next(it)
  state = it.get_state()
  expected = [next(it)["x"] for _ in range(5)]
  resumed = iter(ds)
  resumed.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(next(resumed)["x"], e)


@pytest.mark.parametrize("processes", [1, 2])
def test_eval_covers_the_split_exactly_once(processes):
  src = _source(101)
  seen = []
  for p in range(processes):
    ds = batching.eval_dataset(src, global_batch_size=16, preprocess=_ident,
                               sharding=batching.Sharding(p, processes))
    assert len(ds) == 7  # ceil(101 / 16) global batches.
    for b in ds:
      assert b["x"].shape == (16 // processes,)
      seen.extend(b["x"][b["mask"] > 0].tolist())
  assert sorted(seen) == list(range(101))


def test_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match="multiple of 3"):
    batching.train_dataset(_source(), global_batch_size=8, seed=0, preprocess=_ident,
                           sharding=batching.Sharding(0, 3))


@pytest.mark.slow
def test_mnist_from_tfds_is_decoded_once_and_cached(tmp_path):
  src = sources.decoded_source("mnist", "test", cache_dir=str(tmp_path))
  assert len(src) == 10_000
  assert src.arrays["image"].shape == (10_000, 28, 28, 1)
  assert src.arrays["image"].dtype == np.uint8
  # The class counts of the MNIST test split.
  np.testing.assert_array_equal(np.bincount(src.arrays["label"]),
                                [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
  assert list(tmp_path.rglob("test.npz"))
  again = sources.decoded_source("mnist", "test", cache_dir=str(tmp_path))
  np.testing.assert_array_equal(again.arrays["image"], src.arrays["image"])
  # The same examples as the TFDS source itself.
  raw = sources.tfds_source("mnist", "test")
  np.testing.assert_array_equal(raw[1234]["image"], src.arrays["image"][1234])


@pytest.mark.slow
def test_two_copies_of_a_dataset_get_their_own_cache_entries(tmp_path):
  raw = sources.tfds_source("mnist", "test")
  copy = tmp_path / "tfds" / "mnist"
  shutil.copytree(os.path.dirname(raw.dataset_info.data_dir), copy)
  src = sources.decoded_source("mnist", "test", cache_dir=str(tmp_path / "cache"))
  assert len(list((tmp_path / "cache").rglob("test.npz"))) == 1
  sources.decoded_source("mnist", "test", data_dir=str(tmp_path / "tfds"),
                          cache_dir=str(tmp_path / "cache"))
  assert len(list((tmp_path / "cache").rglob("test.npz"))) == 2
  assert len(src) == 10_000


def test_missing_dataset_names_the_directory(tmp_path):
  with pytest.raises(sources.DatasetNotFoundError, match=str(tmp_path)) as e:
    sources.tfds_source("mnist", "train", data_dir=str(tmp_path), download=False)
  assert "TFDS_DATA_DIR" in str(e.value)


@pytest.mark.parametrize("precision", [np.float32, np.float64])
def test_normalize_matches_the_textbook_formula(precision):
  images = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
  out = image.normalize(images, 0.1307, 0.3081, precision)
  assert out.dtype == np.float32 and out.shape == images.shape
  expected = (images.astype(np.float64) / 255.0 - 0.1307) / 0.3081
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
  assert images[3, 7, 7, 0] == 255  # The input is left as it was.
  rgb = np.repeat(images, 3, axis=-1)
  mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
  out = image.normalize(rgb, mean, std, precision)
  expected = (rgb.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_the_number_of_classes_comes_from_the_datasets_info(tmp_path):
  src = sources.decoded_source("mnist", "test[:64]", cache_dir=str(tmp_path))
  assert sources.num_classes(src) == 10
  assert sources.num_classes(sources.ArraySource({"label": np.zeros(3)})) is None
