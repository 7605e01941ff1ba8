"""The train loop: `run.py --mode=train` (and `--mode=eval`)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from typing import Any, Optional

import flax.jax_utils
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gptjax.model import models
from gptjax.training import (checkpointing, flops, objectives, resume_check, run_records, sharding,
                             train_step, workdir_guard)
from gptjax.transfer import trainable as finetune_state
from gptjax.config_schema import ConfigError
from gptjax.model.layers import ModelConfig


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or Inf."""


class _StopSignal:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.received: Optional[str] = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _target_len(config) -> int:
  return (config.data.target_len or config.data.seq_len) \
      if config.model.family == "encoder_decoder" else 0


def _iterator_state_to_json(it) -> str:
  state = it.get_state()
  return state.decode() if isinstance(state, bytes) else json.dumps(state)


def _iterator_state_from_json(it, text: str) -> None:
  current = it.get_state()
  it.set_state(text.encode() if isinstance(current, bytes) else json.loads(text))


def _fetch(metrics) -> dict[str, Any]:
  """Device metrics -> host floats (the one host sync per logged step)."""
  metrics = jax.device_get(metrics)
  if isinstance(metrics["loss"], np.ndarray) and metrics["loss"].ndim == 1:  # pmap: take replica 0
    metrics = jax.tree.map(lambda x: x[0], metrics)
  out = objectives.finalize(metrics["terms"])
  out["loss_tokens"] = float(sum(c for name, (_, c) in metrics["terms"].items()
                                 if name.endswith("_loss") and name != "nsp_loss"
                                 and name != "sop_loss" and name != "class_loss"))
  out["loss"] = float(metrics["loss"])
  out["grad_norm"] = float(metrics["grad_norm"])
  return out


def _load_init_params(config, cfg: ModelConfig, abstract_params) -> Any:
  """Parameters named by `config.init_from`: a gptjax workdir or `hf:DIR`."""
  source = config.init_from
  if source.startswith("hf:"):
    from gptjax.transfer import hf_import  # pylint: disable=g-import-not-at-top
    return hf_import.load_init_params(source, cfg, abstract_params)
  if not os.path.isdir(checkpointing.checkpoint_dir(source)):
    raise ConfigError(f"config.init_from={source!r} has no checkpoints/ folder; give a gptjax "
                      "workdir or hf:DIR")
  _, params, _ = checkpointing.restore_for_inference(source)
  params = jax.device_get(params)
  fresh = jax.device_get(jax.jit(lambda: nn.meta.unbox(models.init_params(
      cfg, jax.random.key(config.seed), 1, config.data.seq_len, _target_len(config))))())
  del abstract_params
  return _graft(fresh, params, source)


def _graft(fresh, given, source: str):
  """Takes every parameter the target shares with `given`; new heads keep their fresh init."""
  flat_given = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(given)[0]}
  shared = 0

  def pick(path, leaf):
    nonlocal shared
    name = jax.tree_util.keystr(path)
    if name in flat_given:
      if tuple(flat_given[name].shape) != tuple(leaf.shape):
        raise ConfigError(f"config.init_from={source!r}: parameter {name} has shape "
                          f"{tuple(flat_given[name].shape)} but config.model needs "
                          f"{tuple(leaf.shape)}; make the model config match the checkpoint")
      shared += 1
      return flat_given[name]
    return leaf

  picked = jax.tree_util.tree_map_with_path(pick, fresh)
  if shared == 0:
    raise ConfigError(f"config.init_from={source!r} shares no parameter with config.model")
  return picked


# ============================================================================ setup
def setup(config, workdir: str, tokenizer=None):
  """Everything before the first step: devices, tokenizer, data, model, optimizer, state.

  `tokenizer`: the one a resumed checkpoint was trained with (else loaded or trained here).
  """
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from gptjax.data import tokenization
  sharding.initialize_distributed(config.parallelism)
  cfg = ModelConfig.from_config(config.model)
  pmap = config.parallelism.mode == "pmap"
  mesh = sharding.make_mesh(config.parallelism)
  sharding.check_batch_divides(config.data.batch_size, mesh, config.train.grad_accum)
  if pmap and config.data.batch_size % (jax.device_count() * config.train.grad_accum):
    raise ConfigError(f"config.data.batch_size={config.data.batch_size} does not divide over "
                      f"{jax.device_count()} devices for parallelism.mode='pmap'")
  workdir_guard.prepare_workdir(workdir)
  if tokenizer is None:
    tokenizer = tokenization.load_or_train_tokenizer(config, workdir)
  elif not os.path.exists(os.path.join(workdir, "tokenizer.json")) or \
      tokenization.load_tokenizer_file(os.path.join(workdir, "tokenizer.json")).fingerprint != \
      tokenizer.fingerprint:
    tokenizer.save(workdir)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but config.model.vocab_size="
                      f"{cfg.vocab_size}; raise vocab_size or lower config.data.tokenizer.vocab_size")
  return cfg, mesh, tokenizer, input_pipeline


def initial_state(config, cfg: ModelConfig, mesh, given_params=None):
  """(state, state shardings, optimizer, model for the losses) before any checkpoint is restored."""
  seq_len, target_len = config.data.seq_len, _target_len(config)
  model = models.make_model(cfg)
  abstract, tx = finetune_state.abstract_state(config, cfg, seq_len, target_len)
  if not finetune_state.uses_lora(config):
    state, shardings = train_step.create_state(cfg, tx, config.seed, mesh, config.parallelism,
                                               seq_len, target_len, given_params)
    return state, shardings, tx, model
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda _: replicated, abstract)

  def init(rng, base):
    if base is None:
      base = nn.meta.unbox(models.init_params(cfg, rng, 1, seq_len, target_len))
    params = finetune_state.add_lora(config, base, jax.random.fold_in(rng, 1))
    return train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params))

  state = jax.jit(init, out_shardings=shardings)(jax.random.key(config.seed), given_params)
  return state, shardings, tx, finetune_state.LoraModel(model, config)


# ============================================================================ train
def train_and_evaluate(config, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics.

  The workdir is made (or refused in one line) and locked against a second writer first.
  """
  sharding.initialize_distributed(config.parallelism)
  if config.init_from and not resume_check.has_saved_step(workdir):
    resume_check.check_init_from(config.init_from)  # before anything is written
  workdir_guard.prepare_workdir(workdir)
  with (workdir_guard.WorkdirLock(workdir) if jax.process_index() == 0
        else contextlib.nullcontext()):
    return _train_locked(config, workdir)


def _train_locked(config, workdir: str) -> dict[str, float]:
  """train_and_evaluate once the workdir is this run's alone."""
  ckpt = checkpointing.Checkpointer(workdir, config.train.keep, config.train.best_metric)
  meta, safe_changes = resume_check.resume_plan(config, workdir, ckpt)
  from gptjax.data import tokenization  # pylint: disable=g-import-not-at-top
  resumed_tokenizer = tokenization.tokenizer_from_json(meta["tokenizer"]) \
      if meta and meta.get("tokenizer") else None
  cfg, mesh, tokenizer, input_pipeline = setup(config, workdir, resumed_tokenizer)
  pmap = config.parallelism.mode == "pmap"
  is_main = jax.process_index() == 0
  seq_len, target_len = config.data.seq_len, _target_len(config)

  # ---------------------------------------------------------------- state
  had_checkpoints = bool(ckpt.steps())
  given_params = None
  if not ckpt.steps() and config.init_from:
    abstract_params = jax.eval_shape(lambda: nn.meta.unbox(
        models.init_params(cfg, jax.random.key(0), 1, seq_len, target_len)))
    given_params = _load_init_params(config, cfg, abstract_params)
  state, state_shardings, tx, model = initial_state(config, cfg, mesh, given_params)
  objective = objectives.for_config(config)
  dpo_reference, dpo_info = None, {}
  if config.objective == "dpo":
    from gptjax.training import preference  # pylint: disable=g-import-not-at-top
    dpo_reference, dpo_info = preference.prepare_reference(
        config, models.make_model(cfg), tokenizer, is_main,
        lambda: given_params if given_params is not None else _load_init_params(config, cfg, None))
  train_iter = input_pipeline.make_train_iterator(config, tokenizer)
  start_step = 0
  if ckpt.steps():
    restored = ckpt.restore(state)
    if restored is not None:
      start_step, state, meta = restored
      _iterator_state_from_json(train_iter, meta["data_state"])
  if is_main:
    resume_check.print_resume(workdir, ckpt, start_step, had_checkpoints, safe_changes)
  data_fp = input_pipeline.data_fingerprint(config)
  unigram = input_pipeline.unigram_loss(config, tokenizer) if config.objective == "next_token" \
      else None
  if is_main:
    if cfg.remat != "none" and jax.default_backend() == "cpu":
      print(f"note: config.model.remat={cfg.remat} recomputes each layer but saves no memory on "
            "XLA:CPU, whose scheduler runs the recomputation early (experiments/PERFORMANCE.md): "
            "expect a slower step and the same peak memory", flush=True)
    if unigram is not None:
      print(f"unigram baseline: loss {unigram:.3f} (the train split's token entropy, nats); "
            "a model that learned anything beyond token frequencies goes below it", flush=True)
    run_records.write_manifest(workdir, config, {
        "unigram_baseline_loss": unigram,
        "tokenizer_fingerprint": tokenizer.fingerprint, "data_fingerprint": data_fp,
        "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
        "resumed_from_step": start_step, **dpo_info}, changes=safe_changes)

  if pmap:
    state = flax.jax_utils.replicate(jax.device_get(state))
    step_fn = train_step.make_pmap_train_step(model, objective, tx, config.seed,
                                              config.train.grad_accum)
    to_device = lambda b: train_step.shard_for_pmap(b)
  else:
    step_fn = train_step.make_mesh_train_step(model, objective, tx, config.seed,
                                              config.train.grad_accum, mesh, state_shardings)
    to_device = lambda b: sharding.global_batch(b, mesh)
  eval_step = train_step.make_eval_step(model, objective)
  eval_batches = None

  def host_state():
    return flax.jax_utils.unreplicate(state) if pmap else state

  def evaluate() -> dict[str, float]:
    nonlocal eval_batches
    if eval_batches is None:
      eval_batches = input_pipeline.make_eval_batches(config, tokenizer, "validation",
                                                      max_batches=config.train.eval_steps)
    params = host_state().params
    total = None
    for b in eval_batches:
      terms = eval_step(params, b if pmap else sharding.global_batch(b, mesh))
      total = terms if total is None else jax.tree.map(jnp.add, total, terms)
    out = {f"eval_{k}": v for k, v in objectives.finalize(jax.device_get(total)).items()}
    if config.objective == "dpo" and config.dpo.kl_prompts > 0:
      from gptjax.training import preference  # pylint: disable=g-import-not-at-top
      ref = dpo_reference if dpo_reference is not None else params["base"]
      kl = preference.heldout_kl(config, tokenizer, models.make_model(cfg),
                                 finetune_state.merged_params(config, params), ref,
                                 preference.heldout_prompts(config, config.dpo.kl_prompts),
                                 seed=config.generate.seed)
      out.update({f"eval_{k}": v for k, v in kl.items()})
    return out

  def save(step: int, metrics: Optional[dict] = None, force: bool = False):
    meta = {"config": config.to_json_best_effort(), "data_state": _iterator_state_to_json(train_iter),
            "tokenizer": tokenizer.to_json(), "step": step, "metrics": metrics or {},
            "data_fingerprint": data_fp}
    ckpt.save(step, host_state(), meta, metrics=metrics, force=force)

  # ---------------------------------------------------------------- loop
  writer = run_records.MetricsWriter(workdir, start_step, enabled=is_main)
  sequences = config.data.batch_size * (2 if config.objective == "dpo" else 1)  # dpo: both responses
  flops_per_step = flops.train_flops_per_example(cfg, seq_len, target_len, config.objective) \
      * sequences
  tokens_per_step = sequences * (seq_len + target_len)
  peak = flops.measure_matmul_peak(jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32,
                                   n=2048, repeats=3)
  steps = config.train.steps
  bar = tqdm.tqdm(total=steps, initial=start_step, disable=not (is_main and config.train.progress),
                  dynamic_ncols=True, desc=f"{config.name}:{config.variant}", file=sys.stdout)
  pending = None  # (step, device metrics) fetched one step late
  last_time, last_step = time.perf_counter(), start_step
  last_good_ckpt = ckpt.steps()[-1] if ckpt.steps() else None
  final_metrics: dict[str, float] = {}
  seen = {"loss_tokens": 0.0}

  schedule = train_step.learning_rate_schedule(config.train)

  def drain(pending_item) -> dict[str, float]:
    """Fetches one step's metrics (already computed: one step late) and checks the loss."""
    step_done, device_metrics = pending_item
    m = _fetch(device_metrics)
    if not math.isfinite(m["loss"]):
      kept = f"the last good checkpoint (step {last_good_ckpt}) is intact" \
          if last_good_ckpt is not None else "no checkpoint had been saved yet"
      raise NonFiniteLoss(f"loss is {m['loss']} at step {step_done}; the run stopped and {kept}: "
                          "lower config.train.learning_rate or check the data")
    seen["loss_tokens"] += m["loss_tokens"]
    return m

  def log(step_done: int, m: dict) -> None:
    """Adds speed over the steps since the last log, writes the record, updates the bar."""
    nonlocal last_time, last_step
    now = time.perf_counter()
    rate_steps = (step_done - last_step) / max(now - last_time, 1e-9)
    last_time, last_step = now, step_done
    m["tokens_per_sec"] = rate_steps * tokens_per_step
    m["mfu"] = rate_steps * flops_per_step / (peak * jax.device_count())
    m["learning_rate"] = float(schedule(step_done - 1))
    writer.write(step_done, m)
    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_sec']:.0f}",
                    mfu=f"{100 * m['mfu']:.0f}%", refresh=False)
    final_metrics.update(m)

  mesh_context = contextlib.nullcontext() if pmap else jax.set_mesh(mesh)
  with _StopSignal() as stop, mesh_context:
    try:
      for step in range(start_step + 1, steps + 1):
        batch = to_device(next(train_iter))
        state, metrics = step_fn(state, batch)
        log_now = step % config.train.log_every == 0 or step == steps
        if pending is not None:
          m = drain(pending)
          pending = None
          if pending_log:
            log(pending_step, m)
        pending, pending_log, pending_step = (step, metrics), log_now, step
        bar.update(1)
        eval_now = config.train.eval_every and (step % config.train.eval_every == 0 or step == steps)
        ckpt_now = step % config.train.ckpt_every == 0 or step == steps or stop.received
        if eval_now or ckpt_now:
          m = drain(pending)
          if pending_log:
            log(step, m)
          pending = None
          eval_metrics = evaluate() if eval_now else None
          if eval_metrics:
            writer.write(step, eval_metrics)
            final_metrics.update(eval_metrics)
            bar.write(f"step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
          save(step, eval_metrics, force=True)
          last_good_ckpt = step
          last_time = time.perf_counter()  # eval and saving are not training speed
        if stop.received:
          ckpt.wait()
          bar.write(f"received {stop.received}: saved checkpoint at step {step}; rerun the same "
                    "command to continue")
          break
      if pending is not None:
        m = drain(pending)
        if pending_log:
          log(pending_step, m)
    except NonFiniteLoss:
      ckpt.wait()
      raise
    finally:
      bar.close()
      ckpt.close()
      writer.close()
  final_metrics["step"] = int(jax.device_get(host_state().step))
  final_metrics["loss_tokens_total"] = seen["loss_tokens"]
  if stop.received:
    final_metrics["stopped_by"] = stop.received
  return final_metrics


# ============================================================================ entry points
def main(config, workdir: str, flag_values) -> None:
  """`run.py --mode=train`: trains, then prints the final metrics (and a sample for decoders)."""
  del flag_values
  try:
    metrics = train_and_evaluate(config, workdir)
  except NonFiniteLoss as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  if metrics.get("stopped_by"):  # saved, not finished: launchers must not count it as done
    sys.exit(4)
  if jax.process_index() == 0:
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(f"done: step {metrics.get('step')}  " + "  ".join(f"{k}={v}" for k, v in shown.items()))
    if config.model.family == "decoder_only" and config.objective == "next_token":
      try:
        from gptjax.inference import generate as generate_cli  # pylint: disable=g-import-not-at-top
        generate_cli.print_training_sample(config, workdir)
      except (ImportError, AttributeError):
        pass


def evaluate_params(config, params, tokenizer, split: str = "validation",
                    max_batches: int = 0) -> dict[str, float]:
  """Eval metrics (loss, perplexity, accuracies) of `params` on `split`, padded batches included."""
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  model = models.make_model(ModelConfig.from_config(config.model))
  eval_step = train_step.make_eval_step(model, objectives.for_config(config))
  total = None
  for b in input_pipeline.make_eval_batches(config, tokenizer, split,
                                            max_batches=max_batches or None):
    terms = eval_step(params, b)
    total = terms if total is None else jax.tree.map(jnp.add, total, terms)
  return objectives.finalize(jax.device_get(total))


def evaluate_main(config, workdir: str, flag_values) -> None:
  """`run.py --mode=eval`: metrics of the latest checkpoint; with --config.quantize=int8 also int8."""
  saved_config, params, tokenizer = checkpointing.restore_for_inference(workdir)
  data_config = resume_check.eval_config(saved_config, config, flag_values)
  metrics = evaluate_params(data_config, params, tokenizer, max_batches=config.train.eval_steps)
  print("float32: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
  if config.quantize == "int8":
    from gptjax.transfer import quantize  # pylint: disable=g-import-not-at-top
    qtree = quantize.quantize_params(params)
    report = quantize.memory_report(params, qtree)
    q_metrics = evaluate_params(data_config, quantize.dequantize(qtree), tokenizer,
                                max_batches=config.train.eval_steps)
    print("int8:    " + "  ".join(f"{k}={v:.4f}" for k, v in q_metrics.items()))
    print(report["summary"])
    print(f"int8 change: loss {q_metrics['loss'] - metrics['loss']:+.4f}")
