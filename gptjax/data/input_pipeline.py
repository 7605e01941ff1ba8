"""grain input pipelines, one per objective, producing batches exactly as gptjax/data/batch_spec.py says.

Determinism and resume: example k of the stream is a pure function of (seed, k): epoch
e = k // N reads a permutation of the N examples seeded by (seed, e), and the corruption of
example k (masking, spans, pairing) draws from np.random.default_rng((seed, k)). The grain
iterator's state is therefore just a position, saved with every checkpoint.

Multi-host: process p of P reads rows [p*B/P, (p+1)*B/P) of every global batch, so the union of
the processes' batches is exactly the single-process batch.
"""

from __future__ import annotations

from typing import Optional

import grain
import jax
import numpy as np

from gptjax.config_schema import ConfigError
from gptjax.data import masking
# tokenized, data_fingerprint and unigram_loss are read through this module by the train loop
from gptjax.data.token_cache import data_fingerprint, tokenized, unigram_loss  # noqa: F401
from gptjax.model import family as model_family
from gptjax.training import preference
from gptjax.transfer import sft_data


def _instruction_records(config, split: str) -> list[dict]:
  """The split's {instruction, input, output} records (every 20th held out when no eval file)."""
  f = config.finetune
  if split != "train" and f.instruction_eval_data:
    return sft_data.load_sft_jsonl(f.instruction_eval_data)
  records = sft_data.load_sft_jsonl(f.instruction_data)
  if f.instruction_eval_data:
    return records
  keep = (lambda i: i % 20 != 19) if split == "train" else (lambda i: i % 20 == 19)
  chosen = [r for i, r in enumerate(records) if keep(i)]
  if not chosen:
    raise ConfigError(f"config.finetune.instruction_data={f.instruction_data!r} has too few records "
                      f"for a {split} split (every 20th is held out); give instruction_eval_data")
  chosen = chosen[:config.data.max_docs or None]
  return chosen[:config.data.train_docs or None] if split == "train" else chosen


# ------------------------------------------------------------------ examples per objective
class Examples:
  """Random access to the examples of one objective; `example(i, rng)` builds example i."""

  def __init__(self, config, tokenizer, split: str):
    self.config, self.tok, self.split = config, tokenizer, split
    d = config.data
    self.L = d.seq_len
    self.T = d.target_len or d.seq_len
    obj = config.objective
    self.kind = obj
    if obj in ("nsp", "sop", "mlm_nsp"):
      self.data = tokenized(config, tokenizer, split, "sentences")
      sent_doc = self.data["doc"]
      # pairs (sentence i, i+1) inside one document
      self.starts = np.flatnonzero(sent_doc[:-1] == sent_doc[1:]) if len(sent_doc) > 1 else \
          np.zeros((0,), np.int64)
      docs_with_pairs = len(np.unique(sent_doc[self.starts])) if len(self.starts) else 0
      self.skipped_docs = len(np.unique(sent_doc)) - docs_with_pairs
      self.n = len(self.starts)
    elif obj == "classification":
      self.data = tokenized(config, tokenizer, split, "labelled")
      self.n = len(self.data["label"])
    elif obj == "instruction":
      self.records = _instruction_records(config, split)
      self.n = len(self.records)
    elif obj == "dpo":
      self.pairs = preference.PairSource(config, tokenizer, split)
      self.n = len(self.pairs)
    else:
      self.data = tokenized(config, tokenizer, split, "stream")
      self.raw_len = {"next_token": self.L + 1, "prefix_lm": self.L + 1, "mlm": self.L - 2,
                      "denoise": self.L - 2}.get(obj)
      if obj == "span_corruption":
        self.raw_len = masking.span_lengths_for(self.L, self.T, d.noise_density, d.mean_span_length)
      stride = self.raw_len - 1 if obj in ("next_token", "prefix_lm") else self.raw_len
      self.stride = stride
      self.n = max(0, (len(self.data["tokens"]) - self.raw_len) // stride + 1)
    if self.n == 0:
      raise ConfigError(f"config.data.corpus={d.corpus!r} split {split!r} is empty or shorter than "
                        f"one sequence of config.data.seq_len={self.L}")

  def __len__(self) -> int:
    return self.n

  def _chunk(self, i: int) -> np.ndarray:
    s = i * self.stride
    return self.data["tokens"][s:s + self.raw_len]

  def _sentence(self, j: int) -> list:
    o = self.data["offsets"]
    return list(self.data["tokens"][o[j]:o[j + 1]])

  def _labelled(self, i: int, side: str) -> list:
    o = self.data[f"{side}_off"]
    return list(self.data[side][o[i]:o[i + 1]])

  def _pad(self, x, n, value=0):
    x = np.asarray(x, np.int32)[:n]
    return np.pad(x, (0, n - len(x)), constant_values=value)

  def pair(self, i: int, rng: np.random.Generator, max_tokens: int) -> dict:
    """Segments A and B for NSP/SOP, with the sentence ranges they came from."""
    sent_doc, starts = self.data["doc"], self.starts
    first = int(starts[i])
    doc = sent_doc[first]
    doc_end = first
    while doc_end + 1 < len(sent_doc) and sent_doc[doc_end + 1] == doc:
      doc_end += 1
    # BERT's recipe: a run of consecutive sentences up to the budget, split at a uniformly random
    # sentence boundary. A and B are then alike in length, so SOP cannot be read off lengths.
    run, total = [first], len(self._sentence(first))
    while run[-1] + 1 <= doc_end and (len(run) < 2 or total < max_tokens):
      run.append(run[-1] + 1)
      total += len(self._sentence(run[-1]))
    split = int(rng.integers(1, len(run)))
    a_end = run[split - 1]
    a = [t for j in run[:split] for t in self._sentence(j)]
    if self.kind == "sop" or self.config.data.sop or rng.random() < 0.5:
      b_start, label = a_end + 1, 1
      b_end = run[-1]
      b = [t for j in run[split:] for t in self._sentence(j)]
    else:
      other = int(rng.integers(0, len(sent_doc)))
      while sent_doc[other] == doc and len(np.unique(sent_doc)) > 1:
        other = int(rng.integers(0, len(sent_doc)))
      b_start, label = other, 0
      b, b_end = self._sentence(b_start), b_start
      while len(a) + len(b) < max_tokens and b_end + 1 < len(sent_doc) and \
          sent_doc[b_end + 1] == sent_doc[b_start]:
        b_end += 1
        b += self._sentence(b_end)
    if self.kind == "sop" or self.config.data.sop:
      if rng.random() < 0.5:
        a, b, label = b, a, 0
    a, b = masking.truncate_pair(a, b, max_tokens)
    return {"a": a, "b": b, "label": label, "doc_a": int(doc), "a_range": (first, a_end),
            "doc_b": int(sent_doc[b_start]), "b_range": (b_start, b_end)}

  def example(self, i: int, rng: np.random.Generator) -> dict:
    """Example `i` in the objective's batch layout (one row, no batch axis)."""
    tok, L, T, d = self.tok, self.L, self.T, self.config.data
    obj = self.kind
    if obj == "next_token":
      chunk = self._chunk(i)
      inputs, targets = chunk[:-1], chunk[1:]
      seg = np.cumsum(inputs == tok.eos_id).astype(np.int32)
      seg = seg - seg[0] + 1
      starts = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1])
      positions = np.arange(L) - np.repeat(starts, np.diff(np.concatenate([starts, [L]])))
      return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
              "weights": np.ones(L, np.float32), "segment_ids": seg.astype(np.int32),
              "positions": positions.astype(np.int32)}
    if obj == "prefix_lm":
      chunk = self._chunk(i)
      p = int(rng.integers(1, L))
      pos = np.arange(L)
      return {"inputs": chunk[:-1].astype(np.int32), "targets": chunk[1:].astype(np.int32),
              "weights": (pos >= p - 1).astype(np.float32),
              "prefix_mask": (pos < p).astype(np.int32), "input_mask": np.ones(L, np.int32)}
    if obj == "mlm":
      ids = np.asarray([tok.cls_id] + list(self._chunk(i)) + [tok.sep_id], np.int32)
      return self._mlm(ids, np.zeros(L, np.int32), rng)
    if obj in ("nsp", "sop", "mlm_nsp"):
      p = self.pair(i, rng, L - 3)
      ids = [tok.cls_id] + p["a"] + [tok.sep_id] + p["b"] + [tok.sep_id]
      types = [0] * (len(p["a"]) + 2) + [1] * (len(p["b"]) + 1)
      n = len(ids)
      ex = {"inputs": self._pad(ids, L, tok.pad_id), "input_mask": self._pad([1] * n, L),
            "token_type_ids": self._pad(types, L), "pair_labels": np.int32(p["label"]),
            "pair_weights": np.float32(1.0)}
      if obj == "mlm_nsp":
        m = self._mlm(ex["inputs"], ex["token_type_ids"], rng)
        ex.update({k: m[k] for k in ("inputs", "targets", "weights")})
      return ex
    if obj == "span_corruption":
      inputs, targets = masking.span_corruption(
          self._chunk(i), rng, sentinel_ids=tok.sentinel_ids, eos_id=tok.eos_id,
          noise_density=d.noise_density, mean_span_length=d.mean_span_length)
      return self._seq2seq(inputs, targets, start=tok.pad_id)
    if obj == "denoise":
      chunk = self._chunk(i)
      source = chunk
      if d.permute_sentences:
        source = masking.permute_sentences(source, rng, frozenset(tok.encode(". ")[:1]))
      source = masking.text_infilling(source, rng, mask_id=tok.mask_id,
                                      poisson_lambda=d.poisson_lambda)
      enc = [tok.bos_id] + list(source[:L - 2]) + [tok.eos_id]
      target = [tok.bos_id] + list(chunk) + [tok.eos_id]
      return self._seq2seq(np.asarray(enc), np.asarray(target), start=tok.eos_id)
    if obj == "dpo":
      return self.pairs.example(i)
    if obj == "instruction":
      ids, mask = sft_data.format_sft_example(self.records[i], self.config.finetune.prompt_template,
                                              tok.tok, tok.eos_id)
      if len(ids) > L + 1 and mask.sum() <= L:  # too long: drop the oldest prompt tokens
        ids, mask = ids[-(L + 1):], mask[-(L + 1):]
      return {k: v[0] for k, v in sft_data.sft_batch([(ids, mask)], L, tok.pad_id).items()}
    # classification
    a, b = self._labelled(i, "a"), self._labelled(i, "b")
    ids, types = model_family.of(self.config.model).pair_ids(tok, a, b, L)
    return {"inputs": self._pad(ids, L, tok.pad_id), "input_mask": self._pad([1] * len(ids), L),
            "token_type_ids": self._pad(types, L), "labels": np.int32(self.data["label"][i]),
            "label_weights": np.float32(1.0)}

  def _mlm(self, ids, types, rng) -> dict:
    tok, d, L = self.tok, self.config.data, self.L
    ids = self._pad(ids, L, tok.pad_id)
    starts = None
    if d.whole_word_mask:  # WordPiece continues a word with ##, byte-level BPE starts one with Ġ
      pieces = [tok.id_to_token(t) or "" for t in ids]
      bpe = self.config.data.tokenizer.kind == "bpe"
      starts = np.asarray([p.startswith("\u0120") if bpe else not p.startswith("##")
                           for p in pieces])
    corrupted, weights, _ = masking.mlm_mask(
        ids, rng, mask_id=tok.mask_id, vocab_size=tok.vocab_size,
        special_ids=tok.special_ids | {tok.pad_id}, probability=d.mlm_probability,
        word_starts=starts)
    return {"inputs": corrupted, "targets": ids, "weights": weights,
            "input_mask": (ids != tok.pad_id).astype(np.int32), "token_type_ids": types}

  def _seq2seq(self, inputs, targets, start: int) -> dict:
    L, T, pad = self.L, self.T, self.tok.pad_id
    dec_targets = self._pad(targets, T, pad)
    dec_inputs = self._pad(np.concatenate([[start], targets[:-1]]), T, pad)
    n = min(len(targets), T)
    return {"enc_inputs": self._pad(inputs, L, pad),
            "enc_mask": self._pad(np.ones(min(len(inputs), L)), L).astype(np.int32),
            "dec_inputs": dec_inputs, "dec_targets": dec_targets,
            "dec_weights": self._pad(np.ones(n), T).astype(np.float32)}


# ------------------------------------------------------------------ streams
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng((seed, epoch, 7)).permutation(n)


class _StreamFn:
  """Local example k -> (global example index, the example), with epoch-wise shuffling."""

  def __init__(self, examples: Examples, seed: int, local_batch: int, global_batch: int,
               process_index: int, shuffle: bool = True):
    self.examples, self.seed, self.shuffle = examples, seed, shuffle
    self.local_batch, self.global_batch, self.p = local_batch, global_batch, process_index
    self._perm = (None, None)

  def global_index(self, k: int) -> int:
    return (k // self.local_batch) * self.global_batch + self.p * self.local_batch + \
        k % self.local_batch

  def __call__(self, k: int) -> dict:
    g = self.global_index(int(k))
    n = len(self.examples)
    epoch, j = divmod(g, n)
    if self.shuffle:
      if self._perm[0] != epoch:
        self._perm = (epoch, _epoch_permutation(self.seed, epoch, n))
      j = int(self._perm[1][j])
    rng = np.random.default_rng((self.seed, g))
    return self.examples.example(j, rng)


def make_train_iterator(config, tokenizer, *, process_index: Optional[int] = None,
                        process_count: Optional[int] = None):
  """An endless, resumable (get_state/set_state) grain iterator of this process's train batches."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  global_batch = config.data.batch_size
  if global_batch % pc:
    raise ConfigError(f"config.data.batch_size={global_batch} does not divide over {pc} processes")
  local = global_batch // pc
  examples = Examples(config, tokenizer, "train")
  fn = _StreamFn(examples, config.data.seed, local, global_batch, pi)
  ds = grain.MapDataset.range(1 << 40).map(fn).batch(local, drop_remainder=True)
  # two threads and a short buffer: enough ahead of the step on 2 cores without starving it
  read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
  return iter(ds.to_iter_dataset(read))


def _eval_split(config) -> str:
  splits = {"sst2": "validation", "imdb": "test"}
  return splits.get(config.data.corpus, "validation")


def make_eval_batches(config, tokenizer, split: str = "validation", max_batches: Optional[int] = None,
                      *, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> list[dict]:
  """This process's rows of the eval batches, in a fixed order; the last global batch is padded with
  zero-weight rows (weights, pair_weights, label_weights, dec_weights all 0), never dropped."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if split == "validation":
    split = _eval_split(config)
  examples = Examples(config, tokenizer, split)
  b = config.data.eval_batch_size
  n = len(examples) if not max_batches else min(len(examples), max_batches * b)
  rows = [examples.example(i, np.random.default_rng((config.data.seed, 10 ** 9 + i)))
          for i in range(n)]
  while len(rows) % b:
    pad = {k: np.zeros_like(v) for k, v in rows[0].items()}
    rows.append(pad)
  if b % pc:
    raise ConfigError(f"config.data.eval_batch_size={b} does not divide over {pc} processes")
  lo, hi = pi * b // pc, (pi + 1) * b // pc
  return [{k: np.stack([r[k] for r in rows[s + lo:s + hi]]) for k in rows[0]}
          for s in range(0, len(rows), b)]


def example_source(config, tokenizer, split: str = "train") -> Examples:
  """The objective's examples of a split, for inspection and tests."""
  return Examples(config, tokenizer, split)
