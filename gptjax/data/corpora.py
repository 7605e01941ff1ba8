"""Corpora as TFDS builders (array_record files, read back with `tfds.data_source`; no TensorFlow).

Every corpus yields documents `{"text": str, "text_b": str, "label": int32}` (label -1 and
text_b "" where they do not apply). Documents keep their paragraphs as lines, so sentence
pairs for NSP come from inside one document.

Raw files come from `config.data.raw_dir`, else $GPTJAX_RAW_DIR, else `<repo>/../shared/data`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import pathlib
import random
import re
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from gptjax.data import enwiki
from gptjax.config_schema import ConfigError

tfds.disable_progress_bar()

# corpus -> {split: raw file relative to the raw dir}
RAW_FILES = {
    "tiny_shakespeare": {"all": "tinyshakespeare/input.txt"},
    "wikitext2": {"train": "wikitext2/wiki.train.tokens", "validation": "wikitext2/wiki.valid.tokens",
                  "test": "wikitext2/wiki.test.tokens"},
    "tinystories": {"all": "tinystories/train_head.txt"},
    "sst2": {"train": "sst2/train.tsv", "validation": "sst2/dev.tsv"},
    "imdb": {"train": "imdb/train_subset.jsonl", "test": "imdb/test_subset.jsonl"},
    "enwiki2015": {"all": enwiki.RAW},
}
_GH = "https://raw.githubusercontent.com/"
# raw file -> (canonical url, sha256); files derived by hand (see SOURCES.md) have no url
CANONICAL = {
    "tinyshakespeare/input.txt": (
        _GH + "karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    "wikitext2/wiki.valid.tokens": (
        _GH + "pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/"
        "wikitext-2/valid.txt", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
    "wikitext2/wiki.test.tokens": (
        _GH + "pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/word_language_model/data/"
        "wikitext-2/test.txt", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
    "sst2/train.tsv": (
        _GH + "eyalbd2/Reproducing-AutoPrompt/6288fb5bec9c572f2492875ae0111df5b6daed11/glue_data/"
        "SST-2/train_full.tsv", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"),
    "sst2/dev.tsv": (
        _GH + "eyalbd2/Reproducing-AutoPrompt/6288fb5bec9c572f2492875ae0111df5b6daed11/glue_data/"
        "SST-2/dev.tsv", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"),
    "tinystories/train_head.txt": (
        _GH + "s-ajaykumar/smallGPT/b8b899265a5574abd2c19d8857039309184a357c/data/tiny_stories.txt",
        "c56cfd24fb1c542b141a396184b822a4db3672abdb4c49c6aa843171c5e822a5"),
}


def raw_data_dir(configured: str = "") -> str:
  """Where raw corpus files live: the config field, $GPTJAX_RAW_DIR, or ../shared/data."""
  if configured:
    return configured
  if os.environ.get("GPTJAX_RAW_DIR"):
    return os.environ["GPTJAX_RAW_DIR"]
  return str(pathlib.Path(__file__).resolve().parents[3] / "shared" / "data")


def tfds_dir(configured: str = "") -> str:
  """Where TFDS keeps built array_record datasets."""
  from gptjax.config_schema import cache_dir  # pylint: disable=g-import-not-at-top
  return configured or os.path.join(cache_dir(), "tfds")


def raw_file(relative: str, raw_dir: str) -> str:
  """The path of a raw file; downloads it (checksummed) when missing and reachable, else fails clearly."""
  path = os.path.join(raw_dir, relative)
  if os.path.exists(path):
    return path
  url, sha256 = CANONICAL.get(relative, (None, None))
  if url and not os.environ.get("GPTJAX_OFFLINE"):
    try:
      import urllib.request  # pylint: disable=g-import-not-at-top
      data = urllib.request.urlopen(url, timeout=10).read()
      if hashlib.sha256(data).hexdigest() != sha256:
        raise ConfigError(f"downloaded {url} but its sha256 does not match; put the file at {path}")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(data)
      return path
    except OSError:
      pass
  where = f"download {url} there" if url else "copy it there (see shared/data/SOURCES.md)"
  raise FileNotFoundError(f"missing corpus file {path}: {where}, or point config.data.raw_dir / "
                          f"GPTJAX_RAW_DIR at the folder that holds {relative}")


def raw_fingerprint(corpus: str, raw_dir: str, text_files: str = "") -> str:
  """sha256 prefix over the raw files of `corpus` (names, sizes, contents); fails on a missing one."""
  if corpus == "text_files":
    paths = sorted(glob.glob(text_files, recursive=True))
    if not paths:
      raise FileNotFoundError(f"config.data.text_files={text_files!r} matches no file")
  else:
    paths = [raw_file(rel, raw_dir) for rel in sorted(set(RAW_FILES[corpus].values()))]
  h = hashlib.sha256(corpus.encode())
  for p in paths:
    h.update(f"{os.path.basename(p)}:{os.path.getsize(p)}".encode())
    h.update(pathlib.Path(p).read_bytes())
  return h.hexdigest()[:12]


def read_text(path: str, stats: dict) -> str:
  """Reads UTF-8, replacing invalid bytes and counting them in `stats['invalid_utf8']`."""
  data = pathlib.Path(path).read_bytes()
  text = data.decode("utf-8", errors="replace")
  stats["invalid_utf8"] = stats.get("invalid_utf8", 0) + text.count("\ufffd") - \
      data.count("\ufffd".encode())
  return text


def _doc(text: str, label: int = -1, text_b: str = "") -> dict:
  return {"text": text, "text_b": text_b, "label": np.int32(label)}


def shakespeare_docs(text: str) -> list[str]:
  """Speeches (blocks separated by blank lines)."""
  return [b.strip("\n") for b in re.split(r"\n\s*\n", text) if b.strip()]


def wikitext_docs(text: str) -> list[str]:
  """Articles split at top-level ` = Title = ` headings; paragraphs kept as lines."""
  docs, current = [], []
  for line in text.split("\n"):
    if re.match(r"^ = [^=].* = $", line):
      if current:
        docs.append("\n".join(current))
      current = [line.strip()]
    elif line.strip():
      current.append(line.strip())
  if current:
    docs.append("\n".join(current))
  return docs


def story_docs(text: str) -> list[str]:
  """TinyStories: a line right after a non-empty line starts a new story (see SOURCES.md)."""
  docs, current, prev_empty = [], [], True
  for line in text.split("\n"):
    if not line.strip():
      prev_empty = True
      continue
    if not prev_empty and current:
      docs.append("\n".join(current))
      current = []
    current.append(line.strip())
    prev_empty = False
  if current:
    docs.append("\n".join(current))
  return docs


def _contiguous_splits(docs: list, fractions=(0.9, 0.05, 0.05)) -> dict:
  n = len(docs)
  a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
  return {"train": docs[:a], "validation": docs[a:b], "test": docs[b:]}


def _jsonl_docs(path: str, text: str) -> list[dict]:
  """Records of a .jsonl file; a line that is not JSON or has no string `text` is one line."""
  docs = []
  for n, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{n} is not valid JSON ({e.msg}, column {e.colno}); fix or remove "
                        "that line") from None
    if not isinstance(r, dict) or not isinstance(r.get("text"), str):
      raise ConfigError(f"{path}:{n} has no string 'text' field; every .jsonl record needs "
                        "{\"text\": ...} (and optionally \"label\")")
    docs.append(_doc(r["text"], int(r.get("label", -1))))
  return docs


def _split_few_documents(docs: list[dict], split: str, text_files: str) -> list[dict]:
  """Train/validation of 20 or fewer documents: the last 5% of the characters are held out
  (cut at a space or newline inside the document where the cut falls; the rest stay whole)."""
  need = max(1, int(sum(len(d["text"]) for d in docs) * 0.05))
  train, held = list(docs), []
  while train and need > 0:
    d = train.pop()
    text = d["text"]
    if len(text.strip()) <= need:
      held.insert(0, d)
      need -= len(text.strip())
      continue
    cut = len(text) - need
    space = max(text.rfind(" ", 0, cut), text.rfind("\n", 0, cut))
    cut = space if space > 0 else cut
    head, tail = text[:cut].strip(), text[cut:].strip()
    if head:
      train.append(_doc(head, int(d["label"]), d["text_b"]))
    held.insert(0, _doc(tail, int(d["label"]), d["text_b"]))
    need = 0
  held = [d for d in held if d["text"].strip()]
  if not train or not held:
    raise ConfigError(f"config.data.text_files={text_files!r} is too short to hold out a "
                      "validation split; give more text")
  return train if split == "train" else held if split == "validation" else []


def load_documents(corpus: str, split: str, raw_dir: str, text_files: str = "",
                   stats: dict | None = None) -> list[dict]:
  """Documents of `corpus`/`split` straight from the raw files (what the builders store)."""
  stats = {} if stats is None else stats
  if corpus == "text_files":
    paths = sorted(glob.glob(text_files, recursive=True))
    if not paths:
      raise FileNotFoundError(f"config.data.text_files={text_files!r} matches no file")
    docs = []
    for p in paths:
      if p.endswith(".jsonl"):
        docs.extend(_jsonl_docs(p, read_text(p, stats)))
      else:
        docs.extend(_doc(d) for d in shakespeare_docs(read_text(p, stats)))
    if len(docs) > 20:
      return _contiguous_splits(docs, (0.95, 0.05, 0.0))[split]
    return _split_few_documents(docs, split, text_files)
  if corpus not in RAW_FILES:
    raise ConfigError(f"config.data.corpus={corpus!r} is unknown; allowed: "
                      f"{', '.join(list(RAW_FILES) + ['text_files'])} or a prepared TFDS name")
  files = RAW_FILES[corpus]
  if corpus == "enwiki2015":  # held out by article (gptjax/data/enwiki.py)
    if split not in enwiki.SPLITS:
      raise ConfigError(f"corpus {corpus!r} has no split {split!r}; it has: {', '.join(enwiki.SPLITS)}")
    return [_doc(d) for d in enwiki.documents(raw_file(files["all"], raw_dir), split)]
  if corpus in ("tiny_shakespeare", "tinystories"):
    text = read_text(raw_file(files["all"], raw_dir), stats)
    parts = shakespeare_docs(text) if corpus == "tiny_shakespeare" else story_docs(text)
    return [_doc(d) for d in _contiguous_splits(parts)[split]]
  if split not in files:
    raise ConfigError(f"corpus {corpus!r} has no split {split!r}; it has: {', '.join(files)}")
  path = raw_file(files[split], raw_dir)
  if corpus == "wikitext2":
    return [_doc(d) for d in wikitext_docs(read_text(path, stats))]
  if corpus == "sst2":
    lines = read_text(path, stats).replace("\r\n", "\n").split("\n")[1:]
    return [_doc(s.strip(), int(l)) for s, l in (ln.rsplit("\t", 1) for ln in lines if "\t" in ln)]
  rows = [json.loads(ln) for ln in read_text(path, stats).split("\n") if ln.strip()]
  random.Random(0).shuffle(rows)  # the file is sorted by label
  return [_doc(r["text"].replace("<br />", "\n"), int(r["label"])) for r in rows]


class GptjaxCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One TFDS builder for every gptjax corpus; its name is the corpus name, its config the raw files'
  fingerprint (so edited raw files give a fresh build)."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, corpus: str, raw_dir: str, text_files: str = "", **kwargs):
    self.corpus, self.raw_dir, self.text_files = corpus, raw_dir, text_files
    self.name = corpus if corpus != "text_files" else "text_files_" + hashlib.sha256(
        text_files.encode()).hexdigest()[:8]
    fp = raw_fingerprint(corpus, raw_dir, text_files)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # tfds warns about every config not in BUILDER_CONFIGS
    try:
      super().__init__(config=tfds.core.BuilderConfig(name=f"raw_{fp}"), **kwargs)
    finally:
      absl_logger.setLevel(level)

  def _log_download_bytes(self) -> None:  # TFDS prints "Downloading and preparing ..." on stdout
    print(f"preparing corpus {self.corpus!r} once into {self.data_dir}", flush=True)

  def _log_download_done(self) -> None:
    pass

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True, metadata=tfds.core.MetadataDict(),
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(), "text_b": tfds.features.Text(), "label": np.int32}))

  def _split_generators(self, dl_manager):
    del dl_manager
    splits = {"tiny_shakespeare": ("train", "validation", "test"),
              "tinystories": ("train", "validation", "test"),
              "enwiki2015": enwiki.SPLITS,
              "text_files": ("train", "validation")}.get(self.corpus, tuple(RAW_FILES.get(self.corpus, {})))
    counts, docs = [], {}
    for s in splits:
      stats = {}
      docs[s] = load_documents(self.corpus, s, self.raw_dir, self.text_files, stats)
      counts.append(stats.get("invalid_utf8", 0))
      if not docs[s]:
        raise ConfigError(f"corpus {self.corpus!r} split {s!r} is empty: its raw files hold no text")
    one_file = self.corpus in ("tiny_shakespeare", "tinystories", "text_files", "enwiki2015")  # every split reads it
    self.info.metadata["invalid_utf8"] = int(counts[0] if one_file else sum(counts))
    return {s: self._generate_examples(docs[s]) for s in splits}

  def _generate_examples(self, docs) -> Iterator:
    for i, d in enumerate(docs):
      yield f"{i:08d}", d


def _builder(config) -> GptjaxCorpus:
  d = config.data
  builder = GptjaxCorpus(corpus=d.corpus, raw_dir=raw_data_dir(d.raw_dir), text_files=d.text_files,
                         data_dir=tfds_dir(d.tfds_data_dir), file_format="array_record")
  if not builder.info.splits:
    builder.download_and_prepare()
  return builder


def is_builtin(corpus: str) -> bool:
  """Whether `corpus` is one of gptjax's own builders (else: a TFDS dataset prepared by name)."""
  return corpus in RAW_FILES or corpus == "text_files"


def data_source(config, split: str):
  """A random-access source of documents, built once into array_record files."""
  d = config.data
  if not is_builtin(d.corpus):
    offline = bool(os.environ.get("GPTJAX_OFFLINE"))
    try:  # a dataset the user prepared with TFDS
      return tfds.data_source(d.corpus, split=split, data_dir=d.tfds_data_dir or None,
                              download=not offline)
    except Exception as e:  # pylint: disable=broad-except
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      if offline:
        raise ConfigError(f"config.data.corpus={d.corpus!r} is not prepared under "
                          f"{d.tfds_data_dir or 'TFDS default data_dir'} and GPTJAX_OFFLINE=1 "
                          "forbids downloading it; prepare it there first (tfds build) or unset "
                          f"GPTJAX_OFFLINE ({msg[:100]})") from e
      raise ConfigError(f"config.data.corpus={d.corpus!r} is neither a gptjax corpus nor a "
                        f"prepared TFDS dataset under config.data.tfds_data_dir ({msg})") from e
  builder = _builder(config)
  if split not in builder.info.splits:
    raise ConfigError(f"corpus {d.corpus!r} has no split {split!r}; it has: "
                      f"{', '.join(builder.info.splits)}")
  return builder.as_data_source(split=split)


def invalid_utf8_count(config) -> int:
  """How many invalid UTF-8 sequences were replaced (U+FFFD) while building the corpus."""
  if not is_builtin(config.data.corpus):
    return 0
  return int(_builder(config).info.metadata.get("invalid_utf8", 0))


def _text(value) -> str:
  return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def documents(config, split: str) -> list[dict]:
  """The documents of a split in stored order (the first config.data.max_docs when set, and of
  train the first config.data.train_docs when set)."""
  source = data_source(config, split)
  n = len(source)
  for limit in (config.data.max_docs, config.data.train_docs if split == "train" else 0):
    n = min(n, limit) if limit else n
  records = source.__getitems__(list(range(n))) if n else []
  out = []
  for r in records:
    text = _text(r.get("text", r.get("sentence", r.get("content", b""))))
    out.append({"text": text, "text_b": _text(r.get("text_b", b"")), "label": int(r.get("label", -1))})
  if not out or not any(d["text"].strip() for d in out):
    raise ConfigError(f"config.data.corpus={config.data.corpus!r} split {split!r} is empty")
  return out
