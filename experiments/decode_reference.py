"""gptjax generation against Hugging Face `generate` on the same GPT-2 weights, fp32 and int8.

  python experiments/decode_reference.py --batches=1,4,16 --new_tokens=64 --rounds=2

Builds GPT-2 124M (`configs/gpt.py:base`, random init, seed 0) in gptjax, copies its weights into
transformers' GPT2LMHeadModel (PyTorch, CPU) and checks that greedy tokens are identical. Then
times, in separate processes and alternating (gptjax fp32, HF fp32, gptjax int8, HF int8) for
--rounds rounds: greedy decoding of --new_tokens tokens after a --prompt_len-token prompt, prefill
included, no EOS, best of --repeats runs after a warm-up run. gptjax int8 is
`quantize.quantize_params` (int8 weights, float32 activations); HF int8 is PyTorch dynamic
quantization (`torch.ao.quantization.quantize_dynamic`, int8 weights and activations) of the
model with its Conv1D layers as nn.Linear. The same run measures the memory bandwidth one
process gets (a float32 sum over 512 MB) for the bound on batch-1 decoding. Writes its section
of experiments/DECODE_THROUGHPUT.md.
"""

import datetime
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_BATCHES = flags.DEFINE_list("batches", ["1", "4", "16"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated tokens per row.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternating rounds of all four implementations.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per setting in a process (best kept).")
_CONFIG = flags.DEFINE_string("config", "gpt:base", "family:variant of the GPT-2-shaped model.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: 'gptjax:fp32', 'hf:int8', 'check', ...")
_OUT = flags.DEFINE_string("output", os.path.join(REPO, "experiments", "DECODE_THROUGHPUT.md"),
                           "Markdown file whose decode_reference section is rewritten ('' to skip).")
_IMPLS = flags.DEFINE_list("impls", ["gptjax:fp32", "hf:fp32", "gptjax:int8", "hf:int8"],
                           "Implementations to time, in this order within each round.")
IMPLS = ("gptjax:fp32", "hf:fp32", "gptjax:int8", "hf:int8")
BEGIN, END = "<!-- decode_reference: begin -->", "<!-- decode_reference: end -->"


def gptjax_model():
  """(model, float32 params) of --config, random init with seed 0, no dropout."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.config_files import load_config  # pylint: disable=g-import-not-at-top
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  family, variant = _CONFIG.value.split(":")
  cfg = ModelConfig.from_config(load_config(family, variant).model)
  cfg = dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0)
  return models.make_model(cfg), nn.meta.unbox(models.init_params(cfg, jax.random.key(0), 1, 8))


def hf_model(cfg, params):
  """transformers.GPT2LMHeadModel holding gptjax's GPT-2 `params` (hf_import's mapping reversed)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  conf = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_len,
                                 n_embd=cfg.embed_dim, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                                 n_inner=cfg.mlp_dim, layer_norm_epsilon=cfg.norm_eps,
                                 activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                 attn_pdrop=0.0)
  ref = transformers.GPT2LMHeadModel(conf).eval()
  d = cfg.embed_dim
  dec = params["decoder"]
  a = lambda x: np.asarray(x, np.float32)  # noqa: E731
  state = {"transformer.wte.weight": a(params["token_embed"]["embedding"]),
           "transformer.wpe.weight": a(dec["pos_embed"]["embedding"]),
           "transformer.ln_f.weight": a(dec["final_norm"]["scale"]),
           "transformer.ln_f.bias": a(dec["final_norm"]["bias"])}
  for i in range(cfg.num_layers):
    layer, b = dec[f"layers_{i}"], f"transformer.h.{i}"
    attn = layer["self_attn"]
    state[f"{b}.attn.c_attn.weight"] = np.concatenate(
        [a(attn[n]["kernel"]).reshape(d, d) for n in ("query", "key", "value")], axis=1)
    state[f"{b}.attn.c_attn.bias"] = np.concatenate(
        [a(attn[n]["bias"]).reshape(d) for n in ("query", "key", "value")])
    state[f"{b}.attn.c_proj.weight"] = a(attn["out"]["kernel"]).reshape(d, d)
    state[f"{b}.attn.c_proj.bias"] = a(attn["out"]["bias"])
    for ours, theirs in (("self_attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      state[f"{b}.{theirs}.weight"] = a(layer[ours]["scale"])
      state[f"{b}.{theirs}.bias"] = a(layer[ours]["bias"])
    for ours, theirs in (("wi", "c_fc"), ("wo", "c_proj")):
      state[f"{b}.mlp.{theirs}.weight"] = a(layer["mlp"][ours]["kernel"])
      state[f"{b}.mlp.{theirs}.bias"] = a(layer["mlp"][ours]["bias"])
  state["lm_head.weight"] = state["transformer.wte.weight"]
  missing, unexpected = ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                            strict=False)
  assert not unexpected and all(k.endswith("attn.bias") or k.endswith("masked_bias")
                                for k in missing), (missing, unexpected)
  ref.generation_config.eos_token_id = None
  ref.generation_config.pad_token_id = 0
  return ref


def hf_int8(ref):
  """PyTorch dynamic int8 quantization of `ref`, its Conv1D layers first turned into nn.Linear."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.pytorch_utils import Conv1D  # pylint: disable=g-import-not-at-top

  def to_linear(module):
    for name, child in module.named_children():
      if isinstance(child, Conv1D):
        lin = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
        lin.weight.data = child.weight.data.T.contiguous()
        lin.bias.data = child.bias.data
        setattr(module, name, lin)
      else:
        to_linear(child)
  to_linear(ref)
  return torch.ao.quantization.quantize_dynamic(ref, {torch.nn.Linear}, dtype=torch.qint8)


def prompts(batch: int):
  return [[(7 * r + 3 * i) % 500 + 5 for i in range(_PROMPT.value)] for r in range(batch)]


def run_worker(spec: str) -> None:
  """One process: times one implementation at every batch size; prints one JSON line per batch."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from gptjax.inference import decode  # pylint: disable=g-import-not-at-top
  from gptjax.transfer import quantize
  model, params = gptjax_model()
  settings = decode.DecodeSettings(max_new_tokens=_NEW.value, temperature=0.0)
  if spec == "check":
    import torch  # pylint: disable=g-import-not-at-top
    ref = hf_model(model.cfg, params)
    ids = np.asarray(prompts(4))
    ours = np.asarray(decode.generate(model, params, ids.tolist(), settings, None, 0))
    with torch.no_grad():
      theirs = ref.generate(torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                            max_new_tokens=_NEW.value, do_sample=False)[:, ids.shape[1]:].numpy()
    q = np.asarray(decode.generate(model, quantize.quantize_params(params), ids.tolist(), settings,
                                   None, 0))
    import jax  # pylint: disable=g-import-not-at-top
    print(json.dumps({"identical": bool(np.array_equal(ours, theirs)),
                      "params": int(sum(x.size for x in jax.tree.leaves(params))),
                      "int8_agree": float(np.mean(q == ours)), "rows": int(ids.shape[0])}))
    return
  impl, dtype = spec.split(":")
  if impl == "gptjax":
    p = quantize.quantize_params(params) if dtype == "int8" else params

    def generate(ids):
      out, steps = decode.generate_padded(model, p, ids, settings, None, 0)
      assert steps == _NEW.value
      return out
  else:
    import torch  # pylint: disable=g-import-not-at-top
    ref = hf_model(model.cfg, params)
    if dtype == "int8":
      ref = hf_int8(ref)

    def generate(ids):
      t = torch.tensor(ids)
      with torch.no_grad():
        out = ref.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=_NEW.value,
                           min_new_tokens=_NEW.value, do_sample=False)
      assert out.shape[1] == t.shape[1] + _NEW.value
      return out
  for batch in [int(b) for b in _BATCHES.value]:
    ids = prompts(batch)
    generate(ids)
    best = float("inf")
    for _ in range(_REPEATS.value):
      t0 = time.perf_counter()
      generate(ids)
      best = min(best, time.perf_counter() - t0)
    print(json.dumps({"impl": spec, "batch": batch, "seconds": best,
                      "tokens_per_s": batch * _NEW.value / best}), flush=True)


def bandwidth_gb_s() -> float:
  """GB/s of a float32 sum over 512 MB (XLA:CPU, all cores), best of 5: what memory gives now."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.ones((128 * 2**20,), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return x.nbytes / best / 1e9


def matmul_gflop_s(rows: int) -> float:
  """GFLOP/s of XLA's dot [rows, 768] x [768, 3072] over 12 distinct weights (113 MB), best of 5.

  Decoding's products at batch `rows`: each weight comes from memory, as in a decoding step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ws = [jnp.full((768, 3072), 0.01 * (i + 1), jnp.float32) for i in range(12)]
  x = jnp.ones((rows, 768), jnp.float32)
  f = jax.jit(lambda x, ws: [jnp.dot(x, w) for w in ws])
  jax.block_until_ready(f(x, ws))
  best = float("inf")
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x, ws))
    best = min(best, time.perf_counter() - t0)
  return 2 * rows * 768 * 3072 * len(ws) / best / 1e9


def _spawn(spec: str) -> list[dict]:
  argv = [sys.executable, os.path.abspath(__file__), f"--worker={spec}"] + [
      a for a in sys.argv[1:] if not a.startswith("--worker")]
  out = subprocess.run(argv, capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": REPO})
  if out.returncode != 0:
    raise RuntimeError(f"worker {spec} failed:\n{out.stderr[-3000:]}")
  return [json.loads(l) for l in out.stdout.splitlines() if l.startswith("{")]


def _commit() -> str:
  if os.environ.get("GPTJAX_COMMIT"):  # a run from an exported snapshot of the commit
    return os.environ["GPTJAX_COMMIT"]
  try:
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _write_section(path: str, lines: list[str]) -> None:
  old = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
  block = "\n".join([BEGIN] + lines + [END])
  if BEGIN in old and END in old:
    new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
  else:
    new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(new)


def main(argv):
  del argv
  if _WORKER.value:
    run_worker(_WORKER.value)
    return
  start = time.time()
  check = _spawn("check")[0]
  print(f"greedy tokens identical to HF: {check['identical']}; int8 tokens agreeing with fp32: "
        f"{check['int8_agree']:.3f}", flush=True)
  results, bandwidth, gflops = [], [], []
  for r in range(_ROUNDS.value):
    bandwidth.append(bandwidth_gb_s())
    gflops.append({rows: matmul_gflop_s(rows) for rows in (16, 1024)})
    for spec in _IMPLS.value:
      for row in _spawn(spec):
        row["round"] = r
        results.append(row)
        print(f"round {r} {spec:12s} batch {row['batch']:3d}: {row['tokens_per_s']:8.1f} tok/s",
              flush=True)
  table = _table(results, bandwidth, gflops, check, check["params"])
  for line in table:
    print(line)
  if _OUT.value:
    cmd = "python experiments/decode_reference.py " + " ".join(sys.argv[1:])
    header = [f"## gptjax vs Hugging Face `generate` (GPT-2 124M shape, `{_CONFIG.value}`)", "",
              f"`{cmd.strip()}` at commit {_commit()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
              f"UTC, {time.time() - start:.0f} s wall; {os.cpu_count()} cores shared with other "
              "jobs, so the ratios (alternating processes) are the result, not the absolute rates.",
              ""]
    _write_section(_OUT.value, header + table)
    print(f"wrote {_OUT.value}")


def _table(results, bandwidth, gflops, check, n_params: int) -> list[str]:
  """Markdown: per batch, best-of-rounds tokens/s of each implementation and the ratios."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  best = {}
  per_round = {}
  for row in results:
    key = (row["impl"], row["batch"])
    best[key] = max(best.get(key, 0.0), row["tokens_per_s"])
    per_round.setdefault(key, {})[row["round"]] = row["tokens_per_s"]

  def ratio(a, b, batch):  # the per-round ratios' range: alternating runs share the load
    rs = [per_round[(a, batch)][r] / per_round[(b, batch)][r] for r in per_round[(a, batch)]
          if r in per_round[(b, batch)]]
    return f"{np.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f})"

  lines = [f"Prompt {_PROMPT.value} tokens, {_NEW.value} greedy new tokens per row, prefill "
           f"included; best of {_REPEATS.value} runs per process, best of {_ROUNDS.value} rounds. "
           f"Greedy tokens of gptjax fp32 and HF fp32 identical: **{check['identical']}** "
           f"({check['rows']} rows); gptjax int8 tokens equal to fp32's: "
           f"{100 * check['int8_agree']:.1f}% (random init: near-tied logits). Memory bandwidth "
           f"(fp32 sum over 512 MB) per round: {', '.join(f'{b:.1f}' for b in bandwidth)} GB/s.",
           "", "| batch | gptjax fp32 | HF fp32 | gptjax int8 | HF int8 (dynamic) | "
           "fp32 gptjax/HF | int8/fp32 gptjax | int8 gptjax/HF |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  def cell(impl, batch):
    return f"{best[(impl, batch)]:.1f}" if (impl, batch) in best else "not run"

  def ratio_cell(a, b, batch):
    return ratio(a, b, batch) if (a, batch) in best and (b, batch) in best else ""

  for batch in sorted({r["batch"] for r in results}):
    lines.append(f"| {batch} | " + " | ".join(cell(i, batch) for i in IMPLS) + " | "
                 f"{ratio_cell('gptjax:fp32', 'hf:fp32', batch)} | "
                 f"{ratio_cell('gptjax:int8', 'gptjax:fp32', batch)} | "
                 f"{ratio_cell('gptjax:int8', 'hf:int8', batch)} |")
  bw = max(bandwidth)
  lines += ["", "Tokens/s; ratios are the median (range) over rounds of same-round ratios.",
            "", f"Bound at batch 1: every step reads all weights, {4 * n_params / 1e6:.0f} MB in "
            f"fp32 and about {n_params / 1e6:.0f} MB in int8 ({n_params / 1e6:.1f}M parameters); at "
            f"the best bandwidth measured here ({bw:.1f} GB/s) that allows at most "
            f"{bw * 1e9 / (4 * n_params):.1f} tok/s in fp32 and {bw * 1e9 / n_params:.1f} tok/s "
            "in int8."]
  big = max(b for b in {r["batch"] for r in results})
  if ("gptjax:fp32", big) in best:
    step_gflop = 2 * n_params * big / 1e9
    rate = best[("gptjax:fp32", big)] / big * step_gflop
    g16 = max(g[16] for g in gflops)
    g1024 = max(g[1024] for g in gflops)
    lines += ["", f"Bound at batch {big}: a step is {step_gflop:.1f} GFLOP of weight products "
              f"(2 x parameters x rows); gptjax fp32 ran {rate:.0f} GFLOP/s, prefill included. "
              f"XLA's dot [16, 768] x [768, 3072] over weights from memory ran "
              f"{g16:.0f} GFLOP/s and [1024, 768] x [768, 3072] {g1024:.0f} GFLOP/s in this run "
              f"(best of rounds), so at that product rate a step takes at least "
              f"{step_gflop / g16 * 1e3:.0f} ms: {big / (step_gflop / g16):.0f} tok/s."]
  return lines


if __name__ == "__main__":
  app.run(main)
