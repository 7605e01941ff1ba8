"""DPO: the loss against NumPy, its fixed points, the data checks, and a run through run.py's path."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import config_schema

from gptjax.model import models

from gptjax.training import objectives

from gptjax.training import preference
from gptjax.config_schema import ConfigError
from gptjax.model.config import ModelConfig

IMDB = os.path.join(os.environ["GPTJAX_RAW_DIR"], "imdb", "train_subset.jsonl")


def imdb_pairs(path, n=60, prompt_words=6, response_words=10, skip_every=0):
  """Preference records from real IMDb reviews: a review's opening as the prompt, its own (positive)
  continuation chosen, a negative review's continuation rejected."""
  with open(IMDB, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  pos = [r["text"].split() for r in rows if r["label"] == 1][:n]
  neg = [r["text"].split() for r in rows if r["label"] == 0][:n]
  with open(path, "w", encoding="utf-8") as f:
    for i, (p, q) in enumerate(zip(pos, neg)):
      words = prompt_words * 40 if skip_every and i % skip_every == 0 else prompt_words
      f.write(json.dumps({
          "prompt": " ".join(p[:words]),
          "chosen": " " + " ".join(p[words:words + response_words]),
          "rejected": " " + " ".join(q[words:words + response_words])}) + "\n")
  return str(path)


def numpy_dpo(pc, pr, rc, rr, beta, eps, loss="sigmoid"):
  h = (pc - rc) - (pr - rr)
  if loss == "ipo":
    return (h - 1 / (2 * beta)) ** 2
  log_sig = lambda x: -np.log1p(np.exp(-x))
  return -(1 - eps) * log_sig(beta * h) - eps * log_sig(-beta * h)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_dpo_loss_equals_numpy_reference(beta, eps):
  pc = np.array([-12.0, -30.5, -7.25, -40.0])
  pr = np.array([-15.0, -28.0, -7.25, -10.0])
  rc = np.array([-13.0, -29.0, -8.0, -41.5])
  rr = np.array([-14.5, -29.5, -6.0, -11.0])
  got, r_c, r_r = objectives.dpo_losses(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta,
                                        label_smoothing=eps)
  np.testing.assert_allclose(np.asarray(got), numpy_dpo(pc, pr, rc, rr, beta, eps), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(r_c), beta * (pc - rc), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(r_r), beta * (pr - rr), rtol=1e-6)
  ipo, _, _ = objectives.dpo_losses(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta, loss="ipo")
  np.testing.assert_allclose(np.asarray(ipo), numpy_dpo(pc, pr, rc, rr, beta, eps, "ipo"),
                             rtol=1e-6)


def test_dpo_terms_on_a_hand_made_batch():
  """The objective's metrics: reward accuracy, rewards and margin as the paper defines them."""
  pc, pr = np.array([-3.0, -5.0]), np.array([-4.0, -2.0])
  rc, rr = np.array([-3.5, -5.0]), np.array([-3.5, -3.0])
  beta = 0.25
  r_c, r_r = beta * (pc - rc), beta * (pr - rr)
  expect = numpy_dpo(pc, pr, rc, rr, beta, 0.0).mean()
  got, r_c2, r_r2 = objectives.dpo_losses(*map(jnp.asarray, (pc, pr, rc, rr)), beta=beta)
  assert float(got.mean()) == pytest.approx(expect, rel=1e-6)
  assert np.mean(np.asarray(r_c2) > np.asarray(r_r2)) == np.mean(r_c > r_r) == 0.5
  np.testing.assert_allclose(np.asarray(r_c2 - r_r2), r_c - r_r, rtol=1e-6)


def _tiny(family):
  over = dict(family=family, vocab_size=300, embed_dim=32, num_heads=2, mlp_dim=64, num_layers=2,
              max_len=64)
  if family == "encoder_decoder":
    over.update(position="relative", norm="rmsnorm", use_bias=False, tie_embeddings=True)
  return ModelConfig(**over)


def _batch(family, seed=0, same=False, b=3, L=16):
  """A pair batch from real IMDb text, tokenized as bytes (ids < 256)."""
  with open(IMDB, encoding="utf-8") as f:
    texts = [json.loads(next(f))["text"].encode()[:80] for _ in range(2 * b + seed)][seed:]
  rows = []
  for i in range(b):
    prompt, a, r = list(texts[i][:6]), list(texts[i][6:20]), list(texts[b + i][6:20])
    if same:
      r = a
    head = preference.prompt_row(prompt, family, L, 0, 1)
    row = dict(head)
    for side, resp in (("chosen", a), ("rejected", r)):
      row.update({f"{side}_{k}": v for k, v in
                  preference.response_row(prompt, resp + [1], family, L, L, 0, 0).items()})
    row["pair_weights"] = np.float32(1.0)
    rows.append(row)
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


@pytest.mark.parametrize("family", ["decoder_only", "encoder_decoder"])
def test_chosen_equal_rejected_gives_zero_gradient(family):
  cfg = _tiny(family)
  model = models.make_model(cfg)
  params = jax.tree.map(lambda x: x, __import__("flax").linen.meta.unbox(
      models.init_params(cfg, jax.random.key(0), 1, 16, 16)))
  batch = _batch(family, same=True)
  batch["ref_chosen_logp"] = jnp.asarray([-50.0, -60.0, -70.0])
  batch["ref_rejected_logp"] = jnp.asarray([-55.0, -40.0, -70.0])
  loss_fn = objectives.make_loss_fn(
      lambda *a: objectives.dpo(*a, beta=0.5, label_smoothing=0.1), model, deterministic=True)
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.key(1))
  biggest = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads))
  assert biggest < 1e-6, biggest
  assert float(loss) > 0.0


@pytest.mark.parametrize("family", ["decoder_only", "encoder_decoder"])
@pytest.mark.parametrize("loss_kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.2)])
def test_policy_equal_to_reference_gives_log_2(family, loss_kind, eps):
  cfg = _tiny(family)
  model = models.make_model(cfg)
  params = __import__("flax").linen.meta.unbox(models.init_params(cfg, jax.random.key(3), 1, 16, 16))
  batch = _batch(family, seed=1)
  c, n_c, r, n_r = objectives.pair_logps(model, params, batch, jax.random.key(0), True)
  assert float(jnp.min(n_c)) > 0 and float(jnp.min(n_r)) > 0
  assert float(jnp.max(jnp.abs(c - r))) > 1e-3  # different responses, different log-probs
  batch["ref_chosen_logp"], batch["ref_rejected_logp"] = c, r
  loss_fn = objectives.make_loss_fn(
      lambda *a: objectives.dpo(*a, beta=0.1, label_smoothing=eps, loss=loss_kind), model,
      deterministic=True)
  loss, terms = loss_fn(params, batch, jax.random.key(0))
  assert float(loss) == pytest.approx(math.log(2.0), abs=1e-6)
  assert float(terms["dpo_margin"][0]) == pytest.approx(0.0, abs=1e-5)


# ------------------------------------------------------------------ bad input
def test_record_missing_a_field_names_record_and_field(tmp_path):
  path = tmp_path / "prefs.jsonl"
  good = {"prompt": "The film", "chosen": " was great", "rejected": " was dull"}
  path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "A", "chosen": " b"}) + "\n")
  with pytest.raises(ConfigError, match=r"prefs.jsonl:2: record 2 has no string 'rejected' field"):
    preference.load_preference_jsonl(str(path))


def test_bad_configs_are_one_line(load_config, tmp_path):
  data = imdb_pairs(tmp_path / "p.jsonl", n=4)
  ok = dict(objective="dpo", init_from=str(tmp_path), **{"finetune.preference_data": data})
  config_schema.validate(load_config("gpt", "tiny", **ok))
  for change, message in [({"dpo.beta": 0.0}, "config.dpo.beta=0.0 must be positive"),
                          ({"dpo.beta": -1.0}, "must be positive"),
                          ({"dpo.loss": "hinge"}, "config.dpo.loss='hinge' is not supported"),
                          ({"init_from": ""}, "needs config.init_from"),
                          ({"finetune.preference_data": ""}, "needs config.finetune.preference_data")]:
    with pytest.raises(ConfigError, match=message):
      config_schema.validate(load_config("gpt", "tiny", **{**ok, **change}))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "Great", "rejected": " film"}) + "\n")
  with pytest.raises(ConfigError, match=r"bad.jsonl:1: record 1 has no string 'chosen' field"):
    config_schema.validate(load_config("gpt", "tiny", **{**ok, "finetune.preference_data": str(bad)}))
  with pytest.raises(ConfigError, match="config.objective='dpo' cannot train "
                                        "config.model.family='encoder_only'"):
    config_schema.validate(load_config("bert", "tiny", **ok))


def test_run_py_rejects_bad_beta_with_exit_2(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "run.py", "--config=configs/gpt.py:tiny", f"--workdir={tmp_path}/w",
       "--config.objective=dpo", "--config.dpo.beta=0", f"--config.init_from={tmp_path}",
       f"--config.finetune.preference_data={tmp_path}/p.jsonl"],
      cwd=repo, capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "error: config.dpo.beta=0.0 must be positive (the paper uses 0.1 to 0.5)"]


class _ByteTokenizer:
  pad_id, eos_id = 0, 1

  def encode(self, text):
    return [2 + (b % 250) for b in text.encode()]


def test_prompt_without_room_is_skipped_and_counted(load_config, tmp_path):
  data = imdb_pairs(tmp_path / "p.jsonl", n=40, skip_every=4)
  config = load_config("gpt", "tiny", objective="dpo", **{"finetune.preference_data": data,
                                                          "data.seq_len": 64})
  source = preference.PairSource(config, _ByteTokenizer(), "train")
  # records 0, 4, 8, ... have 240-word prompts; every 20th (19, 39) is held out for eval
  assert source.skipped == 10 and source.total == 38 and len(source) == 28
  with pytest.raises(ConfigError, match="leaves no room for the response"):
    preference.PairSource(load_config("gpt", "tiny", objective="dpo", **{
        "finetune.preference_data": imdb_pairs(tmp_path / "q.jsonl", n=40, skip_every=1)}),
        _ByteTokenizer(), "train")


# ------------------------------------------------------------------ through the train loop
@pytest.fixture(scope="module", name="sft_workdir")
def _sft_workdir(tmp_path_factory, data_cache):
  """A tiny GPT trained briefly on IMDb reviews: the SFT model and DPO reference."""
  del data_cache
  from conftest import load_config  # pylint: disable=import-outside-toplevel
  from gptjax.training import train  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("sft"))
  config = load_config("gpt", "tiny", **{"data.corpus": "imdb", "data.max_docs": 200,
                                         "train.steps": 8, "train.progress": False})
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_dpo_trains_from_init_from_with_metrics(load_config, sft_workdir, tmp_path, trainable):
  from gptjax.training import train  # pylint: disable=import-outside-toplevel
  data = imdb_pairs(tmp_path / "p.jsonl", n=60)
  config = load_config("gpt", "tiny", objective="dpo", init_from=sft_workdir, **{
      "finetune.preference_data": data, "finetune.trainable": trainable, "train.steps": 6,
      "train.log_every": 1, "train.eval_every": 6, "train.warmup_steps": 1,
      "train.learning_rate": 1e-2, "train.progress": False, "dpo.kl_prompts": 3,
      "generate.max_new_tokens": 6})
  config_schema.validate(config)
  final = train.train_and_evaluate(config, str(tmp_path / "dpo"))
  with open(tmp_path / "dpo" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records[0]["step"] == 1 and records[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)
  for key in ("eval_dpo_loss", "eval_dpo_reward_accuracy", "eval_dpo_chosen_reward",
              "eval_dpo_rejected_reward", "eval_dpo_margin", "eval_dpo_kl"):
    assert math.isfinite(final[key]), key
  assert final["dpo_loss"] != pytest.approx(math.log(2), abs=1e-4)  # it moved
  with open(tmp_path / "dpo" / "manifest.json") as f:
    manifest = json.load(f)
  assert manifest["dpo_train_pairs"] == 57 and manifest["dpo_validation_pairs"] == 3


def test_sentiment_dpo_smoke_end_to_end_then_skips(tmp_path, data_cache):
  del data_cache
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [sys.executable, "experiments/sentiment_dpo.py", "--preset=smoke",
          f"--workdir={tmp_path}/w", f"--out={tmp_path}/out"]
  result = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": repo})
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((tmp_path / "out" / "results.json").read_text())
  assert 0.0 <= record["reward_accuracy"] <= 1.0 and record["pairs"]["pairs"] > 0
  methods = {r["method"] for r in record["rows"]}
  assert methods == {"SFT temperature", "best of N", "DPO beta=0.1", "DPO beta=0.5"}
  for r in record["rows"]:
    assert 0.0 <= r["reward"] <= 1.0 and math.isfinite(r["kl"])
    if r["method"] == "best of N":
      n = int(r["setting"][2:])
      assert r["kl"] == pytest.approx(math.log(n) - (n - 1) / n)
  t1 = next(r for r in record["rows"] if r["setting"] == "T=1.0")
  assert t1["kl"] == pytest.approx(0.0, abs=1e-4)  # SFT at T=1 is the SFT policy
  with open(tmp_path / "w" / "pairs.jsonl") as f:
    assert all(set(json.loads(line)) == set(preference.FIELDS) for line in f)
  assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
  assert "| verdict |" in (tmp_path / "out" / "results.md").read_text()
  # every stage is stored, so a rerun skips it (experiments/finished_runs.py)
  stages = ["sft", "reward", "pairs", "eval/best_of"] + [f"dpo_beta{b}_stage2" for b in (0.1, 0.5)]
  assert all((tmp_path / "w" / s / "result.json").exists() for s in stages)
