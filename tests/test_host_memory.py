"""gptjax.backends.xla_cpu.host_memory: configure() keeps XLA:CPU step buffers mapped between steps."""

import json
import os
import subprocess
import sys

import pytest

from gptjax.backends.xla_cpu import host_memory

PROBE = r"""
import functools, json, resource
import gptjax
from gptjax.backends.xla_cpu import host_memory
host_memory.configure()  # as run.py does, before JAX starts its threads
import jax, jax.numpy as jnp

@functools.partial(jax.jit, donate_argnums=0)
def step(w, x):
  def loss(w):
    h = jnp.tanh(x @ w)            # 8192 x 2048: 64 MiB, above glibc's largest mmap threshold
    return jnp.mean(jnp.square(h @ w.T))
  return w - 1e-3 * jax.grad(loss)(w)

w = jnp.ones((128, 2048)) * 0.01
x = jnp.ones((8192, 128))
for _ in range(12):  # the heap grows to its working size in the first steps
  w = step(w, x)
w.block_until_ready()
windows = []  # the fewest faults of 4 windows: on a loaded machine the executor's op order can
for _ in range(4):  # still raise the heap's high-water mark once in a while
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    w = step(w, x)
  w.block_until_ready()
  windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
print(json.dumps({"applied": host_memory.applied(), "faults_per_step": min(windows)}))
"""


def _probe(env_value):
  env = dict(os.environ)
  env.pop(host_memory.ENV_VAR, None)
  if env_value is not None:
    env[host_memory.ENV_VAR] = env_value
  out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.applies_here(), reason="malloc settings not applied on this host")
def test_step_buffers_are_reused_instead_of_faulted_in():
  tuned = _probe(None)
  default = _probe("default")
  assert tuned["applied"] and not default["applied"]
  # glibc's default unmaps the 64 MiB temporaries after every step and faults them back in
  assert default["faults_per_step"] > 1000, default
  assert tuned["faults_per_step"] < default["faults_per_step"] / 10, (tuned, default)


def test_importing_gptjax_leaves_malloc_alone():
  code = "import gptjax, json; from gptjax.backends.xla_cpu import host_memory; print(host_memory.applied())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       timeout=60)
  assert out.stdout.strip() == "False"
