"""Builds gptjax's XLA:CPU kernels (csrc/) with the system's C++ compiler and registers them.

Compiled on first use into gptjax's cache (`$GPTJAX_CACHE`, default `~/.cache/gptjax`), once
per source, compiler and jaxlib, like a PyTorch C++ extension; `make install` builds them ahead
of time (`python -m gptjax.backends.xla_cpu.build`). Without a compiler, or with
GPTJAX_NO_CPU_KERNELS=1, `unavailable_reason()` says why and config.model.kernels=auto runs `xla`.
"""


from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import jax

CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
SOURCES = tuple(CSRC / name for name in ("gemm.h", "vector_math.h", "head_matmul.cc",
                                         "attention.cc", "norm.cc", "activation.cc",
                                         "cross_entropy.cc", "weight_matmul.cc"))
HEAD_MATMUL = "gptjax_head_matmul"
ATTENTION_FWD, ATTENTION_BWD = "gptjax_attention_fwd", "gptjax_attention_bwd"
NORM_FWD, NORM_BWD = "gptjax_norm_fwd", "gptjax_norm_bwd"
GELU_FWD, GELU_BWD = "gptjax_bias_gelu_fwd", "gptjax_bias_gelu_bwd"
LOGZ_FWD, LOGZ_BWD = "gptjax_log_z_fwd", "gptjax_log_z_bwd"
WEIGHT_MATMUL_F32, WEIGHT_MATMUL_S8 = "gptjax_weight_matmul_f32", "gptjax_weight_matmul_s8"


def cache_dir() -> pathlib.Path:
  """Where compiled kernels are kept: gptjax's cache ($GPTJAX_CACHE, else ~/.cache/gptjax)."""
  from gptjax import config_schema  # pylint: disable=g-import-not-at-top
  return pathlib.Path(config_schema.cache_dir())


def _compiler() -> Optional[str]:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def build_library(verbose: bool = False) -> pathlib.Path:
  """Compiles gptjax/backends/xla_cpu/csrc (once per source, compiler and jaxlib) and returns the .so path."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
  flags = ["-O3", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
  key = hashlib.sha256(b"".join(f.read_bytes() for f in SOURCES) +
                       " ".join([cxx, *flags, importlib.metadata.version("jaxlib")]).encode())
  key = key.hexdigest()[:16]
  out = cache_dir() / f"cpu_kernels-{key}.so"
  if out.exists():
    return out
  prebuilt = pathlib.Path("~/.cache/gptjax").expanduser() / out.name  # `make install`'s build
  if prebuilt.exists():
    return prebuilt
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_so = pathlib.Path(tmp) / out.name
    cmd = [cxx, *flags, *(str(f) for f in SOURCES if f.suffix == ".cc"), "-o", str(tmp_so)]
    if verbose:
      print(" ".join(cmd), file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      errors = [l for l in result.stderr.splitlines() if "error" in l] or [result.stderr[-500:]]
      raise RuntimeError(f"compiling {CSRC} failed: {errors[0]}")
    os.replace(tmp_so, out)  # atomic: concurrent builders all end with a whole file
  return out


@functools.cache
def unavailable_reason() -> Optional[str]:
  """Why the kernels cannot be built and registered here (None: they are; builds on first call)."""
  if os.environ.get("GPTJAX_NO_CPU_KERNELS"):
    return "GPTJAX_NO_CPU_KERNELS is set"
  try:
    lib = ctypes.cdll.LoadLibrary(str(build_library()))
  except (RuntimeError, OSError) as e:
    return str(e).splitlines()[0]
  for name, symbol in ((HEAD_MATMUL, lib.GptjaxHeadMatmul), (ATTENTION_FWD, lib.GptjaxAttentionFwd),
                       (ATTENTION_BWD, lib.GptjaxAttentionBwd), (NORM_FWD, lib.GptjaxNormFwd),
                       (NORM_BWD, lib.GptjaxNormBwd), (GELU_FWD, lib.GptjaxBiasGeluFwd),
                       (GELU_BWD, lib.GptjaxBiasGeluBwd), (LOGZ_FWD, lib.GptjaxLogZFwd),
                       (LOGZ_BWD, lib.GptjaxLogZBwd),
                       (WEIGHT_MATMUL_F32, lib.GptjaxWeightMatmulF32),
                       (WEIGHT_MATMUL_S8, lib.GptjaxWeightMatmulS8)):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
  return None


def available() -> bool:
  """Whether the kernels are built and registered with XLA:CPU (builds them on first call)."""
  return unavailable_reason() is None


if __name__ == "__main__":
  print(build_library(verbose=True))
