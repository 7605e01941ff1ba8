"""Checkpoint analysis: parameter norms, checkpoint diffs, CKA, attention maps, eval loss.

  python run.py --config=configs/gpt.py:tiny --mode=analyze --workdir=W [--other_workdir=W2]
      [--sentence="ROMEO: wherefore"] [--output=DIR]
  python -m gptjax.analysis.checkpoint_analysis --workdir=W [--other_workdir=W2] [--split=validation]

Writes into --output (default W/analysis): params.csv and layers.csv (norms), with a
second checkpoint diff_params.csv / diff_layers.csv (relative change ||a-b||/||a||,
cosine similarity) and cka.csv / cka.png (linear CKA of every layer's hidden states,
both checkpoints on the same batch of real text), attention_<stack>_<kind>.png (one
panel per layer and head for --sentence) and eval.csv (loss and perplexity per
checkpoint). Hidden states and attention probabilities are captured with
`nn.intercept_methods`; the layers themselves are untouched.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gptjax.analysis import plots as analysis_plots
# the tables are read as checkpoint_analysis.<name> by callers and tests
from gptjax.analysis.param_tables import (  # noqa: F401
    _natural, diff_tables, flat, format_table, layer_of, layer_table, param_table, write_csv)

from gptjax.training import checkpointing

from gptjax.model import layers

from gptjax.model import family as model_family
from gptjax.model import models

from gptjax.training import objectives

from gptjax.model import positions
from gptjax.config_schema import ConfigError
from gptjax.model.config import ModelConfig

DEFAULT_SENTENCE = "The quick brown fox jumps over the lazy dog, and the dog sleeps on."


@dataclasses.dataclass
class Checkpoint:
  """A restored checkpoint: its config, float32 params (layers unstacked) and tokenizer."""
  workdir: str
  config: Any
  params: Any
  tokenizer: Any


# ============================================================================ loading
def unstack_layers(params: Any) -> Any:
  """Scanned stacks (`<stack>/layers` with a leading layer axis) -> `<stack>/layers_<i>`."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key == "layers" and isinstance(value, dict) and "layers_0" not in params:
      n = jax.tree.leaves(value)[0].shape[0]
      for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
    else:
      out[key] = unstack_layers(value)
  return out


def analysis_model_config(config) -> ModelConfig:
  """The checkpoint's ModelConfig as an unscanned, un-rematted, deterministic model."""
  cfg = ModelConfig.from_config(config.model)
  return dataclasses.replace(cfg, scan_layers=False, remat="none")


def load(workdir: str) -> Checkpoint:
  """Restores the latest checkpoint of `workdir` for analysis."""
  config, params, tokenizer = checkpointing.restore_for_inference(workdir)
  params = unstack_layers(jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params)))
  return Checkpoint(workdir, config, params, tokenizer)


def check_same_architecture(a: Checkpoint, b: Checkpoint) -> None:
  """Raises ConfigError in one line when two checkpoints' parameters cannot be compared."""
  ma, mb = a.config.model.to_dict(), b.config.model.to_dict()
  ignore = {"scan_layers", "remat", "dtype", "dropout_rate", "attention_dropout_rate",
            "attention_impl"}
  diffs = [f"config.model.{k}: {ma.get(k)!r} vs {mb.get(k)!r}" for k in sorted(set(ma) | set(mb))
           if k not in ignore and ma.get(k) != mb.get(k)]
  shapes_a = {n: x.shape for n, x in flat(a.params)}
  shapes_b = {n: x.shape for n, x in flat(b.params)}
  if not diffs and shapes_a != shapes_b:
    name = next(n for n in sorted(set(shapes_a) | set(shapes_b)) if shapes_a.get(n) != shapes_b.get(n))
    diffs = [f"parameter {name}: {shapes_a.get(name, 'missing')} vs {shapes_b.get(name, 'missing')}"]
  if diffs:
    raise ConfigError(f"{a.workdir} and {b.workdir} have different architectures "
                      f"({'; '.join(diffs[:3])}); diff and CKA need the same model config")


# ============================================================================ capture
class Capture:
  """An interceptor that records layer inputs/outputs and attention internals by module path."""

  def __init__(self):
    self.hidden: dict[str, jax.Array] = {}
    self.attention: dict[str, dict[str, Any]] = {}

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(module.scope.path)
    out = next_fun(*args, **kwargs)
    if isinstance(module, layers.TransformerLayer):
      stack = "/".join(module.scope.path[:-1])
      if module.name == "layers_0":
        self.hidden[f"{stack}/embed"] = args[0]
      self.hidden[path] = out[0]
    elif isinstance(module, layers.Attention):
      bound = inspect.signature(layers.Attention.__call__).bind(module, *args, **kwargs)
      bound.apply_defaults()
      self.attention.setdefault(path, {}).update(
          {k: v for k, v in bound.arguments.items() if k != "self"})
    elif isinstance(module, layers.Dense) and isinstance(module.parent, layers.Attention):
      parent = "/".join(module.parent.scope.path)
      if module.name in ("query", "key", "value"):
        self.attention.setdefault(parent, {})[module.name] = out
      elif module.name == "out":
        self.attention.setdefault(parent, {})["context"] = args[0]
    return out


def _valid_masks(batch: dict, objective: str) -> dict[str, np.ndarray]:
  """Which positions hold real tokens, per stack name."""
  if "enc_inputs" in batch:
    return {"encoder": np.asarray(batch["enc_mask"]) > 0,
            "decoder": np.asarray(batch["dec_weights"]) > 0}
  if objective == "next_token":
    return {"decoder": np.asarray(batch["segment_ids"]) > 0}
  mask = np.asarray(batch.get("input_mask", np.ones_like(batch["inputs"]))) > 0
  return {"encoder": mask, "decoder": mask}


def hidden_states(ckpt: Checkpoint, batch: dict) -> dict[str, np.ndarray]:
  """{'<stack>/embed' | '<stack>/layers_i': (N, D) states of the real tokens of `batch`}."""
  cfg = analysis_model_config(ckpt.config)
  model = models.make_model(cfg)
  objective = ckpt.config.objective
  terms_fn = objectives.OBJECTIVES[objective]

  @jax.jit
  def run(params, batch):
    capture = Capture()
    with nn.intercept_methods(capture):
      terms_fn(model, params, batch, None, True)
    return capture.hidden

  hidden = jax.device_get(run(ckpt.params, batch))
  masks = _valid_masks(batch, objective)
  out = {}
  for name in sorted(hidden, key=lambda n: (not n.startswith("encoder"), _natural(n))):
    stack = name.split("/")[0]
    h_BxLxD = np.asarray(hidden[name], np.float64)
    out[name] = h_BxLxD[masks.get(stack, np.ones(h_BxLxD.shape[:2], bool))]
  return out


def linear_cka(x_NxD: np.ndarray, y_NxM: np.ndarray) -> float:
  """Linear CKA (Kornblith et al. 2019) of two representations of the same N examples."""
  x = x_NxD - x_NxD.mean(0, keepdims=True)
  y = y_NxM - y_NxM.mean(0, keepdims=True)
  cross = np.linalg.norm(y.T @ x) ** 2
  denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
  return float(cross / denom) if denom > 0 else 0.0


def cka_matrix(hidden_a: dict, hidden_b: dict) -> tuple[list[str], list[str], np.ndarray]:
  """(layer names of a, of b, CKA[i, j] between layer i of a and layer j of b), per stack."""
  names_a, names_b = list(hidden_a), list(hidden_b)
  m = np.full((len(names_a), len(names_b)), np.nan)
  for i, na in enumerate(names_a):
    for j, nb in enumerate(names_b):
      if na.split("/")[0] == nb.split("/")[0] and hidden_a[na].shape[0] == hidden_b[nb].shape[0]:
        m[i, j] = linear_cka(hidden_a[na], hidden_b[nb])
  return names_a, names_b, m


def eval_batch(ckpt: Checkpoint, split: str = "validation") -> dict:
  """One eval batch of real text from the checkpoint's corpus (the same for both checkpoints)."""
  from gptjax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  batches = input_pipeline.make_eval_batches(ckpt.config, ckpt.tokenizer, split, max_batches=1)
  if not batches:
    raise FileNotFoundError(f"the {split} split of {ckpt.config.data.corpus} has no examples")
  return {k: np.asarray(v) for k, v in batches[0].items()}


# ============================================================================ attention
def attention_probs(cfg: ModelConfig, rec: dict) -> np.ndarray:
  """B x H x L x S softmax probabilities recomputed from captured queries, keys, mask and bias."""
  q, k = rec["query"], rec["key"]
  if cfg.position == "rope" and rec.get("kv_BxSxD") is None:
    q = positions.apply_rope(q, rec["positions_BxL"], cfg.rope_base)
    k = positions.apply_rope(k, rec["positions_BxL"], cfg.rope_base)
  b, l, h, dh = q.shape
  kh = k.shape[2]
  scale = dh ** -0.5 if cfg.scale_attention else 1.0
  s = jnp.einsum("blkgd,bskd->bkgls", q.reshape(b, l, kh, h // kh, dh), k,
                 preferred_element_type=jnp.float32) * scale
  bias = rec.get("bias_1xHxLxS")
  if bias is not None:
    s = s + bias.reshape(bias.shape[0], kh, h // kh, *bias.shape[2:])
  mask = rec.get("mask_Bx1xLxS")
  if mask is not None:
    s = jnp.where(mask[:, :, None], s, layers.NEG_INF)
  return jax.nn.softmax(s, axis=-1).reshape(b, h, l, -1)


def sentence_inputs(ckpt: Checkpoint, sentence: str) -> tuple[dict, list[str], list[str]]:
  """(model kwargs, query-side tokens, key-side tokens) for one sentence."""
  cfg = ckpt.config.model
  ids = ckpt.tokenizer.encode(sentence)[: min(cfg.max_len, ckpt.config.data.seq_len)]
  if not ids:
    raise ConfigError(f"--sentence={sentence!r} has no tokens")
  tokens = [ckpt.tokenizer.decode([i], skip_special=False) or ckpt.tokenizer.id_to_token(i)
            for i in ids]
  kwargs, shifted = model_family.of(cfg).attention_inputs(ids)
  return kwargs, tokens, (["<start>"] + tokens[:-1] if shifted else tokens)


def attention_maps(ckpt: Checkpoint, sentence: str) -> tuple[dict[str, np.ndarray], dict, float]:
  """({attention module path: H x L x S probs}, {path: (query tokens, key tokens)}, max error).

  The error is max |P @ V - the attention context the model computed|: the check that the
  recomputed probabilities are the ones the model used.
  """
  cfg = analysis_model_config(ckpt.config)
  model = models.make_model(cfg)
  kwargs, tokens, dec_tokens = sentence_inputs(ckpt, sentence)
  capture = Capture()
  with nn.intercept_methods(capture):
    model.apply({"params": ckpt.params}, **kwargs, deterministic=True)
  probs, labels, error = {}, {}, 0.0
  for path, rec in sorted(capture.attention.items(), key=lambda kv: _natural(kv[0])):
    p = attention_probs(cfg, rec)
    v = rec["value"]
    b, h, l, s = p.shape
    kh = v.shape[2]
    ctx = jnp.einsum("bkgls,bskd->blkgd", p.reshape(b, kh, h // kh, l, s), v.astype(jnp.float32))
    error = max(error, float(jnp.max(jnp.abs(ctx.reshape(rec["context"].shape)
                                             - rec["context"].astype(jnp.float32)))))
    probs[path] = np.asarray(p[0])
    is_dec = path.startswith("decoder") and model_family.of(cfg).cross_attention
    q_tokens = dec_tokens if is_dec else tokens
    labels[path] = (q_tokens, tokens if path.endswith("cross_attn") or not is_dec else dec_tokens)
  return probs, labels, error


# ============================================================================ eval
def eval_metrics(ckpt: Checkpoint, split: str = "validation", max_batches: int = 10) -> dict:
  """Eval loss, accuracies and perplexity of the checkpoint on `split` (train.evaluate_params)."""
  from gptjax.training import train  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(ckpt.config.to_dict())
  config.model.scan_layers, config.model.remat = False, "none"  # params are unstacked
  return train.evaluate_params(config, ckpt.params, ckpt.tokenizer, split, max_batches)


def analyze(workdir: str, other_workdir: Optional[str] = None, sentence: Optional[str] = None,
            output: Optional[str] = None, split: str = "validation", max_batches: int = 10) -> dict:
  """Runs every analysis; prints tables, writes CSV and PNG into `output`; returns the results."""
  output = output or os.path.join(workdir, "analysis")
  os.makedirs(output, exist_ok=True)
  a = load(workdir)
  b = load(other_workdir) if other_workdir else None
  if b is not None:
    check_same_architecture(a, b)
  result: dict[str, Any] = {"output": output}

  print(f"== parameters of {workdir}", flush=True)
  result["params"], result["layers"] = param_table(a.params), layer_table(a.params)
  write_csv(os.path.join(output, "params.csv"), result["params"])
  write_csv(os.path.join(output, "layers.csv"), result["layers"])
  print(format_table(result["layers"]))
  print(f"total params: {sum(r['size'] for r in result['layers'])}", flush=True)

  if b is not None:
    print(f"== difference {workdir} -> {other_workdir}", flush=True)
    result["diff_params"], result["diff_layers"] = diff_tables(a.params, b.params)
    write_csv(os.path.join(output, "diff_params.csv"), result["diff_params"])
    write_csv(os.path.join(output, "diff_layers.csv"), result["diff_layers"])
    print(format_table(result["diff_layers"]), flush=True)

  print("== linear CKA of layer representations on one eval batch", flush=True)
  batch = eval_batch(a, split)
  hidden_a = hidden_states(a, batch)
  hidden_b = hidden_states(b, batch) if b is not None else hidden_a
  names_a, names_b, m = cka_matrix(hidden_a, hidden_b)
  other = other_workdir or workdir
  result["cka"] = [{"layer": n, "cka": float(m[i, names_b.index(n)]) if n in names_b else float("nan"),
                    "tokens": int(hidden_a[n].shape[0])} for i, n in enumerate(names_a)]
  result["cka_matrix"] = m
  write_csv(os.path.join(output, "cka.csv"), result["cka"])
  write_csv(os.path.join(output, "cka_matrix.csv"),
            [{"layer": n, **{nb: float(m[i, j]) for j, nb in enumerate(names_b)}}
             for i, n in enumerate(names_a)])
  result["cka_png"] = analysis_plots.plot_cka(names_a, names_b, m, os.path.join(output, "cka.png"),
                               f"linear CKA: {os.path.basename(os.path.abspath(workdir))} (rows) vs "
                               f"{os.path.basename(os.path.abspath(other))} (columns)")
  print(format_table(result["cka"]), flush=True)

  print("== attention maps", flush=True)
  sentence = sentence or DEFAULT_SENTENCE
  probs, labels, error = attention_maps(a, sentence)
  result["attention"], result["attention_error"] = probs, error
  result["attention_pngs"] = analysis_plots.plot_attention(
      probs, labels, output, f"{a.config.name} {sentence[:40]!r}")
  print(f"{len(probs)} attention modules, {len(labels[next(iter(labels))][0])} tokens; recomputed "
        f"probabilities reproduce the model's attention output to {error:.1e}")
  for p in result["attention_pngs"]:
    print(f"wrote {p}")

  print(f"== eval on {split} (at most {max_batches} batches)", flush=True)
  rows = []
  for ck in [a] + ([b] if b is not None else []):
    m_eval = eval_metrics(ck, split, max_batches)
    rows.append({"workdir": ck.workdir, **m_eval})
  result["eval"] = rows
  write_csv(os.path.join(output, "eval.csv"), rows)
  print(format_table(rows))
  print(f"tables (CSV) and plots (PNG) in {output}", flush=True)
  return result


def main(config, workdir: str, flag_values) -> None:
  """`run.py --mode=analyze`: analyse the checkpoint in `workdir` (and --other_workdir)."""
  split = getattr(flag_values, "split", None) if "split" in flag_values else None
  max_batches = config.train.eval_steps if config is not None else 10
  analyze(workdir, flag_values.other_workdir, flag_values.sentence, flag_values.output,
          split or "validation", max_batches)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string("workdir", None, "The checkpoint to analyse.", required=True)
  flags.DEFINE_string("other_workdir", None, "A second checkpoint to compare with.")
  flags.DEFINE_string("sentence", None, "A sentence for the attention maps.")
  flags.DEFINE_string("output", None, "Where to write CSV and PNG files (default WORKDIR/analysis).")
  flags.DEFINE_string("split", "validation", "Split for the eval loss and the CKA batch.")
  flags.DEFINE_integer("eval_batches", 10, "Eval batches for the loss and perplexity.")

  def _main(argv):
    del argv
    f = flags.FLAGS
    try:
      analyze(f.workdir, f.other_workdir, f.sentence, f.output, f.split, f.eval_batches)
    except (ConfigError, FileNotFoundError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(_main)
