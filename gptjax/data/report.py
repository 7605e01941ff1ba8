"""`run.py --mode=data`: decoded examples of the configured objective, then its statistics.

The last line is `key=value` pairs, e.g. for BERT
`mask_rate=0.150 mask_token=0.800 random=0.100 kept=0.100 is_next=0.500`.
"""

from __future__ import annotations

import time

import numpy as np

from gptjax.data import corpora

from gptjax.data import input_pipeline

from gptjax.data import tokenization

NUM_SHOWN = 2
STAT_ROWS = 2048  # rows drawn for the statistics


def _pieces(tok, ids, limit: int = 48) -> str:
  return " ".join(tok.id_to_token(int(i)) or "?" for i in ids[:limit]) + (" ..." if len(ids) > limit else "")


def _mlm_view(tok, b, row: int) -> str:
  """Tokens with the chosen positions visible: [MASK>orig], {random>orig}, <kept>."""
  out = []
  for i in range(int(b["input_mask"][row].sum())):
    inp, tgt = int(b["inputs"][row, i]), int(b["targets"][row, i])
    piece = tok.id_to_token(tgt)
    if b["weights"][row, i]:
      piece = f"[MASK>{piece}]" if inp == tok.mask_id else \
          (f"<{piece}>" if inp == tgt else f"{{{tok.id_to_token(inp)}>{piece}}}")
    if "token_type_ids" in b and i and b["token_type_ids"][row, i] != b["token_type_ids"][row, i - 1]:
      out.append("||B:")
    out.append(piece)
  return " ".join(out)


def show_example(config, tok, b, row: int) -> None:
  """Prints one row of a batch with its masks, segments and targets visible."""
  obj = config.objective
  print(f"--- example {row} ({obj})")
  if obj == "next_token":
    seg = b["segment_ids"][row]
    print(f"segments: {len(np.unique(seg[seg > 0]))}  positions[:16]: {b['positions'][row][:16].tolist()}")
    print("inputs :", repr(tok.decode(b["inputs"][row], skip_special=False)[:400]))
    print("targets:", _pieces(tok, b["targets"][row], 16))
  elif obj == "prefix_lm":
    p = int(b["prefix_mask"][row].sum())
    print("prefix :", repr(tok.decode(b["inputs"][row][:p])[:300]))
    print("suffix (loss):", repr(tok.decode(b["targets"][row][b["weights"][row] > 0])[:300]))
  elif obj in ("mlm", "mlm_nsp"):
    print(_mlm_view(tok, b, row))
  elif obj in ("nsp", "sop"):
    n = int(b["input_mask"][row].sum())
    print(_pieces(tok, b["inputs"][row][:n], 64), " token_type B from",
          int(np.argmax(b["token_type_ids"][row])))
  elif obj in ("span_corruption", "denoise"):
    enc = b["enc_inputs"][row][b["enc_mask"][row] > 0]
    print("encoder :", repr(tok.decode(enc, skip_special=False)[:400]))
    print("targets :", repr(tok.decode(b["dec_targets"][row][b["dec_weights"][row] > 0],
                                       skip_special=False)[:400]))
  else:
    n = int(b["input_mask"][row].sum())
    print(f"label={int(b['labels'][row])}:", repr(tok.decode(b["inputs"][row][:n], skip_special=False)[:300]))
  if "pair_labels" in b:
    name = "is_next" if obj != "sop" and not config.data.sop else "in_order"
    print(f"{name}={int(b['pair_labels'][row])}")


def statistics(config, tok, batches: list[dict]) -> dict[str, float]:
  """The objective's corruption statistics over `batches` (what the summary line prints)."""
  cat = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  obj, stats = config.objective, {}
  if "weights" in cat and obj in ("mlm", "mlm_nsp"):
    special = np.isin(cat["targets"], list(tok.special_ids | {tok.pad_id}))
    chosen = cat["weights"] > 0
    stats["mask_rate"] = chosen.sum() / max(1, (~special).sum())
    is_mask = chosen & (cat["inputs"] == tok.mask_id)
    kept = chosen & (cat["inputs"] == cat["targets"])
    stats["mask_token"] = is_mask.sum() / max(1, chosen.sum())
    stats["random"] = (chosen & ~is_mask & ~kept).sum() / max(1, chosen.sum())
    stats["kept"] = kept.sum() / max(1, chosen.sum())
  if "pair_labels" in cat:
    stats["in_order" if obj == "sop" or config.data.sop else "is_next"] = cat["pair_labels"].mean()
  if obj == "span_corruption":
    sentinels = np.isin(cat["dec_targets"], tok.sentinel_ids)
    real = cat["dec_weights"] > 0
    spans = sentinels.sum()
    noise = (real & ~sentinels & (cat["dec_targets"] != tok.eos_id)).sum()
    kept = cat["enc_mask"].sum() - spans - len(cat["enc_mask"])  # minus sentinels and EOS
    stats["noise_density"] = noise / max(1, noise + kept)
    stats["mean_span"] = noise / max(1, spans)
  if obj == "denoise":
    stats["masks_per_row"] = (cat["enc_inputs"] == tok.mask_id).sum() / len(cat["enc_inputs"])
    stats["enc_len"] = cat["enc_mask"].sum(1).mean()
  if obj == "next_token":
    stats["fill"] = (cat["segment_ids"] > 0).mean()
    stats["docs_per_row"] = np.mean([len(np.unique(r[r > 0])) for r in cat["segment_ids"]])
  if obj in ("prefix_lm", "classification"):
    stats["fill"] = cat["input_mask"].mean()
  if obj == "classification":
    stats["positive"] = cat["labels"].mean()
  return {k: float(v) for k, v in stats.items()}


def main(config, workdir, flag_values=None) -> dict[str, float]:
  """Prints decoded examples and statistics of config's train pipeline; returns the statistics."""
  del flag_values
  t0 = time.time()
  tok = tokenization.load_or_train_tokenizer(config, workdir)
  examples = input_pipeline.example_source(config, tok, "train")
  print(f"corpus={config.data.corpus} objective={config.objective} tokenizer={config.data.tokenizer.kind}"
        f" vocab={tok.vocab_size} examples={len(examples)} seq_len={config.data.seq_len} "
        f"invalid_utf8={corpora.invalid_utf8_count(config)}"
        + (f" one_sentence_docs_skipped={examples.skipped_docs}"
           if hasattr(examples, "skipped_docs") else ""))
  it = input_pipeline.make_train_iterator(config, tok, process_index=0, process_count=1)
  batches = [next(it) for _ in range(max(1, STAT_ROWS // config.data.batch_size))]
  for row in range(min(NUM_SHOWN, config.data.batch_size)):
    show_example(config, tok, batches[0], row)
  stats = statistics(config, tok, batches)
  rows = sum(len(next(iter(b.values()))) for b in batches)
  print(f"--- statistics over {rows} rows ({time.time() - t0:.1f}s)")
  print(" ".join(f"{k}={v:.3f}" for k, v in stats.items()))
  return stats
