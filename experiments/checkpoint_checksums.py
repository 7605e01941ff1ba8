"""What the per-array CRC-32 checksums cost when saving and restoring a checkpoint.

  python experiments/checkpoint_checksums.py --config=configs/gpt.py:base --repeats=3

Builds the full train state of the config (parameters and AdamW moments, as `--mode=train` saves
them), then times in one process, best of --repeats:
  - checksums: `checkpointing.array_checksums(state)` (what every save adds, before it is queued);
  - save: an orbax save of the same state and meta, waited until on disk (no checksums);
  - restore: an orbax restore of it;
  - verify: CRC-32 of the restored arrays compared with the saved ones (what every restore adds).
Prints one `key=value` line per measurement and the overheads as ratios.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/gpt.py:base", "Model config.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds; the best is reported.")
_DIR = flags.DEFINE_string("dir", "", "Where to write the checkpoint (default: a temp folder).")


def _best(fn, repeats: int) -> tuple[float, object]:
  best, out = float("inf"), None
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t)
  return best, out


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from gptjax.training import checkpointing  # pylint: disable=g-import-not-at-top
  from gptjax.training import sharding
  from gptjax.training import train
  from gptjax.model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  cfg = ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh(config.parallelism)
  state, _, _, _ = train.initial_state(config, cfg, mesh)
  jax.block_until_ready(state)
  n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  print(f"config={config.name}:{config.variant} params={n_params} state_bytes={n_bytes} "
        f"arrays={len(jax.tree.leaves(state))} devices={jax.device_count()} "
        f"backend={jax.default_backend()}", flush=True)
  repeats = _REPEATS.value

  t_sum, arrays = _best(lambda: checkpointing.array_checksums(state), repeats)
  root = _DIR.value or tempfile.mkdtemp(prefix="gptjax_ckpt_cost_")
  meta = {"step": 0, "arrays": arrays}

  def save():
    path = os.path.join(root, "ckpt")
    shutil.rmtree(path, ignore_errors=True)
    with ocp.CheckpointManager(path, item_names=("state", "meta")) as manager:
      manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              meta=ocp.args.JsonSave(meta)))
      manager.wait_until_finished()

  t_save, _ = _best(save, repeats)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

  def restore():
    with ocp.CheckpointManager(os.path.join(root, "ckpt"), item_names=("state", "meta")) as m:
      return m.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]

  t_restore, restored = _best(restore, repeats)
  t_verify, failure = _best(lambda: checkpointing._checksum_failure(restored, arrays), repeats)  # pylint: disable=protected-access
  assert failure is None, failure
  shutil.rmtree(root, ignore_errors=True)
  gb = n_bytes / 1e9
  print(f"checksums_s={t_sum:.3f} ({gb / t_sum:.2f} GB/s)")
  print(f"save_s={t_save:.3f}")
  print(f"restore_s={t_restore:.3f}")
  print(f"verify_s={t_verify:.3f} ({gb / t_verify:.2f} GB/s)")
  print(f"save_overhead={t_sum / t_save:.3f} (checksums / save)  "
        f"restore_overhead={t_verify / t_restore:.3f} (verify / restore)")


if __name__ == "__main__":
  app.run(main)
