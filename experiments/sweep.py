"""Config sweeps: a grid or random sample over config fields, one `run.py --mode=train` per point.

  python experiments/sweep.py --config=configs/gpt.py:tiny --root=runs/lr_sweep \
      --sweep='train.learning_rate=1e-3,3e-3;model.num_layers=2,4' --set='train.steps=200'
  python experiments/sweep.py ... --random=6 --seed=0 \
      --sweep='train.learning_rate=loguniform(1e-4,1e-2);model.num_layers=2,4'
  python experiments/sweep.py ... --sweep_file=spec.json --cluster=slurm --slurm_partition=gpu

Every run gets ROOT/<run id>, the run id being a hash of its point (base config and overrides;
a finished run whose recorded config differs from what the point now resolves to stops the
sweep with one line). Runs are
launched through submitit (cluster local, slurm or debug: the same code path) at most
--parallel at a time, or one after another inside this process (--cluster=inprocess: no
submitit, no run.py start-up per run; for smoke tests and quick CPU sweeps).
ROOT/registry.jsonl holds one line per run (id, overrides, git commit, status
pending/running/done/failed, final metrics from its metrics.jsonl), and
ROOT/sweep_results.{md,csv} the comparison table, which is also printed. A run that
finished is skipped when the sweep is run again; a failed or interrupted one is
relaunched and resumes from its last checkpoint. A sweep field that is not in the
config stops everything before a single run starts, with one line.

This file is the CLI and the launcher; the spec (parsing, checks, points, run ids) is in
sweep_spec.py, the registry and table in sweep_registry.py, --cluster=inprocess in sweep_inprocess.py.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptjax.config_schema import ConfigError  # pylint: disable=g-import-not-at-top,wrong-import-position

from experiments import sweep_inprocess  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.sweep_registry import REGISTRY, Registry, write_result, write_tables  # pylint: disable=g-import-not-at-top,wrong-import-position
# resolve and run_id are part of this module's interface (experiments/scaling.py uses them)
from experiments.sweep_spec import (  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
    checked_spec, config_drift, field_name, load_base_config, parse_spec, points, resolve, run_id)

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/gpt.py:tiny", "Base config, FILE:VARIANT.")
flags.DEFINE_string("root", "runs/sweep", "Folder holding one workdir per run and the registry.")
flags.DEFINE_string("sweep", "", "FIELD=V1,V2;FIELD=... (or FIELD=loguniform(a,b) etc. with --random).")
flags.DEFINE_string("sweep_file", "", "A JSON file {field: [values] or 'loguniform(a,b)'}.")
flags.DEFINE_string("set", "", "Fixed overrides for every run: FIELD=V;FIELD=V.")
flags.DEFINE_integer("random", 0, "0: the full grid; N: N distinct random points.")
flags.DEFINE_integer("seed", 0, "Seed of the random sample.")
flags.DEFINE_enum("cluster", "local", ["local", "slurm", "debug", "inprocess"],
                  "Where the runs go: submitit's local, slurm or debug executor, or inprocess (one "
                  "after another in this process, without submitit or a run.py per run).")
flags.DEFINE_integer("parallel", 2, "Runs at the same time (0: all).")
flags.DEFINE_integer("timeout_min", 240, "Time limit of one run.")
flags.DEFINE_integer("cpus_per_task", 0, "CPUs per run on SLURM (0: the cluster default).")
flags.DEFINE_integer("gpus_per_node", 0, "GPUs per run on SLURM.")
flags.DEFINE_string("slurm_partition", "", "SLURM partition.")
flags.DEFINE_string("sort_by", "eval_loss", "Metric the table is sorted by (ascending).")
flags.DEFINE_bool("dry_run", False, "Check the spec and print the runs, launch nothing.")
flags.DEFINE_bool("prepare", True, "Build each distinct corpus/tokenizer once before launching, so "
                  "parallel runs do not race to prepare the same data cache.")
flags.DEFINE_integer("retries", 1, "Relaunches of a failed run (it resumes from its checkpoint).")


# ============================================================================ one run (the job)
def _format(value) -> str:
  return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) \
      else str(value)


def train_command(base_spec: str, workdir: str, overrides: dict[str, Any]) -> list[str]:
  """The run.py command line of one run."""
  return [sys.executable, str(REPO / "run.py"), f"--config={base_spec}", f"--workdir={workdir}",
          "--mode=train", "--config.train.progress=False",
          *(f"--config.{k}={_format(v)}" for k, v in overrides.items())]


def final_metrics(workdir: str) -> dict[str, float]:
  """The last value of every metric in WORKDIR/metrics.jsonl (train and eval records)."""
  out: dict[str, float] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        out.update(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def train_run(command: list[str], workdir: str) -> dict[str, Any]:
  """Runs one training command (inside a submitit job); writes WORKDIR/sweep_result.json."""
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  with open(os.path.join(workdir, "train.log"), "a", encoding="utf-8") as log:
    proc = subprocess.run(command, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT, check=False)
  return write_result(workdir, proc.returncode, start)


def _finished(workdir: str):
  path = os.path.join(workdir, "sweep_result.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _last_error(workdir: str) -> str:
  path = os.path.join(workdir, "train.log")
  if not os.path.exists(path):
    return ""
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [ln.strip() for ln in f if ln.strip()]
  errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
  return (errors or lines or [""])[-1][:300]


# ============================================================================ registry
def refresh(registry: Registry, rid: str) -> dict:
  """Status and final metrics of run `rid` from its workdir."""
  r = registry.runs[rid]
  result = _finished(r["workdir"])
  if result is None:
    return r
  status = "done" if result["returncode"] == 0 else "failed"
  metrics = {k: v for k, v in final_metrics(r["workdir"]).items() if isinstance(v, (int, float))}
  metrics["wall_s"] = result.get("wall_s")
  extra = {"error": _last_error(r["workdir"])} if status == "failed" else {"error": ""}
  return registry.update(rid, status=status, returncode=result["returncode"], metrics=metrics,
                         finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)


# ============================================================================ launch
def prepare_data(configs: list) -> None:
  """Builds the tokenizer and token arrays of every distinct data config once, in this process."""
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from gptjax.data import tokenization
  seen = set()
  for config in configs:
    key = json.dumps([config.data.to_dict(), config.objective, config.model.family,
                      config.model.vocab_size], sort_keys=True, default=str)
    if key in seen:
      continue
    seen.add(key)
    print(f"[sweep] preparing data: corpus={config.data.corpus} tokenizer="
          f"{config.data.tokenizer.kind}/{config.data.tokenizer.vocab_size}", flush=True)
    tok = tokenization.load_or_train_tokenizer(config)
    for split in ("train", input_pipeline._eval_split(config)):  # pylint: disable=protected-access
      input_pipeline.Examples(config, tok, split)


def make_executor(root: str):
  """A submitit executor for --cluster (one call for local, slurm and debug), or the in-process one."""
  if FLAGS.cluster == "inprocess":
    return sweep_inprocess.InProcessExecutor()
  import submitit  # pylint: disable=g-import-not-at-top
  executor = submitit.AutoExecutor(folder=os.path.join(root, "submitit"), cluster=FLAGS.cluster)
  params: dict[str, Any] = {"timeout_min": FLAGS.timeout_min, "name": "gptjax_sweep"}
  if FLAGS.cluster == "slurm":
    params.update(nodes=1, tasks_per_node=1)
    if FLAGS.cpus_per_task:
      params["cpus_per_task"] = FLAGS.cpus_per_task
    if FLAGS.gpus_per_node:
      params["gpus_per_node"] = FLAGS.gpus_per_node
    if FLAGS.slurm_partition:
      params["slurm_partition"] = FLAGS.slurm_partition
  executor.update_parameters(**params)
  return executor


def plan(argv_spec: str, spec_file: str, fixed_text: str):
  """Checks the whole spec against the config; returns [(run id, overrides, config)]."""
  base = load_base_config(FLAGS.config)
  spec = parse_spec(argv_spec, "--sweep")
  if spec_file:
    with open(spec_file, encoding="utf-8") as f:
      spec.update({field_name(k): v for k, v in json.load(f).items()})
  if not spec:
    raise ConfigError("nothing to sweep: give --sweep='FIELD=V1,V2' or --sweep_file=spec.json")
  spec = checked_spec(base, spec, "--sweep", FLAGS.random > 0)
  fixed = {f: v[0] for f, v in checked_spec(base, parse_spec(fixed_text, "--set"), "--set",
                                            False).items()}
  runs = []
  for point in points(spec, FLAGS.random, FLAGS.seed):
    overrides = {**fixed, **point}
    config = resolve(FLAGS.config, overrides)
    runs.append((run_id(FLAGS.config, overrides), overrides, config))
  return runs


def sweep(root: str) -> Registry:
  """Plans, skips finished runs, launches the rest through submitit and waits for them."""
  return launch(root, FLAGS.config, plan(FLAGS.sweep, FLAGS.sweep_file, FLAGS.set))


def adopt_renamed_runs(registry: Registry, root: str, base_spec: str, runs: list) -> None:
  """Renames runs recorded under an older run id (a resolved-config hash) to today's id.

  Matched by base config and overrides, so an interrupted run resumes from its checkpoint; of
  several matches the latest finished one is kept and the others stay, out of the plan.
  """
  for rid, overrides, _ in runs:
    if rid in registry.runs:
      continue
    same = [r for r in registry.runs.values() if r.get("base_config") == base_spec
            and r.get("overrides") == overrides and os.path.isdir(os.path.join(root, r["run_id"]))]
    if not same:
      continue
    old = max(same, key=lambda r: (r.get("status") == "done", r.get("finished", ""),
                                   r.get("started", "")))
    os.rename(os.path.join(root, old["run_id"]), os.path.join(root, rid))
    registry.runs[rid] = {**registry.runs.pop(old["run_id"]), "run_id": rid,
                          "previous_run_id": old["run_id"]}
    registry.save()
    print(f"[sweep] {old['run_id']} is now {rid} (run ids hash the sweep point since 2026-11-30)",
          flush=True)


def check_no_drift(rid: str, workdir: str, config) -> None:
  """One line, before anything runs, when a finished run was trained with other config values."""
  path = os.path.join(workdir, "manifest.json")
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    recorded = json.load(f).get("config", {})
  drift = config_drift(config, recorded)
  if drift:
    raise ConfigError(f"finished run {workdir} was trained with other values than the sweep now "
                      f"resolves ({'; '.join(drift[:3])}{' ...' if len(drift) > 3 else ''}): the "
                      f"base config changed; restore it, or move {workdir} away to rerun that run")


def launch(root: str, base_spec: str, runs: list) -> Registry:
  """Registers `runs` [(run id, overrides, config)] in ROOT, skips the finished ones and launches the
  rest through submitit (--cluster, --parallel, --retries), waiting for them; returns the registry."""
  os.makedirs(root, exist_ok=True)
  registry = Registry(root)
  from gptjax.training import run_records  # pylint: disable=g-import-not-at-top
  commit = run_records.git_commit()
  todo = []
  configs = {rid: config for rid, _, config in runs}
  adopt_renamed_runs(registry, root, base_spec, runs)
  for rid, overrides, config in runs:
    workdir = os.path.join(os.path.abspath(root), rid)  # the root may have moved since
    if rid not in registry.runs or registry.runs[rid].get("status") != "done":
      registry.update(rid, overrides=overrides, base_config=base_spec, git_commit=commit,
                      status="pending")
    registry.update(rid, workdir=workdir)
    r = refresh(registry, rid)
    if r["status"] == "done":
      check_no_drift(rid, workdir, config)
      print(f"[sweep] {rid} done already, skipped  {overrides}", flush=True)
    else:
      todo.append(rid)
  print(f"[sweep] {len(runs)} runs: {len(runs) - len(todo)} finished, {len(todo)} to launch "
        f"on {FLAGS.cluster}", flush=True)
  if FLAGS.dry_run or not todo:
    return registry
  if FLAGS.prepare:
    prepare_data([config for rid, _, config in runs if rid in todo])
  executor = make_executor(root)
  limit = 1 if FLAGS.cluster == "inprocess" else FLAGS.parallel or len(todo)
  queue, running = list(todo), {}
  total, finished, attempts = len(todo), 0, {rid: 0 for rid in todo}
  while queue or running:
    while queue and len(running) < limit:
      rid = queue.pop(0)
      r = registry.runs[rid]
      stale = os.path.join(r["workdir"], "sweep_result.json")
      if os.path.exists(stale):
        os.remove(stale)  # a failed attempt: relaunch (training resumes from its checkpoint)
      command = train_command(base_spec, r["workdir"], r["overrides"])
      if FLAGS.cluster == "inprocess":
        job = executor.submit(sweep_inprocess.train_in_process, configs[rid], r["workdir"])
      else:
        job = executor.submit(train_run, command, r["workdir"])
      attempts[rid] += 1
      registry.update(rid, status="running", job_id=str(job.job_id), command=" ".join(command[1:]),
                      started=time.strftime("%Y-%m-%dT%H:%M:%S"))
      running[rid] = job
      print(f"[sweep] launched {rid} (job {job.job_id})  {r['overrides']}", flush=True)
    done_now = [rid for rid, job in running.items()
                if FLAGS.cluster in ("debug", "inprocess") or job.done()]
    if not done_now:
      time.sleep(1.0)
      continue
    for rid in done_now:
      job = running.pop(rid)
      try:
        job.result()
      except Exception as e:  # pylint: disable=broad-except
        registry.update(rid, status="failed", error=" ".join(str(e).split())[:300])
      r = refresh(registry, rid)
      if r["status"] == "running":  # the job died before writing its result
        registry.update(rid, status="failed", error="job ended without a result")
        r = registry.runs[rid]
      if r["status"] == "failed" and attempts[rid] <= FLAGS.retries:
        print(f"[sweep] {rid} failed ({r.get('error')}); relaunching, attempt {attempts[rid] + 1}",
              flush=True)
        queue.append(rid)
        continue
      finished += 1
      loss = r.get("metrics", {}).get(FLAGS.sort_by, "")
      print(f"[sweep] {finished}/{total} {rid} {r['status']}"
            + (f"  {FLAGS.sort_by}={loss:.4f}" if isinstance(loss, float) else "")
            + (f"  {r.get('error')}" if r["status"] == "failed" else ""), flush=True)
  return registry


def main(argv):
  """Runs the sweep, then prints and writes the comparison table."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  root = FLAGS.root
  try:
    registry = sweep(root)
  except (ConfigError, FileNotFoundError, json.JSONDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.dry_run:
    for r in registry.runs.values():
      print(f"{r['run_id']}  {r.get('status')}  {r.get('overrides')}")
    return
  markdown = write_tables(root, registry, FLAGS.sort_by)
  print(markdown, end="")
  print(f"[sweep] table: {os.path.join(root, 'sweep_results.md')} and .csv; registry: "
        f"{os.path.join(root, REGISTRY)}")
  if any(r.get("status") == "failed" for r in registry.runs.values()):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
