"""Position encodings without parameters: sinusoidal, T5's relative buckets, ALiBi, rotary.

gptjax.model.layers and gptjax.model.models use them; the learned ones (position embeddings, T5's relative
bias table) are modules in gptjax.model.layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def sinusoidal_embedding(positions_BxL: Array, features: int) -> Array:
  """The fixed sin/cos position encoding of Vaswani et al. (2017)."""
  half = features // 2
  freq = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angle_BxLxF = positions_BxL[..., None].astype(jnp.float32) * freq
  return jnp.concatenate([jnp.sin(angle_BxLxF), jnp.cos(angle_BxLxF)], axis=-1)


def t5_relative_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                       max_distance: int) -> Array:
  """T5's bucketing of key-minus-query offsets (Raffel et al. 2020, mesh_tensorflow)."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
      / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Per-head ALiBi slopes (Press et al. 2022), also for head counts not a power of 2."""
  def power_of_2(n):
    start = 2 ** (-(2 ** -(math.log2(n) - 3)))
    return [start * start ** i for i in range(n)]
  if math.log2(num_heads).is_integer():
    return np.asarray(power_of_2(num_heads), np.float32)
  closest = 2 ** math.floor(math.log2(num_heads))
  extra = power_of_2(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(power_of_2(closest) + extra, np.float32)


def alibi_bias(q_pos_L: Array, k_pos_S: Array, num_heads: int, causal: bool) -> Array:
  """ALiBi linear distance penalty, 1xHxLxS."""
  dist_LxS = (q_pos_L[:, None] - k_pos_S[None, :]).astype(jnp.float32)
  dist_LxS = jnp.maximum(dist_LxS, 0.0) if causal else jnp.abs(dist_LxS)
  return -alibi_slopes(num_heads)[None, :, None, None] * dist_LxS[None, None]


def apply_rope(x_BxLxNxDh: Array, positions_BxL: Array, base: float) -> Array:
  """Rotary position embedding (Su et al. 2021), rotate-half convention."""
  dh = x_BxLxNxDh.shape[-1]
  inv_freq = 1.0 / (base ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  angle_BxLxH = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  sin = jnp.sin(angle_BxLxH)[:, :, None, :]
  cos = jnp.cos(angle_BxLxH)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxNxDh.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxDh.dtype)
