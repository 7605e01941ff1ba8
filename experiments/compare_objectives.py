"""Same-budget comparison of pre-training objectives across the three families.

  python experiments/compare_objectives.py --preset=cpu --out=experiments/results/compare_objectives_cpu
  python experiments/compare_objectives.py --preset=smoke --arms=mlm,next_token --seeds=0

Every arm pre-trains on enwiki2015 (no arm repeats its data) for the same budget of input
tokens (or FLOPs), with parameter counts within 10% of each other. Each (arm, seed) is one
resumable unit: pre-train, the unigram baseline of the positions it predicts, NSP and SOP
accuracy for the pair arms (ALBERT's cross-task check), a linear probe on sst2 beside the same
probe on a random body, full fine-tuning beside the family's scratch run, and for the
encoder-decoders whether the decoder reads its encoder (encoder_reliance). Its row lands in
results.csv when the unit finishes, and results.md (gains and published directions with 95%
intervals and computed verdicts) is rebuilt from every row on disk, so the table grows over
several sessions. Finished stages are skipped on re-run.
"""

import glob
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
from experiments import encoder_reliance  # pylint: disable=g-import-not-at-top
from experiments import finished_runs  # pylint: disable=g-import-not-at-top
from experiments import compare_objectives_probe as unit_probes  # pylint: disable=g-import-not-at-top
from experiments.config_files import load_config  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "cpu", ["smoke", "cpu"], "smoke: tests; cpu: ~8 h in 21 resumable units.")
flags.DEFINE_list("arms", [], "Subset of arms (default: all).")
flags.DEFINE_list("seeds", [], "Seeds (default: the preset's).")
flags.DEFINE_enum("budget_kind", "tokens", ["tokens", "flops"], "What is held equal across arms.")
flags.DEFINE_float("budget", 0, "Pre-training budget per arm (0: the preset's).")
flags.DEFINE_string("out", "results/compare_objectives", "Output folder.")
flags.DEFINE_bool("report_only", False, "Rebuild results.csv, results.md and the plots from the "
                  "units on disk (e.g. after units ran in several processes), training nothing.")

# arm -> (config file, objective, extra overrides)
ARMS = {
    "mlm": ("bert", "mlm", {}),
    "mlm_nsp": ("bert", "mlm_nsp", {}),
    "mlm_sop": ("bert", "mlm_nsp", {"data.sop": True}),
    "next_token": ("gpt", "next_token", {}),
    "prefix_lm": ("gpt", "prefix_lm", {}),
    # T5's own optimizer: with AdamW the decoder never read its encoder at this budget
    # (results/compare_objectives_cpu_t5_adamw); Adafactor at relative lr 3e-2 was the best of
    # 1e-2 and 3e-2 in 1,000-step probes (README, "Compare objectives")
    "span_corruption": ("t5", "span_corruption", {"train.optimizer": "adafactor",
                                                  "train.learning_rate": 3e-2,
                                                  "train.weight_decay": 0.0}),
    "bart_denoise": ("bart", "denoise", {}),
}
# What BERT Table 5 / T5 Tables 4-5 / ALBERT Table 5 report, for the direction of each comparison.
PUBLISHED = {
    "mlm": "BERT Table 5: MLM alone below MLM+NSP on SST-2 (92.6 vs 92.7)",
    "mlm_nsp": "BERT Table 5: BERT-base reference (SST-2 92.7)",
    "mlm_sop": "ALBERT Table 5: SOP >= NSP downstream (avg 80.2 vs 79.3)",
    "next_token": "BERT Table 5: LTR & no NSP below MLM (SST-2 92.1 vs 92.6)",
    "prefix_lm": "T5 Tables 4-5: prefix-LM objective below span corruption (GLUE 80.7 vs 83.3)",
    "span_corruption": "T5 Table 5: replace corrupted spans (GLUE 83.3)",
    "bart_denoise": "T5 Table 4: BERT-style denoising near span corruption (GLUE 83.0 vs 83.3)",
}
# Common body so parameter counts stay within 10%: width 256, 4 heads, mlp 1024, vocab 4096, no
# dropout while pre-training (tokens seen once). Pre-LN for BERT and BART, and rotary positions
# for every family but T5 (whose relative-position buckets are already relative): with learned
# absolute positions the pre-LN MLM body sat on the frequent-token plateau (eval MLM loss 6.36
# after 1M tokens of enwiki2015, 6.20 after 4.2M, unigram 6.63); with rotary positions, 5.80
# after 1M and 4.49 after 4.2M (RoFormer's faster MLM convergence; results/mlm_recipe_probe).
BODY = {"model.embed_dim": 256, "model.num_heads": 4, "model.mlp_dim": 1024,
        "model.vocab_size": 4096, "data.tokenizer.vocab_size": 4096, "model.max_len": 256}
PRE_LN = {"model.norm_position": "pre", "model.final_norm": True}
ROPE = {"model.position": "rope"}
LAYERS = {"bert": {"model.num_layers": 4, **PRE_LN, **ROPE},
          "gpt": {"model.num_layers": 4, "model.mlp_dim": 1152, **ROPE},
          "t5": {"model.num_layers": 2, "model.num_decoder_layers": 2},
          "bart": {"model.num_layers": 2, "model.num_decoder_layers": 2, "model.mlp_dim": 960,
                   **PRE_LN, **ROPE}}
# The smoke preset's bodies: one layer (and one decoder layer), so each compile is short.
SMOKE_LAYERS = {"bert": {"model.num_layers": 1}, "gpt": {"model.num_layers": 1},
                "t5": {"model.num_layers": 1, "model.num_decoder_layers": 1},
                "bart": {"model.num_layers": 1, "model.num_decoder_layers": 1}}
PRESETS = {
    # tests: the first documents of enwiki2015 and of sst2, a few steps of each stage
    "smoke": dict(budget=8 * 32 * 6, seeds=[0], seq_len=32, batch=8, ft_steps=6, ft_batch=8,
                  ft_lr=1e-3, probe_train=64, probe_dev=64, eval_steps=2, variant="tiny", body={},
                  layers=SMOKE_LAYERS, ckpt_every=3,
                  max_docs=20, ft_max_docs=200, lr=1e-3, dropout=None, unigram_examples=64,
                  pair_eval_batches=2),
    # ~20-25 min per (arm, seed) unit on 2 cores: 4.2M input tokens of pre-training (1024 steps
    # of 32 x 128), then sst2 fine-tuning with the recipe that reaches ~0.79 from scratch
    # (seq 64, batch 32, lr 5e-4, 600 steps, 10% warm-up), judged on all 872 dev sentences
    "cpu": dict(budget=32 * 128 * 1024, seeds=[0, 1, 2], seq_len=128, batch=32, ft_steps=600,
                ft_batch=32, ft_lr=5e-4, probe_train=2000, probe_dev=0, eval_steps=20,
                variant="small", body=BODY, layers=LAYERS, ckpt_every=0, max_docs=0,
                ft_max_docs=0, lr=1e-3, dropout=0.0, unigram_examples=2000,
                pair_eval_batches=64),  # 2,048 held-out pairs per task: +-0.022 at chance
}


def _quiet(c, steps: int, eval_steps: int, ckpt_every: int = 0):
  c.train.steps = steps
  c.train.warmup_steps = max(1, steps // 10)
  c.train.log_every = max(1, steps // 10)
  c.train.eval_every = steps
  c.train.eval_steps = eval_steps
  # a unit killed mid-run resumes from its checkpoint (0: four per run)
  c.train.ckpt_every = ckpt_every or max(1, steps // 4)
  c.train.keep = 1
  c.train.progress = False
  return c


def pretrain_config(arm: str, preset: dict, seed: int):
  """The arm's pre-training config, with its step count set by the shared budget."""
  from gptjax.training import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  family, objective, extra = ARMS[arm]
  overrides = {"objective": objective, "data.corpus": "enwiki2015", "seed": seed,
               "data.seed": seed, "data.seq_len": preset["seq_len"], "data.max_docs": preset["max_docs"],
               "data.batch_size": preset["batch"], "data.eval_batch_size": preset["batch"],
               "train.learning_rate": preset["lr"], **preset["body"], **extra}
  if preset["dropout"] is not None:
    overrides.update({"model.dropout_rate": preset["dropout"],
                      "model.attention_dropout_rate": preset["dropout"]})
  overrides.update(preset["layers"][family])
  if family in ("t5", "bart"):
    overrides["data.target_len"] = preset["seq_len"] // 4 if family == "t5" else preset["seq_len"]
  c = load_config(family, preset["variant"], **overrides)
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
  return _quiet(c, steps, preset["eval_steps"], preset["ckpt_every"])


def finetune_config(arm: str, preset: dict, seed: int, init_from: str, trainable: str, steps: int,
                    tokenizer_path: str = ""):
  """sst2 classification from `init_from` ('' = scratch, with the pre-trained arm's vocabulary
  from `tokenizer_path`, so scratch and fine-tune differ only in their initial weights)."""
  family = ARMS[arm][0]
  overrides = {"objective": "classification", "data.corpus": "sst2", "model.num_classes": 2,
               "seed": seed, "data.seed": seed, "data.seq_len": min(preset["seq_len"], 64),
               "data.batch_size": preset["ft_batch"], "data.eval_batch_size": preset["ft_batch"],
               "init_from": init_from, "data.max_docs": preset["ft_max_docs"],
               "finetune.trainable": trainable, "train.learning_rate": preset["ft_lr"],
               "data.tokenizer.path": tokenizer_path, **preset["body"]}
  overrides.update(preset["layers"][family])
  if family in ("t5", "bart"):
    overrides["data.target_len"] = 1
  # eval_steps 0: the whole sst2 dev split (872 sentences) for the smoke-free presets.
  eval_steps = preset["eval_steps"] if FLAGS.preset == "smoke" else 0
  return _quiet(load_config(family, preset["variant"], **overrides), steps, eval_steps,
                preset["ckpt_every"])


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


def _param_count(config) -> int:
  from gptjax.analysis import param_summary as summary  # pylint: disable=g-import-not-at-top
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  return summary.count_params(summary.param_shapes(ModelConfig.from_config(config.model)))


def _curve(workdir: str, flops_per_step: float) -> list:
  points = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if "loss" in r and "eval_loss" not in r:
        points.append((r["step"] * flops_per_step, r["loss"]))
  return points


# arm -> (shown name, eval metric, eval loss of the predicted tokens); an MLM+SOP run reports SOP
# through the pair head's nsp_ keys.
INTRINSIC = {"mlm": ("mlm_accuracy", "eval_mlm_accuracy", "eval_mlm_loss"),
             "mlm_nsp": ("mlm_accuracy", "eval_mlm_accuracy", "eval_mlm_loss"),
             "mlm_sop": ("mlm_accuracy", "eval_mlm_accuracy", "eval_mlm_loss"),
             "next_token": ("lm_perplexity", "eval_lm_perplexity", "eval_lm_loss"),
             "prefix_lm": ("lm_perplexity", "eval_lm_perplexity", "eval_lm_loss"),
             "span_corruption": ("span_accuracy", "eval_span_accuracy", "eval_span_loss"),
             "bart_denoise": ("span_accuracy", "eval_span_accuracy", "eval_span_loss")}
PAIR_ARMS = ("mlm_nsp", "mlm_sop")


def run_unit(arm: str, seed: int, config, preset: dict, majority: float) -> dict:
  """One (arm, seed): pre-train, unigram baseline, probes, fine-tune, scratch; its results row."""
  from gptjax.training import run_records
  root = os.path.join(FLAGS.out, arm, f"seed{seed}")
  pre_dir = os.path.join(root, "pretrain")
  family = ARMS[arm][0]  # the random-body probe and scratch depend on the family only

  def compute():
    start = time.time()
    pre = run_once(config, pre_dir, "pretrain")
    unigram = unit_probes.predicted_unigram_loss(config, os.path.join(root, "unigram"),
                                                 preset["unigram_examples"])
    pairs = unit_probes.cross_task(
        pre_dir, os.path.join(root, f"cross_task_{preset['pair_eval_batches']}"),
        preset["pair_eval_batches"]) if arm in PAIR_ARMS else {}
    probe = unit_probes.run_probe(pre_dir, os.path.join(root, "probe"), "linear probe", seed,
                                  preset["probe_train"], preset["probe_dev"], random_body=False)
    probe_random = unit_probes.run_probe(
        pre_dir, os.path.join(FLAGS.out, f"probe_random_{family}", f"seed{seed}"),
        f"linear probe, random {family}", seed, preset["probe_train"], preset["probe_dev"],
        random_body=True)
    full = run_once(finetune_config(arm, preset, seed, pre_dir, "all", preset["ft_steps"]),
                    os.path.join(root, "finetune"), "fine-tune")
    scratch = run_once(finetune_config(arm, preset, seed, "", "all", preset["ft_steps"],
                                       os.path.join(pre_dir, "tokenizer.json")),
                       os.path.join(FLAGS.out, f"scratch_{family}", f"seed{seed}"), f"scratch ({family})")
    intrinsic_loss = pre.get(INTRINSIC[arm][2])
    return {
        "arm": arm, "seed": seed, "params": pre.get("params"), "pretrain_steps": config.train.steps,
        "pretrain_tokens": config.train.steps * config.data.batch_size * config.data.seq_len,
        "loss_tokens": int(pre.get("loss_tokens_total", 0)), "intrinsic_name": INTRINSIC[arm][0],
        "intrinsic": pre.get(INTRINSIC[arm][1]), "intrinsic_loss": intrinsic_loss,
        "unigram_loss": unigram["unigram_loss"],
        "nats_below_unigram": unigram["unigram_loss"] - intrinsic_loss,
        "nsp_acc": pairs.get("nsp_acc"), "sop_acc": pairs.get("sop_acc"),
        "pair_eval_pairs": pairs.get("pair_eval_pairs"),
        "probe_acc": probe.get("eval_class_accuracy"),
        "probe_random_acc": probe_random.get("eval_class_accuracy"),
        "finetune_acc": full.get("eval_class_accuracy"),
        "scratch_acc": scratch.get("eval_class_accuracy"), "majority_acc": majority,
        "pretrain_wall_s": pre.get("wall_s"), "unit_wall_s": time.time() - start,
        "git_commit": run_records.git_commit()}

  row = finished_runs.cached(root, f"{arm} seed {seed} row", compute,
                             lambda r: f"unit done in {r['unit_wall_s']:.0f}s")
  if family in ("t5", "bart"):
    reliance_of(root, preset["eval_steps"])
  return row


def pretrain_curves(rows: list, preset: dict) -> dict:
  """arm -> [(training FLOPs, train loss)] of its lowest finished seed, read from disk, so a
  process running some arms still plots every arm finished under --out."""
  from gptjax.training import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  curves = {}
  for row in rows:
    arm, seed = row["arm"], int(row["seed"])
    if arm in curves:
      continue
    config = pretrain_config(arm, preset, seed)
    cfg = ModelConfig.from_config(config.model)
    target = config.data.target_len if cfg.family == "encoder_decoder" else 0
    fps = flops_lib.train_flops_per_example(cfg, config.data.seq_len, target, config.objective) \
        * config.data.batch_size
    metrics = os.path.join(FLAGS.out, arm, f"seed{seed}", "pretrain")
    if os.path.exists(os.path.join(metrics, "metrics.jsonl")):
      curves[arm] = _curve(metrics, fps)
  return curves


def reliance_of(root: str, batches: int) -> dict:
  """Does the unit's decoder read its encoder? encoder_reliance on its pre-trained checkpoint,
  stored in ROOT/encoder_reliance/ ({} when the checkpoint is not on this machine)."""
  def compute():
    return encoder_reliance.measure(os.path.join(root, "pretrain"), batches)
  try:
    return finished_runs.cached(os.path.join(root, "encoder_reliance"), "encoder reliance", compute,
                                lambda r: f"text nll {r['text_gain_from_own_encoder'] or 0:+.3f} "
                                          "with another row's encoder input")
  except FileNotFoundError as e:
    print(f"  encoder reliance: not measured ({e})", flush=True)
    return {}


def finished_rows(arms: list, seeds: list) -> list[dict]:
  """Every unit row on disk under --out (this and earlier sessions), arms in ARMS order."""
  rows = []
  for arm in ARMS:
    seed_dirs = sorted(glob.glob(os.path.join(FLAGS.out, arm, "seed*", "result.json")))
    for path in seed_dirs:
      with open(path, encoding="utf-8") as f:
        row = json.load(f)
      reliance = os.path.join(os.path.dirname(path), "encoder_reliance", "result.json")
      if os.path.exists(reliance):
        with open(reliance, encoding="utf-8") as f:
          row["encoder_text_gain"] = json.load(f)["text_gain_from_own_encoder"]
      rows.append(row)
  del arms, seeds
  return sorted(rows, key=lambda r: (list(ARMS).index(r["arm"]), int(r["seed"])))


def write_reports(preset: dict, majority: float, header: list) -> str:
  """results.csv, results.md and the plots, from every unit row on disk; returns results.md."""
  rows = finished_rows([], [])
  report.write_csv(FLAGS.out, rows)  # the row is in results.csv as soon as its unit finishes
  walls = ", ".join(f"{r['arm']}/{r['seed']} {r['unit_wall_s']:.0f}s" for r in rows)
  stamp = (f"updated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(rows)} units "
           f"finished (wall time per unit: {walls}); each unit's commit is in results.csv")
  text = report.write_markdown(FLAGS.out, rows, majority, header + [stamp], PUBLISHED)
  report.write_plots(FLAGS.out, rows, pretrain_curves(rows, preset), majority)
  return text


def main(argv):
  del argv
  from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure()  # XLA:CPU malloc settings before JAX starts its threads (no-op off CPU)
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
  majority = report.majority_baseline()
  header = [f"Objective comparison, preset {FLAGS.preset}: `python experiments/compare_objectives.py "
            f"{' '.join(a.replace(str(REPO) + os.sep, '') for a in sys.argv[1:])}`"]
  if FLAGS.report_only:
    header.append("(rebuilt from the units on disk, which ran as one or more processes with "
                  "`--arms`/`--seeds`; each unit's commit is in results.csv)")
  # every arm once before any arm twice
  units = [] if FLAGS.report_only else [(a, s) for s in seeds for a in arms]
  for i, (arm, seed) in enumerate(units):
    print(f"[{i + 1}/{len(units)}] {arm} seed {seed}", flush=True)
    run_unit(arm, seed, configs[(arm, seed)], preset, majority)
    text = write_reports(preset, majority, header)
  if FLAGS.report_only:
    text = write_reports(preset, majority, header)
  print(text)


if __name__ == "__main__":
  app.run(main)
