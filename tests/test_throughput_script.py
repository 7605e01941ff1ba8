"""experiments/throughput.py on tiny configs (the table, MFU, the profiler breakdown, --ab) and
experiments/cpu_microbench.py."""

import json
import time
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "experiments" / "throughput.py"


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def test_tiny_gpt_and_t5_rows_with_breakdown(tmp_path):
  out = tmp_path / "tp.jsonl"
  png = tmp_path / "breakdown.png"
  result = _run("--families=gpt,t5", "--variants=tiny", "--steps=2", "--warmup_steps=1",
                "--profile_steps=1", f"--output={out}", f"--plot={png}", "--top_scopes=40")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["family"], r["variant"]) for r in rows] == [("gpt", "tiny"), ("t5", "tiny")]
  for r in rows:
    assert r["tokens_per_s"] > 0 and 0.0 < r["mfu"] < 1.0
    assert r["peak_flops"] == max(r["peak_flops_all"]) and len(r["peak_flops_all"]) == 3
    assert r["peak_source"] == "measured"  # gptjax/training/peak_flops.py's CPU peak, as in training
    fractions = r["breakdown"]["fractions"]
    assert abs(sum(fractions.values()) - 1.0) < 1e-6
    assert fractions["matmul"] > 0 and fractions["optimizer"] > 0
  assert "| gpt:tiny |" in result.stdout and "matmul%" in result.stdout
  scopes = [ln for ln in result.stdout.splitlines() if " ms/step  " in ln]
  assert any("bwd decoder/layers_N/mlp/" in ln for ln in scopes), scopes  # layers merged
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_ab_reports_both_timings_and_rejects_unknown_switch(tmp_path):
  out = tmp_path / "ab.jsonl"
  result = _run("--families=gpt", "--variants=tiny", "--steps=1", "--ab=softmax_vjp,donate_state",
                f"--output={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(ln for ln in result.stdout.splitlines() if ln.startswith("| gpt:tiny | softmax_vjp |"))
  assert "x |" in line
  rows = {r["switch"]: r for r in map(json.loads, out.read_text().splitlines())}
  donated = rows["donate_state"]
  assert donated["on_buffers_mib"] < donated["off_buffers_mib"]  # the new state reuses the old one's
  bad = _run("--families=gpt", "--variants=tiny", "--ab=no_such_switch")
  assert bad.returncode != 0
  assert "--ab=no_such_switch is not an xla_cpu trick" in bad.stderr.strip().splitlines()[-1]


def test_cpu_microbench_prints_its_figures_and_rejects_unknown_names():
  script = str(REPO / "experiments" / "cpu_microbench.py")
  run = lambda *a: subprocess.run([sys.executable, script, "--repeats=1", *a], cwd=REPO,
                                  capture_output=True, text=True, timeout=300)
  result = run("--benchmarks=attention,qkv,remat_memory")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "in 2 causal query blocks" in result.stdout and "qkv fwd+bwd" in result.stdout
  assert "jax.checkpoint(prevent_cse=False)" in result.stdout
  bad = run("--benchmarks=attention,nope")
  assert bad.returncode != 0
  assert "--benchmarks=nope is unknown" in bad.stderr.strip().splitlines()[-1]


def test_breakdown_counts_an_eigen_dot_after_its_dispatch_event(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import profile_breakdown  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (2048, 256))
  g = jax.random.normal(jax.random.key(1), (2048, 1024))
  f = jax.jit(lambda x, g: jax.numpy.tanh(x.T @ g))  # a plain dot, run by Eigen on XLA:CPU
  hlo = f.lower(x, g).compile().as_text()
  assert " dot(" in hlo
  f(x, g).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    t0 = time.perf_counter()
    for _ in range(10):
      out = f(x, g)
    out.block_until_ready()
    wall = time.perf_counter() - t0
  b = profile_breakdown.breakdown(str(tmp_path), hlo, steps=10, wall_s=wall)
  assert b["fractions"]["matmul"] > 0.6, b
  assert b["top_ops"][0][1] == "matmul"
