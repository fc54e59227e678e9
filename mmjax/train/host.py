"""Host memory: keep what XLA frees, so a step's temporaries are not page-faulted again.

XLA's CPU runtime allocates each step's temporaries as one block (344 MB for the CLIP
MNIST step at batch 256) and frees it at the end of the step. With glibc's defaults a
block that large is mmap'd and unmapped every step, and the kernel zero-fills it page by
page on first touch: 84,000 page faults and a third of the step's time on one core
(benchmarks/README.md). `reuse_freed_memory` makes glibc keep freed memory in its heap
and hand it out again; the process then holds its peak host memory until it exits, as a
training process does anyway.

launch.py and the step benchmarks call it first thing, before JAX starts its threads
(glibc gives each thread its arena on its first allocation; a thread's own arena maps
large blocks whatever the settings). A library importing mmjax is unaffected unless it
calls it. MMJAX_HOST_MALLOC=default skips it.
"""
import ctypes
import os
import platform

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
