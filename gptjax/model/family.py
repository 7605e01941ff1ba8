"""One adapter per model family: how each runs, pools, scores and decodes (t5x's model classes).

`EncoderOnly`, `DecoderOnly` and `EncoderDecoder` (gptjax/model/models.py) are networks; the
adapters here are what the rest of the package asks about a family, so that objectives, decoding,
in-context learning, embeddings, analysis, the input pipeline and fine-tuning never compare
family names. An adapter is looked up by `config.model.family`:

  adapter = family.of(cfg)            # cfg: a ModelConfig or an ml_collections config.model
  model = adapter.make_model(cfg)
  logits_BxLxV = adapter.sequence_logits(model, params, prompt, prompt_mask, inputs, mask)

What each one says: which objectives it trains, the inputs of a batch it reads (`classify`,
`sequence_logits`), a pooled sequence representation (`hidden_states` + `models.pool`),
the KV-cache prefill and step of generation (`decode_fns`, `pack_prompts`), and dummy inputs for
`init` / `eval_shape` (`dummy_inputs`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config_schema import ConfigError
from gptjax.model import models

Array = jax.Array
ENCODER_ONLY, DECODER_ONLY, ENCODER_DECODER = "encoder_only", "decoder_only", "encoder_decoder"

_REGISTRY: dict[str, "FamilyAdapter"] = {}


def register(cls: type) -> type:
  """Class decorator: adds one instance of the adapter to the registry under `cls.name`."""
  _REGISTRY[cls.name] = cls()
  return cls


def names() -> tuple[str, ...]:
  """The registered family names."""
  return tuple(_REGISTRY)


def get(name: str) -> "FamilyAdapter":
  """The adapter of family `name`; one-line ConfigError for an unknown name."""
  if name not in _REGISTRY:
    raise ConfigError(f"config.model.family={name!r} is unknown; allowed: {', '.join(_REGISTRY)}")
  return _REGISTRY[name]


def of(cfg: Any) -> "FamilyAdapter":
  """The adapter of `cfg.family` (a ModelConfig, a config.model, or a model with `.cfg`)."""
  return get(getattr(cfg, "cfg", cfg).family)


def _apply(model, params, rng, deterministic, *args, **kwargs):
  rngs = None if deterministic or rng is None else {"dropout": rng}
  return model.apply({"params": params}, *args, **kwargs, deterministic=deterministic, rngs=rngs)


def _zero_cache(fn, *args):
  shapes = jax.eval_shape(fn, *args)["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


class FamilyAdapter:
  """What a family does with a batch; subclasses fill it in. Methods take the flax model."""
  name: str = ""
  module: type = None
  objectives: tuple[str, ...] = ()
  generates = False  # has a language-model head that decodes text
  cross_attention = False  # a decoder reads an encoder: prompts go to the encoder
  bpe_specials = "bart"  # whose special tokens a byte-level BPE tokenizer of this family carries

  def make_model(self, cfg):
    """The flax module of this family, configured by `cfg`."""
    return self.module(cfg)

  def dummy_inputs(self, cfg, batch_size: int, seq_len: int, target_len: int = 0) -> dict:
    """Keyword arguments that initialise `make_model(cfg)` for the given shapes."""
    raise NotImplementedError

  def target_len(self, config) -> int:
    """The decoder length of a batch (0: the family has no separate decoder side)."""
    return 0

  def classify(self, model, params, batch, rng=None, deterministic=True) -> dict:
    """The model outputs ('class_logits' among them) for a classification batch."""
    raise NotImplementedError

  def hidden_states(self, model, params, ids_BxL, mask_BxL) -> Array:
    """BxLxD states of the stack a sequence representation is pooled from."""
    raise NotImplementedError

  def sequence_logits(self, model, params, prompt_BxS, prompt_mask_BxS, inputs_BxL, mask_BxL,
                      rng=None, deterministic=True) -> Array:
    """BxLxV logits of scored rows: prompt and continuation in `inputs`, or the prompt in the
    encoder and the continuation on the decoder side (`cross_attention`)."""
    self.check_generates("score sequences (no language-model head)")

  def check_generates(self, what: str = "generate text") -> None:
    """One-line ConfigError when this family cannot decode."""
    if not self.generates:
      raise ConfigError(f"config.model.family={self.name!r} cannot {what}; use a "
                        f"{' or '.join(n for n, a in _REGISTRY.items() if a.generates)} model")

  def prompt_limit(self, max_len: int) -> int:
    """The most prompt tokens generation accepts in a context of `max_len`."""
    return max_len

  def pack_prompts(self, prompt_ids, cfg, n_new: int, width_fn: Callable, pad_id: int,
                   start_id: int):
    """(n_new, buf_BxT, mask_BxT, enc_BxS or None, enc_mask_BxS or None) on the host."""
    self.check_generates()

  def decode_fns(self, model, use_cache: bool):
    """(prefill, step) of generation.

    prefill(params, buf_BxT, mask_BxT, P, enc_BxS, enc_mask_BxS) -> (logits_BxV, cache, ctx)
    step(params, cache, ctx, buf_BxT, mask_BxT, col, tok_B, pos_B) -> (logits_BxV, cache)
    The self-attention cache holds T = P + N keys, the buffer's width: no key beyond the request.
    """
    self.check_generates()

  def head_stack(self, params) -> str:
    """The stack whose last layer feeds the task head (what `last_block` fine-tuning trains)."""
    return "decoder"

  def pair_ids(self, tok, a: list, b: list, length: int) -> tuple[list, list]:
    """(ids, token types) of a classification example of segments a and b, at most `length`."""
    ids = (a + ([tok.sep_id or tok.eos_id] + b if b else []))[:length - 1] + [tok.eos_id]
    return ids, [0] * len(ids)

  def attention_inputs(self, ids: Sequence[int]) -> tuple[dict, bool]:
    """(model kwargs for one sentence, whether the decoder reads it shifted behind a start)."""
    raise NotImplementedError


@register
class EncoderOnlyAdapter(FamilyAdapter):
  """BERT: bidirectional encoder; classification, MLM/NSP/SOP heads; no generation."""
  name = ENCODER_ONLY
  module = models.EncoderOnly
  objectives = ("mlm", "nsp", "sop", "mlm_nsp", "classification")

  def head_stack(self, params):
    return "encoder"

  def dummy_inputs(self, cfg, batch_size, seq_len, target_len=0):
    tokens = jnp.ones((batch_size, seq_len), jnp.int32)
    return {"inputs": tokens, "input_mask": tokens}

  def classify(self, model, params, batch, rng=None, deterministic=True):
    return _apply(model, params, rng, deterministic, inputs=batch["inputs"],
                  input_mask=batch["input_mask"], token_type_ids=batch["token_type_ids"])

  def hidden_states(self, model, params, ids_BxL, mask_BxL):
    return model.apply({"params": params}, ids_BxL, mask_BxL)["hidden"]

  def pair_ids(self, tok, a, b, length):
    from gptjax.data import masking  # pylint: disable=g-import-not-at-top
    a, b = masking.truncate_pair(a, b, length - (3 if b else 2)) if b else (a[:length - 2], [])
    ids = [tok.cls_id] + a + [tok.sep_id] + (b + [tok.sep_id] if b else [])
    return ids, [0] * (len(a) + 2) + [1] * (len(b) + 1 if b else 0)

  def attention_inputs(self, ids):
    x = jnp.asarray([ids], jnp.int32)
    return {"inputs": x, "input_mask": jnp.ones_like(x)}, False


@register
class DecoderOnlyAdapter(FamilyAdapter):
  """GPT: one causal stack over prompt + continuation; left-padded prompts when decoding."""
  name = DECODER_ONLY
  module = models.DecoderOnly
  objectives = ("next_token", "prefix_lm", "classification", "instruction", "dpo")
  generates = True
  bpe_specials = "gpt"

  def dummy_inputs(self, cfg, batch_size, seq_len, target_len=0):
    return {"inputs": jnp.ones((batch_size, seq_len), jnp.int32)}

  def classify(self, model, params, batch, rng=None, deterministic=True):
    return _apply(model, params, rng, deterministic, inputs=batch["inputs"],
                  input_mask=batch["input_mask"])

  def hidden_states(self, model, params, ids_BxL, mask_BxL):
    return model.apply({"params": params}, ids_BxL, input_mask=mask_BxL)["hidden"]

  def sequence_logits(self, model, params, prompt_BxS, prompt_mask_BxS, inputs_BxL, mask_BxL,
                      rng=None, deterministic=True):
    del prompt_BxS, prompt_mask_BxS
    return _apply(model, params, rng, deterministic, inputs=inputs_BxL,
                  input_mask=mask_BxL)["logits"]

  def prompt_limit(self, max_len):
    return max_len - 1  # the first new token takes a position too

  def pack_prompts(self, prompt_ids, cfg, n_new, width_fn, pad_id, start_id):
    from absl import logging  # pylint: disable=g-import-not-at-top
    longest, b = max(len(p) for p in prompt_ids), len(prompt_ids)
    if longest + n_new > cfg.max_len:
      logging.warning("config.generate.max_new_tokens=%d capped to %d: the longest prompt has %d "
                      "tokens and config.model.max_len=%d", n_new, cfg.max_len - longest,
                      longest, cfg.max_len)
      n_new = cfg.max_len - longest
    P = width_fn(longest, n_new)
    buf = np.full((b, P + n_new), pad_id, np.int32)
    mask = np.zeros((b, P + n_new), np.int32)
    for i, p in enumerate(prompt_ids):  # left padding: every prompt ends at column P - 1
      buf[i, P - len(p):P] = p
      mask[i, P - len(p):P] = 1
    return n_new, buf, mask, None, None

  def decode_fns(self, model, use_cache):
    def prefill(params, buf, mask, P, enc, enc_mask):
      del enc, enc_mask
      pos = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
      if not use_cache:
        logits = model.apply({"params": params}, buf, positions=pos, input_mask=mask)["logits"]
        return logits[:, P - 1], None, None
      t = buf.shape[1]
      cache = _zero_cache(lambda b: model.init(jax.random.key(0), b, decode=True, cache_len=t),
                          buf[:, :1])
      out, mut = model.apply({"params": params, "cache": cache}, buf[:, :P], positions=pos[:, :P],
                             input_mask=mask[:, :P], decode=True, cache_len=t,
                             last_logits_only=True, mutable=["cache"])
      return out["logits"][:, -1], mut["cache"], None

    def step(params, cache, ctx, buf, mask, col, tok, pos):
      del ctx
      if not use_cache:
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits = model.apply({"params": params}, buf, positions=positions, input_mask=mask)["logits"]
        return jax.lax.dynamic_index_in_dim(logits, col, axis=1, keepdims=False), None
      out, mut = model.apply({"params": params, "cache": cache}, tok[:, None], positions=pos[:, None],
                             input_mask=jnp.ones_like(tok)[:, None], decode=True, mutable=["cache"])
      return out["logits"][:, 0], mut["cache"]
    return prefill, step

  def attention_inputs(self, ids):
    return {"inputs": jnp.asarray([ids], jnp.int32)}, False


@register
class EncoderDecoderAdapter(FamilyAdapter):
  """T5 / BART: prompts (and classified text) go to the encoder, the decoder starts from a token."""
  name = ENCODER_DECODER
  module = models.EncoderDecoder
  objectives = ("span_corruption", "denoise", "classification", "dpo")
  generates = True
  cross_attention = True

  def dummy_inputs(self, cfg, batch_size, seq_len, target_len=0):
    tokens = jnp.ones((batch_size, seq_len), jnp.int32)
    return {"enc_inputs": tokens, "enc_mask": tokens,
            "dec_inputs": jnp.ones((batch_size, target_len or seq_len), jnp.int32)}

  def target_len(self, config):
    return config.data.target_len or config.data.seq_len

  def head_stack(self, params):
    return "encoder" if "classifier" in params else "decoder"  # the classifier pools the encoder

  def classify(self, model, params, batch, rng=None, deterministic=True):
    start = jnp.zeros((batch["inputs"].shape[0], 1), jnp.int32)
    return _apply(model, params, rng, deterministic, enc_inputs=batch["inputs"],
                  enc_mask=batch["input_mask"], dec_inputs=start)

  def hidden_states(self, model, params, ids_BxL, mask_BxL):
    return model.apply({"params": params}, ids_BxL, mask_BxL, method="encode")

  def sequence_logits(self, model, params, prompt_BxS, prompt_mask_BxS, inputs_BxL, mask_BxL,
                      rng=None, deterministic=True):
    del mask_BxL
    return _apply(model, params, rng, deterministic, enc_inputs=prompt_BxS,
                  enc_mask=prompt_mask_BxS, dec_inputs=inputs_BxL)["logits"]

  def pack_prompts(self, prompt_ids, cfg, n_new, width_fn, pad_id, start_id):
    b = len(prompt_ids)
    buf = np.full((b, 1 + n_new), pad_id, np.int32)
    buf[:, 0] = start_id
    mask = np.zeros((b, 1 + n_new), np.int32)
    mask[:, 0] = 1
    width = width_fn(max(len(p) for p in prompt_ids), 0)
    enc = np.full((b, width), pad_id, np.int32)
    enc_mask = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompt_ids):
      enc[i, :len(p)] = p
      enc_mask[i, :len(p)] = 1
    return n_new, buf, mask, jnp.asarray(enc), jnp.asarray(enc_mask)

  def decode_fns(self, model, use_cache):
    dec = models.EncoderDecoder.decode

    def prefill(params, buf, mask, P, enc, enc_mask):
      del mask
      encoded = model.apply({"params": params}, enc, enc_mask, method=models.EncoderDecoder.encode)
      if not use_cache:
        logits = model.apply({"params": params}, encoded, enc_mask, buf, method=dec)
        return logits[:, P - 1], None, (encoded, enc_mask)
      t = buf.shape[1]
      cache = _zero_cache(lambda e, m, b: model.init(jax.random.key(0), e, m, b, decode=True,
                                                     cache_len=t, method=dec),
                          encoded, enc_mask, buf[:, :1])
      # the prefill projects the encoder's keys and values into the cache once; steps reuse them
      logits, mut = model.apply({"params": params, "cache": cache}, encoded, enc_mask, buf[:, :P],
                                decode=True, cache_len=t, mutable=["cache"], method=dec)
      return logits[:, -1], mut["cache"], (None, enc_mask)

    def step(params, cache, ctx, buf, mask, col, tok, pos):
      del mask, pos
      encoded, enc_mask = ctx
      if not use_cache:
        logits = model.apply({"params": params}, encoded, enc_mask, buf, method=dec)
        return jax.lax.dynamic_index_in_dim(logits, col, axis=1, keepdims=False), None
      logits, mut = model.apply({"params": params, "cache": cache}, None, enc_mask, tok[:, None],
                                decode=True, mutable=["cache"], method=dec)
      return logits[:, 0], mut["cache"]
    return prefill, step

  def attention_inputs(self, ids):
    x = jnp.asarray([ids], jnp.int32)
    dec = jnp.asarray([[0] + list(ids[:-1])], jnp.int32)
    return {"enc_inputs": x, "enc_mask": jnp.ones_like(x), "dec_inputs": dec}, True


def sequence_logps(model, params, batch: dict, prefix: str = "", rng: Optional[Array] = None,
                   deterministic: bool = True) -> tuple[Array, Array]:
  """Per-row (sum of log p(target) over weighted positions, number of those positions), float32.

  `batch` holds prompt_inputs, prompt_mask and {prefix}inputs / targets / weights / mask in the
  layout of gptjax/data/batch_spec.py's dpo rows: the score of DPO, ICL and held-out KL.
  """
  logits = of(model).sequence_logits(model, params, batch["prompt_inputs"], batch["prompt_mask"],
                                     batch[f"{prefix}inputs"], batch[f"{prefix}mask"], rng,
                                     deterministic)
  logp_BxLxV = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = batch[f"{prefix}targets"]
  token_logp = jnp.take_along_axis(logp_BxLxV, targets[..., None], axis=-1)[..., 0]
  w = batch[f"{prefix}weights"].astype(jnp.float32)
  return jnp.sum(token_logp * w, axis=-1), jnp.sum(w, axis=-1)
