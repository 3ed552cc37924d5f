"""Fixed kernels as numpy constants: Gaussian window, Sobel, Gabor bank, luma weights.

All kernels are meant for cross-correlation (what `jax.lax.conv_general_dilated`
computes): element [r, c] multiplies the pixel at offset (r - size // 2, c - size // 2)
from the output position, rows going down and columns going right.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

# ITU-R BT.601 luma weights (identity for one channel).
LUMA = (0.299, 0.587, 0.114)


def gaussian_kernel_1d(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """Normalised, symmetric 1-D Gaussian (size,) centred on (size - 1) / 2; SSIM's factor."""
  # NaN fails `0 < sigma` too; a fractional size would make an asymmetric window.
  if not isinstance(size, (int, np.integer)) or size < 1 or not 0 < sigma < math.inf:
    raise ValueError(f'need a whole size >= 1 and a finite sigma > 0, got size={size!r}, '
                     f'sigma={sigma}')
  # (size - 1) / 2 is size // 2 for odd sizes; for even ones it keeps the window
  # symmetric (centred between two taps), as dm_pix.ssim and scipy's window are.
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  g = np.exp(-r ** 2 / (2.0 * sigma ** 2))
  return g / g.sum()


def sobel_kernels() -> np.ndarray:
  """Sobel kernels (2, 3, 3): x (right minus left) then y (down minus up)."""
  sx = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
  return np.stack([sx, sx.T])


def gabor_bank(size: int = 11, sigma: float = 2.5,
               wavelengths: Sequence[float] = (4.0, 8.0),
               orientations: int = 4) -> np.ndarray:
  """Real (cosine) Gabor bank (len(wavelengths) * orientations, size, size), zero-mean.

  Kernels are ordered wavelength-major; orientation k is the angle pi * k / orientations.
  Each kernel has its mean subtracted so that it does not respond to flat regions
  (a texture filter, not a brightness filter).
  """
  if size < 1 or size % 2 == 0:
    raise ValueError(f'Gabor size must be odd and positive, got {size}')
  wavelengths = tuple(float(w) for w in wavelengths)  # an array or a generator too
  # Written so that NaN fails every comparison (a NaN kernel, a NaN loss otherwise).
  if (not 0 < sigma < math.inf or orientations < 1 or not wavelengths
      or not all(0 < w < math.inf for w in wavelengths)):
    raise ValueError('need a finite sigma > 0, orientations >= 1 and at least one '
                     f'wavelength, each finite and > 0; got sigma={sigma}, '
                     f'orientations={orientations}, wavelengths={wavelengths}')
  r = np.arange(size, dtype=np.float64) - size // 2
  y, x = np.meshgrid(r, r, indexing='ij')
  kernels = []
  for lam in wavelengths:
    for k in range(orientations):
      t = math.pi * k / orientations
      xr = x * math.cos(t) + y * math.sin(t)
      yr = -x * math.sin(t) + y * math.cos(t)
      g = np.exp(-(xr ** 2 + yr ** 2) / (2.0 * sigma ** 2)) * np.cos(2.0 * math.pi * xr / lam)
      kernels.append(g - g.mean())
  return np.stack(kernels)
