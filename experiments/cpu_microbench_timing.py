"""Timing of the micro-benchmarks (experiments/cpu_microbench.py): mean milliseconds per call."""

import time

from absl import flags
import jax

flags.DEFINE_integer("repeats", 20, "Timed calls per measurement.")
FLAGS = flags.FLAGS


def timed(f, *args) -> float:
  """Milliseconds per call of `f(*args)` after one warm-up call."""
  out = f(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(FLAGS.repeats):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / FLAGS.repeats * 1e3


def timed_torch(f) -> float:
  """Milliseconds per call of the PyTorch function `f()` after one warm-up call."""
  f()
  t0 = time.perf_counter()
  for _ in range(FLAGS.repeats):
    f()
  return (time.perf_counter() - t0) / FLAGS.repeats * 1e3
