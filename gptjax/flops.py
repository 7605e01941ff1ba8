"""Model FLOPs per training example, and the matmul peak of this machine for MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from gptjax.layers import ModelConfig


def _layer_forward_flops(cfg: ModelConfig, q_len: int, kv_len: int, cross_len: int = 0) -> float:
  """Forward FLOPs of one layer per query token: projections, attention, MLP."""
  d, h, kh, dh, f = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dims_per_head, cfg.mlp_dim
  proj = 2 * d * (2 * h * dh + 2 * kh * dh)  # q, out, k, v
  attn = 2 * 2 * h * dh * kv_len  # scores and weighted values, full (unmasked) count
  n_in = 2 if cfg.activation in ("gated_gelu", "swiglu") else 1
  mlp = 2 * d * f * (n_in + 1)
  total = proj + attn + mlp
  if cross_len:
    total += 2 * d * (2 * h * dh + 2 * kh * dh) + 2 * 2 * h * dh * cross_len
  del q_len
  return float(total)


def train_flops_per_example(cfg: ModelConfig, seq_len: int, target_len: int = 0,
                            objective: str = "") -> float:
  """Training FLOPs (forward + backward = 3x forward) for one example of the given lengths."""
  d, v = cfg.embed_dim, cfg.vocab_size
  if cfg.family == "encoder_decoder":
    t = target_len or seq_len
    enc = seq_len * cfg.num_layers * _layer_forward_flops(cfg, seq_len, seq_len)
    dec = t * (cfg.decoder_layers * _layer_forward_flops(cfg, t, t, seq_len) + 2 * d * v)
    return 3.0 * (enc + dec)
  per_token = cfg.num_layers * _layer_forward_flops(cfg, seq_len, seq_len)
  if cfg.family == "decoder_only":
    per_token += 2 * d * v
  elif objective in ("mlm", "mlm_nsp") or cfg.mlm_head:
    per_token += 2 * d * d + 2 * d * v
  return 3.0 * seq_len * per_token


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` large square matmuls through XLA on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best
