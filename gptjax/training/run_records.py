"""What a run leaves behind besides checkpoints: metrics.jsonl, TensorBoard events, the manifest."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
from typing import Any, Optional

import jax


def git_commit() -> str:
  """The commit of the gptjax checkout, with '+dirty' when it has local changes."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                            check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def fingerprint_text(text: str) -> str:
  """A short sha256 of a string."""
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(workdir: str) -> dict:
  """WORKDIR/manifest.json as a dict ({} when absent or unreadable)."""
  try:
    with open(os.path.join(workdir, "manifest.json")) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def write_manifest(workdir: str, config, extra: dict[str, Any],
                   changes: Optional[dict] = None) -> str:
  """Writes WORKDIR/manifest.json: config, commit, versions, devices, data and tokenizer fingerprints.

  A resumed run keeps what the first start recorded, sets `config` to the config now running and
  appends to `history` when it started, from which step, and the fields it changed
  (`changes`: {field: [old, new]}, the ones gptjax/training/resume_check.py allows).
  """
  path = os.path.join(workdir, "manifest.json")
  import flax, optax, orbax.checkpoint, grain  # pylint: disable=g-import-not-at-top,multiple-imports
  now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  record = {
      "started": now,
      "command": " ".join(sys.argv),
      "config": json.loads(config.to_json_best_effort()),
      "git_commit": git_commit(),
      "versions": {"python": platform.python_version(), "jax": jax.__version__,
                   "flax": flax.__version__, "optax": optax.__version__,
                   "orbax": orbax.checkpoint.__version__, "grain": getattr(grain, "__version__", "?")},
      "devices": {"platform": jax.default_backend(), "count": jax.device_count(),
                  "processes": jax.process_count(),
                  "kinds": sorted({d.device_kind for d in jax.devices()})},
      "host": platform.node(),
      **extra,
  }
  old = read_manifest(workdir)
  if old:
    old.setdefault("history", []).append({
        "started": now, "git_commit": record["git_commit"], "command": record["command"],
        "from_step": extra.get("resumed_from_step", 0), "changed": changes or {}})
    old["config"] = record["config"]
    record = old
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=2)
  os.replace(tmp, path)
  return path


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    self._truncate_after(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      self._tb = None

  def _truncate_after(self, step: int) -> None:
    """On resume, drop records past the restored step so the file reads like one straight run.

    Records are never dropped at or below `step`: a run starting over at step 0 in a workdir with
    a history moves that history aside to metrics.before_restart[.N].jsonl.
    """
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      lines = [ln for ln in f if ln.strip()]
    if step == 0 and lines:
      dst, n = os.path.join(os.path.dirname(self.path), "metrics.before_restart.jsonl"), 1
      while os.path.exists(dst):
        dst, n = os.path.join(os.path.dirname(self.path), f"metrics.before_restart.{n}.jsonl"), n + 1
      os.replace(self.path, dst)
      print(f"note: this run starts at step 0; the earlier metrics.jsonl is kept as {dst}",
            flush=True)
      return
    keep = []
    for ln in lines:
      try:
        if json.loads(ln).get("step", 0) <= step:
          keep.append(ln)
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(keep)

  def write(self, step: int, metrics: dict[str, Any], prefix: Optional[str] = None) -> None:
    """Records `metrics` at `step`; floats only go to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": int(step), **{k: (float(v) if hasattr(v, "__float__") else v)
                                    for k, v in metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, float):
          self._tb.add_scalar(f"{prefix}/{k}" if prefix else k, v, int(step))

  def close(self) -> None:
    """Flushes and closes the files."""
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()
