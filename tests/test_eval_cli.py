"""eval.py end to end, as a subprocess, on the tiny trained workdir of test_api."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from configs import default
from tests import processes
from tests import test_api

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return test_api.trained_workdir(tmp_path_factory.getbasetemp())


def _eval(workdir, *extra):
  """Runs eval.py with the tiny model's overrides; returns the CompletedProcess."""
  cmd = [sys.executable, 'eval.py', '--config=configs/default.py', f'--workdir={workdir}',
         *test_api.cli_flags(), *extra]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                        check=False)


def test_eval_writes_metrics_table_and_figures(tmp_path, workdir):
  # A copy, so that the trainer's own WORKDIR/eval does not stand in for eval.py's output.
  run = tmp_path / 'run'
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('eval'))
  # Another seed draws another shapes eval split: allowed, but said (it may hold training
  # images).
  # Another shapes.num_train leaves the eval split as it was, and shapes has no crop: not
  # named.
  proc = _eval(run, '--step=1', '--config.seed=3', '--config.shapes.num_train=100',
               '--config.crop_size=20')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert ("eval.py: warning: the eval data differs from the training run's (config.json): "
          'seed 0 -> 3; the evaluation images') in proc.stderr
  out = run / 'eval'
  with open(out / 'metrics.json') as f:
    results = json.load(f)
  assert results['step'] == 1
  assert results['num_images'] == test_api.TINY['eval.num_images']
  assert results['fid_skipped'] == 'config.eval.fid is False'
  assert 'mig' in results and 'rec_mse' in results and 'sample_sharpness_mean' in results
  # The four figures named here: evaluation.FIGURES is the code under test's own list.
  for name in ('reconstructions', 'samples', 'interpolations', 'traversals'):
    assert (out / f'{name}.png').stat().st_size > 0
  assert '| Metric | Ground Truth | VAE |' in (out / 'table.md').read_text()
  assert 'eval: restored step 1' in proc.stdout
  assert 'images and reconstructions' in proc.stdout  # progress lines


def test_a_reader_gone_after_the_first_line_loses_no_result(tmp_path, workdir):
  # `eval.py | head -1`: the next progress line raised BrokenPipeError, and the evaluation
  # ended before writing metrics.json. And `~` in --workdir=~/run is the home directory
  # (a shell leaves it there).
  run = tmp_path / 'run'
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('eval'))
  cmd = [sys.executable, 'eval.py', '--config=configs/default.py', '--workdir=~/run',
         *test_api.cli_flags()]
  with open(tmp_path / 'err', 'w') as err:
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, HOME=str(tmp_path)),
                            stdout=subprocess.PIPE, stderr=err, text=True)
    try:
      first = proc.stdout.readline()
      proc.stdout.close()  # as `head -1` exits
      status = proc.wait(timeout=300)
    finally:
      proc.kill()
  err = (tmp_path / 'err').read_text()
  assert status == 0 and 'Traceback' not in err, first + err[-3000:]
  assert first.startswith('eval: ')
  assert json.loads((run / 'eval' / 'metrics.json').read_text())['step'] == 2


def test_without_config_the_workdirs_own_is_used(tmp_path, workdir):
  run = tmp_path / 'run'
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('eval'))
  # Trained on a machine with more devices than this one: evaluated on this one's.
  saved = json.loads((run / 'config.json').read_text())
  saved['num_devices'] = 512
  del saved['cpu_devices']  # as in a config.json of an earlier version
  (run / 'config.json').write_text(json.dumps(saved))
  # An earlier evaluation killed between a write and its rename left its temporary; one
  # of a live process (this one, say an evaluation in a notebook) is being written.
  (run / 'eval').mkdir()
  dead = processes.temporary_of(run / 'eval' / 'metrics.json', processes.dead_pid())
  live = processes.temporary_of(run / 'eval' / 'table.md', os.getpid())
  for path in (dead, live):
    with open(path, 'w') as f:
      f.write('{')
  # Overrides apply to the saved config, in either of absl's forms (--flag=value or
  # --flag value), as they do with --config.
  proc = subprocess.run([sys.executable, 'eval.py', f'--workdir={run}',
                         '--config.eval.num_images=4', '--config.eval.mig_num_images', '8'],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'eval: config.json asks for num_devices=512, this machine has ' in proc.stdout
  # The missing field's warning is one line of eval.py's, not Python's UserWarning with
  # its source line.
  assert f'eval.py: warning: {run / "config.json"} lacks cpu_devices' in proc.stderr
  assert 'UserWarning' not in proc.stderr
  with open(run / 'eval' / 'metrics.json') as f:
    results = json.load(f)
  # The tiny model's settings came from WORKDIR/config.json (default.py's model is larger),
  # the image counts from the overrides.
  assert results['num_images'] == 4 and results['mig_num_images'] == 8
  assert results['step'] == test_api.TRAINED_STEPS
  assert f'eval: restored step {test_api.TRAINED_STEPS}' in proc.stdout
  assert not os.path.exists(dead) and os.path.exists(live)
  assert f'eval: removed 1 temporary file(s) of a killed write in {run / "eval"}' in proc.stdout


def test_a_damaged_config_json_beside_a_given_config_is_one_warning(tmp_path, workdir):
  # It stopped the evaluation, although --config needs no config.json.
  run = tmp_path / 'run'
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('eval'))
  (run / 'config.json').write_text('{"variant": ')
  proc = _eval(run, '--config.eval.num_images=4')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  warning, = [line for line in proc.stderr.splitlines() if 'config.json' in line]
  assert warning.startswith(f'eval.py: warning: {run / "config.json"} is not a readable '
                            'config (JSON): ') and warning.endswith('; using the given config')
  assert 'UserWarning' not in proc.stderr
  assert (run / 'eval' / 'metrics.json').exists()


def test_a_device_count_given_without_config_is_not_replaced(workdir):
  # It was taken for config.json's and replaced by this machine's count.
  proc = subprocess.run([sys.executable, 'eval.py', f'--workdir={workdir}',
                         '--config.num_devices=512'], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)
  _assert_clean_failure(proc, 'num_devices=512 is more than the 4 local device(s)')
  assert 'asks for num_devices' not in proc.stdout


def test_an_evaluation_directory_it_cannot_write_stops_with_a_clear_message(tmp_path,
                                                                            workdir):
  # WORKDIR/eval a file: the SummaryWriter's OSError was a traceback, as was a read-only
  # workdir (files.output_dir_problem checks both, tests/test_files.py).
  run = tmp_path / 'run'
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('eval'))
  (run / 'eval').write_text('not a directory')
  _assert_clean_failure(_eval(run), f'the evaluation directory {run / "eval"} is a file, '
                        'not a directory')


def test_without_config_an_empty_workdir_stops_with_a_clear_message(tmp_path):
  # It said "has no config.json; pass the training config", which then found no model.
  proc = subprocess.run([sys.executable, 'eval.py', f'--workdir={tmp_path}'], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)
  _assert_clean_failure(proc, f'no checkpoint in {tmp_path / "checkpoints"}', 'train.py')


def test_without_config_a_workdir_without_its_config_file_asks_for_the_config(tmp_path,
                                                                             workdir):
  run = tmp_path / 'run'
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns('config.json'))
  proc = subprocess.run([sys.executable, 'eval.py', f'--workdir={run}'], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)
  _assert_clean_failure(proc, 'has no config.json', '--config=')


@pytest.mark.parametrize('args, phrases', [
    (['--workdir=WORKDIR/nowhere'], ('WORKDIR/nowhere does not exist',)),
    (['--workdir=WORKDIR', '--config.eval.fid=0'], ('no checkpoint in WORKDIR/checkpoints',)),
    # It said "has no config.json".
    (['--workdir=WORKDIR/a_file'], ('WORKDIR/a_file is a file, not a directory',)),
    # It said "no checkpoint in .../checkpoints: train a model there first".
    (['--workdir=WORKDIR/run'], ('WORKDIR/run/checkpoints is a file, not the directory',)),
])
def test_without_config_a_missing_workdir_or_config_stops_with_a_clear_message(
    tmp_path, args, phrases):
  args = [a.replace('WORKDIR', str(tmp_path)) for a in args]
  phrases = [p.replace('WORKDIR', str(tmp_path)) for p in phrases]
  (tmp_path / 'a_file').write_text('not a workdir')
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'checkpoints').write_text('not a directory')
  proc = subprocess.run([sys.executable, 'eval.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)
  _assert_clean_failure(proc, *phrases)


@pytest.mark.parametrize('override, phrase', [
    ('--config.eval.fidd=1', "--config.eval.fidd: the config has no field 'fidd'"),
    ('--config.eval.grid_size=x', '--config.eval.grid_size=x: expected an integer'),
])
def test_a_bad_override_of_the_saved_config_stops_with_a_clear_message(workdir, override,
                                                                       phrase):
  proc = subprocess.run([sys.executable, 'eval.py', f'--workdir={workdir}', override],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  _assert_clean_failure(proc, phrase)
  assert 'eval: restored' not in proc.stdout


@pytest.mark.parametrize('args, phrase', [
    # The value as the next word; a negative number is a value, not a flag.
    (['--config.eval.grid_size', 'x'], '--config.eval.grid_size=x: expected an integer'),
    (['--config.eval.traversal_range', '-2'], "largest number, 3.4e38), got 2 and -2.0"),
    # absl's --noFLAG form of a boolean: false.
    (['--noconfig.eval.num_images'], '--config.eval.num_images=false: expected an integer'),
    (['--noconfig.eval.fid', '--config.eval.grid_size', '1'],
     'eval.grid_size = 1 must be >= 2'),
])
def test_every_override_form_of_absl_applies_to_the_saved_config(workdir, args, phrase):
  # Without --config these were 'Unexpected arguments' and an unknown flag 'noconfig...'.
  proc = subprocess.run([sys.executable, 'eval.py', f'--workdir={workdir}', *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  _assert_clean_failure(proc, phrase)
  assert 'eval: restored' not in proc.stdout


def _assert_clean_failure(proc, *phrases):
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  message = proc.stderr.strip().splitlines()[-1]
  assert message.startswith('eval.py: error: '), message
  for phrase in phrases:
    assert phrase in message, message


def test_empty_workdir_stops_with_a_clear_message(tmp_path):
  proc = _eval(tmp_path)
  _assert_clean_failure(proc, 'no checkpoint in', 'train.py')
  assert not (tmp_path / 'eval').exists()


def test_workdir_of_another_image_size_stops_with_a_clear_message(workdir):
  # With another seed as well: the model's mismatch is the message, without the eval data's
  # warning first (it is said of an evaluation that runs).
  proc = _eval(workdir, '--config.image_size=32', '--config.seed=3')
  _assert_clean_failure(proc, 'image_size: workdir 16, config 32')
  assert 'the eval data differs' not in proc.stderr


def test_negative_cpu_devices_stops_with_a_clear_message(tmp_path):
  proc = _eval(tmp_path, '--config.cpu_devices=-1')
  _assert_clean_failure(proc, 'cpu_devices = -1 is negative')


def test_invalid_eval_setting_stops_before_the_evaluation(workdir):
  # Checked before the model is restored; the figures would fail after every metric.
  proc = _eval(workdir, '--config.eval.grid_size=1')
  _assert_clean_failure(proc, 'eval.grid_size = 1 must be >= 2')
  assert 'eval: restored' not in proc.stdout


def test_negative_step_stops_with_a_clear_message(tmp_path):
  proc = _eval(tmp_path, '--step=-1')
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert 'flag --step=-1: -1 is not a non-negative integer' in proc.stderr


def test_the_warning_names_the_shapes_eval_size_only_on_shapes(tmp_path):
  # shapes.num_eval draws the shapes eval split; on another dataset it changes nothing,
  # and naming it warned of training images in the evaluation that could not be there.
  # In a subprocess: importing eval.py defines its absl flags.
  probe = f"""
import json, os
import eval as cli
from configs import default

def settings(dataset, changes):
  c = default.get_config()
  c.dataset = dataset
  c.update_from_flattened_dict(changes)
  return c

results = {{}}
# A config.json of an older version, without crop_size: it cropped nothing.
workdir = os.path.join({str(tmp_path)!r}, 'old')
os.makedirs(workdir)
saved = settings('mnist', {{}}).to_dict()
del saved['crop_size']
with open(os.path.join(workdir, 'config.json'), 'w') as f:
  json.dump(saved, f)
results['old'] = [cli._other_data_settings(workdir, settings('mnist', changes))
                  for changes in ({{}}, {{'crop_size': 20}})]
# An older version saved a folder dataset's path as given: relative to the run's directory
# (this one), which the command line's absolute path names too.
workdir = os.path.join({str(tmp_path)!r}, 'relative')
os.makedirs(workdir)
with open(os.path.join(workdir, 'config.json'), 'w') as f:
  f.write(settings('folder:imgs', {{}}).to_json())
results['relative'] = cli._other_data_settings(
    workdir, settings('folder:' + os.path.abspath('imgs'), {{}}))
for dataset in ('mnist', 'shapes'):
  workdir = os.path.join({str(tmp_path)!r}, dataset)
  os.makedirs(workdir)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(settings(dataset, {{}}).to_json())
  results[dataset] = [cli._other_data_settings(workdir, settings(dataset, changes))
                      for changes in ({{'shapes.num_eval': 100}}, {{'eval_split': 'x'}})]
print(json.dumps(results))
"""
  proc = subprocess.run([sys.executable, '-c', probe], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.splitlines()[-1])
  split = f"eval_split {default.get_config().eval_split!r} -> 'x'"
  assert results['mnist'] == [[], [split]]
  assert results['relative'] == []
  # shapes has no splits: its eval images are drawn from the seed and num_eval alone.
  assert results['shapes'] == [['shapes.num_eval 1024 -> 100'], []]
  # Not 'crop_size None -> 0' for a field the file lacks, but a real change.
  assert results['old'] == [[], ['crop_size 0 -> 20']]
