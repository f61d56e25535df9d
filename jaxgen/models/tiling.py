"""Tiled autoencoder inference: encode / decode images larger than fits in memory at once.

The input is cut into equal overlapping tiles; a `lax.scan` runs the model on one tile at a
time (peak activation memory is that of one tile, whatever the image size) and accumulates
the outputs with linear blending weights that ramp across the overlaps and are normalised
to sum to one. Tiles start every `stride` pixels; the last tile is aligned to the image end,
so every tile has the same shape (one compilation).

Defaults follow diffusers' AutoencoderDC (512 px tiles every 448 px) at f32, scaled to the
model's compression ratio f: tiles 16*f px, stride 14*f px (16 / 14 latent pixels).

Exactness: blending is a partition of unity, so a model whose outputs do not depend on
context is reproduced exactly. A conv model with receptive-field radius R (output pixels)
is reproduced exactly wherever only one tile contributes, given overlap >= R; inside the
overlaps the result mixes two tiles' values and differs from the untiled one near tile
edges. Models with global attention (DC-AE's EfficientViT stages) differ everywhere, by
an amount that shrinks with tile size.
"""

import functools
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import DataError


def tile_starts(size: int, tile: int, stride: int) -> Tuple[int, ...]:
  """Start offsets of equal tiles covering [0, size): every `stride`, last one at size - tile."""
  if tile >= size:
    return (0,)
  starts = list(range(0, size - tile, stride)) + [size - tile]
  return tuple(sorted(set(starts)))


def _ramp(length: int, overlap: int, start, end, size: int):
  """1-D blend weight of a tile at [start, end) of `size`: linear ramps of `overlap` pixels
  on the sides that have a neighbour (not on the image border), 1 elsewhere."""
  if overlap <= 0:
    return jnp.ones((length,), jnp.float32)
  p = jnp.arange(length, dtype=jnp.float32) + 0.5
  w = jnp.ones((length,), jnp.float32)
  w = jnp.where(start > 0, jnp.minimum(w, p / overlap), w)
  w = jnp.where(end < size, jnp.minimum(w, (length - p) / overlap), w)
  return w


def tiled_map(fn: Callable, params, x: jax.Array, *, tile: Sequence[int],
              stride: Sequence[int], scale: Tuple[int, int]) -> jax.Array:
  """Applies `fn(params, x_tile)` tile by tile and blends: (B, H, W, C) -> (B, H', W', C').

  `tile` / `stride`: (h, w) in input pixels. `scale` = (num, den): an input pixel maps to
  num/den output pixels (encode: (1, f); decode: (f, 1)); tile starts must map to whole
  output pixels. Traceable (the tile loop is a lax.scan); jit it with `params` as argument.
  """
  b, h, w, _ = x.shape
  num, den = scale
  th, tw = min(tile[0], h), min(tile[1], w)
  ys, xs = tile_starts(h, th, stride[0]), tile_starts(w, tw, stride[1])
  for s in ys + xs + (th, tw):
    if (s * num) % den:
      raise DataError(f"tiling: offset/size {s} px does not map to whole output pixels at scale "
                      f"{num}/{den}; use image, tile and stride sizes divisible by {den}.")
  out_spec = jax.eval_shape(lambda p, t: fn(p, t), params,
                            jax.ShapeDtypeStruct((b, th, tw, x.shape[-1]), x.dtype))
  oth, otw, oc = out_spec.shape[1], out_spec.shape[2], out_spec.shape[3]
  oh, ow = h * num // den, w * num // den
  # Overlap of neighbouring tiles in output pixels (the nominal one; the last tile may
  # overlap more, which the weight normalisation absorbs).
  ov_h = (th - min(stride[0], th)) * num // den
  ov_w = (tw - min(stride[1], tw)) * num // den
  grid = np.array([(y0, x0) for y0 in ys for x0 in xs], np.int32)

  def body(carry, start):
    acc, wsum = carry
    y0, x0 = start[0], start[1]
    t = jax.lax.dynamic_slice(x, (0, y0, x0, 0), (b, th, tw, x.shape[-1]))
    o = fn(params, t).astype(jnp.float32)
    oy, ox = y0 * num // den, x0 * num // den
    wy = _ramp(oth, ov_h, oy, oy + oth, oh)
    wx = _ramp(otw, ov_w, ox, ox + otw, ow)
    wt = (wy[:, None] * wx[None, :])[None, :, :, None]
    acc = jax.lax.dynamic_update_slice(
        acc, jax.lax.dynamic_slice(acc, (0, oy, ox, 0), (b, oth, otw, oc)) + wt * o,
        (0, oy, ox, 0))
    wsum = jax.lax.dynamic_update_slice(
        wsum, jax.lax.dynamic_slice(wsum, (0, oy, ox, 0), (1, oth, otw, 1)) + wt,
        (0, oy, ox, 0))
    return (acc, wsum), None

  init = (jnp.zeros((b, oh, ow, oc), jnp.float32), jnp.zeros((1, oh, ow, 1), jnp.float32))
  (acc, wsum), _ = jax.lax.scan(body, init, jnp.asarray(grid))
  return (acc / wsum).astype(out_spec.dtype)


def default_tiles(ratio: int) -> Tuple[int, int]:
  """(tile, stride) in image pixels: diffusers' 512 / 448 at f32, scaled with the ratio."""
  return 16 * ratio, 14 * ratio


@functools.partial(jax.jit, static_argnames=("model", "method", "tile", "stride", "scale"))
def _tiled_apply(model, variables, x, method, tile, stride, scale):
  fn = lambda v, t: model.apply(v, t, method=method)
  return tiled_map(fn, variables, x, tile=tile, stride=stride, scale=scale)


def _sizes(value: Optional[int], default: int) -> Tuple[int, int]:
  value = default if value is None else value
  return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def tiled_encode(model, variables, x: jax.Array, tile: Optional[int] = None,
                 stride: Optional[int] = None) -> jax.Array:
  """`model.apply(variables, x, method="encode")` tile by tile; tile/stride in image pixels.

  Images no larger than a tile are encoded in one piece. H and W must be multiples of the
  compression ratio f, as must tile and stride.
  """
  f = model.spatial_compression_ratio
  default_tile, default_stride = default_tiles(f)
  tile, stride = _sizes(tile, default_tile), _sizes(stride, default_stride)
  if x.shape[1] % f or x.shape[2] % f:
    raise DataError(f"tiled_encode: image {x.shape[1]}x{x.shape[2]} is not a multiple of the "
                    f"compression ratio {f}; pad or crop it.")
  return _tiled_apply(model, variables, x, "encode", tile, stride, (1, f))


def tiled_decode(model, variables, z: jax.Array, tile: Optional[int] = None,
                 stride: Optional[int] = None) -> jax.Array:
  """`model.apply(variables, z, method="decode")` tile by tile; tile/stride in image pixels
  (multiples of f; converted to latent pixels), blending in image space."""
  f = model.spatial_compression_ratio
  default_tile, default_stride = default_tiles(f)
  tile, stride = _sizes(tile, default_tile), _sizes(stride, default_stride)
  if any(s % f for s in tile + stride):
    raise DataError(f"tiled_decode: tile {tile} and stride {stride} must be multiples of {f}")
  latent_tile = tuple(s // f for s in tile)
  latent_stride = tuple(s // f for s in stride)
  return _tiled_apply(model, variables, z, "decode", latent_tile, latent_stride, (f, 1))
