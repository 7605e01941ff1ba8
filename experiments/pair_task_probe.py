"""Can the comparison's BERT body learn NSP or SOP at this budget, from scratch or from a trained body?

  python experiments/pair_task_probe.py --name=nsp_scratch --task=nsp --steps=400
  python experiments/pair_task_probe.py --name=nsp_from_mlm --task=nsp --steps=400 \
      --init_from=experiments/results/compare_objectives_cpu/mlm/seed0/pretrain

The config is `compare_objectives.pretrain_config("mlm_nsp")` of the cpu preset (enwiki2015, seq
128, the shared 4-layer pre-LN rotary body) with the objective set to the pair task alone, then
`--batch`, `--steps`, `--lr` and `--init_from` (a pre-training workdir: its body is loaded and the
pair head starts fresh). It reports the accuracy on held-out enwiki2015 pairs with a 95% Wilson
interval. Finished probes (PROBES_DIR/NAME/result.json) are skipped on a rerun.
"""

import os
import pathlib
import sys

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import compare_objectives as co  # pylint: disable=g-import-not-at-top
from experiments import compare_objectives_report as report  # pylint: disable=g-import-not-at-top
from experiments import finished_runs  # pylint: disable=g-import-not-at-top

flags.DEFINE_string("name", None, "Probe name (its folder under --probes_dir).", required=True)
flags.DEFINE_enum("task", "nsp", ["nsp", "sop"], "The pair task trained and evaluated.")
flags.DEFINE_string("init_from", "", "A pre-training workdir whose body starts the probe.")
flags.DEFINE_integer("batch", 32, "Pairs per step.")
flags.DEFINE_integer("steps", 400, "Training steps.")
flags.DEFINE_float("lr", 1e-3, "Peak learning rate (10% warm-up, cosine decay).")
flags.DEFINE_integer("eval_batches", 64, "Held-out batches of --batch pairs.")
flags.DEFINE_string("probes_dir", "experiments/results/pair_task_probe", "Output folder.")
FLAGS = flags.FLAGS


def probe_config():
  """The pair task alone on the comparison's BERT body, with this probe's changes."""
  if FLAGS.init_from and not os.path.isdir(os.path.join(FLAGS.init_from, "checkpoints")):
    raise SystemExit(f"error: --init_from={FLAGS.init_from} has no checkpoints/ folder; give a "
                     "pre-training workdir such as experiments/results/compare_objectives_cpu/"
                     "mlm/seed0/pretrain")
  preset = dict(co.PRESETS["cpu"], batch=FLAGS.batch, lr=FLAGS.lr)
  c = co._quiet(co.pretrain_config("mlm_nsp", preset, 0), FLAGS.steps, FLAGS.eval_batches)  # pylint: disable=protected-access
  c.objective = FLAGS.task
  c.init_from = os.path.abspath(FLAGS.init_from) if FLAGS.init_from else ""
  if FLAGS.init_from:
    c.data.tokenizer.path = os.path.join(os.path.abspath(FLAGS.init_from), "tokenizer.json")
  c.train.ckpt_every = FLAGS.steps
  c.train.log_every = max(1, FLAGS.steps // 16)
  return c


def main(argv):
  del argv
  from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure()
  c = probe_config()
  workdir = os.path.join(FLAGS.probes_dir, FLAGS.name)
  n = FLAGS.eval_batches * c.data.eval_batch_size

  def measure(result):
    acc = result[f"eval_{FLAGS.task}_accuracy"]
    return dict(task=FLAGS.task, pairs=n, accuracy=acc, interval=list(report.wilson(acc, n)),
                init_from=FLAGS.init_from, tokens=FLAGS.batch * c.data.seq_len * FLAGS.steps,
                overrides={"batch": FLAGS.batch, "steps": FLAGS.steps, "lr": FLAGS.lr})

  result = finished_runs.train_and_measure(
      c, workdir, FLAGS.name, lambda m: f"eval accuracy {m[f'eval_{FLAGS.task}_accuracy']:.3f}",
      measure, marker="pairs")
  low, high = result["interval"]
  print(f"{FLAGS.name}: {FLAGS.task} accuracy {result['accuracy']:.3f} [{low:.3f}, {high:.3f}] "
        f"on {result['pairs']:,} held-out pairs, eval loss {result[f'eval_{FLAGS.task}_loss']:.4f}")


if __name__ == "__main__":
  app.run(main)
