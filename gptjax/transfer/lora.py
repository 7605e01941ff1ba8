"""LoRA (Hu et al. 2021) as a functional delta on gptjax's Dense kernels.

A LoRA tree maps a kernel's path ("decoder/layers_0/self_attn/query/kernel")
to {"a": [..., I, r], "b": [..., r, O]}, where I and O are the kernel's input
and output sizes flattened (attention out: I = H*Dh; query/key/value: O = H*Dh)
and "..." is the scan axis of `scan_layers` models. `merge` returns ordinary
params with W + alpha/rank * A @ B, so any model code (and export) uses them;
`unmerged_lora` computes x W + alpha/rank * (x A) B at call time instead.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

from gptjax.config_schema import ConfigError

ATTENTION = ("query", "key", "value", "out")
MLP = ("wi", "wi_0", "wi_1", "wo")
STACKS = ("encoder", "decoder")


def _flatten(tree) -> dict:
  return traverse_util.flatten_dict(nn.meta.unbox(tree), sep="/")


def target_modules(targets: str) -> tuple[str, ...]:
  """Dense module names that `targets` ("attention", "all" or "query,value,...") adapts."""
  if targets == "attention":
    return ATTENTION
  if targets == "all":
    return ATTENTION + MLP
  return tuple(t.strip() for t in targets.split(",") if t.strip())


def _split(path: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
  """(scan axes, flattened input size, flattened output size) of the kernel at `path`."""
  lead = 1 if "/layers/" in f"/{path}" else 0
  n_in = 2 if path.split("/")[-2] == "out" else 1
  dims = shape[lead:]
  fan_in = 1
  for d in dims[:n_in]:
    fan_in *= d
  fan_out = 1
  for d in dims[n_in:]:
    fan_out *= d
  return lead, fan_in, fan_out


def lora_paths(params, targets: str) -> list[str]:
  """Kernel paths adapted for `targets`; ConfigError (one line) if a target names no layer."""
  names = target_modules(targets)
  if not names:
    raise ConfigError(f"config.finetune.lora_targets={targets!r} names no layer")
  flat = _flatten(params)
  paths = [p for p in flat if p.split("/")[0] in STACKS and p.endswith("/kernel")
           and p.split("/")[-2] in names]
  found = {p.split("/")[-2] for p in paths}
  missing = [n for n in names if n not in found]
  if targets not in ("attention", "all") and missing:
    raise ConfigError(f"config.finetune.lora_targets={targets!r}: {missing[0]!r} names no layer of "
                      f"this model; layers: {', '.join(ATTENTION + MLP)}")
  if not paths:
    raise ConfigError(f"config.finetune.lora_targets={targets!r} names no layer of this model")
  return paths


def init_lora(params, targets: str, rank: int, rng: jax.Array, std: float = 0.02) -> dict:
  """A LoRA tree for `targets`: A ~ N(0, std), B = 0, so the adapted model starts equal to the base."""
  if rank < 1:
    raise ConfigError(f"config.finetune.lora_rank={rank} must be at least 1")
  flat = _flatten(params)
  out = {}
  for i, path in enumerate(lora_paths(params, targets)):
    shape = flat[path].shape
    lead, fan_in, fan_out = _split(path, shape)
    batch = tuple(shape[:lead])
    a = std * jax.random.normal(jax.random.fold_in(rng, i), batch + (fan_in, rank), jnp.float32)
    out[path] = {"a": a, "b": jnp.zeros(batch + (rank, fan_out), jnp.float32)}
  return out


def _dropout_rows(a_IxR: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
  """Drops input features of the LoRA branch (rows of A), rescaled; shared across the batch."""
  if rate <= 0.0 or rng is None:
    return a_IxR
  keep = jax.random.bernoulli(rng, 1.0 - rate, a_IxR.shape[:-1] + (1,))
  return jnp.where(keep, a_IxR / (1.0 - rate), 0.0)


def delta(kernel_shape: tuple[int, ...], path: str, ab: dict, alpha: float, rank: int) -> jax.Array:
  """alpha/rank * A @ B reshaped to the kernel's shape."""
  d = jnp.einsum("...ir,...ro->...io", ab["a"], ab["b"]) * (alpha / rank)
  return d.reshape(kernel_shape)


def merge(params, lora_tree: dict, alpha: float, rank: int, dropout_rate: float = 0.0,
          rng: Optional[jax.Array] = None):
  """params with every adapted kernel W replaced by W + alpha/rank * A @ B (same tree, unboxed).

  With `dropout_rate` and `rng`, LoRA dropout drops input features of the
  low-rank branch (rows of A) for this step; leave them out for eval and export.
  """
  flat = _flatten(params)
  for i, (path, ab) in enumerate(sorted(lora_tree.items())):
    if path not in flat:
      raise ConfigError(f"LoRA tree names {path!r}, which is not a parameter of this model")
    if dropout_rate > 0.0 and rng is not None:
      ab = {"a": _dropout_rows(ab["a"], dropout_rate, jax.random.fold_in(rng, i)), "b": ab["b"]}
    w = flat[path]
    flat[path] = (w + delta(w.shape, path, ab, alpha, rank)).astype(w.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


@contextlib.contextmanager
def unmerged_lora(lora_tree: dict, alpha: float, rank: int):
  """Within this context, `model.apply` adds alpha/rank * (x A) B to every adapted Dense product.

  The delta joins x · W before the bias and any activation (`Dense.matmul`).

  Only for models without scanned layers (the scan axis would need slicing).
  """
  def interceptor(next_fn, args, kwargs, context):
    y = next_fn(*args, **kwargs)
    module = context.module
    path = "/".join(module.path) + "/kernel"
    if context.method_name != "matmul" or path not in lora_tree:
      return y
    ab = lora_tree[path]
    x = args[0]
    n_in = len(module.in_shape)
    x_NxI = x.reshape(x.shape[: x.ndim - n_in] + (-1,)).astype(jnp.float32)
    low_NxO = (x_NxI @ ab["a"]) @ ab["b"] * (alpha / rank)
    return y + low_NxO.reshape(y.shape).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    yield

