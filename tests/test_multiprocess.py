"""Real multi-process training on localhost: JAX's distributed runtime (coordinator on
127.0.0.1, CPU collectives over gloo), each process with 4 of the 8 CPU devices, the way
launch/gpu_single_host.sh --procs=N starts them.

One scenario, reused by the tests below (a 2-process start costs ~30-60 s on this machine):

1. 2 processes x 4 devices train the tiny smoke U-Net on an FSDP mesh spanning both processes
   (mesh.data=1, mesh.fsdp=8: parameters, Adam state and batch split over all 8 devices);
   process 1 is SIGKILLed once the step-4 checkpoint is complete; process 0 must then end,
   non-zero, within about the (test-sized) heartbeat timeout;
2. one process (this pytest process, 8 devices, data-parallel) resumes the 2-process checkpoint
   and trains step 5 (`stop_at`, with a checkpoint);
3. 2 processes (the same FSDP mesh: its compiled step comes from the persistent cache) resume
   that 1-process checkpoint to step 6, then run `--mode=sample` in the same interpreters (one
   jax.distributed start for both commands).

Its metrics.jsonl must be, step for step, the losses of an uninterrupted 1 x 8-device run.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxgen import data
from jaxgen import distributed
from jaxgen import main as jaxgen_main
from jaxgen.config import load_config
from jaxgen.errors import ConfigError
from jaxgen.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs/unet_mnist.py:smoke")
STEPS = 6
# A one-level U-Net without attention; checkpoints every 2 steps; a schedule of STEPS steps
# for every run (the learning-rate schedule depends on training.steps).
OVERRIDES = ("model.channel_mult=(1,)", "model.attention_levels=()", f"training.steps={STEPS}",
             "training.log_every=1", "checkpoint.every=2", "mesh.min_shard_size=0")
FSDP = ("mesh.data=1", "mesh.fsdp=8")
HEARTBEAT_S = 10  # Process 0 must notice the lost process within about this.
LAUNCH_TIMEOUT_S = 480
# Runs jaxgen.main once per JSON argv list in sys.argv[1], in one interpreter.
DRIVER = ("import json, sys\nfrom jaxgen import main\n"
          "for argv in json.loads(sys.argv[1]):\n"
          "  rc = main.main(argv)\n"
          "  if rc:\n"
          "    sys.exit(rc)\n")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def config(*overrides):
  return load_config(SMOKE, list(OVERRIDES) + list(overrides))


def read_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class Launch:
  """`n` jaxgen processes on localhost running `commands` (lists of jaxgen.main arguments);
  each one's output goes to WORKDIR.log<i>."""

  def __init__(self, workdir, commands, n=2, overrides=()):
    self.n, self.logs = n, [f"{workdir}.log{i}" for i in range(n)]
    flags = [f"--config.{o}" for o in OVERRIDES + tuple(overrides)]
    argvs = [[f"--config={SMOKE}", f"--workdir={workdir}"] + flags + c for c in commands]
    port = free_port()
    self.procs = []
    for i in range(n):
      env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(8 // n),
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                 JAX_PROCESS_ID=str(i), PYTHONUNBUFFERED="1",
                 # The launches share compiled programs (the orbax save's small ones too).
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
      with open(self.logs[i], "w") as log:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=ROOT, env=env,
            stdout=log, stderr=subprocess.STDOUT))

  def output(self, i) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def kill_all(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def wait_for(self, i, text, timeout=LAUNCH_TIMEOUT_S):
    """Waits until process i has printed `text`."""
    deadline = time.monotonic() + timeout
    while text not in self.output(i):
      if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in self.procs):
        self.kill_all()
        pytest.fail(f"no {text!r} from process {i}:\n{self.output(i)[-3000:]}")
      time.sleep(0.2)

  def finish(self, timeout=LAUNCH_TIMEOUT_S):
    """Waits for every process; all must exit 0."""
    deadline = time.monotonic() + timeout
    for i, p in enumerate(self.procs):
      try:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.kill_all()
        pytest.fail(f"process {i} still running after {timeout} s:\n{self.output(i)[-3000:]}")
    for i, p in enumerate(self.procs):
      assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{self.output(i)[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted single-process, 8-device (data-parallel) run's losses."""
  workdir = str(tmp_path_factory.mktemp("mp_reference"))
  loop.train(config("checkpoint.every=100"), workdir)  # Only the final checkpoint.
  return {r["step"]: r["loss"] for r in read_rows(workdir)}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
  """Runs the scenario of the module docstring; returns what the tests look at."""
  root = tmp_path_factory.mktemp("mp")
  workdir = str(root / "run")
  out = {"workdir": workdir}

  # 1. Two processes, FSDP across them; process 1 is lost after the step-4 checkpoint.
  first = Launch(workdir, [[]], overrides=FSDP + (f"mesh.heartbeat_timeout_s={HEARTBEAT_S}",))
  first.wait_for(0, "checkpoint: step 4 complete")
  first.procs[1].send_signal(signal.SIGKILL)
  lost = time.monotonic()
  try:
    out["survivor_rc"] = first.procs[0].wait(timeout=HEARTBEAT_S + 110)
  except subprocess.TimeoutExpired:
    out["survivor_rc"] = None
  out["survivor_s"] = time.monotonic() - lost
  first.kill_all()
  out["first"] = [first.output(i) for i in range(2)]
  out["first_pids"] = [p.pid for p in first.procs]

  # 2. One process (data-parallel on 8 devices) resumes the 2-process checkpoint: step 5, saved.
  resumed = loop.train(config(), workdir, stop_at=5)
  out["one_step"] = resumed.step

  # 3. Two processes resume the 1-process checkpoint to the end, then sample.
  last = Launch(workdir, [[], ["--mode=sample"]], overrides=FSDP)
  last.finish()
  out["last"] = [last.output(i) for i in range(2)]
  out["last_pids"] = [p.pid for p in last.procs]
  out["rows"] = read_rows(workdir)

  # The 1-process samples of the same final checkpoint.
  single = str(root / "single")
  shutil.copytree(os.path.join(workdir, "checkpoints"), os.path.join(single, "checkpoints"))
  jaxgen_main.run_sample(config(), single)
  out["single_samples"] = os.path.join(single, "samples", "samples.npz")
  return out


def test_any_process_count_follows_the_single_process_trajectory(scenario, reference):
  """Steps 1-4 on 2 processes (FSDP), 5 on one (data-parallel), 6 on 2: the 1 x 8 losses."""
  rows = scenario["rows"]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # The killed run's rows go.
  np.testing.assert_allclose([r["loss"] for r in rows],
                             [reference[s] for s in range(1, STEPS + 1)], rtol=1e-5, atol=1e-6)
  assert scenario["one_step"] == 5
  checkpoints = os.path.join(scenario["workdir"], "checkpoints")
  assert f"resumed from {checkpoints} step 5" in scenario["last"][0]


def test_a_lost_process_ends_the_job(scenario):
  """Process 1 SIGKILLed: process 0 is ended by the coordination service (the rerun that
  resumes from the last complete checkpoint is the trajectory test's steps 5-6)."""
  out = scenario["first"][0]
  assert "a process silent for 10 s ends the job" in out
  assert "checkpoint: step 2 complete" in out and "checkpoint: step 4 complete" in out
  rc = scenario["survivor_rc"]
  assert rc is not None and rc != 0, f"rc {rc} after {scenario['survivor_s']:.0f} s:\n{out[-3000:]}"
  assert scenario["survivor_s"] < HEARTBEAT_S + 60, scenario["survivor_s"]
  # The coordination service's fatal log (or, had a collective failed first, JAX's error).
  assert any(m in out for m in ("stopped sending heartbeats", "Terminating process",
                                "JaxRuntimeError")), out[-3000:]


def test_process_zero_alone_writes_logs_metrics_and_samples(scenario):
  workdir = scenario["workdir"]
  for outputs, step in ((scenario["first"], 1), (scenario["last"], 6)):
    assert f"step {step}/6 | loss" in outputs[0]
    for line in ("/6 | loss", "checkpoint: step", "wrote ", "memory per device"):
      assert line not in outputs[1], line
  # TensorBoard: one events file per writing process (pid in its name): process 0 of each
  # launch and this process; never a process 1.
  pids = {int(name.split(".")[-1]) for name in os.listdir(os.path.join(workdir, "tensorboard"))}
  assert pids == {scenario["first_pids"][0], scenario["last_pids"][0], os.getpid()}
  assert scenario["last"][0].count("wrote 20 samples") == 1
  # Orbax: every process writes its own shards, one commit per step.
  steps = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert steps == [4, 5, 6]  # Steps 2, 4, 5, 6 were saved; checkpoint.keep = 3.


def test_sampling_on_two_processes_equals_one(scenario):
  two = np.load(os.path.join(scenario["workdir"], "samples", "samples.npz"))
  one = np.load(scenario["single_samples"])
  np.testing.assert_array_equal(two["labels"], one["labels"])
  diff = np.abs(two["images"].astype(int) - one["images"].astype(int))
  assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())  # uint8 rounding.


def test_each_process_reads_a_contiguous_slice_of_the_global_batch():
  """Process p's rows are rows [p*B/P, (p+1)*B/P) of the single-process global batch, with the
  same augmentation (random crops and flips keyed to the stream position)."""
  cfg = load_config(SMOKE).data
  cfg.update(source="photos", num_classes=1, image_size=16, random_flip=True)
  make = lambda p, n: data.make_iterator(cfg, global_batch_size=12, seed=3, process_index=p,
                                         process_count=n)
  single = make(0, 1)
  shards = [[make(p, n) for p in range(n)] for n in (2, 3, 4)]
  for _ in range(3):
    whole = next(single)
    for its in shards:
      parts = [next(it) for it in its]
      for key in ("image", "label"):
        np.testing.assert_array_equal(np.concatenate([b[key] for b in parts]), whole[key])
  # The examples of a finite epoch: per process, all of them together.
  counts = [data.make_iterator(cfg, global_batch_size=12, seed=3, num_epochs=1, process_index=p,
                               process_count=4, drop_remainder=False).num_examples
            for p in range(4)]
  total = data.make_iterator(cfg, global_batch_size=12, seed=3, num_epochs=1, process_index=0,
                             process_count=1, drop_remainder=False).num_examples
  assert sum(counts) == total and max(counts) - min(counts) <= 3


def test_timeouts_are_config_settings():
  mesh = load_config(SMOKE, ["mesh.heartbeat_timeout_s=30"]).mesh
  env = {"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
  plan = distributed.resolve(mesh, env)
  assert plan["timeouts"] == {"initialization_timeout": 900, "heartbeat_timeout_seconds": 30,
                              "shutdown_timeout_seconds": 300}
  with pytest.raises(ConfigError, match="heartbeat_timeout_s"):
    distributed.resolve(load_config(SMOKE, ["mesh.heartbeat_timeout_s=0"]).mesh, env)
  assert jax.process_count() == 1
