"""Generation over the KV cache for `DecoderOnly` and `EncoderDecoder` models.

One jitted `lax.while_loop` per (model config, settings): greedy, sampling with temperature,
top-k and top-p, an optional repetition penalty, EOS and token-level stop sequences, and beam
search with a length penalty. Prompts of different lengths are left-padded for decoder-only
models (pads masked out of the cache, positions counted from each prompt's first real token);
an encoder-decoder model encodes its prompts once and decodes from a start token.

  settings = decode.DecodeSettings(max_new_tokens=32, temperature=0.8, top_p=0.9)
  out = decode.generate(model, params, [[5, 6, 7], [8]], settings, eos_id=2, pad_id=0,
                        rng=jax.random.key(0))

Shapes: B batch, W beams, P prompt length (padded), N new tokens, T = P + N, V vocab.
Beam search lives in gptjax/inference/beam_search.py (`decode.beam_search` calls it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config_schema import ConfigError
from gptjax.model import family as model_family
from gptjax.model import ops as model_ops

Array = jax.Array
_NEG = -1e30  # a removed logit: exp() underflows to 0 but arithmetic on it stays finite


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """What `config.generate` holds, with stop sequences as token ids."""
  max_new_tokens: int = 64
  temperature: float = 1.0  # 0: greedy
  top_k: int = 0  # 0: off
  top_p: float = 1.0  # 1: off
  num_beams: int = 1
  length_penalty: float = 1.0  # beam score = sum log p / length ** length_penalty
  repetition_penalty: float = 1.0  # 1: off (CTRL, Keskar et al. 2019)
  stop: tuple[tuple[int, ...], ...] = ()
  seed: int = 0
  use_cache: bool = True  # False recomputes the whole prefix every step (for tests, timings)
  # Prompts are padded to the smallest of these widths that holds the longest one, so that
  # prompt lengths within a bucket share one compiled loop; () means powers of two from 8.
  # The KV cache then holds that width plus max_new_tokens.
  prompt_buckets: tuple[int, ...] = ()

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0 or self.top_k == 1


def settings_from_config(config, tokenizer=None) -> DecodeSettings:
  """DecodeSettings from `config.generate`; stop strings become token ids with `tokenizer`."""
  g = config.generate
  stops = [s for s in str(g.stop).split("|") if s] if g.stop else []
  stop_ids = tuple(tuple(tokenizer.encode(s)) for s in stops) if tokenizer is not None else ()
  return DecodeSettings(max_new_tokens=int(g.max_new_tokens), temperature=float(g.temperature),
                        top_k=int(g.top_k), top_p=float(g.top_p), num_beams=int(g.num_beams),
                        length_penalty=float(g.length_penalty),
                        repetition_penalty=float(g.repetition_penalty),
                        stop=tuple(s for s in stop_ids if s), seed=int(g.seed),
                        prompt_buckets=parse_buckets(g.get("prompt_buckets", "")))


def parse_buckets(text) -> tuple[int, ...]:
  """`config.generate.prompt_buckets` ("32,128,512"; "" for the default) as a tuple of ints."""
  if isinstance(text, (tuple, list)):
    return tuple(int(b) for b in text)
  try:
    return tuple(int(b) for b in str(text).replace(" ", "").split(",") if b)
  except ValueError:
    raise ConfigError(f"config.generate.prompt_buckets={text!r} must be comma-separated "
                      "integers such as '32,128,512' ('' for powers of two)") from None


def check_settings(settings: DecodeSettings) -> None:
  """Raises ConfigError (one line naming the field) for impossible decoding settings."""
  s = settings
  if s.max_new_tokens < 1:
    raise ConfigError(f"config.generate.max_new_tokens={s.max_new_tokens} must be at least 1")
  if s.temperature < 0:
    raise ConfigError(f"config.generate.temperature={s.temperature} must be >= 0 (0: greedy)")
  if s.top_k < 0:
    raise ConfigError(f"config.generate.top_k={s.top_k} must be >= 0 (0: off)")
  if not 0.0 < s.top_p <= 1.0:
    raise ConfigError(f"config.generate.top_p={s.top_p} must be in (0, 1] (1: off)")
  if s.num_beams < 1:
    raise ConfigError(f"config.generate.num_beams={s.num_beams} must be at least 1")
  if s.repetition_penalty <= 0:
    raise ConfigError(f"config.generate.repetition_penalty={s.repetition_penalty} must be > 0 "
                      "(1: off)")
  b = s.prompt_buckets
  if any(x < 1 for x in b) or any(y <= x for x, y in zip(b, b[1:])):
    raise ConfigError(f"config.generate.prompt_buckets={','.join(map(str, b))} must be positive "
                      "and increasing, e.g. '32,128,512'")


def check_new_tokens(settings: DecodeSettings, max_len: int, family: str) -> None:
  """Raises ConfigError when max_new_tokens alone does not fit the model's context."""
  room = max_len - 1  # a decoder-only prompt or an encoder-decoder start token takes a position
  if settings.max_new_tokens > room:
    raise ConfigError(f"config.generate.max_new_tokens={settings.max_new_tokens} does not fit "
                      f"the model's context (config.model.max_len={max_len}, {family}): at most "
                      f"{room} new tokens")


def prompt_width(longest: int, n_new: int, max_len: int, buckets: tuple[int, ...]) -> int:
  """The padded prompt width: the smallest bucket holding `longest` tokens.

  Capped at max_len - n_new (but never below `longest`) so the KV cache stays within the
  context. ConfigError when no bucket holds the prompt.
  """
  if not buckets:
    buckets = tuple(8 * 2 ** i for i in range(max(1, max_len.bit_length())))
  fits = [b for b in buckets if b >= longest]
  if not fits:
    raise ConfigError(f"the longest prompt has {longest} tokens but the largest of "
                      f"config.generate.prompt_buckets={','.join(map(str, buckets))} is "
                      f"{buckets[-1]}; add a bucket of at least {longest}")
  return max(longest, min(fits[0], max_len - n_new))


def check_prompts(prompt_ids: Sequence[Sequence[int]], max_len: int, family: str) -> None:
  """Raises ConfigError for no prompts, an empty prompt, or one that leaves no room in context."""
  if not prompt_ids:
    raise ConfigError("no prompt given; pass --prompt=TEXT or a non-empty --prompts_file")
  for i, p in enumerate(prompt_ids):
    if len(p) == 0:
      raise ConfigError(f"prompt {i} is empty (0 tokens); give at least one token of text")
    limit = model_family.get(family).prompt_limit(max_len)
    if len(p) > limit:
      raise ConfigError(f"prompt {i} has {len(p)} tokens, longer than the context allows "
                        f"(config.model.max_len={max_len}, at most {limit} prompt tokens)")


# ----------------------------------------------------------------- logits processing
def _nucleus(sorted_x: Array, top_p: float) -> Array:
  """Logits sorted in descending order with the tokens outside the top-p nucleus at -1e30."""
  sorted_p = jax.nn.softmax(sorted_x, axis=-1)
  before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
  keep = (before < top_p - 1e-6).at[..., 0].set(True)
  return jnp.where(keep, sorted_x, _NEG)


def filter_logits(logits_BxV: Array, temperature: float, top_k: int, top_p: float) -> Array:
  """Tempered logits with the tokens outside top-k and the top-p nucleus set to -1e30.

  temperature 0 keeps only the argmax. Top-p keeps the smallest set of most likely tokens whose
  probability reaches p (a token is kept when the mass strictly before it is below p).
  """
  x = logits_BxV.astype(jnp.float32)
  if temperature == 0.0:
    best = jnp.argmax(x, axis=-1)
    return jnp.where(jnp.arange(x.shape[-1]) == best[..., None], x, _NEG)
  x = x / temperature
  if top_k > 0 and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x >= kth, x, _NEG)
  if top_p < 1.0:
    order = jnp.argsort(-x, axis=-1)
    keep_sorted = _nucleus(jnp.take_along_axis(x, order, axis=-1), top_p) > _NEG / 2
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    x = jnp.where(keep, x, _NEG)
  return x


def sample_tokens(key: Array, logits_BxV: Array, temperature: float, top_k: int,
                  top_p: float) -> Array:
  """One token per row from the distribution `filter_logits` leaves, without filtering all V.

  With top-k the draw is among the k largest logits alone (`lax.top_k`, no sort of the
  vocabulary) and top-p cuts that sorted list; top-p alone sorts once and draws in sorted order.
  """
  x = logits_BxV.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(x, axis=-1)
  x = x / temperature
  if 0 < top_k < x.shape[-1]:
    vals_BxK, idx_BxK = jax.lax.top_k(x, top_k)
  elif top_p < 1.0:
    idx_BxK = jnp.argsort(-x, axis=-1)
    vals_BxK = jnp.take_along_axis(x, idx_BxK, axis=-1)
  else:
    return jax.random.categorical(key, x)
  if top_p < 1.0:
    vals_BxK = _nucleus(vals_BxK, top_p)
  pick_B = jax.random.categorical(key, vals_BxK)
  return jnp.take_along_axis(idx_BxK, pick_B[:, None], axis=-1)[:, 0]


def repetition_penalty(logits_BxV: Array, seen_BxV: Array, penalty: float) -> Array:
  """CTRL's penalty: seen tokens' positive logits divided by `penalty`, negative ones multiplied."""
  if penalty == 1.0:
    return logits_BxV
  pen = jnp.where(logits_BxV > 0, logits_BxV / penalty, logits_BxV * penalty)
  return jnp.where(seen_BxV, pen, logits_BxV)


def _stop_hit(buf_BxT: Array, col: Array, t: Array, stops) -> Array:
  """Whether a stop sequence ends at column `col` (inside the generated part)."""
  hit = jnp.zeros(buf_BxT.shape[0], bool)
  for s in stops:
    n = len(s)
    window = jax.lax.dynamic_slice_in_dim(buf_BxT, jnp.maximum(col - n + 1, 0), n, axis=1)
    hit |= jnp.all(window == jnp.asarray(s, buf_BxT.dtype), axis=1) & (t + 1 >= n)
  return hit


# ------------------------------------------------------------------------ model calls
def decoding_model(model):
  """`model` as generation runs it: its config through `ops.for_decoding` (the backend's choice
  of kernels for a few rows; excluding `cpu_decode_matmul` decodes with the model's own ops)."""
  cfg = model_ops.for_decoding(model.cfg)
  return model if cfg is model.cfg else model.clone(cfg=cfg)


def _model_fns(model, use_cache: bool):
  """(prefill, step) of the model's family (`FamilyAdapter.decode_fns`), on `decoding_model`."""
  model = decoding_model(model)
  return model_family.of(model).decode_fns(model, use_cache)


# ------------------------------------------------------------------------ sampling loop
@functools.lru_cache(maxsize=32)
def _sampler(model, settings: DecodeSettings):
  """The jitted sampling loop for one model and one set of (static) settings."""
  s = settings
  prefill, step = _model_fns(model, s.use_cache)
  n_new = s.max_new_tokens

  def run(params, buf_BxT, mask_BxT, enc_BxS, enc_mask_BxS, rng, eos_id, pad_id):
    b, total = buf_BxT.shape
    P = total - n_new
    logits, cache, ctx = prefill(params, buf_BxT, mask_BxT, P, enc_BxS, enc_mask_BxS)
    length_B = mask_BxT[:, :P].sum(axis=1)
    vocab = logits.shape[-1]
    seen_BxV = jnp.zeros((b, vocab if s.repetition_penalty != 1.0 else 1), bool)
    if s.repetition_penalty != 1.0:
      seen_BxV = seen_BxV.at[jnp.arange(b)[:, None], buf_BxT[:, :P]].max(mask_BxT[:, :P] > 0)

    def cond(state):
      t, done = state[0], state[5]
      return (t < n_new) & ~jnp.all(done)

    def body(state):
      t, buf, mask, logits, cache, done, rng, seen = state
      rng, key = jax.random.split(rng)
      lg = repetition_penalty(logits.astype(jnp.float32), seen, s.repetition_penalty)
      if s.greedy:
        tok = jnp.argmax(lg, axis=-1)
      else:
        tok = sample_tokens(key, lg, s.temperature, s.top_k, s.top_p)
      tok = jnp.where(done, pad_id, tok).astype(buf.dtype)
      col = P + t
      buf = jax.lax.dynamic_update_index_in_dim(buf, tok, col, axis=1)
      mask = jax.lax.dynamic_update_index_in_dim(mask, (~done).astype(mask.dtype), col, axis=1)
      done = done | (tok == eos_id) | _stop_hit(buf, col, t, s.stop)
      if s.repetition_penalty != 1.0:
        seen = seen.at[jnp.arange(b), tok].set(True)
      logits, cache = step(params, cache, ctx, buf, mask, col, tok, length_B + t)
      return t + 1, buf, mask, logits, cache, done, rng, seen

    state = (jnp.zeros((), jnp.int32), buf_BxT, mask_BxT, logits, cache, jnp.zeros(b, bool), rng,
             seen_BxV)
    state = jax.lax.while_loop(cond, body, state)
    return state[1][:, P:], state[0]

  return jax.jit(run)


# -------------------------------------------------------------------------- entry points
def _pack(prompt_ids, model, settings: DecodeSettings, pad_id: int, start_id: int):
  """Host-side: clipped settings, the BxT buffer and mask, and the encoder inputs.

  T = P + N: P the prompt width (`prompt_width`), N the new tokens (`FamilyAdapter.pack_prompts`).
  A decoder-only request whose prompt plus max_new_tokens passes max_len gets fewer new tokens,
  with a logged warning.
  """
  cfg = model.cfg
  check_settings(settings)
  check_prompts(prompt_ids, cfg.max_len, cfg.family)
  check_new_tokens(settings, cfg.max_len, cfg.family)
  width = lambda longest, n_new: prompt_width(longest, n_new, cfg.max_len, settings.prompt_buckets)
  n_new, buf, mask, enc, enc_mask = model_family.of(cfg).pack_prompts(
      prompt_ids, cfg, settings.max_new_tokens, width, pad_id, start_id)
  static = dataclasses.replace(settings, max_new_tokens=n_new, seed=0)
  return static, jnp.asarray(buf), jnp.asarray(mask), enc, enc_mask


def trim(tokens: Sequence[int], eos_id: Optional[int], stops=(), pad_id: Optional[int] = None
         ) -> list[int]:
  """Generated ids up to (not including) the first EOS or the end of the first stop sequence."""
  out: list[int] = []
  for tok in tokens:
    tok = int(tok)
    if eos_id is not None and tok == eos_id:
      break
    out.append(tok)
    hit = next((s for s in stops if len(out) >= len(s) and tuple(out[-len(s):]) == tuple(s)), None)
    if hit is not None:
      del out[len(out) - len(hit):]
      break
  return out


def generate(model, params, prompt_ids: Sequence[Sequence[int]], settings: DecodeSettings,
             eos_id: Optional[int], pad_id: int, rng: Optional[Any] = None,
             start_id: Optional[int] = None) -> list[list[int]]:
  """Completions (token ids, without the prompt, EOS or stop sequence) of a batch of prompts.

  Beam search when settings.num_beams > 1. `rng` defaults to PRNGKey(settings.seed);
  `start_id` is the decoder start token of an encoder-decoder model (default pad_id).
  """
  if settings.num_beams > 1:
    return beam_search(model, params, prompt_ids, settings, eos_id, pad_id, start_id)
  static, buf, mask, enc, enc_mask = _pack(prompt_ids, model, settings, pad_id,
                                           pad_id if start_id is None else start_id)
  rng = jax.random.key(settings.seed) if rng is None else rng
  eos = jnp.asarray(-1 if eos_id is None else int(eos_id), jnp.int32)
  pad_id = jnp.asarray(pad_id, jnp.int32)
  out, _ = _sampler(model, static)(params, buf, mask, enc, enc_mask, rng, eos, pad_id)
  return [trim(row, eos_id, settings.stop) for row in np.asarray(out)]


def beam_search(model, params, prompt_ids: Sequence[Sequence[int]], settings: DecodeSettings,
                eos_id: Optional[int], pad_id: int, start_id: Optional[int] = None
                ) -> list[list[int]]:
  """The best beam (sum log p / length ** length_penalty) of settings.num_beams per prompt."""
  from gptjax.inference import beam_search as beams  # pylint: disable=g-import-not-at-top
  return beams.beam_search(model, params, prompt_ids, settings, eos_id, pad_id, start_id)


def generate_padded(model, params, prompt_ids, settings: DecodeSettings, eos_id, pad_id, rng=None,
                    start_id=None) -> tuple[np.ndarray, int]:
  """The raw BxN output buffer and the number of loop steps run (for timings)."""
  static, buf, mask, enc, enc_mask = _pack(prompt_ids, model, settings, pad_id,
                                           pad_id if start_id is None else start_id)
  rng = jax.random.key(settings.seed) if rng is None else rng
  eos = jnp.asarray(-1 if eos_id is None else int(eos_id), jnp.int32)
  pad_id = jnp.asarray(pad_id, jnp.int32)
  out, steps = _sampler(model, static)(params, buf, mask, enc, enc_mask, rng, eos, pad_id)
  return np.asarray(out), int(steps)
