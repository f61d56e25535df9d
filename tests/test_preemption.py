"""Preemption with real processes: SIGTERM saves and exits 0; SIGKILL at any moment resumes from
the last complete checkpoint (a half-written one is ignored) on the same trajectory."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs/unet_mnist.py:smoke")
STEPS = 20
OVERRIDES = ("model.channel_mult=(1,)", "model.attention_levels=()", f"training.steps={STEPS}",
             "training.log_every=1", "checkpoint.every=5", "checkpoint.async_save=True",
             "mesh.num_devices=1")
STEP_LINE = re.compile(r"^step (\d+)/%d " % STEPS)


def checkpoint_steps(workdir):
  """Complete (renamed into place) checkpoint steps."""
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  return sorted(int(n) for n in names if n.isdigit())


def start(workdir, cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
             # Later runs load the compiled step from disk instead of compiling it again.
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  args = [sys.executable, "-m", "jaxgen.main", f"--config={SMOKE}", f"--workdir={workdir}"]
  args += [f"--config.{o}" for o in OVERRIDES]
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1)


def run_until(proc, at_step, sig):
  """Reads the progress lines; sends `sig` once step >= at_step. Returns (output, rc)."""
  lines, sent = [], False
  for line in proc.stdout:
    lines.append(line)
    m = STEP_LINE.match(line)
    if m and not sent and int(m.group(1)) >= at_step:
      proc.send_signal(sig)
      sent = True
  rc = proc.wait(timeout=300)
  out = "".join(lines)
  assert sent, f"the run ended before step {at_step}:\n{out[-3000:]}"
  return out, rc


def test_sigterm_then_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
  workdir, cache = str(tmp_path / "run"), str(tmp_path / "jax_cache")
  # 1. SIGTERM during training: finish the step, save synchronously, exit 0 with a message.
  out, rc = run_until(start(workdir, cache), 3, signal.SIGTERM)
  assert rc == 0, out[-3000:]
  m = re.search(r"preempted \(SIGTERM\) after step (\d+): saved a checkpoint", out)
  assert m, out[-3000:]
  stopped = int(m.group(1))
  assert 3 <= stopped < STEPS and checkpoint_steps(workdir)[-1] == stopped

  # 2. Resume, then SIGKILL between checkpoints (an async save may be in flight).
  out, rc = run_until(start(workdir, cache), max(stopped + 4, 12), signal.SIGKILL)
  assert rc == -signal.SIGKILL and "resumed from" in out and f"step {stopped}" in out
  last = checkpoint_steps(workdir)[-1]
  assert stopped < last < STEPS
  # A save killed half-way leaves only orbax's temporary directory: never a step to resume.
  partial = os.path.join(workdir, "checkpoints", f"{last + 5}.orbax-checkpoint-tmp-1234567")
  os.makedirs(os.path.join(partial, "state"), exist_ok=True)
  with open(os.path.join(partial, "state", "half_written"), "wb") as f:
    f.write(b"\0" * 100)

  # 3. Resume from the last complete checkpoint and finish.
  proc = start(workdir, cache)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  assert f"resumed from {os.path.join(workdir, 'checkpoints')} step {last}" in out
  assert checkpoint_steps(workdir)[-1] == STEPS
  assert not os.path.exists(partial)  # Cleaned up at start-up.

  # The same trajectory as a run never stopped (same data order and noise per step); the
  # reference is a process too, so both run the very same (cached) executable.
  ref_dir = str(tmp_path / "reference")
  proc = start(ref_dir, cache)
  out = proc.communicate(timeout=600)[0]
  assert proc.returncode == 0, out[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  ref = [json.loads(line) for line in open(os.path.join(ref_dir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # Killed runs' rows replaced.
  assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-6,
                                                     abs=1e-7)
