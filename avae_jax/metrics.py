"""Evaluation metrics: sharpness, per-image MSE / cosine similarity, Frechet distance, MIG.

All functions take numpy or jax arrays and compute on the host in float64 (evaluation runs
once over a few thousand images, so accuracy matters more than speed here).
"""

import math
from typing import Any

import numpy as np

from avae_jax.config_lib import MIG_BINS
from avae_jax.filters import LUMA

# Images per chunk in sharpness: bounds the float64 temporaries for large batches.
_CHUNK = 256


def check_image_dtype(dtype: Any, what: str = 'images') -> None:
  """ValueError unless images of `dtype` are uint8 (0..255) or floats ([0, 1]).

  A dtype, not an array: jitted code (inception.preprocess) checks its tracers' dtype.
  """
  dtype = np.dtype(dtype)
  # Other integers (uint16, int32, bool) have no one scale to read them on: read as floats
  # in [0, 1], a figure would draw them black and white.
  if dtype != np.uint8 and not (np.issubdtype(dtype, np.floating) or dtype.name == 'bfloat16'):
    raise ValueError(f'{what}: expected uint8 images or floats in [0, 1], got dtype {dtype}')


# How far outside [0, 1] float images may stray (float rounding).
RANGE_TOLERANCE = 1e-6


def check_unit_range(lo: float, hi: float, what: str,
                     error: type[ValueError] = ValueError) -> None:
  """Raises `error` unless float images of minimum lo and maximum hi lie in [0, 1].

  A NaN image must arrive as a NaN lo or hi (numpy's min and max give it; XLA:CPU's skip
  NaNs), since NaN fails no comparison. RANGE_TOLERANCE allows for float rounding.
  """
  if np.isnan(lo) or np.isnan(hi):
    raise error(f'{what}: float images must lie in [0, 1], found NaN')
  if np.isinf(lo) or np.isinf(hi):
    raise error(f'{what}: float images must lie in [0, 1], found values in '
                f'[{float(lo)}, {float(hi)}] (not finite)')
  if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
    # Enough digits to show the offending value (1.000002 is not "1"); the hint fits
    # images on the 0..255 scale, not a float overshoot, which wants clipping.
    hint = 'divide by 255?' if hi > 2.0 else 'clip to [0, 1]?'
    raise error(f'{what}: float images must lie in [0, 1], found values in '
                f'[{float(lo):.9g}, {float(hi):.9g}] ({hint})')


def unit_floats(images: Any, dtype: Any = np.float64, what: str = 'images') -> np.ndarray:
  """Images as floats on the [0, 1] scale: uint8 divided by 255, floats as they are.

  Float images outside [0, 1] are refused (ValueError): sharpness scales with the square of
  the images' scale and the Inception features with it, so images on the 0..255 scale
  would give numbers without an error. NaNs pass: a diverged model's images give NaN
  metrics, which the evaluation reports as such.
  """
  x = np.asarray(images)
  check_image_dtype(x.dtype, what)
  if x.dtype == np.uint8:
    return x.astype(dtype) / 255.0
  x = x.astype(dtype)
  check_floats(x, what)
  return x


def check_floats(x: np.ndarray, what: str) -> None:
  """Raises ValueError for float images (not uint8) outside [0, 1]; NaNs pass."""
  if x.size and x.dtype != np.uint8:
    if x.dtype.kind != 'f':  # bfloat16 (ml_dtypes): its reduce warns of a NaN
      x = x.astype(np.float32)
    # fmin and fmax skip NaNs (all NaN: NaN, nothing to check).
    lo, hi = np.fmin.reduce(x, axis=None), np.fmax.reduce(x, axis=None)
    if not np.isnan(lo):
      check_unit_range(lo, hi, what)


def _luma(images: np.ndarray) -> np.ndarray:
  """(B, H, W, C) with C in {1, 3} -> (B, H, W) float64 luma."""
  x = unit_floats(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f'expected NHWC images with 1 or 3 channels, got shape {x.shape}')
  if x.shape[-1] == 1:
    return x[..., 0]
  return x @ np.asarray(LUMA, np.float64)


def sharpness(images: Any) -> np.ndarray:
  """(B,) variance of the valid 3x3 Laplacian response of each image's luma ([0, 1] scale)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[1] < 3 or images.shape[2] < 3:
    raise ValueError(f'expected NHWC images of at least 3x3 pixels, got {images.shape}')
  out = np.empty(images.shape[0], np.float64)
  for start in range(0, images.shape[0], _CHUNK):
    g = _luma(images[start:start + _CHUNK])
    # Laplacian [[0,1,0],[1,-4,1],[0,1,0]] with valid padding, written as shifted sums.
    lap = (g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:]
           - 4.0 * g[:, 1:-1, 1:-1])
    out[start:start + _CHUNK] = lap.reshape(lap.shape[0], -1).var(axis=1)
  return out


def _flat_pair(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
  x, y = unit_floats(x), unit_floats(y)
  if x.ndim not in (2, 4):
    # Any leading axis would pass for the batch: one (H, W, C) image gave a value per row.
    hint = ' (one image: pass image[None])' if x.ndim == 3 else ''
    raise ValueError(f'expected a batch of NHWC images (B, H, W, C) or of flattened ones '
                     f'(B, D), got shape {x.shape}{hint}')
  if x.shape != y.shape:
    raise ValueError(f'shape mismatch: {x.shape} vs {y.shape}')
  # The size of an image, not -1, which an empty batch cannot resolve.
  size = math.prod(x.shape[1:])
  return x.reshape(x.shape[0], size), y.reshape(y.shape[0], size)


def mse(x: Any, y: Any) -> np.ndarray:
  """(B,) mean squared error per image (flattened)."""
  x, y = _flat_pair(x, y)
  return np.mean((x - y) ** 2, axis=1)


def cosine_similarity(x: Any, y: Any) -> np.ndarray:
  """(B,) cosine similarity of the flattened images; 0 where either image is all zeros."""
  x, y = _flat_pair(x, y)
  norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
  dots = np.sum(x * y, axis=1)
  # `norms == 0`, not `norms > 0`: an image with a NaN must give NaN, as MSE does, not 0.
  return np.where(norms == 0, 0.0, dots / np.where(norms == 0, 1.0, norms))


def gaussian_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
  """(mean (d,), covariance (d, d)) of (N, d) features, float64, unbiased covariance."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f'expected (N >= 2, d) features, got shape {f.shape}')
  mu = f.mean(axis=0)
  centred = f - mu
  sigma = centred.T @ centred / (f.shape[0] - 1)
  return mu, sigma


def _psd_eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Eigen-decomposition of a symmetric PSD matrix with rounding noise set to zero."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  # Eigenvalues below this are indistinguishable from 0 in float64 (the rank tolerance of
  # numpy.linalg.matrix_rank); keeping them would add sqrt(noise) terms per null direction.
  tol = np.max(np.abs(w), initial=0.0) * a.shape[0] * np.finfo(np.float64).eps
  return np.where(w > tol, w, 0.0), v


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  """The symmetric PSD square root of a symmetric PSD matrix."""
  w, v = _psd_eigh(a)
  return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(sigma1: Any, sigma2: Any) -> float:
  """tr(sqrt(sigma1 @ sigma2)) for PSD matrices, real: the nuclear norm of sqrt(s2) sqrt(s1).

  tr sqrt(sqrt(s1) s2 sqrt(s1)) is the sum of the singular values of M = sqrt(s2) sqrt(s1)
  (M^T M is that product). Singular values of M are accurate to eps * |M|; the eigenvalues
  of M^T M would be accurate only to eps * |M|^2, which loses the small real ones of a
  spread-out spectrum (Inception features have one) and biases FID upwards.
  """
  root1 = _psd_sqrt(np.asarray(sigma1, np.float64))
  root2 = _psd_sqrt(np.asarray(sigma2, np.float64))
  return float(np.sum(np.linalg.svd(root2 @ root1, compute_uv=False)))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, never complex."""
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f'inconsistent shapes: {mu1.shape} {sigma1.shape} {mu2.shape} '
                     f'{sigma2.shape}')
  if not all(np.all(np.isfinite(a)) for a in (mu1, mu2, sigma1, sigma2)):
    raise ValueError('statistics contain NaN or inf')
  if np.array_equal(mu1, mu2) and np.array_equal(sigma1, sigma2):
    return 0.0
  diff = mu1 - mu2
  value = (diff @ diff + np.trace(sigma1) + np.trace(sigma2)
           - 2.0 * trace_sqrt_product(sigma1, sigma2))
  # The distance is >= 0; a tiny negative value is rounding.
  return float(max(value, 0.0))


def frechet_distance_of_features(features1: Any, features2: Any) -> float:
  """frechet_distance of the Gaussians fitted (gaussian_stats) to two (N, d) feature sets.

  With fewer images than dimensions (the default 256 images against Inception's 2048
  features) it never forms a d x d matrix: with A_i the centred features and
  S_i = A_i^T A_i / (n_i - 1), the non-zero eigenvalues of S1 S2 are the squared singular
  values of C = A1 A2^T / sqrt((n1 - 1)(n2 - 1)), so tr sqrt(S1 S2) is C's nuclear norm,
  an n1 x n2 SVD (0.1 s) in place of two d x d eigendecompositions and a d x d SVD (15 s
  per pair at d = 2048). It is accurate for the same reason: singular values, not
  eigenvalues of a product. With as many images as dimensions, it is frechet_distance.
  """
  f1, f2 = (np.asarray(f, np.float64) for f in (features1, features2))
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(
      f1.shape[0], f2.shape[0]) < 2:
    raise ValueError(f'expected (N >= 2, d) features of one d, got shapes {f1.shape} '
                     f'and {f2.shape}')
  if min(f1.shape[0], f2.shape[0]) >= f1.shape[1]:
    return frechet_distance(*gaussian_stats(f1), *gaussian_stats(f2))
  if not (np.all(np.isfinite(f1)) and np.all(np.isfinite(f2))):
    raise ValueError('features contain NaN or inf')
  if np.array_equal(f1, f2):
    return 0.0
  mu1, mu2 = f1.mean(axis=0), f2.mean(axis=0)
  a1, a2 = f1 - mu1, f2 - mu2
  s1, s2 = f1.shape[0] - 1, f2.shape[0] - 1
  diff = mu1 - mu2
  cross = np.sum(np.linalg.svd(a1 @ a2.T, compute_uv=False)) / np.sqrt(s1 * s2)
  value = diff @ diff + np.sum(a1 * a1) / s1 + np.sum(a2 * a2) / s2 - 2.0 * cross
  # The distance is >= 0; a tiny negative value is rounding.
  return float(max(value, 0.0))


def _discretize(codes: np.ndarray, num_bins: int) -> np.ndarray:
  """Histogram-bins each column into num_bins equal-width bins over its range."""
  out = np.empty(codes.shape, np.int64)
  for j in range(codes.shape[1]):
    edges = np.histogram_bin_edges(codes[:, j], bins=num_bins)
    # Interior edges only, so the maximum falls in the last bin: indices 0 .. num_bins-1.
    out[:, j] = np.digitize(codes[:, j], edges[1:-1])
  return out


def _entropy(labels: np.ndarray) -> float:
  p = np.bincount(labels) / labels.shape[0]
  p = p[p > 0]
  return float(-np.sum(p * np.log(p)))


def _mutual_information(a: np.ndarray, b: np.ndarray) -> float:
  """Plug-in mutual information (nats) of two non-negative integer label arrays."""
  na, nb = a.max() + 1, b.max() + 1
  joint = np.bincount(a * nb + b, minlength=na * nb).reshape(na, nb) / a.shape[0]
  pa, pb = joint.sum(axis=1), joint.sum(axis=0)
  nz = joint > 0
  return float(np.sum(joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])))


def shuffled_mig(codes: Any, factors: Any, num_bins: int = MIG_BINS, repeats: int = 5,
                 seed: int = 0) -> float:
  """Mean MIG of `codes` with each dimension shuffled across the images on its own.

  Shuffled codes keep their marginals but carry nothing about the factors: their MIG is
  the plug-in estimator's bias at this many images, the floor to read a model's MIG
  against (it falls as the image count grows).
  """
  rng = np.random.default_rng(seed)
  codes = np.asarray(codes, np.float64)
  return float(np.mean([mig(rng.permuted(codes, axis=0), factors, num_bins)
                        for _ in range(repeats)]))


def mig(codes: Any, factors: Any, num_bins: int = MIG_BINS) -> float:
  """Mutual Information Gap (Chen et al. 2018) of (N, D) codes vs (N, K) discrete factors."""
  codes = np.asarray(codes, np.float64)
  factors = np.asarray(factors)
  if codes.ndim == 1:
    codes = codes[:, None]
  if factors.ndim == 1:
    factors = factors[:, None]
  if codes.ndim != 2 or factors.ndim != 2 or codes.shape[0] != factors.shape[0]:
    raise ValueError(f'expected (N, D) codes and (N, K) factors, got {codes.shape}, '
                     f'{factors.shape}')
  bad = int(np.sum(~np.all(np.isfinite(codes), axis=1)))
  if bad:
    # numpy's own error ('autodetected range of [nan, nan] is not finite') names no codes.
    raise ValueError(f'codes of {bad} of {codes.shape[0]} images hold NaN or inf: MIG is '
                     'undefined')
  binned = _discretize(codes, num_bins)
  gaps = []
  for k in range(factors.shape[1]):
    labels = np.unique(factors[:, k], return_inverse=True)[1].ravel()
    h = _entropy(labels)
    if h <= 0:  # A constant factor carries no information to normalise by.
      continue
    mi = np.sort([_mutual_information(binned[:, j], labels) for j in range(codes.shape[1])])
    second = mi[-2] if mi.shape[0] > 1 else 0.0
    gaps.append((mi[-1] - second) / h)
  if not gaps:
    raise ValueError('all factors are constant: MIG is undefined')
  return float(np.mean(gaps))
