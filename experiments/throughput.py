"""Train-step throughput and MFU per family and variant, against the peak training reports MFU with.

  python experiments/throughput.py --families=gpt,bert,t5 --variants=small,base
  python experiments/throughput.py --families=gpt --variants=gpt2_124m_t128 --batch_size=4

Speed does not depend on token values, so batches are random ids in the exact layout each
objective's pipeline produces (gptjax/data/batch_spec.py). MFU = model FLOPs/s (6N + attention,
encoder and decoder counted separately) / gptjax/training/peak_flops.py's peak, as in the train
loop's metrics: the device's nominal peak where it is known, else (CPU) the best 2048^2 matmul
rate timed in this run, timed again after every model.

With --breakdown (default), a few more steps run under `jax.profiler.trace` after the timed ones
and experiments/profile_breakdown.py splits their wall time into matmul, attention,
norm/elementwise, loss, optimizer, other and host (see its docstring for how ops are classified).
Tokens/s and MFU come from the untraced steps only.

  python experiments/throughput.py --families=gpt --variants=small --ab=causal_blocks,donate_state

--ab builds each model twice, with a switch on and off, and times both in alternating rounds in
one process: the xla_cpu tricks (config.model.kernel_exclude, gptjax/backends/xla_cpu/ops.py),
and the SETTINGS below (scan over layers,
rematerialisation, state donation, metrics fetched one step late). It also reports the compiled
step's buffer total (arguments, unaliased outputs, temporaries), compile time and minor page
faults per timed step for each: both programs share one malloc heap (gptjax/backends/xla_cpu/host_memory.py), and
when one side keeps faulting pages in, the comparison measures the heap, not the switch.

This file measures; the tables, progress lines, plot and --output lines are in throughput_report.py.
"""

import importlib.util
import pathlib
import resource
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptjax import config_schema  # pylint: disable=g-import-not-at-top
from gptjax.model import models  # pylint: disable=g-import-not-at-top
from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
from gptjax.model.ops import ops_for  # pylint: disable=g-import-not-at-top
from gptjax.training import flops  # pylint: disable=g-import-not-at-top
from gptjax.training import peak_flops  # pylint: disable=g-import-not-at-top
from gptjax.training import sharding  # pylint: disable=g-import-not-at-top
from gptjax.training import train_step  # pylint: disable=g-import-not-at-top

from experiments import profile_breakdown  # pylint: disable=g-import-not-at-top
from experiments import throughput_report  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_list("families", ["gpt", "bert", "t5"], "Config files under configs/.")
flags.DEFINE_list("variants", ["small", "base"], "Variants; gpt2_124m_t128 is GPT-2 base at T=128.")
flags.DEFINE_integer("steps", 10, "Timed steps after compilation and warm-up.")
flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compilation (at least; see "
                     "--max_warmup_rounds).")
flags.DEFINE_integer("max_warmup_rounds", 4, "After --warmup_steps, up to this many more untimed "
                     "rounds of --steps steps while the heap is still growing (page faults).")
flags.DEFINE_integer("batch_size", 0, "Override the config's batch size (0: keep).")
flags.DEFINE_integer("seq_len", 0, "Override the config's sequence length (0: keep).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_string("attention_impl", "", "einsum | dot_product (empty: config default).")
flags.DEFINE_bool("scan_layers", False, "Scan over layers.")
flags.DEFINE_bool("donate", True, "Donate the train state to the step (off: for a comparison "
                  "across processes; --ab=donate_state compares in one).")
flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"],
                  "Rematerialisation policy per layer (config.model.remat).")
flags.DEFINE_enum("kernels", "auto", list(config_schema.KERNELS), "config.model.kernels: the "
                  "ops implementation (gptjax/model/ops.py).")
flags.DEFINE_list("slow_path", [], "xla_cpu tricks to turn off (added to config.model."
                  "kernel_exclude: the slow path each one replaced), for A/B runs across processes.")
flags.DEFINE_list("ab", [], "xla_cpu tricks or SETTINGS to A/B: each model is built with the "
                  "switch on and off and both are timed in alternating rounds of --steps in this "
                  "process.")
flags.DEFINE_string("output", "", "Append JSON lines of results to this file.")
flags.DEFINE_bool("breakdown", True, "Profile a few extra steps and split the step time by op "
                  "class (experiments/profile_breakdown.py).")
flags.DEFINE_integer("top_scopes", 0, "With --breakdown: list this many of the most expensive "
                     "name scopes (layer indices merged) per model.")
flags.DEFINE_string("plot", "", "With --breakdown: write the breakdown as stacked bars (PNG) here.")
flags.DEFINE_integer("profile_steps", 3, "Steps run under the profiler for --breakdown.")
flags.DEFINE_string("profile_dir", "", "Keep the profiler traces and the step's HLO text under "
                    "<dir>/<family>_<variant> (default: a temporary dir).")

# Train-step settings --ab can compare besides the xla_cpu tricks: gptjax's choice ("on") against
# the alternative ("off"). Values: config overrides (on, off), or for the loop, how metrics are
# fetched.
SETTINGS = {
    "unrolled_layers": {"model.scan_layers": (False, True)},   # off: scan over layers
    "no_remat": {"model.remat": ("none", "full")},             # off: rematerialise every layer
    "donate_state": {"donate": (True, False)},                 # off: the state is not donated
    "metrics_one_step_late": {"fetch": ("late", "each")},      # off: block on each step's loss
}

# Named shapes from the performance issue.
SPECIAL = {"gpt2_124m_t128": ("base", dict(seq_len=128, batch_size=4))}


def load_config(family: str, variant: str):
  """The config of `family` (configs/<family>.py) for `variant` or a SPECIAL named shape."""
  spec = importlib.util.spec_from_file_location(f"cfg_{family}", REPO / "configs" / f"{family}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  base_variant, data = SPECIAL.get(variant, (variant, {}))
  c = module.get_config(base_variant)
  for k, v in data.items():
    c.data[k] = v
  return c


def synthetic_batch(config, rng: np.random.Generator) -> dict:
  """Random ids in the objective's batch layout."""
  b, l = config.data.batch_size, config.data.seq_len
  t = config.data.target_len or l
  v = config.model.vocab_size
  ids = lambda *shape: rng.integers(5, v, size=shape, dtype=np.int32)
  ones = lambda *shape: np.ones(shape, np.float32)
  obj = config.objective
  if obj in ("next_token",):
    return {"inputs": ids(b, l), "targets": ids(b, l), "weights": ones(b, l),
            "segment_ids": np.ones((b, l), np.int32), "positions": np.tile(np.arange(l), (b, 1))}
  if obj in ("mlm", "mlm_nsp", "nsp", "sop"):
    w = (rng.random((b, l)) < 0.15).astype(np.float32)
    return {"inputs": ids(b, l), "targets": ids(b, l), "weights": w,
            "input_mask": np.ones((b, l), np.int32), "token_type_ids": np.zeros((b, l), np.int32),
            "pair_labels": rng.integers(0, 2, size=(b,), dtype=np.int32), "pair_weights": ones(b)}
  return {"enc_inputs": ids(b, l), "enc_mask": np.ones((b, l), np.int32), "dec_inputs": ids(b, t),
          "dec_targets": ids(b, t), "dec_weights": ones(b, t)}


def peak_memory_bytes() -> int:
  """Peak device memory on accelerators; peak resident memory of this process on CPU."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(family: str, variant: str, overrides: dict | None = None):
  """Config, model config, jitted train step, initial state and two device batches of one model.

  `overrides`: dotted config paths (e.g. "model.scan_layers") and "donate" (default --donate).
  """
  overrides = dict(overrides or {})
  donate = overrides.pop("donate", FLAGS.donate)
  c = load_config(family, variant)
  if FLAGS.batch_size:
    c.data.batch_size = FLAGS.batch_size
  if FLAGS.seq_len:
    c.data.seq_len = FLAGS.seq_len
  c.model.dtype = FLAGS.dtype
  c.model.dropout_rate = 0.0
  c.model.attention_dropout_rate = 0.0
  c.model.scan_layers = FLAGS.scan_layers
  c.model.remat = FLAGS.remat
  if FLAGS.attention_impl:
    c.model.attention_impl = FLAGS.attention_impl
  c.model.kernels = FLAGS.kernels
  c.model.kernel_exclude = ",".join(_excluded(c.model.kernel_exclude, FLAGS.slow_path))
  for path, value in overrides.items():
    section, key = path.split(".")
    c[section][key] = value
  cfg = ModelConfig.from_config(c.model)
  target_len = (c.data.target_len or c.data.seq_len) if cfg.family == "encoder_decoder" else 0
  tx = train_step.make_optimizer(c.train, ops=ops_for(cfg))
  mesh = sharding.make_mesh(c.parallelism)
  state, shardings = train_step.create_state(cfg, tx, 0, mesh, c.parallelism, c.data.seq_len,
                                             target_len)
  step = train_step.make_mesh_train_step(models.make_model(cfg), c.objective, tx, 0, 1, mesh,
                                         shardings, donate=donate)
  rng = np.random.default_rng(0)
  batches = [sharding.global_batch(synthetic_batch(c, rng), mesh) for _ in range(2)]
  return c, cfg, mesh, step, state, batches, target_len


def run_steps(step, state, batches, n: int, fetch: str = "end"):
  """(seconds per step, new state) over `n` steps.

  fetch: "end" synchronises once after the last step; "late" fetches each step's loss to the
  host after the next step is dispatched (as gptjax/training/train.py does); "each" right after its own.
  """
  t0 = time.perf_counter()
  pending = None
  for i in range(n):
    state, m = step(state, batches[i % 2])
    if fetch == "each":
      float(m["loss"])
    elif fetch == "late":
      if pending is not None:
        float(pending["loss"])
      pending = m
  jax.block_until_ready(m["loss"])
  return (time.perf_counter() - t0) / n, state


def run_steps_counting_faults(step, state, batches, n: int, fetch: str = "end"):
  """(seconds per step, minor page faults per step, new state) over `n` steps."""
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  dt, state = run_steps(step, state, batches, n, fetch)
  return dt, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n, state


def warm_up_heap(step, state, batches, fetch: str = "end", faults_per_step_done: int = 1000):
  """Untimed rounds of --steps steps until one faults in fewer pages per step than the limit.

  Steps dispatched without waiting overlap, so the timed rounds keep two or more steps' buffers
  alive at once: for gpt:base at T=1024 the heap grows from 9.5 to about 17 GB over the first
  such round, at 650,000 page faults per step, which would be timed as part of the step
  (`--max_warmup_rounds=0` shows it). Returns (state, rounds run).
  """
  for rounds in range(FLAGS.max_warmup_rounds):
    _, faults, state = run_steps_counting_faults(step, state, batches, FLAGS.steps, fetch)
    if faults < faults_per_step_done:
      return state, rounds + 1
  return state, FLAGS.max_warmup_rounds


def measure(family: str, variant: str) -> dict:
  """Compile time, tokens/s and model FLOP/s of the train step of one config."""
  c, cfg, mesh, step, state, batches, target_len = build(family, variant)
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    # warm-up: the first steps also grow the heap to its working size (gptjax/backends/xla_cpu/host_memory.py)
    _, state = run_steps(step, state, batches, FLAGS.warmup_steps)
    state, warmup_rounds = warm_up_heap(step, state, batches)
    dt, faults, state = run_steps_counting_faults(step, state, batches, FLAGS.steps)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
    breakdown = profile(step, state, batches, f"{family}_{variant}") if FLAGS.breakdown else None
  b, l = c.data.batch_size, c.data.seq_len
  tokens = b * (l + target_len)
  loss_tokens = float(sum(np.sum(batches[0][k]) for k in ("weights", "dec_weights")
                          if k in batches[0]))
  flop = flops.train_flops_per_example(cfg, l, target_len, c.objective) * b
  return {"family": family, "variant": variant, "params": n_params, "batch": b, "seq_len": l,
          "target_len": target_len, "dtype": FLAGS.dtype, "step_s": dt, "tokens_per_s": tokens / dt,
          "loss_tokens_per_s": loss_tokens / dt,
          "tflops_per_s": flop / dt / 1e12,
          "kernels": cfg.kernels, "kernel_exclude": cfg.kernel_exclude,
          "slow_path": ",".join(FLAGS.slow_path), "compile_s": compile_s,
          "peak_mem_gb": peak_memory_bytes() / 2 ** 30, "page_faults_per_step": faults,
          "warmup_rounds": warmup_rounds,
          "breakdown": breakdown}


def compare_switch(family: str, variant: str, switch: str, rounds: int = 5) -> dict:
  """Step time, compile time and XLA's buffer total with an xla_cpu trick or a SETTING on and off.

  Step times come from alternating rounds in this process. Buffers: arguments, outputs not
  aliased to (donated) arguments, and temporaries of the compiled step.
  """
  runs = {}
  for on in (True, False):
    overrides, fetch = {}, "end"
    if switch in SETTINGS:
      for key, values in SETTINGS[switch].items():
        if key == "fetch":
          fetch = values[0 if on else 1]
        else:
          overrides[key] = values[0 if on else 1]
    else:  # the trick on: kept out of (taken out of) kernel_exclude; off: added to it
      default = load_config(family, variant).model.kernel_exclude
      kept = [n for n in _excluded(default, FLAGS.slow_path) if n != switch]
      overrides["model.kernel_exclude"] = ",".join(kept if on else kept + [switch])
    _, _, mesh, step, state, batches, _ = build(family, variant, overrides)
    with jax.set_mesh(mesh):
      t0 = time.perf_counter()
      compiled = step.lower(state, batches[0]).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()  # arguments + outputs not aliased to them + temporaries
      buffers = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes +
              mem.temp_size_in_bytes)
      _, state = run_steps(step, state, batches, 2)
      state, _ = warm_up_heap(step, state, batches, fetch)
    runs[on] = {"mesh": mesh, "step": step, "state": state, "batches": batches, "times": [],
                "fetch": fetch, "buffers": buffers, "compile_s": compile_s, "faults": 0}
  for _ in range(rounds):
    for r in runs.values():
      with jax.set_mesh(r["mesh"]):
        dt, faults, r["state"] = run_steps_counting_faults(r["step"], r["state"], r["batches"],
                                                           FLAGS.steps, r["fetch"])
      r["faults"] += faults
      r["times"].append(dt)
  fast, slow = (float(np.median(runs[on]["times"])) for on in (True, False))
  return {"family": family, "variant": variant, "switch": switch, "on_step_s": fast,
          "off_step_s": slow, "speedup": slow / fast,
          "on_buffers_mib": runs[True]["buffers"] / 2 ** 20,
          "off_buffers_mib": runs[False]["buffers"] / 2 ** 20,
          "on_compile_s": runs[True]["compile_s"], "off_compile_s": runs[False]["compile_s"],
          **{f"{side}_faults_per_step": runs[on]["faults"] / rounds
             for side, on in (("on", True), ("off", False))}}


def profile(step, state, batches, name: str) -> dict:
  """Runs --profile_steps steps under jax.profiler.trace; their step-time breakdown.

  The HLO text comes from `lower().compile()` on the already-compiled step, which JAX serves from
  its compilation cache. `state` is donated to the traced steps, so the caller must not reuse it.
  """
  hlo = step.lower(state, batches[0]).compile().as_text()
  n = max(FLAGS.profile_steps, 1)
  with tempfile.TemporaryDirectory() as tmp:
    log_dir = str(pathlib.Path(FLAGS.profile_dir) / name) if FLAGS.profile_dir else tmp
    with jax.profiler.trace(log_dir):
      t0 = time.perf_counter()
      for i in range(n):
        state, m = step(state, batches[i % 2])
      jax.block_until_ready(m["loss"])
      wall = time.perf_counter() - t0
    if FLAGS.profile_dir:
      (pathlib.Path(log_dir) / "train_step.hlo.txt").write_text(hlo)
    return profile_breakdown.breakdown(log_dir, hlo, n, wall, top=max(10, FLAGS.top_scopes))


def _excluded(kernel_exclude: str, more) -> list[str]:
  """The names in a kernel_exclude string plus `more`, each once, in order."""
  names = [n.strip() for n in kernel_exclude.split(",") if n.strip()] + list(more)
  return list(dict.fromkeys(names))


def main(argv):
  del argv
  for flag, names in (("slow_path", FLAGS.slow_path), ("ab", FLAGS.ab)):
    for name in names:
      known = list(config_schema.XLA_CPU_TRICKS) + (list(SETTINGS) if flag == "ab" else [])
      if name not in known:
        raise SystemExit(f"error: --{flag}={name} is not an xla_cpu trick; choose from "
                         f"{', '.join(known)}")
  if FLAGS.kernels != "xla":  # the XLA:CPU backend's malloc settings, before JAX starts threads
    from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
    host_memory.configure()
  rates = []  # the matmul rates timed in this run (a measured peak only)

  def timed_rate(dtype: str) -> float:
    rates.append(peak_flops.measure_matmul_rate(dtype))
    return rates[-1]

  peak = peak_flops.Peak(FLAGS.dtype, measure=timed_rate)  # the train loop's peak (MFU)
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
  print(f"device: {device}")
  print(f"peak: {peak.flops / 1e12:.3f} TFLOP/s {FLAGS.dtype}, " +
        (f"the best {peak_flops.MEASURE_N}^2 matmul timed in this run" if peak.measured
         else f"nominal ({peak.source})"))
  if FLAGS.ab:
    print(throughput_report.AB_HEADER)
    for family in FLAGS.families:
      for variant in FLAGS.variants:
        for name in FLAGS.ab:
          r = compare_switch(family, variant, name)
          print(throughput_report.ab_row(r), flush=True)
          throughput_report.append_jsonl(FLAGS.output, [{"device": device, **r}])
    return
  # A measured peak is measured again after every model and MFU is taken against the highest
  # measurement of the run: a shared machine's speed drifts, and the highest peak gives the
  # lowest (conservative) MFU.
  rows = []
  for family in FLAGS.families:
    for variant in FLAGS.variants:
      r = measure(family, variant)
      rows.append(r)
      peak.refresh()
      throughput_report.print_progress(r, rates[-1] if rates else peak.flops, FLAGS.top_scopes)
  if rates:
    print(f"\nmatmul peak: {min(rates) / 1e12:.3f} to {max(rates) / 1e12:.3f} TFLOP/s over the run "
          f"({len(rates)} measurements); MFU is against {peak.flops / 1e12:.3f}")
  for r in rows:
    r["mfu"] = r["tflops_per_s"] * 1e12 / peak.flops
  throughput_report.append_jsonl(FLAGS.output, [{"device": device, **peak.fields(),
                                                 "peak_flops_all": rates, **r} for r in rows])
  throughput_report.print_table(rows)
  if FLAGS.breakdown:
    throughput_report.print_breakdown(rows, FLAGS.plot, device, FLAGS.dtype)


if __name__ == "__main__":
  app.run(main)
