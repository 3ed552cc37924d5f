"""avae_jax.files: the workdir's JSON, text and PNG files, locally and on gs:// (faked)."""

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
from PIL import Image
import pytest

from avae_jax import api
from avae_jax import cli
from avae_jax import files
from avae_jax import visualize
from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree(folder):
  """Every file under `folder`, as paths relative to it."""
  return sorted(os.path.relpath(os.path.join(d, f), folder)
                for d, _, names in os.walk(folder) for f in names)


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_json_text_and_bytes_round_trip(tmp_path, fake_bucket, where):
  base = str(tmp_path / 'run') if where == 'local' else 'gs://bucket/run'
  disk = tmp_path / 'run' if where == 'local' else fake_bucket / 'bucket' / 'run'
  files.makedirs(base)
  files.makedirs(base)  # existing: nothing happens
  obj = {'b': [1, 2.5], 'a': 'x', 'c': np.float32(0.25), 'd': np.arange(2), 'e': np.bool_(1)}
  files.write_json(os.path.join(base, 'deep', 'o.json'), obj)  # numpy's types by default
  files.write_text(os.path.join(base, 'table.md'), 'λ | 1\n')
  files.write_bytes(os.path.join(base, 'img', 'b.bin'), b'\x00\xff')
  assert _tree(disk) == ['deep/o.json', 'img/b.bin', 'table.md']  # no .tmp left
  with open(disk / 'deep' / 'o.json') as f:
    text = f.read()
  assert json.loads(text) == {'a': 'x', 'b': [1, 2.5], 'c': 0.25, 'd': [0, 1], 'e': True}
  assert text.endswith('}\n') and text.index('"a"') < text.index('"b"')
  assert (disk / 'table.md').read_text(encoding='utf-8') == 'λ | 1\n'
  assert (disk / 'img' / 'b.bin').read_bytes() == b'\x00\xff'
  assert files.exists(os.path.join(base, 'table.md'))
  assert not files.exists(os.path.join(base, 'missing.json'))
  assert files.read_json(os.path.join(base, 'deep', 'o.json'))['c'] == 0.25
  assert os.listdir('.') == []  # nothing went to a local folder named 'gs:'


def test_write_json_replaces_a_file_whole(fake_bucket):
  path = 'gs://bucket/w/final.json'
  files.write_json(path, {'step': 1, 'long': list(range(50))})
  files.write_json(path, {'step': 2})
  assert json.loads((fake_bucket / 'bucket' / 'w' / 'final.json').read_text()) == {'step': 2}


def test_concurrent_writers_of_one_file_leave_one_whole_file(tmp_path):
  # eval.py may write WORKDIR/eval/metrics.json while the trainer's evaluation does.
  path = str(tmp_path / 'eval' / 'metrics.json')
  texts = ['a' * 20000, 'b' * 30000]
  errors = []

  def write(text):
    try:
      for _ in range(300):
        files.write_text(path, text)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=write, args=(t,)) for t in texts]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  with open(path) as f:
    assert f.read() in texts
  assert os.listdir(tmp_path / 'eval') == ['metrics.json']


@pytest.mark.parametrize('kind', ['bytes', 'text'])
def test_a_write_that_fails_halfway_keeps_the_previous_file_whole(tmp_path, kind):
  # A full disk, made here with a 4 KiB file-size limit: write_bytes (the figures) opened
  # the final name, truncated it and left its first 4096 bytes there.
  path = tmp_path / 'images' / 'samples.png'
  old, x = ('old', 'x') if kind == 'text' else (b'old', b'x')
  script = ('import resource\n'
            'from avae_jax import files\n'
            f'files.write_{kind}({str(path)!r}, {old!r})\n'
            'resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n'
            f'files.write_{kind}({str(path)!r}, {x!r} * 100000)\n')
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 1 and 'File too large' in out.stderr, out.stderr
  assert path.read_bytes() == b'old'
  assert os.listdir(path.parent) == ['samples.png']  # the temporary is removed


def test_a_failed_replace_on_an_object_store_leaves_no_temporary(fake_bucket, monkeypatch):
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  files.write_bytes('gs://bucket/run/a.png', b'old')

  def refused(self, target):
    raise PermissionError(errno.EACCES, 'Permission denied', os.fspath(target))

  monkeypatch.setattr(gpath.PosixGPath, 'replace', refused)
  with pytest.raises(PermissionError):
    files.write_bytes('gs://bucket/run/a.png', b'new')
  assert _tree(fake_bucket) == ['bucket/run/a.png']  # the copy written first is deleted
  assert (fake_bucket / 'bucket' / 'run' / 'a.png').read_bytes() == b'old'


def test_user_cache_dir_expands_a_home_path(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.setenv('AVAE_JAX_CACHE', '~/c')
  assert files.user_cache_dir() == str(tmp_path / 'c')
  monkeypatch.delenv('AVAE_JAX_CACHE')
  assert files.user_cache_dir() == str(tmp_path / '.cache' / 'avae_jax')


def test_a_local_write_is_on_the_disk_before_its_rename(tmp_path, monkeypatch):
  # Renamed before its data were synced, a file can be left empty by a power cut.
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}')))
    real_fsync(fd)

  def replace(src, dst, **kwargs):
    events.append(('rename', os.fspath(src)))
    real_replace(src, dst, **kwargs)

  monkeypatch.setattr(os, 'fsync', fsync)
  monkeypatch.setattr(os, 'replace', replace)
  files.write_text(str(tmp_path / 'config.json'), '{}\n')
  assert [e[0] for e in events] == ['fsync', 'rename']
  assert events[0][1] == events[1][1]  # the temporary file itself was synced
  assert (tmp_path / 'config.json').read_text() == '{}\n'


def test_png_and_config_on_gs(fake_bucket):
  image = np.linspace(0, 1, 5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)
  visualize.save_png('gs://bucket/run/images/a.png', image)
  with Image.open(fake_bucket / 'bucket' / 'run' / 'images' / 'a.png') as png:
    decoded = np.asarray(png)
  np.testing.assert_array_equal(decoded, np.round(image * 255).astype(np.uint8))
  # eval.py finds the training config of a gs:// workdir.
  assert api.read_config('gs://bucket/run') is None
  saved = fake_bucket / 'bucket' / 'run' / 'config.json'
  saved.write_text('{"seed": 3, "model": {"widths": [8]}}')
  config = api.read_config('gs://bucket/run')
  assert (config.seed, list(config.model.widths)) == (3, [8])
  assert os.listdir('.') == []


def test_temporaries_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
  dead = processes.dead_pid()
  live = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
  try:
    (tmp_path / 'images').mkdir()
    (tmp_path / 'checkpoints').mkdir()
    gone = [processes.temporary_of(tmp_path / 'config.json', dead),
            processes.temporary_of(tmp_path / 'images' / 'samples.png', dead),
            # This process's pid: a restarted container's program may have its
            # predecessor's.
            processes.temporary_of(tmp_path / 'final_metrics.json', os.getpid())]
    kept = [processes.temporary_of(tmp_path / 'eval.json', live.pid),
            processes.temporary_of(tmp_path / 'checkpoints' / 'x.json', dead),  # skipped directory
            str(tmp_path / 'config.json'),
            str(tmp_path / f'notes.tmp{dead}'),
            str(tmp_path / f'notes.tmp{dead}.{"g" * 32}')]
    for path in gone + kept:
      with open(path, 'w') as f:
        f.write('x')
    removed = files.remove_dead_temporaries(tmp_path, skip=('checkpoints',))
    assert sorted(removed) == sorted(gone)
    assert _tree(tmp_path) == sorted(os.path.relpath(p, tmp_path) for p in kept)
  finally:
    live.kill()
    live.wait()


def test_a_temporary_of_another_users_live_process_is_kept(tmp_path, monkeypatch):
  # os.kill(pid, 0) of another user's process is refused (EPERM): the process lives.
  dead = processes.dead_pid()
  signalled = []

  def kill(pid, sig):
    signalled.append((pid, sig))
    raise PermissionError(errno.EPERM, 'Operation not permitted')

  monkeypatch.setattr(os, 'kill', kill)
  path = processes.temporary_of(tmp_path / 'eval.json', dead)
  with open(path, 'w') as f:
    f.write('x')
  assert files.remove_dead_temporaries(tmp_path) == []
  assert signalled == [(dead, 0)]
  assert _tree(tmp_path) == [os.path.basename(path)]


def test_a_recent_temporary_of_a_dead_writer_is_kept_under_a_minimum_age(tmp_path):
  # On a disk that several hosts share, a temporary still being written by another host
  # has a dead pid here, but a recent modification time.
  dead = processes.dead_pid()
  old = processes.temporary_of(tmp_path / 'a.npy', dead)
  recent = processes.temporary_of(tmp_path / 'b.npy', dead)
  for path in (old, recent):
    with open(path, 'w') as f:
      f.write('x')
  os.utime(old, (time.time() - 601, time.time() - 601))
  assert files.remove_dead_temporaries(tmp_path, min_age_s=600) == [old]
  assert _tree(tmp_path) == [os.path.basename(recent)]
  assert files.remove_dead_temporaries(tmp_path) == [recent]  # no minimum age: removed


def test_temporaries_removed_only_at_the_top_and_of_the_targets_asked_for(tmp_path):
  dead = processes.dead_pid()
  (tmp_path / 'sub').mkdir()
  cache = processes.temporary_of(tmp_path / 'a.npy', dead)
  other = processes.temporary_of(tmp_path / 'model.ckpt', dead)
  deeper = processes.temporary_of(tmp_path / 'sub' / 'b.npy', dead)
  for path in (cache, other, deeper):
    with open(path, 'w') as f:
      f.write('x')
  assert files.remove_dead_temporaries(tmp_path, recursive=False,
                                       targets=('.npy', '.npz')) == [cache]
  assert sorted(files.remove_dead_temporaries(tmp_path)) == sorted([other, deeper])


def test_a_temporary_being_written_under_removed_on_exit_is_not_a_dead_writers(tmp_path):
  path = files.temporary_name(str(tmp_path / 'c.npy'))
  with files.removed_on_exit(path):
    with open(path, 'w') as f:
      f.write('x')
    assert files.remove_dead_temporaries(tmp_path) == []  # this process is writing it
    assert os.path.exists(path)
  assert not os.path.exists(path)  # and gone at the block's end


def test_a_write_in_progress_in_this_process_keeps_its_temporary(tmp_path, monkeypatch):
  # Another thread of this process (a study's heartbeat beside its training run) is
  # between its write and its rename while the temporaries are removed.
  syncing, resume = threading.Event(), threading.Event()
  real_fsync = os.fsync

  def fsync(fd):
    syncing.set()
    resume.wait(60)
    real_fsync(fd)

  monkeypatch.setattr(os, 'fsync', fsync)
  errors = []

  def write():
    try:
      files.write_text(str(tmp_path / 'study_run.json'), '{}\n')
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  writer = threading.Thread(target=write)
  writer.start()
  assert syncing.wait(60)
  removed = files.remove_dead_temporaries(tmp_path)
  resume.set()
  writer.join(60)
  assert removed == [] and errors == []
  assert _tree(tmp_path) == ['study_run.json']


def test_a_hard_exit_during_write_bytes_removes_its_temporary(tmp_path, monkeypatch):
  # A Ctrl-C ends the programs with os._exit (distributed.exit_now), which runs no
  # `finally`: the temporaries it knows of are all that it removes.
  left = []

  def exit_now(fd):
    del fd
    files.remove_temporaries_now()
    left.extend(_tree(tmp_path))
    raise SystemExit(130)

  monkeypatch.setattr(os, 'fsync', exit_now)
  with pytest.raises(SystemExit):
    files.write_bytes(str(tmp_path / 'features.npz'), b'x' * 1000)
  assert left == []


def test_exclusive_admits_one_holder_at_a_time(tmp_path):
  with files.exclusive(tmp_path, 'first'):
    with pytest.raises(files.LockedError, match=r'is in use by first \(pid \d+ on '):
      with files.exclusive(tmp_path, 'second'):
        pass
  with files.exclusive(tmp_path, 'third'):  # released on exit
    assert (tmp_path / files.LOCK_FILE).read_text().startswith(f'third (pid {os.getpid()} ')


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from avae_jax import files\n'
       f'with files.exclusive({str(tmp_path)!r}, "holder"):\n'
       '  print("held", flush=True); time.sleep(600)'],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    with pytest.raises(files.LockedError, match=f'in use by holder \\(pid {holder.pid} '):
      with files.exclusive(tmp_path, 'me'):
        pass
  finally:
    holder.kill()
    holder.communicate()  # waits, and closes its stdout pipe
  with files.exclusive(tmp_path, 'me'):
    pass


def test_waiting_for_a_lock_of_another_name(tmp_path, capsys):
  # The holder releases report.lock when told on stdin (once this process waits for it),
  # writing 'released' just before.
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import pathlib, time; from avae_jax import files\n'
       f'd = pathlib.Path({str(tmp_path)!r})\n'
       'with files.exclusive(d, "holder", lock_file="report.lock"):\n'
       '  print("held", flush=True); input(); (d / "released").touch()\n'
       'time.sleep(600)'],
      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  errors = []

  def release_when_waited_for():
    try:
      processes.wait_until_blocked_on_a_lock(os.getpid())
    except AssertionError as e:  # released all the same, so that the test cannot hang
      errors.append(e)
    try:
      holder.stdin.write('\n')
      holder.stdin.flush()
    except (BrokenPipeError, ValueError):  # the test failed first and killed the holder
      pass

  try:
    assert holder.stdout.readline() == 'held\n'
    with files.exclusive(tmp_path, 'me'):  # train.lock is another lock
      pass
    with pytest.raises(files.LockedError, match='in use by holder'):
      with files.exclusive(tmp_path, 'me', lock_file='report.lock'):
        pass
    releaser = threading.Thread(target=release_when_waited_for, daemon=True)
    releaser.start()
    with files.exclusive(tmp_path, 'me', wait=True, lock_file='report.lock'):
      assert (tmp_path / 'released').exists()
      assert holder.poll() is None  # released by the block's end, not by the process's
    releaser.join()
    assert not errors, errors
    assert re.fullmatch(rf'{re.escape(str(tmp_path))} is in use by holder \(pid {holder.pid} '
                        r'on .*\); waiting for it\n', capsys.readouterr().err)
  finally:
    holder.kill()
    holder.communicate()


def test_exclusive_holds_nothing_on_an_object_store(fake_bucket):
  files.makedirs('gs://bucket/run')
  with files.exclusive('gs://bucket/run', 'a'), files.exclusive('gs://bucket/run', 'b'):
    pass
  assert _tree(fake_bucket) == []


def test_output_dir_problem_names_a_file_a_read_only_directory_or_nothing(
    tmp_path, fake_bucket, monkeypatch):
  assert files.output_dir_problem(tmp_path / 'new' / 'dir', 'the workdir') is None
  assert (tmp_path / 'new' / 'dir').is_dir()
  (tmp_path / 'f').write_text('x')
  assert files.output_dir_problem(tmp_path / 'f', 'the workdir') == \
      f'the workdir {tmp_path / "f"} is a file, not a directory'
  assert files.output_dir_problem(tmp_path / 'f' / 'sub', 'the workdir').startswith(
      f'cannot create the workdir {tmp_path / "f" / "sub"}: ')
  # A read-only file system, as the kernel answers it (root ignores permission bits).
  real = os.access
  monkeypatch.setattr(os, 'access', lambda p, mode: False if os.fspath(p) == str(
      tmp_path / 'new') else real(p, mode))
  assert files.output_dir_problem(tmp_path / 'new', 'the study directory') == (
      f'cannot write to the study directory {tmp_path / "new"} (a read-only file system or '
      'no permission)')
  # A bucket is created and not probed.
  assert files.output_dir_problem('gs://bucket/run', 'the workdir') is None
  assert (fake_bucket / 'bucket' / 'run').is_dir()


def _chained(*errors):
  """The last of `errors`, raised while handling the one before it (as clean-ups do)."""
  def raise_all(first, *rest):
    try:
      raise first
    finally:
      if rest:
        raise_all(*rest)
  try:
    raise_all(*errors)
  except BaseException as e:  # pylint: disable=broad-except
    return e


def _enospc():
  return OSError(errno.ENOSPC, 'No space left on device')


def _orbax():
  # How tensorstore (orbax) reported it on a full tmpfs: the system's message in a ValueError.
  return ValueError('RESOURCE_EXHAUSTED: Error writing local file "w/checkpoints/20": Failed '
                    "to write 53333 bytes to file 6: No space left on device [os_error_code='28']")


def _closed():
  return ValueError('flush of closed file')


def test_out_of_space_finds_the_first_full_disk_report_in_a_chain():
  first = _enospc()
  chain = _chained(first, _closed(), _orbax())
  assert chain.__context__.__context__ is first  # the helper chains them
  assert files.out_of_space(chain) is first
  orbax = _orbax()
  assert files.out_of_space(_chained(orbax, _closed())) is orbax
  quota = OSError(errno.EDQUOT, 'Disk quota exceeded')
  assert files.out_of_space(_chained(quota, _closed())) is quota
  denied = OSError(errno.EACCES, 'Permission denied')
  assert files.out_of_space(_chained(_closed(), denied)) is None
  assert files.out_of_space(_closed()) is None
  # A chain that loops (an exception re-raised while handling itself) ends.
  looped = ValueError('x')
  looped.__context__ = ValueError('y')
  looped.__context__.__context__ = looped
  assert files.out_of_space(looped) is None


def test_out_of_space_knows_a_quota_by_its_errno_whatever_its_message():
  quota = OSError(errno.EDQUOT, 'x')
  assert files.out_of_space(quota) is quota
  full = OSError(errno.ENOSPC, 'x')
  assert files.out_of_space(_chained(full, _closed())) is full
  assert files.out_of_space(OSError(errno.EIO, 'x')) is None


def test_denied_finds_the_first_refused_file_in_a_chain():
  first = PermissionError(errno.EACCES, 'Permission denied', '/w/metrics.jsonl')
  assert files.denied(_chained(first, _closed(), _enospc())) is first
  for code in (errno.EPERM, errno.EROFS):
    refused = OSError(code, os.strerror(code), '/w/config.json')
    assert files.denied(_chained(refused, _closed())) is refused
  # Without a file it is not a file's (a signal sent to another user's process, say).
  assert files.denied(_chained(PermissionError(errno.EPERM, 'not permitted'), _closed())) is None
  assert files.denied(_chained(_enospc(), _closed())) is None


def _raised(fn, *args):
  """The OSError that fn(*args) raises (a real one, with the system's errno and name)."""
  with pytest.raises(OSError) as info:
    fn(*args)
  return info.value


def test_in_the_way_finds_a_directory_or_file_where_the_other_goes(tmp_path):
  (tmp_path / 'images').write_text('x')
  (tmp_path / 'metrics.json').mkdir()
  cases = [  # (the error, what exit_if_file_error says of it)
      (_raised(open, tmp_path / 'metrics.json', 'w'),
       f'{tmp_path / "metrics.json"} is a directory, where a file goes; move it aside and '
       'run it again'),
      (_raised(open, tmp_path / 'images' / 'step_1.png', 'w'),
       f'{tmp_path / "images"} is a file where a directory goes; move it aside and run it '
       'again'),
      (_raised(os.makedirs, tmp_path / 'images', 0o777, True),
       f'{tmp_path / "images"} is a file where a directory goes; move it aside and run it '
       'again'),
  ]
  assert [e.errno for e, _ in cases] == [errno.EISDIR, errno.ENOTDIR, errno.EEXIST]
  for error, message in cases:
    chain = _chained(error, _closed())
    assert files.in_the_way(chain) is error
    with pytest.raises(SystemExit) as info:
      cli.exit_if_file_error(chain, 'eval.py', 'run it again')
    assert str(info.value.code) == f'eval.py: error: {message}'
  # Without a file it names nothing; other errors are not its (a directory that exists).
  assert files.in_the_way(OSError(errno.EISDIR, 'Is a directory')) is None
  assert files.in_the_way(_raised(os.mkdir, tmp_path / 'metrics.json')) is None
  assert files.in_the_way(_chained(_enospc(), _closed())) is None
  cli.exit_if_file_error(_closed(), 'eval.py', 'run it again')  # returns: not a file error


def test_an_error_raised_from_none_hides_what_it_replaced():
  # As a traceback shows it: `raise X from None` leaves the error it replaced out.
  try:
    try:
      raise _enospc()
    except OSError:
      raise ValueError('replaced') from None  # pylint: disable=raise-missing-from
  except ValueError as e:
    hidden = e
  assert hidden.__context__ is not None and files.out_of_space(hidden) is None
  try:
    try:
      raise ValueError('a clean-up')
    except ValueError as e:
      raise OSError(errno.EROFS, 'Read-only file system', '/w/a') from e
  except OSError as e:
    caused = e
  assert files.out_of_space(caused) is None and files.denied(caused) is caused


def test_write_failures_name_the_file_not_its_temporary(tmp_path, monkeypatch):
  target = tmp_path / 'config.json'

  def full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')  # as write(2) says it: no name

  monkeypatch.setattr(os, 'fsync', full)
  with pytest.raises(OSError) as info:
    files.write_bytes(target, b'{}')
  assert str(info.value) == f"[Errno 28] No space left on device: '{target}'"
  assert files.out_of_space(info.value) is info.value  # the one-line error names the file
  assert os.listdir(tmp_path) == []  # and the temporary is gone
  monkeypatch.undo()

  # A rename refused (an immutable config.json) named the temporary, then the file.
  def refused(src, dst):
    raise PermissionError(errno.EPERM, 'Operation not permitted', src, dst)

  monkeypatch.setattr(os, 'replace', refused)
  with pytest.raises(PermissionError) as info:
    files.write_bytes(target, b'{}')
  assert str(info.value) == f"[Errno 1] Operation not permitted: '{target}'"
  assert files.denied(info.value) is info.value
  # An error that names another file keeps its names.
  other = PermissionError(errno.EACCES, 'Permission denied', '/elsewhere')
  with pytest.raises(PermissionError) as info:
    with files.naming_failures(target):
      raise other
  assert info.value is other and other.filename == '/elsewhere'


def test_a_folder_that_refuses_the_temporary_is_named(tmp_path, monkeypatch):
  # No write access to the folder: the temporary cannot be made, whatever the file's mode.
  def refused(path, *args, **kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied', path)

  monkeypatch.setattr(files, 'open', refused, raising=False)
  with pytest.raises(PermissionError) as info:
    files.write_bytes(tmp_path / 'run' / 'config.json', b'{}')
  assert str(info.value) == f"[Errno 13] Permission denied: '{tmp_path / 'run'}'"
  # A bare file name: the working directory refused.
  monkeypatch.chdir(tmp_path)
  with pytest.raises(PermissionError) as info:
    files.write_bytes('config.json', b'{}')
  assert str(info.value) == "[Errno 13] Permission denied: '.'"


def test_any_uri_is_remote_and_a_path_is_not():
  for uri in ('gs://bucket/run', 's3://bucket/run', 'https://host/x'):
    assert files.is_remote(uri), uri
  for path in ('run', '/tmp/run', 'gs:run', '~/gs/run'):
    assert not files.is_remote(path), path


def test_a_named_failure_keeps_what_it_was_raised_after(tmp_path, monkeypatch):
  def full(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', full)
  # A clean-up write failing after a bug: the bug stays in the traceback's chain.
  with pytest.raises(OSError) as info:
    try:
      raise KeyError('the bug')
    finally:
      files.write_bytes(tmp_path / 'study_run.json', b'{}')
  assert isinstance(info.value.__cause__, KeyError)
  assert info.value.__traceback__.tb_next is not None  # down to write_bytes' frames
  # After a full disk reported by orbax, the clean-up's is a consequence: the first wins.
  orbax = _orbax()
  with pytest.raises(OSError) as info:
    try:
      raise orbax
    finally:
      files.write_bytes(tmp_path / 'study_run.json', b'{}')
  assert files.out_of_space(info.value) is orbax
