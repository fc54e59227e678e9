"""Where examples come from: TFDS splits (downloaded when missing), decoded NumPy
arrays, label checks.

A split is read with `tfds.data_source` (ArrayRecord, random access). Small datasets
(MNIST-sized) are decoded once into NumPy arrays (`decoded_source`) and cached on disk,
since decoding their PNGs in every run costs seconds; larger ones are decoded batch by
batch by the input pipeline (`gather`). mmjax/data/batching.py makes batches of either.
A prepared dataset's metadata is read by mmjax before TFDS reads it (`check_prepared`);
files that are missing or damaged are one-line errors naming them.
"""
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import threading
import time
import urllib.parse
import zlib

import numpy as np

Batch = dict[str, np.ndarray]

_CACHE_ENV = "MMJAX_CACHE_DIR"


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is not prepared where mmjax looked, and could not be downloaded."""


class DamagedDatasetError(ValueError):
  """A prepared dataset's files are damaged, or name code mmjax does not run."""


# Written by mmjax.data.make_dataset beside a dataset's files: their sizes and the
# SHA-256 of its metadata; `check_prepared` verifies them before TFDS reads any.
MANIFEST = "mmjax_files.json"
# The feature classes a prepared dataset may name (TFDS imports the module it names).
_FEATURE_CLASS = re.compile(r"tensorflow_datasets\.core\.features(\.[A-Za-z_][A-Za-z0-9_]*)+")


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

  The prepared files are checked first (`check_prepared`: feature classes, mmjax's
  manifest) and the split's files must all be there; records that do not read
  (ArrayRecord's chunk hashes) raise DamagedDatasetError when read (`gather`).

  Raises:
    DatasetNotFoundError: the dataset is not prepared in the data directory and
      `download` is False or the download failed, or a file of the split is missing.
      The message names the directory searched (or the file) and how to provide it.
    DamagedDatasetError: the metadata names a feature class that is not TFDS's, or a
      file differs from mmjax's manifest.
  """
  import tensorflow_datasets as tfds  # Imported here: TFDS is slow to import.

  data_dir = resolve_data_dir(data_dir)
  how = (f"Set $TFDS_DATA_DIR or --config.dataset.data_dir to a directory holding a "
         f"prepared copy (`{name}/<version>/dataset_info.json` inside), or prepare it "
         f"once on a machine with internet: python -c \"import tensorflow_datasets as tfds; "
         f"tfds.builder('{name}', data_dir='{data_dir}', file_format='array_record')"
         f".download_and_prepare()\"")
  check_prepared(data_dir, name)
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
  _check_split_files(builder, name, split)
  try:
    return builder.as_data_source(split=split)
  except Exception as e:
    raise DatasetNotFoundError(
        f"Dataset {name!r} in {builder.data_dir} has no split {split!r} readable as "
        f"ArrayRecord: {e}") from e


_HOW_TO_RESTORE = ("Restore the dataset's directory from a copy, or prepare it again (delete "
                   "it, then rerun with download allowed, or rerun mmjax.data.make_dataset "
                   "with --overwrite).")


def _check_split_files(builder, name: str, split: str) -> None:
  """DatasetNotFoundError naming the first file of `split` that is missing: TFDS would
  open the split and fail at the first read."""
  for base in {re.sub(r"\[.*?\]", "", part).strip() for part in split.split("+")}:
    try:
      paths = list(builder.info.splits[base].filepaths)
    except Exception:  # pylint: disable=broad-except  # No file list: TFDS decides.
      paths = []
    for path in paths:
      if "://" not in os.fspath(path) and not os.path.isfile(os.fspath(path)):
        raise DatasetNotFoundError(
            f"Dataset {name!r}: the file {path} of split {base!r} is missing. "
            f"{_HOW_TO_RESTORE}")


def _json_file(path: pathlib.Path):
  try:
    with open(path, "rb") as f:
      return json.loads(f.read().decode("utf-8"))
  except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError included.
    raise DamagedDatasetError(f"{path} does not read as JSON ({_short(e, 200)}). "
                              f"{_HOW_TO_RESTORE}") from None


def _class_names(value):
  """Yields the feature class names in a features.json / dataset_info.json value."""
  if isinstance(value, dict):
    for key, item in value.items():
      if key == "pythonClassName" or (key == "type" and "content" in value):
        yield item
      yield from _class_names(item)
  elif isinstance(value, list):
    for item in value:
      yield from _class_names(item)


def check_prepared(data_dir: str, name: str) -> None:
  """Checks a prepared dataset's metadata before TFDS reads it.

  In every `<data_dir>/<name>/[<config>/]<version>/`: the feature classes named by
  features.json and dataset_info.json must be TFDS's own
  (`tensorflow_datasets.core.features.*`; TFDS imports the module a name gives); where
  mmjax wrote a manifest (MANIFEST, by make_dataset), every file it lists must be there
  with its size, and the metadata with its SHA-256. The records themselves carry
  ArrayRecord's chunk hashes, checked as they are read (`gather`).

  Raises:
    DamagedDatasetError: a class from elsewhere, metadata that is not JSON, or a file
      that differs from the manifest; one line naming the file.
    DatasetNotFoundError: a file listed in the manifest is missing.
  """
  if "://" in data_dir:
    return
  root = pathlib.Path(data_dir) / name.partition(":")[0]
  if not root.is_dir():
    return
  for directory in [p.parent for p in root.glob("*/dataset_info.json")] + \
      [p.parent for p in root.glob("*/*/dataset_info.json")]:
    for meta in ("features.json", "dataset_info.json"):
      if (directory / meta).is_file():
        for cls in _class_names(_json_file(directory / meta)):
          if not isinstance(cls, str) or not _FEATURE_CLASS.fullmatch(cls):
            raise DamagedDatasetError(
                f"{directory / meta} names the feature class {str(cls)[:200]!r}; mmjax "
                f"reads only TFDS's own (tensorflow_datasets.core.features.*) and imports "
                f"no other module a dataset names. Prepare the dataset again with TFDS or "
                f"mmjax.data.make_dataset.")
    if (directory / MANIFEST).is_file():
      _check_manifest(directory)


def file_manifest(directory: str) -> dict:
  """{"files": {name: {"size": bytes[, "sha256": hex]}}} of the files in `directory`
  (the SHA-256 of .json files: the metadata TFDS trusts)."""
  files = {}
  for path in sorted(pathlib.Path(directory).iterdir()):
    if path.is_file() and path.name != MANIFEST:
      entry = {"size": path.stat().st_size}
      if path.suffix == ".json":
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
      files[path.name] = entry
  return {"files": files}


def write_manifest(directory: str) -> None:
  """Writes `file_manifest(directory)` to `<directory>/MANIFEST` (temp file + rename)."""
  path = os.path.join(directory, MANIFEST)
  manifest = file_manifest(directory)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, path)


def _check_manifest(directory: pathlib.Path) -> None:
  manifest = _json_file(directory / MANIFEST)
  files = manifest.get("files") if isinstance(manifest, dict) else None
  if not isinstance(files, dict):
    raise DamagedDatasetError(f"{directory / MANIFEST} is not a file list. {_HOW_TO_RESTORE}")
  for file_name, want in files.items():
    path = directory / file_name
    if not isinstance(want, dict) or "/" in file_name or file_name.startswith("."):
      raise DamagedDatasetError(f"{directory / MANIFEST}: bad entry {file_name!r}. "
                                f"{_HOW_TO_RESTORE}")
    if not path.is_file():
      raise DatasetNotFoundError(f"{path} is missing (listed in {MANIFEST}). "
                                 f"{_HOW_TO_RESTORE}")
    size = path.stat().st_size
    if size != want.get("size"):
      raise DamagedDatasetError(f"{path} has {size} bytes, {want.get('size')} when it was "
                                f"written: it is damaged or was replaced. {_HOW_TO_RESTORE}")
    if "sha256" in want and hashlib.sha256(path.read_bytes()).hexdigest() != want["sha256"]:
      raise DamagedDatasetError(f"{path} differs from what was written (SHA-256 mismatch): "
                                f"it is damaged or was edited. {_HOW_TO_RESTORE}")


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


def unreachable_hosts(urls, timeout: float | None = None) -> dict[str, str]:
  """{host: why} for the http(s) hosts among `urls` that do not answer in time.

  One GET per scheme and host, all at once, each waiting at most `timeout` seconds
  (None: PROBE_TIMEOUT_S)
  for the connection and for the response headers; 2 * `timeout` in all (a name
  lookup that hangs counts as no answer). Any HTTP status counts as an answer except
  500, 502, 503 and 504, which TFDS would retry for minutes.
  """
  timeout = PROBE_TIMEOUT_S if timeout is None else timeout
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
  two copies of a dataset never share an entry. It is written to a temporary file and
  renamed, with a header (`_CACHE_META`: number of examples, and each array's shape,
  dtype and CRC-32) that is checked when it is read: one that is damaged, cut short or
  of another shape is decoded again and replaced, with a warning. A cache directory
  that cannot be read or written (read-only, no permission, full) is not fatal: the
  split is decoded in memory and one warning names the directory and the fix.
  """
  source = tfds_source(name, split, data_dir, download)
  version = str(source.dataset_info.version)
  root = pathlib.Path(cache_dir or os.environ.get(_CACHE_ENV) or "~/.cache/mmjax").expanduser()
  path = (root / "decoded" / name / version / _fingerprint(source.dataset_info.data_dir)
          / f"{split}.npz")
  try:
    found = path.is_file()
  except OSError as e:  # A directory on the way that cannot be searched.
    found = False
    _cache_warning(root, e)
    root = None
  if found:
    try:
      return ArraySource(_read_cache(path, len(source)), source.dataset_info)
    except OSError as e:
      _cache_warning(root, e)
      root = None
    except _DamagedCache as e:
      logging.warning("The decoded cache %s is damaged (%s): decoding %s/%s again.",
                      path, e, name, split)
  logging.info("Decoding %s/%s (%d examples) into %s", name, split, len(source), path)
  examples = _read(source, np.arange(len(source)))
  arrays = {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
  if root is not None:  # None: unusable, said once.
    try:
      _write_cache(path, arrays)
    except OSError as e:  # EROFS, EACCES, ENOSPC, ...: the cache is only a speed-up.
      _cache_warning(root, e)
  return ArraySource(arrays, source.dataset_info)


# The .npz entry holding the cache's header: JSON {"examples": n, "arrays": {key:
# {"shape", "dtype", "crc32"}}} as uint8.
_CACHE_META = "__mmjax_cache__"


class _DamagedCache(Exception):
  pass


def _cache_warning(root: pathlib.Path, e: OSError) -> None:
  logging.warning("Not using the decoded cache in %s (%s: %s): decoding in memory, which "
                  "costs time in every run. Make it writable, or set $%s to a writable "
                  "directory.", root, type(e).__name__, e.strerror or e, _CACHE_ENV)


def _crc32(array: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1))


def _write_cache(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes `arrays` and their header to `path`: a temporary file, then a rename."""
  meta = {"examples": len(next(iter(arrays.values()))),
          "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str, "crc32": _crc32(v)}
                     for k, v in arrays.items()}}
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
  try:
    np.savez(tmp, **arrays, **{_CACHE_META: np.frombuffer(json.dumps(meta).encode(), np.uint8)})
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)  # Gone after the rename; else half written.


def _read_cache(path: pathlib.Path, examples: int) -> dict[str, np.ndarray]:
  """The arrays of a cache file, checked against its header and the split's length.

  Raises:
    _DamagedCache: the file is not a complete cache of `examples` examples as written.
    OSError: it cannot be read (permissions).
  """
  import zipfile  # pylint: disable=import-outside-toplevel
  try:
    with np.load(path, allow_pickle=False) as f:
      if _CACHE_META not in f.files:
        raise _DamagedCache("no header")
      meta = json.loads(f[_CACHE_META].tobytes().decode())
      want = meta["arrays"]
      if meta["examples"] != examples:
        raise _DamagedCache(f"{meta['examples']} examples, the split has {examples}")
      if set(want) != set(f.files) - {_CACHE_META}:
        raise _DamagedCache(f"arrays {sorted(set(f.files) - {_CACHE_META})}, header "
                            f"{sorted(want)}")
      arrays = {k: f[k] for k in want}
  except (zipfile.BadZipFile, EOFError, ValueError, KeyError, TypeError) as e:
    raise _DamagedCache(f"{type(e).__name__}: {_short(e, 200)}") from None
  for k, v in arrays.items():
    w = want[k]
    if list(v.shape) != w["shape"] or v.dtype.str != w["dtype"] or v.shape[:1] != (examples,):
      raise _DamagedCache(f"{k!r} is {v.dtype.str}{list(v.shape)}, written as "
                          f"{w['dtype']}{w['shape']}")
    if _crc32(v) != w["crc32"]:
      raise _DamagedCache(f"{k!r} fails its CRC-32")
  return arrays


def _read(source, indices: np.ndarray) -> list[dict]:
  """`source.__getitems__(indices)`, with a damaged or missing record file a one-line
  DamagedDatasetError (ArrayRecord raises RuntimeError) naming the dataset."""
  try:
    return source.__getitems__(indices.tolist())
  except RuntimeError as e:
    info = getattr(source, "dataset_info", None)
    where = f"dataset {info.name!r} in {info.data_dir}" if info is not None else "a dataset"
    raise DamagedDatasetError(f"Reading {where} failed: {_short(e)}. "
                              f"{_HOW_TO_RESTORE}") from e


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
  examples = _read(source, indices)
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}
