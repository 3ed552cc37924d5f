"""Tests of avae_jax.losses against scikit-image, dm-pix, scipy and numpy references."""

import functools
import math

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, special, stats
from skimage import data, transform
from skimage.metrics import structural_similarity

import references
from avae_jax import filters
from avae_jax import losses
from configs import default

ALL_TERMS = {'mae': 1.0, 'mse': 1.0, 'dssim': 1.0, 'sobel': 1.0, 'gabor': 1.0}
# Compiled once per (shape, N, estimator): eager op-by-op dispatch is the slow part here.
_tc = jax.jit(losses.total_correlation, static_argnums=(3, 4))


# ----------------------------------------------------------------------------- images


@functools.lru_cache(maxsize=None)
def _natural(name: str) -> np.ndarray:
  """A 64x64 natural image from skimage.data, float64 in [0, 1], (H, W, C)."""
  if name == 'astronaut':
    return transform.resize(data.astronaut(), (64, 64), anti_aliasing=True)
  return transform.resize(data.camera(), (64, 64), anti_aliasing=True)[..., None]


def _distorted(img: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
  if kind == 'noise':
    rng = np.random.default_rng(seed)
    return np.clip(img + 0.08 * rng.standard_normal(img.shape), 0.0, 1.0)
  if kind == 'blur':  # per channel, never across channels
    return np.stack([ndimage.gaussian_filter(img[..., c], 1.2)
                     for c in range(img.shape[-1])], axis=-1)
  if kind == 'shift':
    return np.roll(img, 2, axis=1)
  raise ValueError(kind)


def _f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


def _luma_np(x: np.ndarray) -> np.ndarray:
  """(B, H, W, C) -> (B, H, W) luma, in numpy."""
  if x.shape[-1] == 1:
    return x[..., 0]
  return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


# ------------------------------------------------------------------------------- SSIM


def _skimage_ssim(x, y, data_range=1.0, channel_axis=None):
  """scikit-image's SSIM with the Gaussian window and population statistics of ours."""
  return structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, data_range=data_range,
                               channel_axis=channel_axis)


@pytest.mark.parametrize('name', ['astronaut', 'camera'])
def test_ssim_matches_skimage_and_dm_pix_on_natural_images(name):
  img = _natural(name)
  others = [_distorted(img, 'noise'), _distorted(img, 'blur'), _distorted(img, 'shift')]
  x = np.stack([img] * len(others))
  y = np.stack(others)
  ours = np.asarray(losses.ssim(*_f32(x, y)))
  # skimage averages the map over the valid region only (it crops (win_size - 1) // 2 = 5
  # pixels on each side, win_size = 2 * int(3.5 * 1.5 + 0.5) + 1 = 11), per channel then
  # over channels: the same mean as a valid-padded 11x11 window.
  ref = np.array([_skimage_ssim(img, o, channel_axis=-1) for o in others])
  np.testing.assert_allclose(ours, ref, atol=2e-5)
  pix = np.asarray(dm_pix.ssim(*_f32(x, y)))
  np.testing.assert_allclose(ours, pix, atol=2e-5)


@pytest.mark.parametrize('filter_size', [10, 9])
def test_ssim_with_other_window_sizes_matches_dm_pix(filter_size):
  # dm-pix's Gaussian window is symmetric for even sizes too (taps at n - (size - 1) / 2).
  img = _natural('astronaut')[:40, :40]
  x = np.stack([img, img])
  y = np.stack([_distorted(img, 'noise'), _distorted(img, 'blur')])
  ours = np.asarray(losses.ssim(*_f32(x, y), filter_size=filter_size))
  ref = np.asarray(dm_pix.ssim(*_f32(x, y), filter_size=filter_size))
  np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_ssim_max_val_scales_both_constants_as_skimage_data_range():
  """max_val L sets C1 = (k1 L)^2 and C2 = (k2 L)^2: images in [0, 2] at max_val=2 match
  scikit-image's SSIM with data_range=2 (a darkened copy makes C1 matter, noise C2)."""
  img = 2.0 * _natural('astronaut')[:32, :32]
  others = [_distorted(img / 2.0, 'noise') * 2.0, 0.5 * img]
  ours = np.asarray(losses.ssim(*_f32(np.stack([img, img]), np.stack(others)), max_val=2.0))
  ref = [_skimage_ssim(img, o, data_range=2.0, channel_axis=-1) for o in others]
  np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_ssim_gradient_matches_dm_pix():
  # dm-pix computes SSIM with a depthwise convolution: its autodiff gradient is an
  # independent reference for the banded-matrix form's (with respect to both images).
  img = _natural('astronaut')[:40, :40]
  x = np.stack([img, _distorted(img, 'blur')])
  y = np.stack([_distorted(img, 'noise'), _distorted(img, 'shift')])
  for argnum in (0, 1):
    ours = np.asarray(jax.grad(lambda a, b: losses.ssim(a, b).sum(), argnum)(*_f32(x, y)))
    ref = np.asarray(jax.grad(lambda a, b: dm_pix.ssim(a, b).sum(), argnum)(*_f32(x, y)))
    assert np.abs(ref).max() > 1e-4
    np.testing.assert_allclose(ours, ref, atol=2e-3 * np.abs(ref).max())


@pytest.mark.parametrize('case', ['flat', 'low_contrast'])
def test_ssim_gradient_matches_float64_finite_differences(case):
  # Where the local variances are tiny, float32 cancellation in E[x^2] - E[x]^2 matters
  # (dm-pix's float32 gradient is off by its own size on a flat image): the reference is
  # scikit-image's SSIM in float64, differentiated by central differences.
  rng = np.random.default_rng(7)
  if case == 'flat':
    x = np.full((14, 13), 0.4)
  else:
    x = 0.5 + 0.03 * _natural('camera')[20:34, 20:33, 0]
  y = np.clip(x + 0.01 * rng.standard_normal(x.shape), 0.0, 1.0)
  h = 1e-6
  ref = np.zeros_like(y)
  for idx in np.ndindex(*y.shape):
    up, down = y.copy(), y.copy()
    up[idx] += h
    down[idx] -= h
    ref[idx] = (_skimage_ssim(x, up) - _skimage_ssim(x, down)) / (2 * h)
  ours = jax.grad(lambda b: losses.ssim(*_f32(x[None, ..., None]), b).sum())(
      jnp.asarray(y[None, ..., None], jnp.float32))
  assert np.abs(ref).max() > 1e-2
  np.testing.assert_allclose(np.asarray(ours)[0, ..., 0], ref, atol=1e-3 * np.abs(ref).max())


def test_ssim_is_the_mean_over_the_valid_region():
  # A distortion near the border weighs differently in the valid mean (what skimage
  # reports: its map cropped by 5 pixels per side) and in the mean of a full-size map.
  img = _natural('camera')[..., 0]
  other = img.copy()
  other[:, :4] = 0.0
  ours = float(losses.ssim(*_f32(img[None, ..., None], other[None, ..., None]))[0])
  mean, full_map = structural_similarity(
      img, other, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=1.0, full=True)
  np.testing.assert_allclose(mean, full_map[5:-5, 5:-5].mean(), rtol=1e-12)
  np.testing.assert_allclose(ours, mean, atol=2e-5)
  assert abs(ours - full_map.mean()) > 1e-3


def test_ssim_identity_dssim_and_small_images():
  x = jnp.asarray(_natural('astronaut')[None], jnp.float32)
  np.testing.assert_allclose(losses.ssim(x, x), [1.0], atol=1e-6)
  np.testing.assert_allclose(losses.dssim(x, x), [0.0], atol=1e-6)
  y = _distorted(_natural('astronaut'), 'noise')
  ref = structural_similarity(_natural('astronaut'), y, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0, channel_axis=-1)
  np.testing.assert_allclose(losses.dssim(x, jnp.asarray(y[None], jnp.float32)), [1.0 - ref],
                             atol=2e-5)
  # The 11x11 window must fit: one side a pixel short is refused too (not a NaN SSIM).
  for shape in ((1, 8, 8, 1), (1, 10, 20, 1), (1, 20, 10, 1)):
    with pytest.raises(ValueError, match='needs images at least that large'):
      losses.ssim(jnp.zeros(shape), jnp.zeros(shape))
  flat = jnp.zeros((1, 11, 20, 1))
  np.testing.assert_allclose(losses.ssim(flat, flat), [1.0], atol=1e-6)
  # One window exactly: its SSIM is scikit-image's (which averages the one valid pixel).
  rng = np.random.default_rng(0)
  a, b = rng.random((11, 11)), rng.random((11, 11))
  ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
  np.testing.assert_allclose(losses.ssim(*_f32(a[None, :, :, None], b[None, :, :, None])),
                             [ref], atol=2e-5)


# ------------------------------------------------------------------------ simple terms


def test_to_gray_mae_mse():
  rng = np.random.default_rng(3)
  x, y = rng.random((2, 3, 16, 16, 3))
  np.testing.assert_allclose(losses.to_gray(*_f32(x))[..., 0], _luma_np(x), atol=1e-6)
  g = rng.random((2, 16, 16, 1))
  np.testing.assert_array_equal(losses.to_gray(*_f32(g)), np.float32(g))
  np.testing.assert_allclose(losses.mae(*_f32(x, y)), np.abs(x - y).mean(axis=(1, 2, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.mse(*_f32(x, y)), ((x - y) ** 2).mean(axis=(1, 2, 3)),
                             rtol=1e-5)
  # Matched: without the check, the luma product's own shape error is a ValueError too.
  with pytest.raises(ValueError, match='to_gray needs 1 or 3 channels, got 2'):
    losses.to_gray(jnp.zeros((1, 4, 4, 2)))
  # Integer pixels (0..255) would be read as [0, 1] values: refused.
  with pytest.raises(ValueError, match='floating-point images in \\[0, 1\\].*uint8'):
    losses.mse(np.zeros((1, 4, 4, 1), np.uint8), np.zeros((1, 4, 4, 1), np.float32))


# --------------------------------------------------------------------- Sobel and Gabor


def _response_loss_np(x, y, kernels):
  """Mean over kernels and pixels of (corr(luma y) - corr(luma x))^2, zero padding."""
  gx, gy = _luma_np(x), _luma_np(y)
  out = []
  for b in range(x.shape[0]):
    d = [ndimage.correlate(gy[b], k, mode='constant', cval=0.0)
         - ndimage.correlate(gx[b], k, mode='constant', cval=0.0) for k in kernels]
    out.append(np.mean(np.square(d)))
  return np.array(out)


@pytest.mark.parametrize('name', ['astronaut', 'camera'])
def test_sobel_and_gabor_losses_match_scipy(name):
  img = _natural(name)[:32, 16:48]
  x = np.stack([img, img])
  y = np.stack([_distorted(img, 'noise'), _distorted(img, 'blur')])
  sob = np.asarray(losses.sobel_loss(*_f32(x, y)))
  np.testing.assert_allclose(sob, _response_loss_np(x, y, filters.sobel_kernels()), rtol=1e-4)
  bank = filters.gabor_bank()
  gab = np.asarray(losses.gabor_loss(*_f32(x, y), bank))
  np.testing.assert_allclose(gab, _response_loss_np(x, y, bank), rtol=1e-4)


def test_response_losses_match_scipy_for_any_bank():
  # The filters run as sums of separable terms (an SVD of each kernel): exact for
  # Gabor banks of other orientations and sizes, and for full-rank random kernels.
  rng = np.random.default_rng(12)
  img = _natural('camera')[8:38, 4:34]
  x = np.stack([img, _distorted(img, 'blur')])
  y = np.stack([_distorted(img, 'noise'), img])
  for bank in (filters.gabor_bank(7, 1.5, (3.0, 5.0), 6), rng.normal(size=(3, 5, 5))):
    gab = np.asarray(losses.gabor_loss(*_f32(x, y), bank))
    np.testing.assert_allclose(gab, _response_loss_np(x, y, bank), rtol=1e-4)


def test_default_banks_need_few_separable_and_gram_terms():
  # Sobel x and y: one separable term each. Per wavelength, the Gabor kernels at 0 and 90
  # degrees are one term each and the 45/135 degree pair shares two (cos(a +- b) =
  # cos a cos b -+ sin a sin b), once the mean removal, one box filter shared by all eight
  # kernels, is split off: 2 * 4 + 1 instead of the 20 terms of each kernel's own SVD.
  gabor = losses.GaborSpec().bank()
  u, v, mix = losses._separable_terms(gabor)
  assert u.shape == v.shape == (9, 11) and mix.shape == (9, 8)
  np.testing.assert_allclose(np.einsum('ri,rj,rk->kij', u, v, mix), gabor, atol=1e-6)
  box = [r for r in range(9) if np.ptp(u[r]) == 0 and np.ptp(v[r]) == 0]
  assert len(box) == 1 and np.all(mix[box[0]] != 0)
  assert losses._separable_terms(filters.sobel_kernels())[0].shape == (2, 3)
  # The Gram operators, sum_k R_k^T R_k, in Kronecker terms (documented counts; that they
  # are the fewest is checked against scipy's G in the next test).
  assert losses._gram_terms(filters.sobel_kernels(), 96, 96)[0].shape == (2, 96, 96)
  assert losses._gram_terms(gabor, 96, 96)[0].shape == (13, 96, 96)


def _correlation_matrix(kernel, h, w):
  """The (h w, h w) matrix of scipy's zero-padded correlation with kernel on h x w images."""
  cols = []
  for i in range(h * w):
    e = np.zeros(h * w)
    e[i] = 1.0
    cols.append(ndimage.correlate(e.reshape(h, w), kernel, mode='constant').ravel())
  return np.stack(cols, axis=1)


@pytest.mark.parametrize('which', ['sobel', 'gabor', 'random'])
def test_gram_terms_are_the_sum_of_the_filters_normal_matrices(which):
  # G = sum_k R_k^T R_k with R_k built column by column from scipy; a side shorter than
  # the 11x11 kernels and a non-square image exercise the borders.
  bank = {'sobel': filters.sobel_kernels(), 'gabor': filters.gabor_bank(),
          'random': np.random.default_rng(5).normal(size=(3, 5, 5))}[which]
  h, w = 9, 13
  ref = sum(r.T @ r for r in (_correlation_matrix(k, h, w) for k in bank))
  p, q = losses._gram_terms(bank, h, w)
  got = sum(np.kron(a.astype(np.float64), b.astype(np.float64)) for a, b in zip(p, q))
  np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())
  # As few terms as there can be: the Kronecker rank of G, the rank of its rearrangement
  # vec(A) vec(B)^T (Van Loan and Pitsianis), from the scipy matrix.
  singular = np.linalg.svd(ref.reshape(h, w, h, w).transpose(0, 2, 1, 3).reshape(h * h, w * w),
                           compute_uv=False)
  assert len(p) == np.sum(singular > 1e-9 * singular[0])


def test_response_loss_gradients_match_scipy_adjoint():
  # d/dy of mean_k,pixels (R_k d)^2 with d = luma(y) - luma(x) is
  # luma weights * 2 / (n H W) * sum_k R_k^T R_k d, and R_k^T (the adjoint of zero-padded
  # correlation) is zero-padded convolution with the same kernel.
  img = _natural('astronaut')[:24, 8:36]
  x = np.stack([img, _distorted(img, 'blur')])
  y = np.stack([_distorted(img, 'noise'), img])
  d = _luma_np(y) - _luma_np(x)
  gabor = filters.gabor_bank()
  for bank, fn in ((filters.sobel_kernels(), losses.sobel_loss),
                   (gabor, lambda a, b: losses.gabor_loss(a, b, gabor))):
    ct = np.array([0.7, -1.3])
    grad = jax.grad(lambda b: jnp.sum(fn(jnp.asarray(x, jnp.float32), b) * ct))(
        jnp.asarray(y, jnp.float32))
    scale = 2.0 / (len(bank) * d.shape[1] * d.shape[2])
    for i in range(2):
      back = sum(ndimage.convolve(ndimage.correlate(d[i], k, mode='constant'), k,
                                  mode='constant') for k in bank)
      ref = ct[i] * scale * back[..., None] * np.asarray(filters.LUMA)
      np.testing.assert_allclose(np.asarray(grad[i]), ref, atol=1e-5 * np.abs(ref).max())


def test_responses_match_scipy_correlate():
  # The banks' responses in their direct form (`_responses`), cross-correlation with zero
  # 'same' padding. (Convolution would equal correlation with the kernel flipped: for
  # Sobel that flips the sign.)
  gray = _luma_np(_natural('astronaut')[None, 8:40, 8:40])[0]
  g = jnp.asarray(gray[None, :, :, None], jnp.float32)
  sobel = filters.sobel_kernels()
  resps = {}
  for name, bank in (('sobel', sobel), ('gabor', losses.GaborSpec().bank())):
    resps[name] = np.asarray(losses._responses(g, bank))
    for c, k in enumerate(bank):
      ref = ndimage.correlate(gray, k, mode='constant', cval=0.0)
      np.testing.assert_allclose(resps[name][c, 0], ref, atol=1e-5)
  flipped = ndimage.convolve(gray, sobel[0], mode='constant')
  np.testing.assert_allclose(resps['sobel'][0, 0], -flipped, atol=1e-5)


def test_targets_get_no_gradient():
  rng = np.random.default_rng(4)
  x, y = _f32(*rng.random((2, 2, 16, 16, 3)))
  bank = filters.gabor_bank()
  for fn in (losses.sobel_loss, lambda a, b: losses.gabor_loss(a, b, bank)):
    gx, gy = jax.jit(jax.grad(lambda a, b: fn(a, b).sum(), argnums=(0, 1)))(x, y)
    assert np.all(np.asarray(gx) == 0.0)
    assert np.abs(np.asarray(gy)).max() > 1e-4
  gx = jax.jit(jax.grad(
      lambda a: losses.reconstruction_loss(a, y, {'sobel': 1.0, 'gabor': 1.0})[0].sum()))(x)
  assert np.all(np.asarray(gx) == 0.0)


# -------------------------------------------------------------------------------- KL


def test_kl_matches_monte_carlo():
  rng = np.random.default_rng(5)
  mu = rng.normal(size=(3, 4)) * 1.5
  logvar = rng.normal(size=(3, 4))
  ours = np.asarray(losses.kl_divergence(*_f32(mu, logvar)))
  n = 200_000
  std = np.exp(0.5 * logvar)
  z = mu + std * rng.standard_normal((n,) + mu.shape)
  log_ratio = (stats.norm.logpdf(z, mu, std) - stats.norm.logpdf(z)).sum(-1)
  mc = log_ratio.mean(0)
  se = log_ratio.std(0) / math.sqrt(n)
  assert np.all(np.abs(ours - mc) < 5 * se + 1e-4), (ours, mc, se)
  np.testing.assert_allclose(losses.kl_divergence(jnp.zeros((2, 3)), jnp.zeros((2, 3))), 0.0)


def test_kl_near_the_prior_is_accurate_in_float32_and_from_bfloat16():
  # Latents at the prior (logvar ~ 0) have KL ~ logvar^2 / 2 per dim; the reference is
  # numpy's float64 expm1, on the values the inputs actually hold after rounding.
  rng = np.random.default_rng(11)
  mu = 1e-3 * rng.normal(size=(3, 32))
  logvar = 2e-3 * rng.normal(size=(3, 32))
  for dtype, ref_dtype in ((jnp.float32, np.float32), (jnp.bfloat16, jnp.bfloat16)):
    m, lv = (np.asarray(np.asarray(a).astype(ref_dtype), np.float64) for a in (mu, logvar))
    ref = 0.5 * np.sum(m ** 2 + np.expm1(lv) - lv, axis=-1)
    ours = losses.kl_divergence(jnp.asarray(m, dtype), jnp.asarray(lv, dtype))
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4)


# -------------------------------------------------------------- total correlation


def _brute_force_tc(z, mu, logvar, n, estimator):
  """log q(z_i) - sum_d log q(z_id), averaged, with loops and scipy's weighted logsumexp."""
  m, dims = mu.shape
  std = np.exp(0.5 * logvar)
  w = references.paper_mss_weights(m, n) if estimator == 'mss' else np.full((m, m), 1.0 / (n * m))
  total = 0.0
  for i in range(z.shape[0]):
    per_dim = np.array([[stats.norm.logpdf(z[i, d], mu[j, d], std[j, d]) for d in range(dims)]
                        for j in range(m)])  # (M, D)
    log_qz = special.logsumexp(per_dim.sum(1), b=w[i])
    log_prod = sum(special.logsumexp(per_dim[:, d], b=w[i]) for d in range(dims))
    total += log_qz - log_prod
  return total / z.shape[0]


def _posteriors(seed, m=8, dims=3):
  rng = np.random.default_rng(seed)
  mu = rng.normal(size=(m, dims))
  mu[:, 1] += 0.8 * mu[:, 0]  # some dependence between dims
  logvar = rng.normal(size=(m, dims)) * 0.5 - 0.5
  z = mu + np.exp(0.5 * logvar) * rng.standard_normal((m, dims))
  return z, mu, logvar


@pytest.mark.parametrize('estimator', ['mws', 'mss'])
def test_tc_matches_brute_force(estimator):
  for seed, n in ((0, 8), (1, 1000), (2, 60_000)):
    z, mu, logvar = _posteriors(seed)
    ours = float(_tc(*_f32(z, mu, logvar), n, estimator))
    ref = _brute_force_tc(z, mu, logvar, n, estimator)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  # The weights stand for a dataset of N points: fewer than the batch's M is an error.
  with pytest.raises(ValueError, match='smaller than the batch'):
    _tc(*_f32(z, mu, logvar), 7, estimator)
  # No posteriors: it was a 'math domain error' from log(N * 0).
  with pytest.raises(ValueError, match='at least one posterior'):
    _tc(*_f32(z[:0], mu[:0], logvar[:0]), n, estimator)


@pytest.mark.parametrize('estimator', ['mws', 'mss'])
def test_tc_row_offset_chunks_average_to_full_estimate(estimator):
  z, mu, logvar = _f32(*_posteriors(3))
  n = 500
  full = float(_tc(z, mu, logvar, n, estimator))
  chunks = [float(_tc(z[c * 2:(c + 1) * 2], mu, logvar, n, estimator, row_offset=c * 2))
            for c in range(4)]
  np.testing.assert_allclose(np.mean(chunks), full, rtol=1e-5, atol=1e-6)
  # A brute-force reference for one chunk alone.
  zn, mun, lvn = _posteriors(3)
  np.testing.assert_allclose(
      chunks[1], _brute_force_tc_rows(zn, mun, lvn, n, estimator, rows=(2, 3)), rtol=1e-4)
  # As the multi-device step uses it: traced row_offset from the device index.
  per_device = jax.pmap(
      lambda zc: losses.total_correlation(zc, mu, logvar, n, estimator,
                                          row_offset=jax.lax.axis_index('d') * 2),
      axis_name='d', devices=jax.devices()[:4])(z.reshape(4, 2, -1))
  np.testing.assert_allclose(np.asarray(per_device), chunks, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('estimator', ['mws', 'mss'])
def test_tc_of_bfloat16_latents_is_computed_in_float32(estimator):
  # Sharp posteriors (std ~ 0.1) give log densities of order 100, which bfloat16's 8-bit
  # mantissa rounds by about 1; the reference is the float64 brute force on the values
  # the bfloat16 inputs hold.
  rng = np.random.default_rng(13)
  mu = rng.normal(size=(16, 8))
  logvar = np.full((16, 8), -4.5) + 0.1 * rng.normal(size=(16, 8))
  z = mu + np.exp(0.5 * logvar) * rng.standard_normal((16, 8))
  z, mu, logvar = (jnp.asarray(a, jnp.bfloat16) for a in (z, mu, logvar))
  ours = _tc(z, mu, logvar, 1000, estimator)
  assert ours.dtype == jnp.float32
  ref = _brute_force_tc(*(np.asarray(a, np.float64) for a in (z, mu, logvar)), 1000,
                        estimator)
  np.testing.assert_allclose(float(ours), ref, rtol=2e-6)


def _brute_force_tc_rows(z, mu, logvar, n, estimator, rows):
  """The brute-force estimate restricted to the given sample rows."""
  m = mu.shape[0]
  keep = np.zeros(m, bool)
  keep[list(rows)] = True
  std = np.exp(0.5 * logvar)
  w = references.paper_mss_weights(m, n) if estimator == 'mss' else np.full((m, m), 1.0 / (n * m))
  vals = []
  for i in rows:
    per_dim = stats.norm.logpdf(z[i][None], mu, std)  # (M, D)
    vals.append(special.logsumexp(per_dim.sum(1), b=w[i])
                - sum(special.logsumexp(per_dim[:, d], b=w[i]) for d in range(mu.shape[1])))
  return float(np.mean(vals))


def test_mss_weights_rows_are_distributions_from_the_paper():
  for m, n in ((2, 2), (5, 5), (8, 100), (64, 200_000)):
    w = np.exp(np.asarray(losses.mss_log_weights(m, n), np.float64))
    assert w.shape == (m, m)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(w > 0)
    np.testing.assert_allclose(w, references.paper_mss_weights(m, n), rtol=1e-5)
    # A sample's own posterior gets 1/N (the entry the copied reference code misplaces).
    np.testing.assert_allclose(np.diag(w), 1.0 / n, rtol=1e-5)
  part = np.asarray(losses.mss_log_weights(8, 100, row_offset=6, num_rows=2))
  np.testing.assert_allclose(part, np.asarray(losses.mss_log_weights(8, 100))[6:8])
  with pytest.raises(ValueError):
    losses.mss_log_weights(8, 4)
  with pytest.raises(ValueError):
    losses.mss_log_weights(1, 4)
  with pytest.raises(ValueError):
    losses.total_correlation(*_f32(*_posteriors(0)), 100, 'mxx')


def test_mss_tc_refuses_more_samples_than_posteriors():
  # Rows past the posteriors had weights summing to 1.32, not 1, and gave a value.
  rng = np.random.default_rng(3)
  mu, logvar = (jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for _ in range(2))
  z = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  with pytest.raises(ValueError, match=r'samples 0\.\.7 of 4 posteriors'):
    losses.total_correlation(z, mu, logvar, 100, 'mss')
  with pytest.raises(ValueError, match=r'samples 3\.\.6 of 4 posteriors'):
    losses.total_correlation(z[:4], mu, logvar, 100, 'mss', row_offset=3)
  assert np.isfinite(losses.total_correlation(z[:2], mu, logvar, 100, 'mss', row_offset=2))
  assert np.isfinite(losses.total_correlation(z, mu, logvar, 100, 'mws'))


def test_mss_weights_refuse_a_dataset_one_point_smaller_than_the_batch():
  """N = M - 1 is refused with mss_log_weights' own message, not math.log's domain error.

  By hand: with K = M - 1 = N the smaller stratum would hold N/K - 1 = 0 points.
  """
  with pytest.raises(ValueError, match='dataset_size 7 is smaller than the batch 8'):
    losses.mss_log_weights(8, 7)


def _large_batch(seed, m, correlation, dims):
  """Data-point means with the given correlation between dims 0 and 1, std 0.5 posteriors."""
  rng = np.random.default_rng(seed)
  cov = np.eye(dims)
  cov[0, 1] = cov[1, 0] = correlation
  mu = rng.standard_normal((m, dims)) @ np.linalg.cholesky(cov).T
  logvar = np.full((m, dims), math.log(0.25))
  z = mu + 0.5 * rng.standard_normal((m, dims))
  # q(z) -> N(0, cov + 0.25 I) as the batch grows; its TC in closed form:
  s = cov + 0.25 * np.eye(dims)
  tc = 0.5 * (np.log(np.diag(s)).sum() - np.linalg.slogdet(s)[1])
  return _f32(z, mu, logvar), tc


def test_tc_of_a_factorised_q_is_near_zero_and_of_a_correlated_q_near_closed_form():
  m, n, dims = 1024, 1_000_000, 3
  (z, mu, logvar), _ = _large_batch(0, m, 0.0, dims)  # closed-form TC is 0
  mss = float(_tc(z, mu, logvar, n, 'mss'))
  assert abs(mss) < 0.03, mss  # measured: -0.015 (a batch of 1024's sampling error)
  # MWS's weights sum to 1/N per row: its value is offset by (D - 1) log N.
  mws = float(_tc(z, mu, logvar, n, 'mws'))
  assert abs(mws - (dims - 1) * math.log(n)) < 0.06, mws
  (z, mu, logvar), tc = _large_batch(1, m, 0.8, 2)  # closed-form TC 0.263
  mss = float(_tc(z, mu, logvar, n, 'mss'))
  assert abs(mss - tc) < 0.04, (mss, tc)  # measured: 0.021 below; 0.7 tc would be 0.08


# ------------------------------------------------------------------------- gradients


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('channels', [1, 3])
def test_reconstruction_loss_gradients_are_finite_on_flat_and_equal_images(channels):
  rng = np.random.default_rng(6)
  flat = jnp.full((2, 16, 16, channels), 0.5, jnp.float32)
  tex = jnp.asarray(rng.random((2, 16, 16, channels)), jnp.float32)
  loss = lambda a, b: losses.reconstruction_loss(a, b, ALL_TERMS)[0].sum()
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  cases = [(flat, flat), (flat, jnp.zeros_like(flat)), (jnp.ones_like(flat), flat),
           (tex, tex), (tex, flat), (flat, tex)]
  for a, b in cases:
    g = grad(a, b)
    assert _finite(g)
  # At x == x_rec every term is at its minimum: the gradient vanishes (|.|'s is 0 at 0).
  for a in (flat, tex):
    np.testing.assert_allclose(grad(a, a)[1], 0.0, atol=1e-5)


def test_kl_and_tc_gradients_are_finite():
  z, mu, logvar = _f32(*_posteriors(7))
  same = (mu, mu, jnp.zeros_like(mu))  # z at the means, identical variances
  tiny = (mu, mu, jnp.full_like(mu, -12.0))  # near-deterministic posteriors
  equal_rows = (jnp.zeros_like(mu), jnp.zeros_like(mu), jnp.zeros_like(mu))
  for est in ('mws', 'mss'):
    grad = jax.jit(jax.grad(lambda a, b, c: losses.total_correlation(a, b, c, 100, est),
                            argnums=(0, 1, 2)))
    for args in ((z, mu, logvar), same, tiny, equal_rows):
      assert _finite(grad(*args))
  kl_grad = jax.jit(jax.grad(lambda a, b: losses.kl_divergence(a, b).sum(), argnums=(0, 1)))
  assert _finite(kl_grad(mu, logvar))
  g = kl_grad(jnp.zeros_like(mu), jnp.zeros_like(mu))
  np.testing.assert_allclose(g[0], 0.0)
  np.testing.assert_allclose(g[1], 0.0)


# ------------------------------------------------------------- reconstruction_loss


def _conv_count(weights, gabor=None):
  x = jnp.zeros((2, 16, 16, 3))
  jaxpr = jax.make_jaxpr(lambda a, b: losses.reconstruction_loss(a, b, weights, gabor))(x, x)
  return str(jaxpr).count('conv_general_dilated')


def test_reconstruction_loss_is_the_weighted_sum_of_the_public_terms():
  img = _natural('astronaut')[:32, :32]
  x = jnp.asarray(np.stack([img, _distorted(img, 'blur')]), jnp.float32)
  y = jnp.asarray(np.stack([_distorted(img, 'noise'), img]), jnp.float32)
  # Any nonzero weight is applied, a negative one too (the configs refuse those; the
  # function itself is the plain weighted sum).
  weights = {'mae': -0.5, 'mse': 2.0, 'dssim': 1.5, 'sobel': 0.25, 'gabor': 3.0}
  total, terms = losses.reconstruction_loss(x, y, weights)
  bank = filters.gabor_bank(11, 2.5, (4.0, 8.0), 4)
  ref = {'mae': losses.mae(x, y), 'mse': losses.mse(x, y), 'dssim': losses.dssim(x, y),
         'sobel': losses.sobel_loss(x, y), 'gabor': losses.gabor_loss(x, y, bank)}
  assert list(terms) == list(ref)
  for k in ref:
    np.testing.assert_allclose(terms[k], ref[k], rtol=1e-5, atol=1e-7)
    assert terms[k].shape == (2,)
  np.testing.assert_allclose(total, sum(weights[k] * ref[k] for k in ref), rtol=1e-5)


def test_reconstruction_loss_computes_only_weighted_terms():
  rng = np.random.default_rng(8)
  x, y = _f32(*rng.random((2, 2, 16, 16, 1)))
  total, terms = losses.reconstruction_loss(x, y, {'mae': 0.0, 'sobel': 2.0, 'dssim': 0.5})
  assert set(terms) == {'sobel', 'dssim'}

  def program(weights):
    return str(jax.make_jaxpr(lambda a, b: losses.reconstruction_loss(a, b, weights))(x, y))
  # A term at weight 0 is not computed: the traced program is the one without it.
  without_mae = program({'sobel': 2.0, 'dssim': 0.5})
  assert program({'mae': 0.0, 'sobel': 2.0, 'dssim': 0.5}) == without_mae
  assert program({'mae': 1.0, 'sobel': 2.0, 'dssim': 0.5}) != without_mae
  np.testing.assert_allclose(total, 2.0 * losses.sobel_loss(x, y) + 0.5 * losses.dssim(x, y),
                             rtol=1e-5)
  pairs = losses.reconstruction_loss(x, y, (('sobel', 2.0), ('dssim', 0.5), ('mse', 0.0)))
  np.testing.assert_allclose(pairs[0], total, rtol=1e-6)
  assert set(pairs[1]) == {'sobel', 'dssim'}
  total, terms = losses.reconstruction_loss(x, y, {})
  assert terms == {} and total.shape == (2,)
  np.testing.assert_array_equal(total, 0.0)
  # What is traced: no convolution at all; SSIM's window and the Sobel/Gabor bank run as
  # banded-matrix products (test_gram_terms_are_the_sum_of_the_filters_normal_matrices).
  for weights in ({'mae': 1.0, 'mse': 1.0}, {'dssim': 1.0}, {'sobel': 1.0, 'gabor': 1.0},
                  {'gabor': 1.0}, ALL_TERMS):
    assert _conv_count(weights) == 0
  with pytest.raises(ValueError):
    losses.reconstruction_loss(x, y, {'ssim': 1.0})


def test_gabor_spec_from_config_and_custom_bank():
  config = default.get_config()
  spec = losses.GaborSpec.from_config(config.gabor)
  assert spec == losses.GaborSpec()
  assert hash(spec) == hash(losses.GaborSpec(11, 2.5, (4.0, 8.0), 4))
  custom = losses.GaborSpec(size=7, sigma=1.5, wavelengths=(3.0,), orientations=2)
  rng = np.random.default_rng(9)
  x, y = _f32(*rng.random((2, 2, 16, 16, 3)))
  _, terms = losses.reconstruction_loss(x, y, {'sobel': 1.0, 'gabor': 1.0}, custom)
  np.testing.assert_allclose(terms['gabor'], losses.gabor_loss(x, y, custom.bank()), rtol=1e-5)
  np.testing.assert_allclose(terms['sobel'], losses.sobel_loss(x, y), rtol=1e-5)
  # Usable as a static argument of jit.
  f = jax.jit(lambda a, b, g: losses.reconstruction_loss(a, b, {'gabor': 1.0}, g),
              static_argnums=2)
  np.testing.assert_allclose(f(x, y, custom)[0], terms['gabor'], rtol=1e-5)
