"""Device mesh (data, fsdp, tensor), logical-axis rules and multi-host start-up."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config_schema import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def initialize_distributed(parallelism) -> None:
  """Starts jax.distributed from the config or the environment (SLURM, TPU, k8s are auto-detected)."""
  if jax.distributed.is_initialized():
    return
  address = parallelism.coordinator_address or os.environ.get("GPTJAX_COORDINATOR", "")
  if address:
    n = parallelism.num_processes or int(os.environ.get("GPTJAX_NUM_PROCESSES", "0"))
    pid = parallelism.process_id if parallelism.process_id >= 0 else int(
        os.environ.get("GPTJAX_PROCESS_ID", "-1"))
    if n <= 0 or pid < 0:
      raise ConfigError("config.parallelism.coordinator_address needs num_processes and process_id "
                        "(or GPTJAX_NUM_PROCESSES / GPTJAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
  elif any(k in os.environ for k in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                                     "JOBSET_NAME")) and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
    jax.distributed.initialize()


def mesh_shape(parallelism, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 in (data, fsdp, tensor) and checks the product equals the device count."""
  dims = [parallelism.data, parallelism.fsdp, parallelism.tensor]
  if dims.count(-1) > 1:
    raise ConfigError("only one of config.parallelism.{data,fsdp,tensor} may be -1")
  known = int(np.prod([d for d in dims if d != -1]))
  if -1 in dims:
    if num_devices % known:
      raise ConfigError(f"config.parallelism fsdp*tensor={known} does not divide the "
                        f"{num_devices} devices; pick sizes whose product divides {num_devices}")
    dims[dims.index(-1)] = num_devices // known
  if int(np.prod(dims)) != num_devices:
    raise ConfigError(f"config.parallelism data*fsdp*tensor={int(np.prod(dims))} does not match "
                      f"the {num_devices} devices; set config.parallelism.data=-1 or sizes that "
                      f"multiply to {num_devices}")
  return tuple(dims)


def make_mesh(parallelism) -> Mesh:
  """A Mesh over all devices with axes (data, fsdp, tensor)."""
  shape = mesh_shape(parallelism, jax.device_count())
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def rules(parallelism) -> tuple:
  """The logical-axis rules from the config, as flax expects them."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in parallelism.logical_axis_rules)


def logical_shardings(boxed_tree, mesh: Mesh, parallelism):
  """NamedShardings for a tree of (abstract) LogicallyPartitioned values; unboxed leaves replicate.

  A box whose value lost the rank its names describe (Adafactor's factored row and column
  statistics of a matrix keep the matrix's box) is replicated: those statistics are small.
  """
  def spec(x):
    if isinstance(x, nn.Partitioned) and len(x.names) != len(x.value.shape):
      return P()
    return nn.get_partition_spec(x)
  specs = jax.tree.map(spec, boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  return nn.logical_to_mesh_sharding(specs, mesh, rules(parallelism))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch rows split over data and fsdp; everything else replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def check_batch_divides(batch_size: int, mesh: Mesh, grad_accum: int) -> None:
  """Fails in one line when the global batch does not split over devices and microbatches."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % (shards * grad_accum):
    raise ConfigError(
        f"config.data.batch_size={batch_size} does not divide over {shards} data shards x "
        f"{grad_accum} accumulation steps; use a multiple of {shards * grad_accum}")
  if batch_size % jax.process_count():
    raise ConfigError(f"config.data.batch_size={batch_size} does not divide over "
                      f"{jax.process_count()} processes")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's rows into one global jax.Array per key, sharded over the batch."""
  def to_global(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    spec = NamedSharding(mesh, P(("data", "fsdp"), *([None] * (x.ndim - 1))))
    return jax.make_array_from_process_local_data(spec, x, global_shape)
  return {k: to_global(v) for k, v in local_batch.items()}
