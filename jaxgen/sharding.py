"""Device mesh and shardings: the batch is split over the `data` axis, state is replicated.

The mesh axes come from `config.mesh` (sizes; one may be -1 for "the rest of the devices").
FSDP / tensor axes plug in here (issue 5) without touching the trainer.
"""

import math
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A Mesh over `devices` (default: all) with the config's axis sizes."""
  if devices is None:
    # num_devices > 0 uses the first N devices (debugging, single- vs multi-device checks).
    n = int(mesh_config.get("num_devices", 0))
    devices = jax.devices()[:n] if n > 0 else jax.devices()
  devices = list(devices)
  sizes = [int(mesh_config.get(axis, 1)) for axis in AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"config.mesh {dict(zip(AXES, sizes))} does not divide "
                        f"{len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"config.mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                      f"have {len(devices)}; set one axis to -1")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_axes():
  """Mesh axes the batch dimension is split over (data-parallel and FSDP both split it)."""
  return ("data", "fsdp")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes()))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  shards = num_batch_shards(mesh)
  if batch_size % shards:
    raise ConfigError(f"batch size {batch_size} is not divisible by the {shards} batch shards "
                      f"of the mesh {dict(mesh.shape)}; change training.batch_size or config.mesh")


def put_batch(batch, mesh: Mesh):
  """Host-local numpy batch -> global jax.Arrays sharded along the batch axes."""
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
