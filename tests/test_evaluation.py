"""Tests for avae_jax.evaluation on the tiny trained workdir of test_api.

FID runs with random Inception weights (injected through `inception_params`), so these
tests need neither the real weights nor the network; the real-weights port is tested in
test_inception.py. Reference values are recomputed here with scipy / numpy.
"""

import contextlib
import io
import json
import logging
import os
from pathlib import Path
import re
import time

from PIL import Image
import jax
import ml_collections
import numpy as np
import pytest
from scipy import ndimage
from tensorboard.backend.event_processing import event_accumulator

from avae_jax import api
from avae_jax import data
from avae_jax import evaluation
from avae_jax import inception
from avae_jax import metrics
from avae_jax import summary
from tests import test_api

N = test_api.TINY['eval.num_images']  # 6: not a multiple of the batch (8), so padding is used
GRID = test_api.TINY['eval.grid_size']  # 4
TINY_EVAL_SPLIT = test_api.TINY['shapes.num_eval']  # 16
SIDE = 16
TAPS = (64, 192, 768, 2048)
# Every key evaluate returns for a dataset with ground-truth factors, FID enabled.
ALL_KEYS = {
    'step', 'num_images', 'num_samples',
    'gt_sharpness_mean', 'gt_sharpness_std',
    'rec_sharpness_mean', 'rec_sharpness_std',
    'rec_mse', 'rec_mse_std', 'rec_cosine_similarity', 'rec_cosine_similarity_std',
    'sample_sharpness_mean', 'sample_sharpness_std', 'kl_mean',
    'fid_num_images',
    'fid_rec_64', 'fid_rec_192', 'fid_rec_768', 'fid_rec_2048',
    'fid_sample_64', 'fid_sample_192', 'fid_sample_768', 'fid_sample_2048',
    'mig', 'mig_shuffled', 'mig_num_images',
}
FID_KEYS = {k for k in ALL_KEYS if k.startswith('fid_')}


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return test_api.trained_workdir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope='module')
def config():
  return test_api.tiny_config()


@pytest.fixture(scope='module')
def model(workdir):
  return api.TrainedModel.load(workdir)


@pytest.fixture(scope='module')
def source(config):
  return data.load(config, 'eval')


@pytest.fixture(scope='module')
def inception_params():
  return inception.random_params(jax.random.PRNGKey(0))


@pytest.fixture(scope='module')
def evaluation_run(tmp_path_factory, config, model, source, inception_params):
  """One full evaluation with FID (random Inception weights); (results, out_dir, stdout)."""
  out_dir = str(tmp_path_factory.mktemp('eval'))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):  # capsys is per test, this fixture per module
    results = evaluation.evaluate(config, model, source, out_dir=out_dir,
                                  devices=jax.devices(), inception_params=inception_params)
  return results, out_dir, printed.getvalue()


@pytest.fixture(scope='module')
def evaluated(evaluation_run):
  """(results, out_dir) of the full evaluation."""
  return evaluation_run[:2]


def _assert_in_order(text, expected):
  """Each of `expected` occurs in text, in that order."""
  at = [text.find(e) for e in expected]
  assert -1 not in at and at == sorted(at), dict(zip(expected, at))


def _laplacian_variance(images):
  """Independent sharpness: scipy's Laplacian of the luma, valid part, variance per image."""
  luma = np.asarray(images, np.float64) @ np.array([0.299, 0.587, 0.114])
  out = []
  for g in luma:
    lap = ndimage.convolve(g, np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64),
                           mode='constant')
    out.append(lap[1:-1, 1:-1].var())
  return np.array(out)


def _fid_via_svd(f1, f2):
  """FID from the centred features: tr sqrt(S1 S2) is the nuclear norm of A1 A2^T / (n - 1)."""
  f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
  a1, a2 = f1 - f1.mean(0), f2 - f2.mean(0)
  n = len(f1)
  cross = np.linalg.svd(a1 @ a2.T / (n - 1), compute_uv=False).sum()
  return (np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.sum(a1 ** 2) / (n - 1)
          + np.sum(a2 ** 2) / (n - 1) - 2 * cross)


def test_every_key_is_returned_and_finite(evaluated):
  results, _ = evaluated
  assert set(results) == ALL_KEYS
  for k, v in results.items():
    assert isinstance(v, (int, float)) and np.isfinite(v), (k, v)
  assert results['step'] == test_api.TRAINED_STEPS
  for k in ('num_images', 'num_samples', 'fid_num_images'):
    assert results[k] == N
  # MIG takes the whole eval split (eval.mig_num_images = 0), the other metrics N images.
  assert results['mig_num_images'] == TINY_EVAL_SPLIT
  assert 0.0 <= results['mig'] <= 1.0 and 0.0 <= results['mig_shuffled'] <= 1.0
  assert results['kl_mean'] > 0
  for d in TAPS:
    assert results[f'fid_rec_{d}'] > 0 and results[f'fid_sample_{d}'] > 0


def test_every_stage_is_announced(evaluation_run):
  # The stretches without a progress line of their own say what runs, in this order.
  _assert_in_order(evaluation_run[2], [
      'eval: compiling the model and the Inception network ...\n',
      'eval: images and reconstructions 6/6 images', 'eval: random samples 6/6 images',
      'eval: FID statistics and distances ...\n',
      f'eval: codes for MIG (images {N}..{TINY_EVAL_SPLIT - 1}) '
      f'{TINY_EVAL_SPLIT - N}/{TINY_EVAL_SPLIT - N} images',
      f'eval: MIG over {TINY_EVAL_SPLIT} images ...\n', 'eval: figures ...\n',
      '# Evaluation: ', 'eval: wrote metrics.json'])
  assert 'Inception weights' not in evaluation_run[2]  # given, not loaded


def test_progress_rate_and_eta_leave_out_the_compiling_first_batch(capsys):
  # 100 images in batches of 10: the first takes 60 s (it compiles), the others 1 s each.
  # Counted from the start, the rate after the second batch would be 20 / 61 images/s
  # and the ETA 4 minutes, for 8 seconds of work left.
  times = iter([0.0, 60.0] + [60.0 + i for i in range(1, 10)])
  progress = evaluation._Progress('images', 100, True, every_s=0.0, clock=lambda: next(times))
  for _ in range(10):
    progress.update(10)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == ('eval: images 10/100 images (10%) | ? images/s | ETA ? | '
                      'elapsed 0:01:00')
  assert lines[1] == ('eval: images 20/100 images (20%) | 10.0 images/s | ETA 0:00:08 | '
                      'elapsed 0:01:01')
  assert lines[-1] == ('eval: images 100/100 images (100%) | 10.0 images/s | ETA 0:00:00 | '
                       'elapsed 0:01:09')


def test_a_model_with_nan_images_gets_nan_metrics_not_an_error(tmp_path, config, model, source,
                                                              inception_params):
  # A diverged model: FID raised on its NaN features, and the cosine similarity read 0.
  params = jax.tree.map(lambda p: p * np.nan, model.variables['params'])
  diverged = api.TrainedModel(config, params, model.variables['batch_stats'], step=model.step)
  results = evaluation.evaluate(config, diverged, source, out_dir=str(tmp_path),
                                devices=jax.devices(), inception_params=inception_params)
  for key in ('rec_mse', 'rec_cosine_similarity', 'rec_sharpness_mean',
              'sample_sharpness_mean', *sorted(FID_KEYS - {'fid_num_images'})):
    assert np.isnan(results[key]), key
  assert np.isfinite(results['gt_sharpness_mean'])
  assert np.isnan(json.loads((tmp_path / 'metrics.json').read_text())['fid_rec_2048'])
  # Its NaN codes: NaN MIG, as its other metrics (MIG was skipped with numpy's message).
  assert np.isnan(results['mig']) and np.isnan(results['mig_shuffled'])
  assert results['mig_num_images'] == TINY_EVAL_SPLIT and 'mig_skipped' not in results


def test_metrics_json_matches_results(evaluated):
  results, out_dir = evaluated
  with open(os.path.join(out_dir, 'metrics.json')) as f:
    assert json.load(f) == results


def test_image_metrics_against_independent_computation(evaluated, model, source):
  results, _ = evaluated
  x = source.get(np.arange(N))
  x_rec = np.asarray(model.decode(model.encode(x)[0]), np.float64)
  gt, rec = _laplacian_variance(x), _laplacian_variance(x_rec)
  np.testing.assert_allclose(results['gt_sharpness_mean'], gt.mean(), rtol=1e-6)
  np.testing.assert_allclose(results['gt_sharpness_std'], gt.std(), rtol=1e-6)
  np.testing.assert_allclose(results['rec_sharpness_mean'], rec.mean(), rtol=1e-4)
  flat_x, flat_r = x.reshape(N, -1).astype(np.float64), x_rec.reshape(N, -1)
  mse = ((flat_x - flat_r) ** 2).mean(1)
  cos = (flat_x * flat_r).sum(1) / np.linalg.norm(flat_x, axis=1) / np.linalg.norm(flat_r, axis=1)
  np.testing.assert_allclose(results['rec_mse'], mse.mean(), rtol=1e-4)
  np.testing.assert_allclose(results['rec_cosine_similarity'], cos.mean(), rtol=1e-4)
  # The spreads over the images (population standard deviations, as the paper's ±).
  np.testing.assert_allclose(results['rec_sharpness_std'], rec.std(), rtol=1e-4)
  np.testing.assert_allclose(results['rec_mse_std'], mse.std(), rtol=1e-4)
  np.testing.assert_allclose(results['rec_cosine_similarity_std'], cos.std(), rtol=1e-3,
                             atol=1e-7)
  # The samples decode the first N of max(N, GRID**2) codes drawn at once from the
  # evaluation's key.
  key = jax.random.fold_in(jax.random.PRNGKey(0), evaluation._SAMPLE_KEY)  # seed 0
  z = jax.random.normal(key, (max(N, GRID * GRID), model.latent_dim), np.float32)[:N]
  samples = _laplacian_variance(model.decode(z))
  np.testing.assert_allclose(results['sample_sharpness_mean'], samples.mean(), rtol=1e-4)
  np.testing.assert_allclose(results['sample_sharpness_std'], samples.std(), rtol=1e-4)


def test_samples_do_not_depend_on_the_batch_size_or_device_count(tmp_path, evaluated, model,
                                                                  source):
  results, out_dir = evaluated  # 4 devices, batches of 8
  config = test_api.tiny_config(**{'eval.fid': False, 'eval.batch_size': 3})
  other = evaluation.evaluate(config, model, source, out_dir=str(tmp_path),
                              devices=jax.devices()[:1])
  for k in ('sample_sharpness_mean', 'sample_sharpness_std'):
    np.testing.assert_allclose(other[k], results[k], rtol=1e-5)
  with Image.open(os.path.join(out_dir, 'samples.png')) as a, \
      Image.open(tmp_path / 'samples.png') as b:
    np.testing.assert_allclose(np.asarray(a, np.int16), np.asarray(b, np.int16), atol=1)


def test_fid_of_reconstructions_and_samples_against_independent_computation(
    evaluated, model, source, inception_params):
  results, _ = evaluated
  pad = np.zeros((8 - N, SIDE, SIDE, 3), np.float32)  # the batch size the evaluation used
  x = source.get(np.arange(N))
  x_rec = np.asarray(model.decode(model.encode(x)[0]))
  # The samples as in test_image_metrics_against_independent_computation.
  key = jax.random.fold_in(jax.random.PRNGKey(0), evaluation._SAMPLE_KEY)
  z = jax.random.normal(key, (max(N, GRID * GRID), model.latent_dim), np.float32)[:N]
  samples = np.asarray(model.decode(z))
  fx, fr, fs = (inception.features(inception_params, np.concatenate([a, pad]), batch_size=8)
                for a in (x, x_rec, samples))
  for d in TAPS:
    # Both against the data's images.
    np.testing.assert_allclose(results[f'fid_rec_{d}'], _fid_via_svd(fx[d][:N], fr[d][:N]),
                               rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(results[f'fid_sample_{d}'],
                               _fid_via_svd(fx[d][:N], fs[d][:N]), rtol=2e-3, atol=1e-6)


def test_samples_figure_shows_grid_squared_samples_of_the_evaluation_key(evaluated, model):
  """samples.png holds GRID * GRID samples, row by row: the decoded first GRID**2 codes drawn
  at once from the evaluation's key, not only the N samples the metrics use."""
  _, out_dir = evaluated
  key = jax.random.fold_in(jax.random.PRNGKey(0), evaluation._SAMPLE_KEY)  # seed 0
  z = jax.random.normal(key, (max(N, GRID * GRID), model.latent_dim), np.float32)
  expected = np.round(np.clip(np.asarray(model.decode(z[:GRID * GRID]), np.float64), 0, 1)
                      * 255)
  with Image.open(os.path.join(out_dir, 'samples.png')) as im:
    grid = np.asarray(im)
  grid = grid.reshape(grid.shape[:2] + (-1,))
  for k in range(GRID * GRID):
    row, col = divmod(k, GRID)
    np.testing.assert_allclose(_tile(grid, row, col), expected[k], atol=1)


def _record_calls(monkeypatch, module, name, record):
  """Replaces module.NAME with a wrapper that lists record(*args, **kwargs) of its calls."""
  records = []
  real = getattr(module, name)

  def wrapper(*args, **kwargs):
    records.append(record(*args, **kwargs))
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, wrapper)
  return records


def test_each_fid_compares_n_real_images_with_n_reconstructions_or_samples(
    tmp_path, model, source, inception_params, monkeypatch):
  """Every Frechet distance gets the features of exactly N images on each side: the padding
  of the last batch (8 - N rows) goes into none of the three feature sets."""
  shapes = _record_calls(monkeypatch, metrics, 'frechet_distance_of_features',
                         lambda f1, f2: (np.shape(f1), np.shape(f2)))
  config = test_api.tiny_config(**{'eval.fid': True, 'eval.cache_real_features': False})
  evaluation.evaluate(config, model, source, out_dir=str(tmp_path), devices=jax.devices(),
                      inception_params=inception_params)
  # The reconstructions' and the samples' distance at each tap.
  assert sorted(shapes) == sorted([((N, d), (N, d)) for d in TAPS] * 2)


def _counting_inception(monkeypatch, record=lambda images, kwargs: len(images)):
  """Replaces inception.features with one that lists record(images, kwargs) of its calls."""
  return _record_calls(monkeypatch, inception, 'features',
                       lambda params, images, **kwargs: record(images, kwargs))


def test_the_padding_of_the_last_batch_is_not_run_through_inception(
    tmp_path, evaluated, model, source, inception_params, monkeypatch):
  rows = _counting_inception(monkeypatch)
  # Inception batches of 2 on one device: the 6 valid rows of each 8-image batch are 3 of
  # them (the 2 padding rows would make a fourth).
  config = test_api.tiny_config(**{'eval.fid': True, 'eval.inception_batch_size': 2})
  results = evaluation.evaluate(config, model, source, out_dir=str(tmp_path),
                                devices=jax.devices()[:1], inception_params=inception_params)
  assert rows == [N, N, N]  # the images, their reconstructions, the samples
  for d in TAPS:  # the same distances as with 4 devices and whole batches
    for kind in ('rec', 'sample'):
      np.testing.assert_allclose(results[f'fid_{kind}_{d}'], evaluated[0][f'fid_{kind}_{d}'],
                                 rtol=1e-4)


def _cache_files():
  return sorted(f for f in os.listdir(evaluation.real_features_dir()) if f.endswith('.npz'))


def test_the_images_features_are_cached_and_read_with_the_same_bits(
    tmp_path, evaluated, config, model, source, inception_params, monkeypatch, capsys):
  rows = _counting_inception(monkeypatch)
  first = evaluation.evaluate(config, model, source, out_dir=str(tmp_path / 'a'),
                              devices=jax.devices(), inception_params=inception_params)
  assert len(rows) == 3  # the images, their reconstructions, the samples
  [name] = _cache_files()
  path = os.path.join(evaluation.real_features_dir(), name)
  assert 'read from' not in capsys.readouterr().out
  # The file holds the images' taps (an independent run of the network over them).
  images = np.concatenate([x[:int(m.sum())] for x, m in data.eval_batches(source, 8, N)])
  want = inception.features(inception_params, images, batch_size=8)
  with np.load(path) as z:
    for d in TAPS:
      np.testing.assert_allclose(z[f'tap_{d}'], want[d], rtol=1e-4, atol=1e-5)
  del rows[:]

  second = evaluation.evaluate(config, model, source, out_dir=str(tmp_path / 'b'),
                               devices=jax.devices(), inception_params=inception_params)
  assert len(rows) == 2  # the reconstructions and the samples only
  assert f'eval: the Inception features of the images are read from {path}' in (
      capsys.readouterr().out)
  # The same bits as computing them (here and in the module's evaluation, which did).
  assert second == first == evaluated[0]
  assert _cache_files() == [name]


def test_inception_batches_are_per_device_and_a_config_without_the_cache_field_caches(
    tmp_path, model, source, inception_params, monkeypatch):
  sizes = _counting_inception(monkeypatch, lambda images, kwargs: kwargs['batch_size'])
  # A config saved before eval.cache_real_features existed: the cache is used.
  config = test_api.tiny_config(**{'eval.fid': True, 'eval.inception_batch_size': 1})
  del config.eval['cache_real_features']
  evaluation.evaluate(config, model, source, out_dir=str(tmp_path), devices=jax.devices()[:2],
                      inception_params=inception_params)
  assert sizes == [2, 2, 2]  # eval.inception_batch_size images on each of 2 devices
  assert len(_cache_files()) == 1


def _cache_name(source, batch=8, n=N, inception_batch=8, devices=1):
  """The features cache file of N images of `source` under stand-in weights."""
  params = {'w': np.ones(3, np.float32)}
  return evaluation._real_features_path(  # pylint: disable=protected-access
      params, source, batch, n, inception_batch, jax.devices()[:devices])


def test_the_cache_file_is_named_by_the_cpu_thread_count_too(source, monkeypatch):
  # XLA:CPU's thread count decides the order of its sums, hence the features' last bits.
  paths = set()
  for threads in ('8', '16', '16'):  # at least a thread per device (4 here): xla_flags
    monkeypatch.setenv('PJRT_NPROC', threads)
    paths.add(_cache_name(source))
  assert len(paths) == 2


def test_the_cache_file_is_named_by_the_batch_sizes_and_the_image_count(source):
  # Each decides how the features' sums are split, or which images they are of.
  names = {_cache_name(source), _cache_name(source, batch=4), _cache_name(source, n=N - 1),
           _cache_name(source, inception_batch=2)}
  assert len(names) == 4
  assert _cache_name(source) == _cache_name(source)


def test_the_cache_file_is_named_by_the_devices_flags_precision_and_cpu(source, monkeypatch):
  # Each can change the order of the features' sums, hence their last bits.
  names = {_cache_name(source), _cache_name(source, devices=2)}
  monkeypatch.setenv('XLA_FLAGS',
                     os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_fast_math=false')
  names.add(_cache_name(source))
  monkeypatch.setattr(evaluation, '_cpu_model', lambda: 'another CPU')
  names.add(_cache_name(source))
  with jax.default_matmul_precision('float32'):
    names.add(_cache_name(source))
  assert len(names) == 5


def _modified_source(source, index, change):
  """`source` with the first pixel of image `index` replaced by change(pixel)."""
  def read(idx):
    images = source.get(idx).copy()
    at = np.asarray(idx) == index
    images[at, 0, 0, 0] = change(images[at, 0, 0, 0])
    return images
  return data.Source(read, source.num_examples, source.image_shape, name=source.name,
                     factors=source.factors, factor_names=source.factor_names)


def test_the_cache_is_not_used_for_other_images_weights_or_devices(
    tmp_path, config, model, source, inception_params, monkeypatch):
  rows = _counting_inception(monkeypatch)

  def evaluate(src=source, params=inception_params, devices=jax.devices()):
    del rows[:]
    results = evaluation.evaluate(config, model, src, out_dir=str(tmp_path), devices=devices,
                                  inception_params=params)
    return len(rows), results

  assert evaluate()[0] == 3
  assert evaluate()[0] == 2
  # One pixel of the last evaluated image, by one float32 step: a miss.
  one_step = _modified_source(source, N - 1, lambda v: np.nextafter(v, np.float32(0.5)))
  assert evaluate(one_step)[0] == 3
  # An image after the evaluated ones changes nothing.
  assert evaluate(_modified_source(source, N, lambda v: 1 - v))[0] == 2
  other_weights = inception.random_params(jax.random.PRNGKey(1))
  assert evaluate(params=other_weights)[0] == 3
  assert evaluate(devices=jax.devices()[:1])[0] == 3
  assert len(_cache_files()) == 4
  # Without FID nothing is written.
  config = test_api.tiny_config(**{'eval.fid': False})
  results = evaluation.evaluate(config, model, source, out_dir=str(tmp_path),
                                devices=jax.devices())
  assert 'fid_skipped' in results and len(_cache_files()) == 4


def test_a_damaged_cache_file_is_replaced_and_an_unwritable_cache_is_warned_about(
    tmp_path, config, model, source, inception_params, monkeypatch, caplog):
  rows = _counting_inception(monkeypatch)

  def evaluate(cfg=config):
    del rows[:]
    results = evaluation.evaluate(cfg, model, source, out_dir=str(tmp_path),
                                  devices=jax.devices(), inception_params=inception_params)
    return len(rows), results

  computed, want = evaluate()
  assert computed == 3
  [name] = _cache_files()
  path = os.path.join(evaluation.real_features_dir(), name)
  with open(path, 'r+b') as f:  # cut short
    f.truncate(os.path.getsize(path) // 2)
  with caplog.at_level(logging.WARNING):
    assert evaluate() == (3, want)
  assert f'the cached Inception features {path} cannot be read' in caplog.text
  with np.load(path) as z:  # replaced by a whole file
    assert z['tap_2048'].shape == (N, 2048)
  # A killed writer's temporary, 20 minutes old, goes at the next lookup.
  dead = f'{path}.tmp999999999.{"0" * 32}'
  Path(dead).write_bytes(b'x')
  os.utime(dead, (time.time() - 1200,) * 2)
  assert evaluate() == (2, want)
  assert not os.path.exists(dead)

  # Damage that np.load alone reads without a word or with an error of another kind: no
  # features. tap_2048's header length 0x76 made 0x66: np.load would read its values 16
  # bytes early, and stop before the member's end, where the zip's CRC is checked.
  whole = Path(path).read_bytes()
  flipped = bytearray(whole)
  flipped[whole.rindex(b'\x93NUMPY') + 8] ^= 0x10
  npy = io.BytesIO()
  np.save(npy, np.zeros((N, 64), np.float32))
  for damaged in (bytes(flipped), npy.getvalue()):
    Path(path).write_bytes(damaged)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert evaluation._read_real_features(path, N) is None  # pylint: disable=protected-access
    assert f'the cached Inception features {path} cannot be read' in caplog.text
  Path(path).write_bytes(whole)

  caplog.clear()
  blocked = tmp_path / 'a_file'
  blocked.write_text('')
  monkeypatch.setattr(evaluation, 'real_features_dir', lambda: str(blocked / 'features'))
  with caplog.at_level(logging.WARNING):
    assert evaluate() == (3, want)
  assert 'could not cache the Inception features of the images' in caplog.text

  # Switched off, a whole file is neither read nor written.
  monkeypatch.setattr(evaluation, 'real_features_dir', lambda: os.path.dirname(path))
  written = os.stat(path).st_mtime_ns
  assert evaluate(test_api.tiny_config(**{'eval.cache_real_features': False})) == (3, want)
  assert os.stat(path).st_mtime_ns == written and _cache_files() == [name]


def test_mig_over_fewer_images_than_the_split_pairs_each_code_with_its_factors(source):
  # eval.mig_num_images below the images already encoded: the first codes and the first
  # images' factors (no model call is needed for them).
  codes = np.random.default_rng(3).standard_normal((TINY_EVAL_SPLIT, 4))
  codes[:, 0] += source.factors[:, 1]  # the first dimension follows a factor
  ev = ml_collections.ConfigDict({'mig_num_images': 10})
  mig_results = evaluation._mig_results  # pylint: disable=protected-access
  got = mig_results(ev, None, source, codes, 8, TINY_EVAL_SPLIT, False)
  factors = source.factors[:10]
  assert got['mig_num_images'] == 10
  assert got['mig'] == pytest.approx(metrics.mig(codes[:10], factors), abs=1e-12)
  assert got['mig'] != pytest.approx(metrics.mig(codes[:10], source.factors[-10:]))


def test_mig_and_traversal_dims_use_the_posterior_means(evaluated, model, source):
  results, out_dir = evaluated
  x = source.get(np.arange(TINY_EVAL_SPLIT))
  mu, logvar = (np.asarray(a, np.float64) for a in model.encode(x))
  # The MIG estimators themselves are tested in test_metrics.py; this checks what they are
  # given: the codes of the whole eval split (N from the main pass, the rest encoded after).
  factors = source.factors[:TINY_EVAL_SPLIT]
  assert results['mig'] == pytest.approx(metrics.mig(mu, factors), abs=1e-9)
  assert results['mig_shuffled'] == pytest.approx(metrics.shuffled_mig(mu, factors), abs=1e-9)
  mu, logvar = mu[:N], logvar[:N]
  kl = np.mean(0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar), axis=0)
  np.testing.assert_allclose(results['kl_mean'], kl.sum(), rtol=1e-4)
  with open(os.path.join(out_dir, 'table.md')) as f:
    table = f.read()
  shown = re.search(r'latent dimensions \[([\d, ]+)\]', table).group(1)
  assert [int(d) for d in shown.split(',')] == list(np.argsort(-kl)[:2])


def test_samples_follow_the_seed_and_traversals_take_every_dim_by_kl(tmp_path, model, source):
  config = test_api.tiny_config(**{'seed': 5, 'eval.traversal_dims': 4})
  results = evaluation.evaluate(config, model, source, out_dir=str(tmp_path),
                                devices=jax.devices()[:1])
  # The samples' codes are drawn from config.seed (as in
  # test_image_metrics_against_independent_computation, which runs seed 0).
  key = jax.random.fold_in(jax.random.PRNGKey(5), evaluation._SAMPLE_KEY)
  z = jax.random.normal(key, (max(N, GRID * GRID), model.latent_dim), np.float32)[:N]
  samples = _laplacian_variance(model.decode(z))
  np.testing.assert_allclose(results['sample_sharpness_mean'], samples.mean(), rtol=1e-4)
  # All 4 dimensions, largest average KL first: not in index order for this model.
  mu, logvar = (np.asarray(a, np.float64) for a in model.encode(source.get(np.arange(N))))
  kl = np.mean(0.5 * (mu ** 2 + np.exp(logvar) - 1 - logvar), axis=0)
  by_kl = [int(d) for d in np.argsort(-kl)]
  assert by_kl != sorted(by_kl), 'the tiny model no longer tells the two orders apart'
  with open(tmp_path / 'table.md') as f:
    shown = re.search(r'latent dimensions \[([\d, ]+)\]', f.read()).group(1)
  assert [int(d) for d in shown.split(',')] == by_kl


def _png_size(path):
  with Image.open(path) as im:
    return im.size[1], im.size[0]  # (height, width)


def test_figures_have_the_expected_grids(evaluated):
  _, out_dir = evaluated
  cell = SIDE + 1  # one pixel of padding between and around the cells

  def side(cells):
    return cells * cell + 1
  # Reconstructions: the 6 images in rows of GRID, each row of inputs above its
  # reconstructions: 2 pairs of rows.
  assert _png_size(os.path.join(out_dir, 'reconstructions.png')) == (side(4), side(GRID))
  assert _png_size(os.path.join(out_dir, 'samples.png')) == (side(GRID), side(GRID))
  # Interpolations: 3 pairs of images, GRID steps plus the two images at the ends.
  assert _png_size(os.path.join(out_dir, 'interpolations.png')) == (side(3), side(GRID + 2))
  # Traversals: eval.traversal_dims = 2 rows of GRID values.
  assert _png_size(os.path.join(out_dir, 'traversals.png')) == (side(2), side(GRID))


def test_traversal_rows_sweep_one_dimension_over_the_whole_range(evaluated, model, source,
                                                                 config):
  # Each row: the first image's posterior mean with one dimension set to GRID values
  # from -traversal_range to +traversal_range, decoded; built here from encode and decode.
  _, out_dir = evaluated
  with open(os.path.join(out_dir, 'table.md')) as f:
    shown = re.search(r'latent dimensions \[([\d, ]+)\]', f.read()).group(1)
  dims = [int(d) for d in shown.split(',')]
  mu = np.asarray(model.encode(source.get(np.arange(1)))[0], np.float32)
  r = float(config.eval.traversal_range)
  grid = np.asarray(Image.open(os.path.join(out_dir, 'traversals.png')))
  grid = grid.reshape(grid.shape[:2] + (-1,))
  for row, d in enumerate(dims):
    codes = np.repeat(mu, GRID, axis=0)
    codes[:, d] = np.linspace(-r, r, GRID)
    expected = np.round(np.clip(np.asarray(model.decode(codes)), 0, 1) * 255)
    for col in range(GRID):
      top, left = 1 + row * (SIDE + 1), 1 + col * (SIDE + 1)
      tile = grid[top:top + SIDE, left:left + SIDE].astype(np.float64)
      np.testing.assert_allclose(tile, expected[col], atol=1)


def test_table_is_laid_out_like_table_iii(evaluated):
  results, out_dir = evaluated
  with open(os.path.join(out_dir, 'table.md')) as f:
    table = f.read()
  assert '| Metric | Ground Truth | VAE |' in table
  rows = {line.split('|')[1].strip(): [c.strip() for c in line.split('|')[2:4]]
          for line in table.splitlines() if line.startswith('| ') and '---' not in line}
  assert rows['Cosine similarity'] == ['1', f'{results["rec_cosine_similarity"]:.6g}']
  assert rows['Mean Squared Error'] == ['0', f'{results["rec_mse"]:.6g}']
  def mean_std(name):
    return f'{results[name + "_mean"]:.6g} ± {results[name + "_std"]:.4g}'
  assert rows['Sharpness (Laplace)'] == [mean_std('gt_sharpness'), mean_std('rec_sharpness')]
  assert rows['Sharpness of random samples (Laplace)'] == ['-', mean_std('sample_sharpness')]
  for d, name in [(64, 'first max pooling'), (192, 'second max pooling'),
                  (768, 'pre-aux classifier'), (2048, 'final average pooling')]:
    assert rows[f'FID - {name} (d={d})'] == ['-', f'{results[f"fid_rec_{d}"]:.6g}']
    assert rows[f'FID of random samples - {name} (d={d})'][1] == \
        f'{results[f"fid_sample_{d}"]:.6g}'
  # MIG, and the shuffled codes' score beside it in the text (two different numbers).
  assert results['mig'] != results['mig_shuffled']
  assert rows['MIG (posterior means vs ground-truth factors)'] == ['-', f'{results["mig"]:.6g}']
  assert f'score {results["mig_shuffled"]:.6g}' in table
  assert f'FID: {N} real images' in table


@pytest.mark.parametrize('change, reason', [
    ({'eval.inception_weights': '/nonexistent/inception_fid.npz'},
     'python -m avae_jax.inception fetch'),
    ({'eval.fid': False}, 'config.eval.fid is False'),
    # A directory: not the advice for a missing file, which would convert onto it.
    ({'eval.inception_weights': os.sep},
     f'FID Inception weights: {os.sep} is a directory; name the weights file, e.g. '
     f'{os.sep}inception_fid.npz, which `python -m avae_jax.inception fetch --cache {os.sep}` '
     'writes'),
])
def test_fid_is_skipped_with_the_reason(tmp_path, model, source, change, reason, capsys):
  config = test_api.tiny_config(**{'eval.fid': True, **change})
  writer = summary.SummaryWriter(str(tmp_path / 'tb'))
  results = evaluation.evaluate(config, model, source, out_dir=str(tmp_path / 'eval'),
                                devices=jax.devices(), writer=writer)
  writer.close()
  assert reason in results['fid_skipped']
  if change.get('eval.inception_weights') == os.sep:
    assert results['fid_skipped'] == reason
  elif change.get('eval.inception_weights'):  # said once
    assert results['fid_skipped'].startswith(
        'FID Inception weights not found: /nonexistent/inception_fid.npz\n')
  # The stages that run are announced; no FID stage, and no Inception network to compile.
  printed = capsys.readouterr().out
  loads = int(config.eval.fid)  # 1: the weights are looked for (and not found)
  _assert_in_order(printed, ['eval: loading the Inception weights ...\n'] * loads + [
      'eval: FID skipped: ', 'eval: compiling the model ...\n', 'eval: random samples',
      f'eval: MIG over {TINY_EVAL_SPLIT} images ...\n', 'eval: figures ...\n'])
  assert ('loading the Inception weights' in printed) == bool(loads)
  assert 'FID statistics' not in printed
  assert set(results) == (ALL_KEYS - FID_KEYS) | {'fid_skipped'}
  with open(tmp_path / 'eval' / 'table.md') as f:
    table = f.read()
  assert '| FID - final average pooling (d=2048) | - | skipped |' in table
  assert reason in table
  # The figures, the table and the scalars also went to TensorBoard.
  acc = event_accumulator.EventAccumulator(str(tmp_path / 'tb'), size_guidance={'images': 0})
  acc.Reload()
  tags = acc.Tags()
  assert {f'eval/{name}' for name in evaluation.FIGURES} <= set(tags['images'])
  assert 'eval/rec_mse' in tags['scalars']
  assert acc.Scalars('eval/rec_mse')[0].step == test_api.TRAINED_STEPS
  # The integer counts too; not the step, which is every scalar's own step.
  assert acc.Scalars('eval/num_images')[0].value == N
  assert acc.Scalars('eval/mig_num_images')[0].value == TINY_EVAL_SPLIT
  assert 'eval/step' not in tags['scalars']


@pytest.mark.parametrize('num_images', [0, TINY_EVAL_SPLIT, 40])
def test_num_images_0_or_more_than_the_split_takes_the_whole_split(tmp_path, model, source,
                                                                   num_images, capsys):
  config = test_api.tiny_config(**{'eval.num_images': num_images})
  results = evaluation.evaluate(config, model, source, out_dir=str(tmp_path),
                                devices=jax.devices())
  assert results['num_images'] == source.num_examples == TINY_EVAL_SPLIT
  # More than the split: said (FID is comparable only at equal counts), not silent.
  assert (f'eval: eval.num_images={num_images} is more than the eval split has: using its '
          f'{TINY_EVAL_SPLIT} images\n' in capsys.readouterr().out) == (
              num_images > TINY_EVAL_SPLIT)
  x = source.get(np.arange(TINY_EVAL_SPLIT))
  mse = np.mean((np.asarray(model.decode(model.encode(x)[0]), np.float64) - x) ** 2,
                axis=(1, 2, 3))
  np.testing.assert_allclose(results['rec_mse'], mse.mean(), rtol=1e-4)


def test_a_figure_not_made_again_does_not_stay_behind(tmp_path, model, source):
  # With no traversal dims the traversals.png of an earlier evaluation stayed beside a
  # table that lists none.
  for dims, expected in ((2, True), (0, False)):
    config = test_api.tiny_config(**{'eval.traversal_dims': dims})
    evaluation.evaluate(config, model, source, out_dir=str(tmp_path), devices=jax.devices())
    assert os.path.exists(tmp_path / 'traversals.png') == expected
    assert os.path.exists(tmp_path / 'samples.png')
    assert ('Traversals: latent dimensions' in (tmp_path / 'table.md').read_text()) == expected


def test_the_numbers_are_written_before_a_figure_that_fails(tmp_path):
  # A figure that could not be written (a directory in its place) lost metrics.json too.
  (tmp_path / 'samples.png' / 'x').mkdir(parents=True)
  figures = {'samples': np.zeros((4, 4, 1), np.uint8)}
  with pytest.raises(OSError):
    evaluation._write_outputs(str(tmp_path), {'step': 3, 'mse': 0.5}, figures, '| t |', None)
  assert json.loads((tmp_path / 'metrics.json').read_text()) == {'step': 3, 'mse': 0.5}
  assert (tmp_path / 'table.md').read_text() == '| t |'


def test_a_gs_out_dir_gets_every_file(fake_bucket, model, source):
  # eval.py on a gs:// workdir writes its outputs there, none to the local disk.
  config = test_api.tiny_config(**{'eval.fid': False})
  evaluation.evaluate(config, model, source, out_dir='gs://bucket/run/eval',
                      devices=jax.devices())
  out = fake_bucket / 'bucket' / 'run' / 'eval'
  assert sorted(os.listdir(out)) == sorted(
      ['metrics.json', 'table.md'] + [f'{name}.png' for name in evaluation.FIGURES])
  assert json.loads((out / 'metrics.json').read_text())['step'] == test_api.TRAINED_STEPS
  assert os.listdir('.') == []


def test_training_run_wrote_the_same_final_metrics(workdir, model, source):
  # The trainer evaluated its in-memory state; the restored checkpoint must agree.
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  assert set(final) == (ALL_KEYS - FID_KEYS) | {'fid_skipped'}
  for name in evaluation.FIGURES:
    assert os.path.exists(os.path.join(workdir, 'eval', f'{name}.png'))
  x = source.get(np.arange(N))
  x_rec = np.asarray(model.reconstruct(x), np.float64)
  np.testing.assert_allclose(final['rec_mse'], ((x - x_rec) ** 2).mean(), rtol=1e-4)


def test_fid_weights_in_the_cache_are_read_with_the_default_empty_setting(
    tmp_path, evaluated, model, source, inception_params, monkeypatch):
  # eval.inception_weights = '' (the default config's) names the cache's file: FID runs on
  # the weights found there, without them being passed in.
  monkeypatch.setenv('AVAE_JAX_CACHE', str(tmp_path / 'cache'))
  path = tmp_path / 'cache' / 'inception_fid.npz'
  inception.save_npz(inception_params, str(path))
  config = test_api.tiny_config(**{'eval.fid': True, 'eval.inception_weights': ''})
  assert evaluation.fid_weights_problem(config) is None
  results = evaluation.evaluate(config, model, source, out_dir=str(tmp_path / 'eval'),
                                devices=jax.devices())
  assert 'fid_skipped' not in results and FID_KEYS <= set(results)
  for k in sorted(FID_KEYS):  # the same weights as the module's evaluation was given
    np.testing.assert_allclose(results[k], evaluated[0][k], rtol=1e-4)
  path.unlink()
  assert evaluation.fid_weights_problem(config).startswith(
      f'FID Inception weights not found: {path}\n')


def test_missing_fid_weights_are_no_problem_when_fid_is_off(tmp_path):
  weights = str(tmp_path / 'nonexistent' / 'inception_fid.npz')
  config = test_api.tiny_config(**{'eval.fid': False, 'eval.inception_weights': weights})
  assert evaluation.fid_weights_problem(config) is None
  config = test_api.tiny_config(**{'eval.fid': True, 'eval.inception_weights': weights})
  assert evaluation.fid_weights_problem(config) == inception.weights_problem(weights)
  assert inception.weights_problem(weights).startswith(
      f'FID Inception weights not found: {weights}\nWrite them there with\n')


def test_a_damaged_weights_file_skips_fid_with_the_reason(tmp_path, model, source, capsys):
  # A finished training run must not lose its evaluation over a weights file it cannot read.
  weights = tmp_path / 'inception_fid.npz'
  weights.write_bytes(b'not a zip archive')
  config = test_api.tiny_config(**{'eval.fid': True, 'eval.inception_weights': str(weights)})
  assert evaluation.fid_weights_problem(config) is None  # there, only unreadable
  results = evaluation.evaluate(config, model, source, out_dir=str(tmp_path / 'eval'),
                                devices=jax.devices())
  assert results['fid_skipped'].startswith('FID Inception weights unavailable: ')
  assert 'not an .npz of FID Inception weights' in results['fid_skipped']
  assert set(results) == (ALL_KEYS - FID_KEYS) | {'fid_skipped'}
  assert 'eval: FID skipped: FID Inception weights unavailable' in capsys.readouterr().out


def test_an_eval_split_of_one_image_is_refused(tmp_path, model, source):
  one = data.Source(source.get, 1, source.image_shape, name=source.name,
                    factors=source.factors[:1], factor_names=source.factor_names)
  for src, num_images in ((one, 0), (one, 6), (source, 1)):
    config = test_api.tiny_config(**{'eval.num_images': num_images})
    with pytest.raises(data.DataError, match='at least 2'):
      evaluation.evaluate(config, model, src, out_dir=str(tmp_path), devices=jax.devices())
  assert not os.listdir(tmp_path)


def _tile(grid, row, col):
  """The SIDE x SIDE cell (row, col) of a figure (one pixel of padding around cells)."""
  top, left = 1 + row * (SIDE + 1), 1 + col * (SIDE + 1)
  return grid[top:top + SIDE, left:left + SIDE].astype(np.float64)


def test_figures_show_the_first_images_of_every_batch(tmp_path, model, source, capsys):
  # 16 images in batches of 2 on one device: the figures take their images from the first
  # batches, not the first batch alone.
  config = test_api.tiny_config(**{'eval.num_images': TINY_EVAL_SPLIT, 'eval.batch_size': 2})
  evaluation.evaluate(config, model, source, out_dir=str(tmp_path), devices=jax.devices()[:1])
  # Exactly the split's size: no note that it is more.
  assert 'more than the eval split has' not in capsys.readouterr().out
  x = source.get(np.arange(TINY_EVAL_SPLIT)).astype(np.float64)
  mu = np.asarray(model.encode(x.astype(np.float32))[0], np.float32)

  def expected(images):
    return np.round(np.clip(np.asarray(images, np.float64), 0, 1) * 255)

  def figure(name):
    with Image.open(tmp_path / f'{name}.png') as im:
      a = np.asarray(im)
    return a.reshape(a.shape[:2] + (-1,))

  def side(cells):
    return cells * (SIDE + 1) + 1
  # Reconstructions: GRID * (GRID // 2) = 8 images, rows of GRID, each row of inputs above
  # their reconstructions: 2 pairs of rows, 4 rows of cells.
  rec = figure('reconstructions')
  assert rec.shape[:2] == (side(4), side(GRID))
  x_rec = expected(model.decode(mu[:8]))
  for k in range(8):
    pair, col = divmod(k, GRID)
    np.testing.assert_allclose(_tile(rec, 2 * pair, col), expected(x[k]), atol=1)
    np.testing.assert_allclose(_tile(rec, 2 * pair + 1, col), x_rec[k], atol=1)
  # Interpolations: GRID pairs (images 0-1, 2-3, ...), each row image 2p, GRID decoded
  # steps from mu(2p) to mu(2p + 1), image 2p + 1.
  inter = figure('interpolations')
  assert inter.shape[:2] == (side(GRID), side(GRID + 2))
  t = np.linspace(0, 1, GRID, dtype=np.float32)[:, None]
  for p in range(GRID):
    np.testing.assert_allclose(_tile(inter, p, 0), expected(x[2 * p]), atol=1)
    np.testing.assert_allclose(_tile(inter, p, GRID + 1), expected(x[2 * p + 1]), atol=1)
    steps = expected(model.decode((1 - t) * mu[2 * p] + t * mu[2 * p + 1]))
    for s in range(GRID):
      np.testing.assert_allclose(_tile(inter, p, 1 + s), steps[s], atol=1)
  # Samples: GRID x GRID.
  assert figure('samples').shape[:2] == (side(GRID), side(GRID))


def test_cached_features_of_another_shape_or_dtype_are_recomputed_and_a_hit_not_rewritten(
    tmp_path, evaluated, config, model, source, inception_params, monkeypatch, caplog):
  rows = _counting_inception(monkeypatch)

  def evaluate():
    del rows[:]
    results = evaluation.evaluate(config, model, source, out_dir=str(tmp_path),
                                  devices=jax.devices(), inception_params=inception_params)
    return len(rows), results

  want = evaluated[0]
  assert evaluate() == (3, want)
  [name] = _cache_files()
  path = os.path.join(evaluation.real_features_dir(), name)
  with np.load(path) as z:
    taps = {d: z[f'tap_{d}'] for d in TAPS}
  # Whole, readable archives of the wrong content: fewer rows, or float16 values.
  for wrong in ({d: t[:-1] for d, t in taps.items()},
                {d: t.astype(np.float16) for d, t in taps.items()}):
    np.savez(path, **{f'tap_{d}': t for d, t in wrong.items()})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert evaluate() == (3, want)
    assert f'the cached Inception features {path} cannot be read' in caplog.text
    with np.load(path) as z:  # replaced by the computed features
      assert z['tap_2048'].shape == (N, 2048) and z['tap_2048'].dtype == np.float32
  # A hit reads the file and leaves it as it is.
  os.utime(path, ns=(10 ** 18,) * 2)
  before = os.stat(path)
  assert evaluate() == (2, want)
  after = os.stat(path)
  assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
