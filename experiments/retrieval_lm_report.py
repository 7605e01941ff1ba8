"""Tables, plot and the word-coverage diagnostic of experiments/retrieval_lm.py."""

import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"(?u)\b\w\w+\b")  # the BM25 index's own token pattern


def content_words(text: str) -> set:
  """Lower-cased words of two or more characters, English stopwords removed (as BM25 sees them)."""
  from bm25s.stopwords import STOPWORDS_EN  # pylint: disable=g-import-not-at-top
  return {w for w in _WORD.findall(text.lower()) if w not in STOPWORDS_EN}


def new_word_recall(blocks: Sequence[str], contexts: Sequence[str],
                    docs_per_window: Sequence[Sequence[str]]) -> float:
  """Mean share of each block's content words that its passages hold and its context does not.

  This is what retrieval can add: a word the LM already read in its own context is no news. The
  oracle row (the block itself) gives the ceiling; random passages, the chance level.
  """
  shares = []
  for block, context, docs in zip(blocks, contexts, docs_per_window):
    fresh = content_words(block) - content_words(context)
    if fresh:
      shares.append(len(fresh & content_words(" ".join(docs))) / len(fresh))
  return float(np.mean(shares)) if shares else 0.0


def summarise(results: dict, stride: int, seed: int) -> dict:
  """Perplexity with a 95% bootstrap interval over blocks, and the paired change against none."""
  rng = np.random.default_rng(seed)
  base = np.asarray(results["none"]) / stride
  n = len(base)
  picks = rng.integers(0, n, (2000, n))
  table = {}
  for name, nll in results.items():
    loss = np.asarray(nll) / stride
    boot = np.exp(loss[picks].mean(1))
    diff = (loss - base)[picks].mean(1)
    lo, hi = np.percentile(diff, [2.5, 97.5])
    verdict = "same as none" if name == "none" else \
        ("helps" if hi < 0 else "hurts" if lo > 0 else "no significant change")
    table[name] = {"perplexity": float(np.exp(loss.mean())),
                   "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
                   "loss_change": float((loss - base).mean()), "loss_change_ci95": [float(lo), float(hi)],
                   "verdict": verdict, "blocks": n}
  return table


def plot(table: dict, ks, path: str) -> None:
  """Change in loss against no retrieval (paired 95% interval over blocks) for each retriever and k."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  ax.axhline(0.0, color="k", lw=1, label=f"no retrieval (ppl {table['none']['perplexity']:.1f})")
  if "oracle" in table:
    ax.axhline(table["oracle"]["loss_change"], color="grey", ls="--", lw=1,
               label="oracle: the evaluated block in context")
  kinds = [k for k in ("bm25", "dense", "random") if f"{k}_k{ks[0]}" in table]
  for n, kind in enumerate(kinds):
    ys = [table[f"{kind}_k{k}"] for k in ks]
    x = np.asarray(ks, float) * (1 + 0.04 * (n - 1))
    mid = np.asarray([y["loss_change"] for y in ys])
    ci = np.asarray([y["loss_change_ci95"] for y in ys]).T
    ax.errorbar(x, mid, yerr=np.abs(ci - mid), capsize=3, marker="o", label=kind)
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("retrieved passages k")
  ax.set_ylabel("loss change vs no retrieval (nats/token)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)




def write_markdown(path: str, record: dict) -> str:
  """results.md: the header naming command, date, commit and wall time, then the table; returns it."""
  p, table = record["settings"], record["results"]
  titled = ", each under its article's title" if p.get("passage_titles") else ""
  lines = [f"`{record['command']}`, {record['date']}, commit {record['commit']}, "
           f"{record['wall_seconds'] / 60:.1f} min wall (this invocation); {record['passages']} "
           f"train passages of {p['passage_words']} words{titled}; {p['windows']} "
           f"{p.get('eval_corpus', 'wikitext2')} validation "
           f"blocks of {p['stride']} tokens, queried by the {p['query_tokens']} tokens before "
           f"each; context {p['seq_len']} tokens, at most {p['doc_budget']} of them retrieved "
           "text. `oracle` is not retrieval: it prepends the evaluated block itself, the most "
           "that in-context text can give this LM. `new words`: the share of each block's content "
           "words that the prepended text holds and the LM's own context does not.", "",
           "| setting | perplexity | 95% CI | loss change vs none (nats/token) | 95% CI | verdict "
           "| new words |", "|---|---|---|---|---|---|---|"]
  for name, r in table.items():
    recall = f"{r['new_word_recall']:.3f}" if "new_word_recall" in r else ""
    lines.append(f"| {name} | {r['perplexity']:.2f} | {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f} | "
                 f"{r['loss_change']:+.4f} | {r['loss_change_ci95'][0]:+.4f} to "
                 f"{r['loss_change_ci95'][1]:+.4f} | {r['verdict']} | {recall} |")
  text = "\n".join(lines) + "\n"
  with open(path, "w") as f:
    f.write(text)
  return text
