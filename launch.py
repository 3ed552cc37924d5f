"""Runs N copies of a program as one multi-process JAX job on this machine (loopback, CPU).

  python launch.py --num_processes=2 --devices_per_process=2 -- \
      train.py --config=configs/default.py --workdir=/tmp/avae
  python launch.py --num_processes=2 --devices_per_process=2 -- eval.py --workdir=/tmp/avae

Each process gets M forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count,
which wins over a program's --config.cpu_devices, with a warning), gloo for the
collectives across processes, and the AVAE_* variables that
avae_jax.distributed.initialize() reads: a coordinator on 127.0.0.1 at a free port, the
process count and the process id. Their stdout and stderr are forwarded line by line with
a "[p0] " ... prefix (dropped, while the processes run on, once the launcher's own output
is a closed pipe, as after `| head`). The launcher exits with 0 when every process does;
when one fails it reports how, gives the others --grace_s seconds to stop on their own
(JAX's distributed runtime aborts them once it notices a dead peer, within --timeout_s),
then terminates them, and exits non-zero (127 where the program cannot be found). Ctrl-C
(or SIGTERM) to the launcher passes SIGTERM on and gives the processes --grace_s seconds
to end (train.py's processes checkpoint at their next agreed step, within its
stop_check_every steps); a second Ctrl-C kills them at
once; the launcher exits with 130 (143 after SIGTERM). Running the same command again on
the same workdir resumes from the last checkpoint.

This is for trying multi-process runs on one host (and for the tests); clusters start one
process per host with their own tools, see the README's "Several hosts" section.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Sequence

from avae_jax import hugepages
from avae_jax import ports
from avae_jax import xla_flags

_PR_SET_PDEATHSIG = 1


def child_env(base: dict[str, str], *, process_id: int, num_processes: int,
              devices_per_process: int, coordinator: str,
              timeout_s: int | None) -> dict[str, str]:
  """The environment of process `process_id`: CPU devices, gloo, and the AVAE_* variables."""
  env = dict(base)
  # Replace (not duplicate) a device count the caller's XLA_FLAGS may already force.
  env['XLA_FLAGS'] = xla_flags.with_device_count(env.get('XLA_FLAGS', ''),
                                                 devices_per_process)
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_CPU_COLLECTIVES_IMPLEMENTATION'] = 'gloo'
  env['PYTHONUNBUFFERED'] = '1'  # lines arrive when printed, not when a buffer fills
  env['AVAE_COORDINATOR_ADDRESS'] = coordinator
  env['AVAE_NUM_PROCESSES'] = str(num_processes)
  env['AVAE_PROCESS_ID'] = str(process_id)
  if timeout_s is not None:
    env['AVAE_DISTRIBUTED_TIMEOUT_S'] = str(int(timeout_s))
  return env


def program_command(program: Sequence[str]) -> list[str]:
  """The command line of one process: `x.py ARGS` runs with this Python, anything else as is."""
  if not program:
    raise ValueError('no program given: launch.py [flags] -- train.py ARGS...')
  if program[0].endswith('.py'):
    return [sys.executable, *program]  # unbuffered: PYTHONUNBUFFERED (process_env)
  return list(program)


def _die_with_parent() -> Callable[[], None] | None:
  """A preexec_fn that makes the child get SIGKILL if the launcher dies (Linux), else None."""
  # libc is loaded here, in the launcher: loading a library in a child forked while the
  # output threads run could wait forever on a lock one of them held at the fork.
  try:
    prctl = ctypes.CDLL('libc.so.6', use_errno=True).prctl
  except (OSError, AttributeError):
    return None
  return lambda: prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def describe_exit(code: int) -> str:
  """'exited with code 3' or 'was killed by SIGABRT' for a Popen return code."""
  if code < 0:
    try:
      return f'was killed by {signal.Signals(-code).name}'
    except ValueError:
      return f'was killed by signal {-code}'
  return f'exited with code {code}'


class ProgramError(RuntimeError):
  """The program cannot be started; `code` is the shell's exit status for that (126, 127)."""

  def __init__(self, message: str, code: int) -> None:
    """The error's message and the exit status it calls for."""
    super().__init__(message)
    self.code = code


class Launcher:
  """Starts the processes, forwards their output, watches them, stops the rest on failure."""

  def __init__(self, program: Sequence[str], *, num_processes: int, devices_per_process: int,
               timeout_s: int | None, grace_s: float, port: int = 0,
               out: IO[str] = sys.stdout, err: IO[str] = sys.stderr):
    """`program`'s processes, their coordinator on `port` (0: a free one), nothing started.

    timeout_s: how long each process waits for a peer to start or to answer (None: the
    program's default); grace_s: how long the others may take to stop on their own after
    one fails, and all of them to end after SIGTERM; out and err take the processes'
    prefixed output.
    """
    if num_processes < 1 or devices_per_process < 1:
      raise ValueError('num_processes and devices_per_process must be >= 1')
    self.command = program_command(program)
    # A script that Python would run: checked here, since Python itself would start N
    # times and fail each with status 2, not as a program that cannot be found.
    self._script = program[0] if program[0].endswith('.py') else None
    self.num_processes = num_processes
    self.devices_per_process = devices_per_process
    self.timeout_s = timeout_s
    self.grace_s = float(grace_s)
    self.port = port or ports.free_port()
    self._out, self._err = out, err
    self._lock = threading.Lock()
    self._procs: list[subprocess.Popen] = []
    self._threads: list[threading.Thread] = []

  @staticmethod
  def _write(sink: IO[str] | None, text: str) -> bool:
    """Writes and flushes `text`; False where `sink` is gone (a closed pipe: `| head`)."""
    if sink is None:  # sys.stdout or sys.stderr of a program started with it closed (`>&-`)
      return False
    try:
      sink.write(text)
      sink.flush()
      return True
    except (OSError, ValueError):
      return False

  def say(self, text: str) -> None:
    """A launcher message on stderr, prefixed like the processes' lines."""
    with self._lock:
      self._write(self._err, f'[launch] {text}\n')

  def _forward(self, stream: IO[bytes], sink: IO[str], prefix: str) -> None:
    """Copies one child stream to `sink`, one prefixed line at a time."""
    open_ = True
    for raw in iter(stream.readline, b''):
      # Once `sink` is gone, read on all the same: a child whose pipe is full would block
      # in its next print forever.
      if open_:
        line = raw.decode('utf-8', errors='replace').rstrip('\r\n')
        with self._lock:
          open_ = self._write(sink, f'{prefix}{line}\n')
    stream.close()

  def start(self) -> None:
    """Starts every process (each in its own session, so signals reach only whom we mean)."""
    coordinator = f'{ports.LOOPBACK}:{self.port}'
    if self._script is not None and not os.path.isfile(self._script):
      raise ProgramError(f'cannot run {self._script}: No such file', 127)
    self.say(f'{self.num_processes} processes x {self.devices_per_process} CPU devices, '
             f'coordinator {coordinator}: {" ".join(self.command)}')
    die_with_parent = _die_with_parent()
    for p in range(self.num_processes):
      env = child_env(os.environ, process_id=p, num_processes=self.num_processes,
                      devices_per_process=self.devices_per_process,
                      coordinator=coordinator, timeout_s=self.timeout_s)
      try:
        proc = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent)
      except OSError as e:  # no such program, not executable
        raise ProgramError(f'cannot run {self.command[0]}: {e.strerror or e}',
                           127 if isinstance(e, FileNotFoundError) else 126) from None
      self._procs.append(proc)
      self.say(f'process {p}: pid {proc.pid}')
      for stream, sink in ((proc.stdout, self._out), (proc.stderr, self._err)):
        t = threading.Thread(target=self._forward, args=(stream, sink, f'[p{p}] '),
                             daemon=True)
        t.start()
        self._threads.append(t)

  def _signal_all(self, sig: int) -> None:
    """Sends `sig` to every process still running (to its process group)."""
    for proc in self._procs:
      if proc.poll() is None:
        try:
          os.killpg(proc.pid, sig)
        except ProcessLookupError:
          pass

  def terminate(self, reason: str, kill_after_s: float = 5.0) -> None:
    """SIGTERM to the processes still running, SIGKILL to those still there after a while."""
    running = [p for p, proc in enumerate(self._procs) if proc.poll() is None]
    if not running:
      return
    self.say(f'terminating processes {running}: {reason} (SIGTERM, SIGKILL after '
             f'{kill_after_s:g} s)')
    self._signal_all(signal.SIGTERM)
    deadline = time.monotonic() + kill_after_s
    while time.monotonic() < deadline and any(p.poll() is None for p in self._procs):
      time.sleep(0.05)
    self._signal_all(signal.SIGKILL)

  def _join_forwarders(self) -> None:
    """Waits (a while) for the ended processes' last lines to be forwarded."""
    for t in self._threads:
      t.join(timeout=5.0)

  def wait(self) -> int:
    """Watches the processes until all have ended; returns the launcher's exit status."""
    codes: dict[int, int] = {}
    first_failure: tuple[int, int] | None = None
    failed_at = 0.0
    terminated = False
    while len(codes) < len(self._procs):
      for p, proc in enumerate(self._procs):
        if p in codes or proc.poll() is None:
          continue
        codes[p] = proc.returncode
        if proc.returncode != 0:
          self.say(f'process {p} {describe_exit(proc.returncode)}')
          if first_failure is None:
            first_failure, failed_at = (p, proc.returncode), time.monotonic()
            if len(codes) < len(self._procs):
              self.say(f'the other processes get {self.grace_s:g} s to stop before they '
                       'are terminated')
      if (first_failure is not None and not terminated
          and time.monotonic() - failed_at > self.grace_s):
        self.terminate(f'process {first_failure[0]} failed {self.grace_s:g} s ago')
        terminated = True
      time.sleep(0.05)
    self._join_forwarders()
    if first_failure is None:
      return 0
    code = first_failure[1]
    return code if code > 0 else 128 - code  # the shell's convention for a signal

  def run(self) -> int:
    """start() then wait(); Ctrl-C or SIGTERM to the launcher stops every process."""
    interrupt = [signal.SIGINT]

    def on_signal(signum, frame):  # pylint: disable=unused-argument
      interrupt[0] = signum
      raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
      self.start()
      return self.wait()
    except ProgramError as e:
      self.say(str(e))
      return e.code
    except KeyboardInterrupt:
      # train.py checkpoints its step on SIGTERM: give it --grace_s for that.
      try:
        self.terminate('the launcher was interrupted; Ctrl-C again kills them now',
                       kill_after_s=self.grace_s)
      except KeyboardInterrupt:
        self.say('interrupted again: killing the processes')
        self._signal_all(signal.SIGKILL)
      self._join_forwarders()
      return 128 + interrupt[0]  # 130 after Ctrl-C, 143 after SIGTERM, as the shell's
    finally:
      signal.signal(signal.SIGTERM, previous)
      self._signal_all(signal.SIGKILL)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(launcher options, program command) from `launch.py [options] -- program args...`."""
  argv = list(argv)
  if '--' in argv:
    split = argv.index('--')
    own, program = argv[:split], argv[split + 1:]
  else:
    own, program = argv, []
  parser = argparse.ArgumentParser(
      prog='launch.py', description=__doc__.split('\n\n')[0],
      usage='launch.py [options] -- train.py|eval.py ARGS...')
  parser.add_argument('--num_processes', type=int, default=2,
                      help='number of processes (one per host on a real cluster)')
  parser.add_argument('--devices_per_process', type=int, default=1,
                      help='CPU devices each process sees')
  parser.add_argument('--timeout_s', type=int, default=60,
                      help='how long a process waits for a peer to start or to answer '
                           'heartbeats before it gives up (AVAE_DISTRIBUTED_TIMEOUT_S)')
  parser.add_argument('--grace_s', type=float, default=None,
                      help='after a process fails, how long the others may take to stop on '
                           'their own before they are terminated, and after Ctrl-C, how '
                           'long they may take to end (default: timeout_s + 10)')
  parser.add_argument('--port', type=int, default=0,
                      help='coordinator port on 127.0.0.1 (default: a free one)')
  args, unknown = parser.parse_known_args(own)
  if unknown and not program and not unknown[0].startswith('-'):
    # `launch.py train.py ...`: argparse alone says only "unrecognized arguments".
    parser.error(f'give the program after --: launch.py [options] -- {shlex.join(unknown)}')
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  if not program:
    parser.error('give the program after --, e.g. -- train.py --config=... --workdir=...')
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be >= 1')
  if args.timeout_s < 1:
    parser.error(f'--timeout_s must be >= 1 (seconds), got {args.timeout_s}')
  if args.grace_s is None:
    args.grace_s = args.timeout_s + 10.0
  if not args.grace_s >= 0:  # nan too: no failure would ever be followed by a termination
    parser.error(f'--grace_s must be >= 0 (seconds), got {args.grace_s:g}')
  if not 0 <= args.port <= 65535:
    parser.error(f'--port must be in 0..65535 (0: a free one), got {args.port}')
  problem = args.port and ports.port_problem(args.port)
  if problem:
    parser.error(f'--port {args.port}: {problem}; give another, or 0 for a free one')
  return args, program


def main(argv: Sequence[str]) -> int:
  """Entry point; returns the exit status."""
  args, program = parse_args(argv)
  # The processes inherit the tunable, so none of them restarts on its own.
  hugepages.reexec()
  launcher = Launcher(program, num_processes=args.num_processes,
                      devices_per_process=args.devices_per_process,
                      timeout_s=args.timeout_s, grace_s=args.grace_s, port=args.port)
  return launcher.run()


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
