"""Image grids for the paper's figures (reconstructions, samples, interpolations,
latent traversals) and the checks of the arguments that choose them.

numpy; PNG files are summary.encode_png's, written through avae_jax.files. Images are
float in [0, 1] or uint8 in 0..255, NHWC, with 1 or 3 channels; grids come back as uint8
(H', W', C) ready for PNG or TensorBoard.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Any

import numpy as np

from avae_jax import files
from avae_jax import metrics
from avae_jax import summary


def _check_images(images: np.ndarray, ndim: int, what: str) -> np.ndarray:
  """Returns `images` as an array after checking rank, channel count, dtype and range."""
  images = np.asarray(images)
  if images.ndim != ndim or images.shape[-1] not in (1, 3):
    raise ValueError(f'{what} must have {ndim} axes ending in 1 or 3 channels; '
                     f'got shape {images.shape}.')
  metrics.check_image_dtype(images.dtype, what)
  # Floats on the 0..255 scale were clipped to an all-white figure.
  metrics.check_floats(images, what)
  return images


def grid(images: np.ndarray, ncol: int, pad: int = 1,
         pad_value: float = 1.0) -> np.ndarray:
  """Tiles (N, H, W, C) images row-major into a uint8 (H', W', C) grid.

  Cells are separated and surrounded by `pad` pixels of `pad_value`; cells past
  the last image are left at `pad_value`. With R = ceil(N / ncol) rows,
  H' = R * (H + pad) + pad and W' = ncol * (W + pad) + pad; image k has its
  top-left pixel at (pad + (k // ncol) * (H + pad), pad + (k % ncol) * (W + pad)).
  """
  images = _check_images(images, 4, 'images')
  n, h, w, c = images.shape
  ncol, pad = integer(ncol, 'ncol'), integer(pad, 'pad')
  if ncol < 1 or pad < 0:
    raise ValueError(f'Need ncol >= 1 and pad >= 0; got {ncol}, {pad}.')
  nrow = max(1, math.ceil(n / ncol))
  fill = summary.to_uint8(np.asarray(pad_value, np.float32))
  out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), fill, np.uint8)
  tiles = summary.to_uint8(images)
  for k in range(n):
    top = pad + (k // ncol) * (h + pad)
    left = pad + (k % ncol) * (w + pad)
    out[top:top + h, left:left + w] = tiles[k]
  return out


def integer(value: Any, what: str, minimum: int | None = None) -> int:
  """`value` as an int (of at least `minimum`); a ValueError for other numbers (2.5, True)."""
  wanted = f'{what} must be an integer' + ('' if minimum is None else f' >= {minimum}')
  try:
    if isinstance(value, (bool, np.bool_)):
      raise TypeError
    n = operator.index(value)
  except TypeError:
    raise ValueError(f'{wanted}, got {value!r}') from None
  if minimum is not None and n < minimum:
    raise ValueError(f'{wanted}, got {n}')
  return n


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes an (H, W, C) image (uint8, or float in [0, 1]) as PNG (local or gs://...)."""
  image = np.asarray(image)
  metrics.check_image_dtype(image.dtype, 'image')
  metrics.check_floats(image, 'image')
  files.write_bytes(path, summary.encode_png(image))


def _rows_to_grid(rows: np.ndarray, pad: int, pad_value: float) -> np.ndarray:
  """Grids (R, S, H, W, C) with one row of S images per leading index."""
  r, s = rows.shape[:2]
  # Rows of no images give a blank cell, as no rows do.
  return grid(rows.reshape((r * s,) + rows.shape[2:]), max(s, 1), pad, pad_value)


def reconstructions(x: np.ndarray, x_rec: np.ndarray, n: int, ncol: int | None = None,
                    pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
  """Ground truth above reconstruction (paper Fig. 3a) for the first `n` images.

  With ncol < n the figure is several pairs of rows: inputs 0..ncol-1, their
  reconstructions, inputs ncol..2*ncol-1, their reconstructions, ... Unused
  cells of the last pair are left blank. ncol defaults to n (one pair).
  """
  x = _check_images(x, 4, 'x')
  x_rec = _check_images(x_rec, 4, 'x_rec')
  if x.shape[1:] != x_rec.shape[1:]:
    raise ValueError(f'x {x.shape} and x_rec {x_rec.shape} differ in image shape.')
  n = integer(n, 'n')
  ncol = None if ncol is None else integer(ncol, 'ncol')
  if n < 0 or (ncol is not None and ncol < 1):
    raise ValueError(f'Need n >= 0 and ncol >= 1; got {n}, {ncol}.')
  n = min(n, len(x), len(x_rec))
  # No images (an empty eval split) gives a blank pair of cells, as `grid` gives a blank row.
  ncol = max(n, 1) if ncol is None else ncol
  pairs = max(1, math.ceil(n / ncol))
  # The cells are uint8, as `grid` makes them: uint8 inputs copied into float cells would
  # be read as floats in [0, 1] and clipped to black and white.
  x, x_rec = summary.to_uint8(x), summary.to_uint8(x_rec)
  blank = summary.to_uint8(np.full(x.shape[1:], pad_value, np.float32))
  cells = np.broadcast_to(blank, (pairs, 2, ncol) + x.shape[1:]).copy()
  for k in range(n):
    cells[k // ncol, 0, k % ncol] = x[k]
    cells[k // ncol, 1, k % ncol] = x_rec[k]
  return grid(cells.reshape((-1,) + x.shape[1:]), ncol, pad, pad_value)


def samples(images: np.ndarray, ncol: int, pad: int = 1,
            pad_value: float = 1.0) -> np.ndarray:
  """Grid of generated images (decoder outputs of z ~ N(0, I))."""
  return grid(images, ncol, pad, pad_value)


def interpolations(rows: np.ndarray, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
  """(P, S, H, W, C) interpolated images: one row of S steps per pair."""
  return _rows_to_grid(_check_images(rows, 5, 'rows'), pad, pad_value)


def traversals(images: np.ndarray, pad: int = 1, pad_value: float = 1.0) -> np.ndarray:
  """(D, S, H, W, C) traversal images: one row of S values per latent dimension."""
  return _rows_to_grid(_check_images(images, 5, 'images'), pad, pad_value)


def traversal_axes(dims: Any, values: Any, latent_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """(dims as int32 (K,), values as float32 (S,)), checked for codes of latent_dim entries.

  A scalar counts as a list of one. Casting would make dim 0.7 dim 0 and True dim 1, and
  flattening would make a (2, 2) grid of values four values: each is a ValueError.
  """
  dims, values = np.asarray(dims), np.asarray(values)
  if dims.ndim > 1 or dims.size and dims.dtype.kind not in 'iu':
    raise ValueError(f'dims must be a list of integers, got {dims.tolist()!r}')
  if values.ndim > 1 or values.size and not (values.dtype.kind in 'iuf'
                                             or values.dtype.name == 'bfloat16'):
    raise ValueError(f'values must be a list of numbers, got shape {values.shape} and '
                     f'dtype {values.dtype}')
  if dims.size and (dims.min() < 0 or dims.max() >= latent_dim):
    raise ValueError(f'dims {dims.tolist()} out of range for latent_dim {latent_dim}')
  wide = values.astype(np.float64).reshape(-1)
  with np.errstate(over='ignore'):  # beyond float32's range: inf, refused below
    values = wide.astype(np.float32)
  if not np.isfinite(values).all():  # a NaN or inf code decodes to NaN images
    raise ValueError(f'values must be finite float32 numbers, got {wide.tolist()!r}')
  return dims.astype(np.int32).reshape(-1), values
