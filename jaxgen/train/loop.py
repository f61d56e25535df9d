"""The one trainer: build (mesh, task, optimizer, state), resume, step, log, sample, checkpoint.

State is created abstractly first (`jax.eval_shape`), its shardings are derived from that
(`sharding.state_shardings`: FSDP over the `fsdp` mesh axis, logical rules for annotated
modules), then it is initialised by a jit whose outputs are laid out with those shardings, so
parameters are born on the devices that hold them (never a full copy on one device first).
A restore uses the same target shardings, so a checkpoint written on one topology (8 devices,
FSDP) is read back on another (4 devices, 1 device, data-parallel).
"""

import dataclasses
import json
import os
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgen import data as data_lib
from jaxgen import distributed
from jaxgen import sharding
from jaxgen import visualize
from jaxgen.errors import CheckpointError, ConfigError, NonFiniteLossError
from jaxgen.registry import TASKS
from jaxgen.train import init_from
from jaxgen.train import precision
from jaxgen.train import throughput
from jaxgen.train.checkpoint import Checkpointer, abstract_like
from jaxgen.train.optim import make_optimizer
from jaxgen.train.preemption import PreemptionGuard
from jaxgen.train.state import TrainState, make_train_step
from jaxgen.train.tensorboard import ScalarWriter


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
  state_shardings: Any = None  # Same tree as `state`: NamedShardings on `mesh`.
  preempted: bool = False     # train() stopped early on SIGTERM (after saving).

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state.step))


def make_task(config: ml_collections.ConfigDict):
  info = data_lib.dataset_info(config.data)
  task = TASKS.get(config.get("task", "diffusion"))(config, info.image_shape, info.num_classes)
  return precision.with_compute_dtype(task, precision.compute_dtype(config.training))


def check_batch(config: ml_collections.ConfigDict, mesh) -> None:
  """The global batch must split into grad_accum_steps microbatches spread over all shards."""
  t = config.training
  k = int(t.get("grad_accum_steps", 1))
  if k < 1:
    raise ConfigError(f"training.grad_accum_steps must be >= 1, got {k}")
  sharding.check_batch_size(t.batch_size, mesh)
  shards = sharding.num_batch_shards(mesh)
  if (t.batch_size // shards) % k:
    raise ConfigError(
        f"training.batch_size {t.batch_size} over {shards} batch shards is "
        f"{t.batch_size // shards} examples per shard, not divisible by "
        f"training.grad_accum_steps={k}; change either")


def build(config: ml_collections.ConfigDict, workdir: str, *, restore: bool = True,
          require_checkpoint: bool = False) -> Setup:
  """Everything but the data iterator; restores the newest readable checkpoint when present."""
  distributed.initialize(config)  # No-op on one process; must precede any device use.
  mesh = sharding.make_mesh(config.mesh)
  check_batch(config, mesh)
  task = make_task(config)
  # A task may own its optimizer (e.g. a GAN's two optimizers, or training only some layers).
  make_tx = getattr(task, "make_optimizer", None) or (
      lambda steps: make_optimizer(config.optimizer, steps))
  tx, lr_schedule = make_tx(config.training.steps)

  def init_boxed(rng):
    """(params as the modules made them, TrainState). Modules may box parameters with logical
    axis names (nn.with_logical_partitioning); the state holds plain arrays."""
    boxed, model_state = task.init(jax.random.wrap_key_data(rng), None)
    params, model_state = nn.unbox((boxed, model_state))
    return boxed, TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params),
                             model_state)

  rng = jax.random.key_data(jax.random.PRNGKey(config.seed))
  init_fn = lambda r: init_boxed(r)[1]
  # Also checks that the model takes the data's shape.
  abstract_boxed, abstract = jax.eval_shape(init_boxed, rng)
  state_shardings = make_state_shardings(config, mesh, tx, abstract_boxed, abstract)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
  data_state = None
  if restore and checkpointer.latest_step() is not None:
    state, data_state, step = checkpointer.restore(abstract_like(abstract, state_shardings))
    if jax.process_index() == 0:
      print(f"resumed from {checkpointer.directory} step {step}", flush=True)
    init_from.note_resumed(config, checkpointer.directory, step)
  elif require_checkpoint:
    raise CheckpointError(f"no checkpoint in {checkpointer.directory}; train first with "
                          f"--mode=train --workdir={workdir}")
  else:
    state = jax.jit(init_fn, out_shardings=state_shardings)(rng)
    if hasattr(task, "warm_start"):  # A fresh run may start from other weights (a prior phase).
      state = task.warm_start(state)
    state = init_from.warm_start(config, task, state)  # model.init_from: published weights.
  return Setup(config, workdir, mesh, task, tx, lr_schedule, state, checkpointer, data_state,
               state_shardings)


def make_state_shardings(config, mesh, tx, abstract_boxed_params, abstract):
  """Target layout of the train state on `mesh` (see jaxgen/sharding.py)."""
  rules = sharding.logical_rules(config.mesh)
  min_size = int(config.mesh.get("min_shard_size", sharding.DEFAULT_MIN_SHARD_SIZE))
  layout = sharding.param_shardings(abstract_boxed_params, mesh, rules, min_size)
  return sharding.state_shardings(abstract, mesh, tx=tx, param_layout=layout, min_size=min_size)


def memory_report(setup: Setup, temp_bytes: Optional[int] = None) -> str:
  """Per-device bytes of params, optimizer state, EMA (and the step's scratch memory)."""
  st, sh = setup.state, setup.state_shardings
  parts = [("params", st.params, sh.params), ("opt state", st.opt_state, sh.opt_state),
           ("EMA", st.ema_params, sh.ema_params), ("model state", st.model_state,
                                                   sh.model_state)]
  sizes = [(name, sharding.bytes_per_device(tree, shard)) for name, tree, shard in parts]
  total = sum(b for _, b in sizes)
  text = " + ".join(f"{name} {throughput.fmt_bytes(b)}" for name, b in sizes if b)
  line = (f"memory per device: {text} = {throughput.fmt_bytes(total)} of state "
          f"(unsharded: {throughput.fmt_bytes(sharding.tree_bytes(st))})")
  if temp_bytes is not None:
    line += f"; train step scratch {throughput.fmt_bytes(temp_bytes)} (XLA memory analysis)"
  return line


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step), TensorBoard events and a progress line."""

  def __init__(self, workdir: str, total_steps: int, start_step: Optional[int] = None,
               meter: Optional[throughput.Throughput] = None):
    """`start_step`: the step a run starts from; rows logged after it by a killed run go."""
    self.is_writer = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.total_steps = total_steps
    self.meter = meter
    self.tb = None
    if self.is_writer:
      if start_step is not None and os.path.exists(self.path):
        self._truncate(start_step)
      self.tb = ScalarWriter(os.path.join(workdir, "tensorboard"))

  def _truncate(self, step: int) -> None:
    """Keeps rows up to `step`: metrics.jsonl stays one trajectory across kills and resumes."""
    with open(self.path) as f:
      rows = [line for line in f if line.strip()]
    keep = []
    for line in rows:
      try:
        if json.loads(line)["step"] <= step:
          keep.append(line)
      except (ValueError, KeyError):
        pass  # A line half-written when the process was killed.
    if len(keep) != len(rows):
      with open(self.path + ".tmp", "w") as f:
        f.writelines(keep)
      os.replace(self.path + ".tmp", self.path)

  @staticmethod
  def write_tensorboard(workdir: str, step: int, scalars: dict) -> None:
    writer = ScalarWriter(os.path.join(workdir, "tensorboard"))
    writer.write_scalars(step, scalars)
    writer.close()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()
      self.tb = None

  def write(self, step: int, scalars: dict, steps_per_sec: float, batch_size: int):
    if not self.is_writer:
      return
    meter = self.meter or throughput.Throughput(None, batch_size, "float32", "")
    scalars = dict(scalars, **meter.scalars(steps_per_sec))
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self.tb.write_scalars(step, scalars)
    self.tb.flush()
    remaining = (self.total_steps - step) / max(steps_per_sec, 1e-9)
    extra = ""
    if "tflops_per_device" in scalars:
      extra += f" | {scalars['tflops_per_device']:.3g} TFLOP/s/device"
    if "mfu" in scalars:
      extra += f" | MFU {100 * scalars['mfu']:.1f}%"
    print(f"step {step}/{self.total_steps} | loss {scalars['loss']:.4f} | "
          f"{steps_per_sec:.2f} steps/s | {scalars['images_per_sec']:.0f} img/s{extra} | "
          f"ETA {_fmt_duration(remaining)}", flush=True)


def _fmt_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def make_jitted_step(setup: Setup):
  """The jitted train step with the state's shardings in and out (donated)."""
  t = setup.config.training
  mesh = setup.mesh
  step_fn = make_train_step(
      setup.task.loss, setup.tx, setup.config.optimizer.ema_decay, setup.lr_schedule,
      grad_accum_steps=int(t.get("grad_accum_steps", 1)), remat=str(t.get("remat", "none")),
      micro_sharding=NamedSharding(mesh, P(None, sharding.batch_axes())),
      grad_shardings=setup.state_shardings.params)
  rules = sharding.logical_rules(setup.config.mesh)

  def step_with_rules(state, batch, rng):
    # Modules that name activation / parameter axes resolve them with the config's rules;
    # custom kernels run per batch shard of the mesh (sharding.mesh_context).
    with nn.logical_axis_rules(rules), sharding.mesh_context(mesh):
      return step_fn(state, batch, rng)

  repl = sharding.replicated(mesh)
  return jax.jit(step_with_rules,
                 in_shardings=(setup.state_shardings, sharding.batch_sharding(mesh), repl),
                 out_shardings=(setup.state_shardings, repl), donate_argnums=0)


def compile_step(setup: Setup, step_jit, state, batch, rng):
  """Compiles the step ahead of its first call; prints the memory estimate and FLOPs."""
  compiled = step_jit.lower(state, batch, rng).compile()
  flops = throughput.compiled_flops(compiled)
  if jax.process_index() == 0:
    print(memory_report(setup, throughput.compiled_temp_bytes(compiled)), flush=True)
    dtype = setup.config.training.get("compute_dtype", "float32")
    meter = throughput.Throughput(flops, setup.config.training.batch_size, dtype)
    peak = f"{meter.peak:g} TFLOP/s {dtype} peak" if meter.peak else "peak unknown: no MFU"
    print(f"train step: {throughput.describe_flops(flops)} per device per step; "
          f"{jax.device_count()} x {meter.device_kind} ({peak}); mesh {dict(setup.mesh.shape)}",
          flush=True)
  return compiled, flops


def train(config: ml_collections.ConfigDict, workdir: str,
          stop_at: Optional[int] = None) -> Setup:
  """Trains to `config.training.steps`, resuming from `workdir` when it has checkpoints.

  `stop_at` ends the run early (with a checkpoint) as if interrupted; the schedule is unchanged.
  A SIGTERM ends it the same way after the current step (`setup.preempted` is then True).
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
  step_jit = make_jitted_step(setup)
  rng = jax.device_put(jax.random.PRNGKey(config.seed + 1), sharding.replicated(setup.mesh))
  # Same layout as the compiled step expects (a no-op unless a task's warm start moved arrays).
  state, step = jax.device_put(setup.state, setup.state_shardings), setup.step
  end = t.steps if stop_at is None else min(stop_at, t.steps)
  step_fn, flops = step_jit, None
  batch = None
  if step < end:
    batch = sharding.put_batch(next(iterator), setup.mesh)
    step_fn, flops = compile_step(setup, step_jit, state, batch, rng)
  meter = throughput.Throughput(flops, t.batch_size, t.get("compute_dtype", "float32"))
  log = MetricsLog(workdir, t.steps, start_step=step, meter=meter)
  pending, tic, tic_step = [], time.perf_counter(), step
  saved = setup.checkpointer.latest_step()
  with PreemptionGuard() as guard:
    while step < end:
      if batch is None:
        batch = sharding.put_batch(next(iterator), setup.mesh)
      state, metrics = step_fn(state, batch, rng)
      batch = None
      step += 1
      setup.checkpointer.announce()  # Logs an async checkpoint that has landed since.
      pending.append(metrics)
      preempted = config.checkpoint.get("save_on_preemption", True) and guard.should_stop(step)
      if step % t.log_every == 0 or step == end or preempted:
        host = jax.device_get(pending)
        bad = [i for i, m in enumerate(host) if not m["finite"]]
        if bad:
          first = step - len(host) + bad[0] + 1
          setup.checkpointer.wait()
          kept = (f"the last good checkpoint (step {setup.checkpointer.latest_step()}) is kept "
                  f"in {setup.checkpointer.directory}"
                  if setup.checkpointer.latest_step() is not None
                  else "no checkpoint had been written yet")
          raise NonFiniteLossError(
              f"loss became {host[bad[0]]['loss']} at step {first}; training stopped and "
              f"{kept}. Lower optimizer.lr or enable optimizer.grad_clip, then rerun to resume.")
        now = time.perf_counter()
        mean = {k: float(np.mean([m[k] for m in host])) for k in host[0] if k != "finite"}
        mean["lr"] = float(host[-1]["lr"])
        log.write(step, mean, (step - tic_step) / (now - tic), t.batch_size)
        pending, tic, tic_step = [], now, step
      if preempted:
        if saved != step:
          setup.checkpointer.save(step, state, iterator.get_state(), config, force=True)
        setup.checkpointer.wait()  # Synchronous: the process may be killed right after.
        setup.preempted = True
        if jax.process_index() == 0:
          print(f"preempted (SIGTERM) after step {step}: saved a checkpoint in "
                f"{setup.checkpointer.directory}; rerun the same command to resume", flush=True)
        break
      if t.sample_every and (step % t.sample_every == 0 or step == t.steps):
        write_sample_grid(setup, state, os.path.join(workdir, "samples", f"step_{step:07d}.png"))
        tic = time.perf_counter()  # Do not count sampling time as training time.
      if step % config.checkpoint.every == 0 or step == end:
        setup.checkpointer.save(step, state, iterator.get_state(), config, force=True)
        saved = step
  setup.checkpointer.close()
  log.close()
  if jax.process_index() == 0 and os.path.exists(log.path):
    visualize.plot_loss(os.path.join(workdir, "loss.png"), log.path)
  setup.state = state
  return setup


def generate(setup: Setup, labels: np.ndarray, *, seed: int, use_ema: bool = True,
             state: Optional[TrainState] = None) -> np.ndarray:
  """Generates images for `labels` in batches of `config.sample.batch_size` over the mesh."""
  state = setup.state if state is None else state
  params = state.ema_params if use_ema else state.params
  runner = sharding.BatchRunner(setup.mesh, setup.config.sample.batch_size)
  # Weights keep their (possibly FSDP) layout: None = the argument's own sharding.
  gen = jax.jit(setup.task.generate, in_shardings=(None, None, runner.repl, runner.split),
                out_shardings=runner.split)
  return runner.map(
      lambda i, batch: gen(params, state.model_state, sharding.batch_rng(seed, i), batch),
      np.asarray(labels, np.int32))


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

