"""In-context learning: prompts, demonstrations by seed, label-word scores, accuracy report."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from gptjax.inference import icl
from gptjax.model import models
from gptjax.data import tokenization
from gptjax.config_schema import ConfigError
from gptjax.model.config import ModelConfig


@functools.lru_cache(maxsize=None)
def sst2():
  return icl.read_sst2("train")[:2000], icl.read_sst2("dev")


@functools.lru_cache(maxsize=None)
def tokenizer():
  train, _ = sst2()
  return tokenization.train_tokenizer("bpe", [t for t, _ in train] + ["Review: Sentiment:"], 512)


@functools.lru_cache(maxsize=None)
def tiny(family):
  cfg = ModelConfig.from_config(load_config(family, "tiny").model)
  cfg = dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0, init_std=0.1)
  return models.make_model(cfg), nn.meta.unbox(models.init_params(cfg, jax.random.key(0), 2, 8))


def test_sst2_reader_and_prompt_format():
  train, dev = sst2()
  assert len(dev) == 872 and {y for _, y in dev} == {0, 1}
  prompt = icl.build_prompt("a gem .", [("dull .", 0), ("fun .", 1)], icl.SST2_LABELS)
  assert prompt == ("Review: dull .\nSentiment: negative\n\nReview: fun .\nSentiment: positive\n\n"
                    "Review: a gem .\nSentiment:")
  a = icl.draw_demos(train, 4, seed=0, index=3)
  assert a == icl.draw_demos(train, 4, seed=0, index=3) and len(set(a)) == 4
  assert a != icl.draw_demos(train, 4, seed=1, index=3)
  assert icl.draw_demos(train, 0, seed=0, index=3) == []


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_option_scores_are_the_label_log_likelihood(family):
  model, params = tiny(family)
  prompts = [[5, 6, 7, 8], [9, 10], list(range(3, 3 + 70))]  # the last exceeds max_len 64
  options = [[20, 21], [30]]
  got = icl.score_options(model, params, prompts, options, pad_id=0, start_id=0, batch_size=4)
  # reference: one right-padded full forward of every (prompt, option) pair
  pairs = [(p, o) for p in prompts for o in options]
  if family == "gpt":
    ctxs = [p[-(64 - len(o)):] for p, o in pairs]
    ids = np.zeros((len(pairs), 64), np.int32)
    for r, (c, (_, o)) in enumerate(zip(ctxs, pairs)):
      ids[r, :len(c) + len(o)] = c + o
    logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray(ids))["logits"], -1)
    want = [sum(float(logp[r, len(c) - 1 + k, t]) for k, t in enumerate(o))
            for r, (c, (_, o)) in enumerate(zip(ctxs, pairs))]
  else:
    enc = np.zeros((len(pairs), 64), np.int32)
    dec = np.zeros((len(pairs), 2), np.int32)
    for r, (p, o) in enumerate(pairs):
      enc[r, :len(p[-64:])] = p[-64:]
      dec[r, :len(o)] = [0] + o[:-1]
    logits = model.apply({"params": params}, jnp.asarray(enc), jnp.asarray(enc > 0, jnp.int32),
                         jnp.asarray(dec))["logits"]
    logp = jax.nn.log_softmax(logits, -1)
    want = [sum(float(logp[r, k, t]) for k, t in enumerate(o)) for r, (_, o) in enumerate(pairs)]
  np.testing.assert_allclose(got.reshape(-1), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt", "bart"])
def test_evaluate_icl_reports_accuracy_per_shot_and_majority(family):
  model, params = tiny(family)
  train, dev = sst2()
  examples = dev[:24]
  result = icl.evaluate_icl(model, params, tokenizer(), examples, train, [0, 1, 2], seed=0,
                            batch_size=8)
  gold = np.asarray([y for _, y in examples])
  assert result["examples"] == 24
  assert result["majority"] == pytest.approx(max(gold.mean(), 1 - gold.mean()))
  for k in (0, 1, 2):
    assert 0.0 <= result[f"acc@{k}"] <= 1.0
    assert result[f"acc@{k}"] * 24 == pytest.approx(round(result[f"acc@{k}"] * 24))


@pytest.mark.parametrize("text", ["", "1,x", "-1", "0,-2"])
def test_bad_shots_are_one_line_errors(text):
  with pytest.raises(ConfigError) as e:
    icl.parse_shots(text)
  assert "--shots" in str(e.value) and "\n" not in str(e.value)
