"""Tests of avae_jax.filters against scipy / scikit-image and hand derivations."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.signal import windows
from skimage.filters import gabor_kernel

from avae_jax import filters


@pytest.mark.parametrize('size,sigma', [(11, 1.5), (7, 1.0), (5, 2.0)])
def test_gaussian_window_matches_scipy(size, sigma):
  # SSIM's 2-D window is the outer product of the 1-D kernel (separable, losses.py).
  g1 = filters.gaussian_kernel_1d(size, sigma)
  w = np.outer(g1, g1)
  assert w.shape == (size, size)
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
  # Reference 1: scipy's sampled Gaussian, normalised, outer product.
  g = windows.gaussian(size, sigma)
  np.testing.assert_allclose(w, np.outer(g, g) / np.outer(g, g).sum(), rtol=1e-12)
  # Reference 2: the impulse response of scipy.ndimage.gaussian_filter truncated at the
  # same radius (what scikit-image's SSIM with gaussian_weights uses).
  delta = np.zeros((size, size))
  delta[size // 2, size // 2] = 1.0
  radius = size // 2
  ref = ndimage.gaussian_filter(delta, sigma, mode='constant', truncate=radius / sigma)
  np.testing.assert_allclose(w, ref, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize('size,sigma', [(10, 1.5), (4, 1.0)])
def test_even_gaussian_window_is_symmetric_like_scipy(size, sigma):
  # scipy's window of even length M is sampled at n - (M - 1) / 2: symmetric.
  g = windows.gaussian(size, sigma)
  np.testing.assert_allclose(filters.gaussian_kernel_1d(size, sigma), g / g.sum(),
                             rtol=1e-12)


def test_gaussian_window_rejects_bad_sigma():
  # NaN gave a window of NaNs, 5.5 six asymmetric taps.
  for size, sigma in ((11, 0.0), (5, math.nan), (5, math.inf), (5.5, 1.0), (0, 1.0)):
    with pytest.raises(ValueError) as info:
      filters.gaussian_kernel_1d(size, sigma)
    assert str(info.value) == ('need a whole size >= 1 and a finite sigma > 0, got '
                               f'size={size!r}, sigma={sigma}')


def _image(seed=0, shape=(12, 15)):
  return np.random.default_rng(seed).random(shape)


def test_sobel_kernels_match_scipy_sobel():
  k = filters.sobel_kernels()
  assert k.shape == (2, 3, 3)
  img = _image()
  # scipy.ndimage.sobel(axis=1) is the derivative along columns (x), axis=0 along rows (y),
  # both cross-correlations; our kernels are used with cross-correlation too.
  np.testing.assert_allclose(ndimage.correlate(img, k[0], mode='constant'),
                             ndimage.sobel(img, axis=1, mode='constant'), atol=1e-12)
  np.testing.assert_allclose(ndimage.correlate(img, k[1], mode='constant'),
                             ndimage.sobel(img, axis=0, mode='constant'), atol=1e-12)


def test_sobel_sign_convention_on_ramps():
  k = filters.sobel_kernels()
  r = np.arange(9.0)
  ramp_right = np.tile(r, (9, 1))  # increases to the right (x)
  ramp_down = ramp_right.T         # increases downwards (y)
  inner = (slice(2, -2), slice(2, -2))
  np.testing.assert_allclose(ndimage.correlate(ramp_right, k[0])[inner], 8.0)
  np.testing.assert_allclose(ndimage.correlate(ramp_right, k[1])[inner], 0.0)
  np.testing.assert_allclose(ndimage.correlate(ramp_down, k[1])[inner], 8.0)


def test_gabor_bank_matches_skimage_real_part():
  size, sigma, wavelengths, orientations = 11, 2.5, (4.0, 8.0), 4
  bank = filters.gabor_bank(size, sigma, wavelengths, orientations)
  assert bank.shape == (8, 11, 11)
  i = 0
  for lam in wavelengths:  # wavelength-major order
    for k in range(orientations):
      theta = math.pi * k / orientations
      # skimage's kernel is centred and at least 13x13 with n_stds=3: crop the centre.
      ref = gabor_kernel(1.0 / lam, theta=theta, sigma_x=sigma, sigma_y=sigma, n_stds=3)
      cy, cx = ref.shape[0] // 2, ref.shape[1] // 2
      ref = ref.real[cy - 5:cy + 6, cx - 5:cx + 6] * (2 * math.pi * sigma ** 2)
      np.testing.assert_allclose(bank[i], ref - ref.mean(), atol=1e-12)
      i += 1


def test_gabor_bank_is_zero_mean_and_ignores_flat_images():
  bank = filters.gabor_bank(9, 2.0, (3.0, 5.0, 7.0), 6)
  assert bank.shape == (18, 9, 9)
  np.testing.assert_allclose(bank.sum(axis=(1, 2)), 0.0, atol=1e-12)
  flat = np.full((20, 20), 0.37)
  for k in bank:
    np.testing.assert_allclose(ndimage.correlate(flat, k, mode='nearest'), 0.0, atol=1e-12)


def test_gabor_kernels_are_tuned_to_their_grating():
  wavelengths, orientations = (4.0, 8.0), 4
  bank = filters.gabor_bank(11, 2.5, wavelengths, orientations)
  yy, xx = np.mgrid[0:48, 0:48].astype(np.float64)
  i = 0
  for lam in wavelengths:
    for k in range(orientations):
      t = math.pi * k / orientations
      grating = np.cos(2 * math.pi * (xx * math.cos(t) + yy * math.sin(t)) / lam)
      energy = [np.mean(ndimage.correlate(grating, b, mode='wrap')[8:-8, 8:-8] ** 2)
                for b in bank]
      assert int(np.argmax(energy)) == i
      i += 1


def test_gabor_bank_rejects_bad_settings():
  with pytest.raises(ValueError, match='odd'):
    filters.gabor_bank(size=10)
  # A zero wavelength divides by zero; a negative one mirrors the bank without a word.
  for wavelengths in ((4.0, 0.0), (-4.0,), (math.nan,), (4.0, math.inf), ()):
    with pytest.raises(ValueError, match='each finite and > 0'):
      filters.gabor_bank(wavelengths=wavelengths)
  with pytest.raises(ValueError, match=r'finite sigma > 0.*got sigma=nan'):
    filters.gabor_bank(sigma=math.nan)  # a bank of NaNs
  with pytest.raises(ValueError, match=r'finite sigma > 0.*got sigma=inf'):
    filters.gabor_bank(sigma=math.inf)  # a flat envelope: no Gabor filter
  # An array or a generator of wavelengths is the same bank (the array failed on its
  # truth value, the generator on an empty stack).
  want = filters.gabor_bank(wavelengths=(4.0, 8.0))
  np.testing.assert_array_equal(filters.gabor_bank(wavelengths=np.array([4.0, 8.0])), want)
  np.testing.assert_array_equal(filters.gabor_bank(wavelengths=(w for w in (4, 8))), want)
