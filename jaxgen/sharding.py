"""Device mesh and shardings: the batch over (data, fsdp), parameters over fsdp and tensor.

The mesh axes come from `config.mesh` (sizes; one may be -1 for "the rest of the devices").
Parameter, EMA and optimizer-state leaves are laid out by `state_shardings`:

* a leaf that a module annotated with flax logical axis names (`nn.with_logical_partitioning`)
  is placed by the config's logical axis rules (`mesh.rules`, maxdiffusion style: logical name
  -> mesh axis or axes, None = replicated);
* any other leaf with at least `mesh.min_shard_size` elements is split along its largest
  dimension divisible by the tensor axis size, then along its largest remaining dimension
  divisible by the fsdp axis size (ties: the last such dimension, i.e. output features of HWIO
  / (in, out) kernels); smaller or indivisible leaves are replicated.

For fsdp, XLA's SPMD partitioner all-gathers the weights for the forward and reduce-scatters
the gradients, so each device holds ~1/fsdp of the parameters and of Adam's moments. The
tensor axis keeps its slice of every weight through the matmul (Megatron-style: the largest
dimension of an MLP's (d, 4d) and (4d, d) kernels is the hidden one, so the first layer is
split by columns and the second by rows; the partitioner inserts the all-reduce): each device
holds ~1/(fsdp*tensor) of the weights and sees the whole batch of its (data, fsdp) shard.

Batches: `put_batch` places a training batch (host-local rows); `BatchRunner` runs inference
(sampling, reconstruction, encoding, feature extraction) over in-memory or streamed inputs in
fixed-size padded global batches and gathers the results with `host_array`.

Programs on a mesh are traced inside `mesh_context(mesh)` (the train step, `BatchRunner.map`):
custom kernels that XLA cannot partition (Pallas calls) read the mesh from it and run on each
device's batch shard under `jax.shard_map` (jaxgen/kernels/ca_depthwise_conv.py).
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen.errors import ConfigError

AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes, or None: replicated). `batch` splits activations;
# the others place parameters of modules that annotate their axes with these names.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("vocab", "tensor"),
    ("norm", None),
)
DEFAULT_MIN_SHARD_SIZE = 2 ** 14  # Elements; smaller leaves are cheaper replicated.


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
  return Mesh(_device_grid(devices, sizes), AXES)


def _device_grid(devices, sizes) -> np.ndarray:
  """Devices arranged for the mesh: topology-aware (TPU ICI rings, GPU hosts) when all devices
  are used, else in `jax.devices()` order (process-major, so `data` spans hosts first)."""
  if len(devices) == jax.device_count() and len(devices) > 1:
    try:
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
      return mesh_utils.create_device_mesh(sizes, devices)
    except (ValueError, NotImplementedError, AssertionError):
      pass  # A shape the physical topology cannot host as rings: plain order still works.
  return np.asarray(devices).reshape(sizes)


def batch_axes():
  """Mesh axes the batch dimension is split over (data-parallel and FSDP both split it)."""
  return ("data", "fsdp")


def mesh_context(mesh: Mesh):
  """Context manager: `mesh` as the abstract mesh of the traces inside (inside or outside a
  jit), where `jax.sharding.get_abstract_mesh()` finds it."""
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def context_batch_axes(batch: int) -> tuple:
  """The axes of the context mesh (`jax.sharding.get_abstract_mesh()`) that split a batch of
  `batch` samples: the batch axes of size > 1 that are not already manual (inside a
  shard_map), when their product divides `batch`; () when there is no such mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = tuple(a for a in batch_axes()
               if a in mesh.axis_names and mesh.shape[a] > 1 and a not in mesh.manual_axes)
  if not axes or batch % math.prod(mesh.shape[a] for a in axes):
    return ()
  return axes


def on_batch_shards(fn, *args):
  """fn(*args) on each device's batch shard (`jax.shard_map` over `context_batch_axes`) when
  traced under a mesh that splits the batch, else fn(*args).

  For per-sample computations that XLA's partitioner cannot split by itself (Pallas calls;
  convs vmapped over per-sample kernels, which it all-gathers): every arg and the output are
  batch-major, and `fn` must treat samples independently. The shard_map is manual over the
  batch axes only (the others stay with the partitioner); check_vma=False because a
  pallas_call's output type does not say how it varies over the mesh (every operand and the
  output are split alike: nothing to check).
  """
  axes = context_batch_axes(args[0].shape[0])
  if not axes:
    return fn(*args)
  spec = P(axes)
  return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=(spec,) * len(args),
                       out_specs=spec, axis_names=set(axes), check_vma=False)(*args)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(batch_axes()))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes())


def mesh_batch_size(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded down to a multiple of the mesh's batch shards (at least one each)."""
  shards = num_batch_shards(mesh)
  return max(shards, batch_size - batch_size % shards)


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


def host_array(x) -> np.ndarray:
  """The whole of a (batch-sharded) global array on every process, as numpy."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def batch_rng(seed: int, index: int) -> jax.Array:
  """The key of batch `index` in a seeded BatchRunner.map run. Every sampler draws batch i from
  it, so sampling the same labels with the same batch size gives the same images anywhere."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), index)


class BatchRunner:
  """Inference in fixed-size global batches on the mesh: every batch has the same shape (one
  compilation), split over the batch axes; results come back to the host without the padding.
  Inputs are global batches that every process holds whole (eval reads are unsharded)."""

  def __init__(self, mesh: Mesh, batch_size: int):
    self.mesh = mesh
    self.batch = mesh_batch_size(batch_size, mesh)
    self.repl = replicated(mesh)
    self.split = batch_sharding(mesh)

  def put(self, batch):
    """A pytree of numpy arrays with at most `self.batch` rows -> (sharded jax.Arrays padded to
    `self.batch` rows with copies of the first, the true row count)."""
    n = len(jax.tree.leaves(batch)[0])
    if not 0 < n <= self.batch:
      raise ValueError(f"a batch of {n} rows for a runner of batch size {self.batch}")

    def pad_and_put(x):
      x = np.asarray(x)
      x = np.concatenate([x, np.repeat(x[:1], self.batch - n, axis=0)])
      if jax.process_count() == 1:
        return jax.device_put(x, self.split)
      per_process = self.batch // jax.process_count()
      local = x[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
      return jax.make_array_from_process_local_data(self.split, local)

    return jax.tree.map(pad_and_put, batch), n

  def get(self, outputs, n: int):
    """Batch-sharded outputs (a pytree) -> numpy on every process, the first `n` rows."""
    return jax.tree.map(lambda x: host_array(x)[:n], outputs)

  def map(self, fn, inputs, progress=None):
    """fn(batch_index, sharded batch) over the rows of `inputs` (a pytree of arrays), results
    concatenated on the host; progress(rows) is called after each batch."""
    n = len(jax.tree.leaves(inputs)[0])
    outs = []
    for i, start in enumerate(range(0, n, self.batch)):
      x, rows = self.put(jax.tree.map(lambda v: v[start:start + self.batch], inputs))
      with mesh_context(self.mesh):  # fn's first call traces: custom kernels see the mesh.
        result = fn(i, x)
      outs.append(self.get(result, rows))
      if progress is not None:
        progress(rows)
    if not outs:
      raise ValueError("no rows to run")
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


# -- parameter / optimizer-state layout -----------------------------------------------------------


def logical_rules(mesh_config: Optional[ml_collections.ConfigDict]) -> tuple:
  """`mesh.rules` as a tuple of (logical name, mesh axis | tuple of axes | None)."""
  rules = DEFAULT_RULES if mesh_config is None else mesh_config.get("rules", DEFAULT_RULES)
  out = []
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config.mesh.rules entry {rule!r} must be (logical_name, mesh_axes)")
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in AXES:
        raise ConfigError(f"config.mesh.rules: {name!r} -> {a!r} is not a mesh axis {AXES}")
    out.append((name, axes))
  return tuple(out)


def shape_spec(shape: Sequence[int], fsdp_size: int, min_size: int, tensor_size: int = 1) -> P:
  """Tensor on the largest dimension divisible by `tensor_size`, then fsdp on the largest
  remaining one divisible by `fsdp_size` (ties: the last); replicated below `min_size`."""
  if math.prod(shape) < max(min_size, 1):
    return P()
  names = [None] * len(shape)
  for axis, size in (("tensor", tensor_size), ("fsdp", fsdp_size)):
    free = [i for i, d in enumerate(shape) if names[i] is None and d % size == 0]
    if size > 1 and free:
      names[max(free, key=lambda i: (shape[i], i))] = axis
  while names and names[-1] is None:
    names.pop()
  return P(*names)


def _by_shape(leaf, mesh: Mesh, min_size: int) -> NamedSharding:
  return NamedSharding(mesh, shape_spec(np.shape(leaf), mesh.shape["fsdp"], min_size,
                                        mesh.shape["tensor"]))


def _is_box(x) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def param_shardings(abstract_params, mesh: Mesh, rules: tuple, min_size: int):
  """NamedShardings for a (possibly logically-annotated, i.e. boxed) abstract param tree.

  Returns a tree of the *unboxed* structure: annotated leaves follow `rules`, the rest
  `shape_spec`.
  """

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      with nn.logical_axis_rules(rules):
        spec = nn.logical_to_mesh_axes(leaf.names)
      return NamedSharding(mesh, spec)
    if isinstance(leaf, nn.Partitioned):
      return NamedSharding(mesh, P(*leaf.names))
    return _by_shape(leaf, mesh, min_size)

  return jax.tree.map(one, abstract_params, is_leaf=_is_box)


def state_shardings(abstract_state, mesh: Mesh, *, tx=None, param_layout=None,
                    min_size: int = DEFAULT_MIN_SHARD_SIZE):
  """Shardings for a TrainState-like tree (step, params, ema_params, opt_state, model_state).

  `param_layout`: shardings of `params` (default: `shape_spec` per leaf); EMA params follow
  them, optimizer-state leaves that mirror a parameter (Adam's mu, nu) follow that parameter
  (via `optax.tree_map_params` on `tx`), other leaves use `shape_spec`.
  """
  by_shape = lambda x: _by_shape(x, mesh, min_size)
  params = (jax.tree.map(by_shape, abstract_state.params) if param_layout is None
            else param_layout)
  opt = jax.tree.map(by_shape, abstract_state.opt_state)
  if tx is not None and param_layout is not None:
    try:
      opt = optax.tree_map_params(tx, lambda _, s: s, abstract_state.opt_state, params,
                                  transform_non_params=by_shape)
    except Exception:  # pylint: disable=broad-except
      pass  # An optimizer state optax cannot map: shape-based layout (correct, maybe slower).
  return abstract_state.replace(
      step=replicated(mesh), params=params, ema_params=params, opt_state=opt,
      model_state=jax.tree.map(by_shape, abstract_state.model_state))


def bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def is_sharded(sharding: Any) -> bool:
  return isinstance(sharding, NamedSharding) and any(a is not None for a in sharding.spec)
