"""Beam search over the per-request KV cache of `gptjax.inference.decode` (see its docstring).

The B x W beams run as R = B * W rows of one jitted `lax.while_loop`; each step keeps the best W
unfinished and the best W finished candidates per prompt (score: sum log p / length **
length_penalty) and reorders the cache rows after their parents.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.inference.decode import (_NEG, DecodeSettings, _model_fns, _pack, repetition_penalty,
                           trim)


def _gather_beams(cache, idx_R):
  """Reorders the batch rows of every cache array (axis 1 under nn.scan's 'layers').

  The cross-attention keys and values are the same for every beam of a prompt: not copied.
  """
  def take(path, x):
    names = {getattr(p, "key", None) for p in path}
    if x.ndim < 2 or names & {"cross_key", "cross_value"}:
      return x
    axis = 1 if any(getattr(p, "key", None) == "layers" for p in path) else 0
    return jnp.take(x, idx_R, axis=axis)
  return jax.tree_util.tree_map_with_path(take, cache)


@functools.lru_cache(maxsize=32)
def _beam_searcher(model, settings: DecodeSettings):
  """The jitted beam search for one model and one set of (static) settings."""
  s = settings
  W, n_new = s.num_beams, s.max_new_tokens
  prefill, step = _model_fns(model, True)

  def run(params, buf_BxT, mask_BxT, enc_BxS, enc_mask_BxS, eos_id, pad_id):
    b, total = buf_BxT.shape
    P = total - n_new
    rep = lambda x: None if x is None else jnp.repeat(x, W, axis=0)
    buf_RxT, mask_RxT = rep(buf_BxT), rep(mask_BxT)  # R = B * W rows
    logits, cache, ctx = prefill(params, buf_RxT, mask_RxT, P, rep(enc_BxS), rep(enc_mask_BxS))
    length_R = mask_RxT[:, :P].sum(axis=1)
    vocab = logits.shape[-1]
    r = b * W
    seen = jnp.zeros((r, vocab if s.repetition_penalty != 1.0 else 1), bool)
    if s.repetition_penalty != 1.0:
      seen = seen.at[jnp.arange(r)[:, None], buf_RxT[:, :P]].max(mask_RxT[:, :P] > 0)
    alive_logp = jnp.tile(jnp.asarray([0.0] + [_NEG] * (W - 1), jnp.float32), (b, 1))
    penalty = lambda n: jnp.asarray(n, jnp.float32) ** s.length_penalty

    def cond(st):
      return (st[0] < n_new) & ~jnp.all(st[8])

    def body(st):
      t, alive_seq, alive_logp, logits, cache, seen, fin_seq, fin_score, done = st
      lg = repetition_penalty(logits.astype(jnp.float32), seen, s.repetition_penalty)
      logp_BxWxV = jax.nn.log_softmax(lg, axis=-1).reshape(b, W, vocab)
      cand = (alive_logp[:, :, None] + logp_BxWxV).reshape(b, W * vocab)
      score_2W, idx_2W = jax.lax.top_k(cand, 2 * W)
      parent_2W, tok_2W = idx_2W // vocab, (idx_2W % vocab).astype(alive_seq.dtype)
      cand_seq = jnp.take_along_axis(alive_seq, parent_2W[:, :, None], axis=1)
      cand_seq = jax.lax.dynamic_update_index_in_dim(cand_seq, tok_2W, t, axis=2)
      is_eos = tok_2W == eos_id
      # finished: the best W of the old finished and the candidates that just ended
      fin_cand = jnp.where(is_eos, score_2W / penalty(t + 1), _NEG)
      all_score = jnp.concatenate([fin_score, fin_cand], axis=1)
      all_seq = jnp.concatenate([fin_seq, cand_seq], axis=1)
      new_fin_score, pick = jax.lax.top_k(all_score, W)
      new_fin_seq = jnp.take_along_axis(all_seq, pick[:, :, None], axis=1)
      # alive: the best W candidates that did not end
      new_alive_logp, pick = jax.lax.top_k(jnp.where(is_eos, _NEG, score_2W), W)
      new_alive_seq = jnp.take_along_axis(cand_seq, pick[:, :, None], axis=1)
      parent_W = jnp.take_along_axis(parent_2W, pick, axis=1)
      tok_W = jnp.take_along_axis(tok_2W, pick, axis=1)
      # a row is done once no alive beam can beat its worst finished one at this length
      full = jnp.min(new_fin_score, axis=1) > _NEG / 2
      new_done = done | (full & (jnp.max(new_alive_logp, axis=1) / penalty(t + 1)
                                 < jnp.min(new_fin_score, axis=1)))
      keep = lambda old, new: jnp.where(done.reshape((b,) + (1,) * (new.ndim - 1)), old, new)
      fin_seq, fin_score = keep(fin_seq, new_fin_seq), keep(fin_score, new_fin_score)
      alive_seq, alive_logp = keep(alive_seq, new_alive_seq), keep(alive_logp, new_alive_logp)
      rows_R = (jnp.arange(b)[:, None] * W + parent_W).reshape(r)
      cache = _gather_beams(cache, rows_R)
      tok_R = tok_W.reshape(r)
      if s.repetition_penalty != 1.0:
        seen = seen[rows_R].at[jnp.arange(r), tok_R].set(True)
      logits, cache = step(params, cache, ctx, None, None, None, tok_R, length_R + t)
      return t + 1, alive_seq, alive_logp, logits, cache, seen, fin_seq, fin_score, new_done

    pads = jnp.full((b, W, n_new), pad_id, buf_BxT.dtype)
    st = (jnp.zeros((), jnp.int32), pads, alive_logp, logits, cache, seen, pads,
          jnp.full((b, W), _NEG, jnp.float32), jnp.zeros(b, bool))
    st = jax.lax.while_loop(cond, body, st)
    t, alive_seq, alive_logp, fin_seq, fin_score, done = st[0], st[1], st[2], st[6], st[7], st[8]
    # rows not done ran all t steps; a done row's (frozen) alive beams cannot win
    alive_ok = (alive_logp > _NEG / 2) & ~done[:, None]
    alive_score = jnp.where(alive_ok, alive_logp / penalty(jnp.maximum(t, 1)), _NEG)
    # a finished beam wins ties (argmax takes the first)
    score = jnp.concatenate([fin_score, alive_score], axis=1)
    seq = jnp.concatenate([fin_seq, alive_seq], axis=1)
    best = jnp.argmax(score, axis=1)
    out = jnp.take_along_axis(seq, best[:, None, None], axis=1)[:, 0]
    mask = jnp.arange(n_new)[None, :] < t
    return jnp.where(mask, out, pad_id), t

  return jax.jit(run)


def beam_search(model, params, prompt_ids: Sequence[Sequence[int]], settings: DecodeSettings,
                eos_id: Optional[int], pad_id: int, start_id: Optional[int] = None
                ) -> list[list[int]]:
  """The best beam (sum log p / length ** length_penalty) of settings.num_beams per prompt."""
  static, buf, mask, enc, enc_mask = _pack(prompt_ids, model, settings, pad_id,
                                           pad_id if start_id is None else start_id)
  eos = jnp.asarray(-1 if eos_id is None else int(eos_id), jnp.int32)
  pad_id = jnp.asarray(pad_id, jnp.int32)
  out, _ = _beam_searcher(model, static)(params, buf, mask, enc, enc_mask, eos, pad_id)
  return [trim(row, eos_id, settings.stop) for row in np.asarray(out)]
