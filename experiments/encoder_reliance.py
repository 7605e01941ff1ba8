"""Does an encoder-decoder's decoder read its encoder? Held-out loss with the real and a swapped encoder input.

  python experiments/encoder_reliance.py \
      --workdir=experiments/results/compare_objectives_cpu/span_corruption/seed0/pretrain

For each held-out batch of the run's own objective (span corruption or denoising), the decoder's
loss is computed twice: with each row's own encoder input, and with the encoder inputs rolled by
one row (every target then sees another document's encoder input). The loss is split by target
kind: sentinel tokens, EOS, and the text tokens themselves. A decoder that uses its encoder loses
much more on text tokens with the swapped input; equal losses mean it predicts from its own
prefix alone. Prints a table and writes WORKDIR/encoder_reliance.json (or --out).
"""

import json
import os
import pathlib
import sys
from typing import Optional

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flags, defined only when it runs (compare_objectives and the tests import this
  module beside other scripts that define flags of the same names)."""
  flags.DEFINE_string("workdir", None, "An encoder-decoder training workdir (its latest "
                      "checkpoint, or the one at --step).", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("batches", 8, "Held-out batches of the run's eval batch size.")
  flags.DEFINE_string("out", "", "Result JSON (default: WORKDIR/encoder_reliance.json).")


KINDS = ("text", "sentinel", "eos")


def loss_by_kind(nll_BxT, targets_BxT, weights_BxT, sentinel_ids, eos_id) -> dict:
  """{kind: (summed nll, count)} over the weighted target positions."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  sentinel = np.isin(targets_BxT, list(sentinel_ids))
  eos = targets_BxT == eos_id
  masks = {"sentinel": sentinel, "eos": eos & ~sentinel, "text": ~sentinel & ~eos}
  return {k: (float(nll_BxT[m & (weights_BxT > 0)].sum()), int((m & (weights_BxT > 0)).sum()))
          for k, m in masks.items()}


def measure(workdir: str, batches: int = 8, step: Optional[int] = None) -> dict:
  """Held-out decoder loss by target kind with own and swapped encoder inputs (module docstring).

  FileNotFoundError when `workdir` has no checkpoint (at `step`); ValueError when its model is
  not an encoder-decoder.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from gptjax.data import input_pipeline
  from gptjax.model import models
  from gptjax.model.config import ModelConfig
  from gptjax.training import checkpointing
  config, params, tok = checkpointing.restore_for_inference(workdir, step)
  if config.model.family != "encoder_decoder":
    raise ValueError(f"{workdir} holds a {config.model.family!r} model; this probe needs an "
                     "encoder_decoder one (T5 or BART)")
  model = models.make_model(ModelConfig.from_config(config.model))
  held_out = input_pipeline.make_eval_batches(config, tok, "validation", max_batches=batches)

  @jax.jit
  def nll(enc_inputs, enc_mask, dec_inputs, dec_targets):
    logits = model.apply({"params": params}, enc_inputs, enc_mask, dec_inputs)["logits"]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, dec_targets[..., None], -1)[..., 0]

  sentinels = set(getattr(tok, "sentinel_ids", []) or [])
  totals = {(s, k): [0.0, 0] for s in ("own", "swapped") for k in KINDS}
  used = 0
  for b in held_out:
    keep = b["dec_weights"].sum(1) > 0  # padded rows out, so the swap pairs real rows only
    b = {k: v[keep] for k, v in b.items()}
    n = len(b["enc_inputs"])
    if n < 2:
      continue
    used += 1
    # a roll by one moves every row (a reversal would leave an odd batch's middle row in place)
    for setting, order in (("own", np.arange(n)), ("swapped", np.roll(np.arange(n), 1))):
      out = np.asarray(nll(b["enc_inputs"][order], b["enc_mask"][order], b["dec_inputs"],
                           b["dec_targets"]))
      for k, (s, c) in loss_by_kind(out, b["dec_targets"], b["dec_weights"], sentinels,
                                    tok.eos_id).items():
        totals[(setting, k)][0] += s
        totals[(setting, k)][1] += c
  result = {"workdir": workdir, "step": "latest" if step is None else step,
            "objective": config.objective, "batches": used,
            "mean_nll": {f"{s}/{k}": (v[0] / v[1] if v[1] else None)
                         for (s, k), v in totals.items()},
            "targets": {k: totals[("own", k)][1] for k in KINDS}}
  own, swapped = result["mean_nll"]["own/text"], result["mean_nll"]["swapped/text"]
  result["text_gain_from_own_encoder"] = None if own is None else swapped - own
  return result


def table_lines(result: dict) -> list[str]:
  """The result as a markdown table, one row per target kind."""
  lines = ["| target kind | count | nll, own encoder input | nll, swapped |", "|---|---:|---:|---:|"]
  for k in KINDS:
    o, s = result["mean_nll"][f"own/{k}"], result["mean_nll"][f"swapped/{k}"]
    if o is not None:
      lines.append(f"| {k} | {result['targets'][k]} | {o:.3f} | {s:.3f} |")
  return lines


def main(argv):
  del argv
  from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure()
  try:
    result = measure(FLAGS.workdir, FLAGS.batches, FLAGS.step)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(f"{result['objective']} in {FLAGS.workdir}")
  print("\n".join(table_lines(result)))
  path = FLAGS.out or os.path.join(FLAGS.workdir, "encoder_reliance.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
