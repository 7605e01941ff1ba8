"""Retrieval for In-Context RALM (Ram et al. 2023): a stored passage index, dense or BM25.

An index directory holds `index.json` (kind, embedder, the embedder's tokenizer fingerprint, the
corpus fingerprint and the command that rebuilds it), `passages.jsonl` (text and source of each
passage), and `embeddings.npy` (dense: mean-pooled, L2-normalised vectors from a `hf:DIR`
encoder such as all-MiniLM-L6-v2, searched by cosine) or `bm25/` (sparse: the `bm25s` library's
own files, no pickle). `load_index` refuses, in one line, an index whose corpus changed since it
was built or whose embedder or tokenizer differs from the one a caller expects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np

from gptjax.config_schema import ConfigError

KINDS = ("bm25", "dense")
BM25_SETTINGS = {"lower": True, "stopwords": "en", "token_pattern": r"(?u)\b\w\w+\b"}
EXCLUDE_NGRAM = 8  # a passage sharing an 8-word run with the evaluated text is never returned


def document_title(text: str) -> str:
  """A document's title: wikitext2's ` = Title = ` heading, else its first line (enwiki2015)."""
  first = text.split("\n", 1)[0]
  return first.strip(" =")[:80] if len(first) <= 200 else ""


def passages_from_documents(docs: Sequence[str], words: int, source: str,
                            titled: bool = False) -> list[dict]:
  """Consecutive `words`-word passages of each document, each with a readable source.

  With `titled`, each passage's text starts with its document's title on a line of its own, as
  the DPR Wikipedia passages that In-Context RALM retrieves do (the title line is not counted in
  `words`, and the body no longer repeats it).
  """
  out = []
  for d, text in enumerate(docs):
    title = document_title(text) if titled or text.startswith((" =", "=")) else ""
    body = text.split("\n", 1)[1] if titled and "\n" in text else text
    tokens = body.split()
    for i in range(0, len(tokens), words):
      chunk = tokens[i:i + words]
      if len(chunk) >= max(4, words // 4):
        out.append({"text": (f"{title}\n" if titled and title else "") + " ".join(chunk),
                    "source": f"{source} doc {d}{f' ({title})' if title else ''} words {i}-{i + len(chunk)}"})
  return out


def text_fingerprint(texts: Sequence[str]) -> str:
  """sha256 prefix of a sequence of texts (the corpus fingerprint of its passages)."""
  h = hashlib.sha256()
  for t in texts:
    h.update(t.encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


# ------------------------------------------------------------------ embedders
class DenseEmbedder:
  """Mean-pooled, L2-normalised sentence vectors from a Hugging Face encoder folder (`hf:DIR`)."""

  def __init__(self, source: str, max_len: int = 128, batch_size: int = 32):
    from gptjax.transfer import hf_import  # pylint: disable=g-import-not-at-top
    from gptjax.model import models
    import tokenizers  # pylint: disable=g-import-not-at-top
    if not source.startswith("hf:"):
      raise ConfigError(f"dense embedder {source!r}: give hf:DIR (e.g. all-MiniLM-L6-v2)")
    folder = source[3:]
    tok_path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tok_path):
      raise ConfigError(f"dense embedder {source!r} has no tokenizer.json")
    self.source = source
    cfg, self.params = hf_import.load_hf(folder)
    self.model = models.make_model(cfg)
    self.tokenizer = tokenizers.Tokenizer.from_file(tok_path)
    self.max_len, self.batch_size = min(max_len, cfg.max_len), batch_size
    with open(tok_path, "rb") as f:
      self.tokenizer_fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
      if name.endswith((".json", ".safetensors")) and name != "tokenizer.json":
        h.update(f"{name}:{os.path.getsize(os.path.join(folder, name))}".encode())
    with open(os.path.join(folder, "config.json"), "rb") as f:
      h.update(f.read())
    parts = os.path.normpath(folder).split(os.sep)
    self.name = "dense:" + "/".join(parts[-2:])
    self.fingerprint = h.hexdigest()[:16]

  def embed(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
    """[N, D] float32 unit vectors."""
    from gptjax.inference import sentence_embeddings as embeddings  # pylint: disable=g-import-not-at-top
    import tqdm  # pylint: disable=g-import-not-at-top
    out = []
    step = self.batch_size * 8
    for s in tqdm.trange(0, len(texts), step, disable=not progress, desc="embedding passages"):
      out.append(embeddings.embed_texts(self.model, self.params, self.tokenizer,
                                        list(texts[s:s + step]), self.batch_size, self.max_len))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _bm25_identity() -> tuple[str, str]:
  import bm25s  # pylint: disable=g-import-not-at-top
  settings = json.dumps(BM25_SETTINGS, sort_keys=True)
  return f"bm25s-{bm25s.__version__}", hashlib.sha256(settings.encode()).hexdigest()[:16]


def _bm25_tokens(texts: Sequence[str]):
  import bm25s  # pylint: disable=g-import-not-at-top
  return bm25s.tokenize(list(texts), lower=BM25_SETTINGS["lower"],
                        stopwords=BM25_SETTINGS["stopwords"],
                        token_pattern=BM25_SETTINGS["token_pattern"], show_progress=False)


# ------------------------------------------------------------------ build and load
def build_index(directory: str, passages: list[dict], kind: str, *, corpus: dict,
                rebuild_command: str, embedder: Optional[DenseEmbedder] = None,
                progress: bool = False) -> "RetrievalIndex":
  """Writes a complete index to `directory` (replacing any there) and returns it loaded.

  `corpus` describes what the passages came from; it must hold `fingerprint` (see
  `text_fingerprint`) and may name `split`, `files` and `passage_words`.
  """
  if kind not in KINDS:
    raise ConfigError(f"retrieval index kind {kind!r} is not supported; allowed: {', '.join(KINDS)}")
  if not passages:
    raise ConfigError("cannot build a retrieval index over no passages")
  tmp = directory.rstrip("/") + ".building"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  texts = [p["text"] for p in passages]
  if kind == "dense":
    if embedder is None:
      raise ConfigError("a dense retrieval index needs an embedder (hf:DIR)")
    np.save(os.path.join(tmp, "embeddings.npy"), embedder.embed(texts, progress))
    name, fp, tok_fp = embedder.name, embedder.fingerprint, embedder.tokenizer_fingerprint
    corpus = {**corpus, "embedder_source": embedder.source}
  else:
    import bm25s  # pylint: disable=g-import-not-at-top
    retriever = bm25s.BM25()
    retriever.index(_bm25_tokens(texts), show_progress=False)
    retriever.save(os.path.join(tmp, "bm25"), show_progress=False)
    name, tok_fp = _bm25_identity()
    fp = tok_fp
  with open(os.path.join(tmp, "passages.jsonl"), "w", encoding="utf-8") as f:
    for p in passages:
      f.write(json.dumps({"text": p["text"], "source": p["source"]}) + "\n")
  meta = {"kind": kind, "embedder": name, "embedder_fingerprint": fp,
          "tokenizer_fingerprint": tok_fp, "passages": len(passages), "corpus": corpus,
          "rebuild_command": rebuild_command}
  with open(os.path.join(tmp, "index.json"), "w") as f:
    json.dump(meta, f, indent=2)
  if os.path.isdir(directory):
    shutil.rmtree(directory)
  os.replace(tmp, directory)
  return load_index(directory)


def load_index(directory: str, *, corpus_fingerprint: Optional[str] = None,
               embedder: Optional[DenseEmbedder] = None) -> "RetrievalIndex":
  """The index in `directory`, checked against the current corpus and the expected embedder."""
  path = os.path.join(directory, "index.json")
  if not os.path.isfile(path):
    raise ConfigError(f"{directory} is not a retrieval index (no index.json); build one with "
                      "experiments/retrieval_lm.py --build_index_only")
  with open(path) as f:
    meta = json.load(f)
  rebuild = meta.get("rebuild_command", "experiments/retrieval_lm.py")
  if corpus_fingerprint is not None and corpus_fingerprint != meta["corpus"]["fingerprint"]:
    raise ConfigError(f"the corpus changed since the retrieval index {directory} was built "
                      f"(fingerprint {meta['corpus']['fingerprint']}, now {corpus_fingerprint}); "
                      f"rebuild it: {rebuild}")
  if embedder is not None and embedder.fingerprint != meta["embedder_fingerprint"]:
    raise ConfigError(f"the retrieval index {directory} was built with embedder "
                      f"{meta['embedder']} ({meta['embedder_fingerprint']}), not {embedder.name} "
                      f"({embedder.fingerprint}); rebuild it: {rebuild}")
  if embedder is not None and embedder.tokenizer_fingerprint != meta["tokenizer_fingerprint"]:
    raise ConfigError(f"the retrieval index {directory} was built with another tokenizer "
                      f"({meta['tokenizer_fingerprint']}, this embedder's is "
                      f"{embedder.tokenizer_fingerprint}); rebuild it: {rebuild}")
  return RetrievalIndex(directory, meta)


def _ngrams(text: str, n: int = EXCLUDE_NGRAM) -> set:
  w = text.split()
  return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


class RetrievalIndex:
  """Top-k passages for text queries; `exclude` drops passages that overlap the evaluated text."""

  def __init__(self, directory: str, meta: dict):
    self.directory, self.meta, self.kind = directory, meta, meta["kind"]
    with open(os.path.join(directory, "passages.jsonl"), encoding="utf-8") as f:
      self.passages = [json.loads(line) for line in f]
    self._embedder: Optional[DenseEmbedder] = None
    if self.kind == "dense":
      from gptjax.inference import sentence_embeddings as embeddings  # pylint: disable=g-import-not-at-top
      self._dense = embeddings.Index(np.load(os.path.join(directory, "embeddings.npy")))
    else:
      import bm25s  # pylint: disable=g-import-not-at-top
      self._bm25 = bm25s.BM25.load(os.path.join(directory, "bm25"), show_progress=False)
    self.excluded = 0  # passages dropped for overlapping the evaluated text

  def __len__(self) -> int:
    return len(self.passages)

  def attach_embedder(self, embedder: DenseEmbedder) -> None:
    """The query embedder of a dense index (checked against the one that built it)."""
    load_index(self.directory, embedder=embedder)
    self._embedder = embedder

  def _candidates(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(self))
    if self.kind == "dense":
      if self._embedder is None:
        raise ConfigError(f"the dense index {self.directory} needs its query embedder "
                          f"({self.meta['embedder']}); call attach_embedder")
      scores, idx = self._dense.search(self._embedder.embed(queries), k)
      return idx, scores
    idx, scores = self._bm25.retrieve(_bm25_tokens(queries), k=k, show_progress=False,
                                      n_threads=1)
    return np.asarray(idx), np.asarray(scores)

  def search(self, queries: Sequence[str], k: int,
             exclude: Optional[Sequence[str]] = None) -> list[list[tuple[int, float]]]:
    """Per query, up to k (passage index, score) pairs, best first.

    With `exclude`, a passage sharing an 8-word run with exclude[q] is skipped for query q
    (counted in `self.excluded`); more candidates are fetched to make up for it.
    """
    extra = 8 if exclude is not None else 0
    idx, scores = self._candidates(queries, k + extra)
    out = []
    for q in range(len(queries)):
      banned = _ngrams(exclude[q]) if exclude is not None else set()
      row = []
      for j, s in zip(idx[q], scores[q]):
        if banned and _ngrams(self.passages[int(j)]["text"]) & banned:
          self.excluded += 1
          continue
        row.append((int(j), float(s)))
        if len(row) == k:
          break
      out.append(row)
    return out

  def random(self, n_queries: int, k: int, seed: int,
             exclude: Optional[Sequence[str]] = None) -> list[list[tuple[int, float]]]:
    """The control: k uniformly random passages per query (same exclusion rule)."""
    rng = np.random.default_rng(seed)
    out = []
    for q in range(n_queries):
      banned = _ngrams(exclude[q]) if exclude is not None else set()
      row = []
      while len(row) < min(k, len(self)):
        j = int(rng.integers(len(self)))
        if banned and _ngrams(self.passages[j]["text"]) & banned:
          self.excluded += 1
          continue
        row.append((j, 0.0))
      out.append(row)
    return out


# ------------------------------------------------------------------ generation
def check_source_files(index: RetrievalIndex) -> None:
  """One line with the rebuild command when the corpus files changed since the index was built."""
  from gptjax.data import corpora  # pylint: disable=g-import-not-at-top
  corpus = index.meta["corpus"]
  if "raw_fingerprint" not in corpus:
    return
  now = corpora.raw_fingerprint(corpus["corpus"], corpora.raw_data_dir(""))
  if now != corpus["raw_fingerprint"]:
    raise ConfigError(f"the corpus {corpus['corpus']!r} changed since the retrieval index "
                      f"{index.directory} was built (files {corpus['raw_fingerprint']}, now {now}); "
                      f"rebuild it: {index.meta['rebuild_command']}")


def open_for_generation(directory: str) -> RetrievalIndex:
  """A checked index with its query embedder attached (dense indices load the one that built it)."""
  index = load_index(directory)
  check_source_files(index)
  if index.kind == "dense":
    index.attach_embedder(DenseEmbedder(index.meta["corpus"]["embedder_source"]))
  return index


def augment_prompts(index: RetrievalIndex, prompts: Sequence[str], tokenizer, k: int,
                    query_tokens: int, context_tokens: int) -> tuple[list[str], list[list[dict]]]:
  """Prompts with their top-k passages prepended (best last), and the sources used per prompt.

  The query is the prompt's last `query_tokens` tokens under the LM's tokenizer; passages are cut
  from the front so that passages and prompt fit in `context_tokens`.
  """
  if k < 1 or query_tokens < 1:
    raise ConfigError(f"config.generate.retrieval_k={k} and retrieval_query_tokens={query_tokens} "
                      "must be at least 1")
  queries = [tokenizer.decode(tokenizer.encode(p)[-query_tokens:]) for p in prompts]
  hits = index.search(queries, k)
  augmented, sources = [], []
  for prompt, row in zip(prompts, hits):
    room = context_tokens - len(tokenizer.encode(prompt))
    if room <= 0:
      raise ConfigError(f"the prompt {prompt[:40]!r} leaves no room for retrieved passages in "
                        f"{context_tokens} tokens; shorten it or lower generate.max_new_tokens")
    used = [dict(index.passages[j], score=s, rank=r + 1) for r, (j, s) in enumerate(row)]
    ids = tokenizer.encode("".join(u["text"] + "\n" for u in reversed(used)))[-room:]
    augmented.append(tokenizer.decode(ids) + prompt)
    sources.append(used)
  return augmented, sources
