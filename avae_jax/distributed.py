"""Multi-process start-up: jax.distributed when the environment asks for it, nothing otherwise.

One JAX process runs per host (TPU pod slice, several GPU hosts, or launch.py's local
processes); each sees its local devices and all of them together run one program. What
asks for it, first match wins:

* flags --coordinator_address, --num_processes, --process_id (train.py and eval.py
  define them through this module), or the variables AVAE_COORDINATOR_ADDRESS,
  AVAE_NUM_PROCESSES, AVAE_PROCESS_ID (launch.py sets these);
* a TPU VM of a pod slice (TPU_WORKER_HOSTNAMES lists several workers): JAX finds the
  coordinator, count and id itself;
* --distributed_auto or AVAE_DISTRIBUTED_AUTO=1: JAX's own detection of Slurm and Open MPI.

--distributed_timeout_s / AVAE_DISTRIBUTED_TIMEOUT_S bounds how long a process waits for
its peers to start and how long a silent (dead) peer goes unnoticed: the JAX runtime then
aborts the surviving processes with a message naming the dead one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import Any, Callable, Iterator, NoReturn, Sequence

from absl import flags
from absl import logging
import jax

from avae_jax import files
from avae_jax import ports

ENV_COORDINATOR = 'AVAE_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'AVAE_NUM_PROCESSES'
ENV_PROCESS_ID = 'AVAE_PROCESS_ID'
ENV_TIMEOUT = 'AVAE_DISTRIBUTED_TIMEOUT_S'
ENV_AUTO = 'AVAE_DISTRIBUTED_AUTO'

# A process that finished waits this long at exit for the others (process 0 writes the
# figures and final metrics after the last step); never shorter than the timeout.
_MIN_SHUTDOWN_TIMEOUT_S = 300

_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    f'host:port of process 0 for a multi-process run (or ${ENV_COORDINATOR}).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, f'Number of processes of a multi-process run (or ${ENV_NUM_PROCESSES}).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, f'This process, 0 .. num_processes - 1 (or ${ENV_PROCESS_ID}).')
_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout_s', None,
    'Seconds a process waits for its peers to start, and after which a peer that stopped '
    f'answering counts as dead (or ${ENV_TIMEOUT}; default: JAX\'s, 300 and 100).')
_AUTO = flags.DEFINE_bool(
    'distributed_auto', False,
    f'Let JAX detect a Slurm or Open MPI cluster (or ${ENV_AUTO}=1).')


class DistributedConfigError(ValueError):
  """The multi-process settings are incomplete or inconsistent."""


def _flag(holder: flags.FlagHolder) -> Any:
  """A flag's value where the command line gives it, else None (so AVAE_* applies)."""
  try:
    # `present`: an explicit --nodistributed_auto overrides AVAE_DISTRIBUTED_AUTO=1.
    return holder.value if holder.present else None
  except flags.UnparsedFlagAccessError:
    return None


def _first(*values: Any) -> Any:
  """The first value that is not None or ''."""
  for v in values:
    if v is not None and v != '':
      return v
  return None


def _int(value: Any, what: str) -> int | None:
  """int(value), or None; a clear error for text that is not a number."""
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedConfigError(f'{what} must be an integer, got {value!r}') from None


def on_multihost_tpu() -> bool:
  """True on a TPU VM that belongs to a pod slice (several workers)."""
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def _check_address(address: str) -> None:
  """Raises DistributedConfigError unless `address` is host:port with a port in 1..65535."""
  # jax.distributed takes the port after the last ':' and failed with a bare IndexError
  # ('list index out of range') when there was none.
  host, _, port = address.rpartition(':')
  if not host.strip('[]') or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedConfigError(
        f'the coordinator address must be host:port (e.g. 10.0.0.2:1234, the port process 0 '
        f'listens on), got {address!r}')


def _check_port(address: str) -> None:
  """Raises DistributedConfigError if process 0's coordinator could not listen on the port."""
  host, _, port = address.rpartition(':')
  # Where the coordinator listens: on the loopback address itself for a local run (see
  # initialize), else on every interface. 'localhost' is checked as 127.0.0.1.
  host = host.strip('[]')
  if not _is_loopback(address):
    host = ''
  elif host == 'localhost':
    host = ports.LOOPBACK
  problem = ports.port_problem(int(port), host)
  if problem:
    raise DistributedConfigError(f'process 0 cannot be the coordinator at {address}: '
                                 f'{problem}; give another port')


def _check_device_counts() -> None:
  """Raises DistributedConfigError unless every process has as many local devices.

  Every process computes the same answer from the global device list. The first
  collective (orbax's, at start-up) otherwise failed with a reshape error deep in JAX.
  """
  counts = [len(jax.local_devices(process_index=p)) for p in range(jax.process_count())]
  if len(set(counts)) > 1:
    raise DistributedConfigError(
        'the processes have different numbers of local devices ('
        + ', '.join(f'process {p}: {n}' for p, n in enumerate(counts))
        + '); give every process the same (--config.cpu_devices on CPUs, the GPUs it sees)')


def _check_count_and_id(num: int, pid: int | None) -> None:
  """Raises DistributedConfigError unless num >= 1 and pid (if given) is in [0, num)."""
  if num < 1:
    raise DistributedConfigError(f'the number of processes must be >= 1, got {num}')
  if pid is not None and not 0 <= pid < num:
    raise DistributedConfigError(
        f'process id {pid} is not in [0, {num}) (number of processes {num})')


def _is_loopback(address: str) -> bool:
  """True for 127.x.x.x:port / localhost:port, where the coordinator needs no other interface."""
  host = address.rsplit(':', 1)[0].strip('[]')
  return host == 'localhost' or host.startswith('127.') or host == '::1'


def _settings(coordinator_address: str | None = None, num_processes: int | None = None,
              process_id: int | None = None, timeout_s: int | None = None,
              auto: bool | None = None) -> tuple[Any, int | None, int | None, int | None, bool]:
  """(address, processes, process id, timeout, auto): arguments, else flags, else AVAE_*."""
  address = _first(coordinator_address, _flag(_COORDINATOR), os.environ.get(ENV_COORDINATOR))
  num = _int(_first(num_processes, _flag(_NUM_PROCESSES), os.environ.get(ENV_NUM_PROCESSES)),
             'the number of processes')
  pid = _int(_first(process_id, _flag(_PROCESS_ID), os.environ.get(ENV_PROCESS_ID)),
             'the process id')
  timeout = _int(_first(timeout_s, _flag(_TIMEOUT), os.environ.get(ENV_TIMEOUT)),
                 'the distributed timeout')
  auto = bool(_first(auto, _flag(_AUTO), os.environ.get(ENV_AUTO) == '1' or None))
  return address, num, pid, timeout, auto


def several_processes_requested() -> bool:
  """Whether the flags or AVAE_* settings (or a pod slice) ask for more than one process.

  What initialize would start, or refuse for want of a coordinator or of a process count;
  without starting it. A coordinator with one process is a single-process run.
  """
  address, num, pid, _, auto = _settings()
  # A process id alone is refused too: a process launched k times by hand.
  return (num or 1) > 1 or (num is None and (address is not None or pid is not None)) or \
      auto or on_multihost_tpu()


def _start_runtime(**kwargs: Any) -> None:
  """jax.distributed.initialize(**kwargs) without JAX's preemption service."""
  # The service (on by default) installs a C-level SIGTERM handler that only records the
  # signal, for JAX's preemption sync points, which this project does not use: outside the
  # training loop's own handler (start-up, calibration, compiling, eval.py) a SIGTERM from
  # launch.py or a scheduler was ignored until the SIGKILL that follows it.
  jax.config.update('jax_enable_preemption_service', False)
  jax.distributed.initialize(**kwargs)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int | None = None,
               auto: bool | None = None) -> bool:
  """Starts jax.distributed for a multi-process run; returns whether it did.

  Arguments override the flags, which override the AVAE_* variables (module docstring).
  With none of them, off a pod slice, this is a no-op and the run is single-process.
  Call it before anything touches a JAX device. Idempotent.
  """
  if jax.distributed.is_initialized():
    return True
  address, num, pid, timeout, auto = _settings(coordinator_address, num_processes,
                                               process_id, timeout_s, auto)

  timeouts: dict[str, int] = {}
  if timeout is not None:
    if timeout <= 0:
      raise DistributedConfigError(f'the distributed timeout must be > 0 s, got {timeout}')
    timeouts = dict(initialization_timeout=timeout, heartbeat_timeout_seconds=timeout,
                    shutdown_timeout_seconds=max(timeout, _MIN_SHUTDOWN_TIMEOUT_S))

  if address is not None:
    address = str(address).strip()
    if num is None or pid is None:
      raise DistributedConfigError(
          f'a coordinator address ({address}) needs the number of processes and this '
          f'process id too: --num_processes/--process_id or ${ENV_NUM_PROCESSES}/'
          f'${ENV_PROCESS_ID}')
    _check_count_and_id(num, pid)
    if num == 1:
      return False
    _check_address(address)
    if pid == 0:
      _check_port(address)
    # The CPU backend needs gloo for collectives across processes (JAX's default today;
    # set so that it stays so). GPUs and TPUs use their own and ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    kwargs: dict[str, Any] = dict(coordinator_address=address, num_processes=num,
                                  process_id=pid, **timeouts)
    if _is_loopback(address):
      # A local run: the coordinator listens on loopback only, not on every interface.
      kwargs['coordinator_bind_address'] = address
    _start_runtime(**kwargs)
    _check_device_counts()
  elif on_multihost_tpu() or auto:
    _start_runtime(**timeouts)
    _check_device_counts()
  else:
    if num is not None and num > 1:
      raise DistributedConfigError(
          f'{num} processes were asked for but no coordinator address: set '
          f'--coordinator_address or ${ENV_COORDINATOR} (host:port of process 0)')
    # A process id alone was read as one process: launched k times by hand, each process
    # trained on its own, all of them into the same workdir.
    if pid is not None and num is None:
      raise DistributedConfigError(
          f'process id {pid} was given without the number of processes and the coordinator '
          f'address: set --num_processes and --coordinator_address (or ${ENV_NUM_PROCESSES} '
          f'and ${ENV_COORDINATOR}) too; a single-process run needs none of them')
    if num is not None:
      _check_count_and_id(num, pid)
    return False
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def global_devices(local: Sequence[Any]) -> list[Any]:
  """The devices of every process that correspond to this process's `local` devices.

  A run uses the same local devices (by position) on every process. jax.pmap and a
  shard_map mesh must name the devices of all processes, otherwise each process runs a
  program of its own and the collectives (gradients, metrics, the gating accuracy) only
  average over its local devices. Ordered by process, then by local position, so that
  device k of the global axis holds rows k*per_device... of the global batch, the rows that
  data.batches() gives it. On one process this returns `local` unchanged.
  """
  local = list(local)
  # JAX's own errors for these come from deep in the mesh's set-up (an IndexError, a
  # safe_zip length mismatch).
  if not local:
    raise ValueError('no devices given: name at least one (jax.local_devices())')
  if len(set(local)) < len(local):
    raise ValueError(f'a device is named twice in {local}: each device holds one share')
  if jax.process_count() == 1:
    return local
  mine = jax.local_devices()
  try:
    positions = [mine.index(d) for d in local]
  except ValueError:
    raise ValueError(f'{local} are not all local devices of process {jax.process_index()}'
                     ) from None
  out = []
  for p in range(jax.process_count()):
    theirs = jax.local_devices(process_index=p)
    if len(theirs) != len(mine):
      raise ValueError(f'process {p} has {len(theirs)} devices and process '
                       f'{jax.process_index()} has {len(mine)}; give every process the same')
    out.extend(theirs[i] for i in positions)
  return out


@contextlib.contextmanager
def exit_on_error(together: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
  """In a multi-process run, an exception ends this process at once (exit status 1).

  A process that leaves normally waits at exit for all others (JAX's shutdown barrier),
  while they wait in a collective for it: both would hang until the shutdown timeout.
  Ending at once makes the peers fail within the heartbeat timeout instead. On one
  process the exception propagates as usual, and so do the `together` exceptions, which
  every process raises at the same point (e.g. a stop agreed on by all). A KeyboardInterrupt
  ends a process of several at once too, with status 130 and no traceback.
  """
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    if (jax.process_count() == 1 or isinstance(e, SystemExit) and not e.code
        or isinstance(e, together)):
      raise
    if isinstance(e, KeyboardInterrupt):
      # Not a failure: e.g. a second Ctrl-C in the training loop of a background job
      # (exit_on_interrupt's status and no traceback).
      exit_now(128 + signal.SIGINT, f'process {jax.process_index()} of '
               f'{jax.process_count()} interrupted; exiting now')
    code = 1
    if isinstance(e, SystemExit):  # sys.exit(message or status): already reported
      if isinstance(e.code, int):
        code = e.code
      else:
        sys.stderr.write(f'{e.code}\n')
    else:
      traceback.print_exc()
    exit_now(code, f'process {jax.process_index()} of {jax.process_count()} failed; '
             'exiting now so that the other processes stop too')


# What exit_now runs before it ends the process (before_exit_now's blocks).
_BEFORE_EXIT: list[Callable[[int], None]] = []


@contextlib.contextmanager
def before_exit_now(record: Callable[[int], None]) -> Iterator[None]:
  """Inside the block, exit_now calls `record(code)` before it ends the process.

  For what a program must write down of an end that runs no `finally` (a study's record
  of its run: interrupted, not killed). An error in `record` is printed, not raised.
  """
  _BEFORE_EXIT.append(record)
  try:
    yield
  finally:
    _BEFORE_EXIT.remove(record)


def exit_now(code: int, message: str) -> NoReturn:
  """Prints `message` to stderr, flushes the logs and ends the process without clean-up.

  For a process that must not wait at exit (exit_on_error), and for Ctrl-C outside the
  training loop: an interrupt that lands in an XLA compilation can leave the runtime in
  a state in which the interpreter's clean-up crashes (a segmentation fault after the
  message). The entry points close their checkpoints and summaries before getting here;
  before_exit_now's records are written here.
  """
  sys.stderr.write(f'{message}\n')
  for record in reversed(_BEFORE_EXIT):
    try:
      record(code)
    except Exception as e:  # pylint: disable=broad-except
      sys.stderr.write(f'while ending: {type(e).__name__}: {e}\n')
  files.remove_temporaries_now()  # a decoded cache's, half-written
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


@contextlib.contextmanager
def exit_on_interrupt(message: str) -> Iterator[None]:
  """Inside the block, Ctrl-C ends the process at once: `message` on stderr, status 130.

  A KeyboardInterrupt is not reliable in these programs: one raised while the
  interpreter runs a garbage-collection callback (jaxlib registers one) is printed as
  "Exception ignored" and dropped, and the run went on calibrating. So the SIGINT
  handler ends the process itself. The training loop installs its own handler (a
  checkpointed stop) and restores this one after the loop. Only a SIGINT at Python's
  default handler or at the system's default (which the programs set while their modules
  load) is taken over, and the handler found is put back after the block; an ignored
  SIGINT is left alone, as a shell starts background jobs with Ctrl-C ignored and they
  must stay so. A KeyboardInterrupt that reaches the block's end all the same (a second
  Ctrl-C in the training loop) ends the process likewise.
  """
  def handle(signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
    exit_now(128 + signal.SIGINT, message)

  found = signal.getsignal(signal.SIGINT)
  take_over = (threading.current_thread() is threading.main_thread()
               and found in (signal.default_int_handler, signal.SIG_DFL))
  if take_over:
    signal.signal(signal.SIGINT, handle)
  try:
    yield
  except KeyboardInterrupt:
    exit_now(128 + signal.SIGINT, message)
  finally:
    if take_over:
      signal.signal(signal.SIGINT, found)
