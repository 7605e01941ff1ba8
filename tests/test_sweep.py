"""experiments/sweep.py end to end: submitit's local executor, registry, table, skip on re-run."""

import csv
import json
import os
import subprocess
import sys

from conftest import REPO, one_error_line

SET = "train.steps=3;train.eval_steps=1;train.log_every=1;data.max_docs=50"


def _sweep(root, *args, timeout=240):
  cmd = [sys.executable, str(REPO / "experiments" / "sweep.py"), "--config=configs/gpt.py:tiny",
         f"--root={root}", *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _registry(root) -> dict:
  with open(os.path.join(root, "registry.jsonl")) as f:
    return {r["run_id"]: r for r in map(json.loads, f)}


def test_two_runs_local_executor_then_skip_on_rerun(tmp_path, data_cache):
  del data_cache  # GPTJAX_CACHE for the runs' tokenizers and token arrays
  root = tmp_path / "sweep"
  result = _sweep(root, "--sweep=config.train.learning_rate=1e-3,3e-3", f"--set={SET}",
                  "--cluster=local", "--parallel=2")
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  runs = _registry(root)
  assert len(runs) == 2
  assert sorted(r["overrides"]["train.learning_rate"] for r in runs.values()) == [1e-3, 3e-3]
  for rid, r in runs.items():
    assert r["status"] == "done", r
    assert r["workdir"] == str(root / rid)
    assert r["git_commit"] and r["git_commit"] != "unknown"
    assert r["metrics"]["step"] == 3 and r["metrics"]["eval_loss"] > 0
    assert os.path.isdir(os.path.join(r["workdir"], "checkpoints", "3"))
    assert "--config.train.learning_rate=" in r["command"]
  # one table across runs: stdout, markdown and csv, best eval_loss first
  assert "| run_id | status | train.learning_rate |" in result.stdout
  md = (root / "sweep_results.md").read_text()
  assert md.count("| done |") == 2
  with open(root / "sweep_results.csv") as f:
    rows = list(csv.DictReader(f))
  assert {row["run_id"] for row in rows} == set(runs)
  losses = [float(row["eval_loss"]) for row in rows]
  assert losses == sorted(losses)

  log_sizes = {rid: os.path.getsize(os.path.join(r["workdir"], "train.log")) for rid, r in runs.items()}
  again = _sweep(root, "--sweep=config.train.learning_rate=1e-3,3e-3", f"--set={SET}",
                 "--cluster=local")
  assert again.returncode == 0, again.stderr[-2000:]
  assert "2 finished, 0 to launch" in again.stdout
  assert again.stdout.count("skipped") == 2
  for rid, r in _registry(root).items():
    assert r["status"] == "done"
    assert os.path.getsize(os.path.join(r["workdir"], "train.log")) == log_sizes[rid]

  # a moved root whose runs are recorded under an older run id: adopted and skipped, not retrained
  moved = tmp_path / "moved"
  os.rename(root, moved)
  rid = sorted(runs)[0]
  os.rename(moved / rid, moved / "0ld0ld0ld0ld")
  text = (moved / "registry.jsonl").read_text().replace(rid, "0ld0ld0ld0ld")
  (moved / "registry.jsonl").write_text(text)
  again = _sweep(moved, "--sweep=config.train.learning_rate=1e-3,3e-3", f"--set={SET}",
                 "--cluster=local")
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"0ld0ld0ld0ld is now {rid}" in again.stdout and "2 finished, 0 to launch" in again.stdout
  assert {r: v["workdir"] for r, v in _registry(moved).items()} == {r: str(moved / r) for r in runs}
  assert os.path.getsize(moved / rid / "train.log") == log_sizes[rid]

  # a finished run trained with other values than the point now resolves to: one line, nothing runs
  manifest = json.loads((moved / rid / "manifest.json").read_text())
  manifest["config"]["model"]["embed_dim"] += 8
  (moved / rid / "manifest.json").write_text(json.dumps(manifest))
  drift = _sweep(moved, "--sweep=config.train.learning_rate=1e-3,3e-3", f"--set={SET}",
                 "--cluster=local")
  assert drift.returncode == 2, drift.stdout[-1000:] + drift.stderr[-1000:]
  line = one_error_line(drift.stderr)
  assert "model.embed_dim" in line and "move" in line, line


def test_unknown_field_is_one_line_and_launches_nothing(tmp_path):
  root = tmp_path / "bad"
  result = _sweep(root, "--sweep=config.train.learning_rate=1e-3;config.model.nmu_layers=2,4")
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "config.model.nmu_layers is not a config field" in lines[0], lines
  assert not (root / "registry.jsonl").exists()
  bad_value = _sweep(root, "--sweep=model.num_layers=2,two")
  assert bad_value.returncode == 2
  assert bad_value.stderr.strip() == "error: --sweep: config.model.num_layers='two' is not an integer"


def test_random_sample_is_seeded_and_distinct(tmp_path):
  spec = "--sweep=train.learning_rate=loguniform(1e-4,1e-2);model.num_layers=1,2"

  def planned(root, seed):
    result = _sweep(root, spec, "--random=4", f"--seed={seed}", "--dry_run")
    assert result.returncode == 0, result.stderr[-2000:]
    return [line.split("  ", 2)[2] for line in result.stdout.splitlines()
            if line and not line.startswith("[sweep]")]

  first = planned(tmp_path / "a", 0)
  assert len(first) == 4 == len(set(first))
  assert planned(tmp_path / "b", 0) == first
  assert planned(tmp_path / "c", 1) != first
  grid = _sweep(tmp_path / "d", "--sweep=model.num_layers=1,2;train.learning_rate=1e-3,2e-3,3e-3",
                "--dry_run")
  assert "6 runs: 0 finished, 6 to launch" in grid.stdout
