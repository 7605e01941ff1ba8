"""What may change when a run resumes from its own checkpoint, and what may not.

A resumed run continues one experiment. Fields that change what the saved state means (the
model, objective, tokenizer, data, optimizer, seeds) must match the checkpoint; changing one is an
error that names the fields. Fields that only steer the rest of the run (how long, how often to
log/eval/save, the learning-rate schedule from the restored step on, how the work is spread over
devices) may change, and each change is recorded in manifest.json's `history`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from flax import traverse_util

from gptjax.training import checkpointing

from gptjax.training import run_records
from gptjax import config_schema
from gptjax.config_schema import ConfigError

# Dotted prefixes that may differ on resume. Everything else must match the checkpoint.
SAFE_PREFIXES = (
    "name", "variant", "init_from", "quantize", "generate.", "parallelism.",
    "train.steps", "train.log_every", "train.eval_every", "train.eval_steps", "train.ckpt_every",
    "train.keep", "train.best_metric", "train.progress", "train.grad_accum",
    # the learning-rate schedule and the update's clipping and decay: they hold no state and
    # apply from the restored step on (b1/b2 would change what the saved moments mean)
    "train.learning_rate", "train.warmup_steps", "train.schedule", "train.decay_steps",
    "train.min_lr_ratio", "train.grad_clip", "train.weight_decay",
    # where files are, not what they hold (the data fingerprint guards their content)
    "data.raw_dir", "data.tfds_data_dir", "data.eval_batch_size",
    # how a layer is computed, not what it computes
    "model.remat", "model.attention_impl", "model.kernels", "model.kernel_exclude",
)
# Fields older checkpoints saved that no longer exist (they never changed what a run computed).
REMOVED_FIELDS = ("data.pack", "data.num_workers")
SCHEDULE_FIELDS = ("train.learning_rate", "train.warmup_steps", "train.schedule",
                   "train.decay_steps", "train.min_lr_ratio")


def flatten(tree: Any) -> dict[str, Any]:
  """{'model.num_layers': 2, ...} of a config given as ConfigDict, dict or JSON text."""
  if isinstance(tree, str):
    tree = json.loads(tree)
  elif hasattr(tree, "to_json_best_effort"):
    tree = json.loads(tree.to_json_best_effort())
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in traverse_util.flatten_dict(tree, sep=".").items()}


def _is_safe(field: str) -> bool:
  return any(field == p or (p.endswith(".") and field.startswith(p)) for p in SAFE_PREFIXES)


def config_changes(saved: Any, requested: Any) -> tuple[dict, dict]:
  """(unsafe, safe): {field: [saved value, requested value]} for every field that differs."""
  a, b = flatten(saved), flatten(requested)
  for field in REMOVED_FIELDS:
    if field not in b:
      a.pop(field, None)
  for field, value in config_schema.ADDED_FIELDS.items():
    a.setdefault(field, value)
  unsafe, safe = {}, {}
  for field in sorted(set(a) | set(b)):
    old, new = a.get(field, "<absent>"), b.get(field, "<absent>")
    if old != new:
      (safe if _is_safe(field) else unsafe)[field] = [old, new]
  return unsafe, safe


def check_resume(saved: Any, requested: Any, workdir: str, step: int) -> dict:
  """Raises one-line ConfigError if `requested` changes what the checkpoint at `step` means.

  Returns the safe changes ({field: [old, new]}) for the manifest's history.
  """
  unsafe, safe = config_changes(saved, requested)
  if unsafe:
    shown = ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in list(unsafe.items())[:6])
    more = f" (and {len(unsafe) - 6} more)" if len(unsafe) > 6 else ""
    raise ConfigError(
        f"--workdir={workdir} holds a run at step {step} whose config differs in {shown}{more}; "
        "a resumed run cannot change these: use a new --workdir (add --config.init_from="
        f"{workdir} to start from its weights), or drop these overrides to continue it")
  return safe


def data_changed_error(workdir: str, step: int, saved_fp: str, current_fp: str) -> ConfigError:
  """The one line for a corpus whose raw files changed under a run being resumed."""
  return ConfigError(
      f"--workdir={workdir} was trained to step {step} on corpus files with fingerprint "
      f"{saved_fp}, but they now have {current_fp} (edited, added or removed); use a new "
      f"--workdir (with --config.init_from={workdir} to keep the weights) or restore the files")


def has_saved_step(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds at least one saved step."""
  root = checkpointing.checkpoint_dir(workdir)
  return os.path.isdir(root) and any(n.isdigit() for n in os.listdir(root))


def check_init_from(source: str) -> None:
  """One line, before anything is written, when `config.init_from` names nothing usable."""
  if source.startswith("hf:"):
    if not os.path.isfile(os.path.join(source[3:], "config.json")):
      raise ConfigError(f"config.init_from={source!r} has no config.json; give a Hugging Face "
                        "folder (config.json + model.safetensors)")
    return
  if not has_saved_step(source):
    raise ConfigError(f"config.init_from={source!r} has no checkpoints/ folder with a saved step; "
                      "give a trained gptjax workdir or hf:DIR")


def resume_plan(config, workdir: str, ckpt) -> tuple[Optional[dict], dict]:
  """(meta of the newest checkpoint whose meta reads, safe config changes) before anything compiles.

  Raises one-line ConfigError when the requested config or the corpus files differ from the
  checkpoint's in a way that would change what the run means (gptjax/py).
  """
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  steps = ckpt.steps()
  if not steps:
    if config.init_from:
      check_init_from(config.init_from)
    return None, {}
  meta = None
  for s in reversed(steps):
    try:
      meta = ckpt.restore_meta(s)
      break
    except Exception:  # pylint: disable=broad-except
      continue  # ckpt.restore reports it and sets it aside
  saved = meta["config"] if meta else run_records.read_manifest(workdir).get("config")
  step = meta["step"] if meta else steps[-1]
  safe = check_resume(saved, config, workdir, step) if saved else {}
  saved_fp = (meta or {}).get("data_fingerprint")
  if saved_fp:
    current_fp = input_pipeline.data_fingerprint(config)
    if current_fp != saved_fp:
      raise data_changed_error(workdir, step, saved_fp, current_fp)
  return meta, safe


def print_resume(workdir: str, ckpt, start_step: int, had_checkpoints: bool, changes: dict):
  """One line on where the run starts, when the user should know: resumed, set aside, changed."""
  notes = [f"moved the unreadable checkpoint of step {s} to {dst} ({why})"
           for s, why, dst in ckpt.set_aside]
  notes += [f"set aside an incomplete save of step {s}" for s in ckpt.incomplete_saves]
  if changes:
    notes.append("changed " + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in changes.items()))
  if start_step:
    print(f"resumed from {checkpointing.checkpoint_dir(workdir)} at step {start_step}"
          + "".join(f"; {n}" for n in notes), flush=True)
  elif had_checkpoints:
    print(f"warning: no checkpoint in {checkpointing.checkpoint_dir(workdir)} is readable; "
          "starting from step 0" + "".join(f"; {n}" for n in notes), flush=True)
  elif notes:
    print("; ".join(notes), flush=True)


def eval_config(saved_config, config, flag_values=None):
  """The checkpoint's config with the command line's data paths and explicit --config.data.* values.

  Paths (raw_dir, tfds_data_dir) always come from the command line, so eval reads and writes
  where this machine keeps data, never where the training machine did; other data fields come
  from the command line when given there (the tokenizer stays the checkpoint's).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  result = ml_collections.ConfigDict(saved_config.to_dict())
  explicit = set()
  try:
    from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
    explicit = set(config_flags.get_override_values(flag_values["config"]))
  except (AttributeError, KeyError, TypeError):
    pass
  flat = flatten(config)
  for field, value in flat.items():
    if not field.startswith("data.") or field.startswith("data.tokenizer."):
      continue
    if field in ("data.raw_dir", "data.tfds_data_dir") or field in explicit:
      *parents, leaf = field.split(".")
      node = result
      for p in parents:
        node = node[p]
      node[leaf] = tuple(map(tuple, value)) if isinstance(value, list) else value
  return result
