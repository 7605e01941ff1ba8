"""Matmul FLOPs inside the XLA:CPU kernels, for gptjax.training.flops.traced_matmul_flops."""

from __future__ import annotations

import math

from gptjax.backends.xla_cpu import build

# rows and keys per block in csrc/attention.cc (kBlock); causal attention skips whole key blocks
ATTENTION_BLOCK = 32


def kernel_matmul_flops(eqn) -> float:
  """The products inside one kernel call (an `ffi_call` jaxpr equation), as the kernel computes them."""
  target, attrs = eqn.params["target_name"], dict(eqn.params.get("attributes", ()))
  shapes = [v.aval.shape for v in eqn.invars]
  if target == build.HEAD_MATMUL:  # a [B, H] batch of (M x K) @ (K x N), operands rank 4
    a, out = shapes[0], eqn.outvars[0].aval.shape
    rows = a[2] if attrs["a_heads_major"] else a[1]  # A's matrix is (rows, a[3]) in memory
    return 2.0 * math.prod(out) * (rows if attrs["a_trans"] else a[3])
  if target in (build.ATTENTION_FWD, build.ATTENTION_BWD):  # q [B, L, H, D], k [B, S, H, D]
    (b, l, h, d), s = shapes[0], shapes[1][1]
    if attrs.get("causal"):  # key blocks above the diagonal are skipped
      block = ATTENTION_BLOCK
      pairs = sum(min(block, l - r0) * min(s, r0 + block) for r0 in range(0, l, block))
    else:
      pairs = l * s
    per_pair = 2 if target == build.ATTENTION_FWD else 4  # products of d multiply-adds
    return 2.0 * b * h * d * pairs * per_pair
  return 0.0
