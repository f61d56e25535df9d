"""Latent diffusion (task "latent_diffusion"): smoke presets end to end, the latent cache, the
main job's data error, and the full-size configs built abstractly (with their counts)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen import data as data_lib
from jaxgen import main as main_lib
from jaxgen.config import load_config
from jaxgen.data import latent_cache
from jaxgen.errors import ConfigError, DataError
from jaxgen.models.flops import backbone_costs, count_params
from jaxgen.tasks.latent_diffusion import AE, LatentDiffusionTask
from jaxgen.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_JOBS = ("can_imagenet512", "can_imagenet256", "cat_l0_512", "dit_xl2_256")


def cfg(name, *overrides):
  return os.path.join(ROOT, "configs", name + ".py"), list(overrides)


def load(name, preset="smoke", *overrides):
  path, overrides = cfg(name, *overrides)
  return load_config(f"{path}:{preset}" if preset else path, overrides)


@pytest.mark.parametrize("name", ["can_imagenet512", "dit_xl2_256"])
def test_smoke_train_sample_eval(tmp_path, name):
  """jaxgen.main train / sample / eval on the smoke preset; the autoencoder stays frozen."""
  path, _ = cfg(name)
  args = [f"--config={path}:smoke", f"--workdir={tmp_path}"]
  assert main_lib.main(args) == 0
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["step"] == 4 and all(np.isfinite(r["loss"]) for r in rows)
  assert "(8, 8, 8)" in (tmp_path / "latent_shape.txt").read_text()
  assert main_lib.main(args + ["--mode=sample"]) == 0
  samples = np.load(tmp_path / "samples" / "samples.npz")
  # Decoded to pixels: MNIST 32x32x1, not the 8x8x8 latents.
  assert samples["images"].shape == (20, 32, 32, 1) and samples["images"].dtype == np.uint8
  assert main_lib.main(args + ["--mode=eval"]) == 0
  result = json.load(open(tmp_path / "eval" / "4.json"))
  assert 0.0 <= result["class_accuracy"] <= 1.0 and result["num_samples"] == 20
  # The checkpointed autoencoder is bit-identical to the seeded initialisation after training.
  config = load(name)
  setup = loop.build(config, str(tmp_path), require_checkpoint=True)
  want = setup.task.autoencoder_variables()
  got = setup.state.model_state[AE]
  assert jax.tree.structure(want) == jax.tree.structure(got)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", MAIN_JOBS)
def test_smoke_presets_share_the_pipeline(name):
  c = load(name)
  assert c.task == "latent_diffusion" and c.data.source == "mnist5k"
  assert c.autoencoder.random_init and c.training.steps <= 20
  full = load(name, "")
  assert full.data.tfds_name == "imagenet2012" and full.autoencoder.model.variant == "f32c32-in-1.0"
  assert not full.autoencoder.random_init and full.model.patch_size == 1


def test_main_job_without_data_says_how_to_prepare_it(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)  # The default workdir (workdirs/can_imagenet512) lands here.
  path, _ = cfg("can_imagenet512")
  assert main_lib.main([f"--config={path}",
                        f"--config.data.tfds_data_dir={tmp_path / 'tfds'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: tfds dataset 'imagenet2012' is not prepared")
  assert "ILSVRC2012_img_train.tar" in err
  assert "tfds build imagenet2012" in err and "--file_format=array_record" in err


def test_missing_autoencoder_is_a_config_error():
  config = load("can_imagenet512", "", "autoencoder.random_init=false")
  with pytest.raises(ConfigError, match="python -m jaxgen.convert"):
    LatentDiffusionTask(config, (512, 512, 3), 1000)
  smoke = load("can_imagenet512", "smoke", "autoencoder.model.in_channels=3")
  with pytest.raises(ConfigError, match="3-channel images but the data has 1"):
    loop.make_task(smoke)


@pytest.mark.parametrize("name,size,latent", [
    ("can_imagenet512", 512, (16, 16, 32)), ("can_imagenet256", 256, (8, 8, 32)),
    ("cat_l0_512", 512, (16, 16, 32)), ("dit_xl2_256", 256, (8, 8, 32))])
def test_full_configs_build_abstractly(name, size, latent):
  """The real DC-AE f32c32 and backbone, shapes only: latent shape, factor, counts."""
  config = load(name, "", "autoencoder.random_init=true")
  task = LatentDiffusionTask(config, (size, size, 3), 1000)
  assert task.image_shape == latent and task.scaling_factor == pytest.approx(0.3189)
  params, state = jax.eval_shape(task.init, jax.random.PRNGKey(0), None)
  ae_params = count_params(state[AE]["params"])
  costs = backbone_costs(task.model, latent)
  assert costs["params"] == count_params(params)
  print(f"\n{name}: {config.model.name} {costs['params'] / 1e6:.1f}M params, "
        f"{costs['gmacs']:.2f} GMACs (papers' 'GFLOPs') per forward on {latent} latents; "
        f"frozen DC-AE {ae_params / 1e6:.1f}M params")
  assert abs(ae_params - (123.17e6 + 200.18e6)) < 0.02e6  # REFERENCE.md: enc + dec.
  if name == "dit_xl2_256":  # DiT-XL at patch 1 on 8x8x32: 64 tokens, as DiT-XL/2 at 128 px.
    assert abs(costs["params"] / 1e6 - 674.9) < 0.1 and abs(costs["gmacs"] - 29.0) < 0.1


def _write_cache(tmp_path, *overrides):
  config = load("can_imagenet512", "smoke", f"data.latent_cache={tmp_path / 'cache'}",
                *overrides)
  latent_cache.write_cache(config, batch_size=496, shard_size=1500)
  return config


def test_latent_cache_equals_on_the_fly(tmp_path):
  config = _write_cache(tmp_path)
  meta = latent_cache.read_meta(str(tmp_path / "cache"))
  assert meta["num_train"] == 4000 and meta["latent_shape"] == [8, 8, 8]
  assert sorted(os.listdir(tmp_path / "cache" / "train")) == [
      "labels.npy", "latents_00000.npy", "latents_00001.npy", "latents_00002.npy"]
  task = loop.make_task(config)
  variables = task.autoencoder_variables()
  encode = jax.jit(task.encode)

  # The training stream from the cache is the on-the-fly stream, encoded.
  plain = load("can_imagenet512", "smoke")
  cached_it = data_lib.make_iterator(config.data, split="train", global_batch_size=64, seed=3)
  image_it = data_lib.make_iterator(plain.data, split="train", global_batch_size=64, seed=3)
  for _ in range(2):
    cached, images = next(cached_it), next(image_it)
    assert set(cached) == {"latent", "label"}
    np.testing.assert_array_equal(cached["label"], images["label"])
    np.testing.assert_allclose(cached["latent"], encode(variables, images["image"]),
                               rtol=1e-5, atol=1e-5)

  # Same loss from cached latents as from images (same rng): latents are scaled identically.
  params, state = jax.jit(task.init)(jax.random.PRNGKey(0), None)
  state = dict(state, **{AE: variables})
  rng = jax.random.PRNGKey(7)
  loss = jax.jit(task.loss)
  from_cache, _ = loss(params, state, {k: jnp.asarray(v) for k, v in cached.items()}, rng)
  from_images, _ = loss(params, state, {k: jnp.asarray(v) for k, v in images.items()}, rng)
  assert float(from_cache) == pytest.approx(float(from_images), rel=1e-5)

  # Training runs from the cache; the whole split matches a direct encoding (spot check).
  setup = loop.train(load("can_imagenet512", "smoke", f"data.latent_cache={tmp_path / 'cache'}",
                          "training.steps=2"), str(tmp_path / "run"))
  assert setup.step == 2
  train_images, _ = data_lib.load_arrays(plain.data, "train")
  last = np.load(tmp_path / "cache" / "train" / "latents_00002.npy")
  assert last.shape == (1000, 8, 8, 8)
  np.testing.assert_allclose(last[-8:], encode(variables, train_images[-8:]), rtol=1e-5,
                             atol=1e-5)


def test_latent_cache_errors(tmp_path):
  directory = tmp_path / "cache"
  with pytest.raises(DataError, match="python -m jaxgen.data.latent_cache"):
    loop.make_task(load("can_imagenet512", "smoke", f"data.latent_cache={directory}"))
  _write_cache(tmp_path)
  with pytest.raises(DataError, match="already exists"):
    _write_cache(tmp_path)
  other_ae = load("can_imagenet512", "smoke", f"data.latent_cache={directory}",
                  "autoencoder.seed=1")
  with pytest.raises(DataError, match="written with autoencoder"):
    loop.make_task(other_ae)
  other_data = load("can_imagenet512", "smoke", f"data.latent_cache={directory}",
                    "data.random_flip=true")
  with pytest.raises(DataError, match="no flipped latents"):
    loop.make_task(other_data)
