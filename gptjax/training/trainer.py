"""The train loop as a small Trainer (after nanodo's): step, evaluate, save and log as methods.

A step's metrics stay on the device until the next step has been dispatched; `drain` then
fetches them (one host sync per step, while the device already runs the next one), checks the
loss is finite, counts the tokens that carried loss and logs the step when it is due. `run`
is the loop: steps, evals, checkpoints, the stop signal, and nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from typing import Any, Callable, Optional

import flax.jax_utils
import jax
import jax.numpy as jnp
import tqdm

from gptjax import config_schema
from gptjax.model import models
from gptjax.model.config import ModelConfig
from gptjax.training import flops, objectives, peak_flops, run_records, sharding, train_step
from gptjax.transfer import trainable as finetune_state


class NonFiniteLoss(RuntimeError):
  """The loss became NaN or Inf."""


class StopSignal:
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


def iterator_state_to_json(it) -> str:
  """The grain iterator's position as text for a checkpoint's meta."""
  state = it.get_state()
  return state.decode() if isinstance(state, bytes) else json.dumps(state)


def iterator_state_from_json(it, text: str) -> None:
  """Puts the grain iterator back where `iterator_state_to_json` found it."""
  current = it.get_state()
  it.set_state(text.encode() if isinstance(current, bytes) else json.loads(text))


def evaluate_params(config, params, tokenizer, split: str = "validation", max_batches: int = 0, *,
                    eval_step: Optional[Callable] = None, batches: Optional[list] = None,
                    place: Callable[[dict], dict] = lambda b: b) -> dict[str, float]:
  """Eval metrics (loss, perplexity, accuracies) of `params` on `split`, padded batches included.

  A Trainer passes its compiled `eval_step`, its cached `batches` and how to `place` a batch on
  its devices; other callers get the plain model's step and `split`'s batches.
  """
  if eval_step is None:
    model = models.make_model(ModelConfig.from_config(config.model))
    eval_step = train_step.make_eval_step(model, objectives.for_config(config))
  if batches is None:
    from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
    batches = input_pipeline.make_eval_batches(config, tokenizer, split,
                                               max_batches=max_batches or None)
  total = None
  for b in batches:
    terms = eval_step(params, place(b))
    total = terms if total is None else jax.tree.map(jnp.add, total, terms)
  return objectives.finalize(jax.device_get(total))


@dataclasses.dataclass
class Run:
  """Everything `train.build_run` prepared: the state (restored or fresh) and what it runs on."""
  config: Any
  workdir: str
  cfg: ModelConfig
  mesh: Any
  tokenizer: Any
  input_pipeline: Any
  ckpt: Any  # checkpointing.Checkpointer
  state: Any
  state_shardings: Any
  tx: Any
  model: Any  # the network; LoRA runs merge their adapters inside the objective
  train_iter: Any
  start_step: int
  data_fingerprint: str
  preference_reference: Any = None  # the frozen reference's params for preference objectives


class Trainer:
  """Trains one `Run` from its start step to `config.train.steps`."""

  def __init__(self, run: Run):
    self.run_parts, self.config = run, run.config
    c, self.is_main = run.config, jax.process_index() == 0
    self.pmap = c.parallelism.mode == "pmap"
    self.spec = objectives.spec_of(c)
    self.state, self.ckpt, self.train_iter = run.state, run.ckpt, run.train_iter
    objective = finetune_state.lora_objective(c, objectives.for_config(c))
    if self.pmap:
      self.state = flax.jax_utils.replicate(jax.device_get(self.state))
      self._step_fn = train_step.make_pmap_train_step(run.model, objective, run.tx, c.seed,
                                                      c.train.grad_accum)
      self._place = train_step.shard_for_pmap
    else:
      self._step_fn = train_step.make_mesh_train_step(run.model, objective, run.tx, c.seed,
                                                      c.train.grad_accum, run.mesh,
                                                      run.state_shardings)
      self._place = lambda b: sharding.global_batch(b, run.mesh)
    self._eval_step = train_step.make_eval_step(run.model, objective)
    self._eval_batches = None
    self._init_reporting(run)

  def _init_reporting(self, run: Run) -> None:
    """The metrics writer, the progress bar, FLOPs and tokens per step, and the MFU peak."""
    c, target_len = self.config, config_schema.target_len(self.config)
    sequences = c.data.batch_size * self.spec.sequences_per_row
    self.flops_per_step = sequences * flops.train_flops_per_example(
        run.cfg, c.data.seq_len, target_len, c.objective)
    self.tokens_per_step = sequences * (c.data.seq_len + target_len)
    self.peak = peak_flops.Peak(run.cfg.dtype)
    self.schedule = train_step.learning_rate_schedule(c.train)
    self.writer = run_records.MetricsWriter(run.workdir, run.start_step, enabled=self.is_main)
    self.bar = tqdm.tqdm(total=c.train.steps, initial=run.start_step, file=sys.stdout,
                         disable=not (self.is_main and c.train.progress), dynamic_ncols=True,
                         desc=f"{c.name}:{c.variant}")
    self.pending: Optional[tuple[int, Any, bool]] = None  # (step, device metrics, log it)
    self.last_good_ckpt = run.ckpt.steps()[-1] if run.ckpt.steps() else None
    self.final_metrics: dict[str, Any] = {}
    self.loss_tokens = 0.0
    self._restart_clock(run.start_step)

  # ------------------------------------------------------------------ the four methods
  def step(self, batch: dict) -> Any:
    """Dispatches one train step on a host batch; returns its metrics, still on the device."""
    self.state, metrics = self._step_fn(self.state, self._place(batch))
    return metrics

  def evaluate(self) -> dict[str, float]:
    """`eval_*` metrics of the current parameters on the validation split."""
    c = self.config
    if self._eval_batches is None:
      self._eval_batches = self.run_parts.input_pipeline.make_eval_batches(
          c, self.run_parts.tokenizer, "validation", max_batches=c.train.eval_steps)
    params = self.host_state().params
    out = evaluate_params(c, params, self.run_parts.tokenizer, eval_step=self._eval_step,
                          batches=self._eval_batches,
                          place=(lambda b: b) if self.pmap else self._place)
    out.update(self._preference_eval(params))
    return {f"eval_{k}": v for k, v in out.items()}

  def save(self, step: int, metrics: Optional[dict] = None) -> None:
    """Checkpoints the state with the data iterator's position, the tokenizer and `metrics`."""
    r = self.run_parts
    meta = {"config": self.config.to_json_best_effort(),
            "data_state": iterator_state_to_json(self.train_iter),
            "tokenizer": r.tokenizer.to_json(), "step": step, "metrics": metrics or {},
            "data_fingerprint": r.data_fingerprint}
    self.ckpt.save(step, self.host_state(), meta, metrics=metrics, force=True)
    self.last_good_ckpt = step

  def log(self, step: int, m: dict) -> None:
    """Adds speed and MFU over the steps since the last log, writes the record, updates the bar."""
    now = time.perf_counter()
    rate_steps = (step - self._clock_step) / max(now - self._clock_time, 1e-9)
    self._clock_time, self._clock_step = now, step
    m["tokens_per_sec"] = rate_steps * self.tokens_per_step
    m["mfu"] = rate_steps * self.flops_per_step / self.peak.flops
    m.update(self.peak.fields())
    m["learning_rate"] = float(self.schedule(step - 1))
    self.writer.write(step, m)
    self.bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_sec']:.0f}",
                         mfu=f"{100 * m['mfu']:.0f}%", refresh=False)
    self.final_metrics.update(m)

  # ------------------------------------------------------------------ the drain
  def drain(self) -> None:
    """Fetches the pending step's metrics (computed by now), checks the loss, logs when due."""
    if self.pending is None:
      return
    step, device_metrics, log_it = self.pending
    self.pending = None
    m = self._fetch(device_metrics)
    if not math.isfinite(m["loss"]):
      kept = f"the last good checkpoint (step {self.last_good_ckpt}) is intact" \
          if self.last_good_ckpt is not None else "no checkpoint had been saved yet"
      raise NonFiniteLoss(f"loss is {m['loss']} at step {step}; the run stopped and {kept}: "
                          "lower config.train.learning_rate or check the data")
    self.loss_tokens += m["loss_tokens"]
    if log_it:
      self.log(step, m)

  def _fetch(self, metrics) -> dict[str, Any]:
    """Device metrics -> host floats: the means of the terms, loss, grad norm, loss tokens."""
    metrics = jax.device_get(metrics)
    if self.pmap:  # every replica holds the psummed values: take replica 0
      metrics = jax.tree.map(lambda x: x[0], metrics)
    out = objectives.finalize(metrics["terms"])
    out["loss_tokens"] = float(sum(metrics["terms"][name][1] for name in self.spec.token_terms))
    out["loss"] = float(metrics["loss"])
    out["grad_norm"] = float(metrics["grad_norm"])
    return out

  # ------------------------------------------------------------------ the loop
  def run(self) -> dict[str, Any]:
    """Trains to `config.train.steps`; saves and stops early on SIGTERM/SIGINT."""
    c = self.config
    steps = c.train.steps
    mesh_context = contextlib.nullcontext() if self.pmap else jax.set_mesh(self.run_parts.mesh)
    with StopSignal() as stop, mesh_context:
      try:
        for step in range(self.run_parts.start_step + 1, steps + 1):
          self._maybe_refresh_peak(step - 1)
          metrics = self.step(next(self.train_iter))
          self.drain()  # the previous step's metrics, while this step runs
          self.pending = (step, metrics, step % c.train.log_every == 0 or step == steps)
          self.bar.update(1)
          eval_now = bool(c.train.eval_every) and (step % c.train.eval_every == 0 or step == steps)
          if eval_now or step % c.train.ckpt_every == 0 or step == steps or stop.received:
            self._evaluate_and_save(step, eval_now)
          if stop.received:
            self.ckpt.wait()
            self.bar.write(f"received {stop.received}: saved checkpoint at step {step}; rerun the "
                           "same command to continue")
            break
        self.drain()
      except NonFiniteLoss:
        self.ckpt.wait()
        raise
      finally:
        self.close()
    return self._summary(stop.received)

  def _evaluate_and_save(self, step: int, eval_now: bool) -> None:
    self.drain()
    eval_metrics = self.evaluate() if eval_now else None
    if eval_metrics:
      self.writer.write(step, eval_metrics)
      self.final_metrics.update(eval_metrics)
      self.bar.write(f"step {step}: " + "  ".join(f"{k}={v:.4f}" for k, v in eval_metrics.items()))
    self.save(step, eval_metrics)
    self._restart_clock(step)  # eval and saving are not training speed

  def _maybe_refresh_peak(self, step_done: int) -> None:
    """Re-measures a measured peak when due, with nothing in flight (it would share the cores)."""
    if self.peak.refresh_due():
      self.drain()
      jax.block_until_ready(self.state)
      self.peak.refresh()
      self._restart_clock(step_done)

  def _restart_clock(self, step: int) -> None:
    self._clock_time, self._clock_step = time.perf_counter(), step

  def _preference_eval(self, params) -> dict[str, float]:
    """A preference objective's held-out KL to its reference (config.dpo.kl_prompts prompts)."""
    c = self.config
    if not self.spec.preference or c.dpo.kl_prompts <= 0:
      return {}
    from gptjax.training import preference  # pylint: disable=g-import-not-at-top
    r = self.run_parts
    ref = r.preference_reference if r.preference_reference is not None else params["base"]
    return preference.heldout_kl(c, r.tokenizer, models.make_model(r.cfg),
                                 finetune_state.merged_params(c, params), ref,
                                 preference.heldout_prompts(c, c.dpo.kl_prompts),
                                 seed=c.generate.seed)

  def host_state(self):
    """The state as one copy (pmap keeps one per device)."""
    return flax.jax_utils.unreplicate(self.state) if self.pmap else self.state

  def close(self) -> None:
    """Closes the progress bar, the checkpointer (finishing saves) and the metrics files."""
    self.bar.close()
    self.ckpt.close()
    self.writer.close()

  def _summary(self, stopped_by: Optional[str]) -> dict[str, Any]:
    out = dict(self.final_metrics)
    out["step"] = int(jax.device_get(self.host_state().step))
    out["loss_tokens_total"] = self.loss_tokens
    if stopped_by:
      out["stopped_by"] = stopped_by
    return out
