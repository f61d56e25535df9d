"""Mixed precision: `training.compute_dtype` runs the forward and backward in bfloat16.

Parameters, optimizer state and EMA stay float32 (the master weights); the backbone is cloned
with its flax `dtype` (the computation dtype of every layer; `param_dtype` stays float32), so
each layer casts its float32 weights and inputs to bfloat16 on the fly. Normalisation layers
still reduce in float32 (flax computes their statistics in at least float32), and the loss is
taken in float32 because bfloat16 outputs promote against float32 targets.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from jaxgen.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(training_config) -> jnp.dtype:
  name = str(training_config.get("compute_dtype", "float32"))
  if name not in DTYPES:
    raise ConfigError(f"training.compute_dtype {name!r} unknown; use one of {sorted(DTYPES)}")
  return DTYPES[name]


def with_compute_dtype(task, dtype) -> object:
  """Sets the computation dtype of the task's trained model (`task.model`); returns the task.

  A task can take over with a `set_compute_dtype(dtype)` method (e.g. a GAN with two models).
  """
  if dtype == jnp.float32:
    return task
  if hasattr(task, "set_compute_dtype"):
    task.set_compute_dtype(dtype)
    return task
  model = getattr(task, "model", None)
  fields = {f.name for f in dataclasses.fields(model)} if isinstance(model, nn.Module) else ()
  if "dtype" not in fields:
    raise ConfigError(f"training.compute_dtype={jnp.dtype(dtype).name}: the model "
                      f"{type(model).__name__} has no `dtype` field to compute in; "
                      "use training.compute_dtype=float32")
  task.model = model.clone(dtype=dtype)
  return task
