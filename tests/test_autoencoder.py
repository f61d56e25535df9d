"""Autoencoder training: jaxgen.main train/sample/eval/resume on the DC-AE smoke config, the
phase masks, the GAN losses and their gradient routing, BatchNorm handling, PSNR/SSIM."""

import glob
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxgen import main as main_lib
from jaxgen import reconstruct
from jaxgen.config import load_config
from jaxgen.convert import load_autoencoder
from jaxgen.data import embedded
from jaxgen.errors import CheckpointError
from jaxgen.metrics import image_quality
from jaxgen.registry import MODELS
from jaxgen.tasks import autoencoder as ae_task
from jaxgen.train import loop
from jaxgen.train.state import TrainState, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = os.path.join(ROOT, "configs/dcae_f32c32.py")
PHOTOS = os.path.join(ROOT, "configs/dcae_photos.py")
DEVICES = "mesh.num_devices=2"  # Sharded (2-way data parallel), and quicker to compile than 8.


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Resuming and re-building compile the same programs again: let XLA reuse them."""
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  old = {k: getattr(jax.config, k) for k in keys}
  jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update(keys[1], 0.0)
  jax.config.update(keys[2], 0)
  compilation_cache.reset_cache()
  yield
  for k, v in old.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


def run_main(spec, workdir, mode, *overrides):
  args = [f"--config={spec}", f"--workdir={workdir}", f"--mode={mode}"]
  return main_lib.main(args + [f"--config.{o}" for o in (DEVICES,) + overrides])


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_smoke_train_resume_sample_eval_reconstruct(tmp_path, capsys):
  spec = F32 + ":smoke"
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  assert run_main(spec, full, "train", "training.log_every=1") == 0
  # Interrupted at step 2, then resumed: the same losses and final state.
  config = load_config(spec, [DEVICES, "training.log_every=1"])
  loop.train(config, split, stop_at=2)
  assert run_main(spec, split, "train", "training.log_every=1") == 0
  assert losses(full) == pytest.approx(losses(split), rel=1e-5)
  a, b = load_autoencoder(full, use_ema=False)[1], load_autoencoder(split, use_ema=False)[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
  with open(os.path.join(full, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  assert {"l1", "lpips", "mse", "ae_loss", "grad_norm"} <= set(first)
  with open(os.path.join(full, "trainable_params.txt")) as f:
    assert "trainable 82,860 / 82,860" in f.read()

  assert run_main(spec, full, "sample") == 0
  saved = np.load(os.path.join(full, "samples", "reconstructions.npz"))
  assert saved["inputs"].shape == saved["reconstructions"].shape == (4, 32, 32, 3)
  with Image.open(os.path.join(full, "samples", "side_by_side.png")) as im:
    assert im.size[0] < im.size[1]  # 4 rows of (input | reconstruction).

  assert run_main(spec, full, "eval") == 0
  with open(glob.glob(os.path.join(full, "eval", "*.json"))[0]) as f:
    result = json.load(f)
  assert result["step"] == 4 and result["num_images"] == 16
  # 32x32 crops -> 1x1x8 latent: bicubic through 1x1x3 (3 numbers) and 2x2x3 (12 numbers).
  assert result["latent_floats"] == 8
  assert (result["bicubic_size"], result["bicubic_larger_size"]) == (1, 2)
  for key in ("psnr", "ssim", "lpips", "bicubic_psnr", "bicubic_larger_lpips"):
    assert np.isfinite(result[key])
  assert result["bicubic_larger_psnr"] > result["bicubic_psnr"]
  assert result["psnr_minus_bicubic"] == pytest.approx(
      result["psnr"] - result["bicubic_larger_psnr"])

  # jaxgen.reconstruct from the training workdir, on a photo of a size no multiple of 32.
  src, dst = str(tmp_path / "in.png"), str(tmp_path / "out.png")
  Image.fromarray(embedded.load_photo("chelsea.png")[:45, :70]).save(src)
  assert reconstruct.main([f"--checkpoint={full}", src, dst]) == 0
  with Image.open(dst) as im:
    assert im.size == (70, 45)
  capsys.readouterr()

  # A later phase starts from this workdir's weights (autoencoder.init_from); the state is
  # made from shapes with numpy, as loop.build's fresh init would be (no init compile here).
  task = loop.make_task(load_config(F32 + ":phase3,smoke", [f"autoencoder.init_from={full}"]))
  fresh = fresh_state(task)
  started = task.warm_start(fresh)
  _, loaded = load_autoencoder(full)
  for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(
      {"params": started.params["ae"], **started.model_state["ae"]})):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(loaded["params"]), jax.tree.leaves(started.ema_params["ae"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(fresh.params["disc"]), jax.tree.leaves(started.params["disc"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  wrong = loop.make_task(load_config(F32 + ":phase2,smoke", [f"autoencoder.init_from={full}",
                                                             "model.latent_channels=16"]))
  with pytest.raises(CheckpointError, match="do not fit"):
    wrong.warm_start(fresh_state(wrong))


def fresh_state(task):
  params, model_state = jax.eval_shape(task.init, jax.random.PRNGKey(0), None)
  params, model_state = random_params(params), random_params(model_state, 1)
  params, model_state = jax.tree.map(jnp.asarray, (params, model_state))
  return TrainState(jnp.zeros((), jnp.int32), params, params, (), model_state)


def random_params(tree, seed=0):
  """Random values of a shape tree, made with numpy (no XLA compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), tree)


def trainable_paths(task, params):
  labels = task.param_labels(params)
  return {ae_task.path_str(p) for p, l in jax.tree_util.tree_leaves_with_path(labels["ae"])
          if l == "ae"}


def test_phase_masks_freeze_parameters_bit_identically():
  """Which parameters each phase trains, and one real train step (the task's optimizer, a
  loss with a nonzero gradient for every parameter) with the phase-3 mask: every parameter
  outside its patterns is bit-identical afterwards, every one inside has moved."""
  for phase in (1, 2, 3):
    config = load_config(F32 + f":phase{phase},smoke")
    task = loop.make_task(config)
    shapes = jax.eval_shape(task.init, jax.random.PRNGKey(0), None)
    params, model_state = random_params(shapes[0]), random_params(shapes[1], 1)
    names = trainable_paths(task, params)
    everything = {ae_task.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        params["ae"])}
    if phase == 1:
      assert names == everything and "disc" not in params
    elif phase == 2:  # Encoder stages 3-5 + conv_out, decoder conv_in + stages 5-3.
      assert all(n.startswith(("encoder/down_blocks_3", "encoder/down_blocks_4",
                               "encoder/down_blocks_5", "encoder/conv_out",
                               "decoder/conv_in", "decoder/up_blocks_3", "decoder/up_blocks_4",
                               "decoder/up_blocks_5")) for n in names)
      assert any(n.startswith("encoder/down_blocks_5") for n in names)
      assert any(n.startswith("decoder/up_blocks_3_0") for n in names)
      assert not any(n.startswith(("encoder/conv_in", "encoder/down_blocks_1",
                                   "decoder/up_blocks_2", "decoder/norm_out")) for n in names)
      assert not config.autoencoder.update_batch_stats and config.data.image_size == 64
    else:  # The decoder head only, and a discriminator.
      assert all(n.startswith(("decoder/up_blocks_1_", "decoder/norm_out", "decoder/conv_out"))
                 for n in names)
      assert any(n.startswith("decoder/conv_out") for n in names)
      assert "disc" in params and config.autoencoder.gan_weight > 0
    if phase != 3:  # The labels above are the mask; one real step (phase 3) checks its effect.
      continue
    tx, schedule = task.make_optimizer(10)
    rng = np.random.default_rng(2)
    weights = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)

    def linear_loss(p, ms, batch, key, weights=weights):
      del batch, key
      total = sum(jnp.sum(a * w) for a, w in zip(jax.tree.leaves(p), jax.tree.leaves(weights)))
      return total, ({}, ms)

    state = TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params), model_state)
    step = jax.jit(make_train_step(linear_loss, tx, 0.9, schedule))
    # At step 0 the warm-up LR is 0; take the second step.
    new, _ = step(*step(state, {}, jax.random.PRNGKey(0))[:1], {}, jax.random.PRNGKey(0))
    for path, before in jax.tree_util.tree_leaves_with_path(params["ae"]):
      after = np.asarray(_get(new.params["ae"], path))
      if ae_task.path_str(path) in names:
        assert not np.array_equal(after, before), ae_task.path_str(path)
      else:
        np.testing.assert_array_equal(after, before, err_msg=ae_task.path_str(path))
    if "disc" in params:
      assert not any(np.array_equal(np.asarray(a), b) for a, b in zip(
          jax.tree.leaves(new.params["disc"]), jax.tree.leaves(params["disc"])))


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


# -- GAN and BatchNorm logic, on a stand-in autoencoder that compiles in a second ---------------


class TinyAE(nn.Module):
  """Conv down / BatchNorm / conv-transpose up: the task's interface at toy size."""

  def setup(self):
    self.down = nn.Conv(6, (2, 2), strides=(2, 2))
    self.norm = nn.BatchNorm(momentum=0.9)
    self.up = nn.ConvTranspose(3, (2, 2), strides=(2, 2))

  def encode(self, x, train: bool = False):
    return self.down(x)

  def decode(self, z, train: bool = False):
    return self.up(self.norm(z, use_running_average=not train))

  def __call__(self, x, train: bool = False):
    return self.decode(self.encode(x, train), train)


MODELS.register("tiny_ae_for_tests")(lambda: TinyAE())


def tiny_task(**autoencoder):
  config = load_config(F32 + ":phase3,smoke")
  with config.unlocked():
    config.model = ml_collections.ConfigDict({"name": "tiny_ae_for_tests"})
    config.autoencoder.update(dict(dict(trainable=(".*",), lpips_weight=0.0, gan_start=0),
                                   **autoencoder))
  task = loop.make_task(config)
  params, state = task.init(jax.random.PRNGKey(0), None)
  return task, params, state


def batch(seed=0):
  photo = embedded.load_photo("astronaut.png").astype(np.float32) / 127.5 - 1
  rng = np.random.default_rng(seed)
  crops = [photo[y:y + 32, x:x + 32] for y, x in rng.integers(0, 480, (8, 2))]
  return {"image": jnp.asarray(np.stack(crops)), "label": jnp.zeros((8,), jnp.int32)}


def grads(task, params, state, b):
  return jax.grad(lambda p: task.loss(p, state, b, jax.random.PRNGKey(0))[0])(params)


def test_hinge_losses_closed_form():
  real, fake = jnp.array([2.0, 0.5]), jnp.array([-2.0, 0.5])
  # (mean(relu(1 - real)) + mean(relu(1 + fake))) / 2 = (0.25 + 0.75) / 2.
  assert float(ae_task.hinge_d_loss(real, fake)) == pytest.approx(0.5)
  assert float(ae_task.hinge_d_loss(jnp.array([1.5]), jnp.array([-1.5]))) == 0.0
  assert float(ae_task.hinge_g_loss(fake)) == pytest.approx(0.75)


def test_gan_gradient_routing_and_signs():
  b = batch()
  by_weight = {}
  for w in (1.0, 2.0):
    task, params, state = tiny_task(gan_weight=w)
    by_weight[w] = grads(task, params, state, b)
  # The generator term never reaches the discriminator: D's gradient ignores gan_weight.
  for x, y in zip(jax.tree.leaves(by_weight[1.0]["disc"]), jax.tree.leaves(by_weight[2.0]["disc"])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)
  # The AE gradient is reconstruction + w * generator term, and D's loss adds nothing to it:
  # extrapolating to w = 0 gives the gradient of the same model trained without a GAN.
  no_gan_task, no_gan_params, no_gan_state = tiny_task(gan_weight=0.0)
  assert "disc" not in no_gan_params
  plain = grads(no_gan_task, no_gan_params, no_gan_state, b)["ae"]
  g1, g2 = (jax.tree.leaves(by_weight[w]["ae"]) for w in (1.0, 2.0))
  assert any(float(np.abs(b2 - b1).max()) > 1e-6 for b1, b2 in zip(g1, g2))
  for a1, a2, a0 in zip(g1, g2, jax.tree.leaves(plain)):
    np.testing.assert_allclose(2 * a1 - a2, a0, rtol=1e-4, atol=1e-6)
  # Signs: a gradient step on D separates real from fake; a step of the reconstruction
  # against the generator term's gradient raises D's score of it.
  task, params, state = tiny_task(gan_weight=1.0, disc=dict(norm="none", ndf=8, n_layers=2,
                                                            lr=1e-4, b1=0.5, b2=0.9,
                                                            weight_decay=0.0))
  recon = task.model.apply({"params": params["ae"], **state["ae"]}, b["image"])
  d = lambda p, x: jnp.mean(task.disc.apply({"params": p}, x))
  g = grads(task, params, state, b)["disc"]
  moved = jax.tree.map(lambda p, gp: p - 0.05 * gp, params["disc"], g)
  gap = lambda p: d(p, b["image"]) - d(p, recon)
  assert float(gap(moved)) > float(gap(params["disc"]))
  g_recon = jax.grad(lambda r: ae_task.hinge_g_loss(task.disc.apply(
      {"params": params["disc"]}, r)))(recon)
  assert float(d(params["disc"], recon - 0.05 * g_recon)) > float(d(params["disc"], recon))


def test_gan_start_step_and_batch_stats():
  b = batch()
  task, params, state = tiny_task(gan_weight=1.0, gan_start=2, update_batch_stats=True)
  loss_fn = jax.jit(task.loss)
  total, (metrics, new_state) = loss_fn(params, state, b, jax.random.PRNGKey(0))
  assert float(metrics["gan_on"]) == 0.0 and float(total) == pytest.approx(
      float(metrics["ae_loss"]))
  assert int(new_state["step"]) == 1
  # Before gan_start: no discriminator gradient, its statistics untouched.
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(grads(task, params, state,
                                                                         b)["disc"]))
  for x, y in zip(jax.tree.leaves(new_state["disc"]), jax.tree.leaves(state["disc"])):
    np.testing.assert_array_equal(x, y)
  # AE BatchNorm statistics: updated in training mode, kept when update_batch_stats=False.
  assert not np.allclose(new_state["ae"]["batch_stats"]["norm"]["mean"],
                         state["ae"]["batch_stats"]["norm"]["mean"])
  state2 = dict(new_state, step=jnp.asarray(2, jnp.int32))
  _, (metrics, after) = loss_fn(params, state2, b, jax.random.PRNGKey(0))
  assert float(metrics["gan_on"]) == 1.0 and float(metrics["d_loss"]) > 0
  frozen_task, params, state = tiny_task(gan_weight=1.0, update_batch_stats=False)
  _, (_, after) = frozen_task.loss(params, state, b, jax.random.PRNGKey(0))
  for x, y in zip(jax.tree.leaves(after["ae"]), jax.tree.leaves(state["ae"])):
    np.testing.assert_array_equal(x, y)


def test_zero_init_residual_and_config_files():
  task = loop.make_task(load_config(PHOTOS))
  params = jax.eval_shape(task.init, jax.random.PRNGKey(0), None)[0]["ae"]
  zeroed = [ae_task.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
            if ae_task.RESIDUAL_BRANCH_NORMS.search(ae_task.path_str(p))]
  assert len(zeroed) == 16  # 5 encoder + 5 decoder blocks: 2 ResBlocks, 3 EfficientViT (x2).
  assert task.latent_floats() == 2 * 2 * 32
  assert task.model.spatial_compression_ratio == 32
  real = load_config(F32 + ":phase2")
  assert (real.data.tfds_name, real.data.image_size, real.model.variant) == (
      "imagenet2012", 512, "f32c32-in-1.0")


def test_fresh_dcae_with_zeroed_shortcut_convs_is_its_linear_shortcut_path():
  """zero_init_residual + zero_init_shortcut_convs: every nonlinear branch and every conv beside
  a shortcut starts at 0, so the fresh encoder is linear (input conv, then pixel-unshuffle and
  channel averaging); decoder_out_norm="none" drops the head norm, and with an identity head
  activation the whole fresh autoencoder is affine (configs/dcae_photos.py)."""
  from configs import dcae_f32c32  # pylint: disable=g-import-not-at-top
  config = dict(dcae_f32c32.smoke_model(), decoder_out_norm="none",
                decoder_conv_act_fn="identity")
  config.pop("name")
  model = MODELS.get("dcae")(**config)
  x1, x2 = jax.random.normal(jax.random.PRNGKey(1), (2, 1, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x1)
  params = ae_task.zero_init_shortcut_convs(ae_task.zero_init_residual(variables["params"]))
  flat = {ae_task.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
  zeroed = sorted(k for k in flat if ae_task.SHORTCUT_CONVS.search(k))
  # 4 down blocks, the encoder's conv_out, the decoder's conv_in, 4 up blocks; kernel + bias.
  assert len(zeroed) == 20 and all(float(jnp.abs(flat[k]).max()) == 0 for k in zeroed)
  assert not any("norm_out" in k for k in flat)
  assert "encoder/conv_in/conv/kernel" in flat and float(jnp.abs(
      flat["encoder/conv_in/conv/kernel"]).max()) > 0
  encode = jax.jit(lambda x: model.apply({**variables, "params": params}, x, method="encode"))
  bias = encode(jnp.zeros_like(x1))  # The input conv's bias through the linear path.
  np.testing.assert_allclose(encode(2 * x1 - x2) - bias,
                             2 * (encode(x1) - bias) - (encode(x2) - bias), rtol=1e-4, atol=1e-5)
  autoencode = jax.jit(lambda x: model.apply({**variables, "params": params}, x))
  bias = autoencode(jnp.zeros_like(x1))
  np.testing.assert_allclose(autoencode(2 * x1 - x2) - bias, 2 * (autoencode(x1) - bias) - (
      autoencode(x2) - bias), rtol=1e-4, atol=1e-5)
  with pytest.raises(Exception, match="decoder_out_norm"):
    MODELS.get("dcae")(**dict(config, decoder_out_norm="layer_norm")).init(
        jax.random.PRNGKey(0), x1)


def test_psnr_ssim_match_skimage():
  metrics = pytest.importorskip("skimage.metrics")
  photo = embedded.load_photo("chelsea.png")[:40, :56].astype(np.float32) / 127.5 - 1
  noisy = np.clip(photo + 0.1 * np.random.default_rng(0).standard_normal(photo.shape), -1, 1)
  unit = lambda x: (x + 1) / 2
  assert float(image_quality.psnr(photo[None], noisy[None])[0]) == pytest.approx(
      metrics.peak_signal_noise_ratio(unit(photo), unit(noisy), data_range=1), rel=1e-5)
  assert float(image_quality.ssim(photo[None], noisy[None])[0]) == pytest.approx(
      metrics.structural_similarity(unit(photo), unit(noisy), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1,
                                    channel_axis=-1), rel=1e-4)
  assert image_quality.bicubic_sizes(192) == (8,)
  assert image_quality.bicubic_sizes(128) == (6, 7)
  flat = np.zeros((1, 16, 16, 3), np.float32)
  np.testing.assert_allclose(image_quality.bicubic_roundtrip(flat, 4), flat, atol=1e-6)
