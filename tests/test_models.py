"""Model core: published sizes, causality, padding, positions, KV cache, dtypes."""

import dataclasses
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, one_error_line, run_tiny_cli
from gptjax import config_schema
from gptjax.model import attention
from gptjax.model import models
from gptjax.model import ops
from gptjax.model import positions
from gptjax.analysis import param_summary as summary
from gptjax.model.config import ModelConfig

FAMILIES = ("gpt", "bert", "t5", "bart")


def tiny(family: str, **changes) -> ModelConfig:
  cfg = ModelConfig.from_config(load_config(family, "tiny").model)
  return dataclasses.replace(cfg, dropout_rate=0.0, attention_dropout_rate=0.0, **changes)


def init(cfg: ModelConfig, seq_len=8):
  return nn.meta.unbox(models.init_params(cfg, jax.random.key(0), 2, seq_len))


@pytest.mark.parametrize("family,expected", [("gpt", 124439808), ("bert", 110106428),
                                             ("t5", 60506624), ("bart", 139420416)])
def test_base_variants_have_published_parameter_counts(family, expected):
  cfg = ModelConfig.from_config(load_config(family, "base").model)
  assert summary.count_params(summary.param_shapes(cfg)) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_classifier_starts_near_chance(family):
  """A fresh classification head gives logits of order 1 at most, so the first loss is near ln 2.

  T5's init_std of 1.0 is for its embeddings; a head drawn at that std started sst2 fine-tuning
  at a loss of 2.6 with gradient norms of 100.
  """
  from gptjax.model import family as families  # pylint: disable=g-import-not-at-top
  cfg = tiny(family, num_classes=2)
  params = init(cfg, seq_len=16)
  ids = jax.random.randint(jax.random.key(1), (8, 16), 5, cfg.vocab_size)
  batch = {"inputs": ids, "input_mask": jnp.ones_like(ids), "token_type_ids": jnp.zeros_like(ids)}
  logits = families.of(cfg).classify(models.make_model(cfg), params, batch)["class_logits"]
  loss_both_labels = -jax.nn.log_softmax(logits).mean()  # ln 2 for logits of 0
  assert float(jnp.abs(logits).max()) < 2.0, logits
  assert float(loss_both_labels) < math.log(2) + 0.2


def test_summary_table_ends_with_total():
  cfg = tiny("gpt")
  tree = summary.param_shapes(cfg)
  text = summary.format_table(summary.module_table(tree), summary.count_params(tree))
  assert text.splitlines()[-1] == f"total params: {summary.count_params(tree)}"
  assert "decoder/layers_1/self_attn" in text


def _gradient_per_input_position(cfg, params, ids, output_fn):
  """|d output / d input embedding| summed per input position, via a one-hot relaxation."""
  table = params["token_embed"]["embedding"]
  model = models.make_model(cfg)
  holder = {}

  def soft_embed(next_fn, args, kwargs, context):
    if context.module.name == "token_embed" and context.method_name == "__call__" and \
        args[0].shape == ids.shape and "oh" in holder:
      return jnp.einsum("blv,vd->bld", holder["oh"], table)
    return next_fn(*args, **kwargs)

  def f(oh):
    holder["oh"] = oh
    with nn.intercept_methods(soft_embed):
      return output_fn(model, ids)

  grad = jax.jit(jax.grad(f))(jax.nn.one_hot(ids, cfg.vocab_size))
  return np.abs(np.asarray(grad)).sum(axis=(0, 2))


@pytest.mark.parametrize("family,position", [("gpt", "learned"), ("gpt", "rope"), ("gpt", "alibi"),
                                             ("gpt", "sinusoidal"), ("t5", "relative"),
                                             ("bart", "learned")])
def test_decoder_is_causal_through_gradients(family, position):
  cfg = tiny(family, position=position)
  params = init(cfg)
  ids = jnp.arange(2 * 8).reshape(2, 8) % 60 + 5
  enc = jnp.arange(2 * 5).reshape(2, 5) % 50 + 3
  t = 4

  def output(model, x):
    if cfg.family == "decoder_only":
      return model.apply({"params": params}, x)["logits"][:, t].sum()
    return model.apply({"params": params}, enc, jnp.ones_like(enc), x)["logits"][:, t].sum()

  per_pos = _gradient_per_input_position(cfg, params, ids, output)
  assert np.all(per_pos[t + 1:] == 0.0), per_pos
  assert np.all(per_pos[: t + 1] > 0.0), per_pos


def test_encoder_is_bidirectional():
  cfg = tiny("bert")
  params = init(cfg)
  ids = jnp.arange(16).reshape(2, 8) % 60 + 5
  output = lambda model, x: model.apply({"params": params}, x)["hidden"][:, 0].sum()
  per_pos = _gradient_per_input_position(cfg, params, ids, output)
  assert np.all(per_pos > 0.0), per_pos


@pytest.mark.parametrize("family", FAMILIES)
def test_appending_padding_leaves_real_positions_unchanged(family):
  cfg = tiny(family)
  params = init(cfg)
  model = models.make_model(cfg)
  ids = jnp.arange(2 * 6).reshape(2, 6) % 60 + 5
  padded = jnp.concatenate([ids, jnp.zeros((2, 3), jnp.int32)], axis=1)
  mask, pmask = jnp.ones_like(ids), jnp.concatenate([jnp.ones_like(ids), jnp.zeros((2, 3), jnp.int32)], 1)
  if cfg.family == "encoder_only":
    a = model.apply({"params": params}, ids, mask)["hidden"]
    b = model.apply({"params": params}, padded, pmask)["hidden"][:, :6]
  elif cfg.family == "decoder_only":
    a = model.apply({"params": params}, ids, input_mask=mask)["logits"]
    b = model.apply({"params": params}, padded, input_mask=pmask)["logits"][:, :6]
  else:
    dec = jnp.arange(2 * 5).reshape(2, 5) % 40 + 7
    a = model.apply({"params": params}, ids, mask, dec)["logits"]
    b = model.apply({"params": params}, padded, pmask, dec)["logits"]
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


def _reference_t5_bucket(relative_position, bidirectional, num_buckets, max_distance):
  """The published definition (mesh_tensorflow / T5 paper code), written in plain Python."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    if n < 0:
      ret += num_buckets
    n = abs(n)
  else:
    n = max(n, 0)
  max_exact = num_buckets // 2
  if n < max_exact:
    return ret + n
  val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                        * (num_buckets - max_exact))
  return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bucket_matches_published_definition(bidirectional):
  offsets = np.array([-1000, -200, -128, -127, -64, -33, -20, -16, -9, -8, -7, -1, 0, 1, 2, 7, 8,
                      9, 15, 16, 17, 31, 32, 64, 100, 127, 128, 129, 500])
  got = positions.t5_relative_bucket(jnp.asarray(offsets), bidirectional, 32, 128)
  want = [_reference_t5_bucket(int(o), bidirectional, 32, 128) for o in offsets]
  np.testing.assert_array_equal(np.asarray(got), want)
  # a few hand-checked values from the T5 definition
  if bidirectional:
    assert int(positions.t5_relative_bucket(jnp.asarray(0), True, 32, 128)) == 0
    assert int(positions.t5_relative_bucket(jnp.asarray(3), True, 32, 128)) == 16 + 3
    assert int(positions.t5_relative_bucket(jnp.asarray(-3), True, 32, 128)) == 3


def test_rope_scores_depend_only_on_relative_offset():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32)
  def score(i, j):
    qi = positions.apply_rope(q, jnp.array([[i]]), 10000.0)
    kj = positions.apply_rope(k, jnp.array([[j]]), 10000.0)
    return np.asarray(jnp.einsum("blhd,blhd->h", qi, kj))
  np.testing.assert_allclose(score(3, 1), score(10, 8), atol=1e-4)
  np.testing.assert_allclose(score(0, 5), score(20, 25), atol=1e-4)
  assert not np.allclose(score(3, 1), score(3, 2), atol=1e-3)


@pytest.mark.parametrize("family,changes", [("gpt", {}), ("gpt", {"position": "rope", "num_kv_heads": 2}),
                                            ("gpt", {"scan_layers": True}), ("gpt", {"position": "alibi"}),
                                            ("t5", {}), ("bart", {})])
def test_kv_cache_decoding_matches_full_forward(family, changes):
  cfg = tiny(family, **changes)
  params = init(cfg)
  model = models.make_model(cfg)
  apply = jax.jit(model.apply, static_argnames=("decode", "mutable", "method"))
  ids = jnp.arange(2 * 7).reshape(2, 7) % 60 + 5
  if cfg.family == "decoder_only":
    full = apply({"params": params}, ids)["logits"]
    cache = model.init(jax.random.key(1), ids[:, :1], decode=True)["cache"]
    # prefill 3 tokens, then one at a time
    out, mut = apply({"params": params, "cache": cache}, ids[:, :3], decode=True,
                           mutable=("cache",))
    steps = [out["logits"]]
    cache = mut["cache"]
    for t in range(3, 7):
      out, mut = apply({"params": params, "cache": cache}, ids[:, t:t + 1], decode=True,
                             mutable=("cache",))
      cache = mut["cache"]
      steps.append(out["logits"])
  else:
    enc = jnp.arange(2 * 6).reshape(2, 6) % 50 + 3
    emask = jnp.ones_like(enc)
    full = apply({"params": params}, enc, emask, ids)["logits"]
    encoded = apply({"params": params}, enc, emask, method=models.EncoderDecoder.encode)
    cache = model.init(jax.random.key(1), encoded, emask, ids[:, :1], decode=True,
                       method=models.EncoderDecoder.decode)["cache"]
    steps = []
    for t in range(7):
      logits, mut = apply({"params": params, "cache": cache}, encoded, emask, ids[:, t:t + 1],
                                decode=True, mutable=("cache",), method=models.EncoderDecoder.decode)
      cache = mut["cache"]
      steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_compute_stays_close_to_float32(family):
  cfg32 = tiny(family)
  params = init(cfg32)
  cfg16 = dataclasses.replace(cfg32, dtype="bfloat16")
  inputs = models.dummy_inputs(cfg32, 2, 8)
  inputs = {k: (v * 7 + 3) % 100 if "mask" not in k else v for k, v in inputs.items()}
  key = "mlm_logits" if family == "bert" else "logits"
  a = models.make_model(cfg32).apply({"params": params}, **inputs)[key]
  b = models.make_model(cfg16).apply({"params": params}, **inputs)[key]
  assert b.dtype == jnp.bfloat16
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  rel = np.linalg.norm(a - b) / np.linalg.norm(a)
  assert rel < 0.03, rel


def test_dot_product_attention_impl_matches_einsum():
  cfg = tiny("gpt", num_kv_heads=2)
  params = init(cfg)
  ids = jnp.arange(16).reshape(2, 8) % 60 + 5
  a = models.make_model(cfg).apply({"params": params}, ids)["logits"]
  cfg2 = dataclasses.replace(cfg, attention_impl="dot_product")
  b = models.make_model(cfg2).apply({"params": params}, ids)["logits"]
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation,norm_position,norm", [(None, None, None), ("swiglu", "pre", "rmsnorm")])
def test_tiny_variants_run_forward_and_backward(family, activation, norm_position, norm):
  changes = {} if activation is None else dict(activation=activation, norm_position=norm_position, norm=norm)
  cfg = tiny(family, **changes)
  cfg = dataclasses.replace(cfg, dropout_rate=0.1)
  params = init(cfg)
  model = models.make_model(cfg)
  inputs = models.dummy_inputs(cfg, 2, 8)

  def loss(p):
    out = model.apply({"params": p}, **inputs, deterministic=False, rngs={"dropout": jax.random.key(2)})
    logits = out["mlm_logits"] if "mlm_logits" in out else out["logits"]
    return jnp.mean(jax.nn.logsumexp(logits.astype(jnp.float32), -1))

  value, grads = jax.value_and_grad(loss)(params)
  assert np.isfinite(float(value))
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > len(norms) // 2


@pytest.mark.parametrize("field,value,needle", [
    ("model.num_heads", 5, "config.model.num_heads=5"),
    ("model.position", "bogus", "config.model.position='bogus'"),
    ("data.seq_len", 1000, "config.data.seq_len=1000"),
    ("objective", "span_corruption", "config.objective='span_corruption'"),
])
def test_impossible_configs_fail_in_one_line_naming_the_field(field, value, needle):
  config = load_config("gpt", "tiny", **{field: value})
  with pytest.raises(config_schema.ConfigError) as e:
    config_schema.validate(config)
  assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="kernels=xla_cpu runs on CPU only")
@pytest.mark.parametrize("family", FAMILIES)
def test_xla_cpu_kernels_keep_loss_and_gradients(family):
  """kernels=xla_cpu (every CPU trick, the C++ kernels) computes what kernels=xla computes."""
  from gptjax.training import objectives  # pylint: disable=g-import-not-at-top
  if ops.resolve_kernels("auto") != "xla_cpu":
    pytest.skip("the XLA:CPU kernels do not build here")
  params = init(tiny(family, kernels="xla"))
  key = "mlm_logits" if family == "bert" else "logits"

  def loss_and_grads(kernels):
    cfg = tiny(family, kernels=kernels)
    model = models.make_model(cfg)
    inputs = models.dummy_inputs(cfg, 2, 8)
    inputs = {k: (v * 7 + 3) % 100 if "mask" not in k else v for k, v in inputs.items()}

    def loss(p):
      logits = model.apply({"params": p}, **inputs)[key]
      targets = jnp.arange(logits.shape[0] * logits.shape[1]).reshape(logits.shape[:2]) % 50
      total, count, _ = objectives.cross_entropy(logits, targets, jnp.ones(targets.shape),
                                                 ops.ops_for(cfg))
      return total / count

    return jax.jit(jax.value_and_grad(loss))(params)

  # t5 and bart (relative position bias) run the per-head matmul kernel, gpt and bert the fused one
  slow_loss, slow_grads = loss_and_grads("xla")
  fast_loss, fast_grads = loss_and_grads("xla_cpu")
  np.testing.assert_allclose(fast_loss, slow_loss, rtol=1e-6)
  jax.tree_util.tree_map_with_path(
      lambda path, f, g: np.testing.assert_allclose(f, g, atol=1e-6, rtol=1e-4,
                                                    err_msg=jax.tree_util.keystr(path)),
      fast_grads, slow_grads)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_causal_query_blocks_match_full_attention(kv_heads):
  """Skipping the key blocks above the diagonal (xla_cpu's causal_blocks) changes nothing."""
  from gptjax.backends.xla_cpu import ops as xla_cpu_ops  # pylint: disable=g-import-not-at-top
  b, l, h, dh = 2, 256, 4, 16
  assert xla_cpu_ops.causal_query_blocks(l, l) == 4
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, l, h, dh))
  k, v = (jax.random.normal(kk, (b, l, kv_heads, dh)) for kk in ks[1:3])
  segments = jnp.cumsum(jax.random.bernoulli(ks[3], 0.02, (b, l)), axis=1)  # packed documents
  mask = models.build_mask(None, True, l, segments)
  bias = positions.alibi_bias(jnp.arange(l), jnp.arange(l), h, True)

  def attend(blocked):
    if blocked:
      f = lambda q, k, v: xla_cpu_ops.blocked_causal_attention(  # noqa: E731
          attention.einsum_attention, q, k, v, mask, bias, dh ** -0.5, 4)
    else:
      f = lambda q, k, v: attention.einsum_attention(q, k, v, mask, bias, dh ** -0.5)  # noqa: E731

    def out_and_grads(q, k, v):
      out, vjp = jax.vjp(f, q, k, v)
      return out, vjp(jnp.cos(out))

    return jax.jit(out_and_grads)(q, k, v)

  np.testing.assert_allclose(attend(True)[0], attend(False)[0], atol=1e-5)
  for blocked, full in zip(attend(True)[1], attend(False)[1]):
    np.testing.assert_allclose(blocked, full, atol=1e-5)


def test_model_config_fields_and_defaults_are_base_config_model():
  """ModelConfig has exactly config.model's fields and defaults; `auto` is resolved once."""
  base = config_schema.base_config().model.to_dict()
  cfg = ModelConfig()
  assert {f.name for f in dataclasses.fields(ModelConfig)} == set(base)
  for name, value in base.items():
    if name != "kernels":
      assert getattr(cfg, name) == value, name
  assert base["kernels"] == "auto" and cfg.kernels in ("xla", "xla_cpu")
  assert cfg.kernels == ops.resolve_kernels("auto")


def test_model_config_refuses_unknown_keys_and_kernels():
  config = load_config("gpt", "tiny")
  with config.unlocked():
    config.model.nmu_layers = 2
  with pytest.raises(config_schema.ConfigError, match="config.model.nmu_layers is not"):
    ModelConfig.from_config(config.model)
  for field, value in (("model.kernels", "cuda"), ("model.kernel_exclude", "flat_dense,fast")):
    with pytest.raises(config_schema.ConfigError) as e:
      config_schema.validate(load_config("gpt", "tiny", **{field: value}))
    assert f"config.{field}" in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(config_schema.ConfigError, match="cuda"):
    ModelConfig(kernels="cuda")


def test_no_module_outside_backends_imports_a_backend():
  """`import gptjax` and every module outside gptjax/backends load nothing from gptjax.backends."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = """
import importlib, pathlib, sys
import gptjax
root = pathlib.Path(gptjax.__file__).parent
for path in sorted(root.rglob("*.py")):
  name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
  if not name.startswith("gptjax.backends"):
    importlib.import_module(name)
print(sorted(m for m in sys.modules if m.startswith("gptjax.backends")))
"""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     cwd=pathlib.Path(__file__).resolve().parents[1])
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout


def test_cpu_training_with_kernels_xla_loads_no_backend(data_cache, tmp_path, monkeypatch):
  """A tiny CPU training run with --config.model.kernels=xla imports nothing from gptjax.backends."""
  monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # every import, one line each on stderr
  code, _, err = run_tiny_cli(data_cache, f"--workdir={tmp_path / 'w'}", "--config.train.steps=2",
                              "--config.train.eval_every=0", "--config.model.kernels=xla")
  assert code == 0, err[-2000:]
  assert "gptjax.model.ops" in err and "gptjax.backends" not in err
  monkeypatch.delenv("PYTHONPROFILEIMPORTTIME")
  code, _, err = run_tiny_cli(data_cache, f"--workdir={tmp_path / 'bad'}", "--config.model.kernels=cuda")
  assert code == 2 and "config.model.kernels='cuda'" in one_error_line(err)


def test_without_the_kernels_auto_warns_once_and_xla_cpu_is_one_error_line(data_cache, tmp_path,
                                                                           monkeypatch):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("GPTJAX_NO_CPU_KERNELS", "1")
  code = ("from gptjax.model.config import ModelConfig; "
          "print(ModelConfig().kernels, ModelConfig(num_layers=1).kernels)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     cwd=pathlib.Path(__file__).resolve().parents[1])
  assert r.stdout.split() == ["xla", "xla"], r.stderr[-2000:]
  if jax.default_backend() == "cpu":
    assert [l for l in r.stderr.splitlines() if l.strip()] == [
        "warning: gptjax's XLA:CPU kernels are unavailable (GPTJAX_NO_CPU_KERNELS is set); "
        "running config.model.kernels=xla"]
    rc, _, err = run_tiny_cli(data_cache, f"--workdir={tmp_path / 'w'}", "--config.model.kernels=xla_cpu")
    assert rc == 2 and "use --config.model.kernels=xla" in one_error_line(err)
