"""XLA:CPU flags that the project's programs set before JAX creates its backends.

jaxlib 0.10 runs each convolution on the CPU through YNNPACK by default. For the models'
convolutions XLA's own kernels are faster: with YNNPACK's convolutions switched off, the
CelebA-shaped pre-training step took 3.99 s instead of 4.57 s and the adversarial step
8.44 s instead of 11.17 s (docs/benchmarks.md, item 7). YNNPACK still computes matrix
products and reductions (taking the products off too was slower at CelebA's shape, and the
reductions changed nothing at MNIST's; item 7).

`apply()` adds the flags to XLA_FLAGS; train.py, eval.py, study.py, benchmark.py and the
tests call it first thing. A flag that XLA_FLAGS already sets keeps the user's value. The
flags are only added for the jaxlib versions they were measured with: an XLA that does
not know a flag refuses to start.

XLA:CPU splits each operation over a pool of threads, one per core the process may run on
(its CPU affinity: `taskset`, a container's CPU set) unless PJRT_NPROC or NPROC says how
many, and the split sets the order of float32 sums: a run with another thread count is
not bit-identical (README: Devices and reproducibility). `cpu_threads()` is that count, as
XLA reads it (at least one thread per CPU device); the trainer records this process's
(`process_cpu_threads()`) in its checkpoints.

`apply(cpu_devices=N)` (train.py, eval.py and benchmark.py pass `config.cpu_devices`) also
splits the host into N CPU devices (`--xla_force_host_platform_device_count`). Each
device then runs its share of the batch as a program of its own: on the 2-core machine,
two devices made the CelebA-shaped adversarial step 4-12% faster than one device using
both cores (pre-training from 5% slower to 21% faster, run to run), and the 28x28 and
32x32 steps 5-10% slower (docs/benchmarks.md, item 20).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from typing import Mapping

# name -> value; each was measured on the CPU with the jaxlib series in JAXLIB_SERIES.
CPU_FLAGS = {'xla_cpu_experimental_ynn_fusion_type': '-individual_convolution'}
JAXLIB_SERIES = ('0.10.',)
DEVICE_COUNT_FLAG = 'xla_force_host_platform_device_count'
# XLA:CPU's trace events of each operation (the thunks, named after the compiled HLO's
# fusions and convolutions); without it a CPU trace shows the host's work only.
# benchmark.py --profile_dir adds it: for the whole process, it left the steps' times
# unchanged (docs/benchmarks.md, item 25).
PROFILE_FLAGS = {'xla_cpu_enable_xprof_traceme': 'true'}
# What XLA's CPU client reads, in this order, for its thread count (jaxlib's
# DefaultThreadPoolSize); without them it takes the cores the process may run on.
THREAD_COUNT_VARS = ('PJRT_NPROC', 'NPROC')


def _jaxlib_version() -> str:
  """The installed jaxlib's version ('' when it is not installed)."""
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''


def _name(word: str) -> str:
  """The flag name of an XLA_FLAGS word such as --name=value."""
  return word.lstrip('-').split('=', 1)[0]


def given_flags(xla_flags: str) -> dict[str, str]:
  """{name: value} of the flags an XLA_FLAGS string sets (a repeated one: its last value)."""
  return {_name(w): w.partition('=')[2] for w in xla_flags.split()}


def with_device_count(xla_flags: str, count: int) -> str:
  """`xla_flags` with `count` CPU devices, in place of any count it sets."""
  words = [w for w in xla_flags.split() if _name(w) != DEVICE_COUNT_FLAG]
  return ' '.join(words + [f'--{DEVICE_COUNT_FLAG}={count}'])


def with_cpu_flags(xla_flags: str, jaxlib_version: str | None = None,
                   cpu_devices: int = 0, extra: Mapping[str, str] | None = None) -> str:
  """`xla_flags` plus each of CPU_FLAGS, `extra` (and the device count) it does not set."""
  if cpu_devices < 0:
    raise ValueError(f'cpu_devices must be >= 0 (0: one CPU device), got {cpu_devices}')
  version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
  wanted = dict(CPU_FLAGS) if version.startswith(JAXLIB_SERIES) else {}
  # The device count is a long-standing flag of every jaxlib, so it needs no version.
  if cpu_devices:
    wanted[DEVICE_COUNT_FLAG] = str(cpu_devices)
  wanted.update(extra or {})
  given = given_flags(xla_flags)
  words = xla_flags.split()
  words += [f'--{name}={value}' for name, value in wanted.items() if name not in given]
  return ' '.join(words)


def cpu_threads(cpu_devices: int = 1) -> int:
  """The number of threads XLA:CPU runs each operation on, in a process of cpu_devices."""
  count = None
  for name in THREAD_COUNT_VARS:
    try:
      count = max(0, int(os.environ[name]))
      break
    except (KeyError, ValueError):
      continue  # unset or not a number: XLA goes on to the next one too
  if count is None:
    try:
      count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no affinity to read
      count = os.cpu_count() or 1
  # XLA gives each CPU device a thread at least: devices pinned to one core (or with
  # PJRT_NPROC=1) do not compute what one thread does (tests/test_xla_flags.py).
  return max(count, cpu_devices)


def process_cpu_threads() -> int | None:
  """cpu_threads of this process's CPU devices; None when JAX computes on another backend."""
  import jax  # pylint: disable=g-import-not-at-top  (this module is imported before JAX)
  if jax.default_backend() != 'cpu':
    return None
  return cpu_threads(jax.local_device_count())


def apply(cpu_devices: int = 0, extra: Mapping[str, str] | None = None) -> None:
  """Adds CPU_FLAGS, `extra` (and a device count) to XLA_FLAGS; before JAX computes."""
  given = os.environ.get('XLA_FLAGS', '')
  count = given_flags(given).get(DEVICE_COUNT_FLAG)
  if cpu_devices and count is not None and count != str(cpu_devices):
    # launch.py sets the count of each process (its --devices_per_process).
    print(f'warning: config.cpu_devices={cpu_devices} is overridden by XLA_FLAGS '
          f'(--{DEVICE_COUNT_FLAG}={count})', file=sys.stderr, flush=True)
  flags = with_cpu_flags(given, cpu_devices=cpu_devices, extra=extra)
  if flags:
    os.environ['XLA_FLAGS'] = flags
