"""Shared pieces of weight conversion: reading safetensors checkpoints and laying out tensors.

PyTorch stores convs as OIHW and Linear as (out, in); Flax wants HWIO and (in, out).
Converters build a flat {"a/b/kernel": array} map and `unflatten` it; `check_complete`
names every missing, unexpected or mis-shaped tensor in one error.
"""

import json
import os
from typing import Dict, Mapping

import numpy as np

from jaxgen.errors import WeightsError


def read_model_dir(path: str, weights_name: str):
  """Returns (config dict, {name: np.ndarray}) from a hub-style directory.

  Only safetensors are read: pickled .bin/.pt files can run code when loaded.
  """
  config_path = os.path.join(path, "config.json")
  weights_path = os.path.join(path, weights_name)
  if not os.path.isfile(config_path):
    raise WeightsError(f"{config_path} not found: pass a directory holding config.json and "
                       f"{weights_name} (as save_pretrained writes it).")
  if not os.path.isfile(weights_path):
    present = sorted(os.listdir(path))
    raise WeightsError(f"{weights_path} not found (directory holds {present}). Only "
                       "safetensors are read; convert a .bin with safetensors.torch.save_file.")
  with open(config_path) as f:
    config = json.load(f)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return config, load_file(weights_path)


def conv_kernel(w):
  """OIHW -> HWIO (depthwise OIHW with I=1 becomes HW1O, as flax's feature_group_count wants)."""
  return np.transpose(np.asarray(w), (2, 3, 1, 0))


def dense_kernel(w):
  """(out, in) -> (in, out); 1x1-conv weights (O, I, 1, 1) are accepted too."""
  w = np.asarray(w)
  if w.ndim == 4:
    w = w[:, :, 0, 0]
  return w.T


def unflatten(flat: Mapping[str, np.ndarray]) -> Dict:
  """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
  tree: Dict = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping, prefix: str = "") -> Dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, key))
    else:
      out[key] = v
  return out


def check_complete(converted: Mapping, expected: Mapping, unused_source_keys=()):
  """Raises WeightsError naming every tensor that is missing, unexpected or mis-shaped.

  `converted` and `expected` are nested variable dicts (expected from `jax.eval_shape(init)`).
  """
  got, want = flatten(converted), flatten(expected)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  shape = [f"{k}: checkpoint {tuple(np.shape(got[k]))} vs model {tuple(want[k].shape)}"
           for k in sorted(set(got) & set(want)) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  problems = []
  if missing:
    problems.append(f"missing from checkpoint ({len(missing)}): {missing[:20]}")
  if extra:
    problems.append(f"not used by the model ({len(extra)}): {extra[:20]}")
  if shape:
    problems.append(f"shape mismatch ({len(shape)}): {shape[:20]}")
  if unused_source_keys:
    problems.append(f"source tensors not converted ({len(unused_source_keys)}): "
                    f"{sorted(unused_source_keys)[:20]}")
  if problems:
    raise WeightsError("weights do not match the model config; " + "; ".join(problems) +
                       ". Check that config.json belongs to these weights.")
