"""Post-training int8 weight quantization with per-channel scales (`config.quantize="int8"`).

Every Dense kernel and embedding table becomes int8 values and a float32 scale
per output channel (symmetric, scale = max|w| / 127 over the input axes), so
|w - dequantize(q)| <= scale / 2 everywhere. Biases, norms and relative-position
tables stay float32.

The model runs on the quantized tree directly: `Dense` and `Embed` (gptjax.model.layers) read a
QTensor as int8 and multiply through gptjax.model.weight_matmul, which widens the int8 values inside
the product, so a decoding step reads a quarter of the float32 bytes. A Dense kernel
[*in, *out] is stored as rows [N, K] (one row of K inputs per output channel, N = prod(out),
K = prod(in)), the layout that kernel streams; `dequantize` restores the float tree.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config_schema import ConfigError

@flax.struct.dataclass
class QTensor:
  """int8 values and a float32 scale broadcastable against them.

  With `shape` set (a Dense kernel) the values are [*lead, N, K] and the scale [*lead, N, 1]:
  `shape` is the float kernel's [*lead, *in, *out] (lead: nn.scan's layer axis).
  """
  values: jax.Array
  scale: jax.Array
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())


def _reduce_axes(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Input axes of the tensor at `path`: one scale per output channel remains."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf == "embedding":  # [V, D] tables are also read as rows (tied heads): one scale per row
    return (len(shape) - 1,)
  lead = 1 if "/layers/" in f"/{path}" else 0  # scanned kernels carry a leading layer axis
  n_in = 2 if path.split("/")[-2] == "out" else 1  # attention out: [H, Dh, D]
  return tuple(range(lead, lead + n_in))


def _quantizable(path: str, x) -> bool:
  return path.rsplit("/", 1)[-1] in ("kernel", "embedding") and getattr(x, "ndim", 0) >= 2


def _kernel_rows(w: jax.Array, n_lead: int, n_in: int) -> jax.Array:
  """A [*lead, *in, *out] kernel as [*lead, N, K] rows, one per output channel."""
  lead = w.shape[:n_lead]
  k = int(np.prod(w.shape[n_lead:n_lead + n_in]))
  return jnp.swapaxes(w.reshape(lead + (k, -1)), -1, -2)


def unquantizable(params) -> list[str]:
  """Paths of the kernels and embeddings int8 cannot represent (non-finite values)."""
  bad = []
  def check(path, x):
    if _quantizable(path, x) and not bool(jnp.all(jnp.isfinite(jnp.asarray(x, jnp.float32)))):
      bad.append(path)
    return x
  _map_with_path(check, nn.meta.unbox(params))
  return bad


def quantize_tensor(w: jax.Array, reduce_axes: tuple[int, ...]) -> QTensor:
  """Symmetric int8 of `w` with one scale per index of the axes not in `reduce_axes`."""
  w32 = jnp.asarray(w, jnp.float32)
  amax = jnp.max(jnp.abs(w32), axis=reduce_axes, keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
  return QTensor(q, scale.astype(jnp.float32))


def _map_with_path(fn, tree, prefix: str = ""):
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _map_with_path(fn, v, f"{prefix}{k}/") for k, v in tree.items()}
  return fn(prefix[:-1], tree)


def quantize_params(params) -> dict:
  """The param tree with kernels/embeddings as QTensor (int8 + per-channel scale).

  Raises ConfigError (one line listing them) when some tensor has non-finite values.
  """
  bad = unquantizable(params)
  if bad:
    raise ConfigError(f"quantize=int8 cannot represent these tensors (non-finite values): "
                      f"{', '.join(bad)}; fix the checkpoint or leave config.quantize=''")

  def q(path, x):
    if not _quantizable(path, x):
      return x
    axes = _reduce_axes(path, x.shape)
    if path.rsplit("/", 1)[-1] == "embedding":
      return quantize_tensor(x, axes)
    rows = _kernel_rows(x, axes[0], len(axes))
    qt = quantize_tensor(rows, (rows.ndim - 1,))
    return QTensor(qt.values, qt.scale, tuple(x.shape))
  return _map_with_path(q, nn.meta.unbox(params))


def dequantize_tensor(x: QTensor, dtype=jnp.float32) -> jax.Array:
  """The float tensor of one QTensor (values * scale, in the original layout)."""
  w = x.values.astype(jnp.float32) * x.scale
  if x.shape:
    w = jnp.swapaxes(w, -1, -2).reshape(x.shape)
  return w.astype(dtype)


def half_step(x: QTensor) -> jax.Array:
  """scale / 2 in the original layout: the bound on |w - dequantize_tensor(x)|."""
  return dequantize_tensor(x.replace(values=jnp.ones_like(x.values))) / 2


def dequantize(qtree, dtype=jnp.float32) -> dict:
  """Float params from a quantized tree (values * scale)."""
  def deq(x):
    return dequantize_tensor(x, dtype) if isinstance(x, QTensor) else x
  return jax.tree.map(deq, qtree, is_leaf=lambda x: isinstance(x, QTensor))


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_report(params, qtree) -> dict[str, Any]:
  """Bytes before and after quantization, the saving, and a one-line summary."""
  before = _nbytes(nn.meta.unbox(params))
  after = _nbytes(qtree)
  n_q = sum(isinstance(x, QTensor) for x in
            jax.tree.leaves(qtree, is_leaf=lambda x: isinstance(x, QTensor)))
  saved = 1.0 - after / max(before, 1)
  return {"bytes_float": before, "bytes_int8": after, "saved_fraction": saved,
          "quantized_tensors": n_q,
          "summary": f"int8 weights: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
                     f"({100 * saved:.1f}% saved, {n_q} tensors quantized)"}


def max_error_ratio(params, qtree) -> float:
  """max |w - deq| / (scale/2) over all quantized tensors (<= 1 up to float rounding)."""
  params = nn.meta.unbox(params)
  worst = 0.0
  flat_q = jax.tree.leaves(qtree, is_leaf=lambda x: isinstance(x, QTensor))
  for w, qt in zip(jax.tree.leaves(params), flat_q):
    if isinstance(qt, QTensor):
      err = jnp.abs(jnp.asarray(w, jnp.float32) - dequantize_tensor(qt))
      worst = max(worst, float(jnp.max(err / half_step(qt))))
  return worst
