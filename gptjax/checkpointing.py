"""Orbax checkpoints: train state, data-iterator state, config and tokenizer saved together.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `meta` is JSON: the config, the
grain iterator state, the tokenizer and the metrics at that step. The last
`keep` checkpoints and the best one by `config.train.best_metric` are kept.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from gptjax.config_schema import ConfigError


def checkpoint_dir(workdir: str) -> str:
  """Where a workdir keeps its checkpoints."""
  return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
  """Saves (async) and restores TrainState + meta; falls back past a corrupt latest checkpoint."""

  def __init__(self, workdir: str, keep: int = 3, best_metric: str = "eval_loss",
               async_save: bool = True, read_only: bool = False):
    self.best_metric = best_metric
    self.workdir = os.path.abspath(workdir)
    self.read_only = read_only
    policies = [ocp.checkpoint_managers.LatestN(n=max(keep, 1))]
    if best_metric:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                         item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict] = None,
           force: bool = False) -> bool:
    """Starts saving `state` and `meta` at `step` (returns at once; the write is async)."""
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics,
        force=force)

  def steps(self) -> list[int]:
    """Saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state: Any, step: Optional[int] = None):
    """Restores the newest readable checkpoint (or `step`): (step, state, meta), or None if none.

    A checkpoint that fails to read is reported and the previous one is tried, so a latest
    checkpoint cut short by a crash never costs the run. Unless read-only, the unreadable one is
    moved (never deleted) to WORKDIR/corrupt_checkpoints/<step> so the run can save that step again.
    """
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for s in candidates:
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return s, restored["state"], restored["meta"]
      except Exception as e:  # pylint: disable=broad-except
        message = " ".join(str(e).split())[:200]
        logging.warning("checkpoint at step %d is unreadable (%s); trying the previous one", s,
                        message)
        print(f"warning: checkpoint at step {s} is incomplete or corrupt ({type(e).__name__}); "
              "restoring the previous one", flush=True)
        if not self.read_only and step is None:
          self._set_aside(s)
    return None

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable checkpoint out of the manager's directory, keeping its files."""
    src = os.path.join(checkpoint_dir(self.workdir), str(step))
    if not os.path.isdir(src) or jax.process_index() != 0:
      return
    dst_root = os.path.join(self.workdir, "corrupt_checkpoints")
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, str(step))
    n = 1
    while os.path.exists(dst):
      dst, n = os.path.join(dst_root, f"{step}.{n}"), n + 1
    os.rename(src, dst)
    print(f"warning: moved the unreadable checkpoint to {dst}", flush=True)
    self.manager.reload()

  def restore_meta(self, step: int) -> dict:
    """Only the JSON meta of a checkpoint."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with."""
  return ml_collections.ConfigDict(json.loads(meta["config"]))


def restore_for_inference(workdir: str):
  """(config, params, tokenizer) from the latest checkpoint of `workdir`, params unsharded float32."""
  from gptjax import finetune_state, tokenization  # pylint: disable=g-import-not-at-top
  from gptjax.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(checkpoint_dir(workdir)) or not os.listdir(checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoint in {workdir}; train first with --mode=train "
                            f"--workdir={workdir}")
  ckpt = Checkpointer(workdir, read_only=True, async_save=False)
  steps = ckpt.steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {workdir}; train first with --mode=train")
  meta = None
  for s in reversed(steps):
    try:
      meta = ckpt.restore_meta(s)
      break
    except Exception:  # pylint: disable=broad-except
      continue
  if meta is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}")
  config = config_from_meta(meta)
  cfg = ModelConfig.from_config(config.model)
  target_len = config.data.target_len if cfg.family == "encoder_decoder" else 0
  abstract, _ = finetune_state.abstract_state(config, cfg, 8, target_len or 8)
  result = None
  for s in reversed(steps):
    try:
      restored = ckpt.manager.restore(s, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
      result = finetune_state.merged_params(config, restored["state"].params)
      break
    except Exception as e:  # pylint: disable=broad-except
      print(f"warning: checkpoint at step {s} is unreadable ({type(e).__name__}); trying the "
            "previous one", flush=True)
  if result is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}")
  tokenizer = tokenization.tokenizer_from_json(meta["tokenizer"]) if meta.get("tokenizer") else \
      tokenization.load_or_train_tokenizer(config, workdir)
  return config, result, tokenizer


def check_same_shapes(expected: Any, given: Any, source: str) -> None:
  """One line naming the first parameter whose shape differs between two trees."""
  exp = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(given)[0]}
  for name, shape in exp.items():
    if name not in got:
      raise ConfigError(f"{source} has no parameter {name}; its architecture differs from config.model")
    if tuple(got[name]) != tuple(shape):
      raise ConfigError(f"{source}: parameter {name} has shape {tuple(got[name])}, config.model "
                        f"needs {tuple(shape)}; make the model config match the checkpoint")
