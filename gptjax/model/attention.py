"""Softmax attention as plain JAX: the `xla` formulation every backend's attention must match.

Shapes: B batch, L queries, S keys, H query heads, K key/value heads (G = H // K query heads share
each), Dh head dim. Scores and softmax run in float32.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -1e9  # large enough to zero a softmax term in float32, small enough for bfloat16 inputs


def _softmax(s: Array) -> Array:
  return jax.nn.softmax(s, axis=-1)


def _add_bias(x: Array, bias: Array) -> Array:
  return x + bias.astype(x.dtype)


def dot_product_attention(q_BxLxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array,
                          mask_Bx1xLxS: Optional[Array], bias_1xHxLxS: Optional[Array], scale: float,
                          impl: str, dropout_fn=None, mask_is_causal: bool = False) -> Array:
  """Softmax attention with grouped-query heads, mask and additive bias.

  `impl` "dot_product" runs `jax.nn.dot_product_attention` (no dropout), "einsum" the einsum
  formulation. `mask_is_causal` promises that the mask never lets a query see a later key; a
  backend may use it to skip work, this formulation does not need it.
  """
  del mask_is_causal
  if impl == "dot_product" and dropout_fn is None:
    return jax.nn.dot_product_attention(
        q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh,
        bias=None if bias_1xHxLxS is None else bias_1xHxLxS.astype(q_BxLxHxDh.dtype),
        mask=mask_Bx1xLxS, scale=scale)
  return einsum_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, bias_1xHxLxS, scale,
                          dropout_fn)


def einsum_attention(q_BxLxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array,
                     mask_Bx1xLxS: Optional[Array], bias_1xHxLxS: Optional[Array], scale: float,
                     dropout_fn=None, einsum: Callable = jnp.einsum, softmax: Callable = _softmax,
                     add_bias: Callable = _add_bias) -> Array:
  """Scores, mask and bias, softmax, dropout, weighted values, as two einsums.

  `einsum`, `softmax` and `add_bias` are the plain functions unless a backend passes its own.
  """
  b, l, h, dh = q_BxLxHxDh.shape
  kh = k_BxSxKxDh.shape[2]
  if kh == h:  # multi-head: no query-group axis (G = 1) to carry around
    q, scores_eq, out_eq = q_BxLxHxDh, "blhd,bshd->bhls", "bhls,bshd->blhd"
    mask, bias = mask_Bx1xLxS, bias_1xHxLxS
  else:  # grouped-query: G = H // K query heads share each key/value head
    q = q_BxLxHxDh.reshape(b, l, kh, h // kh, dh)
    scores_eq, out_eq = "blkgd,bskd->bkgls", "bkgls,bskd->blkgd"
    mask = None if mask_Bx1xLxS is None else mask_Bx1xLxS[:, :, None]
    bias = None if bias_1xHxLxS is None else bias_1xHxLxS.reshape(
        bias_1xHxLxS.shape[0], kh, h // kh, *bias_1xHxLxS.shape[2:])
  s = einsum(scores_eq, q, k_BxSxKxDh, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = add_bias(s, bias)
  if mask is not None:
    s = jnp.where(mask, s, NEG_INF)
  p = softmax(s)
  if dropout_fn is not None:
    p = dropout_fn(p)
  out = einsum(out_eq, p.astype(v_BxSxKxDh.dtype), v_BxSxKxDh)
  return out.reshape(b, l, h, dh)
