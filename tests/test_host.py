"""mmjax.train.host: freed step memory is reused, not page-faulted in again every step."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tests.launch_helpers import REPO

# A jitted step whose temporary (a 64 MB cumulative sum) is above glibc's largest mmap
# threshold: with glibc's defaults it is mapped and zero-filled on every call.
SCRIPT = textwrap.dedent("""
    import resource
    from mmjax.train import host
    applied = host.reuse_freed_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.cumsum(x * 2.0)[::2]))
    x = jnp.ones((1 << 24,), jnp.float32)
    f(x).block_until_ready()
    faults = []
    for _ in range(9):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, min(faults))
""")


def _faults_per_call(mode: str) -> tuple[str, float]:
  """(whether applied, the fewest page faults of 9 calls after the first): with glibc's
  defaults every call faults; with reuse the heap settles after a few calls (until
  then a call may still map more) and calls take none."""
  # Optimised as a run's step is (conftest turns most optimisations off for the tests).
  env = dict(os.environ, MMJAX_HOST_MALLOC=mode, XLA_FLAGS="", JAX_DISABLE_MOST_OPTIMIZATIONS="0")
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO, check=True,
                       capture_output=True, text=True).stdout.split()
  return out[-2], float(out[-1])


@pytest.mark.slow  # Two subprocesses, each with a 64 MB step.
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reused_memory_takes_no_page_faults_per_step():
  applied, default = _faults_per_call("default")
  assert applied == "False" and default > 10_000  # 64 MB of 4 KiB pages, mapped afresh.
  applied, reused = _faults_per_call("reuse")
  assert applied == "True" and reused < 0.01 * default


def test_split_cpu_makes_that_many_cpu_devices():
  script = ("from mmjax.train import host; host.split_cpu(3); import jax; "
            "print(jax.device_count(), jax.default_backend())")
  out = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, XLA_FLAGS=""),
                       cwd=REPO, check=True, capture_output=True, text=True).stdout.split()
  assert out[-2:] == ["3", "cpu"]


def test_split_cpu_refuses_a_bad_or_conflicting_count(monkeypatch):
  from mmjax.train import host  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="--cpu_devices must be >= 1"):
    host.split_cpu(0)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  with pytest.raises(ValueError, match="XLA_FLAGS already sets"):
    host.split_cpu(2)
  host.split_cpu(8)  # The same count: nothing to change.
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
  host.split_cpu(2)
  assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"
