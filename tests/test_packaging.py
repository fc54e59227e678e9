"""The package as pip installs it: a base install that is the library alone, extras for the
harness, the files a wheel must carry, and one-line messages where an extra is missing."""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import numpy as np
import pytest

import mmjax
from mmjax.data import bpe
from mmjax.data import make_dataset
from mmjax.data import sources

import launch_helpers as lh

PYPROJECT = tomllib.loads((lh.REPO / "pyproject.toml").read_text())
HARNESS = ("tensorflow", "tensorflow_datasets", "grain", "orbax", "clu", "ml_collections",
           "PIL", "tensorboardX", "tensorboard", "array_record", "filelock")
HARNESS_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu", "tensorflow-datasets", "grain", "clu",
                         "ml-collections", "tensorboardx", "tensorboard", "array-record")
# The library: what the base install is for.
LIBRARY = ("mmjax.nn", "mmjax.losses", "mmjax.models", "mmjax.models.clip", "mmjax.diffusion",
           "mmjax.interop.open_clip", "mmjax.interop.diffusers", "mmjax.data.bpe",
           "mmjax.data.tokenizer", "mmjax.data.captions", "mmjax.evals.retrieval",
           "mmjax.evals.generative")


def _name(requirement: str) -> str:
  return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0] \
      .strip().lower().replace("_", "-")


def test_the_base_install_asks_for_no_harness_package():
  base = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
  assert not base & (set(HARNESS_DISTRIBUTIONS) | {"orbax-checkpoint"}), base
  assert {"jax", "flax", "optax", "numpy", "safetensors"} <= base


def test_the_library_imports_without_the_harness_packages(tmp_path):
  """As if no extra were installed: importing any of them fails."""
  code = (f"import sys\nfor m in {HARNESS!r}: sys.modules[m] = None\n"
          f"import importlib\nfor m in {LIBRARY!r}: importlib.import_module(m)\nprint('ok')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=180)
  assert proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_version_is_in_one_place():
  assert "version" not in PYPROJECT["project"]
  assert PYPROJECT["project"]["dynamic"] == ["version"]
  assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mmjax.__version__"}
  assert mmjax.__version__.count(".") == 2


def test_clip_tokenizer_needs_no_path():
  """The shipped vocabulary is CLIP's, byte for byte, and gives the ids the fixture does."""
  fixture = lh.REPO / "tests" / "fixtures" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
  assert pathlib.Path(bpe.DEFAULT_VOCAB).read_bytes() == fixture.read_bytes()
  texts = ["a photo of a cat", "Ünïcödé, punctuation!! and   spaces", ""]
  np.testing.assert_array_equal(bpe.ClipTokenizer().encode(texts),
                                bpe.ClipTokenizer(fixture).encode(texts))
  assert bpe.ClipTokenizer().encode(["a photo of a cat"])[0, :7].tolist() == [
      49406, 320, 1125, 539, 320, 2368, 49407]


def _without_tensorflow(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "tensorflow" else find_spec(name, *a))


def test_preparing_a_dataset_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
  _without_tensorflow(monkeypatch)
  with pytest.raises(sources.DatasetNotFoundError) as e:
    sources.tfds_source("mnist", "test", data_dir=str(tmp_path))
  assert "pip install 'mmjax[prepare]'" in str(e.value) and "\n" not in str(e.value)
  assert not list(tmp_path.iterdir())
  with pytest.raises(ModuleNotFoundError, match=r"pip install 'mmjax\[prepare\]'"):
    make_dataset.convert(str(tmp_path), str(tmp_path / "out"), "pairs")


# --- The wheel, installed without extras in a fresh virtual environment (slow: it installs
# jax, flax and optax from the package index).

REUSE = '''
import sys
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import mmjax.nn as mnn
from mmjax import losses


class TwoTowers(nn.Module):
  """A user's own model: conv + pool towers for images, attention for tokens."""

  @nn.compact
  def __call__(self, images, tokens):
    x = nn.relu(mnn.Conv2D(8, 3, padding="SAME")(images))
    x = mnn.max_pool(x, 2)
    x = mnn.avg_pool(x, 2).reshape(x.shape[0], -1)
    t = nn.Embed(50, 16)(tokens)
    t = t + mnn.MultiHeadAttention(num_heads=2)(t)
    return nn.Dense(16)(x), nn.Dense(16)(t.mean(axis=1))


model = TwoTowers()
k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
images = jax.random.normal(k1, (8, 16, 16, 3))
tokens = jax.random.randint(k2, (8, 5), 0, 50)
params = model.init(k3, images, tokens)
opt = optax.adam(1e-2)
state = opt.init(params)


@jax.jit
def step(params, state):
  def loss_fn(p):
    img, txt = model.apply(p, images, tokens)
    return losses.info_nce(img, txt, 0.1)
  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, state = opt.update(grads, state, params)
  return optax.apply_updates(params, updates), state, loss


first = None
for _ in range(20):
  params, state, loss = step(params, state)
  first = loss if first is None else first
assert jnp.isfinite(loss) and loss < first, (first, loss)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in
               ("tensorflow", "tensorflow_datasets", "grain", "orbax", "clu"))
assert not heavy, heavy
print("reuse ok", float(first), float(loss))
'''


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """A wheel built from a copy of the sources (the build writes beside them)."""
  src = tmp_path_factory.mktemp("src")
  for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE", "mmjax", "experiments"):
    copy = shutil.copytree if (lh.REPO / name).is_dir() else shutil.copy
    copy(lh.REPO / name, src / name)
  for cache in src.rglob("__pycache__"):
    shutil.rmtree(cache)
  out = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                  str(src)], check=True, capture_output=True, timeout=600)
  (path,) = out.glob("mmjax-*.whl")
  return path


@pytest.mark.slow
def test_the_wheel_carries_licences_types_and_the_vocabulary(wheel):
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    metadata = z.read(f"mmjax-{mmjax.__version__}.dist-info/METADATA").decode()
    entry_points = z.read(f"mmjax-{mmjax.__version__}.dist-info/entry_points.txt").decode()
  assert {"mmjax/py.typed", "mmjax/data/assets/bpe_simple_vocab_16e6.txt.gz",
          "mmjax/data/assets/LICENSE-bpe_simple_vocab_16e6.txt",
          f"mmjax-{mmjax.__version__}.dist-info/licenses/LICENSE"} <= names
  assert "License-Expression: Apache-2.0" in metadata
  assert f"Version: {mmjax.__version__}" in metadata
  assert "Project-URL: Source, https://github.com/mmjax/mmjax" in metadata
  assert not any(n.startswith(("tests/", "experiments/", "tools/")) for n in names)
  # The harness and its configs: python -m mmjax.launch --config=mnist_lenet, mmjax-launch.
  assert {"mmjax/launch.py", "mmjax/experiments/__init__.py",
          "mmjax/experiments/mnist_lenet.py"} <= names
  assert "mmjax-launch = mmjax.launch:run" in entry_points


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
  """A fresh virtual environment with the wheel installed without extras: (python, the
  distributions pip listed right after). A later test adds the [train] extra."""
  root = tmp_path_factory.mktemp("venv")
  subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
  python = root / "venv" / "bin" / "python"
  proc = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)],
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"],
                          capture_output=True, text=True, check=True).stdout
  return python, {_name(line) for line in listed.splitlines()}


def _outside_the_checkout() -> dict[str, str]:
  return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}


@pytest.mark.slow
def test_a_base_install_runs_a_users_model_without_the_harness(venv, tmp_path):
  python, installed = venv
  assert not installed & set(HARNESS_DISTRIBUTIONS), installed & set(HARNESS_DISTRIBUTIONS)
  env = _outside_the_checkout()
  proc = subprocess.run([str(python), "-c", REUSE], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600, env=env)
  assert proc.returncode == 0 and "reuse ok" in proc.stdout, proc.stderr[-3000:]
  proc = subprocess.run([str(python), "-c", "from mmjax.data import bpe; "
                         "print(bpe.ClipTokenizer().encode(['a cat'])[0, :4].tolist())"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
  assert proc.stdout.strip() == "[49406, 320, 2368, 49407]", proc.stderr[-3000:]


@pytest.mark.slow
def test_the_train_extra_runs_the_lenet_smoke_with_python_m_mmjax_launch(venv, wheel, tmp_path):
  """The same venv with `[train]` added: the packaged config, by module name."""
  python, _ = venv
  proc = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{wheel}[train]"],
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  env = _outside_the_checkout()
  assert "TFDS_DATA_DIR" in env, "needs a prepared TFDS directory (tests/conftest.py)"
  proc = subprocess.run([str(python), "-m", "mmjax.launch", "--config=mnist_lenet:smoke",
                         f"--workdir={tmp_path / 'w'}"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 20/20  loss " in proc.stderr and "eval 20  accuracy " in proc.stderr
  assert lh.checkpoint_steps(tmp_path / "w") == [10, 20]
  script = python.parent / "mmjax-launch"
  proc = subprocess.run([str(script), "--config=mmjax.experiments.mnist_lenet",
                         "--print_config"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=120, env=env)
  assert proc.returncode == 0 and "num_train_steps: 4690" in proc.stdout, proc.stderr[-3000:]
