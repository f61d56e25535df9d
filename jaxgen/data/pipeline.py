"""Sharded, checkpointable batch iterators over the data sources (grain MapDataset).

The pipeline is one global example stream that every process indexes the same way:

  records -> shuffle (fresh permutation per epoch) -> repeat -> per-example decode/augment
          -> blocks of B / P -> process p keeps blocks p, p + P, p + 2P, ...

so global batch k is always stream positions [k*B, (k+1)*B) in order, and process p holds its
contiguous rows [p*B/P, (p+1)*B/P): the global array `sharding.put_batch` assembles (process
after process, as the devices of a process-major mesh hold the batch) is the same array for
any process count, and an example's crop/flip depends only on (seed, its stream position).
Together with the train step's per-example noise (keyed to the example's row of the global
batch, jaxgen/diffusion/losses.py) a run follows the same trajectory on 1 or N processes. The
iterator state is therefore one number, the count of global examples consumed: the same on
every process, and restorable under another process count or another batch size that divides
it.
"""

import functools
import os
from typing import Iterator, Optional, Tuple

import grain
import ml_collections
import numpy as np

from jaxgen.data import embedded
from jaxgen.data import latent_cache
from jaxgen.data import subjects
from jaxgen.data import tfds_source
from jaxgen.data import transforms
from jaxgen.data.base import DatasetInfo
from jaxgen.errors import ConfigError, DataError

SOURCES = {"mnist5k": embedded.Mnist5k, "photos": embedded.Photos, "tfds": tfds_source.Tfds,
           "mnist_subjects": subjects.MnistSubjects}
# Reader threads: in-memory sources are GIL-bound (threads only contend), tfds decodes images.
DEFAULT_THREADS = {"mnist5k": 0, "photos": 0, "tfds": 8, "mnist_subjects": 0}
# load_arrays refuses splits larger than this in memory (use make_iterator instead).
MAX_ARRAY_BYTES = 16 * 2**30


def get_source(data_config: ml_collections.ConfigDict):
  """Builds the configured source and checks the config against it."""
  name = data_config.source
  if name not in SOURCES:
    raise ConfigError(f"unknown data.source {name!r}; choices: {sorted(SOURCES)}")
  if int(data_config.image_size) < 1:
    raise ConfigError(f"data.image_size must be positive, got {data_config.image_size}")
  source = SOURCES[name](data_config)
  if int(data_config.num_classes) != source.info.num_classes:
    what = name if name != "tfds" else f"tfds dataset {source.dataset!r}"
    raise ConfigError(f"data.num_classes={data_config.num_classes} but {what} has "
                      f"{source.info.num_classes} classes; set data.num_classes="
                      f"{source.info.num_classes}")
  return source


def dataset_info(data_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Image shape, class count and train size, without reading the images."""
  if data_config.get("latent_cache"):  # Training from latents needs no image dataset.
    return latent_cache.LatentCache(data_config).info
  return get_source(data_config).info


def _source_for(data_config: ml_collections.ConfigDict, split: str):
  """The source of `split`: a latent cache replaces the images of the train split."""
  if split == "train" and data_config.get("latent_cache"):
    return latent_cache.LatentCache(data_config)
  return get_source(data_config)


def _derived_seed(seed: int, stream: int) -> int:
  """Independent 32-bit seeds for the shuffle and the augmentations from one user seed."""
  return int(np.random.SeedSequence([int(seed) % 2**64, stream]).generate_state(1)[0])


def _description(data_config, split: str) -> str:
  name = data_config.source
  if name == "tfds":
    name = f"tfds:{data_config.tfds_name}"
  if split == "train" and data_config.get("latent_cache"):
    name = f"latent_cache:{os.path.abspath(str(data_config.latent_cache))}:{name}"
  return f"{name}/{split}@{int(data_config.image_size)}"


class DataIterator:
  """Batches {"image": float32 (b, H, W, C), "label": int32 (b,)}; get_state()/set_state().

  `num_examples`: the examples this process's stream yields in all (None when it repeats
  forever).
  """

  def __init__(self, grain_iterator, *, global_batch_size: int, seed: int, description: str,
               shuffle: bool, num_examples: Optional[int] = None):
    self._it = grain_iterator
    self.num_examples = num_examples
    self._global_batch_size = global_batch_size
    self._meta = {"data": description, "seed": int(seed), "shuffle": bool(shuffle)}

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> dict:
    """JSON-serialisable; identical on every process."""
    examples = self._it.get_state()["next_index"] * self._global_batch_size
    return {"examples_consumed": int(examples), **self._meta}

  def set_state(self, state: dict) -> None:
    """Continues exactly after the batches that produced `state`."""
    for key, value in self._meta.items():
      if state.get(key) != value:
        raise DataError(
            f"the saved data iterator state has {key}={state.get(key)!r}, but this run uses "
            f"{key}={value!r}; the saved position means nothing in this stream. Resume with the "
            "same data config and seed, or start a new workdir.")
    examples = int(state["examples_consumed"])
    if examples % self._global_batch_size:
      raise DataError(f"the saved data position ({examples} examples) is not a multiple of the "
                      f"global batch size {self._global_batch_size}; resume with a batch size "
                      "that divides it")
    self._it.set_state({"next_index": examples // self._global_batch_size})

  def close(self) -> None:
    self._it.close()


def _examples_of_process(total: int, block: int, process_index: int, process_count: int,
                         drop_remainder: bool) -> int:
  """Examples in blocks process_index, process_index + process_count, ... of `total` examples
  cut into blocks of `block` (the last one partial unless dropped)."""
  blocks = total // block if drop_remainder else -(-total // block)
  mine = max(0, -(-(blocks - process_index) // process_count))
  if mine and not drop_remainder and (blocks - 1) % process_count == process_index:
    return (mine - 1) * block + total - (blocks - 1) * block
  return mine * block


def _make_example(source, split: str, flip: bool, permute: bool, record, rng=None) -> dict:
  example = source.example(split, record, rng)
  if flip:
    example["image"] = transforms.maybe_flip(example["image"], rng)
  if permute:
    example["image"] = transforms.permute_channels(example["image"], rng)
  return example


def make_iterator(data_config: ml_collections.ConfigDict, *, split: str = "train",
                  global_batch_size: int, seed: int, shuffle: bool = True,
                  num_epochs: Optional[int] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None, drop_remainder: bool = True,
                  augment: Optional[bool] = None) -> DataIterator:
  """This process's share (global_batch_size // process_count per step) of the batch stream.

  Args:
    data_config: `config.data`.
    split: "train" / "test" (tfds: any split name; "test" falls back to "validation").
    global_batch_size: examples per step over all processes.
    seed: fixes the shuffle and the augmentations.
    shuffle: a fresh deterministic permutation per epoch.
    num_epochs: None repeats forever; N stops after N epochs.
    process_index, process_count: the shard (default: this JAX process of all).
    drop_remainder: with finite epochs, drop the final partial global batch (every process
      then yields the same number of batches); False keeps it, which can leave processes with
      unequal batch counts (fine on one process, e.g. evaluation).
    augment: random crops (photos) and, with data.random_flip, flips (with
      data.random_channel_order, channel permutations); default: split == "train".
  """
  source = _source_for(data_config, split)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index {process_index} is not in [0, {process_count})")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ConfigError(f"global batch size {global_batch_size} must be a positive multiple of "
                      f"the process count {process_count}")
  if num_epochs is not None and num_epochs < 1:
    raise ConfigError(f"num_epochs must be None (forever) or >= 1, got {num_epochs}")
  augment = split == "train" if augment is None else augment
  records = source.records(split, augment)
  if len(records) == 0:  # pylint: disable=g-explicit-length-test
    raise DataError(f"{_description(data_config, split)} has no examples")

  ds = grain.MapDataset.source(records)
  if shuffle:
    ds = ds.shuffle(seed=_derived_seed(seed, 0))
  ds = ds.repeat(num_epochs)  # Shuffle before repeat: each epoch is permuted afresh.
  if num_epochs is not None and drop_remainder:
    ds = ds[:len(ds) // global_batch_size * global_batch_size]
  # A latent cache flips by itself (it picks the stored latent of the flipped image).
  flip = bool(augment and data_config.random_flip and source.name != latent_cache.LatentCache.name)
  permute = bool(augment and data_config.get("random_channel_order"))
  if permute and source.name == latent_cache.LatentCache.name:
    raise ConfigError("data.random_channel_order permutes image channels, but the stream comes "
                      "from a latent cache; turn it off or train on images")
  example = functools.partial(_make_example, source, split, flip, permute)
  if augment:
    # Seeded by stream position (before sharding): independent of the process count.
    ds = ds.random_map(example, seed=_derived_seed(seed, 1))
  else:
    ds = ds.map(example)
  per_process = global_batch_size // process_count
  num_examples = None
  if num_epochs is not None:
    num_examples = _examples_of_process(len(ds), per_process, process_index, process_count,
                                        drop_remainder)
  # Contiguous blocks, not every P-th example: the row order of a global batch (and with it
  # every per-row random draw of the step) must not depend on the process count.
  ds = ds.batch(per_process, drop_remainder=drop_remainder)[process_index::process_count]
  threads = int(data_config.get("num_threads", DEFAULT_THREADS[data_config.source]))
  prefetch = int(data_config.get("prefetch", threads))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
  return DataIterator(iter(it), global_batch_size=global_batch_size, seed=seed,
                      description=_description(data_config, split), shuffle=shuffle,
                      num_examples=num_examples)


def load_arrays(data_config: ml_collections.ConfigDict,
                split: str) -> Tuple[np.ndarray, np.ndarray]:
  """A whole split in memory, unshuffled and unaugmented: (float32 NHWC in [-1, 1], int32).

  photos: the grid crops of the split's photos (train photos for "train").
  """
  if data_config.get("latent_cache"):  # Always the images, never the cached latents.
    data_config = ml_collections.ConfigDict(dict(data_config.to_dict(), latent_cache=""))
  source = get_source(data_config)
  if hasattr(source, "arrays"):
    images, labels = source.arrays(split)
    return images.copy(), labels.copy()
  records = source.records(split, False)
  nbytes = len(records) * int(np.prod(source.info.image_shape)) * 4
  if nbytes > MAX_ARRAY_BYTES:
    raise DataError(f"{_description(data_config, split)} needs {nbytes / 2**30:.0f} GiB as "
                    "float32 arrays; iterate it with make_iterator instead")
  batches = list(make_iterator(data_config, split=split, global_batch_size=256, seed=0,
                               shuffle=False, num_epochs=1, process_index=0, process_count=1,
                               drop_remainder=False, augment=False))
  return (np.concatenate([b["image"] for b in batches]),
          np.concatenate([b["label"] for b in batches]))
