"""experiments/scaling.py (IsoFLOP study): the fits on synthetic losses, smoke end to end, bad input."""

import csv
import json
import subprocess
import sys

import numpy as np

from conftest import REPO

from experiments import scaling_fit

SCRIPT = REPO / "experiments" / "scaling.py"
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Chinchilla's fit


def _synthetic_runs(seeds=3, noise=0.005):
  """IsoFLOP grids around the optimum of a known L(N, D), with multiplicative noise per run."""
  rng = np.random.default_rng(0)
  runs = []
  for budget in (1e18, 1e19, 1e20, 1e21):
    n_center = 0.6 * budget ** 0.45
    for factor in np.geomspace(1 / 8, 8, 7):
      n = n_center * factor
      d = budget / (6 * n)
      for seed in range(seeds):
        loss = float(scaling_fit.predict(TRUE, n, d) * np.exp(rng.normal(0, noise)))
        runs.append({"budget": budget, "n": n, "d": d, "seed": seed, "loss": loss})
  return runs


def test_fits_recover_known_exponents_from_noisy_synthetic_losses():
  runs = _synthetic_runs()
  points = scaling_fit.cell_means(runs)
  fit3 = scaling_fit.approach3(np.asarray([p["n"] for p in points]),
                               np.asarray([p["d"] for p in points]),
                               np.asarray([p["loss"] for p in points]))
  assert abs(fit3["alpha"] - 0.34) < 0.03 and abs(fit3["beta"] - 0.28) < 0.03, fit3
  assert abs(fit3["E"] - 1.69) < 0.15, fit3
  # for L = E + A/N^alpha + B/D^beta at C = 6ND, N_opt ∝ C^(beta/(alpha+beta))
  fit2 = scaling_fit.approach2(points)
  assert abs(fit2["a"] - 0.28 / 0.62) < 0.03 and abs(fit2["a"] + fit2["b"] - 1) < 1e-6, fit2
  assert all(m["inside_range"] for m in fit2["minima"]) and len(fit2["minima"]) == 4
  intervals = scaling_fit.bootstrap_intervals(runs, num=30, approach3_fit=fit3)
  low, high = intervals["a"]
  assert low < fit2["a"] < high and high - low < 0.1
  assert scaling_fit.bootstrap_intervals(_synthetic_runs(seeds=1), num=30,
                                         approach3_fit=fit3) == {k: "n/a" for k in intervals}
  lines = scaling_fit.comparison_lines({"approach2": fit2, "approach3": fit3,
                                        "intervals": intervals})
  assert "Kaplan 0.73" in lines[0] and "Chinchilla 0.34" in lines[2]
  assert "(0.34 within)" in lines[2]  # the true alpha
  assert "ours below 0.73" in lines[0]  # the true a is 0.45
  assert scaling_fit.against([0.6, 0.7], 0.5) == "ours above 0.5"
  assert scaling_fit.against("n/a", 0.5) == "n/a (one seed)"


def _run(*args, timeout=1800):
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def test_smoke_preset_end_to_end_then_skips_on_rerun(tmp_path, data_cache):
  del data_cache
  out = tmp_path / "scaling"
  result = _run("--preset=smoke", f"--out={out}")
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  for name in ("runs.csv", "fit.json", "results.md", "loss_vs_flops.png", "isoflop.png",
               "n_opt_vs_c.png"):
    assert (out / name).stat().st_size > 0, name
  rows = list(csv.DictReader(open(out / "runs.csv")))
  assert len(rows) == 6 and len({r["budget"] for r in rows}) == 2 and len({r["params"] for r in rows}) == 3
  for r in rows:
    assert int(r["params"]) > int(r["params_non_embedding"]) and float(r["eval_loss"]) > 0
    assert abs(float(r["flops_6nd"]) / float(r["budget"]) - 1) < 0.5  # whole steps round D
  fit = json.loads((out / "fit.json").read_text())
  assert fit["n_used"].startswith("params (total") and fit["seeds"] == [0]
  assert fit["total"]["intervals"]["a"] == "n/a"  # one seed: no fabricated interval
  assert "[n/a]" in result.stdout and "Kaplan 0.73" in result.stdout and "epochs" in result.stdout
  rerun = _run("--preset=smoke", f"--out={out}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "6 runs: 6 finished, 0 to launch" in rerun.stdout


def test_bad_input_is_one_line(tmp_path, data_cache):
  del data_cache
  for args, message in ((["--budgets=1e5"], "too small for one step of the smallest size"),
                        (["--sizes=20k,50M"], "50M parameters is outside this sweep's range"),
                        (["--max_epochs=0.001"], "repeats the corpus")):
    result = _run("--preset=smoke", f"--out={tmp_path}", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and message in lines[-1], (args, lines[-3:])
    assert lines[-1].startswith("error: ")
