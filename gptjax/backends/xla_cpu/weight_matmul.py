"""Dense products of decoding steps: few rows of x against a float32 or int8 weight, on XLA:CPU.

A decoding step multiplies B (batch x beams) rows by every weight of the model. XLA:CPU runs
such skinny products far below the machine's matmul rate and turns an int8 weight into a float32
copy before every product, so int8 weights would only save memory. These run them as one
multi-threaded kernel (csrc/weight_matmul.cc) that streams the weight once per block of rows
and widens int8 values in registers, applying the per-column scale to the sums. Where the
kernel does not apply (no kernels, more than `MAX_ROWS` rows, not float32) the products are the
plain ones of gptjax.model.weight_matmul.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptjax.backends.xla_cpu import build
from gptjax.model import weight_matmul as plain

Array = jax.Array
MAX_ROWS = 64  # int8: beyond this (a prefill, training) XLA's blocked matmul is the faster one
# float32: the kernel runs for 2-4 rows. A whole GPT-2 124M decoding step, same process, 2 idle
# cores: at batch 4 it gave 74 against XLA's 61 tok/s; at batch 1 18 against 22 (XLA's
# matrix-vector path wins); at 8 and 16 rows XLA's dot was faster (experiments/DECODE_THROUGHPUT.md)
F32_MIN_ROWS, F32_MAX_ROWS = 2, 4


def applies(x_MxK: Array, max_rows: int = MAX_ROWS) -> bool:
  """Whether the kernel runs for float32 rows `x_MxK` (M <= max_rows) on this backend."""
  return (x_MxK.ndim == 2 and 0 < x_MxK.shape[0] <= max_rows and x_MxK.dtype == jnp.float32 and
          jax.default_backend() == "cpu" and build.available())


def applies_f32(x_MxK: Array) -> bool:
  """Whether `matmul_f32` runs the kernel (F32_MIN_ROWS <= M <= F32_MAX_ROWS), not XLA's dot."""
  return applies(x_MxK, F32_MAX_ROWS) and x_MxK.shape[0] >= F32_MIN_ROWS


def _call_f32(x_MxK, w, transposed):
  n = w.shape[0] if transposed else w.shape[1]
  call = jax.ffi.ffi_call(build.WEIGHT_MATMUL_F32,
                          jax.ShapeDtypeStruct((x_MxK.shape[0], n), jnp.float32),
                          vmap_method="sequential")
  return call(x_MxK, w, transposed=transposed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_f32(x_MxK, w, transposed):
  return _call_f32(x_MxK, w, transposed)


def _f32_fwd(x_MxK, w, transposed):
  return _call_f32(x_MxK, w, transposed), (x_MxK, w)


def _f32_bwd(transposed, residuals, g_MxN):
  x_MxK, w = residuals
  w_KxN = w.T if transposed else w
  dw = x_MxK.T @ g_MxN
  return g_MxN @ w_KxN.T, dw.T if transposed else dw


_matmul_f32.defvjp(_f32_fwd, _f32_bwd)


def matmul_f32(x_MxK: Array, w: Array, transposed: bool = False) -> Array:
  """x @ w ([K, N]) or x @ w.T (w [N, K] when `transposed`), float32; differentiable."""
  if not applies_f32(x_MxK):
    return jnp.dot(x_MxK, w.T if transposed else w)
  return _matmul_f32(x_MxK, w.astype(jnp.float32), bool(transposed))


def matmul_int8(x_MxK: Array, values: Array, scale_N: Array, transposed: bool = False) -> Array:
  """x @ (values * scale): int8 `values` [K, N] (or [N, K] when `transposed`), scale [N].

  Inference only (no gradient). Outside the kernel: gptjax.model.weight_matmul.matmul_int8.
  """
  if not applies(x_MxK.astype(jnp.float32)):
    return plain.matmul_int8(x_MxK, values, scale_N, transposed)
  n = values.shape[0] if transposed else values.shape[1]
  scale_N = scale_N.reshape(n).astype(jnp.float32)
  call = jax.ffi.ffi_call(build.WEIGHT_MATMUL_S8,
                          jax.ShapeDtypeStruct((x_MxK.shape[0], n), jnp.float32),
                          vmap_method="sequential")
  return call(x_MxK.astype(jnp.float32), values, scale_N, transposed=bool(transposed))
