"""Graph rewrites (custom gradients, reshapes) that XLA:CPU runs faster than the plain formulation.

Each computes what gptjax's plain `xla` ops compute (tests/test_models.py checks loss and
gradients of kernels=xla_cpu against kernels=xla); what each one bought on CPU is measured in
experiments/PERFORMANCE.md. None was measured on GPU or TPU, so only the xla_cpu ops use them
(gptjax/backends/xla_cpu/ops.py), each one a trick that config.model.kernel_exclude can turn off.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

@jax.custom_vjp
def residual_grad_barrier(x: Array) -> Array:
  """Identity whose backward materialises the cotangent, on the CPU backend only.

  XLA:CPU fuses the residual-stream gradient of every layer above into each of its consumers
  (norm backward, weight-gradient matmuls, bias sums), recomputing the whole chain per layer:
  quadratic in depth. `optimization_barrier` is expanded away before fusion on CPU, so the
  cotangent goes through a `cond` whose two branches are both the identity; XLA cannot fuse
  across a conditional. Numerically an identity in both directions.
  """
  return x


def _barrier_fwd(x):
  return x, None


def _barrier_bwd(_, g):
  if jax.default_backend() == "cpu":
    pred = jnp.isnan(g[(0,) * g.ndim])
    g = jax.lax.cond(pred, lambda t: t + 0.0, lambda t: t * 1.0, g)
  return (g,)


residual_grad_barrier.defvjp(_barrier_fwd, _barrier_bwd)


def sum_leading_axes(x: Array, n: int) -> Array:
  """Sum over the first `n` axes as a ones-vector matmul.

  XLA:CPU runs column sums (a reduce over a leading, strided axis) far slower than the same sum
  as a matrix-vector product: over [16, 65536] about 4 ms against 0.15 ms, over [2048, 8192]
  2.8 ms against 1.5 ms on 2 cores (experiments/cpu_microbench.py).
  """
  lead = math.prod(x.shape[:n])
  flat = x.reshape(lead, -1)
  return jnp.dot(jnp.ones((lead,), flat.dtype), flat,
                 preferred_element_type=jnp.float32).reshape(x.shape[n:])


def _broadcast_shape(bias: Array) -> tuple[int, ...]:
  """bias.shape without its leading size-1 axes: the trailing axes of x it is added over."""
  lead_ones = next((i for i, n in enumerate(bias.shape) if n != 1), bias.ndim)
  return tuple(bias.shape[lead_ones:])


@jax.custom_vjp
def _add_bias(x: Array, bias: Array) -> Array:
  return x + bias.astype(x.dtype)


def _add_bias_fwd(x, bias):
  return _add_bias(x, bias), bias


def _add_bias_bwd(bias, g):
  d_bias = sum_leading_axes(g, g.ndim - len(_broadcast_shape(bias)))
  return g, d_bias.reshape(bias.shape).astype(bias.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def add_bias(x: Array, bias: Array) -> Array:
  """x + bias, where bias broadcasts over x's leading axes (its own leading axes may be 1)."""
  trailing = _broadcast_shape(bias)
  if (bias.ndim > x.ndim or
      tuple(x.shape[x.ndim - len(trailing):]) != trailing):
    return x + bias.astype(x.dtype)
  return _add_bias(x, bias)


def flat_matmul(x: Array, kernel: Array, n_in: int) -> Array:
  """x[..., *in] · kernel[*in, *out] as one 2-D matmul [tokens, prod(in)] x [prod(in), prod(out)].

  The reshapes are free (row-major bitcasts). One contracting dimension keeps XLA:CPU from
  transposing the output gradient for the weight-gradient matmul, a copy that its fusion pass
  otherwise fills with the recomputed residual-stream gradient of every layer above.
  """
  in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
  lead = x.shape[:x.ndim - n_in]
  k = math.prod(in_shape)
  y = jnp.dot(x.reshape(-1, k), kernel.reshape(k, -1))
  return y.reshape(lead + out_shape)


@jax.custom_vjp
def softmax_last_axis(s: Array) -> Array:
  """Softmax over the last axis whose backward is p * (g - sum(g * p)), not the quotient rule."""
  e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
  return e / jnp.sum(e, axis=-1, keepdims=True)


def _softmax_fwd(s):
  p = softmax_last_axis(s)
  return p, p


def _softmax_bwd(p, g):
  return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


softmax_last_axis.defvjp(_softmax_fwd, _softmax_bwd)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm (same empty state) with the clipping as one scalar factor.

  optax clips each element as `(g / norm) * max_norm`. A per-element division is too costly for
  XLA:CPU to recompute in each of AdamW's consumers of the clipped gradient (both moments), so
  it writes the clipped gradient out: one more pass over every parameter-sized array per step.
  `g * where(norm < max_norm, 1, max_norm / norm)` fuses into the moment updates. Unclipped
  gradients are bit-identical; clipped ones agree to rounding.
  """
  reference = optax.clip_by_global_norm(max_norm)

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(reference.init, update_fn)
