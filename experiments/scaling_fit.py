"""The fits of an IsoFLOP study: Chinchilla approaches 2 and 3, bootstrap intervals, plots.

A run is a dict {budget, n, d, seed, loss}: compute budget C (FLOPs), parameter count N
(whichever count the caller fits), tokens D and final held-out loss.

Approach 2 (Hoffmann et al. 2022, Sec. 3.2): per budget, a parabola of loss in log N; its
minimum gives N_opt(C), and D_opt = C / (6 N_opt). Then N_opt ∝ C^a and D_opt ∝ C^b by least
squares in log-log. Approach 3 (Sec. 3.3): L(N, D) = E + A/N^α + B/D^β fitted to every run by
minimising a Huber loss (δ = 1e-3) of log-loss residuals from a grid of starting points with
BFGS (the paper: L-BFGS); it implies a = β/(α+β), b = α/(α+β).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

# Published exponents shown beside ours.
CHINCHILLA = {"a": 0.50, "b": 0.50, "alpha": 0.34, "beta": 0.28}  # a, b: approach 2 (0.49, 0.51)
KAPLAN = {"a": 0.73}


def parabola_minimum(log_n: np.ndarray, loss: np.ndarray):
  """(log N at the minimum, loss there) of a least-squares parabola; None when it opens downwards."""
  if len(set(np.round(log_n, 9))) < 3:
    return None
  c2, c1, c0 = np.polyfit(log_n, loss, 2)
  if c2 <= 0:
    return None
  x = -c1 / (2 * c2)
  return float(x), float(c0 + c1 * x + c2 * x * x)


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
  """(exponent k, coefficient c) of y = c x^k fitted in log-log."""
  k, log_c = np.polyfit(np.log(x), np.log(y), 1)
  return float(k), float(math.exp(log_c))


def cell_means(runs: list[dict], rng: np.random.Generator | None = None) -> list[dict]:
  """One point per (budget, n): the mean loss over seeds (resampled with replacement given `rng`)."""
  cells: dict[tuple, list] = {}
  for r in runs:
    cells.setdefault((r["budget"], r["n"]), []).append(r)
  out = []
  for (budget, n), rs in sorted(cells.items()):
    losses = np.asarray([r["loss"] for r in rs])
    if rng is not None:
      losses = rng.choice(losses, size=len(losses), replace=True)
    out.append({"budget": budget, "n": n, "d": rs[0]["d"], "loss": float(losses.mean())})
  return out


def approach2(points: list[dict]) -> dict:
  """IsoFLOP minima per budget and the exponents a (N_opt ∝ C^a), b (D_opt ∝ C^b).

  N_opt and D_opt come from parabolas in log N and in log D (the same thing when D = C / 6N,
  not when N leaves out the embeddings). The power laws use the minima that lie inside the
  sizes run, unless fewer than two do ("used": which).
  """
  minima = []
  for budget in sorted({p["budget"] for p in points}):
    ps = [p for p in points if p["budget"] == budget]
    losses = np.asarray([p["loss"] for p in ps])
    best_n = parabola_minimum(np.log([p["n"] for p in ps]), losses)
    best_d = parabola_minimum(np.log([p["d"] for p in ps]), losses)
    if best_n is None or best_d is None:
      continue
    n_opt = math.exp(best_n[0])
    minima.append({"budget": budget, "n_opt": n_opt, "d_opt": math.exp(best_d[0]),
                   "loss_min": best_n[1],
                   "inside_range": min(p["n"] for p in ps) <= n_opt <= max(p["n"] for p in ps)})
  inside = [m for m in minima if m["inside_range"]]
  used = inside if len(inside) >= 2 else minima
  out = {"minima": minima, "a": None, "b": None,
         "used": "minima inside the sizes run" if used is inside else "all minima (extrapolated)"}
  if len(used) >= 2:
    c = np.asarray([m["budget"] for m in used])
    out["a"], out["n_coef"] = power_law(c, np.asarray([m["n_opt"] for m in used]))
    out["b"], out["d_coef"] = power_law(c, np.asarray([m["d_opt"] for m in used]))
  return out


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def approach3(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = 1e-3,
              start: dict | None = None) -> dict:
  """E, A, B, α, β of L = E + A/N^α + B/D^β (Chinchilla's Huber fit on log-loss, BFGS from a grid).

  `start`: a previous fit to start from instead of the grid (the bootstrap's refits).
  """
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  from scipy.special import logsumexp  # pylint: disable=g-import-not-at-top
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)

  def objective(theta):
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    pred = logsumexp(terms, axis=0)
    r = pred - log_l
    weights = np.exp(terms - pred)  # d pred / d term
    slope = np.clip(r, -delta, delta)  # d huber / d r
    grad = [np.sum(slope * weights[0]), np.sum(slope * weights[1]), np.sum(slope * weights[2]),
            -np.sum(slope * weights[0] * log_n), -np.sum(slope * weights[1] * log_d)]
    return float(_huber(r, delta).sum()), np.asarray(grad)

  best = None
  grid = itertools.product((0., 10., 20.), (0., 10., 20.), (-1., 0.5),
                           (0.2, 0.5), (0.2, 0.5))
  if start is not None:
    grid = [(math.log(start["A"]), math.log(start["B"]), math.log(start["E"]), start["alpha"],
             start["beta"])]
  for theta0 in grid:
    # BFGS, not L-BFGS-B: scipy's L-BFGS-B spends milliseconds per iteration in its BLAS calls
    res = optimize.minimize(objective, np.asarray(theta0), method="BFGS", jac=True,
                            options={"maxiter": 500})
    if best is None or res.fun < best.fun:
      best = res
  a, b, e, alpha, beta = best.x
  return {"E": float(math.exp(e)), "A": float(math.exp(a)), "B": float(math.exp(b)),
          "alpha": float(alpha), "beta": float(beta), "a": float(beta / (alpha + beta)),
          "b": float(alpha / (alpha + beta)), "huber_loss": float(best.fun)}


def predict(fit: dict, n, d):
  """L(N, D) of an approach-3 fit."""
  return fit["E"] + fit["A"] / np.power(n, fit["alpha"]) + fit["B"] / np.power(d, fit["beta"])


def bootstrap_intervals(runs: list[dict], num: int = 200, seed: int = 0,
                        approach3_fit: dict | None = None) -> dict:
  """95% percentile intervals of a, b (and α, β) from resampling seeds within each cell.

  With one seed per cell there is nothing to resample: every interval is 'n/a'.
  """
  with_approach3 = approach3_fit is not None
  keys = ["a", "b"] + (["alpha", "beta"] if with_approach3 else [])
  seeds_per_cell: dict[tuple, int] = {}
  for r in runs:
    seeds_per_cell[(r["budget"], r["n"])] = seeds_per_cell.get((r["budget"], r["n"]), 0) + 1
  if min(seeds_per_cell.values()) < 2:
    return {k: "n/a" for k in keys}
  rng = np.random.default_rng(seed)
  samples: dict[str, list] = {k: [] for k in keys}
  for _ in range(num):
    points = cell_means(runs, rng)
    fit2 = approach2(points)
    if fit2["a"] is not None:
      samples["a"].append(fit2["a"])
      samples["b"].append(fit2["b"])
    if with_approach3:
      fit3 = approach3(np.asarray([p["n"] for p in points]), np.asarray([p["d"] for p in points]),
                       np.asarray([p["loss"] for p in points]), start=approach3_fit)
      samples["alpha"].append(fit3["alpha"])
      samples["beta"].append(fit3["beta"])
  return {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= 10 else "n/a"
          for k, v in samples.items()}


def against(interval, published: float) -> str:
  """Where a published value lies against our 95% interval: within, or ours above/below it."""
  if not isinstance(interval, list):
    return "n/a (one seed)"
  if interval[0] <= published <= interval[1]:
    return f"{published} within"
  return f"ours {'above' if interval[0] > published else 'below'} {published}"


def comparison_lines(fit: dict) -> list[str]:
  """Our exponents beside Chinchilla's and Kaplan's, one line each, with the computed agreement."""
  intervals = fit.get("intervals", {})

  def show(key, source):
    value = source.get(key)
    if value is None:
      return "n/a"
    interval = intervals.get(key, "n/a")
    text = f"{value:.3f}"
    return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if isinstance(interval, list) else
                   " [n/a]")

  def verdict(key, *published):
    return "; ".join(against(intervals.get(key, "n/a"), p) for p in published)
  a2, a3 = fit["approach2"], fit["approach3"]
  return [
      f"a (N_opt ∝ C^a), approach 2: {show('a', a2)}   Chinchilla 0.50 (0.49), Kaplan 0.73   "
      f"({verdict('a', CHINCHILLA['a'], KAPLAN['a'])})",
      f"b (D_opt ∝ C^b), approach 2: {show('b', a2)}   Chinchilla 0.50 (0.51)   "
      f"({verdict('b', CHINCHILLA['b'])})",
      f"alpha (A/N^alpha), approach 3: {show('alpha', a3)}   Chinchilla 0.34   "
      f"({verdict('alpha', CHINCHILLA['alpha'])})",
      f"beta (B/D^beta), approach 3: {show('beta', a3)}   Chinchilla 0.28   "
      f"({verdict('beta', CHINCHILLA['beta'])})",
      f"a, b implied by approach 3: {a3['a']:.3f}, {a3['b']:.3f}   Chinchilla 0.46, 0.54",
      f"E (irreducible loss), approach 3: {a3['E']:.3f} nats   Chinchilla 1.69 (another corpus "
      "and tokenizer)"]
