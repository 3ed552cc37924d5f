"""Pure loss functions of AVAE-S (paper Eq. 5-10; README: The four models).

Images are float32 NHWC batches in [0, 1]. Every per-image loss returns shape (B,); the
caller reduces over the batch (and over devices). The fixed filters run as banded-matrix
products rather than convolutions: SSIM's Gaussian window is separable, and the Sobel
and (cosine) Gabor losses, means of squared filter responses, are quadratic forms whose
operator is a sum of a few products of banded matrices (see `_separable_blur` and
`_response_energies`). Both compute the cross-correlation with the kernels of `filters`,
with zero padding for Sobel and Gabor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Iterable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from avae_jax import config_lib
from avae_jax import filters

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)
# Full float32 matrix products: on TPU/GPU the default precision may use bf16/TF32 passes,
# which is too coarse for SSIM's E[x^2] - E[x]^2 and costs little to avoid here.
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GaborSpec:
  """The Gabor bank of L_Gabor (hashable, so it can be a static jit argument)."""
  size: int = 11
  sigma: float = 2.5
  wavelengths: tuple[float, ...] = (4.0, 8.0)
  orientations: int = 4

  @classmethod
  def from_config(cls, config: Any) -> 'GaborSpec':
    """Builds the spec from a config block with size, sigma, wavelengths, orientations."""
    return cls(size=int(config.size), sigma=float(config.sigma),
               wavelengths=tuple(float(w) for w in config.wavelengths),
               orientations=int(config.orientations))

  def bank(self) -> np.ndarray:
    """The kernels (n, size, size) of this spec (see filters.gabor_bank)."""
    return filters.gabor_bank(self.size, self.sigma, self.wavelengths, self.orientations)


def _as_images(x: Array) -> Array:
  """(B, H, W, C) float images in [0, 1] as float32; integer pixels are refused."""
  chex.assert_rank(x, 4)
  # uint8 pixels would be read as 0..255: SSIM's constants and every term's scale assume
  # [0, 1], and a silent rescaling here would hide the caller's mistake.
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f'the losses take floating-point images in [0, 1], got dtype '
                     f'{jnp.result_type(x)} (divide uint8 pixels by 255)')
  return jnp.asarray(x, jnp.float32)


def to_gray(x: Array) -> Array:
  """Luma 0.299 R + 0.587 G + 0.114 B of (B, H, W, 3) images; identity for 1 channel."""
  x = _as_images(x)
  channels = x.shape[-1]
  if channels == 1:
    return x
  if channels != 3:
    raise ValueError(f'to_gray needs 1 or 3 channels, got {channels}')
  luma = jnp.asarray(filters.LUMA, jnp.float32)
  return jnp.sum(x * luma, axis=-1, keepdims=True)


def mae(x: Array, y: Array) -> Array:
  """Per-image mean absolute difference (B,)."""
  x, y = _as_images(x), _as_images(y)
  chex.assert_equal_shape([x, y])
  d = x - y
  # jnp.abs has derivative +1 at 0; use the minimum-norm subgradient 0 instead (as
  # torch's abs does), so an exact match exerts no pull on the reconstruction.
  return jnp.mean(jnp.where(d == 0.0, 0.0, jnp.abs(d)), axis=(1, 2, 3))


def mse(x: Array, y: Array) -> Array:
  """Per-image mean squared difference (B,)."""
  x, y = _as_images(x), _as_images(y)
  chex.assert_equal_shape([x, y])
  return jnp.mean(jnp.square(x - y), axis=(1, 2, 3))


def _band_matrices(n: int, taps: np.ndarray, pad: int = 0) -> np.ndarray:
  """(R, n + 2 pad - k + 1, n) matrices of R tap vectors (R, k) for a 1-D correlation.

  Row i of matrix r holds taps[r] at columns i - pad .. i - pad + k - 1 (those inside
  0 .. n - 1), so the product with a length-n signal is its cross-correlation with the
  taps under `pad` zeros on each side.
  """
  taps = np.asarray(taps, np.float64)
  r, k = taps.shape
  m = np.zeros((r, n + 2 * pad - k + 1, n), np.float64)
  for i in range(m.shape[1]):
    for t in range(k):
      j = i - pad + t
      if 0 <= j < n:
        m[:, i, j] = taps[:, t]
  return m.astype(np.float32)


def _separable_blur(x: Array, taps: np.ndarray) -> Array:
  """Valid cross-correlation of every channel of x with the 2-D kernel outer(taps, taps).

  Written as two banded-matrix products (rows, then columns) rather than as depthwise
  convolutions: XLA:CPU runs depthwise (feature-grouped) convolutions and their gradients
  on a slow generic path, and the matrix products were 15x faster for the forward and
  backward pass at 96x96 (docs/benchmarks.md). The extra multiplies by zero cost little
  at the image sizes of this project, and matrix products suit TPU/GPU too.
  """
  _, h, w, _ = x.shape
  rows = jnp.asarray(_band_matrices(h, taps[None])[0])
  cols = jnp.asarray(_band_matrices(w, taps[None])[0])
  x = jnp.einsum('ih,bhwc->biwc', rows, x, precision=_PRECISION)
  return jnp.einsum('jw,biwc->bijc', cols, x, precision=_PRECISION)


def ssim(x: Array, y: Array, *, max_val: float = 1.0,
         filter_size: int = config_lib.SSIM_WINDOW,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Array:
  """Mean SSIM per image (B,): Gaussian window, valid padding, per channel then averaged.

  The Wang et al. (2004) index with alpha = beta = gamma = 1 and population
  (co)variances, as dm_pix.ssim and skimage's structural_similarity(gaussian_weights=True,
  use_sample_covariance=False) compute it.
  """
  x, y = _as_images(x), _as_images(y)
  chex.assert_equal_shape([x, y])
  _, h, w, _ = x.shape
  if h < filter_size or w < filter_size:
    raise ValueError(f'SSIM with an {filter_size}x{filter_size} window needs images at '
                     f'least that large, got {h}x{w}')
  # The window is the outer product of a 1-D Gaussian, so it is applied as two 1-D
  # passes. The local moments go through them in two groups: those of x alone and those
  # that involve y. In training x is the data, a constant, so the first group needs no
  # backward pass (blurred together with the rest, all five had one): SSIM's value and
  # gradient took 2/3 of the time at 96x96x3 (docs/benchmarks.md, item 12).
  g = filters.gaussian_kernel_1d(filter_size, sigma)
  mu_x, e_xx = jnp.split(_separable_blur(jnp.concatenate([x, x * x], axis=-1), g), 2, axis=-1)
  mu_y, e_yy, e_xy = jnp.split(
      _separable_blur(jnp.concatenate([y, y * y, x * y], axis=-1), g), 3, axis=-1)
  # Variances are clipped at zero: float32 cancellation in E[x^2] - E[x]^2 can give tiny
  # negative values on flat patches, which would only push the denominator below C1*C2.
  var_x = jnp.maximum(e_xx - mu_x * mu_x, 0.0)
  var_y = jnp.maximum(e_yy - mu_y * mu_y, 0.0)
  cov_xy = e_xy - mu_x * mu_y
  c1 = (k1 * max_val) ** 2
  c2 = (k2 * max_val) ** 2
  # Both denominator factors are >= C1 > 0 and >= C2 > 0: no division by zero, and the
  # gradient is finite on flat images and when x == y.
  num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
  den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


def dssim(x: Array, y: Array) -> Array:
  """Structural dissimilarity 1 - SSIM per image (B,), with the paper's SSIM settings."""
  return 1.0 - ssim(x, y)


def _check_bank(bank: Any) -> np.ndarray:
  bank = np.asarray(bank)
  if bank.ndim != 3 or bank.shape[1] != bank.shape[2] or bank.shape[1] % 2 == 0:
    raise ValueError(f'a filter bank is (n, k, k) with k odd, got shape {bank.shape}')
  return bank


def _svd_terms(kernel: np.ndarray,
               scale: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(u (r, k), s (r,), vt (r, k)): the SVD of a kernel without its negligible terms.

  Terms under 1e-6 of `scale` (default: the largest singular value) are dropped: they
  are the rounding of the kernel's entries (about 1e-16 for the float64 banks here,
  1e-8 for a float32 one), and keeping them would add work for nothing.
  """
  u, s, vt = np.linalg.svd(kernel)
  r = np.flatnonzero(s > 1e-6 * max(s[0] if scale is None else scale, 1e-300))
  return u[:, r].T, s[r], vt[r]


def _without_constant(kernel: np.ndarray) -> tuple[float, tuple[np.ndarray, ...]]:
  """(c, SVD terms of kernel - c J), J the all-ones kernel, c lowering the rank; else c = 0.

  A kernel with its mean removed (every Gabor kernel of the bank) is a low-rank kernel
  minus a constant one. With the kernel's SVD U S V^T and 1 = U a = V b (the ones vector
  in both its column and row spaces), kernel - c 1 1^T = U (S - c a b^T) V^T, singular
  exactly when c = 1 / (b^T S^-1 a). The split is kept only if the rest has fewer terms
  at the kernel's own tolerance, so it is exact wherever it is used. The terms are
  `_svd_terms`' (u, s, vt) of the rest, or of the kernel when c = 0.
  """
  terms = _svd_terms(kernel)
  u, s, vt = terms
  if len(s) < 2:
    return 0.0, terms
  ones = np.ones(kernel.shape[0])
  den = float((vt @ ones) @ ((u @ ones) / s))
  if abs(den) < 1e-12:
    return 0.0, terms
  c = 1.0 / den
  rest = _svd_terms(kernel - c * np.outer(ones, ones), scale=s[0])
  if len(rest[1]) >= len(s):
    return 0.0, terms
  return c, rest


def _separable_terms(bank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Few separable terms that mix into every kernel of a bank (n, k, k) exactly.

  Returns u (R, k), v (R, k) and mix (R, n) with bank[i] = sum_r mix[r, i] outer(u_r, v_r).
  Three steps keep R small (20 -> 9 for the default Gabor bank; Sobel's 2 stay 2):
  - the constant part of a zero-mean kernel is split off (`_without_constant`): it is one
    box filter, outer(1, 1), shared by every kernel;
  - the rest of each kernel is expanded by its SVD. A Sobel kernel has rank 1, a cosine
    Gabor kernel rank 1 along the axes and 2 otherwise (cos(a + b) = cos a cos b -
    sin a sin b of its rotated coordinate, times a separable Gaussian);
  - terms parallel to an earlier one are merged into it: the Gabor kernels at angles t
    and pi - t are mirror images made of the same two terms, with opposite signs on one.
  """
  us: list[np.ndarray] = []
  vs: list[np.ndarray] = []
  mix: list[np.ndarray] = []
  n, k = bank.shape[0], bank.shape[-1]

  def add(u: np.ndarray, v: np.ndarray, kernel: int, coef: float) -> None:
    # Unit vectors whose first sizeable entry is positive, so that parallel terms
    # compare equal (the largest entry is no guide: an odd vector has two).
    su, sv = np.linalg.norm(u), np.linalg.norm(v)
    su *= np.sign(u[np.flatnonzero(np.abs(u) > 0.5 * np.abs(u).max())[0]])
    sv *= np.sign(v[np.flatnonzero(np.abs(v) > 0.5 * np.abs(v).max())[0]])
    u, v, coef = u / su, v / sv, coef * su * sv
    for r in range(len(us)):
      if np.allclose(us[r], u, atol=1e-9) and np.allclose(vs[r], v, atol=1e-9):
        mix[r][kernel] += coef
        return
    us.append(u)
    vs.append(v)
    mix.append(np.zeros(n))
    mix[-1][kernel] = coef

  for i, kernel in enumerate(np.asarray(bank, np.float64)):
    c, (u, s, vt) = _without_constant(kernel)
    if c:
      add(np.ones(k), np.ones(k), i, c)
    for r in range(len(s)):
      add(u[r], vt[r], i, s[r])
  return np.array(us), np.array(vs), np.array(mix)


def _responses(gray: Array, bank: np.ndarray) -> Array:
  """Zero-padded 'same' cross-correlation of (B, H, W, 1) with a bank -> (n, B, H, W).

  The kernels are mixtures of a few separable terms (`_separable_terms`); every term is a
  banded-matrix product over rows then one over columns, and one small matrix product
  mixes the terms into the kernels' responses. The losses do not call it: they take the
  responses' energies through `_gram_terms` instead. It is the direct form of the same
  filtering, which the tests check against scipy and scripts/op_timings.py times.
  """
  bank = _check_bank(bank)
  pad = bank.shape[-1] // 2
  u, v, mix = _separable_terms(bank)
  _, h, w, _ = gray.shape
  rows = jnp.asarray(_band_matrices(h, u, pad))
  cols = jnp.asarray(_band_matrices(w, v, pad))
  t = jnp.einsum('rih,bhw->rbiw', rows, gray[..., 0], precision=_PRECISION)
  t = jnp.einsum('rjw,rbiw->rbij', cols, t, precision=_PRECISION)
  return jnp.einsum('rbij,rk->kbij', t, jnp.asarray(mix, jnp.float32), precision=_PRECISION)


def _gram_terms(bank: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  """(P (T, h, h), Q (T, w, w)), T small: sum_k R_k^T R_k = sum_t P_t (x) Q_t (row-major).

  R_k is the zero-padded 'same' cross-correlation of h x w images with kernel k, as a
  linear map; sum_k |R_k d|^2 = <d, G d> with G = sum_k R_k^T R_k, and G d = sum_t P_t d
  Q_t^T. With the separable terms of the bank, R_k = sum_r mix[r, k] A_r (x) B_r (A_r, B_r
  the row and column band matrices), so G = sum_{r, s} M[r, s] (A_r^T A_s) (x) (B_r^T B_s)
  with M = mix mix^T, exactly, the borders included. Those R^2 products are compressed
  to the fewest Kronecker terms by an SVD of G's rearrangement (Van Loan and Pitsianis:
  A (x) B -> vec(A) vec(B)^T), computed in float64 from QR factors of the two sides:
  Sobel's two kernels give 2 terms, the default Gabor bank's eight 13.
  """
  bank = _check_bank(bank)
  pad = bank.shape[-1] // 2
  u, v, mix = _separable_terms(bank)
  m = mix @ mix.T
  pairs = [(r, s) for r in range(len(u)) for s in range(len(u)) if m[r, s] != 0.0]
  if not pairs:  # an all-zero bank: G = 0
    return np.zeros((0, h, h), np.float32), np.zeros((0, w, w), np.float32)
  rows = _band_matrices(h, u, pad).astype(np.float64)
  cols = _band_matrices(w, v, pad).astype(np.float64)
  left = np.stack([(rows[r].T @ rows[s]).ravel() for r, s in pairs], axis=1)
  right = np.stack([(cols[r].T @ cols[s]).ravel() for r, s in pairs], axis=1)
  q_left, r_left = np.linalg.qr(left)
  q_right, r_right = np.linalg.qr(right)
  core = r_left @ (np.array([m[r, s] for r, s in pairs])[:, None] * r_right.T)
  uc, sc, vct = np.linalg.svd(core)
  # What is below 1e-9 of the largest term is rounding: the core's factors are float64
  # (_svd_terms cuts kernels at 1e-6, which also covers float32 kernels).
  keep = np.flatnonzero(sc > 1e-9 * max(sc[0], 1e-300))
  scale = np.sqrt(sc[keep])
  p = ((q_left @ uc[:, keep]) * scale).T.reshape(len(keep), h, h)
  q = ((q_right @ vct[keep].T) * scale).T.reshape(len(keep), w, w)
  return p.astype(np.float32), q.astype(np.float32)


@functools.lru_cache(maxsize=64)
def _cached_gram_terms(bank_bytes: bytes, shape: tuple[int, ...], h: int,
                       w: int) -> tuple[np.ndarray, np.ndarray]:
  """`_gram_terms` of a float64 bank given by its bytes (a hashable cache key)."""
  bank = np.frombuffer(bank_bytes, np.float64).reshape(shape)
  return _gram_terms(bank, h, w)


def _response_energies(x: Array, y: Array, banks: Sequence[Any]) -> list[Array]:
  """Per bank, the mean squared difference of its responses to luma y and luma x (B,).

  The mean is over the bank's kernels and the pixels; x is the target and gets no
  gradient. The filters are linear, so the difference of the responses is the response
  to the difference d of the images, and the mean of the squares is <d, G d> / (n H W)
  with the Gram operator G of `_gram_terms`: one application of G per bank gives the
  value, and the gradient, 2 G d / (n H W), needs no backward pass through the filters
  (a custom VJP). Applying G is a row product for each of its few terms, then one
  product that contracts the terms and the columns together: 3.2x faster at 28x28 and
  96x96 than the responses' forward and backward passes (docs/benchmarks.md, item 16).
  """
  x, y = _as_images(x), _as_images(y)
  chex.assert_equal_shape([x, y])
  _, h, w, _ = x.shape
  terms = []
  for bank in banks:
    bank = np.asarray(_check_bank(bank), np.float64)
    p, q = _cached_gram_terms(bank.tobytes(), bank.shape, h, w)
    # 1 / (n H W) goes into Q, so that G d comes out as the gradient's scale needs it.
    terms.append((jnp.asarray(p), jnp.asarray(q / (bank.shape[0] * h * w))))

  def apply_grams(d: Array) -> list[Array]:
    return [jnp.einsum('tjw,tbiw->bij', q, jnp.einsum('tih,bhw->tbiw', p, d,
                                                      precision=_PRECISION),
                       precision=_PRECISION) for p, q in terms]

  def energies_fwd(d: Array) -> tuple[list[Array], list[Array]]:
    gds = apply_grams(d)
    return [jnp.sum(d * gd, axis=(1, 2)) for gd in gds], gds

  @jax.custom_vjp
  def energies(d: Array) -> list[Array]:
    return energies_fwd(d)[0]

  def energies_bwd(gds: list[Array], cts: list[Array]) -> tuple[Array]:
    # G is symmetric: the gradient of <d, G d> is 2 G d.
    return (sum(2.0 * ct[:, None, None] * gd for ct, gd in zip(cts, gds)),)

  energies.defvjp(energies_fwd, energies_bwd)
  d = to_gray(y)[..., 0] - jax.lax.stop_gradient(to_gray(x)[..., 0])
  return energies(d)


def sobel_loss(x: Array, y: Array) -> Array:
  """Mean squared difference of Sobel x/y responses on luma (B,); x is the target."""
  return _response_energies(x, y, [filters.sobel_kernels()])[0]


def gabor_loss(x: Array, y: Array, bank: np.ndarray) -> Array:
  """Mean squared difference of luma responses to a bank (n, k, k) (B,); x is the target."""
  return _response_energies(x, y, [bank])[0]


def reconstruction_loss(x: Array, x_rec: Array,
                        weights: Mapping[str, float] | Iterable[tuple[str, float]],
                        gabor: GaborSpec | None = None) -> tuple[Array, dict[str, Array]]:
  """L_REC of Eq. 5 per image: (total (B,), {term: (B,)}) for the terms with nonzero weight.

  weights maps terms of config_lib.RECONSTRUCTION_TERMS to Python floats (static); absent or zero
  terms are neither computed nor returned. x is the target, x_rec the reconstruction.
  Sobel and Gabor filter the difference of the images; `gabor` defaults to GaborSpec().
  """
  x, x_rec = _as_images(x), _as_images(x_rec)
  chex.assert_equal_shape([x, x_rec])
  active = {}
  # dict() also accepts a tuple of (name, weight) pairs, the hashable form of a mapping.
  for name, w in dict(weights).items():
    if name not in config_lib.RECONSTRUCTION_TERMS:
      raise ValueError(f'unknown reconstruction term {name!r}; terms are '
                       f'{", ".join(config_lib.RECONSTRUCTION_TERMS)}')
    if float(w) != 0.0:
      active[name] = float(w)
  terms = {}
  if 'mae' in active:
    terms['mae'] = mae(x, x_rec)
  if 'mse' in active:
    terms['mse'] = mse(x, x_rec)
  if 'dssim' in active:
    terms['dssim'] = dssim(x, x_rec)
  banks = {}
  if 'sobel' in active:
    banks['sobel'] = filters.sobel_kernels()
  if 'gabor' in active:
    banks['gabor'] = (gabor or GaborSpec()).bank()
  if banks:
    terms.update(zip(banks, _response_energies(x, x_rec, list(banks.values()))))
  total = jnp.zeros((x.shape[0],), jnp.float32)
  for name, value in terms.items():
    total = total + active[name] * value
  return total, terms


def _as_latents(*arrays: Array) -> list[Array]:
  """Latent statistics as float32 at least (bfloat16 and float16 raised; float64 kept)."""
  # The encoder's heads give float32, but a caller may pass bfloat16: its 8-bit mantissa
  # cannot hold exp(logvar) - 1 - logvar near the prior (a 60% error in the KL, which can
  # go negative) nor the large log densities that the TC's logsumexps compare.
  return [jnp.asarray(a, jnp.promote_types(jnp.result_type(a), jnp.float32)) for a in arrays]


def kl_divergence(mu: Array, logvar: Array) -> Array:
  """Analytic KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dims (B,).

  float32, or float64 where the inputs are (_as_latents).
  """
  chex.assert_rank([mu, logvar], 2)
  chex.assert_equal_shape([mu, logvar])
  mu, logvar = _as_latents(mu, logvar)
  # expm1: exp(logvar) - 1 - logvar ~ logvar^2 / 2 for the many latents that sit at the
  # prior, and exp(logvar) - 1 in float32 rounds away most of that.
  return 0.5 * jnp.sum(jnp.square(mu) + jnp.expm1(logvar) - logvar, axis=-1)


def mss_log_weights(batch_size: int, dataset_size: int, *, row_offset: Any = 0,
                    num_rows: int | None = None) -> Array:
  """Log importance weights of minibatch stratified sampling, rows row_offset.. (rows, M).

  Row i holds the weights of sample i (drawn from posterior i) over the M posteriors of
  the batch; exp(row) sums to 1. Defaults to the full (M, M) matrix. row_offset may be
  traced (e.g. lax.axis_index * rows).

  Derivation (Chen et al. 2018, appendix "minibatch stratified sampling"): the aggregate
  posterior is q(z) = sum_n p(n) q(z|n) with p(n) = 1/N over the dataset. Sample i was
  drawn from q(z|n_i), so n_i is one stratum of one point (mass 1/N). The other N - 1
  points are split into K = M - 1 strata, one per other batch member: K - 1 strata of
  N/K points and one of N/K - 1 points (the stratum n_i was taken from). Each batch member
  stands for its stratum, so q(z_i) ~= sum_j w_ij q(z_i|n_j) with w_ij = |stratum_j| / N:
      w_ii = 1/N,  w_i,s(i) = (N - K) / (N K),  w_ij = 1/K for the K - 1 others.
  The stratum sizes add up to N (1 + (K-1) N/K + N/K - 1 = N), so N * w_i. sums to N and
  w_i. sums to 1: each row is a proper distribution over the batch, the stratified
  stand-in for p(n). The smaller stratum goes to s(i) = (i + 1) mod M (any fixed choice
  works, the batch order is random). The widely copied reference code writes these
  weights into the flattened matrix with a stride of the batch size, which walks down
  columns 0 and 1 instead of along the diagonal: every sample gives 1/N to posterior 0
  instead of its own, and one row does not sum to 1.
  """
  m, n = int(batch_size), float(dataset_size)
  if m < 2:
    raise ValueError(f'minibatch stratified sampling needs a batch of at least 2, got {m}')
  if n < m:
    raise ValueError(f'dataset_size {dataset_size} is smaller than the batch {m}')
  k = m - 1
  rows = num_rows if num_rows is not None else m
  i = jnp.arange(rows)[:, None] + row_offset
  j = jnp.arange(m)[None, :]
  # N >= M > K, so every weight is positive and finite.
  log_own, log_strat, log_other = -math.log(n), math.log((n - k) / (n * k)), -math.log(k)
  logw = jnp.where(j == i, log_own, jnp.where(j == (i + 1) % m, log_strat, log_other))
  return logw.astype(jnp.float32)


def _log_normal(z: Array, mu: Array, logvar: Array) -> Array:
  """Elementwise log N(z; mu, exp(logvar))."""
  # Scaling (z - mu) by exp(-logvar / 2) before squaring overflows only for
  # logvar < -176 in float32 (exp(-logvar) itself overflows below -88).
  return -0.5 * (_LOG_2PI + logvar + jnp.square((z - mu) * jnp.exp(-0.5 * logvar)))


def total_correlation(z: Array, mu: Array, logvar: Array, dataset_size: int,
                      estimator: str, *, row_offset: Any = 0) -> Array:
  """Minibatch estimate of TC = KL(q(z) || prod_j q(z_j)) (Chen et al. 2018), a scalar.

  z: (m, D) samples with z[i] drawn from posterior row_offset + i of mu/logvar (M, D), the
  posteriors of the whole minibatch. Returns the mean over the m rows of
  log q(z_i) - sum_d log q(z_id). estimator 'mws' (minibatch-weighted sampling) weighs
  every posterior by 1/(N M), as the paper (and the PyTorch twin) does; these weights sum
  to 1/N per row, so the value equals the estimate with weights 1/M plus the constant
  (D - 1) log N (no effect on gradients, but not near zero for independent latents).
  'mss' (minibatch-stratified sampling) uses mss_log_weights, rows that sum to 1.
  dataset_size N is a static Python number.
  """
  chex.assert_rank([z, mu, logvar], 2)
  chex.assert_equal_shape([mu, logvar])
  chex.assert_equal_shape_suffix([z, mu], 1)
  z, mu, logvar = _as_latents(z, mu, logvar)
  m, big_m = z.shape[0], mu.shape[0]
  if big_m == 0:
    raise ValueError('total_correlation needs at least one posterior; mu and logvar have '
                     'no rows')
  if dataset_size < big_m:
    raise ValueError(f'dataset_size {dataset_size} is smaller than the batch of {big_m} '
                     'posteriors')
  # mss gives sample i the weights of posterior row_offset + i: a row past the M posteriors
  # has no own posterior, and its weights do not sum to 1 (a wrong value, no error).
  offset = int(row_offset) if isinstance(row_offset, (int, np.integer)) else 0
  if estimator == 'mss' and offset + m > big_m:
    raise ValueError(f'the mss estimator needs a posterior for each sample: samples '
                     f'{offset}..{offset + m - 1} of {big_m} posteriors')
  # log q(z_i[d] | n_j[d]) for every sample i, posterior j, latent dim d: (m, M, D).
  log_q = _log_normal(z[:, None, :], mu[None], logvar[None])
  if estimator == 'mws':
    logw = jnp.full((m, big_m), -math.log(float(dataset_size) * big_m), jnp.float32)
  elif estimator == 'mss':
    logw = mss_log_weights(big_m, dataset_size, row_offset=row_offset, num_rows=m)
  else:
    raise ValueError(f'unknown TC estimator {estimator!r}; '
                     f'choose one of {config_lib.TC_ESTIMATORS}')
  log_qz = jax.nn.logsumexp(jnp.sum(log_q, axis=-1) + logw, axis=1)
  log_prod = jnp.sum(jax.nn.logsumexp(log_q + logw[:, :, None], axis=1), axis=-1)
  return jnp.mean(log_qz - log_prod)
