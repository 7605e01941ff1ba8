"""Decode tokens/s of GPT and T5 `small`, batch 1 and 16: KV cache or not, fp32, int8, bf16.

  python experiments/decode_throughput.py --configs=gpt:small,t5:small --prompt_len=16 \
      --new_tokens=128

Randomly initialised parameters, greedy decoding, no EOS (every row runs all steps). Each setting
is compiled and run once untimed, then timed over --repeats runs; tokens/s counts generated tokens
only (batch x new tokens). Variants: fp32 with the KV cache, fp32 recomputing the whole prefix
every step, int8 weights (gptjax.transfer.quantize) and bf16 compute (config.model.dtype=bfloat16).
Writes its section of experiments/DECODE_THROUGHPUT.md.
"""

import dataclasses
import os
import platform
import sys
import time

from absl import app
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_CONFIGS = flags.DEFINE_list("configs", ["gpt:small", "t5:small"], "family:variant of the models.")
_VARIANTS = flags.DEFINE_list("variants", ["fp32", "fp32_nocache", "int8", "bf16"],
                              "What to time per model and batch.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per setting (the best is kept).")
_OUT = flags.DEFINE_string("output", os.path.join(REPO, "experiments", "DECODE_THROUGHPUT.md"),
                           "Markdown file whose decode_throughput section is rewritten ('' to skip).")
BEGIN, END = "<!-- decode_throughput: begin -->", "<!-- decode_throughput: end -->"


def measure(model, params, batch: int, variant: str) -> dict:
  """Best-of-repeats seconds and tokens/s for one batch size and variant."""
  from gptjax.inference import decode  # pylint: disable=g-import-not-at-top
  settings = decode.DecodeSettings(max_new_tokens=_NEW.value, temperature=0.0,
                                   use_cache=variant != "fp32_nocache")
  prompts = [[(7 * r + 3 * i) % 500 + 5 for i in range(_PROMPT.value)] for r in range(batch)]
  t0 = time.perf_counter()
  _, steps = decode.generate_padded(model, params, prompts, settings, None, 0)
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    out, steps = decode.generate_padded(model, params, prompts, settings, None, 0)
    best = min(best, time.perf_counter() - t0)
  assert steps == _NEW.value and out.shape == (batch, _NEW.value)
  return {"batch": batch, "variant": variant, "seconds": best, "compile_s": first - best,
          "tokens_per_s": batch * _NEW.value / best}


def _model(name: str, variant: str):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.config_files import load_config  # pylint: disable=g-import-not-at-top
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  from gptjax.transfer import quantize
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  family, size = name.split(":")
  cfg = ModelConfig.from_config(load_config(family, size).model)
  cfg = dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0,
                            dtype="bfloat16" if variant == "bf16" else "float32")
  params = nn.meta.unbox(models.init_params(cfg, jax.random.key(0), 1, 8))
  if variant == "int8":
    params = quantize.quantize_params(params)
  return cfg, models.make_model(cfg), params


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  rows, shapes = [], {}
  for name in _CONFIGS.value:
    for variant in _VARIANTS.value:
      cfg, model, params = _model(name, variant)
      shapes[name] = (f"{cfg.num_layers}+{cfg.decoder_layers} layers" if cfg.family ==
                      "encoder_decoder" else f"{cfg.num_layers} layers") + (
                          f", d={cfg.embed_dim}, vocab {cfg.vocab_size}, max_len {cfg.max_len}")
      for batch in [int(b) for b in _BATCHES.value]:
        r = measure(model, params, batch, variant)
        r["config"] = name
        rows.append(r)
        print(f"{name:10s} {variant:13s} batch {batch:3d}  {r['tokens_per_s']:9.1f} tok/s  "
              f"({r['seconds']:.2f} s, compile {r['compile_s']:.1f} s)", flush=True)
  lines = [
      "## Decode throughput by model and weight format",
      "",
      f"`python experiments/decode_throughput.py --configs={','.join(_CONFIGS.value)} "
      f"--prompt_len={_PROMPT.value} --new_tokens={_NEW.value}` at {time.strftime('%Y-%m-%d %H:%M')}"
      f" UTC: random init, greedy, best of {_REPEATS.value} runs after a compile run; "
      f"{jax.device_count()} {jax.default_backend()} device(s), {os.cpu_count()} cores (shared), "
      f"{platform.machine()}. " + "; ".join(f"`{k}`: {v}" for k, v in shapes.items()) + ".",
      "",
      "Tokens/s counts generated tokens only (batch x new tokens / wall time of the whole jitted "
      "`lax.while_loop`, prefill included). fp32_nocache recomputes the full (prompt + new tokens) "
      "buffer every step; int8 reads int8 weights (gptjax.transfer.quantize); bf16 computes in bfloat16.",
      "",
      "| model | batch | variant | tokens/s | seconds | vs fp32 |",
      "|:---|---:|:---|---:|---:|---:|",
  ]
  by = {(r["config"], r["batch"], r["variant"]): r for r in rows}
  for r in rows:
    base = by.get((r["config"], r["batch"], "fp32"))
    rel = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
    lines.append(f"| {r['config']} | {r['batch']} | {r['variant']} | {r['tokens_per_s']:.1f} | "
                 f"{r['seconds']:.2f} | {rel} |")
  if _OUT.value:
    old = open(_OUT.value, encoding="utf-8").read() if os.path.exists(_OUT.value) else ""
    block = "\n".join([BEGIN] + lines + [END])
    if BEGIN in old and END in old:
      new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
      new = old.rstrip("\n") + ("\n\n" if old else "") + block + "\n"
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write(new)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
