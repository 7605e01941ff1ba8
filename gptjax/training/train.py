"""Setting up a training run (state, resume, manifest) and the `run.py --mode=train` / `--mode=eval` entry points; the loop itself is gptjax/training/trainer.py."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax import config_schema
from gptjax.config_schema import ConfigError
from gptjax.model import models
from gptjax.model.config import ModelConfig
from gptjax.training import (checkpointing, objectives, resume_check, run_records, sharding,
                             train_step, trainer, workdir_guard)
from gptjax.training.trainer import NonFiniteLoss, evaluate_params  # pylint: disable=unused-import
from gptjax.transfer import trainable as finetune_state


def _load_init_params(config, cfg: ModelConfig) -> Any:
  """Parameters named by `config.init_from`: a gptjax workdir or `hf:DIR`."""
  source, seq_len, target_len = config.init_from, config.data.seq_len, config_schema.target_len(config)
  if source.startswith("hf:"):
    from gptjax.transfer import hf_import  # pylint: disable=g-import-not-at-top
    abstract_params = jax.eval_shape(lambda: nn.meta.unbox(
        models.init_params(cfg, jax.random.key(0), 1, seq_len, target_len)))
    return hf_import.load_init_params(source, cfg, abstract_params)
  if not os.path.isdir(checkpointing.checkpoint_dir(source)):
    raise ConfigError(f"config.init_from={source!r} has no checkpoints/ folder; give a gptjax "
                      "workdir or hf:DIR")
  _, params, _ = checkpointing.restore_for_inference(source)
  params = jax.device_get(params)
  fresh = jax.device_get(train_step.run_once(lambda: nn.meta.unbox(models.init_params(
      cfg, jax.random.key(config.seed), 1, seq_len, target_len))))
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
  seq_len, target_len = config.data.seq_len, config_schema.target_len(config)
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

  state = train_step.run_once(init, jax.random.key(config.seed), given_params,
                              out_shardings=shardings)
  return state, shardings, tx, model


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
    return trainer.Trainer(build_run(config, workdir)).run()


def build_run(config, workdir: str) -> trainer.Run:
  """Checks the resume, builds or restores the state and writes the manifest (workdir locked)."""
  ckpt = checkpointing.Checkpointer(workdir, config.train.keep, config.train.best_metric)
  meta, safe_changes = resume_check.resume_plan(config, workdir, ckpt)
  from gptjax.data import tokenization  # pylint: disable=g-import-not-at-top
  resumed_tokenizer = tokenization.tokenizer_from_json(meta["tokenizer"]) \
      if meta and meta.get("tokenizer") else None
  cfg, mesh, tokenizer, input_pipeline = setup(config, workdir, resumed_tokenizer)
  had_checkpoints = bool(ckpt.steps())
  given_params = None
  if not had_checkpoints and config.init_from:
    given_params = _load_init_params(config, cfg)
  state, state_shardings, tx, model = initial_state(config, cfg, mesh, given_params)
  reference, reference_info = _preference_reference(config, cfg, tokenizer, given_params)
  train_iter = input_pipeline.make_train_iterator(config, tokenizer)
  start_step = 0
  restored = ckpt.restore(state) if had_checkpoints else None
  if restored is not None:
    start_step, state, meta = restored
    trainer.iterator_state_from_json(train_iter, meta["data_state"])
  run = trainer.Run(config=config, workdir=workdir, cfg=cfg, mesh=mesh, tokenizer=tokenizer,
                    input_pipeline=input_pipeline, ckpt=ckpt, state=state,
                    state_shardings=state_shardings, tx=tx, model=model, train_iter=train_iter,
                    start_step=start_step, data_fingerprint=input_pipeline.data_fingerprint(config),
                    preference_reference=reference)
  if jax.process_index() == 0:
    resume_check.print_resume(workdir, ckpt, start_step, had_checkpoints, safe_changes)
    _announce(run, reference_info, safe_changes)
  return run


def _preference_reference(config, cfg: ModelConfig, tokenizer, given_params):
  """(frozen reference params or None, manifest fields) for a preference objective."""
  if not objectives.spec_of(config).preference:
    return None, {}
  from gptjax.training import preference  # pylint: disable=g-import-not-at-top
  return preference.prepare_reference(
      config, models.make_model(cfg), tokenizer, jax.process_index() == 0,
      lambda: given_params if given_params is not None else _load_init_params(config, cfg))


def _announce(run: trainer.Run, extra: dict, safe_changes: dict) -> None:
  """Prints the notes a user should see before the first step and writes manifest.json."""
  config, cfg = run.config, run.cfg
  unigram = run.input_pipeline.unigram_loss(config, run.tokenizer) \
      if objectives.spec_of(config).unigram_baseline else None
  if cfg.remat != "none" and jax.default_backend() == "cpu":
    print(f"note: config.model.remat={cfg.remat} recomputes each layer but saves no memory on "
          "XLA:CPU, whose scheduler runs the recomputation early (experiments/PERFORMANCE.md): "
          "expect a slower step and the same peak memory", flush=True)
  if unigram is not None:
    print(f"unigram baseline: loss {unigram:.3f} (the train split's token entropy, nats); "
          "a model that learned anything beyond token frequencies goes below it", flush=True)
  run_records.write_manifest(run.workdir, config, {
      "unigram_baseline_loss": unigram,
      "tokenizer_fingerprint": run.tokenizer.fingerprint, "data_fingerprint": run.data_fingerprint,
      "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(run.state.params))),
      "resumed_from_step": run.start_step, **extra}, changes=safe_changes)


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
    if config.objective == "next_token":  # only decoder-only models train next_token
      try:
        from gptjax.inference import generate as generate_cli  # pylint: disable=g-import-not-at-top
        generate_cli.print_training_sample(config, workdir)
      except (ImportError, AttributeError):
        pass


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
