"""Post-training int8 weight quantization with per-channel scales (`config.quantize="int8"`).

Every Dense kernel and embedding table becomes int8 values and a float32 scale
per output channel (symmetric, scale = max|w| / 127 over the input axes), so
|w - dequantize(q)| <= scale / 2 everywhere. Biases, norms and relative-position
tables stay float32. Inference dequantizes once (`dequantize`) and runs the model
unchanged; the saving is in stored / transferred bytes.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class QTensor:
  """int8 values and a float32 scale broadcastable against them."""
  values: jax.Array
  scale: jax.Array


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
  """The param tree with kernels/embeddings as QTensor (int8 + per-channel scale)."""
  def q(path, x):
    return quantize_tensor(x, _reduce_axes(path, x.shape)) if _quantizable(path, x) else x
  return _map_with_path(q, nn.meta.unbox(params))


def dequantize(qtree, dtype=jnp.float32) -> dict:
  """Float params from a quantized tree (values * scale)."""
  def deq(x):
    if isinstance(x, QTensor):
      return (x.values.astype(jnp.float32) * x.scale).astype(dtype)
    return x
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
      err = jnp.abs(jnp.asarray(w, jnp.float32) - qt.values.astype(jnp.float32) * qt.scale)
      worst = max(worst, float(jnp.max(err / (qt.scale / 2))))
  return worst
