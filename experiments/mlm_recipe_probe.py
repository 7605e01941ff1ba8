"""Pre-train one arm of the objective comparison with recipe changes; report eval loss and the
fraction of it that context explains.

  python experiments/mlm_recipe_probe.py --name=rope_b32 --batch=32 --steps=1024 --lr=1e-3 \
      --set=model.position=rope

The arm's config is `compare_objectives.pretrain_config` for the cpu preset (enwiki2015, seq 128,
the shared body), then `--batch`, `--steps`, `--lr` and each `--set=key=value`. Beside the eval
loss it measures the same masked positions with every unmasked token replaced by a random one
(`random_context_loss`): a model that ignores its context scores the same on both.
Finished probes (PROBES_DIR/NAME/result.json) are skipped on re-run.
"""

import os
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import compare_objectives as co  # pylint: disable=g-import-not-at-top
from experiments import finished_runs  # pylint: disable=g-import-not-at-top

flags.DEFINE_string("name", None, "Probe name (its folder under --probes_dir).", required=True)
flags.DEFINE_string("arm", "mlm", "Arm of compare_objectives.ARMS (an encoder arm).")
flags.DEFINE_integer("batch", 32, "Sequences per step.")
flags.DEFINE_integer("steps", 1024, "Steps (input tokens = batch x 128 x steps).")
flags.DEFINE_float("lr", 1e-3, "Peak learning rate (10% warm-up, cosine decay).")
flags.DEFINE_multi_string("set", [], "key=value config overrides, e.g. model.position=rope.")
flags.DEFINE_string("probes_dir", "experiments/results/mlm_recipe_probe", "Output folder.")
FLAGS = flags.FLAGS


def probe_config():
  """The arm's cpu-preset pre-training config with this probe's changes."""
  preset = dict(co.PRESETS["cpu"], batch=FLAGS.batch, lr=FLAGS.lr)
  c = co._quiet(co.pretrain_config(FLAGS.arm, preset, 0), FLAGS.steps, 20)  # pylint: disable=protected-access
  for item in FLAGS.set:
    key, sep, text = item.partition("=")
    *path, last = key.split(".")
    node = c
    for p in path:
      node = node[p]
    if not sep or last not in node:
      raise SystemExit(f"error: --set={item!r} must be key=value with a known key (e.g. "
                       "model.position=rope)")
    old = node[last]
    node[last] = (text == "True") if isinstance(old, bool) else type(old)(text)
  c.data.eval_batch_size = 32
  c.train.ckpt_every = FLAGS.steps
  c.train.log_every = max(1, FLAGS.steps // 16)
  return c


def context_losses(workdir: str, batches: int = 4, seed: int = 0) -> dict:
  """Eval masked loss with the real context and with every unmasked token randomised."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  config, params, tokenizer = checkpointing.restore_for_inference(workdir)
  model = models.make_model(ModelConfig.from_config(config.model))
  rng = np.random.default_rng(seed)
  sums = {"context_loss": [0.0, 0.0], "random_context_loss": [0.0, 0.0]}
  for b in input_pipeline.make_eval_batches(config, tokenizer, max_batches=batches):
    chosen, real = np.asarray(b["weights"]) > 0, np.asarray(b["input_mask"]) > 0
    noise = rng.integers(5, config.model.vocab_size, chosen.shape)
    for name, inputs in (("context_loss", b["inputs"]),
                         ("random_context_loss", np.where(~chosen & real, noise, b["inputs"]))):
      out = model.apply({"params": params}, jnp.asarray(inputs), jnp.asarray(b["input_mask"]),
                        jnp.asarray(b["token_type_ids"]))
      logp = jax.nn.log_softmax(out["mlm_logits"].astype(jnp.float32), -1)
      nll = -np.asarray(jnp.take_along_axis(logp, jnp.asarray(b["targets"])[..., None], -1))[..., 0]
      sums[name][0] += float((nll * chosen).sum())
      sums[name][1] += float(chosen.sum())
  return {k: s / n for k, (s, n) in sums.items()}


def main(argv):
  del argv
  from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure()
  c = probe_config()
  workdir = os.path.join(FLAGS.probes_dir, FLAGS.name)
  result = finished_runs.train_and_measure(
      c, workdir, FLAGS.name, lambda m: f"eval loss {m['eval_loss']:.3f}",
      lambda _: dict(context_losses(workdir), tokens=FLAGS.batch * c.data.seq_len * FLAGS.steps,
                     overrides={"batch": FLAGS.batch, "steps": FLAGS.steps, "lr": FLAGS.lr,
                                "set": list(FLAGS.set)}),
      marker="random_context_loss")
  print(f"{FLAGS.name}: eval loss {result['eval_loss']:.3f}, with random context "
        f"{result['random_context_loss']:.3f} ({result['tokens'] / 1e6:.1f}M tokens)")


if __name__ == "__main__":
  app.run(main)
