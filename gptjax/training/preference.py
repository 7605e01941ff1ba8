"""Preference data for DPO: {prompt, chosen, rejected} records, pair examples, the frozen reference.

The reference model is the `config.init_from` checkpoint (with LoRA: the base weights, adapters
off, which are the same numbers). Its sequence log-probs of every pair are computed once before
training, cached under $GPTJAX_CACHE/dpo_reference by a key over the data, tokenizer, model config
and checkpoint, and carried in the batches, so the train step holds no second copy of the model.
The loss itself lives with the others in gptjax/training/objectives.py (`objectives.dpo`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from gptjax.data import jsonl_records
from gptjax.model import family as model_family

from gptjax.training import objectives
from gptjax.config_schema import ConfigError

FIELDS = ("prompt", "chosen", "rejected")
LOSSES = ("sigmoid", "ipo")


def validate_config(c) -> None:
  """One-line ConfigErrors for a dpo run, before anything loads or compiles."""
  d = c.dpo
  if not d.beta > 0:
    raise ConfigError(f"config.dpo.beta={d.beta} must be positive (the paper uses 0.1 to 0.5)")
  if not 0.0 <= d.label_smoothing < 0.5:
    raise ConfigError(f"config.dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
  if d.loss not in LOSSES:
    raise ConfigError(f"config.dpo.loss={d.loss!r} is not supported; allowed: {', '.join(LOSSES)}")
  if not c.finetune.preference_data:
    raise ConfigError("config.objective='dpo' needs config.finetune.preference_data=PATH.jsonl "
                      "(records with prompt, chosen, rejected)")
  if not c.init_from:
    raise ConfigError("config.objective='dpo' needs config.init_from=WORKDIR or hf:DIR: the "
                      "fine-tuned model to start from, which is also the frozen reference")
  for path in data_files(c):  # every record's fields, before anything compiles
    load_preference_jsonl(path)


def load_preference_jsonl(path: str) -> list[dict]:
  """Records {prompt, chosen, rejected} from JSONL; one-line ConfigError naming a bad record."""
  return jsonl_records.read_records(path, "preference data", FIELDS)


def split_records(config, split: str) -> list[dict]:
  """The split's records: preference_eval_data for eval when given, else every 20th held out."""
  f = config.finetune
  if split != "train" and f.preference_eval_data:
    return load_preference_jsonl(f.preference_eval_data)
  records = load_preference_jsonl(f.preference_data)
  if f.preference_eval_data:
    return records[:config.data.max_docs or None]
  keep = (lambda i: i % 20 != 19) if split == "train" else (lambda i: i % 20 == 19)
  chosen = [r for i, r in enumerate(records) if keep(i)]
  if not chosen:
    raise ConfigError(f"config.finetune.preference_data={f.preference_data!r} has too few records "
                      f"for a {split} split (every 20th is held out); give preference_eval_data")
  return chosen[:config.data.max_docs or None]


def _pad(x: Sequence[int], n: int, value: int = 0) -> np.ndarray:
  x = np.asarray(list(x)[:n], np.int32)
  return np.pad(x, (0, n - len(x)), constant_values=value)


def response_row(prompt_ids: Sequence[int], response_ids: Sequence[int], family: str, L: int,
                 T: int, pad_id: int, start_id: int) -> Optional[dict[str, np.ndarray]]:
  """inputs, targets, weights (response only), mask of one side; None when the prompt fills L.

  `response_ids` include the EOS when the response ended.
  """
  if model_family.get(family).cross_attention:  # the prompt is in the encoder
    if not response_ids:
      return None
    dec = [start_id] + list(response_ids[:-1])
    n = min(len(response_ids), T)
    return {"inputs": _pad(dec, T, pad_id), "targets": _pad(response_ids, T, pad_id),
            "weights": _pad([1] * n, T).astype(np.float32), "mask": _pad([1] * n, T)}
  p = len(prompt_ids)
  if p == 0 or p > L or not response_ids:
    return None
  ids = (list(prompt_ids) + list(response_ids))[:L + 1]
  n = len(ids) - 1
  return {"inputs": _pad(ids[:-1], L, pad_id), "targets": _pad(ids[1:], L, pad_id),
          "weights": np.asarray([1.0 if p - 1 <= t < n else 0.0 for t in range(L)], np.float32),
          "mask": _pad([1] * n, L)}


def prompt_row(prompt_ids: Sequence[int], family: str, L: int, pad_id: int, eos_id: Optional[int]
               ) -> Optional[dict[str, np.ndarray]]:
  """prompt_inputs, prompt_mask: the encoder input (with EOS) or, for decoders, the prompt alone."""
  in_encoder = model_family.get(family).cross_attention
  ids = list(prompt_ids) + ([eos_id] if in_encoder and eos_id is not None else [])
  if not prompt_ids or len(ids) > L:
    return None
  return {"prompt_inputs": _pad(ids, L, pad_id), "prompt_mask": _pad([1] * len(ids), L)}


def start_id_of(tokenizer) -> int:
  """The decoder start token of an encoder-decoder (T5's pad convention)."""
  return tokenizer.pad_id if tokenizer.pad_id is not None else 0


class PairSource:
  """The encoded pairs of one split; `skipped` counts prompts that leave no room for a response."""

  def __init__(self, config, tokenizer, split: str):
    # every split but train is the held-out one, whatever the corpus calls it
    self.config, self.split = config, "train" if split == "train" else "eval"
    family, d = config.model.family, config.data
    L, T = d.seq_len, d.target_len or d.seq_len
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    eos = tokenizer.eos_id
    start = start_id_of(tokenizer)
    self.rows: list[dict[str, np.ndarray]] = []
    self.skipped = 0
    records = split_records(config, split)
    for rec in records:
      prompt = tokenizer.encode(rec["prompt"])
      head = prompt_row(prompt, family, L, pad, eos)
      sides = {}
      for side in ("chosen", "rejected"):
        response = tokenizer.encode(rec[side]) + ([eos] if eos is not None else [])
        sides[side] = response_row(prompt, response, family, L, T, pad, start)
      if head is None or sides["chosen"] is None or sides["rejected"] is None:
        self.skipped += 1
        continue
      row = dict(head)
      for side, r in sides.items():
        row.update({f"{side}_{k}": v for k, v in r.items()})
      row["pair_weights"] = np.float32(1.0)
      self.rows.append(row)
    self.total = len(records)
    if not self.rows:
      raise ConfigError(f"every one of the {self.total} {split} preference records has a prompt "
                        f"that leaves no room for the response in config.data.seq_len={L}; raise "
                        "seq_len or shorten the prompts")
    self.reference: Optional[np.ndarray] = None  # [n, 2]: reference log-probs, chosen and rejected

  def __len__(self) -> int:
    return len(self.rows)

  def example(self, i: int) -> dict[str, np.ndarray]:
    """Pair i with its reference log-probs."""
    if self.reference is None:
      self.reference = load_reference(self.config, self)
    row = dict(self.rows[i])
    row["ref_chosen_logp"] = np.float32(self.reference[i, 0])
    row["ref_rejected_logp"] = np.float32(self.reference[i, 1])
    return row


# ------------------------------------------------------------------ the frozen reference
def reference_identity(config) -> str:
  """What names the reference checkpoint: its files' names, sizes and modification times."""
  source = config.init_from
  root = source[3:] if source.startswith("hf:") else os.path.join(source, "checkpoints")
  parts = [source]
  for dirpath, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      parts.append(f"{os.path.relpath(path, root)}:{st.st_size}:{st.st_mtime_ns}")
  return "|".join(parts)


def _cache_path(config, source: PairSource) -> str:
  cache = os.environ.get("GPTJAX_CACHE", os.path.expanduser("~/.cache/gptjax"))
  digest = hashlib.sha256()
  for row in source.rows:
    for k in sorted(row):
      digest.update(np.ascontiguousarray(row[k]).tobytes())
  digest.update(reference_identity(config).encode())
  digest.update(config.model.to_json_best_effort().encode())
  return os.path.join(cache, "dpo_reference", f"{source.split}-{digest.hexdigest()[:20]}.npz")


def load_reference(config, source: PairSource) -> np.ndarray:
  """The cached reference log-probs of `source`; one line saying how to compute them if absent."""
  path = _cache_path(config, source)
  if not os.path.exists(path):
    raise ConfigError(f"no reference log-probs for the {source.split} preference pairs ({path}); "
                      "run.py --mode=train computes them from config.init_from before training")
  with np.load(path) as z:
    return z["logps"]


def _logps_fn(model):
  @jax.jit
  def fn(params, batch):
    c, _, r, _ = objectives.pair_logps(model, params, batch, jax.random.key(0), True)
    return jnp.stack([c, r], axis=-1)
  return fn


def ensure_reference(config, source: PairSource, model, ref_params_fn, batch_size: int,
                     progress: bool = True) -> np.ndarray:
  """Computes (once) and caches the reference's sequence log-probs of every pair of `source`.

  `ref_params_fn()` returns the reference params; it is called only when the cache misses.
  """
  path = _cache_path(config, source)
  if os.path.exists(path):
    with np.load(path) as z:
      source.reference = z["logps"]
    return source.reference
  params = ref_params_fn()
  fn = _logps_fn(model)
  out = np.zeros((len(source), 2), np.float32)
  keys = [k for k in source.rows[0]]
  for s in tqdm.trange(0, len(source), batch_size, disable=not progress,
                       desc=f"reference log-probs ({source.split})"):
    rows = source.rows[s:s + batch_size]
    n = len(rows)
    rows = rows + [rows[-1]] * (batch_size - n)  # one compiled shape
    batch = {k: np.stack([r[k] for r in rows]) for k in keys}
    out[s:s + n] = np.asarray(fn(params, batch))[:n]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, logps=out)
  os.replace(tmp, path)
  source.reference = out
  return out


def prepare_reference(config, model, tokenizer, is_main: bool, load_init_params):
  """Caches the reference log-probs of the train and eval pairs (computed once from init_from).

  Returns (the reference params for the held-out KL, None with LoRA, whose base weights in the
  state are the reference; counts of pairs and skipped records for the manifest).
  """
  loaded = {}

  def reference_params():
    if "params" not in loaded:
      loaded["params"] = load_init_params()
    return loaded["params"]

  info = {}
  for split in ("train", "validation"):
    source = PairSource(config, tokenizer, split)
    ensure_reference(config, source, model, reference_params, config.data.eval_batch_size,
                     is_main and config.train.progress)
    info[f"dpo_{split}_pairs"], info[f"dpo_{split}_skipped"] = len(source), source.skipped
    if source.skipped and is_main:
      print(f"dpo: skipped {source.skipped} of {source.total} {split} records whose prompt leaves "
            f"no room for the response in config.data.seq_len={config.data.seq_len}", flush=True)
  if config.finetune.trainable == "lora":
    return None, info
  return reference_params(), info


# ------------------------------------------------------------------ KL to the reference
def heldout_kl(config, tokenizer, model, policy_params, ref_params, prompts: Sequence[str],
               seed: int = 0) -> dict[str, float]:
  """KL(policy || reference) on held-out prompts, estimated from policy samples at temperature 1.

  Returns the mean over prompts of log pi(y|x) - log pi_ref(y|x) for y ~ pi(.|x), with its
  standard error, and the mean sampled length.
  """
  from gptjax.inference import decode  # pylint: disable=g-import-not-at-top
  family, d = config.model.family, config.data
  in_encoder = model_family.get(family).cross_attention
  L, T = d.seq_len, d.target_len or d.seq_len
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  eos, start = tokenizer.eos_id, start_id_of(tokenizer)
  prompt_ids = [tokenizer.encode(p) for p in prompts]
  prompt_ids = [p for p in prompt_ids if p and len(p) < (L - 1 if in_encoder else L)]
  if not prompt_ids:
    return {}
  longest = max(len(p) for p in prompt_ids)
  room = T if in_encoder else L - longest
  n_new = max(1, min(int(config.generate.max_new_tokens), room))
  settings = decode.DecodeSettings(max_new_tokens=n_new, temperature=1.0)
  outs = decode.generate(model, policy_params, prompt_ids, settings, eos, pad,
                         rng=jax.random.key(seed), start_id=start)
  rows = []
  for p, y in zip(prompt_ids, outs):
    response = list(y) + ([eos] if eos is not None and len(y) < n_new else [])
    side = response_row(p, response or [eos if eos is not None else pad], family, L, T, pad, start)
    row = dict(prompt_row(p, family, L, pad, eos))
    for name in ("chosen", "rejected"):
      row.update({f"{name}_{k}": v for k, v in side.items()})
    rows.append(row)
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  fn = _logps_fn(model)
  diff = np.asarray(fn(policy_params, batch))[:, 0] - np.asarray(fn(ref_params, batch))[:, 0]
  return {"dpo_kl": float(diff.mean()),
          "dpo_kl_stderr": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0,
          "dpo_sample_length": float(np.mean([len(y) for y in outs]))}


def heldout_prompts(config, n: int) -> list[str]:
  """The first `n` prompts of the eval split."""
  return [r["prompt"] for r in split_records(config, "validation")[:n]]


def data_files(config) -> list[str]:
  """The preference files a dpo run reads (for the data fingerprint)."""
  f = config.finetune
  return [p for p in (f.preference_data, f.preference_eval_data) if p]

