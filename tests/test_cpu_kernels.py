"""The CPU attention-matmul kernel (gptjax/cpu_kernels.py) against jnp.einsum."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler")

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
  assert cpu_kernels.TARGET not in hlo
  p = jnp.ones((2, 4, 8, 8), jnp.float32)
  hlo = jax.jit(lambda a, b: cpu_kernels.head_einsum("bhls,bshd->blhd", a, b)).lower(
      p, y[:, :1]).as_text()  # einsum broadcasts the size-1 key axis of the values
  assert cpu_kernels.TARGET not in hlo
  hlo = jax.jit(lambda a, b: cpu_kernels.head_einsum("blhd,bshd->bhls", a, b)).lower(x, y).as_text()
  assert cpu_kernels.TARGET in hlo
