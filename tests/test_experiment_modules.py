"""Experiment scripts run as `python experiments/NAME.py` and as `python -m experiments.NAME`."""

import ast
import subprocess
import sys

from conftest import REPO

EXPERIMENTS = REPO / "experiments"
SIBLINGS = {p.stem for p in EXPERIMENTS.glob("*.py")} - {"__init__"}


def test_no_script_imports_a_sibling_by_bare_name():
  """`import finished_runs` works only in the script form; `from experiments import ...` in both."""
  bare = []
  for path in sorted(EXPERIMENTS.glob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
          [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
      bare += [f"{path.name}:{node.lineno} imports {n}" for n in names
               if n.split(".")[0] in SIBLINGS | {"conftest"}]
  assert not bare, bare


def test_module_form_runs_from_the_repo_root(tmp_path):
  # scaling imports sweep, scaling_fit and scaling_plots; a bad flag value stops it before training
  result = subprocess.run([sys.executable, "-m", "experiments.scaling", "--preset=smoke",
                           f"--out={tmp_path}", "--sizes=50M"], cwd=REPO, capture_output=True,
                          text=True, timeout=240)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and "outside this sweep's range" in lines[-1], result.stderr[-2000:]


def test_mlm_recipe_probe_refuses_an_unknown_override_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, "experiments/mlm_recipe_probe.py", "--name=x",
                           "--set=model.positions=rope", f"--probes_dir={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and "model.positions=rope" in lines[-1], result.stderr[-2000:]
  assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_pair_task_probe_refuses_a_workdir_without_checkpoints_in_one_line(tmp_path):
  result = subprocess.run([sys.executable, "experiments/pair_task_probe.py", "--name=x",
                           f"--init_from={tmp_path}", f"--probes_dir={tmp_path / 'p'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and "has no checkpoints/ folder" in lines[-1], result.stderr[-2000:]
  assert not (tmp_path / "p").exists()  # nothing trained, nothing written


def test_encoder_reliance_splits_the_loss_by_target_kind():
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments import encoder_reliance  # pylint: disable=g-import-not-at-top
  targets = np.array([[90, 5, 6, 91, 7, 1, 0]])  # sentinel, text, text, sentinel, text, EOS, pad
  weights = np.array([[1, 1, 1, 1, 1, 1, 0]], np.float32)
  nll = np.array([[0.5, 2.0, 4.0, 0.25, 3.0, 1.0, 9.0]])
  got = encoder_reliance.loss_by_kind(nll, targets, weights, {90, 91}, eos_id=1)
  assert got == {"text": (9.0, 3), "sentinel": (0.75, 2), "eos": (1.0, 1)}  # the pad is out


def test_encoder_reliance_measures_a_trained_t5_and_the_thresholds_table_shows_it(tmp_path,
                                                                                   data_cache):
  import os  # pylint: disable=g-import-not-at-top
  from experiments import compare_objectives_report as report  # pylint: disable=g-import-not-at-top
  from experiments import encoder_reliance  # pylint: disable=g-import-not-at-top
  w = tmp_path / "t5"
  trained = subprocess.run(
      [sys.executable, "run.py", "--config=configs/t5.py:tiny", f"--workdir={w}", "--mode=train",
       "--config.model.num_layers=1", "--config.train.steps=2", "--config.train.eval_every=0",
       "--config.train.progress=False", "--config.data.max_docs=20"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, GPTJAX_CACHE=str(data_cache)))
  assert trained.returncode == 0, trained.stderr[-2000:]
  result = encoder_reliance.measure(str(w), batches=2)
  assert result["objective"] == "span_corruption" and result["batches"] == 2
  assert result["targets"]["text"] > 0 and result["targets"]["sentinel"] > 0
  # two steps from a random init: the decoder's output still moves with its encoder input
  assert result["text_gain_from_own_encoder"] != 0.0
  row = {"arm": "span_corruption", "seed": 0, "nats_below_unigram": 0.5, "finetune_acc": 0.7,
         "scratch_acc": 0.7, "encoder_text_gain": 0.0123}
  lines = report.thresholds([row, {**row, "arm": "mlm", "encoder_text_gain": ""}], 0.5)
  assert "| span_corruption | 0 | 0.50 | no | +0.012 | +0.200 |" in lines[2]
  assert "| mlm | 0 | 0.50 | no |  | +0.200 |" in lines[3]
