"""configs/can_digits.py: the two-stage flagship run (autoencoder, latent cache, CaT) from one
command, interrupted inside and between stages, resumed, rerun (done stages skipped), then
sampled and evaluated; the stage configs it derives (jaxgen/tasks/two_stage.py); the adaLN arm
of CaT that the CAN vs adaLN comparison on these latents trains."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgen import main as main_lib
from jaxgen.config import load_config
from jaxgen.data import latent_cache
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.models.cat import cat
from jaxgen.tasks import two_stage
from jaxgen.train import loop
from jaxgen.train.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "can_digits.py")
# One device: a cheaper compile (the sharded paths are tested elsewhere).
OVERRIDES = ["mesh.num_devices=1"]


def load(preset="smoke", *overrides):
  return load_config(f"{CONFIG}:{preset}" if preset else CONFIG, OVERRIDES + list(overrides))


def steps_in(directory):
  ckpt = Checkpointer(os.path.join(directory, "checkpoints"), async_save=False)
  try:
    return ckpt.all_steps()
  finally:
    ckpt.close()


def test_smoke_stages_resume_skip_sample_eval(tmp_path, capsys):
  config = load()
  workdir = str(tmp_path / "run")
  ae_dir, cache = two_stage.stage_dirs(config, workdir)
  args = [f"--config={CONFIG}:smoke", f"--workdir={workdir}"] + [f"--config.{o}"
                                                                  for o in OVERRIDES]
  with pytest.raises(CheckpointError, match="train first"):
    two_stage.resolve(config, workdir)

  # Killed inside stage 1 (after its step-2 checkpoint of 4).
  loop.train(two_stage.autoencoder_config(config), ae_dir, stop_at=2)
  assert steps_in(ae_dir)[-1] == 2
  # Resumed: stage 1 finishes, stage 2 caches, stage 3 is killed after step 2 of 4.
  capsys.readouterr()
  two_stage.train(config, workdir, stop_at=2)
  out = capsys.readouterr().out
  assert "stage 1/3: training the autoencoder" in out and f"resumed from {ae_dir}" in out
  assert steps_in(ae_dir)[-1] == 4 and steps_in(workdir)[-1] == 2
  meta = latent_cache.read_meta(cache)
  assert meta["num_train"] == 4000 and meta["latent_shape"] == [8, 8, 8]
  cache_written = os.path.getmtime(os.path.join(cache, latent_cache.META))

  # The README's command: stages 1-2 are skipped, stage 3 resumes at step 2.
  assert main_lib.main(args) == 0
  out = capsys.readouterr().out
  assert "stage 1/3 done" in out and "stage 2/3 done" in out
  assert f"resumed from {os.path.abspath(workdir)}/checkpoints step 2" in out
  assert steps_in(ae_dir)[-1] == 4 and steps_in(workdir)[-1] == 4
  assert os.path.getmtime(os.path.join(cache, latent_cache.META)) == cache_written
  # Run again: nothing left to train.
  assert main_lib.main(args) == 0
  assert "step 4 |" not in capsys.readouterr().out and steps_in(workdir)[-1] == 4

  # Stage 3 trained on the cache, with the measured factor, and recorded the resolved config.
  resolved = two_stage.resolve(config, workdir)
  assert resolved.autoencoder.dir == ae_dir and resolved.data.latent_cache == cache
  assert resolved.autoencoder.scaling_factor == pytest.approx(1 / meta["latent_std"])
  recorded = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  assert recorded.restore_config()["autoencoder"]["scaling_factor"] == pytest.approx(
      resolved.autoencoder.scaling_factor)
  recorded.close()
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4] and all(np.isfinite(r["loss"]) for r in rows)

  assert main_lib.main(args + ["--mode=sample"]) == 0
  samples = np.load(os.path.join(workdir, "samples", "samples.npz"))
  assert samples["images"].shape == (20, 32, 32, 1)  # Decoded digits, not 8x8x8 latents.
  assert os.path.isfile(os.path.join(workdir, "samples", "grid.png"))
  assert main_lib.main(args + ["--mode=eval"]) == 0
  result = json.load(open(os.path.join(workdir, "eval", "4.json")))
  assert 0.0 <= result["class_accuracy"] <= 1.0 and result["num_samples"] == 20
  assert result["autoencoder_psnr_images"] == 20 and np.isfinite(result["autoencoder_psnr"])


def test_stage_configs():
  config = load()
  assert two_stage.is_two_stage(config) and config.task == "latent_diffusion"
  ae = two_stage.autoencoder_config(config)
  assert ae.task == "autoencoder" and ae.model == config.autoencoder.model
  assert ae.data == config.data and ae.mesh == config.mesh and ae.seed == config.seed
  assert ae.training == config.autoencoder.train.training
  # The full config: DC-AE f32c32's structure at f8 (32x32x1 -> 4x4x16), CaT with CA layers.
  full = load("")
  m = full.autoencoder.model
  assert m.downsample_block_type == "pixel_unshuffle" and m.encoder_block_types[-1] == (
      "EfficientViTBlock")
  assert full.model.name == "cat" and full.model.ca_depthwise and full.model.ca_impl == "auto"
  assert full.diffusion.label_dropout > 0 and full.sample.guidance_scale > 1
  # With autoencoder.dir set, the config is an ordinary latent-diffusion run.
  given = load("smoke", "autoencoder.dir=/somewhere")
  assert not two_stage.is_two_stage(given) and two_stage.resolve(given, "w") is given
  with pytest.raises(ConfigError, match="missing the sections"):
    broken = load()
    broken.unlock()
    del broken.autoencoder.train["eval"]
    two_stage.autoencoder_config(broken)


def test_cat_adaln_arm_conditions_through_modulation_alone():
  """CaT(adaln=True) without CA layers: adaLN-Zero in every residual block and the head, output
  0 at init; the label reaches the output only once the modulation is non-zero."""
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 4))
  t, y, other = jnp.array([10.0, 700.0]), jnp.array([1, 2]), jnp.array([5, 5])
  arms = {arm: load("" if arm == "can" else arm).model for arm in ("can", "adaln", "both")}
  assert arms["adaln"].adaln and not arms["adaln"].ca_depthwise and not arms["can"].adaln
  model = cat(widths=(8, 16), depths=(1, 1), block_kinds=("mb", "att"), expand_ratios=(2, 2),
              head_dim=4, num_classes=10, scales=(), adaln=True, ca_patch_embed=False,
              ca_depthwise=False, ca_head=False)
  params = model.init(jax.random.PRNGKey(0), x, t, y)["params"]
  run = jax.jit(lambda p, y: model.apply({"params": p}, x, t, y))
  assert np.all(np.asarray(run(params, y)) == 0)  # Zero-initialised head.
  flat = flatten_dict(params, sep="/")
  modulated = {k.split("/")[0] for k in flat if "adaLN_modulation" in k}
  assert modulated == {"adaLN_modulation", "enc_0_block_0", "enc_1_block_0", "dec_0_block_0"}
  keys = dict(zip(flat, jax.random.split(jax.random.PRNGKey(3), len(flat))))
  noisy = lambda pred: unflatten_dict({k: v + 0.1 * jax.random.normal(keys[k], v.shape)
                                       if pred(k) else v for k, v in flat.items()}, sep="/")
  static = noisy(lambda k: "adaLN_modulation" not in k)  # Modulation (and gates) still zero.
  np.testing.assert_array_equal(run(static, y), run(static, other))
  trained = noisy(lambda k: True)
  assert np.abs(run(trained, y) - run(trained, other)).max() > 1e-4
