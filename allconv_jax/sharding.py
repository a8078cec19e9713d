"""Data parallelism over every device: one 1-D mesh with the axis ``data``.

Parameters and optimizer state are replicated; each global batch is split
along its first axis. The same code runs on one CPU (a mesh of one device)
and on many GPUs or hosts.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from allconv_jax.errors import UserError

AXIS = 'data'


def make_mesh() -> Mesh:
  """A mesh over all devices of all processes, with automatic axis types.

  Auto (not Explicit) axes keep `flax.linen` dropout working under jit.
  """
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters, optimizer state and metrics."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a global batch: split along the first axis."""
  return NamedSharding(mesh, P(AXIS))


def check_batch_size(batch_size: int, field: str = 'batch_size') -> None:
  """Raises a `UserError` unless the batch splits evenly over devices."""
  devices = jax.device_count()
  if batch_size % devices:
    raise UserError(f'{field}: {batch_size} is not divisible by the '
                    f'{devices} devices; use a multiple of {devices}')


def local_slice(global_size: int) -> slice:
  """The part of each global batch that this process loads."""
  per_process = global_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def global_batch(mesh: Mesh, *local_arrays: np.ndarray) -> list[jax.Array]:
  """Builds global sharded arrays from this process's slices of a batch."""
  sharding = batch_sharding(mesh)
  out = []
  for x in local_arrays:
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    out.append(jax.make_array_from_process_local_data(sharding, x, global_shape))
  return out

