"""TFDS data sources read through Grain: training and evaluation batches.

A split is read with `tfds.data_source` (ArrayRecord, random access). Small
datasets (MNIST-sized) are decoded once into NumPy arrays and cached on disk, since
decoding PNGs costs about 5 s per 60,000 images on one core; larger ones are decoded
batch by batch inside the Grain pipeline.

Batches are built the same way in training and evaluation: a Grain dataset of
*batches of indices*, each process keeping every `process_count`-th local batch of
`global_batch_size / process_count` indices, and one vectorised gather reads them.
So the global batch at step s holds the same examples in the same order whatever
the number of processes and devices, and the iterator state (one integer per
process) is all a checkpoint needs to resume the exact data order. Training
shuffles with one NumPy permutation per epoch, drawn from (seed, epoch): Grain's
per-element `shuffle` costs ~15 us per example in Python, 2 ms per batch of 128,
a quarter of LeNet-5's train step on a 2-core CPU.
"""
import dataclasses
import functools
import hashlib
import importlib.util
import logging
import math
import os
import pathlib
import shutil
import sys
import threading
import time
import urllib.parse
from typing import Callable

import grain
import numpy as np

Batch = dict[str, np.ndarray]

_CACHE_ENV = "MMJAX_CACHE_DIR"


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not prepared where mmjax looked, and could not be downloaded."""


def resolve_data_dir(data_dir: str | None) -> str:
  """The TFDS data directory: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if data_dir:
    return os.path.expanduser(data_dir)
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def tfds_source(name: str, split: str, data_dir: str | None = None, download: bool = True):
  """Returns the random-access TFDS data source of one split.

  A dataset that is not prepared is downloaded and prepared when `download` is True,
  after checking (`unreachable_hosts`, seconds) that its download hosts answer: offline
  the error comes at once instead of after TFDS's minutes of retries. A download that
  fails leaves nothing behind in the data directory (`_remove_new_paths`).

  Raises:
    DatasetNotFoundError: the dataset is not prepared in the data directory and
      `download` is False or the download failed. The message names the directory
      searched and how to provide the data.
  """
  import tensorflow_datasets as tfds  # Imported here: TFDS is slow to import.

  data_dir = resolve_data_dir(data_dir)
  how = (f"Set $TFDS_DATA_DIR or --config.dataset.data_dir to a directory holding a "
         f"prepared copy (`{name}/<version>/dataset_info.json` inside), or prepare it "
         f"once on a machine with internet: python -c \"import tensorflow_datasets as tfds; "
         f"tfds.builder('{name}', data_dir='{data_dir}', file_format='array_record')"
         f".download_and_prepare()\"")
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # An unknown name, for one.
    raise DatasetNotFoundError(f"TFDS has no dataset {name!r}: {e}") from e
  if not builder.is_prepared():
    missing = f"Dataset {name!r} is not prepared in {data_dir} (searched {builder.data_dir})"
    if not download:
      raise DatasetNotFoundError(f"{missing} and config.dataset.download is False. {how}")
    if importlib.util.find_spec("tensorflow") is None:  # TFDS prepares datasets with it.
      raise DatasetNotFoundError(f"{missing}; preparing it from its download needs TensorFlow: "
                                 f"pip install 'mmjax[prepare]'. {how}")
    unreachable = unreachable_hosts(_download_urls(builder))
    if unreachable:
      hosts = "; ".join(f"{host}: {why}" for host, why in unreachable.items())
      raise DatasetNotFoundError(
          f"{missing} and it cannot be downloaded: no answer from its download host "
          f"({hosts}). {how}")
    before = _tfds_paths(data_dir, builder.name)
    try:
      builder.download_and_prepare()
    except BaseException as e:  # Ctrl-C during TFDS's retries included.
      _remove_new_paths(data_dir, before, _tfds_paths(data_dir, builder.name))
      if not isinstance(e, Exception):
        raise
      raise DatasetNotFoundError(
          f"{missing} and downloading it failed ({type(e).__name__}: {_short(e)}). "
          f"{how}") from e
  try:
    return builder.as_data_source(split=split)
  except Exception as e:
    raise DatasetNotFoundError(
        f"Dataset {name!r} in {builder.data_dir} has no split {split!r} readable as "
        f"ArrayRecord: {e}") from e


# Seconds a download host may take to answer (connection and response headers).
PROBE_TIMEOUT_S = 5.0
# HTTP answers TFDS retries with backoff for minutes: as bad as no answer.
_RETRIED_STATUSES = (500, 502, 503, 504)


def _short(e: BaseException, limit: int = 300) -> str:
  text = str(e)
  return text if len(text) <= limit else text[:limit] + "..."


def _probe(url: str, timeout: float) -> str | None:
  """None if `url` answers a GET (headers only, no retries) within `timeout` seconds,
  else why not."""
  import requests  # TFDS downloads with requests: the same proxies ($HTTPS_PROXY, ...).
  try:
    with requests.get(url, stream=True, timeout=timeout) as response:
      if response.status_code in _RETRIED_STATUSES:
        return f"HTTP {response.status_code}"
      return None
  except requests.RequestException as e:
    return f"{type(e).__name__}: {_short(e, 200)}"


def _download_urls(builder) -> list[str]:
  """The URLs in the dataset's registered checksums; none known -> [] (no probe)."""
  try:
    return list(type(builder).url_infos or ())
  except Exception:  # A builder without a checksums file, for one.
    return []


def unreachable_hosts(urls, timeout: float = PROBE_TIMEOUT_S) -> dict[str, str]:
  """{host: why} for the http(s) hosts among `urls` that do not answer in time.

  One GET per scheme and host, all at once, each waiting at most `timeout` seconds
  for the connection and for the response headers; 2 * `timeout` in all (a name
  lookup that hangs counts as no answer). Any HTTP status counts as an answer except
  500, 502, 503 and 504, which TFDS would retry for minutes.
  """
  first = {}
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https"):
      first.setdefault((parts.scheme, parts.netloc), url)
  answers = {}

  def probe(key, url):
    try:
      answers[key] = _probe(url, timeout)
    except Exception:  # A probe that breaks proves nothing: TFDS will try.
      answers[key] = None

  threads = [threading.Thread(target=probe, args=item, daemon=True) for item in first.items()]
  for thread in threads:
    thread.start()
  deadline = time.monotonic() + 2 * timeout
  for thread in threads:
    thread.join(max(0.0, deadline - time.monotonic()))
  result = {}
  for key in first:
    why = answers.get(key, f"no answer within {2 * timeout:g} s")
    if why:
      result[key[1]] = why
  return result


def _tfds_paths(data_dir: str, name: str) -> set[pathlib.Path]:
  """What exists where `download_and_prepare` of `name` writes: the entries of
  data_dir, data_dir/downloads and data_dir/downloads/extracted, everything under
  data_dir/<name> and data_dir/downloads/<name>, and data_dir itself."""
  root = pathlib.Path(data_dir)
  if "://" in data_dir or not root.is_dir():  # Cloud storage: not cleaned up.
    return set()
  paths = {root}
  for directory, recursive in ((root, False), (root / "downloads", False),
                               (root / "downloads" / "extracted", False),
                               (root / name, True), (root / "downloads" / name, True)):
    if directory.is_dir():
      paths.update(directory.rglob("*") if recursive else directory.iterdir())
  return paths


def _remove_new_paths(data_dir: str, before: set[pathlib.Path], after: set[pathlib.Path]):
  """Removes the paths in `after` but not `before` (a failed download's partial and
  .tmp files, empty directories), parents first. Another process downloading the
  same dataset into the same directory at the same time would lose its files too."""
  if "://" in data_dir:
    return
  for path in sorted(after - before, key=lambda p: len(p.parts)):
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path, ignore_errors=True)
    elif path.is_symlink() or path.exists():
      path.unlink(missing_ok=True)


def check_labels(labels, num_classes: int, where: str) -> None:
  """Raises ValueError, starting with `where`, unless every label is an integer class
  id in [0, num_classes).

  For labels whose values are visible (NumPy batches in the data pipeline): inside a
  jitted loss they are traced and not checked, and `losses.softmax_cross_entropy`
  reads -1 as the last class and gives NaN for labels >= num_classes. `labels`: any
  shape; the check is two reductions over them.
  """
  if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 1:
    raise ValueError(f"{where}: num_classes must be an integer >= 1, got {num_classes!r}.")
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{where}: labels must be integer class ids, got dtype {labels.dtype}; "
                     f"cast them with .astype(np.int32).")
  if labels.size == 0 or (labels.min() >= 0 and labels.max() < num_classes):
    return
  bad = labels[(labels < 0) | (labels >= num_classes)]
  values = np.unique(bad)
  shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
  fixes = []
  if values[-1] >= num_classes:
    fixes.append(f"if they are real classes, set the number of classes to "
                 f"{int(values[-1]) + 1} or more")
  if values[0] < 0:
    fixes.append("negative labels are not ignored by the losses: drop those examples")
  raise ValueError(f"{where}: {bad.size} of {labels.size} labels are outside "
                   f"[0, {num_classes}): {shown}. Fix the dataset's labels, or "
                   f"{'; '.join(fixes)}.")


class ArraySource:
  """A whole split as NumPy arrays, a random-access source of dict examples.

  `dataset_info` is the TFDS `DatasetInfo` it was decoded from (None for arrays made
  another way), as a TFDS data source has it.
  """

  def __init__(self, arrays: dict[str, np.ndarray], dataset_info=None):
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
      raise ValueError(f"Arrays of unequal lengths: { {k: len(v) for k, v in arrays.items()} }")
    self.arrays = arrays
    self.dataset_info = dataset_info

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, index):
    return {k: v[index] for k, v in self.arrays.items()}

  def gather(self, indices: np.ndarray) -> Batch:
    return {k: v[indices] for k, v in self.arrays.items()}


def decoded_source(name: str, split: str, data_dir: str | None = None,
                   download: bool = True, cache_dir: str | None = None) -> ArraySource:
  """Decodes a whole TFDS split once into memory, cached as .npz across runs.

  The cache lives in `cache_dir`, else $MMJAX_CACHE_DIR, else ~/.cache/mmjax, keyed
  by dataset, version, split and the prepared files themselves (`_fingerprint`), so
  two copies of a dataset never share an entry; it is written to a temporary file
  and renamed, so a reader never sees half of one.
  """
  source = tfds_source(name, split, data_dir, download)
  version = str(source.dataset_info.version)
  root = pathlib.Path(cache_dir or os.environ.get(_CACHE_ENV) or "~/.cache/mmjax").expanduser()
  path = (root / "decoded" / name / version / _fingerprint(source.dataset_info.data_dir)
          / f"{split}.npz")
  if path.exists():
    with np.load(path) as f:
      return ArraySource({k: f[k] for k in f.files}, source.dataset_info)
  logging.info("Decoding %s/%s (%d examples) into %s", name, split, len(source), path)
  examples = source.__getitems__(range(len(source)))
  arrays = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
  try:
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)  # Gone after the rename; else half written.
  return ArraySource(arrays, source.dataset_info)


def _fingerprint(directory: str) -> str:
  """A short hash of a prepared dataset's directory: its path, file names, sizes, mtimes."""
  files = sorted(pathlib.Path(directory).iterdir())
  stats = [(f.name, f.stat()) for f in files if f.is_file()]
  key = [os.path.abspath(directory)] + [(n, st.st_size, st.st_mtime_ns) for n, st in stats]
  return hashlib.sha1(repr(key).encode()).hexdigest()[:12]


def load_source(dataset_config, split: str):
  """The source for `split` as the config's `dataset` section asks for it."""
  c = dataset_config
  if c.cache_decoded:
    return decoded_source(c.name, split, c.data_dir, c.download)
  return tfds_source(c.name, split, c.data_dir, c.download)


def num_classes(source, key: str = "label") -> int | None:
  """The number of classes of a source's `key` feature, from its TFDS info; None when
  the source has no info or the feature is not a class label."""
  info = getattr(source, "dataset_info", None)
  feature = info.features[key] if info is not None and key in info.features else None
  return getattr(feature, "num_classes", None)


def gather(source, indices: np.ndarray) -> Batch:
  """The examples at `indices` of a TFDS or array source, stacked: {key: [n, ...]}."""
  if isinstance(source, ArraySource):
    return source.gather(indices)
  examples = source.__getitems__(indices.tolist())
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


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


# Mean and standard deviation of the training pixels in [0, 1], per dataset.
NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}


def normalisation(dataset_name: str) -> tuple[float, float]:
  """(mean, std) of a dataset's pixels in [0, 1]; (0.5, 0.5) for one not listed."""
  return NORMALISATION.get(dataset_name, (0.5, 0.5))


def normalize_images(images: np.ndarray, mean: float, std: float) -> np.ndarray:
  """uint8 images [b, h, w, c] -> float32 (x / 255 - mean) / std, same shape.

  Computed as x · (1 / (255 std)) - mean / std in place on one new float32 array:
  the textbook expression allocates three temporaries and took 314 us against 39 us
  for 128 MNIST images on a 2-core CPU, time the train step loses to the input
  thread. The two agree to float32 rounding.
  """
  x = images.astype(np.float32)
  x *= np.float32(1.0 / (255.0 * std))
  x -= np.float32(mean / std)
  return x


def image_classification_preprocess(mean: float, std: float) -> Callable[[Batch], Batch]:
  """uint8 images [b, h, w, c] -> `normalize_images`; labels -> int32."""

  def preprocess(batch: Batch) -> Batch:
    return {"image": normalize_images(batch["image"], mean, std),
            "label": batch["label"].astype(np.int32)}

  return preprocess



# OpenAI CLIP's pixel mean and std per RGB channel, in [0, 1]: what open_clip's
# weights expect (open_clip's OPENAI_DATASET_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_channels(images: np.ndarray, mean, std) -> np.ndarray:
  """uint8 images [b, h, w, c] -> float32 (x / 255 - mean) / std; mean and std are
  scalars or one value per channel."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  if mean.ndim == 0 and std.ndim == 0:
    return normalize_images(images, float(mean), float(std))
  x = images.astype(np.float32)
  x *= 1.0 / (255.0 * std)
  x -= mean / std
  return x


def crop_and_resize(images: np.ndarray, size: int, *, positions: np.ndarray | None = None,
                    seed: int = 0, min_fraction: float = 1.0,
                    channels: int | None = None) -> np.ndarray:
  """uint8 images [b, h, w, c] -> uint8 [b, size, size, channels]: a square crop, resized.

  Evaluation (`positions` None): the centred square of side min(h, w). Training: a
  square of side min(h, w) * f, f uniform in [min_fraction, 1], at a uniform place;
  f and the place are drawn from (seed, the example's stream position), so a resumed
  run crops exactly as the first did. Resized with PIL's bilinear filter (antialiased);
  a crop already `size` wide is not resampled. `channels=3` repeats a grey channel.
  """
  from mmjax.data import captions  # pylint: disable=import-outside-toplevel
  b, h, w, c = images.shape
  short = min(h, w)
  if positions is None:
    sides = np.full(b, short)
    tops, lefts = np.full(b, (h - short) // 2), np.full(b, (w - short) // 2)
  else:
    if not 0.0 < min_fraction <= 1.0:
      raise ValueError(f"min_fraction={min_fraction}: the smallest crop, as a fraction of "
                       f"the shorter side, must be in (0, 1].")
    u = [captions.position_uniform(positions, seed * 4 + k) for k in range(3)]
    sides = np.maximum(1, np.round(short * (min_fraction + (1 - min_fraction) * u[0])))
    sides = sides.astype(np.int64)
    tops = np.floor(u[1] * (h - sides + 1)).astype(np.int64)
    lefts = np.floor(u[2] * (w - sides + 1)).astype(np.int64)
  if h == w == size and np.all(sides == size):
    out = images  # Nothing to crop or resample (a 28x28 dataset at size 28).
  else:
    out = _crop_each(images, sides, tops, lefts, size)
  if channels is not None and channels != c:
    if c != 1:
      raise ValueError(f"Images have {c} channels; the model takes {channels}. Only grey "
                       f"images (1 channel) are converted (repeated to {channels}).")
    out = np.repeat(out, channels, axis=-1)
  return out


def _crop_each(images, sides, tops, lefts, size: int) -> np.ndarray:
  """Each image's square crop (side, top, left), resized to size x size with PIL."""
  import PIL.Image  # pylint: disable=import-outside-toplevel
  b, _, _, c = images.shape
  out = np.empty((b, size, size, c), np.uint8)
  for i in range(b):
    crop = images[i, tops[i]:tops[i] + sides[i], lefts[i]:lefts[i] + sides[i]]
    if sides[i] != size:
      pil = PIL.Image.fromarray(crop[..., 0] if c == 1 else crop)
      crop = np.asarray(pil.resize((size, size), PIL.Image.BILINEAR)).reshape(size, size, c)
    out[i] = crop
  return out
