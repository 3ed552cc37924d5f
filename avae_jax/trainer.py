"""The training loop: pre-training, adversarial fine-tuning, checkpoints, summaries, evaluation.

`train_and_evaluate(config, workdir)` is the one function that knows every other module.
A run is a function of (config, seed): the batch of step t and the PRNG key of step t are
derived from (seed, t), so a resumed run continues exactly where the stopped one was.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
from typing import Any, Iterator, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from avae_jax import api
from avae_jax import checkpoint
from avae_jax import config_lib
from avae_jax import data
from avae_jax import evaluation
from avae_jax import files
from avae_jax import losses
from avae_jax import parallel
from avae_jax import prefetch
from avae_jax import steps
from avae_jax import summary
from avae_jax import visualize
from avae_jax import xla_flags

CALIBRATION_FILE = 'calibration.json'
# The progress ETA's estimate of the adversarial phase until its own steps are timed, as
# multiples of the pre-training step: docs/benchmarks.md measures, on the CPU, its step at
# 1.9-2.4x the pre-training step's time and its compilation at 1.1-2.0x (on a GPU 1.6-2.1x
# and 0.3-0.7x, where the first estimate is rougher).
ADVERSARIAL_STEP_COST = 2.2
ADVERSARIAL_COMPILE_COST = 1.5
# Added to the seed for the calibration probe's batch order, so that it is not the run's.
_PROBE_SEED_OFFSET = 7919


class RunKeys(NamedTuple):
  """The PRNG keys of a run of seed s: split from PRNGKey(s), one per use.

  The seed draws, besides: each epoch's data order (numpy, SeedSequence([s, epoch]); the
  calibration probe's from s + _PROBE_SEED_OFFSET), the shapes dataset (shapes.py's
  streams) and the final evaluation's samples (PRNGKey(s) folded with
  evaluation._SAMPLE_KEY).
  """
  init: jax.Array
  train: jax.Array
  calibration: jax.Array
  figures: jax.Array


def run_keys(seed: int) -> RunKeys:
  """The keys of a run with config.seed = seed (the study's calibration derives them too)."""
  return RunKeys(*jax.random.split(jax.random.PRNGKey(int(seed)), 4))


class NonFiniteLossError(FloatingPointError):
  """A loss term or the trained state became NaN or Inf; the run keeps its last good checkpoint."""


class TrainingInterrupted(BaseException):
  """SIGTERM or SIGINT stopped training after a step, whose checkpoint was then saved.

  A BaseException, like KeyboardInterrupt, so that `except Exception` (a caller that goes
  on after a failed run) does not take a request to stop for a failure.
  """

  def __init__(self, signum: int, step: int):
    """Records the signal and the step whose checkpoint was saved."""
    self.signum, self.step = signum, step
    # Without advice: train.py and study.py each say how to resume.
    super().__init__(f'stopped by {signal.Signals(signum).name} at step {step}, whose '
                     'checkpoint is saved')


class _StopSignals:
  """Turns SIGTERM and SIGINT during training into a request to stop after the step.

  A preempted VM (SIGTERM) or Ctrl-C then loses no step: the loop checkpoints the step it
  finished and stops. A second SIGINT interrupts at once. Handlers are installed only
  from the main thread (Python allows no other), and restored after the loop. An ignored
  SIGINT stays ignored: a shell starts background jobs so, for Ctrl-C to leave them
  running (as distributed.exit_on_interrupt does outside the loop).
  """

  def __init__(self, check_every: int):
    """No signal yet; several processes agree on one every `check_every` steps."""
    self.signum: int | None = None
    self.check_every = int(check_every)
    self._previous: dict[int, Any] = {}

  def install(self) -> None:
    """Installs the handlers."""
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(s) is not signal.SIG_IGN:
          self._previous[s] = signal.signal(s, self._handle)

  def restore(self) -> None:
    """Restores the previous handlers."""
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum: int, frame: Any) -> None:
    """Records the signal; a repeated SIGINT goes to the handler from before the loop."""
    if self.signum is not None and signum == signal.SIGINT:
      previous = self._previous.get(signal.SIGINT)
      if callable(previous):  # e.g. the CLI's exit at once (distributed.exit_on_interrupt)
        previous(signum, frame)
      raise KeyboardInterrupt
    self.signum = signum
    when = ('after this step' if jax.process_count() == 1 else
            f'at the next step the processes agree on (every {self.check_every} steps)')
    try:
      print(f'{signal.Signals(signum).name}: stopping {when} with a checkpoint '
            '(Ctrl-C again to stop at once)', file=sys.stderr, flush=True)
    except (OSError, ValueError):
      # A stderr whose reader has gone (a `| tee` the job's SIGTERM ended first): an
      # exception from here would surface in the step and lose the checkpoint.
      pass

  def agreed(self, step: int, logged: bool) -> int | None:
    """The signal to stop after `step`, the same in every process, or None.

    One process decides at every step. Several decide together, at steps that they all
    reach (every check_every steps, and those that log), so that all save the same
    checkpoint; agreeing at every step would wait for each step's work to finish before
    the next is dispatched.
    """
    if jax.process_count() == 1:
      return self.signum
    if not logged and step % self.check_every:
      return None
    signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
    return int(np.max(signums)) or None


@dataclasses.dataclass
class RunSetup:
  """Everything a run needs that is derived from the config, before the first step."""
  devices: list[jax.Device]
  train_source: data.Source
  eval_source: data.Source
  step_config: steps.StepConfig
  total_steps: int


def prepare_run(config: ml_collections.ConfigDict) -> RunSetup:
  """Validates the config and opens the data; fails fast before anything is compiled."""
  devices = parallel.local_devices(config)
  config_lib.validate(config, num_devices=len(devices) * jax.process_count())
  train_source, eval_source = data.load_splits(config)
  # Checked here, not where the batches and the evaluation would fail: after compiling.
  if int(config.batch_size) > train_source.num_examples:
    raise config_lib.ConfigError(
        f'batch_size {config.batch_size} is larger than the {train_source.num_examples} '
        f'training examples of {train_source.name or config.dataset}')
  if eval_source.num_examples < 2:
    raise config_lib.ConfigError(
        f'the eval split of {config.dataset} has {eval_source.num_examples} example(s); '
        'the evaluation needs at least 2')
  # A crop_size larger than the images fails at the first batch: after the workdir exists.
  train_source.get(np.arange(1))
  step_config = steps.StepConfig.from_config(config, dataset_size=train_source.num_examples)
  total = int(config.pretrain_steps) + config_lib.adversarial_steps(config)
  return RunSetup(devices, train_source, eval_source, step_config, total)


# ---------------------------------------------------------------------------------------
# Loss-weight calibration (paper §III): measure each term's scale, equalise them.


def calibrate_weights(config: ml_collections.ConfigDict, vae_state: steps.TrainState,
                      source: data.Source, devices: list[jax.Device],
                      key: jax.Array) -> dict[str, float]:
  """Probes each reconstruction term over K training batches and returns equalising λ's."""
  return weights_from_term_means(config, probe_term_means(config, vae_state, source, devices, key))


def weights_from_term_means(config: ml_collections.ConfigDict,
                            means: dict[str, float]) -> dict[str, float]:
  """λ_i = w_i * mean(L_MSE) / mean(L_i) from the probe's term means and the configured w_i.

  w_i are loss.weights: 1 in the configs (the paper's equal scales, λ_MSE = 1); 0, or a
  term left out of loss.weights, keeps a term off.
  """
  ref = means['mse']
  return {t: float(config.loss.weights.get(t, 0.0)) * (ref / means[t] if means[t] > 0 else 1.0)
          for t in config_lib.RECONSTRUCTION_TERMS}


def _train_batches(config: ml_collections.ConfigDict, source: data.Source,
                   devices: list[jax.Device], seed: int, start_step: int) -> Any:
  """This process's part of the global batches from `start_step`, one row per device."""
  return data.batches(source, batch_size=int(config.batch_size), seed=seed,
                      start_step=start_step, process_index=jax.process_index(),
                      process_count=jax.process_count(), num_local_devices=len(devices))


def _fetch_checked(history: list[tuple[int, Any]],
                   calibration: bool = False) -> list[tuple[int, dict[str, np.ndarray]]]:
  """The steps' metrics on the host, checked to be finite (_check_finite)."""
  fetched = [(s, jax.device_get(m)) for s, m in history]
  _check_finite(fetched, calibration=calibration)
  return fetched


def probe_term_means(config: ml_collections.ConfigDict, vae_state: steps.TrainState,
                     source: data.Source, devices: list[jax.Device],
                     key: jax.Array) -> dict[str, float]:
  """Each reconstruction term's mean over K probe steps of a throwaway copy of the VAE.

  The paper probed the terms for one epoch of training and weighted them so that all share
  one scale ("if L1 was 30 and L2 about 900, λ_L1 = 30"). Here a throwaway copy of the
  initial VAE trains for config.calibrate.batches steps with every term at weight 1 and
  returns each term's mean over those steps; weights_from_term_means makes the λ's of them.
  The real run starts from the untouched initial state.
  """
  k = int(config.calibrate.batches)
  probe_cfg = steps.StepConfig.from_config(
      config, dataset_size=source.num_examples,
      recon_weights=tuple((t, 1.0) for t in config_lib.RECONSTRUCTION_TERMS),
      gabor=losses.GaborSpec.from_config(config.gabor))
  probe = parallel.make_steps(probe_cfg, devices, method=config.parallel).pretrain
  state = parallel.replicate(vae_state, devices, probe_cfg.axis_name)
  # Device arrays as in the training loop: shard_map's step (a jit over all processes'
  # devices) reads a host array as the global batch, and one process holds only its part.
  batches = _train_batches(config, source, devices, int(config.seed) + _PROBE_SEED_OFFSET,
                           start_step=0)
  # An epoch of probe steps (the dataset configs') takes a while: it gets progress lines.
  progress = summary.ProgressLogger(
      total_steps=k, every=int(config.log_every), enabled=jax.process_index() == 0,
      phases=[summary.Phase('probe', k)], log=lambda line: logging.info('calibration: %s', line))
  history = []
  with prefetch.to_devices(batches, devices, axis_name=probe_cfg.axis_name) as it:
    for i in range(k):
      if i == 0:
        progress.compiling(0)
      state, m = probe(state, next(it), jax.random.fold_in(key, i))
      if i == 0:
        jax.block_until_ready(m)
        progress.compiled(1)
      history.append((i, m))
      if (i + 1) % int(config.log_every) == 0 or i + 1 == k:
        jax.block_until_ready(m)  # the line's rate counts steps run, not dispatched
      progress.update(i + 1)
  means = _mean_metrics(_fetch_checked(history, calibration=True))
  logging.info('calibration over %d batches: term means %s', k, means)
  return {t: means[t] for t in config_lib.RECONSTRUCTION_TERMS}


def _apply_calibration(config: ml_collections.ConfigDict, workdir: str, run: RunSetup,
                       vae_state: steps.TrainState, key: jax.Array, *,
                       trained: bool) -> RunSetup:
  """Sets config.loss.weights from the calibration; returns the setup with its new step config.

  The calibration runs once per workdir and is recorded there; config.calibrate.batches
  is set to its probe's, so that config.json names it too. A run with no trained steps
  probes (a calibration.json there is left from a run that stopped before training, perhaps
  with other settings). A `trained` run reuses the probe's term means with the configured
  w_i, so that changed loss weights take effect (and are named as changed). A trained run
  without calibration.json started without calibration: probing its trained state now
  would change the objective halfway, so that is refused.
  """
  path = os.path.join(workdir, CALIBRATION_FILE)
  saved = files.read_json(path) if trained and files.exists(path) else None
  if saved is not None:
    means = saved.get('means')
    weights = _recorded_weights(config, saved)
    if means is None and jax.process_index() == 0:
      print(f'warning: {path} (of an earlier version) holds the calibrated weights but '
            'not the term means they came from: the run resumes with those weights, and '
            'changed loss.weights.* are not applied', file=sys.stderr, flush=True)
    batches = int(saved['batches'])
    if batches != int(config.calibrate.batches) and jax.process_index() == 0:
      print(f'note: the run keeps its calibration probe of {batches} batches ({path}); '
            f'calibrate.batches={config.calibrate.batches} applies to new runs only',
            file=sys.stderr, flush=True)
  elif trained:
    raise config_lib.ConfigError(
        f'the run in {workdir} started without the loss-weight calibration (it has no '
        'calibration.json); resume it with --config.calibrate.enabled=False, or use a new '
        'workdir')
  else:
    means = probe_term_means(config, vae_state, run.train_source, run.devices, key)
    weights, batches = weights_from_term_means(config, means), int(config.calibrate.batches)
  record = {'batches': batches, 'weights': weights}
  if means is not None:
    record['means'] = means
  if jax.process_index() == 0 and record != saved:
    files.write_json(path, record)
  if jax.process_index() == 0:
    print('calibrated reconstruction weights: ' +
          ', '.join(f'{k}={v:.4g}' for k, v in weights.items()), flush=True)
  _set_calibration(config, weights, batches)
  step_config = steps.StepConfig.from_config(config, dataset_size=run.train_source.num_examples)
  return dataclasses.replace(run, step_config=step_config)


def _recorded_weights(config: ml_collections.ConfigDict, saved: dict[str, Any]
                      ) -> dict[str, float]:
  """The λ's of a calibration.json record under config's w_i.

  An earlier version's record holds the weights only, whatever loss.weights say now.
  """
  means = saved.get('means')
  return weights_from_term_means(config, means) if means is not None else saved['weights']


def _set_calibration(config: ml_collections.ConfigDict, weights: dict[str, float],
                     batches: int) -> None:
  """Writes calibrated λ's into config.loss.weights, and their probe's batch count."""
  with config.unlocked():
    for t, v in weights.items():
      config.loss.weights[t] = float(v)
    # config.json then names the probe the weights came from, as calibration.json does.
    config.calibrate.batches = batches


def _as_calibrated(config: ml_collections.ConfigDict, workdir: str
                   ) -> ml_collections.ConfigDict:
  """`config` with the workdir's recorded calibration applied (a copy), as a resume would."""
  path = os.path.join(workdir, CALIBRATION_FILE)
  if not (config.calibrate.enabled and config_lib.variant_spec(config.variant).compound_loss
          and files.exists(path)):
    return config
  saved = files.read_json(path)
  config = copy.deepcopy(config)
  _set_calibration(config, _recorded_weights(config, saved), int(saved['batches']))
  return config


def _changed_settings(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """The settings of `config` that differ from WORKDIR/config.json's, as 'field a -> b'.

  Changing a setting on resume is allowed (more steps, other evaluation settings), but a
  changed loss (weights, calibration switched off) silently changes the objective mid-run,
  so a resume names them; none where config.json is unreadable (it is rewritten) or absent
  (a workdir of an older version).
  """
  try:
    saved = api.read_config(workdir)
  except api.WorkdirError:
    return []
  if saved is None:
    return []
  resolved = json.loads(json.dumps(config.to_dict(), default=files.json_default))
  return [f'{k} {a!r} -> {b!r}'
          for k, a, b in config_lib.differences(saved.to_dict(), resolved)]


# ---------------------------------------------------------------------------------------
# Metrics bookkeeping.


def _check_finite(history: list[tuple[int, dict[str, np.ndarray]]],
                  calibration: bool = False) -> None:
  """Raises NonFiniteLossError naming the first step and term that is NaN or Inf.

  calibration: the steps are the calibration's probe (a throwaway copy, before training),
  which the message must not pass off as training steps with a checkpoint before them.
  """
  for step, m in history:
    for name, v in m.items():
      if np.all(np.isfinite(v)):
        continue
      if calibration:
        raise NonFiniteLossError(
            f'non-finite {name} = {float(v)} at probe step {step} of the loss-weight '
            'calibration (a throwaway copy of the initial VAE, every term at weight 1), '
            'before any training step; nothing is checkpointed. Lower the learning rate, '
            'or set the weights by hand with calibrate.enabled=False.')
      raise NonFiniteLossError(
          f'non-finite {name} = {float(v)} at step {step}; the run stops here and the '
          'last checkpoint (written before this step) is kept. Lower the learning rate '
          'or check the loss weights.')


def _check_finite_state(tree: Any, step: int, last_checkpoint: int | None) -> None:
  """Raises NonFiniteLossError naming an array of the state after `step` steps with NaN/Inf."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = np.asarray(leaf)
    if not np.issubdtype(leaf.dtype, np.inexact) or np.all(np.isfinite(leaf)):
      continue
    kept = ('no checkpoint is written' if last_checkpoint is None else
            f'the last checkpoint (step {last_checkpoint}) is kept')
    raise NonFiniteLossError(
        f'non-finite values in {jax.tree_util.keystr(path)} after the update of step '
        f'{step - 1}, whose losses were finite (a NaN or Inf gradient); the run stops '
        f'here, this state is not checkpointed and {kept}. Lower the learning rate or '
        'check the loss weights.')


def _mean_metrics(history: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, float]:
  """Averages the metrics of several steps (keys may differ between phases)."""
  out: dict[str, list[float]] = {}
  for _, m in history:
    for k, v in m.items():
      out.setdefault(k, []).append(float(v))
  return {k: float(np.mean(v)) for k, v in out.items()}


# ---------------------------------------------------------------------------------------
# The loop.


@functools.partial(jax.jit, static_argnums=0)
def _figure_images(module: Any, variables: Any, x: jax.Array,
                   z: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Reconstructions (decoded posterior means) of x and the decoded codes z, in one program."""
  mu, _ = module.apply(variables, x, train=False, method='encode')
  return (module.apply(variables, mu, train=False, method='decode'),
          module.apply(variables, z, train=False, method='decode'))


def _training_figures(config: ml_collections.ConfigDict, vae_state: steps.TrainState,
                      eval_source: data.Source, key: jax.Array) -> dict[str, np.ndarray]:
  """Reconstruction and random-sample grids from the current (unreplicated) VAE."""
  n = int(config.eval.grid_size)
  x = eval_source.get(np.arange(min(n, eval_source.num_examples)))
  variables = {'params': vae_state.params, 'batch_stats': vae_state.batch_stats}
  # n/2 rows of n samples: a snapshot of training, smaller than the evaluation's n x n.
  z = jax.random.normal(key, (n * n // 2 if n > 1 else 1, config.model.latent_dim))
  # Jitted: applied op by op, the model's many small programs take ~10 s to compile.
  x_rec, samples = _figure_images(vae_state.module, variables, x, z)
  return {
      'reconstructions': visualize.reconstructions(np.asarray(x), np.asarray(x_rec), n),
      'samples': visualize.samples(np.asarray(samples), n),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (pre-training, then adversarial fine-tuning) and evaluates; returns final metrics.

  SIGTERM or SIGINT during training (from the main thread's point of view) lets the step
  in progress finish (with several processes, the next step they agree on), checkpoints
  it and raises TrainingInterrupted; calling again resumes from there. On a finished run
  it returns the final metrics the workdir holds.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # private, unlocked copy
  config_lib.make_paths_absolute(config)  # as config.json records them
  workdir = os.path.expanduser(workdir)  # '~/runs/a', as train.py's --workdir
  run = prepare_run(config)
  is_main = jax.process_index() == 0
  unread = config_lib.unread_fields(config)
  if is_main and unread:  # a misspelt field in a config file: its intended one unchanged
    print(f'warning: no code reads the config field(s) {", ".join(unread)}; a misspelt field '
          'leaves the one it meant at its value', file=sys.stderr, flush=True)
  ignored = config_lib.ignored_settings(config)
  if is_main and ignored:  # a crop that a user believes applied
    print(f'warning: dataset {config.dataset!r} does not use {", ".join(ignored)} (it has no '
          'splits and nothing to crop)', file=sys.stderr, flush=True)
  fid_problem = evaluation.fid_weights_problem(config)
  if is_main and fid_problem:  # said now, not after the calibration and days of training
    print('warning: the final evaluation will skip FID (eval.py can add it later): '
          + fid_problem, file=sys.stderr, flush=True)
  problem = files.output_dir_problem(workdir, 'the workdir')
  if problem:
    raise config_lib.ConfigError(problem)
  if files.exists(os.path.join(workdir, config_lib.STUDY_FILE)):
    # Its files (study.json, results.md, the runs' folders) would mix with a run's.
    raise config_lib.ConfigError(
        f'{workdir} is a study.py --out directory (it holds {config_lib.STUDY_FILE}); its '
        'runs have theirs in it (OUT/<dataset>/<variant>/seed<k>): give train.py a workdir '
        'of its own')
  ckpt_dir = os.path.join(workdir, config_lib.CHECKPOINT_DIR)
  with _run_lock(workdir):
    # Checked too (in the workdir this run holds): a file in its place would fail the
    # first save, after the steps up to it had run.
    problem = files.output_dir_problem(ckpt_dir, 'the checkpoint directory')
    if problem:
      raise config_lib.ConfigError(problem)
    if is_main:
      # Orbax cleans its own temporary checkpoints when the Checkpointer opens.
      removed = files.remove_dead_temporaries(workdir, skip=(config_lib.CHECKPOINT_DIR,))
      if removed:
        print(f'removed {len(removed)} temporary file(s) of a killed write in {workdir}',
              flush=True)
    # Closed on every way out, failures too (a study or a notebook goes on in this
    # process); the loop closes it before the evaluation, and closing twice is harmless.
    with checkpoint.Checkpointer(ckpt_dir, keep=int(config.keep_checkpoints)) as ckpt:
      return _train_and_evaluate(config, workdir, run, ckpt)


@contextlib.contextmanager
def _run_lock(workdir: str) -> Iterator[None]:
  """Process 0 holds the workdir's lock inside; ConfigError on every process if it is taken.

  Two runs on one workdir would write the same checkpoints: the second one stops here. Its
  other processes stop with the same error (left to go on, they would be aborted by the JAX
  runtime in the checkpointer's first collective, with a stack dump, once process 0 left).
  """
  with contextlib.ExitStack() as stack:
    taken = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(files.exclusive(workdir, 'train.py'))
      except files.LockedError as e:
        taken = str(e)
    if not checkpoint.all_processes_agree(taken is None):
      raise config_lib.ConfigError(
          f'{taken or workdir + " is in use by another run (process 0 names it)"}; wait for '
          'that run to end, stop it, or use another workdir')
    yield


def _restore(config: ml_collections.ConfigDict, workdir: str, total_steps: int,
             ckpt: checkpoint.Checkpointer, vae_state: steps.TrainState,
             disc_state: steps.TrainState
             ) -> tuple[int, dict[str, Any], steps.TrainState, steps.TrainState] | None:
  """The latest checkpoint's (step, metadata, states), or None; ConfigError if not this run's."""
  def another_model(error: ValueError | None = None) -> config_lib.ConfigError:
    """The refusal, naming the settings that differ from WORKDIR/config.json's if it can."""
    # Without a readable config.json, the restore's own account of the arrays (long).
    differs = api.model_differences(workdir, config) or (
        'variant/image size/widths differ' + (f'; {error}' if error else ''))
    return config_lib.ConfigError(f'the checkpoints in {workdir} were written by another '
                                  f'model ({differs}); use a new workdir')

  try:
    restored = ckpt.restore(steps.state_tree(vae_state, disc_state))
  except ValueError as e:  # the arrays' shapes differ from this config's model
    raise another_model(e) from None
  if restored is None:
    return None
  step, tree, meta = restored
  if not config_lib.same_layout(meta.get('config_hash'), config):
    raise another_model()
  if meta.get('seed') not in (None, int(config.seed)):  # None: an earlier version's
    # The seed draws the initial model, the data order and every step's noise: going on
    # under another would record one seed for a run of two (and a loop over seeds with
    # one workdir would get the first seed's run back).
    raise config_lib.ConfigError(
        f'the checkpoints in {workdir} are of a run with seed {meta["seed"]}, not '
        f'{int(config.seed)}: another seed is another run; use a new workdir, or seed '
        f'{meta["seed"]} to continue this one')
  if step > total_steps:
    # Evaluating the later model under this config would record (config.json, the
    # evaluation) step counts that do not describe it.
    raise config_lib.ConfigError(
        f'the checkpoint in {workdir} is at step {step}, past the {total_steps} steps this '
        f'config trains (pretrain_steps {int(config.pretrain_steps)} + adversarial_steps '
        f'{config_lib.adversarial_steps(config)}); give at least {step} steps to continue '
        'the run, evaluate it with eval.py, or use a new workdir')
  return (step, meta) + steps.from_state_tree(vae_state, disc_state, tree)


def _warn_of_a_changed_run(config: ml_collections.ConfigDict, meta: dict[str, Any],
                           examples: int, cpu_threads: int | None,
                           layout: list[int]) -> None:
  """Warns where a resumed run will differ from an uninterrupted one.

  Its backend, XLA:CPU thread count, devices ([processes, devices each]) or data size.
  """
  saved_threads = meta.get('cpu_threads')  # None on GPU/TPU, absent in earlier versions
  if 'cpu_threads' in meta and (saved_threads is None) != (cpu_threads is None):
    where = {True: 'a GPU/TPU', False: 'the CPU'}
    print(f'warning: the checkpoint was written on {where[saved_threads is None]} and this '
          f'process computes on {where[cpu_threads is None]}: the steps from here on are '
          "not bit-identical to an uninterrupted run's (README: Devices and "
          'reproducibility)', file=sys.stderr, flush=True)
  elif saved_threads is not None and cpu_threads not in (None, saved_threads):
    print(f'warning: the checkpoint was written with {saved_threads} XLA:CPU thread(s) '
          f'and this process has {cpu_threads} (another cpu_devices, CPU affinity, '
          'PJRT_NPROC, NPROC or machine): the steps from here on are not bit-identical to '
          "an uninterrupted run's (README: Devices and reproducibility)", file=sys.stderr,
          flush=True)
  saved_layout = meta.get('devices')  # absent in earlier versions
  if saved_layout not in (None, list(layout)):
    # The gradients and BatchNorm statistics are then averaged in another order (1 x 4
    # and 2 x 2 devices too).
    def words(p_d: list[int]) -> str:
      return f'{p_d[0]} process(es) x {p_d[1]} device(s)'
    print(f'warning: the checkpoint was written by {words(saved_layout)} and this run has '
          f'{words(layout)}: the steps from here on are not bit-identical to an '
          "uninterrupted run's (README: Devices and reproducibility)", file=sys.stderr,
          flush=True)
  saved_examples = meta.get('train_examples')  # absent in earlier versions
  if saved_examples not in (None, examples):
    # Each epoch's order (and a held-out eval split's rows) follow the dataset's size.
    print(f'warning: the checkpoint was written with {saved_examples} training examples '
          f'and {config.dataset} now has {examples}: the data order from here on is not '
          "an uninterrupted run's, and images may have moved between the train and eval "
          'splits', file=sys.stderr, flush=True)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, run: RunSetup,
                        ckpt: checkpoint.Checkpointer) -> dict[str, Any]:
  """train_and_evaluate's work, in a workdir that exists and that this run holds."""
  is_main = jax.process_index() == 0
  # On a CPU the thread count sets the order of float32 sums, so the checkpoints record it
  # and a resume compares.
  cpu_threads = xla_flags.process_cpu_threads()
  keys = run_keys(int(config.seed))
  image_shape = run.train_source.image_shape
  vae_state, disc_state = steps.create_train_states(config, keys.init, image_shape)

  restored = _restore(config, workdir, run.total_steps, ckpt, vae_state, disc_state)
  start_step, unlogged = 0, []
  if restored is not None:
    start_step, meta, vae_state, disc_state = restored
    unlogged = meta.get('unlogged_metrics', [])  # absent in checkpoints of earlier versions
    logging.info('resumed from step %d (%s)', start_step, meta.get('phase'))

  finished = (_final_metrics(workdir, start_step)
              if restored is not None and start_step == run.total_steps else None)
  if finished is not None:
    # The same command run again (a scheduler restarting a finished job): nothing to
    # train, the evaluation's results would only be written twice, and config.json stays
    # the config they were computed with.
    if is_main:
      _say_finished(config, workdir, start_step)
    return finished
  if restored is not None and is_main:
    print(f'resuming from checkpoint at step {start_step}', flush=True)
    _warn_of_a_changed_run(config, meta, run.train_source.num_examples, cpu_threads,
                           [jax.process_count(), len(run.devices)])
  if is_main and int(config.eval.num_images) > run.eval_source.num_examples:
    # Said again at the evaluation; said before training too, so that it is no news after.
    print(f'note: eval.num_images={config.eval.num_images} is more than the eval split has: '
          f'the evaluation will use its {run.eval_source.num_examples} images', flush=True)

  run = _settle_config(config, workdir, run, vae_state, keys.calibration,
                       start_step=start_step, resumed=restored is not None)

  total = run.total_steps
  pre = int(config.pretrain_steps)
  fns = parallel.make_steps(run.step_config, run.devices, method=config.parallel)
  if is_main:
    _announce(config, run.devices, cpu_threads)
  r_vae = parallel.replicate(vae_state, run.devices, run.step_config.axis_name)
  r_disc = parallel.replicate(disc_state, run.devices, run.step_config.axis_name)

  # The steps since the last log, (step, metrics on the devices): logged, then dropped.
  history: list[tuple[int, dict[str, Any]]] = [(int(s), m) for s, m in unlogged]
  last_saved = start_step if restored is not None else None

  def save(step: int) -> None:
    """Checkpoints the state after `step` steps, with the metrics logged since."""
    nonlocal last_saved
    pending = _fetch_checked(history)  # never checkpoint a state whose losses are unchecked
    tree = jax.device_get(
        steps.state_tree(parallel.unreplicate(r_vae), parallel.unreplicate(r_disc)))
    # A finite loss can still give a NaN update (a NaN gradient): the losses checked above
    # were computed before it, so the state itself is checked before it replaces a good one.
    _check_finite_state(tree, step, last_saved)
    ckpt.save(step, tree, _checkpoint_meta(config, run, step, cpu_threads, pending))
    last_saved = step

  # Sharded over the steps' axis, as the states are: the steps take both as they come.
  batches = prefetch.to_devices(
      _train_batches(config, run.train_source, run.devices, int(config.seed),
                     start_step), run.devices, axis_name=run.step_config.axis_name)
  progress = summary.ProgressLogger(
      total_steps=total, every=int(config.log_every), start_step=start_step, enabled=is_main,
      phases=[summary.Phase('pre-training', pre),
              summary.Phase('adversarial', total, step_cost=ADVERSARIAL_STEP_COST,
                            compile_cost=ADVERSARIAL_COMPILE_COST)])
  step = start_step
  writer = summary.SummaryWriter(workdir, enabled=is_main, start_step=start_step)
  stop = _StopSignals(config.stop_check_every)
  stop.install()
  try:
    while step < total:
      try:
        batch = next(batches)
      except data.DataError:
        # An unreadable image: the batch that holds it was never used, so the steps done
        # since the last checkpoint are kept first, for a resume once the file is
        # replaced. (One process only: a save needs every process, and the others do
        # not know of this one's error.)
        if step > (last_saved or 0) and jax.process_count() == 1:
          save(step)
          ckpt.wait()
          print(f'data error at step {step}: the checkpoint of step {step} is saved',
                file=sys.stderr, flush=True)
        raise
      key = jax.random.fold_in(keys.train, step)
      # The first step of each phase in this process compiles its step function: the
      # progress line says so and leaves that step out of the rate and the ETA.
      compiles = step in (start_step, pre)
      if compiles:
        progress.compiling(step)
      if step < pre:
        r_vae, m = fns.pretrain(r_vae, batch, key)
      else:
        r_vae, r_disc, m = fns.adversarial(r_vae, r_disc, batch, key)
      if compiles:
        jax.block_until_ready(m)  # dispatch returns after compiling, before the step ran
        progress.compiled(step + 1)
      history.append((step, m))
      step += 1
      at_phase_end = step == pre or step == total
      logged = step % int(config.log_every) == 0 or at_phase_end
      signum = stop.agreed(step, logged)
      if logged or signum:
        # A stop logs the steps since the last log too: nothing logged is lost.
        _log(config, step, history, progress, writer, force=bool(signum))
        history = []
      if is_main and (step % int(config.image_every) == 0 or step == total):
        # The rate is the training steps': the figures' time (their program compiles the
        # first time) is left out of it and of the ETA.
        with progress.paused():
          _write_figures(config, workdir, writer, parallel.unreplicate(r_vae),
                         run.eval_source, jax.random.fold_in(keys.figures, step), step)
      if step % int(config.checkpoint_every) == 0 or at_phase_end or signum:
        save(step)
      if signum:
        ckpt.wait()
        raise TrainingInterrupted(signum, step)
    if last_saved != step:
      # The run's final state is always a checkpoint, for eval.py and
      # api.TrainedModel.load: the loop saves it at the end of the last phase, and this
      # saves a run with nothing to train (no pre-training, no adversarial phase): its
      # initial model, as step 0.
      save(step)
    ckpt.wait()
    # A signal during the last save: the run stops before the evaluation, as promised.
    signum = stop.agreed(step, logged=True)
    if signum:
      raise TrainingInterrupted(signum, step)
  except BaseException:
    # No evaluation follows: let go of the summary files now (a study runs on in this
    # process after a failed or interrupted run).
    writer.close()
    raise
  finally:
    stop.restore()
    # Stops the producer thread and frees its queued device batches now, not whenever the
    # prefetcher is collected (a traceback that a caller keeps holds on to it).
    batches.close()
    try:
      writer.flush()
    finally:
      ckpt.close()  # waits for a save in flight, also when the flush fails (disk full)

  with writer:  # closed also when the evaluation fails
    return final_evaluation(config, workdir, parallel.unreplicate(r_vae), run, writer,
                            step=step)


def _say_finished(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
  """Says that the run in `workdir` is finished, and warns of settings changed since."""
  final = os.path.join(workdir, config_lib.FINAL_METRICS_FILE)
  print(f'the run is finished: {final} holds its final metrics at step {step} (eval.py '
        'evaluates it again)', flush=True)
  # Compared as calibrated: config.json holds the λ's, the config the w_i they came from.
  changes = _changed_settings(workdir, _as_calibrated(config, workdir))
  if changes:
    # Another loss given to a finished run's workdir (a loop over loss weights with one
    # workdir, say) must not pass its metrics off as the new settings'.
    print(f'warning: settings changed since {config_lib.CONFIG_FILE} was written, not '
          f'applied (the run is finished; its metrics are of {config_lib.CONFIG_FILE}\'s): '
          + '; '.join(changes), file=sys.stderr, flush=True)


def _settle_config(config: ml_collections.ConfigDict, workdir: str, run: RunSetup,
                   vae_state: steps.TrainState, key: jax.Array, start_step: int,
                   resumed: bool) -> RunSetup:
  """Calibrates the λ's (into `config`, in place) where asked, and writes config.json.

  Returns the run's setup, with the calibrated loss where there is one.
  """
  is_main = jax.process_index() == 0
  # At step 0 (a new run, or the checkpointed initial model of a run with nothing to train)
  # nothing was trained under the calibration, so it is made as for a new run.
  trained = start_step > 0
  if config.calibrate.enabled and config_lib.variant_spec(config.variant).compound_loss:
    run = _apply_calibration(config, workdir, run, vae_state, key, trained=trained)
  elif not trained and is_main:
    # Left by a calibrated run that stopped before its first checkpoint: a later resume of
    # this uncalibrated run with calibration on must be refused, not handed those λ's.
    files.remove(os.path.join(workdir, CALIBRATION_FILE))
  if is_main:
    changes = _changed_settings(workdir, config) if resumed else []
    if changes:
      saved = os.path.join(workdir, config_lib.CONFIG_FILE)
      print(f'resuming with settings changed since {saved} was written: '
            + '; '.join(changes), flush=True)
    files.write_json(os.path.join(workdir, config_lib.CONFIG_FILE), config.to_dict())
  return run


def _checkpoint_meta(config: ml_collections.ConfigDict, run: RunSetup, step: int,
                     cpu_threads: int | None, unlogged: list[tuple[int, dict[str, Any]]]
                     ) -> dict[str, Any]:
  """What a checkpoint records beside the states: where the run is and what it ran on."""
  return {'step': step,
          'phase': 'pretrain' if step <= int(config.pretrain_steps) else 'adversarial',
          'seed': int(config.seed), 'config_hash': config_lib.layout_hash(config),
          'cpu_threads': cpu_threads, 'devices': [jax.process_count(), len(run.devices)],
          'train_examples': run.train_source.num_examples,
          # The steps since the last log (host copies): a resumed run logs the same means.
          'unlogged_metrics': [[s, {k: float(v) for k, v in m.items()}] for s, m in unlogged]}


def _announce(config: ml_collections.ConfigDict, devices: list[jax.Device],
              cpu_threads: int | None) -> None:
  """Prints the devices line, and warns of a gating dead band (process 0)."""
  n, processes = len(devices), jax.process_count()
  threads = '' if cpu_threads is None else f', {cpu_threads} XLA:CPU threads'
  print(f'devices: {n} {devices[0].platform} x {processes} process(es), '
        f'{config.parallel}, {int(config.batch_size) // (n * processes)} images per '
        f'device and step{threads}', flush=True)
  band = config_lib.gating_dead_band(config)
  if band is not None:
    print(f'warning: at a discriminator accuracy in [{band[0]:g}, {band[1]:g}] neither '
          'gated update runs (gating.train_disc_below <= gating.train_vae_above), so the '
          'adversarial phase can stall there', file=sys.stderr, flush=True)


def _log(config: ml_collections.ConfigDict, step: int, history: list[tuple[int, Any]],
         progress: summary.ProgressLogger, writer: summary.SummaryWriter,
         force: bool) -> None:
  """Logs the mean metrics of the steps in `history` at `step`, and a progress line."""
  scalars = _mean_metrics(_fetch_checked(history))
  scalars['learning_rate'] = float(config.optimizer.learning_rate)
  if step > int(config.pretrain_steps):
    scalars['disc_learning_rate'] = float(config.optimizer.disc_learning_rate)
  progress.update(step, scalars, force=force)
  # The progress line's rate, without the compiling steps and the figures (a log of a
  # compiling step alone has none).
  if math.isfinite(progress.rate):
    scalars['steps_per_s'] = progress.rate
  writer.scalars(step, scalars)


def _write_figures(config: ml_collections.ConfigDict, workdir: str,
                   writer: summary.SummaryWriter, vae_state: steps.TrainState,
                   eval_source: data.Source, key: jax.Array, step: int) -> None:
  """The training figures of `step`: to TensorBoard and to WORKDIR/images/."""
  for name, img in _training_figures(config, vae_state, eval_source, key).items():
    writer.image(step, name, img)
    visualize.save_png(os.path.join(workdir, 'images', f'{name}_{step:07d}.png'), img)


def _final_metrics(workdir: str, step: int) -> dict[str, Any] | None:
  """The final evaluation's results at `step` that the workdir holds, else None."""
  try:
    results = files.read_json(os.path.join(workdir, config_lib.FINAL_METRICS_FILE))
  except (OSError, ValueError):  # none yet, or cut short: evaluated again
    return None
  return results if isinstance(results, dict) and results.get('step') == step else None


def final_evaluation(config: ml_collections.ConfigDict, workdir: str,
                     vae_state: steps.TrainState, run: RunSetup,
                     writer: summary.SummaryWriter, step: int) -> dict[str, Any]:
  """The end-of-training evaluation: the evaluation program's metrics on the eval split.

  step: the run's global step, which labels the results (as eval.py labels a checkpoint);
  the VAE's own update counter lags behind it once gated adversarial steps skip updates.
  """
  model = api.TrainedModel.from_state(config, vae_state, step=step, devices=run.devices)
  results = evaluation.evaluate(config, model, run.eval_source,
                                out_dir=os.path.join(workdir, config_lib.EVAL_DIR),
                                devices=run.devices, writer=writer)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, config_lib.FINAL_METRICS_FILE), results)
    print('final metrics: ' + ', '.join(
        f'{k}={v:.5g}' for k, v in results.items() if isinstance(v, float)), flush=True)
  return results
