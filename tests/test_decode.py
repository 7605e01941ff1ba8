"""Generation: cache vs no cache, greedy limits, top-p, sampling frequencies, stops, beams, batching."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from gptjax.inference import decode
from gptjax.model import models
from gptjax.config_schema import ConfigError
from gptjax.model.config import ModelConfig

EOS, PAD = 2, 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [40, 41, 42, 43]]
GREEDY = decode.DecodeSettings(max_new_tokens=10, temperature=0.0)


@functools.lru_cache(maxsize=None)
def tiny_model(family: str, **changes):
  """A tiny randomly initialised model; init_std 0.1 so that greedy text does not just repeat."""
  cfg = ModelConfig.from_config(load_config(family, "tiny").model)
  cfg = dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0, init_std=0.1,
                            **changes)
  return models.make_model(cfg), nn.meta.unbox(models.init_params(cfg, jax.random.key(0), 2, 8))


MODELS = {"gpt": ("gpt", ()), "gpt_rope": ("gpt", (("position", "rope"), ("num_kv_heads", 2))),
          "t5": ("t5", ()), "bart": ("bart", ())}


def get(name):
  family, changes = MODELS[name]
  return tiny_model(family, **dict(changes))


def gen(name, prompts=PROMPTS, settings=GREEDY, eos=-1, rng=None):
  model, params = get(name)
  return decode.generate(model, params, prompts, settings, eos_id=eos, pad_id=PAD, rng=rng)


@functools.lru_cache(maxsize=None)
def forward(name):
  """The jitted full forward of a decoder-only model: logits of ids_BxL."""
  model, params = get(name)
  return jax.jit(lambda ids: model.apply({"params": params}, ids)["logits"])


def next_logits(name, prompt):
  """Full-forward logits of the token after `prompt` (decoder-only)."""
  return forward(name)(jnp.asarray([prompt]))[0, -1]


@pytest.mark.parametrize("name", ["gpt", "gpt_rope", "t5"])
def test_cached_decoding_equals_uncached(name):
  cached = gen(name)
  uncached = gen(name, settings=dataclasses.replace(GREEDY, use_cache=False))
  assert cached == uncached
  assert all(len(c) == 10 for c in cached) and len({tuple(c) for c in cached}) == 3


@pytest.mark.parametrize("name", ["gpt", "gpt_rope", "t5"])
def test_prompts_of_different_lengths_batch_like_one_at_a_time(name):
  batched = gen(name)
  alone = [gen(name, [p])[0] for p in PROMPTS]
  assert batched == alone


def test_greedy_is_the_argmax_of_the_full_forward():
  out = gen("gpt", [PROMPTS[0]])[0]
  seq = list(PROMPTS[0])
  for tok in out[:4]:
    assert tok == int(jnp.argmax(next_logits("gpt", seq)))
    seq.append(tok)


def test_top_k_1_and_low_temperature_equal_greedy():
  greedy = gen("gpt")
  assert gen("gpt", settings=decode.DecodeSettings(max_new_tokens=10, top_k=1)) == greedy
  cold = decode.DecodeSettings(max_new_tokens=10, temperature=1e-4)  # goes through the sampler
  assert not cold.greedy
  assert gen("gpt", settings=cold, rng=jax.random.key(3)) == greedy
  logits = jnp.asarray([[0.1, 2.0, -1.0, 1.9]])
  kept = np.asarray(decode.filter_logits(logits, 1.0, 1, 1.0)) > -1e29
  np.testing.assert_array_equal(kept, [[False, True, False, False]])
  kept = np.asarray(decode.filter_logits(logits, 0.0, 0, 1.0)) > -1e29
  np.testing.assert_array_equal(kept, [[False, True, False, False]])


@pytest.mark.parametrize("top_p,expected", [(0.05, {3}), (0.4, {3}), (0.41, {3, 0}), (0.7, {3, 0}),
                                            (0.71, {3, 0, 4}), (0.9, {3, 0, 4}),
                                            (0.95, {3, 0, 4, 1}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
  probs = np.asarray([0.3, 0.06, 0.04, 0.4, 0.2])
  logits = jnp.log(jnp.asarray([probs], jnp.float32))
  kept = np.asarray(decode.filter_logits(logits, 1.0, 0, top_p))[0] > -1e29
  assert set(np.flatnonzero(kept)) == expected


def test_top_k_and_top_p_combine():
  probs = np.asarray([0.3, 0.06, 0.04, 0.4, 0.2])
  logits = jnp.log(jnp.asarray([probs], jnp.float32))
  # top-k 2 renormalises to {3: .57, 0: .43}; top-p .5 of that keeps only token 3
  kept = np.asarray(decode.filter_logits(logits, 1.0, 2, 0.5))[0] > -1e29
  assert set(np.flatnonzero(kept)) == {3}


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 20, 0.9)])
def test_sampling_frequencies_match_the_tempered_distribution(temperature, top_k, top_p):
  """Chi-square of the first sampled token over 4000 copies of one prompt, through generate()."""
  n = 4000
  settings = decode.DecodeSettings(max_new_tokens=1, temperature=temperature, top_k=top_k,
                                   top_p=top_p)
  out = gen("gpt", [PROMPTS[1]] * n, settings, rng=jax.random.key(7))
  counts = np.bincount([o[0] for o in out], minlength=512)
  filtered = decode.filter_logits(next_logits("gpt", PROMPTS[1])[None], temperature, top_k, top_p)
  want = np.asarray(jax.nn.softmax(filtered[0]), np.float64)
  support = want > 1e-12
  assert counts[~support].sum() == 0
  assert support.sum() >= 3
  # pool the rare tokens into one bin so every expected count is at least 5
  expected = n * want[support]
  observed = counts[support].astype(np.float64)
  rare = expected < 5
  if rare.any():
    expected = np.append(expected[~rare], expected[rare].sum())
    observed = np.append(observed[~rare], observed[rare].sum())
  chi2 = float(((observed - expected) ** 2 / expected).sum())
  dof = len(expected) - 1
  assert chi2 < dof + 4 * np.sqrt(2 * dof) + 10, (chi2, dof)  # far beyond p=0.001 would fail


def test_same_seed_same_output_and_other_seed_differs():
  settings = decode.DecodeSettings(max_new_tokens=10, temperature=1.0, top_p=0.95)
  a = gen("gpt", settings=settings, rng=jax.random.key(11))
  b = gen("gpt", settings=settings, rng=jax.random.key(11))
  c = gen("gpt", settings=settings, rng=jax.random.key(12))
  d = gen("gpt", settings=dataclasses.replace(settings, seed=11))  # rng defaults to key(seed)
  assert a == b == d
  assert a != c


@pytest.mark.parametrize("name", ["gpt", "t5"])
def test_eos_and_stop_sequences_end_generation(name):
  model, params = get(name)
  full = gen(name, [PROMPTS[0]])[0]
  eos = full[3]
  first = full.index(eos)
  assert gen(name, [PROMPTS[0]], eos=eos)[0] == full[:first]
  out, steps = decode.generate_padded(model, params, [PROMPTS[0]], GREEDY, eos, PAD)
  assert steps == first + 1 and np.all(out[0, first + 1:] == PAD)
  stop = tuple(full[4:6])
  settings = dataclasses.replace(GREEDY, stop=((999, 998), stop))
  out, steps = decode.generate_padded(model, params, [PROMPTS[0]], settings, -1, PAD)
  end = next(i for i in range(len(full)) if tuple(full[i - 1:i + 1]) == stop and i >= 1)
  assert steps == end + 1
  assert gen(name, [PROMPTS[0]], settings)[0] == full[:end - 1]


@pytest.mark.parametrize("name", ["gpt", "bart"])
def test_beam_width_1_equals_greedy(name):
  model, params = get(name)
  greedy = gen(name, eos=EOS)
  width1 = dataclasses.replace(GREEDY, num_beams=1)
  assert decode.beam_search(model, params, PROMPTS, width1, EOS, PAD) == greedy
  eos = gen(name)[0][3]  # a finished beam ends exactly where greedy stops
  greedy = gen(name, eos=eos)
  assert len(greedy[0]) <= 3
  assert decode.beam_search(model, params, PROMPTS, width1, eos, PAD) == greedy


def _logprob(name, prompt, completion):
  ids = jnp.asarray([prompt + completion])
  logp = jax.nn.log_softmax(forward(name)(ids)[0].astype(jnp.float32))
  return float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(completion)))


def test_wider_beams_find_sequences_at_least_as_likely_as_greedy():
  model, params = get("gpt")
  settings = decode.DecodeSettings(max_new_tokens=6, num_beams=4, length_penalty=0.0)
  beams = decode.beam_search(model, params, PROMPTS, settings, -1, PAD)
  greedy = gen("gpt", settings=dataclasses.replace(settings, num_beams=1, temperature=0.0))
  for p, b, g in zip(PROMPTS, beams, greedy):
    assert len(b) == 6
    assert _logprob("gpt", p, b) >= _logprob("gpt", p, g) - 1e-4


def test_repetition_penalty_reduces_repeats():
  plain = gen("gpt")
  penalised = gen("gpt", settings=dataclasses.replace(GREEDY, repetition_penalty=10.0))
  repeats = lambda outs: sum(len(o) - len(set(o)) for o in outs)
  assert repeats(penalised) < repeats(plain)


@pytest.mark.parametrize("prompts,changes,needle", [
    ([], {}, "no prompt"),
    ([[5], []], {}, "prompt 1 is empty"),
    ([list(range(3, 3 + 64))], {}, "longer than the context"),
    ([[5]], {"top_p": 0.0}, "config.generate.top_p=0.0"),
    ([[5]], {"top_p": 1.5}, "config.generate.top_p=1.5"),
    ([[5]], {"temperature": -0.5}, "config.generate.temperature=-0.5"),
    ([[5]], {"top_k": -1}, "config.generate.top_k=-1"),
    ([[5]], {"num_beams": 0}, "config.generate.num_beams=0"),
])
def test_bad_inputs_are_one_line_config_errors(prompts, changes, needle):
  with pytest.raises(ConfigError) as e:
    gen("gpt", prompts, dataclasses.replace(GREEDY, **changes))
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_long_prompt_leaves_room_by_shortening_the_completion():
  out = gen("gpt", [list(range(3, 3 + 60))])[0]
  assert len(out) == 4  # max_len 64


def test_settings_from_config_reads_generate_fields():
  config = load_config("gpt", "tiny", **{"generate.top_k": 5, "generate.stop": "ab|c"})

  class Tok:
    def encode(self, text):
      return [ord(ch) for ch in text]
  s = decode.settings_from_config(config, Tok())
  assert s.top_k == 5 and s.stop == ((97, 98), (99,)) and s.max_new_tokens == 64
