"""The training spine end to end on the smoke config: sharding, resume, outputs, bad input."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgen import main as main_lib
from jaxgen.config import load_config
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs/unet_mnist.py:smoke")


def smoke_config(*overrides):
  return load_config(SMOKE, list(overrides))


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_sharded_equals_single_device(tmp_path):
  assert jax.device_count() == 8
  runs = {}
  for n in (1, 8):
    setup = loop.train(smoke_config("training.steps=3", "training.log_every=1",
                                    f"mesh.num_devices={n}"), str(tmp_path / str(n)))
    runs[n] = (read_losses(tmp_path / str(n)), jax.device_get(setup.state.params))
    assert setup.mesh.devices.size == n
  np.testing.assert_allclose(runs[1][0], runs[8][0], rtol=1e-5, atol=1e-6)
  # Parameters: Adam divides by sqrt(v), so round-off in near-zero gradients is amplified up
  # to ~lr; compare at that scale.
  diff = max(float(np.max(np.abs(a - b)))
             for a, b in zip(jax.tree.leaves(runs[1][1]), jax.tree.leaves(runs[8][1])))
  assert diff < 1e-4, diff


def test_resume_equals_uninterrupted(tmp_path):
  full = loop.train(smoke_config("training.steps=4", "training.log_every=1"),
                    str(tmp_path / "full"))
  loop.train(smoke_config("training.steps=4", "training.log_every=1"), str(tmp_path / "split"),
             stop_at=2)
  resumed = loop.train(smoke_config("training.steps=4", "training.log_every=1"),
                       str(tmp_path / "split"))
  assert read_losses(tmp_path / "full") == pytest.approx(read_losses(tmp_path / "split"),
                                                         rel=1e-6)
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_train_sample_eval_outputs(tmp_path):
  workdir = str(tmp_path)
  args = [f"--config={SMOKE}", f"--workdir={workdir}"]
  assert main_lib.main(args) == 0
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert rows[-1]["step"] == 4 and all({"step", "loss", "steps_per_sec"} <= set(r) for r in rows)
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  for name in ("schedule.png", "loss.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  assert main_lib.main(args + ["--mode=sample", "--config.sample.num_per_class=3"]) == 0
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert samples["images"].shape == (30, 28, 28, 1) and samples["images"].dtype == np.uint8
  assert list(samples["labels"]) == sorted(list(range(10)) * 3)
  assert os.path.exists(os.path.join(workdir, "samples", "grid.png"))
  assert os.path.exists(os.path.join(workdir, "samples", "class_0.png"))
  assert main_lib.main(args + ["--mode=eval"]) == 0
  result = json.load(open(os.path.join(workdir, "eval", "4.json")))
  assert result["num_samples"] == 20 and 0.0 <= result["class_accuracy"] <= 1.0


def test_bad_config_key_exits_nonzero(capsys, tmp_path):
  code = main_lib.main([f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.training.stpes=3"])
  assert code == 2
  assert "unknown config key 'training.stpes'" in capsys.readouterr().err


def test_image_shape_the_model_cannot_take(tmp_path):
  with pytest.raises(ConfigError, match="divisible by 4"):
    loop.build(smoke_config("data.image_size=30"), str(tmp_path))


def test_missing_dataset_names_the_fix(capsys, tmp_path):
  code = main_lib.main([f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.data.source=tfds",
                        "--config.data.tfds_name=cifar10",
                        f"--config.data.tfds_data_dir={tmp_path / 'empty'}"])
  assert code == 2
  assert "tfds build cifar10" in capsys.readouterr().err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(capsys, tmp_path):
  workdir = str(tmp_path)
  assert main_lib.main([f"--config={SMOKE}", f"--workdir={workdir}"]) == 0
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  code = main_lib.main([f"--config={SMOKE}", f"--workdir={workdir}", "--config.training.steps=8",
                        "--config.optimizer.lr=1e30"])
  err = capsys.readouterr().err
  assert code == 2 and "at step" in err and "last good checkpoint (step 4)" in err
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_corrupt_checkpoint_falls_back_then_errors(capsys, tmp_path):
  workdir = str(tmp_path)
  assert main_lib.main([f"--config={SMOKE}", f"--workdir={workdir}"]) == 0  # Saves steps 2, 4.
  ckpt = os.path.join(workdir, "checkpoints")

  def corrupt(step):
    for path in glob.glob(os.path.join(ckpt, str(step), "state", "**", "*"), recursive=True):
      if os.path.isfile(path):
        with open(path, "wb") as f:
          f.write(b"garbage")

  corrupt(4)
  setup = loop.build(smoke_config(), workdir)
  assert setup.step == 2 and "unreadable" in capsys.readouterr().err
  corrupt(2)
  with pytest.raises(CheckpointError, match="no readable checkpoint"):
    loop.build(smoke_config(), workdir)
  assert sorted(os.listdir(ckpt)) == ["2", "4"]  # Nothing deleted, no silent restart.


def test_sample_without_checkpoint_is_an_error(capsys, tmp_path):
  assert main_lib.main([f"--config={SMOKE}", f"--workdir={tmp_path}", "--mode=sample"]) == 2
  assert "train first" in capsys.readouterr().err


def test_cli_subprocess_exit_code(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxgen.main", "--config=configs/nosuch.py"],
                        cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 2 and "does not exist" in proc.stderr
