"""Tests for avae_jax.checkpoint: round trip, retention, crash safety, corruption."""

import gc
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Callable
import zlib

from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from avae_jax import checkpoint
from tests import trees

# When one array read of a damaged checkpoint fails, orbax abandons the other
# pending reads and Python reports those coroutines as unraisable whenever they
# are garbage collected. That is orbax's cleanup, not an error of this module:
# collect them inside each test, where this filter applies.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')


@pytest.fixture(autouse=True)
def _collect_abandoned_reads():
  yield
  gc.collect()

REPO = pathlib.Path(__file__).resolve().parents[1]
TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's name for uncommitted saves


def make_state(seed: int) -> dict:
  """A state shaped like the trainer's: two train states with optax states."""
  rng = np.random.default_rng(seed)
  params = {'Conv_0': {'kernel': rng.standard_normal((3, 3, 1, 4)).astype(np.float32),
                       'bias': rng.standard_normal(4).astype(np.float32)},
            'Dense_0': {'kernel': jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)}}
  opt_state = optax.adam(1e-3).init(params)
  opt_state = jax.tree.map(lambda x: x + seed, opt_state)
  return {
      'vae': {'params': params,
              'batch_stats': {'BatchNorm_0': {
                  'mean': rng.standard_normal(4).astype(np.float32),
                  'var': rng.random(4).astype(ml_dtypes.bfloat16)}},
              'opt_state': opt_state,
              'step': np.array(seed, np.int32)},
      'disc': {'params': {'w': rng.integers(0, 255, (5,), dtype=np.uint8)},
               'step': jnp.array(seed + 1, jnp.int32)},
  }


def assert_trees_equal(actual, expected):
  """The state restored as `expected` bit for bit, in host (numpy) arrays."""
  trees.assert_trees_equal(actual, expected)
  assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(actual))


META = {'phase': 'pretrain', 'data_position': 123, 'config_hash': 'abc123',
        'rng': [4294967295, 17], 'nested': {'x': [1.5, None, True]}}


def test_round_trip_values_dtypes_and_meta(tmp_path):
  state = make_state(3)
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=3) as ckpt:
    assert ckpt.restore(state) is None
    assert ckpt.latest_step() is None
    assert ckpt.save(10, state, META)
    ckpt.wait()
    step, restored, meta = ckpt.restore(state)
  assert step == 10
  assert meta == META
  assert_trees_equal(restored, state)
  # A template of ShapeDtypeStructs works as well, in a fresh process-like manager.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state)
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=3, read_only=True) as ckpt:
    step, restored, meta = ckpt.restore(abstract)
  assert step == 10 and meta == META
  assert_trees_equal(restored, state)


def test_keep_last_k_and_restore_latest(tmp_path):
  directory = tmp_path / 'ckpt'
  with checkpoint.Checkpointer(directory, keep=2) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, make_state(step), {'step': step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
    assert ckpt.latest_step() == 5
  on_disk = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  assert on_disk == [4, 5]
  with checkpoint.Checkpointer(directory, keep=2) as ckpt:
    step, state, meta = ckpt.restore(make_state(0))
    assert (step, meta) == (5, {'step': 5})
    assert_trees_equal(state, make_state(5))
    step, state, meta = ckpt.restore(make_state(0), step=4)
    assert (step, meta) == (4, {'step': 4})
    assert_trees_equal(state, make_state(4))
    # The step asked for is named as missing, not as "deleted while it was read" (the
    # FileNotFoundError of a read that fails on a step pruned meanwhile).
    with pytest.raises(FileNotFoundError,
                       match=r'^No checkpoint for step 3 in .* \(steps: \[4, 5\]\)\.$'):
      ckpt.restore(make_state(0), step=3)


def test_existing_and_newer_steps(tmp_path):
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=None) as ckpt:
    assert ckpt.save(2, make_state(2), {'v': 'a'})
    assert not ckpt.save(2, make_state(7), {'v': 'b'})  # exists: skipped
    assert ckpt.restore(make_state(0))[2] == {'v': 'a'}
    assert ckpt.save(2, make_state(7), {'v': 'b'}, force=True)  # replaced
    step, state, meta = ckpt.restore(make_state(0))
    assert (step, meta) == (2, {'v': 'b'})
    assert_trees_equal(state, make_state(7))
    # Saving behind the latest checkpoint would mix two runs' histories.
    with pytest.raises(ValueError, match='newer'):
      ckpt.save(1, make_state(1), {})
    assert ckpt.save(1, make_state(1), {}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [1]


def test_a_forced_save_right_after_an_async_one_replaces_it(tmp_path):
  # The step being replaced was deleted while its background write still went on: the
  # forced save failed with orbax's NOT_FOUND error.
  state = {'w': np.ones((1024, 256), np.float32)}  # 1 MiB: still writing at the next call
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=None) as ckpt:
    assert ckpt.save(1, state, {'v': 'a'})
    assert ckpt.save(1, state, {'v': 'b'}, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [1] and ckpt.restore(state)[2] == {'v': 'b'}


def test_synchronous_and_read_only(tmp_path):
  directory = tmp_path / 'ckpt'
  with checkpoint.Checkpointer(directory, keep=1, read_only=True) as reader:
    assert reader.restore(make_state(0)) is None and reader.all_steps() == []
    with pytest.raises(ValueError, match='read-only'):
      reader.save(1, make_state(1), {})
  assert not directory.exists()
  with checkpoint.Checkpointer(directory, keep=1, async_save=False) as ckpt:
    assert ckpt.save(1, make_state(1), {'a': 1})
    assert ckpt.save(2, make_state(2), {'a': 2})
    assert ckpt.all_steps() == [2]
  with checkpoint.Checkpointer(directory, keep=1, read_only=True) as reader:
    step, state, meta = reader.restore(make_state(0))
  assert (step, meta) == (2, {'a': 2})
  assert_trees_equal(state, make_state(2))


def test_a_read_only_open_logs_no_warning(tmp_path, caplog):
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=1, async_save=False) as ckpt:
    ckpt.save(1, make_state(1), {})
  with caplog.at_level(logging.WARNING):
    with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=1, read_only=True) as reader:
      assert reader.restore(make_state(0))[0] == 1
      assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
      # Other records still pass: the filter is gone once the manager is open.
      absl_logging.warning('Given directory is read only, said someone else')
  assert 'said someone else' in caplog.text


def test_a_killed_saves_leftover_is_removed_by_a_writer_not_a_reader(tmp_path):
  # A run killed mid-save leaves <step>.orbax-checkpoint-tmp; a reader beside a running
  # training (eval.py) must not remove that run's save in progress.
  directory = tmp_path / 'ckpt'
  leftover = directory / f'3{TMP_SUFFIX}'
  leftover.mkdir(parents=True)
  with checkpoint.Checkpointer(directory, keep=None, read_only=True) as reader:
    assert reader.restore(big_state(0)) is None
  assert leftover.is_dir()
  with checkpoint.Checkpointer(directory, keep=None, async_save=False) as writer:
    assert writer.save(1, big_state(1), {})
  assert not leftover.exists()
  assert sorted(p.name for p in directory.iterdir()) == ['1']


def test_template_mismatch_is_an_error_not_a_fallback(tmp_path):
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=3) as ckpt:
    ckpt.save(1, make_state(1), {})
    ckpt.save(2, make_state(2), {})
    template = make_state(0)
    template['vae']['params']['Conv_0']['bias'] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match='Conv_0/bias'):
      ckpt.restore(template)
    del template['vae']['params']['Conv_0']
    with pytest.raises(ValueError, match='not in the template'):
      ckpt.restore(template)
    # Five problems are named, and how many more there are.
    others = {f'x{i}': np.zeros(1, np.float32) for i in range(7)}
    saved = len(jax.tree.leaves(make_state(0)))
    with pytest.raises(ValueError, match=rf'x4 not in the checkpoint \(and {saved + 2} more\)$'):
      ckpt.restore(others)


def test_meta_must_be_json(tmp_path):
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=3) as ckpt:
    # The module's own check: json's 'is not JSON serializable' from a later dump matched
    # 'JSON' too, and a NaN (no JSON number, which json.dumps writes all the same) is refused.
    for meta in ({'key': np.zeros(2)}, {'loss': float('nan')}):
      with pytest.raises(TypeError, match='^Checkpoint meta must be JSON '):
        ckpt.save(1, make_state(1), meta)
    assert ckpt.all_steps() == []


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
  files = [p for p in directory.rglob('*') if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
  """Damages one checkpoint on disk the way a bad disk or a careless rm would."""
  if how in ('flip', 'truncate', 'delete'):
    target = _largest_file(step_dir / 'state')  # the array data file
    data = bytearray(target.read_bytes())
    assert len(data) > 10_000
    if how == 'flip':
      middle = len(data) // 2
      data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
      target.write_bytes(bytes(data))
    elif how == 'truncate':
      target.write_bytes(bytes(data[:len(data) // 2]))
    else:
      target.unlink()
  elif how == 'meta':
    (step_dir / 'meta' / 'metadata').write_text('{"phase": "pre')
  elif how == 'meta_digit':  # still JSON, one digit changed
    path = step_dir / 'meta' / 'metadata'
    text = path.read_text()
    field = f'"step": {step_dir.name}'
    assert text.count(field) == 1, text
    path.write_text(text.replace(field, '"step": 7'))
  elif how == 'manifest_digit':  # still JSON, one leaf's shape changed
    path = step_dir / 'manifest' / 'metadata'
    text = path.read_text()
    assert text.count('"shape": [64, 64]') == 1, text
    path.write_text(text.replace('"shape": [64, 64]', '"shape": [64, 65]'))
  elif how == 'manifest':
    for p in sorted((step_dir / 'manifest').rglob('*'), reverse=True):
      p.unlink() if p.is_file() else p.rmdir()
    (step_dir / 'manifest').rmdir()
  elif how == 'empty':  # the folder alone, as a copy cut short at its start leaves it
    shutil.rmtree(step_dir)
    step_dir.mkdir()
  else:
    raise ValueError(how)


def big_state(step: int) -> dict:
  rng = np.random.default_rng(100 + step)
  return {'params': {'w': rng.standard_normal((64, 64)).astype(np.float32)},
          'step': np.array(step, np.int32)}


@pytest.mark.parametrize('how', ['flip', 'truncate', 'delete', 'meta', 'meta_digit',
                                 'manifest', 'manifest_digit', 'empty'])
def test_corrupted_latest_falls_back_with_warning(tmp_path, caplog, how):
  directory = tmp_path / 'ckpt'
  # Three: the fallback is the step before the damaged one, not the oldest.
  with checkpoint.Checkpointer(directory, keep=3) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, big_state(step), {'step': step})
  _corrupt(directory / '3', how)
  caplog.set_level(logging.WARNING, logger='absl')  # the open too (orbax reads the steps)
  with checkpoint.Checkpointer(directory, keep=3) as ckpt:
    step, state, meta = ckpt.restore(big_state(0))
    assert (step, meta) == (2, {'step': 2})
    assert_trees_equal(state, big_state(2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any('Checkpoint 3' in w and 'unreadable' in w for w in warnings), warnings
    if how == 'empty':  # said once, not also by each of orbax's reader threads
      assert [w.split(' (')[0] for w in warnings] == [
          f'Checkpoint 3 in {directory} is unreadable',
          f'Restored checkpoint 2 from {directory} instead of the unreadable newer [3].'], (
              warnings)
    if how in ('flip', 'meta_digit', 'manifest_digit'):
      # orbax/tensorstore read the damaged chunk or JSON without complaint; only the
      # manifest's CRCs notice (a changed shape is not taken for another model's).
      assert any('CorruptCheckpointError: ' in w and 'checksum' in w for w in warnings), (
          warnings)
    # An explicit request for the broken step is an error, not a silent fallback.
    with pytest.raises(checkpoint.CheckpointError):
      ckpt.restore(big_state(0), step=3)
    # Training resumes from 2; the next save replaces the unreadable step.
    assert ckpt.all_steps() == [1, 2, 3]
    assert ckpt.save(3, big_state(33), {'step': 33})
    ckpt.wait()
    step, state, meta = ckpt.restore(big_state(0))
    # That step is no longer unreadable: the save after it keeps it (and prunes step 1).
    assert ckpt.save(4, big_state(4), {'step': 4})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3, 4]
  assert (step, meta) == (3, {'step': 33})
  assert_trees_equal(state, big_state(33))


# Saves two steps of many arrays, damages the newer one's data files, restores; then, as
# the reads in flight do when they happen to finish (deterministic here), a callback into
# a closed event loop and an unawaited future whose error names the checkpoint, and
# noise of other origins: an unraisable exception and an unawaited future of their own.
_CHILD_RESTORING_DAMAGED = textwrap.dedent('''
    import asyncio, gc, pathlib, sys
    import numpy as np
    from avae_jax import checkpoint

    def many(step):
      rng = np.random.default_rng(step)
      return {f'w{i:03d}': rng.standard_normal((32, 32)).astype(np.float32) for i in range(200)}

    directory = pathlib.Path(sys.argv[1])
    with checkpoint.Checkpointer(directory, keep=3) as ckpt:
      for step in (1, 2):
        ckpt.save(step, many(step), {'step': step})
    # Every data file of the arrays (orbax writes them in two places), at its middle byte.
    for target in (directory / '2' / 'state').rglob('d/*'):
      data = bytearray(target.read_bytes())
      data[len(data) // 2] ^= 0xFF
      target.write_bytes(bytes(data))
    with checkpoint.Checkpointer(directory, keep=3) as ckpt:
      step, state, _ = ckpt.restore(many(0))
    assert step == 1 and all(np.array_equal(state[k], v) for k, v in many(1).items())

    loop = asyncio.new_event_loop()
    loop.close()

    class LateCallback:
      def __del__(self):
        loop.call_soon_threadsafe(print)

    class Noisy:
      def __del__(self):
        raise KeyError('from a finaliser')

    def unawaited(error):
      future = loop.create_future()
      future.set_exception(error)

    LateCallback()
    Noisy()
    unawaited(ValueError(f'Error reading "w001/.zarray" at "{directory}/2/state/"'))
    unawaited(ValueError('an error of something else'))
    gc.collect()
    print('restored', step)
''')


def test_a_failed_read_of_many_arrays_prints_only_the_warning(tmp_path):
  # orbax closes the restore's event loop at the first failed read; the completion
  # callbacks of the reads still in flight each printed "RuntimeError: Event loop is
  # closed" with its traceback (tens to hundreds of them) before the warning. (In a
  # child: pytest takes unraisable exceptions over itself.)
  script = tmp_path / 'child.py'
  script.write_text(_CHILD_RESTORING_DAMAGED)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, str(script), str(tmp_path / 'ckpt')], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and 'restored 1' in proc.stdout, proc.stderr[-3000:]
  assert 'Checkpoint 2' in proc.stderr and 'unreadable' in proc.stderr, proc.stderr[-3000:]
  assert 'Event loop is closed' not in proc.stderr, proc.stderr[:3000]
  # Other unraisable exceptions and unawaited errors are still printed.
  assert 'from a finaliser' in proc.stderr
  assert proc.stderr.count('exception was never retrieved') == 1, proc.stderr[:3000]
  assert 'an error of something else' in proc.stderr


_CHILD_SAVING_INTO_AN_IMMUTABLE_FOLDER = textwrap.dedent('''
    import subprocess, sys
    import numpy as np
    from avae_jax import checkpoint

    directory = sys.argv[1]
    with checkpoint.Checkpointer(directory, keep=3) as ckpt:
      ckpt.save(1, {'w': np.ones((64, 64), np.float32)}, {})
      ckpt.wait()
      subprocess.run(['chattr', '+i', directory], check=True)
      try:
        ckpt.save(2, {'w': np.zeros((64, 64), np.float32)}, {})
        ckpt.wait()
      except PermissionError as e:
        print('refused', e.filename)
      finally:
        subprocess.run(['chattr', '-i', directory], check=True)
''')


def test_a_save_the_folder_refuses_logs_no_tracebacks_and_exits(tmp_path):
  # A checkpoint folder made immutable (or read-only) during training: orbax's background
  # threads logged the refused rename with its traceback, twice, before the error that
  # train.py reports in one line (cli.exit_if_file_error); and the save's threads that
  # waited for the refused directory kept the process from exiting for 20 minutes.
  probe = tmp_path / 'probe'
  probe.mkdir()
  if subprocess.run(['chattr', '+i', str(probe)], capture_output=True,
                    check=False).returncode != 0:
    pytest.skip('chattr +i needs root and a file system that has the attribute')
  subprocess.run(['chattr', '-i', str(probe)], check=True)
  script = tmp_path / 'child.py'
  script.write_text(_CHILD_SAVING_INTO_AN_IMMUTABLE_FOLDER)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  try:
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / 'ckpt')], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
  finally:
    subprocess.run(['chattr', '-i', str(tmp_path / 'ckpt')], capture_output=True,
                   check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'refused {tmp_path / "ckpt" / "2"}{TMP_SUFFIX}' in proc.stdout, proc.stdout
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize('error, where, logged', [
    (PermissionError(1, 'Operation not permitted', '/c/2.tmp'), '/orbax/', False),
    (OSError(28, 'No space left on device'), '/orbax/', False),
    (ValueError('a bug'), '/orbax/', True),
    (PermissionError(1, 'Operation not permitted', '/c/2.tmp'), '/elsewhere/', True)])
def test_only_orbaxs_full_disk_and_refused_file_tracebacks_are_dropped(error, where,
                                                                        logged):
  try:
    raise error
  except Exception:  # pylint: disable=broad-except
    record = logging.LogRecord('absl', logging.ERROR, f'/site{where}manager.py', 1,
                               'save failed', (), sys.exc_info())
  drop = checkpoint._DropOrbaxFileErrorTracebacks()  # pylint: disable=protected-access
  assert drop.filter(record) is logged


@pytest.mark.parametrize('error, message, logged', [
    (OSError(28, 'No space left on device', '/anywhere/x'), 'Task', False),
    (PermissionError(1, 'Operation not permitted', '/anywhere/x'), 'Future', False),
    (ValueError('reading /runs/a/checkpoints/3 failed'), 'Future', False),
    (ValueError('a bug'), 'Future', True),
    (OSError(28, 'No space left on device'), None, True)])
def test_only_unretrieved_errors_of_a_full_disk_or_a_read_checkpoint_are_dropped(
    monkeypatch, error, message, logged):
  # asyncio's report of a future whose error nobody awaited: a save's full disk or refused
  # file wherever it happened, a read's error where it names a checkpoint read here.
  monkeypatch.setattr(checkpoint, '_READ_DIRECTORIES', {'/runs/a/checkpoints'})
  text = f'{message} exception was never retrieved\nfuture: <...>' if message else 'other'
  record = logging.LogRecord('asyncio', logging.ERROR, '/asyncio/base_events.py', 1, text,
                             (), (type(error), error, None))
  drop = checkpoint._DropUnretrievedCheckpointErrors()  # pylint: disable=protected-access
  assert drop.filter(record) is logged


def test_no_readable_checkpoint_raises(tmp_path):
  directory = tmp_path / 'ckpt'
  with checkpoint.Checkpointer(directory, keep=3) as ckpt:
    ckpt.save(1, big_state(1), {})
  _corrupt(directory / '1', 'truncate')
  with checkpoint.Checkpointer(directory, keep=3) as ckpt:
    with pytest.raises(checkpoint.CheckpointError, match='None of the checkpoints.*new workdir'):
      ckpt.restore(big_state(0))


# A child that saves step 1, then starts saving step 2 and is frozen inside
# orbax's commit (the atomic rename of the tmp directory) until it is killed:
# every byte of step 2 is written, nothing is committed.
_CHILD_FROZEN_BEFORE_COMMIT = textwrap.dedent('''
    import pathlib, sys, time
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from avae_jax import checkpoint

    directory, marker = sys.argv[1], pathlib.Path(sys.argv[2])
    ckpt = checkpoint.Checkpointer(directory, keep=3)
    state = lambda s: {'w': np.full((512, 512), s, np.float32), 's': np.int32(s)}
    ckpt.save(1, state(1), {'step': 1})
    ckpt.wait()

    async def frozen_finalize(self):
      marker.write_text(str(self.get()))
      time.sleep(300)

    atomicity.AtomicRenameTemporaryPath.finalize = frozen_finalize
    ckpt.save(2, state(2), {'step': 2})
    ckpt.wait()
''')

# A child that saves step after step of a 16 MB array until it is killed.
_CHILD_SAVING_LOOP = textwrap.dedent('''
    import pathlib, sys
    import numpy as np
    from avae_jax import checkpoint

    directory, marker = sys.argv[1], pathlib.Path(sys.argv[2])
    base = np.random.default_rng(0).standard_normal(4_000_000).astype(np.float32)
    ckpt = checkpoint.Checkpointer(directory, keep=2)
    ckpt.save(1, {'w': base + 1}, {'step': 1})
    ckpt.wait()
    marker.write_text('ready')
    for step in range(2, 10_000):
      ckpt.save(step, {'w': base + step}, {'step': step})
''')


def _start_child(tmp_path, source):
  script = tmp_path / 'child.py'
  script.write_text(source)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  marker = tmp_path / 'marker'
  proc = subprocess.Popen(
      [sys.executable, str(script), str(tmp_path / 'ckpt'), str(marker)],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  return proc, marker


def _wait_for(predicate, proc, timeout=120.0, interval=0.05):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'child exited early: {proc.stderr.read().decode()[-3000:]}')
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError('child timed out')
    time.sleep(interval)


def test_checkpoint_killed_before_commit_is_never_loaded(tmp_path):
  proc, marker = _start_child(tmp_path, _CHILD_FROZEN_BEFORE_COMMIT)
  try:
    _wait_for(marker.exists, proc)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # waits, and closes its stderr pipe
  directory = tmp_path / 'ckpt'
  names = sorted(p.name for p in directory.iterdir())
  assert '2' + TMP_SUFFIX in names and '2' not in names, names
  assert any((directory / ('2' + TMP_SUFFIX)).rglob('*')), 'step 2 was being written'

  template = {'w': np.zeros((512, 512), np.float32), 's': np.int32(0)}
  with checkpoint.Checkpointer(directory, keep=3, read_only=True) as reader:
    assert reader.all_steps() == [1]
    step, state, meta = reader.restore(template)
  assert (step, meta) == (1, {'step': 1})
  np.testing.assert_array_equal(state['w'], np.ones((512, 512), np.float32))
  # A writer cleans the leftover up and can save that step again.
  with checkpoint.Checkpointer(directory, keep=3) as writer:
    assert writer.save(2, {'w': np.full((512, 512), 2, np.float32), 's': np.int32(2)},
                       {'step': 2})
    writer.wait()
    assert writer.restore(template)[0] == 2
  assert not [p for p in directory.iterdir() if TMP_SUFFIX in p.name]


def test_sigkill_mid_save_leaves_only_complete_checkpoints(tmp_path):
  proc, marker = _start_child(tmp_path, _CHILD_SAVING_LOOP)
  directory = tmp_path / 'ckpt'

  def saving():
    with os.scandir(directory) as entries:
      return any(TMP_SUFFIX in entry.name for entry in entries)

  try:
    _wait_for(marker.exists, proc)
    _wait_for(saving, proc, interval=0.001)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # waits, and closes its stderr pipe
  assert proc.returncode == -signal.SIGKILL
  base = np.random.default_rng(0).standard_normal(4_000_000).astype(np.float32)
  template = {'w': base}
  with checkpoint.Checkpointer(directory, keep=2, read_only=True) as reader:
    steps = reader.all_steps()
    assert steps and all(step >= 1 for step in steps)
    for step in steps:  # every listed checkpoint is complete and correct
      restored_step, state, meta = reader.restore(template, step=step)
      assert meta == {'step': step}
      np.testing.assert_array_equal(state['w'], base + step)
    assert reader.restore(template)[0] == steps[-1]


# One of two JAX processes (jax.distributed on CPU, gloo collectives), each
# with two local devices: both save, process 0 then damages the latest step
# while process 1 waits at a barrier, and both must fall back to step 1.
_CHILD_MULTIPROCESS = textwrap.dedent('''
    import json, os, pathlib, sys
    process_id, port, directory, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    import jax
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f'localhost:{port}',
                               num_processes=2, process_id=process_id)
    from jax.experimental import multihost_utils
    import numpy as np
    from avae_jax import checkpoint

    assert jax.process_count() == 2 and len(jax.devices()) == 4
    state = lambda s: {'w': np.random.default_rng(s).standard_normal((64, 64)).astype(np.float32),
                       'step': np.int32(s)}
    ckpt = checkpoint.Checkpointer(directory, keep=3)
    for step in (1, 2):
      assert ckpt.save(step, state(step), {'step': step})
    ckpt.wait()
    latest = ckpt.restore(state(0))
    multihost_utils.sync_global_devices('saved')
    if process_id == 0:
      data = max((p for p in pathlib.Path(directory, '2', 'state').rglob('*') if p.is_file()),
                 key=lambda p: p.stat().st_size)
      data.write_bytes(data.read_bytes()[:100])
    multihost_utils.sync_global_devices('corrupted')
    fallback = ckpt.restore(state(0))
    ckpt.close()
    result = {'steps': [latest[0], fallback[0]], 'metas': [latest[2], fallback[2]],
              'ok': [bool(np.array_equal(latest[1]['w'], state(2)['w'])),
                     bool(np.array_equal(fallback[1]['w'], state(1)['w'])),
                     int(fallback[1]['step']) == 1]}
    pathlib.Path(out).write_text(json.dumps(result))
''')


def test_two_processes_save_and_restore_replicated_state(tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  script = tmp_path / 'child.py'
  script.write_text(_CHILD_MULTIPROCESS)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen(
      [sys.executable, str(script), str(i), str(port), str(tmp_path / 'ckpt'),
       str(tmp_path / f'out{i}.json')],
      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
  try:
    errors = [p.communicate(timeout=180)[1].decode() for p in procs]
  finally:
    for p in procs:
      p.kill()
      p.wait()
      p.stderr.close()
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-3000:]
  for i in range(2):
    result = json.loads((tmp_path / f'out{i}.json').read_text())
    assert result == {'steps': [2, 1], 'metas': [{'step': 2}, {'step': 1}],
                      'ok': [True, True, True]}


def test_negative_keep_is_refused(tmp_path):
  # orbax's LatestN(-1) deleted every checkpoint, including the one just saved.
  with pytest.raises(ValueError, match='keep'):
    checkpoint.Checkpointer(tmp_path / 'ckpt', keep=-1)


def test_values_the_stored_dtype_cannot_hold_are_refused(tmp_path):
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=None, async_save=False) as ckpt:
    assert ckpt.save(3, {'w': np.ones(2, np.float32)}, {'v': 3})
    # int64 values within int32 are stored as int32, the same numbers.
    fits = {'n': np.array([-2**31, 2**31 - 1], np.int64), 'f': np.array(0.5, np.float64)}
    assert ckpt.save(4, fits, {})
    _, restored, _ = ckpt.restore(fits)
    np.testing.assert_array_equal(restored['n'], [-2**31, 2**31 - 1])
    assert float(restored['f']) == 0.5
    for bad, leaf in ((np.array([1, 2**40], np.int64), 'state/n'),
                      (np.array(2**32, np.uint64), 'state/n'),
                      (np.array([1e300], np.float64), 'state/n')):
      # 2**40 wrapped to 0 as int32 and 1e300 became inf, in a checkpoint that restored.
      with pytest.raises(ValueError, match=leaf):
        ckpt.save(5, {'state': {'n': bad}}, {})
      # Refused before anything is deleted, even with force=True (which deletes newer ones).
      with pytest.raises(ValueError, match=leaf):
        ckpt.save(1, {'state': {'n': bad}}, {}, force=True)
      assert ckpt.all_steps() == [3, 4]


def test_paths_that_orbax_would_merge_are_refused(tmp_path):
  # orbax names arrays by their paths joined with '.': these two leaves shared one name,
  # the save succeeded and every restore failed its checksum.
  state = {'a.b': np.ones(2, np.float32), 'a': {'b': np.zeros(2, np.float32)}}
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=None, async_save=False) as ckpt:
    with pytest.raises(ValueError, match="'a.b'"):
      ckpt.save(1, state, {})
    # Nor can a bare array be named.
    with pytest.raises(ValueError, match='must be a container .* not a bare array'):
      ckpt.save(1, np.ones(3, np.float32), {})
    assert ckpt.all_steps() == []
    # A dot or a slash inside a key of its own is fine.
    state = {'a.b': np.ones(2, np.float32), 'c/d': np.full(2, 2, np.float32)}
    assert ckpt.save(1, state, {})
    assert_trees_equal(ckpt.restore(state)[1], state)


def _while_reading(monkeypatch, reader: checkpoint.Checkpointer,
                   action: Callable[[int], None]) -> None:
  """Makes `reader` call action(step) as it starts to read each step: a run meanwhile."""
  read_step = reader._restore_step  # pylint: disable=protected-access

  def read(step, names, specs):
    action(step)
    return read_step(step, names, specs)

  monkeypatch.setattr(reader, '_restore_step', read)


def test_reader_whose_checkpoint_is_pruned_while_read_takes_the_new_one(
    tmp_path, caplog, monkeypatch):
  # eval.py beside a training run with keep=1: the run commits step 2 and prunes step 1
  # while the reader is reading step 1.
  directory = tmp_path / 'ckpt'
  with checkpoint.Checkpointer(directory, keep=1, async_save=False) as writer, \
       checkpoint.Checkpointer(directory, keep=None, read_only=True) as reader:
    writer.save(1, big_state(1), {'step': 1})
    trainer_steps = [2]  # the steps the run commits during the next restore

    def prune(step):
      if trainer_steps and step == writer.latest_step():  # pruned while it is read
        s = trainer_steps.pop(0)
        assert writer.save(s, big_state(s), {'step': s})
        assert writer.all_steps() == [s] and not (directory / str(step)).exists()

    _while_reading(monkeypatch, reader, prune)
    with caplog.at_level(logging.WARNING, logger='absl'):
      step, state, meta = reader.restore(big_state(0))
    assert (step, meta) == (2, {'step': 2})
    assert_trees_equal(state, big_state(2))
    assert not [r for r in caplog.records if 'unreadable' in r.getMessage()]
    # A chosen step that is pruned while read was deleted, not damaged.
    trainer_steps.append(3)
    with pytest.raises(FileNotFoundError, match='deleted while'):
      reader.restore(big_state(0), step=2)
    assert reader.restore(big_state(0))[0] == 3
    # The writer saw nothing unreadable: its next save deletes nothing.
    assert writer.save(4, big_state(4), {'step': 4}) and writer.all_steps() == [4]


def test_typed_prng_keys_round_trip(tmp_path):
  # jax.random.key arrays have no numpy form: saving one raised numpy's TypeError.
  key = jax.random.key(42)
  keys = jax.random.split(jax.random.key(7, impl='rbg'), 3)
  state = {'key': key, 'keys': keys, 'w': np.arange(3, dtype=np.float32)}
  template = {'key': jax.random.key(0), 'keys': jax.random.split(jax.random.key(0, impl='rbg'), 3),
              'w': np.zeros(3, np.float32)}
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=None, async_save=False) as ckpt:
    assert ckpt.save(1, state, {})
    for t in (template, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                     template)):
      _, restored, _ = ckpt.restore(t)
      assert restored['key'].dtype == key.dtype and restored['keys'].dtype == keys.dtype
      assert restored['keys'].shape == (3,)
      # The same key data, read from what was saved: numbers, not just shapes.
      np.testing.assert_array_equal(jax.random.key_data(restored['key']),
                                    np.asarray(jax.random.key_data(key)))
      np.testing.assert_array_equal(jax.random.key_data(restored['keys']),
                                    np.asarray(jax.random.key_data(keys)))
      # The restored key draws what the saved one draws.
      np.testing.assert_array_equal(jax.random.normal(restored['key'], (4,)),
                                    jax.random.normal(key, (4,)))
    # A key saved where the template holds raw uint32 data (or another implementation) is
    # a template mismatch, named as such.
    raw = dict(template, key=np.zeros(2, np.uint32))
    with pytest.raises(ValueError, match=r'key: checkpoint key<fry> stored as \(2,\) uint32, '
                                         r'template \(2,\) uint32'):
      ckpt.restore(raw)
    other = dict(template, key=jax.random.key(0, impl='rbg'))
    with pytest.raises(ValueError, match='key: checkpoint key<fry>'):
      ckpt.restore(other)


def test_zero_size_leaves_and_a_state_without_arrays(tmp_path):
  # orbax refuses zero-size arrays and an item without arrays: both failed the save.
  state = {'empty': np.zeros((0, 3), np.float32), 'keys': jax.random.split(jax.random.key(0), 0),
           'w': np.arange(4, dtype=np.int32), 'none': {}}
  with checkpoint.Checkpointer(tmp_path / 'ckpt', keep=None, async_save=False) as ckpt:
    assert ckpt.save(1, state, {'a': 1})
    step, restored, meta = ckpt.restore(state)
    assert (step, meta) == (1, {'a': 1}) and restored['none'] == {}
    assert restored['empty'].shape == (0, 3) and restored['empty'].dtype == np.float32
    assert restored['keys'].shape == (0,) and restored['keys'].dtype == state['keys'].dtype
    np.testing.assert_array_equal(restored['w'], [0, 1, 2, 3])
    # The template's shapes are still checked against the manifest.
    with pytest.raises(ValueError, match=r'empty: checkpoint \(0, 3\) float32, template'):
      ckpt.restore(dict(state, empty=np.zeros((0, 4), np.float32)))
    only_empty = {'empty': np.zeros((0,), np.float32), 'none': {}}
    assert ckpt.save(2, only_empty, {'a': 2})
    step, restored, meta = ckpt.restore(only_empty)
    assert (step, meta) == (2, {'a': 2}) and restored['empty'].shape == (0,)


def test_reader_whose_checkpoint_is_half_deleted_takes_the_newer_one(tmp_path, monkeypatch):
  # orbax deletes a pruned step file by file: the reader can fail on a step that is still
  # listed, while the run has committed a newer one.
  directory = tmp_path / 'ckpt'
  with checkpoint.Checkpointer(directory, keep=None, async_save=False) as writer, \
       checkpoint.Checkpointer(directory, keep=None, read_only=True) as reader:
    writer.save(1, big_state(1), {'step': 1})

    def save_and_delete(step):
      if step == 1:
        assert writer.save(2, big_state(2), {'step': 2})
        _corrupt(directory / '1', 'delete')

    _while_reading(monkeypatch, reader, save_and_delete)
    step, state, meta = reader.restore(big_state(0))
  assert (step, meta) == (2, {'step': 2})
  assert_trees_equal(state, big_state(2))


def test_a_reader_whose_every_checkpoint_is_deleted_while_read_finds_none(
    tmp_path, monkeypatch):
  # The run training there deleted its only step meanwhile (a restart from scratch):
  # no checkpoint, not an unreadable one.
  directory = tmp_path / 'ckpt'
  with checkpoint.Checkpointer(directory, keep=None, async_save=False) as writer:
    writer.save(1, big_state(1), {})
  with checkpoint.Checkpointer(directory, keep=None, read_only=True) as reader:
    _while_reading(monkeypatch, reader, lambda step: shutil.rmtree(directory / str(step)))
    assert reader.restore(big_state(0)) is None


def _save_without_the_manifests_checksums(directory: pathlib.Path, step: int) -> None:
  """Saves big_state(step) with META as versions before meta's CRC-32 and its own did."""
  with checkpoint.Checkpointer(directory, keep=None, async_save=False) as ckpt:
    ckpt.save(step, big_state(step), META)
  path = directory / str(step) / 'manifest' / 'metadata'
  manifest = json.loads(path.read_text())
  del manifest['meta_crc32'], manifest['crc32']
  path.write_text(json.dumps(manifest))


def test_a_manifest_without_the_meta_checksum_still_restores(tmp_path):
  # Checkpoints written before the manifest held meta's CRC-32 and its own.
  directory = tmp_path / 'ckpt'
  _save_without_the_manifests_checksums(directory, 1)
  with checkpoint.Checkpointer(directory, keep=None, read_only=True) as reader:
    step, state, meta = reader.restore(big_state(0))
  assert (step, meta) == (1, META)
  assert_trees_equal(state, big_state(1))
  # Without that checksum, a meta that is no JSON object is damage still: step 1 is taken.
  _save_without_the_manifests_checksums(directory, 2)
  (directory / '2' / 'meta' / 'metadata').write_text('[1]')
  with checkpoint.Checkpointer(directory, keep=None, read_only=True) as reader:
    assert reader.restore(big_state(0))[0] == 1


def test_the_checksums_on_disk_are_crc32s_of_the_bytes_and_of_sorted_json(tmp_path):
  # The format other versions read: a checksum computed otherwise would make every
  # checkpoint of the versions before it unreadable.
  directory = tmp_path / 'ckpt'
  state = big_state(1)
  with checkpoint.Checkpointer(directory, keep=None, async_save=False) as ckpt:
    ckpt.save(1, state, META)
  manifest = json.loads((directory / '1' / 'manifest' / 'metadata').read_text())
  body = {k: v for k, v in manifest.items() if k != 'crc32'}
  assert manifest['crc32'] == zlib.crc32(json.dumps(body, sort_keys=True).encode())
  assert manifest['meta_crc32'] == zlib.crc32(json.dumps(META, sort_keys=True).encode())
  crcs = {tuple(e['path']): e['crc32'] for e in manifest['leaves']}
  assert crcs == {('params', 'w'): zlib.crc32(state['params']['w'].tobytes()),
                  ('step',): zlib.crc32(state['step'].tobytes())}


def test_is_prng_key():
  key = jax.random.key(0)
  assert checkpoint.is_prng_key(key)
  assert checkpoint.is_prng_key(jax.random.split(jax.random.key(1, impl='rbg'), 2))
  assert checkpoint.is_prng_key(jax.ShapeDtypeStruct((), key.dtype))
  # Raw key data (the old uint32 keys) and leaves without a dtype are not typed keys.
  assert not checkpoint.is_prng_key(jax.random.key_data(key))
  assert not checkpoint.is_prng_key(jax.random.PRNGKey(0))
  assert not checkpoint.is_prng_key(np.zeros(2, np.uint32))
  assert not checkpoint.is_prng_key(3)
  assert not checkpoint.is_prng_key(None)


def test_a_reader_lists_the_steps_committed_after_it_was_opened(tmp_path):
  # An evaluator polling latest_step() beside a training run saw the steps of its opening
  # time forever: orbax caches the list.
  directory = tmp_path / 'ckpt'
  state = {'w': np.ones(3, np.float32)}
  with checkpoint.Checkpointer(directory, keep=2, async_save=False) as writer, \
       checkpoint.Checkpointer(directory, keep=None, read_only=True) as reader:
    assert reader.all_steps() == [] and reader.latest_step() is None
    writer.save(1, state, {})
    assert reader.all_steps() == [1] and reader.latest_step() == 1
    writer.save(2, state, {})
    writer.save(3, state, {})  # keep=2 prunes step 1
    assert reader.all_steps() == [2, 3] and reader.latest_step() == 3
