"""experiments/compare_objectives.py end to end (smoke preset) and its bad-input lines."""

import csv
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "experiments" / "compare_objectives.py"


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def test_smoke_preset_two_arms_end_to_end_then_skips_on_rerun(tmp_path, data_cache):
  del data_cache
  out = tmp_path / "cmp"
  args = ["--preset=smoke", "--arms=mlm,next_token", "--seeds=0", f"--out={out}"]
  result = _run(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("results.csv", "results.md", "loss_vs_flops.png", "downstream_accuracy.png"):
    assert (out / name).stat().st_size > 0, name
  rows = list(csv.DictReader(open(out / "results.csv")))
  assert [r["arm"] for r in rows] == ["mlm", "next_token"]
  for r in rows:
    assert 0.0 <= float(r["finetune_acc"]) <= 1.0 and 0.0 <= float(r["probe_acc"]) <= 1.0
    assert int(r["loss_tokens"]) > 0 and int(r["pretrain_steps"]) == 12
  # next-token puts a loss on every token, MLM on ~15%: the loss-bearing counts must show it.
  by_arm = {r["arm"]: int(r["loss_tokens"]) for r in rows}
  assert by_arm["next_token"] > 4 * by_arm["mlm"]
  table = (out / "results.md").read_text()
  assert "| mlm |" in table and "majority class" in table
  rerun = _run(*args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stdout.count("done before, skipped") == 10  # 2 arms x (pretrain, 2 probes, ft, scratch)


def test_unknown_arm_and_tiny_budget_are_one_line(tmp_path):
  result = _run("--preset=smoke", "--arms=mlm,gpt4", f"--out={tmp_path}")
  assert result.returncode != 0
  assert "unknown arm(s) gpt4; choose from" in result.stderr.strip().splitlines()[-1]
  result = _run("--preset=smoke", "--arms=mlm", "--budget=10", f"--out={tmp_path}")
  assert result.returncode != 0
  assert "too small for one step" in result.stderr.strip().splitlines()[-1]
