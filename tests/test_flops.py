"""The model FLOP count behind MFU and equal-FLOP budgets, against the dot products traced."""

import dataclasses

import jax
import pytest

from conftest import load_config
from gptjax.training import flops
from gptjax.model import models
from gptjax.model import ops
from gptjax.model.config import ModelConfig

FULL_ATTENTION = "causal_blocks,cpu_weight_matmul"  # the count is of full attention


def _counted_and_traced(family: str, seq_len: int, target_len: int, **changes):
  c = load_config(family, "tiny")
  cfg = dataclasses.replace(ModelConfig.from_config(c.model), **changes)
  model = models.make_model(cfg)
  inputs = models.dummy_inputs(cfg, 1, seq_len, target_len)
  params = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, **inputs))
  traced = flops.traced_matmul_flops(lambda p: model.apply(p, **inputs), params)
  counted = flops.train_flops_per_example(cfg, seq_len, target_len, c.objective) / 3
  return counted, traced


@pytest.mark.parametrize("family,seq_len,target_len,changes", [
    ("gpt", 64, 0, {}),
    ("gpt", 48, 0, {"activation": "swiglu", "num_kv_heads": 2}),
    ("gpt", 32, 0, {"tie_embeddings": False}),
    ("t5", 64, 16, {}),   # encoder and decoder lengths differ: cross-attention K/V per encoder token
    ("t5", 24, 40, {"activation": "gated_gelu"}),
    ("bart", 32, 8, {}),
])
def test_flop_count_equals_traced_matmuls(family, seq_len, target_len, changes):
  counted, traced = _counted_and_traced(family, seq_len, target_len, kernel_exclude=FULL_ATTENTION,
                                        **changes)
  assert counted == traced


def test_bert_flop_count_leaves_out_only_the_per_example_heads():
  counted, traced = _counted_and_traced("bert", 64, 0)
  cfg = ModelConfig.from_config(load_config("bert", "tiny").model)
  per_example_heads = 2 * cfg.embed_dim * cfg.embed_dim + 2 * cfg.embed_dim * 2  # pooler, NSP
  assert traced - counted == per_example_heads


def test_traced_matmul_flops_counts_scan_bodies_per_iteration():
  x = jax.numpy.ones((4, 8))
  w = jax.numpy.ones((8, 8))
  body = lambda h, _: (h @ w, None)
  once = flops.traced_matmul_flops(lambda x: x @ w, x)
  assert once == 2 * 4 * 8 * 8
  assert flops.traced_matmul_flops(lambda x: jax.lax.scan(body, x, None, length=5)[0], x) == 5 * once


@pytest.mark.parametrize("exclude", ["", "cpu_fused_attention", "cpu_fused_attention,cpu_head_matmul"])
def test_traced_matmul_flops_sees_into_the_cpu_kernels(exclude):
  """With the XLA:CPU backend's attention kernels on or off, the traced count is the same."""
  if ops.resolve_kernels("auto") != "xla_cpu":
    pytest.skip("the XLA:CPU kernels run only on a CPU backend where they build")
  from gptjax.backends.xla_cpu import kernels as cpu_kernels  # pylint: disable=g-import-not-at-top
  counted, traced = _counted_and_traced("gpt", 64, 0, kernels="xla_cpu",
                                        kernel_exclude=f"{FULL_ATTENTION},{exclude}".strip(","))
  assert counted == traced
  q = jax.numpy.ones((2, 8, 3, 4))
  for equation, y in (("blhd,bshd->bhls", q), ("bhls,bshd->blhd", jax.numpy.ones((2, 3, 8, 8))),
                      ("bhls,blhd->bshd", jax.numpy.ones((2, 3, 8, 8)))):
    args = (y, q) if equation.startswith("bhls") else (q, y)
    kernel = flops.traced_matmul_flops(lambda a, b: cpu_kernels.head_einsum(equation, a, b), *args)
    assert kernel == flops.traced_matmul_flops(lambda a, b: jax.numpy.einsum(equation, a, b), *args)


def test_traced_count_of_causal_fused_attention_skips_the_kernels_blocks():
  """The backend, not flops.py, knows the fused kernel's block: it counts what the kernel computes."""
  if ops.resolve_kernels("auto") != "xla_cpu":
    pytest.skip("the XLA:CPU kernels run only on a CPU backend where they build")
  from gptjax.backends.xla_cpu import flops as kernel_flops  # pylint: disable=g-import-not-at-top
  from gptjax.backends.xla_cpu import kernels as cpu_kernels  # pylint: disable=g-import-not-at-top
  b, l, h, d = 1, 96, 2, 8
  q = jax.numpy.ones((b, l, h, d))
  full = flops.traced_matmul_flops(lambda q: cpu_kernels.fused_attention(q, q, q, None, 1.0), q)
  causal = flops.traced_matmul_flops(
      lambda q: cpu_kernels.fused_attention(q, q, q, None, 1.0, causal=True), q)
  assert full == 2 * 2.0 * b * h * d * l * l
  blocks = l // kernel_flops.ATTENTION_BLOCK  # 3 query blocks see 1, 2 and 3 key blocks
  assert causal == full * (blocks + 1) / (2 * blocks)
