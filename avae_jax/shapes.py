"""Procedural dSprites-like dataset: anti-aliased shapes drawn in numpy, with ground truth.

Each image shows one shape on a black background. Six factors, each a few discrete
values, make 4 * 4 * 5 * 8 * 8 * 6 = 30,720 distinct images:

  shape     square, ellipse, triangle, heart
  scale     4 sizes (radius 0.55 .. 1.0 of MAX_RADIUS times the image side)
  rotation  5 angles in [0, 90) degrees (within one period of the square, so every
            angle gives a different picture for every shape)
  x, y      8 positions of the shape centre, 0.28 .. 0.72 of the image side
            (x to the right, y downwards, like array columns and rows)
  colour    6 colours with distinct luma, so the factor survives grayscale

The eval split is `num_eval` distinct factor combinations drawn at random; the train
split draws its images uniformly, with replacement, from the other combinations, so no
eval image is also a training image (drawn independently, a training set of 8192 images
would cover a quarter of the combinations, and of 65,536 nearly nine in ten).

Images are rendered by supersampling: `supersample`**2 point samples per pixel (an
n-rooks lattice, see `sample_offsets`), each tested against the shape's implicit
inside-test, averaged to a coverage in [0, 1], times the colour.
"""

from __future__ import annotations

import numpy as np

from avae_jax import filters

FACTOR_NAMES = ('shape', 'scale', 'rotation', 'x', 'y', 'colour')
SHAPE_NAMES = ('square', 'ellipse', 'triangle', 'heart')
COLOURS = np.array(
    [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
     [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=np.float32)
# Largest shape radius as a fraction of the image side; with the position grid below a
# shape of scale 1 at an extreme position still fits inside the image.
MAX_RADIUS = 0.2
SCALES = np.array([0.55, 0.7, 0.85, 1.0], dtype=np.float32)
ROTATIONS = (np.arange(5) * (np.pi / 2 / 5)).astype(np.float32)
POSITIONS = np.linspace(0.28, 0.72, 8).astype(np.float32)
LUMA = np.array(filters.LUMA, dtype=np.float32)

# Codes folded into the seed: the held-out combinations and the training draws come
# from their own streams. data.batches seeds epoch e's order with (seed, e), so these
# are also the streams of epochs 0 and 2's orders: an example's factors come from one
# draw and its place in the epoch from another, so nothing ties the two, and separate
# codes would change every seed's dataset (and the published study's shapes runs).
_TRAIN_STREAM, _HELD_OUT_STREAM = 0, 2
SPLITS = ('train', 'eval')
# The smallest image side at which every factor combination renders as its own image
# (30,714 distinct images of the 30,720 at 11 pixels, 30,630 at 8): below it an eval
# image could also be a training image, so the dataset refuses it (data.py).
MIN_IMAGE_SIZE = 12


def factor_values() -> tuple[np.ndarray, ...]:
  """The value grid of every factor, in FACTOR_NAMES order; factors index into these."""
  return (np.arange(len(SHAPE_NAMES)), SCALES.copy(), ROTATIONS.copy(),
          POSITIONS.copy(), POSITIONS.copy(), COLOURS.copy())


def factor_sizes() -> tuple[int, ...]:
  """How many values each factor takes, in FACTOR_NAMES order."""
  return tuple(len(v) for v in factor_values())


def num_combinations() -> int:
  """How many distinct images (factor combinations) there are: 30,720."""
  return int(np.prod(factor_sizes()))


def sample_factors(seed: int, split: str, num_train: int, num_eval: int) -> np.ndarray:
  """(num, 6) int32 factor indices of `split` (num_train or num_eval rows), from the seed.

  Eval is num_eval distinct combinations, a random sample without replacement (at most
  half of all combinations); train is num_train uniform draws from the other ones. The
  draws, fixed for reproducibility: number the combinations in row-major order of
  factor_sizes(); eval is the first num_eval of the permutation that
  numpy.random.default_rng(SeedSequence([seed, 2])) makes of them, and train indexes the
  others, in increasing order, with default_rng(SeedSequence([seed, 0])).integers.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
  seed = _check_int('seed', seed, 0)
  num_train, num_eval = _check_int('num_train', num_train, 0), _check_int('num_eval', num_eval, 0)
  total = num_combinations()
  if not 0 < num_eval <= total // 2:
    raise ValueError(f'num_eval must be in 1..{total // 2} (at most half of the {total} '
                     f'distinct images are held out), got {num_eval}')
  held_out = np.random.default_rng(
      np.random.SeedSequence([seed, _HELD_OUT_STREAM])).permutation(total)
  if split == 'eval':
    flat = held_out[:num_eval]
  else:
    rest = np.sort(held_out[num_eval:])
    rng = np.random.default_rng(np.random.SeedSequence([seed, _TRAIN_STREAM]))
    flat = rest[rng.integers(0, len(rest), size=num_train)]
  return np.stack(np.unravel_index(flat, factor_sizes()), axis=1).astype(np.int32)


def _inside(shape: int, u: np.ndarray, w: np.ndarray) -> np.ndarray:
  """Inside-test of one shape in its unit frame (u right, w up), radius about 1."""
  if shape == 0:  # square, half-side 0.7 (corners at radius 0.99)
    return np.maximum(np.abs(u), np.abs(w)) <= 0.7
  if shape == 1:  # ellipse with semi-axes 1.0 and 0.6
    return u * u + (w * w) * (1.0 / 0.36) <= 1.0
  if shape == 2:  # equilateral triangle pointing up, circumradius 1.05, centroid at 0
    half_in = 0.525  # inradius = circumradius / 2
    c, s = np.float32(np.sqrt(3.0) / 2), np.float32(0.5)
    return ((-w <= half_in) & (c * u + s * w <= half_in) & (-c * u + s * w <= half_in))
  if shape == 3:  # heart curve (x^2 + y^2 - 1)^3 <= x^2 y^3, scaled to fit radius 1
    x = u * np.float32(1.3)
    y = w * np.float32(1.3) + np.float32(0.2)
    q = x * x + y * y - 1.0
    return q * q * q <= x * x * y * y * y
  raise ValueError(f'unknown shape index {shape}')


# Largest distance from the centre to the boundary, over the shapes, in the unit frame
# (the triangle's vertices); it bounds the window that rendering has to sample, and
# with POSITIONS and MAX_RADIUS keeps every shape inside the image.
EXTENT = 1.05


def sample_offsets(supersample: int) -> tuple[np.ndarray, np.ndarray]:
  """Sub-pixel sample positions (x, y) in [0, 1): an n-rooks lattice of supersample**2.

  Every sample has its own row and column (x_k = (k + 1/2) / n, y_k = (g k mod n + 1/2) / n
  with the generator g that spreads the points furthest apart), so an axis-aligned edge
  is resolved to 1/n of a pixel instead of the 1/supersample of a regular grid.
  """
  n = int(supersample) ** 2
  k = np.arange(n)
  best, best_g = -1.0, 1
  for g in range(1, n):
    if np.gcd(g, n) != 1:
      continue
    pts = np.stack([k, (g * k) % n], 1) / n
    d = np.abs(pts[:, None] - pts[None])
    d = np.minimum(d, 1 - d)  # toroidal: the pattern tiles the image
    dist = np.sqrt((d ** 2).sum(-1)) + np.eye(n) * 9
    if dist.min() > best + 1e-9:
      best, best_g = dist.min(), g
  return ((k + 0.5) / n).astype(np.float32), (((best_g * k) % n + 0.5) / n).astype(np.float32)


def _check_int(name: str, value: int, minimum: int = 1) -> int:
  """`value` as an int; ValueError unless it is a whole number >= minimum."""
  # numpy failed on a negative size with 'negative dimensions', divided by zero at
  # supersample 0, and took 0, 5.5 or a negative supersample without a word (and a seed
  # of 1.7 as 1).
  whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
  if not whole or value < minimum:
    raise ValueError(f'{name} must be a whole number >= {minimum}, got {value!r}')
  return int(value)


def coverage(factors: np.ndarray, image_size: int, supersample: int = 4,
             chunk: int = 256) -> np.ndarray:
  """(N, S, S) float32 fraction of each pixel covered by the shape of each factor row."""
  image_size = _check_int('image_size', image_size)
  supersample = _check_int('supersample', supersample)
  chunk = _check_int('chunk', chunk)  # a step of 0 or less: no rows, or range()'s error
  factors = np.asarray(factors)
  if factors.ndim != 2 or factors.shape[1] != len(FACTOR_NAMES):
    raise ValueError(f'factors must be (N, {len(FACTOR_NAMES)}), got {factors.shape}')
  if factors.size and factors.dtype.kind not in 'iu':  # numpy indexes with integers only
    raise ValueError(f'factors must be integer indices, got dtype {factors.dtype}')
  sizes = np.array(factor_sizes())
  if factors.size and (factors.min() < 0 or np.any(factors.max(axis=0) >= sizes)):
    raise ValueError(f'factor indices out of range; sizes are {tuple(sizes)}')
  n, size = len(factors), int(image_size)
  off_x, off_y = sample_offsets(supersample)
  out = np.zeros((n, size, size), np.float32)
  for scale in range(len(SCALES)):
    radius = np.float32(MAX_RADIUS * SCALES[scale])
    # Only a window around the shape is sampled: the same side for all images of this
    # scale, so that the window renders as one array; +2 pixels for partial coverage.
    win = min(size, int(np.ceil(2 * EXTENT * radius * size)) + 2)
    r = np.arange(win, dtype=np.float32)
    # Sample positions within the window, in pixels: (win, samples) for x and for y.
    sx = r[:, None] + off_x[None, :]
    sy = r[:, None] + off_y[None, :]
    rows_of_scale = np.flatnonzero(factors[:, 1] == scale)
    for start in range(0, len(rows_of_scale), chunk):
      rows = rows_of_scale[start:start + chunk]
      f = factors[rows]
      cx, cy = POSITIONS[f[:, 3]] * size, POSITIONS[f[:, 4]] * size  # centres, pixels
      ox = np.clip(np.floor(cx - win / 2).astype(np.int64), 0, size - win)
      oy = np.clip(np.floor(cy - win / 2).astype(np.int64), 0, size - win)
      inv = np.float32(1.0 / (radius * size))
      # (m, 1, win, samples) and (m, win, 1, samples): broadcast to every sample.
      dx = (((ox - cx).astype(np.float32)[:, None, None] + sx[None]) * inv)[:, None]
      dy = (((oy - cy).astype(np.float32)[:, None, None] + sy[None]) * inv)[:, :, None]
      theta = ROTATIONS[f[:, 2]][:, None, None, None]
      cos, sin = np.cos(theta), np.sin(theta)
      cov = np.empty((len(rows), win, win), np.float32)
      for shape in range(len(SHAPE_NAMES)):
        sel = np.flatnonzero(f[:, 0] == shape)
        if not sel.size:
          continue
        # Rotate the image frame into the shape frame; w points up (image y points down).
        u = dx[sel] * cos[sel] + dy[sel] * sin[sel]
        w = dx[sel] * sin[sel] - dy[sel] * cos[sel]
        inside = _inside(shape, u, w)
        cov[sel] = inside.sum(axis=-1, dtype=np.int32) * np.float32(1.0 / len(off_x))
      out[rows[:, None, None], (oy[:, None, None] + np.arange(win)[None, :, None]),
          (ox[:, None, None] + np.arange(win)[None, None, :])] = cov
  return out


def render(factors: np.ndarray, image_size: int, channels: int = 3,
           supersample: int = 4) -> np.ndarray:
  """(N, S, S, channels) float32 images in [0, 1] for the given factor indices."""
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}')
  factors = np.asarray(factors)
  cov = coverage(factors, image_size, supersample)
  colour = COLOURS[factors[:, 5]] if len(factors) else np.zeros((0, 3), np.float32)
  if channels == 1:
    colour = (colour @ LUMA)[:, None]
  return cov[..., None] * colour[:, None, None, :]


def render_uint8(factors: np.ndarray, image_size: int, channels: int = 3,
                 supersample: int = 4) -> np.ndarray:
  """render() quantised to uint8 (4x less memory for a whole dataset)."""
  return np.round(render(factors, image_size, channels, supersample) * 255).astype(np.uint8)
