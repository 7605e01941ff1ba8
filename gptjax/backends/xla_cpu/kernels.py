"""Attention, norms, GELU and the loss as multi-threaded XLA:CPU custom calls (gptjax/backends/xla_cpu/csrc/).

XLA:CPU runs a batched dot such as `blhd,bshd->bhls` on one core, at a third of the rate of its
2-D matmuls, a LayerNorm as five to eight separate fusions per direction, and the loss's
log-partition as five passes over the logits (experiments/PERFORMANCE.md). For float32 on CPU,
these kernels replace them:

- `fused_attention`: scores, mask, softmax and weighted values per (batch, head) in one call,
  the backward in another, skipping the key blocks above the diagonal for causal attention
  (csrc/attention.cc); used for attention without bias or dropout.
- `head_einsum`: one rank-4 per-head einsum (csrc/head_matmul.cc) with the operands read and the
  result written in place in the token-major `[B, L, H, Dh]` or heads-major `[B, H, L, S]`
  layout; used where the fused kernel does not apply (bias, dropout).
- `norm`: LayerNorm or RMSNorm over the last axis, one pass over the rows per direction
  (csrc/norm.cc).
- `bias_gelu`: a Dense layer's bias add and GELU (tanh or exact), one pass per direction
  (csrc/activation.cc).
- `log_z_and_target`: the cross-entropy's logsumexp, target logit and row max, one pass over
  the logits forward and one backward (csrc/cross_entropy.cc).
- the few-row products of a decoding step against float32 or int8 weights
  (csrc/weight_matmul.cc, called from gptjax/model/weight_matmul.py).

All share their work out over XLA's intra-op threads; gptjax/backends/xla_cpu/build.py compiles
and registers them. Each applies to float32 on the CPU backend; gptjax/backends/xla_cpu/ops.py
falls back to the plain formulation elsewhere.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.backends.xla_cpu.build import (ATTENTION_BWD, ATTENTION_FWD, GELU_BWD, GELU_FWD,
                                           HEAD_MATMUL, LOGZ_BWD, LOGZ_FWD, NORM_BWD, NORM_FWD,
                                           available)

Array = jax.Array


class HeadProduct(NamedTuple):
  """How an einsum maps onto the kernel: C[b, h] = A[b, h] @ B[b, h] (see head_matmul.cc)."""
  swap: bool            # the einsum's second operand is the kernel's A
  a_heads_major: bool
  a_trans: bool
  b_heads_major: bool
  b_trans: bool
  c_heads_major: bool


@functools.cache
def parse_head_einsum(equation: str) -> Optional[HeadProduct]:
  """The kernel form of a rank-4 einsum with batch `b` first and heads `h` at axis 1 or 2.

  Each operand holds one more free letter and the contracted one (in either order). Returns None
  for any other equation.
  """
  try:
    inputs, out = equation.replace(" ", "").split("->")
    x, y = inputs.split(",")
  except ValueError:
    return None
  for term in (x, y, out):
    if len(term) != 4 or len(set(term)) != 4 or term[0] != "b" or "h" not in term[1:3]:
      return None
  mat = lambda t: t.replace("b", "").replace("h", "")  # noqa: E731  (the two matrix letters)
  i, j = mat(out)
  contracted = set(mat(x)) & set(mat(y))
  if len(contracted) != 1:
    return None
  (k,) = contracted
  if {i, k} == set(mat(x)) and {k, j} == set(mat(y)):
    a, bb, swap = x, y, False
  elif {i, k} == set(mat(y)) and {k, j} == set(mat(x)):
    a, bb, swap = y, x, True
  else:
    return None
  return HeadProduct(swap, a[1] == "h", mat(a) == k + i, bb[1] == "h", mat(bb) == j + k,
                     out[1] == "h")


def _out_shape(equation: str, x: Array, y: Array) -> tuple[int, ...]:
  inputs, out = equation.replace(" ", "").split("->")
  sizes = dict(zip(inputs.split(",")[0], x.shape)) | dict(zip(inputs.split(",")[1], y.shape))
  return tuple(sizes[c] for c in out)


def _kernel_call(equation: str, x: Array, y: Array) -> Array:
  form = parse_head_einsum(equation)
  a, b = (y, x) if form.swap else (x, y)
  out = jax.ShapeDtypeStruct(_out_shape(equation, x, y), jnp.float32)
  call = jax.ffi.ffi_call(HEAD_MATMUL, out, vmap_method="sequential")
  return call(a, b, a_heads_major=form.a_heads_major, a_trans=form.a_trans,
              b_heads_major=form.b_heads_major, b_trans=form.b_trans,
              c_heads_major=form.c_heads_major)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _head_einsum_kernel(equation: str, x: Array, y: Array) -> Array:
  return _kernel_call(equation, x, y)


def _kernel_fwd(equation, x, y):
  return _kernel_call(equation, x, y), (x, y)


def _kernel_bwd(equation, residuals, g):
  x, y = residuals
  inputs, out = equation.replace(" ", "").split("->")
  tx, ty = inputs.split(",")
  return (head_einsum(f"{out},{ty}->{tx}", g, y), head_einsum(f"{tx},{out}->{ty}", x, g))


_head_einsum_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def head_einsum(equation: str, x: Array, y: Array, preferred_element_type=None) -> Array:
  """`jnp.einsum(equation, x, y)`, through the CPU kernel where it applies.

  Applies on the CPU backend to float32 operands of an equation `parse_head_einsum` accepts,
  whose shared axes have equal sizes (no broadcasting, no grouped-query heads).
  """
  form = parse_head_einsum(equation)
  if form is not None:
    tx, ty = equation.replace(" ", "").split("->")[0].split(",")
    sizes = dict(zip(tx, x.shape))  # einsum broadcasts size-1 axes; the kernel does not
    same_sizes = all(sizes.get(c, n) == n for c, n in zip(ty, y.shape))
  if (form is None or not same_sizes or x.dtype != jnp.float32 or y.dtype != jnp.float32 or
      jax.default_backend() != "cpu" or not available()):
    return jnp.einsum(equation, x, y, preferred_element_type=preferred_element_type)
  return _head_einsum_kernel(equation, x, y)


def fused_attention_applies(q: Array, k: Array, v: Array, mask: Optional[Array]) -> bool:
  """Whether `fused_attention` can run as the kernel for these operands (else: einsum path)."""
  b, l, h, _ = q.shape
  shapes_ok = (k.shape == v.shape and k.shape[0] == b and k.shape[2:] == q.shape[2:] and
               (mask is None or (mask.ndim == 4 and mask.shape[0] in (1, b) and
                                 mask.shape[1] == 1 and mask.shape[2] in (1, l) and
                                 mask.shape[3] == k.shape[1])))
  return (shapes_ok and all(x.dtype == jnp.float32 for x in (q, k, v)) and
          jax.default_backend() == "cpu" and available())


def _attention_fwd_call(q, k, v, mask_i8, scale, causal):
  b, l, h, _ = q.shape
  call = jax.ffi.ffi_call(ATTENTION_FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                          jax.ShapeDtypeStruct((b, h, l, k.shape[1]), jnp.float32)),
                          vmap_method="sequential")
  return call(q, k, v, mask_i8, scale=np.float32(scale), causal=causal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_attention(q, k, v, mask_i8, scale, causal):
  return _attention_fwd_call(q, k, v, mask_i8, scale, causal)[0]


def _fused_fwd(q, k, v, mask_i8, scale, causal):
  out, probs = _attention_fwd_call(q, k, v, mask_i8, scale, causal)
  return out, (q, k, v, mask_i8, probs)


def _fused_bwd(scale, causal, residuals, g):
  q, k, v, mask_i8, probs = residuals
  call = jax.ffi.ffi_call(ATTENTION_BWD, tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
                                               for x in (q, k, v)), vmap_method="sequential")
  dq, dk, dv = call(q, k, v, mask_i8, probs, g, scale=np.float32(scale), causal=causal)
  return dq, dk, dv, np.zeros(mask_i8.shape, jax.dtypes.float0)


_fused_attention.defvjp(_fused_fwd, _fused_bwd)


def fused_attention(q_BxLxHxDh: Array, k_BxSxHxDh: Array, v_BxSxHxDh: Array,
                    mask_Bx1xLxS: Optional[Array], scale: float, causal: bool = False) -> Array:
  """softmax(where(mask, scale * q k^T, -1e9)) v per head, as one kernel per direction.

  Exactly gptjax.model.layers' einsum attention without bias or dropout, for equal query and key/value
  heads; call only where `fused_attention_applies`. The probabilities are kept for the backward.
  `causal` (needs L == S) promises that the mask hides every later key: the kernel then skips
  the key blocks above the diagonal.
  """
  if not available():
    raise RuntimeError("the gptjax CPU kernels are not built; check fused_attention_applies first")
  l, s = q_BxLxHxDh.shape[1], k_BxSxHxDh.shape[1]
  if mask_Bx1xLxS is None:
    mask = jnp.ones((1, 1, l, s), jnp.int8)
  else:  # a key-padding mask [B, 1, 1, S] is spread over the queries
    mask = jnp.broadcast_to(mask_Bx1xLxS, (mask_Bx1xLxS.shape[0], 1, l, s)).astype(jnp.int8)
  return _fused_attention(q_BxLxHxDh, k_BxSxHxDh, v_BxSxHxDh, mask, float(scale),
                          bool(causal and l == s))


def rows_kernel_applies(x: Array) -> bool:
  """Whether the row kernels (`norm`, `bias_gelu`, `log_z_and_target`) can run on `x`.

  They work on the rows along the last axis; where they cannot, callers use the jnp formulation.
  """
  return (x.dtype == jnp.float32 and x.ndim >= 1 and x.size > 0 and
          jax.default_backend() == "cpu" and available())


def _norm_fwd_call(x_NxD, scale, bias, eps, rms, has_bias):
  n, d = x_NxD.shape
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  call = jax.ffi.ffi_call(NORM_FWD, (f32(n, d), f32(n), f32(n)), vmap_method="sequential")
  return call(x_NxD, scale, bias, eps=np.float32(eps), rms=rms, has_bias=has_bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _norm(x_NxD, scale, bias, eps, rms, has_bias):
  return _norm_fwd_call(x_NxD, scale, bias, eps, rms, has_bias)[0]


def _norm_fwd(x_NxD, scale, bias, eps, rms, has_bias):
  y, mean, rstd = _norm_fwd_call(x_NxD, scale, bias, eps, rms, has_bias)
  return y, (x_NxD, scale, mean, rstd)


def _norm_bwd(eps, rms, has_bias, residuals, dy):
  del eps
  x_NxD, scale, mean, rstd = residuals
  d = x_NxD.shape[1]
  outs = (jax.ShapeDtypeStruct(x_NxD.shape, jnp.float32), jax.ShapeDtypeStruct((d,), jnp.float32),
          jax.ShapeDtypeStruct((d,), jnp.float32))
  call = jax.ffi.ffi_call(NORM_BWD, outs, vmap_method="sequential")
  dx, dscale, dbias = call(x_NxD, scale, mean, rstd, dy, rms=rms)
  return dx, dscale, dbias if has_bias else jnp.zeros_like(dbias)


_norm.defvjp(_norm_fwd, _norm_bwd)


def norm(x: Array, scale: Array, bias: Optional[Array], eps: float, rms: bool) -> Array:
  """LayerNorm (or RMSNorm) of float32 `x` over its last axis, one kernel per direction.

  Exactly gptjax.model.layers.Norm's formulation: `(x - mean) * rsqrt(var + eps) * scale + bias`, the
  variance of the centred values; RMSNorm has no mean and `bias` is None. Call only where
  `rows_kernel_applies(x)`.
  """
  if not available():
    raise RuntimeError("the gptjax CPU kernels are not built; check rows_kernel_applies first")
  d = x.shape[-1]
  has_bias = bias is not None
  bias = bias if has_bias else jnp.zeros((d,), jnp.float32)
  y = _norm(x.reshape(-1, d), scale.astype(jnp.float32), bias.astype(jnp.float32), float(eps),
            bool(rms), has_bias)
  return y.reshape(x.shape)


def _bias_gelu_fwd_call(h_NxF, bias, approximate):
  call = jax.ffi.ffi_call(GELU_FWD, jax.ShapeDtypeStruct(h_NxF.shape, jnp.float32),
                          vmap_method="sequential")
  return call(h_NxF, bias, approximate=approximate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bias_gelu(h_NxF, bias, approximate):
  return _bias_gelu_fwd_call(h_NxF, bias, approximate)


def _bias_gelu_fwd(h_NxF, bias, approximate):
  return _bias_gelu_fwd_call(h_NxF, bias, approximate), (h_NxF, bias)


def _bias_gelu_bwd(approximate, residuals, dy):
  h_NxF, bias = residuals
  outs = (jax.ShapeDtypeStruct(h_NxF.shape, jnp.float32),
          jax.ShapeDtypeStruct(bias.shape, jnp.float32))
  call = jax.ffi.ffi_call(GELU_BWD, outs, vmap_method="sequential")
  return call(h_NxF, bias, dy, approximate=approximate)


_bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)


def bias_gelu(h: Array, bias: Optional[Array], approximate: bool) -> Array:
  """`jax.nn.gelu(h + bias, approximate)` over float32 `h`, one kernel per direction.

  The bias is `[F]` for `h` `[..., F]` (or None). The backward recomputes the GELU from `h`
  instead of keeping its intermediates. Call only where `rows_kernel_applies(h)`.
  """
  if not available():
    raise RuntimeError("the gptjax CPU kernels are not built; check rows_kernel_applies first")
  f = h.shape[-1]
  b = jnp.zeros((f,), jnp.float32) if bias is None else bias.astype(jnp.float32)
  y = _bias_gelu(h.reshape(-1, f), b, bool(approximate))
  return y.reshape(h.shape)


def _log_z_fwd_call(logits_NxV, targets_N):
  n = logits_NxV.shape[0]
  outs = tuple(jax.ShapeDtypeStruct((n,), jnp.float32) for _ in range(3))
  return jax.ffi.ffi_call(LOGZ_FWD, outs, vmap_method="sequential")(logits_NxV, targets_N)


@jax.custom_vjp
def _log_z_and_target(logits_NxV, targets_N):
  return _log_z_fwd_call(logits_NxV, targets_N)


def _log_z_fwd(logits_NxV, targets_N):
  log_z, target_logit, row_max = _log_z_fwd_call(logits_NxV, targets_N)
  return (log_z, target_logit, row_max), (logits_NxV, targets_N, log_z)


def _log_z_bwd(residuals, cotangents):
  logits_NxV, targets_N, log_z = residuals
  g_log_z, g_target, _ = cotangents  # the row max is a stop_gradient in the plain formulation
  call = jax.ffi.ffi_call(LOGZ_BWD, jax.ShapeDtypeStruct(logits_NxV.shape, jnp.float32),
                          vmap_method="sequential")
  dlogits = call(logits_NxV, targets_N, log_z, g_log_z, g_target)
  return dlogits, np.zeros(targets_N.shape, jax.dtypes.float0)


_log_z_and_target.defvjp(_log_z_fwd, _log_z_bwd)


def log_z_and_target(logits: Array, targets: Array) -> tuple[Array, Array, Array]:
  """(logsumexp, the target's logit, the max) over the last axis of float32 `logits`.

  As `gptjax.training.objectives.cross_entropy` computes them: the max carries no gradient, a negative
  target counts from the end and one out of range gives a NaN logit (jnp.take_along_axis).
  One pass over the logits forward, one backward. Call only where
  `rows_kernel_applies(logits)`.
  """
  if not available():
    raise RuntimeError("the gptjax CPU kernels are not built; check rows_kernel_applies first")
  lead, v = logits.shape[:-1], logits.shape[-1]
  outs = _log_z_and_target(logits.reshape(-1, v), targets.reshape(-1).astype(jnp.int32))
  return tuple(o.reshape(lead) for o in outs)

