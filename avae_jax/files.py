"""Workdir files (JSON, text, PNG) on a local disk or an object store (gs://...).

Checkpoints reach any path orbax understands; the workdir's other files (config.json,
calibration.json, final_metrics.json, the figures, eval/) go through etils.epath here
so that they land next to them. With Python's `open`, a run with --workdir=gs://b/run
wrote them into a local folder named `gs:`, and eval.py on another machine found no
config.json. JSON, text and PNG files are written under a temporary name and then renamed,
so that a crash or a full disk never leaves half a file (on an object store the rename is
a copy and a delete).
`exclusive` is the lock that keeps a second training run out of a local workdir;
`is_held` says whether a live process holds it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import sys
import time
import uuid
from typing import Any, Callable, Iterator

from absl import logging
from etils import epath
import numpy as np

PathLike = str | os.PathLike
LOCK_FILE = 'train.lock'
CACHE_ENV = 'AVAE_JAX_CACHE'  # the user's cache directory, where set


def user_cache_dir() -> str:
  """$AVAE_JAX_CACHE (~ expanded), else ~/.cache/avae_jax; read at each call."""
  return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join('~', '.cache',
                                                                       'avae_jax'))


class LockedError(RuntimeError):
  """Another process holds the directory's lock."""


def is_remote(path: PathLike) -> bool:
  """Whether `path` is a URI (gs://...) rather than a local or mounted path."""
  return '://' in os.fspath(path)


def makedirs(path: PathLike) -> None:
  """Creates the directory `path` and its parents (nothing if it exists)."""
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def output_dir_problem(path: PathLike, what: str) -> str | None:
  """Creates the directory `path`; what stops a program writing there, or None.

  `what` names it in the message (e.g. 'the workdir'). A local directory must be
  writable; a bucket's permissions show only at the first write.
  """
  if not is_remote(path) and os.path.isfile(path):
    return f'{what} {path} is a file, not a directory'
  try:
    makedirs(path)
  except OSError as e:  # a file on the way, no permission, a read-only file system
    return f'cannot create {what} {path}: {e}'
  if not is_remote(path) and not os.access(path, os.W_OK):
    return f'cannot write to {what} {path} (a read-only file system or no permission)'
  return None


# How orbax and tensorstore report a full disk: a ValueError with the system's message.
_NO_SPACE_MESSAGES = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


@contextlib.contextmanager
def naming_failures(path: PathLike) -> Iterator[None]:
  """Names `path` in an OSError raised inside that names no file, or only its temporary.

  A full disk fails a write(2) with no file name: the one-line error would not say which
  disk filled (the workdir's, the cache's). A write-then-rename's failures name the
  temporary (temporary_name), which the error should not send a user looking for; where
  the temporary could not be made or renamed for want of access (EACCES, EROFS), the
  folder is what refused, and is named.
  """
  try:
    yield
  except OSError as e:
    target = os.fspath(path)
    names = {str(n) for n in (e.filename, e.filename2) if n is not None}
    if e.errno is None or any(_TEMPORARY.sub('', n) != target for n in names):
      raise
    if names and e.errno in (errno.EACCES, errno.EROFS):
      target = os.path.dirname(target) or '.'
    # The same error (OSError picks the errno's subclass) and traceback, naming the file,
    # raised from what came before it: the unnamed original is left out of the chain,
    # where out_of_space and denied would find it first, and nothing else is.
    raise OSError(e.errno, e.strerror, target).with_traceback(e.__traceback__) from _before(e)


def denied(error: BaseException) -> OSError | None:
  """The first exception of `error`'s chain that refused access to a file, or None.

  No permission, an immutable file, a read-only file system: raised with the file's name.
  """
  return _innermost(error, lambda e: isinstance(e, OSError) and e.filename is not None
                    and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS))


def in_the_way(error: BaseException) -> OSError | None:
  """The first exception of `error`'s chain that found a directory or a file in the way, or None.

  A directory at a file's path (EISDIR), a file where a path needs a directory (ENOTDIR),
  or where a directory was to be made (EEXIST naming a file): raised with the path that was
  to be opened or made.
  """
  return _innermost(error, lambda e: isinstance(e, OSError) and e.filename is not None and (
      e.errno in (errno.EISDIR, errno.ENOTDIR)
      or e.errno == errno.EEXIST and os.path.isfile(e.filename)))


def _before(error: BaseException) -> BaseException | None:
  """The exception `error` was raised from or while handling, as a traceback shows it."""
  if error.__cause__ is not None or error.__suppress_context__:
    return error.__cause__
  return error.__context__


def _innermost(error: BaseException, matches: Callable[[BaseException], bool]
               ) -> BaseException | None:
  """The innermost exception of `error`'s chain (_before) that `matches`, or None.

  The innermost happened first; the others are its consequences (clean-ups that failed).
  """
  found, seen = None, set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if matches(e):
      found = e
    e = _before(e)
  return found


def out_of_space(error: BaseException) -> BaseException | None:
  """The first exception of `error`'s chain that reports a full disk or quota, or None.

  A full disk surfaces wherever the next write happens (an asynchronous checkpoint save,
  the summaries, a figure), and each clean-up that writes raises again: the innermost
  report is the failure itself, the others its consequences.
  """
  return _innermost(error, lambda e: (
      (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
      or any(m in str(e) for m in _NO_SPACE_MESSAGES)))


def exists(path: PathLike) -> bool:
  """Whether `path` exists."""
  return epath.Path(path).exists()


def remove(path: PathLike) -> None:
  """Deletes the file `path` (nothing if there is none)."""
  epath.Path(path).unlink(missing_ok=True)


def read_json(path: PathLike) -> Any:
  """Parses the JSON file at `path`."""
  return json.loads(epath.Path(path).read_text())


def jsonl_record(line: bytes | str) -> dict[str, Any] | None:
  """A metrics.jsonl line's record, or None for a line that is not one.

  Not one: empty, cut short by a crash, not UTF-8 (json.loads raises UnicodeDecodeError, a
  ValueError), not a JSON object, or without an integer `step` (the writer's every record
  has one).
  """
  try:
    record = json.loads(line)
  except ValueError:
    return None
  if not isinstance(record, dict):
    return None
  step = record.get('step')
  return record if isinstance(step, int) and not isinstance(step, bool) else None


def json_default(o: Any) -> Any:
  """JSON of numpy scalars and arrays (json itself takes tuples); write_json's default."""
  if isinstance(o, (np.floating, np.integer, np.bool_)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f'not JSON serialisable: {type(o)}')


def write_json(path: PathLike, obj: Any,
               default: Callable[[Any], Any] = json_default) -> None:
  """Writes `obj` as indented JSON, atomically, creating parent directories."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=default) + '\n')


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically (a temporary name, then a rename)."""
  write_bytes(path, text.encode('utf-8'))


def temporary_name(path: str) -> str:
  """A name beside `path` that no other writer of it uses, for a write-then-rename."""
  # Random, not only the pid and thread: writers of one file (eval.py beside the trainer's
  # evaluation, several hosts filling a shared tfds cache) must not rename each other's
  # half-written temporary, and containers on several hosts give them the same pids.
  return f'{path}.tmp{os.getpid()}.{uuid.uuid4().hex}'


# Temporaries being written that a hard exit removes (see removed_on_exit).
_REMOVE_ON_EXIT: set[str] = set()


@contextlib.contextmanager
def removed_on_exit(path: str) -> Iterator[str]:
  """Yields `path`, a temporary to write and rename; whatever is left of it is removed.

  At the block's end (after a rename nothing is left), and by remove_temporaries_now:
  a Ctrl-C ends the programs with os._exit (distributed.exit_now), which runs no
  `finally`, and a decoded cache's temporary is gigabytes.
  """
  _REMOVE_ON_EXIT.add(path)
  _IN_FLIGHT.add(os.path.basename(path))  # not a dead writer's, to remove_dead_temporaries
  try:
    yield path
  finally:
    _REMOVE_ON_EXIT.discard(path)
    _IN_FLIGHT.discard(os.path.basename(path))
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def remove_temporaries_now() -> None:
  """Removes the temporaries of the removed_on_exit blocks running now (before _exit)."""
  for path in list(_REMOVE_ON_EXIT):
    with contextlib.suppress(OSError):
      os.remove(path)


# temporary_name's names: the pid of the writer, then the random part.
_TEMPORARY = re.compile(r'\.tmp(\d+)\.[0-9a-f]{32}$')
# The names of this process's temporaries being written now (by any thread).
_IN_FLIGHT: set[str] = set()


def _writer_is_gone(name: str, pid: int) -> bool:
  """Whether no process writes the temporary `name` of process `pid` (on this host)."""
  if pid == os.getpid():
    # A restarted container gives a program the pid its killed predecessor had.
    return name not in _IN_FLIGHT
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # another user's process
    return False
  return False


def remove_dead_temporaries(directory: PathLike, skip: tuple[str, ...] = (),
                            min_age_s: float = 0.0, recursive: bool = True,
                            targets: tuple[str, ...] = ()) -> list[str]:
  """Deletes temporary_name's temporaries under a local `directory` whose writer is gone.

  A writer killed between its write and its rename (SIGKILL, a power cut) leaves its
  temporary behind; nothing else ever removes it. A temporary of a live process of this
  host (eval.py writing beside a run) is kept, and so is everything on an object store,
  where no pid says whether its writer lives. (The pid is the only clue: on a disk that
  several hosts share, another host's write in progress would be taken for dead.) A
  temporary with this process's pid is removed unless one of its threads is writing it.
  `skip`: names of subdirectories not to descend into (orbax's checkpoints, which orbax
  cleans itself). `min_age_s`: temporaries modified more recently are kept, where another
  host may be writing them (a cache on a shared disk). `recursive` False: `directory`'s
  own files only. `targets`: only the temporaries of files whose names end so. Returns
  the removed paths.
  """
  root = os.fspath(directory)
  if is_remote(root):
    return []
  removed = []
  for folder, subdirs, names in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in skip] if recursive else []
    for name in names:
      match = _TEMPORARY.search(name)
      if match is None or (targets and not name[:match.start()].endswith(targets)):
        continue
      if _writer_is_gone(name, int(match.group(1))):
        path = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):  # its writer's rename won the race
          if min_age_s and time.time() - os.stat(path).st_mtime < min_age_s:
            continue
          os.remove(path)
          removed.append(path)
  return removed


# A cache's temporary of a dead writer older than this is removed when a cache is opened
# or made in its directory: a build killed by SIGTERM or SIGKILL (a CelebA one takes
# minutes) left gigabytes behind for good. Younger ones may be another host's.
KILLED_WRITE_AGE_S = 600.0


def remove_killed_cache_writes(directory: str, targets: tuple[str, ...]) -> None:
  """Deletes the temporaries of killed writes of `targets` files in a cache `directory`."""
  try:
    # The caches' own temporaries only: $AVAE_JAX_CACHE may be a scratch tree of others.
    removed = remove_dead_temporaries(directory, min_age_s=KILLED_WRITE_AGE_S,
                                      recursive=False, targets=targets)
  except OSError as e:  # a read-only cache directory (made by another user, say)
    logging.warning('cannot remove the temporary files of killed cache writes in %s: %s',
                    directory, e)
    return
  if removed:
    logging.warning('removed %d temporary file(s) of a killed cache write in %s: %s',
                    len(removed), directory, ', '.join(os.path.basename(p) for p in removed))


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (a temporary name, then a rename)."""
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = temporary_name(str(target))
  if is_remote(target):
    remote = epath.Path(tmp)
    try:
      remote.write_bytes(data)
      remote.replace(target)
    finally:
      if remote.exists():
        remote.unlink()
    return
  with removed_on_exit(tmp), naming_failures(target):  # also by a Ctrl-C's os._exit
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      # On the disk before the rename: after a power cut some file systems would
      # otherwise show the new name with no data (an empty config.json).
      os.fsync(f.fileno())
    os.replace(tmp, target)


def is_held(directory: PathLike, lock_file: str = LOCK_FILE) -> bool:
  """Whether a live process holds `exclusive`'s lock on DIRECTORY/`lock_file`."""
  try:
    f = open(os.path.join(os.fspath(directory), lock_file), encoding='utf-8')
  except OSError:
    return False
  with f:
    # The kernel drops the lock of a killed process: taking it (for an instant, shared so
    # that two lookers do not exclude each other) fails only while its holder lives.
    try:
      fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def exclusive(directory: PathLike, holder: str, *, wait: bool = False,
              lock_file: str = LOCK_FILE) -> Iterator[None]:
  """Holds an advisory lock on DIRECTORY/`lock_file` inside the block (LockedError if taken).

  `holder` (e.g. 'train.py') is written into the file with the pid and host, for the
  message another process gets. The kernel drops the lock when the process ends, even on
  SIGKILL, so a crash never leaves a stale lock. Only local (and NFS) directories are
  locked: object stores (gs://...) have no locks, and nothing is held there. `wait`:
  instead of raising, say on stderr who holds the lock and wait until it is free.
  `lock_file`: a lock of another purpose than a training run's (train.lock).
  """
  path = os.fspath(directory)
  if is_remote(path):
    yield
    return
  with open(os.path.join(path, lock_file), 'a+', encoding='utf-8') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      message = f'{path} is in use by {f.read().strip() or "another process"}'
      if not wait:
        raise LockedError(message) from None
      print(f'{message}; waiting for it', file=sys.stderr, flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    f.seek(0)
    f.truncate()
    f.write(f'{holder} (pid {os.getpid()} on {socket.gethostname()})\n')
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
