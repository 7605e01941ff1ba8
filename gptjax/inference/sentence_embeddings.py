"""Sentence embeddings (mean-pooled, L2-normalised), cosine retrieval and a kNN evaluation.

`run.py --mode=embed --input_file=sentences.txt --output=emb.npy` embeds one
sentence per line with the model of `config.init_from` (hf:DIR or a gptjax
workdir) or of `--workdir`. `Index` is the retrieval step of RAG: top-k
neighbours of a query by cosine similarity.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.model import family as model_family
from gptjax.model import models
from gptjax.config_schema import ConfigError


def token_ids(tokenizer: Any, text: str) -> list[int]:
  """Ids of `text` (with the tokenizer's own special tokens) from a tokenizers.Tokenizer-like object."""
  enc = tokenizer.encode(text) if hasattr(tokenizer, "encode") else tokenizer(text)
  return list(getattr(enc, "ids", enc))


def _hidden_fn(model):
  """jit(params, ids, mask) -> mean-pooled, L2-normalised BxD embeddings for any family."""
  adapter = model_family.of(model)

  def fn(params, ids_BxL, mask_BxL):
    h_BxLxD = adapter.hidden_states(model, params, ids_BxL, mask_BxL)
    pooled_BxD = models.pool(h_BxLxD.astype(jnp.float32), mask_BxL, "mean")
    norm_Bx1 = jnp.linalg.norm(pooled_BxD, axis=-1, keepdims=True)
    return pooled_BxD / jnp.maximum(norm_Bx1, 1e-12)

  return jax.jit(fn)


def embed_texts(model, params, tokenizer, texts: Sequence[str], batch_size: int = 32,
                max_len: Optional[int] = None, pad_id: int = 0) -> np.ndarray:
  """[N, D] float32 mean-pooled, L2-normalised embeddings of `texts` (padding masked out).

  Batches are padded to `batch_size` rows and to a length rounded up to 16, so
  few shapes compile; sequences longer than `max_len` (default cfg.max_len) are cut.
  """
  max_len = max_len or model.cfg.max_len
  fn = _hidden_fn(model)
  out = []
  for start in range(0, len(texts), batch_size):
    chunk = [token_ids(tokenizer, t)[:max_len] or [pad_id] for t in texts[start:start + batch_size]]
    length = min(max_len, -(-max(len(c) for c in chunk) // 16) * 16)
    ids_BxL = np.full((batch_size, length), pad_id, np.int32)
    mask_BxL = np.zeros((batch_size, length), np.int32)
    for i, c in enumerate(chunk):
      ids_BxL[i, :len(c)] = c
      mask_BxL[i, :len(c)] = 1
    mask_BxL[len(chunk):, 0] = 1  # filler rows: one token so nothing divides by zero
    out.append(np.asarray(fn(params, ids_BxL, mask_BxL))[:len(chunk)])
  if not out:
    return np.zeros((0, 0), np.float32)
  return np.concatenate(out).astype(np.float32)


class Index:
  """Cosine-similarity nearest neighbours over a fixed corpus of embeddings."""

  def __init__(self, embeddings_NxD: np.ndarray):
    e = np.asarray(embeddings_NxD, np.float32)
    self.embeddings_NxD = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

  def __len__(self) -> int:
    return len(self.embeddings_NxD)

  def search(self, query_QxD: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(scores_QxK, indices_QxK) of the k most cosine-similar corpus rows, best first."""
    q = np.atleast_2d(np.asarray(query_QxD, np.float32))
    q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
    sims_QxN = q @ self.embeddings_NxD.T
    k = min(k, sims_QxN.shape[1])
    idx_QxK = np.argpartition(-sims_QxN, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sims_QxN, idx_QxK, 1), axis=1, kind="stable")
    idx_QxK = np.take_along_axis(idx_QxK, order, 1)
    return np.take_along_axis(sims_QxN, idx_QxK, 1), idx_QxK


def knn_label_agreement(embeddings_NxD: np.ndarray, labels_N: Sequence[int], k: int = 5) -> float:
  """Fraction of items whose k nearest other items (cosine) vote their own label (leave-one-out)."""
  labels_N = np.asarray(labels_N)
  index = Index(embeddings_NxD)
  _, idx_NxK1 = index.search(index.embeddings_NxD, k + 1)
  hits = 0
  for i, row in enumerate(idx_NxK1):
    neigh = [j for j in row if j != i][:k]
    values, counts = np.unique(labels_N[neigh], return_counts=True)
    hits += int(values[np.argmax(counts)] == labels_N[i])
  return hits / max(len(labels_N), 1)


def read_labelled_tsv(path: str, limit: int = 0) -> tuple[list[str], list[int]]:
  """(sentences, labels) from a `sentence<TAB>label` file with a header (GLUE sst2 layout)."""
  if not os.path.isfile(path):
    raise ConfigError(f"labelled data {path!r} does not exist")
  texts, labels = [], []
  with open(path) as f:
    next(f, None)
    for line in f:
      parts = line.rstrip("\n").split("\t")
      if len(parts) >= 2 and parts[-1].strip().lstrip("-").isdigit():
        texts.append(parts[0].strip())
        labels.append(int(parts[-1]))
      if limit and len(texts) >= limit:
        break
  return texts, labels


def load_model(config, workdir: str = ""):
  """(model, params, tokenizer) from config.init_from=hf:DIR, a gptjax workdir, or `workdir`."""
  source = config.init_from or workdir or ""
  if source.startswith("hf:"):
    from gptjax.transfer import hf_import  # pylint: disable=g-import-not-at-top
    import tokenizers  # pylint: disable=g-import-not-at-top
    hf_dir = source[3:]
    cfg, params = hf_import.load_hf(hf_dir)
    tok_path = os.path.join(hf_dir, "tokenizer.json")
    if not os.path.isfile(tok_path):
      raise ConfigError(f"config.init_from={source!r}: no tokenizer.json to tokenize with")
    return models.make_model(cfg), params, tokenizers.Tokenizer.from_file(tok_path)
  if not source:
    raise ConfigError("--mode=embed needs config.init_from=hf:DIR (or a gptjax workdir) or --workdir")
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  try:
    run_config, params, tokenizer = checkpointing.restore_for_inference(source)
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  return models.make_model(ModelConfig.from_config(run_config.model)), params, tokenizer


def main(config, workdir: str, flag_values) -> None:
  """--mode=embed: embeddings of --input_file (one text per line) written to --output (.npy)."""
  if not flag_values.input_file or not os.path.isfile(flag_values.input_file):
    raise ConfigError(f"--mode=embed needs --input_file=FILE (one sentence per line); got "
                      f"{flag_values.input_file!r}")
  output = flag_values.output or os.path.splitext(flag_values.input_file)[0] + ".npy"
  with open(flag_values.input_file) as f:
    texts = [line.rstrip("\n") for line in f if line.strip()]
  model, params, tokenizer = load_model(config, workdir)
  emb = embed_texts(model, params, tokenizer, texts, batch_size=config.data.eval_batch_size)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  np.save(output, emb)
  print(json.dumps({"embedded": len(texts), "dim": int(emb.shape[1]) if emb.size else 0,
                    "output": output}), flush=True)
