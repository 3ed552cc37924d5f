"""benchmark.py end to end on a tiny config, and the benchmark helpers."""

import glob
import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from avae_jax import benchmarking
from avae_jax import hugepages
from avae_jax import xla_flags
from configs import default
from tests import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/default.py', '--config.image_size=16',
        '--config.model.widths=(4,8)', '--config.batch_size=8',
        '--config.shapes.num_train=64', '--config.shapes.num_eval=8', '--steps=3',
        '--warmup=1', '--matmul_peak_n=128',
        '--config.loss.tc_estimator=mws']  # the twin's estimator, so that it may run
# A stand-in for the PyTorch twin (no torch here): it reports 0.1 s per pre-training
# and 0.2 s per adversarial step it was asked to run.
FAKE_TWIN = [f'--twin_python={sys.executable}',
             '--twin_script=' + os.path.join('tests', 'fixtures', 'fake_twin.py')]


def _xla_flags(devices=1):
  """XLA_FLAGS for benchmark.py: DEVICES CPU devices (None: no count, so that the config's
  cpu_devices decides) and conftest's quick compilation, without the CPU_FLAGS that
  benchmark.py must add itself."""
  own = (xla_flags.DEVICE_COUNT_FLAG, *xla_flags.CPU_FLAGS)
  words = [f'--{xla_flags.DEVICE_COUNT_FLAG}={devices}'] if devices else []
  return ' '.join(words + [w for w in os.environ.get('XLA_FLAGS', '').split()
                           if w.lstrip('-').split('=')[0] not in own])


def _run(args, devices=1, **env_vars):
  """benchmark.py with ARGS, XLA_FLAGS forcing DEVICES CPU devices (None: no count)."""
  env = dict(os.environ, **env_vars)
  env['XLA_FLAGS'] = _xla_flags(devices)
  env['JAX_PLATFORMS'] = 'cpu'
  return subprocess.run([sys.executable, 'benchmark.py'] + args, cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)


def _positive(x):
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) \
      and x > 0


@pytest.fixture(scope='module')
def tiny_rows(tmp_path_factory):
  # Interleaved: every case compiled first, then 3 steps each in 2 rounds (2 + 1), the
  # twin running at the start of each round. A compilation cache in the environment is
  # not used: compile_s would otherwise time loading a cached program.
  # Each case then traces one more step (test_each_case_leaves_a_profile).
  cache = tmp_path_factory.mktemp('compilation_cache')
  profiles = tmp_path_factory.mktemp('profiles')
  out = _run(TINY + ['--rounds=2', f'--profile_dir={profiles}', '--profile_steps=1']
             + FAKE_TWIN, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  assert out.returncode == 0, out.stderr[-4000:]
  assert not os.listdir(cache)
  lines = [l for l in out.stdout.splitlines() if l.strip()]
  return [json.loads(l) for l in lines], out.stderr, str(profiles)


def test_every_line_is_json_with_every_field(tiny_rows):
  rows, _, _ = tiny_rows
  # Written out (README.md's cases and fields), not benchmarking.CASES and .FIELDS, the
  # code's own lists: an entry dropped from both would pass.
  assert [r['step'] for r in rows] == ['pretrain_step', 'adversarial_step_both',
                                       'adversarial_step_gated', 'vae_mse_pretrain_step']
  fields = {'step', 'median_step_s', 'mean_step_s', 'p10_step_s', 'p90_step_s', 'images_per_s',
            'compile_s', 'flops', 'flops_per_s', 'peak_fraction', 'matmul_peak_flops_per_s',
            'peak_memory_bytes', 'peak_rss_bytes', 'devices', 'dtype', 'image_size',
            'channels', 'batch_size', 'steps', 'rounds', 'rewarm_steps', 'backend',
            'device_kind', 'variant', 'disc_updated_fraction', 'vae_updated_fraction',
            'conv_backward', 'xla_flags', 'glibc_tunables', 'cpu_threads', 'matmul_precision',
            'data', 'twin_median_step_s', 'twin_ratio'}
  assert set(benchmarking.FIELDS) == fields
  for r in rows:
    assert fields <= set(r), fields - set(r)


def test_field_types_are_sane(tiny_rows):
  rows, _, _ = tiny_rows
  for r in rows:
    for k in ('median_step_s', 'mean_step_s', 'p10_step_s', 'p90_step_s', 'images_per_s',
              'compile_s', 'flops', 'flops_per_s', 'peak_fraction', 'matmul_peak_flops_per_s',
              'peak_rss_bytes'):
      assert _positive(r[k]), (r['step'], k, r[k])
    assert r['p10_step_s'] <= r['median_step_s'] <= r['p90_step_s']
    assert r['images_per_s'] == pytest.approx(8 / r['mean_step_s'])
    assert r['flops_per_s'] == pytest.approx(r['flops'] / r['median_step_s'])
    assert r['peak_memory_bytes'] is None or _positive(r['peak_memory_bytes'])
    assert (r['devices'], r['image_size'], r['channels'], r['batch_size'], r['steps']) == \
        (1, 16, 3, 8, 3)
    assert r['rounds'] == 2 and r['rewarm_steps'] == 1
    assert r['dtype'] == 'float32' and r['backend'] == 'cpu'
    assert r['data'] == 'shapes'
    assert isinstance(r['device_kind'], str) and r['device_kind']
    # What the step ran with: the config's convolution backward pass and the XLA flags
    # (the test's own plus those benchmark.py adds, avae_jax.xla_flags).
    assert r['conv_backward'] == 'auto'
    assert r['xla_flags'].split()[0] == '--xla_force_host_platform_device_count=1'
    assert all(f'--{k}=' in r['xla_flags'] for k in xla_flags.CPU_FLAGS)
    assert r['cpu_threads'] == xla_flags.cpu_threads()  # one device
    assert r['matmul_precision'] == os.environ.get('JAX_DEFAULT_MATMUL_PRECISION')
    # benchmark.py restarts itself with huge pages for malloc where that works.
    given = os.environ.get('GLIBC_TUNABLES', '')
    if hugepages.should_reexec(os.environ, hugepages.glibc_version(), hugepages.thp_mode()):
      assert r['glibc_tunables'] == hugepages.with_tunable(given)
    else:
      assert r['glibc_tunables'] == given


def test_case_semantics(tiny_rows):
  rows = {r['step']: r for r in tiny_rows[0]}
  assert rows['vae_mse_pretrain_step']['variant'] == 'vae'
  assert rows['pretrain_step']['variant'] == 'avae_s'
  # The gate pinned between the thresholds takes both updates on every step.
  both = rows['adversarial_step_both']
  assert both['disc_updated_fraction'] == 1.0 and both['vae_updated_fraction'] == 1.0
  gated = rows['adversarial_step_gated']
  fractions = [gated[k] for k in ('disc_updated_fraction', 'vae_updated_fraction')]
  for f in fractions:  # of the timed steps
    assert f * gated['steps'] == pytest.approx(round(f * gated['steps'])), fractions
  # Thresholds 0.7 > 0.5: every step updates the discriminator, the VAE or both.
  assert sum(fractions) >= 1.0, fractions
  assert rows['pretrain_step']['disc_updated_fraction'] is None
  # The compound loss and the TC term add work to the MSE-only step.
  assert rows['pretrain_step']['flops'] > rows['vae_mse_pretrain_step']['flops']


def test_twin_runs_in_every_round_and_its_medians_give_the_ratio(tiny_rows):
  rows, stderr, _ = tiny_rows
  twins = [json.loads(l.split('twin: ', 1)[1]) for l in stderr.splitlines()
           if l.startswith('twin: ')]
  # One run per round, with that round's steps and the config's sizes.
  assert [t['steps'] for t in twins] == [2, 1]
  for t in twins:
    assert (t['image_size'], t['channels'], t['widths'], t['batch']) == (16, 3, [4, 8], 8)
  # The medians over the rounds: pre-training 0.2 and 0.1 s, adversarial 0.4 and 0.2 s.
  want = {'pretrain_step': 0.15, 'adversarial_step_both': 0.3}
  for r in rows:
    if r['step'] in want:
      assert r['twin_median_step_s'] == pytest.approx(want[r['step']])
      assert r['twin_ratio'] == pytest.approx(want[r['step']] / r['median_step_s'])
    else:
      assert r['twin_median_step_s'] is None and r['twin_ratio'] is None


def test_table_on_stderr(tiny_rows):
  _, stderr, _ = tiny_rows
  for case in benchmarking.CASES:
    assert f'{case}: compiled in ' in stderr
    assert case in stderr.split('twin/ours')[-1]
  assert 'matmul peak' in stderr
  assert '3 timed steps in 2 interleaved rounds, each turn after 1 untimed' in stderr


def _xla_operations_traced(profile_dir, case):
  """The names of the XLA operations in the case's perfetto trace (one trace per case)."""
  (path,) = glob.glob(os.path.join(profile_dir, case, 'plugins', 'profile', '*',
                                   'perfetto_trace.json.gz'))
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  return {e['name'] for e in events if 'fusion' in e.get('name', '')}


def test_each_case_leaves_a_profile(tiny_rows):
  rows, stderr, profiles = tiny_rows
  assert sorted(os.listdir(profiles)) == sorted(benchmarking.CASES)
  for case in benchmarking.CASES:
    assert glob.glob(os.path.join(profiles, case, 'plugins', 'profile', '*', '*.xplane.pb'))
    # XLA:CPU's per-operation events, there only with the flag benchmark.py sets.
    assert _xla_operations_traced(profiles, case), case
  assert all('--xla_cpu_enable_xprof_traceme=true' in r['xla_flags'] for r in rows)
  assert 'jax.profiler traces (1 step(s) per case): ' in stderr


def test_unknown_case_and_bad_rounds_are_usage_errors(tmp_path):
  out = _run(TINY + ['--cases=pretrain_step,nope'])
  assert out.returncode != 0
  assert 'nope' in out.stderr and not out.stdout.strip()
  out = _run(TINY + ['--rounds=4'])
  assert out.returncode != 0
  assert '--rounds' in out.stderr and not out.stdout.strip()
  out = _run(TINY + ['--rewarm=-1'])
  assert out.returncode != 0
  assert '--rewarm' in out.stderr and not out.stdout.strip()
  # benchmark.py has a default config file: an override alone applies to it (train.py
  # asks for the file), so a bad one is that file's error.
  out = _run(['--config.variant=vea'])
  assert out.returncode != 0 and not out.stdout.strip()
  assert "unknown variant 'vea'" in out.stderr, out.stderr[-2000:]
  out = _run(TINY + ['--cases=pretrain_step,pretrain_step'])
  assert out.returncode != 0
  assert '--cases must name each case once' in out.stderr and not out.stdout.strip()
  (tmp_path / 'file').write_text('not a directory')
  out = _run(TINY + [f'--profile_dir={tmp_path / "file"}'])
  assert out.returncode != 0 and not out.stdout.strip()
  assert f'the --profile_dir {tmp_path / "file"} is a file, not a directory' in out.stderr


@pytest.mark.parametrize('variable, value, args', [
    ('AVAE_NUM_PROCESSES', '2', []), ('AVAE_COORDINATOR_ADDRESS', '127.0.0.1:1234', []),
    ('AVAE_DISTRIBUTED_AUTO', '1', []), ('TPU_WORKER_HOSTNAMES', 'host-a,host-b', []),
    (None, None, ['--num_processes=2', '--coordinator_address=127.0.0.1:1234',
                  '--process_id=0'])])
def test_several_processes_are_a_usage_error(variable, value, args):
  # Under launch.py each process timed its own copy of the steps. The settings are read
  # as train.py reads them: the flags, or the AVAE_* variables.
  out = _run(TINY + args, **({variable: value} if variable else {}))
  assert out.returncode == 1 and not out.stdout.strip()
  assert 'benchmark.py runs in one process on one host' in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr


@pytest.mark.parametrize('override, message', [
    ('--config.variant=vea', "unknown variant 'vea'"),
    ('--config.channels=2', 'channels must be 1 or 3'),
    ('--config.image_size=30', 'image_size 30'),
    ('--config.gating.train_disc_below=0.4', 'no accuracy takes both updates'),
    ('--config.gating.train_disc_below=0.50000005', 'no accuracy takes both updates'),
    ('--config.model.conv_backward=bad', 'model.conv_backward must be one of'),
])
def test_a_bad_config_is_one_line_before_compiling(override, message):
  out = _run(TINY + [override])
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert message in out.stderr
  assert ': compiled in' not in out.stderr and not out.stdout.strip()


def test_ctrl_c_is_one_line_and_status_130():
  # It was a KeyboardInterrupt traceback, and during a compilation at times a
  # segmentation fault (status 139).
  env = dict(os.environ, XLA_FLAGS=_xla_flags(), JAX_PLATFORMS='cpu')
  # With rounds, a case says when it has compiled, before its timed steps.
  args = [a for a in TINY if not a.startswith('--steps')] + [
      '--steps=100000', '--rounds=2', '--cases=pretrain_step']
  proc = subprocess.Popen([sys.executable, 'benchmark.py'] + args, cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stderr.readline()
    while 'pretrain_step: compiled' not in line:
      assert line, 'benchmark.py ended before compiling'
      line = proc.stderr.readline()
    proc.send_signal(signal.SIGINT)  # in the timed steps
    # Waited for before reading: a run that did not stop would be read to its end.
    status = proc.wait(timeout=60)
    err = proc.stderr.read()
    assert status == 130, err
  finally:
    proc.kill()
  assert 'benchmark.py: interrupted by Ctrl-C' in err and 'Traceback' not in err, err


def test_ctrl_c_while_the_twin_runs_stops_the_twin_too(tmp_path):
  # The one-line exit skipped subprocess.run's clean-up: the twin ran on to its end.
  pid_file = tmp_path / 'twin.pid'
  slow_twin = tmp_path / 'slow_twin.py'
  slow_twin.write_text(f'import os, time\nopen({str(pid_file)!r}, "w").write(str(os.getpid()))'
                       '\ntime.sleep(300)\n')
  env = dict(os.environ, XLA_FLAGS=_xla_flags(), JAX_PLATFORMS='cpu')
  # With one round the twin runs first, before anything is compiled.
  proc = subprocess.Popen([sys.executable, 'benchmark.py', *TINY, '--cases=pretrain_step',
                           f'--twin_python={sys.executable}', f'--twin_script={slow_twin}'],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 300
    while not (pid_file.exists() and pid_file.read_text()):
      assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
      time.sleep(0.1)
    twin = int(pid_file.read_text())
    proc.send_signal(signal.SIGINT)  # to benchmark.py alone, as `kill -INT` sends it
    status = proc.wait(timeout=60)  # before reading, as above
    err = proc.stderr.read()
    assert status == 130, err
  finally:
    proc.kill()
  assert 'benchmark.py: interrupted by Ctrl-C' in err and 'Traceback' not in err, err
  # Gone, or a zombie that nobody has reaped yet (its parent has exited); left 30 s for
  # the signal to land (the twin would sleep for 300 s).
  deadline = time.monotonic() + 30
  while processes.process_running(twin) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not processes.process_running(twin), f'the twin (pid {twin}) still runs'


def test_a_twin_that_cannot_run_is_a_usage_error_before_compiling():
  out = _run(TINY + [f'--twin_python={sys.executable}', '--twin_script=/nonexistent/twin.py'])
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert '--twin_script=/nonexistent/twin.py does not exist' in out.stderr
  assert ': compiled in' not in out.stderr and not out.stdout.strip()


def test_twin_problem_names_what_the_twin_cannot_compare():
  c = default.get_config()
  c.loss.tc_estimator = 'mws'
  script = os.path.join(ROOT, 'tests', 'fixtures', 'fake_twin.py')
  assert benchmarking.twin_problem(sys.executable, script, c) is None
  c.model.latent_dim, c.variant = 4, 'vae'
  problem = benchmarking.twin_problem(sys.executable, script, c)
  assert "variant='vae' (the twin: 'avae_s')" in problem
  assert 'model.latent_dim=4 (the twin: 32)' in problem
  assert 'not an executable' in benchmarking.twin_problem('/nonexistent/python', script, c)
  # The twin's loss has every term, its own Gabor bank, KL and TC.
  for path, value, message in [('weights.gabor', 0.0, 'loss gabor at weight 0'),
                               ('tc_weight', 0.0, 'loss tc_weight at weight 0'),
                               ('adversarial_weight', 0.0, 'loss adversarial_weight at')]:
    c = default.get_config()
    c.loss.tc_estimator = 'mws'
    node, leaf = (c.loss.weights, 'gabor') if '.' in path else (c.loss, path)
    node[leaf] = value
    assert message in benchmarking.twin_problem(sys.executable, script, c)
  c = default.get_config()
  c.loss.tc_estimator, c.gabor.orientations = 'mws', 8
  assert 'gabor.orientations=8 (the twin: 4)' in benchmarking.twin_problem(
      sys.executable, script, c)
  # One GPU, or the host's CPU (whose split devices share its cores), never a TPU.
  c.gabor.orientations = 4
  assert benchmarking.twin_problem(sys.executable, script, c, 'cpu', 2) is None
  assert 'runs on one GPU' in benchmarking.twin_problem(sys.executable, script, c, 'gpu', 2)
  assert 'not beside JAX on tpu' in benchmarking.twin_problem(sys.executable, script, c, 'tpu')


def test_batches_of_a_readable_dataset_cycle_its_images_and_give_its_size():
  # 3 batches of 8 from 20 training images: the TC estimator's N is the split's size.
  config = default.get_config()
  config.update(image_size=16, batch_size=8)
  config.shapes.num_train = 20
  batches, size, description = benchmarking.load_batches(config, 3)
  assert (batches.shape, size, description) == ((3, 8, 16, 16, 3), 20, 'shapes')
  flat = batches.reshape(24, -1)
  np.testing.assert_array_equal(flat[20:], flat[:4])
  assert not np.array_equal(flat[0], flat[1])


def test_a_dataset_that_cannot_be_read_gives_synthetic_batches(tmp_path, capsys):
  # MNIST from an empty tfds directory is not prepared: timed on images of its shape.
  config = default.get_config()
  config.update(dataset='mnist', data_dir=str(tmp_path), image_size=16, channels=1,
                batch_size=4)
  batches, size, description = benchmarking.load_batches(config, 2)
  assert batches.shape == (2, 4, 16, 16, 1) and batches.dtype == np.float32
  assert description == 'synthetic' and size == benchmarking.DEFAULT_DATASET_SIZE
  assert 'benchmark: data unavailable (' in capsys.readouterr().err


def test_both_case_pins_the_gate_between_the_thresholds():
  c = default.get_config()
  assert benchmarking.both_updates_accuracy(c) == pytest.approx(0.6)  # (0.5 + 0.7) / 2
  c.gating.train_vae_above, c.gating.train_disc_below = 0.2, 0.4
  assert benchmarking.both_updates_accuracy(c) == pytest.approx(0.3)
  c.gating.train_vae_above = 0.4
  with pytest.raises(ValueError, match='no accuracy takes both updates'):
    benchmarking.both_updates_accuracy(c)
  # The step compares in float32, where 0.5 and 0.50000005 are neighbours: their midpoint
  # is 0.5 there, which skipped the VAE's update.
  c.gating.train_vae_above, c.gating.train_disc_below = 0.5, 0.50000005
  with pytest.raises(ValueError, match='in float32'):
    benchmarking.both_updates_accuracy(c)
  # Thresholds with float32 numbers between them pin the gate where both updates run.
  c.gating.train_disc_below = 0.5000002
  acc = jnp.float32(benchmarking.both_updates_accuracy(c))
  assert bool(acc > c.gating.train_vae_above) and bool(acc < c.gating.train_disc_below)


def test_a_twin_that_fails_to_start_stops_interleaved_rounds_before_compiling(tmp_path):
  script = os.path.join(ROOT, 'tests', 'fixtures', 'fake_twin.py')
  assert benchmarking.twin_start_problem(sys.executable, script) is None
  broken = tmp_path / 'twin.py'
  broken.write_text('import sys\nsys.exit("No module named torch")\n')
  out = _run(TINY + ['--rounds=2', f'--twin_python={sys.executable}',
                     f'--twin_script={broken}'])
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'the twin cannot run' in out.stderr and 'No module named torch' in out.stderr
  assert ': compiled in' not in out.stderr and not out.stdout.strip()


@pytest.mark.parametrize('printed, message', [
    ('{"pretrain_step_s": 0.1, ', "last JSON line does not parse"),
    ('{"foo": 1}', 'lacks numbers for pretrain_step_s, adversarial_step_s'),
    ('{"pretrain_step_s": 0.1, "adversarial_step_s": "0.2"}', 'lacks numbers'),
    ('{"pretrain_step_s": true, "adversarial_step_s": 0.2}', 'lacks numbers'),
])
def test_a_twin_whose_json_cannot_be_compared_is_an_error(tmp_path, printed, message):
  # A traceback, or a run that exited 0 with no comparison at all.
  script = tmp_path / 'twin.py'
  script.write_text(f'print({printed!r})\n')
  with pytest.raises(RuntimeError, match=message):
    benchmarking.run_twin(sys.executable, str(script), default.get_config(), 1, 0)
  # The stand-in twin's line passes.
  fake = os.path.join(ROOT, 'tests', 'fixtures', 'fake_twin.py')
  assert benchmarking.run_twin(sys.executable, fake, default.get_config(), 1, 0)[
      'pretrain_step_s'] > 0


def test_the_twins_result_is_its_last_json_line(tmp_path):
  # Lines before it (a progress line in JSON, say) are not the result.
  script = tmp_path / 'twin.py'
  script.write_text('print(\'{"pretrain_step_s": 9.0, "adversarial_step_s": 9.0}\')\n'
                    'print(\'{"pretrain_step_s": 0.1, "adversarial_step_s": 0.2}\')\n')
  result = benchmarking.run_twin(sys.executable, str(script), default.get_config(), 1, 0)
  assert (result['pretrain_step_s'], result['adversarial_step_s']) == (0.1, 0.2)


def test_round_sizes_split_the_steps():
  assert benchmarking.round_sizes(10, 3) == [4, 3, 3]
  assert benchmarking.round_sizes(3, 3) == [1, 1, 1]
  assert benchmarking.round_sizes(5, 1) == [5]
  with pytest.raises(ValueError):
    benchmarking.round_sizes(2, 3)


def test_flag_checks_take_rounds_up_to_steps_and_the_twin_flags_together():
  # round_sizes splits 3 steps over 3 rounds; a twin needs its python and its script. In a
  # subprocess: importing benchmark.py defines its absl flags.
  probe = """
import sys
from absl import app, flags
import benchmark
for argv in ([], ['--rounds=3'], ['--rounds=4'], ['--twin_python=py'], ['--twin_script=t.py'],
             ['--twin_python=py', '--twin_script=t.py']):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['benchmark.py', '--steps=3', *argv])
  try:
    benchmark._check_run_flags()
    print('ok')
  except app.UsageError as e:
    print(e)
"""
  out = subprocess.run([sys.executable, '-c', probe], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert len(lines) == 6, out.stdout
  assert lines[:2] == ['ok', 'ok']
  assert lines[2].startswith('--rounds must be between 1 and --steps (3), got 4')
  for line in lines[3:5]:
    assert line.startswith('--twin_python and --twin_script go together'), line
  assert lines[5] == 'ok'


def test_flops_count_the_convolutions_of_the_lowered_program():
  # A hand count: 2 FLOPs per multiply-add, 5 -> 7 channels for every tap of the 3x3
  # kernel that falls inside the 6x6 image ('SAME': a border pixel's row or column has 2
  # of its 3 taps inside, 2 + 3 * 4 + 2 = 16 per dimension; XLA counts no padding), then
  # a (2*6*6*7) x 3 matrix product. Counted before optimisation, where no backend has
  # turned the convolution into a library call.
  def f(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y.reshape(1, -1) @ m
  args = (jnp.ones((2, 6, 6, 5)), jnp.ones((3, 3, 5, 7)), jnp.ones((2 * 6 * 6 * 7, 3)))
  taps_inside = (2 + 3 * 4 + 2) ** 2  # (output pixel, tap) pairs of one image
  expected = 2 * 2 * taps_inside * 5 * 7 + 2 * (2 * 6 * 6 * 7) * 3
  assert benchmarking._cost_flops(jax.jit(f).lower(*args)) == expected


def _logging_case(name, log):
  """A PreparedCase whose step only logs its call index and returns it as its metrics."""
  def call(i):
    log.append((name, i))
    return None, {'call': i}
  return benchmarking.PreparedCase(name, None, [], 0.0, call)


def test_prepared_case_keeps_the_metrics_of_timed_steps_only():
  log = []
  case = _logging_case('a', log)
  case.run_untimed(2)
  times = case.time_steps(3)
  case.run_untimed(1)
  assert len(times) == 3
  assert log == [('a', i) for i in range(6)] and case.calls == 6
  assert [m['call'] for m in case.metrics] == [2, 3, 4]


def test_interleaved_rounds_rewarm_each_turn_and_time_the_rest(monkeypatch):
  log = []
  made = {}

  def fake_prepare(config, case, *, steps, warmup, untimed, **_):
    # Keys for every call: warm-up, timed steps and the turns' untimed steps.
    made[case] = warmup + steps + untimed
    prepared = _logging_case(case, log)
    prepared.run_untimed(warmup)
    return prepared

  monkeypatch.setattr(benchmarking, 'prepare_case', fake_prepare)
  monkeypatch.setattr(benchmarking, 'case_row',
                      lambda p, times, **kw: (p.name, len(times), p.metrics, kw['rewarm']))
  rows = benchmarking.run_interleaved(None, ['a', 'b'], steps=3, warmup=1, rounds=2,
                                      rewarm=1, devices=[], batches=None, dataset_size=1)
  assert made == {'a': 6, 'b': 6}
  # Warm-ups, then round 0 (a, b: one untimed and two timed calls each), round 1 in the
  # rotated order (b, a: one untimed, one timed).
  order = [name for name, _ in log]
  assert order == ['a', 'b'] + ['a'] * 3 + ['b'] * 3 + ['b'] * 2 + ['a'] * 2
  # Each case's timed calls: 2, 3 (round 0) and 5 (round 1); 0, 1 and 4 ran untimed.
  assert [(n, k, [m['call'] for m in ms], r) for n, k, ms, r in rows] == \
      [('a', 3, [2, 3, 5], 1), ('b', 3, [2, 3, 5], 1)]
  with pytest.raises(ValueError):
    benchmarking.run_interleaved(None, ['a'], steps=2, warmup=0, rounds=1, rewarm=-1,
                                 devices=[], batches=None, dataset_size=1)


def test_two_devices_one_case(tiny_rows, tmp_path):
  # One round: the case is compiled and timed in one block, the twin once before it. The
  # config splits the CPU into the two devices (no device count in XLA_FLAGS).
  # The matmul precision is recorded (on a GPU: full float32 instead of TF32).
  # Its trace: the profile after one block of timed steps.
  out = _run(TINY + ['--cases=pretrain_step', '--config.num_devices=2',
                     '--config.cpu_devices=2', f'--profile_dir={tmp_path}'] + FAKE_TWIN,
             devices=None, JAX_DEFAULT_MATMUL_PRECISION='highest')
  assert out.returncode == 0, out.stderr[-4000:]
  assert _xla_operations_traced(str(tmp_path), 'pretrain_step')
  (row,) = [json.loads(l) for l in out.stdout.splitlines() if l.strip()]
  assert row['devices'] == 2 and row['batch_size'] == 8
  assert row['matmul_precision'] == 'highest'
  # The FLOPs of the whole step: each device's half of the batch, plus the work every
  # device repeats (the optimizer update), so a little more than on one device.
  (one,) = [r for r in tiny_rows[0] if r['step'] == 'pretrain_step']
  assert 1.0 <= row['flops'] / one['flops'] < 1.25
  assert row['rounds'] == 1 and row['steps'] == 3 and row['rewarm_steps'] == 0
  assert out.stderr.count('twin: ') == 1
  assert row['twin_median_step_s'] == pytest.approx(0.3)


def test_structured_batches_have_flat_and_edge_regions():
  x = benchmarking.structured_batches(2, 3, 24, 3, seed=1)
  assert x.shape == (2, 3, 24, 24, 3) and x.dtype == np.float32
  assert x.min() == 0.0 and 0.3 <= x.max() <= 1.0
  # Every image has background and at least one shape.
  flat = x.reshape(6, -1)
  assert np.all((flat == 0).any(axis=1)) and np.all((flat > 0).any(axis=1))


def test_twin_command_matches_the_config():
  from configs import default
  c = default.get_config()
  c.image_size, c.channels, c.model.widths, c.batch_size = 28, 1, (32, 64), 64
  cmd = benchmarking.twin_command('py', 'twin.py', c, steps=7, warmup=2)
  assert cmd == ['py', 'twin.py', '--image-size', '28', '--channels', '1', '--widths',
                 '32,64', '--batch', '64', '--steps', '7', '--warmup', '2']
  assert benchmarking.twin_command('py', 'twin.py', c, 7, 2, device='cuda')[-2:] == \
      ['--device', 'cuda']


def test_merge_twin_runs_takes_medians():
  runs = [{'pretrain_step_s': 1.0, 'adversarial_step_s': 2.0, 'device': 'cpu'},
          {'pretrain_step_s': 3.0, 'adversarial_step_s': 2.5, 'device': 'cpu'},
          {'pretrain_step_s': 2.0, 'adversarial_step_s': 9.0, 'device': 'cpu'}]
  merged = benchmarking.merge_twin_runs(runs)
  assert merged['pretrain_step_s'] == 2.0 and merged['adversarial_step_s'] == 2.5
  assert merged['runs'] == 3 and merged['device'] == 'cpu'
  with pytest.raises(ValueError):
    benchmarking.merge_twin_runs([])
  # A run without a step's time (the twin not asked for it) is left out of its median.
  runs = [{'pretrain_step_s': 1.0, 'adversarial_step_s': 2.0}, {'pretrain_step_s': 3.0},
          {'pretrain_step_s': 2.0, 'adversarial_step_s': 4.0}]
  merged = benchmarking.merge_twin_runs(runs)
  assert merged['pretrain_step_s'] == 2.0 and merged['adversarial_step_s'] == 3.0


def test_add_twin_ratio():
  row = {'step': 'pretrain_step', 'median_step_s': 0.5, 'twin_median_step_s': None,
         'twin_ratio': None}
  benchmarking.add_twin(row, {'pretrain_step_s': 1.5, 'adversarial_step_s': 3.0})
  assert row['twin_median_step_s'] == 1.5 and row['twin_ratio'] == pytest.approx(3.0)
  gated = {'step': 'adversarial_step_gated', 'median_step_s': 0.5,
           'twin_median_step_s': None, 'twin_ratio': None}
  benchmarking.add_twin(gated, {'adversarial_step_s': 3.0})
  assert gated['twin_ratio'] is None  # the twin times only the both-updates case


def test_add_matmul_peak_scales_with_accelerators_only():
  # 2 accelerators at 1e12 FLOP/s each: 2e12; a CPU's devices share the measured cores.
  gpu = {'backend': 'gpu', 'devices': 2, 'flops_per_s': 5e9}
  benchmarking.add_matmul_peak(gpu, 1e12)
  assert gpu['matmul_peak_flops_per_s'] == 2e12 and gpu['peak_fraction'] == 2.5e-3
  cpu = {'backend': 'cpu', 'devices': 2, 'flops_per_s': 5e9}
  benchmarking.add_matmul_peak(cpu, 1e11)
  assert cpu['matmul_peak_flops_per_s'] == 1e11 and cpu['peak_fraction'] == 0.05
  unmeasured = {'backend': 'gpu', 'devices': 1, 'flops_per_s': 5e9}
  benchmarking.add_matmul_peak(unmeasured, None)
  assert unmeasured['matmul_peak_flops_per_s'] is None and unmeasured['peak_fraction'] is None


def _vm_hwm_bytes():
  """This process's peak resident set size as /proc/self/status reports it (VmHWM, kB)."""
  with open('/proc/self/status') as f:
    line = next(l for l in f if l.startswith('VmHWM:'))
  return int(line.split()[1]) * 1024


def test_case_row_statistics_and_update_fractions_from_the_timed_steps():
  # Times 1..10 s in shuffled order: the statistics are those of numpy over the times; the
  # discriminator updated in every timed step but the first, the VAE in every other one.
  times = [float(t) for t in np.random.default_rng(0).permutation(np.arange(1, 11))]
  config = default.get_config()
  prepared = benchmarking.PreparedCase('adversarial_step_gated', config, jax.devices()[:1],
                                       0.5, lambda i: None)
  prepared.metrics = [{'disc_updated': np.float32(i > 0), 'vae_updated': np.float32(i % 2)}
                      for i in range(10)]
  row = benchmarking.case_row(prepared, times, rounds=2, rewarm=1)
  assert row['median_step_s'] == pytest.approx(np.median(times))
  assert row['mean_step_s'] == pytest.approx(np.mean(times))
  assert row['p10_step_s'] == pytest.approx(np.percentile(times, 10))  # 1.9: not the min
  assert row['p90_step_s'] == pytest.approx(np.percentile(times, 90))  # 9.1: not the max
  # The throughput from the mean (the gated case's times are bimodal).
  assert row['images_per_s'] == pytest.approx(config.batch_size / np.mean(times))
  assert row['disc_updated_fraction'] == pytest.approx(0.9)
  assert row['vae_updated_fraction'] == 0.5
  assert (row['steps'], row['rounds'], row['rewarm_steps']) == (10, 2, 1)
  # ru_maxrss is in KiB on Linux; the row reports bytes.
  assert row['peak_rss_bytes'] >= 0.9 * _vm_hwm_bytes()


def test_case_row_rates_take_the_median_or_the_mean_and_count_every_devices_flops():
  """Skewed times (median 1 s, mean 2.8 s): the FLOP rate from the median, images/s from
  the mean; the FLOPs are one device's count times the devices."""
  config = default.get_config()
  config.batch_size = 14
  device = jax.devices()[0]
  # Two entries of one device: the row counts the devices it was given.
  prepared = benchmarking.PreparedCase('pretrain_step', config, [device, device], 0.5,
                                       lambda i: None, flops=3e9)
  row = benchmarking.case_row(prepared, [1.0, 10.0, 1.0, 1.0, 1.0], rounds=1)
  assert row['median_step_s'] == 1.0 and row['mean_step_s'] == pytest.approx(2.8)
  assert row['images_per_s'] == pytest.approx(14 / 2.8)  # 5, not 14 / 1
  assert row['devices'] == 2 and row['flops'] == 6e9
  assert row['flops_per_s'] == pytest.approx(6e9 / 1.0)


def test_matmul_peak_is_the_best_of_the_repeats(monkeypatch):
  # Three repeats taking 3, 1 and 2 s: 2 n^3 FLOPs (a multiply and an add per term) in the
  # fastest, 1 s.
  clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])
  monkeypatch.setattr(benchmarking, 'time',
                      types.SimpleNamespace(perf_counter=lambda: next(clock)))
  n = 8
  assert benchmarking.matmul_peak_flops(n=n, repeats=3) == 2.0 * n ** 3 / 1.0
  assert next(clock, None) is None  # every repeat timed, nothing else


def test_table_shows_a_gpu_step_s_figures():
  # A GPU's step takes milliseconds and reaches well under 1% of its matmul peak: '0.006'
  # and '0%' would hide both.
  row = {k: None for k in benchmarking.FIELDS}
  row.update(step='pretrain_step', median_step_s=0.006191, mean_step_s=0.006237,
             p10_step_s=0.006012,
             p90_step_s=0.006443, images_per_s=1e4, compile_s=20.0, flops=2.2e9,
             flops_per_s=3.5e11, peak_fraction=3.5e11 / 4.1e14,
             matmul_peak_flops_per_s=4.1e14, backend='gpu', device_kind='H', devices=1,
             image_size=96, channels=3, batch_size=64, dtype='float32', steps=50, rounds=1,
             twin_median_step_s=0.0139, twin_ratio=0.0139 / 0.006191)
  line = benchmarking.format_table([row]).splitlines()[2].split()
  assert line[:5] == ['pretrain_step', '0.00619', '0.00624', '0.00601', '0.00644']
  # images/s, compile s, GFLOP (2.2e9 FLOPs) and GFLOP/s (3.5e11 FLOP/s).
  assert line[5:9] == ['10000.0', '20.0', '2.2', '350.0']
  assert line[-3:] == ['0.085%', '0.0139', '2.25']
  row['peak_fraction'] = 0.18
  assert '18%' in benchmarking.format_table([row]).splitlines()[2].split()
  row['peak_fraction'] = 0.053  # from 1% on, whole percent
  assert '5%' in benchmarking.format_table([row]).splitlines()[2].split()
  row['peak_fraction'] = 0.005  # below 1%: two significant digits, not a rounded '0%'
  assert '0.5%' in benchmarking.format_table([row]).splitlines()[2].split()
  # One round: the footer names no interleaved rounds.
  footer = benchmarking.format_table([row]).splitlines()[-1]
  assert '50 timed steps; matmul peak 410000.0 GFLOP/s' in footer, footer
  assert 'interleaved' not in footer, footer


def test_peak_device_memory_is_the_largest_devices():
  def device(stats):
    def memory_stats():
      if isinstance(stats, Exception):
        raise stats
      return stats
    return types.SimpleNamespace(memory_stats=memory_stats)
  devices = [device({'peak_bytes_in_use': 5}), device({'peak_bytes_in_use': 7}),
             device(None), device({'bytes_in_use': 9}), device(RuntimeError('no stats'))]
  assert benchmarking._peak_memory(devices) == 7
  assert benchmarking._peak_memory(devices[2:]) is None  # a CPU's


def test_each_step_takes_the_next_batch_and_key(monkeypatch):
  # The steps cycle through the batches (the gated case's decisions follow the data),
  # each with the key folded from its call index.
  from avae_jax import parallel  # pylint: disable=g-import-not-at-top
  seen = []

  class Lowered:
    def compile(self):
      def step(state, x, key):
        seen.append((float(x[0, 0, 0, 0, 0]), np.asarray(key)))
        return state, {}
      return step

    def cost_analysis(self):
      return {'flops': 1.0}

  lower = types.SimpleNamespace(lower=lambda *args: Lowered())
  monkeypatch.setattr(parallel, 'make_steps',
                      lambda *args, **kwargs: types.SimpleNamespace(pretrain=lower))
  config = default.get_config()
  config.update(image_size=16, batch_size=2, seed=3)
  config.model.update(widths=(4, 8), latent_dim=4, hidden_dim=8)
  batches = np.arange(3, dtype=np.float32)[:, None, None, None, None] * np.ones(
      (3, 2, 16, 16, 3), np.float32)
  prepared = benchmarking.prepare_case(config, 'pretrain_step', steps=4, warmup=1,
                                       devices=jax.devices()[:1], batches=batches,
                                       dataset_size=100)
  prepared.time_steps(4)
  assert [x for x, _ in seen] == [0.0, 1.0, 2.0, 0.0, 1.0]
  base = jax.random.PRNGKey(4)  # seed + 1
  for i, (_, key) in enumerate(seen):
    np.testing.assert_array_equal(key, np.asarray(jax.random.fold_in(base, i)))


def test_op_timings_script_times_every_operation():
  env = dict(os.environ, XLA_FLAGS=_xla_flags(), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join('scripts', 'op_timings.py'),
                        '--batch=1', '--repeats=1'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  lines = out.stdout.splitlines()[1:]
  # 2 SSIM windows, 2 sides x 3 forms of the filter bank, 3 poolings, 4 resolutions x
  # (forward, input gradient, weight gradient), 2 strided input gradients x 2.
  assert len(lines) == 2 + 2 * 3 + 3 + 4 * 3 + 2 * 2
  for line in lines:
    assert float(line.split()[-2]) > 0 and line.endswith(' ms')


def test_data_timings_script_times_three_readers_without_touching_the_users_cache(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'AVAE_JAX_CACHE'}
  env.update(HOME=str(tmp_path), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join('scripts', 'data_timings.py'),
                        '--images=24', '--batch=4', '--batches=2', '--image_size=16',
                        '--crop_size=0', '--channels=1'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  rows = [json.loads(line) for line in out.stdout.splitlines()]
  assert [r['reader'] for r in rows] == ['folder_decoded_each_batch', 'folder_cache_build',
                                         'folder_cached']
  for row in rows:
    assert row['images_per_s'] > 0 and row['batch'] == 4 and row['image_shape'] == [16, 16, 1]
  assert rows[1]['images'] == 24
  assert os.listdir(tmp_path) == []  # no ~/.cache/avae_jax

  # The first --images of a folder, left as they are.
  folder = tmp_path / 'folder'
  folder.mkdir()
  for i in range(9):
    Image.fromarray(np.full((20, 20), i, np.uint8)).save(folder / f'{i}.png')
  out = subprocess.run([sys.executable, os.path.join('scripts', 'data_timings.py'),
                        f'--folder={folder}', '--images=7', '--batch=4', '--batches=1',
                        '--image_size=16', '--crop_size=0'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert json.loads(out.stdout.splitlines()[1])['images'] == 7
  assert sorted(os.listdir(tmp_path)) == ['folder'] and len(os.listdir(folder)) == 9

  too_big = subprocess.run([sys.executable, os.path.join('scripts', 'data_timings.py'),
                            '--images=4', '--batch=8'], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
  assert too_big.returncode != 0 and 'Traceback' not in too_big.stderr
  assert '--batch=8 is more than the 3 training images' in too_big.stderr


@pytest.mark.parametrize('args, message', [
    # A folder without --folder=: the made-up images were timed instead.
    (['images_dir'], "unexpected arguments ['images_dir'] (a folder is --folder=DIR)"),
    (['--channels=2'], 'config.channels must be 1 (grayscale) or 3 (RGB), got 2'),
    (['--crop_size=500'], 'crop_size 500 is larger than the image (218x178)'),
    (['--image_size=0'], '--image_size=0: 0 is not a positive integer'),
    (['--crop_size=-5'], '--crop_size=-5: -5 is not a non-negative integer'),
])
def test_data_timings_refuses_what_it_cannot_time_in_one_line(tmp_path, args, message):
  env = dict(os.environ, HOME=str(tmp_path), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join('scripts', 'data_timings.py'),
                        '--images=4', '--batch=2', '--batches=1', *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode != 0 and 'Traceback' not in out.stderr, out.stderr[-4000:]
  assert message in out.stderr and not out.stdout.strip()


@pytest.mark.parametrize('flag', ['--batch=0', '--batch=-1', '--repeats=0'])
def test_op_timings_refuses_a_batch_or_repeats_below_one(flag):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, os.path.join('scripts', 'op_timings.py'), flag],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert flag.split('=')[0] in out.stderr and not out.stdout.strip()
