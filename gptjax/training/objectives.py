"""Objectives as pure losses, kept apart from the networks.

Each objective maps (model, params, batch, rng) to named terms `(sum, count)`;
`make_loss_fn` turns them into `(params, batch, rng) -> (loss, metrics)` where
the loss is the sum over terms of sum / count. `reduce_count` lets a pmapped
step divide local sums by the global count, so pmap and mesh steps compute
the same loss and the same gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from gptjax.data import batch_spec
from gptjax.model import family as model_family

from gptjax.model.ops import XLA, Ops, ops_for

Array = jax.Array
Terms = dict[str, tuple[Array, Array]]


def cross_entropy(logits_BxLxV: Array, targets_BxL: Array, weights_BxL: Array, ops: Ops = XLA):
  """Weighted token cross-entropy in float32: (sum of losses, sum of weights, correct count).

  `ops` (gptjax.model.ops) computes the log-partition; pass the model's, `ops_for(model.cfg)`.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  log_z, target_logit, max_BxL = ops.log_z_and_target(logits, targets_BxL)
  w = weights_BxL.astype(jnp.float32)
  # the max the loss needs anyway, instead of a second pass for argmax (an exact tie counts as
  # correct; argmax would pick the lowest id)
  correct = (target_logit >= max_BxL).astype(jnp.float32) * w
  return jnp.sum((log_z - target_logit) * w), jnp.sum(w), jnp.sum(correct)


def _apply(model, params, rng, deterministic, **kwargs):
  rngs = None if deterministic else {"dropout": rng}
  return model.apply({"params": params}, **kwargs, deterministic=deterministic, rngs=rngs)


def _token_terms(model, prefix: str, logits, targets, weights) -> Terms:
  loss_sum, count, correct = cross_entropy(logits, targets, weights, ops_for(model.cfg))
  return {f"{prefix}_loss": (loss_sum, count), f"{prefix}_accuracy": (correct, count)}


def next_token(model, params, batch, rng, deterministic) -> Terms:
  """Causal LM on packed sequences; segments never attend across documents."""
  out = _apply(model, params, rng, deterministic, inputs=batch["inputs"],
               positions=batch["positions"], segment_ids=batch["segment_ids"],
               input_mask=batch["segment_ids"] > 0)
  return _token_terms(model, "lm", out["logits"], batch["targets"], batch["weights"])


def prefix_lm(model, params, batch, rng, deterministic) -> Terms:
  """Bidirectional attention over the prefix, loss on the suffix only."""
  out = _apply(model, params, rng, deterministic, inputs=batch["inputs"],
               prefix_mask=batch["prefix_mask"], input_mask=batch["input_mask"])
  return _token_terms(model, "lm", out["logits"], batch["targets"], batch["weights"])


def instruction(model, params, batch, rng, deterministic) -> Terms:
  """Instruction tuning: causal LM over prompt + response, loss on the response tokens only."""
  out = _apply(model, params, rng, deterministic, inputs=batch["inputs"],
               input_mask=batch["input_mask"])
  return _token_terms(model, "lm", out["logits"], batch["targets"], batch["weights"])


def _encoder(model, params, batch, rng, deterministic):
  return _apply(model, params, rng, deterministic, inputs=batch["inputs"],
                input_mask=batch["input_mask"], token_type_ids=batch["token_type_ids"])


def _pair_terms(out, batch, name: str) -> Terms:
  labels = batch["pair_labels"]
  w = batch["pair_weights"].astype(jnp.float32)
  logits = out["nsp_logits"].astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * w
  return {f"{name}_loss": (jnp.sum(nll * w), jnp.sum(w)),
          f"{name}_accuracy": (jnp.sum(correct), jnp.sum(w))}


def mlm(model, params, batch, rng, deterministic) -> Terms:
  """Masked LM on the chosen positions."""
  out = _encoder(model, params, batch, rng, deterministic)
  return _token_terms(model, "mlm", out["mlm_logits"], batch["targets"], batch["weights"])


def nsp(model, params, batch, rng, deterministic) -> Terms:
  """Next-sentence prediction from the pooled first token."""
  return _pair_terms(_encoder(model, params, batch, rng, deterministic), batch, "nsp")


def sop(model, params, batch, rng, deterministic) -> Terms:
  """Sentence-order prediction (ALBERT) through the same pair head."""
  return _pair_terms(_encoder(model, params, batch, rng, deterministic), batch, "sop")


def mlm_nsp(model, params, batch, rng, deterministic) -> Terms:
  """BERT pre-training: masked LM plus next-sentence prediction in one forward pass."""
  out = _encoder(model, params, batch, rng, deterministic)
  terms = _token_terms(model, "mlm", out["mlm_logits"], batch["targets"], batch["weights"])
  terms.update(_pair_terms(out, batch, "nsp"))
  return terms


def seq2seq(model, params, batch, rng, deterministic) -> Terms:
  """Encoder-decoder token loss: T5 span corruption and BART denoising share it."""
  out = _apply(model, params, rng, deterministic, enc_inputs=batch["enc_inputs"],
               enc_mask=batch["enc_mask"], dec_inputs=batch["dec_inputs"])
  return _token_terms(model, "span", out["logits"], batch["dec_targets"], batch["dec_weights"])


def classification(model, params, batch, rng, deterministic) -> Terms:
  """Sequence classification through the family's pooled representation."""
  out = model_family.of(model).classify(model, params, batch, rng, deterministic)
  logits = out["class_logits"].astype(jnp.float32)
  labels, w = batch["labels"], batch["label_weights"].astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * w
  return {"class_loss": (jnp.sum(nll * w), jnp.sum(w)),
          "class_accuracy": (jnp.sum(correct), jnp.sum(w))}


# ------------------------------------------------------------------ preferences (DPO)
def sequence_logps(model, params, prompt_inputs, prompt_mask, inputs, targets, weights, mask, rng,
                   deterministic):
  """Per-row (sum of log p(target) over weighted positions, number of those positions), float32.

  Decoder-only rows hold prompt + response; encoder-decoder rows hold the response on the decoder
  side and read the prompt through the encoder.
  """
  return model_family.sequence_logps(
      model, params, {"prompt_inputs": prompt_inputs, "prompt_mask": prompt_mask, "inputs": inputs,
                      "targets": targets, "weights": weights, "mask": mask}, "", rng, deterministic)


def pair_logps(model, params, batch, rng, deterministic):
  """(chosen sum, chosen count, rejected sum, rejected count) per pair, in one forward pass."""
  b = batch["chosen_inputs"].shape[0]
  both = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
  prompt = jnp.concatenate([batch["prompt_inputs"]] * 2, axis=0)
  prompt_mask = jnp.concatenate([batch["prompt_mask"]] * 2, axis=0)
  total, count = sequence_logps(model, params, prompt, prompt_mask, both("inputs"),
                                both("targets"), both("weights"), both("mask"), rng, deterministic)
  return total[:b], count[:b], total[b:], count[b:]


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
               label_smoothing: float = 0.0, loss: str = "sigmoid"):
  """Per-pair DPO loss and implicit rewards beta * (log pi - log pi_ref) of chosen and rejected.

  sigmoid: -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h), h the difference of log-ratios
  (Rafailov et al. 2023; eps > 0 is conservative DPO). ipo: (h - 1/(2 beta))^2 (Azar et al. 2023),
  fed per-token mean log-probs by the caller.
  """
  h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
  if loss == "ipo":
    per_pair = (h - 1.0 / (2.0 * beta)) ** 2
  else:
    per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) \
        - label_smoothing * jax.nn.log_sigmoid(-beta * h)
  return per_pair, beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)


def dpo(model, params, batch, rng, deterministic, *, beta: float = 0.1,
        label_smoothing: float = 0.0, loss: str = "sigmoid") -> Terms:
  """Direct preference optimisation against reference log-probs carried in the batch.

  Dropout stays off (as TRL's `disable_dropout`): the reference is scored without it, so the
  policy is too, and at initialisation the two agree exactly (loss log 2).
  """
  del deterministic
  chosen, n_chosen, rejected, n_rejected = pair_logps(model, params, batch, rng, True)
  ref_chosen, ref_rejected = batch["ref_chosen_logp"], batch["ref_rejected_logp"]
  if loss == "ipo":  # IPO compares per-token means (as TRL does)
    chosen, ref_chosen = chosen / jnp.maximum(n_chosen, 1.0), ref_chosen / jnp.maximum(n_chosen, 1.0)
    rejected = rejected / jnp.maximum(n_rejected, 1.0)
    ref_rejected = ref_rejected / jnp.maximum(n_rejected, 1.0)
  per_pair, r_chosen, r_rejected = dpo_losses(chosen, rejected, ref_chosen, ref_rejected,
                                              beta=beta, label_smoothing=label_smoothing, loss=loss)
  w = batch["pair_weights"].astype(jnp.float32)
  n = jnp.sum(w)
  return {"dpo_loss": (jnp.sum(per_pair * w), n),
          "dpo_reward_accuracy": (jnp.sum((r_chosen > r_rejected) * w), n),
          "dpo_chosen_reward": (jnp.sum(r_chosen * w), n),
          "dpo_rejected_reward": (jnp.sum(r_rejected * w), n),
          "dpo_margin": (jnp.sum((r_chosen - r_rejected) * w), n)}


OBJECTIVES: dict[str, Callable[..., Terms]] = {
    "next_token": next_token,
    "prefix_lm": prefix_lm,
    "mlm": mlm,
    "nsp": nsp,
    "sop": sop,
    "mlm_nsp": mlm_nsp,
    "span_corruption": seq2seq,
    "denoise": seq2seq,
    "classification": classification,
    "instruction": instruction,
    "dpo": dpo,
}
assert set(OBJECTIVES) == set(batch_spec.TOKEN_KEYS)


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """What the train loop reports for an objective, so it never compares objective names.

  token_terms: terms whose counts are tokens that carried loss (summed into `loss_tokens`).
  sequences_per_row: forward sequences per batch row (FLOPs and tokens/s count each).
  unigram_baseline: the train split's token entropy is a meaningful floor to print and record.
  preference: trains against a frozen reference (prepared before the loop, KL reported at eval).
  """
  token_terms: tuple[str, ...] = ()
  sequences_per_row: int = 1
  unigram_baseline: bool = False
  preference: bool = False


_LM = ObjectiveSpec(token_terms=("lm_loss",))
SPECS: dict[str, ObjectiveSpec] = {
    "next_token": ObjectiveSpec(token_terms=("lm_loss",), unigram_baseline=True),
    "prefix_lm": _LM,
    "instruction": _LM,
    "mlm": ObjectiveSpec(token_terms=("mlm_loss",)),
    "nsp": ObjectiveSpec(),
    "sop": ObjectiveSpec(),
    "mlm_nsp": ObjectiveSpec(token_terms=("mlm_loss",)),
    "span_corruption": ObjectiveSpec(token_terms=("span_loss",)),
    "denoise": ObjectiveSpec(token_terms=("span_loss",)),
    "classification": ObjectiveSpec(),
    "dpo": ObjectiveSpec(sequences_per_row=2, preference=True),  # counts pairs, not tokens
}
assert set(SPECS) == set(OBJECTIVES)


def spec_of(config) -> ObjectiveSpec:
  """The ObjectiveSpec of `config.objective`."""
  return SPECS[config.objective]


def for_config(config):
  """`config.objective`, or for dpo its terms function with `config.dpo`'s settings bound."""
  if config.objective != "dpo":
    return config.objective
  d = config.dpo
  return functools.partial(dpo, beta=float(d.beta), label_smoothing=float(d.label_smoothing),
                           loss=str(d.loss))


def make_loss_fn(objective, model, *, deterministic: bool = False,
                 reduce_count: Callable[[Array], Array] = lambda x: x):
  """(params, batch, rng) -> (loss, metrics); metrics hold (sum, count) pairs per term.

  `objective` is a name in OBJECTIVES or a terms function (see `for_config`).
  """
  terms_fn = OBJECTIVES[objective] if isinstance(objective, str) else objective

  def loss_fn(params, batch, rng):
    terms = terms_fn(model, params, batch, rng, deterministic)
    loss = 0.0
    for name, (total, count) in terms.items():
      if name.endswith("_loss"):
        loss = loss + total / jnp.maximum(reduce_count(count), 1.0)
    return loss, terms

  return loss_fn


def finalize(terms: Terms) -> dict[str, float]:
  """Turns accumulated (sum, count) terms into means; adds `loss` and perplexities."""
  out = {}
  total = 0.0
  for name, (s, c) in terms.items():
    value = float(s) / max(float(c), 1.0)
    out[name] = value
    if name.endswith("_loss"):
      total += value
  out["loss"] = total
  for lm_name in ("lm_loss", "span_loss", "mlm_loss"):
    if lm_name in out:
      out[lm_name.replace("_loss", "_perplexity")] = float(jnp.exp(min(out[lm_name], 50.0)))
  return out
