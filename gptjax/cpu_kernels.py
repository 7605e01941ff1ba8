"""Attention's per-head matmuls as a multi-threaded XLA:CPU custom call (gptjax/csrc/head_matmul.cc).

XLA:CPU runs a batched dot such as `blhd,bshd->bhls` on one core, at a third of the rate of its
2-D matmuls (experiments/PERFORMANCE.md). `head_einsum` computes the same einsum with a small
C++ kernel that shares the (batch, head) products out over XLA's intra-op threads and reads and
writes the token-major `[B, L, H, Dh]` and heads-major `[B, H, L, S]` layouts in place.

The kernel is compiled on first use with the system's C++ compiler into a per-user cache
(`$GPTJAX_CACHE_DIR`, default `~/.cache/gptjax`), like a PyTorch C++ extension; `make install`
builds it ahead of time (`python -m gptjax.cpu_kernels`). Where there is no compiler, or for any
backend other than CPU, or dtypes other than float32, `head_einsum` is `jnp.einsum`.
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
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from absl import logging

Array = jax.Array

SOURCE = pathlib.Path(__file__).resolve().parent / "csrc" / "head_matmul.cc"
TARGET = "gptjax_head_matmul"


def cache_dir() -> pathlib.Path:
  """Where compiled kernels are kept: $GPTJAX_CACHE_DIR, else ~/.cache/gptjax."""
  return pathlib.Path(os.environ.get("GPTJAX_CACHE_DIR", "~/.cache/gptjax")).expanduser()


def _compiler() -> Optional[str]:
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")


def build_library(verbose: bool = False) -> pathlib.Path:
  """Compiles head_matmul.cc (once per source, compiler and jaxlib) and returns the .so path."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
  flags = ["-O3", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
  key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cxx, *flags]).encode() +
                       importlib.metadata.version("jaxlib").encode()).hexdigest()[:16]
  out = cache_dir() / f"head_matmul-{key}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    tmp_so = pathlib.Path(tmp) / out.name
    cmd = [cxx, *flags, str(SOURCE), "-o", str(tmp_so)]
    if verbose:
      print(" ".join(cmd), file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {SOURCE.name} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp_so, out)  # atomic: concurrent builders all end with a whole file
  return out


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered with XLA:CPU (builds it on first call)."""
  if os.environ.get("GPTJAX_NO_CPU_KERNELS"):
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(build_library()))
  except (RuntimeError, OSError) as e:
    logging.warning("gptjax CPU attention kernel unavailable, using jnp.einsum: %s",
                    str(e).splitlines()[0])
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.GptjaxHeadMatmul), platform="cpu")
  return True


class HeadProduct(NamedTuple):
  """How an einsum maps onto the kernel: C[b, h] = A[b, h] @ B[b, h] (see head_matmul.cc)."""
  swap: bool            # the einsum's second operand is the kernel's A
  a_heads_major: bool
  a_trans: bool
  b_heads_major: bool
  b_trans: bool
  c_heads_major: bool


@functools.cache
def parse_head_einsum(equation: str) -> Optional[HeadProduct]:
  """The kernel form of a rank-4 einsum with batch `b` first and heads `h` at axis 1 or 2.

  Each operand holds one more free letter and the contracted one (in either order). Returns None
  for any other equation.
  """
  try:
    inputs, out = equation.replace(" ", "").split("->")
    x, y = inputs.split(",")
  except ValueError:
    return None
  for term in (x, y, out):
    if len(term) != 4 or len(set(term)) != 4 or term[0] != "b" or "h" not in term[1:3]:
      return None
  mat = lambda t: t.replace("b", "").replace("h", "")  # noqa: E731  (the two matrix letters)
  i, j = mat(out)
  contracted = set(mat(x)) & set(mat(y))
  if len(contracted) != 1:
    return None
  (k,) = contracted
  if {i, k} == set(mat(x)) and {k, j} == set(mat(y)):
    a, bb, swap = x, y, False
  elif {i, k} == set(mat(y)) and {k, j} == set(mat(x)):
    a, bb, swap = y, x, True
  else:
    return None
  return HeadProduct(swap, a[1] == "h", mat(a) == k + i, bb[1] == "h", mat(bb) == j + k,
                     out[1] == "h")


def _out_shape(equation: str, x: Array, y: Array) -> tuple[int, ...]:
  inputs, out = equation.replace(" ", "").split("->")
  sizes = dict(zip(inputs.split(",")[0], x.shape)) | dict(zip(inputs.split(",")[1], y.shape))
  return tuple(sizes[c] for c in out)


def _kernel_call(equation: str, x: Array, y: Array) -> Array:
  form = parse_head_einsum(equation)
  a, b = (y, x) if form.swap else (x, y)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(_out_shape(equation, x, y), jnp.float32),
                          vmap_method="sequential")
  return call(a, b, a_heads_major=form.a_heads_major, a_trans=form.a_trans,
              b_heads_major=form.b_heads_major, b_trans=form.b_trans,
              c_heads_major=form.c_heads_major)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_einsum_kernel(equation: str, x: Array, y: Array) -> Array:
  return _kernel_call(equation, x, y)


def _kernel_fwd(equation, x, y):
  return _kernel_call(equation, x, y), (x, y)


def _kernel_bwd(equation, residuals, g):
  x, y = residuals
  inputs, out = equation.replace(" ", "").split("->")
  tx, ty = inputs.split(",")
  return (head_einsum(f"{out},{ty}->{tx}", g, y), head_einsum(f"{tx},{out}->{ty}", x, g))


_head_einsum_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def head_einsum(equation: str, x: Array, y: Array, preferred_element_type=None) -> Array:
  """`jnp.einsum(equation, x, y)`, through the CPU kernel where it applies.

  Applies on the CPU backend to float32 operands of an equation `parse_head_einsum` accepts,
  whose shared axes have equal sizes (no broadcasting, no grouped-query heads).
  """
  form = parse_head_einsum(equation)
  if form is not None:
    tx, ty = equation.replace(" ", "").split("->")[0].split(",")
    sizes = dict(zip(tx, x.shape))  # einsum broadcasts size-1 axes; the kernel does not
    same_sizes = all(sizes.get(c, n) == n for c, n in zip(ty, y.shape))
  if (form is None or not same_sizes or x.dtype != jnp.float32 or y.dtype != jnp.float32 or
      jax.default_backend() != "cpu" or not available()):
    return jnp.einsum(equation, x, y, preferred_element_type=preferred_element_type)
  return _head_einsum_kernel(equation, x, y)


if __name__ == "__main__":
  print(build_library(verbose=True))
