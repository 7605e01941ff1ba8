"""The layers every gptjax family is built from, written once.

Shapes are in the names: B batch, L query length, S key length, D embed,
H query heads, K key/value heads, G = H // K, Dh head dim, F mlp, V vocab.
Parameters are float32 and carry logical axis names (batch, length, embed,
heads, kv_heads, kv, mlp, vocab) for the sharding rules in the config. Compute
runs in `cfg.dtype`; softmax and norms run in float32.

The products, norms, attention core and bias + GELU are the ops of `cfg.kernels`
(`ops_for(cfg)`, gptjax/model/ops.py): plain JAX, or a backend's. `ModelConfig`
(gptjax/model/config.py) and `NEG_INF` (gptjax/model/attention.py) are importable from here too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model import weight_matmul
from gptjax.model.attention import NEG_INF  # noqa: F401  pylint: disable=unused-import
from gptjax.model.config import ModelConfig
from gptjax.model.ops import XLA, Ops, ops_for
from gptjax.model.positions import apply_rope, t5_relative_bucket
from gptjax.transfer.quantize import QTensor

Array = jax.Array


def _normal(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def kernel_std(cfg: ModelConfig, fan_in: int) -> float:
  """GPT/BERT use a fixed std; T5 (no attention scaling) uses fan-in scaling."""
  return cfg.init_std if cfg.scale_attention else fan_in ** -0.5


def _quantized(module: nn.Module, name: str) -> Optional[QTensor]:
  """The int8 parameter `name` of `module` when its params are quantized (gptjax.transfer.quantize)."""
  if module.has_variable("params", name):
    value = module.get_variable("params", name)
    if isinstance(value, QTensor):
      return value
  return None


# ---------------------------------------------------------------- embeddings
class Embed(nn.Module):
  """Token embedding table; `attend` reuses it as a tied output layer."""
  num_embeddings: int
  features: int
  std: float = 0.02
  dtype: Any = jnp.float32
  axes: tuple[str, str] = ("vocab", "embed")
  ops: Ops = XLA

  def setup(self):
    self.embedding = _quantized(self, "embedding")
    if self.embedding is None:
      self.embedding = self.param("embedding", _normal(self.std, self.axes),
                                  (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids_BxL: Array) -> Array:
    return weight_matmul.embedding_rows(self.embedding, ids_BxL).astype(self.dtype)

  def attend(self, x_BxLxD: Array) -> Array:
    """Logits against the embedding table: x @ E^T."""
    table = self.embedding
    if not isinstance(table, QTensor):
      table = table.astype(self.dtype)
    return self.ops.tied_logits(x_BxLxD.astype(self.dtype), table)


class RelativePositionBias(nn.Module):
  """T5 bucketed relative position bias, one table shared by all layers of a stack."""
  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool

  @nn.compact
  def __call__(self, q_pos_L: Array, k_pos_S: Array) -> Array:
    table = self.param("rel_embedding", _normal(0.02 if self.num_heads else 1.0, ("relpos", "heads")),
                       (self.num_buckets, self.num_heads), jnp.float32)
    bucket_LxS = t5_relative_bucket(k_pos_S[None, :] - q_pos_L[:, None], self.bidirectional,
                                    self.num_buckets, self.max_distance)
    return jnp.take(table, bucket_LxS, axis=0).transpose(2, 0, 1)[None]  # 1xHxLxS


# --------------------------------------------------------------------- norms
class Norm(nn.Module):
  """LayerNorm or RMSNorm (T5: scale only, no mean), computed in float32."""
  kind: str = "layernorm"
  eps: float = 1e-5
  use_bias: bool = True
  dtype: Any = jnp.float32
  ops: Ops = XLA

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    scale = self.param("scale", _ones(("embed",)), (d,), jnp.float32)
    bias = (self.param("bias", _zeros(("embed",)), (d,), jnp.float32)
            if self.use_bias else None)
    y = self.ops.norm(x32, scale, bias, self.eps, rms=self.kind == "rmsnorm")
    return y.astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> Norm:
  """The family's norm, named `name`."""
  return Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, cfg.compute_dtype, ops_for(cfg), name=name)


# --------------------------------------------------------------------- dense
class Dense(nn.Module):
  """y = x · W (+ b) over the trailing `in_shape` axes into `out_shape`, with axis names."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  std: float = 0.02
  use_bias: bool = True
  dtype: Any = jnp.float32
  ops: Ops = XLA

  @nn.compact
  def __call__(self, x: Array, epilogue: Optional[Callable] = None) -> Array:
    """x · W, then `epilogue(y, bias)` (default: the bias added; bias is None without one)."""
    n_in = len(self.in_shape)
    kernel = _quantized(self, "kernel")
    if kernel is None:
      kernel = self.param("kernel", _normal(self.std, self.axes), self.in_shape + self.out_shape,
                          jnp.float32)
    y = self.matmul(x, kernel)
    bias = (self.param("bias", _zeros(self.axes[n_in:]), self.out_shape, jnp.float32)
            if self.use_bias else None)
    if epilogue is not None:
      return epilogue(y, bias)
    return y if bias is None else self.ops.add_bias(y, bias)

  def matmul(self, x: Array, kernel: Array) -> Array:
    """x · W alone: the product that LoRA's unmerged delta is added to (gptjax.transfer.lora)."""
    if not isinstance(kernel, QTensor):
      kernel = kernel.astype(self.dtype)
    return self.ops.dense_matmul(x.astype(self.dtype), kernel, self.in_shape, self.out_shape)


class Attention(nn.Module):
  """Multi-head (optionally grouped-query) self- or cross-attention with a decode-time KV cache."""
  cfg: ModelConfig
  is_cross: bool = False
  decode: bool = False
  deterministic: bool = True
  mask_is_causal: bool = False  # self-attention whose mask never lets a query see a later key
  cache_len: int = 0  # decode: keys the self-attention cache holds (0: cfg.max_len)

  @nn.compact
  def __call__(self, x_BxLxD: Array, kv_BxSxD: Optional[Array] = None,
               mask_Bx1xLxS: Optional[Array] = None, bias_1xHxLxS: Optional[Array] = None,
               positions_BxL: Optional[Array] = None, input_mask_BxL: Optional[Array] = None) -> Array:
    cfg = self.cfg
    d, h, kh, dh = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dims_per_head
    dt, ops = cfg.compute_dtype, ops_for(cfg)
    q_std = kernel_std(cfg, d) * (1.0 if cfg.scale_attention else dh ** -0.5)
    dense = lambda out, axes, std, name: Dense((d,), out, axes, std, cfg.use_bias, dt, ops, name=name)
    q = dense((h, dh), ("embed", "heads", "kv"), q_std, "query")(x_BxLxD)
    if self.is_cross and self.decode and kv_BxSxD is None:
      # a decoding step: the encoder's keys and values were projected once, at prefill
      k, v = self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
    else:
      kv_in = x_BxLxD if kv_BxSxD is None else kv_BxSxD
      k = dense((kh, dh), ("embed", "kv_heads", "kv"), kernel_std(cfg, d), "key")(kv_in)
      v = dense((kh, dh), ("embed", "kv_heads", "kv"), kernel_std(cfg, d), "value")(kv_in)
      if self.is_cross and self.decode:
        self.put_variable("cache", "cross_key", k)
        self.put_variable("cache", "cross_value", v)
    if cfg.position == "rope" and not self.is_cross:
      q = apply_rope(q, positions_BxL, cfg.rope_base)
      k = apply_rope(k, positions_BxL, cfg.rope_base)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))

    if self.decode and not self.is_cross:
      k, v, mask_Bx1xLxS = self._update_cache(k, v, input_mask_BxL)

    dropout_fn = None
    if cfg.attention_dropout_rate > 0 and not self.deterministic:
      dropout_fn = nn.Dropout(cfg.attention_dropout_rate, deterministic=False)
    scale = dh ** -0.5 if cfg.scale_attention else 1.0
    out_BxLxHxDh = ops.attention(q, k.astype(dt), v.astype(dt), mask_Bx1xLxS, bias_1xHxLxS, scale,
                                 cfg.attention_impl, dropout_fn, mask_is_causal=self.mask_is_causal)
    out_std = kernel_std(cfg, h * dh)
    return Dense((h, dh), (d,), ("heads", "kv", "embed"), out_std, cfg.use_bias, dt, ops,
                 name="out")(out_BxLxHxDh)

  def _update_cache(self, k_BxLxKxDh, v_BxLxKxDh, input_mask_BxL):
    """Writes this chunk into the cache; returns all cached keys, values and the decode mask."""
    b, l, kh, dh = k_BxLxKxDh.shape
    is_init = not self.has_variable("cache", "cached_key")
    s = self.cache_len or self.cfg.max_len
    ck = self.variable("cache", "cached_key", jnp.zeros, (b, s, kh, dh), k_BxLxKxDh.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, (b, s, kh, dh), v_BxLxKxDh.dtype)
    cvalid = self.variable("cache", "cached_valid", jnp.zeros, (b, s), jnp.bool_)
    idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if is_init:  # shape-only pass that creates the cache
      return k_BxLxKxDh, v_BxLxKxDh, None
    i = idx.value
    valid_BxL = jnp.ones((b, l), jnp.bool_) if input_mask_BxL is None else input_mask_BxL.astype(bool)
    ck.value = jax.lax.dynamic_update_slice(ck.value, k_BxLxKxDh.astype(ck.value.dtype), (0, i, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v_BxLxKxDh.astype(cv.value.dtype), (0, i, 0, 0))
    cvalid.value = jax.lax.dynamic_update_slice(cvalid.value, valid_BxL, (0, i))
    idx.value = i + l
    q_pos_L = i + jnp.arange(l)
    causal_LxS = jnp.arange(ck.value.shape[1])[None, :] <= q_pos_L[:, None]
    mask_Bx1xLxS = causal_LxS[None, None] & cvalid.value[:, None, None, :]
    return ck.value, cv.value, mask_Bx1xLxS


# ----------------------------------------------------------------------- mlp
class Mlp(nn.Module):
  """Feed-forward block: gelu, relu, gated-gelu or SwiGLU."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    cfg = self.cfg
    d, f, dt, ops = cfg.embed_dim, cfg.mlp_dim, cfg.compute_dtype, ops_for(cfg)
    wi = lambda name, epilogue=None: Dense((d,), (f,), ("embed", "mlp"), kernel_std(cfg, d),
                                           cfg.use_bias, dt, ops, name=name)(x_BxLxD, epilogue)
    if cfg.activation in ("gated_gelu", "swiglu"):
      act = nn.gelu if cfg.activation == "gated_gelu" else nn.silu
      h_BxLxF = act(wi("wi_0")) * wi("wi_1")
    elif cfg.activation in ("gelu", "gelu_exact"):  # "gelu": the tanh approximation
      h_BxLxF = wi("wi", functools.partial(ops.bias_gelu, approximate=cfg.activation == "gelu"))
    else:
      h_BxLxF = nn.relu(wi("wi"))
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    return Dense((f,), (d,), ("mlp", "embed"), kernel_std(cfg, f), cfg.use_bias, dt, ops,
                 name="wo")(h_BxLxF)


# --------------------------------------------------------------------- layer
class TransformerLayer(nn.Module):
  """Self-attention, optional cross-attention, MLP; pre-LN or post-LN.

  Returns (x, None) so that the same layer can be used under `nn.scan`.
  """
  cfg: ModelConfig
  has_cross: bool = False
  decode: bool = False
  deterministic: bool = True
  mask_is_causal: bool = False  # self_mask is at least causal and not a decode cache's
  cache_len: int = 0  # decode: length of the self-attention cache (0: cfg.max_len)

  @nn.compact
  def __call__(self, x_BxLxD, encoded_BxSxD, self_mask, cross_mask, self_bias, positions_BxL,
               input_mask_BxL):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    pre = cfg.norm_position == "pre"
    barrier = ops_for(cfg).residual_grad_barrier

    def block(x, name, fn):
      x = barrier(x)
      if pre:
        return x + drop(fn(make_norm(cfg, f"{name}_norm")(x)))
      return make_norm(cfg, f"{name}_norm")(x + drop(fn(x)))

    x = block(x_BxLxD, "self_attn", lambda y: Attention(
        cfg, False, self.decode, self.deterministic, self.mask_is_causal, self.cache_len,
        name="self_attn")(
            y, None, self_mask, self_bias, positions_BxL, input_mask_BxL))
    if self.has_cross:
      x = block(x, "cross_attn", lambda y: Attention(
          cfg, True, self.decode, self.deterministic, name="cross_attn")(y, encoded_BxSxD, cross_mask))
    x = block(x, "mlp", lambda y: Mlp(cfg, name="mlp")(y))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None
