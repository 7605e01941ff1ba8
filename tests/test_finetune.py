"""Transfer learning: LoRA equivalences, frozen params under masked optax, SFT loss masks,
int8 quantization bounds, embeddings and retrieval."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from gptjax import config_schema
from gptjax.inference import sentence_embeddings as embeddings
from gptjax.transfer import sft_data
from gptjax.transfer import trainable as trainable_lib
from gptjax.transfer import lora
from gptjax.model import models
from gptjax.transfer import quantize
from gptjax.config_schema import ConfigError
from gptjax.model.config import ModelConfig


def tiny(family: str, **changes) -> ModelConfig:
  cfg = ModelConfig.from_config(load_config(family, "tiny").model)
  return dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0, **changes)


def _init(cfg):
  return nn.meta.unbox(models.init_params(cfg, jax.random.key(0), 2, 8))


IDS = jnp.arange(2 * 8).reshape(2, 8) % 50 + 3


def _apply(cfg, params):
  model = models.make_model(cfg)
  if cfg.family == "encoder_decoder":
    return model.apply({"params": params}, IDS, jnp.ones_like(IDS), IDS[:, :5])["logits"]
  if cfg.family == "encoder_only":
    return model.apply({"params": params}, IDS, jnp.ones_like(IDS))["hidden"]
  return model.apply({"params": params}, IDS)["logits"]


@pytest.mark.parametrize("family,targets", [("gpt", "attention"), ("t5", "all"), ("bert", "all")])
def test_lora_starts_equal_and_merged_equals_unmerged(family, targets):
  cfg = tiny(family)
  params = _init(cfg)
  tree = lora.init_lora(params, targets, 4, jax.random.key(1))
  assert any("mlp/wo/kernel" in p for p in tree) == (targets == "all")
  base = _apply(cfg, params)
  np.testing.assert_array_equal(np.asarray(_apply(cfg, lora.merge(params, tree, 16.0, 4))),
                                np.asarray(base))
  # train-like B != 0: merged weights and the unmerged low-rank branch give the same outputs
  tree = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), tree)
  merged = _apply(cfg, lora.merge(params, tree, 16.0, 4))
  with lora.unmerged_lora(tree, 16.0, 4):
    unmerged = _apply(cfg, params)
  assert float(jnp.max(jnp.abs(merged - base))) > 1e-3  # the adapters really do something
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=2e-5, rtol=1e-5)


def test_lora_target_naming_no_layer_is_one_line():
  params = _init(tiny("gpt"))
  with pytest.raises(ConfigError) as e:
    lora.init_lora(params, "query,qkv_proj", 4, jax.random.key(0))
  assert "qkv_proj" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(ConfigError):
    lora.init_lora(params, "", 4, jax.random.key(0))
  assert set(p.split("/")[-2] for p in lora.init_lora(params, "query,value", 2,
                                                      jax.random.key(0))) == {"query", "value"}


@pytest.mark.parametrize("trainable", ["head", "last_block"])
def test_frozen_params_bit_identical_after_masked_steps(trainable):
  cfg = tiny("bert", num_classes=2, mlm_head=False, nsp_head=False)
  params = _init(cfg)
  mask = trainable_lib.trainable_mask(params, trainable, cfg.family)
  assert mask["classifier"]["kernel"] and not mask["token_embed"]["embedding"]
  assert mask["encoder"]["layers_1"]["mlp"]["wo"]["kernel"] == (trainable == "last_block")
  assert not mask["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]
  tx = trainable_lib.masked_optimizer(optax.adamw(1e-2, weight_decay=0.1), mask)
  opt_state = tx.init(params)
  n_state = sum(x.size for x in jax.tree.leaves(opt_state))
  trained, total = trainable_lib.count_trainable(params, mask)
  assert n_state <= 2 * trained + 8 < 2 * total  # no moments for frozen params
  model = models.make_model(cfg)
  labels = jnp.array([0, 1])

  @jax.jit
  def step(p, s):
    def loss(p):
      logits = model.apply({"params": p}, IDS, jnp.ones_like(IDS))["class_logits"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = jax.grad(loss)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  new = params
  for _ in range(3):
    new, opt_state = step(new, opt_state)
  for m, before, after in zip(jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(new)):
    if m:
      continue
    np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
  assert not np.array_equal(np.asarray(new["classifier"]["kernel"]),
                            np.asarray(params["classifier"]["kernel"]))


def test_head_mode_without_a_head_is_one_line():
  with pytest.raises(ConfigError) as e:
    trainable_lib.trainable_mask(_init(tiny("gpt")), "head", "decoder_only")
  assert "\n" not in str(e.value)


class _CharTokenizer:
  """Real, deterministic tokenization: one id per byte."""

  def encode(self, text):
    return list(text.encode("utf-8"))


def test_sft_loss_mask_covers_response_only(tmp_path):
  path = tmp_path / "sft.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in [
      {"instruction": "Add", "input": "2 and 3", "output": "5"},
      {"instruction": "Say hi", "output": "hello there"}]) + "\n")
  records = sft_data.load_sft_jsonl(str(path))
  template = "### Instruction:\n{instruction}\n{input}\n### Response:\n"
  tok = _CharTokenizer()
  for rec in records:
    ids, mask = sft_data.format_sft_example(rec, template, tok, eos_id=0)
    prompt = template.format(instruction=rec["instruction"], input=rec["input"])
    assert bytes(ids[mask == 1][:-1].tolist()).decode() == rec["output"]
    assert bytes(ids[mask == 0].tolist()).decode() == prompt
    assert mask[-1] == 1 and ids[-1] == 0 and mask[:len(prompt)].sum() == 0
  batch = sft_data.sft_batch([sft_data.format_sft_example(r, template, tok) for r in records], 64)
  row = batch["targets"][0][batch["weights"][0] == 1]
  assert bytes(row.tolist()).decode() == "5"
  (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
  with pytest.raises(ConfigError) as e:
    sft_data.load_sft_jsonl(str(tmp_path / "bad.jsonl"))
  assert "bad.jsonl:1" in str(e.value) and "output" in str(e.value)


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_int8_error_within_per_channel_bound(family):
  cfg = tiny(family)
  params = _init(cfg)
  qtree = quantize.quantize_params(params)
  q = qtree["decoder"]["layers_0"]["self_attn"]["query"]["kernel"]  # [D, H, Dh] as [H * Dh, D]
  d, h, dh = q.shape
  assert q.values.dtype == jnp.int8 and q.values.shape == (h * dh, d)
  assert q.scale.shape == (h * dh, 1)
  deq = quantize.dequantize(qtree)
  for w, qt, d in zip(jax.tree.leaves(params),
                      jax.tree.leaves(qtree, is_leaf=lambda x: isinstance(x, quantize.QTensor)),
                      jax.tree.leaves(deq)):
    if isinstance(qt, quantize.QTensor):
      bound = np.asarray(quantize.half_step(qt)) * (1 + 1e-5)  # float rounding
      assert np.all(np.abs(np.asarray(w) - np.asarray(d)) <= bound)
    else:
      np.testing.assert_array_equal(np.asarray(w), np.asarray(d))
  assert quantize.max_error_ratio(params, qtree) <= 1 + 1e-5
  report = quantize.memory_report(params, qtree)
  assert report["saved_fraction"] > 0.6 and "saved" in report["summary"]
  out, ref = _apply(cfg, deq), _apply(cfg, params)
  assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


def test_embeddings_index_and_knn():
  cfg = tiny("bert", mlm_head=False, nsp_head=False)
  model, params = models.make_model(cfg), _init(cfg)
  texts = ["abc", "abd", "xyz", "xyw", "abc"]
  emb = embeddings.embed_texts(model, params, _CharTokenizer(), texts, batch_size=2)
  assert emb.shape == (5, cfg.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(emb[0], emb[4], atol=1e-6)  # padding and batch position do not matter
  scores, idx = embeddings.Index(emb).search(emb[:1], k=2)
  assert set(idx[0]) == {0, 4} and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
  assert embeddings.knn_label_agreement(np.eye(4)[[0, 0, 1, 1]] + 0.1, [0, 0, 1, 1], k=1) == 1.0


def _sst2_instructions(path, n=200):
  """sst2 train sentences as instruction records (real text, real labels)."""
  from gptjax.data import corpora  # pylint: disable=g-import-not-at-top
  rows = open(f"{corpora.raw_data_dir()}/sst2/train.tsv").read().splitlines()[1:n + 1]
  with open(path, "w") as f:
    for row in rows:
      text, label = row.rsplit("\t", 1)
      f.write(json.dumps({"instruction": "Is this movie review positive or negative?",
                          "input": text.strip(), "output": ["negative", "positive"][int(label)]})
              + "\n")
  return str(path)


def test_instruction_tuning_trains_on_response_tokens_only(tmp_path, data_cache):
  del data_cache
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from gptjax.data import tokenization
  from gptjax.training import train
  data = _sst2_instructions(tmp_path / "sst2_instructions.jsonl")
  config = load_config("gpt", "tiny", **{
      "objective": "instruction", "finetune.instruction_data": data, "train.steps": 12,
      "train.learning_rate": 3e-3, "train.warmup_steps": 2, "train.log_every": 1,
      "train.eval_every": 0, "train.progress": False, "train.ckpt_every": 1000,
      "data.seq_len": 64, "model.dropout_rate": 0.0})
  config_schema.validate(config)
  tok = tokenization.load_or_train_tokenizer(config)
  ex = input_pipeline.example_source(config, tok).example(0, np.random.default_rng(0))
  answer = tok.decode([int(t) for t, w in zip(ex["targets"], ex["weights"]) if w > 0])
  assert answer.strip() in ("negative", "positive"), answer
  assert len(input_pipeline.example_source(config, tok, "validation")) == 10  # every 20th of 200
  train.train_and_evaluate(config, str(tmp_path / "w"))
  losses = [json.loads(l)["loss"] for l in open(tmp_path / "w" / "metrics.jsonl")
            if '"loss"' in l and "eval_loss" not in l]
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_instruction_without_data_is_one_line():
  with pytest.raises(ConfigError, match="needs config.finetune.instruction_data"):
    config_schema.validate(load_config("gpt", "tiny", objective="instruction"))
