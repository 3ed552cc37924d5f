"""Process and file-lock observations from /proc, shared by several test files."""

import os
import subprocess
import sys
import time
from typing import Callable

from avae_jax import files


def process_running(pid: int) -> bool:
  """Whether process `pid` exists and is no zombie."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def blocked_on_a_lock(pid: int) -> bool:
  """Whether process `pid` waits for a file lock (a '->' line of /proc/locks)."""
  with open('/proc/locks') as f:
    return any(line.split()[1] == '->' and str(pid) in line.split()[2:] for line in f)


def wait_until_blocked_on_a_lock(pid: int, alive: Callable[[], bool] = lambda: True,
                                 timeout_s: float = 120.0) -> None:
  """Returns once process `pid` waits for a file lock; fails if not `alive()` or later."""
  deadline = time.monotonic() + timeout_s
  while not blocked_on_a_lock(pid):
    assert alive(), f'what was to wait for the lock (in process {pid}) ended first'
    assert time.monotonic() < deadline, f'process {pid} did not wait for a lock'
    time.sleep(0.02)


def dead_pid() -> int:
  """The pid of a process that has ended (a child that printed it and exited)."""
  return int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                            capture_output=True, text=True, check=True).stdout)


def temporary_of(path: os.PathLike | str, pid: int) -> str:
  """files.write_bytes' temporary name for `path`, as process `pid` would choose it."""
  return files.temporary_name(str(path)).replace(f'.tmp{os.getpid()}.', f'.tmp{pid}.')
