"""The sweep's registry (ROOT/registry.jsonl, one line per run) and its comparison table."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from typing import Any

REGISTRY = "registry.jsonl"
TABLE_METRICS = ("step", "loss", "eval_loss", "eval_lm_perplexity", "eval_mlm_accuracy",
                 "eval_lm_accuracy", "tokens_per_sec", "wall_s")


def write_result(workdir: str, returncode: int, start: float) -> dict[str, Any]:
  """WORKDIR/sweep_result.json (exit code, wall time) of a finished run, written atomically."""
  result = {"returncode": returncode, "wall_s": round(time.time() - start, 1)}
  tmp = os.path.join(workdir, "sweep_result.json.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(result, f)
  os.replace(tmp, os.path.join(workdir, "sweep_result.json"))
  return result


class Registry:
  """ROOT/registry.jsonl: one JSON line per run, rewritten whole (atomically) on every change."""

  def __init__(self, root: str):
    self.path = os.path.join(root, REGISTRY)
    self.runs: dict[str, dict] = {}
    if os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        for line in f:
          if line.strip():
            r = json.loads(line)
            self.runs[r["run_id"]] = r

  def update(self, rid: str, **fields) -> dict:
    """Merges `fields` into run `rid` and writes the file."""
    self.runs.setdefault(rid, {"run_id": rid}).update(fields)
    self.save()
    return self.runs[rid]

  def save(self) -> None:
    """Writes every run, one line each."""
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in self.runs.values():
        f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, self.path)


def table_rows(registry: Registry, sort_by: str) -> tuple[list[str], list[dict]]:
  """(columns, rows) across every run in the registry, best `sort_by` first."""
  fields = sorted({f for r in registry.runs.values() for f in r.get("overrides", {})})
  varying = [f for f in fields
             if len({json.dumps(r.get("overrides", {}).get(f)) for r in registry.runs.values()}) > 1]
  fields = varying or fields  # fields fixed across every run are in the registry, not the table
  metric_names = [m for m in TABLE_METRICS
                  if any(m in r.get("metrics", {}) for r in registry.runs.values())]
  columns = ["run_id", "status", *fields, *metric_names]
  rows = []
  for r in registry.runs.values():
    row = {"run_id": r["run_id"], "status": r.get("status", "")}
    row.update({f: r.get("overrides", {}).get(f, "") for f in fields})
    row.update({m: r.get("metrics", {}).get(m, "") for m in metric_names})
    rows.append(row)
  key = lambda row: (not isinstance(row.get(sort_by), (int, float)),
                     row.get(sort_by) if isinstance(row.get(sort_by), (int, float)) else 0)
  return columns, sorted(rows, key=key)


def _cell(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
  return str(v)


def write_tables(root: str, registry: Registry, sort_by: str) -> str:
  """Writes ROOT/sweep_results.{md,csv}; returns the markdown."""
  columns, rows = table_rows(registry, sort_by)
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
  markdown = "\n".join(lines) + "\n"
  with open(os.path.join(root, "sweep_results.md"), "w", encoding="utf-8") as f:
    f.write(markdown)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  with open(os.path.join(root, "sweep_results.csv"), "w", encoding="utf-8", newline="") as f:
    f.write(buf.getvalue())
  return markdown
