"""The sweep's in-process launcher (--cluster=inprocess): runs one after another in this process.

No submitit job and no run.py start-up per run, so a smoke sweep of tiny models costs its
compiles and steps only. Each run still gets WORKDIR/train.log and WORKDIR/sweep_result.json
with run.py's exit codes, so the registry, the skip on re-run and the retries work as for the
other launchers.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from gptjax.config_schema import ConfigError
from experiments.sweep_registry import write_result


def train_in_process(config, workdir: str) -> dict[str, Any]:
  """Trains `config` in this process (--cluster=inprocess), output to WORKDIR/train.log; writes
  WORKDIR/sweep_result.json with run.py's exit codes (2 bad config, 4 stopped before the end)."""
  from gptjax.training import train  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  config = config.copy_and_resolve_references()
  config.train.progress = False
  with open(os.path.join(workdir, "train.log"), "a", encoding="utf-8") as log, \
      contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    try:
      metrics = train.train_and_evaluate(config, workdir)
      returncode = 4 if metrics.get("stopped_by") else 0
    except ConfigError as e:
      print(f"error: {e}")
      returncode = 2
    except Exception as e:  # pylint: disable=broad-except  (recorded as a failed run, as run.py's)
      print(f"error: {type(e).__name__}: {' '.join(str(e).split())[:500]}")
      returncode = 1
  return write_result(workdir, returncode, start)


class InProcessExecutor:
  """submitit's executor interface for --cluster=inprocess: `submit` runs the job at once, here."""

  class Job:
    """A finished in-process job: job_id, done() and result() as a submitit job has them."""

    def __init__(self, job_id: str, fn, args):
      self.job_id = job_id
      self._result, self._error = None, None
      try:
        self._result = fn(*args)
      except Exception as e:  # pylint: disable=broad-except  (raised again by result())
        self._error = e

    def done(self) -> bool:
      return True

    def result(self):
      if self._error is not None:
        raise self._error
      return self._result

  def __init__(self):
    self._submitted = 0

  def submit(self, fn, *args) -> "InProcessExecutor.Job":
    self._submitted += 1
    return InProcessExecutor.Job(f"inprocess-{self._submitted}", fn, args)
