"""Tokenizers from the `tokenizers` library: byte-level BPE, WordPiece (cased/uncased), Unigram.

Trained in seconds from the configured corpus, cached by a fingerprint of
corpus and settings, saved as `tokenizer.json` in the workdir; or loaded from
any existing `tokenizer.json` / `vocab.txt`.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from gptjax.config_schema import ConfigError

KINDS = ("bpe", "wordpiece", "wordpiece_cased", "unigram")
# role -> names a role may go by, first match wins (covers GPT-2, BERT, T5 and BART vocabularies)
ROLE_NAMES = {
    "pad": ("<pad>", "[PAD]"),
    "unk": ("<unk>", "[UNK]"),
    "bos": ("<s>", "[CLS]", "<|endoftext|>"),
    "eos": ("</s>", "<|endoftext|>", "[SEP]"),
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "mask": ("[MASK]", "<mask>"),
}
# each family's special tokens, in id order (T5's sentinels <extra_id_N> follow its three)
SPECIALS = {
    "gpt": ["<|endoftext|>", "<pad>"],
    "bart": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "t5": ["<pad>", "</s>", "<unk>"],
}
# roles each objective needs
NEEDED = {"next_token": ("eos", "pad"), "prefix_lm": ("eos", "pad"),
          "mlm": ("cls", "sep", "mask", "pad"), "nsp": ("cls", "sep", "pad"),
          "sop": ("cls", "sep", "pad"), "mlm_nsp": ("cls", "sep", "mask", "pad"),
          "span_corruption": ("eos", "pad", "sentinels"), "denoise": ("bos", "eos", "mask", "pad"),
          "classification": ("eos", "pad")}


class TextTokenizer:
  """A `tokenizers.Tokenizer` with the ids of its special roles."""

  def __init__(self, tok: tokenizers.Tokenizer):
    # a pretrained tokenizer.json may pad or truncate every encoding (all-MiniLM-L6-v2 pads
    # batches to the longest row): the pipelines place specials and padding themselves
    tok.no_padding()
    tok.no_truncation()
    self.tok = tok
    vocab = tok.get_vocab()
    # a special token may also have been learned as a piece from text that spells it (wikitext's
    # literal "<unk>"): the lowest id, where the specials sit, wins
    vocab.update({t.content: i for i, t in tok.get_added_tokens_decoder().items()})
    vocab.update({tok.id_to_token(i): i for i in reversed(range(min(len(vocab), 2048)))})
    for role, names in ROLE_NAMES.items():
      setattr(self, f"{role}_id", next((vocab[n] for n in names if n in vocab), None))
    sentinels = sorted(((int(k[len("<extra_id_"):-1]), v) for k, v in vocab.items()
                        if k.startswith("<extra_id_") and k.endswith(">")))
    self.sentinel_ids = [v for _, v in sentinels] or None
    self.special_ids = frozenset(v for k, v in vocab.items() if k in
                                 {n for names in ROLE_NAMES.values() for n in names}
                                 or k.startswith("<extra_id_"))

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size()

  @property
  def fingerprint(self) -> str:
    return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no special tokens added."""
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts, in parallel."""
    return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    """Text of `ids`."""
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  def id_to_token(self, i: int) -> str:
    """The vocabulary entry of one id."""
    return self.tok.id_to_token(int(i))

  def to_json(self) -> str:
    """The serialized tokenizer (tokenizer.json contents)."""
    return self.tok.to_str()

  def save(self, directory: str) -> str:
    """Writes `tokenizer.json` into `directory`; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tmp = path + ".tmp"
    self.tok.save(tmp)
    os.replace(tmp, path)
    return path


def tokenizer_from_json(text: str) -> TextTokenizer:
  """A TextTokenizer from tokenizer.json contents."""
  return TextTokenizer(tokenizers.Tokenizer.from_str(text))


def load_tokenizer_file(path: str, lowercase: bool = True) -> TextTokenizer:
  """A tokenizer.json, or a BERT `vocab.txt` (WordPiece)."""
  if os.path.isdir(path):
    path = next((os.path.join(path, n) for n in ("tokenizer.json", "vocab.txt")
                 if os.path.exists(os.path.join(path, n))), os.path.join(path, "tokenizer.json"))
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.data.tokenizer.path={path} does not exist; give a "
                            "tokenizer.json or vocab.txt, or leave it empty to train one")
  if path.endswith(".txt"):
    tok = tokenizers.Tokenizer(models.WordPiece.from_file(path, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    return TextTokenizer(tok)
  return TextTokenizer(tokenizers.Tokenizer.from_file(path))


def special_scheme(kind: str, family: str) -> str:
  """Whose special tokens a tokenizer of `kind` for a model `family` carries: gpt, bart, bert or t5."""
  if kind not in KINDS:
    raise ConfigError(f"config.data.tokenizer.kind={kind!r} is not supported; allowed: "
                      f"{', '.join(KINDS)}")
  if kind.startswith("wordpiece"):
    return "bert"
  if kind == "unigram":
    return "t5"
  from gptjax.model import family as model_family  # pylint: disable=g-import-not-at-top
  return model_family.get(family).bpe_specials


def required_specials(scheme: str, num_sentinels: int = 0) -> list[str]:
  """The special tokens of `scheme`, sentinels included for t5."""
  extra = [f"<extra_id_{i}>" for i in range(num_sentinels)] if scheme == "t5" else []
  return list(SPECIALS[scheme]) + extra


def check_specials(tokenizer: TextTokenizer, scheme: str, num_sentinels: int, source: str) -> None:
  """Fails in one line when `tokenizer` lacks a special token of its family's scheme."""
  vocab = tokenizer.tok.get_vocab()
  missing = [t for t in required_specials(scheme, num_sentinels) if t not in vocab]
  if missing:
    raise ConfigError(f"{source} does not have the {scheme} special tokens this family needs "
                      f"(missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); "
                      "use a tokenizer of the right family or set config.data.tokenizer.kind")


# Part of the tokenizer cache key: bump a kind's version when train_tokenizer changes what it trains.
# wordpiece 2 and unigram 3: at most alphabet_limit(vocab_size) distinct characters
TRAINER_VERSION = {"bpe": 2, "wordpiece": 2, "wordpiece_cased": 2, "unigram": 3}


def alphabet_limit(vocab_size: int) -> int:
  """How many distinct characters a WordPiece or Unigram vocabulary keeps (the rest are unknown).

  Without a limit every character of the corpus is a piece (WordPiece: twice, `c` and `##c`):
  enwiki2015's thousands of scripts and symbols took 3,529 of a 4,096 WordPiece vocabulary,
  leaving 567 merges and near-character-level text. BERT's own trainer keeps 1,000.
  """
  return min(1000, max(128, vocab_size // 16))


def _common_characters_only(texts: Iterable[str], limit: int) -> list[str]:
  """`texts` without the characters outside the `limit` most frequent ones (Unigram's alphabet).

  The Unigram trainer keeps every character it sees as a piece and has no alphabet limit, so
  rare characters are removed from its training text; encoding maps them to <unk>.
  """
  texts = list(texts)
  counts = collections.Counter()
  for text in texts:
    counts.update(text)
  rare = {ord(c): None for c, _ in counts.most_common()[limit:]}
  return [text.translate(rare) for text in texts] if rare else texts


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, num_sentinels: int = 0,
                    family: str = "") -> TextTokenizer:
  """Trains a tokenizer of `kind` with the special tokens of `family` (default decoder-only)."""
  from gptjax.model import family as model_family  # pylint: disable=g-import-not-at-top
  family = family or model_family.DECODER_ONLY
  specials = required_specials(special_scheme(kind, family), num_sentinels)
  if vocab_size < len(specials) + (256 if kind == "bpe" else 30):
    raise ConfigError(f"config.data.tokenizer.vocab_size={vocab_size} is too small for the "
                      f"{len(specials)} special tokens of {kind!r}; use at least "
                      f"{len(specials) + (256 if kind == 'bpe' else 30)}")
  if kind == "bpe":
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
  elif kind.startswith("wordpiece"):
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=kind == "wordpiece")
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                        limit_alphabet=alphabet_limit(vocab_size),
                                        show_progress=False)
  else:
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      unk_token="<unk>", show_progress=False)
    texts = _common_characters_only(texts, alphabet_limit(vocab_size))
  tok.train_from_iterator(texts, trainer=trainer)
  if kind == "bpe":
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  return TextTokenizer(tok)


def check_roles(tokenizer: TextTokenizer, objective: str, family: str) -> None:
  """Fails in one line when the tokenizer lacks a special token the objective needs."""
  for role in NEEDED.get(objective, ()):
    missing = tokenizer.sentinel_ids is None if role == "sentinels" else \
        getattr(tokenizer, f"{role}_id") is None
    if missing:
      raise ConfigError(f"the tokenizer has no {role} token, which config.objective={objective!r} "
                        f"({family}) needs; use config.data.tokenizer.kind "
                        f"{'unigram' if role == 'sentinels' else 'wordpiece or bpe'} or a "
                        "tokenizer.json that defines it")


def _cache_dir() -> str:
  from gptjax.config_schema import cache_dir  # pylint: disable=g-import-not-at-top
  return os.path.join(cache_dir(), "tokenizers")


def _has_checkpoint(workdir: str) -> bool:
  root = os.path.join(workdir, "checkpoints")
  return os.path.isdir(root) and any(n.isdigit() for n in os.listdir(root))


def _check_fits(tok: TextTokenizer, config, source: str) -> None:
  t, m = config.data.tokenizer, config.model
  scheme = special_scheme(t.kind, m.family)
  sentinels = t.num_sentinels if scheme == "t5" and config.objective == "span_corruption" else 0
  check_specials(tok, scheme, sentinels, source)
  check_roles(tok, config.objective, m.family)
  if tok.vocab_size > m.vocab_size:
    raise ConfigError(f"{source} has {tok.vocab_size} tokens but config.model.vocab_size="
                      f"{m.vocab_size}; raise model.vocab_size or lower data.tokenizer.vocab_size")


def _init_from_tokenizer_path(init_from: str) -> str:
  """The folder of `init_from` (a workdir or hf:DIR) when it holds a tokenizer.json or vocab.txt."""
  directory = init_from[3:] if init_from.startswith("hf:") else init_from
  has_one = directory and any(os.path.exists(os.path.join(directory, n))
                              for n in ("tokenizer.json", "vocab.txt"))
  return directory if has_one else ""


def load_or_train_tokenizer(config, workdir: Optional[str] = None) -> TextTokenizer:
  """The run's tokenizer: workdir's tokenizer.json, config path, cache, or freshly trained."""
  from gptjax.data import corpora  # pylint: disable=g-import-not-at-top
  t, d = config.data.tokenizer, config.data
  scheme = special_scheme(t.kind, config.model.family)
  own = os.path.join(workdir, "tokenizer.json") if workdir else ""
  # a pretrained body (config.init_from) only makes sense with the vocabulary it was trained on
  path = t.path or _init_from_tokenizer_path(config.init_from)
  # a workdir's tokenizer.json counts once a checkpoint was trained with it (a run that failed
  # before its first save may have left one behind)
  if own and os.path.exists(own) and _has_checkpoint(workdir):
    tok, source = load_tokenizer_file(own), own
  elif path:
    tok, source = load_tokenizer_file(path, lowercase=t.kind != "wordpiece_cased"), path
    if scheme == "gpt" and "<pad>" not in tok.tok.get_vocab():  # never pad with <|endoftext|>
      tok.tok.add_special_tokens(["<pad>"])
      tok = TextTokenizer(tok.tok)
  else:
    if t.vocab_size > config.model.vocab_size:
      raise ConfigError(f"config.data.tokenizer.vocab_size={t.vocab_size} is larger than "
                        f"config.model.vocab_size={config.model.vocab_size}")
    corpus_fp = corpora.raw_fingerprint(d.corpus, corpora.raw_data_dir(d.raw_dir), d.text_files) \
        if corpora.is_builtin(d.corpus) else f"{d.corpus}@{d.tfds_data_dir}"
    key = hashlib.sha256(json.dumps([corpus_fp, d.max_docs, t.kind, scheme, t.vocab_size,
                                     t.num_sentinels, tokenizers.__version__,
                                     TRAINER_VERSION.get(t.kind, 1)]
                                    + ([d.train_docs] if d.train_docs else [])).encode()
                         ).hexdigest()[:16]
    cached = os.path.join(_cache_dir(), key, "tokenizer.json")
    source = f"the tokenizer trained for config.data.corpus={d.corpus!r}"
    if os.path.exists(cached):
      tok = load_tokenizer_file(cached)
    else:
      docs = corpora.documents(config, "train")
      texts = (doc["text"] + ("\n" + doc["text_b"] if doc["text_b"] else "") for doc in docs)
      tok = train_tokenizer(t.kind, texts, t.vocab_size, t.num_sentinels, config.model.family)
      tok.save(os.path.dirname(cached))
  _check_fits(tok, config, source)
  if workdir and source != own:
    tok.save(workdir)
  return tok
