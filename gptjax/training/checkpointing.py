"""Orbax checkpoints: train state, data-iterator state, config and tokenizer saved together.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `meta` is JSON: the config, the
grain iterator state, the tokenizer, the metrics at that step and `arrays`: the path,
shape, dtype and CRC-32 of every saved array. Restoring checks the state's shapes
against `arrays` before reading (a different shape is a config error, not corruption)
and every array's CRC after; a checkpoint that fails to read or to match is set aside.
The last `keep` checkpoints and the best one by `config.train.best_metric` are kept.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import zlib
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from gptjax import config_schema
from gptjax.config_schema import ConfigError

_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_TMP_SAVE = re.compile(r"^(\d+)\.orbax-checkpoint-tmp$")


def _short(e: Exception) -> str:
  """An exception as a few words: its type and the first line of its message."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def _crc32(array) -> int:
  return zlib.crc32(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


def array_checksums(state: Any) -> Optional[dict[str, list]]:
  """{path: [shape, dtype, crc32]} of every array in `state` (None when not all on this host)."""
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  if any(not getattr(x, "is_fully_addressable", True) for _, x in leaves):
    return None  # multi-host shards: orbax's own per-chunk checks are all there is
  host = jax.device_get([x for _, x in leaves])
  with concurrent.futures.ThreadPoolExecutor(4) as pool:  # zlib releases the GIL
    crcs = list(pool.map(_crc32, host))
  return {jax.tree_util.keystr(k): [list(np.shape(h)), str(np.asarray(h).dtype), c]
          for (k, _), h, c in zip(leaves, host, crcs)}


def _shape_mismatch(abstract_state: Any, arrays: dict) -> Optional[str]:
  """The first array whose path or shape differs between the saved `arrays` and `abstract_state`."""
  want = {jax.tree_util.keystr(k): list(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  for name, shape in want.items():
    if name not in arrays:
      return f"{name} is not in the checkpoint"
    if arrays[name][0] != shape:
      return f"{name} has shape {tuple(arrays[name][0])} there, {tuple(shape)} here"
  extra = sorted(set(arrays) - set(want))
  return f"{extra[0]} is in the checkpoint but not in this model" if extra else None


def _checksum_failure(state: Any, arrays: dict) -> Optional[str]:
  """The first restored array whose CRC-32 differs from the one saved with it."""
  got = array_checksums(state)
  if got is None:
    return None
  for name, (_, _, crc) in got.items():
    if name in arrays and arrays[name][2] != crc:
      return f"array {name} does not match its saved checksum"
  return None


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
    ckpt_root = checkpoint_dir(workdir)
    # saves a kill cut short (orbax removes them when that step is saved again)
    self.incomplete_saves = sorted(int(m.group(1)) for m in map(
        _TMP_SAVE.match, os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []) if m)
    self.set_aside: list[tuple[int, str, str]] = []
    self.manager = ocp.CheckpointManager(ckpt_root, options=options, item_names=("state", "meta"))

  def save(self, step: int, state: Any, meta: dict, metrics: Optional[dict] = None,
           force: bool = False) -> bool:
    """Starts saving `state` and `meta` at `step` (returns at once; the write is async)."""
    if metrics is not None and self.best_metric not in metrics:
      metrics = None
    meta = dict(meta, arrays=array_checksums(state))
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics,
        force=force)

  def steps(self) -> list[int]:
    """Saved steps, oldest first."""
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state: Any, step: Optional[int] = None):
    """Restores the newest readable checkpoint (or `step`): (step, state, meta), or None if none.

    A checkpoint that fails to read or to match its checksums gets one line and the previous one
    is tried, so a latest checkpoint cut short by a crash never costs the run. Unless read-only,
    the unreadable one is moved (never deleted) to WORKDIR/corrupt_checkpoints/<step>. A state of
    another shape is a ConfigError: the config or the code changed, the files are fine.
    """
    if not self.read_only and step is None:
      for s in self.incomplete_saves:  # a kill during a save left its temporary folder
        self._set_aside(s, f"{s}{_TMP_SUFFIX}", f"{s}.incomplete")
    candidates = [step] if step is not None else list(reversed(self.steps()))
    for s in candidates:
      try:
        meta = self.restore_meta(s)
      except Exception as e:  # pylint: disable=broad-except
        self._unreadable(s, f"its meta cannot be read: {_short(e)}", step is None)
        continue
      arrays = meta.get("arrays") or {}
      if arrays:
        mismatch = _shape_mismatch(abstract_state, arrays)
        if mismatch:
          raise ConfigError(f"the checkpoint at step {s} in {self.workdir} does not fit this "
                            f"model ({mismatch}); use a new --workdir, or --config.init_from="
                            f"{self.workdir} to start from its weights")
      try:
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
      except Exception as e:  # pylint: disable=broad-except
        self._unreadable(s, _short(e), step is None)
        continue
      failure = _checksum_failure(restored["state"], arrays) if arrays else None
      if failure:
        self._unreadable(s, failure, step is None)
        continue
      return s, restored["state"], meta
    return None

  def _unreadable(self, step: int, why: str, set_aside: bool) -> None:
    """A checkpoint that cannot be used: one line when read-only, else moved aside and listed in
    `self.set_aside` (the trainer reports it in its one resume line)."""
    if self.read_only or not set_aside:
      earlier = [s for s in self.steps() if s < step]
      nxt = f"trying step {earlier[-1]}" if earlier else "no earlier checkpoint"
      print(f"warning: checkpoint at step {step} is unreadable ({why}); {nxt}", flush=True)
      return
    self.set_aside.append((step, why, self._set_aside(step)))

  def _set_aside(self, step: int, name: str = "", dst_name: str = "") -> str:
    """Moves an unreadable checkpoint out of the manager's directory, keeping its files."""
    src = os.path.join(checkpoint_dir(self.workdir), name or str(step))
    if not os.path.isdir(src) or jax.process_index() != 0:
      return src
    dst_root = os.path.join(self.workdir, "corrupt_checkpoints")
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, dst_name or str(step))
    n = 1
    while os.path.exists(dst):
      dst, n = os.path.join(dst_root, f"{dst_name or step}.{n}"), n + 1
    os.rename(src, dst)
    self.manager.reload()
    return dst

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
  """The config a checkpoint was trained with (fields added since then: the value it used)."""
  return config_schema.with_added_fields(ml_collections.ConfigDict(json.loads(meta["config"])))


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` has a checkpoint folder with anything in it."""
  return os.path.isdir(checkpoint_dir(workdir)) and bool(os.listdir(checkpoint_dir(workdir)))


def restore_for_inference(workdir: str, step: Optional[int] = None):
  """(config, params, tokenizer) from the latest checkpoint of `workdir` (or the one at `step`),
  params unsharded float32."""
  from gptjax.transfer import trainable as finetune_state  # pylint: disable=g-import-not-at-top
  from gptjax.data import tokenization
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  if not has_checkpoint(workdir):
    raise FileNotFoundError(f"no checkpoint in {workdir}; train first with --mode=train "
                            f"--workdir={workdir}")
  ckpt = Checkpointer(workdir, read_only=True, async_save=False)
  steps = ckpt.steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {workdir}; train first with --mode=train")
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint at step {step} in {workdir}; its steps: "
                              f"{', '.join(map(str, steps))}")
    steps = [step]
  meta = None
  for s in reversed(steps):
    try:
      meta = ckpt.restore_meta(s)
      break
    except Exception as e:  # pylint: disable=broad-except
      print(f"warning: checkpoint at step {s} is unreadable (its meta: {_short(e)}); trying the "
            "previous one", flush=True)
  if meta is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}")
  config = config_from_meta(meta)
  cfg = ModelConfig.from_config(config.model)
  abstract, _ = finetune_state.abstract_state(config, cfg, 8, 8)  # shapes need no real lengths
  restored = None
  for s in reversed([s for s in steps if s <= meta["step"]]):
    restored = ckpt.restore(abstract, step=s)
    if restored is not None:
      break
  if restored is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir}")
  result = finetune_state.merged_params(config, restored[1].params)
  meta = restored[2]
  tokenizer = tokenization.tokenizer_from_json(meta["tokenizer"]) if meta.get("tokenizer") else \
      tokenization.load_or_train_tokenizer(config, workdir)
  return config, result, tokenizer
