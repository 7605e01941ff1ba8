"""What trains in a run: `config.finetune.trainable` turned into an optimizer and a parameter tree.

`all` trains everything; `head` and `last_block` freeze the rest through the
optimizer (frozen leaves get `set_to_zero`: no state, no update); `lora` keeps
the params as {"base": ..., "lora": ...}, freezes the base (except the task
head) and merges W + alpha/r A@B inside the forward pass.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax

from gptjax.transfer import sft_data as finetune

from gptjax.transfer import lora

from gptjax.model.config import ModelConfig
from gptjax.model.ops import ops_for
from gptjax.training import train_step

_SEP = "__"  # LoRA tree keys are parameter paths; orbax wants no "/" inside a key


def uses_lora(config) -> bool:
  """Whether this run trains LoRA adapters."""
  return config.finetune.trainable == "lora"


def _head_mask(base_params, family: str):
  try:
    return finetune.trainable_mask(base_params, "head", family)
  except Exception:  # pylint: disable=broad-except  # no head params: freeze all of the base
    return jax.tree.map(lambda _: False, base_params)


def trainable_mask(config, params) -> Optional[Any]:
  """The bool mask for the optimizer, or None when everything trains."""
  trainable, family = config.finetune.trainable, config.model.family
  if trainable == "all":
    return None
  if uses_lora(config):
    return {"base": _head_mask(params["base"], family),
            "lora": jax.tree.map(lambda _: True, params["lora"])}
  return finetune.trainable_mask(params, trainable, family)


def make_optimizer(config, params) -> Any:
  """AdamW for the trainable part of `params` (abstract or concrete, unboxed)."""
  ops = ops_for(ModelConfig.from_config(config.model))
  return train_step.make_optimizer(config.train, trainable_mask(config, params), ops)


def add_lora(config, base_params, rng) -> dict:
  """{"base": base_params, "lora": adapters}; the adapted model starts equal to the base."""
  f = config.finetune
  tree = lora.init_lora(base_params, f.lora_targets, f.lora_rank, rng)
  return {"base": base_params, "lora": {k.replace("/", _SEP): v for k, v in tree.items()}}


def merged_params(config, params, rng=None, deterministic: bool = True):
  """Model params: LoRA adapters merged into the base when the run uses LoRA."""
  if not uses_lora(config):
    return params
  f = config.finetune
  tree = {k.replace(_SEP, "/"): v for k, v in params["lora"].items()}
  rate = 0.0 if deterministic else f.lora_dropout
  return lora.merge(params["base"], tree, f.lora_alpha, f.lora_rank, rate, rng)


class LoraModel:
  """Looks like the flax model to the losses, but merges the adapters before every apply."""

  def __init__(self, model: nn.Module, config):
    self.model = model
    self.cfg = model.cfg
    self.config = config

  def apply(self, variables, *args, **kwargs):
    """`model.apply` with params = base + alpha/r A@B."""
    rngs = kwargs.get("rngs") or {}
    deterministic = kwargs.get("deterministic", True)
    merged = merged_params(self.config, variables["params"], rngs.get("dropout"), deterministic)
    return self.model.apply({**variables, "params": merged}, *args, **kwargs)


def abstract_state(config, cfg, seq_len: int, target_len: int = 0):
  """(TrainState of ShapeDtypeStructs, optimizer) for this run's trainable setup; nothing allocated."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  params = jax.eval_shape(lambda: nn.meta.unbox(
      models.init_params(cfg, jax.random.key(0), 1, seq_len, target_len)))
  if uses_lora(config):
    params = jax.eval_shape(lambda p: add_lora(config, p, jax.random.key(0)), params)
  tx = make_optimizer(config, params)
  state = jax.eval_shape(lambda p: train_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)), params)
  return state, tx
