"""Decode tokens/s of the GPT `small` config, batch 1 and 16, with and without the KV cache.

  python experiments/decode_throughput.py --prompt_len=16 --new_tokens=128

Randomly initialised parameters, greedy decoding, no EOS (every row runs all steps). Each setting
is compiled and run once untimed, then timed over --repeats runs; tokens/s counts generated tokens
only (batch x new tokens). Writes a markdown table to experiments/DECODE_THROUGHPUT.md.
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
sys.path.insert(0, os.path.join(REPO, "tests"))

_CONFIG = flags.DEFINE_string("config", "gpt:small", "family:variant of the model to time.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "Batch sizes.")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per setting (the best is kept).")
_OUT = flags.DEFINE_string("output", os.path.join(REPO, "experiments", "DECODE_THROUGHPUT.md"),
                           "Markdown file for the table ('' to skip).")


def measure(model, params, batch: int, use_cache: bool) -> dict:
  """Best-of-repeats seconds and tokens/s for one batch size and cache setting."""
  from gptjax import decode  # pylint: disable=g-import-not-at-top
  settings = decode.DecodeSettings(max_new_tokens=_NEW.value, temperature=0.0, use_cache=use_cache)
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
  return {"batch": batch, "cache": use_cache, "seconds": best, "compile_s": first - best,
          "tokens_per_s": batch * _NEW.value / best}


def main(argv):
  del argv
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from gptjax import models  # pylint: disable=g-import-not-at-top
  from gptjax.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  family, variant = _CONFIG.value.split(":")
  cfg = ModelConfig.from_config(load_config(family, variant).model)
  cfg = dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0)
  model = models.make_model(cfg)
  params = nn.meta.unbox(models.init_params(cfg, jax.random.key(0), 1, 8))
  rows = []
  for batch in [int(b) for b in _BATCHES.value]:
    for use_cache in (True, False):
      r = measure(model, params, batch, use_cache)
      rows.append(r)
      print(f"batch {batch:3d}  cache={str(use_cache):5s}  {r['tokens_per_s']:9.1f} tok/s  "
            f"({r['seconds']:.2f} s, compile {r['compile_s']:.1f} s)", flush=True)
  lines = [
      "# Decode throughput",
      "",
      f"`python experiments/decode_throughput.py` — config `{_CONFIG.value}` "
      f"({cfg.num_layers} layers, d={cfg.embed_dim}, vocab {cfg.vocab_size}, max_len {cfg.max_len}),"
      f" random init, greedy, prompt {_PROMPT.value} tokens, {_NEW.value} new tokens per row, "
      f"best of {_REPEATS.value} runs after a compile run; {jax.device_count()} "
      f"{jax.default_backend()} device(s), {os.cpu_count()} cores, {platform.machine()}.",
      "",
      "Tokens/s counts generated tokens only (batch x new tokens / wall time of the whole jitted "
      "`lax.while_loop`, prefill included). Without the cache every step recomputes the full "
      "(prompt + new tokens) buffer.",
      "",
      "| batch | KV cache | tokens/s | seconds | speed-up from cache |",
      "|---:|:---:|---:|---:|---:|",
  ]
  by = {(r["batch"], r["cache"]): r for r in rows}
  for r in rows:
    speed = by[(r["batch"], True)]["tokens_per_s"] / by[(r["batch"], False)]["tokens_per_s"]
    lines.append(f"| {r['batch']} | {'yes' if r['cache'] else 'no'} | {r['tokens_per_s']:.1f} | "
                 f"{r['seconds']:.2f} | {f'{speed:.1f}x' if r['cache'] else ''} |")
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
