"""experiments/compare_objectives.py end to end (smoke preset), its bad-input lines, and the verdicts."""

import csv
import json
import subprocess
import sys

from conftest import REPO

from experiments import objective_directions as od

SCRIPT = REPO / "experiments" / "compare_objectives.py"


def _run(*args, timeout=1800):
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def test_smoke_preset_two_arms_end_to_end_then_skips_on_rerun(tmp_path, data_cache):
  del data_cache
  out = tmp_path / "cmp"
  args = ["--preset=smoke", "--arms=mlm_sop,next_token", "--seeds=0", f"--out={out}"]
  result = _run(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("results.csv", "results.md", "loss_vs_flops.png", "downstream_accuracy.png"):
    assert (out / name).stat().st_size > 0, name
  rows = list(csv.DictReader(open(out / "results.csv")))
  assert [r["arm"] for r in rows] == ["mlm_sop", "next_token"]
  for r in rows:
    assert 0.0 <= float(r["finetune_acc"]) <= 1.0 and 0.0 <= float(r["probe_acc"]) <= 1.0
    assert int(r["loss_tokens"]) > 0 and int(r["pretrain_steps"]) == 6
    assert float(r["unigram_loss"]) > 1.0 and float(r["intrinsic_loss"]) > 0
    assert abs(float(r["nats_below_unigram"]) - (float(r["unigram_loss"]) - float(r["intrinsic_loss"]))) < 1e-9
  by_arm = {r["arm"]: r for r in rows}
  # next-token puts a loss on every token, MLM on ~15%: the loss-bearing counts must show it.
  assert int(by_arm["next_token"]["loss_tokens"]) > 4 * int(by_arm["mlm_sop"]["loss_tokens"])
  # ALBERT's cross-task check: the pair arm is evaluated on both kinds of pairs, LM arms on none
  assert 0 <= float(by_arm["mlm_sop"]["nsp_acc"]) <= 1 and 0 <= float(by_arm["mlm_sop"]["sop_acc"]) <= 1
  assert by_arm["next_token"]["nsp_acc"] == ""
  assert int(by_arm["mlm_sop"]["pair_eval_pairs"]) == 2 * 8  # the smoke preset's 2 batches of 8
  table = (out / "results.md").read_text()
  assert "| mlm_sop |" in table and "majority class" in table and "| verdict |" in table
  assert "[n/a]" in table  # one seed: no interval is made up
  assert " ± " not in table.split("Cells are the mean")[0]  # nor a spread of zero
  assert "| mlm_sop | 0 | SOP (its own task) | 16 |" in table
  rerun = _run(*args)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert rerun.stdout.count("done before, skipped") == 2  # one finished unit row per arm
  (out / "results.md").unlink()
  rebuilt = _run("--preset=smoke", f"--out={out}", "--report_only")  # trains nothing
  assert rebuilt.returncode == 0 and "done before" not in rebuilt.stdout, rebuilt.stderr[-3000:]
  assert "rebuilt from the units on disk" in (out / "results.md").read_text()
  assert "| mlm_sop | 0 | SOP (its own task) | 16 |" in (out / "results.md").read_text()
  # the loss curves are read from disk: a process that ran one arm still plots both
  code = f"""
import json
from absl import flags
from experiments import compare_objectives as co
flags.FLAGS(["x", "--preset=smoke", "--out={out}"])
curves = co.pretrain_curves(co.finished_rows([], []), co.PRESETS["smoke"])
print(json.dumps({{a: len(c) for a, c in curves.items()}}))
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  points = json.loads(result.stdout.strip().splitlines()[-1])
  assert sorted(points) == ["mlm_sop", "next_token"] and min(points.values()) >= 2, points
  # label budgets from these units: one pre-trained and one scratch fine-tune on 16 sentences
  lb_out = tmp_path / "lb"
  lb_args = [f"--units={out}", f"--out={lb_out}", "--arms=next_token", "--seeds=0", "--sizes=16",
             "--steps=4", "--eval_batches=2"]
  lb = subprocess.run([sys.executable, str(REPO / "experiments" / "label_budget.py"), *lb_args],
                      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert lb.returncode == 0, lb.stderr[-3000:]
  (row,) = list(csv.DictReader(open(lb_out / "results.csv")))
  assert row["train_sentences"] == "16" and 0 <= float(row["pretrained_acc"]) <= 1
  assert abs(float(row["gain"]) - float(row["pretrained_acc"]) + float(row["scratch_acc"])) < 1e-9
  runs = lb_out / "next_token" / "seed0" / "n16"
  pretrained = json.load(open(runs / "pretrained" / "manifest.json"))["config"]
  scratch = json.load(open(runs / "scratch" / "manifest.json"))["config"]
  assert pretrained["init_from"] == str(out / "next_token" / "seed0" / "pretrain")
  assert scratch["init_from"] == "" and scratch["data"]["train_docs"] == 16
  assert (lb_out / "accuracy_vs_labels.png").stat().st_size > 0
  assert "| next_token | 16 | 1 |" in (lb_out / "results.md").read_text()
  # a pair finished by another command is in the rebuilt tables; the finished pair is not re-run
  other = lb_out / "mlm" / "seed1" / "n16"
  other.mkdir(parents=True)
  (other / "result.json").write_text(json.dumps(
      {**json.load(open(runs / "result.json")), "arm": "mlm", "seed": 1}))
  again = subprocess.run([sys.executable, str(REPO / "experiments" / "label_budget.py"), *lb_args],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert [r["arm"] for r in csv.DictReader(open(lb_out / "results.csv"))] == ["next_token", "mlm"]
  assert "| mlm | 16 | 1 |" in (lb_out / "results.md").read_text()
  assert not (lb_out / "mlm" / "seed1" / "n16" / "pretrained").exists()
  missing = subprocess.run([sys.executable, str(REPO / "experiments" / "label_budget.py"),
                            *lb_args[:2], "--arms=mlm"], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
  assert missing.returncode != 0
  assert "no pre-trained checkpoint for mlm/seed0" in missing.stderr.strip().splitlines()[-1]


def test_unknown_arm_and_tiny_budget_are_one_line(tmp_path):
  result = _run("--preset=smoke", "--arms=mlm,gpt4", f"--out={tmp_path}")
  assert result.returncode != 0
  assert "unknown arm(s) gpt4; choose from" in result.stderr.strip().splitlines()[-1]
  result = _run("--preset=smoke", "--arms=mlm", "--budget=10", f"--out={tmp_path}")
  assert result.returncode != 0
  assert "too small for one step" in result.stderr.strip().splitlines()[-1]


def test_verdicts_on_hand_made_intervals():
  assert od.verdict(+0.9, [0.01, 0.05]) == "reproduced"
  assert od.verdict(-0.6, [-0.05, -0.01]) == "reproduced"
  assert od.verdict(+0.9, [-0.05, -0.01]) == "opposite"
  assert od.verdict(-0.1, [0.02, 0.03]) == "opposite"
  assert od.verdict(+3.6, [-0.01, 0.04]) == "inconclusive"  # the interval contains 0
  assert od.verdict(+3.6, [0.0, 0.04]) == "inconclusive"
  assert od.verdict(+3.6, "n/a") == "inconclusive"


def test_intervals_and_directions_table_from_rows():
  mean, interval = od.t_interval([0.1, 0.2, 0.3])
  # t(0.975, 2) = 4.303; sd = 0.1; half width 4.303 * 0.1 / sqrt(3)
  assert abs(mean - 0.2) < 1e-12 and abs(interval[1] - 0.2 - 4.3027 * 0.1 / 3 ** 0.5) < 1e-3
  assert od.t_interval([0.5]) == (0.5, "n/a")
  rows = [{"arm": arm, "seed": s, "finetune_acc": acc, "scratch_acc": 0.7, "probe_acc": 0.6,
           "probe_random_acc": 0.55, "sop_acc": "", "nsp_acc": ""}
          for arm, base in (("mlm_sop", 0.80), ("mlm_nsp", 0.75)) for s, acc in
          ((0, base), (1, base + 0.01), (2, base - 0.01))]
  assert od.paired_deltas(rows, "finetune_acc", "mlm_sop", "mlm_nsp") == \
      [0.80 - 0.75, 0.81 - 0.76, 0.79 - 0.74]
  table = "\n".join(od.directions_table(rows))
  sop_row = next(ln for ln in table.splitlines() if ln.startswith("| SOP vs NSP, SST-2"))
  assert "| 3 | reproduced |" in sop_row and "+5.000" in sop_row
  assert "| no NSP vs MLM+NSP, SST-2 | -0.1 | no runs | 0 | no runs |" in table
  gains = "\n".join(od.gains_table(rows))
  assert "| mlm_sop | 3 | +0.100 [" in gains


def test_cpu_preset_arms_are_within_ten_percent_in_parameters_with_one_position_scheme():
  # in a subprocess: pretrain_config reads absl flags, which this process must not parse
  code = """
import json
from absl import flags
from experiments import compare_objectives as co
flags.FLAGS(["x", "--preset=cpu"])
configs = {a: co.pretrain_config(a, co.PRESETS["cpu"], 0) for a in co.ARMS}
print(json.dumps({a: [co._param_count(c), c.model.position, co.ARMS[a][0]] for a, c in configs.items()}))
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  arms = json.loads(result.stdout.strip().splitlines()[-1])
  counts = [n for n, _, _ in arms.values()]
  assert max(counts) <= 1.1 * min(counts), arms
  # rotary positions everywhere but T5's own relative buckets (learned ones plateau for MLM)
  assert {a: p for a, (_, p, _) in arms.items()} == {
      a: "relative" if family == "t5" else "rope" for a, (_, _, family) in arms.items()}


def test_wilson_interval_and_pair_task_calls():
  from experiments import compare_objectives_report as report
  low, high = report.wilson(0.5, 100)
  assert (round(low, 3), round(high, 3)) == (0.404, 0.596)  # the textbook value
  rows = [{"arm": "mlm_nsp", "seed": 0, "nsp_acc": 0.519, "sop_acc": 0.40, "pair_eval_pairs": 640},
          {"arm": "mlm_sop", "seed": 0, "nsp_acc": 0.5, "sop_acc": 0.562, "pair_eval_pairs": "640"},
          {"arm": "mlm", "seed": 0, "nsp_acc": "", "sop_acc": "", "pair_eval_pairs": ""}]
  calls = [line.rsplit("|", 2)[1].strip() for line in report.pair_tasks(rows)[2:]]
  assert calls == ["at chance", "below", "at chance", "above"]
