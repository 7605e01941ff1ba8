"""Means with 95% intervals over seeds, and the published directions compare_objectives checks.

A direction is a published difference between two arms (BERT Table 5, T5 Table 2, ALBERT
Table 5). Ours is the same difference per seed (paired: the two arms share the seed), its
mean and a 95% t-interval. The verdict is computed: `reproduced` when the interval excludes 0
on the published side, `opposite` when it excludes 0 on the other side, `inconclusive` when it
contains 0 (or when there is no interval: one seed gives `n/a`).
"""

from __future__ import annotations

import math

import numpy as np

# (name, metric, arm, minus arm, published delta, source). Metrics are row columns of
# results.csv; a delta against chance uses the arm "chance" (0.5).
DIRECTIONS = [
    ("no NSP vs MLM+NSP, SST-2", "finetune_acc", "mlm", "mlm_nsp", -0.1,
     "BERT Table 5: No NSP 92.6 vs BERT-base 92.7 (SST-2 dev)"),
    ("left-to-right vs MLM+NSP, SST-2", "finetune_acc", "next_token", "mlm_nsp", -0.6,
     "BERT Table 5: LTR & No NSP 92.1 vs BERT-base 92.7 (SST-2 dev)"),
    ("span corruption vs prefix LM, SST-2", "finetune_acc", "span_corruption", "prefix_lm", 3.6,
     "T5 Table 2: enc-dec denoising 83.28 vs prefix LM 79.68 (GLUE average)"),
    ("span corruption vs LM, SST-2", "finetune_acc", "span_corruption", "next_token", 9.5,
     "T5 Table 2: enc-dec denoising 83.28 vs decoder-only LM 73.78 (GLUE average)"),
    ("SOP vs NSP, SST-2", "finetune_acc", "mlm_sop", "mlm_nsp", 0.9,
     "ALBERT Table 5: SOP vs NSP, downstream average 80.2 vs 79.3"),
    ("SOP task: SOP-trained vs NSP-trained", "sop_acc", "mlm_sop", "mlm_nsp", 34.5,
     "ALBERT Table 5: SOP accuracy 86.5 (SOP-trained) vs 52.0 (NSP-trained)"),
    ("NSP task: SOP-trained vs chance", "nsp_acc", "mlm_sop", "chance", 28.9,
     "ALBERT Table 5: the SOP-trained model solves NSP at 78.9 (chance 50)"),
    ("SOP task: NSP-trained vs chance", "sop_acc", "mlm_nsp", "chance", 2.0,
     "ALBERT Table 5: the NSP-trained model solves SOP at 52.0, near chance (50)"),
]


def t_interval(values) -> tuple[float, object]:
  """(mean, [low, high] 95% t-interval) of `values`; the interval is 'n/a' below two values."""
  v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
  if len(v) == 0:
    return float("nan"), "n/a"
  mean = float(v.mean())
  if len(v) < 2:
    return mean, "n/a"
  from scipy import stats  # pylint: disable=g-import-not-at-top
  half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
  return mean, [mean - half, mean + half]


def verdict(published: float, interval) -> str:
  """reproduced / opposite / inconclusive from the sign of the published delta and our interval."""
  if not isinstance(interval, (list, tuple)) or published == 0:
    return "inconclusive"
  low, high = interval
  if low <= 0 <= high:
    return "inconclusive"
  return "reproduced" if (low > 0) == (published > 0) else "opposite"


def paired_deltas(rows: list[dict], metric: str, arm: str, other: str) -> list[float]:
  """metric(arm) - metric(other) for every seed both arms have (other='chance': 0.5)."""
  def value(a, seed):
    if a == "chance":
      return 0.5
    r = next((r for r in rows if r["arm"] == a and int(r["seed"]) == seed), None)
    v = None if r is None else r.get(metric)
    return None if v in (None, "") else float(v)
  seeds = sorted({int(r["seed"]) for r in rows if r["arm"] == arm})
  pairs = [(value(arm, s), value(other, s)) for s in seeds]
  return [a - b for a, b in pairs if a is not None and b is not None]


def format_interval(mean: float, interval, scale: float = 1.0) -> str:
  """'m [lo, hi]' or 'm [n/a]'."""
  if math.isnan(mean):
    return "no runs"
  if not isinstance(interval, (list, tuple)):
    return f"{mean * scale:+.3f} [n/a]"
  return f"{mean * scale:+.3f} [{interval[0] * scale:+.3f}, {interval[1] * scale:+.3f}]"


def directions_table(rows: list[dict]) -> list[str]:
  """Markdown rows: direction, published delta, ours (points, 95% interval), seeds, verdict."""
  lines = ["| direction | published delta (points) | ours (points, 95% interval) | seeds | verdict "
           "| source |", "|---|---|---|---|---|---|"]
  for name, metric, arm, other, published, source in DIRECTIONS:
    deltas = paired_deltas(rows, metric, arm, other)
    mean, interval = t_interval(deltas)
    shown = format_interval(mean, interval, 100.0)
    call = verdict(published, interval) if deltas else "no runs"
    lines.append(f"| {name} | {published:+.1f} | {shown} | {len(deltas)} | {call} | {source} |")
  return lines


def gains_table(rows: list[dict]) -> list[str]:
  """Per arm: fine-tuned minus scratch and probe minus random-body probe, each with a 95% interval."""
  lines = ["| arm | seeds | fine-tuned - scratch | probe - random-body probe |", "|---|---|---|---|"]
  for arm in dict.fromkeys(r["arm"] for r in rows):
    mine = [r for r in rows if r["arm"] == arm]
    ft = [float(r["finetune_acc"]) - float(r["scratch_acc"]) for r in mine
          if r.get("finetune_acc") not in (None, "") and r.get("scratch_acc") not in (None, "")]
    pr = [float(r["probe_acc"]) - float(r["probe_random_acc"]) for r in mine
          if r.get("probe_acc") not in (None, "") and r.get("probe_random_acc") not in (None, "")]
    lines.append(f"| {arm} | {len(mine)} | {format_interval(*t_interval(ft))} | "
                 f"{format_interval(*t_interval(pr))} |")
  return lines
