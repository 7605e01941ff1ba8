"""Products against int8 weights (QTensor, gptjax.transfer.quantize) as plain JAX.

An int8 weight is widened to float32 and scaled per output column before the product; the
xla_cpu backend (chosen through the registry in gptjax/model/ops.py) replaces these with a kernel
that widens in registers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from gptjax.transfer.quantize import QTensor

Array = jax.Array


def matmul_int8(x_MxK: Array, values: Array, scale_N: Array, transposed: bool = False) -> Array:
  """x @ (values * scale): int8 `values` [K, N] (or [N, K] when `transposed`), scale [N]."""
  n = values.shape[0] if transposed else values.shape[1]
  scale_N = scale_N.reshape(n).astype(jnp.float32)
  w = values.astype(jnp.float32) * (scale_N[:, None] if transposed else scale_N)
  return jnp.dot(x_MxK, (w.T if transposed else w).astype(x_MxK.dtype))


def dense_matmul(x: Array, kernel, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 int8_matmul=matmul_int8, f32_matmul=None) -> Array:
  """x[..., *in] · kernel as one [rows, K] product; kernel float32 [*in, *out] or a QTensor.

  A QTensor kernel holds [N, K] rows (gptjax.transfer.quantize). `int8_matmul` and `f32_matmul`
  (x_MxK, w_KxN) are the products to use (a backend passes its kernels).
  """
  lead = x.shape[:x.ndim - len(in_shape)]
  k, n = math.prod(in_shape), math.prod(out_shape)
  x_MxK = x.reshape(-1, k)
  if isinstance(kernel, QTensor):
    y = int8_matmul(x_MxK, kernel.values.reshape(n, k), kernel.scale, transposed=True)
  else:
    y = (f32_matmul or jnp.dot)(x_MxK, kernel.reshape(k, n))
  return y.reshape(lead + tuple(out_shape))


def embedding_rows(table, ids: Array) -> Array:
  """Rows `ids` of an embedding table, float32 [V, D] or a QTensor (values * row scale)."""
  if isinstance(table, QTensor):
    return (jnp.take(table.values, ids, axis=0).astype(jnp.float32) *
            jnp.take(table.scale, ids, axis=0))
  return jnp.take(table, ids, axis=0)


def attend(x: Array, table, int8_matmul=matmul_int8, f32_matmul=None) -> Array:
  """x[..., D] against every row of a [V, D] table (a tied output layer): [..., V]."""
  lead, d = x.shape[:-1], x.shape[-1]
  x_MxD = x.reshape(-1, d)
  if isinstance(table, QTensor):
    y = int8_matmul(x_MxD, table.values, table.scale, transposed=True)
  elif f32_matmul is not None:
    y = f32_matmul(x_MxD, table, transposed=True)
  else:
    y = jnp.dot(x_MxD, table.T)
  return y.reshape(lead + (y.shape[-1],))
