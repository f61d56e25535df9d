"""Autoencoder training (DC-AE): L1 + LPIPS (+ PatchGAN hinge), phases by trainable-parameter masks.

Objective, per batch x in [-1, 1] with reconstruction r = decode(encode(x)):

  ae_loss = l1_weight * mean|r - x| + l2_weight * mean (r - x)^2 + lpips_weight * mean LPIPS(r, x)
            + on * gan_weight * (-mean D(r))                       (generator hinge term)
  d_loss  = on * (mean relu(1 - D(x)) + mean relu(1 + D(sg(r)))) / 2  (discriminator hinge)

with on = [step >= gan_start] and D a PatchGAN (`jaxgen/models/patchgan.py`) trained by its own
AdamW (`autoencoder.disc.*`: lr, betas, weight decay; its lr is 0 before gan_start). Both
terms are minimised in one backward pass: the generator term sees D's parameters through
stop_gradient and D's loss sees r through stop_gradient, so each network gets exactly its own
gradient. The logged `loss` is their sum; `ae_loss`, `d_loss` and the parts are logged too.
The loss has no step argument, so a GAN run counts its steps in `model_state["step"]`.

Parameters live in `params = {"ae": ..., ["disc": ...]}` and non-trainable collections in
`model_state = {"ae": {"batch_stats": ...}, ["disc": ..., "step": ...]}`.

Phases (decoupled high-resolution adaptation, DC-AE paper section 3.3) are presets that set
`autoencoder.trainable`: regular expressions matched (re.search) against each autoencoder
parameter path such as "encoder/down_blocks_3_0/context_module/qkv/conv/kernel". Parameters
that match none get zero updates (optax.set_to_zero under optax.multi_transform): they stay
bit-identical and take no weight decay. `autoencoder.update_batch_stats=False` runs the
autoencoder in inference mode (BatchNorm uses and keeps its running statistics), as a phase
that freezes the BatchNorm stages wants. `autoencoder.init_from` starts a fresh run from
another phase's workdir, a converted checkpoint or a diffusers directory
(`jaxgen.convert.load_autoencoder`); its shapes must match this config's model. A fresh
model starts with `autoencoder.zero_init_residual` (see `zero_init_residual`) and, with
`autoencoder.zero_init_shortcut_convs`, as its linear shortcut path (`zero_init_shortcut_convs`).
"""

import os
import re
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxgen import data as data_lib
from jaxgen import sharding
from jaxgen import visualize
from jaxgen.config import build_model
from jaxgen.errors import CheckpointError, ConfigError
from jaxgen.metrics import image_quality
from jaxgen.models.patchgan import patchgan
from jaxgen.registry import TASKS
from jaxgen.train.optim import learning_rate_schedule


def path_str(path) -> str:
  """A tree_util key path -> "a/b/c"."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trainable_mask(ae_params, patterns) -> Dict:
  """Pytree of bools: True where a parameter path matches one of the regexes."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(c.search(path_str(p)) for c in compiled), ae_params)


# The norm that ends each residual branch: ResBlock conv2's, LiteMLA's output projection's,
# GLUMBConv's point conv's.
RESIDUAL_BRANCH_NORMS = re.compile(
    r"(down|up)_blocks_\d+_\d+/(conv2/norm|context_module/proj/norm|"
    r"local_module/point_conv/norm)/scale$")


# Convs whose output is added to a non-parametric shortcut: the down / up blocks' convs, the
# encoder's output conv and the decoder's input conv (not the encoder's input DownBlock or the
# decoder's output UpBlock: they have no shortcut).
SHORTCUT_CONVS = re.compile(
    r"((down|up)_blocks_\d+_\d+/conv|encoder/conv_out|decoder/conv_in)/(kernel|bias)$")


def _zero_matching(pattern, ae_params):
  return jax.tree_util.tree_map_with_path(
      lambda p, v: jnp.zeros_like(v) if pattern.search(path_str(p)) else v, ae_params)


def zero_init_shortcut_convs(ae_params):
  """Zero the convs that sit beside a shortcut, so a fresh DC-AE maps images through its
  shortcuts alone (pixel-unshuffle + channel averaging down, channel duplication + pixel
  shuffle up) between the input and output convs, instead of through a random linear map."""
  return _zero_matching(SHORTCUT_CONVS, ae_params)


def zero_init_residual(ae_params):
  """Zero scale on the norm that ends every residual branch (Goyal et al. 2017), so each
  block starts as the identity and a fresh DC-AE starts as its residual-autoencoding
  shortcuts (space-to-channel averaging down, channel duplication up). With unit scales,
  every block adds unit-RMS noise to the shortcut signal and training starts far slower."""
  return _zero_matching(RESIDUAL_BRANCH_NORMS, ae_params)


def hinge_d_loss(logits_real, logits_fake):
  """Discriminator hinge loss (taming-transformers): (E relu(1 - D(x)) + E relu(1 + D(r))) / 2."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) +
                jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake):
  """Generator hinge loss: -E D(r)."""
  return -jnp.mean(logits_fake)


@TASKS.register("autoencoder")
class AutoencoderTask:
  """Reconstruction training of `config.model` (a module with encode/decode) on `config.data`."""

  def __init__(self, config: ml_collections.ConfigDict, image_shape, num_classes: int):
    self.config = config
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    self.model = build_model(config.model)
    a = config.autoencoder
    self.use_gan = a.gan_weight > 0
    d = a.disc
    self.disc = (patchgan(ndf=d.ndf, n_layers=d.n_layers, norm=d.norm)
                 if self.use_gan else None)
    if not a.trainable:
      raise ConfigError("autoencoder.trainable is empty: nothing would train; use ('.*',)")
    self._lpips = None

  # -- model -----------------------------------------------------------------------------

  def _lpips_fn(self):
    if self._lpips is None:
      from jaxgen.metrics import lpips  # pylint: disable=g-import-not-at-top
      self._lpips = lpips.lpips_fn(self.config.autoencoder.lpips_net)
    return self._lpips

  def init(self, rng, batch):
    """Fresh variables -> (params, model_state); see the module docstring for the layout."""
    del batch
    ae_rng, d_rng = jax.random.split(rng)
    x = jnp.zeros((1,) + self.image_shape, jnp.float32)
    # Unpartitionable threefry: other (still seed-determined) numbers than the default, but
    # XLA compiles it ~3x faster on CPU, and DC-AE inits hundreds of tensors. Parameters are
    # replicated, so partitionable random bits would buy nothing here.
    with jax.threefry_partitionable(False):
      variables = dict(self.model.init(ae_rng, x))
      d_vars = dict(self.disc.init(d_rng, x)) if self.use_gan else {}
    params = {"ae": variables.pop("params")}
    if self.config.autoencoder.zero_init_residual:
      params["ae"] = zero_init_residual(params["ae"])
    if self.config.autoencoder.zero_init_shortcut_convs:
      params["ae"] = zero_init_shortcut_convs(params["ae"])
    state = {"ae": variables}
    if self.use_gan:
      params["disc"] = d_vars.pop("params")
      state["disc"] = d_vars
      state["step"] = jnp.zeros((), jnp.int32)
    return params, state

  def reconstruct(self, variables, x):
    """Inference-mode reconstruction of x with AE `variables` ({"params", "batch_stats"})."""
    return self.model.apply(variables, x, train=False)

  def ae_variables(self, params, model_state) -> Dict:
    return {"params": params["ae"], **model_state["ae"]}

  def loss(self, params, model_state, batch, rng):
    del rng
    a = self.config.autoencoder
    x = batch["image"]
    train = bool(a.update_batch_stats)
    ae_vars = self.ae_variables(params, model_state)
    new_state = dict(model_state)
    if train and model_state["ae"]:
      recon, updates = self.model.apply(ae_vars, x, train=True, mutable=list(model_state["ae"]))
      new_state["ae"] = dict(updates)
    else:
      recon = self.model.apply(ae_vars, x, train=False)
    l1 = jnp.mean(jnp.abs(recon - x))
    mse = jnp.mean(jnp.square(recon - x))
    metrics = {"l1": l1, "mse": mse}
    ae_loss = a.l1_weight * l1 + a.l2_weight * mse
    if a.lpips_weight > 0:
      lp = jnp.mean(self._lpips_fn()(recon, x))
      ae_loss = ae_loss + a.lpips_weight * lp
      metrics["lpips"] = lp
    total = ae_loss
    if self.use_gan:
      on = (model_state["step"] >= a.gan_start).astype(jnp.float32)
      d_state = model_state["disc"]
      mutable = list(d_state)
      d_vars = {"params": params["disc"], **d_state}
      # Discriminator pass: real and (stopped) fake together, gradient to D only.
      both = jnp.concatenate([x, jax.lax.stop_gradient(recon)])
      if mutable:
        logits, d_updates = self.disc.apply(d_vars, both, train=True, mutable=mutable)
      else:
        logits, d_updates = self.disc.apply(d_vars, both, train=True), {}
      logits_real, logits_fake = jnp.split(logits, 2)
      d_loss = hinge_d_loss(logits_real, logits_fake)
      # Generator pass: D frozen (stop_gradient on its params; statistics not kept).
      g_vars = {"params": jax.lax.stop_gradient(params["disc"]), **d_state}
      g_logits = (self.disc.apply(g_vars, recon, train=True, mutable=mutable)[0] if mutable
                  else self.disc.apply(g_vars, recon, train=True))
      g_loss = hinge_g_loss(g_logits)
      ae_loss = ae_loss + on * a.gan_weight * g_loss
      total = ae_loss + on * d_loss
      new_state["disc"] = jax.tree.map(lambda n, o: jnp.where(on > 0, n, o),
                                       dict(d_updates), d_state)
      new_state["step"] = model_state["step"] + 1
      metrics.update(g_loss=g_loss, d_loss=d_loss, gan_on=on,
                     logits_real=jnp.mean(logits_real), logits_fake=jnp.mean(logits_fake))
    metrics["ae_loss"] = ae_loss
    return total, (metrics, new_state)

  # -- optimizer -------------------------------------------------------------------------

  def param_labels(self, params) -> Dict:
    """"ae" (trained), "frozen" (zero updates) or "disc" for every parameter."""
    mask = trainable_mask(params["ae"], self.config.autoencoder.trainable)
    labels = {"ae": jax.tree.map(lambda m: "ae" if m else "frozen", mask)}
    if "disc" in params:
      labels["disc"] = jax.tree.map(lambda _: "disc", params["disc"])
    return labels

  def make_optimizer(self, total_steps: int):
    """AdamW (config.optimizer) on the trainable AE parameters, zero updates on the frozen
    ones, and the discriminator's own AdamW (lr 0 before gan_start); clipping per group."""
    opt = self.config.optimizer
    schedule = learning_rate_schedule(opt, total_steps)

    def adamw(lr, b1, b2, wd, clip):
      chain = [optax.clip_by_global_norm(clip)] if clip > 0 else []
      return optax.chain(*chain, optax.adamw(lr, b1=b1, b2=b2, eps=opt.get("eps", 1e-8),
                                             weight_decay=wd))

    transforms = {"ae": adamw(schedule, opt.b1, opt.b2, opt.weight_decay, opt.grad_clip),
                  "frozen": optax.set_to_zero()}
    if self.use_gan:
      a, d = self.config.autoencoder, self.config.autoencoder.disc
      d_schedule = optax.join_schedules(
          [optax.constant_schedule(0.0), optax.constant_schedule(d.lr)], [a.gan_start])
      transforms["disc"] = adamw(d_schedule, d.b1, d.b2, d.weight_decay, opt.grad_clip)
    if opt.name != "adamw":
      raise ConfigError(f"optimizer.name {opt.name!r} unknown; use adamw")
    return optax.multi_transform(transforms, self.param_labels), schedule

  def warm_start(self, state):
    """A fresh run with `autoencoder.init_from` starts from those weights (params, EMA and
    BatchNorm statistics of the autoencoder; the discriminator stays fresh)."""
    src = self.config.autoencoder.init_from
    if not src:
      return state
    from jaxgen.convert.saved import load_autoencoder  # pylint: disable=g-import-not-at-top
    _, variables = load_autoencoder(src)
    variables = dict(variables)
    loaded_params = variables.pop("params")
    _check_same_shapes(src, state.params["ae"], loaded_params, "params")
    _check_same_shapes(src, state.model_state["ae"], variables, "statistics")
    place = lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding)
    ae = jax.tree.map(place, loaded_params, state.params["ae"])
    stats = jax.tree.map(place, variables, state.model_state["ae"])
    print(f"initialised the autoencoder from {src}", flush=True)
    return state.replace(params={**state.params, "ae": ae},
                         ema_params={**state.ema_params, "ae": ae},
                         model_state={**state.model_state, "ae": stats})

  # -- outputs ---------------------------------------------------------------------------

  def write_static_visuals(self, workdir: str) -> None:
    """trainable_params.txt: which autoencoder parameters this phase trains, and counts."""
    abstract = jax.eval_shape(self.init, jax.random.PRNGKey(0), None)[0]
    mask = trainable_mask(abstract["ae"], self.config.autoencoder.trainable)
    rows, counts = [], {True: 0, False: 0}
    for (path, leaf), (_, m) in zip(jax.tree_util.tree_leaves_with_path(abstract["ae"]),
                                    jax.tree_util.tree_leaves_with_path(mask)):
      n = int(np.prod(leaf.shape))
      counts[bool(m)] += n
      rows.append(f"{'train ' if m else 'frozen'} {n:>10d} {path_str(path)}")
    head = (f"patterns: {list(self.config.autoencoder.trainable)}\n"
            f"trainable {counts[True]:,} / {counts[True] + counts[False]:,} autoencoder "
            f"parameters; BatchNorm statistics "
            f"{'updated' if self.config.autoencoder.update_batch_stats else 'frozen'}\n")
    with open(os.path.join(workdir, "trainable_params.txt"), "w") as f:
      f.write(head + "\n".join(rows) + "\n")

  def _eval_variables(self, setup, state=None):
    state = setup.state if state is None else state
    params = state.ema_params if self.config.autoencoder.use_ema else state.params
    return self.ae_variables(params, state.model_state)

  def reconstruct_batches(self, setup, images: np.ndarray, state=None) -> np.ndarray:
    """Reconstructions of NHWC images, in batches of config.sample.batch_size over the mesh."""
    if not len(images):
      return np.zeros((0,) + self.image_shape, np.float32)
    variables = self._eval_variables(setup, state)
    runner = sharding.BatchRunner(setup.mesh, setup.config.sample.batch_size)
    # Variables keep their own (possibly FSDP-sharded) layout.
    fn = jax.jit(self.reconstruct, in_shardings=(None, runner.split), out_shardings=runner.split)
    return runner.map(lambda i, x: fn(variables, x), np.asarray(images, np.float32))

  def held_out(self, limit: Optional[int] = None, shuffled: bool = False) -> np.ndarray:
    """The first `limit` images of the test split, unaugmented; `shuffled`: of the split in a
    fixed random order (the visuals: a split stored class by class, as MNIST-5k's, would show
    one class only)."""
    limit = self.config.eval.num_samples if limit is None else limit
    it = data_lib.make_iterator(self.config.data, split="test", global_batch_size=64, seed=0,
                                shuffle=shuffled, num_epochs=1, process_index=0,
                                process_count=1, drop_remainder=False, augment=False)
    images, n = [], 0
    for b in it:
      images.append(b["image"])
      n += len(b["image"])
      if n >= limit:
        break
    it.close()
    return np.concatenate(images)[:limit]

  def _side_by_side(self, inputs: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """One row per image: input | reconstruction."""
    pairs = np.stack([visualize.to_uint8(inputs), visualize.to_uint8(recon)], axis=1)
    return visualize.image_grid(pairs.reshape((-1,) + pairs.shape[2:]), rows=len(inputs))

  def write_sample_grid(self, setup, state, path: str) -> None:
    """Training-time visual: held-out inputs beside their reconstructions."""
    images = self.held_out(self.config.autoencoder.num_visual, shuffled=True)
    recon = self.reconstruct_batches(setup, images, state)
    if jax.process_index() == 0:
      visualize.save_png(path, self._side_by_side(images, recon), min_size=512)

  def write_samples(self, setup, out: str) -> None:
    """reconstructions.npz (uint8 inputs, reconstructions) and side_by_side.png."""
    images = self.held_out(self.config.autoencoder.num_visual, shuffled=True)
    recon = self.reconstruct_batches(setup, images)
    if jax.process_index() != 0:
      return
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "reconstructions.npz"), inputs=visualize.to_uint8(images),
             reconstructions=visualize.to_uint8(recon))
    visualize.save_png(os.path.join(out, "side_by_side.png"),
                       self._side_by_side(images, recon), min_size=512)
    print(f"wrote {len(images)} reconstructions beside their inputs to "
          f"{out}/side_by_side.png", flush=True)

  def latent_floats(self) -> int:
    """Numbers in one image's latent."""
    x = jax.ShapeDtypeStruct((1,) + self.image_shape, jnp.float32)
    variables = jax.eval_shape(self.model.init, jax.random.PRNGKey(0), x)
    z = jax.eval_shape(lambda v, x: self.model.apply(v, x, method="encode"), variables, x)
    return int(np.prod(z.shape[1:]))

  def evaluate(self, setup, out: str) -> dict:
    """On the first eval.num_samples held-out images, on the mesh: PSNR, SSIM and LPIPS of the
    reconstructions and of bicubic down- and up-sampling through (about) as many numbers as
    the latent holds, and rFD (FD between images and reconstructions) on the alexnet
    features, or rFID with eval.inception_weights; see jaxgen/metrics/evaluate.py."""
    from jaxgen.metrics import evaluate  # pylint: disable=g-import-not-at-top
    floats = self.latent_floats()
    sizes = image_quality.bicubic_sizes(floats, self.image_shape[-1])
    baselines = dict(zip(("bicubic_", "bicubic_larger_"), sizes))
    result = {"image_shape": list(self.image_shape), "latent_floats": floats,
              "weights": "ema" if self.config.autoencoder.use_ema else "params",
              "lpips_net": self.config.autoencoder.lpips_net}
    result.update(evaluate.evaluate_reconstruction(setup, out, self._eval_variables(setup),
                                                   baselines))
    for prefix, size in baselines.items():
      result[f"{prefix}size"] = size
      result[f"{prefix}floats"] = size * size * self.image_shape[-1]
    if "psnr" in result:
      # The baseline that stores at least as many numbers as the latent (the harder one).
      strongest = "bicubic_larger_" if len(sizes) > 1 else "bicubic_"
      result["psnr_minus_bicubic"] = result["psnr"] - result[f"{strongest}psnr"]
    return result


def _check_same_shapes(src: str, target, loaded, what: str) -> None:
  want = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
  got = {path_str(p): tuple(np.shape(x))
         for p, x in jax.tree_util.tree_leaves_with_path(loaded)}
  if want != got:
    missing = sorted(set(want) - set(got))[:5]
    extra = sorted(set(got) - set(want))[:5]
    shape = [f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(want) & set(got))
             if want[k] != got[k]][:5]
    raise CheckpointError(
        f"autoencoder.init_from={src}: its {what} do not fit this config's model (missing "
        f"{missing}, unexpected {extra}, mismatched {shape}); use the same model config.")


def load_workdir(workdir: str, use_ema: Optional[bool] = None):
  """(model, variables) of the autoencoder in a jaxgen training workdir's newest checkpoint."""
  from jaxgen.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(f"{workdir} has no checkpoints/ directory")
  ckpt = Checkpointer(directory, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise CheckpointError(f"no checkpoint in {directory}")
  config = ml_collections.ConfigDict(ckpt.restore_config(step))
  if config.get("task") != "autoencoder":
    raise CheckpointError(f"{workdir} was trained by task {config.get('task')!r}, not an "
                          "autoencoder")
  try:
    state = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{directory} step {step} is unreadable ({type(e).__name__}: "
                          f"{str(e)[:200]})") from None
  finally:
    ckpt.close()
  use_ema = config.autoencoder.use_ema if use_ema is None else use_ema
  params = state["ema_params" if use_ema else "params"]["ae"]
  variables = {"params": params, **state["model_state"]["ae"]}
  return build_model(config.model), variables
