"""PNG plots of an IsoFLOP study: loss against FLOPs per size, IsoFLOP curves, N_opt against C."""

from __future__ import annotations

import json
import os

import numpy as np


def _train_curve(workdir: str, flops_per_token: float, tokens_per_step: float) -> list:
  points = []
  path = os.path.join(workdir or "", "metrics.jsonl")
  if not os.path.exists(path):
    return points
  with open(path, encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r and "eval_loss" not in r:
        points.append((r["step"] * tokens_per_step * flops_per_token, r["loss"]))
  return points


def write_plots(out: str, rows: list, fit: dict) -> None:
  """loss_vs_flops.png, isoflop.png and n_opt_vs_c.png in `out` (fit: the total-N fit)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sizes = sorted({r["params"] for r in rows})
  budgets = sorted({r["budget"] for r in rows})
  colours = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))

  def mean_loss(budget, size):
    vals = [r["eval_loss"] for r in rows if r["budget"] == budget and r["params"] == size]
    return float(np.mean(vals)) if vals else None

  # loss against FLOPs: each size's training curve at the largest budget, its held-out losses at
  # every budget, and the frontier (the lowest held-out loss reached at each budget)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for colour, size in zip(colours, sizes):
    runs = [r for r in rows if r["params"] == size]
    longest = max(runs, key=lambda r: r["tokens"])
    curve = _train_curve(longest["workdir"], 6 * size, longest["tokens"] / longest["steps"])
    if curve:
      ax.plot([c[0] for c in curve], [c[1] for c in curve], color=colour, alpha=0.35, lw=1)
    xs = [b for b in budgets if mean_loss(b, size) is not None]
    ax.plot(xs, [mean_loss(b, size) for b in xs], "o-", color=colour, label=f"N={size / 1e3:.0f}k")
  frontier = [(b, min(v for v in (mean_loss(b, s) for s in sizes) if v is not None)) for b in budgets]
  ax.plot([f[0] for f in frontier], [f[1] for f in frontier], "k--", lw=1.5, label="frontier")
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs (6 N D)")
  ax.set_ylabel("loss (faint: train curve; dots: held-out)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "loss_vs_flops.png"), dpi=120)
  plt.close(fig)

  # IsoFLOP curves: held-out loss against N per budget, with the parabola and its minimum
  fig, ax = plt.subplots(figsize=(7, 4.5))
  minima = {m["budget"]: m for m in fit["approach2"]["minima"]}
  for colour, budget in zip(plt.cm.plasma(np.linspace(0, 0.8, len(budgets))), budgets):
    xs = [s for s in sizes if mean_loss(budget, s) is not None]
    ys = [mean_loss(budget, s) for s in xs]
    ax.plot(xs, ys, "o", color=colour, label=f"C={budget:.2g}")
    if len(xs) >= 3:
      c2, c1, c0 = np.polyfit(np.log(xs), ys, 2)
      grid = np.linspace(np.log(min(xs)), np.log(max(xs)), 50)
      ax.plot(np.exp(grid), c0 + c1 * grid + c2 * grid ** 2, color=colour, lw=1)
    if budget in minima:
      ax.plot(minima[budget]["n_opt"], minima[budget]["loss_min"], "*", color=colour, ms=14)
  ax.set_xscale("log")
  ax.set_xlabel("parameters N (total)")
  ax.set_ylabel("held-out loss")
  ax.set_title("IsoFLOP curves (stars: parabola minima)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "isoflop.png"), dpi=120)
  plt.close(fig)

  # N_opt against C with the fitted power law and the published slopes through the first point
  fig, ax = plt.subplots(figsize=(6, 4.5))
  ms = fit["approach2"]["minima"]
  if ms:
    c = np.asarray([m["budget"] for m in ms])
    n = np.asarray([m["n_opt"] for m in ms])
    ax.plot(c, n, "o", color="C0", label="IsoFLOP minima")
    grid = np.geomspace(c.min(), c.max(), 20)
    if fit["approach2"]["a"] is not None:
      a, coef = fit["approach2"]["a"], fit["approach2"]["n_coef"]
      ax.plot(grid, coef * grid ** a, color="C0", label=f"fit a={a:.2f}")
    for slope, name, style in ((0.50, "Chinchilla a=0.50", ":"), (0.73, "Kaplan a=0.73", "--")):
      ax.plot(grid, n[0] * (grid / c[0]) ** slope, "k" + style, lw=1, label=name)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("compute C (FLOPs)")
  ax.set_ylabel("N_opt (total parameters)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "n_opt_vs_c.png"), dpi=120)
  plt.close(fig)
