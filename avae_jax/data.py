"""Input pipeline: tfds / image folder / array files / procedural shapes -> device batches.

`load(config, split)` returns a `Source`: random access to float32 [0, 1] NHWC images of
side `config.image_size` with `config.channels` channels. `batches` turns a Source into a
deterministic, resumable stream of (num_local_devices, per_device, H, W, C) numpy batches,
which `avae_jax.prefetch.to_devices` moves onto the devices from a background thread.

Datasets (`config.dataset`):

* `shapes`: the procedural dataset of `avae_jax.shapes`, rendered once at load time
  (config.shapes.num_train / num_eval images, determined by config.seed; eval images are
  distinct and none is also a training image).
* `mnist`, `fashion_mnist`, `celeb_a`, `dsprites`: tensorflow_datasets, read from
  `config.data_dir`. Downloads happen only with `config.download=True`. The split is
  decoded once, cropped/resized, and cached as a uint8 .npy (see `cache_dirs`); later
  runs memory-map the cache and need no TensorFlow to read it (tfds still gives the
  dataset's version, part of the cache's name).
  'eval' is `config.eval_split` (a tfds split string, slices included); dsprites, which
  has only 'train', holds out a fixed random `eval_fraction` of `config.train_split`
  instead (row choice seeded with 0, independent of config.seed; kept in random order),
  and 'train' is the rest. With several splits, an eval split the dataset lacks is a
  DataError.
* `folder:PATH`: every .jpg/.jpeg/.png/.bmp/.webp below PATH (recursive, each directory
  once however many symlinks lead to it, sorted by relative path), decoded with PIL,
  preprocessed and rounded to uint8 once, into a memory-mapped .npy in the user's cache
  directory named by a hash of the folder's real path and listing (paths, sizes,
  modification times) and the geometry; where it has no room or cannot be written,
  decoded the same way at each `get`. Files below a top-level directory named as an eval
  split (one of EVAL_TOKENS, the words of `arrays:` below: `test/`, `t10k/`, `eval/`,
  `val/`, ...) are 'eval', the others 'train'. Without such a directory (or with every
  image below one), 'eval' is the last `eval_fraction` of the sorted files when all are in
  one directory (CelebA's `img_align_celeba`), else a fixed random `eval_fraction` of them
  (seed 0; kept in random order), and 'train' the rest.
* `arrays:PATH`: PATH is a file, a directory (its array files, not recursive) or a glob.
  Array files: `.npy`, `.npz`, and MNIST idx files, raw or gzipped (`*.idx`,
  `*-idx3-ubyte`, `*.idx3-ubyte`, with optional `.gz`). Files whose name contains
  'label' (`trainLabels.npy`, `y_labels.npy`; not 'unlabel': STL-10's `unlabeled.npy`)
  are skipped in directories/globs, and so is a `.gz` file beside its unpacked copy.
  A file belongs to 'eval' when its name, split at non-alphanumerics, has a token among
  test, t10k, eval, val, valid, validation; every other file is 'train'. Several files
  of one split are concatenated in sorted name order. Without any eval file, 'eval' is
  the last `eval_fraction` of the train images and 'train' the rest. Inside a .npz the
  image array is 'image', 'images', 'imgs' or 'x'; or split keys 'x_train'/'x_test',
  'train_images'/'test_images' (same token rule); or its only array. Arrays are
  (N, H, W) or (N, H, W, C) with C in (1, 3); uint8 is divided by 255, bool becomes
  0/1, floats are kept and must lie in [0, 1]. The dSprites .npz ('imgs' with
  'latents_classes') has 0/1 pixels: they are scaled to [0, 1] white (a copy already
  in 0..255 is kept as it is) and its latent classes become `factors`.
  Fashion-MNIST on Debian: `apt-get install dataset-fashion-mnist`, then
  `arrays:/usr/share/datasets/fashion-mnist/` (train-images-idx3-ubyte.gz -> train,
  t10k-images-idx3-ubyte.gz -> eval).

Geometry (tfds images, folders, arrays): a centred square crop of side
`config.crop_size` (0: the largest centred square, so that nothing is stretched;
top = (H - side) // 2, left = (W - side) // 2), then an antialiased resize to
`image_size` (PIL bilinear: a triangle filter widened by the downscale factor, so no
aliasing and no overshoot beyond [0, 1]), then channel conversion (RGB -> luma
0.299 R + 0.587 G + 0.114 B, or gray repeated to RGB).
"""

from __future__ import annotations

import concurrent.futures
import glob as glob_lib
import gzip
import hashlib
import io
import math
import os
import re
import shutil
import time
import zipfile
import zlib
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import numpy as np

from avae_jax import config_lib
from avae_jax import files
from avae_jax import filters
from avae_jax import metrics
from avae_jax import shapes as shapes_lib

LUMA = np.array(filters.LUMA, dtype=np.float32)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
EVAL_TOKENS = frozenset({'test', 't10k', 'eval', 'val', 'valid', 'validation'})
TFDS_DATASETS = config_lib.TFDS_DATASETS
# Splits of the supported tfds datasets, for when the builder's info does not list them
# (not prepared yet, or mocked in tests).
_TFDS_SPLITS = {
    'mnist': ('train', 'test'),
    'fashion_mnist': ('train', 'test'),
    'celeb_a': ('train', 'validation', 'test'),
    'dsprites': ('train',),
}
_DSPRITES_FACTORS = ('shape', 'scale', 'orientation', 'x_position', 'y_position')
# Version of the decoded caches' contents, per dataset (a new version means a new file):
# dSprites' v1 caches resized its 0/1 pixels without anti-aliasing.
_CACHE_FORMAT = {'dsprites': 'v2'}
# The files of the decoded caches (tfds and folders): images, and dSprites' factors.
_CACHE_SUFFIXES = ('.npy', '.npz')
# idx header dtype codes (http://yann.lecun.com/exdb/mnist/): big-endian payload.
_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


class DataError(ValueError):
  """Data that cannot be read as configured; the message says how to provide it."""


# ----------------------------------------------------------------------------- Source


class Source:
  """Random access to a dataset split: float32 [0, 1] images (n, H, W, C) by index."""

  def __init__(self, read: Callable[[np.ndarray], np.ndarray], num_examples: int,
               image_shape: tuple[int, int, int], *, name: str = '',
               factors: np.ndarray | None = None, factor_names: Sequence[str] = (),
               files: Sequence[str] | None = None):
    """`read(indices)` gives those images; `factors` (n, F) ground-truth factor indices.

    factor_names name the F factors; sources without factors (most datasets) leave both
    out. `files` (folder sources) names the image file behind each index.
    """
    self._read = read
    self.num_examples = int(num_examples)
    self.image_shape = tuple(int(d) for d in image_shape)
    self.name = name
    self.factors = factors
    self.factor_names = tuple(factor_names)
    self.files: list[str] | None = None if files is None else list(files)

  def __len__(self) -> int:
    """The number of examples."""
    return self.num_examples

  def __repr__(self) -> str:
    return (f'Source({self.name!r}, num_examples={self.num_examples}, '
            f'image_shape={self.image_shape}, factors={self.factor_names or None})')

  def get(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
    """Images at `indices` (any order, repeats allowed): float32 (n, H, W, C) in [0, 1]."""
    idx = _integer_indices(indices, 'indices').reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_examples):
      raise IndexError(f'indices out of range [0, {self.num_examples}) for {self.name!r}')
    if not idx.size:
      return np.zeros((0,) + self.image_shape, np.float32)
    out = np.asarray(self._read(idx), dtype=np.float32)
    if out.shape != (idx.size,) + self.image_shape:
      raise DataError(f'{self.name}: read {out.shape}, expected {(idx.size,) + self.image_shape}')
    return out

  def subset(self, rows: np.ndarray, name: str | None = None) -> 'Source':
    """A Source of the given rows of this one, in that order."""
    rows = _integer_indices(rows, 'rows')
    return Source(lambda idx: self._read(rows[idx]), len(rows), self.image_shape,
                  name=name or self.name,
                  factors=None if self.factors is None else self.factors[rows],
                  factor_names=self.factor_names,
                  files=None if self.files is None else [self.files[r] for r in rows])


def _integer_indices(values: Any, what: str) -> np.ndarray:
  """`values` as int64 indices; IndexError for booleans and non-integer numbers."""
  array = np.asarray(values)
  # A cast would read a boolean mask as the indices 0 and 1 (one image per mask entry)
  # and truncate 2.7 to 2. An empty list is float64 to numpy, and selects nothing.
  if array.size and array.dtype.kind not in 'iu':
    hint = ' (a boolean mask: pass np.flatnonzero(mask))' if array.dtype.kind == 'b' else ''
    raise IndexError(f'{what} must be integers, got dtype {array.dtype}{hint}')
  return array.astype(np.int64)


# Float image files are checked to lie in [0, 1] row by row up to this size at load time.
_RANGE_SCAN_BYTES = 1 << 30
def _check_range(x: np.ndarray, what: str) -> None:
  """DataError unless the float images x lie in [0, 1] (up to float rounding)."""
  if x.size:
    metrics.check_unit_range(x.min(), x.max(), what, error=DataError)


def _array_reader(images: np.ndarray, scale: float,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  what: str = 'the images') -> Callable[[np.ndarray], np.ndarray]:
  """A `read` for an (N, h, w, c) array: gather rows, scale to [0, 1], then transform."""
  def read(idx: np.ndarray) -> np.ndarray:
    # Memory-mapped arrays read fastest in ascending order; restore the order after.
    order = np.argsort(idx, kind='stable')
    rows = np.empty((len(idx),) + images.shape[1:], images.dtype)
    rows[order] = images[idx[order]]
    x = rows.astype(np.float32)
    if scale != 1.0:
      x *= np.float32(scale)
    elif images.dtype.kind == 'f' and images.nbytes > _RANGE_SCAN_BYTES:
      _check_range(x, what)  # rows that the load-time check may not have read
    return transform(x) if transform is not None else x
  return read


# ------------------------------------------------------------------ image geometry


def _check_channels(channels: int) -> int:
  """Returns channels if it is 1 or 3, else raises DataError."""
  if int(channels) not in (1, 3):
    raise DataError(f'config.channels must be 1 (grayscale) or 3 (RGB), got {channels}')
  return int(channels)


def crop_box(height: int, width: int, crop_size: int) -> tuple[int, int, int]:
  """(top, left, side) of the centred square crop; crop_size 0 = the largest square."""
  side = min(height, width) if crop_size <= 0 else int(crop_size)
  if side > min(height, width):
    raise DataError(f'crop_size {crop_size} is larger than the image ({height}x{width}); '
                    'choose crop_size <= the shorter side, or 0 for the largest square')
  return (height - side) // 2, (width - side) // 2, side


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Antialiased bilinear resize of one (h, w, c) image to (size, size, c).

  Floats, and uint8 images of 1 or 3 channels, keep their dtype; other images come back
  float32, except one already of that size, which comes back as it is.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, c = image.shape
  if (h, w) == (size, size):
    return image
  box = (size, size)
  if image.dtype == np.uint8 and c in (1, 3):
    pil = Image.fromarray(image[..., 0] if c == 1 else image, 'L' if c == 1 else 'RGB')
    out = np.asarray(pil.resize(box, Image.BILINEAR))
    return out[..., None] if c == 1 else out
  # Floats (and odd channel counts): one 32-bit float plane at a time.
  planes = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., k], np.float32), 'F')
                       .resize(box, Image.BILINEAR)) for k in range(c)]
  return np.stack(planes, axis=-1).astype(image.dtype if image.dtype.kind == 'f' else np.float32)


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """(..., c) float images with `channels` channels: RGB -> luma, gray -> RGB repeat.

  Images that have `channels` already come back unchanged; any other pair is a DataError.
  """
  c = images.shape[-1]
  if c == channels:
    return images
  if c == 3 and channels == 1:
    return (images @ LUMA)[..., None].astype(np.float32)
  if c == 1 and channels == 3:
    return np.repeat(images, 3, axis=-1)
  raise DataError(f'cannot convert {c}-channel images to {channels} channels; '
                  'images must have 1 (gray) or 3 (RGB) channels')


def preprocess(image: np.ndarray, *, image_size: int, crop_size: int, channels: int,
               scale: float | None = None) -> np.ndarray:
  """One (h, w, c) image -> centre crop, antialiased resize, channels: float32 [0, 1]."""
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise DataError(f'bad image channels: shape {image.shape}; images must be (H, W), '
                    '(H, W, 1) or (H, W, 3)')
  top, left, side = crop_box(image.shape[0], image.shape[1], crop_size)
  image = resize(image[top:top + side, left:left + side], image_size)
  if scale is None:
    scale = 1.0 / 255.0 if image.dtype == np.uint8 else 1.0
  x = image.astype(np.float32) * np.float32(scale)
  return convert_channels(x, channels)


def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
  """Threads for reading and resizing images (PIL releases the GIL, so they overlap)."""
  return concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))


def _stack_map(fn: Callable[[Any], np.ndarray], items: Sequence[Any],
               pool: concurrent.futures.Executor | None) -> np.ndarray:
  """np.stack of fn over items, on the pool's threads where there are more than a few."""
  if pool is not None and len(items) > 4:
    return np.stack(list(pool.map(fn, items)))
  return np.stack([fn(item) for item in items])


def _preprocess_many(images: Sequence[np.ndarray], pool: concurrent.futures.Executor | None,
                     **kwargs: Any) -> np.ndarray:
  """preprocess() over a list of images."""
  return _stack_map(lambda im: preprocess(im, **kwargs), images, pool)


def _geometry(config: Any) -> dict[str, int]:
  """The preprocess() keyword arguments from the config."""
  return dict(image_size=int(config.image_size), crop_size=int(config.get('crop_size', 0) or 0),
              channels=_check_channels(config.channels))


def _eval_fraction(config: Any) -> float:
  """The share of a single-split dataset held out for evaluation (configs/default.py)."""
  return float(config.get('eval_fraction', 0.05))


def _image_shape(geometry: dict[str, int]) -> tuple[int, int, int]:
  """(H, W, C) of the images that preprocess(**geometry) makes."""
  return (geometry['image_size'], geometry['image_size'], geometry['channels'])


def _num_eval(num: int, fraction: float, what: str) -> int:
  """Size of the held-out tail/subset: 0 for fraction <= 0, else about num * fraction.

  round(num * fraction), at least 1 and less than num (a DataError when num is too small).
  """
  if fraction <= 0:
    return 0
  k = max(1, int(round(num * float(fraction))))
  if k >= num:
    raise DataError(f'{what}: {num} examples are too few to hold out eval_fraction='
                    f'{fraction} for evaluation')
  return k


def _holdout_rows(num: int, split: str, fraction: float, what: str,
                  shuffled: bool = False) -> np.ndarray:
  """Rows of `split` when eval is held out of one array of `num` examples.

  Eval is the last round(num * fraction) rows (at least 1), or with `shuffled` a fixed
  random subset of that size (seed 0, independent of config.seed) in random order, for
  data stored in factor order such as dSprites; train is the other rows, in index order.
  """
  k = _num_eval(num, fraction, what)
  if split == 'eval' and not k:
    raise DataError(f'{what} has no eval split and eval_fraction is 0; set '
                    'config.eval_fraction > 0')
  if not shuffled:
    return np.arange(num - k, num) if split == 'eval' else np.arange(num - k)
  perm = _fixed_order(num)
  # Eval stays shuffled: the evaluation reads its first eval.num_images rows, which in
  # index order would all come from one corner of factor space (dSprites' first shape).
  return perm[:k] if split == 'eval' else np.sort(perm[k:])


def _fixed_order(rows: int | np.ndarray) -> np.ndarray:
  """`rows` (or range(rows)) in a held-out split's random order: seed 0, any config.seed."""
  return np.random.default_rng(0).permutation(rows)


# ------------------------------------------------------------------------ load


def load(config: Any, split: str = 'train') -> Source:
  """The configured dataset split ('train' or 'eval') as a Source; DataError if missing."""
  return _load(config, split, {})


def load_splits(config: Any) -> tuple[Source, Source]:
  """The configured dataset's train and eval splits; each array file is read once for both.

  A .npz or idx file is read whole (neither can be memory-mapped) and each split's Source
  keeps the array it came from: loaded one after the other, the two splits would hold the
  dSprites release (3 GB) twice.
  """
  memo: dict[str, Any] = {}
  return _load(config, 'train', memo), _load(config, 'eval', memo)


def _load(config: Any, split: str, memo: dict[str, Any]) -> Source:
  """load(), with `memo` (path -> what it read) shared by the calls of one load_splits."""
  if split not in ('train', 'eval'):
    raise DataError(f"split must be 'train' or 'eval', got {split!r}")
  name = str(config.dataset)
  _check_channels(config.channels)
  if name == 'shapes':
    return _load_shapes(config, split)
  if name in TFDS_DATASETS:
    return _load_tfds(config, split)
  if name.startswith('folder:'):
    return _load_folder(config, os.path.expanduser(name[len('folder:'):]), split, memo)
  if name.startswith('arrays:'):
    return _load_arrays(config, os.path.expanduser(name[len('arrays:'):]), split, memo)
  raise DataError(f'unknown dataset {name!r}; choose one of {", ".join(TFDS_DATASETS)}, '
                  'shapes, folder:PATH (a folder of images) or arrays:PATH '
                  '(.npy, .npz, idx, idx.gz)')


# ------------------------------------------------------------------------ shapes


def _load_shapes(config: Any, split: str) -> Source:
  """The procedural shapes split, rendered now (uint8 in memory)."""
  num_train, num_eval = int(config.shapes.num_train), int(config.shapes.num_eval)
  num = num_train if split == 'train' else num_eval
  if num <= 0:
    raise DataError(f'config.shapes.num_{split} must be > 0, got {num}')
  if int(config.image_size) < shapes_lib.MIN_IMAGE_SIZE:
    raise DataError(f'shapes needs image_size >= {shapes_lib.MIN_IMAGE_SIZE}, got '
                    f'{config.image_size}: smaller, some of its factor combinations render '
                    'as one image, and an eval image could be a training image')
  seed = _check_seed(config.seed)
  try:  # train leaves out the eval images, so both splits check num_eval
    factors = shapes_lib.sample_factors(seed, split, num_train, num_eval)
  except ValueError as e:
    raise DataError(f'config.shapes.{e}') from None
  size, channels = int(config.image_size), int(config.channels)
  images = shapes_lib.render_uint8(factors, size, channels)
  return Source(_array_reader(images, 1.0 / 255.0), num, (size, size, channels),
                name=f'shapes/{split}', factors=factors,
                factor_names=shapes_lib.FACTOR_NAMES)


# ------------------------------------------------------------------------ tfds


def cache_dirs(config: Any) -> list[str]:
  """Where decoded tfds splits are cached, in lookup order (folders: _folder_cache_dir).

  $AVAE_JAX_CACHE alone if set; else `<data_dir>/avae_jax_cache` when data_dir is a
  local folder, then ~/.cache/avae_jax (used as well when the first is not writable).
  """
  data_dir = config.get('data_dir', None)
  if (os.environ.get(files.CACHE_ENV) or not data_dir
      or files.is_remote(str(data_dir))):
    return [files.user_cache_dir()]
  return [os.path.join(os.path.expanduser(str(data_dir)), 'avae_jax_cache'),
          files.user_cache_dir()]


def _not_prepared_message(name: str, data_dir: Any, detail: str, *,
                          found_none: bool = True) -> str:
  """How to provide a tfds dataset that is not prepared (found_none: none found there)."""
  where = data_dir or '~/tensorflow_datasets (tfds default)'
  local = {
      'celeb_a': "dataset='folder:/path/to/img_align_celeba' (the aligned JPEGs from "
                 'img_align_celeba.zip)',
      'fashion_mnist': "dataset='arrays:/usr/share/datasets/fashion-mnist/' (Debian: "
                       'apt-get install dataset-fashion-mnist)',
      'mnist': "dataset='arrays:/path/to/mnist/' (train-images-idx3-ubyte.gz and "
               't10k-images-idx3-ubyte.gz, or a .npz with x_train/x_test)',
      'dsprites': "dataset='arrays:/path/to/dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz'",
  }[name]
  return (
      # Another error (no network or credentials for a bucket, say) is not "not prepared".
      f'tfds dataset {name!r} '
      f'{"is not prepared in" if found_none else "could not be read from"} '
      f'data_dir={where} ({detail}). Provide it '
      'in one of these ways:\n'
      f'  1. set config.data_dir to a folder or gs:// bucket that holds prepared tfds data '
      f'({name}/<version>/dataset_info.json and its record files);\n'
      f'  2. prepare it on a machine with network (`tfds build {name} --data_dir=DIR`) and '
      'copy DIR here, then set config.data_dir=DIR;\n'
      f'  3. manual download: fetch the files by hand and read them directly with {local}; '
      'any folder:PATH (images) or arrays:PATH (.npy/.npz/idx) works;\n'
      '  4. set config.download=True to let tfds download and prepare it here (needs '
      'network).')


def _split_base(split: str) -> str:
  """'train[:90%]' -> 'train'."""
  return re.split(r'[\[+(]', split, maxsplit=1)[0].strip()


def _tfds_builder(config: Any, name: str):
  """The tfds builder for `name` under config.data_dir; never touches the network."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f'tensorflow_datasets is needed for dataset {name!r} '
                    f'(pip install tensorflow-datasets tensorflow-cpu): {e}') from e
  try:
    return tfds.builder(name, data_dir=config.get('data_dir', None), try_gcs=False)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(_not_prepared_message(name, config.get('data_dir', None),
                                          f'{type(e).__name__}: {e}', found_none=False)) from e


# The size assumed for a split whose size tfds does not know yet (a dataset before its
# download, tfds.testing.mock_data): percent slices compare as they would at any size.
_UNKNOWN_SPLIT_SIZE = 10**9


def _splits_overlap(train_split: str, eval_split: str, builder: Any) -> bool:
  """Whether two tfds split specs ('train[:90%]+test', ...) share an example."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  names = {_split_base(p) for s in (train_split, eval_split) for p in s.split('+')}
  try:
    infos = dict(builder.info.splits)
  except Exception:  # pylint: disable=broad-except
    infos = {}
  for name in names - set(infos):
    infos[name] = tfds.core.SplitInfo(name=name, shard_lengths=[_UNKNOWN_SPLIT_SIZE],
                                      num_bytes=0)
  try:
    train, evals = (tfds.core.ReadInstruction.from_spec(s).to_absolute(infos)
                    for s in (train_split, eval_split))
  except (ValueError, KeyError, AssertionError):
    return False  # a malformed spec: tfds names it when it reads the split

  def ranges(instructions: Any) -> list[tuple[str, int, int]]:
    """(split, first, end) of each part; an open end is the split's start or size."""
    return [(r.splitname, r.from_ or 0,
             infos[r.splitname].num_examples if r.to is None else r.to) for r in instructions]

  return any(a == b and max(a0, b0) < min(a1, b1)
             for a, a0, a1 in ranges(train) for b, b0, b1 in ranges(evals))


def _load_tfds(config: Any, split: str) -> Source:
  """A tfds split, decoded and preprocessed once into a memory-mapped uint8 cache."""
  name = str(config.dataset)
  builder = _tfds_builder(config, name)
  try:
    listed = tuple(builder.info.splits.keys())
  except Exception:  # pylint: disable=broad-except
    listed = ()
  available = listed or _TFDS_SPLITS[name]
  train_split, eval_split = str(config.train_split), str(config.eval_split)
  # Only a dataset with one split (dSprites) holds out part of it; with several, an
  # unknown eval split is a typo, not a request to shrink the training set.
  holdout = _split_base(eval_split) not in available
  if holdout and len(available) > 1:
    raise DataError(f'{name} has no split {eval_split!r} (it has {", ".join(available)}); '
                    'set config.eval_split to one of them (or slice one split for both, '
                    "e.g. train_split='train[:90%]', eval_split='train[90%:]')")
  if not holdout and _splits_overlap(train_split, eval_split, builder):
    if len(available) > 1:
      advice = ("slice one split for both, e.g. train_split='train[:90%]', "
                "eval_split='train[90%:]'")
    else:
      # dSprites is stored in factor order: a slice's tail is one shape at its largest
      # scales, which training would never see.
      advice = (f'set eval_split to a name {name} lacks (the default, test) to hold out a '
                'random eval_fraction of it')
    raise DataError(f'{name}: eval_split {eval_split!r} shares examples with train_split '
                    f'{train_split!r}, so the evaluation would measure training images; '
                    + advice)
  tfds_split = eval_split if (split == 'eval' and not holdout) else train_split
  fraction = _eval_fraction(config)
  if holdout and fraction <= 0:
    raise DataError(f'{name} has no split {eval_split!r} (it has {", ".join(available)}) '
                    'and eval_fraction is 0; set config.eval_split or eval_fraction > 0')

  geometry = _geometry(config)
  images, factors = _tfds_cached(config, builder, name, tfds_split, geometry)
  source = Source(_array_reader(images, 1.0 / 255.0), len(images), _image_shape(geometry),
                  name=f'{name}/{tfds_split}', factors=factors,
                  factor_names=_DSPRITES_FACTORS if factors is not None else ())
  if not holdout:
    return source
  rows = _holdout_rows(len(images), split, fraction, name, shuffled=True)
  return source.subset(rows, name=f'{name}/{tfds_split}:{split}')


def _cache_name(builder: Any, name: str, split: str, geometry: dict[str, int]) -> str:
  """File stem of a cached split: dataset, version, split and geometry."""
  safe_split = re.sub(r'[^A-Za-z0-9_.%-]+', '_', split)
  if safe_split != split:
    # 'train[:90%]' and 'train[90%:]' read alike once made safe: the exact split's hash
    # keeps their caches apart.
    safe_split += '-' + hashlib.sha256(split.encode()).hexdigest()[:10]
  return (f'{name}-{builder.version}-{safe_split}-{geometry["image_size"]}px-'
          f'{geometry["channels"]}ch-crop{geometry["crop_size"]}-'
          f'{_CACHE_FORMAT.get(name, "v1")}')


def _open_cache(directory: str, stem: str, name: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(images uint8 memmap, dSprites' factors or None) of a cached split, as it is on disk."""
  path = os.path.join(directory, stem + '.npy')
  images = np.lib.format.open_memmap(path, mode='r')  # a .npy only: no pickles, no zips
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f'{images.dtype} array of shape {images.shape}, not uint8 images')
  if name != 'dsprites':
    return images, None
  with np.load(os.path.join(directory, stem + '-factors.npz')) as z:
    return images, z['factors']


def _read_cache(directory: str, stem: str, name: str, warn: bool = True
                ) -> tuple[np.ndarray, np.ndarray | None] | None:
  """_open_cache's result, or None if the cache is damaged (then made anew by the caller).

  Warned about where `warn`, as a damaged folder cache is (_folder_cache_file).
  """
  try:
    return _open_cache(directory, stem, name)
  # Cut short by a crash, say; dSprites' factors .npz so cut is a zip without its directory.
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
    if warn:
      logging.warning('the decoded cache %s is damaged (%s) and is not used; the split is '
                      'decoded again', os.path.join(directory, stem + '.npy'), e)
    return None


def _tfds_cached(config: Any, builder: Any, name: str, split: str, geometry: dict[str, int]
                 ) -> tuple[np.ndarray, np.ndarray | None]:
  """(images uint8 memmap, factors or None) from the cache, building it if absent or damaged."""
  stem = _cache_name(builder, name, split, geometry)
  for d in cache_dirs(config):
    if os.path.exists(os.path.join(d, stem + '.npy')):
      files.remove_killed_cache_writes(d, _CACHE_SUFFIXES)
      cached = _read_cache(d, stem, name)
      if cached is not None:
        return cached

  dataset = _tfds_dataset(config, builder, name, split)
  try:
    expected = int(builder.info.splits[split].num_examples) or None
  except Exception:  # pylint: disable=broad-except
    expected = None
  last_error = None
  for d in cache_dirs(config):
    try:
      os.makedirs(d, exist_ok=True)
      # Processes that need the split at once (launch.py's) decode it once.
      with files.exclusive(d, f'the decoding of {name} {split}', wait=True,
                           lock_file=stem + '.lock'):
        # Made while this one waited? (A damaged one was reported above.)
        cached = (_read_cache(d, stem, name, warn=False)
                  if os.path.exists(os.path.join(d, stem + '.npy')) else None)
        if cached is not None:
          return cached
        return _write_cache(dataset, d, stem, name, geometry, expected)
    except OSError as e:  # not writable: try the next place
      last_error = e
  raise DataError(f'cannot write the decoded {name} cache to any of {cache_dirs(config)}: '
                  f'{last_error}')


def _tfds_dataset(config: Any, builder: Any, name: str, split: str):
  """tf.data.Dataset of the split's features we use; DataError (fast) if not prepared."""
  data_dir = config.get('data_dir', None)
  if config.get('download', False):
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(_not_prepared_message(
          name, data_dir, f'download_and_prepare failed: {type(e).__name__}: {e}')) from e
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False)
  except AssertionError as e:  # tfds' "could not find data in ..."
    raise DataError(_not_prepared_message(name, data_dir, 'no prepared files found')) from e
  except (KeyError, ValueError) as e:
    raise DataError(f'{name}: cannot read split {split!r}: {e}') from e
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(_not_prepared_message(name, data_dir, f'{type(e).__name__}: {e}',
                                          found_none=False)) from e
  keys = ['image']
  if name == 'dsprites':
    keys += [f'label_{f}' for f in _DSPRITES_FACTORS]
  return ds.map(lambda ex: {k: ex[k] for k in keys}).batch(256)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  """Float images in [0, 1] as the uint8 a decoded cache stores (read back as k / 255)."""
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _write_npy(chunks: Iterator[np.ndarray], path: str, shape: tuple[int, int, int],
               expected: int | None, what: str) -> int:
  """Writes uint8 image chunks to the .npy file `path`, synced; returns the image count.

  With the count known the chunks are appended after the header as they come (a
  CelebA-sized split never sits in memory whole; a full disk is an OSError, where a
  memory map's write would end the process with SIGBUS). Logs its progress every 30 s.
  """
  parts, count = [], 0
  start = last = time.monotonic()
  # Opened as given: np.save would add .npy to a temporary's name.
  with open(path, 'wb') as f:
    if expected:
      np.lib.format.write_array_header_1_0(
          f, {'descr': '|u1', 'fortran_order': False, 'shape': (expected,) + shape})
    for x in chunks:
      if expected:
        if count + len(x) > expected:
          raise DataError(f'{what}: split has more than the {expected} listed examples')
        f.write(np.ascontiguousarray(x, np.uint8).data)
      else:
        parts.append(x)
      count += len(x)
      now = time.monotonic()
      if now - last >= 30.0:
        last = now
        rate = count / (now - start)
        left = f', about {(expected - count) / rate:.0f} s left' if expected else ''
        logging.info('%s: %d%s images decoded into the cache (%.0f images/s%s)', what, count,
                     f'/{expected}' if expected else '', rate, left)
    if expected and count != expected:
      raise DataError(f'{what}: read {count} examples, the split lists {expected}')
    if count == 0:
      raise DataError(f'{what}: the split is empty')
    if not expected:
      np.save(f, np.concatenate(parts))
    f.flush()
    os.fsync(f.fileno())  # whole on disk before the rename makes it the cache
  logging.info('%s: %d images decoded into the cache in %.0f s', what, count,
               time.monotonic() - start)
  return count


def _write_cache(dataset: Any, directory: str, stem: str, name: str,
                 geometry: dict[str, int], expected: int | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
  """Decodes, preprocesses and saves the split; returns the memory-mapped result."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = os.path.join(directory, stem + '.npy')
  files.remove_killed_cache_writes(directory, _CACHE_SUFFIXES)
  # dSprites pixels are 0/1: stretched to 0/255 before resizing, as the uint8 resize
  # rounds to integers and would leave a 0/1 image binary (no anti-aliased edges).
  stretch = 255 if name == 'dsprites' else 1
  labels = []

  def chunks(pool: concurrent.futures.Executor) -> Iterator[np.ndarray]:
    for batch in tfds.as_numpy(dataset):
      raw = batch['image'] if stretch == 1 else batch['image'] * np.uint8(stretch)
      if name == 'dsprites':
        labels.append(np.stack([batch[f'label_{f}'] for f in _DSPRITES_FACTORS], 1))
      yield _to_uint8(_preprocess_many(list(raw), pool, **geometry))

  # A unique temporary name, then an atomic rename: concurrent processes (on several
  # hosts, with a shared data_dir) never see a half-written cache.
  with files.removed_on_exit(files.temporary_name(path)) as tmp:
    with _thread_pool() as pool:
      _write_npy(chunks(pool), tmp, _image_shape(geometry), expected, name)
    if name == 'dsprites':
      factors = os.path.join(directory, stem + '-factors.npz')
      with files.removed_on_exit(files.temporary_name(factors)) as ftmp:
        with open(ftmp, 'wb') as f:
          np.savez(f, factors=np.concatenate(labels).astype(np.int32))
        os.replace(ftmp, factors)
    os.replace(tmp, path)
  return _open_cache(directory, stem, name)


# ------------------------------------------------------------------------ folder


def _list_images(root: str) -> list[str]:
  """Image files below root (recursive, each directory once), sorted by relative path."""
  found = []
  # Symlinks are followed, but a directory reached twice (a link to it, or a link loop,
  # which os.walk follows 40 levels deep) would list its images again.
  seen = {os.path.realpath(root)}
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    kept = []
    for d in sorted(dirnames):
      real = os.path.realpath(os.path.join(dirpath, d))
      if real not in seen:
        seen.add(real)
        kept.append(d)
    dirnames[:] = kept
    for f in filenames:
      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith('.'):
        found.append(os.path.relpath(os.path.join(dirpath, f), root))
  return [os.path.join(root, f) for f in sorted(found)]


_EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 is upright


def _exif_orientation(im: Any) -> int:
  """A PIL image's EXIF orientation; 1 (upright) where it has none or a damaged block."""
  try:
    return int(im.getexif().get(_EXIF_ORIENTATION, 1))
  except Exception:  # pylint: disable=broad-except
    # PIL raises SyntaxError, among others, for a block it cannot parse; viewers then
    # show the pixels as stored, and so does this.
    return 1


def read_image(path: str) -> np.ndarray:
  """One image file as uint8 (H, W, 1) or (H, W, 3); DataError if it cannot be read so.

  8- and 16-bit gray (PIL modes L, I;16) give one channel, the modes PIL converts to RGB
  three; other modes and unreadable files are DataErrors. A picture with an EXIF
  orientation (a camera's) is turned the way viewers show it.
  """
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im.load()
      if _exif_orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
      mode = im.mode
      if mode == 'L':
        return np.asarray(im)[..., None]
      if mode in ('1', 'P', 'RGB', 'RGBA', 'LA', 'CMYK', 'YCbCr', 'RGBX', 'PA', 'La'):
        return np.asarray(im.convert('RGB'))
      if mode.startswith('I;16'):  # 16-bit gray PNG
        x = np.asarray(im, dtype=np.float32) / 65535.0
        return np.round(x * 255.0).astype(np.uint8)[..., None]
  # DecompressionBombError (PIL's guard against huge images) is neither of the other two.
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot read image {path}: {e}') from e
  raise DataError(f'bad image channels: {path} has PIL mode {mode!r}; use gray (L) or RGB images')


def _folder_rows(names: list[str], split: str, fraction: float, what: str) -> np.ndarray:
  """Rows of `split` among a folder's images (paths relative to it, sorted).

  Below top-level directories named as an eval split (the names EVAL_TOKENS: test/,
  t10k/, eval/, val/, ...) are the eval images, the others train. Otherwise (none such, or
  all images below them) eval is held out:
  the last `fraction` of one directory's images (CelebA's img_align_celeba, whose own
  validation and test images are its last), or a fixed random `fraction` of images in
  several directories (one per class, say), so that each is represented.
  """
  dirs = [os.path.dirname(n) for n in names]
  # The whole name of a top-level directory: a class called test_tube stays a class.
  marked = np.array([x.split(os.sep)[0].lower() in EVAL_TOKENS for x in dirs])
  by_name = bool(marked.any() and not marked.all())
  several = len(set(dirs)) > 1
  if split == 'train':  # once per run, as for arrays:
    held_out = f'held out ({"at random" if several else "the last files"}, eval_fraction)'
    if marked.all():  # as arrays: warns
      logging.warning('%s: every image is below a directory named as an eval split, so the '
                      'model trains on them and the eval split is %s', what, held_out)
    else:
      logging.info('%s: the eval split is %s', what,
                   'the directories named as one' if by_name else held_out)
  if not by_name:
    return _holdout_rows(len(names), split, fraction, what, shuffled=several)
  if split != 'eval':
    return np.flatnonzero(~marked)
  rows = np.flatnonzero(marked)
  if len({dirs[i] for i in rows}) > 1:
    # In random order: the evaluation reads the first eval.num_images, which in sorted
    # order would come from the first directory alone.
    rows = _fixed_order(rows)
  return rows


def _load_folder(config: Any, root: str, split: str, memo: dict[str, Any]) -> Source:
  """A folder of images, decoded once into a memory-mapped uint8 cache (or at each get)."""
  if not root:
    raise DataError("folder: needs a path, e.g. dataset='folder:/data/celeba/img_align_celeba'")
  if os.path.isfile(root):
    raise DataError(f'image folder {root!r} is a file, not a directory (dataset=folder:PATH; '
                    'for array or idx files: dataset=arrays:PATH)')
  if not os.path.isdir(root):
    raise DataError(f'image folder {root!r} does not exist (dataset=folder:PATH); for CelebA '
                    'download img_align_celeba.zip by hand, unzip it and point folder: at '
                    'the img_align_celeba/ directory')
  geometry = _geometry(config)
  key = f'folder:{root}:{sorted(geometry.items())}'
  if key not in memo:  # both splits of one load_splits list, stat and decode it once
    paths = _list_images(root)
    if not paths:
      raise DataError(f'image folder {root!r} holds no {"/".join(IMAGE_EXTENSIONS)} files '
                      '(searched recursively)')
    memo[key] = paths, _folder_cached(root, paths, geometry)
  paths, cached = memo[key]
  rows = _folder_rows([os.path.relpath(f, root) for f in paths], split,
                      _eval_fraction(config), f'folder {root}')
  chosen = [paths[i] for i in rows]
  name = f'folder:{root}:{split}'
  if cached is not None:
    source = Source(_array_reader(cached, 1.0 / 255.0), len(paths), _image_shape(geometry),
                    files=paths).subset(rows, name=name)
  else:
    read_image(paths[0])  # fail now, not at the first batch, if the images are unreadable
    pool: list[concurrent.futures.ThreadPoolExecutor] = []

    def read(idx: np.ndarray) -> np.ndarray:
      if not pool:  # created on first use, so that an unused Source holds no threads
        pool.append(_thread_pool())
      images = _stack_map(lambda path: _folder_image(path, geometry), [chosen[i] for i in idx],
                          pool[0])
      return images.astype(np.float32) * np.float32(1.0 / 255.0)  # as the cache reads

    source = Source(read, len(chosen), _image_shape(geometry), name=name, files=chosen)
  return source


# The decoded caches of folders: v1 holds each image preprocessed and rounded to uint8.
_FOLDER_CACHE_FORMAT = 'v1'
# Free space a folder's cache leaves on its disk; with less, the images are decoded at
# each batch instead.
_FOLDER_CACHE_HEADROOM = 1 << 30


def _first_ten(messages: list[str]) -> str:
  """The first ten messages joined by '; ', and '; ...' after them where there are more."""
  return '; '.join(messages[:10]) + ('; ...' if len(messages) > 10 else '')


def _folder_cache_dir() -> str:
  """Where folders' decoded caches go: the user's cache directory (files.user_cache_dir)."""
  return files.user_cache_dir()


def _folder_image(path: str, geometry: dict[str, int]) -> np.ndarray:
  """One image file preprocessed as uint8 (the cache's values); DataError naming it."""
  image = read_image(path)
  try:
    return _to_uint8(preprocess(image, **geometry))
  except DataError as e:  # an image smaller than crop_size: which one, of the folder's
    raise DataError(f'{path}: {e}') from None


def _folder_cache_stem(root: str, paths: list[str], geometry: dict[str, int]) -> str:
  """The cache's file stem: the folder's name, a hash of its listing, and the geometry.

  The listing's hash covers the folder's real path and each image's relative path, size
  and modification time, so an image added, removed or rewritten makes a new cache, and
  so does another folder of like names and sizes (two versions of a dataset unpacked with
  their archives' times), while a symbolic link to the folder finds its cache.
  """
  real = os.path.realpath(root)
  digest = hashlib.sha256(f'{real}\n'.encode())
  for path in paths:
    try:
      st = os.stat(path)
      entry = f'{st.st_size}\0{st.st_mtime_ns}'
    except OSError:  # a broken link (a git-annex file not fetched), or deleted since:
      entry = 'unreadable'  # the decoding names it with the folder's other bad images
    digest.update(f'{os.path.relpath(path, root)}\0{entry}\n'.encode())
  # The name's first 64 characters: a file name has at most 255.
  folder = re.sub(r'[^A-Za-z0-9_.-]+', '_', os.path.basename(real))[:64]
  return (f'folder-{folder}-{digest.hexdigest()[:16]}-{geometry["image_size"]}px-'
          f'{geometry["channels"]}ch-crop{geometry["crop_size"]}-{_FOLDER_CACHE_FORMAT}')


def _uncached(what: str, reason: str) -> None:
  """Warns that a folder is decoded at each batch, for `reason`; returns None."""
  logging.warning('%s: no decoded cache (%s); the images are decoded at each batch instead',
                  what, reason)


def _folder_cached(root: str, paths: list[str], geometry: dict[str, int]
                   ) -> np.ndarray | None:
  """The folder's images as a uint8 memory map, decoded now where not cached yet.

  None (the images are then decoded at each batch) where the cache directory lacks the
  space or cannot be written. Unreadable images are a DataError that counts them and names
  the first ten.
  Processes that need the same cache at once (launch.py's) make it once: the others
  wait for it.
  """
  directory = _folder_cache_dir()
  stem = _folder_cache_stem(root, paths, geometry)
  shape = (len(paths),) + _image_shape(geometry)
  what = f'folder {root}'
  cached = _folder_cache_file(directory, stem, shape)
  if cached is not None:
    files.remove_killed_cache_writes(directory, _CACHE_SUFFIXES)
    return cached
  try:
    os.makedirs(directory, exist_ok=True)
    # Before the free space is measured.
    files.remove_killed_cache_writes(directory, _CACHE_SUFFIXES)
    with files.exclusive(directory, f'the decoding of {what}', wait=True,
                         lock_file=stem + '.lock'):
      # Made while this process waited? (A damaged one was reported above.)
      cached = _folder_cache_file(directory, stem, shape, warn=False)
      if cached is not None:
        return cached
      size = math.prod(shape)
      free = shutil.disk_usage(directory).free
      if size + _FOLDER_CACHE_HEADROOM > free:
        return _uncached(what, f'the decoded images ({size / 2**20:.1f} MiB) would leave '
                         f'under {_FOLDER_CACHE_HEADROOM / 2**20:.0f} MiB free in {directory}; '
                         f'set {files.CACHE_ENV} to a directory with room (the FID weights '
                         'are looked for there too: move inception_fid.npz along)')
      _decode_folder(what, paths, geometry, os.path.join(directory, stem + '.npy'))
  except OSError as e:  # a full disk after all, no permission, a name too long
    return _uncached(what, f'cannot write to {directory}: {e}')
  return _folder_cache_file(directory, stem, shape)


def _folder_cache_file(directory: str, stem: str, shape: tuple[int, ...], warn: bool = True
                       ) -> np.ndarray | None:
  """The cache DIRECTORY/STEM.npy memory-mapped, or None if absent or damaged (warned)."""
  path = os.path.join(directory, stem + '.npy')
  if not os.path.exists(path):
    return None
  try:
    images = np.lib.format.open_memmap(path, mode='r')  # a .npy only: no pickles, no zips
  except (OSError, ValueError, EOFError) as e:  # truncated by a crash of its disk, say
    found = f'unreadable: {e}'
  else:
    if images.dtype == np.uint8 and images.shape == shape:
      return images
    found = f'a {images.dtype} array of shape {images.shape}'
  if warn:
    logging.warning('the decoded cache %s is damaged (%s; expected %d uint8 images of %s) '
                    'and is not used', path, found, shape[0], shape[1:])
  return None


def _decode_folder(what: str, paths: list[str], geometry: dict[str, int], path: str) -> None:
  """Decodes the images into the cache file `path` (written whole, then renamed)."""
  shape = _image_shape(geometry)
  logging.info('%s: decoding %d images once into %s (%.1f MiB)', what, len(paths), path,
               len(paths) * math.prod(shape) / 2**20)
  bad: list[tuple[str, str]] = []

  def decode(p: str) -> np.ndarray:
    try:
      return _folder_image(p, geometry)
    except DataError as e:
      bad.append((p, str(e)))
      return np.zeros(shape, np.uint8)

  def chunks(pool: concurrent.futures.Executor) -> Iterator[np.ndarray]:
    for lo in range(0, len(paths), 256):
      yield _stack_map(decode, paths[lo:lo + 256], pool)
    if bad:  # raised here, before the writer logs a cache made
      named = [message for _, message in sorted(bad)]
      raise DataError(f'{what}: {len(bad)} image(s) cannot be used; replace or remove '
                      f'them: {_first_ten(named)}')

  with files.removed_on_exit(files.temporary_name(path)) as tmp:
    with _thread_pool() as pool:
      _write_npy(chunks(pool), tmp, shape, len(paths), what)
    os.replace(tmp, path)


# ------------------------------------------------------------------------ arrays


def read_idx(path: str) -> np.ndarray:
  """An MNIST idx file (raw or gzipped), parsed from its header; DataError if malformed."""
  try:
    with open(path, 'rb') as f:
      gz = f.read(2) == b'\x1f\x8b'
    content = None
    if gz:
      # The whole stream before the header: gzip checks the CRC only at the end, and a
      # corrupted stream can decode to a wrong header, which would be reported as a file
      # of another format rather than a damaged one.
      with gzip.open(path, 'rb') as f:
        content = f.read()
    with (io.BytesIO(content) if gz else open(path, 'rb')) as f:
      header = f.read(4)
      if len(header) < 4 or header[0] != 0 or header[1] != 0 or header[2] not in _IDX_DTYPES:
        raise DataError(f'{path} is not an idx file (bad magic {header.hex()}): expected '
                        '0x0000 then a dtype code (08 ubyte, 09 byte, 0B short, 0C int, '
                        '0D float, 0E double) and the number of dimensions')
      dtype = np.dtype(_IDX_DTYPES[header[2]])
      ndim = header[3]
      dims_raw = f.read(4 * ndim)
      if len(dims_raw) < 4 * ndim:
        raise DataError(f'{path}: idx header truncated')
    dims = tuple(int(d) for d in np.frombuffer(dims_raw, '>u4'))
    count = int(np.prod(dims, dtype=np.int64))
    nbytes = count * dtype.itemsize
    offset = 4 + 4 * ndim
    size = len(content) if gz else os.path.getsize(path)
    if size < offset + nbytes:
      raise DataError(f'{path}: idx payload truncated ({size - offset} of {nbytes} bytes)')
    if not gz:
      arr = np.memmap(path, dtype=dtype, mode='r', offset=offset, shape=dims)
      return arr if dtype.itemsize == 1 else arr.astype(dtype.newbyteorder('='))
    payload = np.frombuffer(content, dtype, count=count, offset=offset)
    return payload.reshape(dims).astype(dtype.newbyteorder('='))
  # zlib.error: a damaged deflate stream (gzip's own errors cover the header and the CRC).
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'cannot read idx file {path}: {type(e).__name__}: {e}') from e


def _tokens(name: str) -> set[str]:
  """Lower-case alphanumeric tokens of a file or key name."""
  return set(t for t in re.split(r'[^a-z0-9]+', name.lower()) if t)


def _is_eval_name(name: str) -> bool:
  """Whether a file or key name marks the eval split (see module docstring)."""
  return bool(_tokens(name) & EVAL_TOKENS)


def _is_array_file(name: str) -> bool:
  """Whether a file name is one of the supported array formats."""
  low = name.lower()
  if low.endswith(('.npy', '.npz')):
    return True
  stem = low[:-3] if low.endswith('.gz') else low
  return bool(re.search(r'(\.idx\d*|[.\-_]idx\d+([.\-_]ubyte)?)$', stem))


def _array_files(spec: str) -> list[str]:
  """The array files that `arrays:PATH` names (file, directory or glob), sorted."""
  if os.path.isfile(spec):
    return [spec]
  if os.path.isdir(spec):
    paths = [os.path.join(spec, f) for f in sorted(os.listdir(spec))
             if os.path.isfile(os.path.join(spec, f))]
  elif any(ch in spec for ch in '*?['):
    paths = sorted(f for f in glob_lib.glob(spec) if os.path.isfile(f))
  else:
    raise DataError(f'arrays path {spec!r} does not exist (dataset=arrays:PATH with PATH a '
                    '.npy/.npz/idx/idx.gz file, a directory of them, or a glob)')
  arrays = [f for f in paths if _is_array_file(os.path.basename(f))]
  paths = [f for f in arrays if not re.search(r'(?<!un)label', os.path.basename(f).lower())]
  if not paths:
    # What was there instead, as the user may not expect either rule.
    labels = ', '.join(os.path.basename(f) for f in arrays)
    subdirs = os.path.isdir(spec) and any(
        os.path.isdir(os.path.join(spec, f)) for f in os.listdir(spec))
    raise DataError(f'no array files (.npy, .npz, *.idx, *-idx3-ubyte[.gz]) at {spec!r}'
                    + (f'; files named as labels are skipped: {labels}' if labels else '')
                    + ('; subdirectories are not searched: name one, or a glob'
                       if subdirs else ''))
  # An idx.gz beside its unpacked copy (gunzip -k) holds the same images: read once,
  # not concatenated into a split with every image twice.
  packed = [f for f in paths if f.lower().endswith('.gz') and f[:-3] in paths]
  if packed:
    logging.info('arrays:%s: reading %s, not the gzipped copies %s', spec,
                 ', '.join(os.path.basename(f[:-3]) for f in packed),
                 ', '.join(os.path.basename(f) for f in packed))
  return [f for f in paths if f not in packed]


_NPZ_IMAGE_KEYS = ('image', 'images', 'imgs', 'x')
_NPZ_SPLIT_WORDS = frozenset(_NPZ_IMAGE_KEYS)


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
  """{'all'|'train'|'eval': images} and optional factors from one .npz (see docstring)."""
  try:
    with np.load(path, allow_pickle=False) as z:
      keys = list(z.keys())
      for k in _NPZ_IMAGE_KEYS:
        if k in keys:
          x = z[k]
          factors = None
          if k == 'imgs' and 'latents_classes' in keys:  # the dSprites release file
            factors = z['latents_classes'][:, 1:].astype(np.int32)
            # In place: the release's 737,280 images take 3 GB, and astype and the
            # product would make two more copies.
            x = x if x.dtype == np.uint8 else x.astype(np.uint8)
            if x.max() <= 1:  # a copy already scaled to 0..255 would wrap around in uint8
              x *= np.uint8(255)
          return {'all': x}, factors
      split_keys = [k for k in keys if _tokens(k) & _NPZ_SPLIT_WORDS
                    and (_tokens(k) & EVAL_TOKENS or 'train' in _tokens(k))]
      if split_keys:
        out: dict[str, list[np.ndarray]] = {}
        for k in sorted(split_keys):
          out.setdefault('eval' if _is_eval_name(k) else 'train', []).append(z[k])
        return {s: np.concatenate(v) if len(v) > 1 else v[0] for s, v in out.items()}, None
      if len(keys) == 1:
        return {'all': z[keys[0]]}, None
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'cannot read arrays file {path}: {type(e).__name__}: {e}') from e
  raise DataError(f'{path}: no image array; name it one of {", ".join(_NPZ_IMAGE_KEYS)} '
                  f'(or x_train/x_test), found keys {keys}')


def _read_array_file(path: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
  """{'all'|'train'|'eval': images} and optional factors from one array file."""
  if path.lower().endswith('.npz'):
    return _read_npz(path)
  if path.lower().endswith('.npy'):
    try:
      x = np.load(path, mmap_mode='r', allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except
      reason = f'{type(e).__name__}: {e}'
      if isinstance(e, ValueError):
        with open(path, 'rb') as f:
          if f.read(6) != b'\x93NUMPY':
            # numpy takes any other content for a pickle, and its advice (allow_pickle)
            # is not the user's to take.
            reason = 'not a .npy array (it lacks the .npy header)'
      raise DataError(f'cannot read arrays file {path}: {reason}') from e
    if not isinstance(x, np.ndarray):  # np.load goes by the content: a .npz renamed .npy
      x.close()
      raise DataError(f'{path} is a .npz archive (a zip of arrays), not a .npy array: '
                      'rename it to .npz')
    return {'all': x}, None
  return {'all': read_idx(path)}, None


def _check_images(x: np.ndarray, what: str) -> tuple[np.ndarray, float]:
  """(N, H, W, C) view of an image array and the scale to [0, 1]; DataError if not images."""
  if x.ndim == 3 and x.shape[2] in (1, 3):
    # Read as (N, H, W), it would be N images 1 or 3 pixels wide, cropped and resized.
    raise DataError(f'{what}: shape {x.shape} looks like one (H, W, C) image, not '
                    '(N, H, W) images; save it as a batch of one, (1, H, W, C)')
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise DataError(f'{what}: shape {x.shape} is not (N, H, W) or (N, H, W, C) images')
  if x.shape[-1] not in (1, 3):
    hint = (' (it looks channels-first: transpose to (N, H, W, C))'
            if x.shape[1] in (1, 3) else '')
    raise DataError(f'bad image channels: {what} has shape {x.shape}; the last axis must be '
                    f'1 (gray) or 3 (RGB){hint}')
  if x.dtype == np.uint8:
    return x, 1.0 / 255.0
  if x.dtype == np.bool_:
    return x, 1.0
  if x.dtype.kind == 'f':
    # Every row, in chunks (memory-mapped files are read once, not loaded whole); past
    # _RANGE_SCAN_BYTES evenly spaced rows, and _array_reader checks each batch it reads.
    index = np.arange(len(x))
    if x.nbytes > _RANGE_SCAN_BYTES:
      rows = max(1, int(len(x) * _RANGE_SCAN_BYTES / x.nbytes))
      index = np.unique(np.linspace(0, len(x) - 1, rows).round().astype(np.int64))
    for start in range(0, len(index), 4096):
      _check_range(np.asarray(x[index[start:start + 4096]]), what)
    return x, 1.0
  raise DataError(f'{what}: dtype {x.dtype} is not supported; use uint8 (0..255) or '
                  'float in [0, 1]')


def _load_arrays(config: Any, spec: str, split: str, memo: dict[str, Any]) -> Source:
  """Images from .npy/.npz/idx files; split by file names or a held-out tail."""
  paths = _array_files(spec)
  parts: dict[str, list[np.ndarray]] = {'train': [], 'eval': []}
  factor_parts: dict[str, list[np.ndarray | None]] = {'train': [], 'eval': []}
  sources: dict[str, list[str]] = {'train': [], 'eval': []}
  scales: dict[str, float] = {}
  # Every file is read and checked before the error: one run names all the bad ones.
  problems: list[str] = []
  for path in paths:
    try:
      if path not in memo:
        memo[path] = _read_array_file(path)
      arrays, factors = memo[path]
      for key, x in arrays.items():
        dest = key if key in ('train', 'eval') else (
            'eval' if _is_eval_name(os.path.basename(path)) else 'train')
        x, scales[dest] = _check_images(x, path)
        parts[dest].append(x)
        factor_parts[dest].append(factors)
        sources[dest].append(os.path.basename(path) + ('' if key == 'all' else f'[{key}]'))
    except DataError as e:
      problems.append(str(e))
  if len(problems) == 1:
    raise DataError(problems[0])
  if problems:
    raise DataError(f'arrays:{spec}: {len(problems)} files cannot be used; fix them, or leave '
                    f'them out with a narrower PATH (a glob): {_first_ten(problems)}')
  if not parts['train'] and not parts['eval']:
    raise DataError(f'no images in {paths}')
  if split == 'train':  # once per run: which file went where is easy to get wrong
    if parts['train'] and parts['eval']:
      logging.info('arrays:%s: train split from %s, eval split from %s', spec,
                   ', '.join(sources['train']), ', '.join(sources['eval']))
    elif parts['train']:
      logging.info('arrays:%s: no file is named as an eval split (a word %s of its name), '
                   'so eval is held out of %s (eval_fraction)', spec,
                   '/'.join(sorted(EVAL_TOKENS)), ', '.join(sources['train']))
    else:  # a test set trained on is more likely a slip than a choice
      logging.warning('arrays:%s: every file is named as an eval split (%s), so the model '
                      'trains on their images and eval is held out of them (eval_fraction)',
                      spec, ', '.join(sources['eval']))

  def join(xs: list[np.ndarray], names: list[str]) -> np.ndarray:
    if len(xs) == 1:
      return xs[0]
    if len({(x.shape[1:], x.dtype) for x in xs}) > 1:
      # By name: which file is the odd one is what the user has to find.
      raise DataError(f'array files at {spec!r} differ in image shape or dtype: ' + ', '.join(
          f'{n} {x.shape} {x.dtype}' for n, x in zip(names, xs)))
    return np.concatenate(xs)

  both = bool(parts['eval'] and parts['train'])
  part = split if both else ('train' if parts['train'] else 'eval')
  images = join(parts[part], sources[part])
  # Factors only come with a single dSprites file.
  factors = factor_parts[part][0] if len(factor_parts[part]) == 1 else None
  rows = None if both else _holdout_rows(
      len(images), split, _eval_fraction(config), f'arrays:{spec}',
      shuffled=factors is not None)
  geometry = _geometry(config)
  try:  # now, naming the files, rather than at the first batch
    crop_box(images.shape[1], images.shape[2], geometry['crop_size'])
  except DataError as e:
    raise DataError(f'arrays:{spec} ({", ".join(sources[part])}): {e}') from None
  transform = None
  if images.shape[1:] != _image_shape(geometry) or geometry['crop_size']:
    transform = lambda x: _preprocess_many(list(x), None, scale=1.0, **geometry)
  names = _DSPRITES_FACTORS if factors is not None else ()
  source = Source(_array_reader(images, scales[part], transform, spec), len(images),
                  _image_shape(geometry), name=f'arrays:{spec}:{split}',
                  factors=factors, factor_names=names)
  return source if rows is None else source.subset(rows)


# ------------------------------------------------------------------------ batching


def _whole(value: Any, what: str) -> int:
  """`value` as an int; DataError for other numbers (0.5, True), which int() would cut."""
  if not config_lib.is_int(value):
    raise DataError(f'{what} must be an integer, got {value!r}')
  return int(value)


def _check_seed(seed: int) -> int:
  """Returns seed as an int if it is a whole number >= 0, else raises DataError."""
  seed = _whole(seed, 'the data seed (config.seed)')
  if seed < 0:  # numpy's SeedSequence takes no negative entropy
    raise DataError(f'the data seed must be >= 0 (config.seed), got {seed}')
  return seed


def _permutation(seed: int, epoch: int, num: int) -> np.ndarray:
  """The example order of one epoch, a function of (seed, epoch, num) only."""
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
  return rng.permutation(num)


def _steps_per_epoch(num_examples: int, batch_size: int, name: str = '') -> int:
  """Whole batches per epoch (the remainder is dropped); an error where there are none."""
  if batch_size <= 0:
    raise DataError(f'batch_size must be > 0, got {batch_size}')
  steps = num_examples // batch_size
  if steps == 0:
    raise DataError(f'batch_size {batch_size} is larger than the {num_examples} examples of '
                    f'{name or "the dataset"}')
  return steps


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
  """Indices of global batch `step`: slice t of permutation(seed, epoch), remainder dropped."""
  steps_per_epoch = _steps_per_epoch(num_examples, batch_size)
  seed = _check_seed(seed)
  epoch, t = divmod(int(step), steps_per_epoch)
  return _permutation(seed, epoch, num_examples)[t * batch_size:(t + 1) * batch_size]


def batches(source: Source, *, batch_size: int, seed: int, start_step: int = 0,
            process_index: int = 0, process_count: int = 1,
            num_local_devices: int = 1) -> Iterator[np.ndarray]:
  """Endless (num_local_devices, per_device, H, W, C) batches from global step start_step.

  Global batch t of epoch e is the t-th batch_size slice of a permutation seeded by
  (seed, e); the last partial batch of each epoch is dropped. The schedule depends only
  on (seed, num_examples, batch_size, step), so every process computes the same global
  batch and takes its contiguous 1/process_count slice of it; resuming at start_step
  computes that step's indices directly.
  """
  # Whole numbers: a seed or step of 0.5 would run as 0, a batch of 8.0 fail inside.
  batch_size, start_step, process_index, process_count, num_local_devices = (
      _whole(v, name) for v, name in ((batch_size, 'batch_size'), (start_step, 'start_step'),
                                      (process_index, 'process_index'),
                                      (process_count, 'process_count'),
                                      (num_local_devices, 'num_local_devices')))
  steps_per_epoch = _steps_per_epoch(source.num_examples, batch_size, source.name)
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in [0, {process_count})')
  if batch_size % process_count:
    raise DataError(f'global batch_size {batch_size} is not divisible by the '
                    f'{process_count} processes')
  local = batch_size // process_count
  if num_local_devices <= 0 or local % num_local_devices:
    raise DataError(f'the per-process batch {local} (= {batch_size} / {process_count} '
                    f'processes) is not divisible by the {num_local_devices} local devices')
  if start_step < 0:
    raise DataError(f'start_step must be >= 0, got {start_step}')
  seed = _check_seed(seed)
  per_device = local // num_local_devices
  lo, hi = process_index * local, (process_index + 1) * local
  return _batch_iterator(source, batch_size, seed, start_step, steps_per_epoch,
                         lo, hi, num_local_devices, per_device)


def _batch_iterator(source: Source, batch_size: int, seed: int, step: int,
                    steps_per_epoch: int, lo: int, hi: int, devices: int,
                    per_device: int) -> Iterator[np.ndarray]:
  """The generator behind batches() (arguments already validated)."""
  epoch, perm = -1, None
  while True:
    e, t = divmod(step, steps_per_epoch)
    if e != epoch:
      epoch, perm = e, _permutation(seed, e, source.num_examples)
    idx = perm[t * batch_size:(t + 1) * batch_size][lo:hi]
    yield source.get(idx).reshape((devices, per_device) + source.image_shape)
    step += 1


def image_count(setting: int, available: int) -> int:
  """`setting` images, at most `available`; 0 or less means all of them."""
  return available if setting <= 0 else min(int(setting), available)


def eval_batches(source: Source, batch_size: int, num_images: int | None = None,
                 start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(images, mask) over examples start .. min(num_images, N) - 1 in index order.

  Every batch has exactly batch_size rows (static shapes, one compilation); the last is
  padded with zero images whose mask entries are False. num_images None or <= 0 = all.
  """
  batch_size, start = _whole(batch_size, 'batch_size'), _whole(start, 'start')
  if batch_size <= 0:
    raise DataError(f'batch_size must be > 0, got {batch_size}')
  n = image_count(_whole(num_images or 0, 'num_images'), source.num_examples)
  for lo in range(start, n, batch_size):
    idx = np.arange(lo, min(lo + batch_size, n))
    images = source.get(idx)
    mask = np.zeros(batch_size, bool)
    mask[:len(idx)] = True
    if len(idx) < batch_size:
      pad = np.zeros((batch_size - len(idx),) + source.image_shape, np.float32)
      images = np.concatenate([images, pad])
    yield images, mask
