"""trainer.train_and_evaluate in process: reproducibility, resuming in both phases, device
counts and mappings, the NaN stop, the loss-weight calibration, the variants, and invalid
settings that must fail before anything is compiled.

All runs use the default config shrunk to 16x16 images, widths (4, 8) and batch 8. The
tests' persistent compilation cache (conftest) makes runs that share a step configuration
compile once.
Except where a test says so, the final evaluation (tested with train.py end to end) is
replaced by a no-op.
"""

import functools
import io
import itertools
import json
import os
import re
import shutil
import signal
import sys
import threading
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import pytest

from avae_jax import api
from avae_jax import checkpoint
from avae_jax import config_lib
from avae_jax import data
from avae_jax import losses
from avae_jax import parallel
from avae_jax import steps
from avae_jax import summary
from avae_jax import trainer
from avae_jax import xla_flags
from configs import default
from tests import processes
from tests.trees import assert_trees_equal

TINY = {
    'image_size': 16, 'model.widths': (4, 8), 'model.latent_dim': 4, 'model.hidden_dim': 8,
    'batch_size': 8, 'shapes.num_train': 256, 'shapes.num_eval': 32,
    'eval.num_images': 32, 'eval.fid': False, 'calibrate.enabled': False,
}
# Pre-training 12 steps, adversarial 8; checkpoints every 4 and at the phase ends.
BASE = dict(TINY, **{'pretrain_steps': 12, 'adversarial_steps': 8, 'log_every': 1,
                     'checkpoint_every': 4, 'image_every': 10})
TOTAL = 20
LOSS_KEYS = ('loss', 'rec', 'mae', 'mse', 'dssim', 'sobel', 'gabor', 'kl', 'tc')
DISC_KEYS = ('disc_loss', 'gen_loss', 'disc_accuracy', 'disc_updated', 'vae_updated')


def make_config(overrides):
  """configs/default.py with dotted-path overrides."""
  c = default.get_config()
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def train(overrides, workdir, *, evaluate=False):
  """train_and_evaluate on make_config(overrides); the final evaluation stubbed unless asked."""
  config = make_config(overrides)
  with pytest.MonkeyPatch.context() as mp:
    if not evaluate:
      mp.setattr(trainer, 'final_evaluation', lambda *args, **kwargs: {})
    return trainer.train_and_evaluate(config, str(workdir))


_TEMPLATES = {}


def restore(workdir, overrides=BASE, step=None):
  """(step, {'vae': ..., 'disc': ...} host arrays, meta) of a workdir's checkpoint."""
  config = make_config(overrides)
  shape = (config.image_size, config.image_size, config.channels)
  key = (shape, tuple(config.model.widths), config.model.latent_dim, config.model.hidden_dim)
  if key not in _TEMPLATES:
    # Shapes and dtypes only (jax.eval_shape): nothing is compiled for the template.
    _TEMPLATES[key] = jax.eval_shape(
        lambda k: steps.state_tree(*steps.create_train_states(config, k, shape)),
        jax.random.PRNGKey(0))
  with checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=None,
                               read_only=True) as ckpt:
    return ckpt.restore(_TEMPLATES[key], step=step)


def committed_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def read_metrics(workdir):
  """{step: scalars} from metrics.jsonl; a step logged twice (replayed) keeps its last line."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f if line.strip()]
  return {m['step']: m for m in lines if 'loss' in m}


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """One uninterrupted run of BASE: (workdir, final checkpoint tree, metrics by step)."""
  workdir = tmp_path_factory.mktemp('reference')
  train(BASE, workdir)
  step, tree, _ = restore(workdir)
  assert step == TOTAL
  return workdir, tree, read_metrics(workdir)


# ------------------------------------------------------------------ reproducibility


def test_a_finished_run_leaves_no_producer_thread_and_each_step_gets_its_key(tmp_path,
                                                                            monkeypatch):
  calls = _spy_on_steps(monkeypatch)
  figure_keys, real_figures = [], trainer._training_figures

  def figures(config, vae_state, eval_source, key):
    figure_keys.append(np.asarray(key))
    return real_figures(config, vae_state, eval_source, key)
  monkeypatch.setattr(trainer, '_training_figures', figures)
  before = {t for t in threading.enumerate() if t.is_alive()}
  train(dict(BASE, pretrain_steps=2, adversarial_steps=2, checkpoint_every=2), tmp_path / 'run')
  left = {t for t in threading.enumerate() if t.is_alive()} - before
  assert not [t.name for t in left if t.name == 'prefetch.to_devices']
  # Step s (pre-training and adversarial alike) draws from fold_in(train key, s): a key
  # reused across steps would draw the same noise at each.
  (run,) = calls
  np.testing.assert_array_equal(run.keys, _folded_keys(0, 1, 4))
  assert len({k.tobytes() for k in run.keys}) == 4
  # The figures of step 4 (the last; image_every is 10) draw their samples from
  # fold_in(figures key, 4), the fourth key of the split: none of the steps' keys.
  np.testing.assert_array_equal(figure_keys, _folded_keys(0, 3, 5)[4:])
  # The total correlation's N is the training split's size, not the batch's or eval's.
  assert run.cfg.dataset_size == 256


def test_same_seed_gives_bit_identical_parameters(reference, tmp_path):
  train(BASE, tmp_path / 'again')
  assert_trees_equal(restore(tmp_path / 'again')[1], reference[1])
  # The comparison can fail: another seed gives other parameters.
  train(dict(BASE, seed=1), tmp_path / 'seed1')
  other = restore(tmp_path / 'seed1')[1]
  assert not np.array_equal(other['vae']['params']['decoder']['to_image']['kernel'],
                            reference[1]['vae']['params']['decoder']['to_image']['kernel'])


def test_the_data_order_is_the_seeds(tmp_path, monkeypatch):
  # Another seed already draws another initial model, which hid a data order that
  # ignored it: the batches themselves are compared with the documented schedule's.
  calls = _spy_on_steps(monkeypatch)
  run = dict(TINY, seed=3, pretrain_steps=2, adversarial_steps=0)
  train(run, tmp_path / 'w')
  (record,) = calls
  batches = record.batches
  source = data.load(make_config(run), 'train')
  assert len(batches) == 2
  for t, batch in enumerate(batches):
    np.testing.assert_array_equal(
        batch, source.get(data.batch_indices(source.num_examples, 8, 3, t)))
  assert not np.array_equal(batches[0], source.get(data.batch_indices(source.num_examples,
                                                                      8, 0, 0)))


def test_gated_update_counters_match_the_logged_gates(reference):
  _, tree, metrics = reference
  adversarial = [metrics[s] for s in range(13, TOTAL + 1)]
  assert int(tree['vae']['step']) == 12 + sum(int(m['vae_updated']) for m in adversarial)
  assert int(tree['disc']['step']) == sum(int(m['disc_updated']) for m in adversarial)


def test_stopped_and_resumed_in_both_phases_equals_uninterrupted(reference, tmp_path, capsys,
                                                                 monkeypatch):
  ref_dir, ref_tree, ref_metrics = reference
  workdir = tmp_path / 'w'
  threads = xla_flags.cpu_threads(jax.local_device_count())
  # 1. Stops in pre-training at step 5 (not a multiple of checkpoint_every).
  train(dict(BASE, pretrain_steps=5, adversarial_steps=0), workdir)
  step, _, meta = restore(workdir)
  assert (step, meta['phase'], meta['step']) == (5, 'pretrain', 5)
  assert meta['cpu_threads'] == threads and meta['devices'] == [1, jax.local_device_count()]
  # 2. Resumes in pre-training, stops at its end: the checkpoint on the phase boundary.
  train(dict(BASE, adversarial_steps=0), workdir)
  out, err = capsys.readouterr()
  assert 'resuming from checkpoint at step 5\n' in out
  assert 'XLA:CPU thread' not in err  # the same count as the checkpoint's
  step, _, meta = restore(workdir)
  assert (step, meta['phase'], meta['step']) == (12, 'pretrain', 12)
  # 3. Resumes with the first adversarial step, stops 3 steps into that phase.
  train(dict(BASE, adversarial_steps=3), workdir)
  assert 'resuming from checkpoint at step 12\n' in capsys.readouterr().out
  step, _, meta = restore(workdir)
  assert (step, meta['phase'], meta['step']) == (15, 'adversarial', 15)
  # 4. Resumes in the adversarial phase and finishes. Told it has another thread count
  # (which would change the float32 sums; here only the count read is changed), the
  # resume warns.
  monkeypatch.setattr(xla_flags, 'process_cpu_threads', lambda: threads + 1)
  train(BASE, workdir)
  out, err = capsys.readouterr()
  assert 'resuming from checkpoint at step 15\n' in out
  assert (f'warning: the checkpoint was written with {threads} XLA:CPU thread(s) and this '
          f'process has {threads + 1}') in err
  step, tree, _ = restore(workdir)
  assert step == TOTAL
  assert_trees_equal(tree, ref_tree)
  # An intermediate checkpoint after the resume is the uninterrupted run's, too.
  assert_trees_equal(restore(workdir, step=16)[1], restore(ref_dir, step=16)[1])
  # And so are the logged losses of every step, before and after each resume.
  metrics = read_metrics(workdir)
  assert sorted(metrics) == list(range(1, TOTAL + 1))
  for s in metrics:
    for k in LOSS_KEYS + (DISC_KEYS if s > 12 else ()):
      assert metrics[s][k] == ref_metrics[s][k], (s, k)


def test_a_log_row_is_the_mean_of_its_steps_and_keep_checkpoints_is_applied(reference,
                                                                            tmp_path):
  # BASE logged every 4 steps instead of every step (the same computation): each row is
  # the mean of the reference's rows of its 4 steps, in both phases; and keep_checkpoints
  # = 2 leaves the last two of the checkpoints at 4, 8, 12, 16 and 20.
  _, _, ref_metrics = reference
  train(dict(BASE, log_every=4, keep_checkpoints=2), tmp_path)
  assert committed_steps(tmp_path) == [16, 20]
  metrics = read_metrics(tmp_path)
  assert sorted(metrics) == [4, 8, 12, 16, 20]
  for s in metrics:
    for k in LOSS_KEYS + (DISC_KEYS if s > 12 else ()):
      window = [ref_metrics[t][k] for t in range(s - 3, s + 1)]
      assert metrics[s][k] == pytest.approx(np.mean(window), rel=1e-6, abs=1e-9), (s, k)


def test_non_finite_values_are_named_with_their_step(caplog):
  finite = {'loss': np.float32(1.0), 'kl': np.float32(0.5)}
  trainer._check_finite([(2, finite)])  # nothing to report
  for value in (np.inf, -np.inf, np.nan):
    with pytest.raises(trainer.NonFiniteLossError, match=rf'non-finite kl = {value} at step 3;'):
      trainer._check_finite([(2, finite), (3, dict(finite, kl=np.float32(value)))])
    with pytest.raises(trainer.NonFiniteLossError,
                       match=rf'non-finite kl = {value} at probe step 3 of the loss-weight'):
      trainer._check_finite([(3, dict(finite, kl=np.float32(value)))], calibration=True)


def test_calibrated_weights_bring_each_term_to_the_mse_scale():
  # lambda_i = w_i * mean(MSE) / mean(term_i) by hand, w_i = 1 (the configs); a term whose
  # probe mean is 0 (nothing to scale) keeps its configured weight.
  c = make_config(TINY)
  means = {'mse': 0.5, 'mae': 0.0, 'dssim': 0.25, 'sobel': 1.0, 'gabor': 2.0}
  assert trainer.weights_from_term_means(c, means) == {
      'mae': 1.0, 'mse': 1.0, 'dssim': 2.0, 'sobel': 0.5, 'gabor': 0.25}
  c.loss.weights.sobel = 0.0  # off stays off
  assert trainer.weights_from_term_means(c, means)['sobel'] == 0.0
  # A term the config's weights leave out is off too (as config_lib and the loss read
  # it), not a KeyError after the probe has run.
  c.loss.weights = ml_collections.ConfigDict({'mae': 1.0, 'dssim': 1.0})
  assert trainer.weights_from_term_means(c, means) == {
      'mae': 1.0, 'mse': 0.0, 'dssim': 2.0, 'sobel': 0.0, 'gabor': 0.0}


class _StepClock:
  """A clock that only steps move: each step function's first call 100 s (it compiles),
  other calls 1 s."""

  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now

  def wrap(self, step_fn):
    calls = 0

    def timed(*args):
      nonlocal calls
      self.now += 100.0 if calls == 0 else 1.0
      calls += 1
      return step_fn(*args)
    return timed


def test_a_resume_between_logs_logs_the_uninterrupted_runs_means(tmp_path, monkeypatch):
  # Logs every 4 steps, checkpoints at 6 and 8: a run killed after logging step 8 but
  # before checkpointing it resumes from 6, and its row 8 (which replaces the first) must
  # still average steps 5-8, two of them from before the stop.
  overrides = dict(BASE, pretrain_steps=8, adversarial_steps=0, log_every=4,
                   checkpoint_every=6)
  # The reference runs on a clock that only its steps and figures move, so that its
  # rates are exact; it writes figures every other step, 50 s each.
  clock, make_steps, figures = _StepClock(), parallel.make_steps, trainer._training_figures
  monkeypatch.setattr(summary, 'ProgressLogger',
                      functools.partial(summary.ProgressLogger, clock=clock))

  def make_timed_steps(*args, **kwargs):
    fns = make_steps(*args, **kwargs)
    return fns._replace(pretrain=clock.wrap(fns.pretrain))

  def slow_figures(*args):
    clock.now += 50.0
    return figures(*args)

  monkeypatch.setattr(parallel, 'make_steps', make_timed_steps)
  monkeypatch.setattr(trainer, '_training_figures', slow_figures)
  train(dict(overrides, image_every=2), tmp_path / 'ref')
  assert len(list((tmp_path / 'ref' / 'images').glob('reconstructions_*.png'))) == 4
  monkeypatch.undo()
  train(overrides, tmp_path / 'w')
  assert committed_steps(tmp_path / 'w') == [6, 8]
  shutil.rmtree(tmp_path / 'w' / 'checkpoints' / '8')
  # The resume on the clock too: its first step (7) compiles, so its row 8's rate is step 8
  # alone, 1 s; the 6 steps of the checkpoint it starts from are not timed as its own.
  monkeypatch.setattr(summary, 'ProgressLogger',
                      functools.partial(summary.ProgressLogger, clock=clock))
  monkeypatch.setattr(parallel, 'make_steps', make_timed_steps)
  train(overrides, tmp_path / 'w')
  monkeypatch.undo()
  ref, resumed = read_metrics(tmp_path / 'ref'), read_metrics(tmp_path / 'w')
  assert resumed[8]['steps_per_s'] == 1.0, resumed[8]
  assert sorted(ref) == sorted(resumed) == [4, 8]
  for s in (4, 8):
    for k in LOSS_KEYS:
      assert resumed[s][k] == ref[s][k], (s, k)
  # The first log's rate leaves the compiling step 1 out (with it: 4 steps in 103 s), and
  # the rates leave the figures out (with them: 3 steps in 53 s, 4 in 54 s).
  assert ref[4]['steps_per_s'] == ref[8]['steps_per_s'] == 1.0, ref


def test_the_phase_boundary_off_the_intervals_is_logged_checkpointed_and_timed(tmp_path,
                                                                               monkeypatch):
  # Pre-training 5 steps, adversarial 4, logs, checkpoints and figures every 4: the phase's
  # end (5) and the run's (9) fall off every interval. Each step function's first call
  # compiles (100 s on the clock), other steps take 1 s.
  clock, make_steps, lines = _StepClock(), parallel.make_steps, []
  monkeypatch.setattr(summary, 'ProgressLogger', functools.partial(
      summary.ProgressLogger, clock=clock, log=lines.append))

  def make_timed_steps(*args, **kwargs):
    fns = make_steps(*args, **kwargs)
    return fns._replace(pretrain=clock.wrap(fns.pretrain),
                        adversarial=clock.wrap(fns.adversarial))

  monkeypatch.setattr(parallel, 'make_steps', make_timed_steps)
  # The discriminator's learning rate other than the VAE's, so that each is logged as its own.
  run = dict(BASE, pretrain_steps=5, adversarial_steps=4, log_every=4, image_every=4,
             **{'optimizer.disc_learning_rate': 2e-4})
  train(run, tmp_path)
  # The pre-trained model is a checkpoint of its own, and a log row of its own; so is the
  # run's last step (keep_checkpoints = 3 has removed the checkpoint of step 4).
  assert committed_steps(tmp_path) == [5, 8, 9]
  assert restore(tmp_path, step=5)[2]['phase'] == 'pretrain'
  metrics = read_metrics(tmp_path)
  assert sorted(metrics) == [4, 5, 8, 9]
  for s, m in metrics.items():
    assert m['learning_rate'] == default.get_config().optimizer.learning_rate == 1e-3
    adversarial = s > 5
    assert (set(DISC_KEYS) <= set(m)) if adversarial else not set(DISC_KEYS) & set(m), s
    assert m.get('disc_learning_rate') == (2e-4 if adversarial else None), s
    # Each phase's compiling step is left out of the rates: row 8 is steps 7-8 in 2 s.
    assert m['steps_per_s'] == 1.0, (s, m['steps_per_s'])
  # The last run's figures too, off image_every.
  assert sorted(p.name for p in (tmp_path / 'images').glob('reconstructions_*.png')) == [
      f'reconstructions_{s:07d}.png' for s in (4, 8, 9)]
  assert 'compiling the adversarial step ...' in lines
  # At the phase's end the ETA is the adversarial steps at trainer.ADVERSARIAL_STEP_COST
  # (2.2) pre-training steps each, and the compilation at ADVERSARIAL_COMPILE_COST (1.5)
  # times pre-training's 99 s beyond a step: 4 * 2.2 * 1 s + 1.5 * 99 s = 157.3 s.
  end = next(line for line in lines if line.startswith('step 5/9 '))
  assert '| ETA 0:02:37 |' in end, end


def test_training_figures_show_the_first_eval_images_and_half_a_grid_of_samples():
  config = make_config(dict(TINY, **{'eval.grid_size': 4}))
  vae, _ = steps.create_train_states(config, jax.random.PRNGKey(0), (16, 16, 3))
  source = data.load(config, 'eval')
  figures = trainer._training_figures(config, vae, source, jax.random.PRNGKey(1))
  cell = 16 + 1  # a pixel of padding around each cell
  # The first 4 eval images above their reconstructions: two rows of four.
  assert figures['reconstructions'].shape == (2 * cell + 1, 4 * cell + 1, 3)
  first = np.round(source.get(np.arange(1))[0] * 255)
  np.testing.assert_array_equal(figures['reconstructions'][1:1 + 16, 1:1 + 16], first)
  # 4 * 4 / 2 = 8 samples: a snapshot half the size of the evaluation's grid.
  assert figures['samples'].shape == (2 * cell + 1, 4 * cell + 1, 3)


def test_running_a_finished_workdir_again_continues_with_more_steps(reference, tmp_path,
                                                                   capsys):
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  train(dict(BASE, adversarial_steps=10), workdir)
  assert f'resuming from checkpoint at step {TOTAL}\n' in capsys.readouterr().out
  assert committed_steps(workdir)[-1] == TOTAL + 2
  assert read_metrics(workdir)[TOTAL + 2]['loss'] > 0
  # Unchanged step counts: nothing to train, the checkpoints stay as they were.
  shutil.copytree(reference[0], tmp_path / 'w2')
  train(BASE, tmp_path / 'w2')
  assert committed_steps(tmp_path / 'w2') == [12, 16, 20]
  assert_trees_equal(restore(tmp_path / 'w2')[1], reference[1])
  # Fewer steps than the checkpoint's (one is enough): refused, config.json left as it
  # was. It evaluated the step-20 model and recorded the smaller counts.
  saved = (tmp_path / 'w2' / 'config.json').read_text()
  # The message splits the count into its phases' and says how many steps continue the run.
  with pytest.raises(config_lib.ConfigError,
                     match=re.escape(f'at step {TOTAL}, past the {TOTAL - 1} steps this config '
                                     'trains (pretrain_steps 12 + adversarial_steps 7); give '
                                     f'at least {TOTAL} steps to continue the run')):
    train(dict(BASE, adversarial_steps=BASE['adversarial_steps'] - 1), tmp_path / 'w2')
  assert (tmp_path / 'w2' / 'config.json').read_text() == saved


def test_a_workdir_under_the_home_directory_is_expanded(reference, tmp_path, monkeypatch,
                                                        capsys):
  # '~/w' from Python, as train.py's --workdir=~/w: the run in the home directory, not a
  # new one in a folder named '~' under the current directory.
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.chdir(tmp_path)
  shutil.copytree(reference[0], tmp_path / 'home' / 'w')
  train(BASE, '~/w')
  assert f'resuming from checkpoint at step {TOTAL}\n' in capsys.readouterr().out
  assert committed_steps(tmp_path / 'home' / 'w') == [12, 16, 20]
  assert not (tmp_path / '~').exists()


def test_a_finished_run_is_not_trained_or_evaluated_again(reference, tmp_path, capsys):
  # The reference's evaluation was a no-op (no final_metrics.json), as if the run had
  # stopped during it: running again evaluates it.
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  results = train(BASE, workdir, evaluate=True)
  saved = json.loads((workdir / 'final_metrics.json').read_text())
  assert results['step'] == saved['step'] == TOTAL and 'rec_mse' in saved
  jsonl = (workdir / 'metrics.jsonl').read_text()
  assert jsonl.count('"eval/rec_mse"') == 1
  events = sorted(p.name for p in workdir.glob('events.out.tfevents.*'))
  config_json = (workdir / 'config.json').read_text()
  capsys.readouterr()

  def evaluated_again(*args, **kwargs):
    raise AssertionError('a finished run was evaluated again')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, 'final_evaluation', evaluated_again)
    # Another evaluation setting and loss weight: config.json stays the one the metrics
    # were computed with, and the settings not applied are named.
    again = trainer.train_and_evaluate(
        make_config(dict(BASE, **{'eval.num_images': 16, 'loss.kl_weight': 2.0})),
        str(workdir))
  assert again == saved and (workdir / 'config.json').read_text() == config_json
  out, err = capsys.readouterr()
  assert (f'the run is finished: {workdir / "final_metrics.json"} holds its final metrics '
          f'at step {TOTAL} (eval.py evaluates it again)\n') in out
  assert ("warning: settings changed since config.json was written, not applied (the run "
          "is finished; its metrics are of config.json's): ") in err
  assert 'eval.num_images 32 -> 16' in err and 'loss.kl_weight 1.0 -> 2.0' in err
  assert 'resuming' not in out
  # Nothing logged twice, no new event file, the checkpoints as they were.
  assert (workdir / 'metrics.jsonl').read_text() == jsonl
  assert sorted(p.name for p in workdir.glob('events.out.tfevents.*')) == events
  assert committed_steps(workdir) == [12, 16, 20]


def test_final_metrics_of_another_step_are_not_this_runs(reference, tmp_path, monkeypatch):
  # A run continued with more steps and stopped in its final evaluation holds the final
  # metrics of its earlier end: the model at the checkpoint is evaluated, not skipped.
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  (workdir / 'final_metrics.json').write_text(json.dumps({'step': TOTAL - 8, 'rec_mse': 0.5}))
  evaluated = []
  monkeypatch.setattr(trainer, 'final_evaluation',
                      lambda *args, step: evaluated.append(step) or {'step': step})
  assert trainer.train_and_evaluate(make_config(BASE), str(workdir)) == {'step': TOTAL}
  assert evaluated == [TOTAL]


def test_a_finished_calibrated_run_run_again_names_only_real_changes(tmp_path, capsys):
  # Its config.json holds the calibrated λ's: compared with the w_i = 1 they came from,
  # the same command named every reconstruction weight as a setting changed.
  run = dict(TINY, **{'variant': 'vae_s', 'calibrate.enabled': True, 'calibrate.batches': 2,
                      'pretrain_steps': 2, 'adversarial_steps': 0, 'log_every': 1})
  train(run, tmp_path / 'w', evaluate=True)
  assert 'calibrated reconstruction weights: ' in capsys.readouterr().out
  train(run, tmp_path / 'w')
  out, err = capsys.readouterr()
  assert 'the run is finished: ' in out and err == ''
  train(dict(run, **{'loss.kl_weight': 2.0}), tmp_path / 'w')
  err = capsys.readouterr().err
  assert err.startswith('warning: settings changed since config.json was written, not '
                        "applied (the run is finished; its metrics are of config.json's): "
                        'loss.kl_weight 1.0 -> 2.0'), err
  assert 'loss.weights' not in err
  # Another w_i is a real change: named, as the λ it would have given.
  train(dict(run, **{'loss.weights.sobel': 2.0}), tmp_path / 'w')
  err = capsys.readouterr().err
  assert 'loss.weights.sobel' in err and 'loss.weights.mae' not in err, err


def test_a_run_with_checkpoints_refuses_another_seed(reference, tmp_path):
  # Finished or not: a loop over seeds with one workdir got the first seed's metrics back,
  # and a resumed run went on under the new seed, recorded as a run of it alone.
  for name, last in (('finished', TOTAL), ('unfinished', 12)):
    workdir = tmp_path / name
    shutil.copytree(reference[0], workdir)
    for step in committed_steps(workdir):
      if step > last:
        shutil.rmtree(workdir / 'checkpoints' / str(step))
    assert committed_steps(workdir)[-1] == last
    config_json = (workdir / 'config.json').read_text()
    with pytest.raises(config_lib.ConfigError,
                       match=re.escape(f'the checkpoints in {workdir} are of a run with '
                                       'seed 0, not 7: another seed is another run; use a '
                                       'new workdir, or seed 0 to continue this one')):
      train(dict(BASE, seed=7), workdir)
    assert (workdir / 'config.json').read_text() == config_json
    assert committed_steps(workdir)[-1] == last


def test_a_restart_removes_the_temporary_files_of_a_killed_write(reference, tmp_path, capsys):
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  dead = processes.dead_pid()
  before = sorted(str(p) for p in workdir.rglob('*'))
  left = [processes.temporary_of(workdir / name, dead)
          for name in ('config.json', os.path.join('images', 'samples.png'))]
  for path in left:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.write('{"half": ')
  capsys.readouterr()
  train(BASE, workdir)
  assert (f'removed 2 temporary file(s) of a killed write in {workdir}\n'
          in capsys.readouterr().out)
  assert not any(os.path.exists(p) for p in left)
  assert set(before) <= {str(p) for p in workdir.rglob('*')}


def test_gating_thresholds_with_a_dead_band_are_warned_about(reference, tmp_path, capsys):
  # A finished workdir: the run only sets up, so no step is compiled.
  for name, gating, warned in (('paper', {}, False),
                               ('band', {'gating.train_disc_below': 0.4,
                                         'gating.train_vae_above': 0.6}, True)):
    shutil.copytree(reference[0], tmp_path / name)
    train(dict(BASE, **gating), tmp_path / name)
    err = capsys.readouterr().err
    assert ('warning: at a discriminator accuracy in [0.4, 0.6] neither gated update runs'
            in err) == warned, err


def test_missing_fid_weights_are_warned_about_before_training(reference, tmp_path, capsys):
  # They were found missing by the final evaluation, after the whole training run.
  shutil.copytree(reference[0], tmp_path / 'w')
  train(BASE, tmp_path / 'w')  # eval.fid off
  assert 'FID' not in capsys.readouterr().err
  missing = tmp_path / 'inception.npz'
  train(dict(BASE, **{'eval.fid': True, 'eval.inception_weights': str(missing)}),
        tmp_path / 'w')
  # How to write that file (`inception fetch` writes the cache's, which is not read).
  assert ('warning: the final evaluation will skip FID (eval.py can add it later): FID '
          f'Inception weights not found: {missing}\nWrite them there with\n'
          f'  python -m avae_jax.inception convert SRC {missing}\n'
          in capsys.readouterr().err)
  # A directory named instead of the file: said too, with the file's name in it.
  train(dict(BASE, **{'eval.fid': True, 'eval.inception_weights': str(tmp_path)}),
        tmp_path / 'w')
  assert ('warning: the final evaluation will skip FID (eval.py can add it later): FID '
          f'Inception weights: {tmp_path} is a directory; name the weights file, e.g. '
          f'{tmp_path / "inception_fid.npz"}, which `python -m avae_jax.inception fetch '
          f'--cache {tmp_path}` writes\n' in capsys.readouterr().err)


def test_fields_no_code_reads_are_warned_about_before_training(reference, tmp_path, capsys,
                                                              monkeypatch):
  # A misspelt field of a config file was kept without a word, the one it meant unchanged.
  shutil.copytree(reference[0], tmp_path / 'w')
  train(BASE, tmp_path / 'w')  # the configs' own fields: nothing to say
  err = capsys.readouterr().err
  assert 'no code reads' not in err and 'does not use' not in err
  config = make_config(BASE)
  config.model.latent_dims = 16
  config.my_scale = 2.0
  # And fields that shapes does not use, set as if they applied (eval_fraction as default).
  config.crop_size, config.eval_split = 20, 'validation'
  monkeypatch.setattr(trainer, 'final_evaluation', lambda *args, **kwargs: {})
  trainer.train_and_evaluate(config, str(tmp_path / 'w'))
  err = capsys.readouterr().err
  assert ('warning: no code reads the config field(s) model.latent_dims (model.latent_dim?), '
          'my_scale; a misspelt field leaves the one it meant at its value\n' in err)
  assert ("warning: dataset 'shapes' does not use crop_size=20, eval_split='validation' (it "
          'has no splits and nothing to crop)\n' in err)


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
  # As on a read-only file system (root ignores permission bits, so the test stands in
  # for the kernel's answer); the lock file would fail with a traceback.
  workdir = tmp_path / 'w'
  workdir.mkdir()
  real = os.access
  monkeypatch.setattr(trainer.os, 'access',
                      lambda p, mode: False if os.fspath(p) == str(workdir) else real(p, mode))
  with pytest.raises(config_lib.ConfigError, match='cannot write to the workdir .*read-only'):
    train(BASE, workdir)
  assert os.listdir(workdir) == []


def test_checkpoints_of_another_model_are_refused(reference, tmp_path):
  # Another variant: same array shapes, told apart by the config fingerprint.
  workdir = tmp_path / 'w'
  shutil.copytree(reference[0], workdir)
  with pytest.raises(config_lib.ConfigError,
                     match=r"written by another model \(variant: workdir 'avae_s', config "
                           r"'vae_s'\); use a new workdir$"):
    train(dict(BASE, variant='vae_s'), workdir)
  assert committed_steps(workdir) == [12, 16, 20]
  # Another width, named from config.json (it was a line of the arrays' paths and shapes).
  with pytest.raises(config_lib.ConfigError,
                     match=r'another model \(model.hidden_dim: workdir 8, config 16\); use a '
                           r'new workdir$'):
    train(dict(BASE, **{'model.hidden_dim': 16}), workdir)
  assert committed_steps(workdir) == [12, 16, 20]
  # Another width: a checkpoint of hidden_dim 16 (zeros of its shapes, saved directly).
  wider = dict(BASE, **{'model.hidden_dim': 16})
  config = make_config(wider)
  shapes = jax.eval_shape(lambda k: steps.state_tree(*steps.create_train_states(
      config, k, (16, 16, 3))), jax.random.PRNGKey(0))
  with checkpoint.Checkpointer(tmp_path / 'other' / 'checkpoints', keep=None) as ckpt:
    ckpt.save(4, jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes),
              {'step': 4, 'phase': 'pretrain', 'seed': 0,
               'config_hash': config_lib.layout_hash(config)})
  # Without a config.json, the restore's reason.
  with pytest.raises(config_lib.ConfigError,
                     match='written by another model .variant/image size/widths differ; '
                           '.*does not match'):
    train(BASE, tmp_path / 'other')
  assert committed_steps(tmp_path / 'other') == [4]


# ------------------------------------------------------------------ devices


@pytest.mark.parametrize('overrides', [{'num_devices': 1}, {'parallel': 'shard_map'}],
                         ids=['1 device pmap', '4 devices shard_map'])
def test_device_count_and_mapping_give_the_same_losses(reference, tmp_path, overrides):
  assert len(jax.local_devices()) == 4  # the reference ran on 4 (conftest)
  train(dict(BASE, **overrides), tmp_path)
  ref, got = reference[2], read_metrics(tmp_path)
  assert sorted(got) == sorted(ref) == list(range(1, TOTAL + 1))
  for s in ref:
    # Sums over devices round differently with 1 and with 4 devices. Pre-training keeps
    # the losses within 1.2e-5 of each other; the adversarial steps (a fresh
    # discriminator, Adam, 8 images) grow the difference about threefold per step
    # (measured: 4e-6 at step 15, 8e-4 at step 20). The gating decisions must agree.
    rtol = 1e-4 if s <= 12 else 5e-3
    for k in LOSS_KEYS + (DISC_KEYS if s > 12 else ()):
      if k in ('disc_updated', 'vae_updated'):
        assert got[s][k] == ref[s][k], f'{k} at step {s}'
      np.testing.assert_allclose(got[s][k], ref[s][k], rtol=rtol, atol=1e-6,
                                 err_msg=f'{k} at step {s}')


# ------------------------------------------------------------------ NaN


def open_files_under(directory) -> list[str]:
  """The files under `directory` that this process holds open (from /proc/self/fd)."""
  prefix = os.path.realpath(directory) + os.sep
  held = []
  for fd in os.listdir('/proc/self/fd'):
    try:
      target = os.readlink(os.path.join('/proc/self/fd', fd))
    except OSError:  # the descriptor listing the directory itself, closed by now
      continue
    if target.startswith(prefix):
      held.append(target)
  return held


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  overrides = dict(TINY, **{'optimizer.learning_rate': 1e30, 'pretrain_steps': 6,
                            'adversarial_steps': 0, 'checkpoint_every': 1, 'log_every': 1})
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'non-finite (\w+) = (nan|inf|-inf) at step 1;') as err:
    train(overrides, tmp_path)
  term = str(err.value).split('non-finite ')[1].split(' = ')[0]
  assert term in LOSS_KEYS
  # The run let go of its files (metrics.jsonl, the event file, the checkpoints').
  assert not open_files_under(tmp_path)
  # Step 0's losses were finite and logged; the state after it was checkpointed, intact.
  metrics = read_metrics(tmp_path)
  assert sorted(metrics) == [1] and all(np.isfinite(metrics[1][k]) for k in LOSS_KEYS)
  assert committed_steps(tmp_path) == [1]
  step, tree, meta = restore(tmp_path, overrides)
  assert step == 1 and meta['phase'] == 'pretrain'
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


def test_a_non_finite_loss_between_logs_is_caught_before_the_checkpoint(tmp_path):
  # Logs every 6 steps, checkpoints every step: the save after step 1's non-finite loss
  # checks the losses since the last log before the state (whose update may be finite).
  overrides = dict(TINY, **{'optimizer.learning_rate': 1e30, 'pretrain_steps': 6,
                            'adversarial_steps': 0, 'checkpoint_every': 1, 'log_every': 6})
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'non-finite \w+ = (nan|inf|-inf) at step 1; .*last checkpoint'):
    train(overrides, tmp_path)
  assert committed_steps(tmp_path) == [1]


@pytest.mark.parametrize('resumed', [False, True], ids=['fresh', 'resumed'])
def test_a_non_finite_update_after_finite_losses_is_not_checkpointed(tmp_path, monkeypatch,
                                                                     resumed):
  # A NaN gradient under finite losses (here injected into the fourth step's update):
  # the checkpoint due after that step would have held NaN parameters and replaced the
  # good one; the next step's NaN loss then said "the last checkpoint is kept". Resumed:
  # the first two steps are a run of their own, whose checkpoint the message names.
  overrides = dict(TINY, **{'pretrain_steps': 6, 'adversarial_steps': 0,
                            'checkpoint_every': 2, 'log_every': 1})
  if resumed:
    train(dict(overrides, pretrain_steps=2), tmp_path)
  real = parallel.make_steps

  def make_steps(cfg, devices, method='pmap'):
    fns = real(cfg, devices, method)
    calls = []

    def pretrain(state, batch, key):
      state, metrics = fns.pretrain(state, batch, key)
      calls.append(None)
      if len(calls) == (2 if resumed else 4):
        state = state.replace(params=jax.tree.map(lambda x: x * np.nan, state.params))
      return state, metrics
    return fns._replace(pretrain=pretrain)

  monkeypatch.setattr(parallel, 'make_steps', make_steps)
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"non-finite values in \['vae'\]\['params'\].* after the update "
                           r'of step 3, whose losses were finite.*the last checkpoint '
                           r'\(step 2\) is kept'):
    train(overrides, tmp_path)
  assert committed_steps(tmp_path) == [2]
  assert sorted(read_metrics(tmp_path)) == [1, 2, 3, 4]  # the four steps' finite losses
  step, tree, _ = restore(tmp_path, overrides)
  assert step == 2 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))
  assert not open_files_under(tmp_path)


def test_a_non_finite_state_names_the_checkpoint_kept_or_that_there_is_none():
  """The NaN-state message says which checkpoint the run keeps: none before its first
  save, the initial model's by its step 0 (not as none)."""
  tree = {'vae': {'params': {'w': np.array([1.0, np.nan], np.float32)},
                  'step': np.array(3, np.int32)}}
  with pytest.raises(trainer.NonFiniteLossError,
                     match=re.escape("non-finite values in ['vae']['params']['w'] after the "
                                     'update of step 2, whose losses were finite') +
                     '.*this state is not checkpointed and no checkpoint is written\\. '):
    trainer._check_finite_state(tree, 3, None)
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'not checkpointed and the last checkpoint \(step 0\) is kept\. '):
    trainer._check_finite_state(tree, 3, 0)
  # A finite state (an integer step counter beside it) passes.
  trainer._check_finite_state({'w': np.ones(2, np.float32), 'step': np.array(3)}, 3, None)


def test_an_unreadable_image_keeps_the_steps_done_and_the_resume_is_identical(
    reference, tmp_path, monkeypatch, capsys):
  # The sixth batch cannot be read (as a truncated image file would fail): the five
  # steps done (one since the checkpoint of step 4) are checkpointed before the error,
  # and once the file is readable again the resumed run ends bit-identical to the
  # uninterrupted one.
  real_batches = data.batches

  def failing_batches(*args, **kwargs):
    for t, batch in enumerate(real_batches(*args, **kwargs), kwargs['start_step']):
      if t == 5:
        raise data.DataError('cannot read image img005.png: image file is truncated')
      yield batch

  monkeypatch.setattr(data, 'batches', failing_batches)
  with pytest.raises(data.DataError, match='truncated'):
    train(BASE, tmp_path)
  assert 'data error at step 5: the checkpoint of step 5 is saved' in capsys.readouterr().err
  assert committed_steps(tmp_path) == [4, 5]
  assert not open_files_under(tmp_path)
  monkeypatch.setattr(data, 'batches', real_batches)
  train(BASE, tmp_path)
  step, tree, _ = restore(tmp_path)
  assert step == TOTAL
  assert_trees_equal(tree, reference[1])


@pytest.mark.parametrize('saved,now,message', [
    ({'cpu_threads': 2}, None, 'written on the CPU and this process computes on a GPU/TPU'),
    ({'cpu_threads': None}, 2, 'written on a GPU/TPU and this process computes on the CPU'),
    ({'cpu_threads': 2}, 3, 'written with 2 XLA:CPU thread(s) and this process has 3'),
    ({'cpu_threads': None}, None, None), ({'cpu_threads': 2}, 2, None),
    ({}, None, None), ({}, 2, None)])  # {}: a checkpoint of a version before the count
def test_a_resume_on_another_backend_or_thread_count_warns(capsys, saved, now, message):
  config = ml_collections.ConfigDict({'dataset': 'shapes'})
  trainer._warn_of_a_changed_run(config, dict(saved, train_examples=8), 8, now,
                                 layout=[1, 1])
  err = capsys.readouterr().err
  assert (message in err and 'not bit-identical' in err) if message else err == '', err


@pytest.mark.parametrize('saved,now,warned', [
    ([1, 2], [1, 1], True), ([1, 1], [1, 4], True), ([1, 4], [2, 2], True),
    # Another process count alone (2 devices each): 2 and 4 devices in all.
    ([1, 2], [2, 2], True),
    ([2, 2], [2, 2], False), (None, [1, 2], False)])  # None: before the layout was recorded
def test_a_resume_on_other_devices_warns(capsys, saved, now, warned):
  # With the same thread count (or on a GPU) it was silent, though the run then differs;
  # 1 process x 4 devices and 2 x 2 average in another order too.
  config = ml_collections.ConfigDict({'dataset': 'shapes'})
  meta = {'cpu_threads': 2, 'train_examples': 8}
  if saved is not None:
    meta['devices'] = saved
  trainer._warn_of_a_changed_run(config, meta, 8, 2, layout=now)
  err = capsys.readouterr().err
  expected = (f'warning: the checkpoint was written by {saved[0]} process(es) x {saved[1]} '
              f'device(s) and this run has {now[0]} process(es) x {now[1]} device(s): the '
              'steps from here on are not bit-identical') if saved else None
  assert (expected in err) if warned else err == '', err


def test_a_resume_on_a_dataset_of_another_size_warns(tmp_path, capsys, monkeypatch):
  # Files added to an arrays: or folder: dataset between the stop and the resume change
  # every epoch's order and the held-out eval rows: not silent.
  images = np.random.default_rng(0).integers(0, 256, (80, 16, 16, 3), np.uint8)
  np.save(tmp_path / 'x.npy', images[:64])
  # Given relative to the current directory, recorded absolute: eval.py and api.load read
  # config.json from any directory.
  monkeypatch.chdir(tmp_path)
  run = dict(TINY, dataset='arrays:x.npy', eval_fraction=0.25,
             pretrain_steps=1, adversarial_steps=0, log_every=1)
  train(run, tmp_path / 'w')
  saved = json.loads((tmp_path / 'w' / 'config.json').read_text())
  assert saved['dataset'] == f'arrays:{tmp_path / "x.npy"}'
  assert restore(tmp_path / 'w', run)[2]['train_examples'] == 48
  train(dict(run, pretrain_steps=2), tmp_path / 'w')
  err = capsys.readouterr().err
  # The same relative path again is no change of settings.
  assert 'training examples' not in err and 'arrays:x.npy' not in err, err
  np.save(tmp_path / 'x.npy', images)
  train(dict(run, pretrain_steps=3), tmp_path / 'w')
  assert ('warning: the checkpoint was written with 48 training examples and '
          f'arrays:{tmp_path / "x.npy"} now has 60: the data order') in capsys.readouterr().err


def test_a_resume_on_a_dataset_that_shrank_warns_too(capsys):
  """Files removed between the stop and the resume change the data order as files added
  do: any other training-example count warns, a smaller one too."""
  config = ml_collections.ConfigDict({'dataset': 'arrays:/data/x.npy'})
  meta = {'cpu_threads': 2, 'devices': [1, 1], 'train_examples': 60}
  trainer._warn_of_a_changed_run(config, meta, 48, 2, layout=[1, 1])
  assert ('warning: the checkpoint was written with 60 training examples and '
          'arrays:/data/x.npy now has 48: the data order') in capsys.readouterr().err
  for now in (60, 64):
    trainer._warn_of_a_changed_run(config, dict(meta, train_examples=now), now, 2,
                                   layout=[1, 1])
    assert capsys.readouterr().err == ''
  trainer._warn_of_a_changed_run(config, dict(meta, train_examples=60), 64, 2, layout=[1, 1])
  assert 'written with 60 training examples' in capsys.readouterr().err


def test_a_run_failing_before_its_first_step_closes_its_checkpointer(tmp_path, monkeypatch):
  closed = []
  real_close = checkpoint.Checkpointer.close

  def close(self):
    closed.append(self)
    real_close(self)

  def make_steps(*args, **kwargs):
    raise RuntimeError('no steps today')

  monkeypatch.setattr(checkpoint.Checkpointer, 'close', close)
  monkeypatch.setattr(parallel, 'make_steps', make_steps)
  with pytest.raises(RuntimeError, match='no steps today'):
    train(TINY, tmp_path)
  assert closed, 'the checkpointer was left open'
  assert not open_files_under(tmp_path)


# ------------------------------------------------------------------ calibration


# A Gabor bank of its own (not the default's), which the probe and the run must both use.
CALIBRATE = dict(TINY, **{'variant': 'vae_s', 'pretrain_steps': 2, 'adversarial_steps': 0,
                          'calibrate.enabled': True, 'calibrate.batches': 3,
                          'log_every': 1, 'checkpoint_every': 2, 'image_every': 10,
                          'gabor.size': 7, 'gabor.sigma': 1.5, 'gabor.wavelengths': (3.0,),
                          'gabor.orientations': 2})


class _StepCalls(NamedTuple):
  """One make_steps call seen by _spy_on_steps, and what its step functions were given."""
  cfg: steps.StepConfig
  metrics: list[dict[str, Any]]  # of each pretrain call
  keys: list[np.ndarray]  # of each pretrain or adversarial call, in order
  batches: list[np.ndarray]  # of each pretrain call, (global batch, H, W, C) on the host


def _spy_on_steps(monkeypatch) -> list[_StepCalls]:
  """Records every make_steps call, with the metrics, keys and batches of its steps' calls."""
  calls = []
  real = parallel.make_steps

  def spy(cfg, devices, method='pmap'):
    fns = real(cfg, devices, method)
    record = _StepCalls(cfg, [], [], [])
    calls.append(record)

    def pretrain(state, batch, key):
      record.keys.append(np.asarray(key))
      record.batches.append(np.asarray(batch).reshape((-1,) + tuple(batch.shape[-3:])))
      state, metrics = fns.pretrain(state, batch, key)
      record.metrics.append(jax.device_get(metrics))
      return state, metrics

    def adversarial(vae, disc, batch, key):
      record.keys.append(np.asarray(key))
      return fns.adversarial(vae, disc, batch, key)
    return fns._replace(pretrain=pretrain, adversarial=adversarial)
  monkeypatch.setattr(parallel, 'make_steps', spy)
  return calls


def _folded_keys(seed: int, use: int, count: int) -> list[np.ndarray]:
  """fold_in(k, i) for i < count, k the use-th of the four keys split from PRNGKey(seed).

  The derivation the README states (init, train, calibration, figures), written out here
  rather than taken from the trainer.
  """
  key = jax.random.split(jax.random.PRNGKey(seed), 4)[use]
  return [np.asarray(jax.random.fold_in(key, i)) for i in range(count)]


def test_calibration_equalises_the_probed_terms(tmp_path, monkeypatch, capsys):
  calls = _spy_on_steps(monkeypatch)
  logged = []
  monkeypatch.setattr(trainer.logging, 'info',
                      lambda msg, *args: logged.append(msg % args if args else str(msg)))
  train(CALIBRATE, tmp_path)
  out = capsys.readouterr().out
  # The probe steps have progress lines of their own (CelebA's take minutes).
  probe_lines = [line for line in logged if line.startswith('calibration: ')]
  assert probe_lines[0] == 'calibration: compiling the probe step ...'
  assert probe_lines[-1].startswith('calibration: step 3/3 (100.0%) | ')
  (probe_cfg, probed, probe_keys, probe_batches), (train_cfg, _, train_keys, _) = calls
  # The probe's step i draws from fold_in(calibration key, i), the run's from the train
  # key: the probe changes none of the run's randomness.
  np.testing.assert_array_equal(probe_keys, _folded_keys(0, 2, 3))
  np.testing.assert_array_equal(train_keys, _folded_keys(0, 1, 2))
  assert probe_cfg.dataset_size == train_cfg.dataset_size == 256
  # Its batches are those of seed 0 + 7919 (RunKeys' documented offset): not the run's.
  source = data.load(make_config(CALIBRATE), 'train')
  for t, batch in enumerate(probe_batches):
    np.testing.assert_array_equal(batch, source.get(data.batch_indices(256, 8, 7919, t)))
  bank = losses.GaborSpec(size=7, sigma=1.5, wavelengths=(3.0,), orientations=2)
  assert probe_cfg.gabor == train_cfg.gabor == bank
  terms = ('mae', 'mse', 'dssim', 'sobel', 'gabor')
  # The probe: every term at weight 1, calibrate.batches steps.
  assert dict(probe_cfg.recon_weights) == {t: 1.0 for t in terms}
  assert len(probed) == 3
  means = {t: np.mean([float(m[t]) for m in probed]) for t in terms}

  with open(tmp_path / 'calibration.json') as f:
    saved = json.load(f)
  weights = saved['weights']
  assert saved['batches'] == 3 and sorted(weights) == sorted(terms)
  assert weights['mse'] == 1.0 and all(w > 0 for w in weights.values())
  # Every weighted term has MSE's mean over the probe (the paper's "same scale").
  for t in terms:
    np.testing.assert_allclose(weights[t] * means[t], means['mse'], rtol=1e-6)
  # The training uses them; config.json records them; the line says them.
  assert dict(train_cfg.recon_weights) == weights
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['loss']['weights'] == weights
  line = [s for s in out.splitlines() if s.startswith('calibrated reconstruction weights: ')]
  assert len(line) == 1
  for t in terms:
    assert f'{t}={weights[t]:.4g}' in line[0]

  # The run is the run with those weights set by hand: the probe left the initial
  # state, the data order and the keys untouched.
  by_hand = {f'loss.weights.{t}': weights[t] for t in terms}
  train(dict(CALIBRATE, **by_hand, **{'calibrate.enabled': False}), tmp_path / 'by_hand')
  assert_trees_equal(restore(tmp_path / 'by_hand', CALIBRATE)[1],
                     restore(tmp_path, CALIBRATE)[1])
  # That run started without calibration: switching it on when resuming would probe the
  # trained state and change the objective halfway.
  with pytest.raises(config_lib.ConfigError, match='started without the loss-weight '
                     r'calibration.*calibrate\.enabled=False'):
    train(dict(CALIBRATE, **by_hand, pretrain_steps=3), tmp_path / 'by_hand')
  assert not os.path.exists(tmp_path / 'by_hand' / 'calibration.json')

  # Resuming reuses calibration.json instead of probing again, and names what changed.
  del calls[:]
  train(dict(CALIBRATE, pretrain_steps=3), tmp_path)
  assert len(calls) == 1 and dict(calls[0].cfg.recon_weights) == weights
  out, err = capsys.readouterr()
  assert 'calibrated reconstruction weights: ' in out
  # The probe length is unchanged (3 batches): no note that the run keeps its probe.
  assert 'calibration probe' not in err, err
  changed = [s for s in out.splitlines() if s.startswith('resuming with settings changed')]
  assert len(changed) == 1 and changed[0].endswith(': pretrain_steps 2 -> 3')
  # Switching the calibration off on resume changes the objective: said, not silent.
  train(dict(CALIBRATE, pretrain_steps=4, **{'calibrate.enabled': False}), tmp_path)
  changed = [s for s in capsys.readouterr().out.splitlines()
             if s.startswith('resuming with settings changed')]
  assert len(changed) == 1
  assert 'calibrate.enabled True -> False' in changed[0]
  assert f"loss.weights.sobel {weights['sobel']!r} -> 1.0" in changed[0]

  # The configured weights multiply the calibrated ones (0 keeps a term off). The probe
  # starts from the same state and data, so it measures the same means.
  multiplied = {'loss.weights.sobel': 2.0, 'loss.weights.gabor': 0.0, 'pretrain_steps': 0}
  train(dict(CALIBRATE, **multiplied), tmp_path / 'multiplied')
  with open(tmp_path / 'multiplied' / 'calibration.json') as f:
    scaled = json.load(f)['weights']
  assert scaled['gabor'] == 0.0
  np.testing.assert_allclose(scaled['sobel'], 2.0 * weights['sobel'], rtol=1e-6)
  for t in ('mae', 'mse', 'dssim'):
    np.testing.assert_allclose(scaled[t], weights[t], rtol=1e-6)


def test_a_non_finite_calibration_probe_says_so_and_checkpoints_nothing(tmp_path):
  # The probe's step 1 was reported as the run's step 1, "the last checkpoint (written
  # before this step) is kept", where no step had been trained.
  overrides = dict(CALIBRATE, **{'optimizer.learning_rate': 1e30})
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'at probe step 1 of the loss-weight calibration .*nothing is '
                           r'checkpointed'):
    train(overrides, tmp_path)
  assert committed_steps(tmp_path) == []
  assert not os.path.exists(tmp_path / 'calibration.json')


def test_calibration_follows_changed_weights_and_new_runs_probe_again(tmp_path, monkeypatch,
                                                                     capsys):
  calls = _spy_on_steps(monkeypatch)
  terms = ('mae', 'mse', 'dssim', 'sobel', 'gabor')
  train(CALIBRATE, tmp_path / 'w')
  with open(tmp_path / 'w' / 'calibration.json') as f:
    saved = json.load(f)
  probed = calls[0].metrics
  for t in terms:  # the probe's means are kept, beside the weights made of them
    np.testing.assert_allclose(saved['means'][t], np.mean([float(m[t]) for m in probed]),
                               rtol=1e-12)

  # Resumed with other configured weights: the same probe, the new w_i, and said so.
  del calls[:]
  capsys.readouterr()
  changed_weights = {'loss.weights.gabor': 0.0, 'loss.weights.sobel': 2.0}
  train(dict(CALIBRATE, pretrain_steps=3, **changed_weights), tmp_path / 'w')
  assert len(calls) == 1  # no second probe
  used = dict(calls[0].cfg.recon_weights)
  assert 'gabor' not in used  # a term at weight 0 is not computed
  np.testing.assert_allclose(used['sobel'], 2.0 * saved['weights']['sobel'], rtol=1e-12)
  for t in ('mae', 'mse', 'dssim'):
    assert used[t] == saved['weights'][t]
  out, err = capsys.readouterr()
  # A record with its means applies the new weights: no warning that they are not applied.
  assert 'not applied' not in err, err
  changed = [s for s in out.splitlines() if s.startswith('resuming with settings changed')]
  assert len(changed) == 1
  assert f"loss.weights.gabor {saved['weights']['gabor']!r} -> 0.0" in changed[0]
  assert 'loss.weights.sobel' in changed[0]
  with open(tmp_path / 'w' / 'calibration.json') as f:
    assert json.load(f)['weights'] == dict(used, gabor=0.0)
  # Resumed with another probe length: the recorded probe stays, and config.json says so
  # (it recorded the new count beside weights from the old probe).
  del calls[:]
  train(dict(CALIBRATE, pretrain_steps=4, **changed_weights, **{'calibrate.batches': 7}),
        tmp_path / 'w')
  assert len(calls) == 1
  assert 'keeps its calibration probe of 3 batches' in capsys.readouterr().err
  with open(tmp_path / 'w' / 'config.json') as f:
    assert json.load(f)['calibrate']['batches'] == 3
  with open(tmp_path / 'w' / 'calibration.json') as f:
    assert json.load(f)['batches'] == 3

  # A calibration.json without checkpoints (its run stopped before the first one, perhaps
  # with other settings) is not trusted: a new run probes again.
  stale = {'batches': 99, 'weights': {t: 5.0 for t in terms},
           'means': {t: 1.0 for t in terms}}
  os.makedirs(tmp_path / 'stale')
  with open(tmp_path / 'stale' / 'calibration.json', 'w') as f:
    json.dump(stale, f)
  del calls[:]
  train(CALIBRATE, tmp_path / 'stale')
  assert len(calls) == 2 and dict(calls[1].cfg.recon_weights) == saved['weights']
  # A new uncalibrated run removes it: resuming that run with calibration on is refused.
  os.makedirs(tmp_path / 'off')
  with open(tmp_path / 'off' / 'calibration.json', 'w') as f:
    json.dump(stale, f)
  train(dict(CALIBRATE, **{'calibrate.enabled': False}), tmp_path / 'off')
  assert not os.path.exists(tmp_path / 'off' / 'calibration.json')
  with pytest.raises(config_lib.ConfigError, match='started without the loss-weight'):
    train(dict(CALIBRATE, pretrain_steps=3), tmp_path / 'off')

  # A calibration.json of an earlier version (weights, no means): its weights stand, and
  # the configured weights that cannot be applied are warned about.
  shutil.copytree(tmp_path / 'stale', tmp_path / 'old')
  with open(tmp_path / 'old' / 'calibration.json') as f:
    old = json.load(f)
  del old['means']
  with open(tmp_path / 'old' / 'calibration.json', 'w') as f:
    json.dump(old, f)
  del calls[:]
  capsys.readouterr()
  train(dict(CALIBRATE, pretrain_steps=3, **changed_weights), tmp_path / 'old')
  assert dict(calls[0].cfg.recon_weights) == old['weights']
  assert 'changed loss.weights.* are not applied' in capsys.readouterr().err


def test_calibration_is_skipped_for_the_mse_only_variants(tmp_path, monkeypatch):
  calls = _spy_on_steps(monkeypatch)
  train(dict(CALIBRATE, variant='vae', pretrain_steps=1), tmp_path)
  assert not os.path.exists(tmp_path / 'calibration.json')
  assert [dict(c.cfg.recon_weights) for c in calls] == [{'mse': 1.0}]


# ------------------------------------------------------------------ variants


# 'vae' and 'avae' pre-train with the same step (MSE alone, no TC): one compilation.
MSE_ONLY = dict(TINY, **{'log_every': 1, 'checkpoint_every': 5})


def test_vae_has_no_adversarial_phase(tmp_path):
  overrides = dict(MSE_ONLY, variant='vae', pretrain_steps=3, adversarial_steps=5)
  train(overrides, tmp_path)
  metrics = read_metrics(tmp_path)
  assert sorted(metrics) == [1, 2, 3]  # adversarial_steps is ignored
  for m in metrics.values():
    assert not set(DISC_KEYS) & set(m)
    assert not {'mae', 'dssim', 'sobel', 'gabor', 'tc'} & set(m)  # MSE alone, no TC
    assert np.isfinite(m['mse']) and np.isfinite(m['kl'])
  step, tree, meta = restore(tmp_path, overrides)
  assert (step, meta['phase']) == (3, 'pretrain')
  assert int(tree['vae']['step']) == 3 and int(tree['disc']['step']) == 0


def test_avae_on_mock_tfds_mnist_logs_the_discriminator(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setenv('AVAE_JAX_CACHE', str(tmp_path / 'decoded'))  # decoded here, not ~
  # tfds 'mnist' through the real pipeline (decode, gray to RGB, resize 28 -> 16).
  overrides = dict(MSE_ONLY, variant='avae', dataset='mnist', data_dir=str(tmp_path),
                   pretrain_steps=2, adversarial_steps=3)
  with tfds.testing.mock_data(num_examples=256):
    train(overrides, tmp_path / 'w')
  with open(tmp_path / 'w' / 'config.json') as f:
    assert json.load(f)['dataset'] == 'mnist'
  metrics = read_metrics(tmp_path / 'w')
  assert sorted(metrics) == [1, 2, 3, 4, 5]
  for s, m in metrics.items():
    assert set(DISC_KEYS) <= set(m) if s > 2 else not set(DISC_KEYS) & set(m)
    assert 'mse' in m and not {'mae', 'dssim', 'sobel', 'gabor', 'tc'} & set(m)
  for s in (3, 4, 5):
    # The share right of 8 real and 8 generated images, and Algorithm 1's gate on it.
    m = metrics[s]
    assert m['disc_accuracy'] * 16 == pytest.approx(round(m['disc_accuracy'] * 16)), m
    assert m['disc_updated'] == float(m['disc_accuracy'] < 0.7), m
    assert m['vae_updated'] == float(m['disc_accuracy'] > 0.5), m
  step, tree, meta = restore(tmp_path / 'w', overrides)
  assert (step, meta['phase']) == (5, 'adversarial')
  assert int(tree['disc']['step']) == sum(int(metrics[s]['disc_updated']) for s in (3, 4, 5))


# ------------------------------------------------------------------ invalid settings


_fresh_shapes = itertools.count(1000)


@pytest.fixture
def nothing_compiled(monkeypatch):
  """Fails the test if the trainer gets as far as building states or steps, or if jax
  traces or compiles anything; yields a check that the event listener works."""
  events = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event.startswith('/jax/core/compile/'):
      events.append(event)

  def reached(*args, **kwargs):
    raise AssertionError('the trainer reached model/step construction')
  monkeypatch.setattr(steps, 'create_train_states', reached)
  monkeypatch.setattr(parallel, 'make_steps', reached)
  monkeypatch.setattr(trainer, 'probe_term_means', reached)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not events, events[:5]


def _listener_sees_a_fresh_jit(events):
  """The listener is live: a jit of a never-seen shape is reported (then forgotten)."""
  assert not events, events[:5]
  n = next(_fresh_shapes)
  jax.jit(lambda x: x + 1)(np.zeros(n, np.float32))
  seen = bool(events)
  del events[:]
  return seen


INVALID = [
    ('unknown dataset', {'dataset': 'imagenet'}, config_lib.ConfigError,
     "unknown dataset 'imagenet'"),
    ('unknown variant', {'variant': 'gan'}, config_lib.ConfigError, "unknown variant 'gan'"),
    ('negative weight', {'loss.weights.sobel': -0.1}, config_lib.ConfigError,
     r'loss\.weights\.sobel = -0\.1 is negative'),
    ('image size vs widths', {'image_size': 20, 'model.widths': (4, 8, 16)},
     config_lib.ConfigError, r'image_size 20 is not divisible by 2\*\*len\(model\.widths\) = 8'),
    ('batch vs devices', {'batch_size': 10}, config_lib.ConfigError,
     'batch_size 10 is not divisible by the 4 devices'),
    ('batch vs chosen devices', {'batch_size': 9, 'num_devices': 2}, config_lib.ConfigError,
     'batch_size 9 is not divisible by the 2 devices'),
    ('too many devices', {'num_devices': 5}, config_lib.ConfigError,
     r'^num_devices=5 is more than the 4 local device\(s\) \(on the CPU, '
     r'--config\.cpu_devices=5 splits the host into 5\)$'),
    ('zero interval', {'log_every': 0}, config_lib.ConfigError, 'log_every = 0 must be >= 1'),
    ('batch larger than the data', {'shapes.num_train': 4}, config_lib.ConfigError,
     'batch_size 8 is larger than the 4 training examples'),
    ('eval split of one image', {'shapes.num_eval': 1}, config_lib.ConfigError,
     'the evaluation needs at least 2'),
    ('missing tfds dataset', {'dataset': 'mnist', 'data_dir': 'EMPTY'}, data.DataError,
     r"tfds dataset 'mnist' is not prepared(.|\n)*folder:(.|\n)*arrays:"),
    ('missing folder', {'dataset': 'folder:/nonexistent/celeba'}, data.DataError,
     r"image folder '/nonexistent/celeba' does not exist"),
    ('missing arrays', {'dataset': 'arrays:/nonexistent/x.npz'}, data.DataError,
     r"arrays path '/nonexistent/x\.npz' does not exist"),
    # It failed at the first batch, after the workdir was written.
    ('crop larger than the images', {'dataset': 'ARRAYS_20x20', 'crop_size': 40},
     data.DataError, r'crop_size 40 is larger than the image \(20x20\)'),
]


@pytest.mark.parametrize('overrides, error, pattern', [c[1:] for c in INVALID],
                         ids=[c[0] for c in INVALID])
def test_invalid_settings_fail_in_prepare_run_before_anything_compiles(
    tmp_path, monkeypatch, nothing_compiled, overrides, error, pattern):
  monkeypatch.setenv('AVAE_JAX_CACHE', str(tmp_path / 'decoded'))  # no decoded copy anywhere
  empty = tmp_path / 'tfds'
  empty.mkdir()
  np.save(tmp_path / 'x.npy', np.zeros((40, 20, 20, 3), np.uint8))
  placeholders = {'EMPTY': str(empty), 'ARRAYS_20x20': f'arrays:{tmp_path / "x.npy"}'}
  overrides = {k: placeholders.get(v, v) if isinstance(v, str) else v
               for k, v in overrides.items()}
  config = make_config(dict(BASE, **overrides))
  with pytest.raises(error, match=pattern):
    trainer.prepare_run(config)
  workdir = tmp_path / 'w'
  with pytest.raises(error, match=pattern):
    trainer.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()  # stopped before the workdir was even created
  assert _listener_sees_a_fresh_jit(nothing_compiled)


def test_a_batch_of_the_whole_training_split_is_valid():
  run = trainer.prepare_run(make_config(dict(BASE, **{'shapes.num_train': BASE['batch_size']})))
  assert run.train_source.num_examples == BASE['batch_size']


def test_more_eval_images_than_the_split_has_is_said_before_training(tmp_path, capsys):
  note = ('note: eval.num_images=33 is more than the eval split has: the evaluation will '
          'use its 32 images\n')
  run = dict(BASE, pretrain_steps=1, adversarial_steps=0, **{'eval.num_images': 33})
  train(run, tmp_path / 'w')
  out = capsys.readouterr().out
  assert note in out and out.index(note) < out.index('devices: ')
  # A finished run, which evaluates nothing, does not promise an evaluation.
  (tmp_path / 'w' / 'final_metrics.json').write_text('{"step": 1}')
  train(run, tmp_path / 'w')
  out = capsys.readouterr().out
  assert 'the run is finished' in out and 'note: eval.num_images' not in out
  train(dict(run, **{'eval.num_images': 32}), tmp_path / 'w2')
  assert 'note: eval.num_images' not in capsys.readouterr().out


def test_a_study_output_directory_is_not_a_workdir(tmp_path):
  # A run trained into it, its checkpoints and eval/ beside study.json and results.md.
  (tmp_path / 'study.json').write_text('{}')
  with pytest.raises(config_lib.ConfigError, match=f'{tmp_path} is a study.py --out '
                     r'directory \(it holds study\.json\)'):
    train(dict(BASE, pretrain_steps=1, adversarial_steps=0), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['study.json']


def test_stop_signals_record_the_first_and_a_second_ctrl_c_interrupts():
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  stop = trainer._StopSignals(check_every=10)  # pylint: disable=protected-access
  stop.install()
  try:
    assert stop.agreed(1, logged=False) is None
    os.kill(os.getpid(), signal.SIGTERM)  # handled before os.kill returns (main thread)
    assert stop.agreed(1, logged=False) == signal.SIGTERM
    # A second SIGTERM (a scheduler that repeats it) still waits for the checkpoint.
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.agreed(1, logged=False) == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    stop.restore()
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_stop_signal_with_a_gone_stderr_reader_is_still_recorded(monkeypatch):
  # Behind `| tee`, a job's SIGTERM ends tee first: the handler's line then raised
  # BrokenPipeError inside the step in progress, and the stop's checkpoint was lost.
  class GoneReader(io.StringIO):
    def write(self, text):
      raise BrokenPipeError(32, 'Broken pipe')
  monkeypatch.setattr(sys, 'stderr', GoneReader())
  stop = trainer._StopSignals(check_every=10)  # pylint: disable=protected-access
  stop.install()
  try:
    os.kill(os.getpid(), signal.SIGTERM)  # handled before os.kill returns (main thread)
    assert stop.agreed(1, logged=False) == signal.SIGTERM
  finally:
    stop.restore()


def test_an_ignored_ctrl_c_stays_ignored_in_the_training_loop():
  # A shell's background job ignores SIGINT; the loop took it over and stopped the job.
  before = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    stop = trainer._StopSignals(check_every=10)  # pylint: disable=protected-access
    stop.install()
    try:
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.agreed(1, logged=False) is None
      os.kill(os.getpid(), signal.SIGTERM)  # SIGTERM still stops it with a checkpoint
      assert stop.agreed(1, logged=False) == signal.SIGTERM
    finally:
      stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, before)


def test_a_second_ctrl_c_goes_to_the_handler_from_before_the_loop():
  calls = []
  before = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
  try:
    stop = trainer._StopSignals(check_every=10)  # pylint: disable=protected-access
    stop.install()
    try:
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.agreed(1, logged=False) == signal.SIGINT and not calls
      # The CLIs' handler ends the process (distributed.exit_on_interrupt); this one
      # returns, and then the loop is interrupted all the same.
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
      assert calls == [signal.SIGINT]
    finally:
      stop.restore()
  finally:
    signal.signal(signal.SIGINT, before)


def test_a_run_with_nothing_to_train_checkpoints_its_initial_model(tmp_path, capsys):
  # eval.py and api.load read a workdir's checkpoints: a run that evaluated its initial
  # model must leave one, and a run with more steps resumes from it.
  overrides = dict(BASE, variant='vae', pretrain_steps=0)
  train(overrides, tmp_path)
  assert committed_steps(tmp_path) == [0]
  step, tree, _ = restore(tmp_path, overrides)
  config = make_config(overrides)
  initial, _ = steps.create_train_states(
      config, jax.random.split(jax.random.PRNGKey(int(config.seed)), 4)[0],
      (config.image_size, config.image_size, config.channels))
  assert step == 0
  assert_trees_equal(tree['vae']['params'], jax.device_get(initial.params))
  model = api.TrainedModel.load(str(tmp_path))
  assert model.step == 0
  capsys.readouterr()
  train(dict(overrides, pretrain_steps=2, checkpoint_every=2), tmp_path)
  assert 'resuming from checkpoint at step 0\n' in capsys.readouterr().out
  assert committed_steps(tmp_path) == [0, 2]


def test_a_run_on_the_initial_models_checkpoint_may_start_the_calibration(tmp_path):
  # Nothing was trained without it: the checkpoint of step 0 is a new run's state.
  train(dict(CALIBRATE, pretrain_steps=0, **{'calibrate.enabled': False}), tmp_path)
  assert not (tmp_path / trainer.CALIBRATION_FILE).exists()
  train(CALIBRATE, tmp_path)
  assert set(json.loads((tmp_path / trainer.CALIBRATION_FILE).read_text())) == {
      'batches', 'weights', 'means'}
  assert committed_steps(tmp_path) == [0, 2]
