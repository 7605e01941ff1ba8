"""compare_objectives' outputs: results.csv, results.md (tables, thresholds, directions), PNGs."""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from experiments import objective_directions

COLUMNS = ["arm", "seed", "params", "pretrain_steps", "pretrain_tokens", "loss_tokens",
           "intrinsic_name", "intrinsic", "intrinsic_loss", "unigram_loss", "nats_below_unigram",
           "encoder_text_gain",
           "nsp_acc", "sop_acc", "pair_eval_pairs", "probe_acc", "probe_random_acc",
           "finetune_acc", "scratch_acc",
           "majority_acc", "pretrain_wall_s", "unit_wall_s", "git_commit"]
# the thresholds: pre-training ends >= 1 nat below its unigram baseline; every fine-tune
# (and scratch) ends >= 0.15 above the majority class on sst2 dev
LEARNED_NATS, ABOVE_MAJORITY = 1.0, 0.15


def majority_baseline() -> float:
  """Accuracy of always predicting sst2 train's most common label on sst2 dev."""
  from gptjax.data import corpora  # pylint: disable=g-import-not-at-top
  raw = corpora.raw_data_dir()
  def labels(name):
    with open(os.path.join(raw, "sst2", name), encoding="utf-8") as f:
      next(f)
      return [int(line.rstrip("\r\n").split("\t")[-1]) for line in f if line.strip()]
  train_labels, dev_labels = labels("train.tsv"), labels("dev.tsv")
  majority = int(np.mean(train_labels) >= 0.5)
  return float(np.mean(np.asarray(dev_labels) == majority))


def _mean_std(values):
  values = [float(v) for v in values if v not in (None, "") and not math.isnan(float(v))]
  if not values:
    return float("nan"), float("nan")
  return float(np.mean(values)), float(np.std(values))


def read_rows(path: str) -> list[dict]:
  """The rows of an existing results.csv (empty when there is none)."""
  if not os.path.exists(path):
    return []
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def write_csv(out: str, rows: list[dict]) -> None:
  """results.csv, one row per finished (arm, seed) unit, written atomically."""
  path = os.path.join(out, "results.csv")
  with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  os.replace(path + ".tmp", path)


def _cell(rows, arm, key) -> str:
  vals = [r.get(key) for r in rows if r["arm"] == arm]
  n = sum(v not in (None, "") for v in vals)
  m, s = _mean_std(vals)
  if math.isnan(m):
    return ""
  return f"{m:.3f}" if n == 1 else f"{m:.3f} ± {s:.3f}"


def thresholds(rows: list[dict], majority: float) -> list[str]:
  """Per unit: does pre-training end >= 1 nat below unigram, fine-tune and scratch >= +0.15; and
  for encoder-decoders, how much the decoder's text loss rises with another row's encoder input."""
  lines = ["| arm | seed | nats below unigram | meets >= 1 | decoder's gain from its encoder (nats) "
           "| fine-tune - majority | scratch - majority | both >= 0.15 |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    nats = r.get("nats_below_unigram")
    ft = float(r["finetune_acc"]) - majority if r.get("finetune_acc") not in (None, "") else None
    sc = float(r["scratch_acc"]) - majority if r.get("scratch_acc") not in (None, "") else None
    learned = "" if nats in (None, "") else ("yes" if float(nats) >= LEARNED_NATS else "no")
    ok = "" if ft is None or sc is None else \
        ("yes" if min(ft, sc) >= ABOVE_MAJORITY else "no")
    gain = r.get("encoder_text_gain")
    gain = "" if gain in (None, "") else f"{float(gain):+.3f}"
    lines.append(f"| {r['arm']} | {r['seed']} | {'' if nats in (None, '') else f'{float(nats):.2f}'} "
                 f"| {learned} | {gain} | {'' if ft is None else f'{ft:+.3f}'} | "
                 f"{'' if sc is None else f'{sc:+.3f}'} | {ok} |")
  return lines


def wilson(accuracy: float, n: int) -> tuple[float, float]:
  """95% Wilson score interval of a proportion measured on n trials."""
  z = 1.96
  centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return centre - half, centre + half


def pair_tasks(rows: list[dict]) -> list[str]:
  """Per pair-arm unit: NSP and SOP accuracy with a 95% Wilson interval, and against chance."""
  lines = ["| arm | seed | task | held-out pairs | accuracy [95% interval] | against chance (0.5) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    n = r.get("pair_eval_pairs")
    if n in (None, ""):
      continue
    n = int(float(n))
    for task in ("nsp", "sop"):
      acc = float(r[f"{task}_acc"])
      low, high = wilson(acc, n)
      call = "above" if low > 0.5 else "below" if high < 0.5 else "at chance"
      own = " (its own task)" if r["arm"] == f"mlm_{task}" else ""
      lines.append(f"| {r['arm']} | {r['seed']} | {task.upper()}{own} | {n:,} | {acc:.3f} "
                   f"[{low:.3f}, {high:.3f}] | {call} |")
  return lines


def write_markdown(out: str, rows: list[dict], majority: float, header: list[str],
                   published: dict) -> str:
  """results.md: the per-arm table, gains with intervals, thresholds, directions; returns it."""
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  cols = [("intrinsic", "intrinsic metric"), ("intrinsic_loss", "intrinsic loss"),
          ("unigram_loss", "unigram loss"), ("nsp_acc", "NSP pairs"), ("sop_acc", "SOP pairs"),
          ("probe_acc", "sst2 probe"), ("probe_random_acc", "probe, random body"),
          ("finetune_acc", "sst2 fine-tune"), ("scratch_acc", "sst2 scratch")]
  lines = header + ["", "| arm | seeds | params | tokens | " + " | ".join(c[1] for c in cols)
                    + " | published direction |", "|---|---|---|---|" + "---|" * (len(cols) + 1)]
  for arm in arms:
    mine = [r for r in rows if r["arm"] == arm]
    name = mine[0].get("intrinsic_name", "")
    cells = [(f"{name} " if key == "intrinsic" else "") + _cell(rows, arm, key) for key, _ in cols]
    lines.append(f"| {arm} | {len(mine)} | {int(float(mine[0]['params'])):,} | "
                 f"{int(float(mine[0]['pretrain_tokens'])):,} | " + " | ".join(cells)
                 + f" | {published.get(arm, '')} |")
  lines += ["", "Cells are the mean ± standard deviation over seeds (a single value: one seed).", "",
            f"majority class on sst2 dev: {majority:.3f}", "",
            "Pre-training helps? Means over seeds with 95% t-intervals (n/a: one seed):", ""]
  lines += objective_directions.gains_table(rows)
  lines += ["", "Thresholds (computed from results.csv):", ""] + thresholds(rows, majority)
  lines += ["", "Pair tasks (ALBERT Table 5's cross-task check), per unit on held-out enwiki2015 "
            "pairs; an arm at chance on its own task did not learn it at this budget:", ""]
  lines += pair_tasks(rows)
  lines += ["", "Published directions (our delta: the same difference per seed, paired; verdict "
            "computed from the interval):", ""] + objective_directions.directions_table(rows)
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
    f.write(text)
  return text


def write_plots(out: str, rows: list, curves: dict, majority: float) -> None:
  """loss_vs_flops.png (pre-training curves) and downstream_accuracy.png (bars with std)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  fig, ax = plt.subplots(figsize=(7, 4))
  for arm in arms:
    curve = curves.get(arm) or []
    if curve:
      ax.plot([c[0] for c in curve], [c[1] for c in curve], label=arm)
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel("train loss")
  ax.set_xscale("log")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "loss_vs_flops.png"), dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(8, 4))
  x = np.arange(len(arms))
  bars = [("probe_acc", "linear probe"), ("probe_random_acc", "probe, random body"),
          ("finetune_acc", "fine-tune"), ("scratch_acc", "fine-tune from scratch")]
  for i, (key, label) in enumerate(bars):
    stats = [_mean_std([r.get(key) for r in rows if r["arm"] == a]) for a in arms]
    ax.bar(x + (i - 1.5) * 0.2, [s[0] for s in stats], 0.2, yerr=[s[1] for s in stats],
           label=label, capsize=3)
  ax.axhline(majority, color="k", ls="--", lw=1, label="majority class")
  ax.set_xticks(x)
  ax.set_xticklabels(arms, rotation=20, fontsize=8)
  ax.set_ylabel("sst2 dev accuracy")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "downstream_accuracy.png"), dpi=120)
  plt.close(fig)
