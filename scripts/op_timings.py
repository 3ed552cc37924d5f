"""Times single operations of the training step, forward + backward, at CelebA shapes.

  python scripts/op_timings.py [--batch=64] [--repeats=5]

The measurements behind docs/benchmarks.md's performance notes: each line is the median
wall time of one jitted function (synchronised), so alternatives of one operation can be
compared on the machine at hand:

* SSIM's separable 11-tap Gaussian window on the five moment maps: depthwise convolutions
  (feature_group_count = channels) against two banded-matrix products (what losses.ssim
  uses);
* the Sobel + Gabor bank of the compound loss (10 kernels, 11x11) on a one-channel image
  at 96x96 and 28x28: one 'same' convolution against the sums of separable
  banded-matrix products, and the value and gradient of the Sobel and Gabor losses as
  quadratic forms with the banks' Gram operators (what losses.reconstruction_loss uses);
* 2x2 max pooling: flax's reduce_window, reshape + max (its gradient splits ties; not
  adopted, see docs/benchmarks.md) and models.max_pool_2x2 (what the discriminator uses);
* a 3x3 convolution of every resolution of the CelebA model (Table I widths): forward,
  input gradient and weight gradient separately;
* the 4x4 stride-2 convolution at 96x96 and 48x48: XLA's input gradient against the
  one by phase (conv.input_grad_subpixel, what the models use on the CPU).

The XLA:CPU flags of avae_jax.xla_flags are set first, as in train.py.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from avae_jax import conv as conv_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from avae_jax import filters  # pylint: disable=g-import-not-at-top,wrong-import-position
from avae_jax import hugepages  # pylint: disable=g-import-not-at-top,wrong-import-position
from avae_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from avae_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from avae_jax import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# Bounded: a batch below 1 failed inside JAX with a traceback, and no repeats printed NaN ms.
_BATCH = flags.DEFINE_integer('batch', 64, 'Batch size.', lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per operation (median).',
                                lower_bound=1)
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def median_ms(fn: Callable[..., Any], *args: Any) -> float:
  """Median milliseconds of a jitted call after one compiling call."""
  fn = jax.jit(fn)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _depthwise_blur(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """The separable window as two depthwise convolutions (the alternative measured)."""
  c = x.shape[-1]
  for kernel in (taps[:, None], taps[None, :]):
    k = jnp.broadcast_to(jnp.asarray(kernel, jnp.float32)[:, :, None, None],
                         kernel.shape + (1, c))
    x = jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID', dimension_numbers=_DIMS,
                                     feature_group_count=c,
                                     precision=jax.lax.Precision.HIGHEST)
  return x


def _reshape_max_pool(x: jax.Array) -> jax.Array:
  """2x2 max pooling as a reshape and a max (the alternative measured)."""
  b, h, w, c = x.shape
  return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def _grad_of_sum_of_squares(f: Callable[[jax.Array], jax.Array]) -> Callable:
  """x -> d/dx sum(f(x)^2): a forward and a backward pass of f."""
  return jax.grad(lambda x: jnp.sum(jnp.square(f(x))))


# The losses' private building blocks are what this script times, one by one.
# pylint: disable=protected-access
def main(argv: list[str]) -> None:
  """Prints one line per operation."""
  del argv
  hugepages.reexec()  # first: a restart repeats everything before it
  xla_flags.apply()
  b = _BATCH.value
  key = jax.random.PRNGKey(0)
  rows = []

  taps = filters.gaussian_kernel_1d(11, 1.5)
  moments = jax.random.uniform(key, (b, 96, 96, 15))
  rows.append(('SSIM window, depthwise convolutions', median_ms(
      _grad_of_sum_of_squares(lambda m: _depthwise_blur(m, taps)), moments)))
  rows.append(('SSIM window, banded matrix products', median_ms(
      _grad_of_sum_of_squares(lambda m: losses._separable_blur(m, taps)),
      moments)))

  # Sobel's 3x3 kernels in the middle of the Gabor kernels' 11x11 grid: one bank of ten.
  gabor = losses.GaborSpec().bank()
  bank = np.concatenate([np.pad(filters.sobel_kernels(), ((0, 0), (4, 4), (4, 4))), gabor])
  kernel = jnp.asarray(np.transpose(bank, (1, 2, 0))[:, :, None, :])
  for side in (96, 28):
    gray = jax.random.uniform(key, (b, side, side, 1))
    rows.append((f'Sobel + Gabor bank {side}x{side}, 11x11 convolution', median_ms(
        _grad_of_sum_of_squares(lambda g: jax.lax.conv_general_dilated(
            g, kernel, (1, 1), ((5, 5), (5, 5)), dimension_numbers=_DIMS,
            precision=jax.lax.Precision.HIGHEST)), gray)))
    rows.append((f'Sobel + Gabor bank {side}x{side}, separable products', median_ms(
        _grad_of_sum_of_squares(lambda g: losses._responses(g, bank)),
        gray)))
    # What the losses compute instead: the mean squared responses as quadratic forms
    # (value and gradient of the Sobel and the Gabor loss, the target all zeros).
    zeros = jnp.zeros_like(gray)
    rows.append((f'Sobel + Gabor losses {side}x{side}, Gram products (losses.py)', median_ms(
        jax.grad(lambda g: sum(jnp.sum(e) for e in losses._response_energies(
            zeros, g, [filters.sobel_kernels(), gabor]))), gray)))

  h = jax.random.normal(key, (b, 96, 96, 24))
  rows.append(('max pool 2x2, reduce_window', median_ms(
      _grad_of_sum_of_squares(lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))), h)))
  rows.append(('max pool 2x2, reshape + max', median_ms(
      _grad_of_sum_of_squares(_reshape_max_pool), h)))
  rows.append(('max pool 2x2, elementwise selects (models)', median_ms(
      _grad_of_sum_of_squares(models.max_pool_2x2), h)))

  for side, width in ((96, 24), (48, 48), (24, 96), (12, 192)):
    x = jax.random.normal(key, (b, side, side, width))
    w = 0.1 * jax.random.normal(key, (3, 3, width, width))

    def conv(x, w):
      return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=_DIMS)
    y, vjp = jax.vjp(conv, x, w)
    ct = jnp.ones_like(y)
    flops = 2 * b * side * side * 9 * width * width
    for what, fn, arg in (('forward', lambda v: conv(v, w), x),
                          ('input gradient', lambda c: vjp(c)[0], ct),
                          ('weight gradient', lambda c: vjp(c)[1], ct)):
      ms = median_ms(fn, arg)
      rows.append((f'conv 3x3 {side}x{side}x{width}, {what} '
                   f'({flops / ms / 1e6:.0f} GFLOP/s)', ms))

  for side, width in ((96, 24), (48, 48)):
    x = jax.random.normal(key, (b, side, side, width))
    w = 0.1 * jax.random.normal(key, (4, 4, width, width))
    _, vjp = jax.vjp(lambda v: jax.lax.conv_general_dilated(
        v, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_DIMS), x)
    ct = jnp.ones((b, side // 2, side // 2, width))
    rows.append((f'conv 4x4 stride 2 {side}x{side}x{width}, input gradient (XLA)',
                 median_ms(lambda c: vjp(c)[0], ct)))
    rows.append((f'conv 4x4 stride 2 {side}x{side}x{width}, input gradient by phase',
                 median_ms(lambda c: conv_lib.input_grad_subpixel(
                     c, w, (2, 2), ((1, 1), (1, 1)), (side, side)), ct)))

  width = max(len(name) for name, _ in rows)
  print(f'{jax.default_backend()} x{jax.device_count()}, batch {b}, median of '
        f'{_REPEATS.value}')
  for name, ms in rows:
    print(f'{name:<{width}}  {ms:10.3f} ms')  # to the µs: the smallest ops take about 0.1 ms


if __name__ == '__main__':
  app.run(main)
