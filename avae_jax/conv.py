"""The models' 2-D convolution, with backward passes XLA:CPU runs well everywhere.

XLA:CPU computes the input gradient of a strided convolution as a correlation of the
zero-dilated output gradient with the whole kernel: s*s times the work, most of it
multiplying zeros, and far below the forward pass's rate at the models' high-resolution,
few-channel layers (docs/benchmarks.md, item 6). `conv_general_dilated('custom')` keeps
XLA's forward pass and, through a custom VJP, computes the input gradient of a strided
convolution as one small stride-1 correlation per output phase, interleaved
(`input_grad_subpixel`).

The custom VJP also writes each stride-1 convolution's gradients as convolutions in the
forward pass's own form (NHWC input, HWIO kernel, NHWC output; `input_grad_stride1`,
`weight_grad_stride1`), the form XLA:CPU's convolution kernels take. XLA brings its own
gradients to that form only in the program's top level: inside a `lax.cond` branch they
stayed in another form and ran about 90x slower, so the adversarial step could not skip the
discriminator's backward pass when its gated update is off (docs/benchmarks.md, item 21).

'auto' (the models' default) means 'custom' on the CPU and XLA's gradients elsewhere
(cuDNN and the TPU compute them well); 'xla' always uses XLA's. The parameters are the
same either way.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from avae_jax import config_lib

_NHWC = ('NHWC', 'HWIO', 'NHWC')
# The same as flax's dimension numbers for 2-D NHWC inputs and HWIO kernels.
_NHWC_NUMBERS = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, _NHWC)

Padding = tuple[tuple[int, int], tuple[int, int]]


def _forward(x: jax.Array, w: jax.Array, strides: tuple[int, int],
             padding: Padding) -> jax.Array:
  """The plain NHWC/HWIO convolution."""
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _phase_taps(k: int, s: int, pad: int, phase: int) -> list[int]:
  """Kernel taps that reach input rows r = s*m + phase: those with a = s*t + phase + pad."""
  return [a for a in range(k) if (a - phase - pad) % s == 0]


def _correlate_padded(g: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """Stride-1 correlation of g padded by `padding`, whose entries may be negative (crops)."""
  # XLA:CPU computes a convolution whose padding is negative on one side and positive on
  # the other wrongly (values up to 1e20 for kernel 6, stride 3, padding 4): the crops go
  # to lax.pad first, and the convolution gets only the non-negative part, so the usual
  # layers (no negative padding) compile exactly as before.
  crops = [(min(lo, 0), min(hi, 0), 0) for lo, hi in padding]
  if any(c != (0, 0, 0) for c in crops):
    g = lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), *crops, (0, 0, 0)])
  rest = tuple((max(lo, 0), max(hi, 0)) for lo, hi in padding)
  return lax.conv_general_dilated(g, kernel, (1, 1), rest, dimension_numbers=_NHWC)


def input_grad_subpixel(g: jax.Array, w: jax.Array, strides: tuple[int, int],
                        padding: Padding, in_hw: tuple[int, int]) -> jax.Array:
  """dL/dx (N, H, W, C) of a strided convolution, one stride-1 convolution per phase.

  Row r = s*m + phase of the input is reached by the taps a = s*t + phase + pad from output
  row m - t, so each phase of dx is a small stride-1 correlation of g with those taps
  (flipped, input and output channels swapped), and the s*s phases interleave into dx.
  XLA instead correlates a zero-dilated g with the whole kernel: s*s times the work.
  Needs H and W divisible by their strides.
  """
  (sh, sw), (h, wd) = strides, in_hw
  if h % sh or wd % sw:
    raise ValueError(f'input {in_hw} is not divisible by the strides {strides}')
  n, ho, wo, _ = g.shape
  c = w.shape[2]
  rows = []
  for ph in range(sh):
    cols = []
    for pw in range(sw):
      ta = _phase_taps(w.shape[0], sh, padding[0][0], ph)
      tb = _phase_taps(w.shape[1], sw, padding[1][0], pw)
      if not ta or not tb:
        cols.append(jnp.zeros((n, h // sh, wd // sw, c), g.dtype))
        continue
      # Offsets t = (a - phase - pad) / s rise with a; g[m - t] pairs the flipped taps.
      kernel = jnp.flip(w[jnp.asarray(ta)][:, jnp.asarray(tb)], (0, 1)).swapaxes(2, 3)
      t_a = [(a - ph - padding[0][0]) // sh for a in ta]
      t_b = [(b - pw - padding[1][0]) // sw for b in tb]
      pad_a = (max(t_a), h // sh - ho - min(t_a))
      pad_b = (max(t_b), wd // sw - wo - min(t_b))
      cols.append(_correlate_padded(g, kernel, (pad_a, pad_b)))
    rows.append(jnp.stack(cols, axis=3))  # (N, H/sh, W/sw, sw, C)
  return jnp.stack(rows, axis=2).reshape(n, h, wd, c)


def input_grad_stride1(g: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
  """dL/dx of a stride-1 convolution: g correlated with the flipped, transposed kernel."""
  kh, kw = w.shape[:2]
  (top, bottom), (left, right) = padding
  kernel = jnp.flip(w, (0, 1)).swapaxes(2, 3)
  return _correlate_padded(g, kernel, ((kh - 1 - top, kh - 1 - bottom),
                                       (kw - 1 - left, kw - 1 - right)))


def weight_grad_stride1(x: jax.Array, g: jax.Array, padding: Padding) -> jax.Array:
  """dL/dw (kh, kw, C, O) of a stride-1 convolution, as a convolution over the batch.

  dw[a, b, c, o] = sum over n, i, j of x_pad[n, i + a, j + b, c] * g[n, i, j, o]: the
  input with its channels as the batch and its images as the features, correlated with
  the output gradient as the kernel (its images as the input features).
  """
  out = _correlate_padded(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)),
                          padding)  # (C, kh, kw, O)
  return jnp.transpose(out, (1, 2, 0, 3))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_custom(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                 padding: Padding) -> jax.Array:
  """The convolution, with the backward pass of `conv_general_dilated('custom')`."""
  return _forward(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
  """Forward pass; the residuals are the operands."""
  return _forward(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, g):
  """Stride 1: both gradients in the forward form; strided: input gradient by phase."""
  x, w = residuals
  if strides == (1, 1):
    return input_grad_stride1(g, w, padding), weight_grad_stride1(x, g, padding)
  _, vjp_w = jax.vjp(lambda w_: _forward(x, w_, strides, padding), w)
  (dw,) = vjp_w(g)
  return input_grad_subpixel(g, w, strides, padding, x.shape[1:3]), dw


_conv_custom.defvjp(_conv_fwd, _conv_bwd)


def uses_custom(backward: str) -> bool:
  """Whether `backward` means the custom backward pass on the current default backend."""
  if backward not in config_lib.CONV_BACKWARDS:
    raise ValueError(f'backward must be one of {config_lib.CONV_BACKWARDS}, got {backward!r}')
  return backward == 'custom' or (backward == 'auto' and jax.default_backend() == 'cpu')


def conv_general_dilated(backward: str = 'auto') -> Callable[..., jax.Array]:
  """A drop-in for `lax.conv_general_dilated` (flax's `nn.Conv(conv_general_dilated=...)`)."""
  uses_custom(backward)  # validates `backward` now rather than at the first call

  def conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
           padding: Any, lhs_dilation: Sequence[int] | None = None,
           rhs_dilation: Sequence[int] | None = None,
           dimension_numbers: Any = None, feature_group_count: int = 1,
           precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """2-D NHWC convolution with explicit padding; anything else goes to lax."""
    # Only a plain NHWC convolution (strided: over sides its strides divide) has a custom
    # gradient; every other convolution is XLA's, forward and backward.
    strides = tuple(int(s) for s in window_strides)
    supported = (uses_custom(backward) and lhs.ndim == 4 and not isinstance(padding, str)
                 and lhs.shape[1] % strides[0] == 0
                 and lhs.shape[2] % strides[1] == 0
                 and all(d == 1 for d in (lhs_dilation or (1, 1)))
                 and all(d == 1 for d in (rhs_dilation or (1, 1)))
                 and feature_group_count == 1 and precision is None
                 and preferred_element_type is None
                 and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                 == _NHWC_NUMBERS)
    if not supported:
      return lax.conv_general_dilated(
          lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, precision=precision,
          preferred_element_type=preferred_element_type)
    pad = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_custom(lhs, rhs, strides, pad)

  return conv
