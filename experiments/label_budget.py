"""Does pre-training help when labels are few? sst2 fine-tuning at several label budgets.

  python experiments/label_budget.py --units=experiments/results/compare_objectives_cpu \
      --out=experiments/results/label_budget_cpu
  python experiments/label_budget.py --units=/tmp/cmp --out=/tmp/lb --arms=mlm --seeds=0 \
      --sizes=16 --steps=4 --eval_batches=2

With all 67k sst2 training sentences, compare_objectives' pre-trained bodies fine-tune no better
than the same architecture from scratch (results.md there). This asks whether that is the label
budget: each finished (arm, seed) unit's pre-trained body and a scratch body with the same
vocabulary are fine-tuned with one recipe on the first N training sentences (data.train_docs),
for each N in --sizes, and judged on the whole dev split (872 sentences). Each fine-tune is one
resumable run (skipped when its result.json is there). Pairs run smallest N first, every seed of
it before the next N. results.csv and results.md (pre-trained minus scratch per arm and N, mean
over seeds with a 95% t-interval) and accuracy_vs_labels.png are rebuilt after every pair from
all the pairs finished under --out, whichever command ran them.
"""

import csv
import json
import os
import pathlib
import sys
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments import compare_objectives_report as report  # pylint: disable=g-import-not-at-top
from experiments import finished_runs  # pylint: disable=g-import-not-at-top
from experiments import objective_directions as od  # pylint: disable=g-import-not-at-top
from experiments.config_files import load_config  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("units", "experiments/results/compare_objectives_cpu",
                    "compare_objectives --out folder whose ARM/seedN/pretrain bodies are used.")
flags.DEFINE_string("out", "experiments/results/label_budget_cpu", "Output folder.")
flags.DEFINE_list("arms", ["mlm", "next_token", "span_corruption"], "Arms of --units.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (units of --units, and fine-tuning seeds).")
flags.DEFINE_list("sizes", ["256", "1024"], "Numbers of sst2 training sentences.")
flags.DEFINE_integer("steps", 300, "Fine-tuning steps at every size.")
flags.DEFINE_integer("batch", 32, "Fine-tuning batch size.")
flags.DEFINE_float("lr", 5e-4, "Fine-tuning peak learning rate (10% warm-up, cosine decay).")
flags.DEFINE_float("dropout", 0.1, "Dropout while fine-tuning.")
flags.DEFINE_enum("pooling", "", ["", "first", "mean", "last"],
                  "Classifier pooling ('': the pre-trained unit's own).")
flags.DEFINE_integer("eval_batches", 0, "Dev batches judged (0: the whole dev split).")

FIELDS = ["arm", "seed", "train_sentences", "pretrained_acc", "scratch_acc", "gain",
          "majority_acc", "steps", "wall_s", "git_commit"]


def finetune_config(pre_dir: str, seed: int, sentences: int, pretrained: bool):
  """sst2 classification with the body of `pre_dir`'s run (its weights when `pretrained`, else
  a fresh init with the same vocabulary); the fine-tuning recipe is the same for every arm."""
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from gptjax.training import run_records  # pylint: disable=g-import-not-at-top
  saved = run_records.read_manifest(pre_dir).get("config")
  if not saved:
    raise SystemExit(f"error: no manifest.json with a config in {pre_dir}; run "
                     f"compare_objectives for this unit first (or fix --units)")
  saved = checkpointing.config_from_meta({"config": json.dumps(saved)})
  model = {f"model.{k}": v for k, v in saved.model.items()
           if k not in ("dropout_rate", "attention_dropout_rate", "num_classes")}
  overrides = {**model, "objective": "classification", "data.corpus": "sst2",
               "model.num_classes": 2, "model.dropout_rate": FLAGS.dropout,
               "model.attention_dropout_rate": FLAGS.dropout, "seed": seed, "data.seed": seed,
               "data.seq_len": min(saved.data.seq_len, 64), "data.batch_size": FLAGS.batch,
               "data.eval_batch_size": FLAGS.batch, "data.train_docs": sentences,
               "data.tokenizer.kind": saved.data.tokenizer.kind,
               "data.tokenizer.vocab_size": saved.data.tokenizer.vocab_size,
               "data.tokenizer.path": os.path.join(pre_dir, "tokenizer.json"),
               "init_from": pre_dir if pretrained else "", "finetune.trainable": "all",
               "train.learning_rate": FLAGS.lr, "train.steps": FLAGS.steps,
               "train.warmup_steps": max(1, FLAGS.steps // 10),
               "train.log_every": max(1, FLAGS.steps // 10), "train.eval_every": FLAGS.steps,
               "train.eval_steps": FLAGS.eval_batches, "train.ckpt_every": max(1, FLAGS.steps // 2),
               "train.keep": 1, "train.progress": False}
  if FLAGS.pooling:
    overrides["model.pooling"] = FLAGS.pooling
  if saved.model.family == "encoder_decoder":
    overrides["data.target_len"] = 1
  return load_config(saved.name, saved.get("variant") or "small", **overrides)


def pair(arm: str, seed: int, sentences: int, majority: float) -> dict:
  """Pre-trained and scratch fine-tunes of one (arm, seed, N): their row, stored in its folder."""
  from gptjax.training import run_records  # pylint: disable=g-import-not-at-top
  pre_dir = os.path.join(FLAGS.units, arm, f"seed{seed}", "pretrain")
  root = os.path.join(FLAGS.out, arm, f"seed{seed}", f"n{sentences}")

  def compute():
    acc = {}
    for kind in ("pretrained", "scratch"):
      config = finetune_config(pre_dir, seed, sentences, kind == "pretrained")
      workdir = os.path.join(root, kind)
      result = finished_runs.cached(
          workdir, f"{arm} seed {seed} N={sentences} {kind}",
          lambda c=config, w=workdir, k=kind: finished_runs.train_to_end(c, w, k),
          lambda r: f"dev accuracy {r['eval_class_accuracy']:.3f}")
      acc[kind] = result["eval_class_accuracy"]
    return {"arm": arm, "seed": seed, "train_sentences": sentences,
            "pretrained_acc": acc["pretrained"], "scratch_acc": acc["scratch"],
            "gain": acc["pretrained"] - acc["scratch"], "majority_acc": majority,
            "steps": FLAGS.steps, "git_commit": run_records.git_commit()}
  return finished_runs.cached(root, f"{arm} seed {seed} N={sentences}", compute,
                              lambda r: f"pre-trained - scratch {r['gain']:+.3f}")


def finished_pairs() -> list[dict]:
  """Rows of every finished pair under --out (ARM/seedS/nN/result.json), in arm, N, seed order."""
  rows = [json.loads(p.read_text())
          for p in pathlib.Path(FLAGS.out).glob("*/seed*/n*/result.json")]
  arms = {a: i for i, a in enumerate(FLAGS.arms)}
  return sorted(rows, key=lambda r: (arms.get(r["arm"], len(arms)), r["arm"],
                                     r["train_sentences"], r["seed"]))


def write_tables(rows: list[dict], header: list[str]) -> str:
  """results.csv, and results.md: pre-trained minus scratch per (arm, N) with 95% t-intervals."""
  with open(os.path.join(FLAGS.out, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
  lines = header + ["", "| arm | sst2 training sentences | seeds | pre-trained | scratch | "
                    "pre-trained - scratch [95% interval] |", "|---|---:|---:|---:|---:|---|"]
  for arm in dict.fromkeys(r["arm"] for r in rows):
    for n in sorted({r["train_sentences"] for r in rows if r["arm"] == arm}):
      mine = [r for r in rows if r["arm"] == arm and r["train_sentences"] == n]
      pre, _ = od.t_interval([r["pretrained_acc"] for r in mine])
      scratch, _ = od.t_interval([r["scratch_acc"] for r in mine])
      gain = od.format_interval(*od.t_interval([r["gain"] for r in mine]))
      lines.append(f"| {arm} | {n:,} | {len(mine)} | {pre:.3f} | {scratch:.3f} | {gain} |")
  lines += ["", f"majority class on sst2 dev: {rows[0]['majority_acc']:.3f}" if rows else ""]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
    f.write(text)
  return text


def write_plot(rows: list[dict], majority: float) -> None:
  """accuracy_vs_labels.png: dev accuracy against training sentences, pre-trained and scratch."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, arm in enumerate(dict.fromkeys(r["arm"] for r in rows)):
    sizes = sorted({r["train_sentences"] for r in rows if r["arm"] == arm})
    for key, style in (("pretrained_acc", "-o"), ("scratch_acc", "--x")):
      means = [od.t_interval([r[key] for r in rows if r["arm"] == arm
                              and r["train_sentences"] == n])[0] for n in sizes]
      ax.plot(sizes, means, style, color=f"C{i}", label=f"{arm}, {key.split('_')[0]}")
  ax.axhline(majority, color="k", ls=":", lw=1, label="majority class")
  ax.set_xscale("log")
  ax.set_xlabel("sst2 training sentences")
  ax.set_ylabel("sst2 dev accuracy (mean over seeds)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.out, "accuracy_vs_labels.png"), dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure()
  seeds, sizes = [int(s) for s in FLAGS.seeds], [int(n) for n in FLAGS.sizes]
  if any(n < 1 for n in sizes):
    raise SystemExit(f"error: --sizes={','.join(FLAGS.sizes)} must be positive numbers of sentences")
  from gptjax.training import resume_check  # pylint: disable=g-import-not-at-top
  missing = [f"{a}/seed{s}" for a in FLAGS.arms for s in seeds
             if not resume_check.has_saved_step(os.path.join(FLAGS.units, a, f"seed{s}", "pretrain"))]
  if missing:  # results in git hold no checkpoints: a fresh clone must re-run its units
    raise SystemExit(f"error: no pre-trained checkpoint for {', '.join(missing)} under "
                     f"--units={FLAGS.units}; run experiments/compare_objectives.py for them first")
  os.makedirs(FLAGS.out, exist_ok=True)
  majority = report.majority_baseline()
  header = [f"Label budgets: `python experiments/label_budget.py {' '.join(sys.argv[1:])}`",
            f"{FLAGS.steps} fine-tuning steps of batch {FLAGS.batch} at every size, lr {FLAGS.lr}, "
            f"dropout {FLAGS.dropout}, pooling {FLAGS.pooling or 'of each unit'}; each row's "
            "commit is in results.csv"]
  text = ""
  for n in sorted(sizes):
    for seed in seeds:
      for arm in FLAGS.arms:
        pair(arm, seed, n, majority)
        rows = finished_pairs()
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        text = write_tables(rows, header + [f"updated {stamp}; {len(rows)} pairs"])
        write_plot(rows, majority)
  print(text)


if __name__ == "__main__":
  app.run(main)
