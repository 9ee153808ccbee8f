"""Processes and global arrays: `jax.distributed` start-up, and host batches -> arrays on the mesh.

Every process runs the same command. On a TPU pod slice `jax.distributed.initialize()` finds its peers
from the environment; on GPU clusters pass the coordinator, process count and id (flags or the
scheduler's environment: SLURM / Open MPI are auto-detected by jax).
"""

import jax
import numpy as np
from jax.experimental import multihost_utils

from kldistill_jax.errors import UserError
from kldistill_jax.models import sharding


def initialize(config):
  """Starts `jax.distributed` when config.distributed asks for it (before any other JAX call)."""
  d = config.distributed
  if d.mode == "off":
    return
  if d.mode == "auto":  # TPU pods, SLURM, Open MPI: jax reads the environment
    jax.distributed.initialize()
  elif d.mode == "explicit":
    if not d.coordinator_address or d.num_processes < 1 or not 0 <= d.process_id < d.num_processes:
      raise UserError("distributed.mode='explicit' needs distributed.coordinator_address (host:port), "
                      "distributed.num_processes >= 1 and 0 <= distributed.process_id < num_processes, got "
                      f"{d.coordinator_address!r}, {d.num_processes}, {d.process_id}")
    jax.distributed.initialize(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                               process_id=d.process_id)
  else:
    raise UserError(f"distributed.mode must be 'off', 'auto' or 'explicit', got {d.mode!r}")


def global_batch(local_batch, mesh):
  """This process's rows (a dict of numpy [b, ...]) -> global arrays split over ('data', 'fsdp')."""
  return {key: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, value.ndim), value)
          for key, value in local_batch.items()}


def replicated_batch(full_batch, mesh):
  """The SAME full batch on every process (evaluation prompts) -> global arrays split over the batch."""
  return {key: jax.make_array_from_callback(value.shape, sharding.batch_sharding(mesh, value.ndim),
                                            lambda index, value=value: value[index])
          for key, value in full_batch.items()}


def to_host(x):
  """A global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
