"""TrainState, the optimizer, and pure train/eval steps: mesh-sharded `jit` and classic `pmap`."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.model import models
from gptjax.model.ops import XLA, Ops

from gptjax.training import objectives

from gptjax.training import sharding
from gptjax.model.config import ModelConfig


@flax.struct.dataclass
class TrainState:
  """Everything a step changes. The dropout key is derived from (seed, step), so it is not stored."""
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup, then cosine or linear decay to `min_lr_ratio` of the peak, or constant."""
  peak, warmup = train_cfg.learning_rate, train_cfg.warmup_steps
  steps = max(train_cfg.decay_steps or train_cfg.steps, 1)
  end = peak * train_cfg.min_lr_ratio
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  decay_steps = max(steps - warmup, 1)
  if train_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train_cfg.min_lr_ratio)
  elif train_cfg.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  return optax.join_schedules([warm, decay], [warmup])


def decay_mask(params) -> Any:
  """Weight decay on matrices only: no decay on norms and biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _base_optimizer(train_cfg) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(train_cfg)
  if train_cfg.optimizer == "adafactor":
    # T5's recipe: factored second moments, no first moment, block-RMS clipping, and updates
    # scaled by each parameter's RMS, so `learning_rate` is a relative step (T5 used 1e-2).
    # optax.adafactor adds its weight decay after the learning rate (a fixed fraction of each
    # weight every step); here it is decoupled as in AdamW: lr * weight_decay * w.
    return optax.chain(
        optax.scale_by_factored_rms(decay_rate=0.8),
        optax.clip_by_block_rms(1.0),
        optax.scale_by_param_block_rms(),
        optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule))
  return optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2,
                     weight_decay=train_cfg.weight_decay, mask=decay_mask)


def make_optimizer(train_cfg, trainable_mask: Optional[Any] = None,
                   ops: Ops = XLA) -> optax.GradientTransformation:
  """AdamW (or Adafactor) with clipping and a decay mask; frozen leaves (mask False) get no state
  and no update.

  `ops` (the model's, gptjax.model.ops.ops_for) supplies the clipping.
  """
  clip = train_cfg.grad_clip
  tx = optax.chain(
      ops.clip_by_global_norm(clip) if clip > 0 else optax.identity(),
      _base_optimizer(train_cfg))
  if trainable_mask is None:
    return tx
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable_mask)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


# Compile options of functions run once per run (parameter and state initialisation). On CPU
# their cost is the random draws: one threefry loop per distinct parameter shape, which LLVM's
# optimisation makes about 3x slower to compile (a tiny BERT's init: 15 s against 5 s), for
# values that differ only in float rounding (erf_inv of the normal draws, a few ulps).
_RUN_ONCE_CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def run_once(fn: Callable, *args, out_shardings: Any = None) -> Any:
  """`jax.jit(fn, out_shardings=...)(*args)` for code run once (inits): unoptimised on CPU."""
  jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
  lowered = jitted.lower(*args)
  options = _RUN_ONCE_CPU_OPTIONS if jax.default_backend() == "cpu" else None
  return lowered.compile(options)(*args)


def abstract_state(cfg: ModelConfig, tx, seq_len: int, target_len: int = 0):
  """The boxed TrainState as ShapeDtypeStructs (nothing allocated), for shardings."""
  def init():
    params = models.init_params(cfg, jax.random.key(0), 1, seq_len, target_len)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return jax.eval_shape(init)


def create_state(cfg: ModelConfig, tx, seed: int, mesh: Mesh, parallelism, seq_len: int,
                 target_len: int = 0, params: Any = None):
  """Initialises the state directly into its shardings (eval_shape, then jit(init)).

  Returns (state, state_shardings). `params`, when given (e.g. imported weights), replaces the
  random initialisation.
  """
  boxed = abstract_state(cfg, tx, seq_len, target_len)
  shardings = sharding.logical_shardings(boxed, mesh, parallelism)

  def init(rng, given):
    p = models.init_params(cfg, rng, 1, seq_len, target_len)
    p = nn.meta.unbox(p) if given is None else given
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

  with jax.set_mesh(mesh):
    state = run_once(init, jax.random.key(seed), params, out_shardings=shardings)
  return state, shardings


def _microbatches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...] by strided rows, so each device keeps its own rows."""
  def split(x):
    x = x.reshape((x.shape[0] // n, n) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _grads(loss_fn, params, batch, rng, grad_accum: int):
  if grad_accum == 1:
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
    return loss, terms, grads

  def body(carry, micro):
    i, grads_acc, loss_acc, terms_acc = carry
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, micro, jax.random.fold_in(rng, i))
    add = lambda a, b: a + b
    terms_acc = terms if terms_acc is None else jax.tree.map(add, terms_acc, terms)
    return (i + 1, jax.tree.map(add, grads_acc, grads), loss_acc + loss, terms_acc), None

  micro = _microbatches(batch, grad_accum)
  first = jax.tree.map(lambda x: x[0], micro)
  _, terms0 = jax.eval_shape(loss_fn, params, first, rng)
  zeros_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), terms0)
  zeros_grads = jax.tree.map(jnp.zeros_like, params)
  (_, grads, loss, terms), _ = jax.lax.scan(body, (0, zeros_grads, 0.0, zeros_terms), micro)
  scale = 1.0 / grad_accum
  return loss * scale, terms, jax.tree.map(lambda g: g * scale, grads)


def train_step(state: TrainState, batch: dict, *, loss_fn: Callable, tx, seed: int,
               grad_accum: int = 1, axis_name: Optional[str] = None):
  """One optimizer step. Pure: (state, batch) -> (new state, metrics)."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  loss, terms, grads = _grads(loss_fn, state.params, batch, rng, grad_accum)
  if axis_name is not None:
    grads = jax.lax.psum(grads, axis_name)
    loss = jax.lax.psum(loss, axis_name)
    terms = jax.lax.psum(terms, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "terms": terms}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_mesh_train_step(model, objective: str, tx, seed: int, grad_accum: int, mesh: Mesh,
                         state_shardings, donate: bool = True):
  """`jax.jit` train step with explicit in/out shardings and the state donated (unless not)."""
  loss_fn = objectives.make_loss_fn(objective, model, deterministic=False)
  step = functools.partial(train_step, loss_fn=loss_fn, tx=tx, seed=seed, grad_accum=grad_accum)
  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=(0,) if donate else ())


def make_pmap_train_step(model, objective: str, tx, seed: int, grad_accum: int):
  """Classic data-parallel step: `jax.pmap` over local devices, gradients summed by psum.

  Each device divides its local loss sums by the global count, so summing over devices gives the
  same loss and gradients as the mesh step.
  """
  axis = "batch"
  loss_fn = objectives.make_loss_fn(objective, model, deterministic=False,
                                    reduce_count=lambda c: jax.lax.psum(c, axis))
  step = functools.partial(train_step, loss_fn=loss_fn, tx=tx, seed=seed, grad_accum=grad_accum,
                           axis_name=axis)
  return jax.pmap(step, axis_name=axis, donate_argnums=(0,))


def make_eval_step(model, objective: str):
  """Jitted eval: (params, batch) -> summed (sum, count) terms, dropout off."""
  loss_fn = objectives.make_loss_fn(objective, model, deterministic=True)

  @jax.jit
  def eval_step(params, batch):
    _, terms = loss_fn(params, batch, jax.random.key(0))
    return terms

  return eval_step


def shard_for_pmap(batch: dict) -> dict:
  """[B, ...] -> [local_devices, B/local_devices, ...]."""
  n = jax.local_device_count()
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)
