"""Tests for avae_jax.steps: gating, loss signs, metrics, and that training learns.

The steps run mapped over the 4 forced CPU devices (parallel.make_steps, pmap). Compiled
steps are cached per StepConfig, because compiling dominates the run time.
"""

import dataclasses
from fractions import Fraction
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import skimage.data

import references
from avae_jax import config_lib
from avae_jax import filters
from avae_jax import losses
from avae_jax import parallel
from avae_jax import steps
from configs import default

NUM_DEVICES = 4
BATCH = 8


def tiny_config(variant='avae_s', lr=1e-3):
  c = default.get_config()
  c.variant = variant
  c.image_size = 16
  c.channels = 3
  c.model.widths = (4, 8)
  c.model.latent_dim = 4
  c.model.hidden_dim = 8
  c.batch_size = BATCH
  c.optimizer.learning_rate = lr
  c.optimizer.disc_learning_rate = lr
  return c


def real_images(n=BATCH, size=16):
  """n real RGB patches (64x64 crops of scikit-image's photos, 4x4 block-averaged)."""
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
            skimage.data.rocket()]
  patches = []
  for i in range(n):
    img = photos[i % len(photos)]
    top, left = 100 + 40 * (i // len(photos)), 150 + 30 * (i // len(photos))
    crop = img[top:top + 4 * size, left:left + 4 * size].astype(np.float64) / 255.0
    patches.append(crop.reshape(size, 4, size, 4, 3).mean(axis=(1, 3)))
  return np.stack(patches).astype(np.float32)


@functools.lru_cache(maxsize=None)
def initial_states(variant, lr):
  config = tiny_config(variant, lr)
  return config, steps.create_train_states(config, jax.random.key(0, impl='rbg'), (16, 16, 3))


@functools.lru_cache(maxsize=None)
def mapped(cfg, num_devices=NUM_DEVICES):
  return parallel.make_steps(cfg, jax.devices()[:num_devices], 'pmap')


def split(batch, num_devices=NUM_DEVICES):
  return batch.reshape((num_devices, -1) + batch.shape[1:])


def host(tree):
  """A host (numpy) copy, taken before the device buffers are donated to a step."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def run_adversarial(cfg, vae_state, disc_state, batch, key):
  devs = jax.devices()[:NUM_DEVICES]
  rv, rd = parallel.replicate(vae_state, devs), parallel.replicate(disc_state, devs)
  rv, rd, metrics = mapped(cfg).adversarial(rv, rd, split(batch), key)
  return (parallel.unreplicate(rv), parallel.unreplicate(rd),
          {k: float(v) for k, v in metrics.items()})


# ---------------------------------------------------------------------------------------
# Adversarial step: gating, loss signs, metric values.

# The VAE objective is the adversarial term alone (no reconstruction or KL), and the
# learning rate small, so one step moves each loss in its first-order direction.
GATE_LR = 1e-4


def gate_cfg(force):
  config, _ = initial_states('avae', GATE_LR)
  cfg = steps.StepConfig.from_config(config, dataset_size=1000)
  return dataclasses.replace(cfg, reconstruction_scale=0.0, kl_weight=0.0,
                             force_accuracy=force)


@functools.lru_cache(maxsize=None)
def gated_run(force):
  """(states before, states after, metrics) of one adversarial step with forced accuracy."""
  _, (vae_state, disc_state) = initial_states('avae', GATE_LR)
  x = real_images()
  key = jax.random.key(3)
  before = host((vae_state, disc_state))
  vae_new, disc_new, metrics = run_adversarial(gate_cfg(force), vae_state, disc_state, x, key)
  return before, host((vae_new, disc_new)), metrics, (vae_new, disc_new)


def _identical(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return all(np.array_equal(u, v) and u.dtype == v.dtype for u, v in zip(la, lb))


def _all_changed(old, new):
  """Every parameter array, the step and the BatchNorm statistics moved."""
  assert int(new.step) == int(old.step) + 1
  for part in ('params', 'batch_stats'):
    for u, v in zip(jax.tree.leaves(getattr(old, part)), jax.tree.leaves(getattr(new, part))):
      if np.array_equal(u, v):
        return False
  return True


@pytest.mark.parametrize('force,vae_updates,disc_updates',
                         [(1.0, True, False), (0.6, True, True), (0.0, False, True),
                          # On the thresholds (0.7, 0.5): Algorithm 1's tests are strict.
                          (0.7, True, False), (0.5, False, True)])
def test_gating_updates_the_right_side_and_leaves_the_other_bit_identical(
    force, vae_updates, disc_updates):
  (vae_old, disc_old), (vae_new, disc_new), metrics, _ = gated_run(force)
  assert metrics['vae_updated'] == float(vae_updates)
  assert metrics['disc_updated'] == float(disc_updates)
  for old, new, updated in ((vae_old, vae_new, vae_updates), (disc_old, disc_new, disc_updates)):
    if updated:
      assert _all_changed(old, new)
    else:
      assert _identical(old, new)  # params, batch_stats, opt_state and step


@jax.jit
def _logits(vae_state, disc_state, x, key):
  """D's logits on x and x_rec, computed with the plain (single-device) modules."""
  eps = jax.random.normal(key, (x.shape[0], 4), jnp.float32)
  (x_rec, *_), _ = vae_state.apply_fn(
      {'params': vae_state.params, 'batch_stats': vae_state.batch_stats}, x, eps, True,
      mutable=['batch_stats'])
  d_vars = {'params': disc_state.params, 'batch_stats': disc_state.batch_stats}
  real, _ = disc_state.apply_fn(d_vars, x, True, mutable=['batch_stats'])
  fake, _ = disc_state.apply_fn(d_vars, x_rec, True, mutable=['batch_stats'])
  return real, fake


def _independent_logits(vae_state, disc_state, x, key):
  real, fake = _logits(vae_state, disc_state, x, key)
  return np.asarray(real, np.float64), np.asarray(fake, np.float64)


def test_adversarial_metrics_match_numpy_from_the_logits():
  _, (vae_state, disc_state) = initial_states('avae', GATE_LR)
  _, _, metrics, _ = gated_run(0.6)
  real, fake = _independent_logits(vae_state, disc_state, real_images(), jax.random.key(3))
  # BCE with labels real 1 / fake 0, and the non-saturating -log D(x_rec), in numpy.
  bce = np.mean(np.logaddexp(0, -real)) + np.mean(np.logaddexp(0, fake))
  gen = np.mean(np.logaddexp(0, -fake))
  acc = 0.5 * (np.mean(real > 0) + np.mean(fake < 0))
  assert metrics['disc_loss'] == pytest.approx(bce, rel=1e-4)
  assert metrics['gen_loss'] == pytest.approx(gen, rel=1e-4)
  assert metrics['disc_accuracy'] == pytest.approx(acc)
  # The forced value drives the gate; the measured one is reported.
  assert metrics['disc_accuracy'] in {k / 16 for k in range(17)}


def test_the_measured_accuracy_gates_the_updates():
  # Without force_accuracy the gate is D's accuracy on the batch (numpy, from the logits):
  # thresholds on either side of it take both updates, or neither.
  _, (vae_state, disc_state) = initial_states('avae', GATE_LR)
  x, key = real_images(), jax.random.key(3)
  real, fake = _independent_logits(vae_state, disc_state, x, key)
  acc = 0.5 * (np.mean(real > 0) + np.mean(fake < 0))  # a multiple of 1/16
  # (An accuracy on a threshold passes neither strict test: test_gate_* below, without
  # a compilation of the step per pair of thresholds.)
  for below, above, updated in ((acc + 1 / 32, acc - 1 / 32, 1.0),
                                (acc - 1 / 32, acc + 1 / 32, 0.0)):
    cfg = dataclasses.replace(gate_cfg(None), train_disc_below=below, train_vae_above=above)
    _, _, m = run_adversarial(cfg, vae_state, disc_state, x, key)
    assert m['disc_accuracy'] == pytest.approx(acc)
    assert m['disc_updated'] == m['vae_updated'] == updated, (below, above)


def test_gate_compares_counts_exactly():
  # Reference: exact rational accuracies against the decimal thresholds the config writes
  # (Fraction of the threshold's shortest repr, 0.1 -> 1/10), strict as in Algorithm 1.
  for total in (16, 40, 128, 130):
    for below, above in ((0.7, 0.5), (0.1, 0.9), (1 / 3, 2 / 3), (0.5, 0.5), (0.3, 0.3),
                         (0.0, 1.0), (1.0, 0.0)):  # the ends: never, or all but one count
      counts = np.arange(total + 1)
      update_disc, update_vae = steps.gate(jnp.asarray(counts), total, below, above)
      acc = [Fraction(int(c), total) for c in counts]
      np.testing.assert_array_equal(update_disc, [a < Fraction(repr(below)) for a in acc])
      np.testing.assert_array_equal(update_vae, [a > Fraction(repr(above)) for a in acc])
  # 28 of 40 is on the threshold 0.7 (not below it) however many devices gave the answers.
  assert not bool(steps.gate(jnp.int32(28), 40, 0.7, 0.5)[0])


@pytest.mark.parametrize('correct,total,below,above,expected', [
    (13, 130, 0.1, 0.9, (False, False)),    # 13/130 = 1/10 is not below 0.1
    (3, 10, 0.7, 0.3, (True, False)),       # 3/10 is below 0.7, not above 0.3
    (40, 120, 0.7, 1 / 3, (True, False)),   # 40/120 = 1/3 is not above 1/3
    (7, 10, 0.7, 0.7, (False, False))])     # 7/10 is neither below nor above 0.7
def test_gate_on_a_threshold_takes_neither_strict_branch(correct, total, below, above,
                                                          expected):
  # Hand derivation: an accuracy equal to the threshold the config writes passes neither
  # of Algorithm 1's strict tests (acc < below, acc > above).
  update_disc, update_vae = steps.gate(jnp.int32(correct), total, below, above)
  assert (bool(update_disc), bool(update_vae)) == expected


def test_gate_refuses_nan_thresholds():
  for below, above in ((float('nan'), 0.5), (0.7, float('nan'))):
    with pytest.raises(ValueError, match='thresholds'):
      steps.gate(jnp.int32(3), 10, below, above)


def test_metric_keys_of_the_adversarial_step():
  _, _, metrics, _ = gated_run(0.6)
  assert set(metrics) == {'loss', 'rec', 'mse', 'kl', 'disc_loss', 'gen_loss',
                          'disc_accuracy', 'disc_updated', 'vae_updated'}
  # The VAE objective of this test config is the adversarial term alone.
  assert metrics['loss'] == 0.0


def test_discriminator_step_lowers_its_bce_on_the_same_batch():
  _, _, m0, (vae1, disc1) = gated_run(0.0)          # D only
  _, _, m1 = run_adversarial(gate_cfg(0.0), vae1, disc1, real_images(), jax.random.key(3))
  assert m1['disc_loss'] < m0['disc_loss']


def test_vae_step_raises_the_fake_logit():
  _, (vae0, disc0) = initial_states('avae', GATE_LR)
  _, _, m0, (vae1, disc1) = gated_run(1.0)          # VAE only, on -log D(x_rec)
  x, key = real_images(), jax.random.key(3)
  _, fake0 = _independent_logits(vae0, disc0, x, key)
  _, fake1 = _independent_logits(vae1, disc1, x, key)
  assert fake1.mean() > fake0.mean()
  _, _, m1 = run_adversarial(gate_cfg(1.0), vae1, disc1, x, key)
  assert m1['gen_loss'] < m0['gen_loss']


@pytest.mark.parametrize('in_branch', [True, False])
def test_adversarial_gradients_match_plain_autodiff_of_the_written_out_objectives(in_branch):
  # With SGD at learning rate 1 each update is old - gradient. The reference differentiates
  # the two objectives written out here on the whole batch with the plain modules (one
  # device, no shared forward passes or hand-made cotangents), against the step's 4 devices.
  # Both placements of the discriminator's backward pass: in its update's branch (the
  # CPU's default) and before it (XLA's convolution gradients on the CPU).
  config, (vae_state, disc_state) = initial_states('avae', GATE_LR)
  sgd = optax.sgd(1.0)
  vae_state = vae_state.replace(tx=sgd, opt_state=sgd.init(vae_state.params))
  disc_state = disc_state.replace(tx=sgd, opt_state=sgd.init(disc_state.params))
  cfg = dataclasses.replace(steps.StepConfig.from_config(config, dataset_size=1000),
                            force_accuracy=0.6, adversarial_weight=0.7,
                            disc_backward_in_branch=in_branch)
  x, key = real_images(), jax.random.key(3)
  vae_old, disc_old = host((vae_state, disc_state))
  vae_new, disc_new, _ = run_adversarial(cfg, vae_state, disc_state, x, key)
  vae_new, disc_new = host((vae_new, disc_new))

  eps = jax.random.normal(key, (BATCH, 4), jnp.float32)
  vae_apply, disc_apply = vae_state.apply_fn, disc_state.apply_fn

  def vae_forward(params):
    (x_rec, _, mu, logvar), new = vae_apply(
        {'params': params, 'batch_stats': vae_old.batch_stats}, x, eps, True,
        mutable=['batch_stats'])
    return x_rec, mu, logvar, new['batch_stats']

  def disc_forward(params, batch_stats, images):
    logits, new = disc_apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                             mutable=['batch_stats'])
    return logits, new['batch_stats']

  def vae_objective(params):
    x_rec, mu, logvar, _ = vae_forward(params)
    mse = jnp.mean((x_rec - x) ** 2, axis=(1, 2, 3))
    kl = 0.5 * jnp.sum(mu ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)
    logit_fake, _ = disc_forward(disc_old.params, disc_old.batch_stats, x_rec)
    return jnp.mean(16 * 16 * 3 * mse + kl) + 0.7 * jnp.mean(-jax.nn.log_sigmoid(logit_fake))

  def disc_objective(params):
    x_rec = jax.lax.stop_gradient(vae_forward(vae_old.params)[0])
    logit_real, _ = disc_forward(params, disc_old.batch_stats, x)
    logit_fake, _ = disc_forward(params, disc_old.batch_stats, x_rec)
    return (jnp.mean(-jax.nn.log_sigmoid(logit_real))
            + jnp.mean(-jax.nn.log_sigmoid(-logit_fake)))

  @jax.jit
  def reference():
    x_rec, _, _, vae_stats = vae_forward(vae_old.params)
    _, after_real = disc_forward(disc_old.params, disc_old.batch_stats, x)
    _, disc_stats = disc_forward(disc_old.params, after_real, x_rec)
    return (jax.grad(vae_objective)(vae_old.params), jax.grad(disc_objective)(disc_old.params),
            vae_stats, disc_stats)

  vae_grads, disc_grads, vae_stats, disc_stats = host(reference())
  for old, new, grads in ((vae_old, vae_new, vae_grads), (disc_old, disc_new, disc_grads)):
    for p_old, p_new, g in zip(jax.tree.leaves(old.params), jax.tree.leaves(new.params),
                               jax.tree.leaves(grads)):
      np.testing.assert_allclose(p_old - p_new, g, rtol=1e-3, atol=1e-4 * np.abs(g).max())
  # BatchNorm running statistics: the VAE's pass, and the discriminator's real pass
  # followed by its fake pass.
  for new, stats in ((vae_new, vae_stats), (disc_new, disc_stats)):
    for a, b in zip(jax.tree.leaves(new.batch_stats), jax.tree.leaves(stats)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Pre-training step: variants, metric keys, learning.


def _pretrain_metric_keys(variant):
  config = tiny_config(variant)
  cfg = steps.StepConfig.from_config(config, dataset_size=1000)
  # Tracing is enough to know the keys: abstract states, nothing is compiled or run.
  vae_state, _ = jax.eval_shape(
      lambda key: steps.create_train_states(config, key, (16, 16, 3)), jax.random.key(0))
  stacked = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct((NUM_DEVICES,) + s.shape, s.dtype), vae_state)
  batch = jax.ShapeDtypeStruct((NUM_DEVICES, 2, 16, 16, 3), jnp.float32)
  _, metrics = jax.eval_shape(mapped(cfg).pretrain, stacked, batch, jax.random.key(0))
  for v in metrics.values():
    assert v.shape == () and v.dtype == jnp.float32
  return set(metrics)


def test_variants_compute_their_terms():
  assert _pretrain_metric_keys('vae') == {'loss', 'rec', 'mse', 'kl'}
  assert _pretrain_metric_keys('avae_s') == {'loss', 'rec', 'mae', 'mse', 'dssim', 'sobel',
                                             'gabor', 'kl', 'tc'}


def test_each_model_has_adam_with_its_own_learning_rate_and_the_betas():
  # Adam's first update is lr * sign(g) whatever the betas: two updates, by hand.
  config = tiny_config('avae_s')
  opt = config.optimizer
  opt.learning_rate, opt.disc_learning_rate, opt.b1, opt.b2 = 1e-3, 4e-4, 0.6, 0.95
  vae_state, disc_state = steps.create_train_states(config, jax.random.key(0), (16, 16, 3))
  rng = np.random.default_rng(0)
  for state, lr in ((vae_state, 1e-3), (disc_state, 4e-4)):
    leaves, treedef = jax.tree.flatten(state.params)
    g1, g2 = ([rng.normal(size=p.shape).astype(np.float32) for p in leaves] for _ in range(2))
    s = state.tx.init(state.params)
    _, s = state.tx.update(jax.tree.unflatten(treedef, g1), s, state.params)
    u2, _ = state.tx.update(jax.tree.unflatten(treedef, g2), s, state.params)
    for a, b, u in zip(g1, g2, jax.tree.leaves(u2)):
      a, b = a.astype(np.float64), b.astype(np.float64)
      m = 0.6 * 0.4 * a + 0.4 * b
      v = 0.95 * 0.05 * a ** 2 + 0.05 * b ** 2
      expected = -lr * (m / (1 - 0.6 ** 2)) / (np.sqrt(v / (1 - 0.95 ** 2)) + 1e-8)
      np.testing.assert_allclose(np.asarray(u), expected, rtol=2e-5, atol=1e-9)


def test_step_config_from_config():
  config = tiny_config('avae_s')
  cfg = steps.StepConfig.from_config(config, dataset_size=1234)
  assert dict(cfg.recon_weights) == {t: 1.0 for t in ('mae', 'mse', 'dssim', 'sobel', 'gabor')}
  assert cfg.reconstruction_scale == 16 * 16 * 3  # 0 in the config means H*W*C
  assert cfg.tc_weight == 1.0 and cfg.dataset_size == 1234 and cfg.gabor is not None
  assert cfg.force_accuracy is None and cfg.axis_name == 'batch'
  hash(cfg)
  vae_cfg = steps.StepConfig.from_config(tiny_config('vae'), dataset_size=1234)
  assert dict(vae_cfg.recon_weights) == {'mse': 1.0}
  assert vae_cfg.tc_weight == 0.0 and vae_cfg.gabor is None
  config.loss.reconstruction_scale = 2.5
  assert steps.StepConfig.from_config(config, 10).reconstruction_scale == 2.5
  # On the CPU the discriminator's backward pass goes into its update's branch only with
  # the custom convolution gradients ('auto' there), which run well inside one.
  assert cfg.disc_backward_in_branch
  config.model.conv_backward = 'xla'
  assert not steps.StepConfig.from_config(config, 10).disc_backward_in_branch
  config.model.conv_backward = 'custom'
  assert steps.StepConfig.from_config(config, 10).disc_backward_in_branch
  # The loss weights and gate thresholds each from their own field (all 1.0, or 0.7 and
  # 0.5, by default, where a mix-up would not show).
  config.loss.kl_weight, config.loss.tc_weight, config.loss.adversarial_weight = 0.25, 0.5, 2.0
  config.gating.train_disc_below, config.gating.train_vae_above = 0.65, 0.45
  cfg = steps.StepConfig.from_config(config, 10)
  assert (cfg.kl_weight, cfg.tc_weight, cfg.adversarial_weight) == (0.25, 0.5, 2.0)
  # The Gabor bank and the TC estimator from theirs (the defaults would not show either).
  config.gabor.size, config.gabor.sigma, config.gabor.orientations = 7, 1.5, 3
  config.gabor.wavelengths, config.loss.tc_estimator = (3.0, 5.0), 'mws'
  cfg = steps.StepConfig.from_config(config, 10)
  assert cfg.gabor == losses.GaborSpec(size=7, sigma=1.5, wavelengths=(3.0, 5.0),
                                       orientations=3)
  assert cfg.tc_estimator == 'mws'
  # The λ's of Eq. 5, each its own (set by hand or by the calibration; 0 leaves a term out).
  weights = {'mae': 0.3, 'mse': 1.0, 'dssim': 0.0, 'sobel': 2.0, 'gabor': 0.7}
  for term, weight in weights.items():
    config.loss.weights[term] = weight
  cfg = steps.StepConfig.from_config(config, 10)
  assert dict(cfg.recon_weights) == {t: w for t, w in weights.items() if w}
  assert (cfg.train_disc_below, cfg.train_vae_above) == (0.65, 0.45)


def test_the_tc_weight_scales_the_total_correlation_in_the_loss(monkeypatch):
  # L_VAE = mean(scale * L_REC + kl_weight * KL) + tc_weight * TC, from the step's own
  # metrics (computed before its update, from one state and key). At scale 1 the TC term
  # is not lost in float32 rounding of a loss of thousands.
  config, (vae_state, _) = initial_states('avae_s', GATE_LR)
  cfg = dataclasses.replace(steps.StepConfig.from_config(config, dataset_size=1000),
                            kl_weight=0.25, reconstruction_scale=1.0)
  x, key = real_images(), jax.random.key(3)
  devs = jax.devices()[:NUM_DEVICES]
  estimator, traced = losses.total_correlation, []

  def counted(*args, **kwargs):
    traced.append(1)
    return estimator(*args, **kwargs)
  monkeypatch.setattr(losses, 'total_correlation', counted)
  m, calls = {}, {}
  for tc_weight in (0.5, 0.0):
    c = dataclasses.replace(cfg, tc_weight=tc_weight)
    traced.clear()
    _, metrics = mapped(c).pretrain(parallel.replicate(vae_state, devs), split(x), key)
    m[tc_weight], calls[tc_weight] = {k: float(v) for k, v in metrics.items()}, len(traced)
  assert m[0.0]['loss'] == pytest.approx(m[0.0]['rec'] + 0.25 * m[0.0]['kl'], rel=1e-5)
  # Not computed at weight 0: the estimator is not in the step's program.
  assert calls == {0.5: 1, 0.0: 0} and 'tc' not in m[0.0] and abs(m[0.5]['tc']) > 1e-3
  assert m[0.5]['loss'] - m[0.0]['loss'] == pytest.approx(0.5 * m[0.5]['tc'], rel=1e-4,
                                                          abs=1e-5)
  # reconstruction_scale multiplies L_REC in the loss; the logged 'rec' is before it.
  c = dataclasses.replace(cfg, tc_weight=0.0, reconstruction_scale=3.0)
  _, metrics = mapped(c).pretrain(parallel.replicate(vae_state, devs), split(x), key)
  scaled = {k: float(v) for k, v in metrics.items()}
  assert scaled['rec'] == pytest.approx(m[0.0]['rec'], rel=1e-6)
  assert scaled['loss'] == pytest.approx(3.0 * scaled['rec'] + 0.25 * scaled['kl'], rel=1e-5)


def test_create_train_states_rejects_mismatched_images():
  config = tiny_config()
  with pytest.raises(config_lib.ConfigError, match='shape \\(28, 28, 1\\)'):
    steps.create_train_states(config, jax.random.key(0), (28, 28, 1))


def test_pretraining_lowers_the_reconstruction_loss_on_real_images():
  config, (vae_state, _) = initial_states('vae', 3e-3)
  cfg = steps.StepConfig.from_config(config, dataset_size=1000)
  devs = jax.devices()[:NUM_DEVICES]
  fn = mapped(cfg).pretrain
  x = real_images()
  r_vae = parallel.replicate(vae_state, devs)
  history = []
  for t in range(200):
    r_vae, metrics = fn(r_vae, split(x), jax.random.fold_in(jax.random.key(1), t))
    history.append(metrics['mse'])
  mse = np.asarray(jax.device_get(history))
  assert np.all(np.isfinite(mse))
  assert int(parallel.unreplicate(r_vae).step) == 200
  # Clearly better than at the start, and better than the best constant image (the
  # per-pixel mean of the batch), so the codes carry information about each image.
  assert mse[-10:].mean() < 0.5 * mse[:5].mean()
  assert mse[-10:].mean() < np.mean(np.var(x, axis=0))


def _luma(x):
  return 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]


def _windowed_ssim(x, y):
  """SSIM per image from explicit 11x11 patches, with centred (co)variances."""
  g = np.exp(-0.5 * (np.arange(11) - 5.0) ** 2 / 1.5 ** 2)
  w = jnp.asarray(np.outer(g, g).ravel() / np.outer(g, g).sum(), jnp.float32)

  def patches(a):  # (B, H, W, C) -> (B, H - 10, W - 10, C, 121), valid positions only
    p = jax.lax.conv_general_dilated_patches(
        jnp.moveaxis(a, -1, 1), (11, 11), (1, 1), 'VALID')  # (B, C*121, h, w)
    b, _, h, wd = p.shape
    return jnp.moveaxis(p.reshape(b, a.shape[-1], 121, h, wd), (1, 2), (3, 4))

  px, py = patches(x), patches(y)
  mx, my = px @ w, py @ w
  dx, dy = px - mx[..., None], py - my[..., None]
  vx, vy, cxy = (dx * dx) @ w, (dy * dy) @ w, (dx * dy) @ w
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def _filter_loss(x, x_rec, kernels):
  """Mean over kernels and pixels of (corr(luma x_rec) - corr(luma x))^2, x constant."""
  k = jnp.asarray(np.moveaxis(kernels, 0, -1)[:, :, None, :], jnp.float32)  # HWIO

  def responses(a):
    return jax.lax.conv_general_dilated(
        _luma(a)[..., None], k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        precision=jax.lax.Precision.HIGHEST)

  d = responses(x_rec) - jax.lax.stop_gradient(responses(x))
  return jnp.mean(d * d, axis=(1, 2, 3))


def test_pretrain_gradient_matches_plain_autodiff_of_the_written_out_avae_s_objective():
  # Every term of AVAE-S's L_VAE (Eq. 5 with the MSS total correlation) written out here:
  # patches for SSIM, lax convolutions for Sobel and Gabor (the target's responses held
  # constant, as only the reconstruction is trained), loops over the batch for TC. One
  # device and plain autodiff, against the step's 4 devices; SGD at learning rate 1.
  config, (vae_state, _) = initial_states('avae_s', GATE_LR)
  sgd = optax.sgd(1.0)
  vae_state = vae_state.replace(tx=sgd, opt_state=sgd.init(vae_state.params))
  n = 1000
  cfg = steps.StepConfig.from_config(config, dataset_size=n)
  assert cfg.tc_estimator == 'mss' and cfg.kl_weight == 1.0 and cfg.tc_weight == 1.0
  assert dict(cfg.recon_weights) == {t: 1.0 for t in ('mae', 'mse', 'dssim', 'sobel', 'gabor')}
  x, key = real_images(), jax.random.key(3)
  old = host(vae_state)
  devs = jax.devices()[:NUM_DEVICES]
  new, _ = mapped(cfg).pretrain(parallel.replicate(vae_state, devs), split(x), key)
  new = host(parallel.unreplicate(new))

  eps = jax.random.normal(key, (BATCH, 4), jnp.float32)
  sobel_x = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
  sobel = np.stack([sobel_x, sobel_x.T])
  g = config.gabor
  gabor = filters.gabor_bank(g.size, g.sigma, g.wavelengths, g.orientations)
  log_w = jnp.asarray(np.log(references.paper_mss_weights(BATCH, n)), jnp.float32)

  def log_normal(z, mu, logvar):
    return -0.5 * (np.log(2 * np.pi) + logvar + (z - mu) ** 2 / jnp.exp(logvar))

  def objective(params):
    (x_rec, _, mu, logvar), new_vars = vae_state.apply_fn(
        {'params': params, 'batch_stats': old.batch_stats}, x, eps, True,
        mutable=['batch_stats'])
    z = mu + jnp.exp(0.5 * logvar) * eps
    rec = (jnp.mean(jnp.abs(x_rec - x), axis=(1, 2, 3))
           + jnp.mean((x_rec - x) ** 2, axis=(1, 2, 3))
           + 1.0 - _windowed_ssim(x, x_rec)
           + _filter_loss(x, x_rec, sobel) + _filter_loss(x, x_rec, gabor))
    kl = 0.5 * jnp.sum(mu ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)
    tc = 0.0
    for i in range(BATCH):
      per_dim = log_normal(z[i], mu, logvar)  # (M, D): log q(z_id | x_j) for data points j
      log_qz = jax.nn.logsumexp(jnp.sum(per_dim, axis=1) + log_w[i])
      log_prod = jnp.sum(jax.nn.logsumexp(per_dim + log_w[i][:, None], axis=0))
      tc += log_qz - log_prod
    return jnp.mean(16 * 16 * 3 * rec + kl) + tc / BATCH, new_vars['batch_stats']

  grads, stats = host(jax.jit(jax.grad(objective, has_aux=True))(old.params))
  for p_old, p_new, gr in zip(jax.tree.leaves(old.params), jax.tree.leaves(new.params),
                              jax.tree.leaves(grads)):
    np.testing.assert_allclose(p_old - p_new, gr, rtol=1e-3, atol=1e-4 * np.abs(gr).max())
  # The step keeps the running statistics of the whole batch (its 4 devices' BatchNorm
  # statistics averaged), as one device's train-mode pass over the 8 images gives them.
  assert jax.tree.structure(stats) == jax.tree.structure(new.batch_stats)
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(new.batch_stats)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_bfloat16_model_keeps_float32_states():
  config = tiny_config('avae_s')
  config.model.dtype = 'bfloat16'
  cfg = dataclasses.replace(steps.StepConfig.from_config(config, dataset_size=1000),
                            force_accuracy=0.6)
  # Tracing (no compile) checks the dtypes, including both branches of each lax.cond.
  states = jax.eval_shape(
      lambda key: steps.create_train_states(config, key, (16, 16, 3)), jax.random.key(0))
  stacked = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct((NUM_DEVICES,) + s.shape, s.dtype), states)
  batch = jax.ShapeDtypeStruct((NUM_DEVICES, 2, 16, 16, 3), jnp.float32)
  out = jax.eval_shape(mapped(cfg).adversarial, *stacked, batch, jax.random.key(0))
  assert jax.tree.structure(out[:2]) == jax.tree.structure(stacked)
  for before, after in zip(jax.tree.leaves(stacked), jax.tree.leaves(out[:2])):
    assert before.shape == after.shape and before.dtype == after.dtype
  assert {leaf.dtype for leaf in jax.tree.leaves(states[0].params)} == {jnp.dtype('float32')}
  for v in out[2].values():
    assert v.dtype == jnp.float32
