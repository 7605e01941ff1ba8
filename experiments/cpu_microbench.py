"""Micro-benchmarks behind two XLA:CPU findings in experiments/PERFORMANCE.md.

  python experiments/cpu_microbench.py

colsum: a column sum (reduce over the leading axis) against the same sum as a ones-vector
matmul, the reason for gptjax.fast_paths.sum_leading_axes.
adamw: optax's clip + AdamW update, the same with gptjax's clip (fast_paths.clip_by_global_norm,
the clipping as one scalar factor), and the update written as one expression per parameter
(buffers donated in all three), on a parameter list shaped like t5:small's.
Each figure is the mean of --repeats calls after one warm-up call.
"""

import pathlib
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import gptjax  # pylint: disable=g-import-not-at-top  (host malloc settings, as in training)
from gptjax import fast_paths  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 20, "Timed calls per measurement.")


def timed(f, *args) -> float:
  """Milliseconds per call of `f(*args)` after one warm-up call."""
  out = f(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(FLAGS.repeats):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / FLAGS.repeats * 1e3


def colsum() -> None:
  """Column sums as a reduce and as a matrix-vector product."""
  for shape in [(2048, 8192), (2048, 1024), (16, 4 * 128 * 128)]:
    x = jax.random.normal(jax.random.key(0), shape)
    reduce_ms = timed(jax.jit(lambda x: x.sum(0)), x)
    matvec_ms = timed(jax.jit(lambda x: jnp.ones((x.shape[0],), x.dtype) @ x), x)
    print(f"colsum {shape}: reduce {reduce_ms:.3f} ms, ones @ x {matvec_ms:.3f} ms")


def adamw() -> None:
  """One clip + AdamW update three ways: optax, optax with gptjax's clip, one expression."""
  shapes = [(8192, 256)] + [(256, 1024), (1024, 256)] + [(256, 256)] * 4 + [(256,)] * 2
  shapes = shapes[:1] + shapes[1:] * 10
  params = [jax.random.normal(jax.random.key(i), s) for i, s in enumerate(shapes)]
  grads = [0.01 * jax.random.normal(jax.random.key(100 + i), s) for i, s in enumerate(shapes)]
  lr, b1, b2, eps, wd = 1e-3, 0.9, 0.999, 1e-8, 0.1

  def optax_ms(clip) -> float:
    tx = optax.chain(clip(1.0), optax.adamw(lr, b1, b2, eps, weight_decay=wd))

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1))
    state = [[x + 0 for x in params], None]
    state[1] = tx.init(state[0])

    def run():
      state[0], state[1] = jitted(state[0], state[1], grads)
      return state[0]
    return timed(run)

  def fused_step(state, g):
    p, mu, nu, count = state
    scale = jnp.minimum(1.0, 1.0 / (optax.tree.norm(g) + 1e-12))
    count = count + 1
    bc1, bc2 = 1 - b1 ** count, 1 - b2 ** count
    mu = [b1 * m + (1 - b1) * gi * scale for m, gi in zip(mu, g)]
    nu = [b2 * n + (1 - b2) * jnp.square(gi * scale) for n, gi in zip(nu, g)]
    p = [pi - lr * ((m / bc1) / (jnp.sqrt(n / bc2) + eps) + wd * pi)
         for pi, m, n in zip(p, mu, nu)]
    return p, mu, nu, count

  step_b = jax.jit(fused_step, donate_argnums=0)
  zeros = lambda: [jnp.zeros_like(x) for x in params]
  state_b = [([x + 0 for x in params], zeros(), zeros(), jnp.zeros((), jnp.int32))]

  def run_b():
    state_b[0] = step_b(state_b[0], grads)
    return state_b[0][0]

  n = sum(x.size for x in params)
  print(f"adamw ({n / 1e6:.1f}M parameters): optax {optax_ms(optax.clip_by_global_norm):.2f} ms, "
        f"optax with gptjax's clip {optax_ms(fast_paths.clip_by_global_norm):.2f} ms, "
        f"one expression per parameter {timed(run_b):.2f} ms")


def main(argv):
  del argv
  colsum()
  adamw()


if __name__ == "__main__":
  app.run(main)
