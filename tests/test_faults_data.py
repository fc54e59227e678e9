"""Issue 29 (reliability, round two), data side: the decoded cache, prepared datasets'
files and the feature classes their metadata names. Each fault injected on a copy of
the prepared MNIST test split (the shared one is read-only), its outcome asserted: one
line where refused, a rebuild where mmjax can redo it, no silent change.
"""
import errno
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mmjax.data import sources

SPLIT = "test[:64]"  # Decoded in a fraction of a second.


def _one_line(e: BaseException, *needles: str) -> str:
  """The message, asserted to be one line holding every needle."""
  message = str(e)
  assert "\n" not in message, message
  for needle in needles:
    assert needle in message, (needle, message)
  return message


def _mnist_dir() -> pathlib.Path:
  raw = sources.tfds_source("mnist", "test", download=False)
  return pathlib.Path(raw.dataset_info.data_dir)


def _copy_mnist(tmp_path) -> pathlib.Path:
  """The prepared MNIST metadata and test split copied: <tmp>/tfds/mnist/<version>/."""
  src = _mnist_dir()
  dst = tmp_path / "tfds" / "mnist" / src.name
  dst.mkdir(parents=True)
  for name in ("dataset_info.json", "features.json",
               "mnist-test.array_record-00000-of-00001"):
    shutil.copy(src / name, dst / name)
    os.chmod(dst / name, 0o644)
  return dst


@pytest.fixture
def digits(tmp_path) -> pathlib.Path:
  """A dataset laid out as mmjax.data.make_dataset writes it (not a TFDS catalogue
  name, so TFDS builds it from its features.json, with mmjax's manifest), made from
  the MNIST test split without TensorFlow. Returns its version directory."""
  src = _mnist_dir()
  version = tmp_path / "tfds" / "digits" / src.name
  version.mkdir(parents=True)
  shutil.copy(src / "features.json", version)
  shutil.copy(src / "mnist-test.array_record-00000-of-00001",
              version / "digits-test.array_record-00000-of-00001")
  info = json.loads((src / "dataset_info.json").read_text())
  info.update(name="digits",
              moduleName="tensorflow_datasets.core.dataset_builders.adhoc_builder",
              splits=[s for s in info["splits"] if s["name"] == "test"])
  (version / "dataset_info.json").write_text(json.dumps(info, indent=2))
  for path in version.iterdir():
    os.chmod(path, 0o644)
  sources.write_manifest(str(version))
  return version


def _data_dir(version: pathlib.Path) -> str:
  return str(version.parent.parent)


# ---------------------------------------------------------------------------------------
# Item 12: only TFDS's own feature classes.


def test_catalogue_and_converted_datasets_load_with_tfds_feature_classes(digits, tmp_path):
  sources.check_prepared(str(_mnist_dir().parent.parent), "mnist")
  source = sources.tfds_source("digits", "test", data_dir=_data_dir(digits), download=False)
  mnist = sources.tfds_source("mnist", "test", download=False)
  np.testing.assert_array_equal(sources.gather(source, np.arange(5))["image"],
                                sources.gather(mnist, np.arange(5))["image"])
  assert json.loads((digits / sources.MANIFEST).read_text())["files"][
      "digits-test.array_record-00000-of-00001"]["size"] > 0


def _evil_module(tmp_path, monkeypatch) -> pathlib.Path:
  """An importable module `mmjax_evil_feature` that leaves a file when imported."""
  marker = tmp_path / "imported"
  (tmp_path / "mods").mkdir()
  (tmp_path / "mods" / "mmjax_evil_feature.py").write_text(
      f"open({str(marker)!r}, 'w').write('ran')\n")
  monkeypatch.syspath_prepend(str(tmp_path / "mods"))
  return marker


@pytest.mark.parametrize("where", ["features.json", "dataset_info.json", "legacy"])
def test_a_foreign_feature_class_is_refused_before_tfds_imports_it(digits, tmp_path,
                                                                    monkeypatch, where):
  marker = _evil_module(tmp_path, monkeypatch)
  name = "mmjax_evil_feature.Feature"
  if where == "features.json":
    features = json.loads((digits / "features.json").read_text())
    features["featuresDict"]["features"]["label"]["pythonClassName"] = name
    (digits / "features.json").write_text(json.dumps(features))
  elif where == "legacy":  # TFDS's older form: {"type": class, "content": ...}.
    (digits / "features.json").write_text(json.dumps({"type": name, "content": {}}))
  else:
    info = json.loads((digits / "dataset_info.json").read_text())
    info["features"] = {"pythonClassName": name}
    (digits / "dataset_info.json").write_text(json.dumps(info))
  sources.write_manifest(str(digits))  # Consistent files: only the class name is wrong.
  with pytest.raises(sources.DamagedDatasetError) as e:
    sources.tfds_source("digits", "test", data_dir=_data_dir(digits), download=False)
  _one_line(e.value, name, "tensorflow_datasets.core.features")
  assert not marker.exists() and "mmjax_evil_feature" not in sys.modules
  # The check is what stops it: TFDS alone imports the module.
  monkeypatch.setattr(sources, "check_prepared", lambda *args: None)
  with pytest.raises(Exception):
    sources.tfds_source("digits", "test", data_dir=_data_dir(digits), download=False)
  assert marker.exists()
  sys.modules.pop("mmjax_evil_feature", None)


def test_a_catalogue_dataset_naming_a_foreign_class_is_refused(tmp_path, monkeypatch):
  version = _copy_mnist(tmp_path)
  marker = _evil_module(tmp_path, monkeypatch)
  (version / "features.json").write_text(json.dumps(
      {"pythonClassName": "mmjax_evil_feature.Feature", "featuresDict": {}}))
  with pytest.raises(sources.DamagedDatasetError) as e:
    sources.decoded_source("mnist", SPLIT, data_dir=str(tmp_path / "tfds"),
                           cache_dir=str(tmp_path / "cache"))
  _one_line(e.value, str(version / "features.json"), "mmjax_evil_feature.Feature")
  assert not marker.exists() and not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------------------
# Items 6 and 7: prepared datasets' files.


def test_a_deleted_split_file_is_one_line_naming_it(tmp_path):
  version = _copy_mnist(tmp_path)
  record = version / "mnist-test.array_record-00000-of-00001"
  record.unlink()
  for read in (lambda: sources.tfds_source("mnist", "test", data_dir=str(tmp_path / "tfds"),
                                           download=False),
               lambda: sources.decoded_source("mnist", SPLIT, data_dir=str(tmp_path / "tfds"),
                                              cache_dir=str(tmp_path / "cache"))):
    with pytest.raises(sources.DatasetNotFoundError) as e:
      read()
    _one_line(e.value, str(record), "is missing", "prepare it again")
  assert isinstance(e.value, FileNotFoundError)  # launch.py prints it as `error: <line>`.
  assert not (tmp_path / "cache").exists()


@pytest.mark.slow  # A launch.py process (tens of seconds); the same error in-process above.
def test_a_deleted_split_file_through_launch_is_one_line(tmp_path):
  """The copy holds the test split only: the train split's file is the one missing."""
  import launch_helpers as lh  # pylint: disable=import-outside-toplevel
  version = _copy_mnist(tmp_path)
  proc = lh.run("experiments/clip_mnist.py:smoke", tmp_path / "w",
                f"dataset.data_dir={tmp_path / 'tfds'}", check=False, timeout=180,
                env={"MMJAX_CACHE_DIR": str(tmp_path / "cache")})
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("error: Dataset 'mnist': the file ") and "Traceback" not in proc.stderr
  assert str(version / "mnist-train.array_record-00000-of-00001") in last
  assert not lh.checkpoint_steps(tmp_path / "w") and not (tmp_path / "cache").exists()


def _flip(path: pathlib.Path, at: int, n: int = 16):
  data = bytearray(path.read_bytes())
  for i in range(at, at + n):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_record_file_is_one_line_when_read(tmp_path, damage):
  """A catalogue dataset has no manifest: ArrayRecord's chunk hashes find the damage."""
  version = _copy_mnist(tmp_path)
  record = version / "mnist-test.array_record-00000-of-00001"
  if damage == "truncated":
    record.write_bytes(record.read_bytes()[:record.stat().st_size // 2])
  else:
    _flip(record, record.stat().st_size // 2)
  source = sources.tfds_source("mnist", "test", data_dir=str(tmp_path / "tfds"),
                               download=False)
  with pytest.raises(sources.DamagedDatasetError) as e:
    sources.gather(source, np.arange(len(source)))
  _one_line(e.value, "'mnist'", str(version), "prepare it again")
  with pytest.raises(sources.DamagedDatasetError):
    sources.decoded_source("mnist", "test", data_dir=str(tmp_path / "tfds"),
                           cache_dir=str(tmp_path / "cache"))
  assert not list((tmp_path).rglob("*.npz"))  # Nothing cached from a damaged split.


@pytest.mark.parametrize("damage", ["truncated record", "edited metadata", "deleted file",
                                    "manifest not JSON"])
def test_a_converted_dataset_that_differs_from_its_manifest_is_refused(digits, damage):
  record = digits / "digits-test.array_record-00000-of-00001"
  if damage == "truncated record":
    record.write_bytes(record.read_bytes()[:-4096])
    needles, error = (str(record), "bytes"), sources.DamagedDatasetError
  elif damage == "edited metadata":  # Same size, one character changed.
    info = digits / "dataset_info.json"
    info.write_text(info.read_text().replace('"10000"', '"10001"'))
    needles, error = (str(info), "SHA-256"), sources.DamagedDatasetError
  elif damage == "deleted file":
    (digits / "features.json").unlink()
    needles, error = (str(digits / "features.json"), "missing"), sources.DatasetNotFoundError
  else:
    (digits / sources.MANIFEST).write_bytes(b'{"files": {"x\xff')
    needles, error = (str(digits / sources.MANIFEST), "JSON"), sources.DamagedDatasetError
  with pytest.raises(error) as e:
    sources.tfds_source("digits", "test", data_dir=_data_dir(digits), download=False)
  _one_line(e.value, *needles)


# ---------------------------------------------------------------------------------------
# Items 6 and 7: the decoded cache.


def _cache_file(cache: pathlib.Path) -> pathlib.Path:
  (path,) = cache.rglob("*.npz")
  return path


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
          and r.name != "absl"]


def _rewrite(path: pathlib.Path, change):
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  change(arrays)
  np.savez(path, **arrays)


def _header(arrays, **changes):
  meta = json.loads(arrays["__mmjax_cache__"].tobytes())
  meta.update(changes)
  arrays["__mmjax_cache__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)


DAMAGES = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:p.stat().st_size // 2]),
    "flipped bytes": lambda p: _flip(p, p.stat().st_size // 2, 4),
    "zeroed": lambda p: p.write_bytes(bytes(p.stat().st_size)),
    "wrong shape": lambda p: _rewrite(
        p, lambda a: a.update(image=np.ascontiguousarray(a["image"][:, :27]))),
    "other examples": lambda p: _rewrite(
        p, lambda a: (a.update(image=a["image"][:32], label=a["label"][:32]),
                      _header(a, examples=32))),
    "no header": lambda p: _rewrite(p, lambda a: a.pop("__mmjax_cache__")),
    "same shapes, other values": lambda p: _rewrite(
        p, lambda a: a.update(label=(a["label"] + 1) % 10)),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_decoded_cache_is_rebuilt(tmp_path, caplog, damage):
  cache = tmp_path / "cache"
  first = sources.decoded_source("mnist", SPLIT, cache_dir=str(cache))
  path = _cache_file(cache)
  DAMAGES[damage](path)
  caplog.set_level(logging.WARNING)
  again = sources.decoded_source("mnist", SPLIT, cache_dir=str(cache))
  (warning,) = _warnings(caplog)
  assert str(path) in warning and "damaged" in warning and "\n" not in warning
  for key in first.arrays:
    np.testing.assert_array_equal(again.arrays[key], first.arrays[key])
  # Rebuilt in place: the next run reads it without a word.
  caplog.clear()
  third = sources.decoded_source("mnist", SPLIT, cache_dir=str(cache))
  assert not _warnings(caplog) and _cache_file(cache) == path
  np.testing.assert_array_equal(third.arrays["label"], first.arrays["label"])
  assert not [p for p in cache.rglob("*") if ".tmp" in p.name]


def _refuse(error_number):
  def refuse(*args, **kwargs):
    raise OSError(error_number, os.strerror(error_number), args[0] if args else None)
  return refuse


@pytest.mark.parametrize("fault", ["read-only file system", "no permission", "not a directory",
                                   "unreadable file"])
def test_an_unusable_cache_directory_decodes_in_memory_with_one_warning(
    tmp_path, caplog, monkeypatch, fault):
  """Root ignores permission bits, so EROFS and EACCES are raised where the cache is
  written or read; a cache path below a regular file is a real ENOTDIR."""
  cache = tmp_path / "cache"
  want = sources.decoded_source("mnist", SPLIT, cache_dir=str(tmp_path / "good"))
  if fault == "read-only file system":
    monkeypatch.setattr(pathlib.Path, "mkdir", _refuse(errno.EROFS))
  elif fault == "no permission":
    monkeypatch.setattr(np, "savez", _refuse(errno.EACCES))
  elif fault == "not a directory":
    cache.write_text("a file, not a directory")
  else:  # The file is there and cannot be read.
    cache = tmp_path / "good"
    monkeypatch.setattr(np, "load", _refuse(errno.EACCES))
  before = sorted(p for p in tmp_path.rglob("*") if p.is_file())
  monkeypatch.setenv("MMJAX_CACHE_DIR", str(cache))
  caplog.set_level(logging.WARNING)
  got = sources.decoded_source("mnist", SPLIT)
  (warning,) = _warnings(caplog)
  _one_line(warning, str(cache), "MMJAX_CACHE_DIR", "writable")
  for key in want.arrays:
    np.testing.assert_array_equal(got.arrays[key], want.arrays[key])
  assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == before  # Nothing left.


@pytest.mark.slow
def test_the_converter_writes_a_manifest_that_guards_its_output(tmp_path):
  """The real converter (TensorFlow: slow): its output loads, and a damaged copy is
  refused in one line."""
  repo = pathlib.Path(__file__).resolve().parents[1]
  subprocess.run([sys.executable, str(repo / "tools" / "make_shapes.py"),
                  f"--output={tmp_path / 'folder'}", "--num=8", "--size=16"], check=True,
                 capture_output=True)
  from mmjax.data import make_dataset  # pylint: disable=import-outside-toplevel
  make_dataset.convert(str(tmp_path / "folder"), str(tmp_path / "tfds"), "tiny",
                       val_fraction=0.3, image_size=8)
  version = tmp_path / "tfds" / "tiny" / make_dataset.VERSION
  files = json.loads((version / sources.MANIFEST).read_text())["files"]
  assert set(files) == {p.name for p in version.iterdir()} - {sources.MANIFEST}
  source = sources.decoded_source("tiny", "train", data_dir=str(tmp_path / "tfds"),
                                  cache_dir=str(tmp_path / "cache"))
  assert source.arrays["image"].shape[1:] == (8, 8, 3)
  record = next(version.glob("tiny-train.array_record-*"))
  record.write_bytes(record.read_bytes()[:-1])
  with pytest.raises(sources.DamagedDatasetError) as e:
    sources.decoded_source("tiny", "train", data_dir=str(tmp_path / "tfds"),
                           cache_dir=str(tmp_path / "cache"))
  _one_line(e.value, str(record))


# ---------------------------------------------------------------------------------------
# Item 7: weights files mmjax exports (and reads back through --config.init_from).

VAE = pathlib.Path(__file__).parent / "fixtures" / "vae"


@pytest.fixture(scope="module")
def vae():
  from mmjax.interop import diffusers  # pylint: disable=import-outside-toplevel
  groups = json.loads((VAE / "manifest.json").read_text())["model"]["norm_num_groups"]
  return diffusers.load_vae(VAE / "kl_small.safetensors", groups=groups)


def _resave(path: pathlib.Path, change):
  """The file's tensors changed by `change`, saved again with the same metadata."""
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(path), framework="np") as f:
    metadata = f.metadata()
  state = st_numpy.load_file(path)
  change(state)
  st_numpy.save_file(state, str(path), metadata=metadata)


EXPORT_DAMAGES = {
    "flipped bytes": lambda p: _flip(p, p.stat().st_size - 64, 4),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-100]),
    "one value changed": lambda p: _resave(
        p, lambda s: s[sorted(s)[0]].reshape(-1).__setitem__(0, 0.5)),
    "tensor dropped": lambda p: _resave(p, lambda s: s.pop(sorted(s)[-1])),
}


@pytest.mark.parametrize("damage", list(EXPORT_DAMAGES))
def test_a_damaged_export_is_refused_in_one_line(vae, tmp_path, damage):
  from mmjax.interop import common  # pylint: disable=import-outside-toplevel
  from mmjax.interop import diffusers  # pylint: disable=import-outside-toplevel
  model, params = vae
  path = tmp_path / "vae.safetensors"
  diffusers.export_vae(params, model, path)
  EXPORT_DAMAGES[damage](path)
  with pytest.raises(common.CheckpointError) as e:
    diffusers.load_vae(path)
  # Values changed in place are found by the checksum alone (the shapes still fit).
  _one_line(e.value, str(path), *(["SHA-256"] if damage in ("flipped bytes", "one value changed")
                                  else []))


def test_an_interrupted_export_leaves_the_previous_file(vae, tmp_path, monkeypatch):
  from safetensors import numpy as st_numpy  # pylint: disable=import-outside-toplevel
  from mmjax.interop import diffusers  # pylint: disable=import-outside-toplevel
  model, params = vae
  path = tmp_path / "vae.safetensors"
  diffusers.export_vae(params, model, path)
  before = path.read_bytes()

  def torn(state, filename, metadata=None):
    pathlib.Path(filename).write_bytes(b"\x00" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(st_numpy, "save_file", torn)
  with pytest.raises(OSError):
    diffusers.export_vae(params, model, path)
  assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
  monkeypatch.undo()
  _, again = diffusers.load_vae(path)  # Its checksum holds.
  assert jax_equal(again, params)


def jax_equal(a, b) -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
