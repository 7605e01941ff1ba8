"""The enwiki2015 corpus: WikiExtractor output of the first 6,514 articles of a May 2015 dump.

The raw file (shared/data/enwiki2015/wiki_AA.txt.gz, see SOURCES.md) holds articles as
`<doc id=".." url=".." title="..">`, the title, a blank line, one paragraph per line, `</doc>`.
An article becomes one document: its title line, then its paragraphs as lines (section
headings such as `History.` stay lines of their own). Extraction leftovers are cleaned:
empty template parentheses `()` / `( ; ...`, `<ref>` tags, `[[link|text]]` brackets and
`{{...}}` templates. The `formula_N` / `codice_N` placeholders stay (they are words the model
can learn). Title-only articles are dropped, and so are the 8 articles WikiText-2 also holds,
so that a model pre-trained here is never evaluated on wikitext2 text it trained on.

Held-out split by article: a stable hash of the page id puts 2% of the articles in
`validation`, 2% in `test`, the rest in `train` (stored in dump order within each split).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import re

RAW = "enwiki2015/wiki_AA.txt.gz"
SPLITS = ("train", "validation", "test")
WIKITEXT2_OVERLAP = frozenset({"Allah", "Antimony", "Cadmium", "Cell nucleus", "Chagas disease",
                               "Condom", "Europium", "Politics of Croatia"})
_DOC_START = re.compile(r'^<doc id="(\d+)" url="[^"]*" title="([^"]*)">$')
_CLEANUPS = (
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|</?ref[^>]*>"), ""),
    (re.compile(r"\{\{[^{}]*\}\}"), ""),
    (re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]"), r"\1"),
    (re.compile(r"\s?\(\s*[,;]?\s*\)"), ""),  # "Apollo ()" or "( ; )": a removed template
    (re.compile(r"\(\s*[,;]\s*"), "("),  # "Augustus (; Latin ...)" -> "(Latin ...)"
    (re.compile(r"  +"), " "),
)


def clean_line(line: str) -> str:
  """One paragraph with WikiExtractor's leftover markup removed."""
  for pattern, replacement in _CLEANUPS:
    line = pattern.sub(replacement, line)
  return line.strip()


def split_of(page_id: str) -> str:
  """train / validation / test for an article, from a stable hash of its page id (2% + 2%)."""
  bucket = int(hashlib.sha256(page_id.encode()).hexdigest()[:8], 16) % 50
  return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def parse_articles(text: str) -> list[tuple[str, str, str]]:
  """(page id, title, document text) per article, in file order, before any filtering."""
  out, page_id, title, lines = [], None, "", []
  for raw in text.split("\n"):
    m = _DOC_START.match(raw)
    if m:
      page_id, title, lines = m.group(1), m.group(2), []
      continue
    if raw == "</doc>":
      if page_id is not None:
        if lines and lines[0] == title:
          lines = lines[1:]
        out.append((page_id, title, "\n".join([title] + lines)))
      page_id = None
      continue
    if page_id is not None and raw.strip():
      cleaned = clean_line(raw)
      if cleaned:
        lines.append(cleaned)
  return out


@functools.lru_cache(maxsize=2)
def _articles(path: str) -> tuple:
  with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
    return tuple(parse_articles(f.read()))


def documents(path: str, split: str) -> list[str]:
  """The article texts of `split`: non-empty articles not in WikiText-2, in dump order."""
  return [text for page_id, title, text in _articles(path)
          if split_of(page_id) == split and "\n" in text and title not in WIKITEXT2_OVERLAP]
