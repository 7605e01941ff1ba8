"""Runs recorded as WORKDIR/result.json once finished, so experiment scripts skip them on re-run."""

import json
import os
import time
from typing import Callable


def cached(workdir: str, label: str, compute: Callable[[], dict],
           report: Callable[[dict], str] = lambda r: "") -> dict:
  """`compute()` (plus wall_s) stored in WORKDIR/result.json; read back instead when it is there.

  A fresh result is announced as "  <label>: <report(result)>".
  """
  done = os.path.join(workdir, "result.json")
  if os.path.exists(done):
    print(f"  {label}: done before, skipped", flush=True)
    with open(done) as f:
      return json.load(f)
  start = time.time()
  result = compute()
  result["wall_s"] = time.time() - start
  write_result(workdir, result)
  print(f"  {label}: {report(result)}", flush=True)
  return result


def write_result(workdir: str, result: dict) -> None:
  """Writes WORKDIR/result.json atomically (a kill leaves the old file or the new one)."""
  os.makedirs(workdir, exist_ok=True)
  done = os.path.join(workdir, "result.json")
  with open(done + ".tmp", "w") as f:
    json.dump(result, f)
  os.replace(done + ".tmp", done)


def train_and_measure(config, workdir: str, label: str, report: Callable[[dict], str],
                      measure: Callable[[dict], dict], marker: str) -> dict:
  """A probe: `config` trained once in WORKDIR, then `measure(result)` added to its result.json once.

  `marker` is a key that `measure` adds: a result that has it was measured before.
  """
  result = cached(workdir, label, lambda: train_to_end(config, workdir, label), report)
  if marker not in result:
    result.update(measure(result))
    write_result(workdir, result)
  return result


def train_to_end(config, workdir: str, label: str) -> dict:
  """Final metrics of training `config` in `workdir`; exits if the run stopped before its last step.

  A run stopped by a signal has saved a checkpoint but is not a result: it is never recorded.
  """
  from gptjax.training import train  # pylint: disable=g-import-not-at-top
  metrics = train.train_and_evaluate(config, workdir)
  if metrics.get("stopped_by") or metrics["step"] < config.train.steps:
    raise SystemExit(f"{label} in {workdir} stopped at step {metrics['step']} "
                     f"({metrics.get('stopped_by', 'early')}); rerun to continue it")
  return metrics
