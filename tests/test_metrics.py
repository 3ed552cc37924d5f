"""Tests for avae_jax.metrics against scipy / numpy / closed-form references."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.signal

from avae_jax import metrics


def _luma_ref(images):
  images = np.asarray(images, np.float64)
  if images.shape[-1] == 1:
    return images[..., 0]
  return (0.299 * images[..., 0] + 0.587 * images[..., 1] + 0.114 * images[..., 2])


@pytest.mark.parametrize('channels', [1, 3])
def test_sharpness_matches_scipy_laplace(channels):
  rng = np.random.default_rng(0)
  images = rng.random((5, 17, 13, channels)).astype(np.float32)
  images[1] = 0.5  # Flat image: Laplacian is zero everywhere.
  got = metrics.sharpness(images)
  gray = _luma_ref(images)
  # scipy's laplace is the 5-point stencil; its interior is the valid response.
  want = np.array([scipy.ndimage.laplace(g)[1:-1, 1:-1].var() for g in gray])
  assert got.shape == (5,)
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
  assert got[1] == pytest.approx(0.0, abs=1e-20)


def test_sharpness_valid_convolution_and_large_batch():
  rng = np.random.default_rng(1)
  images = rng.random((300, 6, 7, 3))  # More than one internal chunk.
  kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
  want = np.array([scipy.signal.convolve2d(g, kernel, mode='valid').var()
                   for g in _luma_ref(images)])
  np.testing.assert_allclose(metrics.sharpness(images), want, rtol=1e-10)
  np.testing.assert_allclose(metrics.sharpness(jnp.asarray(images[:3], jnp.float32)),
                             want[:3], rtol=1e-5)


def test_sharpness_hand_value():
  # A single bright pixel in a 3x3 image: the one valid response is -4 * 1, variance 0;
  # in 4x3 the responses are -4 and 1 -> variance 6.25.
  img = np.zeros((1, 4, 3, 1))
  img[0, 1, 1, 0] = 1.0
  assert metrics.sharpness(img)[0] == pytest.approx(6.25)


def test_uint8_images_are_read_on_the_unit_scale():
  rng = np.random.default_rng(5)
  pixels = rng.integers(0, 256, (3, 9, 8, 3)).astype(np.uint8)
  other = rng.integers(0, 256, (3, 9, 8, 3)).astype(np.uint8)
  scaled, scaled_other = pixels / 255.0, other / 255.0
  np.testing.assert_allclose(metrics.sharpness(pixels), metrics.sharpness(scaled), rtol=1e-12)
  np.testing.assert_allclose(metrics.mse(pixels, other),
                             np.mean((scaled - scaled_other) ** 2, axis=(1, 2, 3)), rtol=1e-12)
  # Integers of another width have no one scale: refused.
  with pytest.raises(ValueError, match='uint8 images or floats'):
    metrics.sharpness(pixels.astype(np.uint16))


@pytest.mark.parametrize('value', [255.0, 1.0 + 1e-5, -1e-5])
def test_float_images_outside_the_unit_range_are_refused(value):
  # Sharpness and MSE scale with the square of the images' scale: 0..255 floats gave
  # 65025 times the figures without an error.
  images = np.full((2, 4, 4, 1), 0.5)
  images[1, 2, 3, 0] = value
  hint = 'divide by 255' if value > 2 else 'clip to'
  for call in (lambda: metrics.sharpness(images), lambda: metrics.mse(images, images),
               lambda: metrics.cosine_similarity(0.5 * images, images)):
    with pytest.raises(ValueError, match=f'must lie in \\[0, 1\\].*{hint}'):
      call()
  # Float rounding's overshoot passes, and so does a NaN beside values in range.
  images[1, 2, 3, 0] = 1.0 + 1e-7
  images[0, 1, 1, 0] = np.nan
  assert np.isnan(metrics.sharpness(images)[0]) and np.isfinite(metrics.sharpness(images)[1])


def test_sharpness_rejects_bad_shapes():
  with pytest.raises(ValueError):
    metrics.sharpness(np.zeros((2, 8, 8)))
  with pytest.raises(ValueError):
    metrics.sharpness(np.zeros((2, 2, 8, 3)))


def test_pairs_without_a_batch_axis_or_of_other_shapes_are_refused():
  for call in (metrics.mse, metrics.cosine_similarity):
    with pytest.raises(ValueError, match=r'expected a batch of NHWC .* shape \(\)$'):
      call(np.float32(0.5), np.float32(0.5))
    # One image: its rows were taken for the batch (a value per row, the cosines wrong).
    image = np.random.default_rng(0).random((4, 4, 3))
    with pytest.raises(ValueError, match=r'shape \(4, 4, 3\) \(one image: pass image\[None\]\)'):
      call(image, image[::-1])
    with pytest.raises(ValueError, match=r'shape mismatch: \(2, 3\) vs \(2, 4\)'):
      call(np.zeros((2, 3)), np.zeros((2, 4)))


@pytest.mark.parametrize('value', [np.inf, -np.inf])
def test_infinite_pixels_are_named_as_such(value):
  # Not "divide by 255?": no scale makes an infinity an image.
  images = np.full((2, 4, 4, 1), 0.5)
  images[1, 0, 0, 0] = value
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\].*\(not finite\)'):
    metrics.sharpness(images)


def test_mse_and_cosine_match_numpy():
  rng = np.random.default_rng(2)
  x = rng.random((4, 5, 6, 3))
  y = rng.random((4, 5, 6, 3)) * 0.7
  want_mse = [np.mean((a - b) ** 2) for a, b in zip(x, y)]
  want_cos = [np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)
              for a, b in zip(x, y)]
  np.testing.assert_allclose(metrics.mse(x, y), want_mse, rtol=1e-12)
  np.testing.assert_allclose(metrics.cosine_similarity(x, y), want_cos, rtol=1e-12)
  np.testing.assert_allclose(metrics.cosine_similarity(x, 0.5 * x), 1.0, rtol=1e-12)
  # Images lit in disjoint pixels are orthogonal.
  assert metrics.cosine_similarity(np.eye(4)[:2], np.eye(4)[2:]).tolist() == [0.0, 0.0]
  assert metrics.cosine_similarity(np.zeros((1, 4)), np.ones((1, 4)))[0] == 0.0
  # A NaN (a diverged model's image) gives NaN, as MSE does; it gave 0.
  nan_image = np.array([[0.5, np.nan, 0.1, 0.2]])
  assert np.isnan(metrics.cosine_similarity(nan_image, np.ones((1, 4)))[0])
  assert np.isnan(metrics.mse(nan_image, np.ones((1, 4)))[0])
  assert np.isnan(metrics.sharpness(np.full((1, 3, 3, 1), np.nan))[0])
  with pytest.raises(ValueError):
    metrics.mse(x, y[:, :4])
  # An empty batch gives no values, as sharpness does; the reshape to (0, -1) failed.
  empty = np.zeros((0, 5, 6, 3))
  assert metrics.mse(empty, empty).shape == metrics.cosine_similarity(empty, empty).shape == (0,)


def test_gaussian_stats_match_numpy():
  f = np.random.default_rng(3).standard_normal((50, 7)).astype(np.float32)
  mu, sigma = metrics.gaussian_stats(f)
  assert mu.dtype == np.float64 and sigma.dtype == np.float64
  np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10)


def _random_spd(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T + d * np.eye(d)


def test_frechet_matches_scipy_sqrtm_well_conditioned():
  rng = np.random.default_rng(4)
  for d in (1, 3, 16):
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
            - 2 * np.trace(covmean).real)
    got = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(want, rel=1e-9)


def test_frechet_closed_forms():
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 for standard deviations s.
  assert metrics.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9 + 1)
  # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2, including singular ones.
  a = np.array([4.0, 0.0, 1.0, 0.0])
  b = np.array([1.0, 9.0, 0.0, 0.0])
  want = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = metrics.frechet_distance(np.zeros(4), np.diag(a), np.zeros(4), np.diag(b))
  assert got == pytest.approx(want, rel=1e-12)


def _trace_sqrt_from_samples(x1, x2):
  # With S_i = X_i^T X_i / (n_i - 1) (X_i centred), the non-zero eigenvalues of
  # sqrt(S1) S2 sqrt(S1) are those of S1 S2 and equal the squared singular values of
  # X2 X1^T / sqrt((n1-1)(n2-1)); so tr sqrt(...) is that small matrix's nuclear norm.
  a = (x1 - x1.mean(0)) / np.sqrt(x1.shape[0] - 1)
  b = (x2 - x2.mean(0)) / np.sqrt(x2.shape[0] - 1)
  return np.linalg.svd(b @ a.T, compute_uv=False).sum()


@pytest.mark.parametrize('n1,n2,d', [(5, 7, 40), (3, 3, 64), (30, 10, 256)])
def test_frechet_singular_covariances_real_and_accurate(n1, n2, d):
  rng = np.random.default_rng(n1 * 1000 + d)
  scale = rng.random(d) * 3
  x1 = rng.standard_normal((n1, d)) * scale
  x2 = rng.standard_normal((n2, d)) * scale + 0.5
  mu1, s1 = metrics.gaussian_stats(x1)
  mu2, s2 = metrics.gaussian_stats(x2)
  assert np.linalg.matrix_rank(s1) < d and np.linalg.matrix_rank(s2) < d
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * _trace_sqrt_from_samples(x1, x2))
  got = metrics.frechet_distance(mu1, s1, mu2, s2)
  assert isinstance(got, float) and np.isfinite(got)
  assert got == pytest.approx(want, rel=1e-8)
  assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(
      _trace_sqrt_from_samples(x1, x2), rel=1e-10)


def test_frechet_accurate_for_a_spread_out_spectrum():
  # Features whose variances fall over eight decades (as Inception features' do), and a
  # close second set: the small eigenvalues of sqrt(s1) s2 sqrt(s1) are real and count.
  rng = np.random.default_rng(6)
  n, d = 1000, 256
  mixing = rng.standard_normal((d, d)) * np.logspace(0, -4, d)
  x1 = np.maximum(rng.standard_normal((n, d)) @ mixing, 0.0)
  x2 = x1 + 0.01 * np.maximum(rng.standard_normal((n, d)) @ mixing, 0.0)
  mu1, s1 = metrics.gaussian_stats(x1)
  mu2, s2 = metrics.gaussian_stats(x2)
  want = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
          - 2 * _trace_sqrt_from_samples(x1, x2))
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


def test_frechet_identical_and_near_identical_stats():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((10, 32))  # Singular covariance.
  mu, sigma = metrics.gaussian_stats(x)
  assert metrics.frechet_distance(mu, sigma, mu.copy(), sigma.copy()) == 0.0
  # Same distribution up to rounding: not bitwise equal, so the full computation runs.
  got = metrics.frechet_distance(mu, sigma, mu, sigma * (1 + 1e-15))
  assert 0.0 <= got < 1e-9 * np.trace(sigma)


def test_frechet_rejects_bad_input():
  # The messages are matched: numpy's broadcasting error and LinAlgError ('SVD did not
  # converge') are ValueErrors too, and would pass a bare pytest.raises(ValueError).
  with pytest.raises(ValueError, match=r'inconsistent shapes: \(3,\) \(3, 3\) \(2,\)'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match='statistics contain NaN or inf'):
    metrics.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def _frechet_by_scipy(x1, x2):
  """FID as pytorch-fid writes it, with scipy: the square roots of the covariances."""
  s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
  root1 = scipy.linalg.sqrtm(s1).real
  # sqrt(S1) S2 sqrt(S1) is symmetric PSD, with the eigenvalues of S1 S2; of rank at most
  # r = min(n1 - 1, n2 - 1, d). Its other eigenvalues are rounding noise, whose square
  # roots (1e-8 each) would add up: only the r largest count.
  rank = min(len(x1) - 1, len(x2) - 1, x1.shape[1])
  eig = np.clip(scipy.linalg.eigvalsh(root1 @ s2 @ root1)[::-1][:rank], 0.0, None)
  diff = x1.mean(0) - x2.mean(0)
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig))


@pytest.mark.parametrize('n1,n2,d', [(6, 9, 40), (40, 25, 64), (80, 100, 16), (3, 200, 8)])
def test_frechet_of_features_against_scipy_and_the_covariances(n1, n2, d):
  # Fewer images than dimensions (the n x n path) and more (the covariances' path).
  rng = np.random.default_rng(n1 + 7 * d)
  scale = rng.random(d) * 3
  x1 = rng.standard_normal((n1, d)) * scale
  x2 = rng.standard_normal((n2, d)) * scale + 0.3
  got = metrics.frechet_distance_of_features(x1, x2)
  assert isinstance(got, float)
  assert got == pytest.approx(_frechet_by_scipy(x1, x2), rel=1e-7)
  via_stats = metrics.frechet_distance(*metrics.gaussian_stats(x1), *metrics.gaussian_stats(x2))
  assert got == pytest.approx(via_stats, rel=1e-9)
  assert metrics.frechet_distance_of_features(x2, x1) == pytest.approx(got, rel=1e-12)


def test_frechet_of_features_identical_and_bad_input():
  x = np.random.default_rng(8).standard_normal((10, 32))
  assert metrics.frechet_distance_of_features(x, x.copy()) == 0.0
  for seed in range(10):  # fewer images than dimensions: rounding gave up to 1e-11
    f = np.random.default_rng(seed).standard_normal((64, 256))
    assert metrics.frechet_distance_of_features(f, f.copy()) == 0.0, seed
  assert 0.0 <= metrics.frechet_distance_of_features(x, x * (1 + 1e-15)) < 1e-9
  for a, b in [(x, x[:, :31]), (x[:1], x), (x[0], x)]:
    with pytest.raises(ValueError, match='expected'):
      metrics.frechet_distance_of_features(a, b)
  with pytest.raises(ValueError, match='NaN'):
    metrics.frechet_distance_of_features(x, np.where(x > 2, np.nan, x))


def _mig_reference(codes, factors, num_bins):
  """Plain-loop MIG: histogram-discretised codes, plug-in MI, gap / factor entropy."""
  n = codes.shape[0]
  binned = []
  for j in range(codes.shape[1]):
    _, edges = np.histogram(codes[:, j], bins=num_bins)
    binned.append(np.digitize(codes[:, j], edges[:-1]))
  gaps = []
  for k in range(factors.shape[1]):
    v = factors[:, k]
    values, counts = np.unique(v, return_counts=True)
    h = -sum(c / n * np.log(c / n) for c in counts)
    mis = []
    for c in binned:
      mi = 0.0
      for a in np.unique(c):
        for b in values:
          p_ab = np.mean((c == a) & (v == b))
          if p_ab > 0:
            mi += p_ab * np.log(p_ab / (np.mean(c == a) * np.mean(v == b)))
      mis.append(mi)
    mis = sorted(mis)
    gaps.append((mis[-1] - mis[-2]) / h)
  return np.mean(gaps)


def test_mig_matches_loop_reference():
  rng = np.random.default_rng(6)
  factors = np.stack([rng.integers(0, 3, 300), rng.integers(0, 5, 300)], 1)
  codes = np.stack([factors[:, 0] + 0.7 * rng.standard_normal(300),
                    rng.standard_normal(300),
                    factors[:, 1] * 0.5 + factors[:, 0] + rng.standard_normal(300)], 1)
  for bins in (5, 20):
    assert metrics.mig(codes, factors, num_bins=bins) == pytest.approx(
        _mig_reference(codes, factors, bins), rel=1e-10)
  # The default, named in the tables: 20 bins (Chen et al.'s and disentanglement_lib's).
  assert metrics.mig(codes, factors) == pytest.approx(_mig_reference(codes, factors, 20),
                                                      rel=1e-10)
  assert metrics.mig(codes, factors) != pytest.approx(_mig_reference(codes, factors, 21))


def test_mig_extremes():
  rng = np.random.default_rng(7)
  n = 6000
  factors = np.stack([rng.integers(0, 4, n), rng.integers(0, 6, n), rng.integers(0, 3, n)], 1)
  random_codes = rng.standard_normal((n, 5))
  assert metrics.mig(random_codes, factors) < 0.03
  # Each factor copied into its own code dimension (affine maps keep the levels in separate
  # equal-width bins), plus noise dimensions.
  copied = np.concatenate([np.stack([factors[:, 0] * 0.3 - 1, factors[:, 1] * 7.0 + 2.0,
                                     -factors[:, 2] * 2.0], 1),
                           rng.standard_normal((n, 2))], 1)
  assert metrics.mig(copied, factors) > 0.97
  # Equal-width bins cannot separate levels squeezed together by exp: 1, e, e^2 share a bin.
  squeezed = copied.copy()
  squeezed[:, 1] = np.exp(factors[:, 1])
  assert metrics.mig(squeezed, factors) < 0.95
  # The same factor in two code dimensions: no gap for it.
  doubled = np.stack([factors[:, 0], factors[:, 0] * 2.0, rng.standard_normal(n)], 1)
  assert metrics.mig(doubled, factors[:, :1]) < 0.03


def test_shuffled_mig_is_the_floor_of_codes_that_carry_nothing():
  rng = np.random.default_rng(9)

  def factors_of(n):
    return np.stack([rng.integers(0, 4, n), rng.integers(0, 6, n), rng.integers(0, 3, n)], 1)

  # Codes that copy the factors: MIG near 1, their shuffled floor near 0.
  n = 6000
  factors = factors_of(n)
  copied = np.concatenate([factors * np.array([0.3, 7.0, -2.0]),
                           rng.standard_normal((n, 2))], 1)
  kept = copied.copy()
  assert metrics.mig(copied, factors) > 0.97
  assert metrics.shuffled_mig(copied, factors) < 0.02
  np.testing.assert_array_equal(copied, kept)  # shuffles a copy
  # Each dimension on its own: a factor copied into two dimensions has no gap (both carry
  # the same information) and keeps none when the rows are shuffled together; shuffled
  # apart, the two dimensions' chance information differs and the floor is above 0.
  doubled = np.stack([factors[:, 0], factors[:, 0] * 2.0], 1).astype(np.float64)
  assert metrics.mig(doubled, factors[:, :1]) == 0.0
  assert metrics.shuffled_mig(doubled, factors[:, :1]) > 0.0
  # Its value: the mean over the repeats of the loop reference's MIG of numpy's
  # per-column shuffles (Generator.permuted along the images) from the seed.
  few = copied[:300]
  shuffle = np.random.default_rng(4)
  want = np.mean([_mig_reference(shuffle.permuted(few, axis=0), factors[:300], 20)
                  for _ in range(3)])
  assert metrics.shuffled_mig(few, factors[:300], repeats=3, seed=4) == pytest.approx(
      want, rel=1e-10)
  # Codes already independent of the factors: shuffling changes nothing in distribution,
  # so the floor is the MIG of fresh independent codes (averaged over draws), and it falls
  # as the image count grows (the plug-in estimate's bias).
  floors = {}
  for n in (100, 2000):
    fresh = [metrics.mig(rng.standard_normal((n, 5)), factors_of(n)) for _ in range(20)]
    floors[n] = metrics.shuffled_mig(rng.standard_normal((n, 5)), factors_of(n), repeats=20)
    assert floors[n] == pytest.approx(np.mean(fresh), rel=0.35), n
  assert floors[100] > 5 * floors[2000]


def test_mig_skips_constant_factors_and_rejects_all_constant():
  factors = np.stack([np.arange(100) % 2, np.zeros(100, int)], 1)
  # Second code: equal within each (even, odd) pair, so independent of the parity factor.
  codes = np.stack([factors[:, 0], np.arange(100) // 2], 1).astype(float)
  assert metrics.mig(codes, factors) == pytest.approx(1.0)
  with pytest.raises(ValueError):
    metrics.mig(codes, np.zeros((100, 1), int))


@pytest.mark.parametrize('bad', [np.nan, np.inf])
def test_mig_refuses_non_finite_codes_naming_them(bad):
  # numpy's histogram said only 'autodetected range of [nan, nan] is not finite'.
  rng = np.random.default_rng(10)
  codes = rng.standard_normal((50, 3))
  codes[[3, 7], 1] = bad
  codes[3, 2] = bad  # two in one image: the images are counted, not the values
  with pytest.raises(ValueError, match='codes of 2 of 50 images hold NaN or inf'):
    metrics.mig(codes, np.arange(50) % 3)
