"""config_schema.XLA_CPU_TRICKS and the tricks gptjax/backends/xla_cpu/ops.py implements cannot drift.

The core names the tricks (it validates config.model.kernel_exclude and never imports the
backend); the backend reads them. Every listed name must change the program when it is the only
trick on, and with every listed name excluded the backend must lower to exactly the plain `xla`
program, so a trick the list does not name has nowhere to hide.
"""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import config_schema
from gptjax.backends.xla_cpu import build
from gptjax.backends.xla_cpu import ops as xla_cpu_ops
from gptjax.model.ops import XLA

TRICKS = frozenset(config_schema.XLA_CPU_TRICKS)
BACKEND = pathlib.Path(xla_cpu_ops.__file__).parent

# The kernel tricks lower to custom calls only when the kernels are built on a CPU backend.
needs_kernels = pytest.mark.skipif(
    jax.default_backend() != "cpu" or build._compiler() is None,  # pylint: disable=protected-access
    reason="the XLA:CPU kernels run only on a CPU backend with a C++ compiler")


def _names_tested_against(source: str, variable: str = "on") -> set[str]:
  """String constants `s` of every `s in <variable>` / `s not in <variable>` in `source`."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and
        isinstance(node.left.value, str) and len(node.ops) == 1 and
        isinstance(node.ops[0], (ast.In, ast.NotIn)) and isinstance(node.comparators[0], ast.Name)
        and node.comparators[0].id == variable):
      names.add(node.left.value)
  return names


# Chooses the ops a decoding step runs (ops.for_decoding), not an op of the layers.
DECODING_TRICKS = {"cpu_decode_matmul"}


def test_the_backend_reads_exactly_the_listed_tricks():
  read = set()
  for path in sorted(BACKEND.glob("*.py")):
    read |= _names_tested_against(path.read_text(encoding="utf-8"))
  assert read == TRICKS, {"read but not listed": sorted(read - TRICKS),
                          "listed but never read": sorted(TRICKS - read)}


def test_generation_turns_the_weight_kernel_back_on_unless_told_not_to():
  both = frozenset({"cpu_weight_matmul", "cpu_decode_matmul"})
  assert "cpu_weight_matmul" not in xla_cpu_ops.decoding_kernel_exclude(frozenset({"cpu_weight_matmul"}))
  assert set(xla_cpu_ops.decoding_kernel_exclude(both).split(",")) == both
  assert xla_cpu_ops.decoding_kernel_exclude(frozenset()) == ""


def test_the_backend_docstring_describes_exactly_the_listed_tricks():
  bullets = re.findall(r"^- ([a-z_0-9, ]+):", xla_cpu_ops.__doc__, flags=re.M)
  described = {n.strip() for bullet in bullets for n in bullet.split(",")}
  assert described == TRICKS, {"described, not listed": sorted(described - TRICKS),
                               "listed, not described": sorted(TRICKS - described)}


B, L, H, DH, V = 2, 128, 2, 16, 64  # L = 128: causal attention splits into 2 query blocks
D = H * DH


def _inputs():
  keys = jax.random.split(jax.random.key(0), 6)
  params = {"kernel": 0.2 * jax.random.normal(keys[0], (D, H, DH)),
            "bias": 0.1 * jax.random.normal(keys[1], (D,)),
            "scale": 1.0 + 0.1 * jax.random.normal(keys[2], (D,)),
            "table": 0.2 * jax.random.normal(keys[3], (V, D))}
  x = jax.random.normal(keys[4], (B, L, D))
  targets = jax.random.randint(keys[5], (B, L), 0, V)
  return params, x, targets


def _step(ops):
  """A jitted gradient + clip through every op of `ops` (each op where its tricks apply)."""
  mask = jnp.tril(jnp.ones((L, L), jnp.bool_))[None, None]
  tx = ops.clip_by_global_norm(1.0)

  def loss(params, x, targets):
    h = ops.residual_grad_barrier(x)
    q = ops.dense_matmul(h, params["kernel"], (D,), (H, DH))
    a = ops.attention(q, 0.5 * q, q, mask, None, DH ** -0.5, "einsum", mask_is_causal=True)
    z = ops.bias_gelu(ops.add_bias(a.reshape(B, L, D), params["bias"]), params["bias"], True)
    n = ops.norm(z, params["scale"], params["bias"], 1e-6, False)
    log_z, target, _ = ops.log_z_and_target(ops.tied_logits(n, params["table"]), targets)
    few_rows = ops.dense_matmul(x[:1, :4], params["kernel"], (D,), (H, DH))  # a decoding step
    return jnp.mean(log_z - target) + jnp.mean(few_rows ** 2)

  def step(params, x, targets):  # the input's gradient too: the residual barrier acts there
    grads = jax.grad(loss, argnums=(0, 1))(params, x, targets)
    return tx.update(grads, tx.init(grads), grads)[0]
  return jax.jit(step)


def _program(ops) -> str:
  text = _step(ops).lower(*_inputs()).as_text()
  return re.sub(r"(func\.func|call) (public |private )?@[\w.]+", r"\1 @f", text)  # names differ


@needs_kernels
def test_every_listed_trick_changes_the_program_and_none_on_is_plain_xla():
  none_on = _program(xla_cpu_ops.make_ops(TRICKS))
  assert none_on == _program(XLA), "with every trick excluded, xla_cpu must be the plain xla program"
  unchanged = [t for t in sorted(TRICKS - DECODING_TRICKS)
               if _program(xla_cpu_ops.make_ops(TRICKS - {t})) == none_on]
  assert not unchanged, f"tricks that change nothing when on alone: {unchanged}"


@needs_kernels
def test_all_tricks_on_computes_what_plain_xla_computes():
  args = _inputs()
  got = _step(xla_cpu_ops.make_ops(frozenset()))(*args)
  want = _step(XLA)(*args)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-6)
