"""`--mode=eval`: sample (or reconstruct) on the mesh, extract features, score against references.

Metrics are named in `config.eval.metrics` (comma-separated; "" = the task's defaults):

  class_accuracy            generated samples classified by jaxgen's DigitClassifier
  psnr, ssim, lpips         autoencoders: reconstructions of held-out images (with the bicubic
                            down/up-sampling baselines)
  <stat>_<net>              a distribution metric on a feature network's features:
     stat  fd   Frechet distance to the real data's statistics   -> fd_<net>
           pr   precision and recall, k = eval.pr_k              -> precision_<net>, recall_<net>
           kid  kernel distance (unbiased MMD^2, subsets)        -> kid_<net>, kid_<net>_std
           is   "inception score" of the net's class posteriors  -> is_<net>, is_<net>_std
           rfd  autoencoders: FD between held-out images and their reconstructions
     net   inception (standard; needs eval.inception_weights), digits, alexnet (offline; see
           jaxgen/metrics/features.py: NOT comparable to Inception numbers)
  fid, is, pr, kid, rfid    short for the Inception ones; their keys are fid, is, precision,
                            recall, kid, rfid (the standard names)

Defaults: diffusion on small data (<= 64 px, <= 100 classes): class_accuracy, fd_digits,
pr_digits (unconditional: fd_alexnet, pr_alexnet), plus fid and is when eval.inception_weights
is set; on larger data (ImageNet): fid and is (then eval.inception_weights is required).
Autoencoders: psnr, ssim, lpips, rfd_alexnet, plus rfid with eval.inception_weights.

Generation: eval.num_samples samples with labels 0, 1, ..., K-1, 0, ... (balanced), in batches
of sample.batch_size split over the mesh's batch axes (as the train step splits its batch),
with the config's sampler, steps and guidance (the task's `generate`); features are extracted
on the devices from the device-resident batch, and only features come back to the host.

Reference statistics of real data (`config.data`, split eval.reference_split, up to
eval.reference_samples images) are computed once per feature network and kept as
eval.cache_dir/reference_<net>_<fingerprint>.npz (mu, sigma, features; the fingerprint covers
the network's weights and the data), so later evaluations only sample. eval.reference_stats
replaces the Inception reference by a file (e.g. pytorch-fid's --save-stats output for the
standard dataset statistics; without features, pr and kid cannot use it).
"""

import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxgen import data as data_lib
from jaxgen import sharding
from jaxgen.data import latent_cache
from jaxgen.errors import ConfigError
from jaxgen.metrics import fid as fid_lib
from jaxgen.metrics import features as features_lib

SHORT = {"fid": "fd_inception", "is": "is_inception", "pr": "pr_inception",
         "kid": "kid_inception", "rfid": "rfd_inception"}
GENERATOR_STATS = ("fd", "pr", "kid", "is")
RECONSTRUCTION_STATS = ("rfd",)


# -- metric names ------------------------------------------------------------------------------


def parse_metrics(spec: str, allowed_plain, allowed_stats) -> Tuple[List[str], List[Tuple[str, str]]]:
  """"a,b,fd_digits" -> (plain metrics, [(stat, net), ...]); unknown names are ConfigErrors."""
  plain, stats = [], []
  for name in [s.strip() for s in str(spec).split(",") if s.strip()]:
    name = SHORT.get(name, name)
    stat, _, net = name.partition("_")
    if name in allowed_plain:
      plain.append(name)
    elif stat in allowed_stats and net in features_lib.NETS:
      stats.append((stat, net))
    else:
      known = list(allowed_plain) + [f"{s}_<{'|'.join(features_lib.NETS)}>" for s in allowed_stats]
      shorts = [k for k, v in SHORT.items() if v.partition("_")[0] in allowed_stats]
      raise ConfigError(f"eval.metrics: unknown metric {name!r} for this task; known: "
                        f"{known} and {shorts}")
  return list(dict.fromkeys(plain)), list(dict.fromkeys(stats))


def result_key(stat: str, net: str) -> str:
  """Output name: the standard one for Inception (fid, is, kid, rfid), else stat_net."""
  if net == "inception":
    return {"fd": "fid", "rfd": "rfid"}.get(stat, stat)
  return f"{stat}_{net}"


def _pr_keys(net: str) -> Tuple[str, str]:
  return (("precision", "recall") if net == "inception" else
          (f"precision_{net}", f"recall_{net}"))


def default_metrics(config: ml_collections.ConfigDict, kind: str, num_classes: int) -> str:
  """The task's metrics when eval.metrics is "" (see the module docstring)."""
  inception = bool(config.eval.get("inception_weights"))
  if kind == "reconstruction":
    return ",".join(["psnr", "ssim", "lpips", "rfd_alexnet"] + (["rfid"] if inception else []))
  # jaxgen's own classifier is trained in memory on the whole train split: small data only.
  # Large data (ImageNet) is scored with Inception, which then needs eval.inception_weights.
  small = int(config.data.image_size) <= 64 and num_classes <= 100
  names = []
  if small:
    names += (["class_accuracy", "fd_digits", "pr_digits"] if num_classes > 1 else
              ["fd_alexnet", "pr_alexnet"])
  if inception or not small:
    names += ["fid", "is"]
  return ",".join(names)


def cache_dir(config: ml_collections.ConfigDict, out: str) -> str:
  """Where classifiers and reference statistics are cached: eval.cache_dir or DIR/eval."""
  return os.path.expanduser(config.eval.get("cache_dir") or out)


def build_nets(config: ml_collections.ConfigDict, names, directory: str):
  """FeatureNet per name ("digits" trains the classifier on first use and caches it)."""
  e = config.eval
  nets = {}
  for name in names:
    if name == "inception":
      if not e.get("inception_weights"):
        from jaxgen.metrics import inception  # pylint: disable=g-import-not-at-top
        raise ConfigError("an Inception metric was requested but " +
                          inception.missing_weights_message(""))
      nets[name] = features_lib.inception_net(os.path.expanduser(e.inception_weights))
    elif name == "digits":
      if int(config.data.num_classes) < 2:
        raise ConfigError("the digits feature network is a classifier of config.data; "
                          f"{config.data.source} has {config.data.num_classes} class(es); use "
                          "the alexnet or inception metrics")
      nets[name] = features_lib.digits_net(_image_data(config.data), directory,
                                           int(e.classifier_epochs))
    else:
      nets[name] = features_lib.alexnet_net(int(e.get("alexnet_size", 224)))
  return nets


def _image_data(data_config):
  """config.data reading images (a latent cache, if set, yields latents; never wanted here)."""
  if data_config.get("latent_cache"):
    return ml_collections.ConfigDict(dict(data_config.to_dict(), latent_cache=""))
  return data_config


# -- on the mesh ------------------------------------------------------------------------------


class Progress:
  """One line per batch on stderr: done/total, rate, ETA (process 0 only)."""

  def __init__(self, what: str, total: int):
    self.what, self.total, self.done = what, total, 0
    self.start = time.perf_counter()
    self.enabled = jax.process_index() == 0

  def update(self, n: int) -> None:
    self.done += n
    if not self.enabled:
      return
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    rate = self.done / elapsed
    eta = (self.total - self.done) / max(rate, 1e-9)
    print(f"{self.what}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%) | "
          f"{rate:.1f} img/s | elapsed {elapsed:.0f}s | ETA {eta:.0f}s", file=sys.stderr,
          flush=True)


def feature_fns(runner: sharding.BatchRunner, nets):
  """Per net: its jitted fn (replicated weights, batch-split images) and its weights, replicated."""
  fns = {n: jax.jit(net.fn, in_shardings=(runner.repl, runner.split), out_shardings=runner.split)
         for n, net in nets.items()}
  variables = {n: jax.device_put(net.variables, runner.repl) for n, net in nets.items()}
  return fns, variables


def _collect(outs: List[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]} if outs else {}


def real_features(config, runner: sharding.BatchRunner, nets, split: str, limit: int,
                  what: str) -> Dict[str, Dict[str, np.ndarray]]:
  """Features of the first `limit` real images of `split` (unshuffled, unaugmented)."""
  it = data_lib.make_iterator(_image_data(config.data), split=split,
                              global_batch_size=runner.batch, seed=0, shuffle=False,
                              num_epochs=1, process_index=0, process_count=1,
                              drop_remainder=False, augment=False)
  limit = min(int(limit), it.num_examples)  # The split may hold fewer.
  fns, variables = feature_fns(runner, nets)
  outs = {n: [] for n in nets}
  progress, done = None, 0
  try:
    for batch in it:
      images = batch["image"][:limit - done]
      if progress is None:
        progress = Progress(what, limit)
      x, rows = runner.put(images.astype(np.float32))
      for n in nets:
        outs[n].append(runner.get(fns[n](variables[n], x), rows))
      done += len(images)
      progress.update(len(images))
      if done >= limit:
        break
  finally:
    it.close()
  return {n: _collect(o) for n, o in outs.items()}


def reference(config, runner: sharding.BatchRunner, nets, directory: str) -> Dict[str, Dict]:
  """{net: {"mu", "sigma", "features" | None, "source"}}: loaded from the cache (or, for
  Inception, eval.reference_stats), else computed from config.data and cached."""
  e = config.eval
  spec = {"data": latent_cache.data_spec(config.data), "split": e.reference_split,
          "num": int(e.reference_samples)}
  refs, todo = {}, {}
  for name, net in nets.items():
    if name == "inception" and e.get("reference_stats"):
      path = os.path.expanduser(e.reference_stats)
      refs[name] = dict(fid_lib.load_statistics(path), source=path)
      continue
    meta = {"net": net.identity, **spec}
    key = features_lib.fingerprint(meta)
    path = os.path.join(directory, f"reference_{name}_{key}.npz")
    if os.path.isfile(path):
      refs[name] = dict(fid_lib.load_statistics(path), source=path)
    else:
      todo[name] = (path, meta)
  if todo:
    feats = real_features(config, runner, {n: nets[n] for n in todo}, e.reference_split,
                          int(e.reference_samples),
                          f"reference features ({', '.join(todo)}) of {config.data.source} "
                          f"{e.reference_split}")
    for name, (path, meta) in todo.items():
      f = feats[name]["features"]
      meta = dict(meta, count=int(len(f)))
      if jax.process_index() == 0:
        fid_lib.save_statistics(path, f, meta=meta)
      mu, sigma = fid_lib.feature_statistics(f)
      refs[name] = {"mu": mu, "sigma": sigma, "features": f, "meta": meta, "source": path}
  return refs


def check_references(stats, refs) -> None:
  """Precision/recall and KID need the reference features, not only (mu, sigma)."""
  for stat, net in stats:
    if stat in ("pr", "kid") and refs[net].get("features") is None:
      raise ConfigError(f"{result_key(stat, net)} needs the reference features, but "
                        f"{refs[net]['source']} holds only mu and sigma; unset "
                        "eval.reference_stats to compute them from config.data")


def distribution_metrics(stats, refs, fake: Dict[str, Dict[str, np.ndarray]],
                         e: ml_collections.ConfigDict) -> Dict:
  """fd / pr / kid / is of generated features against the references."""
  result = {}
  check_references(stats, refs)
  for stat, net in stats:
    f = fake[net]["features"]
    ref = refs.get(net)
    if stat == "fd":
      result[result_key(stat, net)] = fid_lib.frechet_distance(
          ref["mu"], ref["sigma"], *fid_lib.feature_statistics(f))
    elif stat == "pr":
      from jaxgen.metrics.precision_recall import precision_recall  # pylint: disable=g-import-not-at-top
      p, r = precision_recall(ref["features"], f, k=int(e.pr_k))
      result.update(zip(_pr_keys(net), (p, r)))
    elif stat == "kid":
      from jaxgen.metrics.kid import kernel_inception_distance  # pylint: disable=g-import-not-at-top
      mean, std = kernel_inception_distance(ref["features"], f, int(e.kid_subsets),
                                            int(e.kid_subset_size))
      result[result_key(stat, net)], result[result_key(stat, net) + "_std"] = mean, std
    elif stat == "is":
      from jaxgen.metrics.inception_score import inception_score  # pylint: disable=g-import-not-at-top
      if "logits" not in fake[net]:
        raise ConfigError(f"is_{net}: the {net} network has no class posteriors")
      mean, std = inception_score(fake[net]["logits"],
                                  splits=min(int(e.is_splits), len(fake[net]["logits"])))
      result[result_key(stat, net)], result[result_key(stat, net) + "_std"] = mean, std
  return result


# -- generators (diffusion, latent diffusion) ------------------------------------------------


def eval_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """0, 1, ..., K-1, 0, 1, ...: balanced classes for any count."""
  return (np.arange(num_samples) % max(num_classes, 1)).astype(np.int32)


def generated_features(setup, nets, labels: np.ndarray, seed: int,
                       use_ema: bool = True) -> Dict[str, Dict[str, np.ndarray]]:
  """Samples for `labels` with the task's generate (config.sample's sampler) on the mesh,
  through every net; returns host features per net. Batch i draws from `sharding.batch_rng`, as
  `jaxgen.train.loop.generate` does, so both give the same images for the same batch size."""
  runner = sharding.BatchRunner(setup.mesh, int(setup.config.sample.batch_size))
  params = setup.state.ema_params if use_ema else setup.state.params
  # Params and model state keep their own (possibly FSDP) shardings, as in loop.generate.
  gen = jax.jit(setup.task.generate, in_shardings=(None, None, runner.repl, runner.split),
                out_shardings=runner.split)
  fns, variables = feature_fns(runner, nets)
  progress = Progress(f"sampling {len(labels)} images ({setup.config.sample.method}, "
                      f"{setup.config.sample.num_steps} steps, guidance "
                      f"{setup.config.sample.guidance_scale})", len(labels))

  def sample_and_featurize(i, batch):
    images = gen(params, setup.state.model_state, sharding.batch_rng(seed, i), batch)
    return {n: fns[n](variables[n], images) for n in nets}

  return runner.map(sample_and_featurize, labels, progress=progress.update)


def evaluate_generator(setup, out: str) -> Dict:
  """`--mode=eval` of a class-conditional generator: the configured metrics of
  eval.num_samples samples."""
  config, task = setup.config, setup.task
  e = config.eval
  spec = e.get("metrics") or default_metrics(config, "generator", task.num_classes)
  plain, stats = parse_metrics(spec, ("class_accuracy",), GENERATOR_STATS)
  needed = list(dict.fromkeys([net for _, net in stats] +
                              (["digits"] if "class_accuracy" in plain else [])))
  directory = cache_dir(config, out)
  nets = build_nets(config, needed, directory)
  runner = sharding.BatchRunner(setup.mesh, int(config.sample.batch_size))
  ref_nets = {n: nets[n] for n in dict.fromkeys(net for stat, net in stats)}
  refs = reference(config, runner, ref_nets, directory) if ref_nets else {}
  check_references(stats, refs)  # Before sampling: fail fast.
  labels = eval_labels(int(e.num_samples), task.num_classes)
  fake = generated_features(setup, nets, labels, seed=config.seed + 12345)

  result = {"num_samples": int(len(labels)), "metrics": spec,
            "sampler": config.sample.to_dict()}
  if "class_accuracy" in plain:
    predicted = np.argmax(fake["digits"]["logits"], axis=-1)
    result["class_accuracy"] = float(np.mean(predicted == labels))
    result["per_class_accuracy"] = [
        float(np.mean(predicted[labels == k] == k)) if np.any(labels == k) else None
        for k in range(task.num_classes)]
    result["classifier_real_test_accuracy"] = nets["digits"].extra[
        "classifier_real_test_accuracy"]
  result.update(distribution_metrics(stats, refs, fake, e))
  result["feature_nets"] = {n: nets[n].description for n in ref_nets}
  result["references"] = {n: {"source": r["source"], "count": int(len(r["features"]))
                              if r.get("features") is not None else None}
                          for n, r in refs.items()}
  return result


# -- autoencoders ---------------------------------------------------------------------------


def evaluate_reconstruction(setup, out: str, variables, baselines: Dict[str, int]) -> Dict:
  """`--mode=eval` of an autoencoder on the first eval.num_samples held-out (test split)
  images: per-image PSNR / SSIM / LPIPS of the reconstructions (and of the baselines
  {prefix: size}: bicubic down- to size x size and up-sampling), and FD between the features
  of the images and of their reconstructions (rfd_<net>; rfid with Inception), on the mesh.

  Returns {"num_images", "<prefix>psnr", "<prefix>psnr_stderr", ..., "rfd_<net>", ...} with
  prefix "" for the autoencoder.
  """
  from jaxgen.metrics import image_quality, lpips  # pylint: disable=g-import-not-at-top
  config, task = setup.config, setup.task
  e = config.eval
  spec = e.get("metrics") or default_metrics(config, "reconstruction", 1)
  plain, stats = parse_metrics(spec, ("psnr", "ssim", "lpips"), RECONSTRUCTION_STATS)
  nets = build_nets(config, [net for _, net in stats], cache_dir(config, out))
  runner = sharding.BatchRunner(setup.mesh, int(config.sample.batch_size))
  fns, net_vars = feature_fns(runner, nets)
  lpips_net = config.autoencoder.get("lpips_net", "alexnet")
  lp_module = lpips.LPIPS(lpips_net)
  lp_vars = jax.device_put(lpips.load_weights(lpips_net), runner.repl) if "lpips" in plain else None

  def scores(x, lp_v, ae_v):
    recon = jnp.clip(task.reconstruct(ae_v, x).astype(jnp.float32), -1.0, 1.0)
    b, h, w, c = x.shape
    versions = {"": recon}
    for prefix, s in baselines.items():
      small = jax.image.resize(x, (b, s, s, c), "bicubic", antialias=True)
      versions[prefix] = jax.image.resize(small, (b, h, w, c), "bicubic", antialias=True)
    out = {}
    for prefix, y in versions.items():
      if "psnr" in plain:
        out[prefix + "psnr"] = image_quality.psnr(x, y)
      if "ssim" in plain:
        out[prefix + "ssim"] = image_quality.ssim(x, y)
      if "lpips" in plain:
        out[prefix + "lpips"] = lp_module.apply(lp_v, jnp.clip(y, -1.0, 1.0), x)
    return out, recon

  step = jax.jit(scores, in_shardings=(runner.split, runner.repl, runner.repl),
                 out_shardings=runner.split)
  it = data_lib.make_iterator(_image_data(config.data), split="test",
                              global_batch_size=runner.batch, seed=0, shuffle=False,
                              num_epochs=1, process_index=0, process_count=1,
                              drop_remainder=False, augment=False)
  limit = min(int(e.num_samples), it.num_examples)  # The test split may hold fewer.
  per_image, real, recon_f = [], {n: [] for n in nets}, {n: [] for n in nets}
  progress, done = Progress(f"reconstructing {limit} held-out images", limit), 0
  try:
    for batch in it:
      images = batch["image"][:limit - done].astype(np.float32)
      n = len(images)
      x, _ = runner.put(images)
      values, recon = step(x, lp_vars, variables)
      per_image.append(runner.get(values, n))
      for name in nets:
        real[name].append(runner.get(fns[name](net_vars[name], x), n))
        recon_f[name].append(runner.get(fns[name](net_vars[name], recon), n))
      done += n
      progress.update(n)
      if done >= limit:
        break
  finally:
    it.close()
  result = {"num_images": int(done), "metrics": spec}
  values = _collect(per_image)
  for prefix in ["", *baselines]:
    for name in plain:
      mean, err = image_quality.summarize(values[prefix + name])
      result[prefix + name], result[prefix + name + "_stderr"] = mean, err
  for stat, net in stats:
    a, b = _collect(real[net])["features"], _collect(recon_f[net])["features"]
    result[result_key(stat, net)] = fid_lib.feature_frechet_distance(a, b)
  if nets:
    result["feature_nets"] = {n: nets[n].description for n in nets}
  return result


def write_json(path: str, result: Dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)


def summary_line(result: Dict, limit: Optional[int] = 12) -> str:
  items = [(k, v) for k, v in result.items() if isinstance(v, float) and not k.endswith("_std")
           and not k.endswith("_stderr")]
  return ", ".join(f"{k} {v:.4g}" for k, v in items[:limit])
