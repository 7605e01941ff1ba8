"""The CPU matmul kernel (gptjax/cpu_kernels.matmul, csrc/matmul.cc) against float64 products."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import cpu_kernels, layers


def _cpu_has_avx512() -> bool:
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  return cpuinfo.exists() and " avx512f" in cpuinfo.read_text()


pytestmark = pytest.mark.skipif(cpu_kernels._compiler() is None or not _cpu_has_avx512(),
                                reason="needs a C++ compiler and an AVX-512 CPU")


def test_kernel_is_available_where_the_cpu_has_avx512():
  assert cpu_kernels.matmul_available()  # no silent fallback on a machine that can run it


def _operands(m, k, n, a_trans, b_trans, seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(k, m) if a_trans else (m, k)).astype(np.float32)
  b = rng.normal(size=(n, k) if b_trans else (k, n)).astype(np.float32)
  return a, b


# Rows off the 12-row tile, columns off the 32-column tile (remainders above and below 16), depth
# past one 256-deep block and off the 16-wide transposes, and enough strips for several chunks.
SHAPES = [(37, 300, 45), (131, 17, 70), (64, 520, 33), (400, 64, 600)]


@pytest.mark.parametrize("a_trans", [False, True])
@pytest.mark.parametrize("b_trans", [False, True])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matches_float64_product(m, k, n, a_trans, b_trans):
  a, b = _operands(m, k, n, a_trans, b_trans)
  assert cpu_kernels.matmul_applies(jnp.asarray(a), jnp.asarray(b), a_trans, b_trans)
  got = jax.jit(lambda x, y: cpu_kernels.matmul(x, y, a_trans, b_trans))(a, b)
  want = (a.T if a_trans else a).astype(np.float64) @ (b.T if b_trans else b).astype(np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("a_trans,b_trans", [(False, False), (False, True), (True, False),
                                             (True, True)])
def test_gradients_match_xla_dot(a_trans, b_trans):
  a, b = _operands(50, 70, 90, a_trans, b_trans, seed=1)

  def loss(product):
    return lambda x, y: jnp.sum(jnp.sin(product(x, y)))

  xla = lambda x, y: jnp.dot(x.T if a_trans else x, y.T if b_trans else y)  # noqa: E731
  kernel = lambda x, y: cpu_kernels.matmul(x, y, a_trans, b_trans)  # noqa: E731
  want = jax.grad(loss(xla), argnums=(0, 1))(a, b)
  got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(a, b)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
  # the backward's products run through the kernel too
  text = str(jax.make_jaxpr(jax.grad(loss(kernel), argnums=(0, 1)))(a, b))
  assert text.count(cpu_kernels.MATMUL) == 3


def test_small_and_non_float32_products_fall_back_to_xla():
  a, b = _operands(8, 64, 64, False, False)
  assert not cpu_kernels.matmul_applies(jnp.asarray(a), jnp.asarray(b))  # one decode row block
  text = str(jax.make_jaxpr(cpu_kernels.matmul)(a, b))
  assert cpu_kernels.MATMUL not in text and "dot_general" in text
  a16, b16 = (jnp.asarray(x, jnp.bfloat16) for x in _operands(64, 64, 64, False, False))
  assert not cpu_kernels.matmul_applies(a16, b16)
  got = cpu_kernels.matmul(a16, b16, b_trans=True)
  assert got.dtype == jnp.bfloat16 and got.shape == (64, 64)


def test_dense_and_tied_output_layer_use_the_kernel_behind_the_switch():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 16, 64)), jnp.float32)
  dense = layers.Dense((64,), (96,), ("embed", "mlp"))
  embed = layers.Embed(num_embeddings=100, features=64)
  dense_params = dense.init(jax.random.key(0), x)
  embed_params = embed.init(jax.random.key(1), jnp.zeros((4, 16), jnp.int32))
  logits = lambda p, x: embed.apply(p, x, method=layers.Embed.attend)  # noqa: E731
  assert cpu_kernels.MATMUL in str(jax.make_jaxpr(dense.apply)(dense_params, x))
  assert cpu_kernels.MATMUL in str(jax.make_jaxpr(logits)(embed_params, x))
  want_dense, want_logits = dense.apply(dense_params, x), logits(embed_params, x)
  layers.PERF["cpu_matmul"] = False
  try:
    assert cpu_kernels.MATMUL not in str(jax.make_jaxpr(dense.apply)(dense_params, x))
    np.testing.assert_allclose(want_dense, dense.apply(dense_params, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(want_logits, logits(embed_params, x), rtol=1e-5, atol=1e-5)
  finally:
    layers.PERF["cpu_matmul"] = True
