"""What the objective comparison (experiments/compare_objectives.py) measures of a unit besides
its training runs: the unigram baseline of the positions its objective predicts, NSP and SOP
accuracy of a pair head (ALBERT's cross-task check), and the linear probe (logistic regression on
sst2 over a frozen body's mean-pooled features) of a pre-trained or a random body."""

import os

import numpy as np

from experiments import finished_runs


def _sst2(split: str) -> tuple[list, list]:
  from gptjax.data import corpora  # pylint: disable=g-import-not-at-top
  from gptjax.inference import sentence_embeddings as embeddings
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


def run_probe(pre_dir: str, workdir: str, label: str, seed: int, n_train: int, n_dev: int,
              random_body: bool) -> dict:
  """Linear probe on sst2 of the frozen body in `pre_dir` (or of a fresh init of its architecture)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from gptjax.training import train_step
  from gptjax.inference import sentence_embeddings as embeddings
  from gptjax.model import models
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top

  def compute():
    run_config, params, tokenizer = checkpointing.restore_for_inference(pre_dir)
    cfg = ModelConfig.from_config(run_config.model)
    model = models.make_model(cfg)
    if random_body:
      target = run_config.data.target_len if cfg.family == "encoder_decoder" else 0
      params = train_step.run_once(lambda: nn.meta.unbox(models.init_params(  # one compile
          cfg, jax.random.key(1000 + seed), 1, run_config.data.seq_len, target)))
    train_x, train_y = _sst2("train.tsv")
    pick = np.random.default_rng(seed).permutation(len(train_x))[:n_train]
    dev_x, dev_y = _sst2("dev.tsv")
    dev_x, dev_y = (dev_x[:n_dev], dev_y[:n_dev]) if n_dev else (dev_x, dev_y)
    embed = lambda texts: embeddings.embed_texts(model, params, tokenizer, texts, batch_size=64,
                                                 max_len=64, pad_id=tokenizer.pad_id or 0)
    acc = logistic_probe(embed([train_x[i] for i in pick]), [train_y[i] for i in pick],
                         embed(dev_x), dev_y)
    return {"eval_class_accuracy": acc, "n_train": len(pick)}

  return finished_runs.cached(
      workdir, label, compute,
      lambda r: f"dev accuracy {r['eval_class_accuracy']:.3f} ({r['wall_s']:.0f}s)")


def predicted_unigram_loss(config, workdir: str, num_examples: int) -> dict:
  """Entropy (nats) of the train split's tokens at the positions the objective predicts.

  Counted over `num_examples` training examples drawn as training draws them (masked tokens for
  MLM, decoder targets for span corruption and denoising, next tokens for the LM arms).
  """
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from gptjax.data import tokenization

  def compute():
    tokenizer = tokenization.load_or_train_tokenizer(config)
    examples = input_pipeline.example_source(config, tokenizer, "train")
    counts = np.zeros(tokenizer.vocab_size + 128, np.int64)
    for i in range(min(num_examples, len(examples))):
      ex = examples.example(i, np.random.default_rng((config.data.seed, i)))
      targets = ex.get("targets", ex.get("dec_targets"))
      weights = ex.get("weights", ex.get("dec_weights"))
      np.add.at(counts, np.asarray(targets)[np.asarray(weights) > 0], 1)
    p = counts[counts > 0] / counts.sum()
    return {"unigram_loss": float(-(p * np.log(p)).sum()), "counted_tokens": int(counts.sum())}

  return finished_runs.cached(workdir, "unigram baseline", compute,
                              lambda r: f"{r['unigram_loss']:.3f} nats over {r['counted_tokens']} tokens")


def cross_task(pre_dir: str, workdir: str, eval_batches: int) -> dict:
  """NSP and SOP accuracy of a pair-head checkpoint on held-out pairs (ALBERT Table 5)."""
  def compute():
    from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
    from gptjax.training import train
    run_config, params, tokenizer = checkpointing.restore_for_inference(pre_dir)
    out = {"pair_eval_pairs": eval_batches * run_config.data.eval_batch_size}
    for task, sop in (("nsp", False), ("sop", True)):
      c = run_config.copy_and_resolve_references()
      c.data.sop = sop
      metrics = train.evaluate_params(c, params, tokenizer, "validation", max_batches=eval_batches)
      out[f"{task}_acc"] = metrics["nsp_accuracy"]
    return out
  return finished_runs.cached(workdir, "NSP and SOP pairs", compute,
                              lambda r: f"nsp {r['nsp_acc']:.3f}, sop {r['sop_acc']:.3f}")
