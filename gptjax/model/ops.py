"""The ops registry: the functions the layers, the loss and the optimizer call where a backend may
substitute its own implementation, chosen once by `config.model.kernels`.

`xla` is plain JAX: `jnp` formulations, or `jax.nn.dot_product_attention` where
`config.model.attention_impl` asks for it. It runs the same on CPU, GPU and TPU. `xla_cpu` is the
XLA:CPU backend (gptjax/backends/xla_cpu/): C++ kernels and graph rewrites measured faster on CPU
hosts (experiments/PERFORMANCE.md); it is imported only when a config resolves to it. Both
compute the same function (tests/test_models.py checks losses and gradients against each other).

Layers get their ops with `ops_for(cfg)`; nothing here is a mutable switch, so the ops a jitted
function uses are fixed by the config it was traced with.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from gptjax import config_schema
from gptjax.model import attention
from gptjax.model import weight_matmul
from gptjax.transfer.quantize import QTensor

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Ops:
  """One implementation of each replaceable op (see `plain_ops` for their contracts)."""
  name: str
  dense_matmul: Callable  # (x, kernel or QTensor, in_shape, out_shape) -> x[..., *in] . kernel
  add_bias: Callable  # (y, bias) -> y + bias, bias over y's trailing axes
  bias_gelu: Callable  # (h, bias or None, approximate) -> gelu(h + bias)
  norm: Callable  # (x float32, scale, bias or None, eps, rms) -> LayerNorm / RMSNorm float32
  attention: Callable  # see gptjax.model.attention.dot_product_attention
  tied_logits: Callable  # (x [..., D], table [V, D] or QTensor) -> x . table^T
  residual_grad_barrier: Callable  # identity applied to each residual block's input
  log_z_and_target: Callable  # (logits, targets) -> (logsumexp, target logit, row max)
  clip_by_global_norm: Callable  # (max_norm) -> optax.GradientTransformation


def _dense_matmul(x: Array, kernel, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Array:
  if isinstance(kernel, QTensor):
    return weight_matmul.dense_matmul(x, kernel, in_shape, out_shape)
  n_in, n_out = len(in_shape), len(out_shape)
  lhs, rhs, out = "ijkmn"[:n_in], "ijkmn"[:n_in] + "opq"[:n_out], "opq"[:n_out]
  return jnp.einsum(f"...{lhs},{rhs}->...{out}", x, kernel)


def _add_bias(y: Array, bias: Array) -> Array:
  return y + bias.astype(y.dtype)


def _bias_gelu(h: Array, bias: Optional[Array], approximate: bool) -> Array:
  return jax.nn.gelu(h if bias is None else _add_bias(h, bias), approximate=approximate)


def _norm(x32: Array, scale: Array, bias: Optional[Array], eps: float, rms: bool) -> Array:
  if rms:
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  else:
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  y = y * scale
  return y if bias is None else y + bias


def _tied_logits(x: Array, table) -> Array:
  if isinstance(table, QTensor):
    return weight_matmul.attend(x, table)
  return jnp.einsum("...d,vd->...v", x, table)


def _log_z_and_target(logits: Array, targets: Array) -> tuple[Array, Array, Array]:
  max_ = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  log_z = max_ + jnp.log(jnp.sum(jnp.exp(logits - max_[..., None]), axis=-1))
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z, target_logit, max_


def plain_ops() -> Ops:
  """The `xla` ops: plain JAX, the same formulations on every backend."""
  return Ops("xla", dense_matmul=_dense_matmul, add_bias=_add_bias, bias_gelu=_bias_gelu,
             norm=_norm, attention=attention.dot_product_attention, tied_logits=_tied_logits,
             residual_grad_barrier=lambda x: x, log_z_and_target=_log_z_and_target,
             clip_by_global_norm=optax.clip_by_global_norm)


XLA = plain_ops()


def excluded_tricks(kernel_exclude: str) -> frozenset[str]:
  """The names in a `config.model.kernel_exclude` string ("a,b"), checked against the known ones."""
  names = frozenset(n.strip() for n in kernel_exclude.split(",") if n.strip())
  unknown = sorted(names - set(config_schema.XLA_CPU_TRICKS))
  if unknown:
    raise config_schema.ConfigError(
        f"config.model.kernel_exclude names {unknown[0]!r}, not one of: "
        f"{', '.join(config_schema.XLA_CPU_TRICKS)}")
  return names


@functools.cache
def _ops(kernels: str, kernel_exclude: str) -> Ops:
  if kernels == "xla":
    return XLA
  from gptjax.backends.xla_cpu import ops as xla_cpu_ops  # pylint: disable=g-import-not-at-top
  return xla_cpu_ops.make_ops(excluded_tricks(kernel_exclude))


def ops_for(cfg) -> Ops:
  """The ops a ModelConfig's layers run: `cfg.kernels` (resolved) less `cfg.kernel_exclude`."""
  return _ops(resolve_kernels(cfg.kernels), cfg.kernel_exclude)


def for_decoding(cfg):
  """The ModelConfig generation runs: `cfg` with the backend's decoding choices (xla: `cfg` as is).

  On xla_cpu a decoding step reads every weight for a few rows (batch x beams), where the
  backend's weight kernel is faster than XLA's dot; training keeps `cfg.kernel_exclude`'s choice.
  """
  if resolve_kernels(cfg.kernels) != "xla_cpu":
    return cfg
  from gptjax.backends.xla_cpu import ops as xla_cpu_ops  # pylint: disable=g-import-not-at-top
  exclude = xla_cpu_ops.decoding_kernel_exclude(excluded_tricks(cfg.kernel_exclude))
  return cfg if exclude == cfg.kernel_exclude else dataclasses.replace(cfg, kernel_exclude=exclude)


@functools.cache
def _xla_cpu_unavailable() -> Optional[str]:
  """Why the xla_cpu backend cannot run in this process (None when it can)."""
  if jax.default_backend() != "cpu":
    return f"the JAX backend is {jax.default_backend()}, not cpu"
  from gptjax.backends.xla_cpu import build  # pylint: disable=g-import-not-at-top
  return build.unavailable_reason()


@functools.cache
def resolve_kernels(kernels: str) -> str:
  """`auto` -> `xla_cpu` on a CPU backend whose kernels build, else `xla`; checks `xla_cpu`.

  Raises ConfigError (one line) for an unknown name, or for `xla_cpu` where it cannot run.
  `auto` falling back to `xla` on a CPU host prints one warning line saying why.
  """
  if kernels not in config_schema.KERNELS:
    raise config_schema.ConfigError(f"config.model.kernels={kernels!r} is not supported; "
                                    f"allowed: {', '.join(config_schema.KERNELS)}")
  if kernels == "xla":
    return kernels
  if kernels == "auto" and jax.default_backend() != "cpu":
    return "xla"
  why = _xla_cpu_unavailable()
  if why is None:
    return "xla_cpu"
  if kernels == "xla_cpu":
    raise config_schema.ConfigError(
        f"config.model.kernels='xla_cpu' cannot run here: {why}; "
        "use --config.model.kernels=xla (plain JAX, the fallback)")
  print(f"warning: gptjax's XLA:CPU kernels are unavailable ({why}); "
        "running config.model.kernels=xla", file=sys.stderr, flush=True)
  return "xla"


def custom_call_matmul_flops(eqn) -> float:
  """Matmul FLOPs inside a backend's custom call (an `ffi_call` jaxpr equation); 0 if unknown."""
  if not str(eqn.params.get("target_name", "")).startswith("gptjax_"):
    return 0.0
  from gptjax.backends.xla_cpu import flops  # pylint: disable=g-import-not-at-top
  return flops.kernel_matmul_flops(eqn)
