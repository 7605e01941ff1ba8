"""Throughput of this checkout against another commit's, in alternating processes, one peak for both.

  git worktree add --detach /work/wt-old a96ee91
  python experiments/throughput_vs_commit.py --old_checkout=/work/wt-old --rounds=3 \
      --families=gpt,bert,t5 --variants=small --out=experiments/results/throughput_cpu/speed_held.md

Each round runs `experiments/throughput.py --nobreakdown` once from each checkout (the order
alternates between rounds, so drift in the machine's load falls on both), each in its own
process with the other checkout off sys.path. Both sides' MFU is taken against one peak: the
highest matmul rate any of the runs timed (both time the same 2048^2 float32 matmul). The
new/old ratio of tokens/s per model does not depend on any peak. Model FLOPs per token come from
each side's own gptjax/training/flops.py and are printed, so a change in the count shows.

--compare_hlo compiles each model's train step from both checkouts instead and says whether the
optimized programs are the same (every computation and instruction, less source metadata): when they are, a
difference in the timings is the machine's, not the code's.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]

FLAGS = flags.FLAGS
flags.DEFINE_string("old_checkout", "", "A checkout (git worktree) of the commit to compare against.")
flags.DEFINE_integer("rounds", 2, "Rounds; each runs both checkouts once, in alternating order.")
flags.DEFINE_list("families", ["gpt", "bert", "t5"], "Passed to throughput.py.")
flags.DEFINE_list("variants", ["small"], "Passed to throughput.py.")
flags.DEFINE_list("extra", [], "More throughput.py flags for both sides, e.g. --extra=--steps=5.")
flags.DEFINE_string("out", "", "Write the markdown report here (and the raw rows beside it).")
flags.DEFINE_bool("compare_hlo", False, "Instead of timing: compile each model's train step from "
                  "both checkouts and compare the optimized HLO (computations and instructions, "
                  "less source metadata): a change in the program or in the machine.")
flags.DEFINE_string("from_jsonl", "", "Rewrite the report from the raw rows of an earlier run (its "
                    "OUT.jsonl) instead of running anything.")


def _git(checkout: pathlib.Path, *args: str) -> str:
  return subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                        check=True).stdout.strip()


def _load() -> str:
  return " ".join(pathlib.Path("/proc/loadavg").read_text().split()[:3])


def run_side(checkout: pathlib.Path, output: str) -> tuple[list[dict], float, str]:
  """Rows of one throughput.py run from `checkout`, its wall seconds and the load before it."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  load = _load()
  cmd = [sys.executable, str(checkout / "experiments" / "throughput.py"), "--nobreakdown",
         f"--families={','.join(FLAGS.families)}", f"--variants={','.join(FLAGS.variants)}",
         f"--output={output}", *FLAGS.extra]
  t0 = time.time()
  result = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise SystemExit(f"error: {' '.join(cmd)} failed in {checkout}:\n{result.stderr[-2000:]}")
  with open(output, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return rows, time.time() - t0, load


# Run in a fresh process per checkout: that checkout's throughput.build, its step compiled.
_HLO_PROGRAM = r"""
import hashlib, importlib.util, pathlib, re, sys
checkout, family, variant = sys.argv[1:4]
sys.path.insert(0, checkout)
spec = importlib.util.spec_from_file_location(
    "throughput_under_test", pathlib.Path(checkout, "experiments", "throughput.py"))
tp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tp)
tp.FLAGS(["throughput.py", "--nobreakdown", *sys.argv[4:]])
import jax
_, _, mesh, step, state, batches, _ = tp.build(family, variant)
with jax.set_mesh(mesh):
  text = step.lower(state, batches[0]).compile().as_text()
lines = [re.sub(r",? ?(metadata=\{[^}]*\}|stack_frame_id=\d+)", "", line)
         for line in text.splitlines() if re.match(r"\s*(ROOT )?%|[A-Z%].*\{$|ENTRY", line)]
print(len(lines), hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16])
"""


def hlo_fingerprint(checkout: pathlib.Path, family: str, variant: str) -> tuple[int, str]:
  """(instructions, hash) of the optimized HLO of one model's train step built by `checkout`."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([sys.executable, "-c", _HLO_PROGRAM, str(checkout), family, variant,
                           *FLAGS.extra], cwd=checkout, env=env, capture_output=True, text=True,
                          check=False)
  if result.returncode != 0:
    raise SystemExit(f"error: compiling {family}:{variant} in {checkout} failed:\n"
                     f"{result.stderr[-2000:]}")
  count, digest = result.stdout.split()[-2:]
  return int(count), digest


def compare_hlo(sides: dict, commits: dict) -> str:
  """Markdown: per model, both checkouts' optimized train-step HLO and whether they are the same."""
  lines = [f"`python experiments/throughput_vs_commit.py {' '.join(sys.argv[1:])}`, "
           f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
           f"new: {commits['new']}; old: {commits['old']}", "",
           "| model | old: HLO lines, hash | new: HLO lines, hash | same program |",
           "|---|---|---|---|"]
  for family in FLAGS.families:
    for variant in FLAGS.variants:
      old, new = (hlo_fingerprint(sides[name], family, variant) for name in ("old", "new"))
      lines.append(f"| {family}:{variant} | {old[0]}, {old[1]} | {new[0]}, {new[1]} | "
                   f"{'yes' if old == new else 'no'} |")
      print(lines[-1], flush=True)
  return "\n".join(lines) + "\n"


def paired_ratios(runs: list[dict], model: str) -> list[float]:
  """new / old tokens/s of `model` within each round (the two runs nearest in time)."""
  tok = {(run["round"], run["side"]): r["tokens_per_s"] for run in runs for r in run["rows"]
         if f"{r['family']}:{r['variant']}" == model}
  return [tok[(i, "new")] / tok[(i, "old")] for i in sorted({i for i, _ in tok})
          if (i, "new") in tok and (i, "old") in tok]


def report(runs: list[dict], header: list[str]) -> str:
  """The markdown report: `header` lines, then per model both sides' tokens/s and MFU against the
  common peak."""
  peak = max(max(r.get("peak_flops_all") or [r["peak_flops"]]) for run in runs for r in run["rows"])
  models = list(dict.fromkeys(f"{r['family']}:{r['variant']}" for r in runs[0]["rows"]))
  lines = [*header, f"common peak: {peak / 1e12:.3f} TFLOP/s float32, the highest 2048^2 matmul rate "
           f"timed by any of the {len(runs)} runs", "",
           "| round | side | wall s | load (1/5/15 min) before | " +
           " | ".join(f"{m} tok/s" for m in models) + " |",
           "|---|---|---:|---|" + "---:|" * len(models)]
  for run in runs:
    by_model = {f"{r['family']}:{r['variant']}": r for r in run["rows"]}
    lines.append(f"| {run['round']} | {run['side']} | {run['wall_s']:.0f} | {run['load']} | " +
                 " | ".join(f"{by_model[m]['tokens_per_s']:.0f}" for m in models) + " |")
  lines += ["", "Median over rounds; MFU = model FLOP/s / the common peak.", "",
            "| model | old tok/s | new tok/s | new / old | new / old per round (geo. mean) | "
            "old MFU | new MFU | MFU points | within 3 points | old / new FLOPs per token |",
            "|---|---:|---:|---:|---|---:|---:|---:|---|---|"]
  for m in models:
    side = {}
    for name in ("old", "new"):
      rows = [r for run in runs if run["side"] == name for r in run["rows"]
              if f"{r['family']}:{r['variant']}" == m]
      side[name] = {"tok": statistics.median(r["tokens_per_s"] for r in rows),
                    "mfu": statistics.median(r["tflops_per_s"] * 1e12 / peak for r in rows),
                    "flop_per_token": rows[0]["tflops_per_s"] * 1e12 / rows[0]["tokens_per_s"]}
    o, n = side["old"], side["new"]
    pairs = paired_ratios(runs, m)
    geo = statistics.geometric_mean(pairs)
    lines.append(f"| {m} | {o['tok']:.0f} | {n['tok']:.0f} | {n['tok'] / o['tok']:.3f} | "
                 f"{', '.join(f'{x:.2f}' for x in pairs)} ({geo:.3f}) | "
                 f"{100 * o['mfu']:.1f}% | {100 * n['mfu']:.1f}% | "
                 f"{100 * (n['mfu'] - o['mfu']):+.1f} | "
                 f"{'yes' if abs(n['mfu'] - o['mfu']) <= 0.03 else 'no'} | "
                 f"{o['flop_per_token'] / 1e6:.2f}M / {n['flop_per_token'] / 1e6:.2f}M |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  commit = lambda path: _git(path, "log", "-1", "--format=%h (%cd)", "--date=short")
  if FLAGS.from_jsonl:
    with open(FLAGS.from_jsonl, encoding="utf-8") as f:
      runs = [json.loads(line) for line in f if line.strip()]
    print(report(runs, [f"tables recomputed from the rows in {FLAGS.from_jsonl} by "
                        f"`python experiments/throughput_vs_commit.py {' '.join(sys.argv[1:])}` "
                        f"at {commit(REPO)}"]))
    return
  if not FLAGS.old_checkout or not (pathlib.Path(FLAGS.old_checkout) / "experiments").is_dir():
    raise SystemExit("error: --old_checkout must be a checkout of the old commit "
                     "(git worktree add --detach DIR COMMIT)")
  sides = {"new": REPO, "old": pathlib.Path(FLAGS.old_checkout).resolve()}
  commits = {name: commit(path) for name, path in sides.items()}
  if FLAGS.compare_hlo:
    markdown = compare_hlo(sides, commits)
    print(markdown)
    if FLAGS.out:
      pathlib.Path(FLAGS.out).write_text(markdown, encoding="utf-8")
    return
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(FLAGS.rounds):
      for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
        rows, wall, load = run_side(sides[name], os.path.join(tmp, f"{name}{i}.jsonl"))
        runs.append({"round": i + 1, "side": name, "rows": rows, "wall_s": wall, "load": load})
        print(f"round {i + 1} {name}: " + ", ".join(
            f"{r['family']}:{r['variant']} {r['tokens_per_s']:.0f} tok/s" for r in rows) +
            f"  ({wall:.0f} s, load {load})", flush=True)
  command = "python experiments/throughput_vs_commit.py " + " ".join(sys.argv[1:])
  markdown = report(runs, [f"command: `{command}`",
                           f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
                           f"new: {commits['new']}; old: {commits['old']}"])
  print(markdown)
  if FLAGS.out:
    pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(FLAGS.out).write_text(markdown, encoding="utf-8")
    with open(pathlib.Path(FLAGS.out).with_suffix(".jsonl"), "w", encoding="utf-8") as f:
      for run in runs:
        f.write(json.dumps(run) + "\n")
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
