"""Shared pieces of weight conversion: reading checkpoints safely and laying out tensors.

Reading: `read_safetensors(path)` is the one reader of .safetensors files (single or sharded
through a `*.safetensors.index.json`), `read_json(path, what)` of config files and
`read_model_dir(dir, weights_name)` of hub-style directories. Every way a file can be bad on
disk (missing, a broken hub-cache link, empty, truncated by an interrupted download, a pickle
or an HTML error page saved under the .safetensors name, invalid JSON) raises one WeightsError
naming the file and what was expected, so the CLIs print one `error:` line and exit 2.

Layout: PyTorch stores convs as OIHW and Linear as (out, in); Flax wants HWIO and (in, out).
Converters build a flat {"a/b/kernel": array} map and `unflatten` it; `check_complete`
names every missing, unexpected or mis-shaped tensor in one error, and `convert_model_dir`
(or `naming_source`) prefixes it with the weights file it came from.
"""

import contextlib
import json
import math
import os
import struct
from typing import Any, Callable, Dict, Mapping, Type

import numpy as np

from jaxgen.errors import JaxgenError, WeightsError

# safetensors dtype names -> numpy dtypes (little-endian, as the format stores them). bfloat16
# and float8 come from ml_dtypes (a jax dependency); safetensors.numpy cannot read them.
_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# The safetensors library refuses larger headers; a bigger length means this is no such file.
_MAX_HEADER_BYTES = 100_000_000
_REDOWNLOAD = "an interrupted download? download it again"
_SAFETENSORS = "a safetensors file (as save_pretrained / safetensors.torch.save_file write it)"


def describe_exception(e: BaseException, limit: int = 300) -> str:
  """`Type: message` on one line (library messages span lines; an `error:` line must not)."""
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _check_readable_file(path: str, what: str, error: Type[JaxgenError] = WeightsError) -> None:
  """Raises `error` unless `path` is an existing regular file (names broken links)."""
  if os.path.islink(path) and not os.path.exists(path):
    raise error(f"{path} is a broken link to {os.readlink(path)} (expected {what}; the hub "
                f"cache holds no file there: {_REDOWNLOAD})")
  if os.path.isdir(path):
    raise error(f"{path} is a directory; expected {what}")
  if not os.path.isfile(path):
    parent = os.path.dirname(path) or "."
    present = sorted(os.listdir(parent)) if os.path.isdir(parent) else None
    where = (f" ({parent} holds {present[:20]}{' ...' if len(present) > 20 else ''})"
             if present is not None else f" ({parent} does not exist)")
    raise error(f"{path} not found{where}; expected {what}")


def read_json(path: str, what: str = "a JSON config",
              error: Type[JaxgenError] = WeightsError) -> Dict[str, Any]:
  """The JSON object in `path`; `error` naming the file and `what` was expected when it is
  missing, empty, invalid JSON (a truncated download, an HTML error page) or not an object."""
  _check_readable_file(path, what, error)
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise error(f"{path} is empty; expected {what} (an interrupted download or write?)")
  try:
    value = json.loads(raw.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    kind = "an HTML page (e.g. a download's error page)" if _looks_like_html(raw) else "invalid"
    raise error(f"{path} is {kind}, not JSON ({describe_exception(e, 120)}); expected {what} "
                "(an interrupted download or write?)") from None
  if not isinstance(value, dict):
    raise error(f"{path} holds a JSON {type(value).__name__}; expected {what} (a JSON object)")
  return value


def _looks_like_html(head: bytes) -> bool:
  start = head.lstrip()[:15].lower()
  return start.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body"))


def _not_safetensors_reason(head: bytes) -> str:
  """What a file that is no safetensors file looks like, from its first bytes."""
  if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
    return ("is a Python pickle (a torch.save .bin/.pt checkpoint under a .safetensors name?), "
            "never loaded as unpickling can run code: re-save its state dict with "
            "safetensors.torch.save_file or download the .safetensors file")
  if head.startswith(b"PK\x03\x04"):
    return ("is a zip archive (a torch.save checkpoint under a .safetensors name?): re-save its "
            "state dict with safetensors.torch.save_file or download the .safetensors file")
  if head.startswith(b"version https://git-lfs"):
    return ("is a Git LFS pointer, not the weights: run `git lfs pull` in the clone (or "
            "download with huggingface_hub)")
  if _looks_like_html(head):
    return ("is an HTML page (a download's error or login page saved as the weights?), not "
            "weights: download it again (gated hub models need `huggingface-cli login`)")
  if head.lstrip().startswith(b"{"):
    return "is a JSON text (a download's error response?), not weights: download it again"
  return "is not a safetensors file"


def _sharded_index(path: str) -> str:
  """The index file that stands for `path` (`X.safetensors` -> `X.safetensors.index.json`)."""
  return path if path.endswith(".index.json") else path + ".index.json"


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """{name: np.ndarray} from a .safetensors file, validated before any tensor is read.

  The one reader of safetensors weights in jaxgen (never a pickle: those can run code). When
  `path` does not exist but `path + ".index.json"` does (big hub checkpoints, split into
  `*-0000k-of-0000n.safetensors` shards), every shard the index lists is read and merged;
  an `.index.json` path is read that way too. Tensors keep their stored dtype (bfloat16 and
  float8 as ml_dtypes types). Raises WeightsError naming the file and the problem: missing,
  empty, truncated, a pickle / zip / HTML page / LFS pointer, or an inconsistent header.
  """
  if path.endswith(".index.json") or (not os.path.lexists(path) and
                                      os.path.isfile(_sharded_index(path))):
    return _read_sharded(_sharded_index(path))
  _check_readable_file(path, _SAFETENSORS)
  size = os.path.getsize(path)
  if size == 0:
    raise WeightsError(f"{path} is empty (0 bytes; {_REDOWNLOAD}); expected {_SAFETENSORS}")
  with open(path, "rb") as f:
    head = f.read(64)
    if size < 8:
      raise WeightsError(f"{path} holds only {size} bytes: truncated ({_REDOWNLOAD}); "
                         f"expected {_SAFETENSORS}")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > min(size - 8, _MAX_HEADER_BYTES) or head[8:9] != b"{":
      if head[8:9] == b"{" and header_len <= _MAX_HEADER_BYTES:
        raise WeightsError(f"{path} is truncated: its header alone is {header_len:,} bytes but "
                           f"the file holds {size:,} ({_REDOWNLOAD})")
      raise WeightsError(f"{path} {_not_safetensors_reason(head)}; expected {_SAFETENSORS}")
    f.seek(8)
    try:
      header = json.loads(f.read(header_len).decode("utf-8"))
      if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (UnicodeDecodeError, ValueError) as e:
      raise WeightsError(f"{path}: corrupt safetensors header ({describe_exception(e, 120)}); "
                         f"expected {_SAFETENSORS}") from None
    header.pop("__metadata__", None)
    entries = sorted(((_tensor_entry(path, name, spec), name) for name, spec in header.items()),
                     key=lambda entry: entry[0][2])
    data_len, end = size - 8 - header_len, 0
    for (_, _, begin, stop), name in entries:
      if begin != end:  # As the safetensors library requires: contiguous, no overlap or gap.
        raise WeightsError(f"{path}: corrupt safetensors header (tensor {name!r} starts at byte "
                           f"{begin:,} of the data, the previous one ends at {end:,}); "
                           f"expected {_SAFETENSORS}")
      end = stop
    if end > data_len:
      raise WeightsError(f"{path} is truncated: it holds {size:,} bytes, its header describes "
                         f"{8 + header_len + end:,} ({_REDOWNLOAD})")
    if end < data_len:
      raise WeightsError(f"{path} has {data_len - end:,} bytes after its last tensor: not a file "
                         f"safetensors wrote (two downloads appended?); expected {_SAFETENSORS}")
    state = {}
    for (dtype, shape, begin, stop), name in entries:
      array = np.empty(shape, dtype)
      f.seek(8 + header_len + begin)
      # Read straight into the array: one copy, writable (as safetensors.numpy returns it).
      if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != stop - begin:
        raise WeightsError(f"{path}: could not read tensor {name!r} ({_REDOWNLOAD})")
      state[name] = array
  return {name: state[name] for name in header}


def _tensor_entry(path: str, name: str, spec: Any):
  """(numpy dtype, shape, data begin, data end) of one header entry, validated."""
  try:
    dtype_name, shape, (begin, stop) = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
      raise ValueError
  except (TypeError, KeyError, ValueError):
    raise WeightsError(f"{path}: corrupt safetensors header entry for {name!r} ({spec!r:.200}); "
                       f"expected {_SAFETENSORS}") from None
  if dtype_name in _DTYPES:
    dtype = np.dtype(_DTYPES[dtype_name])
  elif dtype_name in _ML_DTYPES:
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    dtype = np.dtype(getattr(ml_dtypes, _ML_DTYPES[dtype_name]))
  else:
    raise WeightsError(f"{path}: tensor {name!r} has dtype {dtype_name!r}, which jaxgen cannot "
                       f"read; supported: {sorted(_DTYPES) + sorted(_ML_DTYPES)}")
  if stop - begin != math.prod(shape) * dtype.itemsize:
    raise WeightsError(f"{path}: tensor {name!r} is {dtype_name} {tuple(shape)} "
                       f"({math.prod(shape) * dtype.itemsize:,} bytes) but its header gives it "
                       f"{stop - begin:,} bytes; expected {_SAFETENSORS}")
  return dtype, tuple(shape), begin, stop


def _read_sharded(index_path: str) -> Dict[str, np.ndarray]:
  """Every shard a `*.safetensors.index.json` lists, merged; checks each listed tensor is there."""
  what = ('a sharded-checkpoint index ({"weight_map": {tensor: shard file}}, as save_pretrained '
          "writes it)")
  weight_map = read_json(index_path, what).get("weight_map")
  if not (isinstance(weight_map, dict) and weight_map and
          all(isinstance(v, str) for v in weight_map.values())):
    raise WeightsError(f"{index_path} has no weight_map of tensor -> shard file; expected {what}")
  directory = os.path.dirname(index_path)
  state: Dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = os.path.join(directory, shard)
    if not os.path.lexists(shard_path):
      raise WeightsError(f"{shard_path} not found: {index_path} lists it as a shard "
                         f"({_REDOWNLOAD})")
    part = read_safetensors(shard_path)
    absent = sorted(k for k, v in weight_map.items() if v == shard and k not in part)
    if absent:
      raise WeightsError(f"{shard_path} lacks {len(absent)} tensors that {index_path} puts "
                         f"there: {absent[:10]} (a shard of another download?)")
    state.update(part)
  return state


def weights_file(path: str, weights_name: str) -> str:
  """The file holding `path`'s weights: `weights_name`, or its sharded index if only that is."""
  single = os.path.join(path, weights_name)
  index = _sharded_index(single)
  return index if not os.path.lexists(single) and os.path.isfile(index) else single


def read_model_dir(path: str, weights_name: str):
  """Returns (config dict, {name: np.ndarray}) from a hub-style directory.

  Only safetensors are read (single or sharded): pickled .bin/.pt files can run code when
  loaded. Every bad file raises a WeightsError naming it.
  """
  if not os.path.isdir(path):
    what = "is a file" if os.path.exists(path) else "does not exist"
    raise WeightsError(f"{path} {what}; expected a model directory holding config.json and "
                       f"{weights_name} (as save_pretrained writes it)")
  config = read_json(os.path.join(path, "config.json"),
                     f"the model config that save_pretrained writes next to {weights_name}")
  weights_path = os.path.join(path, weights_name)
  if not os.path.lexists(weights_path) and not os.path.isfile(_sharded_index(weights_path)):
    present = sorted(os.listdir(path))
    pickled = [p for p in present if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = (f"; it holds pickled weights {pickled}, which are not read (unpickling can run "
            "code): re-save them with safetensors.torch.save_file or save_pretrained"
            if pickled else "")
    raise WeightsError(f"{weights_path} not found (nor a sharded {weights_name}.index.json; "
                       f"{path} holds {present[:20]}){hint}")
  return config, read_safetensors(weights_path)


@contextlib.contextmanager
def naming_source(path: str):
  """Inside, a JaxgenError whose message does not name `path` is re-raised prefixed with it
  (check_complete knows tensors, not the file they were read from)."""
  try:
    yield
  except JaxgenError as e:
    if path in str(e):
      raise
    raise type(e)(f"{path}: {e}") from None


def convert_model_dir(path: str, weights_name: str,
                      convert_state: Callable[[Mapping, Mapping[str, np.ndarray]], Any]):
  """`convert_state(config, state)` of a hub-style directory; its errors name the weights file."""
  config, state = read_model_dir(path, weights_name)
  with naming_source(weights_file(path, weights_name)):
    return convert_state(config, state)


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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # torch.save files (zip or legacy pickle)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """{name: np.ndarray} of a single-file PyTorch state dict, floating tensors as float32.

  A .safetensors file goes through `read_safetensors`; a torch.save file (.bin / .pt / .pth /
  .ckpt) through `torch.load(weights_only=True)`: tensors and plain containers only, so a
  pickle that would run code (or build any other object) is refused (WeightsError), as is a
  file that is no state dict.
  """
  if path.endswith(".safetensors") or path.endswith(".index.json"):
    return read_safetensors(path)
  _check_readable_file(path, "a PyTorch state dict (torch.save) or a .safetensors file")
  import zipfile  # pylint: disable=g-import-not-at-top
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightsError(f"reading {path} needs torch (pip install torch); or save the state dict "
                       "as .safetensors where torch is installed") from None
  try:
    # weights_only: no code runs while unpickling. mmap (zip files): tensors are read on use.
    state = torch.load(path, map_location="cpu", weights_only=True,
                       mmap=zipfile.is_zipfile(path))
  except Exception as e:  # pylint: disable=broad-except
    raise WeightsError(f"{path}: not loadable with torch.load(weights_only=True) "
                       f"({describe_exception(e)}); expected a tensor state dict (a pickle "
                       "that would run code is refused; truncated by a download?)") from None
  tensors = state if isinstance(state, Mapping) else {}
  tensors = {k: v for k, v in tensors.items() if isinstance(k, str) and torch.is_tensor(v)}
  if not tensors:
    raise WeightsError(f"{path} holds a {type(state).__name__} without tensors, not a state "
                       "dict {name: tensor}")
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in tensors.items()}
