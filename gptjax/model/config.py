"""`ModelConfig`: the hashable, typed form of `config.model`, with the same defaults.

Every field and default comes from `gptjax.config_schema.base_config().model`, the one source of
model-config truth; `from_config` refuses a key that is not a field. `kernels` is resolved when
the config is built: `auto` becomes `xla_cpu` or `xla` (gptjax.model.ops.resolve_kernels), so a
ModelConfig always names the implementation its layers run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from gptjax import config_schema
from gptjax.model import ops

_BASE = config_schema.base_config().model


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A hashable, typed copy of `config.model` (fields and defaults: gptjax/config_schema.py)."""
  family: str = _BASE.family
  vocab_size: int = _BASE.vocab_size
  embed_dim: int = _BASE.embed_dim
  num_heads: int = _BASE.num_heads
  num_kv_heads: int = _BASE.num_kv_heads
  head_dim: int = _BASE.head_dim
  mlp_dim: int = _BASE.mlp_dim
  num_layers: int = _BASE.num_layers
  num_decoder_layers: int = _BASE.num_decoder_layers
  max_len: int = _BASE.max_len
  position: str = _BASE.position
  position_offset: int = _BASE.position_offset
  relative_buckets: int = _BASE.relative_buckets
  relative_max_distance: int = _BASE.relative_max_distance
  rope_base: float = _BASE.rope_base
  norm: str = _BASE.norm
  norm_position: str = _BASE.norm_position
  norm_eps: float = _BASE.norm_eps
  final_norm: bool = _BASE.final_norm
  embed_norm: bool = _BASE.embed_norm
  activation: str = _BASE.activation
  use_bias: bool = _BASE.use_bias
  scale_attention: bool = _BASE.scale_attention
  tie_embeddings: bool = _BASE.tie_embeddings
  scale_tied_logits: bool = _BASE.scale_tied_logits
  embed_scale: float = _BASE.embed_scale
  type_vocab_size: int = _BASE.type_vocab_size
  dropout_rate: float = _BASE.dropout_rate
  attention_dropout_rate: float = _BASE.attention_dropout_rate
  dtype: str = _BASE.dtype
  attention_impl: str = _BASE.attention_impl
  kernels: str = _BASE.kernels
  kernel_exclude: str = _BASE.kernel_exclude
  scan_layers: bool = _BASE.scan_layers
  remat: str = _BASE.remat
  init_std: float = _BASE.init_std
  mlm_head: bool = _BASE.mlm_head
  nsp_head: bool = _BASE.nsp_head
  num_classes: int = _BASE.num_classes
  pooling: str = _BASE.pooling

  def __post_init__(self):  # `auto` -> the concrete kernels; an unknown name is a ConfigError
    object.__setattr__(self, "kernels", ops.resolve_kernels(self.kernels))

  @classmethod
  def from_config(cls, model_cfg) -> "ModelConfig":
    """Builds a ModelConfig from an ml_collections `config.model`; an unknown key is a ConfigError."""
    values = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise config_schema.ConfigError(
          f"config.model.{unknown[0]} is not a model config field (fields: gptjax/config_schema.py)")
    return cls(**values)

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
