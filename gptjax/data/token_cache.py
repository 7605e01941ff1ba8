"""Token arrays of a corpus split, cached on disk, and the fingerprint of a run's data files.

The cache key covers the tokenizer, the corpus's content and every data setting that changes
which documents are read, so an edited corpus or another tokenizer never reads stale tokens.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re

import numpy as np

from gptjax.data import corpora
from gptjax.config_schema import cache_dir

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TOKEN_CACHE_FORMAT = "2"


def _cache_path(config, tokenizer, split: str, what: str, corpus_fp: str) -> str:
  """The token cache file: keyed on the tokenizer, the corpus's content and every data setting
  that changes which documents are read (max_docs, and train_docs for the train split)."""
  key = hashlib.sha256("|".join([_TOKEN_CACHE_FORMAT, tokenizer.fingerprint, config.data.corpus,
                                 config.data.text_files, corpus_fp, str(config.data.max_docs),
                                 split, what]
                                + ([f"train_docs={config.data.train_docs}"]
                                   if config.data.train_docs and split == "train" else [])).encode())
  return os.path.join(cache_dir(), "tokens", key.hexdigest()[:20] + ".npz")


@functools.lru_cache(maxsize=16)
def _tokenized(config_json: str, tokenizer_json: str, split: str, what: str, corpus_fp: str):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from gptjax.data import tokenization  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(__import__("json").loads(config_json))
  tokenizer = tokenization.tokenizer_from_json(tokenizer_json)
  path = _cache_path(config, tokenizer, split, what, corpus_fp)
  if os.path.exists(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  docs = corpora.documents(config, split)
  if what == "stream":  # documents joined, each starting with EOS
    ids = tokenizer.encode_batch([d["text"] for d in docs])
    eos = tokenizer.eos_id
    parts = [np.asarray([eos] + x, np.int32) for x in ids if x]
    out = {"tokens": np.concatenate(parts) if parts else np.zeros((0,), np.int32)}
  elif what == "sentences":  # flat tokens with sentence and document offsets
    sents, doc_of = [], []
    for i, d in enumerate(docs):
      for line in d["text"].split("\n"):
        for s in _SENTENCE_END.split(line.strip()):
          if s.strip():
            sents.append(s.strip())
            doc_of.append(i)
    ids = tokenizer.encode_batch(sents) if sents else []
    lengths = np.asarray([len(x) for x in ids], np.int64)
    out = {"tokens": np.asarray([t for x in ids for t in x], np.int32),
           "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
           "doc": np.asarray(doc_of, np.int64)}
  else:  # labelled texts
    a = tokenizer.encode_batch([d["text"] for d in docs])
    b = tokenizer.encode_batch([d["text_b"] for d in docs])
    flat = lambda xs: np.asarray([t for x in xs for t in x], np.int32)
    off = lambda xs: np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int64)
    out = {"a": flat(a), "a_off": off(a), "b": flat(b), "b_off": off(b),
           "label": np.asarray([d["label"] for d in docs], np.int32)}
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **out)
  os.replace(tmp, path)
  return out


def tokenized(config, tokenizer, split: str, what: str) -> dict:
  """Token arrays of a split (cached on disk by tokenizer, corpus content and max_docs)."""
  return _tokenized(config.to_json_best_effort(), tokenizer.to_json(), split, what,
                    data_fingerprint(config))


def data_fingerprint(config) -> str:
  """sha256 prefix over the full content of the files the run's documents come from.

  gptjax corpora and `text_files`: their raw files; instruction tuning: its JSONL files; a TFDS
  dataset prepared by name: its name and folder (TFDS versions its own builds).
  """
  d = config.data
  if config.objective == "instruction":
    return _files_fingerprint(b"instruction", (config.finetune.instruction_data,
                                               config.finetune.instruction_eval_data))
  if config.objective == "dpo":
    from gptjax.training import preference  # pylint: disable=g-import-not-at-top
    return _files_fingerprint(b"dpo", preference.data_files(config))
  if corpora.is_builtin(d.corpus):
    return corpora.raw_fingerprint(d.corpus, corpora.raw_data_dir(d.raw_dir), d.text_files)
  return hashlib.sha256(f"{d.corpus}@{d.tfds_data_dir}".encode()).hexdigest()[:16]


def _files_fingerprint(kind: bytes, paths) -> str:
  """sha256 prefix over the names, sizes and full content of the files that exist."""
  h = hashlib.sha256(kind)
  for path in paths:
    if path and os.path.exists(path):
      with open(path, "rb") as f:
        h.update(f"{os.path.basename(path)}:{os.path.getsize(path)}".encode() + f.read())
  return h.hexdigest()[:16]


def unigram_loss(config, tokenizer) -> float:
  """Entropy in nats of the train split's token frequencies: the loss of a unigram model."""
  tokens = tokenized(config, tokenizer, "train", "stream")["tokens"]
  counts = np.bincount(tokens)
  p = counts[counts > 0] / len(tokens)
  return float(-(p * np.log(p)).sum())
