"""Where examples come from: TFDS splits (downloaded when missing), decoded NumPy
arrays, label checks.

A split is read with `tfds.data_source` (ArrayRecord, random access). Small datasets
(MNIST-sized) are decoded once into NumPy arrays (`decoded_source`) and cached on disk,
since decoding their PNGs in every run costs seconds; larger ones are decoded batch by
batch by the input pipeline (`gather`). mmjax/data/batching.py makes batches of either.
"""
import hashlib
import importlib.util
import logging
import os
import pathlib
import shutil
import threading
import time
import urllib.parse

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
