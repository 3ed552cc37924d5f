"""train.py as a user runs it: end to end, killed with SIGKILL and resumed, invalid settings.

Every run is a subprocess on the default config shrunk by --config overrides (16x16
images, widths (4, 8), batch 8). The compiled steps go to a per-session JAX compilation
cache, so only the first run of a configuration pays for XLA compilation; tracing, the
data, the checkpoints and the results are those of a fresh process every time.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from avae_jax import files
from tests import test_trainer
from tests.trees import assert_trees_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The default config shrunk to seconds, and test_trainer's run of it (restored as there).
TINY, BASE, TOTAL = test_trainer.TINY, test_trainer.BASE, test_trainer.TOTAL
restore = test_trainer.restore
RUN_TIMEOUT = 600   # a bound for a whole training subprocess, not a speed requirement
FAIL_TIMEOUT = 60   # a bound for a run that must stop at validation (nothing compiled)


def cli_args(workdir, overrides, config='configs/default.py'):
  """argv of `python train.py --config=... --workdir=... --config.X=V ...`."""
  args = [sys.executable, os.path.join(ROOT, 'train.py'), f'--config={config}',
          f'--workdir={workdir}']
  for path, value in overrides.items():
    text = '(' + ','.join(map(str, value)) + ')' if isinstance(value, tuple) else str(value)
    args.append(f'--config.{path}={text}')
  return args


@pytest.fixture(scope='session')
def cli_env(tmp_path_factory):
  """Environment of the subprocesses: a session-wide compilation cache, compile logging."""
  cache = tmp_path_factory.getbasetemp() / 'jax_compilation_cache'
  cache.mkdir(exist_ok=True)
  env = dict(os.environ)  # conftest's four forced CPU devices included
  env.update(JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
             # Logs every trace and compilation: how the tests see that a bad config
             # stopped before anything was compiled.
             JAX_LOG_COMPILES='1')
  return env


def run_cli(env, workdir, overrides, *, config='configs/default.py', timeout=RUN_TIMEOUT):
  """Runs train.py to completion; returns the CompletedProcess (text output)."""
  return subprocess.run(cli_args(workdir, overrides, config), env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


COMPILE_MARKERS = ('Compiling ', 'Finished tracing')


def compiled_something(stderr):
  """Whether jax logged a trace or a compilation (JAX_LOG_COMPILES=1)."""
  return any(m in stderr for m in COMPILE_MARKERS)


def committed_steps(workdir):
  """The step directories orbax has committed (renamed from their tmp names)."""
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def tmp_dirs(workdir):
  """The step directories orbax is still writing (or was, when the process died)."""
  d = os.path.join(workdir, 'checkpoints')
  return [n for n in os.listdir(d) if '.orbax-checkpoint-tmp' in n] if os.path.isdir(d) else []


def read_jsonl(path):
  """The JSON objects of a .jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------ end to end


@pytest.fixture(scope='module')
def e2e(cli_env, tmp_path_factory):
  """One uninterrupted train.py run of BASE, evaluation included."""
  workdir = tmp_path_factory.mktemp('e2e')
  proc = run_cli(cli_env, workdir, BASE)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir, proc


def test_end_to_end_exits_0_and_writes_everything(e2e):
  workdir, proc = e2e
  assert compiled_something(proc.stderr)  # the detector used by the failure tests works

  # Checkpoints every 4 steps and at the phase ends, the last keep_checkpoints=3 kept.
  assert committed_steps(workdir) == [12, 16, 20]
  assert not tmp_dirs(workdir)
  step, tree, meta = restore(workdir)
  assert step == TOTAL and meta['phase'] == 'adversarial' and meta['step'] == TOTAL
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))
  assert restore(workdir, step=12)[2]['phase'] == 'pretrain'

  # The devices the run says it uses: conftest's four, the batch of 8 split between them.
  assert 'devices: 4 cpu x 1 process(es), pmap, 2 images per device and step' in proc.stdout

  # The resolved config, overrides applied.
  with open(workdir / 'config.json') as f:
    saved = json.load(f)
  assert saved['image_size'] == 16 and saved['model']['widths'] == [4, 8]
  assert (saved['pretrain_steps'], saved['adversarial_steps']) == (12, 8)
  assert saved['variant'] == 'avae_s' and saved['calibrate']['enabled'] is False

  # Scalars of every step: every loss term, KL, TC; the discriminator's in phase two.
  lines = read_jsonl(workdir / 'metrics.jsonl')
  by_step = {m['step']: m for m in lines if 'loss' in m}
  assert sorted(by_step) == list(range(1, TOTAL + 1))
  for s, m in by_step.items():
    for k in ('loss', 'rec', 'mae', 'mse', 'dssim', 'sobel', 'gabor', 'kl', 'tc',
              'learning_rate'):
      assert np.isfinite(m[k]), (s, k)
    # The rate leaves each phase's compiling step out: logged alone, it has none.
    assert ('steps_per_s' in m) == (s not in (1, 13)), s
    assert 'steps_per_s' not in m or m['steps_per_s'] > 0, s
    adversarial = {'disc_loss', 'gen_loss', 'disc_accuracy', 'disc_updated', 'vae_updated'}
    assert adversarial <= set(m) if s > 12 else not adversarial & set(m), s
    if s > 12:
      # Algorithm 1's gate on the measured accuracy: D below 0.7, the VAE above 0.5.
      assert m['disc_updated'] == float(m['disc_accuracy'] < 0.7), s
      assert m['vae_updated'] == float(m['disc_accuracy'] > 0.5), s

  # TensorBoard: the same scalars and the image grids, read back with tensorboard.
  from tensorboard.backend.event_processing import event_accumulator
  events = [n for n in os.listdir(workdir) if n.startswith('events.out.tfevents')]
  assert events
  acc = event_accumulator.EventAccumulator(str(workdir), size_guidance={'scalars': 0,
                                                                        'images': 0})
  acc.Reload()
  tags = acc.Tags()
  assert {'loss', 'kl', 'tc', 'disc_accuracy'} <= set(tags['scalars'])
  assert [e.step for e in acc.Scalars('loss')] == list(range(1, TOTAL + 1))
  assert np.isclose(acc.Scalars('loss')[-1].value, by_step[TOTAL]['loss'], rtol=1e-6)
  assert {'reconstructions', 'samples'} <= set(tags['images'])

  # PNG grids at image_every and at the end.
  for name in ('reconstructions', 'samples'):
    for s in (10, 20):
      png = Image.open(workdir / 'images' / f'{name}_{s:07d}.png')
      png.load()
      assert png.size[0] >= 16 and png.size[1] >= 16

  # The final evaluation: metrics file, eval/ folder, the printed line.
  with open(workdir / 'final_metrics.json') as f:
    final = json.load(f)
  assert 0.0 < final['rec_mse'] < 1.0 and np.isfinite(final['rec_sharpness_mean'])
  with open(workdir / 'eval' / 'metrics.json') as f:
    assert json.load(f) == final
  # Labelled with the run's step (the VAE's own update counter lags behind it once the
  # gate skips updates), in the results and in the summaries.
  assert final['step'] == TOTAL
  assert {m['step'] for m in lines if any(k.startswith('eval/') for k in m)} == {TOTAL}
  assert 'final metrics: ' in proc.stdout
  assert f'step {TOTAL}/{TOTAL} (100.0%)' in proc.stderr and 'ETA' in proc.stderr
  # Each phase's first step compiles: announced, and left out of the rate (at log_every 1
  # that step's line has no rate), the next step's line has one.
  order = ['compiling the pre-training step ...', 'step 1/20 (5.0%) | ? steps/s',
           'step 12/20 (60.0%)', 'compiling the adversarial step ...',
           'step 13/20 (65.0%) | ? steps/s', 'step 14/20 (70.0%)']
  at = [proc.stderr.find(text) for text in order]
  assert -1 not in at and at == sorted(at), dict(zip(order, at))
  assert re.search(r'step 14/20 \(70\.0%\) \| [0-9.]+ steps/s \| ETA \d', proc.stderr)


# ------------------------------------------------------------------ SIGKILL and resume


def _signal_when(env, workdir, ready, sig, overrides=None, *, wrapper=()):
  """Starts BASE (or overrides) on workdir, sends `sig` as soon as ready(workdir) holds.

  `wrapper`: a script and its arguments that run train.py's command line (below).
  Returns the exit status (-sig if the signal killed the process).
  """
  args = cli_args(workdir, BASE if overrides is None else overrides)
  args[1:1] = [str(a) for a in wrapper]
  with open(workdir / 'killed.out', 'a') as out, open(workdir / 'killed.err', 'a') as err:
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=out, stderr=err)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
      while proc.poll() is None and time.monotonic() < deadline:
        if ready(workdir):
          proc.send_signal(sig)
          break
        time.sleep(0.001)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return proc.returncode


def _kill_when(env, workdir, ready, *, wrapper=()):
  """SIGKILLs BASE on workdir as soon as ready(workdir) holds; False if the run ended first."""
  return _signal_when(env, workdir, ready, signal.SIGKILL, wrapper=wrapper) == -signal.SIGKILL


# Runs the command line after MARKER STEP (train.py's) with orbax's commit of STEP's
# checkpoint (the atomic rename of its tmp directory) frozen until the process is killed:
# every byte of that checkpoint is written, nothing of it committed. MARKER is written
# when the commit starts.
_FROZEN_COMMIT = textwrap.dedent('''
    import pathlib, runpy, sys, time
    from orbax.checkpoint._src.path import atomicity

    marker, step = pathlib.Path(sys.argv[1]), sys.argv[2]
    commit = atomicity.AtomicRenameTemporaryPath.finalize

    async def frozen_commit(self):
      if self.get().name.split('.')[0] == step:
        marker.write_text(str(self.get()))
        time.sleep(600)
      await commit(self)

    atomicity.AtomicRenameTemporaryPath.finalize = frozen_commit
    sys.argv = sys.argv[3:]
    sys.path[0] = str(pathlib.Path(sys.argv[0]).parent)  # as `python train.py` has it
    runpy.run_path(sys.argv[0], run_name='__main__')
''')


def test_sigkill_in_a_checkpoint_save_and_in_training_resumes_exactly(e2e, cli_env, tmp_path):
  # 1. Killed while the checkpoint of step 8 is written but not committed and that of
  #    step 4 is complete (so that training goes on after the resume).
  workdir = tmp_path / 'w'
  workdir.mkdir()
  script, marker = tmp_path / 'frozen_commit.py', tmp_path / 'committing'
  script.write_text(_FROZEN_COMMIT)
  assert _kill_when(cli_env, workdir, lambda w: marker.exists(),
                    wrapper=(script, marker, 8))
  complete = committed_steps(workdir)
  assert complete == [4] and [n.split('.')[0] for n in tmp_dirs(workdir)] == ['8']

  # 2. Resumes from the last complete checkpoint; killed again in the middle of training
  #    as soon as it has committed a checkpoint of its own.
  def progressed(w):
    return committed_steps(w)[-1] > complete[-1]
  assert _kill_when(cli_env, workdir, progressed)
  with open(workdir / 'killed.out') as f:
    assert f'resuming from checkpoint at step {complete[-1]}\n' in f.read()
  assert not tmp_dirs(workdir) or int(tmp_dirs(workdir)[0].split('.')[0]) > complete[-1]
  last = committed_steps(workdir)[-1]
  assert complete[-1] < last < TOTAL

  # 3. Resumes from there and finishes with the parameters of the run never interrupted.
  proc = run_cli(cli_env, workdir, BASE)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert f'resuming from checkpoint at step {last}\n' in proc.stdout
  assert not tmp_dirs(workdir)  # a half-written save is removed, never loaded
  step, tree, _ = restore(workdir)
  ref_step, ref_tree, _ = restore(e2e[0])
  assert step == ref_step == TOTAL
  assert_trees_equal(tree, ref_tree)
  # The steps replayed after each resume are logged once, in metrics.jsonl and in
  # TensorBoard (each resumed event file starts with a SessionLog START).
  expected = list(range(1, TOTAL + 1))
  assert [m['step'] for m in read_jsonl(workdir / 'metrics.jsonl') if 'loss' in m] == expected
  events = event_accumulator.EventAccumulator(str(workdir))
  events.Reload()
  assert [e.step for e in events.Scalars('loss')] == expected


def test_sigterm_checkpoints_the_step_it_stops_at_and_resumes_exactly(e2e, cli_env, tmp_path):
  # Regular checkpoints only at the phase ends (12, 20), so the one at the step where
  # SIGTERM stops the run is written because of the signal; logs every 3 steps, so the
  # stop also logs the steps since the last log (unless it lands on a multiple of 3).
  overrides = dict(BASE, checkpoint_every=100, log_every=3)
  workdir = tmp_path / 'w'
  workdir.mkdir()

  def training(w):  # two logs written: the loop runs with the handlers installed
    path = w / 'metrics.jsonl'
    return path.exists() and len(path.read_text().splitlines()) >= 2
  code = _signal_when(cli_env, workdir, training, signal.SIGTERM, overrides)
  err = (workdir / 'killed.err').read_text()
  assert code == 128 + signal.SIGTERM, err[-3000:]
  assert 'SIGTERM: stopping after this step with a checkpoint' in err
  line = [s for s in err.splitlines() if s.startswith('train.py: stopped by SIGTERM')]
  assert len(line) == 1 and 'Traceback' not in err
  assert line[0].endswith(', whose checkpoint is saved; run the same command again to resume')
  stopped = int(line[0].split(' at step ')[1].split(',')[0])
  assert 2 <= stopped <= TOTAL
  assert committed_steps(workdir)[-1] == stopped and not tmp_dirs(workdir)
  step, _, meta = restore(workdir)
  assert step == meta['step'] == stopped
  # Every step up to the stop was logged, none after it, also as a progress line.
  assert max(m['step'] for m in read_jsonl(workdir / 'metrics.jsonl')) == stopped
  assert f'step {stopped}/{TOTAL} (' in err
  assert not (workdir / 'final_metrics.json').exists()

  proc = run_cli(cli_env, workdir, overrides)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert f'resuming from checkpoint at step {stopped}\n' in proc.stdout
  step, tree, _ = restore(workdir)
  ref_step, ref_tree, _ = restore(e2e[0])
  assert step == ref_step == TOTAL
  assert_trees_equal(tree, ref_tree)
  logged = [m['step'] for m in read_jsonl(workdir / 'metrics.jsonl') if 'loss' in m]
  assert logged == sorted(set(logged)) and stopped in logged and logged[-1] == TOTAL
  # The resumed run's evaluation is the uninterrupted run's, byte for byte: its metrics,
  # table and figures.
  ref_eval = sorted(p.name for p in (e2e[0] / 'eval').iterdir())
  assert [p.name for p in sorted((workdir / 'eval').iterdir())] == ref_eval
  assert sum(n.endswith('.png') for n in ref_eval) == 4
  for name in ['final_metrics.json'] + [f'eval/{n}' for n in ref_eval]:
    assert (workdir / name).read_bytes() == (e2e[0] / name).read_bytes(), name


def test_ctrl_c_before_training_starts_stops_with_one_line(cli_env, tmp_path):
  # A long calibration (a compound-loss variant probes its terms before the first step):
  # the run holds its workdir lock but has not reached the training loop's handlers.
  overrides = dict(BASE, **{'calibrate.enabled': True, 'calibrate.batches': 100_000})
  workdir = tmp_path / 'w'
  workdir.mkdir()
  code = _signal_when(cli_env, workdir, lambda w: (w / 'train.lock').exists(),
                      signal.SIGINT, overrides)
  err = (workdir / 'killed.err').read_text()
  assert code == 128 + signal.SIGINT, err[-3000:]
  assert 'train.py: interrupted by Ctrl-C; the checkpoints saved so far are kept' in err
  assert 'Traceback' not in err
  assert committed_steps(workdir) == []


def _catches_sigint(pid: int) -> bool:
  """Whether the process has a handler for SIGINT (its SigCgt mask in /proc)."""
  with open(f'/proc/{pid}/status') as f:
    mask = next(line for line in f if line.startswith('SigCgt:')).split()[1]
  return bool(int(mask, 16) & (1 << (signal.SIGINT - 1)))


def _has_loaded_jaxlib(pid: int) -> bool:
  """Whether jaxlib's libraries are mapped into the process (it is importing JAX, or later)."""
  with open(f'/proc/{pid}/maps') as f:
    return any('/jaxlib/' in line for line in f)


@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='needs Linux /proc')
@pytest.mark.parametrize('program', ['train.py', 'benchmark.py'])
def test_ctrl_c_while_the_modules_load_ends_without_a_traceback(cli_env, tmp_path, program):
  # The Ctrl-C is sent while the program imports JAX (jaxlib mapped) with no handler of
  # SIGINT: Python's own raised KeyboardInterrupt inside an import there, with a
  # traceback. A process that was already past its imports (main catches SIGINT again)
  # ends with main's one line instead.
  args = [sys.executable, program, '--config=configs/default.py']
  if program == 'train.py':
    args.append(f'--workdir={tmp_path / "w"}')
  proc = subprocess.Popen(args, env=cli_env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    sent = False
    deadline = time.monotonic() + 120
    while not sent and time.monotonic() < deadline and proc.poll() is None:
      try:
        if not _catches_sigint(proc.pid) and _has_loaded_jaxlib(proc.pid):
          proc.send_signal(signal.SIGINT)
          sent = True
      except (OSError, StopIteration):
        break
      time.sleep(0.005)
    assert sent, 'never seen importing JAX with SIGINT let go of'
    _, err = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  if proc.returncode != -signal.SIGINT:  # past its imports: main's line
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    assert 'interrupted by Ctrl-C' in err, err[-3000:]


# ------------------------------------------------------------------ failures


def _empty_dir(tmp_path, name):
  d = tmp_path / name
  d.mkdir()
  return str(d)


INVALID = [
    # (id, overrides on TINY, config file, message on stderr)
    ('unknown variant', {'variant': 'gan'}, 'configs/default.py', "unknown variant 'gan'"),
    ('unknown dataset', {'dataset': 'imagenet'}, 'configs/default.py',
     "unknown dataset 'imagenet'"),
    ('negative weight', {'loss.weights.mae': -1.0}, 'configs/default.py',
     'loss.weights.mae = -1.0 is negative'),
    ('image size vs widths', {'image_size': 18}, 'configs/default.py',
     'image_size 18 is not divisible by 2**len(model.widths) = 4'),
    ('batch vs devices', {'batch_size': 6}, 'configs/default.py',
     'batch_size 6 is not divisible by the 4 devices'),
    ('negative cpu_devices', {'cpu_devices': -2}, 'configs/default.py',
     'cpu_devices = -2 is negative'),
    # Was caught when the model was built, in a workdir already created and locked.
    ('unknown conv backward', {'model.conv_backward': 'cutom'}, 'configs/default.py',
     "model.conv_backward must be one of auto, xla, custom, got 'cutom'"),
    ('missing folder', {'dataset': 'folder:/nonexistent/img_align_celeba'}, 'configs/default.py',
     "image folder '/nonexistent/img_align_celeba' does not exist"),
    ('missing tfds, config file with variant', {'data_dir': 'EMPTY'}, 'configs/mnist.py:vae',
     "tfds dataset 'mnist' is not prepared"),
]


@pytest.mark.parametrize('overrides, config, message', [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_settings_stop_with_one_message_before_compiling(
    cli_env, tmp_path, overrides, config, message):
  overrides = {k: (_empty_dir(tmp_path, 'tfds') if v == 'EMPTY' else v)
               for k, v in overrides.items()}
  env = dict(cli_env, AVAE_JAX_CACHE=_empty_dir(tmp_path, 'decoded'))  # no cached copy
  base = TINY if config == 'configs/default.py' else {}
  proc = run_cli(env, tmp_path / 'w', dict(base, **overrides), config=config,
                 timeout=FAIL_TIMEOUT)
  assert proc.returncode != 0
  assert f'train.py: error: {message}' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not compiled_something(proc.stderr)
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_a_process_id_alone_stops_with_one_message(cli_env, tmp_path):
  # It ran as one process: started by hand on k hosts, each trained alone into the workdir.
  env = {k: v for k, v in cli_env.items() if not k.startswith('AVAE_')}
  proc = subprocess.run(cli_args(tmp_path / 'w', TINY) + ['--process_id=1'], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=FAIL_TIMEOUT)
  assert proc.returncode == 1
  assert ('train.py: error: process id 1 was given without the number of processes and the '
          'coordinator address') in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not compiled_something(proc.stderr) and not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('file, what', [('w', 'the workdir'),
                                        ('w/checkpoints', 'the checkpoint directory')])
def test_a_workdir_that_is_a_file_stops_with_one_message(cli_env, tmp_path, file, what):
  (tmp_path / file).parent.mkdir(exist_ok=True)
  (tmp_path / file).write_text('not a directory')
  proc = run_cli(cli_env, tmp_path / 'w', TINY, timeout=FAIL_TIMEOUT)
  assert proc.returncode == 1
  # The workdir said "cannot create the workdir ...: [Errno 17] File exists"; the
  # checkpoints' directory trained to the first save and failed there with a traceback.
  assert f'train.py: error: {what} {tmp_path / file} is a file, not a directory' in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert not compiled_something(proc.stderr)


@pytest.mark.parametrize('program', ['train.py', 'eval.py'])
def test_an_empty_workdir_is_a_flag_error(cli_env, program):
  # It passed the required-flag check and failed later without naming a directory.
  proc = subprocess.run([sys.executable, program, '--config=configs/default.py', '--workdir='],
                        env=cli_env, cwd=ROOT, capture_output=True, text=True,
                        timeout=FAIL_TIMEOUT)
  assert proc.returncode == 1
  assert '--workdir must not be empty' in proc.stderr and 'Traceback' not in proc.stderr


# What a full disk raised (then orbax's clean-up), and a refused file (then a clean-up's).
_FILE_ERRORS = {
    'full': ("OSError(errno.ENOSPC, 'No space left on device')",
             """ValueError("RESOURCE_EXHAUSTED: Error writing local file: No space left on "
                       "device [os_error_code='28']")"""),
    'denied': ("PermissionError(errno.EACCES, 'Permission denied', '/w/metrics.jsonl')",
               "ValueError('flush of closed file')")}


_TRAIN_THEN = ('run the same command to resume from the latest checkpoint (those saved so '
               'far are kept)')


@pytest.mark.parametrize('failure', list(_FILE_ERRORS))
@pytest.mark.parametrize('program, work, args, then', [
    ('train', 'trainer.train_and_evaluate', ['--config=configs/default.py', '--workdir=W'],
     _TRAIN_THEN),
    # Before the work: the runtime's start, the workdir's config.json read.
    ('train', 'distributed.initialize', ['--config=configs/default.py', '--workdir=W'],
     _TRAIN_THEN),
    ('eval', 'evaluation.evaluate', ['--workdir=W'], 'run it again'),
    ('eval', 'api.read_config', ['--workdir=W'], 'run it again'),
    ('study', 'trainer.train_and_evaluate',
     ['--out=W', '--budget=test', '--datasets=shapes', '--variants=vae', '--publish=false'],
     'run the same study.py command to resume the study')])
def test_a_full_disk_or_a_refused_file_is_one_line(cli_env, tmp_path, request, program, work,
                                                   args, then, failure):
  # A full disk fails the write in progress, then every clean-up that writes: a chain of
  # tracebacks (an OSError, then orbax's ValueErrors) that said less than one line. The
  # program's work is replaced by such a chain (what a 400 KiB tmpfs gave train.py). A
  # file that cannot be written (another user's, immutable) was a traceback too.
  if work == 'evaluation.evaluate':
    # A model to restore (a copy of the module's run); its evaluation is the work that
    # fails.
    trained, _ = request.getfixturevalue('e2e')
    shutil.copytree(trained, tmp_path / 'w', ignore=shutil.ignore_patterns('eval'))
  else:
    (tmp_path / 'w').mkdir()
  module, name = work.split('.')
  error, cleanup = _FILE_ERRORS[failure]
  script = textwrap.dedent(f"""
      import errno, runpy, sys
      from avae_jax import {module}

      def fail(*args, **kwargs):
        try:
          raise {error}
        finally:
          raise {cleanup}

      {module}.{name} = fail
      sys.argv = {[f'{program}.py'] + [a.replace('W', str(tmp_path / 'w')) for a in args]!r}
      runpy.run_path('{program}.py', run_name='__main__')
      """)
  proc = subprocess.run([sys.executable, '-c', script], env=cli_env, cwd=ROOT,
                        capture_output=True, text=True, timeout=RUN_TIMEOUT)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  problem = {'full': 'out of disk space: [Errno 28] No space left on device',
             'denied': "[Errno 13] Permission denied: '/w/metrics.jsonl'"}[failure]
  advice = {'full': 'free space', 'denied': 'make it accessible'}[failure]
  assert proc.stderr.strip().splitlines()[-1] == (
      f'{program}.py: error: {problem}; {advice} and {then}')
  if program == 'study':
    # Recorded as stopped, not as running (which a rerun would count as a killed process).
    info = files.read_json(tmp_path / 'w' / 'shapes' / 'vae' / 'seed0' / 'study_run.json')
    assert info['status'] == {
        'full': 'interrupted: out of disk space ([Errno 28] No space left on device)',
        'denied': f'interrupted: {problem}'}[failure], info


def test_an_image_the_data_cannot_read_fails_its_run_not_the_study(cli_env, tmp_path):
  # A DataError raised from a refused image is the run's failure: the study lists it and
  # goes on (a refused workdir file stops it, as every later run would fail too).
  script = textwrap.dedent(f"""
      import errno, runpy, sys
      from avae_jax import data, trainer

      def fail(*args, **kwargs):
        try:
          raise PermissionError(errno.EACCES, 'Permission denied', '/data/img.png')
        except PermissionError as e:
          raise data.DataError('cannot read /data/img.png') from e

      trainer.train_and_evaluate = fail
      sys.argv = ['study.py', '--out={tmp_path / 'w'}', '--budget=test', '--datasets=shapes',
                  '--variants=vae', '--publish=false']
      runpy.run_path('study.py', run_name='__main__')
      """)
  proc = subprocess.run([sys.executable, '-c', script], env=cli_env, cwd=ROOT,
                        capture_output=True, text=True, timeout=RUN_TIMEOUT)
  assert 'study.py: error:' not in proc.stderr, proc.stderr[-3000:]
  info = files.read_json(tmp_path / 'w' / 'shapes' / 'vae' / 'seed0' / 'study_run.json')
  assert info['status'] == 'failed: DataError: cannot read /data/img.png', info
  assert '[study] shapes vae seed 0 FAILED: cannot read /data/img.png' in proc.stdout


def test_a_disk_filled_by_a_checkpoint_is_one_line(cli_env, tmp_path):
  # The real thing: orbax's writes fill a small tmpfs (mounted in a mount namespace of the
  # test's own). Its background threads logged each failed write with its traceback and
  # tensorstore's callbacks into the closed event loop raised tens more: 700 lines
  # around the one that says what happened.
  disk = tmp_path / 'disk'
  disk.mkdir()
  mounted = subprocess.run(['unshare', '-rm', 'mount', '-t', 'tmpfs', 'tmpfs', str(disk)],
                           capture_output=True, check=False)
  if mounted.returncode != 0:
    pytest.skip(f'no mount namespace here: {mounted.stderr.decode()[-300:]}')
  train = ' '.join(shlex.quote(a) for a in cli_args(disk / 'w', BASE))
  proc = subprocess.run(
      ['unshare', '-rm', 'sh', '-c',
       f'mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(disk))} && exec {train}'],
      env=cli_env, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(
      'train.py: error: out of disk space: RESOURCE_EXHAUSTED: Error writing'), (
          proc.stderr[-3000:])
  assert 'Traceback' not in proc.stderr and 'Event loop is closed' not in proc.stderr, (
      proc.stderr[-3000:])
  assert not re.search(r'^E\d{4} ', proc.stderr, re.MULTILINE), proc.stderr[-3000:]


def test_a_workdir_in_use_by_another_run_stops_with_one_message(cli_env, tmp_path):
  workdir = tmp_path / 'w'
  workdir.mkdir()
  with files.exclusive(workdir, 'train.py'):  # as a run still training there holds it
    proc = run_cli(cli_env, workdir, TINY, timeout=FAIL_TIMEOUT)
  assert proc.returncode == 1
  line = [s for s in proc.stderr.splitlines() if s.startswith('train.py: error:')]
  assert line == [f'train.py: error: {workdir} is in use by train.py (pid {os.getpid()} on '
                  f'{socket.gethostname()}); wait for that run to end, stop it, or use '
                  'another workdir'], proc.stderr[-3000:]
  assert not compiled_something(proc.stderr)
  assert not (workdir / 'checkpoints').exists()


def test_cpu_devices_splits_the_host_unless_xla_flags_sets_a_count(cli_env, tmp_path):
  # A batch of 10 fits neither device count here, so validation stops each run before
  # anything compiles, naming the number of devices train.py started with.
  own_count = ' '.join(w for w in cli_env.get('XLA_FLAGS', '').split()
                       if not w.startswith('--xla_force_host_platform_device_count'))
  overrides = dict(TINY, batch_size=10, cpu_devices=3)
  proc = run_cli(dict(cli_env, XLA_FLAGS=own_count), tmp_path / 'a', overrides,
                 timeout=FAIL_TIMEOUT)
  assert 'batch_size 10 is not divisible by the 3 devices' in proc.stderr, proc.stderr[-2000:]
  # A count in the user's XLA_FLAGS (conftest's four) wins over the config's.
  proc = run_cli(cli_env, tmp_path / 'b', overrides, timeout=FAIL_TIMEOUT)
  assert 'batch_size 10 is not divisible by the 4 devices' in proc.stderr, proc.stderr[-2000:]


def test_non_finite_loss_stops_naming_step_and_term(cli_env, tmp_path):
  # Adam's first step moves every weight by ~1e30; the next forward pass overflows.
  overrides = dict(TINY, **{'optimizer.learning_rate': 1e30, 'pretrain_steps': 6,
                            'adversarial_steps': 0, 'checkpoint_every': 1, 'log_every': 100})
  proc = run_cli(cli_env, tmp_path, overrides)
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  line = [s for s in proc.stderr.splitlines() if s.startswith('train.py: error:')]
  assert len(line) == 1
  assert 'non-finite ' in line[0] and ' at step 1;' in line[0]
  term = line[0].split('non-finite ')[1].split(' = ')[0]
  assert term in ('loss', 'rec', 'mae', 'mse', 'dssim', 'sobel', 'gabor', 'kl', 'tc')
  assert committed_steps(tmp_path) == [1]  # written before the step that overflowed
