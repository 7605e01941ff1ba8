"""Model FLOPs per training example, and the matmul peak of this machine for MFU."""

from __future__ import annotations

import functools

import math
import time

import jax
import jax.numpy as jnp

from gptjax.model import family as model_family
from gptjax.model import ops
from gptjax.model.config import ModelConfig


def _layer_forward_flops(cfg: ModelConfig, kv_len: int, cross_len: int = 0) -> float:
  """Forward FLOPs of one layer per query token: projections, attention, MLP.

  With `cross_len`, the cross-attention's query and output projections and its attention over
  `cross_len` encoder tokens; its key and value projections run once per encoder token, not per
  query token, and are counted by `_cross_kv_flops`.
  """
  d, h, kh, dh, f = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dims_per_head, cfg.mlp_dim
  proj = 2 * d * (2 * h * dh + 2 * kh * dh)  # q, out, k, v
  attn = 2 * 2 * h * dh * kv_len  # scores and weighted values, full (unmasked) count
  n_in = 2 if cfg.activation in ("gated_gelu", "swiglu") else 1
  mlp = 2 * d * f * (n_in + 1)
  total = proj + attn + mlp
  if cross_len:
    total += 2 * d * 2 * h * dh + 2 * 2 * h * dh * cross_len
  return float(total)


def _cross_kv_flops(cfg: ModelConfig) -> float:
  """Forward FLOPs of one cross-attention layer's key and value projections per encoder token."""
  return float(2 * cfg.embed_dim * 2 * cfg.kv_heads * cfg.dims_per_head)


def train_flops_per_example(cfg: ModelConfig, seq_len: int, target_len: int = 0,
                            objective: str = "") -> float:
  """Training FLOPs (forward + backward = 3x forward) for one example of the given lengths.

  Counts the matmuls of the network (tests/test_flops.py checks the forward count against the
  dot products in each family's jaxpr): attention at full length even where a mask hides keys.
  """
  d, v = cfg.embed_dim, cfg.vocab_size
  adapter = model_family.of(cfg)
  if adapter.cross_attention:
    t = target_len or seq_len
    enc = seq_len * cfg.num_layers * _layer_forward_flops(cfg, seq_len)
    dec = t * (cfg.decoder_layers * _layer_forward_flops(cfg, t, seq_len) + 2 * d * v)
    cross_kv = seq_len * cfg.decoder_layers * _cross_kv_flops(cfg)
    return 3.0 * (enc + dec + cross_kv)
  per_token = cfg.num_layers * _layer_forward_flops(cfg, seq_len)
  if adapter.generates:  # the LM head
    per_token += 2 * d * v
  elif objective in ("mlm", "mlm_nsp") or cfg.mlm_head:
    per_token += 2 * d * d + 2 * d * v
  return 3.0 * seq_len * per_token


def traced_matmul_flops(fn, *args, **kwargs) -> float:
  """FLOPs of the dot products that `fn(*args, **kwargs)` traces to (2 per multiply-add).

  Walks the jaxpr into nested calls, custom-gradient functions and loops (a scan's body counts
  `length` times, a while loop's body once, a conditional its most expensive branch);
  elementwise work is not counted.
  """
  return _jaxpr_matmul_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def _jaxpr_matmul_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs_shape[i] for i in lhs_contract)
      continue
    if eqn.primitive.name == "ffi_call":
      total += ops.custom_call_matmul_flops(eqn)  # the backend counts its kernels' products
      continue
    inner = [_jaxpr_matmul_flops(j) for j in _sub_jaxprs(eqn.params.values())]
    if eqn.primitive.name == "cond":
      total += max(inner, default=0.0)
    else:
      total += sum(inner) * eqn.params.get("length", 1)
  return total


def _sub_jaxprs(values):
  for v in values:
    if isinstance(v, (list, tuple)):
      yield from _sub_jaxprs(v)
    elif hasattr(v, "eqns"):
      yield v
    elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
      yield v.jaxpr


@functools.lru_cache(maxsize=8)
def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` large square matmuls through XLA on the default device
  (measured once per process and setting)."""
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
