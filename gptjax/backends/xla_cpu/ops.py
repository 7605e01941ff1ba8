"""The `xla_cpu` ops: gptjax's layers, loss and optimizer as XLA:CPU runs them fastest.

Each trick below is on unless `config.model.kernel_exclude` names it; each computes what the
plain `xla` op computes (gptjax/model/ops.py), and each was measured only on CPU hosts
(experiments/PERFORMANCE.md):

- flat_dense: Dense as one 2-D matmul (fast_paths.flat_matmul)
- residual_grad_barrier: materialise the residual gradient per block (fast_paths)
- attend_transposed: the tied output layer as x @ E^T with E^T as a [D, V] kernel
- softmax_vjp: attention softmax with the closed-form backward
- bias_grad_matvec: bias gradients as ones @ g instead of a reduce (fast_paths.add_bias)
- causal_blocks: causal self-attention skips the key blocks above the diagonal
- clip_as_scale: gradient clipping as one scalar factor (fast_paths.clip_by_global_norm)
- cpu_head_matmul: the attention einsums as one per-head kernel (kernels.head_einsum)
- cpu_fused_attention: attention without bias or dropout as one kernel per direction
- cpu_norm, cpu_bias_gelu, cpu_cross_entropy: the norm, the MLP's bias + GELU and the loss's
  log-partition as one kernel per direction
- cpu_weight_matmul: float32 products of <= 4 rows (decoding) through csrc/weight_matmul.cc
  (off by default, config_schema; int8 weights always use the kernel)
- cpu_decode_matmul: generation (`decoding_kernel_exclude`) runs cpu_weight_matmul even where
  kernel_exclude turns it off: a decoding step streams every weight for a few rows, where the
  kernel is faster than XLA's dot (experiments/DECODE_THROUGHPUT.md)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gptjax import config_schema
from gptjax.backends.xla_cpu import fast_paths
from gptjax.backends.xla_cpu import kernels
from gptjax.backends.xla_cpu import weight_matmul as cpu_weight_matmul
from gptjax.model import attention
from gptjax.model import ops as plain
from gptjax.model import weight_matmul
from gptjax.transfer.quantize import QTensor

Array = jax.Array


def causal_query_blocks(l: int, s: int) -> int:
  """How many query blocks causal self-attention of length `l` is split into (1: not split).

  Blocks of at least 64 queries, at most 8 of them: smaller batched matmuls lose more to
  overhead than skipping the masked keys saves on XLA:CPU.
  """
  if l != s:
    return 1
  n = min(8, l // 64)
  while n > 1 and l % n:
    n -= 1
  return max(n, 1)


def blocked_causal_attention(attend, q_BxLxHxDh, k_BxSxKxDh, v_BxSxKxDh, mask_Bx1xLxS,
                             bias_1xHxLxS, scale, blocks: int) -> Array:
  """Causal attention per query block against only the keys up to the block's end.

  The skipped keys are masked for every query of the block, so the result is the full
  computation's; the score and value matmuls shrink to (blocks + 1) / (2 * blocks) of theirs.
  """
  l = q_BxLxHxDh.shape[1]
  c = l // blocks

  def rows_keys(x, i):  # mask and bias are full [.., L, S] here
    return None if x is None else x[:, :, i * c:(i + 1) * c, :(i + 1) * c]

  outs = [attend(q_BxLxHxDh[:, i * c:(i + 1) * c], k_BxSxKxDh[:, :(i + 1) * c],
                 v_BxSxKxDh[:, :(i + 1) * c], rows_keys(mask_Bx1xLxS, i),
                 rows_keys(bias_1xHxLxS, i), scale, None) for i in range(blocks)]
  return jnp.concatenate(outs, axis=1)


def _attention(on, q, k, v, mask, bias, scale, impl, dropout_fn=None, mask_is_causal=False):
  """gptjax.model.attention.dot_product_attention with the tricks in `on`."""
  if impl == "dot_product" and dropout_fn is None:
    return attention.dot_product_attention(q, k, v, mask, bias, scale, impl)
  causal = mask_is_causal and "causal_blocks" in on
  if ("cpu_fused_attention" in on and bias is None and dropout_fn is None and
      kernels.fused_attention_applies(q, k, v, mask)):
    return kernels.fused_attention(q, k, v, mask, scale, causal=causal)
  attend = functools.partial(
      attention.einsum_attention,
      einsum=kernels.head_einsum if "cpu_head_matmul" in on else jnp.einsum,
      softmax=fast_paths.softmax_last_axis if "softmax_vjp" in on else attention._softmax,  # pylint: disable=protected-access
      add_bias=_add_bias(on))
  l = q.shape[1]
  blocks = causal_query_blocks(l, k.shape[1])
  if (causal and dropout_fn is None and blocks > 1 and mask is not None and
      mask.shape[2:] == (l, l) and (bias is None or bias.shape[2:] == (l, l))):
    return blocked_causal_attention(attend, q, k, v, mask, bias, scale, blocks)
  return attend(q, k, v, mask, bias, scale, dropout_fn)


def _add_bias(on):
  return fast_paths.add_bias if "bias_grad_matvec" in on else plain.XLA.add_bias


def _dense_matmul(on, x, kernel, in_shape, out_shape):
  if isinstance(kernel, QTensor) or ("cpu_weight_matmul" in on and cpu_weight_matmul.applies_f32(
      x.reshape(-1, math.prod(in_shape)))):
    return weight_matmul.dense_matmul(x, kernel, in_shape, out_shape, cpu_weight_matmul.matmul_int8,
                                      cpu_weight_matmul.matmul_f32)
  if "flat_dense" in on:
    return fast_paths.flat_matmul(x, kernel, len(in_shape))
  return plain.XLA.dense_matmul(x, kernel, in_shape, out_shape)


def _bias_gelu(on, h, bias, approximate):
  if "cpu_bias_gelu" in on and kernels.rows_kernel_applies(h):
    return kernels.bias_gelu(h, bias, approximate)
  return jax.nn.gelu(h if bias is None else _add_bias(on)(h, bias), approximate=approximate)


def _norm(on, x32, scale, bias, eps, rms):
  if "cpu_norm" in on and kernels.rows_kernel_applies(x32):
    return kernels.norm(x32, scale, bias, eps, rms=rms)
  return plain.XLA.norm(x32, scale, bias, eps, rms)


def _tied_logits(on, x, table):
  rows = x.reshape(-1, x.shape[-1])
  if isinstance(table, QTensor) or ("cpu_weight_matmul" in on and
                                    cpu_weight_matmul.applies_f32(rows)):
    return weight_matmul.attend(x, table, cpu_weight_matmul.matmul_int8,
                                cpu_weight_matmul.matmul_f32)
  if "attend_transposed" in on:
    # The table's gradient is then x^T @ dlogits, [D, V], transposed once: a copy of D x V
    # floats instead of XLA:CPU's transposed copy of the [tokens, V] logits gradient.
    return fast_paths.flat_matmul(x, table.T, 1)
  return plain.XLA.tied_logits(x, table)


def _log_z_and_target(on, logits, targets):
  if "cpu_cross_entropy" in on and kernels.rows_kernel_applies(logits):
    return kernels.log_z_and_target(logits, targets)
  return plain.XLA.log_z_and_target(logits, targets)


def decoding_kernel_exclude(excluded: frozenset[str]) -> str:
  """The `kernel_exclude` generation runs: `cpu_weight_matmul` back on unless `cpu_decode_matmul`
  is excluded too (a decoding step streams every weight for a few rows, where the kernel wins)."""
  on = frozenset(config_schema.XLA_CPU_TRICKS) - excluded
  if "cpu_decode_matmul" not in on or "cpu_weight_matmul" in on:
    return ",".join(n for n in config_schema.XLA_CPU_TRICKS if n in excluded)
  return ",".join(n for n in config_schema.XLA_CPU_TRICKS
                  if n in excluded and n != "cpu_weight_matmul")


def make_ops(excluded: frozenset[str]) -> plain.Ops:
  """The xla_cpu ops with every trick on except those in `excluded`."""
  from gptjax import config_schema  # pylint: disable=g-import-not-at-top
  on = frozenset(config_schema.XLA_CPU_TRICKS) - excluded
  p = functools.partial
  return plain.Ops(
      "xla_cpu", dense_matmul=p(_dense_matmul, on), add_bias=_add_bias(on),
      bias_gelu=p(_bias_gelu, on), norm=p(_norm, on), attention=p(_attention, on),
      tied_logits=p(_tied_logits, on),
      residual_grad_barrier=(fast_paths.residual_grad_barrier if "residual_grad_barrier" in on
                             else plain.XLA.residual_grad_barrier),
      log_z_and_target=p(_log_z_and_target, on),
      clip_by_global_norm=(fast_paths.clip_by_global_norm if "clip_as_scale" in on
                           else plain.XLA.clip_by_global_norm))
