"""Tests for avae_jax.hugepages: the tunable's value, when to restart, and its effect."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from avae_jax import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ON = f'{hugepages.TUNABLE}=1'


def _can_restart() -> bool:
  return hugepages.should_reexec({}, hugepages.glibc_version(), hugepages.thp_mode())


def test_with_tunable_adds_it_once_and_keeps_the_rest():
  assert hugepages.with_tunable('') == _ON
  assert hugepages.with_tunable('glibc.malloc.arena_max=2') == f'glibc.malloc.arena_max=2:{_ON}'
  assert hugepages.with_tunable('glibc.malloc.arena_max=2:') == f'glibc.malloc.arena_max=2:{_ON}'
  # The user's own setting wins, whatever its value.
  off = f'glibc.malloc.arena_max=2:{hugepages.TUNABLE}=0'
  assert hugepages.with_tunable(off) == off
  assert hugepages.with_tunable(_ON) == _ON


def test_should_reexec():
  assert hugepages.should_reexec({}, (2, 36), 'madvise')
  assert hugepages.should_reexec({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, (2, 35),
                                 'always')
  assert not hugepages.should_reexec({'GLIBC_TUNABLES': _ON}, (2, 36), 'madvise')
  assert not hugepages.should_reexec({'GLIBC_TUNABLES': f'{hugepages.TUNABLE}=0'}, (2, 36),
                                     'madvise')
  assert not hugepages.should_reexec({}, (2, 34), 'madvise')  # glibc would ignore it
  assert not hugepages.should_reexec({}, (3, 0), 'never')
  assert not hugepages.should_reexec({}, (2, 36), '')
  assert not hugepages.should_reexec({}, None, 'madvise')


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert hugepages.thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert hugepages.thp_mode(str(path)) == 'always'
  assert hugepages.thp_mode(str(tmp_path / 'missing')) == ''


def test_glibc_version_matches_platform():
  name, version = platform.libc_ver()
  if name != 'glibc':
    assert hugepages.glibc_version() is None
    return
  assert hugepages.glibc_version() == tuple(int(v) for v in version.split('.')[:2])


def _run(code: str, *args: str, tunables: str | None) -> list[str]:
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  if tunables is not None:
    env['GLIBC_TUNABLES'] = tunables
  out = subprocess.run([sys.executable, '-c', textwrap.dedent(code), *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60, check=True)
  return out.stdout.split('\n')[:-1]


_RESTART = """
  import os, sys
  from avae_jax import hugepages
  print('start', os.getpid(), flush=True)
  hugepages.reexec()
  print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])
"""


def test_reexec_restarts_once_with_the_tunable_and_the_same_arguments():
  if not _can_restart():
    pytest.skip('no restart here: glibc < 2.35, another C library, or no THP')
  lines = _run(_RESTART, 'a b', '--c=d', tunables=None)
  assert len(lines) == 3, lines
  pid = lines[0].split()[1]
  assert lines == [f'start {pid}', f'start {pid}', f"after {pid} {_ON} ['a b', '--c=d']"]


def test_reexec_keeps_a_given_setting():
  lines = _run(_RESTART, 'x', tunables=f'{hugepages.TUNABLE}=0')
  assert len(lines) == 2 and lines[1].endswith(f"{hugepages.TUNABLE}=0 ['x']"), lines


_MALLOC = """
  import ctypes, re
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  n = 64 << 20
  address = libc.malloc(n)
  ctypes.memset(address, 1, n)  # touch every page
  with open('/proc/self/smaps') as f:
    mappings = re.split(r'\\n(?=[0-9a-f]+-[0-9a-f]+ )', f.read())
  for mapping in mappings:
    low, high = (int(v, 16) for v in mapping.split()[0].split('-'))
    if low <= address < high:
      flags = re.search(r'VmFlags:(.*)', mapping).group(1).split()
      eligible = re.search(r'THPeligible:\\s+(\\d)', mapping)
      print('hg' in flags, eligible.group(1) if eligible else '-')
      break
  else:
    print('no mapping holds the block')
"""


def test_the_tunable_makes_mallocs_memory_eligible_for_huge_pages():
  # How many huge pages the kernel then grants depends on its free contiguous memory, so
  # the test reads what the process itself controls: the mapping's advice and eligibility.
  if not _can_restart() or not os.path.exists('/proc/self/smaps'):
    pytest.skip('needs glibc >= 2.35, transparent huge pages and /proc/self/smaps')
  line = _run(_MALLOC, tunables=_ON)[0]
  assert line != 'no mapping holds the block'
  advised, eligible = line.split()
  if eligible == '-':
    pytest.skip('this kernel does not report THPeligible')
  assert eligible == '1'
  if hugepages.thp_mode() == 'madvise':  # with 'always' every large mapping is eligible
    assert advised == 'True'  # glibc's madvise(MADV_HUGEPAGE)
    assert _run(_MALLOC, tunables=f'{hugepages.TUNABLE}=0')[0].split() == ['False', '0']


def test_a_program_read_from_stdin_runs_on_without_the_restart():
  # The restarted interpreter found stdin read to its end: it exited 0 having done nothing.
  if not _can_restart():
    pytest.skip('no restart here: glibc < 2.35, another C library, or no THP')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  for args in ([], ['-', 'x']):
    out = subprocess.run([sys.executable, *args], input=textwrap.dedent(_RESTART), cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    lines = out.stdout.split('\n')[:-1]
    assert len(lines) == 2, lines
    pid = lines[0].split()[1]
    assert lines == [f'start {pid}', f"after {pid} None {args[1:]}"]


def test_a_program_started_with_stdout_or_stderr_closed_restarts(tmp_path):
  # sys.stdout (or sys.stderr) is None then: flushing it before the restart ended every
  # program at start-up with an AttributeError.
  if not _can_restart():
    pytest.skip('no restart here: glibc < 2.35, another C library, or no THP')
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  code = ('import os, sys\nfrom avae_jax import hugepages\nhugepages.reexec()\n'
          'open(sys.argv[1], "w").write(os.environ["GLIBC_TUNABLES"])')
  for closed in ('>&-', '2>&-'):
    marker = tmp_path / f'tunables{len(closed)}'
    subprocess.run(['sh', '-c', f'exec "$0" -c "$1" "$2" {closed}', sys.executable, code,
                    str(marker)], cwd=ROOT, env=env, timeout=60, check=True)
    assert marker.read_text() == _ON, closed


def test_a_restart_the_system_refuses_is_one_line_and_the_program_goes_on(monkeypatch, capsys):
  # An interpreter that cannot be executed again (a sandbox's seccomp filter, a deleted
  # venv): still correct without huge pages, only slower.
  def refused(*args):
    raise PermissionError(1, 'Operation not permitted')
  monkeypatch.setattr(hugepages, 'should_reexec', lambda *args: True)
  monkeypatch.setattr(sys, 'argv', ['train.py'])
  monkeypatch.setattr(os, 'execve', refused)
  hugepages.reexec()
  assert capsys.readouterr().err == (
      f'avae_jax: could not restart with {hugepages.TUNABLE}=1 ([Errno 1] Operation not '
      'permitted); continuing without it\n')
