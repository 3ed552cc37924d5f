"""Tests of avae_jax.data: image geometry, folder/arrays/tfds sources, batching.

Reference values come from numpy slicing, hand-derived resampling of linear ramps, and
numpy's own seeded permutations; tfds is exercised through tfds.testing.mock_data.
"""

import errno
import gzip
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from avae_jax import data
from avae_jax import files
from avae_jax import shapes
from configs import default

LUMA = np.array([0.299, 0.587, 0.114])


def _close(actual, expected):
  """Equal up to float32 rounding (x / 255 and x * (1 / 255) differ in the last bit)."""
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def _config(**kw):
  c = default.get_config()
  c.image_size, c.channels, c.crop_size = 16, 3, 0
  c.update(kw)
  return c


@pytest.fixture(autouse=True)
def _no_env_cache(monkeypatch, tmp_path_factory):
  # Keep the tfds cache inside each test's data_dir, and the fallback ~/.cache/avae_jax in
  # a home of the test's own: a cache the user's runs (or an earlier test) left there
  # would serve a test's dataset instead of its data_dir.
  monkeypatch.delenv('AVAE_JAX_CACHE', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path_factory.mktemp('home')))


# --------------------------------------------------------------------------- geometry


def test_crop_box_is_centred():
  assert data.crop_box(218, 178, 140) == (39, 19, 140)
  # Odd margins round down: (219 - 140) // 2 = 39 rows above, (31 - 20) // 2 = 5.
  assert data.crop_box(219, 178, 140) == (39, 19, 140)
  assert data.crop_box(31, 50, 20) == (5, 15, 20)
  assert data.crop_box(218, 178, 0) == (20, 0, 178)
  with pytest.raises(data.DataError, match='crop_size'):
    data.crop_box(28, 28, 30)


def test_resize_keeps_linear_ramps():
  # A triangle filter is symmetric and sums to one, so a linear ramp is reproduced
  # exactly away from the borders: out[j] = ramp at input x = (j + 0.5) * in / out - 0.5.
  for n_in, n_out in ((64, 32), (28, 32), (48, 16)):
    x = np.arange(n_in, dtype=np.float32) / (n_in - 1)
    img = np.broadcast_to(x[None, :, None], (n_in, n_in, 1)).copy()
    out = data.resize(img, n_out)
    assert out.shape == (n_out, n_out, 1) and out.dtype == np.float32
    j = np.arange(n_out)
    expected = ((j + 0.5) * n_in / n_out - 0.5) / (n_in - 1)
    inner = slice(3, n_out - 3)
    np.testing.assert_allclose(out[5, inner, 0], expected[inner], atol=1e-5)
    out8 = data.resize(np.round(img * 255).astype(np.uint8), n_out)
    assert out8.dtype == np.uint8
    np.testing.assert_allclose(out8[5, inner, 0] / 255.0, expected[inner], atol=1.5 / 255)


def test_resize_is_antialiased():
  # One-pixel stripes shrunk 4x: an antialiased filter averages them to 1/2; point
  # sampling (aliasing) would give 0 or 1.
  stripes = np.tile(np.array([0.0, 1.0], np.float32), 32)[None, :, None]
  img = np.broadcast_to(stripes, (64, 64, 1)).copy()
  out = data.resize(img, 16)
  np.testing.assert_allclose(out[4:-4, 4:-4], 0.5, atol=0.02)


def test_convert_channels():
  rgb = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(data.convert_channels(rgb, 1)[..., 0], rgb @ LUMA, atol=1e-6)
  gray = rgb[..., :1]
  np.testing.assert_array_equal(data.convert_channels(gray, 3), np.repeat(gray, 3, -1))
  with pytest.raises(data.DataError, match='channels'):
    data.convert_channels(np.zeros((1, 4, 4, 2), np.float32), 3)
  # An RGBA array given to preprocess is refused as such, not converted.
  with pytest.raises(data.DataError, match=r'bad image channels: shape \(8, 8, 4\)'):
    data.preprocess(np.zeros((8, 8, 4), np.uint8), image_size=8, crop_size=0, channels=3)


# --------------------------------------------------------------------------- folder


def _write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_folder_constant_colours_sorted_and_split(tmp_path):
  colours = [(10 * i, 255 - 20 * i, 7 * i) for i in range(10)]
  for i, c in enumerate(colours):
    # Different sizes and aspect ratios; the names sort in index order.
    img = np.broadcast_to(np.array(c, np.uint8), (40 + i, 30 + 2 * i, 3))
    _write_png(str(tmp_path / 'faces' / f'{i:03d}.png'), np.ascontiguousarray(img))
  (tmp_path / 'faces' / 'notes.txt').write_text('not an image')
  cfg = _config(dataset=f'folder:{tmp_path / "faces"}', eval_fraction=0.2)
  train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
  assert train.num_examples == 8 and ev.num_examples == 2
  x = train.get(np.arange(8))
  assert x.shape == (8, 16, 16, 3) and x.dtype == np.float32
  np.testing.assert_allclose(x, np.array(colours[:8])[:, None, None, :] / 255.0
                             * np.ones((8, 16, 16, 3)), atol=1e-6)
  np.testing.assert_allclose(ev.get([1, 0])[:, 0, 0], np.array(colours[:7:-1]) / 255.0,
                             atol=1e-6)


def _folder_of_values(root, names):
  """One gray 16x16 PNG per relative name, each of value 10 * (its index + 1)."""
  for i, name in enumerate(names):
    _write_png(str(root / name), np.full((16, 16), 10 * (i + 1), np.uint8))
  return {name: 10 * (i + 1) for i, name in enumerate(names)}


def _values(source):
  """The value of each of a source's images, in its order."""
  return [int(round(v * 255)) for v in source.get(np.arange(len(source)))[:, 0, 0, 0]]


def test_folder_directories_named_as_splits_are_the_splits(tmp_path, caplog):
  names = ['test/cat/0.png', 'test/dog/1.png', 'test/dog/2.png', 'train/cat/3.png',
           'train/dog/4.png', 'train/dog/5.png', 'train/dog/6.png']
  value = _folder_of_values(tmp_path / 'pets', names)
  cfg = _config(dataset=f'folder:{tmp_path / "pets"}', channels=1, eval_fraction=0.5)
  train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
  # eval_fraction does not apply; train in name order.
  assert _values(train) == [value[n] for n in names[3:]]
  # The eval images span two directories: in a fixed random order (seed 0).
  order = np.random.default_rng(0).permutation(3)
  assert _values(ev) == [value[names[i]] for i in order]
  # A top-level directory's whole name counts (Val/ too), not a word of a class's name
  # (test_tube/) nor a directory below another (a/val/), nor the folder's own name.
  names = ['Val/0.png', 'a/val/1.png', 'test_tube/2.png']
  value = _folder_of_values(tmp_path / 'val_set', names)
  cfg = _config(dataset=f'folder:{tmp_path / "val_set"}', channels=1, eval_fraction=0.5)
  assert _values(data.load(cfg, 'eval')) == [value['Val/0.png']]
  assert _values(data.load(cfg, 'train')) == [value[n] for n in names[1:]]
  # Every image below test/: no train split by name, so eval is held out as without one
  # (the last half of one directory's files), and the log warns that test images train.
  names = [f'test/{i}.png' for i in range(4)]
  value = _folder_of_values(tmp_path / 'only_test', names)
  cfg = _config(dataset=f'folder:{tmp_path / "only_test"}', channels=1, eval_fraction=0.5)
  assert _values(data.load(cfg, 'eval')) == [value[n] for n in names[2:]]
  caplog.set_level(logging.INFO, logger='absl')
  caplog.clear()
  assert _values(data.load(cfg, 'train')) == [value[n] for n in names[:2]]
  assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
      (logging.WARNING, f'folder {tmp_path / "only_test"}: every image is below a directory '
       'named as an eval split, so the model trains on them and the eval split is held out '
       '(the last files, eval_fraction)')]
  # An eval split of one directory keeps its files' name order.
  names = [f'test/{i}.png' for i in range(5)] + ['train/5.png']
  value = _folder_of_values(tmp_path / 'one_test_dir', names)
  cfg = _config(dataset=f'folder:{tmp_path / "one_test_dir"}', channels=1)
  assert _values(data.load(cfg, 'eval')) == [value[n] for n in names[:5]]


def test_folder_of_several_directories_holds_out_a_random_fraction(tmp_path):
  # One directory per class: the last files would all be of the last class.
  names = [f'{c}/{i}.png' for c in ('cat', 'dog') for i in range(6)]
  value = _folder_of_values(tmp_path / 'pets', names)
  cfg = _config(dataset=f'folder:{tmp_path / "pets"}', channels=1, eval_fraction=0.25)
  train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
  perm = np.random.default_rng(0).permutation(12)  # the documented choice: seed 0
  assert _values(ev) == [value[names[i]] for i in perm[:3]]
  assert _values(train) == [value[names[i]] for i in sorted(perm[3:])]
  assert {names[i].split('/')[0] for i in perm[:3]} == {'cat', 'dog'}


def test_folder_centre_crop_pattern_and_recursion(tmp_path):
  rows, cols = np.meshgrid(np.arange(30), np.arange(50), indexing='ij')
  pattern = np.stack([rows * 8, cols * 5, (rows + cols) % 256], -1).astype(np.uint8)
  _write_png(str(tmp_path / 'imgs' / 'b' / 'x.png'), pattern)
  _write_png(str(tmp_path / 'imgs' / 'a.png'), pattern[::-1].copy())
  cfg = _config(dataset=f'folder:{tmp_path / "imgs"}', eval_fraction=0.0,
                crop_size=20, image_size=20)
  src = data.load(cfg)
  assert src.num_examples == 2  # a.png, then b/x.png
  got = src.get([1, 0])
  _close(got[0], pattern[5:25, 15:35] / np.float32(255))
  _close(got[1], pattern[::-1][5:25, 15:35] / np.float32(255))
  # crop_size 0: the largest centred square (30 x 30, columns 10..39).
  src = data.load(_config(dataset=cfg.dataset, eval_fraction=0.0, image_size=30))
  _close(src.get([1])[0], pattern[:, 10:40] / np.float32(255))


def test_folder_channel_conversion(tmp_path):
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
  gray = rng.integers(0, 256, (16, 16)).astype(np.uint8)
  _write_png(str(tmp_path / 'd' / '0.png'), rgb)
  _write_png(str(tmp_path / 'd' / '1.png'), gray)
  spec = f'folder:{tmp_path / "d"}'
  one = data.load(_config(dataset=spec, channels=1, eval_fraction=0.0)).get([0, 1])
  # The luma is stored as bytes, as every decoded cache stores its images: k / 255 with
  # k within half a level of 255 * luma.
  levels = one[0, ..., 0].astype(np.float64) * 255
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert np.abs(levels - rgb @ LUMA).max() <= 0.5 + 1e-4
  assert np.abs(levels - rgb @ LUMA).max() > 0.3  # rounded, not the float luma
  np.testing.assert_allclose(one[1, ..., 0], gray / 255.0, atol=1e-6)
  # Decoded at each batch instead of cached, the same bits.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(data, '_folder_cached', lambda *args: None)
    lazy = data.load(_config(dataset=spec, channels=1, eval_fraction=0.0)).get([0, 1])
  np.testing.assert_array_equal(lazy, one)
  three = data.load(_config(dataset=spec, channels=3, eval_fraction=0.0)).get([1])
  np.testing.assert_allclose(three[0], np.repeat(gray[..., None], 3, -1) / 255.0, atol=1e-6)


def test_sixteen_bit_gray_pngs_are_scaled_to_bytes(tmp_path):
  # round(a / 65535 * 255); none a multiple of 257, which a wrong scale would wrap back.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # 33025 / 65535 * 255 = 128.502 rounds up (by 65536 it would be 128.498: down).
  a = np.array([[0, 1000], [30000, 65535], [33025, 33024]], np.uint16)
  Image.fromarray(a).save(tmp_path / 'deep.png')
  with Image.open(tmp_path / 'deep.png') as im:
    assert im.mode.startswith('I;16') or im.mode == 'I', im.mode
  np.testing.assert_array_equal(data.read_image(str(tmp_path / 'deep.png'))[..., 0],
                                [[0, 4], [117, 255], [129, 128]])


def test_palette_images_are_read_as_their_rgb_colours(tmp_path):
  # A GIF or an indexed PNG (PIL mode P): each pixel is its palette entry's colour.
  palette = [255, 0, 0, 0, 128, 255, 10, 20, 30]
  index = np.array([[0, 1], [2, 1]], np.uint8)
  im = Image.new('P', (2, 2))
  im.putpalette(palette)
  im.putdata(index.reshape(-1).tolist())
  im.save(tmp_path / 'indexed.png')
  with Image.open(tmp_path / 'indexed.png') as back:
    assert back.mode == 'P'
  colours = np.array(palette, np.uint8).reshape(3, 3)
  np.testing.assert_array_equal(data.read_image(str(tmp_path / 'indexed.png')), colours[index])


def test_a_cameras_exif_orientation_is_applied(tmp_path):
  # Stored 2 wide and 3 tall with orientation 6: a viewer turns it 90° clockwise, so the
  # stored first column (top to bottom 10, 20, 30) becomes the shown first row, right to
  # left.
  stored = np.array([[10, 40], [20, 50], [30, 60]], np.uint8)
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(stored).save(tmp_path / 'turned.png', exif=exif)
  np.testing.assert_array_equal(data.read_image(str(tmp_path / 'turned.png'))[..., 0],
                                [[30, 20, 10], [60, 50, 40]])
  Image.fromarray(stored).save(tmp_path / 'upright.png')  # no EXIF: as stored
  np.testing.assert_array_equal(data.read_image(str(tmp_path / 'upright.png'))[..., 0],
                                stored)
  # A damaged EXIF block (PIL's getexif raises SyntaxError): shown as stored, as viewers do.
  Image.fromarray(stored).save(tmp_path / 'damaged.png', exif=b'garbage!')
  with Image.open(tmp_path / 'damaged.png') as im, pytest.raises(SyntaxError):
    im.getexif()
  np.testing.assert_array_equal(data.read_image(str(tmp_path / 'damaged.png'))[..., 0],
                                stored)


def test_an_image_past_pils_size_guard_is_a_data_error(tmp_path, monkeypatch):
  _write_png(str(tmp_path / 'big.png'), np.zeros((20, 20), np.uint8))
  # PIL refuses images over twice MAX_IMAGE_PIXELS (a decompression bomb) with an error
  # that is neither an OSError nor a ValueError.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 100)
  with pytest.raises(data.DataError, match=r'cannot read image .*big\.png: Image size'):
    data.read_image(str(tmp_path / 'big.png'))


def test_hidden_files_are_not_images(tmp_path):
  # macOS leaves '._name.png' resource forks beside the images: not PNGs at all.
  _write_png(str(tmp_path / 'd' / 'a.png'), np.full((16, 16), 100, np.uint8))
  (tmp_path / 'd' / '._a.png').write_bytes(b'\x00\x05\x16\x07 not an image')
  assert data._list_images(str(tmp_path / 'd')) == [str(tmp_path / 'd' / 'a.png')]
  src = data.load(_config(dataset=f'folder:{tmp_path / "d"}', channels=1, eval_fraction=0.0))
  np.testing.assert_allclose(src.get([0])[0, ..., 0], 100 / 255.0, atol=1e-6)


def test_folder_lists_each_directory_once_through_symlinks(tmp_path):
  values = {'faces/a/0.png': 10, 'faces/b/1.png': 20, 'other/2.png': 30}
  for name, v in values.items():
    _write_png(str(tmp_path / name), np.full((16, 16), v, np.uint8))
  (tmp_path / 'faces' / 'a' / 'up').symlink_to('..')  # a loop back to faces/
  (tmp_path / 'faces' / 'b2').symlink_to('b')  # a second name for faces/b
  (tmp_path / 'faces' / 'more').symlink_to(tmp_path / 'other')  # images found by link
  src = data.load(_config(dataset=f'folder:{tmp_path / "faces"}', eval_fraction=0.0,
                          channels=1))
  # a/0.png, b/1.png, more/2.png: each image file once, in relative path order.
  assert src.num_examples == 3
  _close(src.get(np.arange(3))[:, 0, 0, 0], np.array([10, 20, 30]) / np.float32(255))
  assert [os.path.relpath(f, tmp_path / 'faces') for f in src.files] == [
      'a/0.png', 'b/1.png', 'more/2.png']


def test_folder_errors(tmp_path, monkeypatch):
  with pytest.raises(data.DataError, match='does not exist'):
    data.load(_config(dataset=f'folder:{tmp_path / "missing"}'))
  # A file was said not to exist.
  (tmp_path / 'images.npy').write_bytes(b'')
  with pytest.raises(data.DataError, match='is a file, not a directory.*arrays:PATH'):
    data.load(_config(dataset=f'folder:{tmp_path / "images.npy"}'))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'readme.txt').write_text('x')
  with pytest.raises(data.DataError, match='no .*files'):
    data.load(_config(dataset=f'folder:{tmp_path / "empty"}'))
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'broken.png').write_bytes(b'not a png at all')
  with pytest.raises(data.DataError, match='cannot read image'):
    data.load(_config(dataset=f'folder:{tmp_path / "bad"}'))
  # An image smaller than crop_size, among larger ones, is named: when the folder is
  # decoded into its cache, and by a batch that holds it where it is decoded at each batch.
  _write_png(str(tmp_path / 'mixed' / 'a.png'), np.zeros((40, 40, 3), np.uint8))
  _write_png(str(tmp_path / 'mixed' / 'b.png'), np.zeros((30, 12, 3), np.uint8))
  config = _config(dataset=f'folder:{tmp_path / "mixed"}', eval_fraction=0.0, crop_size=20)
  small = tmp_path / 'mixed' / 'b.png'
  message = f'{small}: crop_size 20 is larger than the image (30x12)'
  with pytest.raises(data.DataError, match=f'1 image.*: {re.escape(message)}; choose'):
    data.load(config)
  monkeypatch.setattr(data, '_folder_cached', lambda *args: None)
  src = data.load(config)
  assert src.get([0]).shape == (1, 16, 16, 3)
  with pytest.raises(data.DataError, match=f'^{re.escape(message)}'):
    src.get([0, 1])


def _cache_files(directory):
  """The files in a cache directory, but the lock files of the caches' makers (kept)."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(n for n in names if not n.endswith('.lock'))


def _folder_cache_files():
  """The files in the folder caches' directory (the tests' own, tests/conftest.py)."""
  return _cache_files(data._folder_cache_dir())  # pylint: disable=protected-access


def test_a_folder_is_decoded_once_into_a_cache_that_gives_the_same_images(
    tmp_path, monkeypatch):
  rng = np.random.default_rng(3)
  for i in range(6):
    _write_png(str(tmp_path / 'faces' / f'{i}.{"jpg" if i % 2 else "png"}'),
               rng.integers(0, 256, (20 + i, 24, 3)).astype(np.uint8))
  config = _config(dataset=f'folder:{tmp_path / "faces"}', eval_fraction=0.35, crop_size=18)
  before = _folder_cache_files()
  train, ev = data.load_splits(config)
  added = sorted(set(_folder_cache_files()) - set(before))
  assert len(added) == 1 and added[0].startswith('folder-faces-'), added
  assert added[0].endswith('-16px-3ch-crop18-v1.npy'), added
  directory = data._folder_cache_dir()  # pylint: disable=protected-access
  cached = np.load(os.path.join(directory, added[0]))
  assert cached.shape == (6, 16, 16, 3) and cached.dtype == np.uint8
  # Each image as preprocess() gives it, by hand: the centre 18x18 crop, resized.
  names = sorted(os.listdir(tmp_path / 'faces'))
  want = np.stack([data.preprocess(np.asarray(Image.open(tmp_path / 'faces' / n)),
                                   image_size=16, crop_size=18, channels=3) for n in names])
  _close(train.get(np.arange(4)), want[:4])
  _close(ev.get(np.arange(2)), want[4:])
  # Loaded again, the images come from the cache: no image file is opened.
  monkeypatch.setattr(data, 'read_image', lambda path: pytest.fail(f'decoded {path}'))
  again = data.load(config, 'eval')
  np.testing.assert_array_equal(again.get([1, 0]), ev.get([1, 0]))
  assert again.files == ev.files == [str(tmp_path / 'faces' / n) for n in names[4:]]
  assert ev.subset(np.array([1, 0])).files == ev.files[::-1]
  assert _folder_cache_files() == sorted(before + added)
  monkeypatch.undo()
  # Decoded at each batch instead (no cache), the values are the same bits.
  monkeypatch.setattr(data, '_folder_cached', lambda *args: None)
  lazy = data.load(config, 'train')
  np.testing.assert_array_equal(lazy.get([3, 0, 2]), train.get([3, 0, 2]))


def test_a_changed_folder_gets_a_new_cache(tmp_path):
  folder = tmp_path / 'd'
  _write_png(str(folder / 'a.png'), np.full((16, 16), 40, np.uint8))
  _write_png(str(folder / 'b.png'), np.full((16, 16), 80, np.uint8))
  config = _config(dataset=f'folder:{folder}', channels=1, eval_fraction=0.0)
  before = set(_folder_cache_files())
  assert _values(data.load(config)) == [40, 80]
  # Rewritten in place with another value (and size): a new cache, the new value.
  _write_png(str(folder / 'b.png'), np.full((16, 16), 200, np.uint8))
  assert _values(data.load(config)) == [40, 200]
  # One image more: another cache again.
  _write_png(str(folder / 'c.png'), np.full((16, 16), 7, np.uint8))
  assert _values(data.load(config)) == [40, 200, 7]
  assert len(set(_folder_cache_files()) - before) == 3
  # Another folder of the same name, file names, sizes and times (another version of a
  # dataset, unpacked with its archive's times): its own cache, its own values. An
  # uncompressed BMP's size does not depend on its pixels.
  for version, value in (('v1', 30), ('v2', 200)):
    path = tmp_path / version / 'images' / 'a.bmp'
    path.parent.mkdir(parents=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)
    os.utime(path, ns=(10**18, 10**18))
  assert (tmp_path / 'v1/images/a.bmp').stat().st_size == (
      tmp_path / 'v2/images/a.bmp').stat().st_size
  for version, value in (('v1', 30), ('v2', 200)):
    other = _config(dataset=f'folder:{tmp_path / version / "images"}', channels=1,
                    eval_fraction=0.0)
    assert _values(data.load(other)) == [value]
  assert len(set(_folder_cache_files()) - before) == 5
  # A symbolic link to a folder reads the folder's cache.
  os.symlink(folder, tmp_path / 'link')
  linked = _config(dataset=f'folder:{tmp_path / "link"}', channels=1, eval_fraction=0.0)
  assert _values(data.load(linked)) == [40, 200, 7]
  assert len(set(_folder_cache_files()) - before) == 5
  # A broken link among the cached images (a git-annex file not fetched) is named, not
  # read from the cache.
  os.symlink(tmp_path / 'missing.png', folder / 'd.png')
  with pytest.raises(data.DataError,
                     match=f'^folder {re.escape(str(folder))}: 1 image\\(s\\) cannot be used; '
                           f'replace or remove them: cannot read image '
                           f'{re.escape(str(folder / "d.png"))}: .*No such file or directory'):
    data.load(config)


def test_a_folder_without_room_for_its_cache_is_decoded_at_each_batch(tmp_path, monkeypatch,
                                                                     caplog):
  _write_png(str(tmp_path / 'd' / 'a.png'), np.full((16, 16), 90, np.uint8))
  _write_png(str(tmp_path / 'd' / 'b.png'), np.full((16, 16), 30, np.uint8))
  config = _config(dataset=f'folder:{tmp_path / "d"}', channels=1, eval_fraction=0.0)
  before = _folder_cache_files()
  free = data.shutil.disk_usage(tmp_path).free
  monkeypatch.setattr(data, '_FOLDER_CACHE_HEADROOM', free)  # no room left for 512 bytes
  with caplog.at_level(logging.WARNING):
    src = data.load(config)
  assert 'no decoded cache (the decoded images (0.0 MiB) would leave under' in caplog.text
  assert 'the images are decoded at each batch instead' in caplog.text
  assert _folder_cache_files() == before
  assert _values(src) == [90, 30]
  # Nor where the cache directory cannot be made (a file stands in its place).
  (tmp_path / 'not_a_dir').write_text('x')
  monkeypatch.setattr(data, '_folder_cache_dir', lambda: str(tmp_path / 'not_a_dir'))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert _values(data.load(config)) == [90, 30]
  assert f'no decoded cache (cannot write to {tmp_path / "not_a_dir"}' in caplog.text
  # A split's source lists the files of that split only.
  half = _config(dataset=f'folder:{tmp_path / "d"}', channels=1, eval_fraction=0.5)
  train, ev = data.load(half, 'train'), data.load(half, 'eval')
  assert len(train.files) == len(ev.files) == 1
  assert sorted(train.files + ev.files) == [str(tmp_path / 'd' / n) for n in ('a.png', 'b.png')]
  # Images that cannot be read fail the load, not the first batch.
  (tmp_path / 'd' / '0.png').write_bytes(b'not a png')
  with pytest.raises(data.DataError, match=r'cannot read image .*0\.png'):
    data.load(config)


@pytest.mark.parametrize('expected', [5, None])
def test_the_cache_writer_writes_under_the_name_given_with_or_without_a_count(
    tmp_path, expected):
  # A split's count comes from tfds' metadata where it has one (the chunks are written as
  # they come), else the chunks are joined; a temporary's name must stay as given (no .npy
  # added), or the removal of a killed write's temporaries would not recognise it.
  rng = np.random.default_rng(0)
  chunks = [rng.integers(0, 256, (n, 4, 4, 3)).astype(np.uint8) for n in (2, 3)]
  path = str(tmp_path / 'cache.npy.tmp1.0123')
  write = data._write_npy  # pylint: disable=protected-access
  assert write(iter(chunks), path, (4, 4, 3), expected, 'x') == 5
  assert os.listdir(tmp_path) == ['cache.npy.tmp1.0123']
  np.testing.assert_array_equal(np.load(path), np.concatenate(chunks))
  with pytest.raises(data.DataError, match='x: read 5 examples, the split lists 6'):
    write(iter(chunks), path, (4, 4, 3), 6, 'x')
  with pytest.raises(data.DataError, match='x: the split is empty'):
    write(iter([]), path, (4, 4, 3), None, 'x')


# Builds a folder's cache (CACHE) of FOLDER's 16x16 gray images, 50 ms an image, under
# train.py's Ctrl-C handling (distributed.exit_on_interrupt: os._exit, no `finally`).
_SLOW_CACHE_BUILD = '''
import sys, time
sys.path.insert(0, {repo!r})
from avae_jax import data, distributed
from configs import default
real = data._folder_image
def slow(path, geometry):
  time.sleep(0.05)
  return real(path, geometry)
data._folder_image = slow
data._folder_cache_dir = lambda: {cache!r}
config = default.get_config()
config.update(dict(dataset='folder:' + {folder!r}, image_size=16, channels=1))
with distributed.exit_on_interrupt('interrupted'):
  data.load(config, 'train')
'''
_TEMPORARY = files._TEMPORARY  # pylint: disable=protected-access


def _start_slow_cache_build(tmp_path, count):
  """(process, folder, cache dir): a build of `count` images, started and writing."""
  folder, cache = tmp_path / 'd', tmp_path / 'cache'
  for i in range(count):
    _write_png(str(folder / f'{i:03d}.png'), np.full((16, 16), i % 256, np.uint8))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = tmp_path / 'build.py'
  script.write_text(_SLOW_CACHE_BUILD.format(repo=repo, cache=str(cache), folder=str(folder)))
  build = subprocess.Popen([sys.executable, str(script)], cwd=repo, stderr=subprocess.PIPE,
                           text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  deadline = time.monotonic() + 120
  while not (cache.is_dir() and any(map(_TEMPORARY.search, os.listdir(cache)))):
    if build.poll() is not None or time.monotonic() > deadline:
      build.kill()
      pytest.fail(f'no cache build under way: {build.communicate()[1][-3000:]}')
    time.sleep(0.02)
  return build, folder, cache


def test_a_killed_cache_build_leaves_a_temporary_that_a_later_build_removes(
    tmp_path, caplog):
  build, folder, cache = _start_slow_cache_build(tmp_path, 400)
  build.send_signal(signal.SIGKILL)  # as a scheduler's kill or the OOM killer would
  build.communicate(timeout=60)
  left = _cache_files(cache)
  assert len(left) == 1 and _TEMPORARY.search(left[0]), left
  # A young temporary may be another host's write in progress: the next build keeps it.
  config = _config(dataset=f'folder:{folder}', channels=1, eval_fraction=0.0)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(data, '_folder_cache_dir', lambda: str(cache))
    source = data.load(config)
    assert left[0] in os.listdir(cache)
    # Ten minutes later it is taken for the killed write's, and removed by a build.
    old = time.time() - 601
    os.utime(cache / left[0], (old, old))
    (folder / '400.png').write_bytes((folder / '000.png').read_bytes())  # a new listing
    with caplog.at_level(logging.WARNING):
      grown = data.load(config)
  assert 'removed 1 temporary file(s) of a killed cache write' in caplog.text
  assert left[0] not in os.listdir(cache)
  assert [n.endswith('.npy') and not _TEMPORARY.search(n) for n in _cache_files(cache)
          ] == [True, True]
  assert _values(grown) == _values(source) + [0]


def test_ctrl_c_in_a_cache_build_leaves_nothing(tmp_path):
  build, _, cache = _start_slow_cache_build(tmp_path, 400)
  build.send_signal(signal.SIGINT)
  _, err = build.communicate(timeout=60)
  assert build.returncode == 130 and 'interrupted' in err, err[-3000:]
  assert _cache_files(cache) == []


def test_a_second_process_waits_for_the_cache_being_made_and_reads_it(tmp_path, monkeypatch):
  # launch.py's processes on one host all load the folder at once: one decodes it.
  build, folder, cache = _start_slow_cache_build(tmp_path, 120)
  monkeypatch.setattr(data, '_folder_cache_dir', lambda: str(cache))
  monkeypatch.setattr(data, 'read_image', lambda path: pytest.fail(f'decoded {path}'))
  config = _config(dataset=f'folder:{folder}', channels=1, eval_fraction=0.0)
  try:
    source = data.load(config)
    _, err = build.communicate(timeout=60)
  finally:
    build.kill()
  assert build.returncode == 0, err[-3000:]
  assert _values(source) == [i % 256 for i in range(120)]
  assert len(_cache_files(cache)) == 1


def test_a_full_disk_is_an_error_of_the_write_and_the_folder_is_decoded_at_each_batch(
    tmp_path, monkeypatch, caplog):
  # Written through a memory map, a full disk ended the process with SIGBUS.
  chunks = iter([np.zeros((2, 4, 4, 1), np.uint8)] * 2000)
  with pytest.raises(OSError) as info:
    data._write_npy(chunks, '/dev/full', (4, 4, 1), 4000, 'x')  # pylint: disable=protected-access
  assert info.value.errno == errno.ENOSPC
  # A disk filled by another writer during a build: the folder is decoded at each batch,
  # and the temporary is gone.
  _write_png(str(tmp_path / 'd' / 'a.png'), np.full((16, 16), 90, np.uint8))
  real = data._write_npy  # pylint: disable=protected-access

  def full(chunks, path, *args):
    real(chunks, path, *args)
    raise OSError(errno.ENOSPC, 'No space left on device', path)

  monkeypatch.setattr(data, '_write_npy', full)
  before = _folder_cache_files()
  with caplog.at_level(logging.WARNING):
    source = data.load(_config(dataset=f'folder:{tmp_path / "d"}', channels=1,
                               eval_fraction=0.0))
  assert 'No space left on device' in caplog.text
  assert 'the images are decoded at each batch instead' in caplog.text
  assert _values(source) == [90] and _folder_cache_files() == before


def test_a_damaged_cache_is_made_again(tmp_path, caplog):
  _write_png(str(tmp_path / 'd' / 'a.png'), np.full((16, 16), 60, np.uint8))
  _write_png(str(tmp_path / 'd' / 'b.png'), np.full((16, 16), 70, np.uint8))
  config = _config(dataset=f'folder:{tmp_path / "d"}', channels=1, eval_fraction=0.0)
  before = set(_folder_cache_files())
  assert _values(data.load(config)) == [60, 70]
  (name,) = set(_folder_cache_files()) - before
  path = os.path.join(data._folder_cache_dir(), name)  # pylint: disable=protected-access
  with open(path, 'r+b') as f:  # cut short, as a crash of its disk might leave it
    f.truncate(os.path.getsize(path) - 100)
  with caplog.at_level(logging.WARNING):
    assert _values(data.load(config)) == [60, 70]
  assert 'is damaged' in caplog.text and 'is not used' in caplog.text
  assert caplog.text.count('is damaged') == 1
  assert os.path.getsize(path) == 128 + 2 * 16 * 16  # whole again
  np.save(path, np.zeros((1, 16, 16, 1), np.uint8))  # whole, but not of this listing
  with caplog.at_level(logging.WARNING):
    assert _values(data.load(config)) == [60, 70]
  assert ('(a uint8 array of shape (1, 16, 16, 1); expected 2 uint8 images of (16, 16, 1)) '
          'and is not used') in caplog.text
  # Not a .npy at all: a zip (np.load would open it as an .npz), or anything else.
  for kind in ('npz', 'junk'):
    with open(path, 'wb') as f:
      if kind == 'npz':
        np.savez(f, x=np.zeros(3))
      else:
        f.write(b'PK\x03\x04 not a zip either')
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert _values(data.load(config)) == [60, 70]
    assert 'is damaged (unreadable: ' in caplog.text
    assert os.path.getsize(path) == 128 + 2 * 16 * 16
  # The tfds caches' reader takes a whole .npy of other images for damaged too (cut short
  # or not a .npy: test_tfds_damaged_cache_is_decoded_again).
  read_cache = data._read_cache  # pylint: disable=protected-access
  for array in (np.zeros((2, 16, 16), np.uint8), np.zeros((2, 16, 16, 1), np.int16)):
    np.save(path, array)  # a whole .npy, but not a uint8 stack of images
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert read_cache(*os.path.split(path[:-4]), 'mnist') is None
    assert f'the decoded cache {path} is damaged ({array.dtype} array of shape ' in caplog.text


def test_a_damaged_dsprites_factors_file_counts_as_a_damaged_cache(tmp_path, caplog):
  # dSprites' cache has a second file, the factors' .npz: one cut short (a zip without its
  # directory) or without its array is damaged too, not a BadZipFile or KeyError traceback.
  read_cache = data._read_cache  # pylint: disable=protected-access
  np.save(tmp_path / 'c.npy', np.zeros((2, 8, 8, 1), np.uint8))
  factors = tmp_path / 'c-factors.npz'
  np.savez(factors, factors=np.zeros((2, 6), np.int32))
  images, got = read_cache(str(tmp_path), 'c', 'dsprites')
  assert images.shape == (2, 8, 8, 1) and got.shape == (2, 6)
  whole = factors.read_bytes()
  for damage in ('truncate', 'no factors'):
    if damage == 'truncate':  # cut short, as a crash of its disk might leave it
      factors.write_bytes(whole[:-30])
    else:
      np.savez(factors, other=np.zeros(3))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      assert read_cache(str(tmp_path), 'c', 'dsprites') is None
    assert f'the decoded cache {tmp_path / "c.npy"} is damaged (' in caplog.text


def test_unreadable_images_are_named_together_and_leave_no_cache(tmp_path, caplog):
  folder = tmp_path / 'd'
  _write_png(str(folder / 'a.png'), np.zeros((16, 16), np.uint8))
  for name in ('b.png', 'c.jpg'):
    (folder / name).write_bytes(b'truncated')
  _write_png(str(folder / 'd.png'), np.zeros((16, 16), np.uint8))
  # A broken link (a git-annex file not fetched) is one of them, not an error of its own
  # before them (a run per unfetched file to find them all).
  os.symlink(tmp_path / 'missing.png', folder / 'e.png')
  before = _folder_cache_files()
  with pytest.raises(data.DataError, match=r'3 image\(s\) cannot be used.*cannot read image '
                     r'.*b\.png.*; cannot read image .*c\.jpg.*; cannot read image .*e\.png: '
                     r'.*No such file'):
    with caplog.at_level(logging.INFO, logger='absl'):
      data.load(_config(dataset=f'folder:{folder}', channels=1, eval_fraction=0.0))
  assert _folder_cache_files() == before  # nor a temporary file
  # Nor a log line that says one was made.
  logged = [r.getMessage() for r in caplog.records]
  assert any('decoding 5 images once' in m for m in logged), logged
  assert not any('decoded into the cache' in m for m in logged), logged


# --------------------------------------------------------------------------- arrays


def _idx_bytes(array, code):
  """An idx file written by hand: 0, 0, dtype code, ndim, big-endian dims, payload."""
  dtype = {0x08: '>u1', 0x0D: '>f4'}[code]
  header = struct.pack('>BBBB', 0, 0, code, array.ndim)
  header += struct.pack('>' + 'I' * array.ndim, *array.shape)
  return header + array.astype(dtype).tobytes()


def test_arrays_npy_tail_split(tmp_path):
  x = np.random.default_rng(0).integers(0, 256, (20, 16, 16)).astype(np.uint8)
  np.save(tmp_path / 'digits.npy', x)
  cfg = _config(dataset=f'arrays:{tmp_path / "digits.npy"}', channels=1, eval_fraction=0.25)
  train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
  assert (train.num_examples, ev.num_examples) == (15, 5)
  _close(train.get(np.arange(15))[..., 0], x[:15] / np.float32(255))
  _close(ev.get([4, 0])[..., 0], x[[19, 15]] / np.float32(255))


@pytest.mark.parametrize('num, fraction, n_eval', [(30, 0.05, 2), (10, 0.05, 1), (20, 0.25, 5)])
def test_a_held_out_eval_split_is_the_nearest_count_and_at_least_one(tmp_path, num, fraction,
                                                                     n_eval):
  # round(num * eval_fraction) (30 * 0.05 = 1.5 -> 2), at least 1 (10 * 0.05 = 0.5 -> 1).
  np.save(tmp_path / 'x.npy', np.zeros((num, 16, 16), np.uint8))
  cfg = _config(dataset=f'arrays:{tmp_path / "x.npy"}', channels=1, eval_fraction=fraction)
  assert (len(data.load(cfg, 'train')), len(data.load(cfg, 'eval'))) == (num - n_eval, n_eval)


@pytest.mark.parametrize('num, fraction', [(1, 0.05), (10, 0.95)])
def test_a_held_out_eval_split_must_leave_images_to_train_on(tmp_path, num, fraction):
  # An error now, not a batch-size error about an empty training split later.
  np.save(tmp_path / 'x.npy', np.zeros((num, 16, 16), np.uint8))
  cfg = _config(dataset=f'arrays:{tmp_path / "x.npy"}', channels=1, eval_fraction=fraction)
  with pytest.raises(data.DataError, match=f'{num} examples are too few to hold out'):
    data.load(cfg, 'train')


def test_a_file_without_an_eval_split_and_no_held_out_fraction_has_no_eval(tmp_path):
  np.save(tmp_path / 'x.npy', np.zeros((10, 16, 16), np.uint8))
  cfg = _config(dataset=f'arrays:{tmp_path / "x.npy"}', channels=1, eval_fraction=0.0)
  assert data.load(cfg, 'train').num_examples == 10
  with pytest.raises(data.DataError, match='has no eval split and eval_fraction is 0'):
    data.load(cfg, 'eval')


def test_arrays_of_the_image_size_are_still_cropped(tmp_path):
  # crop_size takes the centre and scales it to image_size, whatever the stored size.
  x = np.zeros((2, 16, 16), np.uint8)
  x[:, 4:12, 4:12] = 200  # the centre 8x8, black around it
  np.save(tmp_path / 'x.npy', x)
  cfg = _config(dataset=f'arrays:{tmp_path / "x.npy"}', channels=1, crop_size=8,
                eval_fraction=0.0)
  _close(data.load(cfg, 'train').get([0, 1]), np.full((2, 16, 16, 1), 200 / 255, np.float32))
  # One larger than the images: said at load, naming the file (it named none).
  cfg.crop_size = 17
  with pytest.raises(data.DataError) as info:
    data.load(cfg, 'train')
  assert str(info.value) == (f'arrays:{tmp_path / "x.npy"} (x.npy): crop_size 17 is larger '
                             'than the image (16x16); choose crop_size <= the shorter side, '
                             'or 0 for the largest square')


def test_npz_keys_of_one_split_are_joined_in_name_order(tmp_path):
  first, second = (np.full((2, 16, 16), v, np.uint8) for v in (10, 20))
  np.savez(tmp_path / 'a.npz', x_train=second, images_train=first)  # stored in this order
  cfg = _config(dataset=f'arrays:{tmp_path / "a.npz"}', channels=1, eval_fraction=0.0)
  _close(data.load(cfg, 'train').get(np.arange(4))[:, 0, 0, 0], np.array([10, 10, 20, 20]) / 255)


def test_several_dsprites_files_in_one_split_have_no_factors(tmp_path):
  # Each file's factors are its own rows': a split joined from two has none to give.
  for k in range(2):
    np.savez(tmp_path / f'dsprites{k}.npz', imgs=np.zeros((4, 16, 16), np.uint8),
             latents_classes=np.zeros((4, 6), np.int64))
  cfg = _config(dataset=f'arrays:{tmp_path}', channels=1, eval_fraction=0.0)
  src = data.load(cfg, 'train')
  assert len(src) == 8 and src.factors is None and src.factor_names == ()


def test_arrays_log_which_file_went_to_which_split(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='absl')  # its level, whatever flags set it to
  np.save(tmp_path / 'x_train.npy', np.zeros((12, 16, 16), np.uint8))
  np.save(tmp_path / 'xtest.npy', np.zeros((4, 16, 16), np.uint8))  # 'xtest' is no word
  cfg = _config(dataset=f'arrays:{tmp_path}', channels=1, eval_fraction=0.25)
  assert data.load(cfg, 'eval').num_examples == 4  # the last quarter of both files
  assert not caplog.messages  # said once per run, when the train split is loaded
  assert data.load(cfg, 'train').num_examples == 12
  (message,) = caplog.messages
  assert 'no file is named as an eval split' in message
  assert message.endswith('held out of x_train.npy, xtest.npy (eval_fraction)')
  caplog.clear()
  # Split by name, each split scaled by its own dtype: uint8 train, float eval.
  (tmp_path / 'xtest.npy').unlink()
  floats = np.random.default_rng(3).random((4, 16, 16), dtype=np.float32)
  np.save(tmp_path / 'x_test.npy', floats)
  assert data.load(cfg, 'train').num_examples == 12
  assert caplog.messages == [f'arrays:{tmp_path}: train split from x_train.npy, eval split '
                             'from x_test.npy']
  np.testing.assert_array_equal(data.load(cfg, 'eval').get(np.arange(4))[..., 0], floats)
  caplog.clear()
  # Test images only: trained on, which the log says as a warning, not as "no file is named".
  (tmp_path / 'x_train.npy').unlink()
  assert data.load(cfg, 'train').num_examples == 3
  assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
      (logging.WARNING, f'arrays:{tmp_path}: every file is named as an eval split '
       '(x_test.npy), so the model trains on their images and eval is held out of them '
       '(eval_fraction)')]


def test_arrays_npz_keys(tmp_path):
  rng = np.random.default_rng(1)
  floats = rng.random((6, 16, 16, 3)).astype(np.float32)
  np.savez(tmp_path / 'a.npz', images=floats, labels=np.arange(6))
  src = data.load(_config(dataset=f'arrays:{tmp_path / "a.npz"}', eval_fraction=0.0))
  np.testing.assert_array_equal(src.get(np.arange(6)), floats)  # floats are kept
  xtr = rng.integers(0, 256, (5, 16, 16)).astype(np.uint8)
  xte = rng.integers(0, 256, (3, 16, 16)).astype(np.uint8)
  np.savez(tmp_path / 'mnist.npz', x_train=xtr, y_train=np.arange(5), x_test=xte,
           y_test=np.arange(3))
  cfg = _config(dataset=f'arrays:{tmp_path / "mnist.npz"}', channels=1)
  assert data.load(cfg, 'train').num_examples == 5
  _close(data.load(cfg, 'eval').get([2])[0, ..., 0], xte[2] / np.float32(255))


def test_arrays_idx_files_and_name_mapping(tmp_path):
  rng = np.random.default_rng(2)
  tr = rng.integers(0, 256, (7, 28, 28)).astype(np.uint8)
  te = rng.integers(0, 256, (4, 28, 28)).astype(np.uint8)
  d = tmp_path / 'fashion'
  d.mkdir()
  with gzip.open(d / 'train-images-idx3-ubyte.gz', 'wb') as f:
    f.write(_idx_bytes(tr, 0x08))
  (d / 't10k-images-idx3-ubyte').write_bytes(_idx_bytes(te, 0x08))  # raw idx
  with gzip.open(d / 'train-labels-idx1-ubyte.gz', 'wb') as f:
    f.write(_idx_bytes(np.arange(7, dtype=np.uint8), 0x08))
  cfg = _config(dataset=f'arrays:{d}', channels=1, image_size=28)
  train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
  assert (train.num_examples, ev.num_examples) == (7, 4)
  _close(train.get(np.arange(7))[..., 0], tr / np.float32(255))
  _close(ev.get(np.arange(4))[..., 0], te / np.float32(255))
  # 28 -> 32 RGB: shapes, and gray repeated over channels.
  up = data.load(_config(dataset=f'arrays:{d}', channels=3, image_size=32), 'eval')
  x = up.get([0, 1])
  assert x.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(x[..., 0], x[..., 2])
  assert 0.0 <= x.min() and x.max() <= 1.0
  # A glob naming the same files gives the same split.
  globbed = data.load(_config(dataset=f'arrays:{d}/*-images-*', channels=1, image_size=28),
                      'eval')
  np.testing.assert_array_equal(globbed.get([3]), ev.get([3]))


def test_arrays_gzipped_idx_beside_its_unpacked_copy_is_read_once(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger='absl')
  rng = np.random.default_rng(7)
  tr = rng.integers(0, 256, (6, 16, 16)).astype(np.uint8)
  te = rng.integers(0, 256, (3, 16, 16)).astype(np.uint8)
  # As after `gunzip -k`: train-images both packed and unpacked, t10k packed only.
  (tmp_path / 'train-images-idx3-ubyte').write_bytes(_idx_bytes(tr, 0x08))
  with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
    f.write(_idx_bytes(tr, 0x08))
  with gzip.open(tmp_path / 't10k-images-idx3-ubyte.gz', 'wb') as f:
    f.write(_idx_bytes(te, 0x08))
  cfg = _config(dataset=f'arrays:{tmp_path}', channels=1)
  train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
  assert (train.num_examples, ev.num_examples) == (6, 3)  # not 12: no image twice
  _close(train.get(np.arange(6))[..., 0], tr / np.float32(255))
  _close(ev.get(np.arange(3))[..., 0], te / np.float32(255))
  assert any('not the gzipped copies train-images-idx3-ubyte.gz' in m for m in caplog.messages)


def test_arrays_idx_float_big_endian(tmp_path):
  x = np.random.default_rng(3).random((3, 16, 16)).astype(np.float32)
  with gzip.open(tmp_path / 'images.idx.gz', 'wb') as f:
    f.write(_idx_bytes(x, 0x0D))
  assert data.read_idx(str(tmp_path / 'images.idx.gz')).dtype.isnative
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / 'images.idx.gz')), x)
  (tmp_path / 'plain.idx').write_bytes(_idx_bytes(x, 0x0D))  # read through a memmap
  assert data.read_idx(str(tmp_path / 'plain.idx')).dtype.isnative
  np.testing.assert_array_equal(data.read_idx(str(tmp_path / 'plain.idx')), x)
  src = data.load(_config(dataset=f'arrays:{tmp_path / "images.idx.gz"}', channels=1,
                          eval_fraction=0.0))
  np.testing.assert_array_equal(src.get([0, 1, 2])[..., 0], x)


def _assert_idx_refused(tmp_path, packed, match):
  """Writes `packed` as a gzipped idx file: read_idx and the arrays: loader refuse it."""
  path = tmp_path / 'images.idx.gz'
  path.write_bytes(bytes(packed))
  with pytest.raises(data.DataError, match=match):
    data.read_idx(str(path))
  with pytest.raises(data.DataError, match='cannot read idx file'):
    data.load(_config(dataset=f'arrays:{path}', channels=1))


def test_corrupted_gzip_idx_is_an_error(tmp_path):
  x = np.random.default_rng(5).integers(0, 256, (20, 16, 16)).astype(np.uint8)
  # Level 0 stores the bytes verbatim: one flipped payload byte keeps the stream
  # decodable, and only the CRC at its end tells.
  packed = bytearray(gzip.compress(_idx_bytes(x, 0x08), compresslevel=0))
  packed[len(packed) // 2] ^= 0xFF
  with pytest.raises(gzip.BadGzipFile, match='CRC'):
    gzip.decompress(bytes(packed))
  _assert_idx_refused(tmp_path, packed, 'CRC check failed')


def test_damaged_deflate_stream_in_gzip_idx_is_a_data_error(tmp_path):
  x = np.zeros((20, 16, 16), np.uint8)
  x[:, 4:12, 4:12] = 200  # compressible: the stream has Huffman tables to damage
  packed = bytearray(gzip.compress(_idx_bytes(x, 0x08), compresslevel=9, mtime=0))
  packed[12] ^= 0xFF  # inside the first block's code-length table (gzip header: 10 bytes)
  with pytest.raises(zlib.error):  # not an OSError: gzip passes zlib's error on as it is
    gzip.decompress(bytes(packed))
  _assert_idx_refused(tmp_path, packed, 'cannot read idx file')


def test_damaged_header_in_gzip_idx_is_reported_as_damage(tmp_path):
  x = np.random.default_rng(6).integers(0, 256, (4, 16, 16)).astype(np.uint8)
  # Stored (level 0): gzip header (10 bytes), block header (5 bytes), then the idx bytes
  # verbatim; byte 17 is the idx dtype code 0x08.
  packed = bytearray(gzip.compress(_idx_bytes(x, 0x08), compresslevel=0, mtime=0))
  assert packed[17] == 0x08
  packed[17] ^= 0xFF
  (tmp_path / 'images.idx.gz').write_bytes(bytes(packed))
  with gzip.open(tmp_path / 'images.idx.gz', 'rb') as f:
    assert f.read(4)[2] == 0xF7  # the stream's start decodes, to a header no idx file has
  with pytest.raises(data.DataError, match='CRC check failed'):
    data.read_idx(str(tmp_path / 'images.idx.gz'))


def test_arrays_errors(tmp_path):
  with pytest.raises(data.DataError, match='does not exist'):
    data.load(_config(dataset=f'arrays:{tmp_path / "nothing.npy"}'))
  (tmp_path / 'junk.npy').write_bytes(b'\x00garbage')
  with pytest.raises(data.DataError, match='cannot read arrays file'):
    data.load(_config(dataset=f'arrays:{tmp_path / "junk.npy"}'))
  np.save(tmp_path / 'two.npy', np.zeros((4, 8, 8, 2), np.uint8))
  with pytest.raises(data.DataError, match='bad image channels'):
    data.load(_config(dataset=f'arrays:{tmp_path / "two.npy"}'))
  # One image was read as H images of W x 3 (or W x 1) pixels.
  for shape in ((32, 32, 3), (16, 16, 3), (16, 16, 1)):
    np.save(tmp_path / 'one.npy', np.zeros(shape, np.uint8))
    with pytest.raises(data.DataError, match=r'looks like one \(H, W, C\) image'):
      data.load(_config(dataset=f'arrays:{tmp_path / "one.npy"}'))
  np.save(tmp_path / 'big.npy', np.full((4, 8, 8), 200.0, np.float32))
  with pytest.raises(data.DataError, match=r'\[0, 1\]'):
    data.load(_config(dataset=f'arrays:{tmp_path / "big.npy"}'))
  # Magic 0x0000 then a dtype code: one wrong byte is enough.
  for magic in (b'\x01\x02\x08\x03', b'\x00\x01\x08\x03', b'\x01\x00\x08\x03',
                b'\x00\x00\x07\x03'):
    (tmp_path / 'x.idx').write_bytes(magic + b'\x00' * 12)
    with pytest.raises(data.DataError, match='not an idx file'):
      data.load(_config(dataset=f'arrays:{tmp_path / "x.idx"}'))
  (tmp_path / 'cut.idx').write_bytes(_idx_bytes(np.zeros((2, 4, 4), np.uint8), 0x08)[:10])
  with pytest.raises(data.DataError, match='cut.idx: idx header truncated'):
    data.read_idx(str(tmp_path / 'cut.idx'))
  (tmp_path / 'short.idx').write_bytes(_idx_bytes(np.zeros((2, 4, 4), np.uint8), 0x08)[:-5])
  with pytest.raises(data.DataError, match='truncated'):
    data.load(_config(dataset=f'arrays:{tmp_path / "short.idx"}'))
  (tmp_path / 'emptydir').mkdir()
  with pytest.raises(data.DataError, match=r"no array files \(.*\) at '[^']*emptydir'$"):
    data.load(_config(dataset=f'arrays:{tmp_path / "emptydir"}'))
  # A directory of labels alone, or of subdirectories: the message says what it skipped.
  (tmp_path / 'emptydir' / 'sub').mkdir()
  np.save(tmp_path / 'emptydir' / 'sub' / 'x.npy', np.zeros((4, 8, 8), np.uint8))
  (tmp_path / 'emptydir' / 'train-labels-idx1-ubyte').write_bytes(b'')
  with pytest.raises(data.DataError, match=r"emptydir'; files named as labels are skipped: "
                     r'train-labels-idx1-ubyte; subdirectories are not searched: name one'):
    data.load(_config(dataset=f'arrays:{tmp_path / "emptydir"}'))
  # Several arrays none of which is named as images: no guess.
  np.savez(tmp_path / 'unnamed.npz', a=np.zeros((4, 8, 8), np.uint8),
           b=np.zeros((4, 8, 8), np.uint8))
  with pytest.raises(data.DataError, match=r"no image array; .* found keys \['a', 'b'\]"):
    data.load(_config(dataset=f'arrays:{tmp_path / "unnamed.npz"}'))
  # Files of one split in different dtypes would be served with one scale.
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  np.save(mixed / 'train_a.npy', np.zeros((4, 8, 8), np.uint8))
  np.save(mixed / 'train_b.npy', np.zeros((4, 8, 8), np.float32))
  # Named by file: which is the odd one is what the user has to find.
  with pytest.raises(data.DataError, match=r'differ in image shape or dtype: train_a\.npy '
                     r'\(4, 8, 8, 1\) uint8, train_b\.npy \(4, 8, 8, 1\) float32'):
    data.load(_config(dataset=f'arrays:{mixed}', channels=1))


def test_arrays_errors_name_every_bad_file_at_once(tmp_path):
  # One run names them all, instead of one run per bad file.
  np.save(tmp_path / 'a.npy', np.zeros((4, 8, 8), np.int64))
  np.save(tmp_path / 'b.npy', np.full((4, 8, 8), 200.0, np.float32))
  np.save(tmp_path / 'c.npy', np.zeros((4, 8, 8), np.uint8))
  np.save(tmp_path / 'y_test.npy', np.zeros(4))
  with pytest.raises(data.DataError, match=r'3 files cannot be used.*a\.npy: dtype int64.*'
                     r'b\.npy: float images.*y_test\.npy: shape \(4,\)'):
    data.load_splits(_config(dataset=f'arrays:{tmp_path}', channels=1))


def test_arrays_npz_or_text_named_npy_is_a_data_error(tmp_path):
  # np.load reads a zip whatever its name; it is not an array to check as images.
  np.savez(tmp_path / 'x.npz', x=np.zeros((4, 8, 8), np.uint8))
  os.replace(tmp_path / 'x.npz', tmp_path / 'x.npy')
  with pytest.raises(data.DataError, match=r'x\.npy is a \.npz archive .*rename it to \.npz'):
    data.load(_config(dataset=f'arrays:{tmp_path / "x.npy"}', channels=1))
  # Any other content is a pickle to np.load, refused with advice the user cannot take.
  (tmp_path / 't.npy').write_text('0 1 2\n')
  with pytest.raises(data.DataError, match=r't\.npy: not a \.npy array \(it lacks the \.npy '
                     r'header\)$'):
    data.load(_config(dataset=f'arrays:{tmp_path / "t.npy"}', channels=1))


def test_arrays_of_bools_and_other_names_and_globs(tmp_path):
  # Bool images (masks) are 0/1; an idx file named with underscores is an idx file; a
  # glob may use ? and [...].
  masks = np.random.default_rng(3).random((6, 16, 16)) > 0.5
  np.save(tmp_path / 'masks.npy', masks)
  src = data.load(_config(dataset=f'arrays:{tmp_path / "masks.npy"}', channels=1,
                          eval_fraction=0.0))
  np.testing.assert_array_equal(src.get(np.arange(6))[..., 0], masks.astype(np.float32))
  d = tmp_path / 'idx'
  d.mkdir()
  digits = np.random.default_rng(4).integers(0, 256, (5, 16, 16)).astype(np.uint8)
  (d / 'digits_idx3_ubyte').write_bytes(_idx_bytes(digits, 0x08))
  for spec in (d, d / 'digits_idx?_ubyte', d / 'digits_idx[0-9]_ubyte'):
    src = data.load(_config(dataset=f'arrays:{spec}', channels=1, eval_fraction=0.0))
    _close(src.get(np.arange(5))[..., 0], digits / np.float32(255))


@pytest.mark.skipif(not os.path.exists('/usr/share/datasets/fashion-mnist/'
                                       'train-images-idx3-ubyte.gz'),
                    reason='Debian dataset-fashion-mnist not installed')
def test_debian_fashion_mnist_files():
  cfg = _config(dataset='arrays:/usr/share/datasets/fashion-mnist/', channels=1,
                image_size=28)
  train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
  assert (train.num_examples, ev.num_examples) == (60000, 10000)
  x = ev.get(np.arange(8))
  assert x.shape == (8, 28, 28, 1) and x.min() == 0.0 and x.max() == 1.0


# --------------------------------------------------------------------------- tfds


def test_float_arrays_are_range_checked_beyond_their_first_rows(tmp_path, monkeypatch):
  x = np.random.default_rng(0).random((300, 8, 8), dtype=np.float32)
  x[290] *= 255.0  # one image in [0, 255] among images in [0, 1]
  np.save(tmp_path / 'mixed.npy', x)
  spec = f'arrays:{tmp_path / "mixed.npy"}'
  with pytest.raises(data.DataError, match=r'float images must lie in \[0, 1\]'):
    data.load(_config(dataset=spec, eval_fraction=0.0))
  # Files too large to scan whole at load time (here: 2 rows' worth) are sampled there,
  # and every batch read is checked.
  monkeypatch.setattr(data, '_RANGE_SCAN_BYTES', 2 * 8 * 8 * 4)
  source = data.load(_config(dataset=spec, eval_fraction=0.0))
  assert source.get(np.arange(280)).max() <= 1.0
  with pytest.raises(data.DataError, match=r'mixed\.npy: float images must lie in \[0, 1\]'):
    source.get([3, 290])


def test_float_arrays_are_range_checked_past_the_first_chunk_of_rows(tmp_path):
  # Rows are scanned 4096 at a time: the first chunk is not the only one.
  x = np.zeros((4100, 2, 2), np.float32)
  x[4098] = 2.0
  np.save(tmp_path / 'long.npy', x)
  with pytest.raises(data.DataError, match=r'float images must lie in \[0, 1\]'):
    data.load(_config(dataset=f'arrays:{tmp_path / "long.npy"}', image_size=2,
                      eval_fraction=0.0))


def test_float_arrays_with_nan_are_refused(tmp_path, monkeypatch):
  x = np.random.default_rng(1).random((300, 8, 8), dtype=np.float32)
  x[290, 4, 4] = np.nan  # one pixel of one image
  np.save(tmp_path / 'nan.npy', x)
  spec = f'arrays:{tmp_path / "nan.npy"}'
  with pytest.raises(data.DataError, match=r'nan\.npy: float images must lie in \[0, 1\], '
                     'found NaN'):
    data.load(_config(dataset=spec, eval_fraction=0.0))
  # A file sampled at load time: the batch that holds the NaN is refused when read.
  monkeypatch.setattr(data, '_RANGE_SCAN_BYTES', 2 * 8 * 8 * 4)
  source = data.load(_config(dataset=spec, eval_fraction=0.0))
  assert np.isfinite(source.get(np.arange(280))).all()
  with pytest.raises(data.DataError, match='found NaN'):
    source.get([3, 290])


def _tfds():
  return pytest.importorskip('tensorflow_datasets')


def test_tfds_mnist_exact_and_cached(tmp_path):
  tfds = _tfds()
  cfg = _config(dataset='mnist', data_dir=str(tmp_path), image_size=28, channels=1)
  with tfds.testing.mock_data(num_examples=12):
    src = data.load(cfg, 'train')
    raw = np.stack([ex['image'] for ex in tfds.as_numpy(
        tfds.load('mnist', split='train', data_dir=str(tmp_path)))])
  assert src.num_examples == 12 and src.image_shape == (28, 28, 1)
  _close(src.get(np.arange(12)), raw / np.float32(255))
  cached = os.listdir(tmp_path / 'avae_jax_cache')
  assert any(f.startswith('mnist-') and f.endswith('.npy') for f in cached)
  # Outside the mock the dataset is not prepared: the cache alone serves it.
  again = data.load(cfg, 'train')
  np.testing.assert_array_equal(again.get([3, 1]), src.get([3, 1]))


def test_tfds_damaged_cache_is_decoded_again(tmp_path, caplog):
  # It was an error asking to delete the file (a damaged folder cache is made anew).
  tfds = _tfds()
  cfg = _config(dataset='mnist', data_dir=str(tmp_path), image_size=28, channels=1)
  with tfds.testing.mock_data(num_examples=12):
    want = data.load(cfg, 'train').get(np.arange(12))
  (path,) = (tmp_path / 'avae_jax_cache').glob('mnist-*.npy')
  size = path.stat().st_size
  for damage in ('truncate', 'npz'):
    if damage == 'truncate':  # cut short, as a crash of its disk might leave it
      with open(path, 'r+b') as f:
        f.truncate(size - 100)
    else:  # not a .npy at all
      with open(path, 'wb') as f:
        np.savez(f, x=np.zeros(3))
    caplog.clear()
    with caplog.at_level(logging.WARNING), tfds.testing.mock_data(num_examples=12):
      again = data.load(cfg, 'train')
    assert caplog.text.count(f'the decoded cache {path} is damaged (') == 1, caplog.text
    assert 'and is not used; the split is decoded again' in caplog.text
    np.testing.assert_array_equal(again.get(np.arange(12)), want)
    assert path.stat().st_size == size  # whole again
  # Where the dataset is not prepared, the decoding says so.
  with open(path, 'r+b') as f:
    f.truncate(10)
  with pytest.raises(data.DataError, match="tfds dataset 'mnist' is not prepared"):
    data.load(cfg, 'train')


def test_tfds_processes_that_need_a_split_at_once_decode_it_once(tmp_path, monkeypatch):
  tfds = _tfds()
  cfg = _config(dataset='mnist', data_dir=str(tmp_path), image_size=28, channels=1)
  real = data._write_cache  # pylint: disable=protected-access
  calls, writing = [], threading.Event()

  def slow_write(*args):
    calls.append(args[1])
    writing.set()
    time.sleep(1.0)  # the other loader reaches the lock meanwhile
    return real(*args)

  monkeypatch.setattr(data, '_write_cache', slow_write)
  sources = {}
  with tfds.testing.mock_data(num_examples=12):
    first = threading.Thread(target=lambda: sources.update(a=data.load(cfg, 'train')))
    first.start()
    assert writing.wait(60)
    sources['b'] = data.load(cfg, 'train')  # waits for the first, then reads its cache
    first.join(60)
  assert calls == [str(tmp_path / 'avae_jax_cache')]
  a, b = sources['a'], sources['b']
  np.testing.assert_array_equal(a.get(np.arange(12)), b.get(np.arange(12)))


def test_tfds_slices_of_one_split_have_their_own_caches(tmp_path, monkeypatch):
  tfds = _tfds()
  cfg = _config(dataset='mnist', data_dir=str(tmp_path), image_size=28, channels=1,
                train_split='train[:50%]', eval_split='train[50%:]')
  # mock_data ignores slices (every split string gives the same images): the second
  # slice's images are inverted here so that the two can be told apart.
  real = data._tfds_dataset

  def sliced(config, builder, name, split):
    ds = real(config, builder, name, split)
    return ds.map(lambda b: {'image': 255 - b['image']}) if split == 'train[50%:]' else ds
  monkeypatch.setattr(data, '_tfds_dataset', sliced)
  with tfds.testing.mock_data(num_examples=6):
    train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
    raw = np.stack([ex['image'] for ex in tfds.as_numpy(
        tfds.load('mnist', split='train', data_dir=str(tmp_path)))])
  # Made file-name safe, the two slices read alike; each must still get its own images.
  _close(train.get(np.arange(6)), raw / np.float32(255))
  _close(ev.get(np.arange(6)), (255 - raw) / np.float32(255))


def test_tfds_unknown_eval_split_is_an_error_where_the_dataset_has_several(tmp_path):
  tfds = _tfds()
  cfg = _config(dataset='mnist', data_dir=str(tmp_path), image_size=28, channels=1,
                eval_split='tset')
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(data.DataError, match=r"mnist has no split 'tset' \(it has .*test"):
      data.load(cfg, 'train')


@pytest.mark.parametrize('train_split,eval_split', [
    ('train', 'train[90%:]'), ('train', 'train'), ('train[:90%]+test', 'test[:10]'),
    ('train[:60%]', 'train[50%:]')])
def test_tfds_an_eval_split_sharing_training_examples_is_an_error(tmp_path, train_split,
                                                                   eval_split):
  tfds = _tfds()
  cfg = _config(dataset='mnist', data_dir=str(tmp_path), image_size=28, channels=1,
                train_split=train_split, eval_split=eval_split)
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(data.DataError, match=r"shares examples with train_split .*; slice "
                                             r"one split for both, e\.g\. "):
      data.load(cfg, 'eval')


def test_tfds_an_overlap_in_a_dataset_of_one_split_advises_a_held_out_fraction(tmp_path):
  # dSprites is stored in factor order: a sliced tail would be one shape at its largest
  # scales, so the advice is the random held-out fraction, not a slice.
  tfds = _tfds()
  cfg = _config(dataset='dsprites', data_dir=str(tmp_path), image_size=32, channels=1,
                train_split='train', eval_split='train[90%:]')
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(data.DataError, match=r"shares examples with train_split 'train', .*"
                                             r"; set eval_split to a name dsprites lacks "
                                             r"\(the default, test\) to hold out a random "
                                             r"eval_fraction of it$"):
      data.load(cfg, 'eval')


@pytest.mark.parametrize('train_split,eval_split,shared', [
    ('train[:90%]', 'train[90%:]', False), ('train[:90%]', 'train[85%:]', True),
    ('train', 'test', False), ('train[:50%]+test[10:20]', 'test[:10]', False),
    ('train[:50%]+test[10:20]', 'test[19:]', True), ('train[:900]', 'train[-100:]', False),
    ('train[:901]', 'train[-100:]', True), ('train[:1%]', 'train[10:]', False),
    ('train[:1]', 'train', True)])
def test_tfds_split_overlap_from_the_split_sizes(train_split, eval_split, shared):
  # train has 1000 examples and test 100: train[-100:] is 900..999, train[:1%] is 0..9.
  tfds = _tfds()
  infos = {'train': tfds.core.SplitInfo(name='train', shard_lengths=[1000], num_bytes=0),
           'test': tfds.core.SplitInfo(name='test', shard_lengths=[100], num_bytes=0)}

  class Builder:
    info = type('Info', (), {'splits': infos})

  assert data._splits_overlap(train_split, eval_split, Builder) == shared


@pytest.mark.parametrize('train_split,eval_split,shared', [
    ('train[:90%]', 'train[90%:]', False), ('train[:60%]', 'train[50%:]', True),
    ('train[:-99]', 'train[-100:]', True), ('train[:-100]', 'train[-100:]', False),
    ('train', 'test', False), ('train+test[:5]', 'test[5:]', False),
    ('train[:abc]', 'train', False)])  # malformed: left to tfds to name when it reads it
def test_tfds_split_overlap_before_the_sizes_are_known(train_split, eval_split, shared):
  # A dataset not downloaded yet lists no splits: slices compare at any size.
  _tfds()

  class Builder:
    info = type('Info', (), {'splits': {}})

  assert data._splits_overlap(train_split, eval_split, Builder) == shared


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist'])
def test_tfds_gray_to_rgb_resized(tmp_path, name):
  tfds = _tfds()
  cfg = _config(dataset=name, data_dir=str(tmp_path), image_size=32, channels=3)
  with tfds.testing.mock_data(num_examples=6):
    train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
  x = ev.get(np.arange(6))
  assert train.num_examples == 6 and x.shape == (6, 32, 32, 3) and x.dtype == np.float32
  assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
  np.testing.assert_array_equal(x[..., 0], x[..., 1])


def test_tfds_celeb_a_crop_and_resize(tmp_path):
  tfds = _tfds()
  with tfds.testing.mock_data(num_examples=4):
    small = data.load(_config(dataset='celeb_a', data_dir=str(tmp_path), image_size=32,
                              crop_size=140), 'train')
    full = data.load(_config(dataset='celeb_a', data_dir=str(tmp_path), image_size=140,
                             crop_size=140), 'train')
    raw = np.stack([ex['image'] for ex in tfds.as_numpy(
        tfds.load('celeb_a', split='train', data_dir=str(tmp_path)))])
  x = small.get(np.arange(4))
  assert small.name == 'celeb_a/train'
  assert raw.shape[1:] == (218, 178, 3)
  assert x.shape == (4, 32, 32, 3) and 0.0 <= x.min() and x.max() <= 1.0
  # Without resizing the crop is exactly rows 39..178, columns 19..158.
  _close(full.get(np.arange(4)), raw[:, 39:179, 19:159] / np.float32(255))


def test_tfds_dsprites_factors_and_held_out_eval(tmp_path):
  tfds = _tfds()
  cfg = _config(dataset='dsprites', data_dir=str(tmp_path), image_size=64, channels=1,
                eval_fraction=0.25)
  with tfds.testing.mock_data(num_examples=20, max_value=2):  # dSprites pixels are 0/1
    train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
    raw = list(tfds.as_numpy(tfds.load('dsprites', split='train', data_dir=str(tmp_path))))
  assert (train.num_examples, ev.num_examples) == (15, 5)
  # dSprites has a train split only: both are held out of it, not read from 'test'.
  assert (train.name, ev.name) == ('dsprites/train:train', 'dsprites/train:eval')
  assert train.factor_names == ('shape', 'scale', 'orientation', 'x_position', 'y_position')
  labels = np.array([[ex[f'label_{k}'] for k in train.factor_names] for ex in raw])
  images = np.stack([ex['image'] for ex in raw]).astype(np.float32)  # 0/1 -> black/white
  all_factors = np.concatenate([train.factors, ev.factors])
  all_images = np.concatenate([train.get(np.arange(15)), ev.get(np.arange(5))])
  # Train and eval partition the split: match every served image to its raw row.
  matched = [int(np.flatnonzero((labels == f).all(1) & (images == im).all((1, 2, 3)))[0])
             for f, im in zip(all_factors, all_images)]
  assert sorted(matched) == list(range(20))
  # Eval is a random subset (dSprites is stored in factor order), not the last rows.
  assert sorted(matched[15:]) != list(range(15, 20))
  # Without a held-out fraction there is no eval split to take.
  cfg.eval_fraction = 0.0
  with tfds.testing.mock_data(num_examples=20, max_value=2):
    with pytest.raises(data.DataError, match="dsprites has no split 'test' .* and "
                       'eval_fraction is 0'):
      data.load(cfg, 'train')


def _half_size_bilinear(image):
  """PIL's bilinear 2x reduction derived by hand: per axis, output i weighs inputs
  2i-1, 2i, 2i+1, 2i+2 by 1, 3, 3, 1 (a triangle of radius 2 input pixels sampled at
  distances 1.5, 0.5, 0.5, 1.5), renormalised where the window leaves the image."""
  def axis(x, ax):
    n = x.shape[ax] // 2
    out = []
    for i in range(n):
      idx = [j for j in (2 * i - 1, 2 * i, 2 * i + 1, 2 * i + 2) if 0 <= j < x.shape[ax]]
      w = np.array([{0: 1, 1: 3, 2: 3, 3: 1}[j - 2 * i + 1] for j in idx], np.float64)
      out.append(np.tensordot(w / w.sum(), np.take(x, idx, axis=ax), axes=(0, ax)))
    return np.stack(out, axis=ax)
  return axis(axis(image.astype(np.float64), 0), 1)


def test_tfds_dsprites_resized_keeps_anti_aliased_edges(tmp_path):
  tfds = _tfds()
  cfg = _config(dataset='dsprites', data_dir=str(tmp_path), image_size=32, channels=1,
                eval_fraction=0.25)
  with tfds.testing.mock_data(num_examples=8, max_value=2):  # 0/1 pixels at 64x64
    train = data.load(cfg, 'train')
    raw = list(tfds.as_numpy(tfds.load('dsprites', split='train', data_dir=str(tmp_path))))
  x = train.get(np.arange(train.num_examples))
  by_factors = {tuple(int(ex[f'label_{k}']) for k in train.factor_names): ex['image']
                for ex in raw}
  want = np.stack([_half_size_bilinear(by_factors[tuple(f)][..., 0])[..., None]
                   for f in train.factors])
  # Grey edge pixels as in the reduction of the 0/1 image (within the 8-bit cache's
  # rounding), not a 0/1 image again.
  np.testing.assert_allclose(x, want, rtol=0, atol=1.5 / 255)
  assert len(np.unique(x)) > 5

def test_tfds_not_prepared_fails_fast_without_network(tmp_path, monkeypatch):
  tfds = _tfds()
  calls = []

  def no_network(*args, **kwargs):
    raise OSError('network access attempted in a test')

  def fake_download(self, *args, **kwargs):
    calls.append(self.name)  # records the request, prepares nothing
  monkeypatch.setattr(socket.socket, 'connect', no_network)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fake_download)
  empty = tmp_path / 'tfds'
  empty.mkdir()
  for name in ('celeb_a', 'fashion_mnist'):
    with pytest.raises(data.DataError) as err:
      data.load(_config(dataset=name, data_dir=str(empty), download=False))
    msg = str(err.value)
    assert 'not prepared' in msg and 'download' in msg and 'data_dir' in msg
    assert 'folder:' in msg and 'arrays:' in msg and 'manual' in msg
  assert calls == []  # download=False never asks tfds to download
  with pytest.raises(data.DataError, match='not prepared'):
    data.load(_config(dataset='mnist', data_dir=str(empty), download=True))
  assert calls == ['mnist']


def test_tfds_cache_writer_with_known_split_size(tmp_path):
  tf = pytest.importorskip('tensorflow')
  images = np.random.default_rng(4).integers(0, 256, (10, 20, 20, 1)).astype(np.uint8)
  ds = tf.data.Dataset.from_tensor_slices({'image': images}).batch(4)
  geometry = dict(image_size=20, crop_size=0, channels=1)
  # A known size writes straight into a memory-mapped .npy; None collects in memory.
  known, _ = data._write_cache(ds, str(tmp_path), 'known', 'mnist', geometry, 10)
  unknown, _ = data._write_cache(ds, str(tmp_path), 'unknown', 'mnist', geometry, None)
  np.testing.assert_array_equal(known, images)
  np.testing.assert_array_equal(unknown, images)
  with pytest.raises(data.DataError, match='lists 12'):
    data._write_cache(ds, str(tmp_path), 'short', 'mnist', geometry, 12)
  assert sorted(os.listdir(tmp_path)) == ['known.npy', 'unknown.npy']  # no partial files


def test_tfds_cache_writer_leaves_another_writers_file_alone(tmp_path):
  tf = pytest.importorskip('tensorflow')
  images = np.random.default_rng(6).integers(0, 256, (10, 20, 20, 1)).astype(np.uint8)
  ds = tf.data.Dataset.from_tensor_slices({'image': images}).batch(4)
  geometry = dict(image_size=20, crop_size=0, channels=1)
  # The half-written file of a writer on another host sharing data_dir, whose process
  # and thread ids (in a container) can equal ours: it must be neither truncated nor
  # renamed into place.
  theirs = tmp_path / f'shared.npy.tmp{os.getpid()}.{threading.get_ident()}.npy'
  theirs.write_bytes(b'half of a cache')
  mine, _ = data._write_cache(ds, str(tmp_path), 'shared', 'mnist', geometry, 10)
  np.testing.assert_array_equal(mine, images)
  assert theirs.read_bytes() == b'half of a cache'


def test_the_decoded_tfds_caches_are_looked_for_where_the_readme_says(tmp_path, monkeypatch):
  # $AVAE_JAX_CACHE alone if set; else <data_dir>/avae_jax_cache for a local data_dir, then
  # ~/.cache/avae_jax (a bucket's data_dir has no local folder to hold it).
  home = os.path.join(os.environ['HOME'], '.cache', 'avae_jax')
  assert data.cache_dirs(_config()) == [home]
  assert data.cache_dirs(_config(data_dir=str(tmp_path))) == [
      str(tmp_path / 'avae_jax_cache'), home]
  assert data.cache_dirs(_config(data_dir='gs://bucket/tfds')) == [home]
  monkeypatch.setenv('AVAE_JAX_CACHE', str(tmp_path / 'mine'))
  assert data.cache_dirs(_config(data_dir=str(tmp_path))) == [str(tmp_path / 'mine')]


def test_a_decoded_tfds_cache_is_named_by_its_version_split_and_geometry():
  # Another version of the dataset, or another crop, must not be served the old images.
  def name(version='3.0.1', split='train', image_size=16, channels=1, crop_size=0):
    builder = type('Builder', (), {'version': version})
    geometry = dict(image_size=image_size, channels=channels, crop_size=crop_size)
    return data._cache_name(builder, 'mnist', split, geometry)
  names = {name(), name(version='3.0.2'), name(split='test'), name(image_size=32),
           name(channels=3), name(crop_size=20)}
  assert len(names) == 6 and name() == name()


def test_shapes_needs_images_large_enough_to_tell_its_factors_apart():
  small = _config(image_size=shapes.MIN_IMAGE_SIZE - 1)
  with pytest.raises(data.DataError, match=r'shapes needs image_size >= 12, got 11'):
    data.load(small)
  ok = _config(image_size=shapes.MIN_IMAGE_SIZE)
  ok.shapes.num_train, ok.shapes.num_eval = 16, 8
  assert data.load(ok).get([0]).shape == (1, 12, 12, 3)


def test_unknown_dataset_and_bad_channels():
  with pytest.raises(data.DataError, match='unknown dataset'):
    data.load(_config(dataset='imagenet'))
  with pytest.raises(data.DataError, match='channels'):
    data.load(_config(channels=2))
  with pytest.raises(data.DataError, match=r"^split must be 'train' or 'eval', got 'test'$"):
    data.load(_config(), 'test')


# --------------------------------------------------------------------------- batches


def _index_source(n, size=2):
  """A Source whose image i is the constant i / 1000, so batches reveal their indices."""
  def read(idx):
    return np.broadcast_to((idx / 1000.0).astype(np.float32)[:, None, None, None],
                           (len(idx), size, size, 1))
  return data.Source(read, n, (size, size, 1), name='index')


def _ids(batch):
  return np.round(batch.reshape(-1, batch.shape[-3] * batch.shape[-2])[:, 0] * 1000).astype(int)


def _take(it, k):
  return [next(it) for _ in range(k)]


def test_a_source_refuses_indices_out_of_range_and_a_read_of_another_shape():
  src = _index_source(5)
  for bad in ([-1], [5], [0, 7]):
    with pytest.raises(IndexError, match=r"out of range \[0, 5\) for 'index'"):
      src.get(bad)
  wrong = data.Source(lambda idx: np.zeros((len(idx), 3, 2, 1), np.float32), 5, (2, 2, 1),
                      name='wrong')
  with pytest.raises(data.DataError,
                     match=r'wrong: read \(2, 3, 2, 1\), expected \(2, 2, 2, 1\)'):
    wrong.get([0, 1])


def test_a_source_refuses_boolean_masks_and_non_integer_indices():
  # A cast to int64 read a mask as the indices 0 and 1 and truncated 2.7 to 2.
  src = _index_source(5)
  mask = np.array([False, False, True, False, True])
  for select in (src.get, src.subset):
    with pytest.raises(IndexError, match=r'must be integers, got dtype bool \(a boolean mask'):
      select(mask)
    with pytest.raises(IndexError, match='must be integers, got dtype float64'):
      select([2.7])
  np.testing.assert_array_equal(_ids(src.get(np.flatnonzero(mask))), [2, 4])
  np.testing.assert_array_equal(_ids(src.subset(np.int32([4, 1])).get([0, 1])), [4, 1])
  assert src.get([]).shape[0] == 0 and len(src.subset([])) == 0


def test_batches_follow_the_documented_schedule():
  src = _index_source(50)
  got = _take(data.batches(src, batch_size=8, seed=5), 13)  # 6 per epoch: into epoch 2
  for t, b in enumerate(got):
    epoch, i = divmod(t, 6)
    perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([5, epoch]))).permutation(50)
    np.testing.assert_array_equal(_ids(b), perm[i * 8:(i + 1) * 8])
    np.testing.assert_array_equal(data.batch_indices(50, 8, 5, t), perm[i * 8:(i + 1) * 8])


def test_dsprites_npz_factors_and_a_shuffled_eval_subset(tmp_path):
  # The release file's layout: 'imgs' (N, H, W) of 0/1 and 'latents_classes' (N, 6)
  # (colour, shape, scale, orientation, x, y), stored in factor order (y fastest).
  grid = np.stack(np.meshgrid(np.zeros(1), np.arange(3), np.zeros(1), np.zeros(1),
                              np.arange(8), np.arange(8), indexing='ij'), -1).reshape(-1, 6)
  grid = grid.astype(np.int64)
  n = len(grid)
  imgs = np.zeros((n, 16, 16), np.uint8)
  imgs[np.arange(n), grid[:, 4] * 2, grid[:, 5] * 2] = 1  # a dot at (2x, 2y)
  imgs[np.arange(n), 15, grid[:, 1]] = 1  # the shape's index as a dot on the last row
  np.savez(tmp_path / 'dsprites.npz', imgs=imgs, latents_classes=grid)
  cfg = _config(dataset=f'arrays:{tmp_path / "dsprites.npz"}', channels=1,
                eval_fraction=0.25)
  train, ev = data.load(cfg, 'train'), data.load(cfg, 'eval')
  assert (train.num_examples, ev.num_examples) == (n - n // 4, n // 4)
  rows = {tuple(f): i for i, f in enumerate(grid[:, 1:].tolist())}
  eval_rows = [rows[tuple(f)] for f in ev.factors.tolist()]
  train_rows = [rows[tuple(f)] for f in train.factors.tolist()]
  assert sorted(eval_rows + train_rows) == list(range(n))
  # Each image is its row's, its pixels 0/1 -> black/white.
  np.testing.assert_array_equal(ev.get(np.arange(ev.num_examples))[..., 0],
                                imgs[eval_rows].astype(np.float32))
  # The evaluation reads the first eval rows: a random sample, not the first shape's
  # corner of factor space (in index order the first 16 of 48 would all be shape 0).
  assert sorted(set(ev.factors[:16, 0].tolist())) == [0, 1, 2]
  assert eval_rows != sorted(eval_rows) and train_rows == sorted(train_rows)


def test_dsprites_npz_is_read_without_extra_copies(tmp_path):
  # The release file's images take 3 GB; converting them to 0/255 took two more copies.
  n = 4096
  imgs = np.zeros((n, 32, 32), np.uint8)
  imgs[:, 5, 7] = 1
  grid = np.zeros((n, 6), np.int64)
  np.savez(tmp_path / 'dsprites.npz', imgs=imgs, latents_classes=grid)
  tracemalloc.start()  # numpy reports its arrays' memory to tracemalloc
  try:
    arrays, factors = data._read_npz(str(tmp_path / 'dsprites.npz'))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  x = arrays['all']
  assert x.dtype == np.uint8 and x[:, 5, 7].min() == 255 and x.sum() == 255 * n
  assert factors.shape == (n, 5)
  assert imgs.nbytes <= peak < 1.5 * imgs.nbytes, (peak, imgs.nbytes)


def test_a_dsprites_npz_already_in_0_255_keeps_its_pixels(tmp_path):
  # Multiplied by 255 in uint8, a 255 pixel wrapped around to 1: white became near black.
  imgs = np.zeros((40, 16, 16), np.uint8)
  imgs[:, 3, 4] = 255
  np.savez(tmp_path / 'dsprites.npz', imgs=imgs, latents_classes=np.zeros((40, 6), np.int64))
  cfg = _config(dataset=f'arrays:{tmp_path / "dsprites.npz"}', channels=1)
  x = data.load(cfg, 'train').get(np.arange(4))
  assert x[:, 3, 4, 0].tolist() == [1.0] * 4 and x.sum() == 4


def test_load_splits_reads_an_array_file_once_for_both_splits(tmp_path):
  # An .npz is read whole and each split keeps the array it came from: loaded one after
  # the other, the splits held the images twice.
  imgs = np.arange(400 * 32 * 32, dtype=np.uint32).astype(np.uint8).reshape(400, 32, 32)
  np.savez(tmp_path / 'x.npz', images=imgs)
  cfg = _config(dataset=f'arrays:{tmp_path / "x.npz"}', channels=1, image_size=32,
                eval_fraction=0.25)
  tracemalloc.start()
  try:
    train, ev = data.load_splits(cfg)
    held = tracemalloc.get_traced_memory()[0]
  finally:
    tracemalloc.stop()
  assert imgs.nbytes <= held < 1.5 * imgs.nbytes, (held, imgs.nbytes)
  for got, split in ((train, 'train'), (ev, 'eval')):
    alone = data.load(cfg, split)
    assert got.num_examples == alone.num_examples
    rows = np.arange(got.num_examples)
    np.testing.assert_array_equal(got.get(rows), alone.get(rows))
  _close(ev.get(np.arange(100)), imgs[300:, ..., None] / 255)


def test_arrays_skip_label_files_but_not_unlabeled_images(tmp_path):
  # 'label' anywhere in the name skipped STL-10's unlabeled.npy, the only image file.
  np.save(tmp_path / 'unlabeled.npy', np.zeros((8, 16, 16, 3), np.uint8))
  for name in ('train_labels.npy', 'trainLabels.npy'):
    np.save(tmp_path / name, np.zeros((8,), np.uint8))
  src = data.load(_config(dataset=f'arrays:{tmp_path}', eval_fraction=0.25))
  assert src.num_examples == 6


def test_batches_deterministic_and_reshuffled_per_epoch():
  src = _index_source(50)
  a = [_ids(b) for b in _take(data.batches(src, batch_size=8, seed=1), 12)]
  b = [_ids(b) for b in _take(data.batches(src, batch_size=8, seed=1), 12)]
  c = [_ids(b) for b in _take(data.batches(src, batch_size=8, seed=2), 12)]
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  epoch0, epoch1 = np.concatenate(a[:6]), np.concatenate(a[6:])
  # Each epoch: 48 distinct examples (the remainder of 2 dropped), in a new order.
  assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48
  assert not np.array_equal(epoch0, epoch1)


def test_batches_resume_equals_continuation():
  src = _index_source(50)
  full = _take(data.batches(src, batch_size=8, seed=3), 16)
  resumed = _take(data.batches(src, batch_size=8, seed=3, start_step=5), 11)
  for x, y in zip(full[5:], resumed):
    np.testing.assert_array_equal(x, y)


def test_batches_process_slices_union_is_the_global_batch():
  src = _index_source(64, size=3)
  whole = _take(data.batches(src, batch_size=16, seed=0, num_local_devices=4), 6)
  parts = [_take(data.batches(src, batch_size=16, seed=0, process_index=p, process_count=2,
                              num_local_devices=2), 6) for p in range(2)]
  for t in range(6):
    assert whole[t].shape == (4, 4, 3, 3, 1) and parts[0][t].shape == (2, 4, 3, 3, 1)
    np.testing.assert_array_equal(np.concatenate([_ids(parts[0][t]), _ids(parts[1][t])]),
                                  _ids(whole[t]))


def test_batches_validate_sizes():
  src = _index_source(20)
  with pytest.raises(data.DataError, match='processes'):
    data.batches(src, batch_size=9, seed=0, process_count=2)
  for index in (-1, 2):
    with pytest.raises(data.DataError, match=rf'process_index {index} is not in \[0, 2\)'):
      data.batches(src, batch_size=8, seed=0, process_index=index, process_count=2)
  with pytest.raises(data.DataError, match='local devices'):
    data.batches(src, batch_size=8, seed=0, num_local_devices=3)
  with pytest.raises(data.DataError, match='larger than'):
    data.batches(src, batch_size=32, seed=0)
  # numpy's SeedSequence refuses negative seeds with 'expected non-negative integer'.
  with pytest.raises(data.DataError, match=r'seed must be >= 0 \(config.seed\), got -1'):
    data.batches(src, batch_size=4, seed=-1)
  with pytest.raises(data.DataError, match='seed must be >= 0'):
    data.batch_indices(20, 4, -3, 0)
  with pytest.raises(data.DataError, match='start_step must be >= 0, got -1'):
    data.batches(src, batch_size=4, seed=0, start_step=-1)
  # The same checks of the batch size for both (batch_size 0 was a ZeroDivisionError).
  for size, message in ((0, 'batch_size must be > 0, got 0'),
                        (32, 'batch_size 32 is larger than the 20 examples')):
    with pytest.raises(data.DataError, match=message):
      data.batch_indices(20, size, 0, 0)
    with pytest.raises(data.DataError, match=message):
      data.batches(src, batch_size=size, seed=0)
  # Whole numbers only: a seed or start of 0.5 ran as 0, a batch of 4.0 failed inside numpy.
  for kwargs, message in (({'seed': 0.5}, 'the data seed (config.seed) must be an integer, '
                           'got 0.5'),
                          ({'seed': True}, 'the data seed (config.seed) must be an integer, '
                           'got True'),
                          ({'start_step': 1.5}, 'start_step must be an integer, got 1.5'),
                          ({'batch_size': 4.0}, 'batch_size must be an integer, got 4.0'),
                          ({'num_local_devices': 2.0},
                           'num_local_devices must be an integer, got 2.0'),
                          ({'process_index': 0.5}, 'process_index must be an integer, got 0.5'),
                          ({'process_count': 1.5},
                           'process_count must be an integer, got 1.5')):
    with pytest.raises(data.DataError) as info:
      data.batches(src, **{'batch_size': 4, 'seed': 0, **kwargs})
    assert str(info.value) == message
  assert _ids(next(data.batches(src, batch_size=np.int32(4), seed=np.uint8(0),
                                start_step=np.int64(0)))).shape == (4,)
  for args, message in (((4.0,), 'batch_size must be an integer, got 4.0'),
                        ((4, 2.5), 'num_images must be an integer, got 2.5'),
                        ((4, None, 1.0), 'start must be an integer, got 1.0')):
    with pytest.raises(data.DataError) as info:
      next(data.eval_batches(src, *args))
    assert str(info.value) == message


def test_eval_batches_pad_and_mask():
  src = _index_source(10)
  out = list(data.eval_batches(src, 4, 10))
  assert [m.tolist() for _, m in out] == [[True] * 4, [True] * 4, [True, True, False, False]]
  ids = np.concatenate([_ids(x)[m] for x, m in out])
  np.testing.assert_array_equal(ids, np.arange(10))
  assert np.all(out[-1][0][2:] == 0) and out[-1][0].shape == (4, 2, 2, 1)
  assert len(list(data.eval_batches(src, 4, 6))) == 2
  assert sum(m.sum() for _, m in data.eval_batches(src, 4, 0)) == 10
  with pytest.raises(data.DataError, match='batch_size must be > 0, got 0'):
    next(data.eval_batches(src, 0))
  # From a start index: examples 6 .. 9, one full batch of 3 and a padded one.
  out = list(data.eval_batches(src, 3, 0, start=6))
  np.testing.assert_array_equal(np.concatenate([_ids(x)[m] for x, m in out]), np.arange(6, 10))
  assert [m.tolist() for _, m in out] == [[True] * 3, [True, False, False]]
