"""Parameter tables of a checkpoint: norms per parameter and per layer, and two checkpoints' diff.

Used by gptjax/analysis/checkpoint_analysis.py (`run.py --mode=analyze`), which also writes them.
"""

from __future__ import annotations

import csv
import re
from typing import Any, Optional

import numpy as np
from flax import traverse_util

from gptjax.config_schema import ConfigError

_LAYER = re.compile(r"^layers_\d+$")


def flat(params: Any) -> list[tuple[str, np.ndarray]]:
  """(slash-joined path, array) for every parameter leaf, in tree (sorted key) order."""
  return [("/".join(path), np.asarray(leaf))
          for path, leaf in sorted(traverse_util.flatten_dict(params).items())]


def layer_of(name: str) -> str:
  """The layer a parameter belongs to: `decoder/layers_3`, `token_embed`, `decoder/final_norm`."""
  parts = name.split("/")
  for i, p in enumerate(parts):
    if _LAYER.match(p):
      return "/".join(parts[: i + 1])
  return "/".join(parts[:-1]) or parts[0]


def _natural(text: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def param_table(params: Any) -> list[dict]:
  """One row per parameter: layer, shape, size, L2 norm, RMS, max |x|."""
  rows = []
  for name, x in flat(params):
    x64 = x.astype(np.float64)
    norm = float(np.sqrt(np.sum(x64 * x64)))
    rows.append({"param": name, "layer": layer_of(name), "shape": "x".join(map(str, x.shape)),
                 "size": int(x.size), "norm": norm, "rms": norm / max(np.sqrt(x.size), 1.0),
                 "max_abs": float(np.max(np.abs(x64))) if x.size else 0.0})
  return rows


def layer_table(params: Any) -> list[dict]:
  """One row per layer: parameter count and the L2 norm of all its parameters together."""
  sums: dict[str, list] = {}
  for name, x in flat(params):
    s = sums.setdefault(layer_of(name), [0, 0.0])
    s[0] += x.size
    s[1] += float(np.sum(x.astype(np.float64) ** 2))
  return [{"layer": k, "size": v[0], "norm": float(np.sqrt(v[1]))}
          for k, v in sorted(sums.items(), key=lambda kv: _natural(kv[0]))]


def diff_tables(params_a: Any, params_b: Any) -> tuple[list[dict], list[dict]]:
  """(per-parameter rows, per-layer rows) of relative change ||a-b||/||a|| and cosine(a, b)."""
  fa, fb = dict(flat(params_a)), dict(flat(params_b))
  if set(fa) != set(fb) or any(fa[n].shape != fb[n].shape for n in fa):
    raise ConfigError("the two parameter trees differ in names or shapes; they are different "
                      "architectures")

  def row(dot, aa, bb, dd):
    na, nb = np.sqrt(aa), np.sqrt(bb)
    return {"norm_a": float(na), "norm_b": float(nb),
            "rel_change": float(np.sqrt(dd) / na) if na > 0 else float(np.sqrt(dd) > 0),
            "cosine": float(dot / (na * nb)) if na > 0 and nb > 0 else float(na == nb)}

  param_rows, acc = [], {}
  for name, a in fa.items():
    a64, b64 = a.astype(np.float64).ravel(), fb[name].astype(np.float64).ravel()
    stats = np.array([a64 @ b64, a64 @ a64, b64 @ b64, np.sum((a64 - b64) ** 2)])
    param_rows.append({"param": name, "layer": layer_of(name), **row(*stats)})
    acc[layer_of(name)] = acc.get(layer_of(name), 0) + stats
  layer_rows = [{"layer": k, **row(*v)} for k, v in sorted(acc.items(), key=lambda kv: _natural(kv[0]))]
  return param_rows, layer_rows


def write_csv(path: str, rows: list[dict]) -> str:
  """Writes `rows` (dicts with the same keys) to `path`."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
  return path


def format_table(rows: list[dict], columns: Optional[list[str]] = None) -> str:
  """A plain-text table of `rows`; floats with 5 significant digits."""
  if not rows:
    return "(empty)"
  columns = columns or list(rows[0])
  cell = lambda v: f"{v:.5g}" if isinstance(v, float) else str(v)
  cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  line = lambda vals: "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                for i, (v, w) in enumerate(zip(vals, widths)))
  return "\n".join([line(columns), "-" * (sum(widths) + 2 * len(widths)), *map(line, cells)])
