"""Tests for avae_jax.conv: the custom gradients against numpy, the drop-in."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avae_jax import config_lib
from avae_jax import conv
from avae_jax import models
from configs import default


def _numpy_input_grad(g, w, stride, pad, in_hw):
  """dL/dx: each output position adds g * w back onto the input window it read.

  pad is ((top, bottom), (left, right)).
  """
  g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
  n, ho, wo, _ = g.shape
  ka, kb = w.shape[:2]
  (top, bottom), (left, right) = pad
  dx = np.zeros((n, in_hw[0] + top + bottom, in_hw[1] + left + right, w.shape[2]))
  for i in range(ho):
    for j in range(wo):
      dx[:, stride * i:stride * i + ka, stride * j:stride * j + kb] += np.einsum(
          'nf,abcf->nabc', g[:, i, j], w)
  return dx[:, top:top + in_hw[0], left:left + in_hw[1]]


@pytest.mark.parametrize('kernel,stride,pad,side', [
    (4, 2, 1, 12), (3, 2, 1, 10), (4, 2, 0, 8), (5, 3, 2, 9), (2, 2, 0, 6), (1, 2, 0, 6),
    # Phases whose padding is negative on one side and positive on the other.
    (6, 3, 4, 12), (7, 4, 5, 16),
    # Asymmetric padding: ((top, bottom), (left, right)).
    (3, 2, ((1, 0), (0, 2)), 8), (5, 2, ((0, 3), (2, 1)), 10)])
def test_input_grad_subpixel_matches_numpy(kernel, stride, pad, side):
  rng = np.random.default_rng(4)
  pad = ((pad, pad), (pad, pad)) if isinstance(pad, int) else pad
  ho, wo = ((side + lo + hi - kernel) // stride + 1 for lo, hi in pad)
  g = rng.standard_normal((3, ho, wo, 5)).astype(np.float32)
  w = rng.standard_normal((kernel, kernel, 4, 5)).astype(np.float32)
  got = conv.input_grad_subpixel(jnp.asarray(g), jnp.asarray(w), (stride, stride), pad,
                                 (side, side))
  np.testing.assert_allclose(np.asarray(got), _numpy_input_grad(g, w, stride, pad, (side, side)),
                             rtol=1e-5, atol=1e-5)


def _numpy_weight_grad(x, g, kernel, pad):
  """dL/dw of a stride-1 convolution: each output position's g times the window it read."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  (top, bottom), (left, right) = pad
  xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  _, ho, wo, _ = g.shape
  dw = np.zeros((kernel, kernel, x.shape[3], g.shape[3]))
  for a in range(kernel):
    for b in range(kernel):
      dw[a, b] = np.einsum('nijc,nijo->co', xp[:, a:a + ho, b:b + wo], g)
  return dw


@pytest.mark.parametrize('kernel,pad', [
    (3, ((1, 1), (1, 1))), (3, ((0, 0), (0, 0))), (3, ((0, 2), (2, 1))), (5, ((2, 2), (1, 3))),
    # Padding beyond the kernel: the input gradient's correlation crops.
    (1, ((1, 1), (0, 1))), (2, ((2, 0), (1, 1)))])
def test_stride1_gradients_match_numpy(kernel, pad):
  rng = np.random.default_rng(5)
  side = 7
  ho, wo = (side + lo + hi - kernel + 1 for lo, hi in pad)
  x = rng.standard_normal((3, side, side, 4)).astype(np.float32)
  g = rng.standard_normal((3, ho, wo, 5)).astype(np.float32)
  w = rng.standard_normal((kernel, kernel, 4, 5)).astype(np.float32)
  np.testing.assert_allclose(
      np.asarray(conv.input_grad_stride1(jnp.asarray(g), jnp.asarray(w), pad)),
      _numpy_input_grad(g, w, 1, pad, (side, side)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      np.asarray(conv.weight_grad_stride1(jnp.asarray(x), jnp.asarray(g), pad)),
      _numpy_weight_grad(x, g, kernel, pad), rtol=1e-5, atol=1e-5)


def test_gradients_in_a_cond_branch_keep_the_forward_form():
  # XLA:CPU brings its own convolution gradients to the form its kernels take (NHWC input,
  # HWIO kernel, NHWC output) only in the program's top level; inside a lax.cond branch
  # they kept another form and ran 70x slower. The custom ones are in that form already.
  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))

  def forms(choice):
    f = conv.conv_general_dilated(choice)
    grad = jax.grad(lambda x, w: jnp.sum(f(x, w, (1, 1), ((1, 1), (1, 1)),
                                           dimension_numbers=('NHWC', 'HWIO', 'NHWC')) ** 2),
                    argnums=(0, 1))
    branch = jax.jit(lambda p, x, w: jax.lax.cond(
        p, lambda: grad(x, w), lambda: (jnp.zeros_like(x), jnp.zeros_like(w))))
    hlo = branch.lower(True, x, w).compile().as_text()
    return {line.split('dim_labels=')[1].split(',')[0] for line in hlo.splitlines()
            if ' convolution(' in line}

  assert forms('custom') == {'b01f_01io->b01f'}
  assert len(forms('xla') - {'b01f_01io->b01f'}) > 0


def test_input_grad_subpixel_needs_divisible_sides():
  with pytest.raises(ValueError, match='not divisible'):
    conv.input_grad_subpixel(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), (2, 2),
                             ((1, 1), (1, 1)), (9, 9))


def _conv_module(backward, features=5, kernel=3, stride=1, **kw):
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((1, 1), (1, 1)),
                 use_bias=False, conv_general_dilated=conv.conv_general_dilated(backward),
                 **kw)


@pytest.mark.parametrize('kernel,stride', [(3, 1), (4, 2), (3, 2)])
def test_drop_in_values_and_gradients_match_lax(kernel, stride):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 12, 12, 3)), jnp.float32)
  t = jnp.asarray(rng.standard_normal((4, 12 // stride, 12 // stride, 5)), jnp.float32)
  ours, ref = _conv_module('custom', kernel=kernel, stride=stride), nn.Conv(
      5, (kernel, kernel), strides=stride, padding=((1, 1), (1, 1)), use_bias=False)
  params = ref.init(jax.random.key(0), x)
  # Same parameter tree: checkpoints do not depend on the weight-gradient choice.
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(params)

  def loss(module, p, x):
    return jnp.sum(module.apply(p, x) * t)

  np.testing.assert_array_equal(ours.apply(params, x), ref.apply(params, x))
  got = jax.jit(jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1)))(params, x)
  want = jax.grad(lambda p, x: loss(ref, p, x), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_give_bfloat16_gradients():
  # Stride 2: the input gradient by phase.
  x = jnp.ones((2, 8, 8, 3), jnp.bfloat16)
  w = jnp.full((3, 3, 3, 4), 0.5, jnp.bfloat16)
  f = conv.conv_general_dilated('custom')
  dn = ('NHWC', 'HWIO', 'NHWC')
  dx, dw = jax.grad(lambda x, w: jnp.sum(f(x, w, (2, 2), ((1, 1), (1, 1)),
                                           dimension_numbers=dn).astype(jnp.float32)),
                    argnums=(0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  # Outputs at rows 0, 2, 4, 6 read input rows 2m - 1 .. 2m + 1: a weight's top tap sees
  # the real rows 1, 3, 5 (3 of 4 outputs), its centre tap all 4; likewise across. So
  # dw = 0.5-free counts: 2 images x 3 x 4 for a top-centre tap, 2 x 4 x 4 for the centre.
  assert float(dw[1, 1, 0, 0]) == 32.0 and float(dw[0, 1, 0, 0]) == 24.0
  # An even input row is read by one output row (centre tap), an odd one by two; the
  # same across: dx = 0.5 * 4 output channels * (rows reading it) * (columns reading it).
  assert float(dx[0, 2, 2, 0]) == 2.0 and float(dx[0, 3, 3, 0]) == 8.0
  assert float(dx[0, 2, 3, 0]) == 4.0


PAD1 = ((1, 1), (1, 1))


@pytest.mark.parametrize('strides, kwargs', [
    ((1, 1), dict(padding='SAME')), ((1, 1), dict(padding=PAD1, rhs_dilation=(2, 2))),
    ((1, 1), dict(padding=PAD1, feature_group_count=3)),
    # Strides that do not divide the 9x9 input: the phase-wise input gradient needs them to.
    ((2, 2), dict(padding=PAD1)), ((2, 1), dict(padding=PAD1)), ((1, 2), dict(padding=PAD1)),
    ((1, 1), dict(padding=PAD1, precision=jax.lax.Precision.HIGHEST)),
    ((1, 1), dict(padding=PAD1, preferred_element_type=jnp.float32))])
def test_other_convolutions_go_to_lax_unchanged(strides, kwargs):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 9, 9, 3)), jnp.float32)
  groups = kwargs.get('feature_group_count', 1)
  w = jnp.asarray(rng.standard_normal((3, 3, 3 // groups, 6)), jnp.float32)
  dn = ('NHWC', 'HWIO', 'NHWC')
  f = conv.conv_general_dilated('custom')
  g = lambda x, w: jnp.sum(jnp.sin(f(x, w, strides, dimension_numbers=dn, **kwargs)))
  g_ref = lambda x, w: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
      x, w, strides, dimension_numbers=dn, **kwargs)))
  # No custom rule is involved: the jaxprs of the gradients are the same.
  grads, grads_ref = (jax.grad(h, argnums=(0, 1)) for h in (g, g_ref))
  assert str(jax.make_jaxpr(grads)(x, w)) == str(jax.make_jaxpr(grads_ref)(x, w))
  # And the gradients can be taken (a custom rule would need the strides to divide).
  for a, b in zip(grads(x, w), grads_ref(x, w)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_preferred_element_type_is_kept():
  x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
  w = jnp.ones((3, 3, 2, 2), jnp.bfloat16)
  y = conv.conv_general_dilated('custom')(x, w, (1, 1), PAD1,
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                          preferred_element_type=jnp.float32)
  assert y.dtype == jnp.float32
  assert float(y[0, 1, 1, 0]) == 18.0  # 3 x 3 taps x 2 channels of ones


def test_choice_of_backward_pass_shows_in_the_program():
  # Only traced. XLA's input gradient of a strided convolution dilates the output
  # gradient (lhs_dilation); the custom one correlates it undilated, phase by phase.
  x = jnp.ones((2, 16, 16, 8))
  w = jnp.ones((4, 4, 8, 4))

  def grad_jaxpr(choice):
    f = conv.conv_general_dilated(choice)
    return str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(
        f(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')))))(x))

  assert 'lhs_dilation=(2, 2)' not in grad_jaxpr('custom')
  assert 'lhs_dilation=(2, 2)' in grad_jaxpr('xla')
  # The tests run on the CPU, where 'auto' means custom.
  assert 'lhs_dilation=(2, 2)' not in grad_jaxpr('auto')


def test_bad_choice_is_an_error():
  with pytest.raises(ValueError, match='backward'):
    conv.conv_general_dilated('im2col')
  c = default.get_config()
  c.model.conv_backward = 'im2col'
  with pytest.raises(config_lib.ConfigError, match='conv_backward'):
    models.create_models(c)


def test_vae_gradients_agree_between_backward_passes():
  c = default.get_config()
  c.image_size, c.model.widths, c.model.latent_dim, c.model.hidden_dim = 16, (4, 8), 4, 8
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.uniform(size=(4, 16, 16, 3)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
  # One set of parameters for both (the modules differ only in their backward pass),
  # initialised under jit with the rbg PRNG: eager, threefry init took 12 s here.
  vae, _ = models.create_models(c)
  variables = jax.jit(lambda key: vae.init(key, x, eps, train=False))(jax.random.key(0, impl='rbg'))
  grads, programs = {}, {}
  for choice in ('xla', 'custom'):
    c.model.conv_backward = choice
    vae, disc = models.create_models(c)
    assert vae.conv_backward == disc.conv_backward == choice

    def loss(params):
      (x_rec, *_), _ = vae.apply({**variables, 'params': params}, x, eps, train=True,
                                 mutable=['batch_stats'])
      return jnp.mean((x_rec - x) ** 2)

    grads[choice] = jax.jit(jax.grad(loss))(variables['params'])
    programs[choice] = str(jax.make_jaxpr(jax.grad(loss))(variables['params']))
  # The choice reaches the convolutions (the same program twice would agree trivially).
  assert programs['xla'] != programs['custom']
  for a, b in zip(jax.tree.leaves(grads['xla']), jax.tree.leaves(grads['custom'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
