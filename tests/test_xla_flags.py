"""Tests for avae_jax.xla_flags: which flags are added, and that XLA:CPU takes them."""

import os
import subprocess
import sys

import pytest

from avae_jax import xla_flags

_FLAG = 'xla_cpu_experimental_ynn_fusion_type'


def test_flags_are_added_to_the_users_flags():
  got = xla_flags.with_cpu_flags('--xla_force_host_platform_device_count=4', '0.10.2')
  assert got.split() == ['--xla_force_host_platform_device_count=4',
                         f'--{_FLAG}={xla_flags.CPU_FLAGS[_FLAG]}']
  assert xla_flags.with_cpu_flags('', '0.10.2') == f'--{_FLAG}={xla_flags.CPU_FLAGS[_FLAG]}'


def test_users_value_of_a_flag_wins():
  mine = f'--{_FLAG}=+individual_dot --xla_cpu_enable_fast_math=false'
  assert xla_flags.with_cpu_flags(mine, '0.10.2') == mine


def test_cpu_devices_adds_the_device_count_unless_the_user_sets_one():
  count = '--xla_force_host_platform_device_count'
  assert xla_flags.with_cpu_flags('', '0.11.0', cpu_devices=2) == f'{count}=2'
  got = xla_flags.with_cpu_flags('--a=1', '0.10.2', cpu_devices=3).split()
  assert got[0] == '--a=1' and f'{count}=3' in got and len(got) == 3
  assert xla_flags.with_cpu_flags(f'{count}=4', '0.11.0', cpu_devices=2) == f'{count}=4'
  assert xla_flags.with_cpu_flags('', '0.11.0', cpu_devices=0) == ''
  with pytest.raises(ValueError, match='cpu_devices must be >= 0'):
    xla_flags.with_cpu_flags('', '0.10.2', cpu_devices=-1)


def test_extra_flags_are_added_unless_the_user_sets_them():
  # benchmark.py --profile_dir's: a user's own value of the flag is kept.
  trace = '--xla_cpu_enable_xprof_traceme'
  assert xla_flags.with_cpu_flags('--a=1', '0.11.0', extra=xla_flags.PROFILE_FLAGS) == \
      f'--a=1 {trace}=true'
  assert xla_flags.with_cpu_flags(f'{trace}=false', '0.11.0',
                                  extra=xla_flags.PROFILE_FLAGS) == f'{trace}=false'


def test_no_flags_for_an_unmeasured_jaxlib():
  assert xla_flags.with_cpu_flags('--a=1', '0.11.0') == '--a=1'
  assert xla_flags.with_cpu_flags('', '') == ''


_PROBE = """
import os, sys
from avae_jax import xla_flags
os.environ.pop('XLA_FLAGS', None)
if sys.argv[1] == 'apply':
  xla_flags.apply()
import jax, jax.numpy as jnp
conv = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
x = jax.ShapeDtypeStruct((64, 28, 28, 32), jnp.float32)
w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)
hlo = jax.jit(conv).lower(x, w).compile().as_text()
print('ynn_fusion' in hlo)
"""


def _convolution_uses_ynnpack(mode: str) -> bool:
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', _PROBE, mode], env=env, check=True,
                       capture_output=True, text=True, cwd=root)
  return out.stdout.strip().splitlines()[-1] == 'True'


def test_apply_takes_the_convolution_away_from_ynnpack():
  # Without the flag this jaxlib compiles the (MNIST-sized) convolution into a YNNPACK
  # call; with it, into XLA's own.
  assert _convolution_uses_ynnpack('plain')
  assert not _convolution_uses_ynnpack('apply')


def test_a_device_count_in_xla_flags_wins_over_cpu_devices_with_a_warning(monkeypatch,
                                                                          capsys):
  # launch.py sets each process's count; config.cpu_devices was dropped without a word.
  count = f'--{xla_flags.DEVICE_COUNT_FLAG}'
  monkeypatch.setenv('XLA_FLAGS', f'{count}=2')
  xla_flags.apply(cpu_devices=4)
  assert f'{count}=2' in os.environ['XLA_FLAGS'] and f'{count}=4' not in os.environ['XLA_FLAGS']
  assert capsys.readouterr().err == (
      f'warning: config.cpu_devices=4 is overridden by XLA_FLAGS ({count}=2)\n')
  for flags, cpu_devices in ((f'{count}=4', 4), (f'{count}=2', 0), ('', 4)):  # no conflict
    monkeypatch.setenv('XLA_FLAGS', flags)
    xla_flags.apply(cpu_devices=cpu_devices)
    assert capsys.readouterr().err == ''
  assert f'{count}=4' in os.environ['XLA_FLAGS']


def test_cpu_threads_reads_what_xla_reads(monkeypatch):
  # PJRT_NPROC, then NPROC, a value that is not a number skipped; else the usable cores.
  for name in xla_flags.THREAD_COUNT_VARS:
    monkeypatch.delenv(name, raising=False)
  assert xla_flags.cpu_threads() == len(os.sched_getaffinity(0))
  monkeypatch.setenv('NPROC', '3')
  assert xla_flags.cpu_threads() == 3
  monkeypatch.setenv('PJRT_NPROC', '5')
  assert xla_flags.cpu_threads() == 5
  monkeypatch.setenv('PJRT_NPROC', 'many')
  assert xla_flags.cpu_threads() == 3
  assert xla_flags.cpu_threads(cpu_devices=4) == 4  # a thread per device at least


def test_process_cpu_threads_is_none_off_the_cpu(monkeypatch):
  # XLA:CPU's thread count says nothing about a GPU's or a TPU's steps. On the CPU: the
  # usable cores (conftest unsets PJRT_NPROC and NPROC), a thread per device at least.
  import jax  # pylint: disable=g-import-not-at-top
  assert xla_flags.process_cpu_threads() == max(len(os.sched_getaffinity(0)),
                                                jax.local_device_count())
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert xla_flags.process_cpu_threads() is None


_GRADIENT_PROBE = """
import hashlib, os, sys
if sys.argv[1:] == ['pin']:  # to one core, as `taskset -c 0` does, before XLA starts
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
import numpy as np
from avae_jax import xla_flags
xla_flags.apply()
import jax, jax.numpy as jnp
x = jax.random.normal(jax.random.PRNGKey(0), (16, 28, 28, 32))
w = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, 32, 32))
def loss(w, x):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return jnp.sum(jnp.tanh(y) ** 2)
grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, x)
digest = hashlib.sha256(b''.join(np.asarray(g).tobytes() for g in grads)).hexdigest()
print(xla_flags.process_cpu_threads(), digest)
"""


@pytest.mark.skipif(not hasattr(os, 'sched_setaffinity') or len(os.sched_getaffinity(0)) < 2,
                    reason='needs two usable cores to pin to one')
def test_the_thread_count_not_the_affinity_decides_the_numbers():
  # The README's account: a convolution's gradients (the models' largest sums) differ in
  # their last bits between one XLA:CPU thread and two, and PJRT_NPROC decides the count
  # whatever the process's affinity (pinned here to one core as `taskset -c 0` does);
  # several CPU devices get a thread each at least.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  base = {k: v for k, v in os.environ.items() if k not in xla_flags.THREAD_COUNT_VARS}
  base['XLA_FLAGS'] = xla_flags.with_cpu_flags('')  # one device, not the tests' four

  def run(pin: bool, **env: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, '-c', _GRADIENT_PROBE] + (['pin'] if pin else []),
        env=dict(base, JAX_PLATFORMS='cpu', **env), check=True, capture_output=True,
        text=True, cwd=root)
    threads, digest = out.stdout.split()[-2:]
    return int(threads), digest

  two = run(pin=False, PJRT_NPROC='2')
  one = run(pin=True)
  assert one[0] == 1 and two[0] == 2
  assert one[1] != two[1]
  assert run(pin=True, PJRT_NPROC='2') == two
  assert run(pin=False, PJRT_NPROC='1') == one
  two_devices = xla_flags.with_cpu_flags('', cpu_devices=2)
  assert run(pin=True, XLA_FLAGS=two_devices) == two
