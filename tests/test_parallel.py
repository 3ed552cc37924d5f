"""Tests for avae_jax.parallel: device-count independence, pmap == shard_map, replication."""

import dataclasses
import functools
import types

import jax
import numpy as np
import pytest

from avae_jax import config_lib
from avae_jax import parallel
from avae_jax import steps
from tests import test_steps

BATCH = test_steps.BATCH


@functools.lru_cache(maxsize=None)
def setup():
  config = test_steps.tiny_config()  # AVAE-S: every loss term, TC across devices
  vae_state, disc_state = steps.create_train_states(config, jax.random.key(0, impl='rbg'),
                                                    (16, 16, 3))
  x = np.random.default_rng(0).uniform(size=(BATCH, 16, 16, 3)).astype(np.float32)
  return config, vae_state, disc_state, x


def step_config(kind):
  """The full AVAE-S loss for pre-training. The adversarial step takes both updates and
  keeps the terms that cross devices (BatchNorm, TC) but only MSE among the per-image
  reconstruction terms, which are per-device functions and slow to compile."""
  config = setup()[0]
  cfg = steps.StepConfig.from_config(config, dataset_size=1000)
  if kind == 'adversarial':
    cfg = dataclasses.replace(cfg, recon_weights=(('mse', 1.0),), gabor=None,
                              force_accuracy=0.6)
  return cfg


@functools.lru_cache(maxsize=None)
def run(kind, method, num_devices):
  """Host copies of (states, metrics) after one step of `kind` with `method` on n devices."""
  _, vae_state, disc_state, x = setup()
  devs = jax.devices()[:num_devices]
  fns = parallel.make_steps(step_config(kind), devs, method)
  batch = x.reshape((num_devices, -1) + x.shape[1:])
  key = jax.random.key(7)
  r_vae = parallel.replicate(vae_state, devs)
  given = [r_vae]
  if kind == 'pretrain':
    r_vae, metrics = fns.pretrain(r_vae, batch, key)
    states = (r_vae,)
  else:
    given.append(parallel.replicate(disc_state, devs))
    r_vae, r_disc, metrics = fns.adversarial(*given, batch, key)
    states = (r_vae, r_disc)
  # The states given were donated: the step reused their memory for its outputs.
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(given))
  for v in metrics.values():
    assert v.shape == ()  # averaged over devices: no device axis
  # Every device holds the same state.
  for leaf in jax.tree.leaves(states):
    assert leaf.shape[0] == num_devices
    host = np.asarray(leaf)
    for d in range(1, num_devices):
      np.testing.assert_array_equal(host[d], host[0])
  return (jax.device_get(parallel.unreplicate(states)),
          {k: float(v) for k, v in metrics.items()})


def assert_same(a, b, tol):
  """Equal up to float32 rounding: |a - b| <= tol * max(|b|, 1) leaf by leaf.

  The tolerance of a leaf scales with its largest entry: a different summation order
  changes a sum by a multiple of the magnitude of its terms, not of the result.
  """
  (states_a, metrics_a), (states_b, metrics_b) = a, b
  assert set(metrics_a) == set(metrics_b)
  for k in metrics_a:
    np.testing.assert_allclose(metrics_a[k], metrics_b[k], rtol=tol, atol=tol, err_msg=k)
  leaves_a, leaves_b = jax.tree.leaves(states_a), jax.tree.leaves(states_b)
  assert len(leaves_a) == len(leaves_b)
  for u, v in zip(leaves_a, leaves_b):
    u, v = np.asarray(u), np.asarray(v)
    assert u.shape == v.shape and u.dtype == v.dtype
    np.testing.assert_allclose(u, v, rtol=0, atol=tol * max(float(np.max(np.abs(v))), 1.0))


def test_pretrain_one_device_equals_four_devices():
  # Same global batch and key: BatchNorm statistics, noise and TC are global-batch ones.
  one, four = run('pretrain', 'pmap', 1), run('pretrain', 'pmap', 4)
  assert_same(one, four, tol=1e-5)
  assert one[1]['tc'] != 0.0
  assert int(one[0][0].step) == 1


def test_adversarial_one_device_equals_four_devices():
  one, four = run('adversarial', 'pmap', 1), run('adversarial', 'pmap', 4)
  assert one[1]['vae_updated'] == one[1]['disc_updated'] == 1.0
  assert_same(one, four, tol=1e-5)


@pytest.mark.parametrize('kind', ['pretrain', 'adversarial'])
def test_pmap_equals_shard_map(kind):
  assert_same(run(kind, 'pmap', 4), run(kind, 'shard_map', 4), tol=1e-5)


def test_the_step_changes_the_state():
  # Guards the comparisons above against steps that do nothing.
  _, vae_state, disc_state, _ = setup()
  (vae1, disc1), _ = run('adversarial', 'pmap', 4)
  assert int(vae1.step) == int(disc1.step) == 1
  for old, new in ((vae_state, vae1), (disc_state, disc1)):
    for u, v in zip(jax.tree.leaves(old.params), jax.tree.leaves(new.params)):
      assert not np.array_equal(np.asarray(u), np.asarray(v))


def test_replicate_unreplicate_round_trip():
  devs = jax.devices()[:4]
  tree = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.int32(5)}
  rep = parallel.replicate(tree, devs)
  assert rep['a'].shape == (4, 2, 3) and rep['b'].shape == (4,)
  # Split along the new axis, row d on device d (the layout the mapped steps take), not a
  # full copy of all rows on each device.
  shards = sorted(rep['a'].addressable_shards, key=lambda s: s.index[0].start)
  assert [s.device for s in shards] == devs
  assert [(s.index[0].start, s.data.shape) for s in shards] == [(d, (1, 2, 3)) for d in range(4)]
  back = parallel.unreplicate(rep)
  np.testing.assert_array_equal(np.asarray(back['a']), tree['a'])
  assert int(back['b']) == 5
  # No devices, or one twice: one message each (JAX failed deep in the mesh's set-up).
  with pytest.raises(ValueError, match='no devices given'):
    parallel.replicate(tree, [])
  with pytest.raises(ValueError, match='a device is named twice'):
    parallel.replicate(tree, [devs[0], devs[1], devs[0]])


# rbg: a key of another impl than the default, and of 4 words, not 2.
@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg'])
def test_replicate_typed_prng_keys(impl):
  # np.asarray of a typed key raised TypeError.
  devs = jax.devices()[:4]
  key = jax.random.key(3, impl=impl)
  rep = parallel.replicate({'key': key, 'x': np.float32(1)}, devs)
  assert rep['key'].shape == (4,) and jax.random.key_impl(rep['key']) == jax.random.key_impl(key)
  assert {s.device for s in rep['key'].addressable_shards} == set(devs)
  for row in np.asarray(jax.random.key_data(rep['key'])):
    np.testing.assert_array_equal(row, np.asarray(jax.random.key_data(key)))
  back = parallel.unreplicate(rep)
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(back['key'])),
                                np.asarray(jax.random.key_data(key)))


def test_unknown_method_is_an_error():
  with pytest.raises(ValueError, match='shard_map'):
    parallel.make_steps(step_config('pretrain'), jax.devices()[:1], 'vmap')


@pytest.mark.parametrize('method', config_lib.PARALLEL_METHODS)
def test_a_batch_not_shaped_one_row_per_device_is_an_error(method):
  # (8, 1, ...) on 4 devices: shard_map split it into blocks of 2 rows and trained on the
  # first row of each, half the batch, without a word; pmap refuses it.
  _, vae_state, _, x = setup()
  devs = jax.devices()[:4]
  fns = parallel.make_steps(step_config('pretrain'), devs, method)
  # pmap's own refusal is a ValueError too: the message is the module's.
  with pytest.raises(ValueError, match=r'batch of shape \(8, 1, .*\): the leading axis must '
                     r'be the number of devices \(4\)'):
    fns.pretrain(parallel.replicate(vae_state, devs), x.reshape((8, 1) + x.shape[1:]),
                 jax.random.key(7))


@pytest.mark.parametrize('method', ['pmap', 'shard_map'])
def test_a_state_or_batch_without_the_devices_axis_is_named(method):
  # pmap's own errors were an IndexError and an axis that cannot be squeezed; shard_map
  # took a batch of 2k rows on 2 devices as blocks of k and trained on their first rows.
  _, vae_state, disc_state, x = setup()
  devs = jax.devices()[:2]
  fns = parallel.make_steps(step_config('pretrain'), devs, method)
  key = jax.random.key(7)
  r_vae, r_disc = parallel.replicate(vae_state, devs), parallel.replicate(disc_state, devs)
  batch = x.reshape((2, -1) + x.shape[1:])
  state_error = (r'a train state whose step has shape \(\): the mapped steps take states '
                 r'replicated over the 2 devices \(parallel.replicate\(state, devices\)\)')
  with pytest.raises(ValueError, match=state_error):
    fns.pretrain(vae_state, batch, key)
  with pytest.raises(ValueError, match=state_error):  # the benchmark's ahead-of-time path
    fns.pretrain.lower(vae_state, batch, key)
  with pytest.raises(ValueError, match=state_error):
    fns.adversarial(r_vae, disc_state, batch, key)
  for wrong in (x, x.reshape((4, -1) + x.shape[1:])):
    with pytest.raises(ValueError, match=rf'batch of shape \({wrong.shape[0]}, .*\): the '
                       r'leading axis must be the number of devices \(2\)'):
      fns.pretrain(r_vae, wrong, key)
    with pytest.raises(ValueError, match=r'the leading axis must be the number of devices'):
      fns.adversarial(r_vae, r_disc, wrong, key)


def test_local_devices_counts_and_order():
  """num_devices=0 is all local devices, n the first n in order; more, or a negative count,
  is a ConfigError."""
  devs = jax.local_devices()
  assert len(devs) == 4  # conftest's forced CPU devices

  def local_devices(n):
    return parallel.local_devices(types.SimpleNamespace(num_devices=n))
  assert local_devices(0) == local_devices(4) == devs
  assert local_devices(2) == devs[:2]
  with pytest.raises(config_lib.ConfigError,
                     match=r'^num_devices=5 is more than the 4 local device\(s\) \(on the CPU'):
    local_devices(5)
  with pytest.raises(config_lib.ConfigError, match='num_devices = -1 is negative'):
    local_devices(-1)

