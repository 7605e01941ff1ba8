"""Examples/s and tokens/s of each input pipeline, and the headroom over what the `small` trainer eats.

  python experiments/data_throughput.py --batches=30
  python experiments/data_throughput.py --families=bert --trainer_tokens_per_s=bert:3000

Tokens counted per row: seq_len (+ target_len for encoder-decoder). The trainer's tokens/s is taken
from --trainer_tokens_per_s (family:value pairs; defaults measured with experiments/throughput.py
style runs of the `small` configs on the same 2-core machine).
"""

import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_FAMILIES = flags.DEFINE_list("families", ["gpt", "bert", "t5", "bart"], "Config families to measure.")
_OBJECTIVES = flags.DEFINE_list("objectives", [], "Objectives to measure (default: each family's own).")
_BATCHES = flags.DEFINE_integer("batches", 30, "Batches timed per pipeline (after one warm-up batch).")
_TRAINER = flags.DEFINE_list(
    "trainer_tokens_per_s", ["gpt:6000", "bert:5000", "t5:7000", "bart:6000"],
    "family:tokens/s that the `small` trainer of that family consumes on this machine.")
_OUT = flags.DEFINE_string("output", "", "Optional markdown file for the table.")


def measure(family: str, objective: str, batches: int) -> dict:
  """Times `batches` batches of the small config's train pipeline for `objective`."""
  from experiments.config_files import load_config  # pylint: disable=g-import-not-at-top
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from gptjax.data import tokenization
  config = load_config(family, "small", objective=objective)
  tok = tokenization.load_or_train_tokenizer(config)
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
  next(it)  # warm-up: tokenized corpus loaded, caches filled
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t0
  d = config.data
  target = (d.target_len or d.seq_len) if config.model.family == "encoder_decoder" else 0
  rows = batches * d.batch_size
  return {"family": family, "objective": objective, "examples_per_s": rows / seconds,
          "tokens_per_s": rows * (d.seq_len + target) / seconds}


def main(argv):
  del argv
  trainer = {k: float(v) for k, v in (x.split(":") for x in _TRAINER.value)}
  own = {"gpt": "next_token", "bert": "mlm_nsp", "t5": "span_corruption", "bart": "denoise"}
  lines = ["| family | objective | examples/s | tokens/s | trainer tokens/s | headroom |",
           "|---|---|---:|---:|---:|---:|"]
  for family in _FAMILIES.value:
    for objective in _OBJECTIVES.value or [own[family]]:
      r = measure(family, objective, _BATCHES.value)
      need = trainer.get(family, float("nan"))
      lines.append(f"| {family} | {objective} | {r['examples_per_s']:.0f} | {r['tokens_per_s']:.0f} | "
                   f"{need:.0f} | {r['tokens_per_s'] / need:.1f}x |")
      print(lines[-1], flush=True)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
