"""Data: embedded MNIST-5k digits and skimage photos, or any prepared tfds dataset.

Batches are dicts of numpy arrays {"image": float32 (b, H, W, C) in [-1, 1], "label": int32 (b,)}
with b = global batch size / process count. `config.data` fields:

  source          "mnist5k" | "photos" | "tfds" | "mnist_subjects" (multi-subject compositions of
                  mnist5k digits with captions and masks, jaxgen.data.subjects)
  tfds_name       tfds dataset name (source "tfds"), e.g. "cifar10", "imagenet2012"
  tfds_data_dir   tfds data_dir ("" or None: tfds's default, $TFDS_DATA_DIR or ~/tensorflow_datasets)
  image_size      output height = width
  random_flip     horizontal flips in the training stream
  num_classes     must equal the dataset's (mnist5k 10, photos 1, tfds: its label feature)
Optional (read with .get, absent from most configs):
  crops_per_photo photos: random crops per train photo per epoch (default 100)
  random_channel_order  a random order of the image channels per training example (RGB: one of
                  6), so an autoencoder meets colours its training photos lack
  num_threads     reader threads (default 0 for the embedded sources, 8 for tfds)
  prefetch        batches read ahead (default num_threads)
  latent_cache    latent diffusion: a directory written by `python -m jaxgen.data.latent_cache`;
                  the train split then yields {"latent", "label"} batches (jaxgen.data.latent_cache)
"""

from jaxgen.data.base import DatasetInfo
from jaxgen.data.pipeline import DataIterator
from jaxgen.data.pipeline import dataset_info
from jaxgen.data.pipeline import get_source
from jaxgen.data.pipeline import load_arrays
from jaxgen.data.pipeline import make_iterator
from jaxgen.data.pipeline import SOURCES

__all__ = ["DatasetInfo", "DataIterator", "dataset_info", "get_source", "load_arrays",
           "make_iterator", "SOURCES"]
