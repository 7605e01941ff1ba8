"""Dense products of decoding steps: few rows of x against a float32 or int8 weight, on XLA:CPU.

A decoding step multiplies B (batch x beams) rows by every weight of the model. XLA:CPU runs
such skinny products far below the machine's matmul rate and turns an int8 weight into a float32
copy before every product, so int8 weights would only save memory. `weight_matmul` runs them as
one multi-threaded kernel (csrc/weight_matmul.cc) that streams the weight once per block of rows
and widens int8 values in registers, applying the per-column scale to the sums. Where the
kernel does not apply (other backends, no compiler, more than `MAX_ROWS` rows) the products are
`jnp.dot`s, against the dequantized weight for int8.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gptjax.backends.xla_cpu import kernels as cpu_kernels
from gptjax.backends.xla_cpu.fast_paths import PERF
from gptjax.transfer.quantize import QTensor

Array = jax.Array
MAX_ROWS = 64  # beyond this (a prefill, training) XLA's blocked matmul is the faster one


def applies(x_MxK: Array, int8: bool = False) -> bool:
  """Whether the kernel runs for float32 rows `x_MxK` (M <= MAX_ROWS) on this backend.

  Float32 weights use it only with PERF["cpu_weight_matmul"] (an A/B switch, off by default).
  """
  return ((int8 or PERF["cpu_weight_matmul"]) and x_MxK.ndim == 2 and
          0 < x_MxK.shape[0] <= MAX_ROWS and x_MxK.dtype == jnp.float32 and
          jax.default_backend() == "cpu" and cpu_kernels.available())


def _call_f32(x_MxK, w, transposed):
  n = w.shape[0] if transposed else w.shape[1]
  call = jax.ffi.ffi_call(cpu_kernels.WEIGHT_MATMUL_F32,
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
  if not applies(x_MxK):
    return jnp.dot(x_MxK, w.T if transposed else w)
  return _matmul_f32(x_MxK, w.astype(jnp.float32), bool(transposed))


def matmul_int8(x_MxK: Array, values: Array, scale_N: Array, transposed: bool = False) -> Array:
  """x @ (values * scale): int8 `values` [K, N] (or [N, K] when `transposed`), scale [N].

  Inference only (no gradient). Outside the kernel: a dot against the dequantized weight.
  """
  n = values.shape[0] if transposed else values.shape[1]
  scale_N = scale_N.reshape(n).astype(jnp.float32)
  if not applies(x_MxK.astype(jnp.float32), int8=True):
    w = values.astype(jnp.float32) * (scale_N[:, None] if transposed else scale_N)
    return jnp.dot(x_MxK, (w.T if transposed else w).astype(x_MxK.dtype))
  call = jax.ffi.ffi_call(cpu_kernels.WEIGHT_MATMUL_S8,
                          jax.ShapeDtypeStruct((x_MxK.shape[0], n), jnp.float32),
                          vmap_method="sequential")
  return call(x_MxK.astype(jnp.float32), values, scale_N, transposed=bool(transposed))


def dense_matmul(x: Array, kernel, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Array:
  """x[..., *in] · kernel as one [rows, K] product; kernel float32 [*in, *out] or a QTensor.

  A QTensor kernel holds [N, K] rows (gptjax.transfer.quantize); a float32 one goes through the kernel
  only for few rows.
  """
  lead = x.shape[:x.ndim - len(in_shape)]
  k, n = math.prod(in_shape), math.prod(out_shape)
  x_MxK = x.reshape(-1, k)
  if isinstance(kernel, QTensor):
    y = matmul_int8(x_MxK, kernel.values.reshape(n, k), kernel.scale, transposed=True)
  else:
    y = matmul_f32(x_MxK, kernel.reshape(k, n))
  return y.reshape(lead + tuple(out_shape))


def embedding_rows(table, ids: Array) -> Array:
  """Rows `ids` of an embedding table, float32 [V, D] or a QTensor (values * row scale)."""
  if isinstance(table, QTensor):
    return (jnp.take(table.values, ids, axis=0).astype(jnp.float32) *
            jnp.take(table.scale, ids, axis=0))
  return jnp.take(table, ids, axis=0)


def attend(x: Array, table) -> Array:
  """x[..., D] against every row of a [V, D] table (a tied output layer): [..., V]."""
  lead, d = x.shape[:-1], x.shape[-1]
  x_MxD = x.reshape(-1, d)
  if isinstance(table, QTensor):
    y = matmul_int8(x_MxD, table.values, table.scale, transposed=True)
  else:
    y = matmul_f32(x_MxD, table, transposed=True)
  return y.reshape(lead + (y.shape[-1],))
