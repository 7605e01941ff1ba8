"""Per-request KV cache sizes and prompt buckets, compile reuse, int8 decoding, bad requests."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.inference import decode

from gptjax.transfer import quantize

from gptjax.model import ops
from gptjax.model import weight_matmul
from gptjax.config_schema import ConfigError
from test_decode import GREEDY, PAD, gen, get

NEW = 6


def _prompts(n, *lengths):
  return [[(5 + 7 * r + 3 * i) % 500 + 3 for i in range(n_tok)] for r, n_tok in
          enumerate(lengths)][:n]


# prompt lengths on both sides of the default buckets 8, 16, 32 and the context edge (max_len 64)
@pytest.mark.parametrize("name,lengths,buckets", [
    ("gpt", (7, 8, 1), ()), ("gpt", (9, 16, 3), ()), ("gpt", (17, 32, 2), ()),
    ("gpt", (33, 58, 40), ()),  # bucket 64 capped at max_len - NEW = 58: the context edge
    ("gpt", (4, 1, 2), (4, 12)), ("gpt", (5, 12, 11), (4, 12)),
    ("gpt_rope", (9, 16, 3), ()), ("t5", (7, 9, 16), ()), ("t5", (17, 3, 5), (4, 24)),
])
def test_cached_equals_full_recomputation_at_each_cache_size(name, lengths, buckets):
  prompts = _prompts(3, *lengths)
  settings = dataclasses.replace(GREEDY, max_new_tokens=NEW, prompt_buckets=buckets)
  model = get(name)[0]
  static, buf, _, enc, _ = decode._pack(prompts, model, settings, PAD, PAD)
  width = buf.shape[1] - NEW if model.cfg.family == "decoder_only" else enc.shape[1]
  assert width >= max(lengths) and width < 2 * max(max(lengths), 8)  # a bucket, not max_len
  cached = gen(name, prompts, settings)
  full = gen(name, prompts, dataclasses.replace(settings, use_cache=False))
  assert cached == full and all(len(c) == NEW for c in cached)


def test_the_cache_holds_prompt_bucket_plus_new_tokens():
  model, params = get("gpt")
  settings = dataclasses.replace(GREEDY, max_new_tokens=NEW)
  static, buf, mask, _, _ = decode._pack(_prompts(1, 11), model, settings, PAD, PAD)
  prefill, _ = decode._model_fns(model, True)
  _, cache, _ = jax.eval_shape(lambda p, b, m: prefill(p, b, m, 16, None, None), params, buf, mask)
  keys = cache["decoder"]["layers_0"]["self_attn"]["cached_key"]
  assert buf.shape == (1, 16 + NEW) and keys.shape[1] == 16 + NEW  # not max_len = 64


def test_prompt_lengths_within_a_bucket_compile_once():
  model, params = get("gpt")
  # buckets no other test uses: a loop of its own (the lru cache key includes the settings)
  settings = dataclasses.replace(GREEDY, max_new_tokens=4, prompt_buckets=(10, 16, 32))
  static = decode._pack(_prompts(2, 16, 15), model, settings, PAD, PAD)[0]
  loop = decode._sampler(model, static)
  before = loop._cache_size()
  outs = [decode.generate(model, params, _prompts(2, n, n - 1), settings, -1, PAD)
          for n in range(11, 17)]  # prompt widths 11..16: the 16 bucket
  assert len({tuple(map(tuple, o)) for o in outs}) > 1  # really different requests
  assert loop._cache_size() == before + 1
  decode.generate(model, params, _prompts(2, 17, 9), settings, -1, PAD)  # next bucket: new shape
  assert decode._pack(_prompts(2, 17, 9), model, settings, PAD, PAD)[0] == static
  assert loop._cache_size() == before + 2


def test_int8_decoding_stays_within_tolerance_of_dequantized_float32():
  """The int8 kernel computes x @ (q * scale) in another summation order than the float dot:
  logits agree to 1e-4 of their scale and the greedy tokens are the same."""
  model, params = get("gpt")
  qparams = quantize.quantize_params(params)
  deq = quantize.dequantize(qparams)
  ids = jnp.asarray(_prompts(2, 9, 9))
  for rows in (ids[:, :1], ids):  # one token per row (the kernel) and a prefill (the fallback)
    ours = model.apply({"params": qparams}, rows)["logits"]
    ref = model.apply({"params": deq}, rows)["logits"]
    assert float(jnp.max(jnp.abs(ours - ref))) <= 1e-4 * float(jnp.max(jnp.abs(ref))) + 1e-6
  prompts = _prompts(3, 7, 2, 4)
  assert (decode.generate(model, qparams, prompts, GREEDY, -1, PAD) ==
          decode.generate(model, deq, prompts, GREEDY, -1, PAD))
  t5, t5_params = get("t5")
  q5 = quantize.quantize_params(t5_params)
  assert (decode.generate(t5, q5, prompts, GREEDY, -1, PAD) ==
          decode.generate(t5, quantize.dequantize(q5), prompts, GREEDY, -1, PAD))


@pytest.mark.parametrize("m,k,n,transposed", [(1, 64, 200, True), (5, 33, 70, True),
                                              (16, 96, 129, False), (7, 100, 64, False)])
def test_weight_matmul_matches_the_float_product(m, k, n, transposed):
  """The plain int8 product, and on CPU the backend's int8 and float32 kernels, against numpy."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(n, k) if transposed else (k, n)), jnp.float32)
  qt = quantize.quantize_tensor(w, (1,) if transposed else (0,))
  deq = np.asarray(quantize.dequantize_tensor(qt))
  ref = np.asarray(x) @ (deq.T if transposed else deq)
  scale = qt.scale.reshape(-1)
  ours = jax.jit(weight_matmul.matmul_int8, static_argnums=3)(x, qt.values, scale, transposed)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-5)
  if ops.resolve_kernels("auto") != "xla_cpu":
    return  # the kernels below run only on a CPU backend where they build
  from gptjax.backends.xla_cpu import weight_matmul as kernel  # pylint: disable=g-import-not-at-top
  assert kernel.applies(x)
  ours = jax.jit(kernel.matmul_int8, static_argnums=3)(x, qt.values, scale, transposed)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-5)
  ref32 = np.asarray(x) @ (np.asarray(w).T if transposed else np.asarray(w))
  ours32 = jax.jit(kernel.matmul_f32, static_argnums=2)(x, w, transposed)
  g = jax.grad(lambda x, w: kernel.matmul_f32(x, w, transposed).sum(), (0, 1))(x, w)
  np.testing.assert_allclose(np.asarray(ours32), ref32, atol=1e-4, rtol=1e-5)
  g_ref = jax.grad(lambda x, w: jnp.dot(x, w.T if transposed else w).sum(), (0, 1))(x, w)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5)



@pytest.mark.parametrize("name,prompts,changes,needle", [
    ("gpt", [[5]], {"max_new_tokens": 64}, "max_new_tokens=64 does not fit"),
    ("t5", [[5]], {"max_new_tokens": 100}, "max_new_tokens=100 does not fit"),
    ("gpt", [list(range(3, 23))], {"prompt_buckets": (8, 16)}, "add a bucket of at least 20"),
    ("gpt", [[5]], {"prompt_buckets": (16, 8)}, "must be positive and increasing"),
])
def test_bad_requests_are_one_line(name, prompts, changes, needle):
  with pytest.raises(ConfigError) as e:
    gen(name, prompts, dataclasses.replace(GREEDY, **changes))
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_quantizing_non_finite_tensors_names_them_in_one_line():
  _, params = get("gpt")
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad["decoder"]["layers_1"]["mlp"]["wi"]["kernel"] = (
      bad["decoder"]["layers_1"]["mlp"]["wi"]["kernel"].at[0, 0].set(jnp.nan))
  with pytest.raises(ConfigError) as e:
    quantize.quantize_params(bad)
  assert "decoder/layers_1/mlp/wi/kernel" in str(e.value) and "\n" not in str(e.value)


def test_prompt_buckets_parse_from_the_config_string():
  assert decode.parse_buckets("32, 128,512") == (32, 128, 512) and decode.parse_buckets("") == ()
  with pytest.raises(ConfigError, match="comma-separated integers"):
    decode.parse_buckets("32,big")
