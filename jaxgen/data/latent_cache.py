"""Latent cache: a dataset encoded once by a latent-diffusion config's frozen autoencoder.

  python -m jaxgen.data.latent_cache --config=configs/can_imagenet512.py[:preset] \
      --config.data.latent_cache=DIR [--config.autoencoder.dir=...] [--batch_size=64]

encodes the config's "train" split (unshuffled, unaugmented; with data.random_flip also every
image flipped) and writes DIR. Training with the same config and `data.latent_cache=DIR` then
reads the latents instead of decoding and encoding images every step (`make_iterator` uses this
source for the "train" split; evaluation still reads the real images). Layout of DIR:

  meta.json               format, version, num_train, image_shape, latent_shape, num_classes,
                          shard_size, flips, the data and autoencoder config it was made with,
                          latent statistics. Written last: a directory without it is incomplete.
  train/labels.npy        int32 (N,)
  train/latents_K.npy     float32 (<= shard_size, h, w, c): unscaled encoder outputs, dataset
                          order (example i is row i % shard_size of shard i // shard_size)
  train/flipped_K.npy     the latents of the horizontally flipped images (data.random_flip)

Latents are stored unscaled (the task multiplies by autoencoder.scaling_factor), so changing
the factor does not invalidate a cache; changing the autoencoder or the data does, and the
latent-diffusion task refuses a cache whose recorded config differs from its own.
Batches from this source are {"latent": float32 (b, h, w, c), "label": int32 (b,)}; with flips,
each example draws the flipped or the plain latent with probability 1/2 (seeded by its stream
position, like the pipeline's image flips).
"""

import functools
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional

import ml_collections
import numpy as np

from jaxgen.convert.common import read_json
from jaxgen.data.base import DatasetInfo
from jaxgen.errors import ConfigError, DataError, cli

FORMAT = "jaxgen-latent-cache"
VERSION = 1
META = "meta.json"
SHARD_SIZE = 10_000
# The data fields a cache depends on (the rest, e.g. num_threads, do not change the latents).
DATA_KEYS = ("source", "tfds_name", "tfds_data_dir", "image_size", "num_classes")


def data_spec(data_config: ml_collections.ConfigDict) -> Dict[str, Any]:
  return {k: data_config.get(k) for k in DATA_KEYS}


def write_command(directory: str) -> str:
  return ("python -m jaxgen.data.latent_cache --config=<the training config> "
          f"--config.data.latent_cache={directory}")


def read_meta(directory: str) -> Dict[str, Any]:
  path = os.path.join(directory, META)
  if not os.path.isfile(path):
    what = ("is incomplete (no meta.json; the writer was interrupted)"
            if os.path.isdir(directory) else "does not exist")
    raise DataError(f"latent cache {directory} {what}; write it with:\n  "
                    f"{write_command(directory)}\n(or set data.latent_cache='' to encode images "
                    "on the fly)")
  meta = read_json(path, f"a {FORMAT} description (the cache writer writes it last)", DataError)
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise DataError(f"{path} is not a {FORMAT} v{VERSION} file; rewrite the cache with:\n  "
                    f"{write_command(directory)}")
  return meta


class LatentCache:
  """The "train" split of a written cache as a pipeline source (see jaxgen.data.pipeline)."""

  name = "latent_cache"

  def __init__(self, data_config: ml_collections.ConfigDict):
    self.directory = os.path.abspath(str(data_config.latent_cache))
    self.meta = read_meta(self.directory)
    want, have = data_spec(data_config), self.meta["data"]
    diff = {k: (have.get(k), want[k]) for k in DATA_KEYS if have.get(k) != want[k]}
    if diff:
      raise DataError(f"latent cache {self.directory} was written for other data "
                      f"(field: (cache, config)) {diff}; rewrite it with:\n  "
                      f"{write_command(self.directory)}")
    if data_config.get("random_flip") and not self.meta["flips"]:
      raise DataError(f"data.random_flip is on but latent cache {self.directory} has no flipped "
                      "latents; rewrite it with random_flip on, or turn random_flip off")
    self.flips = bool(self.meta["flips"] and data_config.get("random_flip"))
    self.shard_size = int(self.meta["shard_size"])
    self.info = DatasetInfo(tuple(self.meta["image_shape"]), int(self.meta["num_classes"]),
                            int(self.meta["num_train"]))
    self.latent_shape = tuple(self.meta["latent_shape"])

  @functools.cached_property
  def labels(self) -> np.ndarray:
    return np.load(os.path.join(self.directory, "train", "labels.npy"))

  @functools.lru_cache(maxsize=None)
  def _shard(self, kind: str, k: int) -> np.ndarray:
    return np.load(os.path.join(self.directory, "train", f"{kind}_{k:05d}.npy"), mmap_mode="r")

  def records(self, split: str, augment: bool):
    del augment
    if split != "train":
      raise ConfigError(f"a latent cache holds the train split only, not {split!r}")
    return range(self.info.num_train)

  def example(self, split: str, record: int, rng: Optional[np.random.Generator]) -> dict:
    del split
    kind = "flipped" if self.flips and rng is not None and rng.random() < 0.5 else "latents"
    shard, row = divmod(int(record), self.shard_size)
    return {"latent": np.array(self._shard(kind, shard)[row], np.float32),
            "label": np.int32(self.labels[record])}


class _ShardWriter:
  """Accumulates rows and writes full shards as NAME_K.npy."""

  def __init__(self, directory: str, name: str, shard_size: int):
    self.directory, self.name, self.shard_size = directory, name, shard_size
    self.pending: List[np.ndarray] = []
    self.count, self.shards = 0, 0

  def add(self, rows: np.ndarray) -> None:
    self.pending.append(rows)
    self.count += len(rows)
    while sum(len(p) for p in self.pending) >= self.shard_size:
      self._flush(self.shard_size)

  def _flush(self, n: int) -> None:
    rows = np.concatenate(self.pending)
    np.save(os.path.join(self.directory, f"{self.name}_{self.shards:05d}.npy"), rows[:n])
    self.pending = [rows[n:]] if len(rows) > n else []
    self.shards += 1

  def close(self) -> None:
    left = sum(len(p) for p in self.pending)
    if left:
      self._flush(left)


def write_cache(config: ml_collections.ConfigDict, *, batch_size: int = 64,
                shard_size: int = SHARD_SIZE, log_every: int = 50) -> str:
  """Encodes config.data's train split with the config's autoencoder into data.latent_cache.

  Runs on one process, the batch split over that process's devices. Returns the directory.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jaxgen import sharding  # pylint: disable=g-import-not-at-top
  from jaxgen.data import pipeline  # pylint: disable=g-import-not-at-top
  from jaxgen.train import loop  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(str(config.data.get("latent_cache") or ""))
  if not config.data.get("latent_cache"):
    raise ConfigError("set the cache directory: --config.data.latent_cache=DIR")
  if os.path.isfile(os.path.join(directory, META)):
    raise DataError(f"latent cache {directory} already exists; remove it to rewrite it")
  if jax.process_count() > 1:
    raise ConfigError("write the latent cache from a single process")
  plain = ml_collections.ConfigDict(config.to_dict())
  plain.data.latent_cache = ""
  task = loop.make_task(plain)
  if not hasattr(task, "encode"):
    raise ConfigError(f"task {config.get('task')!r} has no autoencoder to encode with; "
                      "a latent cache needs task='latent_diffusion'")
  mesh = sharding.make_mesh(config.mesh)
  runner = sharding.BatchRunner(mesh, batch_size)
  variables = jax.device_put(task.autoencoder_variables(), runner.repl)
  encode = jax.jit(task.encode, in_shardings=(runner.repl, runner.split),
                   out_shardings=runner.split)
  flips = bool(config.data.random_flip)
  iterator = pipeline.make_iterator(
      plain.data, split="train", global_batch_size=runner.batch, seed=0, shuffle=False,
      num_epochs=1, process_index=0, process_count=1, drop_remainder=False, augment=False)

  tmp = directory + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(os.path.join(tmp, "train"))
  writers = {k: _ShardWriter(os.path.join(tmp, "train"), k, shard_size)
             for k in (("latents", "flipped") if flips else ("latents",))}
  labels, total = [], pipeline.dataset_info(plain.data).num_train
  s1 = s2 = 0.0
  n, tic = 0, time.perf_counter()
  for i, batch in enumerate(iterator):
    images = batch["image"]
    views = {"latents": images}
    if flips:
      views["flipped"] = images[:, :, ::-1]
    for kind, x in views.items():
      x, rows = runner.put(x)
      z = runner.get(encode(variables, x), rows).astype(np.float32)
      writers[kind].add(z)
      if kind == "latents":
        s1 += float(np.sum(z, dtype=np.float64))
        s2 += float(np.sum(np.square(z, dtype=np.float64)))
    labels.append(np.asarray(batch["label"], np.int32))
    n += len(images)
    if log_every and (i + 1) % log_every == 0:
      rate = n / (time.perf_counter() - tic)
      print(f"encoded {n}/{total} images ({rate:.1f} img/s, ETA "
            f"{(total - n) / rate / 60:.1f} min)", flush=True)
  for w in writers.values():
    w.close()
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int32)
  np.save(os.path.join(tmp, "train", "labels.npy"), labels)
  size = n * int(np.prod(task.image_shape))
  mean = s1 / max(size, 1)
  std = float(np.sqrt(max(s2 / max(size, 1) - mean ** 2, 0.0)))
  meta = {
      "format": FORMAT, "version": VERSION, "num_train": int(n),
      "image_shape": list(task.pixel_shape), "latent_shape": list(task.image_shape),
      "num_classes": int(task.num_classes), "shard_size": int(shard_size), "flips": flips,
      "data": data_spec(plain.data), "autoencoder": task.autoencoder_spec(),
      "latent_mean": mean, "latent_std": std,
  }
  with open(os.path.join(tmp, META), "w") as f:
    json.dump(meta, f, indent=1)
  shutil.rmtree(directory, ignore_errors=True)  # An incomplete earlier attempt.
  os.replace(tmp, directory)
  print(f"wrote {n} latents {tuple(task.image_shape)} to {directory} "
        f"({time.perf_counter() - tic:.0f} s). Unscaled latent mean {mean:.4f}, std {std:.4f}: "
        f"1/std = {1 / max(std, 1e-12):.4f} (the configured scaling factor is "
        f"{task.scaling_factor:.4f})", flush=True)
  return directory


USAGE = ("usage: python -m jaxgen.data.latent_cache --config=FILE[:preset] "
         "--config.data.latent_cache=DIR [--batch_size=N] [--config.a.b=value ...]")


@cli
def main(argv: List[str]) -> int:
  from jaxgen.config import load_config  # pylint: disable=g-import-not-at-top
  spec, overrides, batch_size = None, [], 64
  for arg in argv:
    if arg in ("-h", "--help"):
      print(__doc__)
      return 0
    key, sep, value = arg.partition("=")
    if key == "--config" and sep:
      spec = value
    elif key.startswith("--config.") and sep:
      overrides.append(f"{key[len('--config.'):]}={value}")
    elif key == "--batch_size" and sep and value.isdigit():
      batch_size = int(value)
    else:
      raise ConfigError(f"unrecognised argument {arg!r}. {USAGE}")
  if spec is None:
    raise ConfigError(f"--config is required. {USAGE}")
  write_cache(load_config(spec, overrides), batch_size=batch_size)


if __name__ == "__main__":
  sys.exit(main())
