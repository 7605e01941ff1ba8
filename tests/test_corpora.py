"""TFDS corpora built from the raw files: splits, documents, bad input."""

import os

import numpy as np
import pytest

from conftest import load_config as _load
from gptjax.data import corpora
from gptjax.config_schema import ConfigError


def _docs(corpus, split, **overrides):
  return corpora.documents(_load("gpt", **{"data.corpus": corpus, **overrides}), split)


def test_tiny_shakespeare_splits_are_contiguous_90_5_5(data_cache):
  del data_cache
  parts = {s: _docs("tiny_shakespeare", s) for s in ("train", "validation", "test")}
  raw = open(os.path.join(corpora.raw_data_dir(), "tinyshakespeare", "input.txt"), encoding="utf-8").read()
  everything = [d["text"] for s in ("train", "validation", "test") for d in parts[s]]
  assert everything == corpora.shakespeare_docs(raw)
  share = len(parts["train"]) / len(everything)
  assert 0.89 < share < 0.91 and parts["validation"] and parts["test"]
  assert parts["train"][0]["text"].startswith("First Citizen:\nBefore we proceed")


def test_wikitext2_keeps_articles_paragraphs_and_sentences(data_cache):
  del data_cache
  docs = _docs("wikitext2", "validation")
  assert len(docs) > 50 and docs[0]["text"].startswith("= Homarus gammarus =")
  assert all(d["text"].count("\n") >= 1 for d in docs)  # title and paragraphs as lines
  assert " . " in docs[0]["text"]  # sentences inside paragraphs, kept for NSP


def test_labelled_corpora(data_cache):
  del data_cache
  dev = _docs("sst2", "validation")
  assert len(dev) == 872 and sum(d["label"] for d in dev) == 444
  assert _docs("sst2", "train", **{"data.max_docs": 5})[0]["text"] == \
      "hide new secretions from the parental units"
  # a label budget: train_docs cuts the train split only, dev stays whole
  few = {"data.train_docs": 7}
  assert len(_docs("sst2", "train", **few)) == 7 and len(_docs("sst2", "validation", **few)) == 872
  test = _docs("imdb", "test")
  labels = [d["label"] for d in test]
  assert len(test) == 2000 and sum(labels) == 1000 and labels[:20] != sorted(labels[:20])


def test_tinystories_stories(data_cache):
  del data_cache
  stories = _docs("tinystories", "train")
  assert 900 < len(stories) < 1100 and stories[0]["text"].startswith("One day, a little girl named Lily")


def test_text_files_and_invalid_utf8_counted(data_cache, tmp_path):
  del data_cache
  (tmp_path / "a.txt").write_bytes("First paragraph.\n\nSecond one, caf\xe9.\n".encode() + b"bad \xff\xfe bytes\n")
  (tmp_path / "b.jsonl").write_text('{"text": "a json document", "label": 1}\n{"text": "another"}\n')
  config = _load("gpt", **{"data.corpus": "text_files", "data.text_files": str(tmp_path / "*")})
  docs = corpora.documents(config, "train")
  texts = [d["text"] for d in docs]
  assert "Second one, caf\xe9.\nbad \ufffd\ufffd bytes" in texts and "a json document" in texts
  assert corpora.invalid_utf8_count(config) == 2


def test_prepared_tfds_dataset_is_usable_by_name(data_cache, tmp_path):
  del data_cache
  (tmp_path / "notes.txt").write_text("\n\n".join(f"Paragraph {i} of the notes." for i in range(30)))
  prepared = tmp_path / "tfds"
  config = _load("gpt", **{"data.corpus": "text_files", "data.text_files": str(tmp_path / "*.txt"),
                          "data.tfds_data_dir": str(prepared)})
  built = corpora.documents(config, "train")
  name = next(p.name for p in prepared.iterdir() if p.name != "downloads")
  config_dir = next((prepared / name).iterdir()).name
  by_name = _load("gpt", **{"data.corpus": f"{name}/{config_dir}", "data.tfds_data_dir": str(prepared)})
  assert corpora.documents(by_name, "train") == built
  with pytest.raises(ConfigError, match="neither a gptjax corpus nor a prepared TFDS dataset"):
    corpora.documents(_load("gpt", **{"data.corpus": "no_such_corpus",
                                      "data.tfds_data_dir": str(prepared)}), "train")


def test_missing_raw_file_names_the_path_and_the_fix(data_cache, tmp_path, monkeypatch):
  del data_cache
  monkeypatch.setenv("GPTJAX_OFFLINE", "1")
  with pytest.raises(FileNotFoundError) as e:
    _docs("wikitext2", "train", **{"data.raw_dir": str(tmp_path)})
  message = str(e.value)
  assert "\n" not in message and str(tmp_path / "wikitext2") in message and "raw_dir" in message


def test_empty_corpus_is_an_error(data_cache, tmp_path):
  del data_cache
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(ConfigError, match="empty"):
    _docs("text_files", "train", **{"data.text_files": str(tmp_path / "*.txt")})
  with pytest.raises(FileNotFoundError, match="matches no file"):
    _docs("text_files", "train", **{"data.text_files": str(tmp_path / "*.nothing")})
  assert np.isscalar(corpora.invalid_utf8_count(_load("gpt")))


def test_enwiki2015_articles_held_out_by_article(data_cache):
  del data_cache
  from gptjax.data import enwiki
  parts = {s: _docs("enwiki2015", s) for s in enwiki.SPLITS}
  titles = {s: [d["text"].split("\n", 1)[0] for d in parts[s]] for s in parts}
  assert titles["train"][0] == "Anarchism" and parts["train"][0]["text"].count("\n") > 10
  assert 6000 < len(parts["train"]) < 6400 and 80 < len(parts["validation"]) < 160
  assert 80 < len(parts["test"]) < 180
  assert not set(titles["train"]) & (set(titles["validation"]) | set(titles["test"]))  # by article
  everything = [t for s in parts for t in titles[s]]
  assert not set(everything) & enwiki.WIKITEXT2_OVERLAP and "Antimony" not in everything
  text = "\n".join(d["text"] for d in parts["validation"])
  assert "<doc" not in text and "</doc>" not in text and "()" not in text and "<ref" not in text


def test_enwiki_cleanup_and_split_are_stable():
  from gptjax.data import enwiki
  assert enwiki.clean_line('Apollo as Articenens ( ; "bow-carrying"). Apollo ().') == \
      'Apollo as Articenens ("bow-carrying"). Apollo.'
  assert enwiki.clean_line("in [[Malaysia]] at the [[Petronas|Petronas Towers]].<ref name=x/>") == \
      "in Malaysia at the Petronas Towers."
  assert enwiki.split_of("12") == enwiki.split_of("12")
  raw = '<doc id="7" url="u" title="T">\nT\n\nFirst para.\nHistory.\nSecond.\n\n</doc>\n'
  assert enwiki.parse_articles(raw) == [("7", "T", "T\nFirst para.\nHistory.\nSecond.")]
