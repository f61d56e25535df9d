"""Custom kernels under a mesh: the Pallas CA depthwise conv (interpret mode on 8 CPU devices)
runs on each device's batch shard (`jax.shard_map`) instead of being all-gathered, alone and
inside a batch-sharded CaT train step, with the numbers of the XLA path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgen import sharding
from jaxgen.diffusion.losses import diffusion_loss
from jaxgen.diffusion.schedules import make_schedule
from jaxgen.kernels.ca_depthwise_conv import ca_depthwise_conv
from jaxgen.models.cat import cat
from jaxgen.train import state as state_lib

TINY_CAT = dict(widths=(8, 16), depths=(1, 1), block_kinds=("mb", "mb"), expand_ratios=(2, 2),
                head_dim=4, num_classes=10)


def _mesh(data, fsdp):
  return Mesh(np.asarray(jax.devices()).reshape(data, fsdp, 1), sharding.AXES)


def _collectives(hlo: str) -> dict:
  return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
          for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")}


def test_ca_conv_runs_per_batch_shard():
  mesh = _mesh(2, 4)  # The batch over data x fsdp, 1 sample per device.
  split = NamedSharding(mesh, P(sharding.batch_axes()))
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x, w, b = (jax.device_put(jax.random.normal(k, s), split)
             for k, s in zip(keys, ((8, 18, 18, 32), (8, 3, 3, 32), (8, 32))))

  def program(impl, stride):
    def value_and_grads(x, w, b):
      with sharding.mesh_context(mesh):
        conv = lambda *a: ca_depthwise_conv(*a, stride=stride, impl=impl)
        return conv(x, w, b), jax.grad(lambda *a: jnp.sum(conv(*a) ** 2), (0, 1, 2))(x, w, b)
    return jax.jit(value_and_grads, out_shardings=split)

  for stride in (1, 2):
    pallas = program("pallas", stride)
    assert _collectives(pallas.lower(x, w, b).compile().as_text()) == {
        "all-gather": 0, "all-reduce": 0, "all-to-all": 0, "collective-permute": 0}
    got, want = pallas(x, w, b), program("xla", stride)(x, w, b)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5 * float(jnp.abs(e).max()))
  # Without a mesh context, or a batch the mesh cannot split: the plain call.
  assert sharding.context_batch_axes(8) == ()
  with sharding.mesh_context(mesh):
    assert sharding.context_batch_axes(8) == ("data", "fsdp")
    assert sharding.context_batch_axes(6) == ()


def test_batch_sharded_cat_train_step_keeps_activations_local():
  mesh = _mesh(8, 1)  # Data-parallel: any all-gather would move activations.
  split, repl = NamedSharding(mesh, P(sharding.batch_axes())), NamedSharding(mesh, P())
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, 8, 8, 4)).astype(np.float32),
           "label": rng.integers(0, 10, 8).astype(np.int32)}
  schedule = make_schedule("cosine", 1000)
  tx = optax.adam(1e-3)
  # Random values for every parameter (the weight generators too: kernels differ per sample).
  shapes = jax.eval_shape(cat(**TINY_CAT).init, jax.random.PRNGKey(0), batch["image"],
                          jnp.zeros(8), batch["label"])["params"]
  leaves, tree = jax.tree.flatten(shapes)
  params = jax.tree.unflatten(tree, [0.1 * rng.standard_normal(x.shape).astype(np.float32)
                                     for x in leaves])
  state = state_lib.TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params), {})

  def run(impl):
    model = cat(**TINY_CAT, ca_impl=impl)

    def loss_fn(p, model_state, b, key):
      model_fn = lambda x, t, y: model.apply({"params": p}, x, t, y)
      loss, _ = diffusion_loss(model_fn, b["image"], b["label"], key, schedule,
                               label_dropout=0.1, null_label=10)
      return loss, ({}, model_state)

    step_fn = state_lib.make_train_step(loss_fn, tx, 0.99, lambda s: 1e-3)

    def step(st, b, key):  # As loop.make_jitted_step traces it.
      with sharding.mesh_context(mesh):
        return step_fn(st, b, key)

    jitted = jax.jit(step, in_shardings=(repl, split, repl), out_shardings=(repl, repl))
    args = (state, jax.device_put(batch, split), jax.random.PRNGKey(1))
    return _collectives(jitted.lower(*args).compile().as_text()), jitted(*args)[1]

  counts, pallas = run("pallas")
  assert counts["all-gather"] == 0 and counts["all-to-all"] == 0, counts
  assert counts["all-reduce"] > 0  # The gradient mean over the 8 devices.
  _, xla = run("xla")
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(pallas[key], xla[key], rtol=1e-5)
