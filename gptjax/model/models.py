"""BERT, GPT and T5/BART as configurations of the same layers.

`EncoderOnly`, `DecoderOnly` and `EncoderDecoder` all embed tokens with one
`Embed`, run a `Stack` of `TransformerLayer`s and put their heads on top. What
makes a model BERT, GPT-2, T5 or BART is only its `ModelConfig`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.model import layers

from gptjax.model import positions
from gptjax.model.config import ModelConfig
from gptjax.model.ops import ops_for

Array = jax.Array

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def build_mask(input_mask_BxL: Optional[Array], causal: bool, length: int,
               segment_ids_BxL: Optional[Array] = None,
               prefix_mask_BxL: Optional[Array] = None) -> Optional[Array]:
  """Boolean Bx1xLxL self-attention mask from padding, causality, prefix and packing."""
  mask = None

  def conj(a, b):
    return b if a is None else a & b

  if input_mask_BxL is not None:
    mask = conj(mask, input_mask_BxL.astype(bool)[:, None, None, :])
  if causal:
    causal_LxL = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if prefix_mask_BxL is not None:
      causal_LxL = causal_LxL | prefix_mask_BxL.astype(bool)[:, None, None, :]
    mask = conj(mask, causal_LxL)
  if segment_ids_BxL is not None:
    same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    mask = conj(mask, same_BxLxL[:, None])
  return mask


class Stack(nn.Module):
  """Positions, embedding norm, dropout, N layers and the final norm of one stack."""
  cfg: ModelConfig
  num_layers: int
  causal: bool
  has_cross: bool = False

  @nn.compact
  def __call__(self, x_BxLxD: Array, *, input_mask_BxL=None, positions_BxL=None,
               segment_ids_BxL=None, prefix_mask_BxL=None, encoded_BxSxD=None, enc_mask_BxS=None,
               decode: bool = False, cache_len: int = 0, deterministic: bool = True) -> Array:
    cfg = self.cfg
    b, l, d = x_BxLxD.shape
    if decode:
      is_init = not self.has_variable("cache", "position_index")
      index = self.variable("cache", "position_index", lambda: jnp.zeros((), jnp.int32))
      q_pos_L = index.value + jnp.arange(l)
      if not is_init:
        index.value = index.value + l
      # kept in the cache so that steps after the prefill see the cache length it was made with
      k_pos_S = self.variable("cache", "key_positions",
                              lambda: jnp.arange(cache_len or cfg.max_len)).value
    else:
      q_pos_L = k_pos_S = jnp.arange(l)
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(q_pos_L, (b, l))

    x = x_BxLxD
    if cfg.position == "learned":
      x = x + layers.Embed(cfg.max_len + cfg.position_offset, d, cfg.init_std, cfg.compute_dtype,
                           ("length", "embed"), ops_for(cfg), name="pos_embed")(positions_BxL + cfg.position_offset)
    elif cfg.position == "sinusoidal":
      x = x + positions.sinusoidal_embedding(positions_BxL, d).astype(x.dtype)
    if cfg.embed_norm:
      x = layers.make_norm(cfg, "embed_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    self_mask = None if decode else build_mask(input_mask_BxL, self.causal, l, segment_ids_BxL,
                                               prefix_mask_BxL)
    bias = None
    if cfg.position == "relative":
      bias = layers.RelativePositionBias(cfg.relative_buckets, cfg.relative_max_distance,
                                         cfg.num_heads, not self.causal, name="rel_bias")(q_pos_L,
                                                                                         k_pos_S)
    elif cfg.position == "alibi":
      bias = positions.alibi_bias(q_pos_L, k_pos_S, cfg.num_heads, self.causal)
    cross_mask = None
    if self.has_cross and enc_mask_BxS is not None:
      cross_mask = enc_mask_BxS.astype(bool)[:, None, None, :]

    layer_cls = layers.TransformerLayer
    if cfg.remat != "none":
      layer_cls = nn.remat(layer_cls, policy=_REMAT_POLICIES[cfg.remat],
                           prevent_cse=not cfg.scan_layers)
    args = (encoded_BxSxD, self_mask, cross_mask, bias, positions_BxL, input_mask_BxL)
    # the mask hides every later key: not with a prefix (it sees keys after the query) nor when
    # decoding (the cache builds its own mask); a backend may skip the hidden key blocks
    mask_is_causal = self.causal and prefix_mask_BxL is None and not decode
    if cfg.scan_layers:
      scanned = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(cfg, self.has_cross, decode, deterministic, mask_is_causal, cache_len,
                     name="layers")(x, *args)
    else:
      for i in range(self.num_layers):
        x, _ = layer_cls(cfg, self.has_cross, decode, deterministic, mask_is_causal, cache_len,
                         name=f"layers_{i}")(x, *args)
    if cfg.norm_position == "pre" and cfg.final_norm:
      x = layers.make_norm(cfg, "final_norm")(x)
    return x


def pool(h_BxLxD: Array, input_mask_BxL: Optional[Array], how: str) -> Array:
  """One vector per sequence: the first token, the mean of real tokens, or the last real token."""
  if how == "first":
    return h_BxLxD[:, 0]
  if input_mask_BxL is None:
    input_mask_BxL = jnp.ones(h_BxLxD.shape[:2], jnp.int32)
  m_BxL = input_mask_BxL.astype(jnp.float32)
  if how == "mean":
    total_BxD = jnp.einsum("bld,bl->bd", h_BxLxD.astype(jnp.float32), m_BxL)
    return (total_BxD / jnp.maximum(m_BxL.sum(-1, keepdims=True), 1.0)).astype(h_BxLxD.dtype)
  last_B = jnp.maximum(m_BxL.sum(-1).astype(jnp.int32) - 1, 0)
  return jnp.take_along_axis(h_BxLxD, last_B[:, None, None], axis=1)[:, 0]


def _token_embed(cfg: ModelConfig) -> layers.Embed:
  return layers.Embed(cfg.vocab_size, cfg.embed_dim, cfg.init_std, cfg.compute_dtype,
                      ops=ops_for(cfg), name="token_embed")


def _dense(cfg: ModelConfig, out: int, axes, name: str, use_bias: bool = True) -> layers.Dense:
  # T5's init_std (1.0) is its embeddings'; its dense kernels are fan-in scaled, heads included
  return layers.Dense((cfg.embed_dim,), (out,), axes, layers.kernel_std(cfg, cfg.embed_dim),
                      use_bias, cfg.compute_dtype, ops_for(cfg), name=name)


class EncoderOnly(nn.Module):
  """BERT: token + segment + position embeddings, a bidirectional stack, MLM/NSP/class heads."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs: Array, input_mask: Optional[Array] = None,
               token_type_ids: Optional[Array] = None, positions: Optional[Array] = None, *,
               deterministic: bool = True) -> dict[str, Array]:
    cfg = self.cfg
    embed = _token_embed(cfg)
    x = embed(inputs) * cfg.embed_scale
    if cfg.type_vocab_size:
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(inputs)
      x = x + layers.Embed(cfg.type_vocab_size, cfg.embed_dim, cfg.init_std, cfg.compute_dtype,
                           ("types", "embed"), name="type_embed")(token_type_ids)
    h = Stack(cfg, cfg.num_layers, causal=False, name="encoder")(
        x, input_mask_BxL=input_mask, positions_BxL=positions, deterministic=deterministic)
    out = {"hidden": h}
    if cfg.mlm_head:
      t = _dense(cfg, cfg.embed_dim, ("embed", "mlp"), "mlm_transform")(h)
      t = layers.make_norm(cfg, "mlm_norm")(nn.gelu(t, approximate=False))
      bias = self.param("mlm_bias", layers._zeros(("vocab",)), (cfg.vocab_size,), jnp.float32)
      out["mlm_logits"] = embed.attend(t) + bias.astype(t.dtype)
    if cfg.nsp_head or cfg.num_classes:
      pooled = pool(h, input_mask, cfg.pooling)
      pooled = jnp.tanh(_dense(cfg, cfg.embed_dim, ("embed", "mlp"), "pooler")(pooled))
      out["pooled"] = pooled
      if cfg.nsp_head:
        out["nsp_logits"] = _dense(cfg, 2, ("embed", None), "nsp_head")(pooled)
      if cfg.num_classes:
        out["class_logits"] = _dense(cfg, cfg.num_classes, ("embed", None), "classifier")(pooled)
    return out


class DecoderOnly(nn.Module):
  """GPT: a causal stack (also prefix-LM and packed segments) with a tied or untied LM head."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, inputs: Array, positions: Optional[Array] = None,
               segment_ids: Optional[Array] = None, prefix_mask: Optional[Array] = None,
               input_mask: Optional[Array] = None, *, decode: bool = False, cache_len: int = 0,
               last_logits_only: bool = False, deterministic: bool = True) -> dict[str, Array]:
    """{"hidden", "logits" (of the last position alone with `last_logits_only`: a prefill)}."""
    cfg = self.cfg
    embed = _token_embed(cfg)
    x = embed(inputs) * cfg.embed_scale
    h = Stack(cfg, cfg.num_layers, causal=True, name="decoder")(
        x, input_mask_BxL=input_mask, positions_BxL=positions, segment_ids_BxL=segment_ids,
        prefix_mask_BxL=prefix_mask, decode=decode, cache_len=cache_len,
        deterministic=deterministic)
    out = {"hidden": h}
    h_head = h[:, -1:] if last_logits_only else h
    if cfg.tie_embeddings:
      scale = cfg.embed_dim ** -0.5 if cfg.scale_tied_logits else 1.0
      out["logits"] = embed.attend(h_head * scale)
    else:
      out["logits"] = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", False)(h_head)
    if cfg.num_classes:
      pooled = pool(h, input_mask, "last" if cfg.pooling == "first" else cfg.pooling)
      out["class_logits"] = _dense(cfg, cfg.num_classes, ("embed", None), "classifier")(pooled)
    return out


class EncoderDecoder(nn.Module):
  """T5 / BART: `encode()` once, `decode()` with cross-attention (also step by step)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.token_embed = _token_embed(cfg)
    self.encoder = Stack(cfg, cfg.num_layers, causal=False)
    self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, has_cross=True)
    if not cfg.tie_embeddings:
      self.lm_head = _dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head", False)
    if cfg.num_classes:
      self.classifier = _dense(cfg, cfg.num_classes, ("embed", None), "classifier")

  def encode(self, enc_inputs: Array, enc_mask: Optional[Array] = None, *,
             deterministic: bool = True) -> Array:
    """Encoder hidden states, BxSxD."""
    x = self.token_embed(enc_inputs) * self.cfg.embed_scale
    return self.encoder(x, input_mask_BxL=enc_mask, deterministic=deterministic)

  def decode(self, encoded: Optional[Array], enc_mask: Optional[Array], dec_inputs: Array,
             dec_positions: Optional[Array] = None, dec_mask: Optional[Array] = None, *,
             decode: bool = False, cache_len: int = 0, deterministic: bool = True) -> Array:
    """Decoder logits, BxLxV, attending to `encoded`.

    With decode=True the self-attention cache holds `cache_len` keys (0: max_len) and the
    cross-attention keys and values are cached when `encoded` is given; a step that passes
    encoded=None reuses them.
    """
    cfg = self.cfg
    x = self.token_embed(dec_inputs) * cfg.embed_scale
    h = self.decoder(x, input_mask_BxL=dec_mask, positions_BxL=dec_positions, encoded_BxSxD=encoded,
                     enc_mask_BxS=enc_mask, decode=decode, cache_len=cache_len,
                     deterministic=deterministic)
    if cfg.tie_embeddings:
      scale = cfg.embed_dim ** -0.5 if cfg.scale_tied_logits else 1.0
      return self.token_embed.attend(h * scale)
    return self.lm_head(h)

  def __call__(self, enc_inputs: Array, enc_mask: Optional[Array], dec_inputs: Array, *,
               deterministic: bool = True) -> dict[str, Array]:
    encoded = self.encode(enc_inputs, enc_mask, deterministic=deterministic)
    out = {"encoded": encoded,
           "logits": self.decode(encoded, enc_mask, dec_inputs, deterministic=deterministic)}
    if self.cfg.num_classes:
      out["class_logits"] = self.classifier(pool(encoded, enc_mask, "mean"))
    return out


def make_model(cfg: ModelConfig) -> nn.Module:
  """The model class of `cfg.family`, configured by `cfg` (see gptjax/model/family.py)."""
  from gptjax.model import family  # pylint: disable=g-import-not-at-top  # family imports this
  return family.of(cfg).make_model(cfg)


def dummy_inputs(cfg: ModelConfig, batch_size: int, seq_len: int, target_len: int = 0) -> dict:
  """Keyword arguments that initialise `make_model(cfg)` for the given shapes."""
  from gptjax.model import family  # pylint: disable=g-import-not-at-top
  return family.of(cfg).dummy_inputs(cfg, batch_size, seq_len, target_len)


def init_params(cfg: ModelConfig, rng: Array, batch_size: int = 1, seq_len: int = 8,
                target_len: int = 0):
  """Initialises the (logically partitioned) parameter tree of `make_model(cfg)`."""
  model = make_model(cfg)
  return model.init({"params": rng}, **dummy_inputs(cfg, batch_size, seq_len, target_len))["params"]
