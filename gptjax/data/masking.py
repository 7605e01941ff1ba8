"""Corruptions the objectives train on, pure NumPy with an explicit np.random.Generator."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _randomized_round(x: float, rng: np.random.Generator) -> int:
  """floor(x) or ceil(x), with the expectation exactly x (plain rounding biases short rows)."""
  return int(np.floor(x)) + int(rng.random() < x - np.floor(x))


def mlm_mask(ids: np.ndarray, rng: np.random.Generator, *, mask_id: int, vocab_size: int,
             special_ids: frozenset, probability: float = 0.15,
             word_starts: Optional[np.ndarray] = None):
  """BERT masking: choose `probability` of non-special tokens; 80% [MASK], 10% random, 10% kept.

  With `word_starts` (bool per token), whole words are chosen together.
  Returns (corrupted ids, weights = 1 on chosen positions, kind: 0 none, 1 mask, 2 random, 3 kept).
  """
  ids = np.asarray(ids)
  candidate = ~np.isin(ids, list(special_ids))
  if word_starts is not None:
    word_id = np.cumsum(word_starts.astype(np.int64)) * candidate
    words = np.unique(word_id[candidate])
    n_pick = _randomized_round(len(words) * probability, rng)
    picked_words = rng.choice(words, size=min(n_pick, len(words)), replace=False) if len(words) else []
    chosen = np.isin(word_id, picked_words) & candidate
  else:
    positions = np.flatnonzero(candidate)
    n_pick = max(1, _randomized_round(len(positions) * probability, rng)) if len(positions) else 0
    chosen = np.zeros(ids.shape, bool)
    chosen[rng.choice(positions, size=min(n_pick, len(positions)), replace=False)] = True
  u = rng.random(ids.shape)
  kind = np.where(chosen, np.where(u < 0.8, 1, np.where(u < 0.9, 2, 3)), 0)
  out = ids.copy()
  out[kind == 1] = mask_id
  random_ids = rng.integers(0, vocab_size, size=ids.shape)
  out[kind == 2] = random_ids[kind == 2]
  return out, chosen.astype(np.float32), kind


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Lengths of `num_segments` non-empty segments summing to `num_items` (T5's helper)."""
  first = np.arange(num_items - 1) < num_segments - 1
  rng.shuffle(first)
  first = np.concatenate([[0], first.astype(np.int64)])
  segment_id = np.cumsum(first)
  return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """T5's noise mask: about `noise_density` of positions in spans of mean `mean_span_length`."""
  num_noise = int(np.round(length * noise_density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(int(np.round(num_noise / mean_span_length)), 1)
  num_nonnoise = length - num_noise
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(num_nonnoise, num_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  starts = np.cumsum(interleaved)[:-1]
  indicator = np.zeros(length, np.int64)
  indicator[starts] = 1
  return np.cumsum(indicator) % 2 == 1


def span_corruption(ids: np.ndarray, rng: np.random.Generator, *, sentinel_ids: Sequence[int],
                    eos_id: int, noise_density: float = 0.15, mean_span_length: float = 3.0):
  """(inputs, targets): each noise span becomes one sentinel in the inputs; targets list the spans.

  Inputs: kept tokens with <extra_id_k> for span k, then EOS. Targets: <extra_id_k> followed by
  span k's tokens for every k, then EOS. Filling the sentinels back reconstructs `ids` exactly.
  """
  noise = random_spans_noise_mask(len(ids), noise_density, mean_span_length, rng)
  starts = noise & ~np.concatenate([[False], noise[:-1]])
  span_index = np.cumsum(starts) - 1
  if span_index.max(initial=-1) >= len(sentinel_ids):
    raise ValueError("more noise spans than sentinel tokens; raise tokenizer.num_sentinels")
  inputs, targets = [], []
  for i, tok in enumerate(ids):
    if noise[i]:
      if starts[i]:
        inputs.append(sentinel_ids[span_index[i]])
        targets.append(sentinel_ids[span_index[i]])
      targets.append(tok)
    else:
      inputs.append(tok)
  return np.asarray(inputs + [eos_id], np.int32), np.asarray(targets + [eos_id], np.int32)


def span_lengths_for(seq_len: int, target_len: int, noise_density: float,
                     mean_span_length: float) -> int:
  """The longest raw length whose corrupted inputs and targets fit seq_len and target_len."""
  best = 2
  for n in range(2, 4 * seq_len):
    num_noise = min(max(int(np.round(n * noise_density)), 1), n - 1)
    num_spans = max(int(np.round(num_noise / mean_span_length)), 1)
    if n - num_noise + num_spans + 1 <= seq_len and num_noise + num_spans + 1 <= target_len:
      best = n
  return best


def text_infilling(ids: np.ndarray, rng: np.random.Generator, *, mask_id: int,
                   mask_ratio: float = 0.3, poisson_lambda: float = 3.0) -> np.ndarray:
  """BART text infilling: about `mask_ratio` of the tokens, in spans of Poisson(λ) length, each span
  replaced by one <mask>; a 0-length span inserts a <mask> (the model must learn to fill nothing)."""
  ids = np.asarray(ids, np.int32)
  n = len(ids)
  num_to_mask = int(round(n * mask_ratio))
  if n == 0 or num_to_mask == 0:
    return ids.copy()
  lengths = []
  while sum(lengths) < num_to_mask:
    lengths.append(int(rng.poisson(poisson_lambda)))
  lengths[-1] -= sum(lengths) - num_to_mask
  # spans go between the kept tokens (slot k: after k kept tokens), so they never overlap
  slots = np.sort(rng.integers(0, n - num_to_mask + 1, size=len(lengths)))
  out, i, consumed = [], 0, 0
  for slot, length in zip(slots, rng.permutation(lengths)):
    out.extend(ids[i:i + slot - consumed])
    i += slot - consumed
    consumed = slot
    out.append(mask_id)
    i += int(length)
  out.extend(ids[i:])
  return np.asarray(out, np.int32)


def permute_sentences(ids: np.ndarray, rng: np.random.Generator,
                      boundary_ids: frozenset) -> np.ndarray:
  """BART sentence permutation: shuffles the runs of tokens ending at a boundary token."""
  sentences, current = [], []
  for tok in ids:
    current.append(tok)
    if tok in boundary_ids:
      sentences.append(current)
      current = []
  if current:
    sentences.append(current)
  order = rng.permutation(len(sentences))
  return np.asarray([t for k in order for t in sentences[k]], np.int32)


def truncate_pair(a: list, b: list, max_total: int) -> tuple[list, list]:
  """Trims the longer side until both fit, keeping at least one token each: A loses tokens at its
  start and B at its end, so the A|B junction stays exactly where the document has it."""
  a, b = list(a), list(b)
  while len(a) + len(b) > max_total:
    if len(a) >= len(b) and len(a) > 1:
      a.pop(0)
    elif len(b) > 1:
      b.pop()
    else:
      a.pop(0)
  return a, b
