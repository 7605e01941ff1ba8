"""In-context learning: zero-, one- and few-shot classification by label-word likelihood.

  python run.py --config=configs/gpt.py:small --workdir=workdirs/gpt --mode=icl \
      --shots=0,1,4 --icl_examples=200

For every dev example and every number of shots k, k demonstrations are drawn from the train
split (by `config.seed` and the example's index), the prompt

  Review: <demo text>\\nSentiment: <demo label word>\\n\\n ... Review: <text>\\nSentiment:

is scored against each label word (" negative", " positive") by the summed log-likelihood of
its tokens, and the most likely word is the prediction. Decoder-only models score the word after
the prompt; encoder-decoder models encode the prompt and score the word as the decoder target.
Prompts longer than the context lose their oldest tokens. Accuracy per k is printed next to the
majority-class baseline of the evaluated examples.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.model import family as model_family
from gptjax.model import models
from gptjax.config_schema import ConfigError

SST2_LABELS = ("negative", "positive")
TEMPLATE = "Review: {text}\nSentiment:"
ANSWER = " {label}"
SEPARATOR = "\n\n"


def read_sst2(split: str, raw_dir: str = "") -> list[tuple[str, int]]:
  """(sentence, label) rows of sst2/{train,dev}.tsv under raw_dir, $GPTJAX_RAW_DIR or shared/data."""
  from gptjax.data import corpora  # pylint: disable=g-import-not-at-top
  name = {"dev": "validation", "validation": "validation", "train": "train"}.get(split)
  if name is None:
    raise ConfigError(f"sst2 has no split {split!r}; use train or dev")
  docs = corpora.load_documents("sst2", name, corpora.raw_data_dir(raw_dir))
  return [(str(d["text"]), int(d["label"])) for d in docs]


def build_prompt(text: str, demos: Sequence[tuple[str, int]], labels: Sequence[str]) -> str:
  """The k-shot prompt: demonstrations with their answers, then the query without one."""
  parts = [TEMPLATE.format(text=t) + ANSWER.format(label=labels[y]) for t, y in demos]
  return SEPARATOR.join(parts + [TEMPLATE.format(text=text)])


def draw_demos(pool: Sequence[tuple[str, int]], k: int, seed: int, index: int) -> list:
  """k demonstrations for example `index`, drawn without replacement from `pool` by seed."""
  if k == 0:
    return []
  rng = np.random.default_rng([seed, index])
  return [pool[i] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]


@functools.lru_cache(maxsize=8)
def _scorer(model):
  """Jitted sum of log p(continuation tokens) per row (`family.sequence_logps`)."""
  model_family.of(model).check_generates("be scored by --mode=icl (no language-model head)")
  return jax.jit(lambda params, rows: model_family.sequence_logps(model, params, rows)[0])


def option_rows(model, context_ids: Sequence[int], option_ids: Sequence[int], pad_id: int,
                start_id: int, width: int) -> dict[str, np.ndarray]:
  """One scored row: the option after the end of the context (its start cut to fit max_len).

  Decoder-only: context + option in one causal sequence of max_len; encoder-decoder: the context
  in the encoder and the option (of at most `width` tokens) on the decoder side.
  """
  L = model.cfg.max_len
  opt = list(option_ids)
  if model_family.of(model).cross_attention:
    ctx = list(context_ids)[-L:]
    dec_in, tgt, n = [start_id] + opt[:-1], opt, len(opt)
    row = {"prompt_inputs": _pad(ctx, L, pad_id), "prompt_mask": _pad([1] * len(ctx), L),
           "inputs": _pad(dec_in, width, pad_id), "targets": _pad(tgt, width, pad_id),
           "mask": _pad([1] * n, width)}
    row["weights"] = row["mask"].astype(np.float32)
    return row
  ctx = list(context_ids)[-(L - len(opt)):]  # keep the end of a long prompt
  seq = ctx + opt
  weights = np.zeros(L, np.float32)
  weights[max(len(ctx) - 1, 0):len(seq) - 1] = 1.0  # position t predicts token t + 1
  return {"prompt_inputs": np.zeros(1, np.int32), "prompt_mask": np.zeros(1, np.int32),
          "inputs": _pad(seq, L, pad_id), "targets": _pad(seq[1:], L, pad_id),
          "mask": _pad([1] * len(seq), L), "weights": weights}


def _pad(x, n: int, value: int = 0) -> np.ndarray:
  x = np.asarray(list(x)[:n], np.int32)
  return np.pad(x, (0, n - len(x)), constant_values=value)


def score_options(model, params, prompt_ids: Sequence[Sequence[int]],
                  option_ids: Sequence[Sequence[int]], pad_id: int, start_id: int,
                  batch_size: int = 16) -> np.ndarray:
  """Summed log-likelihood of option j after prompt i, an array [len(prompts), len(options)]."""
  score = _scorer(model)
  longest_opt = max(len(o) for o in option_ids)
  rows = [(i, j) for i in range(len(prompt_ids)) for j in range(len(option_ids))]
  out = np.zeros((len(prompt_ids), len(option_ids)), np.float64)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    n = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - n)  # one shape: one compilation
    built = [option_rows(model, prompt_ids[i], option_ids[j], pad_id, start_id, longest_opt)
             for i, j in chunk]
    got = np.asarray(score(params, {k: jnp.asarray(np.stack([r[k] for r in built]))
                                    for k in built[0]}))
    for r, (i, j) in enumerate(chunk[:n]):
      out[i, j] = got[r]
  return out


def evaluate_icl(model, params, tokenizer, examples: Sequence[tuple[str, int]],
                 demos: Sequence[tuple[str, int]], shots: Sequence[int],
                 labels: Sequence[str] = SST2_LABELS, seed: int = 0, start_id: Optional[int] = None,
                 batch_size: int = 16) -> dict:
  """Accuracy per number of shots (keys 'acc@k'), the majority baseline and the examples' count."""
  if not examples:
    raise ConfigError("no evaluation examples for in-context learning")
  if any(k < 0 for k in shots):
    raise ConfigError(f"--shots={','.join(map(str, shots))} must be non-negative integers")
  if max(shots) > 0 and not demos:
    raise ConfigError("few-shot evaluation needs demonstrations, but the train split is empty")
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  start = pad if start_id is None else start_id
  option_ids = [tokenizer.encode(ANSWER.format(label=w)) for w in labels]
  gold = np.asarray([y for _, y in examples])
  result = {"examples": len(examples),
            "majority": float(np.max(np.bincount(gold, minlength=len(labels))) / len(gold))}
  for k in shots:
    prompts = [tokenizer.encode(build_prompt(t, draw_demos(demos, k, seed, i), labels))
               for i, (t, _) in enumerate(examples)]
    scores = score_options(model, params, prompts, option_ids, pad, start, batch_size)
    result[f"acc@{k}"] = float(np.mean(np.argmax(scores, axis=1) == gold))
    # score_options keeps the end of a prompt longer than the model's context
    room = model.cfg.max_len - (0 if model_family.of(model).cross_attention
                                else max(len(o) for o in option_ids))
    result[f"cut@{k}"] = float(np.mean([len(p) > room for p in prompts]))
  return result


def parse_shots(text: str) -> list[int]:
  """'0,1,4' -> [0, 1, 4]; anything else is one-line ConfigError."""
  try:
    shots = [int(s) for s in str(text).split(",") if s.strip()]
  except ValueError:
    raise ConfigError(f"--shots={text!r} must be comma-separated integers, e.g. 0,1,4") from None
  if not shots or any(k < 0 for k in shots):
    raise ConfigError(f"--shots={text!r} must be comma-separated non-negative integers, e.g. 0,1,4")
  return shots


def main(config, workdir: str, flag_values) -> None:
  """`run.py --mode=icl`: k-shot SST-2 accuracy of WORKDIR's checkpoint on the dev split."""
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from gptjax.inference import generate as generate_cli
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  shots = parse_shots(getattr(flag_values, "shots", "0,1,4"))
  n = int(getattr(flag_values, "icl_examples", 200))
  if n < 1:
    raise ConfigError(f"--icl_examples={n} must be at least 1")
  if not workdir:
    raise ConfigError("--mode=icl needs --workdir=DIR with a trained checkpoint")
  raw_dir = config.data.raw_dir  # corpora.raw_data_dir resolves "" (env, then shared/data)
  dev, train = read_sst2("dev", raw_dir), read_sst2("train", raw_dir)
  examples = [dev[i] for i in np.random.default_rng(config.seed).permutation(len(dev))[:n]]
  ckpt_config, params, tokenizer = checkpointing.restore_for_inference(workdir)
  if config.quantize == "int8":
    from gptjax.transfer import quantize  # pylint: disable=g-import-not-at-top
    params = quantize.quantize_params(params)
    print("int8 weights (config.quantize=int8)")
  model = models.make_model(ModelConfig.from_config(ckpt_config.model))
  result = evaluate_icl(model, params, tokenizer, examples, train, shots, seed=config.seed,
                        start_id=generate_cli.decoder_start_id(ckpt_config, tokenizer))
  print(f"sst2 dev, {result['examples']} examples, label words {'/'.join(SST2_LABELS)}")
  print(f"majority-class baseline: {result['majority']:.3f}")
  for k in shots:
    cut = result[f"cut@{k}"]
    note = (f"  ({100 * cut:.0f}% of these prompts exceed config.model.max_len="
            f"{ckpt_config.model.max_len} and lost their first tokens: fewer than {k} "
            "demonstrations were seen)") if cut else ""
    print(f"{k}-shot accuracy: {result[f'acc@{k}']:.3f}{note}")
