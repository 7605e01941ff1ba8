"""glibc malloc settings that keep XLA:CPU from page-faulting its step buffers back in.

XLA:CPU allocates each execution's buffers with malloc. By default glibc gives every thread its
own arena, serves large blocks with mmap and unmaps them on free, so every train step touches
hundreds of MB of fresh pages that the kernel has to fault in and zero: on gpt:small (2 cores)
120,000 to 141,000 minor page faults and 0.2 s of system time per 0.55 s step
(experiments/throughput.py reports the faults per step). With one arena, no mmap
and no trimming, freed blocks stay in the process and the next step reuses them: no
page faults once the heap has grown to its working size (the first few steps), and the step runs
about 20% faster (experiments/PERFORMANCE.md). The price is a higher resident set: freed memory
is kept by the process for its next step instead of being returned.

Entry points call `configure()` (run.py, and the experiment scripts that train), importing
gptjax changes nothing. It must run before JAX starts its CPU threads (a thread that already has
an arena keeps it), so before any JAX computation. It changes nothing on hosts with a GPU or TPU device node, off Linux/glibc, or when
GPTJAX_HOST_MALLOC=default.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
ENV_VAR = "GPTJAX_HOST_MALLOC"

_applied: bool | None = None


def _has_accelerator() -> bool:
  return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*")
              or glob.glob("/dev/vfio/[0-9]*"))


def applies_here() -> bool:
  """Whether `configure()` would change this process's malloc (a CPU-only Linux/glibc host)."""
  return (os.environ.get(ENV_VAR, "") != "default" and platform.system() == "Linux" and
          platform.libc_ver()[0] == "glibc" and not _has_accelerator())


def configure() -> bool:
  """Applies the malloc settings once per process; True when they are in effect."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if not applies_here():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  _applied = all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
  return _applied


def applied() -> bool:
  """Whether `configure()` changed the malloc settings of this process."""
  return bool(_applied)
