"""The layers every gptjax family is built from, written once.

Shapes are in the names: B batch, L query length, S key length, D embed,
H query heads, K key/value heads, G = H // K, Dh head dim, F mlp, V vocab.
Parameters are float32 and carry logical axis names (batch, length, embed,
heads, kv_heads, kv, mlp, vocab) for the sharding rules in the config. Compute
runs in `cfg.dtype`; softmax and norms run in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.backends.xla_cpu import kernels as cpu_kernels

from gptjax.model import weight_matmul
from gptjax.model.positions import apply_rope, t5_relative_bucket
from gptjax.transfer.quantize import QTensor
from gptjax.backends.xla_cpu.kernels import fused_attention, fused_attention_applies, head_einsum
from gptjax.backends.xla_cpu.fast_paths import PERF, add_bias, flat_matmul, residual_grad_barrier, softmax_last_axis

Array = jax.Array
NEG_INF = -1e9  # large enough to zero a softmax term in float32, small enough for bfloat16 inputs

@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A hashable, typed copy of `config.model` (see gptjax/config_schema.py)."""
  family: str = "decoder_only"
  vocab_size: int = 512
  embed_dim: int = 64
  num_heads: int = 4
  num_kv_heads: int = 0
  head_dim: int = 0
  mlp_dim: int = 256
  num_layers: int = 2
  num_decoder_layers: int = 0
  max_len: int = 64
  position: str = "learned"
  position_offset: int = 0
  relative_buckets: int = 32
  relative_max_distance: int = 128
  rope_base: float = 10000.0
  norm: str = "layernorm"
  norm_position: str = "pre"
  norm_eps: float = 1e-5
  final_norm: bool = True
  embed_norm: bool = False
  activation: str = "gelu"
  use_bias: bool = True
  scale_attention: bool = True
  tie_embeddings: bool = True
  scale_tied_logits: bool = False
  embed_scale: float = 1.0
  type_vocab_size: int = 0
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: str = "float32"
  attention_impl: str = "einsum"
  scan_layers: bool = False
  remat: str = "none"
  init_std: float = 0.02
  mlm_head: bool = False
  nsp_head: bool = False
  num_classes: int = 0
  pooling: str = "first"

  @classmethod
  def from_config(cls, model_cfg) -> "ModelConfig":
    """Builds a ModelConfig from an ml_collections `config.model`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in model_cfg.to_dict().items() if k in names})

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dims_per_head(self) -> int:
    return self.head_dim or self.embed_dim // self.num_heads

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  @property
  def compute_dtype(self) -> Any:
    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


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

  def setup(self):
    self.embedding = _quantized(self, "embedding")
    if self.embedding is None:
      self.embedding = self.param("embedding", _normal(self.std, self.axes),
                                  (self.num_embeddings, self.features), jnp.float32)

  def __call__(self, ids_BxL: Array) -> Array:
    return weight_matmul.embedding_rows(self.embedding, ids_BxL).astype(self.dtype)

  def attend(self, x_BxLxD: Array) -> Array:
    """Logits against the embedding table: x @ E^T."""
    x_rows = x_BxLxD.reshape(-1, x_BxLxD.shape[-1]).astype(self.dtype)
    if isinstance(self.embedding, QTensor) or weight_matmul.applies(x_rows):
      return weight_matmul.attend(x_BxLxD.astype(self.dtype), self.embedding)
    if PERF["attend_transposed"]:
      # The table's gradient is then x^T @ dlogits, [D, V], transposed once: a copy of D x V
      # floats instead of XLA:CPU's transposed copy of the [tokens, V] logits gradient.
      return flat_matmul(x_BxLxD.astype(self.dtype), self.embedding.T.astype(self.dtype), 1)
    return jnp.einsum("bld,vd->blv", x_BxLxD.astype(self.dtype), self.embedding.astype(self.dtype))


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

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    x32 = x.astype(jnp.float32)
    scale = self.param("scale", _ones(("embed",)), (d,), jnp.float32)
    bias = (self.param("bias", _zeros(("embed",)), (d,), jnp.float32)
            if self.use_bias else None)
    if PERF["cpu_norm"] and cpu_kernels.rows_kernel_applies(x32):
      y = cpu_kernels.norm(x32, scale, bias, self.eps, rms=self.kind == "rmsnorm")
      return y.astype(self.dtype)
    if self.kind == "rmsnorm":
      y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    else:
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale
    if bias is not None:
      y = y + bias
    return y.astype(self.dtype)


def make_norm(cfg: ModelConfig, name: str) -> Norm:
  """The family's norm, named `name`."""
  return Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, cfg.compute_dtype, name=name)


# --------------------------------------------------------------------- dense
class Dense(nn.Module):
  """y = act(x · W (+ b)) over the trailing `in_shape` axes into `out_shape`, with axis names.

  `activation` is "" (none), "gelu" (tanh approximation) or "gelu_exact"; on CPU the bias add
  and the GELU run as one kernel (`cpu_kernels.bias_gelu`).
  """
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  std: float = 0.02
  use_bias: bool = True
  dtype: Any = jnp.float32
  activation: str = ""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    kernel = _quantized(self, "kernel")
    if kernel is None:
      kernel = self.param("kernel", _normal(self.std, self.axes), self.in_shape + self.out_shape,
                          jnp.float32)
    y = self.matmul(x, kernel)
    bias = (self.param("bias", _zeros(self.axes[n_in:]), self.out_shape, jnp.float32)
            if self.use_bias else None)
    approximate = self.activation == "gelu"
    if (self.activation and PERF["cpu_bias_gelu"] and n_out == 1 and
        cpu_kernels.rows_kernel_applies(y)):
      return cpu_kernels.bias_gelu(y, bias, approximate)
    if bias is not None:
      y = add_bias(y, bias)
    if self.activation:
      y = nn.gelu(y, approximate=approximate)
    return y

  def matmul(self, x: Array, kernel: Array) -> Array:
    """x · W alone: the product that LoRA's unmerged delta is added to (gptjax.transfer.lora).

    An int8 kernel (QTensor), or few rows of x (a decoding step), go through weight_matmul.
    """
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    rows = math.prod(x.shape[:x.ndim - n_in])
    if isinstance(kernel, QTensor) or (
        self.dtype == jnp.float32 and weight_matmul.applies(x.astype(self.dtype).reshape(rows, -1))):
      return weight_matmul.dense_matmul(x.astype(self.dtype), kernel, self.in_shape,
                                        self.out_shape)
    if PERF["flat_dense"]:
      return flat_matmul(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
    letters = "ijkmn"
    lhs = "...%s" % letters[:n_in]
    rhs = letters[:n_in] + "opq"[:n_out]
    return jnp.einsum(f"{lhs},{rhs}->...{'opq'[:n_out]}", x.astype(self.dtype),
                      kernel.astype(self.dtype))


# ----------------------------------------------------------------- attention
def _attention_softmax(s: Array) -> Array:
  return softmax_last_axis(s) if PERF["softmax_vjp"] else jax.nn.softmax(s, axis=-1)


def dot_product_attention(q_BxLxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array,
                          mask_Bx1xLxS: Optional[Array], bias_1xHxLxS: Optional[Array], scale: float,
                          impl: str, dropout_fn=None, causal: bool = False) -> Array:
  """Softmax attention in float32, with grouped-query heads, mask and additive bias.

  `causal` promises that the mask never lets a query see a later key (self-attention without a
  prefix); the einsum path then skips the key blocks above the diagonal (`causal_query_blocks`).
  """
  if impl == "dot_product" and dropout_fn is None:
    return jax.nn.dot_product_attention(
        q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh,
        bias=None if bias_1xHxLxS is None else bias_1xHxLxS.astype(q_BxLxHxDh.dtype),
        mask=mask_Bx1xLxS, scale=scale)
  if (PERF["cpu_fused_attention"] and bias_1xHxLxS is None and dropout_fn is None and
      fused_attention_applies(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS)):
    return fused_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, scale,
                           causal=causal and PERF["causal_blocks"])
  l = q_BxLxHxDh.shape[1]
  blocks = causal_query_blocks(l, k_BxSxKxDh.shape[1])
  if (causal and PERF["causal_blocks"] and dropout_fn is None and blocks > 1 and
      mask_Bx1xLxS is not None and mask_Bx1xLxS.shape[2:] == (l, l) and
      (bias_1xHxLxS is None or bias_1xHxLxS.shape[2:] == (l, l))):
    return _blocked_causal_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS,
                                     bias_1xHxLxS, scale, blocks)
  return _attend(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, bias_1xHxLxS, scale,
                 dropout_fn)


def causal_query_blocks(l: int, s: int) -> int:
  """How many query blocks causal self-attention of length `l` is split into (1: not split).

  Blocks of at least 64 queries, at most 8 of them: smaller batched matmuls lose more to
  overhead than skipping the masked keys saves on XLA:CPU.
  """
  if l != s:
    return 1
  n = min(8, l // 64)
  while n > 1 and l % n:
    n -= 1
  return max(n, 1)


def _blocked_causal_attention(q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS, bias_1xHxLxS,
                              scale, blocks: int) -> Array:
  """Causal attention per query block against only the keys up to the block's end.

  The skipped keys are masked for every query of the block, so the result is the full
  computation's; the score and value matmuls shrink to (blocks + 1) / (2 * blocks) of theirs.
  """
  l = q_BxLxHxDh.shape[1]
  c = l // blocks

  def rows_keys(x, i):  # mask and bias are full [.., L, S] here
    return None if x is None else x[:, :, i * c:(i + 1) * c, :(i + 1) * c]

  outs = [_attend(q_BxLxHxDh[:, i * c:(i + 1) * c], k_BxSxKxDh[:, :(i + 1) * c],
                  v_BxSxKxDh[:, :(i + 1) * c], rows_keys(mask_Bx1xLxS, i),
                  rows_keys(bias_1xHxLxS, i), scale, None) for i in range(blocks)]
  return jnp.concatenate(outs, axis=1)


def _attend(q_BxLxHxDh: Array, k_BxSxKxDh: Array, v_BxSxKxDh: Array,
            mask_Bx1xLxS: Optional[Array], bias_1xHxLxS: Optional[Array], scale: float,
            dropout_fn) -> Array:
  """Scores, mask and bias, softmax, dropout, weighted values: the einsum formulation."""
  b, l, h, dh = q_BxLxHxDh.shape
  kh = k_BxSxKxDh.shape[2]
  if PERF["mha_4d"] and kh == h:  # multi-head: no query-group axis (G = 1) to carry around
    q, scores_eq, out_eq = q_BxLxHxDh, "blhd,bshd->bhls", "bhls,bshd->blhd"
    mask, bias = mask_Bx1xLxS, bias_1xHxLxS
  else:  # grouped-query: G = H // K query heads share each key/value head
    q = q_BxLxHxDh.reshape(b, l, kh, h // kh, dh)
    scores_eq, out_eq = "blkgd,bskd->bkgls", "bkgls,bskd->blkgd"
    mask = None if mask_Bx1xLxS is None else mask_Bx1xLxS[:, :, None]
    bias = None if bias_1xHxLxS is None else bias_1xHxLxS.reshape(
        bias_1xHxLxS.shape[0], kh, h // kh, *bias_1xHxLxS.shape[2:])
  einsum = head_einsum if PERF["cpu_head_matmul"] else jnp.einsum
  s = einsum(scores_eq, q, k_BxSxKxDh, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = add_bias(s, bias)
  if mask is not None:
    s = jnp.where(mask, s, NEG_INF)
  p = _attention_softmax(s)
  if dropout_fn is not None:
    p = dropout_fn(p)
  out = einsum(out_eq, p.astype(v_BxSxKxDh.dtype), v_BxSxKxDh)
  return out.reshape(b, l, h, dh)


class Attention(nn.Module):
  """Multi-head (optionally grouped-query) self- or cross-attention with a decode-time KV cache."""
  cfg: ModelConfig
  is_cross: bool = False
  decode: bool = False
  deterministic: bool = True
  causal: bool = False  # self-attention whose mask never lets a query see a later key
  cache_len: int = 0  # decode: keys the self-attention cache holds (0: cfg.max_len)

  @nn.compact
  def __call__(self, x_BxLxD: Array, kv_BxSxD: Optional[Array] = None,
               mask_Bx1xLxS: Optional[Array] = None, bias_1xHxLxS: Optional[Array] = None,
               positions_BxL: Optional[Array] = None, input_mask_BxL: Optional[Array] = None) -> Array:
    cfg = self.cfg
    d, h, kh, dh = cfg.embed_dim, cfg.num_heads, cfg.kv_heads, cfg.dims_per_head
    dt = cfg.compute_dtype
    q_std = kernel_std(cfg, d) * (1.0 if cfg.scale_attention else dh ** -0.5)
    dense = lambda out, axes, std, name: Dense((d,), out, axes, std, cfg.use_bias, dt, name=name)
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
    out_BxLxHxDh = dot_product_attention(q, k.astype(dt), v.astype(dt), mask_Bx1xLxS, bias_1xHxLxS,
                                         scale, cfg.attention_impl, dropout_fn, causal=self.causal)
    out_std = kernel_std(cfg, h * dh)
    return Dense((h, dh), (d,), ("heads", "kv", "embed"), out_std, cfg.use_bias, dt,
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
    d, f, dt = cfg.embed_dim, cfg.mlp_dim, cfg.compute_dtype
    wi = lambda name, act="": Dense((d,), (f,), ("embed", "mlp"), kernel_std(cfg, d),
                                    cfg.use_bias, dt, activation=act, name=name)(x_BxLxD)
    if cfg.activation in ("gated_gelu", "swiglu"):
      act = nn.gelu if cfg.activation == "gated_gelu" else nn.silu
      h_BxLxF = act(wi("wi_0")) * wi("wi_1")
    elif cfg.activation in ("gelu", "gelu_exact"):
      h_BxLxF = wi("wi", cfg.activation)
    else:
      h_BxLxF = nn.relu(wi("wi"))
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    return Dense((f,), (d,), ("mlp", "embed"), kernel_std(cfg, f), cfg.use_bias, dt, name="wo")(h_BxLxF)


# --------------------------------------------------------------------- layer
class TransformerLayer(nn.Module):
  """Self-attention, optional cross-attention, MLP; pre-LN or post-LN.

  Returns (x, None) so that the same layer can be used under `nn.scan`.
  """
  cfg: ModelConfig
  has_cross: bool = False
  decode: bool = False
  deterministic: bool = True
  causal: bool = False  # self_mask is at least causal and not a decode cache's (see Attention)
  cache_len: int = 0  # decode: length of the self-attention cache (0: cfg.max_len)

  @nn.compact
  def __call__(self, x_BxLxD, encoded_BxSxD, self_mask, cross_mask, self_bias, positions_BxL,
               input_mask_BxL):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    pre = cfg.norm_position == "pre"

    def block(x, name, fn):
      if PERF["residual_grad_barrier"]:
        x = residual_grad_barrier(x)
      if pre:
        return x + drop(fn(make_norm(cfg, f"{name}_norm")(x)))
      return make_norm(cfg, f"{name}_norm")(x + drop(fn(x)))

    x = block(x_BxLxD, "self_attn", lambda y: Attention(
        cfg, False, self.decode, self.deterministic, self.causal, self.cache_len,
        name="self_attn")(
            y, None, self_mask, self_bias, positions_BxL, input_mask_BxL))
    if self.has_cross:
      x = block(x, "cross_attn", lambda y: Attention(
          cfg, True, self.decode, self.deterministic, name="cross_attn")(y, encoded_BxSxD, cross_mask))
    x = block(x, "mlp", lambda y: Mlp(cfg, name="mlp")(y))
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return x, None
