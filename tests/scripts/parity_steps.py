"""Runs a few train steps of the tiny GPT on real text and prints the losses as JSON.

  python parity_steps.py MODE [PROCESS_ID PORT]
MODE: mesh (data parallel), fsdp (data=1, fsdp=2, tensor=2), pmap, multihost (2 processes x 2
devices, gloo collectives on 127.0.0.1). The device count comes from XLA_FLAGS.
"""

import json
import os
import pathlib
import sys

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from conftest import load_config  # pylint: disable=g-import-not-at-top
from gptjax.model import models  # pylint: disable=g-import-not-at-top
from gptjax.training import sharding
from gptjax.training import train_step
from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top

B, L, STEPS = 8, 32, 4


def real_text_batches():
  text = (REPO.parent / "shared/data/tinyshakespeare/input.txt").read_bytes()[:50000]
  ids = np.frombuffer(text, np.uint8).astype(np.int32)
  for i in range(STEPS):
    rows = np.stack([ids[(i * B + r) * L:(i * B + r) * L + L + 1] for r in range(B)])
    yield {"inputs": rows[:, :-1], "targets": rows[:, 1:], "weights": np.ones((B, L), np.float32),
           "segment_ids": np.ones((B, L), np.int32),
           "positions": np.tile(np.arange(L), (B, 1)).astype(np.int32)}


def main():
  mode = sys.argv[1]
  if mode == "multihost":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{sys.argv[3]}", num_processes=2,
                               process_id=int(sys.argv[2]))
  c = load_config("gpt", "tiny")
  if mode == "fsdp":
    c.parallelism.data, c.parallelism.fsdp, c.parallelism.tensor = 1, 2, 2
  cfg = ModelConfig.from_config(c.model)
  tx = train_step.make_optimizer(c.train)
  mesh = sharding.make_mesh(c.parallelism)
  state, shardings = train_step.create_state(cfg, tx, 0, mesh, c.parallelism, L)
  model = models.make_model(cfg)
  losses = []
  if mode == "pmap":
    import flax.jax_utils  # pylint: disable=g-import-not-at-top
    state = flax.jax_utils.replicate(jax.device_get(state))
    step = train_step.make_pmap_train_step(model, "next_token", tx, 0, 1)
    for b in real_text_batches():
      state, m = step(state, train_step.shard_for_pmap(b))
      losses.append(float(m["loss"][0]))
    params = flax.jax_utils.unreplicate(state).params
  else:
    step = train_step.make_mesh_train_step(model, "next_token", tx, 0, 1, mesh, shardings)
    n, i = jax.process_count(), jax.process_index()
    with jax.set_mesh(mesh):
      for b in real_text_batches():
        local = {k: v[i * B // n:(i + 1) * B // n] for k, v in b.items()}
        state, m = step(state, sharding.global_batch(local, mesh))
        losses.append(float(m["loss"]))
    params = state.params
  norm = float(sum(np.sum(np.square(np.asarray(jax.device_get(x), np.float64)))
                   for x in jax.tree.leaves(jax.experimental.multihost_utils.process_allgather(params, tiled=True)
                                            if mode == "multihost" else params)))
  print(json.dumps({"mode": mode, "devices": jax.device_count(), "losses": losses,
                    "param_sq_norm": norm}))
  sys.stdout.flush()


if __name__ == "__main__":
  import jax.experimental.multihost_utils  # pylint: disable=g-import-not-at-top,unused-import
  main()
