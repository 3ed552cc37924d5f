"""Tests for avae_jax.api: loading a trained workdir, encode/decode/sample/interpolate/traverse.

The workdir comes from a tiny real training run (trainer.train_and_evaluate), made once per
test session and shared with test_evaluation.py and test_eval_cli.py through
`trained_workdir`.
"""

import json
import logging
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from avae_jax import api
from avae_jax import checkpoint
from avae_jax import data
from avae_jax import parallel
from avae_jax import steps
from avae_jax import trainer
from configs import default
from tests import test_config

# The tiny model every evaluation test uses, as config overrides (also passed to eval.py).
TINY = {
    'variant': 'vae',
    'image_size': 16,
    'model.widths': (4, 8),
    'model.latent_dim': 4,
    'model.hidden_dim': 8,
    'shapes.num_train': 64,
    'shapes.num_eval': 16,
    'batch_size': 8,
    'pretrain_steps': 2,
    'adversarial_steps': 0,
    'log_every': 1,
    'image_every': 1000,
    'checkpoint_every': 1,
    'eval.num_images': 6,
    'eval.batch_size': 8,
    'eval.grid_size': 4,
    'eval.traversal_dims': 2,
    'eval.fid': False,
}
TRAINED_STEPS = 2


def tiny_config(**changes):
  """The default config with TINY (and `changes`, dotted names) applied."""
  config = default.get_config()
  for name, value in {**TINY, **changes}.items():
    test_config.set_path(config, name, value)
  return config


def cli_flags(**changes):
  """TINY (and `changes`) as --config.NAME=VALUE flags for train.py / eval.py."""
  def text(v):
    return '(' + ','.join(map(str, v)) + ',)' if isinstance(v, tuple) else str(v)
  return [f'--config.{k}={text(v)}' for k, v in {**TINY, **changes}.items()]


def trained_workdir(base: pathlib.Path) -> str:
  """A workdir of a finished tiny training run under `base`, trained on first use."""
  workdir = base / 'avae_tiny_run'
  if not (workdir / 'final_metrics.json').exists():
    trainer.train_and_evaluate(tiny_config(), str(workdir))
  return str(workdir)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return trained_workdir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope='module')
def model(workdir):
  return api.TrainedModel.load(workdir)


@pytest.fixture(scope='module')
def images():
  return data.load(tiny_config(), 'eval').get(np.arange(8))


def _np(x):
  return np.asarray(x, np.float64)


def test_load_restores_the_trained_weights(workdir, model):
  assert model.step == TRAINED_STEPS
  assert model.config.variant == 'vae'
  assert model.image_shape == (16, 16, 3) and model.latent_dim == 4
  # The VAE's arrays of the latest checkpoint, read by the checkpointer itself.
  template = steps.state_tree(*steps.create_train_states(tiny_config(), jax.random.PRNGKey(1),
                                                         (16, 16, 3)))
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=None,
                               read_only=True) as ckpt:
    step, saved, _ = ckpt.restore(template)
  assert step == TRAINED_STEPS
  for name in ('params', 'batch_stats'):
    loaded, want = jax.device_get(model.variables[name]), saved['vae'][name]
    assert jax.tree.structure(loaded) == jax.tree.structure(want)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded),
                                                     jax.tree.leaves(want)))


def test_load_chosen_step(workdir, model, images):
  earlier = api.TrainedModel.load(workdir, step=1)
  assert earlier.step == 1
  assert not np.allclose(_np(earlier.encode(images)[0]), _np(model.encode(images)[0]))


def test_models_of_one_architecture_share_compiled_programs(workdir, model, images, caplog):
  model.encode(images)
  model.interpolate(images[:2], images[2:4], steps=3)
  earlier = api.TrainedModel.load(workdir, step=1)
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    earlier.encode(images)
    earlier.interpolate(images[:2], images[2:4], steps=3)
    compiled = [r.getMessage() for r in caplog.records if 'XLA compilation of' in r.getMessage()]
    assert not compiled, compiled
    # The check can fail: another input shape is another program.
    earlier.encode(images[:4])
    assert any('XLA compilation of jit(_encode)' in r.getMessage() for r in caplog.records)


def test_encode_decode_shapes(model, images):
  mu, logvar = model.encode(images)
  assert mu.shape == (8, 4) and logvar.shape == (8, 4)
  assert np.all(np.isfinite(_np(mu))) and np.all(np.isfinite(_np(logvar)))
  x = _np(model.decode(mu))
  assert x.shape == (8, 16, 16, 3)
  assert np.all((x > 0) & (x < 1))
  # A batch that does not split over the 4 devices runs replicated, with the same numbers.
  odd = _np(model.decode(mu[:3]))
  np.testing.assert_allclose(odd, x[:3], atol=1e-5)


def test_encode_returns_the_mu_head_then_the_logvar_head(model, images):
  # The outputs of the encoder's Dense layers named mu and logvar, captured from the
  # module run directly (not through the API's programs).
  is_head = lambda mdl, name: name == '__call__' and mdl.name in ('mu', 'logvar')
  _, state = model.module.apply(jax.device_get(model.variables), _np(images), train=False,
                                method='encode', capture_intermediates=is_head,
                                mutable=['intermediates'])
  heads = state['intermediates']['encoder']
  mu, logvar = model.encode(images)
  np.testing.assert_allclose(_np(mu), np.asarray(heads['mu']['__call__'][0]), atol=1e-5)
  np.testing.assert_allclose(_np(logvar), np.asarray(heads['logvar']['__call__'][0]),
                             atol=1e-5)
  assert not np.allclose(_np(mu), _np(logvar), atol=1e-3)


def test_decode_is_the_decoder_run_directly(model):
  # The API's jitted, sharded program against the module applied without it.
  z = np.random.default_rng(4).normal(size=(4, 4)).astype(np.float32)
  want = model.module.apply(jax.device_get(model.variables), z, train=False, method='decode')
  np.testing.assert_allclose(_np(model.decode(z)), np.asarray(want), atol=1e-5)


def test_reconstruct_is_decode_of_posterior_mean(model, images):
  mu, _ = model.encode(images)
  np.testing.assert_allclose(_np(model.reconstruct(images)), _np(model.decode(mu)), atol=1e-5)


def test_sample_decodes_standard_normal_codes(model):
  key = jax.random.PRNGKey(3)
  x = _np(model.sample(key, 4))
  assert x.shape == (4, 16, 16, 3)
  z = np.asarray(jax.random.normal(key, (4, 4)))
  np.testing.assert_allclose(x, _np(model.decode(z)), atol=1e-5)
  assert not np.allclose(x, _np(model.sample(jax.random.PRNGKey(4), 4)))


def test_interpolation_endpoints_and_midpoint(model, images):
  mu = _np(model.encode(images[:2])[0])
  rows = _np(model.interpolate(images[0], images[1], 5))
  assert rows.shape == (5, 16, 16, 3)
  expected = _np(model.decode(np.stack([mu[0], mu[1], 0.5 * (mu[0] + mu[1])])))
  np.testing.assert_allclose(rows[0], expected[0], atol=1e-5)
  np.testing.assert_allclose(rows[-1], expected[1], atol=1e-5)
  np.testing.assert_allclose(rows[2], expected[2], atol=1e-5)
  # Several pairs at once: one row per pair, the same rows.
  batched = _np(model.interpolate(images[:4:2], images[1:4:2], 5))
  assert batched.shape == (2, 5, 16, 16, 3)
  np.testing.assert_allclose(batched[0], rows, atol=1e-5)
  # One image against a batch of one: the result's shape followed x0's rank alone.
  for x0, x1 in ((images[0], images[1:2]), (images[:1], images[1])):
    with pytest.raises(ValueError, match='x0 and x1 must both be one image .* or both '
                       'batches'):
      model.interpolate(x0, x1, 3)
  # Batches of other lengths: an error, not x0's pair repeated (or JAX's own error).
  for x0, x1 in ((images[:1], images[1:4]), (images[:2], images[2:5])):
    with pytest.raises(ValueError, match='differ in shape'):
      model.interpolate(x0, x1, 3)


def test_traversal_changes_only_the_chosen_dims(model, images):
  mu = _np(model.encode(images[:1])[0])[0]
  dims, values = [2, 0], [-1.5, float(mu[2]), 2.0]
  out = _np(model.traverse(images[0], dims, values))
  assert out.shape == (2, 3, 16, 16, 3)
  for i, d in enumerate(dims):
    for j, v in enumerate(values):
      z = mu.copy()
      z[d] = v  # every other dimension stays at the posterior mean
      np.testing.assert_allclose(out[i, j], _np(model.decode(z[None]))[0], atol=1e-5)
  # Setting dim 2 to its own posterior mean gives back the reconstruction.
  np.testing.assert_allclose(out[0, 1], _np(model.reconstruct(images[:1]))[0], atol=1e-5)
  assert not np.allclose(out[0, 0], out[0, 2])
  # A batch of one is one image; a larger batch is refused, not traversed per image.
  np.testing.assert_allclose(_np(model.traverse(images[:1], dims, values)), out, atol=1e-6)
  with pytest.raises(ValueError, match='traverse takes one image, got a batch of 2'):
    model.traverse(images[:2], dims, values)


def test_pil_images_and_lists_are_taken_by_every_method(model, images):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  as_bytes = np.round(images[:2] * 255).astype(np.uint8)
  pil = [Image.fromarray(x) for x in as_bytes]
  np.testing.assert_array_equal(_np(model.interpolate(pil[0], pil[1], 3)),
                                _np(model.interpolate(as_bytes[0], as_bytes[1], 3)))
  np.testing.assert_array_equal(_np(model.traverse(pil[0], [1], [0.0, 1.0])),
                                _np(model.traverse(as_bytes[0], [1], [0.0, 1.0])))
  np.testing.assert_array_equal(_np(model.traverse(images[0].tolist(), [1], [0.0])),
                                _np(model.traverse(images[0], [1], [0.0])))


def test_uint8_images_are_scaled_and_empty_batches_allowed(model, images):
  as_bytes = np.round(images * 255).astype(np.uint8)
  np.testing.assert_allclose(_np(model.encode(as_bytes)[0]),
                             _np(model.encode(as_bytes / np.float32(255))[0]), atol=1e-6)
  mu, logvar = model.encode(images[:0])
  assert mu.shape == logvar.shape == (0, 4)
  assert model.reconstruct(images[:0]).shape == (0, 16, 16, 3)
  # No pairs: a ZeroDivisionError from the reshape of the codes.
  assert model.interpolate(images[:0], images[:0], 3).shape == (0, 3, 16, 16, 3)


def test_float_images_outside_0_1_are_rejected_by_every_method(model, images):
  # Float images in 0..255 (uint8 cast to float) must not be encoded as they are.
  as_255 = np.round(images * 255).astype(np.float32)
  as_255[:, 0, 0] = [0.0, 255.0, 128.0]  # each image spans 0..255
  message = (r'float images must lie in \[0, 1\], found values in \[0, 255\] '
             r'\(divide by 255\?\)')
  for call in (lambda: model.encode(as_255), lambda: model.reconstruct(as_255),
               lambda: model.encode(jax.numpy.asarray(as_255)),
               lambda: model.interpolate(images[0], as_255[1], 3),
               lambda: model.traverse(as_255[0], [0], [0.0])):
    with pytest.raises(ValueError, match=message):
      call()
  with pytest.raises(ValueError, match=r'^x1: float images must lie in \[0, 1\]'):
    model.interpolate(images[0], as_255[1], 3)
  below = images.copy()
  below[1, 2, 3] = [-0.5, 1.0, 0.0]
  with pytest.raises(ValueError, match=r'found values in \[-0.5, 1\] \(clip to \[0, 1\]\?\)'):
    model.encode(below)
  # A small overshoot is shown with the digits that make it one (not rounded to "1").
  over = np.clip(images, 0.0, 1.0).astype(np.float32)
  over[0, 0, 0, 0] = 1.000002
  with pytest.raises(ValueError, match=r', 1\.000002\d*\] \(clip to \[0, 1\]\?\)$'):
    model.encode(over)
  # Float rounding past the ends (as a resize or a division by 255 can leave) is accepted,
  # and gives the codes of the clipped images up to that rounding.
  fuzzy = np.clip(images, 0.0, 1.0).astype(np.float32)
  fuzzy[0, 0, 0] = [1.0 + 5e-7, -5e-7, 0.5]
  clipped = np.clip(fuzzy, 0.0, 1.0)
  np.testing.assert_allclose(_np(model.encode(fuzzy)[0]), _np(model.encode(clipped)[0]),
                             atol=1e-5)
  assert model.encode(images.astype(np.float16))[0].shape == (len(images), 4)


def test_float_images_with_a_nan_are_rejected_by_every_method(model, images):
  # numpy's min and max are NaN then and XLA:CPU's skip it: both passed the range check,
  # and the codes came back NaN.
  nan = images.copy()
  nan[1, 4, 5, 2] = np.nan
  for call in (lambda: model.encode(nan), lambda: model.reconstruct(nan),
               lambda: model.encode(jax.numpy.asarray(nan)),
               lambda: model.interpolate(images[0], nan[1], 3),
               lambda: model.traverse(nan[1], [0], [0.0])):
    with pytest.raises(ValueError, match=r'float images must lie in \[0, 1\], found NaN'):
      call()


def test_bad_inputs_are_rejected(model, images):
  with pytest.raises(ValueError, match=r'\(B, 16, 16, 3\)'):
    model.encode(images[:, :8, :8])
  with pytest.raises(ValueError,
                     match=r'expected uint8 images or floats in \[0, 1\], got dtype int64'):
    model.encode(np.zeros((2, 16, 16, 3), np.int64))
  with pytest.raises(ValueError, match=r'\(B, 4\)'):
    model.decode(np.zeros((2, 5), np.float32))
  # A complex code lost its imaginary part (a ComplexWarning only).
  with pytest.raises(ValueError, match='z must be real numbers, got dtype complex64'):
    model.decode(np.full((2, 4), 1j, np.complex64))
  assert model.decode(np.zeros((2, 4), np.int32)).shape == (2, 16, 16, 3)
  assert model.decode(jax.numpy.zeros((2, 4), jax.numpy.bfloat16)).shape == (2, 16, 16, 3)
  with pytest.raises(ValueError, match='out of range'):
    model.traverse(images[0], [4], [0.0])
  # Not wrapped to dim 0 by a cast to int32.
  with pytest.raises(ValueError, match='out of range'):
    model.traverse(images[0], [2**32], [0.0])


def test_counts_and_dims_that_are_not_integers_are_rejected(model, images):
  # They were truncated (2.5 samples gave 2, dim 0.7 was dim 0) or reached XLA (n=-1).
  for call, message in (
      (lambda: model.sample(jax.random.PRNGKey(0), 2.5), 'n must be an integer >= 0, got 2.5'),
      (lambda: model.sample(jax.random.PRNGKey(0), -1), 'n must be an integer >= 0, got -1'),
      (lambda: model.sample(jax.random.PRNGKey(0), True), 'n must be an integer'),
      (lambda: model.interpolate(images[0], images[1], 2.5), 'steps must be an integer >= 2'),
      (lambda: model.interpolate(images[0], images[1], 1), 'steps must be an integer >= 2'),
      (lambda: model.traverse(images[0], [0.7], [0.0]), 'dims must be a list of integers'),
      (lambda: model.traverse(images[0], [True], [0.0]), 'dims must be a list of integers'),
      (lambda: model.traverse(images[0], [[0, 1]], [0.0]), 'dims must be a list of integers'),
      (lambda: model.traverse(images[0], [0], [[0.0, 1.0], [2.0, 3.0]]),
       r'values must be a list of numbers, got shape \(2, 2\)'),
      # They decoded to NaN images without a word.
      (lambda: model.traverse(images[0], [0], [0.0, float('nan')]),
       r'values must be finite float32 numbers, got \[0.0, nan\]'),
      (lambda: model.traverse(images[0], [0], [float('inf')]), 'values must be finite'),
      # Finite, but not in float32: the codes were -inf and inf, with numpy's warning.
      (lambda: model.traverse(images[0], [0], [-1e39, 1e39]),
       r'values must be finite float32 numbers, got \[-1e\+39, 1e\+39\]')):
    with pytest.raises(ValueError, match=message):
      call()
  # numpy integers are integers.
  assert model.sample(jax.random.PRNGKey(0), np.int64(2)).shape == (2, 16, 16, 3)
  assert model.interpolate(images[0], images[1], np.int32(3)).shape == (3, 16, 16, 3)
  assert model.traverse(images[0], np.array([1, 0]), [0.0]).shape == (2, 1, 16, 16, 3)
  assert model.traverse(images[0], [], []).shape == (0, 0, 16, 16, 3)
  # bfloat16 values are numbers (numpy's kind 'V'): they were refused as not numbers.
  np.testing.assert_array_equal(
      _np(model.traverse(images[0], [1], jax.numpy.asarray([-1.0, 0.5], jax.numpy.bfloat16))),
      _np(model.traverse(images[0], [1], [-1.0, 0.5])))


def test_a_workdir_under_home_may_be_named_with_a_tilde(workdir, monkeypatch):
  # As the programs' --workdir=~/...: it said there was no checkpoint in '~/...'.
  monkeypatch.setenv('HOME', os.path.dirname(workdir))
  name = '~/' + os.path.basename(workdir)
  assert api.TrainedModel.load(name).step == api.TrainedModel.load(workdir).step
  assert api.read_config(name).to_dict() == api.read_config(workdir).to_dict()


def test_a_file_given_as_the_workdir_is_named(workdir):
  # It said "no checkpoint in WORKDIR/config.json/checkpoints", and read_config None.
  path = os.path.join(workdir, 'config.json')
  for f in (api.TrainedModel.load, api.read_config):
    with pytest.raises(api.WorkdirError,
                       match=f'^{re.escape(path)} is a file, not a directory \\(the --workdir'):
      f(path)


def test_an_empty_or_repeated_device_list_is_refused(workdir):
  # It failed inside jax's Mesh with an IndexError.
  with pytest.raises(ValueError, match='devices must name at least one device'):
    api.TrainedModel.load(workdir, devices=[])
  # It loaded, then a batch split over the list failed in jax's device_put (safe_zip).
  with pytest.raises(ValueError, match='names a device more than once'):
    api.TrainedModel.load(workdir, devices=[jax.devices()[0]] * 2)


def test_a_single_image_of_another_shape_is_named_with_its_own_shape(model, images):
  # It said "got shape (1, 16, 16, 1)": the batch axis the method adds, not the caller's.
  for f in (lambda x: model.interpolate(images[0], x, 3), lambda x: model.traverse(x, 0, 1.0)):
    with pytest.raises(ValueError, match=r'got shape \(16, 16, 1\)'):
      f(images[0][..., :1])


def test_from_state(images):
  config = tiny_config()
  vae_state, _ = steps.create_train_states(config, jax.random.PRNGKey(1), (16, 16, 3))
  m = api.TrainedModel.from_state(config, vae_state, devices=jax.devices()[:1])
  assert m.step == 0
  # A run's global step labels it where the state's own update count lags behind.
  assert api.TrainedModel.from_state(config, vae_state, step=7).step == 7
  # Without step=, the state's own update count.
  assert api.TrainedModel.from_state(config, vae_state.replace(step=3)).step == 3
  mu, logvar = m.encode(images)
  assert mu.shape == (8, 4) and logvar.shape == (8, 4)
  assert _np(m.reconstruct(images)).shape == (8, 16, 16, 3)
  # The training loop's state is replicated: said at once, not at the first use in flax.
  replicated = parallel.replicate(vae_state, jax.devices()[:2])
  for step in (None, 5):
    with pytest.raises(ValueError, match=r'vae_state is replicated \(its step has shape '
                       r'\(2,\)\): pass parallel.unreplicate\(vae_state\)'):
      api.TrainedModel.from_state(config, replicated, step=step)


def test_no_checkpoint_is_a_clear_error(tmp_path, workdir):
  with pytest.raises(api.NoCheckpointError, match='no checkpoint in'):
    api.TrainedModel.load(str(tmp_path))
  # A checkpoints folder without a step in it (a run stopped before its first save).
  (tmp_path / 'checkpoints' / 'not_a_step').mkdir(parents=True)
  with pytest.raises(api.NoCheckpointError, match='train a model there first'):
    api.require_checkpoint(str(tmp_path))
  with pytest.raises(api.NoCheckpointError, match='step 7'):
    api.TrainedModel.load(workdir, step=7)


def test_checkpoints_pruned_while_they_are_read_are_no_checkpoint(workdir, monkeypatch):
  # A run training in the workdir deleted every step the reader had listed: the
  # checkpointer finds none left (None), which is no model to load, not a TypeError.
  monkeypatch.setattr(checkpoint.Checkpointer, 'restore', lambda *args, **kwargs: None)
  with pytest.raises(api.NoCheckpointError, match='no readable checkpoint in'):
    api.TrainedModel.load(workdir)


def test_a_step_that_is_not_an_integer_is_rejected(workdir):
  # It was truncated: step=1.5 restored step 1, step=True step 1 too.
  for step in (1.5, True, '1'):
    with pytest.raises(ValueError, match='step must be an integer >= 0'):
      api.TrainedModel.load(workdir, step=step)
  assert api.TrainedModel.load(workdir, step=np.int64(1)).step == 1


@pytest.mark.parametrize('text', ['[]', '"abc"', '3', '{"variant": '])
def test_a_config_json_that_is_not_a_json_object_is_a_workdir_error(tmp_path, text):
  # A list raised AttributeError from ConfigDict (eval.py printed its traceback).
  (tmp_path / api.CONFIG_FILE).write_text(text)
  with pytest.raises(api.WorkdirError, match='is not a readable config'):
    api.read_config(str(tmp_path))


def test_a_config_json_of_an_older_version_gets_the_default_values(tmp_path, workdir, model):
  # Fields added since the file was written raised AttributeError deep inside the model.
  old = tmp_path / 'old'
  shutil.copytree(workdir, old)
  path = old / api.CONFIG_FILE
  fields = json.loads(path.read_text())
  del fields['model']['bn_momentum'], fields['gating'], fields['eval']['num_images']
  path.write_text(json.dumps(fields))
  with pytest.warns(UserWarning, match='lacks eval.num_images, gating, model.bn_momentum'):
    loaded = api.TrainedModel.load(str(old))
  assert loaded.config.model.bn_momentum == default.get_config().model.bn_momentum
  assert loaded.config.gating.to_dict() == default.get_config().gating.to_dict()
  for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(model.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Lacking a field of the model's fingerprint, the checkpoint's own one decides.
  del fields['model']['hidden_dim']
  path.write_text(json.dumps(fields))
  assert api.TrainedModel.load(str(old), config=tiny_config()).step == TRAINED_STEPS
  # Nor can its model settings be compared with a config's: no difference is claimed.
  assert api.model_differences(str(old), tiny_config(variant='vae_s')) is None
  with pytest.raises(api.IncompatibleCheckpointError):
    api.TrainedModel.load(str(old), config=tiny_config(variant='vae_s'))
  # Read as it is, the file keeps what it has.
  assert 'hidden_dim' not in api.read_config(str(old)).model


def test_a_damaged_config_json_is_warned_about_when_a_config_is_given(tmp_path, workdir):
  # The given config does not need the file; it was refused all the same (eval.py too).
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  (run / api.CONFIG_FILE).write_text('{"variant": ')
  with pytest.warns(UserWarning, match='is not a readable config .*; using the given config'):
    assert api.TrainedModel.load(str(run), config=tiny_config()).step == TRAINED_STEPS
  # The checkpoint still refuses another model, and without a config the file is needed.
  with pytest.warns(UserWarning), pytest.raises(api.IncompatibleCheckpointError):
    api.TrainedModel.load(str(run), config=tiny_config(variant='vae_s'))
  with pytest.raises(api.WorkdirError, match='is not a readable config'):
    api.TrainedModel.load(str(run))


@pytest.mark.parametrize('change, named', [
    ({'image_size': 32}, 'image_size'),
    ({'variant': 'vae_s'}, 'variant'),
    ({'model.widths': (4, 16)}, 'model.widths'),
])
def test_config_of_another_model_is_a_clear_error(workdir, change, named):
  with pytest.raises(api.IncompatibleCheckpointError, match=named):
    api.TrainedModel.load(workdir, config=tiny_config(**change))


def test_checkpoint_of_another_model_without_config_json(tmp_path, workdir):
  # No config.json to compare with: the checkpoint itself must reject the config.
  bare = tmp_path / 'bare'
  shutil.copytree(os.path.join(workdir, 'checkpoints'), bare / 'checkpoints')
  assert api.TrainedModel.load(str(bare), config=tiny_config()).step == TRAINED_STEPS
  # Another image size: the arrays do not fit.
  with pytest.raises(api.IncompatibleCheckpointError, match='does not fit'):
    api.TrainedModel.load(str(bare), config=tiny_config(image_size=32))
  # Another variant with the same arrays: the config hash in the checkpoint's meta differs.
  with pytest.raises(api.IncompatibleCheckpointError, match='another model'):
    api.TrainedModel.load(str(bare), config=tiny_config(variant='vae_s'))
  with pytest.raises(api.WorkdirError, match='config.json'):
    api.TrainedModel.load(str(bare))
