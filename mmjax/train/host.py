"""The host: memory that XLA frees is kept for reuse; the CPU split into devices.

XLA's CPU runtime allocates each step's temporaries as one block (344 MB for the CLIP
MNIST step at batch 256) and frees it at the end of the step. With glibc's defaults a
block that large is mmap'd and unmapped every step, and the kernel zero-fills it page by
page on first touch: 84,000 page faults and a third of the step's time on one core
(benchmarks/README.md). `reuse_freed_memory` makes glibc keep freed memory in its heap
and hand it out again; the process then holds its peak host memory until it exits, as a
training process does anyway.

launch.py (unless config.reuse_host_memory is False) and the step benchmarks call it
first thing, before JAX starts its threads
(glibc gives each thread its arena on its first allocation; a thread's own arena maps
large blocks whatever the settings). A library importing mmjax is unaffected unless it
calls it. MMJAX_HOST_MALLOC=default skips it.

`split_cpu(n)` (launch.py --cpu_devices=N) makes XLA's CPU backend present N devices, so
that the trainer runs data-parallel over them: on a CPU-only machine, one device per
core keeps both cores busy where one device's program is a chain of small operations
that XLA runs one after another (the latent-diffusion U-Net: benchmarks/README.md).
"""
import ctypes
import os
import platform
import re

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
  """One malloc arena, no mmap for large blocks, no returning freed memory to the OS.

  Returns True where applied (glibc, MMJAX_HOST_MALLOC not "default"), False elsewhere
  (macOS, musl), where it changes nothing.
  """
  if os.environ.get("MMJAX_HOST_MALLOC", "") == "default":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  ok = libc.mallopt(_M_ARENA_MAX, 1) == 1  # Every thread allocates from the main heap...
  ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1  # ...large blocks included...
  ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1  # ...which is never shrunk.
  return bool(ok)


def split_cpu(num_devices: int) -> None:
  """Adds --xla_force_host_platform_device_count=N to XLA_FLAGS; call before JAX starts.

  Only the CPU backend's devices change: on a machine with accelerators JAX still
  computes on them. Raises ValueError for N < 1 or when XLA_FLAGS already sets another
  count.
  """
  if num_devices < 1:
    raise ValueError(f"--cpu_devices must be >= 1, got {num_devices}.")
  flags = os.environ.get("XLA_FLAGS", "")
  found = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
  if found and int(found.group(1)) != num_devices:
    raise ValueError(f"XLA_FLAGS already sets {found.group(0)}; drop it or --cpu_devices.")
  if not found:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={num_devices}".strip()
