"""The bag-of-words reward of sentiment_dpo, on real IMDb reviews, and the DPO verdict logic."""

import json
import os

import numpy as np
import pytest

from experiments import sentiment_dpo
from experiments import sentiment_reward

RAW = os.environ.get("GPTJAX_RAW_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                    "data"))


def _imdb(name, every):
  with open(os.path.join(RAW, "imdb", name), encoding="utf-8") as f:
    return [json.loads(line) for line in f][::every]


def test_bow_reward_learns_imdb_sentiment_and_round_trips(tmp_path):
  train, test = _imdb("train_subset.jsonl", 3), _imdb("test_subset.jsonl", 4)  # both classes
  model = sentiment_reward.fit(train, test, seed=0)
  assert model.metrics["test_accuracy"] > 0.75  # 500 held-out reviews; chance is 0.5
  assert model.metrics["l2"] in sentiment_reward.L2_GRID
  great, awful = model(["a great film, i loved it", "an awful film, boring and bad"])
  assert great > 0.6 > 0.4 > awful
  model.save(str(tmp_path))
  again = sentiment_reward.BagOfWordsSentiment.load(str(tmp_path))
  texts = [r["text"] for r in test[:50]]
  np.testing.assert_array_equal(again(texts), model(texts))
  assert not any(f.endswith(".pkl") for f in os.listdir(tmp_path))


def test_features_are_lowercased_unigrams_and_bigrams_without_html():
  assert sentiment_reward.features("Great<br />film!") == {"great", "film", "!", "great film",
                                                           "film !"}


@pytest.mark.parametrize("dpo_reward,ci,verdict", [(0.70, 0.02, "reproduced"),
                                                   (0.45, 0.02, "opposite"),
                                                   (0.52, 0.05, "inconclusive")])
def test_dpo_direction_verdict_is_computed_from_the_interval(dpo_reward, ci, verdict):
  rows = [{"method": "SFT temperature", "setting": "T=1.0", "reward": 0.5, "reward_ci95": ci,
           "kl": 0.0},
          {"method": "DPO beta=0.1", "setting": "step 300", "reward": dpo_reward,
           "reward_ci95": ci, "kl": 3.0},
          {"method": "DPO beta=0.1", "setting": "step 100", "reward": 0.1, "reward_ci95": ci,
           "kl": 1.0}]
  table = sentiment_dpo.direction_verdicts(rows, "step 300")
  assert len(table) == 3 and table[-1].endswith(f"| {verdict} |")
