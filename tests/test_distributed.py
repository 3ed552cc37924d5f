"""Multi-process training for real: several JAX processes on loopback, gloo collectives.

launch.py starts the processes (each with forced CPU devices); they find each other through
jax.distributed (avae_jax.distributed) and run one pmapped program over all their devices.
The runs are tiny, share a persistent compilation cache (the 2-process runs compile their
programs once) and compile with XLA's cheapest CPU settings; both sides of every comparison
use the same settings.

Run as a script (under launch.py), this file is the worker of the gating test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch.py')

# The tiny model and schedule of every run here: 2 pre-training steps, then 2 adversarial
# (gated) steps; metrics logged and checkpoints written every other step.
OVERRIDES: dict[str, Any] = {
    'image_size': 16,
    'model.widths': (4, 8),
    'model.latent_dim': 4,
    'model.hidden_dim': 8,
    'batch_size': 8,
    'pretrain_steps': 2,
    'adversarial_steps': 2,
    'log_every': 1,
    'checkpoint_every': 2,
    'image_every': 1000,
    'calibrate.enabled': False,
    'shapes.num_train': 64,
    'shapes.num_eval': 16,
    'eval.fid': False,
    'eval.num_images': 16,
    'eval.batch_size': 8,
    'eval.grid_size': 2,
}
TOTAL_STEPS = 4
# Seconds a process waits for a peer to start / to answer heartbeats. Generous for the
# runs that must succeed on a loaded machine; small for the one where a process dies.
TIMEOUT_S = 120
KILL_TIMEOUT_S = 10
# Wall-clock limits of one launcher call: only there so that a hang fails the test.
RUN_LIMIT_S = 420


def _cli(overrides: dict[str, Any]) -> list[str]:
  """--config=... and --config.key=value flags for train.py / eval.py."""
  args = [f'--config={os.path.join(REPO, "configs", "default.py")}']
  for key, value in overrides.items():
    if isinstance(value, tuple):
      value = '(' + ','.join(str(v) for v in value) + ')'
    args.append(f'--config.{key}={value}')
  return args


def _config(overrides: dict[str, Any]):
  """The ml_collections config that the same overrides give train.py."""
  from tests import test_trainer  # pylint: disable=g-import-not-at-top
  return test_trainer.make_config(overrides)


@pytest.fixture(scope='module')
def env(tmp_path_factory) -> dict[str, str]:
  """The launcher's environment: a shared compilation cache (and conftest's XLA_FLAGS)."""
  e = dict(os.environ)
  e['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('jax_cache'))
  e['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  e['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  e['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return e


def _launch_args(num_processes: int, devices: int, program: list[str], *,
                 timeout_s: int = TIMEOUT_S, grace_s: float | None = None) -> list[str]:
  args = [sys.executable, LAUNCH, f'--num_processes={num_processes}',
          f'--devices_per_process={devices}', f'--timeout_s={timeout_s}']
  if grace_s is not None:
    args.append(f'--grace_s={grace_s}')
  return args + ['--'] + program


def _launch(env_: dict[str, str], num_processes: int, devices: int, program: list[str],
            **kwargs: Any) -> subprocess.CompletedProcess:
  """Runs launch.py to the end; stdout and stderr merged, as text."""
  return subprocess.run(_launch_args(num_processes, devices, program, **kwargs), cwd=REPO,
                        env=env_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        timeout=RUN_LIMIT_S, check=False)


def _start_training(env_: dict[str, str], workdir: str, num_processes: int,
                    devices: int) -> subprocess.Popen:
  """Starts a train.py run under the launcher; stdout and stderr merged, as text."""
  return subprocess.Popen(
      _launch_args(num_processes, devices,
                   ['train.py', *_cli(OVERRIDES), f'--workdir={workdir}']),
      cwd=REPO, env=env_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
  """Waits for a run that must succeed; returns its output."""
  try:
    output, _ = proc.communicate(timeout=RUN_LIMIT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, output[-6000:]
  return output


def _train(env_: dict[str, str], workdir: str, num_processes: int, devices: int) -> str:
  """A train.py run under the launcher that must succeed; returns its output."""
  return _finish(_start_training(env_, workdir, num_processes, devices))


def _metrics(workdir: str) -> dict[int, dict[str, float]]:
  """Training rows of metrics.jsonl as {step: metrics}; a step logged twice (a resumed run)
  keeps the last. The final evaluation's row (eval/* keys, at the last step) is left out."""
  rows = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      step = int(row.pop('step'))
      if all(k.startswith('eval/') for k in row):
        continue
      rows[step] = row
  return rows


def _restore(workdir: str, step: int) -> dict[str, Any]:
  """The checkpointed train states of `step`, read in this (single) process."""
  import jax  # pylint: disable=g-import-not-at-top
  from avae_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from avae_jax import steps  # pylint: disable=g-import-not-at-top
  config = _config(OVERRIDES)
  image_shape = (config.image_size, config.image_size, config.channels)
  # Shapes and dtypes only: nothing to compile.
  template = jax.eval_shape(
      lambda key: steps.state_tree(*steps.create_train_states(config, key, image_shape)),
      jax.random.PRNGKey(0))
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=None,
                               read_only=True) as ckpt:
    got_step, tree, _ = ckpt.restore(template, step=step)
  assert got_step == step
  return tree


def _leaves(tree: Any) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_same_states(got: dict[str, Any], want: dict[str, Any], rel: float) -> None:
  """Every leaf equal up to `rel` times the leaf's largest magnitude.

  Sums over devices are ordered differently in one process and across processes, so
  entries near zero differ by a few float32 roundings of the leaf's scale.
  """
  a, b = _leaves(want), _leaves(got)
  assert a.keys() == b.keys()
  for name in a:
    scale = max(float(np.max(np.abs(a[name]), initial=0.0)), 1e-3)
    np.testing.assert_allclose(b[name], a[name], rtol=0, atol=rel * scale, err_msg=name)


def _pids(output: str) -> dict[int, int]:
  """{process: pid} from the launcher's "[launch] process p: pid N" lines."""
  return {int(p): int(pid) for p, pid in re.findall(r'\[launch\] process (\d+): pid (\d+)',
                                                    output)}


@pytest.fixture(scope='module')
def runs(env, tmp_path_factory) -> dict[str, tuple[str, str]]:
  """The same config and seed on 1 process x 4 devices and on 2 processes x 2 devices.

  {'one': (workdir, output), 'two': (workdir, output)}; both run at once (they share no
  compiled program, and their processes wait on each other part of the time).
  """
  workdirs = {k: str(tmp_path_factory.mktemp(k)) for k in ('one', 'two')}
  procs = {'one': _start_training(env, workdirs['one'], 1, 4),
           'two': _start_training(env, workdirs['two'], 2, 2)}
  try:
    return {k: (workdirs[k], _finish(proc)) for k, proc in procs.items()}
  finally:
    for proc in procs.values():
      if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope='module')
def one_process_run(runs) -> str:
  """1 process x 4 devices: the reference's workdir."""
  return runs['one'][0]


@pytest.fixture(scope='module')
def two_process_run(runs) -> tuple[str, str]:
  """2 processes x 2 devices: (workdir, launcher output)."""
  return runs['two']


# ---------------------------------------------------------------------------------------
# The launcher and the start-up settings, without JAX programs.


_PROGRAM = '''
import os, signal, sys, time
p = int(os.environ['AVAE_PROCESS_ID'])
# Not flushed: the launcher runs its processes unbuffered, so a line shows when printed.
print('hello', p, os.environ['AVAE_NUM_PROCESSES'], os.environ['AVAE_COORDINATOR_ADDRESS'],
      os.environ['XLA_FLAGS'], os.environ['AVAE_DISTRIBUTED_TIMEOUT_S'])
print('to stderr', p, file=sys.stderr, flush=True)
mode = sys.argv[1]
if mode == 'spam':  # far more than a pipe holds
  for i in range(20000):
    print('line', i, 'x' * 50)
if mode == 'fail' and p == 1:
  sys.exit(3)
if mode == 'fail':
  time.sleep(600)  # a peer that would hang: the launcher must end it
if mode == 'term':
  def on_term(signum, frame):
    time.sleep(6)  # a checkpoint that takes longer than the SIGKILL of a failure (5 s)
    print('checkpointed', p, flush=True)
    sys.exit(128 + signum)
  signal.signal(signal.SIGTERM, on_term)
  print('ready', p, flush=True)
  time.sleep(600)
'''


def test_launcher_prefixes_lines_and_stops_the_rest_when_one_fails(tmp_path):
  script = tmp_path / 'program.py'
  script.write_text(_PROGRAM)
  env_ = {k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'}
  env_['XLA_FLAGS'] = '--xla_force_host_platform_device_count=7 --foo'

  ok = subprocess.run(_launch_args(3, 2, [str(script), 'ok'], timeout_s=17), env=env_,
                      capture_output=True, text=True, timeout=60, check=False)
  assert ok.returncode == 0, ok.stderr
  lines = ok.stdout.splitlines()
  for p in range(3):
    (line,) = [l for l in lines if l.startswith(f'[p{p}] hello {p} ')]
    _, _, _, num, address, *flags, timeout = line.split()
    assert num == '3' and timeout == '17'
    assert re.fullmatch(r'127\.0\.0\.1:\d+', address)
    # The forced device count is replaced, other flags are kept.
    assert sorted(flags) == ['--foo', '--xla_force_host_platform_device_count=2']
    assert f'[p{p}] to stderr {p}' in ok.stderr.splitlines()

  failed = subprocess.run(_launch_args(2, 1, [str(script), 'fail'], grace_s=1), env=env_,
                          capture_output=True, text=True, timeout=60, check=False)
  assert failed.returncode == 3
  assert '[launch] process 1 exited with code 3' in failed.stderr
  # Process 0 slept on; the launcher ended it after the grace period.
  assert 'terminating processes [0]' in failed.stderr
  assert re.search(r'\[launch\] process 0 was killed by SIG(TERM|KILL)', failed.stderr)
  # Its line came through before it was killed (buffered, it would have been lost).
  assert any(line.startswith('[p0] hello 0 2 ') for line in failed.stdout.splitlines())


@pytest.mark.parametrize('merged', [False, True])
def test_the_processes_run_to_the_end_when_the_launchers_output_is_closed(tmp_path, merged):
  # As with `launch.py ... | head`: the forwarding stopped at the broken pipe, the
  # processes' pipes filled up and they hung in print.
  script = tmp_path / 'program.py'
  script.write_text(_PROGRAM)
  launcher = subprocess.Popen(_launch_args(2, 1, [str(script), 'spam']),
                              stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT if merged else subprocess.DEVNULL)
  try:
    assert launcher.stdout.readline()
    launcher.stdout.close()
    assert launcher.wait(timeout=60) == 0
  finally:
    if launcher.poll() is None:
      launcher.kill()


@pytest.mark.parametrize('flags, message', [
    (['--num_processes=0', '--', 'train.py'], '--num_processes and --devices_per_process'),
    (['--num_processes=2'], 'give the program after --'),
    (['train.py', '--workdir=w'], 'give the program after --: launch.py [options] -- '
                                  'train.py --workdir=w'),
    (['--num_processs=2', '--', 'train.py'], 'unrecognized arguments: --num_processs=2'),
    # A word before the '--' of a given program is a stray one, not the program.
    (['eval.py', '--', 'train.py'], 'unrecognized arguments: eval.py'),
    (['--timeout_s=0', '--', 'train.py'], '--timeout_s must be >= 1'),
    (['--grace_s=-1', '--', 'train.py'], '--grace_s must be >= 0'),
    (['--grace_s=nan', '--', 'train.py'], '--grace_s must be >= 0'),
    (['--port=65536', '--', 'train.py'], '--port must be in 0..65535'),
])
def test_launcher_usage_errors(flags, message):
  proc = subprocess.run([sys.executable, LAUNCH, *flags], capture_output=True, text=True,
                        timeout=60, check=False)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert f'launch.py: error: {message}' in proc.stderr


def test_a_port_another_program_listens_on_is_a_usage_error():
  # The coordinator could not bind it: process 0 ended with a segmentation fault, and
  # process 1, connected to the other program, aborted after its timeout.
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    proc = subprocess.run([sys.executable, LAUNCH, f'--port={port}', '--', 'train.py'],
                          capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f'launch.py: error: --port {port}: 127.0.0.1:{port} cannot be listened on (Address '
      'already in use); give another, or 0 for a free one')
  # Free again (closed): accepted.
  from avae_jax import ports  # pylint: disable=g-import-not-at-top
  assert ports.port_problem(port) is None


def test_the_grace_period_defaults_to_the_timeout_plus_10_s():
  # The others get as long as a peer's start-up or heartbeat timeout, and 10 s to stop.
  import launch  # pylint: disable=g-import-not-at-top
  args, program = launch.parse_args(['--', 'train.py'])
  assert (args.timeout_s, args.grace_s, program) == (60, 70.0, ['train.py'])
  args, _ = launch.parse_args(['--timeout_s=5', '--', 'train.py'])
  assert args.grace_s == 15.0
  args, _ = launch.parse_args(['--timeout_s=5', '--grace_s=0', '--', 'train.py'])
  assert args.grace_s == 0.0


def test_a_launcher_of_no_processes_or_no_devices_is_refused():
  # launch.Launcher is the launcher's API too, without parse_args' checks before it.
  import launch  # pylint: disable=g-import-not-at-top
  for num, devices in ((0, 1), (1, 0)):
    with pytest.raises(ValueError, match='num_processes and devices_per_process must be >= 1'):
      launch.Launcher(['train.py'], num_processes=num, devices_per_process=devices,
                      timeout_s=None, grace_s=0.0)


def test_a_port_whose_last_connection_is_in_time_wait_is_free():
  # The coordinator (gRPC) binds with SO_REUSEADDR, as a previous run's did: a port whose
  # last connection the server closed first (its side in TIME_WAIT) can be listened on.
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(('127.0.0.1', 0))
    listener.listen()
    port = listener.getsockname()[1]
    with socket.create_connection(('127.0.0.1', port), timeout=10):
      server, _ = listener.accept()
      server.close()  # first: the server's side enters TIME_WAIT
  # A bind without SO_REUSEADDR fails: the port is in TIME_WAIT, not free outright.
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:
    with pytest.raises(OSError):
      plain.bind(('127.0.0.1', port))
  from avae_jax import ports  # pylint: disable=g-import-not-at-top
  assert ports.port_problem(port) is None


def _listener(family, host):
  """A socket listening on host:<free port>, or None where the family is unavailable."""
  s = socket.socket(family, socket.SOCK_STREAM)
  try:
    s.bind((host, 0))
  except OSError:
    s.close()
    return None
  s.listen()
  return s


def test_process_0_checks_the_port_where_its_coordinator_listens():
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  v4 = _listener(socket.AF_INET, '127.0.0.1')
  with v4:
    port = v4.getsockname()[1]
    # Loopback by address or name, and every interface (a remote address): all taken.
    for address in (f'127.0.0.1:{port}', f'localhost:{port}', f'10.0.0.2:{port}'):
      with pytest.raises(distributed.DistributedConfigError,
                         match=f'cannot be the coordinator at {re.escape(address)}: .*:{port} '
                               r'cannot be listened on \(Address already in use\)'):
        distributed._check_port(address)  # pylint: disable=protected-access
    distributed._check_port(f'127.0.0.2:{port}')  # another loopback address: free
    v6 = _listener(socket.AF_INET6, '::1')
    if v6 is not None:
      v6.close()
      distributed._check_port(f'[::1]:{port}')  # IPv6's loopback: free
  v6 = _listener(socket.AF_INET6, '::1')
  if v6 is None:
    pytest.skip('no IPv6 loopback here')
  with v6:
    port = v6.getsockname()[1]
    # IPv6's loopback is checked as IPv6 (it was checked as 127.0.0.1).
    with pytest.raises(distributed.DistributedConfigError,
                       match=rf'\[::1\]:{port} cannot be listened on'):
      distributed._check_port(f'[::1]:{port}')  # pylint: disable=protected-access
    distributed._check_port(f'127.0.0.1:{port}')  # pylint: disable=protected-access


def test_train_py_as_process_0_on_a_port_another_program_listens_on_is_one_line(tmp_path):
  # Without launch.py: process 0 ended with a segmentation fault in JAX's coordinator.
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
    taken.bind(('127.0.0.1', 0))
    taken.listen()
    port = taken.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, 'train.py'), '--config=configs/default.py',
         f'--workdir={tmp_path / "w"}', f'--coordinator_address=localhost:{port}',
         '--num_processes=2', '--process_id=0'],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f'train.py: error: process 0 cannot be the coordinator at localhost:{port}: '
      f'127.0.0.1:{port} cannot be listened on (Address already in use); give another port')
  assert not (tmp_path / 'w').exists()


def test_processes_of_different_device_counts_stop_with_one_line(tmp_path):
  # Each used one device, but orbax's first collective failed with a reshape traceback.
  from avae_jax import ports  # pylint: disable=g-import-not-at-top
  port = ports.free_port()
  env_ = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env_.update(JAX_PLATFORMS='cpu', JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'train.py'), '--config=configs/default.py',
       f'--workdir={tmp_path / "w"}', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={p}', '--distributed_timeout_s=60',
       '--config.num_devices=1', f'--config.cpu_devices={2 - p}'],
      cwd=REPO, env=env_, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for p in (0, 1)]
  for proc in procs:
    _, err = proc.communicate(timeout=RUN_LIMIT_S)
    assert proc.returncode == 1 and 'Traceback' not in err, err
    assert err.strip().splitlines()[-1] == (
        'train.py: error: the processes have different numbers of local devices (process 0: '
        '2, process 1: 1); give every process the same (--config.cpu_devices on CPUs, the '
        'GPUs it sees)'), err
  assert not (tmp_path / 'w').exists()


def test_a_process_killed_by_a_signal_gives_the_shells_status():
  # 128 + 9 for SIGKILL, as a shell reports it (Popen's return code is -9).
  proc = subprocess.run(_launch_args(1, 1, ['/bin/sh', '-c', 'kill -9 $$'], grace_s=0),
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 137, proc.stderr
  assert '[launch] process 0 was killed by SIGKILL' in proc.stderr
  # Signal 1 too (Popen's -1): a SIGHUP sent to the shell is ignored under `nohup`.
  import launch  # pylint: disable=g-import-not-at-top
  assert launch.describe_exit(-1) == 'was killed by SIGHUP'
  assert launch.describe_exit(0) == 'exited with code 0'


def test_a_launcher_started_with_stdout_closed_reads_its_processes_to_the_end(tmp_path):
  # Its output thread failed on the closed stdout (None) and stopped reading: the
  # processes blocked on a full pipe, and the launcher waited for them for good.
  script = tmp_path / 'chatty.py'
  script.write_text('for i in range(20000):\n  print("line", i)\n')
  done = subprocess.run(['sh', '-c', 'exec "$@" >&-', 'sh',
                         *_launch_args(1, 1, [str(script)])],
                        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0 and 'Traceback' not in done.stderr, done.stderr


def test_a_program_that_cannot_be_run_is_a_clear_error(tmp_path):
  # It was Popen's traceback, with exit status 1.
  missing = subprocess.run(_launch_args(2, 1, [str(tmp_path / 'no_such_program'), 'x']),
                           capture_output=True, text=True, timeout=60, check=False)
  assert missing.returncode == 127 and 'Traceback' not in missing.stderr, missing.stderr
  assert f'[launch] cannot run {tmp_path / "no_such_program"}: No such file' in missing.stderr
  # A mistyped script: Python started and failed with status 2 in every process.
  script = subprocess.run(_launch_args(2, 1, [str(tmp_path / 'no_such_script.py')]),
                          capture_output=True, text=True, timeout=60, check=False)
  assert script.returncode == 127 and 'Traceback' not in script.stderr, script.stderr
  assert f'[launch] cannot run {tmp_path / "no_such_script.py"}: No such file' in (
      script.stderr)
  assert '[p0]' not in script.stderr
  not_executable = tmp_path / 'program.sh'
  not_executable.write_text('echo hello\n')
  denied = subprocess.run(_launch_args(2, 1, [str(not_executable)]), capture_output=True,
                          text=True, timeout=60, check=False)
  assert denied.returncode == 126 and 'Traceback' not in denied.stderr, denied.stderr
  assert 'Permission denied' in denied.stderr


def _start_until_ready(tmp_path, program: str, args: list[str],
                       **launch_kwargs: Any) -> tuple[subprocess.Popen, list[str]]:
  """`program` under the launcher on 2 processes (output merged) and its lines, once both
  printed 'ready'."""
  script = tmp_path / 'program.py'
  script.write_text(program)
  launcher = subprocess.Popen(_launch_args(2, 1, [str(script), *args], **launch_kwargs),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines: list[str] = []
  try:
    while len(set(re.findall(r'^\[p(\d)\] ready', ''.join(lines), re.M))) < 2:
      lines.append(launcher.stdout.readline())
      assert lines[-1], f'the launcher ended before its processes were ready: {lines}'
  except BaseException:
    launcher.kill()
    launcher.wait()
    raise
  return launcher, lines


def _stop(launcher: subprocess.Popen, sig: int, timeout: float) -> str:
  """Sends `sig` to the launcher and returns the rest of its output once it ends."""
  try:
    launcher.send_signal(sig)
    out, _ = launcher.communicate(timeout=timeout)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  return out


@pytest.mark.parametrize('sig, status', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_to_the_launcher_gives_the_processes_time_to_checkpoint(tmp_path, sig, status):
  # SIGTERM (a scheduler's stop) exited with Ctrl-C's 130 too.
  launcher, _ = _start_until_ready(tmp_path, _PROGRAM, ['term'], grace_s=30)
  out = _stop(launcher, sig, timeout=60)
  assert launcher.returncode == status, out
  assert 'terminating processes [0, 1]: the launcher was interrupted' in out
  assert 'SIGKILL after 30 s' in out
  assert {'[p0] checkpointed 0', '[p1] checkpointed 1'} <= set(out.splitlines()), out


def test_the_processes_die_with_a_killed_launcher(tmp_path):
  launcher, lines = _start_until_ready(tmp_path, _PROGRAM, ['term'])
  _stop(launcher, signal.SIGKILL, timeout=60)  # no chance to stop them itself
  # Imported here: this file also runs as a script (--gating-worker), without tests/.
  from tests import processes  # pylint: disable=g-import-not-at-top
  pids = _pids(''.join(lines))
  assert len(pids) == 2, lines
  deadline = time.monotonic() + 30
  while any(map(processes.process_running, pids.values())) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not any(map(processes.process_running, pids.values())), (
      'orphaned processes of a killed launcher')


def test_exit_on_interrupt_takes_over_only_the_default_handlers_and_puts_them_back():
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  previous = signal.getsignal(signal.SIGINT)
  try:
    # Python's handler, the system's default (the programs' while their modules load) and
    # an ignored Ctrl-C (a background job), which must stay ignored inside the block.
    for found in (signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN):
      signal.signal(signal.SIGINT, found)
      with distributed.exit_on_interrupt('interrupted'):
        inside = signal.getsignal(signal.SIGINT)
      assert (inside == found) == (found == signal.SIG_IGN), found
      assert signal.getsignal(signal.SIGINT) == found
  finally:
    signal.signal(signal.SIGINT, previous)


# JAX, loaded in this test process by others, warns of any fork; the launcher has no JAX.
@pytest.mark.filterwarnings(r'ignore:os\.fork\(\) was called:RuntimeWarning')
def test_the_child_sets_its_death_signal_without_loading_a_library(monkeypatch):
  # The function runs in the forked child, where loading a library could wait forever
  # on a lock that another of the launcher's threads held at the fork: libc must have
  # been loaded before, in the launcher.
  import ctypes  # pylint: disable=g-import-not-at-top
  import launch  # pylint: disable=g-import-not-at-top
  preexec = launch._die_with_parent()  # pylint: disable=protected-access
  assert preexec is not None  # Linux

  def no_loading(*args, **kwargs):
    raise AssertionError(f'a library was loaded in the child: {args}')

  # Every way ctypes loads a library (CDLL, cdll.LoadLibrary, PyDLL ...) goes through this.
  monkeypatch.setattr(ctypes, '_dlopen', no_loading)
  read_death_signal = (
      'import ctypes; sig = ctypes.c_int(); '
      'ctypes.cdll.LoadLibrary("libc.so.6").prctl(2, ctypes.byref(sig)); '  # PR_GET_PDEATHSIG
      'print(sig.value)')
  proc = subprocess.run([sys.executable, '-c', read_death_signal], preexec_fn=preexec,
                        capture_output=True, text=True, check=True, timeout=60)
  assert proc.stdout.strip() == str(int(signal.SIGKILL)), proc


_RUNTIME_PROGRAM = f"""
import sys, time
sys.path.insert(0, {REPO!r})
from avae_jax import distributed
distributed.initialize()  # from launch.py's environment
print('ready', flush=True)
time.sleep(600)  # start-up, calibration, compiling: no handler of the project's own
print('still running', flush=True)
"""


def test_a_sigterm_before_the_training_loop_ends_the_processes(tmp_path):
  # JAX's distributed runtime took SIGTERM over with a handler that only records it: a
  # Ctrl-C to the launcher during start-up left the processes running until the SIGKILL
  # at the end of the grace period.
  # A grace period past _stop's timeout: processes that wait for their SIGKILL fail it.
  launcher, _ = _start_until_ready(tmp_path, _RUNTIME_PROGRAM, [], grace_s=3600)
  out = _stop(launcher, signal.SIGINT, timeout=180)
  assert launcher.returncode == 130, out
  assert 'still running' not in out, out


# Spends its time in a garbage-collection callback, where a KeyboardInterrupt is printed
# as "Exception ignored" and dropped (jaxlib registers such a callback).
_GC_PROGRAM = """
import contextlib, gc, pathlib, sys, time
from avae_jax import distributed
gc.callbacks.append(lambda phase, info: time.sleep(0.2) if phase == 'start' else None)
guard = (distributed.exit_on_interrupt('interrupted, exiting') if sys.argv[1] == 'exit'
         else contextlib.nullcontext())
stop, deadline = pathlib.Path(sys.argv[2]), time.monotonic() + 120
with guard:
  print('ready', flush=True)
  # Until the test has seen the interrupt dropped (or, should it never be, for 2 minutes).
  while not stop.exists() and time.monotonic() < deadline:
    gc.collect()
print('not interrupted', flush=True)
"""


@pytest.mark.parametrize('mode', ['exit', 'plain'])
def test_ctrl_c_during_a_gc_callback_ends_the_program(tmp_path, mode):
  script = tmp_path / 'program.py'
  script.write_text(_GC_PROGRAM)
  stop = tmp_path / 'stop'
  proc = subprocess.Popen([sys.executable, str(script), mode, str(stop)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == 'ready\n'
    time.sleep(0.5)  # into the loop
    proc.send_signal(signal.SIGINT)
    seen = ''
    if mode == 'plain':  # the program runs on until told, once its interrupt was dropped
      while (line := proc.stderr.readline()) and 'KeyboardInterrupt' not in line:
        seen += line
      seen += line
      stop.touch()
    out, err = proc.communicate(timeout=60)
    err = seen + err
  finally:
    if proc.poll() is None:
      proc.kill()
  if mode == 'exit':
    assert (proc.returncode, out, err) == (130, '', 'interrupted, exiting\n')
  else:  # why: Python's own KeyboardInterrupt is lost there and the program runs on
    assert proc.returncode == 0 and 'not interrupted' in out, (out, err)
    assert 'Exception ignored' in err and 'KeyboardInterrupt' in err


def test_a_keyboard_interrupt_that_reaches_the_guard_ends_the_program_too(tmp_path):
  # E.g. a second Ctrl-C in the training loop of a background job (SIGINT ignored there).
  program = ('from avae_jax import distributed\n'
             'with distributed.exit_on_interrupt("interrupted, exiting"):\n'
             '  raise KeyboardInterrupt\n'
             'print("not reached")\n')
  proc = subprocess.run([sys.executable, '-c', program], cwd=REPO, capture_output=True,
                        text=True, timeout=60, check=False)
  assert (proc.returncode, proc.stdout, proc.stderr) == (130, '', 'interrupted, exiting\n')


def test_a_keyboard_interrupt_in_a_multi_process_run_is_no_failure(tmp_path):
  # exit_on_error printed its traceback and ended the process with status 1, as a failure.
  program = ('import jax\n'
             'from avae_jax import distributed\n'
             'jax.process_count = lambda: 2\n'
             'with distributed.exit_on_interrupt("interrupted, exiting"):\n'
             '  with distributed.exit_on_error():\n'
             '    raise KeyboardInterrupt\n'
             'print("not reached")\n')
  proc = subprocess.run([sys.executable, '-c', program], cwd=REPO, capture_output=True,
                        text=True, timeout=60, check=False)
  assert (proc.returncode, proc.stdout) == (130, ''), proc.stderr
  assert proc.stderr.splitlines()[-1] == 'process 0 of 2 interrupted; exiting now', proc.stderr
  assert 'Traceback' not in proc.stderr


def test_an_exit_of_one_process_of_several_ends_it_at_once_with_its_status():
  # sys.exit(message or status) in one process: it would wait at exit for its peers while
  # they wait for it in a collective. A clean exit (status 0) is left to end normally.
  failed = 'process 0 of 2 failed; exiting now so that the other processes stop too'
  for code, status, last_lines in (('"no space left"', 1, ['no space left', failed]),
                                   ('3', 3, [failed]), ('0', 0, [])):
    program = ('import jax\n'
               'from avae_jax import distributed\n'
               'jax.process_count = lambda: 2\n'
               'with distributed.exit_on_error():\n'
               f'  raise SystemExit({code})\n')
    proc = subprocess.run([sys.executable, '-c', program], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == status, proc.stderr
    assert 'Traceback' not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[len(lines) - len(last_lines):] == last_lines, proc.stderr
    assert status or 'failed' not in proc.stderr, proc.stderr


def test_a_command_line_flag_overrides_its_variable_false_included():
  # --nodistributed_auto read as "not given", so AVAE_DISTRIBUTED_AUTO=1 still won.
  program = ('import sys; from absl import flags; from avae_jax import distributed; '
             'flags.FLAGS(sys.argv); print(distributed.several_processes_requested())')
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('AVAE_') and k != 'TPU_WORKER_HOSTNAMES'}
  for args, variables, expected in (([], {'AVAE_DISTRIBUTED_AUTO': '1'}, 'True'),
                                    (['--nodistributed_auto'], {'AVAE_DISTRIBUTED_AUTO': '1'},
                                     'False'),
                                    (['--distributed_auto'], {}, 'True'),
                                    ([], {}, 'False'),
                                    # Refused by initialize, so asked for: not one process.
                                    ([], {'AVAE_PROCESS_ID': '1'}, 'True'),
                                    (['--process_id=1'], {}, 'True'),
                                    (['--num_processes=1', '--process_id=0'], {}, 'False')):
    proc = subprocess.run([sys.executable, '-c', program, *args], cwd=REPO,
                          env=dict(env, **variables), capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip() == expected, (args, variables, proc.stderr[-2000:])


def test_initialize_is_a_no_op_for_one_process_and_rejects_incomplete_settings(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID, distributed.ENV_AUTO, 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  # A variable set to nothing (`AVAE_NUM_PROCESSES= python train.py`) is one not set.
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, '')
  monkeypatch.setenv(distributed.ENV_COORDINATOR, '')
  assert distributed.initialize() is False
  # One process named explicitly: nothing to start either.
  assert distributed.initialize('127.0.0.1:1234', num_processes=1, process_id=0) is False
  with pytest.raises(distributed.DistributedConfigError, match='number of processes'):
    distributed.initialize('127.0.0.1:1234')
  with pytest.raises(distributed.DistributedConfigError, match='not in'):
    distributed.initialize('127.0.0.1:1234', num_processes=2, process_id=2)
  # A process id without the rest ran as one process, silently.
  with pytest.raises(distributed.DistributedConfigError,
                     match='process id 1 was given without the number of processes'):
    distributed.initialize(process_id=1)
  with pytest.raises(distributed.DistributedConfigError, match='without the number'):
    distributed.initialize(process_id=0)
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, '3')
  with pytest.raises(distributed.DistributedConfigError, match='process id 3 was given'):
    distributed.initialize()
  monkeypatch.delenv(distributed.ENV_PROCESS_ID)
  with pytest.raises(distributed.DistributedConfigError, match=r'not in \[0, 1\)'):
    distributed.initialize(num_processes=1, process_id=1)
  with pytest.raises(distributed.DistributedConfigError, match='must be >= 1, got 0'):
    distributed.initialize(num_processes=0)
  assert distributed.initialize(num_processes=1, process_id=0) is False
  assert distributed.initialize(num_processes=1) is False
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, '2')
  with pytest.raises(distributed.DistributedConfigError, match='no coordinator'):
    distributed.initialize()
  monkeypatch.setenv(distributed.ENV_COORDINATOR, '127.0.0.1:1234')
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, 'x')
  with pytest.raises(distributed.DistributedConfigError, match='integer'):
    distributed.initialize()
  assert not jax.distributed.is_initialized()
  # One process: the devices are the local ones, unchanged.
  local = jax.local_devices()[1:3]
  assert distributed.global_devices(local) == local


# ---------------------------------------------------------------------------------------
# Training across processes.


def test_two_processes_train_like_one_process(one_process_run, two_process_run):
  workdir, output = two_process_run
  one, two = _metrics(one_process_run), _metrics(workdir)
  assert sorted(one) == sorted(two) == list(range(1, TOTAL_STEPS + 1))
  for step in one:
    assert set(one[step]) == set(two[step])
    for name, value in one[step].items():
      if name == 'steps_per_s':
        continue
      np.testing.assert_allclose(two[step][name], value, rtol=1e-4, atol=1e-6,
                                 err_msg=f'{name} at step {step}')
  # The adversarial steps ran, with the same gating decisions.
  assert 'disc_updated' in one[TOTAL_STEPS]
  # Each process says its part of the batch: 8 images over 2 x 2 devices.
  assert re.search(r'\[p0\] devices: 2 cpu x 2 process\(es\), \w+, 2 images per device and '
                   'step', output), output[:3000]

  # Adam's moments of near-cancelling gradient entries (an encoder bias) carry the
  # rounding of the other summation order furthest: 3e-4 of the leaf's largest entry.
  _assert_same_states(_restore(workdir, TOTAL_STEPS), _restore(one_process_run, TOTAL_STEPS),
                      rel=1e-3)

  # Only process 0 writes summaries: one TensorBoard event file, made by its pid.
  events = [f for f in os.listdir(workdir) if f.startswith('events.out.tfevents')]
  assert len(events) == 1, events
  assert events[0].split('.')[-2] == str(_pids(output)[0])
  assert os.path.exists(os.path.join(workdir, 'final_metrics.json'))


def _gating_worker() -> None:
  """Under launch.py: the steps over all processes' devices, with pmap and shard_map.

  Each process prints the metrics it received for each step, the pmean-ed discriminator
  accuracy and the two gating decisions among them.
  """
  sys.path.insert(0, REPO)
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize()
  import jax  # pylint: disable=g-import-not-at-top
  from avae_jax import data  # pylint: disable=g-import-not-at-top
  from avae_jax import parallel  # pylint: disable=g-import-not-at-top
  from avae_jax import prefetch  # pylint: disable=g-import-not-at-top
  from avae_jax import steps  # pylint: disable=g-import-not-at-top
  from avae_jax import trainer  # pylint: disable=g-import-not-at-top

  config = _config(OVERRIDES)
  source = data.load(config, 'train')
  cfg = steps.StepConfig.from_config(config, dataset_size=source.num_examples)
  devices = jax.local_devices()
  for method in ('pmap', 'shard_map'):
    fns = parallel.make_steps(cfg, devices, method=method)
    vae, disc = steps.create_train_states(config, jax.random.PRNGKey(0), source.image_shape)
    r_vae, r_disc = parallel.replicate(vae, devices), parallel.replicate(disc, devices)
    batches = prefetch.to_devices(
        data.batches(source, batch_size=config.batch_size, seed=config.seed,
                     process_index=jax.process_index(), process_count=jax.process_count(),
                     num_local_devices=len(devices)), devices)
    rows = []
    for step in range(6):  # adversarial steps from the initial states
      key = jax.random.fold_in(jax.random.PRNGKey(1), step)
      r_vae, r_disc, m = fns.adversarial(r_vae, r_disc, next(batches), key)
      rows.append({k: float(v) for k, v in jax.device_get(m).items()})
    batches.close()
    # The loss-weight calibration's probe steps, fed like the training loop's.
    weights = trainer.calibrate_weights(
        _config(dict(OVERRIDES, parallel=method, **{'calibrate.batches': 2})), vae, source,
        devices, jax.random.PRNGKey(2))
    print('GATING ' + json.dumps({'method': method, 'rows': rows, 'weights': weights}),
          flush=True)


def test_every_process_takes_the_same_gating_decision(env, two_process_run):
  del two_process_run  # only for its compiled programs in the cache
  result = _launch(env, 2, 2, [os.path.abspath(__file__), '--gating-worker'])
  assert result.returncode == 0, result.stdout[-6000:]
  got: dict[tuple[int, str], list[dict[str, float]]] = {}
  weights: dict[tuple[int, str], dict[str, float]] = {}
  for p, payload in re.findall(r'^\[p(\d)\] GATING (.*)$', result.stdout, re.M):
    out = json.loads(payload)
    got[int(p), out['method']] = out['rows']
    weights[int(p), out['method']] = out['weights']
  assert sorted(got) == [(0, 'pmap'), (0, 'shard_map'), (1, 'pmap'), (1, 'shard_map')]
  for method in ('pmap', 'shard_map'):
    rows0, rows1 = got[0, method], got[1, method]
    assert len(rows0) == 6 and all('disc_accuracy' in r for r in rows0)
    # Each process's own copy of the metrics: identical, decisions included. A mean over
    # one process's devices only would give each process its own accuracy.
    assert rows0 == rows1, method
    # Algorithm 1's gate on the accuracy averaged over both processes' devices.
    for r in rows0:
      assert r['disc_updated'] == float(r['disc_accuracy'] < 0.7), (method, r)
      assert r['vae_updated'] == float(r['disc_accuracy'] > 0.5), (method, r)
  # Both mappings run the same steps.
  for r_pmap, r_shard in zip(got[0, 'pmap'], got[0, 'shard_map']):
    assert r_pmap.keys() == r_shard.keys()
    for name in ('disc_updated', 'vae_updated'):
      assert r_pmap.get(name) == r_shard.get(name)
    for name, value in r_pmap.items():
      np.testing.assert_allclose(r_shard[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
  # The calibration runs with either mapping over both processes and agrees.
  assert weights[0, 'pmap'] == weights[1, 'pmap']
  assert weights[0, 'shard_map'] == weights[1, 'shard_map']
  assert weights[0, 'pmap'].keys() == weights[0, 'shard_map'].keys()
  for name, value in weights[0, 'pmap'].items():
    np.testing.assert_allclose(weights[0, 'shard_map'][name], value, rtol=1e-4, err_msg=name)


def _interrupt_long_run(env_: dict[str, str], workdir: str, devices: int,
                        interrupt: Callable[[subprocess.Popen, str], None],
                        overrides: dict[str, Any] | None = None,
                        **launch_kwargs: Any) -> tuple[int, str]:
  """Starts 2 processes on a run that checkpoints only at step 2 and trains on and on.

  Calls interrupt(launcher, output so far) once checkpoint 2 is written; returns the
  launcher's status and its whole output (stdout and stderr merged). `overrides` change
  the run's config.
  """
  long_run = dict(OVERRIDES, adversarial_steps=100000, checkpoint_every=100000,
                  **(overrides or {}))
  proc = subprocess.Popen(
      _launch_args(2, devices, ['train.py', *_cli(long_run), f'--workdir={workdir}'],
                   **launch_kwargs),
      cwd=REPO, env=env_, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, '')),
                            daemon=True)
  reader.start()
  try:
    deadline = time.monotonic() + RUN_LIMIT_S
    while not os.path.isdir(os.path.join(workdir, 'checkpoints', '2')):
      assert proc.poll() is None, ''.join(lines)[-6000:]
      assert time.monotonic() < deadline, 'no checkpoint at step 2'
      time.sleep(0.05)
    interrupt(proc, ''.join(lines))
    returncode = proc.wait(timeout=RUN_LIMIT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
    reader.join(timeout=10)
    proc.stdout.close()
  return returncode, ''.join(lines)


def test_a_killed_process_stops_the_other_and_a_relaunch_resumes(env, two_process_run,
                                                                tmp_path):
  reference, _ = two_process_run
  workdir = str(tmp_path / 'run')
  # A long run that checkpoints only at the end of pre-training (step 2), so that the
  # relaunch below resumes there whenever the kill lands. Process 0 must notice and fail
  # by itself: the launcher's grace period is longer than the run's limit, so it does not
  # terminate it.
  returncode, output = _interrupt_long_run(
      env, workdir, 2, lambda proc, out: os.kill(_pids(out)[1], signal.SIGKILL),
      timeout_s=KILL_TIMEOUT_S, grace_s=10 * RUN_LIMIT_S)
  assert returncode != 0, output[-6000:]
  assert '[launch] process 1 was killed by SIGKILL' in output
  assert re.search(r'\[launch\] process 0 (exited with code [1-9]|was killed by SIGABRT)',
                   output), output[-6000:]
  assert 'terminating processes' not in output

  # The same command (with the reference's length) resumes from the last checkpoint and
  # ends where the run that was never stopped ended, bit for bit (the same two processes
  # and devices: the same sums in the same order).
  resumed = _train(env, workdir, 2, 2)
  assert 'resuming from checkpoint at step 2' in resumed
  want, got = _metrics(reference), _metrics(workdir)
  for step in range(1, TOTAL_STEPS + 1):
    # steps_per_s aside: the resumed run's first step compiles, the reference's did not.
    rate = {'steps_per_s'}
    assert set(got[step]) - rate == set(want[step]) - rate, (step, got[step], want[step])
    for name, value in want[step].items():
      if name != 'steps_per_s':
        np.testing.assert_array_equal(got[step][name], value, err_msg=f'{name} at step {step}')
  _assert_same_states(_restore(workdir, TOTAL_STEPS), _restore(reference, TOTAL_STEPS),
                      rel=0)


# train.py with a read error injected into process 1's data at its third batch.
_FAILING_TRAIN = '''
import os, runpy, sys
sys.path.insert(0, {repo!r})
from avae_jax import data
real = data.batches

def batches(source, **kwargs):
  it = real(source, **kwargs)
  if kwargs.get('process_index') != 1:
    return it
  def failing():
    for i, batch in enumerate(it):
      if i == 2:
        raise OSError('a read error injected into process 1')
      yield batch
  return failing()

data.batches = batches
runpy.run_path(os.path.join({repo!r}, 'train.py'), run_name='__main__')
'''


def test_a_process_that_fails_alone_exits_at_once(env, two_process_run, tmp_path):
  del two_process_run  # only for its compiled programs in the cache (the same 2 x 2 devices)
  # Left to end normally, it would wait in JAX's shutdown barrier for its peer (300 s)
  # while the peer waits for it in a collective: the launcher would see neither end.
  script = tmp_path / 'train_failing.py'
  script.write_text(_FAILING_TRAIN.format(repo=REPO))
  # The launcher then ends process 0 after a short grace period (the long start-up timeout
  # leaves a loaded machine time to start both processes).
  result = _launch(env, 2, 2, [str(script), *_cli(OVERRIDES), f'--workdir={tmp_path / "run"}'],
                   timeout_s=TIMEOUT_S, grace_s=1)
  assert result.returncode != 0
  assert 'OSError: a read error injected into process 1' in result.stdout
  assert '[p1] process 1 of 2 failed; exiting now' in result.stdout
  assert '[launch] process 1 exited with code 1' in result.stdout, result.stdout[-6000:]


def test_a_workdir_in_use_stops_every_process_with_one_line(env, tmp_path):
  # Process 0 alone holds the lock: the other went on into the checkpointer's collective
  # and was aborted there by the JAX runtime, with a stack dump, once process 0 had left.
  # (Imported here: this file also runs as a worker script, without the repository's path.)
  from avae_jax import files  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with files.exclusive(workdir, 'the test'):
    result = _launch(env, 2, 1, ['train.py', *_cli(OVERRIDES), f'--workdir={workdir}'])
  assert result.returncode == 1, result.stdout[-6000:]
  held = f'{workdir} is in use by the test (pid {os.getpid()} on '
  assert f'[p0] train.py: error: {held}' in result.stdout, result.stdout[-6000:]
  assert (f'[p1] train.py: error: {workdir} is in use by another run (process 0 names it); '
          'wait for that run to end') in result.stdout, result.stdout[-6000:]
  assert 'Check failure' not in result.stdout and 'Fatal Python error' not in result.stdout
  assert '[launch] process 1 was killed' not in result.stdout


def test_ctrl_c_stops_every_training_process_at_one_checkpointed_step(env, two_process_run,
                                                                       tmp_path):
  del two_process_run  # only for its compiled programs in the cache (the same 2 x 2 devices)
  workdir = str(tmp_path / 'run')
  # Logs only at the phase end (step 2): the processes agree on the stop every 3 steps
  # instead, not at a log step that never comes.
  returncode, output = _interrupt_long_run(
      env, workdir, 2, lambda proc, out: proc.send_signal(signal.SIGINT),  # Ctrl-C
      overrides={'log_every': 100000, 'stop_check_every': 3})
  # The launcher ends its processes with SIGTERM; each checkpoints and stops with the
  # signal's message and status (not a traceback and status 1), at one agreed step.
  assert re.search(r'^\[p0\] SIGTERM: stopping at the next step the processes agree on '
                   r'\(every 3 steps\)', output, re.M), output[-6000:]
  stops = re.findall(r'^\[p(\d)\] train\.py: stopped by SIGTERM at step (\d+), whose '
                     'checkpoint is saved', output, re.M)
  assert sorted(p for p, _ in stops) == ['0', '1'], output[-6000:]
  (step,) = {int(s) for _, s in stops}
  assert step > 2 and step % 3 == 0, output[-6000:]
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(step)))
  assert 'Traceback' not in output and 'failed; exiting now' not in output, output[-6000:]
  assert returncode == 130, output[-6000:]


def test_eval_runs_under_the_launcher(env, two_process_run, tmp_path):
  # A copy without the training run's own eval/, which would stand in for eval.py's.
  workdir = tmp_path / 'run'
  shutil.copytree(two_process_run[0], workdir, ignore=shutil.ignore_patterns('eval'))
  result = _launch(env, 2, 2, ['eval.py', *_cli(OVERRIDES), f'--workdir={workdir}'])
  assert result.returncode == 0, result.stdout[-6000:]
  # Only process 0 prints (process 1 printed the restored step too) and writes the results.
  restored = re.findall(rf'^\[p(\d)\] eval: restored step {TOTAL_STEPS} ', result.stdout, re.M)
  assert restored == ['0'], result.stdout[-6000:]
  writes = re.findall(r'^\[p(\d)\] eval: wrote', result.stdout, re.M)
  assert writes == ['0'], result.stdout[-6000:]
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    results = json.load(f)
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    final = json.load(f)
  # The same model and images as the training run's own evaluation.
  assert results['step'] == TOTAL_STEPS
  np.testing.assert_allclose(results['rec_mse'], final['rec_mse'], rtol=1e-5)


if __name__ == '__main__':
  if sys.argv[1:] == ['--gating-worker']:
    _gating_worker()
  else:
    sys.exit(f'usage: {sys.argv[0]} --gating-worker (under launch.py)')


@pytest.mark.parametrize('address', ['10.0.0.2', 'localhost', 'localhost:', ':1234',
                                     'localhost:http', 'localhost:0', 'localhost:65536'])
def test_a_coordinator_address_without_a_port_is_a_clear_error(monkeypatch, address):
  # jax.distributed failed with a bare IndexError ('list index out of range') on '10.0.0.2'.
  import jax  # pylint: disable=g-import-not-at-top
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv('TPU_WORKER_HOSTNAMES', raising=False)
  with pytest.raises(distributed.DistributedConfigError, match='host:port'):
    distributed.initialize(address, num_processes=2, process_id=0)
  assert not jax.distributed.is_initialized()


def test_initialize_passes_the_timeouts_and_binds_a_local_coordinator_to_loopback(
    monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
               distributed.ENV_PROCESS_ID, distributed.ENV_AUTO, distributed.ENV_TIMEOUT,
               'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(name, raising=False)
  calls = []

  class Recorded(Exception):
    pass

  def record(**kwargs):
    calls.append(kwargs)
    raise Recorded  # nothing is started
  monkeypatch.setattr(jax.distributed, 'initialize', record)
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)
  # Port 1234 may be another program's here: the port check has tests of its own.
  checked = []
  monkeypatch.setattr(distributed, '_check_port', checked.append)
  for address in ('127.0.0.2:1234', '10.0.0.2:1234'):
    with pytest.raises(Recorded):
      distributed.initialize(address, num_processes=2, process_id=0, timeout_s=10)
  local, remote = calls
  assert checked == ['127.0.0.2:1234', '10.0.0.2:1234']  # process 0's, before starting
  # The shutdown timeout has a floor of distributed._MIN_SHUTDOWN_TIMEOUT_S (300 s).
  timeouts = dict(initialization_timeout=10, heartbeat_timeout_seconds=10,
                  shutdown_timeout_seconds=300)
  assert local == dict(coordinator_address='127.0.0.2:1234', num_processes=2, process_id=0,
                       coordinator_bind_address='127.0.0.2:1234', **timeouts)
  assert remote == dict(coordinator_address='10.0.0.2:1234', num_processes=2, process_id=0,
                        **timeouts)
  with pytest.raises(distributed.DistributedConfigError, match=r'must be > 0 s, got 0'):
    distributed.initialize('10.0.0.2:1234', num_processes=2, process_id=0, timeout_s=0)


@pytest.mark.parametrize('hosts, multihost', [('', False), ('10.0.0.1', False),
                                              ('10.0.0.1,', False),
                                              ('10.0.0.1,10.0.0.2', True)])
def test_only_a_pod_slice_of_several_workers_is_multihost(monkeypatch, hosts, multihost):
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', hosts)
  assert distributed.on_multihost_tpu() is multihost


@pytest.mark.parametrize('address', ['10.0.0.2:1234', 'localhost:8476', '[::1]:1234',
                                     'host.example.com:65535'])
def test_addresses_with_a_port_pass_the_check(address):
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  distributed._check_address(address)  # pylint: disable=protected-access
