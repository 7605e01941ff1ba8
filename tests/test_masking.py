"""Masking, pairing and corruption statistics measured over many examples of the real corpora."""

import numpy as np
import pytest

from conftest import load_config as _load
from gptjax.data import input_pipeline
from gptjax.data import masking
from gptjax.data import tokenization

WIKI = {"data.max_docs": 60}


@pytest.fixture(scope="module", name="bert")
def _bert(data_cache):
  del data_cache
  config = _load("bert", objective="mlm_nsp", **WIKI)
  tok = tokenization.load_or_train_tokenizer(config)
  return config, tok, input_pipeline.example_source(config, tok, "train")


def _rows(tok, n, length):
  """`n` rows of `length` real token ids from wikitext2 train."""
  config = _load("bert", objective="mlm", **WIKI)
  stream = input_pipeline.tokenized(config, tok, "train", "stream")["tokens"]
  stream = stream[stream != tok.eos_id]
  starts = np.random.default_rng(0).integers(0, len(stream) - length, n)
  return [stream[s:s + length] for s in starts]


def test_mlm_rates_within_tolerance(bert):
  _, tok, _ = bert
  chosen = kinds = 0
  counts = np.zeros(4)
  specials = tok.special_ids | {tok.pad_id}
  for i, row in enumerate(_rows(tok, 3000, 30)):
    ids = np.concatenate([[tok.cls_id], row, [tok.sep_id]]).astype(np.int32)
    out, weights, kind = masking.mlm_mask(ids, np.random.default_rng(i), mask_id=tok.mask_id,
                                          vocab_size=tok.vocab_size, special_ids=specials)
    assert weights[0] == 0 and weights[-1] == 0  # specials are never chosen
    assert np.all(out[kind == 1] == tok.mask_id) and np.all(out[kind == 3] == ids[kind == 3])
    candidates = ~np.isin(ids, list(specials))
    chosen += weights.sum()
    kinds += candidates.sum()
    counts += np.bincount(kind, minlength=4)
  assert abs(chosen / kinds - 0.15) < 0.005
  picked = counts[1:].sum()
  assert abs(counts[1] / picked - 0.8) < 0.015
  assert abs(counts[2] / picked - 0.1) < 0.01 and abs(counts[3] / picked - 0.1) < 0.01


def test_whole_word_masking_takes_whole_words(bert):
  _, tok, _ = bert
  for i, row in enumerate(_rows(tok, 300, 40)):
    starts = np.asarray([not tok.id_to_token(t).startswith("##") for t in row])
    _, weights, _ = masking.mlm_mask(row, np.random.default_rng(i), mask_id=tok.mask_id,
                                     vocab_size=tok.vocab_size, special_ids=tok.special_ids,
                                     word_starts=starts)
    word = np.cumsum(starts)
    for w in np.unique(word[weights == 1]):
      if w > 0:
        assert np.all(weights[word == w] == 1)


def test_every_is_next_pair_is_adjacent_in_its_document(bert):
  config, tok, examples = bert
  sentence_doc = examples.data["doc"]
  labels = []
  for i in range(min(len(examples), 1500)):
    p = examples.pair(i, np.random.default_rng(i), config.data.seq_len - 3)
    assert p["a"] and p["b"] and len(p["a"]) + len(p["b"]) <= config.data.seq_len - 3
    a_first, a_last = p["a_range"]
    b_first, b_last = p["b_range"]
    assert len({sentence_doc[j] for j in range(a_first, a_last + 1)}) == 1
    # A keeps its end, B its start: the junction is the document's
    assert p["a"] == examples._sentence(a_last)[-len(p["a"]):] or \
        examples._sentence(a_last) == p["a"][-len(examples._sentence(a_last)):]
    assert p["b"][:1] == examples._sentence(b_first)[:1]
    if p["label"] == 1:
      assert p["doc_a"] == p["doc_b"] and b_first == a_last + 1
    else:
      assert p["doc_b"] != p["doc_a"]
    labels.append(p["label"])
  assert abs(np.mean(labels) - 0.5) < 0.05


def test_one_sentence_documents_are_skipped_and_counted(bert):
  _, _, examples = bert
  docs, per_doc = np.unique(examples.data["doc"], return_counts=True)
  assert examples.skipped_docs == int(np.sum(per_doc == 1))
  assert all(examples.data["doc"][s] == examples.data["doc"][s + 1] for s in examples.starts[:500])


def test_sop_swaps_half_the_pairs(data_cache):
  del data_cache
  config = _load("bert", objective="sop", **WIKI)
  tok = tokenization.load_or_train_tokenizer(config)
  examples = input_pipeline.example_source(config, tok, "train")
  pairs = [examples.pair(i, np.random.default_rng(i), 125) for i in range(600)]
  labels = np.asarray([p["label"] for p in pairs])
  assert abs(np.mean(labels) - 0.5) < 0.07
  # the order must not be readable from the lengths: "first segment longer" as often either way
  first_longer = np.asarray([len(p["a"]) > len(p["b"]) for p in pairs])
  assert abs(first_longer[labels == 1].mean() - first_longer[labels == 0].mean()) < 0.15


def test_span_corruption_reconstructs_the_original(data_cache):
  del data_cache
  config = _load("t5", **WIKI)
  tok = tokenization.load_or_train_tokenizer(config)
  sentinels = set(tok.sentinel_ids)
  noise = spans = total = 0
  for i, row in enumerate(_rows(tok, 500, 114)):
    inputs, targets = masking.span_corruption(row, np.random.default_rng(i),
                                              sentinel_ids=tok.sentinel_ids, eos_id=tok.eos_id)
    assert inputs[-1] == tok.eos_id and targets[-1] == tok.eos_id
    fill, current = {}, None
    for t in targets[:-1]:
      if t in sentinels:
        current = t
        fill[current] = []
      else:
        fill[current].append(t)
    rebuilt = [x for t in inputs[:-1] for x in (fill[t] if t in sentinels else [t])]
    assert rebuilt == list(row)
    noise += len(targets) - 1 - len(fill)
    spans += len(fill)
    total += len(row)
  assert abs(noise / total - 0.15) < 0.01
  assert abs(noise / spans - 3.0) < 0.3


def test_random_spans_noise_mask_matches_t5():
  rng = np.random.default_rng(0)
  for length in (20, 114, 568):
    mask = masking.random_spans_noise_mask(length, 0.15, 3.0, rng)
    num_noise = int(round(length * 0.15))
    assert mask.sum() == num_noise and not mask[0]  # T5 always starts with a non-noise span
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert starts.sum() == max(int(round(num_noise / 3.0)), 1)


def test_bart_text_infilling_sanity(data_cache):
  del data_cache
  config = _load("bart", **WIKI)
  tok = tokenization.load_or_train_tokenizer(config)
  removed = total = masks = 0
  for i, row in enumerate(_rows(tok, 800, 60)):
    out = masking.text_infilling(row, np.random.default_rng(i), mask_id=tok.mask_id)
    kept = [t for t in out if t != tok.mask_id]
    it = iter(row)
    assert all(any(t == r for r in it) for t in kept)  # an in-order subsequence of the original
    removed += len(row) - len(kept)
    masks += int(np.sum(out == tok.mask_id))
    total += len(row)
  assert abs(removed / total - 0.3) < 0.03
  assert 0.25 < masks / (removed / 3.0) < 1.3  # about one mask per Poisson(3) span
  perm = masking.permute_sentences(row, np.random.default_rng(1), frozenset(tok.encode(".")))
  assert sorted(perm) == sorted(row)
