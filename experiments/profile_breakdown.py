"""Step-time breakdown of a jitted train step from a JAX profiler trace.

  with jax.profiler.trace(log_dir):
    ... run a few steps, timing their wall clock ...
  b = breakdown(log_dir, compiled_hlo_text, steps=3, wall_s=elapsed)

How it works. `jax.profiler.trace` writes `<host>.trace.json.gz` (plain gzipped Chrome-trace
JSON; the `.xplane.pb` next to it is read through `jax.profiler.ProfileData` only when no JSON is
there, so neither tensorflow nor tensorboard-plugin-profile is needed). Every executed HLO
instruction is one complete event ("ph": "X") whose args carry `hlo_op` (the instruction name,
e.g. `ynn_fusion.202`, `subtract_exponential_fusion`) and `hlo_module` (`jit_train_step`).
Those names are opaque, so each is looked up in the compiled module's HLO text
(`jitted.lower(...).compile().as_text()`), which gives its opcode, the opcodes inside the fused
computation it calls, any custom-call target, and the `op_name` metadata: the JAX name stack,
e.g. `jit(train_step)/transpose(jvp(DecoderOnly))/decoder/layers_3/self_attn/div`. Classes:

  matmul     a `dot` or `convolution` anywhere in the instruction or its fused computation (on
             XLA:CPU mostly `ynn_fusion.*`, YNNPACK GEMMs with their epilogue; YNNPACK also
             runs some reductions, which are not matmuls and are not counted here), or a
             GEMM/conv custom-call (cuBLAS, oneDNN, Triton GEMM fusions). This includes the
             attention score and value einsums and the vocabulary projection.
  attention  the rest of an attention module: a name-stack component `self_attn`, `cross_attn`,
             `*attn`, `*attention` or `rel_bias` (softmax, mask, scale, head transposes,
             projection bias adds, rotary), and fused-attention custom-calls (cuDNN fMHA).
  norm_elem  the rest of the model (name stack under `jvp(<Module>)`): norms, activations,
             residual adds, embedding gathers and their scatter-add gradients, the gradient
             barrier's copies.
  loss       differentiated but outside the model (`jvp()`, `jvp(jit(take_along_axis))`):
             log-softmax over the vocabulary, cross-entropy, its one-hot gradient.
  optimizer  not differentiated at all (no `jvp(` in the name stack): optax update, gradient
             clipping and global norm, the learning-rate schedule, parameter update.
  other      control flow (`conditional`, `while`), collectives, copies and reduce-windows that
             XLA inserted without any metadata, and anything not found in the HLO text.

Time per class. Per trace thread, each op event's self time (its duration less nested op
events) is summed by class: that is thread time, and on XLA:CPU several thunk-executor threads
run ops concurrently. Device busy time is the union of all op intervals over all threads (on a
GPU only the `/device:` processes are used). On XLA:CPU a plain `dot` runs in Eigen after its
trace event has ended, so the idle gap that follows one counts as that dot's time and as busy
(`_async_tails`). Class fractions of the wall step time are busy / wall x class thread time /
all thread time; `host` = 1 - busy / wall: Python dispatch, argument handling, and gaps where no
op runs (waiting for a core on a shared machine included).

Limits. A fusion is classified by what it contains and by the name stack of its root (or first
named) instruction, so an elementwise epilogue fused into a GEMM counts as matmul and one fused
fusion spanning two modules counts wholly for one. Name-stack rules rely on Flax wrapping module
calls in named scopes and on the loss being computed outside the model; a model built otherwise
(or a scanned stack, whose layer names are the same) is still split correctly by opcode but
may move time between attention and norm_elem. The profiler adds per-op overhead, so the traced
step is slower than an untraced one; compare fractions, not the profiled step time. GPU traces
are parsed by the same code but were not tested here.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
from typing import Iterable, Optional

CATEGORIES = ("matmul", "attention", "norm_elem", "loss", "optimizer", "other")
COLUMNS = (("matmul", "matmul%"), ("attention", "attn%"), ("norm_elem", "norm/elem%"),
           ("loss", "loss%"), ("optimizer", "optimizer%"), ("other", "other%"), ("host", "host%"))

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|\s)([a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_CALLS = re.compile(r"calls=(?:\{([^}]*)\}|(%?[\w.\-]+))")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_FUSION_KIND = re.compile(r'"fusion_config":\{"kind":"([^"]*)"')
_MATMUL_TARGET = re.compile(r"gemm|matmul|conv|dot", re.I)
_ATTENTION_TARGET = re.compile(r"fmha|flash|attention|softmax", re.I)
_ATTENTION_SCOPE = re.compile(r"^(?:\w*attn|\w*attention|rel_bias)$")
_MODEL_SCOPE = re.compile(r"jvp\(([A-Z]\w*)\)")
_CONTROL = {"conditional", "while", "call", "all-reduce", "all-gather", "reduce-scatter",
            "all-to-all", "collective-permute", "send", "recv", "infeed", "outfeed"}


@dataclasses.dataclass(frozen=True)
class HloOp:
  """One instruction of a compiled HLO module, as far as classification needs it."""
  name: str
  opcode: str
  contents: frozenset  # opcodes of the instruction and of the computations it calls
  op_name: str         # JAX name stack from the metadata ('' when none)
  target: str          # custom-call target or custom fusion kind ('' when none)


def parse_hlo(text: str) -> dict[str, HloOp]:
  """Instruction name -> HloOp for every instruction of an HLO module's text."""
  comps: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
  current = ""
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      current = m.group(1)
      continue
    m = _INSTR.match(line)
    if not m or not current:
      continue
    rest = m.group(2)
    opcode = _OPCODE.search(rest.split(", metadata=")[0])
    comps[current].append((m.group(1), opcode.group(1) if opcode else "", rest))

  def called(rest: str) -> list[str]:
    m = _CALLS.search(rest)
    return [c.strip().lstrip("%") for c in (m.group(1) or m.group(2)).split(",")] if m else []

  memo: dict[str, tuple[frozenset, str]] = {}

  def comp_info(comp: str, depth: int = 0) -> tuple[frozenset, str]:
    """Opcodes used in `comp` (fusions inside it included) and its first op_name."""
    if comp not in memo:
      memo[comp] = (frozenset(), "")  # guards against cycles
      ops, first = set(), ""
      for _, opcode, rest in comps.get(comp, ()):
        ops.add(opcode)
        name = _OP_NAME.search(rest)
        first = first or (name.group(1) if name else "")
        if depth < 8:
          for c in called(rest):
            sub_ops, sub_name = comp_info(c, depth + 1)
            ops |= sub_ops
            first = first or sub_name
      memo[comp] = (frozenset(ops), first)
    return memo[comp]

  ops = {}
  for instrs in comps.values():
    for name, opcode, rest in instrs:
      contents, op_name = {opcode}, ""
      m = _OP_NAME.search(rest)
      if m:
        op_name = m.group(1)
      if opcode == "fusion":
        for c in called(rest):
          sub_ops, sub_name = comp_info(c)
          contents |= sub_ops
          op_name = op_name or sub_name
      target = _TARGET.search(rest) or _FUSION_KIND.search(rest)
      ops[name] = HloOp(name, opcode, frozenset(contents), op_name,
                        target.group(1) if target else "")
  return ops


def classify(op: HloOp) -> str:
  """The breakdown class of one HLO instruction (see the module docstring)."""
  if {"dot", "convolution"} & op.contents or (op.target and _MATMUL_TARGET.search(op.target)):
    return "matmul"
  if op.target and _ATTENTION_TARGET.search(op.target):
    return "attention"
  if op.opcode in _CONTROL or not op.op_name:
    return "other"
  stack = op.op_name
  if "jvp(" not in stack:
    return "optimizer" if stack.startswith(("jit(", "pmap(")) else "other"
  if not _MODEL_SCOPE.search(stack):
    return "loss"
  if any(_ATTENTION_SCOPE.match(part) for part in stack.split("/")):
    return "attention"
  return "norm_elem"


def classify_name(name: str) -> str:
  """Fallback class from an op name alone, for ops missing from the HLO text."""
  if re.search(r"dot|gemm|matmul|conv|cublas|cutlass", name, re.I):
    return "matmul"
  if re.search(r"fmha|flash|softmax|attention", name, re.I):
    return "attention"
  return "other"


def load_events(log_dir: str) -> list[dict]:
  """Complete ("X") events of the newest trace under `log_dir`, with pid/tid/ts/dur in us."""
  runs = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*")), key=os.path.getmtime)
  if not runs:
    raise FileNotFoundError(f"no profile under {log_dir}")
  run = runs[-1]
  files = sorted(glob.glob(os.path.join(run, "*.trace.json.gz")) +
                 glob.glob(os.path.join(run, "perfetto_trace.json.gz")))
  if files:
    with gzip.open(files[0], "rt") as f:
      data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [dict(e, process=processes.get(e.get("pid"), "")) for e in events
            if e.get("ph") == "X"]
  return _events_from_xplane(glob.glob(os.path.join(run, "*.xplane.pb"))[0])


def _events_from_xplane(path: str) -> list[dict]:
  """The same event dicts read from an .xplane.pb through jax.profiler.ProfileData."""
  import jax  # pylint: disable=g-import-not-at-top
  events = []
  data = jax.profiler.ProfileData.from_file(path)
  for pid, plane in enumerate(data.planes):
    for tid, line in enumerate(plane.lines):
      for e in line.events:
        events.append({"name": e.name, "pid": pid, "tid": tid, "process": plane.name,
                       "ts": e.start_ns / 1e3, "dur": e.duration_ns / 1e3,
                       "args": {k: str(v) for k, v in e.stats}})
  return events


def _union_length(intervals: list[tuple[float, float]]) -> float:
  """Total length covered by a list of (start, end) intervals."""
  total, end = 0.0, float("-inf")
  for s, e in sorted(intervals):
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def _self_times(events: list[dict]) -> Iterable[tuple[dict, float]]:
  """(event, duration less its nested events) for the op events of one thread."""
  events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
  stack: list[list] = []  # [event, end, child time]
  out = []
  for e in events:
    while stack and e["ts"] >= stack[-1][1] - 1e-6:
      top = stack.pop()
      out.append((top[0], top[0]["dur"] - top[2]))
    if stack:
      stack[-1][2] += e["dur"]
    stack.append([e, e["ts"] + e["dur"], 0.0])
  out.extend((top[0], top[0]["dur"] - top[2]) for top in stack)
  return out


def _async_tails(events: list[dict], hlo: dict[str, HloOp]) -> collections.Counter:
  """Idle time right after each host-side asynchronous op, keyed by op name (microseconds).

  XLA:CPU hands a plain `dot` (one it does not give to YNNPACK, e.g. a weight gradient that
  contracts the leading axis of both operands) to Eigen and returns: the trace event covers the
  dispatch only (0.9 ms of a 4.5 ms [2048, 256]^T x [2048, 1024] product). Until the next op
  starts, no event shows the product running, so such gaps are counted as the dot's time rather
  than as host time.
  """
  tails = collections.Counter()
  end, last = float("-inf"), None
  for e in sorted(events, key=lambda e: e["ts"]):
    if last is not None and e["ts"] > end:
      op = hlo.get(last["args"]["hlo_op"])
      if op is not None and op.opcode in ("dot", "convolution"):
        tails[op.name] += e["ts"] - end
    if e["ts"] + e["dur"] > end:
      end, last = e["ts"] + e["dur"], e
  return tails


def breakdown(log_dir: str, hlo_text: str, steps: int, wall_s: float,
              module: Optional[str] = None, top: int = 10) -> dict:
  """Fractions of the wall step time per class, from the trace of `steps` steps taking `wall_s`.

  Args:
    log_dir: the directory given to `jax.profiler.trace`.
    hlo_text: the compiled module's HLO text (`jitted.lower(...).compile().as_text()`).
    steps: how many steps ran inside the trace.
    wall_s: their total wall-clock time, measured inside the trace.
    module: keep only events of this `hlo_module` (default: the one with the most op time).
    top: how many of the most expensive instructions to list.

  Returns:
    {"fractions": {class: fraction of wall, "host": ...}, "profiled_step_s", "device_busy_s",
     "concurrency" (op thread time / busy time), "top_ops": [[name, class, ms/step, op_name]],
     "top_scopes": [[scope, class, ms/step, instructions per step]]}: a scope is the name stack
    with layer indices dropped, so one row sums e.g. every layer's backward MLP matmul.
  """
  events = [e for e in load_events(log_dir) if "hlo_op" in e.get("args", {})]
  if any(e["process"].startswith("/device:") for e in events):
    events = [e for e in events if e["process"].startswith("/device:")]
  if module is None:
    per_module = collections.Counter()
    for e in events:
      per_module[e["args"].get("hlo_module", "")] += e["dur"]
    module = per_module.most_common(1)[0][0] if per_module else ""
  events = [e for e in events if e["args"].get("hlo_module", "") == module]
  hlo = parse_hlo(hlo_text) if hlo_text else {}
  threads = collections.defaultdict(list)
  for e in events:
    threads[(e["pid"], e["tid"])].append(e)
  by_class = collections.Counter()
  by_op = collections.Counter()
  for thread_events in threads.values():
    for e, self_us in _self_times(thread_events):
      by_op[e["args"]["hlo_op"]] += self_us
  on_device = any(e["process"].startswith("/device:") for e in events)
  tails = {} if on_device else _async_tails(events, hlo)
  by_op.update(tails)
  classes = {}
  for name, us in by_op.items():
    classes[name] = classify(hlo[name]) if name in hlo else classify_name(name)
    by_class[classes[name]] += us
  busy_us = _union_length([(e["ts"], e["ts"] + e["dur"]) for e in events]) + sum(tails.values())
  thread_us = sum(by_class.values()) or 1.0
  step_s = wall_s / steps
  busy_s = min(busy_us / 1e6 / steps, step_s)
  fractions = {c: busy_s / step_s * by_class[c] / thread_us for c in CATEGORIES}
  fractions["host"] = 1.0 - busy_s / step_s
  top_ops = [[name, classes[name], round(us / 1e3 / steps, 3),
              hlo[name].op_name if name in hlo else ""] for name, us in by_op.most_common(top)]
  by_scope = collections.Counter()
  scope_ops = collections.Counter()
  for name, us in by_op.items():
    key = (scope_of(hlo[name].op_name if name in hlo else ""), classes[name])
    by_scope[key] += us
    scope_ops[key] += 1
  top_scopes = [[scope, cls, round(us / 1e3 / steps, 3), scope_ops[(scope, cls)]]
                for (scope, cls), us in by_scope.most_common(top)]
  return {"fractions": fractions, "profiled_step_s": step_s, "device_busy_s": busy_s,
          "concurrency": thread_us / max(busy_us, 1e-9), "module": module, "top_ops": top_ops,
          "top_scopes": top_scopes}


def scope_of(op_name: str) -> str:
  """A JAX name stack without the jit and differentiation prefixes, layer indices as layers_N."""
  parts = op_name.split("/")[1:]  # drop jit(train_step)
  if not parts:
    return "(no metadata)"
  direction = "bwd " if parts[0].startswith("transpose(") else ""
  if "jvp(" in parts[0]:
    parts = parts[1:] or parts
  return direction + re.sub(r"layers_\d+", "layers_N", "/".join(parts))


def header() -> str:
  """Column names of `format_row`, space separated."""
  return " ".join(f"{label:>10}" for _, label in COLUMNS)


def format_row(fractions: dict) -> str:
  """Percentages of one breakdown, aligned under `header()`."""
  return " ".join(f"{100 * fractions.get(key, 0.0):>10.1f}" for key, _ in COLUMNS)


def plot(rows: list[tuple[str, dict]], path: str, title: str = "") -> None:
  """Stacked horizontal bars of the step-time fractions, one bar per (label, fractions) row."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.4))
  colors = plt.get_cmap("tab10").colors
  labels = [label for label, _ in rows][::-1]
  left = [0.0] * len(rows)
  for i, (key, name) in enumerate(COLUMNS):
    widths = [100 * f.get(key, 0.0) for _, f in rows][::-1]
    ax.barh(labels, widths, left=left, color=colors[i % len(colors)], label=name.rstrip("%"))
    left = [a + b for a, b in zip(left, widths)]
  ax.set_xlim(0, 100)
  ax.set_xlabel("% of the profiled step's wall time")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
