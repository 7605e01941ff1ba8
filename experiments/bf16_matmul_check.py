"""What bfloat16 weights give XLA:CPU on this machine: 12 GPT-2 MLP products, bf16 vs fp32.

  python experiments/bf16_matmul_check.py

Sums x @ W_i over 12 [768, 3072] weights (GPT-2 124M's first MLP matrices) for 1 and 16 rows,
fp32 and bf16 operands, best of 10 alternating runs; prints milliseconds and the bf16/fp32 ratio.
"""

import time

from absl import app


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ks = [jax.random.normal(jax.random.key(i), (768, 3072), jnp.float32) * 0.02 for i in range(12)]
  product = jax.jit(lambda x, k: sum(x @ ki for ki in k))
  fns = {}
  for rows in (1, 16):
    for dtype in (jnp.float32, jnp.bfloat16):
      fns[(rows, jnp.dtype(dtype).name)] = (jnp.ones((rows, 768), dtype),
                                            [k.astype(dtype) for k in ks])
  for x, k in fns.values():
    product(x, k).block_until_ready()
  best = {key: float("inf") for key in fns}
  for _ in range(10):
    for key, (x, k) in fns.items():
      t0 = time.perf_counter()
      product(x, k).block_until_ready()
      best[key] = min(best[key], time.perf_counter() - t0)
  for rows in (1, 16):
    f32, bf16 = best[(rows, "float32")], best[(rows, "bfloat16")]
    print(f"rows {rows:2d}: fp32 {f32 * 1e3:7.2f} ms  bf16 {bf16 * 1e3:7.2f} ms  "
          f"bf16/fp32 time {bf16 / f32:.2f}x")


if __name__ == "__main__":
  app.run(main)
