"""What experiments/throughput.py prints and writes: the per-model progress lines, the --ab table,
the throughput table, the step-time breakdown (text and PNG) and the JSON lines of --output."""

import json

from experiments import profile_breakdown

AB_HEADER = ("| model | switch | on: ms/step | off: ms/step | on is faster by | "
             "buffers MiB on / off | compile s on / off | page faults/step on / off |\n"
             "|---|---|---:|---:|---:|---:|---:|---:|")


def ab_row(r: dict) -> str:
  """One row of the --ab table from experiments.throughput.compare_switch's result."""
  return (f"| {r['family']}:{r['variant']} | {r['switch']} | {1000 * r['on_step_s']:.0f} | "
          f"{1000 * r['off_step_s']:.0f} | {r['speedup']:.3f}x | "
          f"{r['on_buffers_mib']:.0f} / {r['off_buffers_mib']:.0f} | "
          f"{r['on_compile_s']:.1f} / {r['off_compile_s']:.1f} | "
          f"{r['on_faults_per_step']:.0f} / {r['off_faults_per_step']:.0f} |")


def append_jsonl(path: str, records: list[dict]) -> None:
  """Appends one JSON line per record to `path` (nothing when `path` is empty)."""
  if not path:
    return
  with open(path, "a", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


def print_progress(r: dict, peak_now: float, top_scopes: int) -> None:
  """The lines printed as soon as one model is measured (rates, and its profile if any)."""
  print(f"{r['family']}:{r['variant']}  {r['tokens_per_s']:.0f} tok/s  "
        f"{r['tflops_per_s']:.3f} TFLOP/s  compile {r['compile_s']:.1f}s  "
        f"step {1000 * r['step_s']:.0f}ms  page faults/step {r['page_faults_per_step']:.0f}  "
        f"(matmul peak now {peak_now / 1e12:.3f})", flush=True)
  if r["breakdown"]:
    b = r["breakdown"]
    print(f"  profiled step {1000 * b['profiled_step_s']:.0f}ms, top ops (ms/step): " +
          ", ".join(f"{op} {cls} {ms:.1f}" for op, cls, ms, _ in b["top_ops"][:4]), flush=True)
    for scope, cls, ms, n_ops in b["top_scopes"][:top_scopes]:
      print(f"    {ms:8.2f} ms/step  {cls:<9} {n_ops:3d} ops  {scope}", flush=True)


def print_table(rows: list[dict]) -> None:
  """The markdown table of every measured model (rows carry their "mfu")."""
  print("\n| model | params | batch x T | tokens/s | loss-bearing tokens/s | MFU | compile s | "
        "peak mem GiB |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    shape = f"{r['batch']} x {r['seq_len']}" + (f"+{r['target_len']}" if r["target_len"] else "")
    print(f"| {r['family']}:{r['variant']} | {r['params'] / 1e6:.1f}M | {shape} | "
          f"{r['tokens_per_s']:.0f} | {r['loss_tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
          f"{r['compile_s']:.1f} | "
          f"{r['peak_mem_gb']:.2f} |")


def print_breakdown(rows: list[dict], plot: str, device: str, dtype: str) -> None:
  """The step-time breakdown per model, as text and (with `plot`) as stacked bars in a PNG."""
  print("\nstep-time breakdown, % of the profiled step's wall time:")
  print(f"{'model':<22}" + profile_breakdown.header())
  for r in rows:
    print(f"{r['family'] + ':' + r['variant']:<22}" +
          profile_breakdown.format_row(r["breakdown"]["fractions"]))
  if plot:
    profile_breakdown.plot(
        [(f"{r['family']}:{r['variant']}\n{100 * r['mfu']:.1f}% MFU", r["breakdown"]["fractions"])
         for r in rows], plot, f"train-step time on {device}, {dtype}")
    print(f"wrote {plot}")
