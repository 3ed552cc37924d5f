"""Test setup: four forced CPU devices, on which pmap, shard_map and cross-device BatchNorm
run for real."""

import os
import signal

# A shell starts its background jobs with SIGINT ignored, which every child inherits: the
# Ctrl-C tests would signal processes that do not hear it (and wait for them in vain).
# A handler is not inherited (exec resets it to the default), so the tests' processes and
# the programs they start get Ctrl-C however pytest was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from importlib import metadata  # pylint: disable=g-import-not-at-top,wrong-import-position

from avae_jax import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# Quick compilation (README, Tests): most of the suite's time is XLA compiling tiny
# programs, about 3x faster at LLVM optimisation level 0 with XLA:CPU's earlier fusion
# emitters (the suite: 12-14 min instead of 19 on 2 cores). The HLO is the same; float
# results may differ from the default build's in the last bits, so the bit-identity
# tests compare runs of this build with each other. A flag set in XLA_FLAGS keeps its
# value. Only for the jaxlib series these flags were measured with (an XLA that does not
# know a flag refuses to start).
QUICK_COMPILE_FLAGS = {'xla_backend_optimization_level': '0',
                       'xla_cpu_use_fusion_emitters': 'false'}
_quick = metadata.version('jaxlib').startswith(xla_flags.JAXLIB_SERIES)

# The XLA:CPU flags that the programs use (train.py and the others call the same), the
# quick compilation, and four devices unless XLA_FLAGS sets a count (other flags of the
# user's leave it at four). The programs that tests start inherit XLA_FLAGS.
xla_flags.apply(cpu_devices=4, extra=QUICK_COMPILE_FLAGS if _quick else None)
# XLA:CPU's thread count from the cores, as the tests of its records expect.
for _name in xla_flags.THREAD_COUNT_VARS:
  os.environ.pop(_name, None)

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='session', autouse=True)
def _persistent_compilation_cache(tmp_path_factory):
  """One persistent compilation cache per test process, written for every program.

  Tests compile the same step, evaluation and Inception programs again and again (each
  run of the trainer makes its own jitted functions); later compilations read the first
  one's executable, the same code. test_train_cli gives its train.py runs this directory
  too.
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  # pylint: enable=g-import-not-at-top
  path = tmp_path_factory.getbasetemp() / 'jax_compilation_cache'
  path.mkdir(exist_ok=True)
  settings = {'jax_compilation_cache_dir': str(path),
              'jax_persistent_cache_min_compile_time_secs': 0.0,
              'jax_persistent_cache_min_entry_size_bytes': -1}
  old = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(autouse=True)
def _folder_caches_in_tmp(tmp_path_factory, monkeypatch):
  """The decoded caches of folder: datasets go to the session's temporary directory.

  (Not $AVAE_JAX_CACHE: that would hide the FID Inception weights fetched into the
  user's cache.)
  """
  from avae_jax import data  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.getbasetemp() / 'folder_caches')
  monkeypatch.setattr(data, '_folder_cache_dir', lambda: directory)


@pytest.fixture(scope='session', autouse=True)
def _real_features_in_tmp(tmp_path_factory):
  """The evaluations' cached Inception features go to the session's temporary directory.

  (For the module-scoped fixtures' evaluations, set up before any test's own fixtures.)
  """
  from avae_jax import evaluation  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path_factory.getbasetemp() / 'real_features')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluation, 'real_features_dir', lambda: directory)
    yield


@pytest.fixture(autouse=True)
def _real_features_per_test(tmp_path, monkeypatch):
  """A test's own evaluations find no features cached by another test."""
  from avae_jax import evaluation  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / 'real_features')
  monkeypatch.setattr(evaluation, 'real_features_dir', lambda: directory)


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """gs:// paths opened through etils.epath land in tmp_path/'gcs' (no network is used).

  Yields that local folder; gs://b/x is tmp_path/gcs/b/x. The working directory is an
  empty tmp_path/'cwd', so that a file written with plain `open` to a gs:// path (into a
  local folder named 'gs:') would show there.
  """
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  from etils.epath import testing as epath_testing  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'gcs'
  root.mkdir()
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  def local(path):
    path = os.fspath(path)
    return str(root / path[len('gs://'):]) if path.startswith('gs://') else path

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, dst, *args, **kwargs):
    return fn(local(path), local(dst), *args, **kwargs)

  # With TensorFlow installed epath picks tf.io.gfile for gs:// (and asks GCS whether the
  # bucket is zonal) before any mocked backend; claiming it is absent keeps all local.
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)
  mocks = {name: one for name in ('open', 'exists', 'glob', 'isdir', 'listdir', 'makedirs',
                                  'mkdir', 'remove', 'rmtree', 'stat', 'walk')}
  mocks.update(copy=two, rename=two, replace=two)
  with epath_testing.mock_epath(**mocks):
    # A path whose backend is not the mock would reach the network: stop before that.
    probe = gpath.PosixGPath('gs://probe/x')._backend  # pylint: disable=protected-access
    assert type(probe).__name__ == '_MockBackend', type(probe)
    yield root
