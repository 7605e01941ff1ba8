"""The XLA:CPU backend (gptjax/backends/xla_cpu) against the plain `xla` formulations it replaces."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax.backends.xla_cpu import build
from gptjax.backends.xla_cpu import fast_paths
from gptjax.backends.xla_cpu import kernels as cpu_kernels
from gptjax.backends.xla_cpu import ops as xla_cpu_ops
from gptjax.model import attention
from gptjax.model import layers
from gptjax.model.ops import XLA
from gptjax.training import objectives

# On a CPU backend with a compiler the kernels must build: no silent fallback. Elsewhere they
# never run (config.model.kernels=auto resolves to xla), so there is nothing to compare.
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu" or build._compiler() is None,
                                reason="the XLA:CPU kernels run only on a CPU backend with a C++ compiler")
CPU = xla_cpu_ops.make_ops(frozenset())  # every trick on


def test_kernels_build_and_register():
  assert build.available() and build.unavailable_reason() is None

# The attention products and every einsum their gradients turn into.
EQUATIONS = ["blhd,bshd->bhls", "bhls,bshd->blhd", "bhls,blhd->bshd", "blhd,bhls->bshd",
             "bshd,bhls->blhd", "blhd,bshd->blhs", "bhls,bshd->bhld"]


def _operands(equation, sizes, seed=0):
  rng = np.random.default_rng(seed)
  x, y = equation.split("->")[0].split(",")
  return [jnp.asarray(rng.normal(size=[sizes[c] for c in t]), jnp.float32) for t in (x, y)]


@pytest.mark.parametrize("equation", EQUATIONS)
def test_matches_einsum_forward_and_gradients(equation):
  # Odd sizes leave partial register tiles in every dimension.
  x, y = _operands(equation, dict(b=3, l=37, s=29, h=5, d=13))
  want = jnp.einsum(equation, x, y)
  got = jax.jit(lambda a, b: cpu_kernels.head_einsum(equation, a, b))(x, y)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def loss(fn):
    return lambda a, b: jnp.sum(jnp.sin(fn(equation, a, b)))
  want_grads = jax.grad(loss(jnp.einsum), argnums=(0, 1))(x, y)
  got_grads = jax.jit(jax.grad(loss(cpu_kernels.head_einsum), argnums=(0, 1)))(x, y)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_few_matrices_split_rows_across_threads():
  # One (batch, head) pair: the kernel splits the rows into work units instead.
  x, y = _operands("blhd,bshd->bhls", dict(b=1, l=131, s=70, h=1, d=64), seed=1)
  got = jax.jit(lambda a, b: cpu_kernels.head_einsum("blhd,bshd->bhls", a, b))(x, y)
  np.testing.assert_allclose(got, jnp.einsum("blhd,bshd->bhls", x, y), rtol=1e-5, atol=1e-4)


def test_single_query_decode_shape_and_vmap():
  x, y = _operands("blhd,bshd->bhls", dict(b=2, l=1, s=40, h=4, d=16), seed=2)
  fn = jax.vmap(lambda a, b: cpu_kernels.head_einsum("blhd,bshd->bhls", a, b))
  got = jax.jit(fn)(x[None].repeat(3, 0), y[None].repeat(3, 0))
  np.testing.assert_allclose(got[1], jnp.einsum("blhd,bshd->bhls", x, y), rtol=1e-5, atol=1e-5)


def test_parse_accepts_head_products_only():
  form = cpu_kernels.parse_head_einsum("blhd,bshd->bhls")
  assert form == cpu_kernels.HeadProduct(swap=False, a_heads_major=False, a_trans=False,
                                         b_heads_major=False, b_trans=True, c_heads_major=True)
  assert cpu_kernels.parse_head_einsum("blhd,bhls->bshd").swap
  for bad in ["bld,bsd->bls", "blkgd,bskd->bkgls", "lbhd,sbhd->bhls", "blhd,bshd->bhll",
              "blhd,bshe->bhls"]:
    assert cpu_kernels.parse_head_einsum(bad) is None, bad


def test_other_dtypes_and_grouped_queries_fall_back_to_einsum():
  x, y = _operands("blhd,bshd->bhls", dict(b=2, l=8, s=8, h=4, d=8))
  out = cpu_kernels.head_einsum("blhd,bshd->bhls", x.astype(jnp.bfloat16), y.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  grouped = "blkgd,bskd->bkgls"  # the grouped-query form of the scores
  hlo = jax.jit(lambda a, b: cpu_kernels.head_einsum(grouped, a, b)).lower(
      x.reshape(2, 8, 2, 2, 8), y[:, :, :2]).as_text()
  assert cpu_kernels.HEAD_MATMUL not in hlo
  p = jnp.ones((2, 4, 8, 8), jnp.float32)
  hlo = jax.jit(lambda a, b: cpu_kernels.head_einsum("bhls,bshd->blhd", a, b)).lower(
      p, y[:, :1]).as_text()  # einsum broadcasts the size-1 key axis of the values
  assert cpu_kernels.HEAD_MATMUL not in hlo
  hlo = jax.jit(lambda a, b: cpu_kernels.head_einsum("blhd,bshd->bhls", a, b)).lower(x, y).as_text()
  assert cpu_kernels.HEAD_MATMUL in hlo


def _reference_attention(q, k, v, mask, scale):
  s = jnp.einsum("blhd,bshd->bhls", q, k) * scale
  if mask is not None:
    s = jnp.where(mask, s, attention.NEG_INF)
  return jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(s, axis=-1), v)


def _check_attention(q, k, v, mask, causal):
  scale = q.shape[-1] ** -0.5
  got = jax.jit(lambda *a: cpu_kernels.fused_attention(*a, scale, causal=causal))(q, k, v, mask)
  np.testing.assert_allclose(got, _reference_attention(q, k, v, mask, scale), atol=2e-6)

  def loss(fn, **kw):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask, scale, **kw)))
  want = jax.grad(loss(_reference_attention), argnums=(0, 1, 2))(q, k, v)
  got = jax.jit(jax.grad(loss(cpu_kernels.fused_attention, causal=causal),
                         argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=5e-6)


def _qkv(b, l, s, h, d, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=shape), jnp.float32)
          for shape in ((b, l, h, d), (b, s, h, d), (b, s, h, d))]


@pytest.mark.parametrize("b,l,s,h,d", [(2, 37, 29, 3, 13), (2, 64, 128, 4, 64)])
def test_fused_attention_matches_einsum_attention(b, l, s, h, d):
  q, k, v = _qkv(b, l, s, h, d)
  mask = jnp.asarray(np.random.default_rng(1).random((b, 1, l, s)) < 0.7)
  mask = mask.at[0, 0, 3, :].set(False)  # a query that sees nothing: uniform over all keys
  _check_attention(q, k, v, mask, causal=False)
  _check_attention(q, k, v, None, causal=False)
  _check_attention(q, k, v, mask[:1, :, :1], causal=False)  # key padding [1, 1, 1, S]


@pytest.mark.parametrize("l", [37, 96, 128])
def test_fused_causal_attention_skips_blocks_exactly(l):
  # Packed documents and padding on top of the causal mask, and queries that see no key at
  # all (their weights spread over the skipped keys too).
  q, k, v = _qkv(2, l, l, 2, 32, seed=l)
  segment = jnp.asarray(np.arange(l) >= l // 3)
  valid = jnp.asarray(np.random.default_rng(2).random((2, l)) < 0.9)
  mask = (jnp.tril(jnp.ones((l, l), bool)) & (segment[:, None] == segment[None, :]))[None, None]
  mask = mask & valid[:, None, None, :]
  mask = mask.at[0, 0, 5, :].set(False).at[1, 0, l - 3, :].set(False)
  _check_attention(q, k, v, mask, causal=True)


def test_attention_layer_uses_the_fused_kernel_only_where_it_applies():
  q, k, v = _qkv(2, 64, 64, 4, 16)
  mask = jnp.tril(jnp.ones((64, 64), bool))[None, None]
  bias = jnp.zeros((1, 4, 64, 64))

  def lowered(bias=None, dtype=jnp.float32):
    fn = lambda q, k, v: CPU.attention(  # noqa: E731
        q, k, v, mask, bias, 0.25, "einsum", mask_is_causal=True)
    return jax.jit(fn).lower(*(x.astype(dtype) for x in (q, k, v))).as_text()
  assert cpu_kernels.ATTENTION_FWD in lowered()
  assert cpu_kernels.ATTENTION_FWD not in lowered(bias=bias)  # bias: per-head matmul kernel
  assert cpu_kernels.HEAD_MATMUL in lowered(bias=bias)
  assert cpu_kernels.ATTENTION_FWD not in lowered(dtype=jnp.bfloat16)


def _plain_norm(kind, use_bias):
  """gptjax.model.layers.Norm with the kernel, and the plain one as a function of (params, x)."""
  module = layers.Norm(kind, 1e-5, use_bias, ops=CPU)
  return module, layers.Norm(kind, 1e-5, use_bias, ops=XLA).apply


# [2048, 256] is gpt:small's residual stream; 50 and 19 leave a partial 16-float vector per row,
# and 130 rows a partial block of 64 rows.
@pytest.mark.parametrize("kind,use_bias,shape", [("layernorm", True, (16, 128, 256)),
                                                 ("layernorm", True, (5, 26, 19)),
                                                 ("layernorm", False, (130, 64)),
                                                 ("rmsnorm", False, (3, 37, 50))])
def test_norm_matches_plain_forward_and_gradients(kind, use_bias, shape):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=shape) * 3 + 1, jnp.float32)  # a mean the norm must remove
  module, plain = _plain_norm(kind, use_bias)
  params = module.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape) * 0.3, p.dtype), params)
  assert cpu_kernels.rows_kernel_applies(x)
  np.testing.assert_allclose(jax.jit(module.apply)(params, x), plain(params, x), rtol=1e-5,
                             atol=1e-5)

  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def loss(apply):
    return lambda p, v: jnp.sum(jnp.sin(apply(p, v)) * weights)
  got = jax.jit(jax.grad(loss(module.apply), argnums=(0, 1)))(params, x)
  want = jax.grad(loss(plain), argnums=(0, 1))(params, x)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))


def test_norm_column_sums_do_not_depend_on_threads():
  # The scale gradient sums 2048 rows in blocks; the same input must give the same bits.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2048, 256)), jnp.float32)
  module = layers.Norm(ops=CPU)
  params = module.init(jax.random.key(0), x)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x) * x)))
  first = grad(params)
  for _ in range(3):
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(grad(params))):
      np.testing.assert_array_equal(a, b)


# [2048, 1024] is gpt:small's MLP; 37 features leave a partial 16-float vector per row.
@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("shape,with_bias", [((16, 128, 1024), True), ((3, 29, 37), True),
                                             ((70, 48), False)])
def test_bias_gelu_matches_jax_forward_and_gradients(approximate, shape, with_bias):
  rng = np.random.default_rng(5)
  h = jnp.asarray(rng.normal(size=shape) * 3, jnp.float32)  # well into both tails
  bias = jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32) if with_bias else None
  plain = lambda h, b: jax.nn.gelu(h if b is None else h + b, approximate=approximate)  # noqa: E731
  kernel = lambda h, b: cpu_kernels.bias_gelu(h, b, approximate)  # noqa: E731
  assert cpu_kernels.rows_kernel_applies(h)
  np.testing.assert_allclose(jax.jit(kernel)(h, bias), plain(h, bias), rtol=1e-5, atol=2e-6)

  weights = jnp.asarray(rng.normal(size=shape), jnp.float32)
  argnums = (0, 1) if with_bias else (0,)

  def loss(fn):
    return lambda h, b: jnp.sum(fn(h, b) * weights)
  got = jax.jit(jax.grad(loss(kernel), argnums=argnums))(h, bias)
  want = jax.grad(loss(plain), argnums=argnums)(h, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_bias_gelu_is_as_close_to_float64_as_jax():
  # The kernels' erf and tanh are polynomial approximations: within float32 rounding of the
  # exact GELU wherever jax.nn.gelu is.
  x = jnp.linspace(-9.0, 9.0, 4001, dtype=jnp.float32)
  x64 = np.asarray(x, np.float64)
  exact = x64 * 0.5 * np.vectorize(math.erfc)(-x64 / math.sqrt(2))
  tanh = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
  for approximate, want in ((False, exact), (True, tanh)):
    got = np.asarray(jax.jit(lambda v: cpu_kernels.bias_gelu(v, None, approximate))(x))
    jax_err = np.abs(np.asarray(jax.nn.gelu(x, approximate=approximate), np.float64) - want)
    bound = np.maximum(jax_err, 2.5e-7 * np.maximum(1.0, np.abs(x64)))
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))


def _plain_cross_entropy(logits, targets, weights):
  return objectives.cross_entropy(logits, targets, weights, XLA)


def _kernel_cross_entropy(logits, targets, weights):
  return objectives.cross_entropy(logits, targets, weights, CPU)


# gpt:small's [16, 128, 8192] logits; 37 leaves a partial vector, 5 x 3 a partial unit of rows.
@pytest.mark.parametrize("shape", [(16, 128, 8192), (5, 3, 37)])
def test_cross_entropy_kernel_matches_plain_loss_and_gradient(shape):
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=shape) * 4, jnp.float32)
  targets = jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]), jnp.int32)
  targets = targets.at[0, 0].set(-1)  # counts from the end, as in jnp.take_along_axis
  logits = logits.at[1, 1, targets[1, 1]].set(50.0)  # one row whose target is the max
  weights = jnp.asarray(rng.uniform(size=shape[:-1]) > 0.3, jnp.float32)
  assert cpu_kernels.rows_kernel_applies(logits)
  got = jax.jit(_kernel_cross_entropy)(logits, targets, weights)
  want = _plain_cross_entropy(logits, targets, weights)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert float(got[2]) >= 1.0  # the row whose target is the max counts as correct

  def loss(fn):
    return lambda x: fn(x, targets, weights)[0]
  got_grad = jax.jit(jax.grad(loss(_kernel_cross_entropy)))(logits)
  want_grad = jax.grad(loss(_plain_cross_entropy))(logits)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)


def test_cross_entropy_kernel_out_of_range_target_is_nan_like_take_along_axis():
  logits = jnp.zeros((2, 7), jnp.float32)
  targets = jnp.asarray([3, 7], jnp.int32)
  _, target_logit, _ = jax.jit(cpu_kernels.log_z_and_target)(logits, targets)
  want = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  np.testing.assert_array_equal(np.isnan(target_logit), np.isnan(want))
  assert np.isnan(target_logit[1])


@pytest.mark.parametrize("grad_scale", [1e-3, 30.0])  # below and above the clip norm
def test_clip_as_scale_matches_optax_clip(grad_scale):
  """xla_cpu's clip (one scalar factor) keeps optax's state tree and its updates."""
  params = {"kernel": jax.random.normal(jax.random.key(0), (64, 32)),
            "bias": jax.random.normal(jax.random.key(1), (32,))}
  grads = jax.tree.map(lambda x: grad_scale * jax.random.normal(jax.random.key(2), x.shape), params)
  ours, reference = fast_paths.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  assert jax.tree.structure(ours.init(params)) == jax.tree.structure(reference.init(params))
  got = jax.jit(ours.update)(grads, ours.init(params), params)[0]
  want = jax.jit(reference.update)(grads, reference.init(params), params)[0]
  tol = 0 if grad_scale < 1.0 else 1e-6  # unclipped: bit-identical
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
