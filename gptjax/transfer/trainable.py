"""What trains in a run: `config.finetune.trainable` as a mask, an optimizer and a parameter tree.

`all` trains everything; `head` and `last_block` freeze the rest through the
optimizer (frozen leaves get `set_to_zero`: no state, no update); `lora` keeps
the params as {"base": ..., "lora": ...}, freezes the base (except the task
head) and trains the adapters. LoRA is a parameter transform: `merged_params`
turns that tree into ordinary model params (W + alpha/r A@B) and `lora_objective`
applies it before every loss, so the model and the losses never see adapters.
With the adapters off (`params["base"]`) the same tree is the frozen reference of DPO.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.config_schema import ConfigError
from gptjax.model import family as model_family
from gptjax.model.config import ModelConfig
from gptjax.model.ops import ops_for
from gptjax.training import train_step
from gptjax.transfer import lora

HEAD_PARAMS = ("classifier", "pooler", "nsp_head", "mlm_transform", "mlm_norm", "mlm_bias", "lm_head")
TRAINABLE = ("head", "last_block", "all", "lora")
_SEP = "__"  # LoRA tree keys are parameter paths; orbax wants no "/" inside a key


# ------------------------------------------------------------------ masks
def trainable_mask(params, trainable: str, family: str):
  """A pytree of bools shaped like the (unboxed) params: True where the param trains.

  head: classifier/pooler/nsp/mlm/lm_head params only; last_block: those plus
  the last layer (and final norm) of the stack feeding the head; all: everything;
  lora: nothing (the LoRA tree trains instead).
  """
  if trainable not in TRAINABLE:
    raise ConfigError(f"config.finetune.trainable={trainable!r} is not supported; allowed: "
                      f"{', '.join(TRAINABLE)}")
  params = nn.meta.unbox(params)
  if trainable in ("all", "lora"):
    return jax.tree.map(lambda _: trainable == "all", params)
  heads = [k for k in params if k in HEAD_PARAMS]
  train_keys: dict[str, Any] = {k: True for k in heads}
  if trainable == "last_block":
    stack = model_family.get(family).head_stack(params)
    layer_names = [k for k in params.get(stack, {}) if k.startswith("layers_")]
    if not layer_names:
      raise ConfigError("config.finetune.trainable='last_block' needs config.model.scan_layers=False")
    last = max(layer_names, key=lambda k: int(k.split("_")[1]))
    train_keys[stack] = {last: True, "final_norm": True}
  elif not heads:
    raise ConfigError("config.finetune.trainable='head' but the model has no head parameters; "
                      "set config.model.num_classes or use last_block / lora")

  def mark(tree, spec):
    if not isinstance(spec, dict):
      return jax.tree.map(lambda _: bool(spec), tree)
    return {k: mark(v, spec.get(k, False)) for k, v in tree.items()}

  return mark(params, train_keys)


def masked_optimizer(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
  """`tx` on params where `mask` is True, `set_to_zero` (no state, no update) elsewhere."""
  labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def count_trainable(params, mask) -> tuple[int, int]:
  """(trainable, total) parameter counts."""
  sizes = jax.tree.map(lambda x: int(np.prod(x.shape)), nn.meta.unbox(params))
  total = sum(jax.tree.leaves(sizes))
  trained = sum(s for s, m in zip(jax.tree.leaves(sizes), jax.tree.leaves(mask)) if m)
  return trained, total


# ------------------------------------------------------------------ a run's setup
def uses_lora(config) -> bool:
  """Whether this run trains LoRA adapters."""
  return config.finetune.trainable == "lora"


def _head_mask(base_params, family: str):
  try:
    return trainable_mask(base_params, "head", family)
  except ConfigError:  # no head params: freeze all of the base
    return jax.tree.map(lambda _: False, base_params)


def optimizer_mask(config, params) -> Optional[Any]:
  """The bool mask of this run's trained leaves for the optimizer, or None when all train."""
  trainable, family = config.finetune.trainable, config.model.family
  if trainable == "all":
    return None
  if uses_lora(config):
    return {"base": _head_mask(params["base"], family),
            "lora": jax.tree.map(lambda _: True, params["lora"])}
  return trainable_mask(params, trainable, family)


def make_optimizer(config, params) -> Any:
  """AdamW for the trainable part of `params` (abstract or concrete, unboxed)."""
  ops = ops_for(ModelConfig.from_config(config.model))
  return train_step.make_optimizer(config.train, optimizer_mask(config, params), ops)


def add_lora(config, base_params, rng) -> dict:
  """{"base": base_params, "lora": adapters}; the adapted model starts equal to the base."""
  f = config.finetune
  tree = lora.init_lora(base_params, f.lora_targets, f.lora_rank, rng)
  return {"base": base_params, "lora": {k.replace("/", _SEP): v for k, v in tree.items()}}


def merged_params(config, params, rng=None, deterministic: bool = True):
  """Model params: with LoRA, base + alpha/r A@B (LoRA dropout with `rng` unless deterministic)."""
  if not uses_lora(config):
    return params
  f = config.finetune
  tree = {k.replace(_SEP, "/"): v for k, v in params["lora"].items()}
  rate = 0.0 if deterministic else f.lora_dropout
  return lora.merge(params["base"], tree, f.lora_alpha, f.lora_rank, rate, rng)


def lora_objective(config, objective) -> Any:
  """`objective` (a name or terms function) applied to `merged_params` of the trained tree.

  Without LoRA, `objective` itself. The train and eval steps differentiate through the merge, so
  the gradients reach the adapters (and the unfrozen head) only.
  """
  if not uses_lora(config):
    return objective
  from gptjax.training import objectives  # pylint: disable=g-import-not-at-top
  terms_fn = objectives.OBJECTIVES[objective] if isinstance(objective, str) else objective
  # dpo scores the policy without dropout whatever the step asks (objectives.dpo): LoRA's too
  always_deterministic = config.objective == "dpo"

  def terms(model, params, batch, rng, deterministic):
    merged = merged_params(config, params, rng, deterministic or always_deterministic)
    return terms_fn(model, merged, batch, rng, deterministic)

  return terms


def abstract_state(config, cfg, seq_len: int, target_len: int = 0):
  """(TrainState of ShapeDtypeStructs, optimizer) for this run's trainable setup; nothing allocated."""
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  params = jax.eval_shape(lambda: nn.meta.unbox(
      models.init_params(cfg, jax.random.key(0), 1, seq_len, target_len)))
  if uses_lora(config):
    params = jax.eval_shape(lambda p: add_lora(config, p, jax.random.key(0)), params)
  tx = make_optimizer(config, params)
  state = jax.eval_shape(lambda p: train_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)), params)
  return state, tx
