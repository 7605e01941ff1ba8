"""grain pipelines: the batch contract, determinism, resume, process sharding and eval padding."""

import json

import numpy as np
import pytest

from conftest import load_config as _load
from gptjax.data import batch_spec
from gptjax.data import input_pipeline
from gptjax.data import tokenization
from gptjax.config_schema import ConfigError

SMALL = {"data.max_docs": 60}
CASES = [("gpt", "next_token", {}), ("gpt", "prefix_lm", {}),
         ("gpt", "classification", {"data.corpus": "sst2", "model.num_classes": 2}),
         ("bert", "mlm", {}), ("bert", "nsp", {}), ("bert", "sop", {}), ("bert", "mlm_nsp", {}),
         ("bert", "classification", {"data.corpus": "sst2", "model.num_classes": 2}),
         ("t5", "span_corruption", {}), ("bart", "denoise", {"data.permute_sentences": True})]


def _setup(family, objective, **overrides):
  config = _load(family, objective=objective, **{**SMALL, **overrides})
  return config, tokenization.load_or_train_tokenizer(config)


@pytest.mark.parametrize("family,objective,overrides", CASES)
def test_batches_follow_the_contract(data_cache, family, objective, overrides):
  del data_cache
  config, tok = _setup(family, objective, **overrides)
  batch = next(input_pipeline.make_train_iterator(config, tok))
  assert set(batch) == set(batch_spec.TOKEN_KEYS[objective])
  b, length = config.data.batch_size, config.data.seq_len
  for key, value in batch.items():
    assert value.shape[0] == b
    per_row = key in ("pair_labels", "pair_weights", "labels", "label_weights")
    assert value.ndim == (1 if per_row else 2), key
    assert value.dtype == (np.float32 if "weights" in key else np.int32), key
    if key.startswith("dec_"):
      assert value.shape[1] == (config.data.target_len or length)
    elif not per_row:
      assert value.shape[1] == length
    if not key.endswith("weights") and not per_row and value.dtype == np.int32 and "mask" not in key \
        and key not in ("token_type_ids", "segment_ids", "positions"):
      assert value.min() >= 0 and value.max() < tok.vocab_size, key
  if objective == "classification":
    assert set(np.unique(batch["labels"])) <= {0, 1}


def test_next_token_packing(data_cache):
  del data_cache
  config, tok = _setup("gpt", "next_token")
  it = input_pipeline.make_train_iterator(config, tok)
  for _ in range(3):
    b = next(it)
    assert np.all(b["inputs"][:, 1:] == b["targets"][:, :-1])
    assert np.all(b["segment_ids"][:, 0] == 1) and np.all(np.diff(b["segment_ids"], axis=1) >= 0)
    new_doc = b["inputs"] == tok.eos_id
    assert np.all(b["positions"][new_doc] == 0) and np.all(b["positions"][:, 0] == 0)
    assert np.all(b["weights"] == 1.0)


def test_same_seed_same_stream_and_new_shuffle_each_epoch(data_cache):
  del data_cache
  config, tok = _setup("bert", "mlm_nsp")
  one, two = (input_pipeline.make_train_iterator(config, tok) for _ in range(2))
  for _ in range(3):
    a, b = next(one), next(two)
    assert all(np.array_equal(a[k], b[k]) for k in a)
  other = input_pipeline.make_train_iterator(_load("bert", objective="mlm_nsp", **SMALL,
                                                   **{"data.seed": 1}), tok)
  assert not np.array_equal(next(other)["inputs"], a["inputs"])


def test_restored_iterator_continues_exactly(data_cache):
  del data_cache
  config, tok = _setup("t5", "span_corruption")
  reference = input_pipeline.make_train_iterator(config, tok)
  expected = [next(reference) for _ in range(5)]
  it = input_pipeline.make_train_iterator(config, tok)
  next(it), next(it)
  saved = json.dumps(it.get_state())
  resumed = input_pipeline.make_train_iterator(config, tok)
  resumed.set_state(json.loads(saved))
  for want in expected[2:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_two_processes_are_disjoint_and_cover_the_data(data_cache):
  del data_cache
  config, tok = _setup("gpt", "next_token", **{"data.max_docs": 40})
  examples = input_pipeline.example_source(config, tok, "train")
  n, b = len(examples), config.data.batch_size
  steps = n // b
  single = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
  shards = [input_pipeline.make_train_iterator(config, tok, process_index=p, process_count=2)
            for p in range(2)]
  seen = [[], []]
  for _ in range(steps):
    whole = next(single)["inputs"]
    halves = [next(s)["inputs"] for s in shards]
    assert all(h.shape[0] == b // 2 for h in halves)
    assert np.array_equal(np.concatenate(halves), whole)
    for p in range(2):
      seen[p] += [tuple(r) for r in halves[p]]
  assert not set(seen[0]) & set(seen[1])
  every = {tuple(examples.example(i, None)["inputs"]) for i in range(n)}
  assert set(seen[0]) | set(seen[1]) == every if steps * b == n else \
      (set(seen[0]) | set(seen[1])) <= every and len(set(seen[0]) | set(seen[1])) == steps * b


def test_eval_batches_pad_the_last_batch_with_zero_weights(data_cache):
  del data_cache
  config, tok = _setup("bert", "mlm_nsp", **{"data.max_docs": 12})
  n = len(input_pipeline.example_source(config, tok, "validation"))
  batches = input_pipeline.make_eval_batches(config, tok, "validation")
  b = config.data.eval_batch_size
  assert len(batches) == -(-n // b)
  assert sum(x["pair_weights"].sum() for x in batches) == n
  last = batches[-1]
  real = n - (len(batches) - 1) * b
  assert np.all(last["pair_weights"][real:] == 0) and np.all(last["weights"][real:] == 0)
  assert np.all(last["pair_weights"][:real] == 1)
  halves = [input_pipeline.make_eval_batches(config, tok, "validation", max_batches=2,
                                             process_index=p, process_count=2) for p in range(2)]
  assert np.array_equal(np.concatenate([halves[0][1]["inputs"], halves[1][1]["inputs"]]),
                        batches[1]["inputs"])


def test_corpus_shorter_than_one_sequence_fails(data_cache, tmp_path):
  del data_cache
  (tmp_path / "tiny.txt").write_text("To be, or not to be.\n\nThat is the question.\n")
  config = _load("gpt", **{"data.corpus": "text_files", "data.text_files": str(tmp_path / "*.txt"),
                          "data.tokenizer.path": ""})
  tok = tokenization.load_or_train_tokenizer(_load("gpt", **SMALL))
  with pytest.raises(ConfigError, match="shorter than one sequence|empty"):
    input_pipeline.make_train_iterator(config, tok)
