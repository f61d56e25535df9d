"""The one trainer: build (mesh, task, optimizer, state), resume, step, log, sample, checkpoint.

State is created abstractly first (`jax.eval_shape`), then initialised by a jit whose outputs are
laid out with the target shardings, so parameters are born on the devices that hold them.
"""

import dataclasses
import json
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen import data as data_lib
from jaxgen import sharding
from jaxgen import visualize
from jaxgen.errors import CheckpointError, NonFiniteLossError
from jaxgen.registry import TASKS
from jaxgen.train.checkpoint import Checkpointer, abstract_like
from jaxgen.train.optim import make_optimizer
from jaxgen.train.state import TrainState, make_train_step


@dataclasses.dataclass
class Setup:
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Any
  task: Any
  tx: Any
  lr_schedule: Any
  state: TrainState
  checkpointer: Checkpointer
  data_state: Optional[dict]  # Iterator state restored from the checkpoint (None: fresh run).

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))


def make_task(config: ml_collections.ConfigDict):
  info = data_lib.dataset_info(config.data)
  return TASKS.get(config.get("task", "diffusion"))(config, info.image_shape, info.num_classes)


def build(config: ml_collections.ConfigDict, workdir: str, *, restore: bool = True,
          require_checkpoint: bool = False) -> Setup:
  """Everything but the data iterator; restores the newest readable checkpoint when present."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.training.batch_size, mesh)
  task = make_task(config)
  # A task may own its optimizer (e.g. a GAN's two optimizers, or training only some layers).
  make_tx = getattr(task, "make_optimizer", None) or (
      lambda steps: make_optimizer(config.optimizer, steps))
  tx, lr_schedule = make_tx(config.training.steps)

  def init_state(rng):
    params, model_state = task.init(rng, None)
    return TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params), model_state)

  rng = jax.random.key_data(jax.random.PRNGKey(config.seed))
  init_fn = lambda r: init_state(jax.random.wrap_key_data(r))
  abstract = jax.eval_shape(init_fn, rng)  # Also checks that the model takes the data's shape.
  state_shardings = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
  data_state = None
  if restore and checkpointer.latest_step() is not None:
    state, data_state, step = checkpointer.restore(abstract_like(abstract, state_shardings))
    print(f"resumed from {checkpointer.directory} step {step}", flush=True)
  elif require_checkpoint:
    raise CheckpointError(f"no checkpoint in {checkpointer.directory}; train first with "
                          f"--mode=train --workdir={workdir}")
  else:
    state = jax.jit(init_fn, out_shardings=state_shardings)(rng)
    if hasattr(task, "warm_start"):  # A fresh run may start from other weights (a prior phase).
      state = task.warm_start(state)
  return Setup(config, workdir, mesh, task, tx, lr_schedule, state, checkpointer, data_state)


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step), TensorBoard events and a progress line."""

  def __init__(self, workdir: str, total_steps: int):
    self.is_writer = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total_steps = total_steps
    self.tb = None
    if self.is_writer:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self.tb = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))

  @staticmethod
  def write_tensorboard(workdir: str, step: int, scalars: dict) -> None:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    writer = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
    writer.write_scalars(step, scalars)
    writer.close()

  def write(self, step: int, scalars: dict, steps_per_sec: float, batch_size: int):
    if not self.is_writer:
      return
    scalars = dict(scalars, steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * batch_size)
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self.tb.write_scalars(step, scalars)
    self.tb.flush()
    remaining = (self.total_steps - step) / max(steps_per_sec, 1e-9)
    print(f"step {step}/{self.total_steps} | loss {scalars['loss']:.4f} | "
          f"{steps_per_sec:.2f} steps/s | {steps_per_sec * batch_size:.0f} img/s | "
          f"ETA {_fmt_duration(remaining)}", flush=True)


def _fmt_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def make_jitted_step(setup: Setup):
  step_fn = make_train_step(setup.task.loss, setup.tx, setup.config.optimizer.ema_decay,
                            setup.lr_schedule)
  repl = sharding.replicated(setup.mesh)
  state_shardings = jax.tree.map(lambda _: repl, setup.state)
  return jax.jit(step_fn, in_shardings=(state_shardings, sharding.batch_sharding(setup.mesh), repl),
                 out_shardings=(state_shardings, repl), donate_argnums=0)


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_at: Optional[int] = None) -> Setup:
  """Trains to `config.training.steps`, resuming from `workdir` when it has checkpoints.

  `stop_at` ends the run early (with a checkpoint) as if interrupted; the schedule is unchanged.
  """
  os.makedirs(workdir, exist_ok=True)
  setup = build(config, workdir)
  t = config.training
  iterator = data_lib.make_iterator(config.data, split="train", global_batch_size=t.batch_size,
                                    seed=config.seed)
  if setup.data_state:
    iterator.set_state(setup.data_state)
  if jax.process_index() == 0 and hasattr(setup.task, "write_static_visuals"):
    setup.task.write_static_visuals(workdir)
  step_fn = make_jitted_step(setup)
  rng = jax.random.PRNGKey(config.seed + 1)
  log = MetricsLog(workdir, t.steps)
  state, step = setup.state, setup.step
  pending, tic, tic_step = [], time.perf_counter(), step
  end = t.steps if stop_at is None else min(stop_at, t.steps)
  while step < end:
    batch = sharding.put_batch(next(iterator), setup.mesh)
    state, metrics = step_fn(state, batch, rng)
    step += 1
    pending.append(metrics)
    if step % t.log_every == 0 or step == end:
      host = jax.device_get(pending)
      bad = [i for i, m in enumerate(host) if not m["finite"]]
      if bad:
        first = step - len(host) + bad[0] + 1
        setup.checkpointer.wait()
        kept = (f"the last good checkpoint (step {setup.checkpointer.latest_step()}) is kept in "
                f"{setup.checkpointer.directory}" if setup.checkpointer.latest_step() is not None
                else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"loss became {host[bad[0]]['loss']} at step {first}; training stopped and {kept}. "
            "Lower optimizer.lr or enable optimizer.grad_clip, then rerun to resume.")
      now = time.perf_counter()
      mean = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "finite"}
      mean["lr"] = float(host[-1]["lr"])
      log.write(step, mean, (step - tic_step) / (now - tic), t.batch_size)
      pending, tic, tic_step = [], now, step
    if t.sample_every and (step % t.sample_every == 0 or step == t.steps):
      write_sample_grid(setup, state, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
      tic = time.perf_counter()  # Do not count sampling time as training time.
    if step % config.checkpoint.every == 0 or step == end:
      setup.checkpointer.save(step, state, iterator.get_state(), config, force=True)
  setup.checkpointer.close()
  if jax.process_index() == 0:
    visualize.plot_loss(os.path.join(workdir, "loss.png"), log.path)
  setup.state = state
  return setup


def generate(setup: Setup, labels: np.ndarray, *, seed: int, use_ema: bool = True,
             state: Optional[TrainState] = None) -> np.ndarray:
  """Generates images for `labels` in batches of `config.sample.batch_size` over the mesh."""
  state = setup.state if state is None else state
  params = state.ema_params if use_ema else state.params
  batch = setup.config.sample.batch_size
  batch -= batch % sharding.num_batch_shards(setup.mesh)
  repl, split = sharding.replicated(setup.mesh), sharding.batch_sharding(setup.mesh)
  gen = jax.jit(setup.task.generate, in_shardings=(repl, repl, repl, split), out_shardings=split)
  out = []
  for i, start in enumerate(range(0, len(labels), batch)):
    chunk = np.asarray(labels[start:start + batch], np.int32)
    padded = np.concatenate([chunk, np.zeros(batch - len(chunk), np.int32)])
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), i)
    images = gen(params, state.model_state, rng, jax.device_put(padded, split))
    out.append(np.asarray(jax.device_get(images))[:len(chunk)])
  return np.concatenate(out)


def class_labels(num_classes: int, per_class: int) -> np.ndarray:
  return np.repeat(np.arange(num_classes), per_class).astype(np.int32)


def write_sample_grid(setup: Setup, state: TrainState, path: str, per_class: int = 8) -> None:
  if hasattr(setup.task, "write_sample_grid"):  # Tasks that do not generate from labels.
    setup.task.write_sample_grid(setup, state, path)
    return
  labels = class_labels(setup.task.num_classes, per_class)
  images = visualize.to_uint8(generate(setup, labels, seed=0, state=state))
  if jax.process_index() == 0:
    visualize.save_class_grid(path, images, labels, setup.task.num_classes)

