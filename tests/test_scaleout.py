"""Scale-out on 8 CPU devices: FSDP / data-parallel / mixed meshes give the same training,
checkpoints move across topologies, gradient accumulation, remat, bf16, multi-host start-up,
launch scripts and throughput accounting."""

import json
import os
import re
import shutil
import struct
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from tensorboard.compat.proto import event_pb2

from jaxgen import distributed
from jaxgen import sharding
from jaxgen.config import load_config
from jaxgen.errors import ConfigError
from jaxgen.train import loop
from jaxgen.train import state as state_lib
from jaxgen.train import throughput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs/unet_mnist.py:smoke")
# A one-level U-Net without attention: the same pipeline, a fraction of the compile time.
TINY = ("model.channel_mult=(1,)", "model.attention_levels=()", "training.log_every=1",
        "training.steps=5", "checkpoint.every=100", "mesh.min_shard_size=0")
# name -> overrides (mesh axes; num_devices 0 = all 8). Pure data parallelism over 8 devices
# against one device is tests/test_train.py::test_sharded_equals_single_device.
MESHES = {
    "single": ("mesh.num_devices=1",),
    "fsdp8": ("mesh.data=1", "mesh.fsdp=8"),
    "data2_fsdp4": ("mesh.data=2", "mesh.fsdp=4"),
    "data2_fsdp2_tensor2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
}


def tiny_config(*overrides):
  return load_config(SMOKE, list(TINY) + list(overrides))


def read_events(logdir):
  """Summary events of the TFRecord-framed event files in `logdir` (CRCs not checked)."""
  events = []
  for name in sorted(os.listdir(logdir)):
    data = open(os.path.join(logdir, name), "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("summary"):
        events.append(event)
  return events


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The single-device run trains 5 steps; the 8-device meshes stop (with a checkpoint) at 3."""
  root = tmp_path_factory.mktemp("scaleout")
  out = {}
  for name, mesh in MESHES.items():
    workdir = str(root / name)
    setup = loop.train(tiny_config(*mesh), workdir, stop_at=None if name == "single" else 3)
    out[name] = (workdir, setup, read_losses(workdir))
  return out


def test_meshes_agree(runs):
  assert jax.device_count() == 8
  ref_setup, ref = runs["single"][1], runs["single"][2]
  assert ref_setup.mesh.devices.size == 1 and sorted(ref) == [1, 2, 3, 4, 5]
  for name in ("fsdp8", "data2_fsdp4", "data2_fsdp2_tensor2"):
    _, setup, losses = runs[name]
    assert setup.mesh.devices.size == 8 and sorted(losses) == [1, 2, 3]
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)],
                               rtol=1e-5, atol=1e-6, err_msg=name)


def test_fsdp_shards_params_and_adam_state(runs):
  setup = runs["fsdp8"][1]
  state, shardings = setup.state, setup.state_shardings
  leaves = jax.tree.leaves(state.params)
  sharded = [x for x in leaves if sharding.is_sharded(x.sharding)]
  # min_shard_size=0: every leaf with a dimension divisible by 8 is split (not conv_out's bias).
  assert [id(x) for x in sharded] == [id(x) for x in leaves if any(d % 8 == 0 for d in x.shape)]
  assert sum(x.nbytes for x in sharded) > 0.99 * sum(x.nbytes for x in leaves)
  device = jax.devices()[0]
  on_device = sum(s.data.nbytes for x in sharded for s in x.addressable_shards
                  if s.device == device)
  total = sum(x.nbytes for x in sharded)
  assert on_device <= total / 8 * 1.3, (on_device, total)
  unsharded = sum(x.nbytes for x in leaves if not sharding.is_sharded(x.sharding))
  assert sharding.bytes_per_device(state.params, shardings.params) == on_device + unsharded
  # Adam's moments follow their parameter's layout; EMA too.
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(x)][0]
  for p, mu, nu, ema in zip(leaves, jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu),
                            jax.tree.leaves(state.ema_params)):
    assert mu.sharding == nu.sharding == ema.sharding == p.sharding
  # The mixed mesh splits over its 4 fsdp devices and keeps 2 copies (one per data row).
  mixed = runs["data2_fsdp4"][1].state.params["conv_in"]["kernel"]
  assert mixed.sharding.spec == P(None, None, None, "fsdp")
  assert mixed.addressable_shards[0].data.shape[-1] == mixed.shape[-1] // 4
  # fsdp 2 x tensor 2: each weight split both ways, ~1/4 of the parameters per device.
  setup = runs["data2_fsdp2_tensor2"][1]
  specs = [x.sharding.spec for x in jax.tree.leaves(setup.state.params)]
  assert any({"fsdp", "tensor"} <= set(s) for s in specs), specs
  per_device = sharding.bytes_per_device(setup.state.params, setup.state_shardings.params)
  assert per_device <= sharding.tree_bytes(setup.state.params) / 4 * 1.3


@pytest.mark.parametrize("devices,mesh", [(4, ("mesh.data=1", "mesh.fsdp=4")),
                                          (1, ("mesh.num_devices=1",))])
def test_checkpoint_from_8_devices_restores_on_fewer(runs, tmp_path, devices, mesh):
  src, saved, _ = runs["fsdp8"]
  workdir = str(tmp_path / "w")
  shutil.copytree(os.path.join(src, "checkpoints"), os.path.join(workdir, "checkpoints"))
  if devices == 4:
    mesh = mesh + ("mesh.num_devices=4",)
  restored = loop.build(tiny_config(*mesh), workdir)
  assert restored.step == 3 and restored.mesh.devices.size == devices
  for a, b in zip(jax.tree.leaves(saved.state), jax.tree.leaves(restored.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(b.sharding.device_set) == devices
  loop.train(tiny_config(*mesh), workdir)  # Continues to step 5 on the new topology.
  losses, ref = read_losses(workdir), runs["single"][2]
  np.testing.assert_allclose([losses[4], losses[5]], [ref[4], ref[5]], rtol=1e-5, atol=1e-6)


def test_shape_spec_rules():
  assert sharding.shape_spec((3, 3, 16, 32), 8, 0) == P(None, None, None, "fsdp")
  assert sharding.shape_spec((64, 16), 8, 0) == P("fsdp")
  assert sharding.shape_spec((8, 8), 8, 0) == P(None, "fsdp")  # Ties: the last dimension.
  assert sharding.shape_spec((3, 5), 8, 0) == P()  # Nothing divisible: replicated.
  assert sharding.shape_spec((64, 16), 8, 2048) == P()  # Smaller than min_shard_size.
  assert sharding.shape_spec((64, 16), 1, 0) == P()  # No fsdp axis.
  # Tensor first, on the hidden dimension of an MLP's kernels (columns in, rows out), then fsdp.
  assert sharding.shape_spec((64, 256), 4, 0, tensor_size=2) == P("fsdp", "tensor")
  assert sharding.shape_spec((256, 64), 4, 0, tensor_size=2) == P("tensor", "fsdp")
  assert sharding.shape_spec((3, 3, 16, 32), 1, 0, tensor_size=2) == P(None, None, None,
                                                                       "tensor")
  assert sharding.shape_spec((6,), 4, 0, tensor_size=2) == P("tensor")  # 6 % 4: no fsdp.


def test_batch_runner_pads_splits_and_drops_padding():
  mesh = sharding.make_mesh(tiny_config("mesh.data=2", "mesh.fsdp=4").mesh)
  runner = sharding.BatchRunner(mesh, 13)  # Rounded down to the 8 batch shards.
  assert runner.batch == 8
  inputs = {"x": np.arange(20, dtype=np.float32).reshape(10, 2), "k": np.arange(10)}
  seen, done = [], []

  compute = jax.jit(lambda b, i: {"y": b["x"] * 2 + b["k"][:, None],
                                   "i": jnp.full(b["k"].shape, i)})

  def fn(i, batch):
    seen.append((i, batch["x"].shape, batch["x"].sharding.spec))
    return compute(batch, i)

  out = runner.map(fn, inputs, progress=done.append)
  np.testing.assert_array_equal(out["y"], inputs["x"] * 2 + inputs["k"][:, None])
  np.testing.assert_array_equal(out["i"], [0] * 8 + [1] * 2)
  assert [s[:2] for s in seen] == [(0, (8, 2)), (1, (8, 2))]  # One shape: one compilation.
  assert seen[0][2] == P(("data", "fsdp"))
  assert done == [8, 2]
  with pytest.raises(ValueError, match="9 rows"):
    runner.put(np.zeros((9, 2)))


def test_logically_annotated_params_follow_config_rules():

  class Annotated(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(64, kernel_init=nn.with_logical_partitioning(
          nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
      return nn.Dense(8, name="plain")(x)

  mesh = sharding.make_mesh(load_config(SMOKE, ["mesh.data=1", "mesh.fsdp=4",
                                                "mesh.tensor=2"]).mesh)
  boxed = jax.eval_shape(Annotated().init, jax.random.PRNGKey(0), jnp.zeros((1, 16)))["params"]
  rules = sharding.logical_rules(load_config(SMOKE).mesh)
  layout = sharding.param_shardings(boxed, mesh, rules, min_size=0)
  assert layout["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
  # (64, 8), not annotated: the shape rule, tensor on the largest dimension, then fsdp.
  assert layout["plain"]["kernel"].spec == P("tensor", "fsdp")
  with pytest.raises(ConfigError, match="not a mesh axis"):
    sharding.logical_rules({"rules": (("embed", "model"),)})


def _regression_problem(mesh):
  """A 2-layer MLP regression whose loss is a mean over examples (no rng, no batch stats)."""
  model = nn.Sequential([nn.Dense(32), nn.gelu, nn.Dense(4)])
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16)))["params"]
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(32, 16)).astype(np.float32),
           "y": rng.normal(size=(32, 4)).astype(np.float32)}

  def loss_fn(p, model_state, b, rng):
    del rng
    loss = jnp.mean((model.apply({"params": p}, b["x"]) - b["y"]) ** 2)
    return loss, ({"mse": loss}, model_state)

  tx = optax.adamw(1e-2)
  st = state_lib.TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params), {})
  put = lambda t: jax.device_put(t, NamedSharding(mesh, P(("data", "fsdp"))))
  return loss_fn, tx, st, put(batch)


def _run_steps(loss_fn, tx, st, batch, n=2, **kwargs):
  step = jax.jit(state_lib.make_train_step(loss_fn, tx, 0.999, lambda s: 1e-2, **kwargs))
  losses = []
  for _ in range(n):
    st, metrics = step(st, batch, jax.random.PRNGKey(0))
    losses.append(float(metrics["loss"]))
  return st, losses


def test_grad_accumulation_equals_the_whole_batch():
  mesh = sharding.make_mesh(load_config(SMOKE, ["mesh.data=2", "mesh.fsdp=4"]).mesh)
  loss_fn, tx, st, batch = _regression_problem(mesh)  # Batch 32: 4 rows per device.
  full, full_losses = _run_steps(loss_fn, tx, st, batch)
  grads = jax.tree.map(lambda x: NamedSharding(mesh, P()), st.params)
  accum, accum_losses = _run_steps(
      loss_fn, tx, st, batch, grad_accum_steps=4,  # 4 microbatches of 8.
      micro_sharding=NamedSharding(mesh, P(None, ("data", "fsdp"))), grad_shardings=grads)
  np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  # Microbatch i holds rows i, i+4, ...: each device contributes one row to each.
  micro = state_lib.microbatches({"x": np.arange(32)}, 4)["x"]
  assert micro[1].tolist() == list(range(1, 32, 4))


def test_remat_does_not_change_the_step():
  mesh = sharding.make_mesh(load_config(SMOKE, ["mesh.num_devices=1"]).mesh)
  loss_fn, tx, st, batch = _regression_problem(mesh)
  ref, ref_losses = _run_steps(loss_fn, tx, st, batch)
  for policy in ("dots", "full"):
    out, losses = _run_steps(loss_fn, tx, st, batch, remat=policy)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(out.params)):
      np.testing.assert_allclose(a, b, atol=1e-6)
  with pytest.raises(ConfigError, match="training.remat"):
    state_lib.make_train_step(loss_fn, tx, 0.999, lambda s: 0.0, remat="some")


def test_bf16_accumulation_remat_run_with_throughput_and_memory(tmp_path, capsys):
  workdir = str(tmp_path)
  setup = loop.train(tiny_config("training.compute_dtype=bfloat16", "training.grad_accum_steps=2",
                                 "training.remat=dots", "mesh.num_devices=2", "mesh.data=1",
                                 "mesh.fsdp=2", "training.steps=2"), workdir)
  out = capsys.readouterr().out
  assert setup.task.model.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(setup.state.params))  # Master.
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert r["images_per_sec"] > 0 and r["tflops_per_device"] > 0 and "mfu" not in r  # cpu.
  assert all(np.isfinite(r["loss"]) for r in rows)
  # The step's convolutions run in bf16 (inside a scan over 2 microbatches).
  split = sharding.batch_sharding(setup.mesh)
  batch = {"image": jax.ShapeDtypeStruct((16, 28, 28, 1), jnp.float32, sharding=split),
           "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=split)}
  hlo = loop.make_jitted_step(setup).lower(setup.state, batch, jax.random.PRNGKey(0)).as_text()
  convs = re.findall(r"stablehlo.convolution.*", hlo)
  assert convs and all("bf16" in c for c in convs) and "stablehlo.while" in hlo
  # TensorBoard events (written without TensorFlow) hold the same scalars.
  events = read_events(os.path.join(workdir, "tensorboard"))
  assert [e.step for e in events] == [1, 2]
  assert {v.tag for v in events[0].summary.value} >= {"loss", "images_per_sec",
                                                     "tflops_per_device"}
  assert "memory per device: params" in out and "train step scratch" in out
  assert "TFLOP/s/device" in out and "GFLOP per device per step" in out
  with pytest.raises(ConfigError, match="grad_accum_steps"):
    loop.build(tiny_config("training.grad_accum_steps=3"), str(tmp_path / "bad"))
  with pytest.raises(ConfigError, match="compute_dtype"):
    loop.build(tiny_config("training.compute_dtype=float16"), str(tmp_path / "bad"))


def test_peak_table_and_mfu():
  assert throughput.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
  assert throughput.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
  assert throughput.peak_tflops("NVIDIA H200", "bfloat16") == 989.4
  assert throughput.peak_tflops("NVIDIA A100-SXM4-80GB", "float32") == 156.0
  assert throughput.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert throughput.peak_tflops("TPU v5", "bfloat16") == 459.0
  assert throughput.peak_tflops("TPU v4", "bfloat16") == 275.0
  assert throughput.peak_tflops("cpu", "bfloat16") is None
  meter = throughput.Throughput(2e12, 256, "bfloat16", "NVIDIA H100 80GB HBM3")
  s = meter.scalars(100.0)
  assert s["images_per_sec"] == 25600 and s["tflops_per_device"] == 200.0
  assert s["mfu"] == pytest.approx(200.0 / 989.4)


def test_distributed_resolve_from_config_and_environment():
  cfg = lambda *o: load_config(SMOKE, list(o)).mesh
  assert distributed.resolve(cfg(), {}) is None  # One process: nothing to do.
  plan = distributed.resolve(cfg("mesh.coordinator_address=10.0.0.1:1234",
                                 "mesh.num_processes=4", "mesh.process_id=3"), {})
  assert plan["source"] == "config" and plan["kwargs"] == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
  with pytest.raises(ConfigError, match="num_processes"):
    distributed.resolve(cfg("mesh.coordinator_address=h:1"), {})
  env = {"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
         "JAX_LOCAL_DEVICE_IDS": "2,3"}
  assert distributed.resolve(cfg(), env)["kwargs"] == {
      "coordinator_address": "h0:99", "num_processes": 2, "process_id": 1,
      "local_device_ids": [2, 3]}
  with pytest.raises(ConfigError, match="JAX_PROCESS_ID"):
    distributed.resolve(cfg(), {"JAX_COORDINATOR_ADDRESS": "h0:99"})
  slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_NTASKS": "32",
           "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
  plan = distributed.resolve(cfg(), slurm)
  assert plan["source"] == "slurm" and plan["kwargs"] == {}  # JAX reads SLURM_* itself.
  assert (plan["num_processes"], plan["process_id"]) == (32, 9)
  assert distributed.resolve(cfg(), dict(slurm, SLURM_NTASKS="1")) is None  # One task.
  assert distributed.resolve(cfg("mesh.distributed=off"), slurm) is None
  tpu = {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "2"}
  assert distributed.resolve(cfg(), tpu)["source"] == "tpu"
  assert distributed.resolve(cfg(), {"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert distributed.resolve(cfg("mesh.distributed=on"), {})["source"] == "auto"
  ompi = {"OMPI_MCA_orte_hnp_uri": "1.2.3.4", "OMPI_COMM_WORLD_SIZE": "2",
          "OMPI_COMM_WORLD_RANK": "0"}
  assert distributed.resolve(cfg(), ompi)["source"] == "ompi"
  assert distributed.initialize(load_config(SMOKE), env={}) is None  # A no-op here.


def test_launch_scripts_are_valid_bash_with_usage():
  launch = os.path.join(ROOT, "launch")
  scripts = ["tpu_pod.sh", "gpu_single_host.sh", "slurm_multinode.sbatch"]
  readme = open(os.path.join(launch, "README.md")).read()
  for name in scripts:
    path = os.path.join(launch, name)
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    head = open(path).read()[:3000]
    assert "Usage" in head and name in readme


def test_launch_dry_runs_print_the_per_host_commands():
  """DRY_RUN=1: each script prints what it would run (no gcloud / srun / training started)."""
  launch = os.path.join(ROOT, "launch")
  args = ["--", "--config=configs/unet_mnist.py:smoke", "--workdir=w"]

  def dry(script, *argv, **env):
    proc = subprocess.run(["bash", os.path.join(launch, script), *argv], capture_output=True,
                          text=True, check=False, env=dict(os.environ, DRY_RUN="1", **env))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()

  tpu = dry("tpu_pod.sh", "run", *args, TPU_NAME="t", HEARTBEAT_TIMEOUT_S="77")
  assert len(tpu) == 1 and "ssh t" in tpu[0] and "--worker=all" in tpu[0]
  assert "--config.mesh.distributed=on" in tpu[0]
  assert "--config.mesh.heartbeat_timeout_s=77" in tpu[0]
  assert "--config.mesh.init_timeout_s=900" in tpu[0]
  assert [line.split()[0] for line in dry("tpu_pod.sh", "all", *args)] == [
      "gcloud", "tar", "gcloud", "gcloud", "gcloud", "mkdir", "gcloud"]
  gpu = dry("gpu_single_host.sh", "--procs=2", *args, PORT="1234")
  assert len(gpu) == 2
  for i, line in enumerate(gpu):
    assert f"JAX_PROCESS_ID={i}" in line and "JAX_COORDINATOR_ADDRESS=localhost:1234" in line
    assert "JAX_NUM_PROCESSES=2" in line and "--workdir=w" in line
  slurm = dry("slurm_multinode.sbatch", *args[1:], HEARTBEAT_TIMEOUT_S="60")
  assert slurm[0].startswith("srun --kill-on-bad-exit=1")
  assert "--config.mesh.heartbeat_timeout_s=60" in slurm[0]
