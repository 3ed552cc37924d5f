"""Transparent huge pages for the host memory of XLA:CPU's programs (a glibc tunable).

XLA:CPU allocates every execution's temporary buffer and outputs anew: about 1 GB a step
for the CelebA-shaped pre-training step, 90 MB for the MNIST-shaped one. glibc's malloc
serves such large requests from worker threads with a fresh mmap (a thread's arena
cannot hold them) and unmaps them when they are freed, so every step faulted its
buffers in again, 4 KiB at a time: 256,000 page faults and 0.45-1.1 s of system time per
CelebA-shaped step on the 2-core machine, 23,000 per MNIST-shaped step. With glibc's
tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and later) malloc asks for transparent huge
pages on its mappings (madvise), and the same buffers fault in 2 MiB at a time, 512x
fewer faults: the MNIST-shaped pre-training step took 0.058-0.064 s instead of
0.077-0.105 s, the CelebA-shaped one 1.17-1.26 s instead of 1.46-1.92 s
(docs/benchmarks.md, item 15).

glibc reads its tunables once, when the process starts, so the programs (train.py,
eval.py, study.py, benchmark.py, launch.py) call `reexec()` first: when the tunable is
missing and would take effect, it runs the same command line again in the same process
(os.execve, same pid) with the tunable added to GLIBC_TUNABLES. Setting the tunable
yourself, to 0 or 1, keeps your choice and skips the restart. A program read from stdin
(`python - < train.py`) cannot be read again and runs on without the restart.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
# The first glibc that knows the tunable; older ones ignore it, so a restart is wasted.
MIN_GLIBC = (2, 35)
_THP_ENABLED = '/sys/kernel/mm/transparent_hugepage/enabled'


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc; None for another C library or platform."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()
  except (AttributeError, ValueError, OSError):
    return None
  match = re.match(r'(\d+)\.(\d+)', version)
  if name != 'glibc' or not match:
    return None
  return int(match.group(1)), int(match.group(2))


def thp_mode(path: str = _THP_ENABLED) -> str:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'; '' if unknown)."""
  try:
    with open(path, encoding='ascii') as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return ''
  return match.group(1) if match else ''


def _names(tunables: str) -> set[str]:
  return {item.split('=', 1)[0] for item in tunables.split(':') if item}


def with_tunable(tunables: str) -> str:
  """A GLIBC_TUNABLES value with TUNABLE=1 added, unless it sets TUNABLE already."""
  if TUNABLE in _names(tunables):
    return tunables
  return ':'.join([t for t in tunables.split(':') if t] + [f'{TUNABLE}=1'])


def should_reexec(environ: Mapping[str, str], glibc: tuple[int, int] | None,
                  thp: str) -> bool:
  """Whether a restart helps: glibc knows TUNABLE, the kernel has THP, the env lacks TUNABLE."""
  return (glibc is not None and glibc >= MIN_GLIBC and thp in ('always', 'madvise')
          and TUNABLE not in _names(environ.get('GLIBC_TUNABLES', '')))


def reexec() -> None:
  """Runs this command line again with TUNABLE=1 when that helps (see above); else returns."""
  if not should_reexec(os.environ, glibc_version(), thp_mode()):
    return
  if sys.argv[:1] in ([], [''], ['-']):
    # The program came from stdin (`python - < train.py`) or a prompt: the restarted
    # interpreter would find stdin read to its end and exit, having done nothing.
    return
  env = dict(os.environ)
  env['GLIBC_TUNABLES'] = with_tunable(env.get('GLIBC_TUNABLES', ''))
  for stream in (sys.stdout, sys.stderr):
    if stream is not None:  # None: closed when the program started (`>&-`)
      stream.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError as e:
    # Still correct without huge pages, only slower: say so and go on.
    print(f'avae_jax: could not restart with {TUNABLE}=1 ({e}); continuing without it',
          file=sys.stderr, flush=True)
