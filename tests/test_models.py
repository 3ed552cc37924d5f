"""Tests for avae_jax.models: shapes, dtypes, ranges, BatchNorm behaviour, Table I sizes."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avae_jax import config_lib
from avae_jax import models
from configs import default


def tiny_config(image_size=16, channels=3, widths=(4, 8), dtype='float32'):
  c = default.get_config()
  c.image_size = image_size
  c.channels = channels
  c.model.widths = widths
  c.model.latent_dim = 4
  c.model.hidden_dim = 8
  c.model.dtype = dtype
  return c


def _init(config, batch=6, seed=0):
  """Models, variables and inputs for `config`. The rbg PRNG keeps the init compile short."""
  vae, disc = models.create_models(config)
  rng = np.random.default_rng(seed)
  x = rng.uniform(size=(batch, config.image_size, config.image_size, config.channels))
  x = jnp.asarray(x, jnp.float32)
  eps = jnp.asarray(rng.normal(size=(batch, config.model.latent_dim)), jnp.float32)

  @jax.jit
  def init(key):
    k1, k2 = jax.random.split(key)
    return vae.init(k1, x, eps, train=False), disc.init(k2, x, train=False)

  v_vars, d_vars = init(jax.random.key(seed, impl='rbg'))
  return vae, disc, v_vars, d_vars, x, eps


@functools.partial(jax.jit, static_argnums=(0, 1))
def _outputs(vae, disc, v_vars, d_vars, x, eps):
  """Every output of both models in both modes, in one compiled program."""
  out = {}
  out['eval'] = vae.apply(v_vars, x, eps, train=False)
  out['train'], out['vae_stats'] = vae.apply(v_vars, x, eps, train=True, mutable=['batch_stats'])
  out['eval_stats'] = vae.apply(v_vars, x, eps, train=False, mutable=['batch_stats'])[1]
  out['encode'] = vae.apply(v_vars, x, train=False, method='encode')
  out['decode'] = vae.apply(v_vars, out['eval'][1], train=False, method='decode')
  out['logits_eval'] = disc.apply(d_vars, x, train=False)
  out['logits_train'], out['disc_stats'] = disc.apply(d_vars, x, train=True,
                                                      mutable=['batch_stats'])
  # Eval mode is per-sample; train mode normalises with the statistics of the batch.
  out['eval_first'] = vae.apply(v_vars, x[:1], eps[:1], train=False)[0]
  out['train_first_two'] = vae.apply(v_vars, x[:2], eps[:2], train=True,
                                     mutable=['batch_stats'])[0][0]
  return out


@functools.lru_cache(maxsize=None)
def _setup(image_size, channels, widths, dtype='float32'):
  vae, disc, v_vars, d_vars, x, eps = _init(tiny_config(image_size, channels, widths, dtype))
  out = jax.tree.map(np.asarray, _outputs(vae, disc, v_vars, d_vars, x, eps))
  return vae, disc, v_vars, d_vars, x, eps, out


@pytest.mark.parametrize('image_size,channels', [(16, 3), (28, 1)])
def test_output_shapes_dtypes_ranges(image_size, channels):
  *_, x, eps, out = _setup(image_size, channels, (4, 8))
  b = x.shape[0]
  for mode in ('eval', 'train'):
    x_rec, z, mu, logvar = out[mode]
    logits = out['logits_' + mode]
    assert x_rec.shape == (b, image_size, image_size, channels)
    assert mu.shape == logvar.shape == z.shape == (b, 4)
    assert logits.shape == (b,)
    for a in (x_rec, z, mu, logvar, logits):
      assert a.dtype == np.float32
      assert np.all(np.isfinite(a))
    assert np.all(x_rec > 0) and np.all(x_rec < 1)
    # Reparameterisation, checked in numpy.
    np.testing.assert_allclose(z, mu + np.exp(0.5 * logvar) * np.asarray(eps), rtol=1e-6,
                               atol=1e-6)
  # encode / decode methods agree with the full call (eval mode is per-sample).
  x_rec, z, mu, logvar = out['eval']
  np.testing.assert_array_equal(mu, out['encode'][0])
  np.testing.assert_array_equal(logvar, out['encode'][1])
  np.testing.assert_allclose(x_rec, out['decode'], atol=1e-6)


def test_three_stage_sizes():
  config = tiny_config(32, 3, (2, 4, 4))
  vae, disc = models.create_models(config)
  x = jnp.zeros((2, 32, 32, 3))
  eps = jnp.zeros((2, 4))

  def run(key):
    v_vars, d_vars = vae.init(key, x, eps, train=False), disc.init(key, x, train=False)
    return v_vars, vae.apply(v_vars, x, eps, train=False)[0], disc.apply(d_vars, x, train=False)

  v_vars, x_rec, logits = jax.eval_shape(run, jax.random.key(0))
  assert x_rec.shape == (2, 32, 32, 3)
  assert logits.shape == (2,)
  # Bottleneck side 32 / 2**3 = 4: the decoder's dense layer has 4*4*4 units.
  kernel = v_vars['params']['decoder']['DenseBNTanh_1']['Dense_0']['kernel']
  assert kernel.shape == (8, 4 * 4 * 4)


def test_bfloat16_compute_float32_params_and_outputs():
  vae16, disc16, v_vars16, d_vars16, x, eps, _ = _setup(16, 3, (4, 8), 'bfloat16')
  vae32, disc32, *_ = _setup(16, 3, (4, 8), 'float32')
  for leaf in jax.tree.leaves((v_vars16, d_vars16)):
    assert leaf.dtype == jnp.float32
  # The same float32 parameters through both models: close, not equal (bf16 compute).
  out16 = jax.tree.map(np.asarray, _outputs(vae16, disc16, v_vars16, d_vars16, x, eps))
  out32 = jax.tree.map(np.asarray, _outputs(vae32, disc32, v_vars16, d_vars16, x, eps))
  for a, b in zip(out16['train'] + (out16['logits_train'],),
                  out32['train'] + (out32['logits_train'],)):
    assert a.dtype == np.float32
    # Measured: at most 0.023 apart (logvar); a relative tolerance would let the
    # latents (up to ~3) drift further.
    np.testing.assert_allclose(a, b, atol=0.05, rtol=0)
  assert not np.array_equal(out16['train'][0], out32['train'][0])
  # The convolutions really run in bfloat16.
  jaxpr = str(jax.make_jaxpr(lambda v: vae16.apply(v, x, eps, train=False))(v_vars16))
  conv_lines = [l for l in jaxpr.splitlines() if 'conv_general_dilated' in l]
  assert conv_lines and all('bf16' in l for l in conv_lines[:-1])


def test_the_float32_layers_ask_for_full_float32_products():
  # The CPU computes float32 products in full whatever the precision; TPUs and GPUs take
  # DEFAULT as bfloat16 or TF32. So the lowered programs are checked: with bfloat16
  # compute, the float32 products (the heads mu and logvar, the 1x1 output convolution,
  # the discriminator's logit) say HIGHEST, and only they do.
  vae, disc, v_vars, d_vars, x, eps, _ = _setup(16, 3, (4, 8), 'bfloat16')
  for fn, variables, count in ((lambda v: vae.apply(v, x, eps, train=True,
                                                    mutable=['batch_stats']), v_vars, 3),
                               (lambda d: disc.apply(d, x, train=False), d_vars, 1)):
    text = jax.jit(fn).lower(variables).as_text()
    products = [line for line in text.splitlines()
                if 'stablehlo.dot_general' in line or 'stablehlo.convolution' in line]
    full = [line for line in products if line.rstrip().endswith('xf32>')]
    assert len(full) == count and all('HIGHEST' in line for line in full), full
    assert not any('HIGHEST' in line for line in products if line not in full)


@pytest.mark.parametrize('image_size,widths', [(18, (4, 8)), (28, (4, 8, 16)), (20, (4, 8, 16))])
def test_bad_image_size_is_a_clear_config_error(image_size, widths):
  with pytest.raises(config_lib.ConfigError, match='not divisible by 2\\*\\*len'):
    models.create_models(tiny_config(image_size, 3, widths))


def test_encoder_rejects_input_of_wrong_size():
  enc = models.Encoder((4, 8), latent_dim=4, hidden_dim=8)
  with pytest.raises(config_lib.ConfigError, match='image_size 18'):
    jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros((2, 18, 18, 3)), train=False))
  # The width is checked as well as the height (a non-square input called directly).
  disc = models.Discriminator((4, 8), hidden_dim=8)
  with pytest.raises(config_lib.ConfigError, match='image_size 18'):
    jax.eval_shape(lambda: disc.init(jax.random.key(0), jnp.zeros((2, 16, 18, 3)), train=False))


def test_vae_rejects_wrong_channels():
  vae, _, v_vars, _, x, eps, _ = _setup(16, 3, (4, 8))
  with pytest.raises(AssertionError):
    jax.eval_shape(lambda: vae.apply(v_vars, x[..., :1], eps, train=False))


def _np_conv(x, k, stride=1):
  """Table I's convolution in numpy: x (B, H, W, C) padded by 1 per side, k (kh, kw, C, O)."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  kh, kw = k.shape[:2]
  windows = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))
  return np.einsum('bijcuv,uvco->bijo', windows[:, ::stride, ::stride], k)


def _np_bn(h, params, stats, train):
  """BatchNorm (epsilon 1e-5): train mode the batch's biased statistics, eval the running ones."""
  axes = tuple(range(h.ndim - 1))
  mean, var = (h.mean(axes), h.var(axes)) if train else (stats['mean'], stats['var'])
  return (h - mean) / np.sqrt(var + 1e-5) * params['scale'] + params['bias']


def _np_unit(h, params, stats, name, train, stride=1):
  """Conv (no bias) + BN + ReLU, or for a DenseBNTanh unit dense (no bias) + BN + tanh."""
  p, s = params[name], stats[name]
  if name.startswith('Dense'):
    return np.tanh(_np_bn(h @ p['Dense_0']['kernel'], p['BatchNorm_0'], s['BatchNorm_0'], train))
  kernel = p['Conv_0']['kernel']
  assert kernel.shape[:2] == ((4, 4) if stride == 2 else (3, 3)), (name, kernel.shape)
  return np.maximum(_np_bn(_np_conv(h, kernel, stride), p['BatchNorm_0'], s['BatchNorm_0'],
                           train), 0.0)


def _np_models(v_vars, d_vars, x, eps, widths, train):
  """Table I's encoder, decoder and discriminator written out in numpy (float64).

  Returns (x_rec, z, mu, logvar) and the discriminator's logits. Layer order per stage:
  encoder conv 3x3, conv 4x4 stride 2; decoder conv 3x3, x2 nearest upsampling, conv
  3x3; discriminator conv 3x3, conv 3x3, 2x2 max-pool.
  """
  f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  params, stats, d_params, d_stats = map(f64, (v_vars['params'], v_vars['batch_stats'],
                                               d_vars['params'], d_vars['batch_stats']))
  x, eps = np.asarray(x, np.float64), np.asarray(eps, np.float64)
  b = len(x)
  enc, enc_s = params['encoder'], stats['encoder']
  h = x
  for i in range(len(widths)):
    h = _np_unit(h, enc, enc_s, f'ConvBNReLU_{2 * i}', train)
    h = _np_unit(h, enc, enc_s, f'ConvBNReLU_{2 * i + 1}', train, stride=2)
  h = _np_unit(h.reshape(b, -1), enc, enc_s, 'DenseBNTanh_0', train)
  mu = h @ enc['mu']['kernel'] + enc['mu']['bias']
  logvar = h @ enc['logvar']['kernel'] + enc['logvar']['bias']
  z = mu + np.exp(logvar / 2) * eps
  dec, dec_s = params['decoder'], stats['decoder']
  h = _np_unit(_np_unit(z, dec, dec_s, 'DenseBNTanh_0', train), dec, dec_s, 'DenseBNTanh_1',
               train)
  side = x.shape[1] // 2 ** len(widths)
  h = h.reshape(b, side, side, widths[-1])
  for i in range(len(widths)):
    h = _np_unit(h, dec, dec_s, f'ConvBNReLU_{2 * i}', train)
    h = h.repeat(2, axis=1).repeat(2, axis=2)
    h = _np_unit(h, dec, dec_s, f'ConvBNReLU_{2 * i + 1}', train)
  logits = h @ dec['to_image']['kernel'][0, 0] + dec['to_image']['bias']
  x_rec = 1.0 / (1.0 + np.exp(-logits))
  h = x
  for i in range(len(widths)):
    h = _np_unit(h, d_params, d_stats, f'ConvBNReLU_{2 * i}', train)
    h = _np_unit(h, d_params, d_stats, f'ConvBNReLU_{2 * i + 1}', train)
    h = h.reshape(b, h.shape[1] // 2, 2, h.shape[2] // 2, 2, -1).max(axis=(2, 4))
  h = _np_unit(h.reshape(b, -1), d_params, d_stats, 'DenseBNTanh_0', train)
  disc_logits = (h @ d_params['logit']['kernel'] + d_params['logit']['bias'])[:, 0]
  return (x_rec, z, mu, logvar), disc_logits


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
def test_both_models_equal_table_one_written_out_in_numpy(train):
  vae, disc, v_vars, d_vars, x, eps, _ = _setup(16, 3, (4, 8))
  # Every parameter and running statistic moved off its initial value (BatchNorm's 1s and
  # 0s would hide a scale or shift applied in the wrong place).
  rng = np.random.default_rng(11)
  jiggle = lambda tree: jax.tree.map(
      lambda a: np.asarray(a) * rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
      + rng.normal(0.0, 0.1, a.shape).astype(np.float32), tree)
  positive_var = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, a: np.abs(a) if path[-1].key == 'var' else a, tree)
  v_vars, d_vars = positive_var(jiggle(v_vars)), positive_var(jiggle(d_vars))
  got = jax.jit(lambda v, d: (vae.apply(v, x, eps, train, mutable=['batch_stats'])[0],
                              disc.apply(d, x, train, mutable=['batch_stats'])[0]))(
                                  v_vars, d_vars)
  want = _np_models(v_vars, d_vars, x, eps, (4, 8), train)
  for name, a, b in zip(('x_rec', 'z', 'mu', 'logvar', 'logits'), (*got[0], got[1]),
                        (*want[0], want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_batchnorm_running_stats_update_in_train_mode_only():
  _, _, v_vars, d_vars, x, _, out = _setup(16, 3, (4, 8))
  old = jax.tree.leaves(v_vars['batch_stats'])
  # Eval mode: nothing changes, even when the collection is mutable.
  for a, b in zip(jax.tree.leaves(out['eval_stats']['batch_stats']), old):
    np.testing.assert_array_equal(a, np.asarray(b))
  # Train mode: every running statistic moves.
  for a, b in zip(jax.tree.leaves(out['vae_stats']['batch_stats']), old):
    assert not np.allclose(a, np.asarray(b))
  for a, b in zip(jax.tree.leaves(out['disc_stats']['batch_stats']),
                  jax.tree.leaves(d_vars['batch_stats'])):
    assert not np.allclose(a, np.asarray(b))
  # The first encoder BatchNorm: running = momentum * init + (1 - momentum) * batch stat
  # of the first convolution's output (computed here in numpy), momentum 0.9, init 0 / 1.
  kernel = np.asarray(v_vars['params']['encoder']['ConvBNReLU_0']['Conv_0']['kernel'])
  h = _np_conv(np.asarray(x, np.float64), kernel.astype(np.float64))
  stats = out['vae_stats']['batch_stats']['encoder']['ConvBNReLU_0']['BatchNorm_0']
  np.testing.assert_allclose(stats['mean'], 0.1 * h.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * h.var(axis=(0, 1, 2)), rtol=1e-4)
  # Eval mode is per-sample (running stats); train mode depends on the other samples.
  np.testing.assert_allclose(out['eval_first'], out['eval'][0][:1], atol=1e-6)
  # (Image 0 of each: the whole pair against one image compared other images too.)
  assert np.abs(out['train_first_two'][0] - out['train'][0][0]).max() > 1e-3


def test_every_batchnorm_uses_the_configs_momentum():
  # With momentum m, one train-mode step from the initial statistics (mean 0, var 1) leaves
  # running mean = (1 - m) * batch mean and running var = m + (1 - m) * batch variance
  # (biased) of the BatchNorm's input: the Conv_0 / Dense_0 output of its unit, captured
  # and reduced here in numpy. Every BatchNorm of both models, so a unit that ignored the
  # config (or a default of 0.9 that won) shows.
  c = tiny_config(16, 3, (4, 8))
  c.model.bn_momentum = 0.5
  vae, disc, v_vars, d_vars, x, eps = _init(c)
  is_layer = lambda mdl, name: name == '__call__' and type(mdl).__name__ in ('Conv', 'Dense')
  _, v_out = vae.apply(v_vars, x, eps, train=True, mutable=['batch_stats', 'intermediates'],
                       capture_intermediates=is_layer)
  _, d_out = disc.apply(d_vars, x, train=True, mutable=['batch_stats', 'intermediates'],
                        capture_intermediates=is_layer)
  checked = 0
  for out in (v_out, d_out):
    stats = flax.traverse_util.flatten_dict(out['batch_stats'])
    inputs = flax.traverse_util.flatten_dict(out['intermediates'])
    for path, running in stats.items():
      unit = path[:-2]  # (..., unit, 'BatchNorm_0', 'mean' | 'var')
      [layer_in] = [v for k, v in inputs.items() if k[:-2] == unit]  # Conv_0 or Dense_0
      h = np.asarray(layer_in[0], np.float64)
      h = h.reshape(-1, h.shape[-1])
      expected = (0.5 * h.mean(0) if path[-1] == 'mean' else 0.5 + 0.5 * h.var(0))
      np.testing.assert_allclose(running, expected, rtol=1e-4, atol=1e-6, err_msg=str(path))
      checked += 1
  # Two stages: the encoder's 4 conv units (two per stage) and 1 dense unit, the decoder's
  # 2 dense and 4 conv units, the discriminator's 4 conv and 1 dense; a mean and a var each.
  assert checked == 2 * 16, checked


def test_parameter_count_celeba_table_one():
  c = default.get_config()
  c.image_size, c.channels = 96, 3
  c.model.widths, c.model.latent_dim, c.model.hidden_dim = (24, 48, 96, 192), 32, 48
  vae, disc = models.create_models(c)
  x = jax.ShapeDtypeStruct((2, 96, 96, 3), jnp.float32)
  eps = jax.ShapeDtypeStruct((2, 32), jnp.float32)
  v_shapes = jax.eval_shape(functools.partial(vae.init, train=False), jax.random.key(0), x, eps)
  d_shapes = jax.eval_shape(functools.partial(disc.init, train=False), jax.random.key(0), x)
  count = lambda tree: sum(int(np.prod(l.shape)) for l in jax.tree.leaves(tree))

  # Table I, row by row. A layer followed by bnorm has no bias (bnorm's shift replaces it)
  # and its bnorm adds a scale and a shift per unit (2 * out). k: kernel side.
  def conv_bn(k, cin, cout):
    return k * k * cin * cout + 2 * cout

  def fc_bn(fin, fout):
    return fin * fout + 2 * fout

  encoder = (conv_bn(3, 3, 24) + conv_bn(4, 24, 24)        # 24 conv 3x3 s1, 24 conv 4x4 s2
             + conv_bn(3, 24, 48) + conv_bn(4, 48, 48)     # 48 ...
             + conv_bn(3, 48, 96) + conv_bn(4, 96, 96)     # 96 ...
             + conv_bn(3, 96, 192) + conv_bn(4, 192, 192)  # 192 ...
             + fc_bn(6 * 6 * 192, 48)                      # 48 fully connected on 6x6x192
             + 2 * (48 * 32 + 32))                         # z_mean, z_sigma: 32 each (bias)
  decoder = (fc_bn(32, 48)                                 # 48 fully connected
             + fc_bn(48, 6 * 6 * 192)                      # 6x6x192 fully connected
             + conv_bn(3, 192, 192) + conv_bn(3, 192, 192)
             + conv_bn(3, 192, 96) + conv_bn(3, 96, 96)
             + conv_bn(3, 96, 48) + conv_bn(3, 48, 48)
             + conv_bn(3, 48, 24) + conv_bn(3, 24, 24)
             + (1 * 1 * 24 * 3 + 3))                       # 3 conv_transpose 1x1 (bias)
  # Discriminator: the encoder with the 4x4 stride-2 conv replaced by a 3x3 conv and a
  # 2x2 max-pool (no parameters); one logit (with bias).
  discriminator = (conv_bn(3, 3, 24) + conv_bn(3, 24, 24)
                   + conv_bn(3, 24, 48) + conv_bn(3, 48, 48)
                   + conv_bn(3, 48, 96) + conv_bn(3, 96, 96)
                   + conv_bn(3, 96, 192) + conv_bn(3, 192, 192)
                   + fc_bn(6 * 6 * 192, 48) + (48 + 1))
  assert count(v_shapes['params']['encoder']) == encoder
  assert count(v_shapes['params']['decoder']) == decoder
  assert count(v_shapes['params']) == encoder + decoder
  assert count(d_shapes['params']) == discriminator
  # BatchNorm running mean and variance: two per normalised unit.
  bn_units_vae = (2 * (24 + 48 + 96 + 192) + 48) + (48 + 6 * 6 * 192 + 2 * (192 + 96 + 48 + 24))
  assert count(v_shapes['batch_stats']) == 2 * bn_units_vae


def _max_pool_np(x, g):
  """2x2 max pooling and its gradient to the first maximum of each window (row-major)."""
  n, h, w, c = x.shape
  y = np.zeros((n, h // 2, w // 2, c), x.dtype)
  dx = np.zeros_like(x)
  for b, i, j, k in np.ndindex(n, h // 2, w // 2, c):
    window = x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, k].reshape(-1)
    first = int(np.argmax(window))  # numpy's argmax returns the first maximum
    y[b, i, j, k] = window[first]
    dx[b, 2 * i + first // 2, 2 * j + first % 2, k] = g[b, i, j, k]
  return y, dx


def test_max_pool_2x2_values_and_gradient_with_ties():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  # Small integers: most windows hold tied maxima (as ReLU zeros and flat image regions
  # do), where the gradient must go to one element, the first, and not be split.
  x = rng.integers(0, 3, (2, 6, 8, 3)).astype(np.float32)
  g = rng.normal(size=(2, 3, 4, 3)).astype(np.float32)
  y, vjp = jax.vjp(models.max_pool_2x2, jnp.asarray(x))
  ref_y, ref_dx = _max_pool_np(x, g)
  np.testing.assert_array_equal(y, ref_y)
  np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], ref_dx)
  # The same values and gradient as flax's reduce_window pooling.
  flax_y, flax_vjp = jax.vjp(lambda v: nn.max_pool(v, (2, 2), strides=(2, 2)), jnp.asarray(x))
  np.testing.assert_array_equal(y, flax_y)
  np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], flax_vjp(jnp.asarray(g))[0])


@pytest.mark.parametrize('factor', [2, 3])
def test_upsample_nearest_values_and_gradient(factor):
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
  g = rng.standard_normal((2, 3 * factor, 4 * factor, 5)).astype(np.float32)
  want = np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)
  np.testing.assert_array_equal(models.upsample_nearest(jnp.asarray(x), factor), want)
  # Each input pixel's gradient: the sum of g over the factor x factor block it fills.
  block_sums = g.reshape(2, 3, factor, 4, factor, 5).sum(axis=(2, 4))
  _, vjp = jax.vjp(lambda x: models.upsample_nearest(x, factor), jnp.asarray(x))
  np.testing.assert_allclose(vjp(jnp.asarray(g))[0], block_sums, rtol=1e-6, atol=1e-6)


def test_the_decoder_differentiates_in_reverse_mode_only():
  # As the README says (Library API): the custom_vjp rules take jax.jacrev, not jax.jacfwd.
  vae, _, v_vars, _, _, _, _ = _setup(16, 3, (4, 8))
  z = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4)), jnp.float32)
  decode = lambda z: vae.apply(v_vars, z, train=False, method='decode')
  jacobian = np.asarray(jax.jacrev(decode)(z))
  assert jacobian.shape == (1, 16, 16, 3, 1, 4)
  # Column k against a central difference of the decoder along latent k.
  h = 1e-4  # small: the ReLUs are piecewise linear
  for k in range(4):
    step = jnp.zeros((1, 4)).at[0, k].set(h)
    numeric = (np.asarray(decode(z + step)) - np.asarray(decode(z - step))) / (2 * h)
    np.testing.assert_allclose(jacobian[..., 0, k], numeric, atol=2e-3)
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jacfwd(decode)(z)
