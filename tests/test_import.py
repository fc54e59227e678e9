"""Importing mmjax has no side effects: no device touched, no flag parsed, no file read."""
import subprocess
import sys

import launch_helpers as lh

CHECK = """
import pkgutil, importlib, sys
import mmjax
modules = [m.name for m in pkgutil.walk_packages(mmjax.__path__, "mmjax.")]
library = [m for m in modules if not m.startswith(("mmjax.train", "mmjax.tasks"))]
for name in library:
  importlib.import_module(name)
assert "tensorflow" not in sys.modules, "TensorFlow was imported by the library"
for name in modules:
  importlib.import_module(name)
# Nor by the harness: TensorBoard events are written without it (mmjax.train.metrics).
assert "tensorflow" not in sys.modules, "TensorFlow was imported by the harness"
from jax._src import xla_bridge
assert not xla_bridge._backends, "a JAX backend was initialised at import"
from absl import flags
assert not flags.FLAGS.is_parsed(), "absl flags were parsed at import"
print("ok")
"""


def test_importing_every_module_has_no_side_effects(tmp_path):
  proc = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True,
                        text=True, env=lh.env_with_devices(1), timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-4000:]
