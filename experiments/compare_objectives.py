"""Same-budget comparison of pre-training objectives across the three families.

  python experiments/compare_objectives.py --preset=cpu --out=results/compare
  python experiments/compare_objectives.py --preset=smoke --arms=mlm,next_token --seeds=0

Every arm pre-trains on the same corpus (wikitext2) for the same budget of input
tokens (or FLOPs), with parameter counts within 10% of each other; then each
checkpoint is evaluated intrinsically (its own eval metrics) and downstream on
sst2 by a linear probe (logistic regression on the frozen body's mean-pooled
features, beside the same probe on a randomly initialised body) and by full
fine-tuning, beside the same architecture fine-tuned from scratch and the
majority class. Finished
runs are skipped on re-run.
"""

import csv
import importlib.util
import json
import math
import os
import pathlib
import sys

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import finished_runs  # pylint: disable=g-import-not-at-top  (experiments/, next to this file)

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", ["smoke", "cpu"], "smoke: minutes, for tests; cpu: ~30 min.")
flags.DEFINE_list("arms", [], "Subset of arms (default: all).")
flags.DEFINE_list("seeds", [], "Seeds (default: the preset's).")
flags.DEFINE_enum("budget_kind", "tokens", ["tokens", "flops"], "What is held equal across arms.")
flags.DEFINE_float("budget", 0, "Pre-training budget per arm (0: the preset's).")
flags.DEFINE_string("out", "results/compare_objectives", "Output folder.")

# arm -> (config file, objective, extra overrides)
ARMS = {
    "mlm": ("bert", "mlm", {}),
    "mlm_nsp": ("bert", "mlm_nsp", {}),
    "mlm_sop": ("bert", "mlm_nsp", {"data.sop": True}),
    "next_token": ("gpt", "next_token", {}),
    "prefix_lm": ("gpt", "prefix_lm", {}),
    "span_corruption": ("t5", "span_corruption", {}),
    "bart_denoise": ("bart", "denoise", {}),
}
# What BERT Table 5 / T5 Table 2 / ALBERT Table 5 report, for the direction of each comparison.
PUBLISHED = {
    "mlm": "BERT T5: MLM alone below MLM+NSP on SST-2 (92.6 vs 92.7)",
    "mlm_nsp": "BERT T5: BERT-base reference (SST-2 92.7)",
    "mlm_sop": "ALBERT T5: SOP >= NSP downstream (avg 80.2 vs 79.3)",
    "next_token": "BERT T5: LTR & no NSP below MLM (SST-2 92.1 vs 92.6)",
    "prefix_lm": "T5 T2: prefix LM below span corruption (GLUE 80.7 vs 83.3)",
    "span_corruption": "T5 T2: denoising/span corruption best (GLUE 83.3)",
    "bart_denoise": "T5 T2: BERT-style/deshuffling denoise near span corruption (82.96)",
}
# Common body so parameter counts stay within 10%: width 256, 4 heads, mlp 1024, vocab 8192.
BODY = {"model.embed_dim": 256, "model.num_heads": 4, "model.mlp_dim": 1024,
        "model.vocab_size": 8192, "data.tokenizer.vocab_size": 8192, "model.max_len": 256}
LAYERS = {"bert": {"model.num_layers": 4}, "gpt": {"model.num_layers": 4},
          "t5": {"model.num_layers": 2, "model.num_decoder_layers": 2},
          "bart": {"model.num_layers": 2, "model.num_decoder_layers": 2, "model.mlp_dim": 960}}
PRESETS = {
    "smoke": dict(budget=8 * 32 * 12, seeds=[0], seq_len=32, batch=8, ft_steps=8, probe_train=200,
                  eval_steps=2, variant="tiny", body={}),
    "cpu": dict(budget=16 * 128 * 100, seeds=[0, 1], seq_len=128, batch=16, ft_steps=60,
                probe_train=2000, eval_steps=10, variant="small", body=BODY),
}


def load_config(family: str, variant: str, overrides: dict):
  """configs/<family>.py:<variant> with dotted overrides applied."""
  spec = importlib.util.spec_from_file_location(f"cfg_{family}", REPO / "configs" / f"{family}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(variant)
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _quiet(c, steps: int, eval_steps: int):
  c.train.steps = steps
  c.train.warmup_steps = max(1, steps // 10)
  c.train.log_every = max(1, steps // 10)
  c.train.eval_every = steps
  c.train.eval_steps = eval_steps
  c.train.ckpt_every = steps
  c.train.keep = 1
  c.train.progress = False
  return c


def pretrain_config(arm: str, preset: dict, seed: int):
  """The arm's pre-training config, with its step count set by the shared budget."""
  from gptjax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from gptjax.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  family, objective, extra = ARMS[arm]
  overrides = {"objective": objective, "data.corpus": "wikitext2", "seed": seed,
               "data.seed": seed, "data.seq_len": preset["seq_len"],
               "data.batch_size": preset["batch"], **preset["body"], **extra}
  if preset["body"]:
    overrides.update(LAYERS[family])
  if family in ("t5", "bart"):
    overrides["data.target_len"] = preset["seq_len"] // 4 if family == "t5" else preset["seq_len"]
  c = load_config(family, preset["variant"], overrides)
  cfg = ModelConfig.from_config(c.model)
  target = c.data.target_len if family in ("t5", "bart") else 0
  budget = FLAGS.budget or preset["budget"]
  if FLAGS.budget_kind == "tokens":
    per_step = c.data.batch_size * c.data.seq_len  # input tokens seen, the same for every arm
  else:
    per_step = flops_lib.train_flops_per_example(cfg, c.data.seq_len, target, objective) \
        * c.data.batch_size
    budget = budget * flops_lib.train_flops_per_example(
        cfg, c.data.seq_len, target, objective)  # flops budget given in "example-equivalents"
  steps = int(budget // per_step)
  if steps < 1:
    raise SystemExit(f"error: --budget={budget} is too small for one step of arm {arm} "
                     f"({per_step} per step); raise --budget")
  return _quiet(c, steps, preset["eval_steps"])


def finetune_config(arm: str, preset: dict, seed: int, init_from: str, trainable: str, steps: int):
  """sst2 classification from `init_from` ('' = scratch) with `trainable` params."""
  family = ARMS[arm][0]
  overrides = {"objective": "classification", "data.corpus": "sst2", "model.num_classes": 2,
               "seed": seed, "data.seed": seed, "data.seq_len": min(preset["seq_len"], 64),
               "data.batch_size": preset["batch"], "init_from": init_from,
               "finetune.trainable": trainable, "train.learning_rate": 1e-3, **preset["body"]}
  if preset["body"]:
    overrides.update(LAYERS[family])
  if family in ("t5", "bart"):
    overrides["data.target_len"] = 1
  # eval_steps 0: the whole sst2 dev split (872 sentences) for the smoke-free presets.
  eval_steps = preset["eval_steps"] if FLAGS.preset == "smoke" else 0
  return _quiet(load_config(family, preset["variant"], overrides), steps, eval_steps)


def run_once(config, workdir: str, label: str) -> dict:
  """Trains `config` in `workdir` unless a finished result is there; returns its final metrics."""
  def compute():
    metrics = finished_runs.train_to_end(config, workdir, label)
    metrics["params"] = _param_count(config)
    return metrics
  def report(metrics):
    shown = {k: round(v, 4) for k, v in metrics.items()
             if k.startswith("eval_") and "loss" in k or "accuracy" in k}
    return f"{metrics['wall_s']:.0f}s {shown}"
  return finished_runs.cached(workdir, label, compute, report)


def _sst2(split: str) -> tuple[list, list]:
  from gptjax import corpora, embeddings  # pylint: disable=g-import-not-at-top
  return embeddings.read_labelled_tsv(os.path.join(corpora.raw_data_dir(), "sst2", split))


def logistic_probe(x_train, y_train, x_dev, y_dev, l2: float = 1.0) -> float:
  """Dev accuracy of an L2-regularised logistic regression (Newton steps) on standardised features."""
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
  a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))].astype(np.float64)
  b = np.c_[(x_dev - mu) / sd, np.ones(len(x_dev))].astype(np.float64)
  y = np.asarray(y_train, np.float64)
  w = np.zeros(a.shape[1])
  reg = np.full(a.shape[1], l2)
  reg[-1] = 0.0
  for _ in range(25):
    p = 1.0 / (1.0 + np.exp(-(a @ w)))
    grad = a.T @ (p - y) + reg * w
    hess = a.T @ (a * (p * (1 - p))[:, None]) + np.diag(reg + 1e-9)
    w -= np.linalg.solve(hess, grad)
  return float(np.mean((b @ w > 0) == np.asarray(y_dev, bool)))


def run_probe(pre_dir: str, workdir: str, label: str, seed: int, n_train: int,
              random_body: bool) -> dict:
  """Linear probe on sst2 of the frozen body in `pre_dir` (or of a fresh init of its architecture)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from gptjax import checkpointing, embeddings, models  # pylint: disable=g-import-not-at-top
  from gptjax.layers import ModelConfig  # pylint: disable=g-import-not-at-top

  def compute():
    run_config, params, tokenizer = checkpointing.restore_for_inference(pre_dir)
    cfg = ModelConfig.from_config(run_config.model)
    model = models.make_model(cfg)
    if random_body:
      target = run_config.data.target_len if cfg.family == "encoder_decoder" else 0
      params = nn.meta.unbox(models.init_params(cfg, jax.random.key(1000 + seed), 1,
                                                run_config.data.seq_len, target))
    train_x, train_y = _sst2("train.tsv")
    pick = np.random.default_rng(seed).permutation(len(train_x))[:n_train]
    dev_x, dev_y = _sst2("dev.tsv")
    embed = lambda texts: embeddings.embed_texts(model, params, tokenizer, texts, batch_size=64,
                                                 max_len=64, pad_id=tokenizer.pad_id or 0)
    acc = logistic_probe(embed([train_x[i] for i in pick]), [train_y[i] for i in pick],
                         embed(dev_x), dev_y)
    return {"eval_class_accuracy": acc, "n_train": len(pick)}

  return finished_runs.cached(
      workdir, label, compute,
      lambda r: f"dev accuracy {r['eval_class_accuracy']:.3f} ({r['wall_s']:.0f}s)")


def _param_count(config) -> int:
  from gptjax import summary  # pylint: disable=g-import-not-at-top
  from gptjax.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  return summary.count_params(summary.param_shapes(ModelConfig.from_config(config.model)))


def majority_baseline() -> float:
  """Accuracy of always predicting sst2 train's most common label on sst2 dev."""
  from gptjax import corpora  # pylint: disable=g-import-not-at-top
  raw = corpora.raw_data_dir()
  def labels(name):
    with open(os.path.join(raw, "sst2", name), encoding="utf-8") as f:
      next(f)
      return [int(line.rstrip("\r\n").split("\t")[-1]) for line in f if line.strip()]
  train_labels, dev_labels = labels("train.tsv"), labels("dev.tsv")
  majority = int(np.mean(train_labels) >= 0.5)
  return float(np.mean(np.asarray(dev_labels) == majority))


def _mean_std(values):
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return float("nan"), float("nan")
  return float(np.mean(values)), float(np.std(values))


def write_outputs(out: str, rows: list, majority: float) -> None:
  """results.csv (one row per arm and seed), results.md (mean ± std), plots as PNG."""
  keys = sorted({k for r in rows for k in r if k != "curve"})
  with open(os.path.join(out, "results.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
  arms = list(dict.fromkeys(r["arm"] for r in rows))
  cols = [("params", "params"), ("pretrain_steps", "steps"), ("loss_tokens", "loss-bearing tokens"),
          ("intrinsic", "intrinsic metric"), ("pair_acc", "NSP/SOP accuracy"), ("probe_acc", "sst2 probe"),
          ("probe_random_acc", "sst2 probe, random body"), ("finetune_acc", "sst2 fine-tune"),
          ("scratch_acc", "sst2 scratch")]
  lines = ["| arm | " + " | ".join(c[1] for c in cols) + " | published direction |",
           "|---|" + "---|" * (len(cols) + 1)]
  for arm in arms:
    cells = []
    for key, _ in cols:
      vals = [r.get(key) for r in rows if r["arm"] == arm]
      if key in ("params", "pretrain_steps", "loss_tokens"):
        cells.append(f"{int(vals[0]):,}" if vals and vals[0] is not None else "")
      elif key == "intrinsic":
        name = next((r.get("intrinsic_name") for r in rows if r["arm"] == arm), "")
        m, s = _mean_std(vals)
        cells.append(f"{name} {m:.3f} ± {s:.3f}")
      elif key == "pair_acc":
        name = next((r.get("pair_name") for r in rows if r["arm"] == arm), "")
        m, s = _mean_std(vals)
        cells.append(f"{name} {m:.3f} ± {s:.3f}" if name else "")
      else:
        m, s = _mean_std(vals)
        cells.append(f"{m:.3f} ± {s:.3f}")
    lines.append(f"| {arm} | " + " | ".join(cells) + f" | {PUBLISHED.get(arm, '')} |")
  lines.append(f"\nmajority class on sst2 dev: {majority:.3f}")
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  _plots(out, rows, arms, majority)


def _plots(out: str, rows: list, arms: list, majority: float) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for arm in arms:
    r = next(r for r in rows if r["arm"] == arm)
    curve = r.get("curve") or []
    if curve:
      ax.plot([c[0] for c in curve], [c[1] for c in curve], label=arm)
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel("train loss")
  ax.set_xscale("log")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "loss_vs_flops.png"), dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(8, 4))
  x = np.arange(len(arms))
  bars = [("probe_acc", "linear probe"), ("probe_random_acc", "probe, random body"),
          ("finetune_acc", "fine-tune"), ("scratch_acc", "fine-tune from scratch")]
  for i, (key, label) in enumerate(bars):
    stats = [_mean_std([r.get(key) for r in rows if r["arm"] == a]) for a in arms]
    ax.bar(x + (i - 1.5) * 0.2, [s[0] for s in stats], 0.2, yerr=[s[1] for s in stats],
           label=label, capsize=3)
  ax.axhline(majority, color="k", ls="--", lw=1, label="majority class")
  ax.set_xticks(x)
  ax.set_xticklabels(arms, rotation=20, fontsize=8)
  ax.set_ylabel("sst2 dev accuracy")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "downstream_accuracy.png"), dpi=120)
  plt.close(fig)


def _curve(workdir: str, flops_per_step: float) -> list:
  points = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r and "eval_loss" not in r:
        points.append((r["step"] * flops_per_step, r["loss"]))
  return points


# arm -> (shown name, eval metric); an MLM+SOP run reports SOP through the pair head's nsp_ keys.
INTRINSIC = {"mlm": ("mlm_accuracy", "eval_mlm_accuracy"),
             "mlm_nsp": ("mlm_accuracy", "eval_mlm_accuracy"),
             "mlm_sop": ("mlm_accuracy", "eval_mlm_accuracy"),
             "next_token": ("lm_perplexity", "eval_lm_perplexity"),
             "prefix_lm": ("lm_perplexity", "eval_lm_perplexity"),
             "span_corruption": ("span_accuracy", "eval_span_accuracy"),
             "bart_denoise": ("span_accuracy", "eval_span_accuracy")}
PAIR_METRIC = {"mlm_nsp": "nsp", "mlm_sop": "sop"}


def main(argv):
  del argv
  from gptjax import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from gptjax.layers import ModelConfig  # pylint: disable=g-import-not-at-top
  preset = PRESETS[FLAGS.preset]
  arms = FLAGS.arms or list(ARMS)
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    raise SystemExit(f"error: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
  seeds = [int(s) for s in FLAGS.seeds] or preset["seeds"]
  configs = {(a, s): pretrain_config(a, preset, s) for a in arms for s in seeds}  # checks budgets
  counts = {a: _param_count(configs[(a, seeds[0])]) for a in arms}
  print("parameters: " + ", ".join(f"{a} {n / 1e6:.2f}M" for a, n in counts.items()), flush=True)
  if max(counts.values()) > 1.1 * min(counts.values()):
    print(f"warning: parameter counts differ by more than 10% (the {FLAGS.preset} preset does not "
          "equalise model sizes)", flush=True)
  os.makedirs(FLAGS.out, exist_ok=True)
  majority = majority_baseline()
  rows = []
  for seed in seeds:  # every arm once before any arm twice: an interrupted run is still a table
    for i, arm in enumerate(arms):
      print(f"[{i + 1}/{len(arms)}] {arm} seed {seed}", flush=True)
      root = os.path.join(FLAGS.out, arm, f"seed{seed}")
      c = configs[(arm, seed)]
      pre = run_once(c, os.path.join(root, "pretrain"), "pretrain")
      cfg = ModelConfig.from_config(c.model)
      target = c.data.target_len if cfg.family == "encoder_decoder" else 0
      fps = flops_lib.train_flops_per_example(cfg, c.data.seq_len, target, c.objective) \
          * c.data.batch_size
      ft_steps = preset["ft_steps"]
      pre_dir = os.path.join(root, "pretrain")
      probe = run_probe(pre_dir, os.path.join(root, "probe"), "linear probe", seed,
                        preset["probe_train"], random_body=False)
      family = ARMS[arm][0]  # the random-body probe and scratch depend on the family only
      probe_random = run_probe(pre_dir, os.path.join(FLAGS.out, f"probe_random_{family}",
                                                     f"seed{seed}"), f"linear probe, random {family}",
                               seed, preset["probe_train"], random_body=True)
      full = run_once(finetune_config(arm, preset, seed, pre_dir, "all", ft_steps),
                      os.path.join(root, "finetune"), "fine-tune")
      scratch = run_once(finetune_config(arm, preset, seed, "", "all", ft_steps),
                         os.path.join(FLAGS.out, f"scratch_{family}", f"seed{seed}"),
                         f"scratch ({family})")
      rows.append({
          "arm": arm, "seed": seed, "params": pre.get("params"),
          "pretrain_steps": c.train.steps,
          "loss_tokens": int(pre.get("loss_tokens_total", 0)),
          "intrinsic_name": INTRINSIC[arm][0],
          "intrinsic": pre.get(INTRINSIC[arm][1]),
          "pair_name": PAIR_METRIC.get(arm, ""),
          "pair_acc": pre.get("eval_nsp_accuracy") if arm in PAIR_METRIC else None,
          "probe_acc": probe.get("eval_class_accuracy"),
          "probe_random_acc": probe_random.get("eval_class_accuracy"),
          "finetune_acc": full.get("eval_class_accuracy"),
          "scratch_acc": scratch.get("eval_class_accuracy"),
          "curve": _curve(pre_dir, fps)})
  write_outputs(FLAGS.out, rows, majority)


if __name__ == "__main__":
  app.run(main)
