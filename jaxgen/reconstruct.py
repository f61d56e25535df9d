"""python -m jaxgen.reconstruct --checkpoint=DIR IN.png OUT.png [--tile=PX] [--stride=PX] [--raw]

Encodes and decodes one image of any size with an autoencoder and writes the reconstruction.
DIR is a jaxgen training workdir (task "autoencoder"; EMA weights unless --raw), a directory
written by `python -m jaxgen.convert`, or a diffusers / original DC-AE directory.

The image is padded (reflected) to a multiple of the compression ratio f and cropped back
afterwards. Images larger than a tile in either side are encoded and decoded tile by tile
with blended overlaps (`jaxgen.models.tiling`; default tiles 16f px every 14f px, diffusers'
512 / 448 at f32), so memory is bounded by the tile. Prints the PSNR against the input.
Errors print one `error:` line and exit with status 2.
"""

import os
import sys
import time
from typing import List, Optional

import jax
import numpy as np
from PIL import Image

from jaxgen.errors import ConfigError, DataError, cli

USAGE = ("usage: python -m jaxgen.reconstruct --checkpoint=DIR IN.png OUT.png "
         "[--tile=PX] [--stride=PX] [--raw]")


def parse_args(argv: List[str]):
  opts = {"checkpoint": None, "tile": None, "stride": None, "raw": False}
  paths = []
  for arg in argv:
    if arg in ("-h", "--help"):
      print(__doc__)
      sys.exit(0)
    key, sep, value = arg.partition("=")
    if key == "--raw" and not sep:
      opts["raw"] = True
    elif sep and key in ("--checkpoint", "--tile", "--stride"):
      opts[key[2:]] = value
    elif arg.startswith("--"):
      raise ConfigError(f"unrecognised argument {arg!r}. {USAGE}")
    else:
      paths.append(arg)
  if opts["checkpoint"] is None or len(paths) != 2:
    raise ConfigError(f"need --checkpoint=DIR, an input and an output path. {USAGE}")
  for key in ("tile", "stride"):
    if opts[key] is not None:
      try:
        opts[key] = int(opts[key])
      except ValueError:
        raise ConfigError(f"--{key} must be an integer number of pixels") from None
  return opts, paths[0], paths[1]


def read_image(path: str) -> np.ndarray:
  """RGB float32 (H, W, 3) in [-1, 1]."""
  if not os.path.isfile(path):
    raise DataError(f"input image {path} does not exist")
  try:
    with Image.open(path) as im:
      arr = np.asarray(im.convert("RGB"))
  except OSError as e:
    raise DataError(f"{path} is not a readable image ({e})") from None
  return arr.astype(np.float32) / 127.5 - 1.0


def pad_to_multiple(x: np.ndarray, f: int) -> np.ndarray:
  """(H, W, C) padded at the bottom/right to multiples of f (reflected, edge if too small)."""
  h, w = x.shape[:2]
  ph, pw = -h % f, -w % f
  mode = "reflect" if ph < h and pw < w else "edge"
  return np.pad(x, ((0, ph), (0, pw), (0, 0)), mode=mode)


def reconstruct_image(model, variables, image: np.ndarray, tile: Optional[int] = None,
                      stride: Optional[int] = None) -> np.ndarray:
  """(H, W, 3) in [-1, 1] -> its reconstruction, same shape; tiled when larger than a tile."""
  from jaxgen.models import tiling  # pylint: disable=g-import-not-at-top
  f = model.spatial_compression_ratio
  default_tile, default_stride = tiling.default_tiles(f)
  tile = default_tile if tile is None else tile
  if stride is None:  # The default overlap ratio (1/8 of the tile), in whole multiples of f.
    stride = max(f, tile * default_stride // default_tile // f * f)
  for name, v in (("tile", tile), ("stride", stride)):
    if v <= 0 or v % f:
      raise ConfigError(f"--{name}={v} must be a positive multiple of the compression ratio {f}")
  if stride > tile:
    raise ConfigError(f"--stride={stride} is larger than --tile={tile}: tiles would leave gaps")
  h, w = image.shape[:2]
  x = pad_to_multiple(image, f)[None]
  if max(x.shape[1:3]) > tile:
    z = tiling.tiled_encode(model, variables, x, tile=tile, stride=stride)
    y = tiling.tiled_decode(model, variables, z, tile=tile, stride=stride)
  else:
    z = jax.jit(lambda v, x: model.apply(v, x, method="encode"))(variables, x)
    y = jax.jit(lambda v, z: model.apply(v, z, method="decode"))(variables, z)
  return np.asarray(y)[0, :h, :w]


@cli
def main(argv: List[str]) -> int:
  opts, src, dst = parse_args(argv)
  from jaxgen.convert.saved import load_autoencoder  # pylint: disable=g-import-not-at-top
  from jaxgen.metrics import image_quality  # pylint: disable=g-import-not-at-top
  from jaxgen import visualize  # pylint: disable=g-import-not-at-top
  model, variables = load_autoencoder(opts["checkpoint"],
                                      use_ema=False if opts["raw"] else None)
  image = read_image(src)
  tic = time.perf_counter()
  out = reconstruct_image(model, variables, image, opts["tile"], opts["stride"])
  seconds = time.perf_counter() - tic
  os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
  Image.fromarray(visualize.to_uint8(out)).save(dst)
  psnr = float(image_quality.psnr(image[None], out[None])[0])
  print(f"reconstructed {src} ({image.shape[1]}x{image.shape[0]}) in {seconds:.1f} s: "
        f"PSNR {psnr:.2f} dB; wrote {dst}", flush=True)


if __name__ == "__main__":
  sys.exit(main())
