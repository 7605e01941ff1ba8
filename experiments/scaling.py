"""A one-command IsoFLOP study of GPT on enwiki2015 (Chinchilla approaches 2 and 3).

  python experiments/scaling.py --preset=cpu --out=experiments/results/scaling_cpu
  python experiments/scaling.py --preset=smoke --out=/tmp/scaling_smoke       # tests, < 90 s
  python experiments/scaling.py --preset=cpu --budgets=1e12,3e12 --sizes=100k,300k,1M --seeds=0

For every compute budget C and every GPT size N of the preset's ladder, one run trains on
D = C / (6 N) tokens (rounded to whole steps) with a cosine schedule ending at its last step,
then reports its held-out loss (enwiki2015's validation articles). N is the total parameter
count including the (tied) token and position embeddings, as Chinchilla counts it: with a
tied output head, 6 N D is close to the real training FLOPs at these small widths, where
the head is a large share of the compute. The fits are repeated with the non-embedding count
(Kaplan et al.'s N) and both are in fit.json. Runs go through experiments/sweep.py's launcher
(submitit: --cluster=local|slurm|debug, --parallel; or --cluster=inprocess, the smoke
preset's default) and registry (OUT/runs/registry.jsonl), so
a rerun skips every finished run and resumes the rest. Outputs: OUT/runs.csv, OUT/fit.json,
OUT/results.md and three PNGs (loss against FLOPs per size with the frontier, IsoFLOP curves
with their minima, N_opt against C).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import sys
import time

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# submitit's workers unpickle experiments.sweep.train_run by module name: they need the repo root
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])

from experiments import scaling_fit  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import scaling_plots  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position
from gptjax.config_schema import ConfigError  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", ["smoke", "cpu"], "smoke: tests, < 90 s; cpu: 1-2 h on 2 cores.")
flags.DEFINE_string("out", "experiments/results/scaling", "Output folder (runs under OUT/runs).")
flags.DEFINE_list("budgets", [], "Compute budgets C in FLOPs (default: the preset's).")
flags.DEFINE_list("sizes", [], "Parameter counts (e.g. 100k,1M) picked from the preset's ladder "
                  "(default: the whole ladder).")
flags.DEFINE_list("seeds", [], "Seeds (default: the preset's); one seed gives no intervals.")
flags.DEFINE_float("max_epochs", 2.0, "Refuse budgets whose largest run reads the train split more "
                   "often than this.")
flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples for the intervals.")

BASE = "configs/gpt.py:tiny"
# (embed_dim, num_layers, num_heads); mlp 4x width
PRESETS = {
    # smoke: a constant learning rate after one warmup step, the same for every budget, so the
    # runs of one size share one compiled train step (a cosine ending at each run's last step
    # puts the run's length into the step: 6 compiles for 3 sizes)
    "smoke": dict(ladder=[(16, 1, 2), (32, 1, 4), (48, 1, 4)], budgets=[3e8, 1e9],
                  seeds=[0], vocab=512, seq_len=32, batch=8, eval_steps=4, lr=3e-3,
                  schedule="constant", warmup_steps=1, max_docs=40, parallel=2,
                  cluster="inprocess"),
    # 41k..656k parameters around Chinchilla's N_opt ~ sqrt(C / 120) for these budgets (the 41k
    # size was added after the first runs put the C=1e12 minimum below 67k); about 1.7e14 FLOPs
    # over 36 runs (1-2 h at the 2.5e10 FLOP/s these widths reach on 2 idle cores)
    "cpu": dict(ladder=[(16, 2, 4), (24, 2, 4), (32, 2, 4), (48, 3, 4), (64, 4, 4), (96, 4, 4)],
                budgets=[1e12, 3e12, 1e13], seeds=[0, 1], vocab=2048, seq_len=128, batch=8,
                eval_steps=50, lr=3e-3, max_docs=0, parallel=1, cluster="local"),
}


def _number(text: str) -> float:
  """'300k' / '1.5M' / '2e6' -> float."""
  text = text.strip()
  scale = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}.get(text[-1:].lower(), 1.0)
  try:
    return float(text[:-1] if scale != 1.0 else text) * scale
  except ValueError:
    raise ConfigError(f"{text!r} is not a number (write e.g. 3e12, 300k or 1.5M)") from None


def overrides_for(preset: dict, shape: tuple, seed: int, steps: int) -> dict:
  """The run.py config overrides of one run."""
  d, layers, heads = shape
  return {"data.corpus": "enwiki2015", "data.max_docs": preset["max_docs"],
          "model.vocab_size": preset["vocab"], "data.tokenizer.vocab_size": preset["vocab"],
          "model.embed_dim": d, "model.num_layers": layers, "model.num_heads": heads,
          "model.mlp_dim": 4 * d, "model.max_len": preset["seq_len"],
          "data.seq_len": preset["seq_len"], "data.batch_size": preset["batch"],
          "data.eval_batch_size": preset["batch"], "seed": seed, "data.seed": seed,
          "train.steps": steps, "train.learning_rate": preset["lr"],
          "train.warmup_steps": preset.get("warmup_steps") or max(1, min(100, steps // 10)),
          "train.schedule": preset.get("schedule", "cosine"),
          "train.log_every": max(1, steps // 50), "train.eval_every": steps,
          "train.eval_steps": preset["eval_steps"], "train.ckpt_every": max(steps // 4, 1),
          "train.keep": 1}


def param_counts(config) -> tuple[int, int]:
  """(total, non-embedding) parameters; the tied token table and the position table are embeddings."""
  from gptjax.analysis import param_summary as summary  # pylint: disable=g-import-not-at-top
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  rows = summary.flat_params(summary.param_shapes(ModelConfig.from_config(config.model)))
  total = sum(int(np.prod(s)) for _, s in rows)
  embed = sum(int(np.prod(s)) for n, s in rows if n.endswith("embed/embedding"))
  return total, total - embed


def chosen_ladder(preset: dict) -> list:
  """The preset's sizes, or those nearest to --sizes; one line for a size outside the ladder."""
  ladder = preset["ladder"]
  if not FLAGS.sizes:
    return ladder
  counts = {shape: param_counts(sweep.resolve(BASE, overrides_for(preset, shape, 0, 1)))[0]
            for shape in ladder}
  low, high = min(counts.values()), max(counts.values())
  chosen = []
  for text in FLAGS.sizes:
    want = _number(text)
    if not low / 1.5 <= want <= high * 1.5:
      raise ConfigError(f"--sizes: {text} parameters is outside this sweep's range "
                        f"{low / 1e3:.0f}k..{high / 1e6:.2f}M (preset {FLAGS.preset}); pick sizes in it")
    chosen.append(min(ladder, key=lambda s: abs(math.log(counts[s] / want))))
  return list(dict.fromkeys(chosen))


def plan_runs(preset: dict) -> tuple[list, list]:
  """([(run id, overrides, config)], [run description]) for every budget, size and seed."""
  budgets = [_number(b) for b in FLAGS.budgets] or preset["budgets"]
  seeds = [int(s) for s in FLAGS.seeds] or preset["seeds"]
  ladder = chosen_ladder(preset)
  tokens_per_step = preset["batch"] * preset["seq_len"]
  counts = {s: param_counts(sweep.resolve(BASE, overrides_for(preset, s, 0, 1))) for s in ladder}
  smallest = min(ladder, key=lambda s: counts[s][0])
  runs, described = [], []
  for budget in sorted(budgets):
    need = 6 * counts[smallest][0] * tokens_per_step
    if budget < need:
      raise ConfigError(f"--budgets: C={budget:.3g} FLOPs is too small for one step of the smallest "
                        f"size ({counts[smallest][0]:,} parameters x {tokens_per_step} tokens needs "
                        f"C >= {need:.3g}); raise it")
    for shape in ladder:
      total, non_embed = counts[shape]
      steps = int(round(budget / (6 * total) / tokens_per_step))
      if steps < 1:
        print(f"[scaling] C={budget:.3g}: size {total:,} gets no whole step, left out", flush=True)
        continue
      for seed in seeds:
        config = sweep.resolve(BASE, overrides_for(preset, shape, seed, steps))
        overrides = overrides_for(preset, shape, seed, steps)
        runs.append((sweep.run_id(BASE, overrides), overrides, config))
        described.append({"budget": budget, "embed_dim": shape[0], "num_layers": shape[1],
                          "params": total, "params_non_embedding": non_embed, "seed": seed,
                          "steps": steps, "tokens": steps * tokens_per_step})
  return runs, described


def corpus_repeats(config, largest_tokens: int) -> tuple[int, float]:
  """(train-split tokens, epochs the largest run reads); builds the tokenizer and token arrays."""
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from gptjax.data import tokenization
  tokenizer = tokenization.load_or_train_tokenizer(config)
  train_tokens = len(input_pipeline.tokenized(config, tokenizer, "train", "stream")["tokens"])
  return train_tokens, largest_tokens / max(train_tokens, 1)


def collect(registry, runs: list, described: list) -> list[dict]:
  """One row per finished run: its description, held-out loss and counted FLOPs."""
  rows = []
  for (rid, _, config), desc in zip(runs, described):
    r = registry.runs.get(rid, {})
    m = r.get("metrics", {})
    if r.get("status") != "done" or "eval_loss" not in m:
      continue
    from gptjax.training import flops  # pylint: disable=g-import-not-at-top
    from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
    per_example = flops.train_flops_per_example(ModelConfig.from_config(config.model),
                                                config.data.seq_len, 0, "next_token")
    rows.append({**desc, "run_id": rid, "eval_loss": m["eval_loss"],
                 "flops_6nd": 6 * desc["params"] * desc["tokens"],
                 "flops_counted": per_example * desc["steps"] * config.data.batch_size,
                 "wall_s": m.get("wall_s"), "workdir": r.get("workdir")})
  return rows


def fit_all(rows: list) -> dict:
  """Approach 2 and 3 on total-parameter N (the fit reported) and on non-embedding N."""
  out = {"n_used": "params (total, embeddings included; Chinchilla's count)"}
  for key, name in (("params", "total"), ("params_non_embedding", "non_embedding")):
    runs = [{"budget": r["budget"], "n": r[key], "d": r["tokens"], "seed": r["seed"],
             "loss": r["eval_loss"]} for r in rows]
    points = scaling_fit.cell_means(runs)
    fit3 = scaling_fit.approach3(np.asarray([p["n"] for p in points]),
                                 np.asarray([p["d"] for p in points]),
                                 np.asarray([p["loss"] for p in points]))
    out[name] = {"approach2": scaling_fit.approach2(points), "approach3": fit3,
                 "intervals": scaling_fit.bootstrap_intervals(runs, FLAGS.bootstrap,
                                                              approach3_fit=fit3)}
  return out


def write_outputs(out: str, rows: list, fit: dict, header: list) -> str:
  """runs.csv, fit.json, results.md; returns the markdown."""
  with open(os.path.join(out, "runs.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  with open(os.path.join(out, "fit.json"), "w", encoding="utf-8") as f:
    json.dump(fit, f, indent=1)
  lines = header + ["", "| C (FLOPs) | params | non-embedding | tokens | steps | seeds | eval loss |",
                    "|---|---|---|---|---|---|---|"]
  cells: dict = {}
  for r in rows:
    cells.setdefault((r["budget"], r["params"]), []).append(r)
  for (budget, params), rs in sorted(cells.items()):
    losses = [r["eval_loss"] for r in rs]
    lines.append(f"| {budget:.3g} | {params:,} | {rs[0]['params_non_embedding']:,} | "
                 f"{rs[0]['tokens']:,} | {rs[0]['steps']} | {len(rs)} | {np.mean(losses):.4f} "
                 f"± {np.std(losses):.4f} |")
  for name in ("total", "non_embedding"):
    lines += ["", f"Fit on {name} parameter counts"
              + (" (the one reported)" if name == "total" else " (Kaplan's N)") + ":", ""]
    lines += [f"    {ln}" for ln in scaling_fit.comparison_lines(fit[name])]
    for m in fit[name]["approach2"]["minima"]:
      lines.append(f"    C={m['budget']:.3g}: N_opt={m['n_opt']:,.0f}, D_opt={m['d_opt']:,.0f}, "
                   f"loss {m['loss_min']:.4f}" + ("" if m["inside_range"] else
                                                  "  (outside the sizes run: extrapolated)"))
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return text


def main(argv):
  """Plans, launches (skipping finished runs), fits and plots."""
  del argv
  start = time.time()
  preset = PRESETS[FLAGS.preset]
  if not FLAGS["parallel"].present:
    FLAGS.parallel = preset["parallel"]
  if not FLAGS["cluster"].present:  # smoke: in this process, without a run.py start-up per run
    FLAGS.cluster = preset["cluster"]
  try:
    runs, described = plan_runs(preset)
    seeds = sorted({d["seed"] for d in described})
    train_tokens, epochs = corpus_repeats(runs[0][2], max(d["tokens"] for d in described))
    print(f"[scaling] {len(runs)} runs; enwiki2015 train split: {train_tokens:,} tokens; the "
          f"largest run reads {max(d['tokens'] for d in described):,} tokens = {epochs:.2f} epochs "
          f"(limit --max_epochs={FLAGS.max_epochs:g})", flush=True)
    if epochs > FLAGS.max_epochs:
      raise ConfigError(f"the largest budget repeats the corpus {epochs:.2f} times, more than "
                        f"--max_epochs={FLAGS.max_epochs:g}; lower --budgets or raise --max_epochs")
    os.makedirs(FLAGS.out, exist_ok=True)
    registry = sweep.launch(os.path.join(FLAGS.out, "runs"), BASE, runs)
  except (ConfigError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  rows = collect(registry, runs, described)
  missing = len(runs) - len(rows)
  if missing or not rows:
    print(f"[scaling] {missing} of {len(runs)} runs have no result yet (see "
          f"{os.path.join(FLAGS.out, 'runs', 'registry.jsonl')}); rerun the same command",
          file=sys.stderr)
    sys.exit(1)
  from gptjax.training import run_records  # pylint: disable=g-import-not-at-top
  fit = fit_all(rows)
  fit.update(seeds=seeds, corpus="enwiki2015", train_tokens=train_tokens, max_epochs_read=epochs,
             preset=FLAGS.preset, git_commit=run_records.git_commit())
  header = [f"IsoFLOP study, preset {FLAGS.preset}: `python experiments/scaling.py "
            f"{' '.join(sys.argv[1:])}`",
            f"commit {fit['git_commit']}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
            f"this invocation {time.time() - start:.0f} s, training wall time summed over runs "
            f"{sum(r['wall_s'] or 0 for r in rows):.0f} s; corpus enwiki2015 ({train_tokens:,} train "
            f"tokens, the largest run reads {epochs:.2f} epochs); seeds {seeds}"
            + ("" if len(seeds) > 1 else " (one seed: intervals n/a)")]
  print(write_outputs(FLAGS.out, rows, fit, header), end="")
  scaling_plots.write_plots(FLAGS.out, rows, fit["total"])
  print(f"[scaling] {FLAGS.out}: runs.csv, fit.json, results.md, loss_vs_flops.png, isoflop.png, "
        "n_opt_vs_c.png")


if __name__ == "__main__":
  app.run(main)
