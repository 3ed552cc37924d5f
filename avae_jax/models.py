"""Encoder, decoder, discriminator and VAE of Table I (flax.linen), sized by the config.

Every convolution or dense layer that feeds a BatchNorm has no bias: the BatchNorm's
mean subtraction cancels it, and its own shift plays that role. BatchNorm takes an
`axis_name`, so inside `pmap`/`shard_map` its batch statistics are those of the global
batch. With `dtype=bfloat16` the layers compute in bfloat16 while the parameters (and the
BatchNorm reductions) stay float32; the model outputs are always float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from avae_jax import config_lib
from avae_jax import conv

Dtype = Any
# The float32 layers (the encoder's heads, the decoder's output, the discriminator's
# logit) ask for full float32 products: by default TPUs compute a float32 product in
# bfloat16 and recent NVIDIA GPUs in TF32, whatever the layer's dtype. Tiny layers: the
# cost is nothing next to the network.
FULL = jax.lax.Precision.HIGHEST


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling of an NHWC batch by an integer factor.

  The gradient, each pixel's sum over its factor x factor block, is computed as the sum
  of the block's strided slices: XLA's reduction of the reshaped gradient (the transpose
  of broadcast + reshape) ran several times slower on XLA:CPU (docs/benchmarks.md).
  """
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


def _upsample_nearest_fwd(x: jax.Array, factor: int) -> tuple[jax.Array, None]:
  return upsample_nearest(x, factor), None


def _upsample_nearest_bwd(factor: int, _: None, g: jax.Array) -> tuple[jax.Array]:
  blocks = [g[:, i::factor, j::factor] for i in range(factor) for j in range(factor)]
  return (functools.reduce(jnp.add, blocks),)


upsample_nearest.defvjp(_upsample_nearest_fwd, _upsample_nearest_bwd)


def _quadrants(x: jax.Array) -> tuple[jax.Array, ...]:
  """The four elements of every 2x2 window of an NHWC batch, in row-major window order."""
  return x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2, of an NHWC batch with even sides (nn.max_pool's values).

  The gradient goes to the first maximum of each window in row-major order, as with
  nn.max_pool (reduce_window), but through elementwise selects instead of XLA's
  select-and-scatter, which XLA:CPU runs slowly (docs/benchmarks.md). Ties are not
  split: with jnp.max's gradient, which splits them, the discriminator's gradients
  differed between device layouts (tests/test_distributed.py).
  """
  a, b, c, d = _quadrants(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_2x2_fwd(x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  m = max_pool_2x2(x)
  return m, (x, m)


def _max_pool_2x2_bwd(residuals: tuple[jax.Array, jax.Array],
                      g: jax.Array) -> tuple[jax.Array]:
  x, m = residuals
  a, b, c, d = _quadrants(x)
  zero = jnp.zeros_like(g)
  take_a = a == m
  take_b = (b == m) & ~take_a
  take_c = (c == m) & ~(take_a | take_b)
  take_d = ~(take_a | take_b | take_c)
  ga, gb, gc, gd = (jnp.where(t, g, zero) for t in (take_a, take_b, take_c, take_d))
  # Interleave the four quadrants back into (B, H, W, C): rows (a b / c d) per window.
  top = jnp.stack([ga, gb], axis=3)
  bottom = jnp.stack([gc, gd], axis=3)
  n, h2, w2, ch = g.shape
  return (jnp.stack([top, bottom], axis=2).reshape(n, 2 * h2, 2 * w2, ch),)


max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


class ConvBNReLU(nn.Module):
  """Convolution (no bias) + BatchNorm + ReLU, the repeated unit of Table I."""
  features: int
  kernel: int = 3
  stride: int = 1
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_backward: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the unit; padding 1 on each side, so the side shrinks only by the stride."""
    # Padding 1 on each side for both the 3x3 (stride 1) and the 4x4 (stride 2)
    # convolutions, as in the paper's Keras/PyTorch models: side -> side / stride.
    x = nn.Conv(self.features, (self.kernel, self.kernel), strides=self.stride,
                padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                conv_general_dilated=conv.conv_general_dilated(self.conv_backward))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     axis_name=self.axis_name, dtype=self.dtype)(x)
    return nn.relu(x)


class DenseBNTanh(nn.Module):
  """Fully connected (no bias) + BatchNorm + tanh, the dense unit of Table I."""
  features: int
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the unit to a (B, F) batch."""
    x = nn.Dense(self.features, use_bias=False, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     axis_name=self.axis_name, dtype=self.dtype)(x)
    return jnp.tanh(x)


def _check_input(x: jax.Array, widths: Sequence[int]) -> None:
  """Rank-4 NHWC input whose sides the downsampling stages divide (else ConfigError)."""
  chex.assert_rank(x, 4)
  config_lib.check_image_size(x.shape[1], tuple(widths))
  config_lib.check_image_size(x.shape[2], tuple(widths))


class Encoder(nn.Module):
  """Table I encoder: per width conv3x3 s1 + conv4x4 s2 (BN, ReLU); FC + BN + tanh; mu, logvar."""
  widths: Sequence[int]
  latent_dim: int
  hidden_dim: int = 48
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_backward: str = 'auto'  # config_lib.CONV_BACKWARDS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Maps (B, H, W, C) images to float32 (mu, logvar), each (B, latent_dim)."""
    _check_input(x, self.widths)
    kw = dict(bn_momentum=self.bn_momentum, axis_name=self.axis_name, dtype=self.dtype)
    conv_kw = dict(kw, conv_backward=self.conv_backward)
    h = x.astype(self.dtype)
    for w in self.widths:
      h = ConvBNReLU(w, kernel=3, stride=1, **conv_kw)(h, train)
      h = ConvBNReLU(w, kernel=4, stride=2, **conv_kw)(h, train)
    h = h.reshape((h.shape[0], math.prod(h.shape[1:])))  # -1 fails for an empty batch
    h = DenseBNTanh(self.hidden_dim, **kw)(h, train)
    # The heads run in float32: exp(logvar) amplifies any rounding of logvar.
    h = h.astype(jnp.float32)
    mu = nn.Dense(self.latent_dim, dtype=jnp.float32, precision=FULL, name='mu')(h)
    logvar = nn.Dense(self.latent_dim, dtype=jnp.float32, precision=FULL, name='logvar')(h)
    chex.assert_shape([mu, logvar], (x.shape[0], self.latent_dim))
    return mu, logvar


class Decoder(nn.Module):
  """Table I decoder: FC + BN + tanh; FC to s*s*w_last; per width (reversed) conv, x2, conv; 1x1."""
  widths: Sequence[int]
  image_size: int
  channels: int
  hidden_dim: int = 48
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_backward: str = 'auto'  # config_lib.CONV_BACKWARDS

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    """Maps (B, latent) codes to float32 images (B, H, W, C) in [0, 1]."""
    chex.assert_rank(z, 2)
    s = config_lib.check_image_size(self.image_size, tuple(self.widths))
    kw = dict(bn_momentum=self.bn_momentum, axis_name=self.axis_name, dtype=self.dtype)
    conv_kw = dict(kw, conv_backward=self.conv_backward)
    h = DenseBNTanh(self.hidden_dim, **kw)(z.astype(self.dtype), train)
    h = DenseBNTanh(s * s * self.widths[-1], **kw)(h, train)
    h = h.reshape((h.shape[0], s, s, self.widths[-1]))
    for w in reversed(self.widths):
      h = ConvBNReLU(w, kernel=3, **conv_kw)(h, train)
      h = upsample_nearest(h, 2)
      h = ConvBNReLU(w, kernel=3, **conv_kw)(h, train)
    # Table I's "conv_transpose 1x1" is a 1x1 convolution (with bias: no BN follows).
    # It and the sigmoid run in float32 so that outputs and losses keep full precision.
    logits = nn.Conv(self.channels, (1, 1), dtype=jnp.float32, precision=FULL,
                     name='to_image')(h.astype(jnp.float32))
    x_rec = nn.sigmoid(logits)
    chex.assert_shape(x_rec, (z.shape[0], self.image_size, self.image_size, self.channels))
    return x_rec


class Discriminator(nn.Module):
  """The encoder's stages with 2x2 max-pooling instead of downsampling convs; one logit.

  Each stage is two 3x3 stride-1 conv units and a 2x2 max-pool, where the encoder has a
  3x3 and a 4x4 stride-2 unit (README: Deviations from the paper's text).
  """
  widths: Sequence[int]
  hidden_dim: int = 48
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_backward: str = 'auto'  # config_lib.CONV_BACKWARDS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps (B, H, W, C) images to float32 logits (B,) (positive = judged real)."""
    _check_input(x, self.widths)
    kw = dict(bn_momentum=self.bn_momentum, axis_name=self.axis_name, dtype=self.dtype)
    conv_kw = dict(kw, conv_backward=self.conv_backward)
    h = x.astype(self.dtype)
    for w in self.widths:
      h = ConvBNReLU(w, kernel=3, **conv_kw)(h, train)
      h = ConvBNReLU(w, kernel=3, **conv_kw)(h, train)
      h = max_pool_2x2(h)
    h = h.reshape((h.shape[0], math.prod(h.shape[1:])))  # -1 fails for an empty batch
    h = DenseBNTanh(self.hidden_dim, **kw)(h, train)
    logit = nn.Dense(1, dtype=jnp.float32, precision=FULL, name='logit')(
        h.astype(jnp.float32))[:, 0]
    chex.assert_shape(logit, (x.shape[0],))
    return logit


class VAE(nn.Module):
  """Encoder + reparameterised sample + decoder; the noise is an input (pure function)."""
  widths: Sequence[int]
  image_size: int
  channels: int
  latent_dim: int
  hidden_dim: int = 48
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Dtype = jnp.float32
  conv_backward: str = 'auto'  # config_lib.CONV_BACKWARDS

  def setup(self) -> None:
    """Builds the two halves with the shared settings."""
    kw = dict(hidden_dim=self.hidden_dim, bn_momentum=self.bn_momentum,
              axis_name=self.axis_name, dtype=self.dtype,
              conv_backward=self.conv_backward)
    self.encoder = Encoder(self.widths, self.latent_dim, **kw)
    self.decoder = Decoder(self.widths, self.image_size, self.channels, **kw)

  def encode(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """(mu, logvar) of q(z|x), each (B, latent_dim) float32."""
    chex.assert_shape(x, (None, self.image_size, self.image_size, self.channels))
    return self.encoder(x, train)

  def decode(self, z: jax.Array, train: bool) -> jax.Array:
    """Images (B, H, W, C) float32 in [0, 1] for codes z (B, latent_dim)."""
    chex.assert_shape(z, (None, self.latent_dim))
    return self.decoder(z, train)

  def __call__(self, x: jax.Array, eps: jax.Array,
               train: bool) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(x_rec, z, mu, logvar) with z = mu + exp(logvar / 2) * eps."""
    mu, logvar = self.encode(x, train)
    chex.assert_equal_shape([mu, eps])
    z = mu + jnp.exp(0.5 * logvar) * eps.astype(jnp.float32)
    return self.decode(z, train), z, mu, logvar


def create_models(config: ml_collections.ConfigDict) -> tuple[VAE, Discriminator]:
  """The VAE and discriminator of `config.model`; ConfigError for a model that cannot be built.

  Their BatchNorm has no axis name: the mapped steps bind theirs (TrainState.mapped_apply).
  """
  widths, dtype, backward = config_lib.check_model(config)
  common = dict(hidden_dim=int(config.model.hidden_dim),
                bn_momentum=float(config.model.bn_momentum),
                dtype=jnp.dtype(dtype), conv_backward=backward)
  vae = VAE(widths, int(config.image_size), int(config.channels),
            int(config.model.latent_dim), **common)
  disc = Discriminator(widths, **common)
  return vae, disc
