"""Test set-up: 8 fake CPU devices, the offline TFDS data and a shared compilation cache.

Everything here is set before JAX initialises. Subprocesses started by the tests
(launch.py runs) inherit the environment, so they share the compilation cache.
"""
import atexit
import os
import pathlib
import shutil
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = REPO.parent / "shared" / "data" / "tensorflow_datasets"

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if SHARED_TFDS.is_dir():
  os.environ.setdefault("TFDS_DATA_DIR", str(SHARED_TFDS))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="mmjax-test-jax-cache-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# Test files whose runs take longest start first, so that with `pytest -n 2 --dist
# loadfile` (the README's command) no long file is left running alone at the end.
SLOW_FILES = ("test_launch.py", "test_ldm.py", "test_packaging.py", "test_sd_finetune.py",
              "test_sd_pipeline.py", "test_vqa_tasks.py", "test_clip_task.py", "test_lora.py",
              "test_lit.py", "test_nnx_bridge.py", "test_cli.py", "test_precision.py",
              "test_own_data.py", "test_vlm.py", "test_sharding.py", "test_pretrained_clip.py",
              "test_faults.py", "test_hf_clip_task.py", "test_clip_lora.py",
              "test_encoder_decoder.py", "test_grid_init_from.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))


# Every test compiles fast: the tests' programs are small and their runs short (the
# end-to-end runs are 20-step smoke runs), so compiling is most of their time.
# - jax_disable_most_optimizations (set here, so launch.py subprocesses inherit it):
#   about 40% less compile time; float32-tolerance comparisons do not depend on it.
# - XLA's CPU code generation for fusions: the newer MLIR "fusion emitters" (XLA's
#   default) take about 5x as long to compile these programs as the loop emitters they
#   replace, and the programs run as fast either way. Turned off for this process's
#   compilations and, through XLA_FLAGS, for its subprocesses', once this XLA is known
#   to accept the option (see _use_loop_emitters).
# The experiments' real runs (docs/results.md) compile as a researcher's run does.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
LOOP_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters=false"
_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def _use_loop_emitters():
  """Adds _COMPILE_OPTIONS to every compilation of this process (a jit's own
  compiler_options win; they are part of the persistent cache's key) and
  LOOP_EMITTERS_FLAG to the XLA_FLAGS subprocesses inherit. Left alone if JAX or XLA
  no longer have these hooks or this option."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import compiler  # pylint: disable=import-outside-toplevel
  original = getattr(compiler, "get_compile_options", None)
  if original is None:
    return

  def get_compile_options(*args, env_options_overrides=None, **kwargs):
    env_options_overrides = {**_COMPILE_OPTIONS, **(env_options_overrides or {})}
    return original(*args, env_options_overrides=env_options_overrides, **kwargs)

  compiler.get_compile_options = get_compile_options
  try:  # An XLA without the option refuses it: then compile as before.
    jax.jit(lambda x: x + 1).lower(1.0).compile(_COMPILE_OPTIONS)
  except Exception:  # pylint: disable=broad-except
    compiler.get_compile_options = original
    return
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {LOOP_EMITTERS_FLAG}".strip()


@pytest.fixture(scope="session", autouse=True)
def fast_compilation():
  _use_loop_emitters()
  yield
