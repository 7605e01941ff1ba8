"""The objective comparison's linear probe: logistic regression on sst2 over a frozen body's
mean-pooled features (experiments/compare_objectives.py), for a pre-trained or a random body."""

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
