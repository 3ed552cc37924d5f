"""The reproduction study: VAE, AVAE, VAE-S and AVAE-S side by side, then the report.

  python study.py --out=studies/cpu                        # the CPU budget (40-55 min, 2 cores)
  python study.py --out=studies/gpu --budget=accelerator   # one GPU / TPU host
  python study.py --out=/tmp/s --budget=test               # tiny, about two minutes

Trains every (dataset, model, seed) of configs/study.py in its own workdir
OUT/<dataset>/<variant>/seed<k>/ (seed 0 of every model first, then seed 1, ...), then
writes OUT/results.md with its figures in OUT/results/. With --publish the report is also
copied to docs/results.md and docs/results/; by default it is for the 'cpu' and
'accelerator' budgets once every dataset, model and seed of the budget has finished.

Rerunning the command on the same OUT skips finished runs (they have final_metrics.json)
and resumes unfinished ones from their checkpoints. The λ's of the compound loss are
calibrated once per dataset (the paper's procedure) and shared by every seed of VAE-S and
AVAE-S; OUT/<dataset>/calibration.json records them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, NamedTuple

from absl import app
from absl import flags
from absl import logging

from avae_jax import cli
from avae_jax import config_lib
from avae_jax import files
from avae_jax import study_report
from configs import study as study_config

_REPO = os.path.dirname(os.path.abspath(__file__))

_OUT = cli.define_path_flag('out', None, 'Study directory: one workdir per run, and the report.')
_BUDGET = flags.DEFINE_enum('budget', None, ['cpu', 'accelerator', 'test'],
                            'Budget of configs/study.py (default: the one OUT/study.json '
                            'records, else cpu).')
_SEEDS = flags.DEFINE_integer('seeds', None, 'Seeds per model (default: the count OUT/'
                               'study.json records, else the budget\'s: 3, the test budget 1); '
                               'it raises a study\'s count, never lowers it.')
_DATASETS = flags.DEFINE_list('datasets', None,
                              'Datasets, from shapes,fashion_mnist (default: both).')
_VARIANTS = flags.DEFINE_list('variants', None,
                              'Models, from vae,avae,vae_s,avae_s (default: all four).')
_PUBLISH = flags.DEFINE_boolean(
    'publish', None, 'Copy the report to docs/results.md and docs/results/ (default: for the '
    'cpu and accelerator budgets when every dataset, model and seed has finished).')
_PUBLISH_DIR = cli.define_path_flag('publish_dir', os.path.join(_REPO, 'docs'),
                                    'Where --publish copies results.md and results/.')
_NOTES = cli.define_path_flag(
    'notes', None, 'A markdown file with the discussion of this run\'s numbers, included in '
    'the report (default: OUT/discussion.md if it exists).')
_REPORT_ONLY = flags.DEFINE_boolean('report_only', False,
                                    'Do not train; write the report from the runs there are.')
_MAX_HOURS = flags.DEFINE_float(
    'max_hours', 0.0, 'Stop starting new runs after this many hours (0: no limit); the '
    'report then says which runs are missing. Rerun to continue.')

REPORT_LOCK = 'report.lock'  # held by the process writing study.json or the report
CALIBRATION_LOCK = 'calibration.lock'  # held by the process calibrating a dataset
HEARTBEAT_S = 30.0  # how often a session in progress rewrites its study_run.json
_COMPILATION_CACHE = '.jax_cache'  # OUT's persistent XLA cache


def _write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (files.write_json: a random temporary name, synced, renamed)."""
  files.write_json(path, obj, str)


def study_budget(out: str) -> str:
  """--budget, else the budget OUT/study.json records (a rerun or --report_only), else cpu."""
  if _BUDGET.value is not None:
    return _BUDGET.value
  path = os.path.join(out, study_report.STUDY_FILE)
  return str(files.read_json(path).get('budget', 'cpu')) if os.path.exists(path) else 'cpu'


def settings_from_flags(budget: str) -> Any:
  """The study's settings: configs/study.py at `budget` with --seeds/--datasets applied."""
  s = study_config.get_config(budget)
  if _SEEDS.value is not None:
    if _SEEDS.value < 1:
      raise app.UsageError('--seeds must be >= 1')
    s.seeds = int(_SEEDS.value)
  for flag, field, valid in ((_DATASETS, 'datasets', study_config.DATASETS),
                             (_VARIANTS, 'variants', study_config.VARIANTS)):
    if flag.value is not None:
      bad = [v for v in flag.value if v not in valid]
      if bad or not flag.value:
        raise app.UsageError(f'--{field} takes names from {",".join(valid)}; got {bad}')
      s[field] = ','.join(v for v in valid if v in flag.value)  # canonical order
  return s


def check_study_file(out: str, settings: Any, report_only: bool = False,
                     seeds_given: bool = True) -> int:
  """Records the budget in OUT/study.json; refuses an OUT written at another budget.

  Returns the study's seed count: the first command's (its --seeds or the budget's),
  raised by any later command's --seeds (`seeds_given`).

  The trainer would happily continue a finished run with more steps, so mixing budgets
  in one directory would silently give models different budgets. The commands that ran
  the study are kept ('commands', in order, e.g. one per dataset), and the one that wrote
  the report last ('report_command'), for the report's first line.
  """
  path = os.path.join(out, study_report.STUDY_FILE)
  budget = {d: settings[d].to_dict() for d in study_config.DATASETS}
  if os.path.exists(path):
    saved = files.read_json(path)
    if json.loads(json.dumps(saved['per_dataset'], default=str)) != \
        json.loads(json.dumps(budget, default=str)):
      raise app.UsageError(
          f'{out} holds a study run at another budget ({saved.get("budget")}); use another '
          '--out (every model of a study must get the same budget)')
    if seeds_given:
      if report_only and int(settings.seeds) > int(saved['seeds']):
        # The next plain rerun would train the seeds a report-only command added.
        raise app.UsageError(
            f'--seeds={settings.seeds} would raise the study\'s seed count '
            f'({saved["seeds"]}), which --report_only leaves as it is; run without '
            '--report_only to add seeds')
      saved.update(seeds=max(int(saved['seeds']), int(settings.seeds)))
    record = saved
  else:
    record = {'budget': settings.budget, 'per_dataset': budget, 'seeds': int(settings.seeds),
              'num_devices': int(settings.num_devices), 'created': time.time()}
  command = ' '.join(['python'] + [os.path.basename(sys.argv[0])] + sys.argv[1:])
  commands = record.get('commands', [])
  if not report_only and command not in commands:
    commands.append(command)
  record.update(commands=commands, report_command=command)
  _write_json(path, record)
  return int(record['seeds'])


def _shared_files_lock(out: str) -> contextlib.AbstractContextManager[None]:
  """The lock (OUT/report.lock) held while writing study.json, the report or its figures.

  Several study.py processes may share OUT (one per dataset, see the README), and a report
  rewrites OUT/results/ as a whole: they take turns.
  """
  return files.exclusive(out, 'study.py', wait=True, lock_file=REPORT_LOCK)


def calibrate(out: str, settings: Any, dataset: str) -> dict[str, float]:
  """The λ's of `dataset`, calibrated once (seed 0's initial VAE-S) and then reused.

  The paper probed the loss terms once and used the weights "in all the experiments
  thereafter"; calibrating per seed would make the λ's a source of seed-to-seed spread.
  This is trainer.calibrate_weights applied to seed 0's initial state with seed 0's key,
  i.e. the weights seed 0's run would compute with calibrate.enabled=True.

  Processes sharing OUT take turns (OUT/<dataset>/calibration.lock): one calibrates, the
  others wait and read its λ's.
  """
  path = os.path.join(out, dataset, study_report.CALIBRATION_FILE)
  if os.path.exists(path):
    return files.read_json(path)['weights']
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Two processes calibrating at once would spend the minutes twice, and the later file
  # would replace the λ's the other's runs were given.
  with files.exclusive(os.path.dirname(path), 'study.py', wait=True,
                       lock_file=CALIBRATION_LOCK):
    if os.path.exists(path):
      return files.read_json(path)['weights']
    return _calibrate_held(path, settings, dataset)


def _calibrate_held(path: str, settings: Any, dataset: str) -> dict[str, float]:
  """calibrate's work, while this process holds the dataset's CALIBRATION_LOCK."""
  from avae_jax import data, parallel, steps, trainer  # pylint: disable=g-import-not-at-top
  config = study_config.run_config(settings, dataset, 'vae_s', 0)
  started = time.monotonic()
  source = data.load(config, 'train')
  keys = trainer.run_keys(int(config.seed))
  vae_state, _ = steps.create_train_states(config, keys.init, source.image_shape)
  devices = parallel.local_devices(config)
  weights = trainer.calibrate_weights(config, vae_state, source, devices, keys.calibration)
  _write_json(path, {'weights': weights, 'batches': int(config.calibrate.batches),
                     'batch_size': int(config.batch_size), 'seed': int(config.seed),
                     'wall_s': time.monotonic() - started})
  print(f'[study] {dataset}: calibrated λ\'s over {config.calibrate.batches} batches: ' +
        ', '.join(f'{k}={v:.4g}' for k, v in weights.items()), flush=True)
  return weights


def train_one(out: str, settings: Any, dataset: str, variant: str, seed: int,
              weights: dict[str, float] | None) -> str:
  """Trains and evaluates one run (resuming it if it has checkpoints); returns its status.

  A run that another study.py process is training (processes sharing OUT with overlapping
  --datasets/--variants) is skipped, its study_run.json left to that process.
  """
  workdir = study_report.run_dir(out, dataset, variant, seed)
  info_path = os.path.join(workdir, study_report.RUN_FILE)
  if study_report.is_finished(workdir) and not _recorded_as_running(info_path):
    return 'done'
  os.makedirs(workdir, exist_ok=True)
  lock = study_report.RUN_LOCK  # the report probes it to tell a run in progress
  with contextlib.ExitStack() as stack:
    try:
      try:
        stack.enter_context(files.exclusive(workdir, 'study.py', lock_file=lock))
      except files.LockedError:
        # A report being written holds the lock for an instant to see whether a run
        # recorded as running still is (study_report.is_being_trained): once more.
        time.sleep(0.5)
        stack.enter_context(files.exclusive(workdir, 'study.py', lock_file=lock))
    except files.LockedError as e:
      if study_report.is_finished(workdir):
        return 'done'  # its process is recording the end
      # Left to the trainer's own lock it would be a failed run, and this process would
      # write that failure over the study_run.json of the process training it.
      status = f'skipped: being trained by another process ({e})'
      print(f'[study] {dataset} {variant} seed {seed}: {status}', flush=True)
      return status
    # Another process may have finished it since the check above: not evaluated twice.
    if study_report.is_finished(workdir):
      if _recorded_as_running(info_path):
        # Killed between the final metrics and its record: the session was killed, and
        # no later session would count it (a finished run is not trained again).
        info = _read_run_info(info_path)
        info.pop('error', None)  # an earlier session's failure, which this one made good
        info.update(status='done', finished=os.path.getmtime(
            os.path.join(workdir, config_lib.FINAL_METRICS_FILE)))
        _write_json(info_path, info)
      return 'done'
    return _train_held(out, settings, dataset, variant, seed, weights)


def _train_held(out: str, settings: Any, dataset: str, variant: str, seed: int,
                weights: dict[str, float] | None) -> str:
  """train_one's work, in a workdir whose study_report.RUN_LOCK this process holds."""
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  from avae_jax import trainer  # pylint: disable=g-import-not-at-top
  from avae_jax import xla_flags  # pylint: disable=g-import-not-at-top
  workdir = study_report.run_dir(out, dataset, variant, seed)
  info_path = os.path.join(workdir, study_report.RUN_FILE)
  info = _read_run_info(info_path)
  info['sessions'] += 1
  # Recorded before training: a process killed outright (SIGKILL, out of memory) never
  # writes the record below, and the report would show the run's previous status.
  info.update(status=study_report.RUNNING, started=time.time())
  info['alive'] = info['started']
  info.pop('finished', None)
  threads = xla_flags.process_cpu_threads()  # on a CPU, it sets the float32 sums' order
  if threads is not None:
    info['cpu_threads'] = threads
  _write_json(info_path, info)
  config = study_config.run_config(settings, dataset, variant, seed,
                                   weights if variant.endswith('_s') else None)
  print(f'[study] {dataset} {variant} seed {seed}: training in {workdir}'
        + (' (resuming)' if info['sessions'] > 1 else ''), flush=True)
  started = time.monotonic()
  status = 'done'
  interrupted = stopper = None

  def ended(status: str) -> float:
    """Records the session's end in `info` (the caller writes it); returns its seconds."""
    elapsed = time.monotonic() - started
    info['wall_s'] += elapsed
    info.update(status=status, finished=time.time())
    info.pop('alive', None)
    if status == 'done':
      info.pop('error', None)  # an earlier session's failure, which this one made good
    return elapsed

  try:
    with _heartbeat(info_path, info) as halt_heartbeat:

      def exit_now_record(code: int) -> None:
        # Ctrl-C outside the training loop (calibration, compilation, evaluation) ends the
        # process at once (distributed.exit_on_interrupt): an interruption, not a kill.
        halt_heartbeat()
        ended('interrupted: Ctrl-C outside the training loop' if code == 130
              else f'interrupted: the process ended with status {code}')
        _write_json(info_path, info)

      with distributed.before_exit_now(exit_now_record):
        trainer.train_and_evaluate(config, workdir)
  except trainer.TrainingInterrupted as e:  # checkpointed: the study stops, a rerun resumes
    status, interrupted = f'interrupted: {e}', e
  except Exception as e:  # pylint: disable=broad-except
    stopper = _stops_the_study(e)
    if stopper is not None:
      # Every later run would fail the same way: the study stops (one line, main's), and
      # a rerun resumes this run from its last checkpoint.
      status, interrupted = f'interrupted: {stopper}', e
    else:
      # One failed run (e.g. a NaN) must not stop the other runs; the report lists it.
      status = f'failed: {type(e).__name__}: {e}'
      info['error'] = traceback.format_exc()
      print(f'[study] {dataset} {variant} seed {seed} FAILED: {e}', flush=True)
  elapsed = ended(status)
  print(f'[study] {dataset} {variant} seed {seed} ({elapsed:.0f} s): {status}', flush=True)
  try:
    _write_json(info_path, info)
  except OSError:
    if stopper is None:
      raise
    # No room for the record either, or no access: it stays 'running', which a rerun
    # counts as killed; the study stops with the first error, not this one.
  if interrupted is not None:
    raise interrupted
  return status


def _stops_the_study(error: BaseException) -> str | None:
  """What in error stops the whole study (a full disk, a refused file); None: its run only."""
  from avae_jax import data  # pylint: disable=g-import-not-at-top
  no_space = files.out_of_space(error)
  if no_space is not None:
    return f'out of disk space ({no_space})'
  # An image the data cannot read fails its run (a DataError, from its cause), not the
  # study; a refused workdir file would fail every later run too.
  refused = None if isinstance(error, data.DataError) else files.denied(error)
  return None if refused is None else str(refused)


def _recorded_as_running(info_path: str) -> bool:
  """Whether the run's study_run.json records a session as running."""
  try:
    return files.read_json(info_path).get('status') == study_report.RUNNING
  except (OSError, ValueError, AttributeError):  # none yet, unreadable or not an object
    return False


def _read_run_info(info_path: str) -> dict[str, Any]:
  """A run's study_run.json, with the time of a session that was killed counted in.

  Called with the run's study_report.RUN_LOCK held, so a session still recorded as running
  is not running anywhere: its process was killed. Its time up to its last heartbeat joins
  wall_s (a lower bound of what it ran), and killed_sessions counts it.
  """
  if not os.path.exists(info_path):
    return {'wall_s': 0.0, 'sessions': 0}
  info = files.read_json(info_path)
  if info.get('status') == study_report.RUNNING:
    info['wall_s'] += study_report.session_s(info)  # as the report counts it
    info['killed_sessions'] = int(info.get('killed_sessions', 0)) + 1
    info['status'] = 'interrupted (process killed)'
    info.pop('alive', None)
  return info


@contextlib.contextmanager
def _heartbeat(info_path: str, info: dict[str, Any]) -> Iterator[Callable[[], None]]:
  """Inside the block, rewrites the run's record every HEARTBEAT_S seconds with 'alive'.

  Yields the function that stops the rewrites (the block's end calls it too).

  If the process is killed, the report (and the rerun) count the session's time up to
  the last of these records instead of losing it.
  """
  record = dict(info)
  stop = threading.Event()

  def beat() -> None:
    while not stop.wait(HEARTBEAT_S):
      record['alive'] = time.time()
      try:
        _write_json(info_path, record)
      except OSError:
        pass  # a full disk must not stop the training; the last record stands

  thread = threading.Thread(target=beat, name='study-heartbeat', daemon=True)
  thread.start()

  def halt() -> None:
    # Joined before the caller's final record, which a late heartbeat would overwrite.
    stop.set()
    thread.join()
  try:
    yield halt
  finally:
    halt()


def _record_failure(workdir: str, status: str) -> None:
  """Records in the run's study_run.json why it could not start (the report shows it)."""
  os.makedirs(workdir, exist_ok=True)
  info_path = os.path.join(workdir, study_report.RUN_FILE)
  try:
    with files.exclusive(workdir, 'study.py', lock_file=study_report.RUN_LOCK):
      info = _read_run_info(info_path)
      info.pop('error', None)  # an earlier session's traceback, not this failure's
      info.update(status=status, finished=time.time())
      _write_json(info_path, info)
  except files.LockedError:
    pass  # another process is training it (with its own λ's): its record stands


def check_datasets(settings: Any) -> None:
  """Opens both splits of each of the study's datasets; UsageError names one that cannot be.

  Before any run: a missing dataset (Fashion-MNIST without Debian's package) would
  otherwise fail its runs one by one, or stop the study at its calibration, hours in.
  """
  from avae_jax import data  # pylint: disable=g-import-not-at-top
  for dataset in study_report.setting_list(settings, 'datasets'):
    config = study_config.run_config(settings, dataset, 'vae', 0)
    try:
      data.load_splits(config)
    except data.DataError as e:
      hint = ('; on Debian: apt-get install dataset-fashion-mnist'
              if dataset == 'fashion_mnist' else '')
      raise app.UsageError(f'dataset {dataset}: {e}{hint}') from None


class RunStatus(NamedTuple):
  """How one run of the study ended in this session ('done', 'failed: ...', 'skipped: ...')."""
  dataset: str
  variant: str
  seed: int
  status: str


def run_study(out: str, settings: Any, max_hours: float = 0.0) -> list[RunStatus]:
  """Trains every missing run, seed-major so that early seeds complete first."""
  datasets = study_report.setting_list(settings, 'datasets')
  variants = study_report.setting_list(settings, 'variants')
  started = time.monotonic()
  statuses = []
  calibration_failed: dict[str, str] = {}

  def out_of_time() -> bool:
    return bool(max_hours) and (time.monotonic() - started) > max_hours * 3600

  for seed in range(int(settings.seeds)):
    for dataset in datasets:
      weights = None
      # Past --max_hours no run starts, so none needs the λ's (a calibration takes
      # minutes at the accelerator budget).
      if (any(v.endswith('_s') for v in variants) and not out_of_time()
          and dataset not in calibration_failed):
        try:
          weights = calibrate(out, settings, dataset)
        except Exception as e:  # pylint: disable=broad-except
          if _stops_the_study(e) is not None:
            raise  # as at a run's full disk (train_one)
          # Like a failed run: the models that need no λ's, and the other datasets, go
          # on, and the report lists the failure. Not retried each seed: it would fail
          # again, minutes each time.
          calibration_failed[dataset] = f'{type(e).__name__}: {e}'
          print(f'[study] {dataset}: calibration FAILED: {calibration_failed[dataset]}\n'
                + traceback.format_exc(), file=sys.stderr, flush=True)
      for variant in variants:
        workdir = study_report.run_dir(out, dataset, variant, seed)
        if out_of_time() and not study_report.is_finished(workdir):
          statuses.append(RunStatus(dataset, variant, seed, 'skipped: --max_hours reached'))
          continue
        if (variant.endswith('_s') and dataset in calibration_failed
            and not study_report.is_finished(workdir)):
          # Trained without the λ's it would silently be a model with the default weights.
          status = f'failed: calibration of {dataset}: {calibration_failed[dataset]}'
          _record_failure(workdir, status)
          statuses.append(RunStatus(dataset, variant, seed, status))
          continue
        statuses.append(RunStatus(dataset, variant, seed,
                                  train_one(out, settings, dataset, variant, seed, weights)))
  return statuses


def _enable_compilation_cache(out: str) -> None:
  """Persistent XLA cache: runs that share a program (seeds, vae/avae pre-training) compile once.

  In OUT/.jax_cache, unless JAX_COMPILATION_CACHE_DIR names a cache of the user's.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.join(out, _COMPILATION_CACHE))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def _check_flags(argv: list[str]) -> None:
  """UsageError for flags that cannot name a study (before anything else runs)."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _OUT.value.strip():
    # os.path.abspath('') is the working directory: `--out=$UNSET` would put the study's
    # runs and report in the checkout.
    raise app.UsageError('--out is empty: give the study\'s directory')
  if '://' in _OUT.value:
    # The report reads every run's metrics.jsonl, which object stores cannot append to.
    raise app.UsageError(f'--out={_OUT.value}: the study needs a local directory')
  if _MAX_HOURS.value < 0:
    # A negative limit is reached at once: every run would be skipped.
    raise app.UsageError(f'--max_hours={_MAX_HOURS.value:g}: must be >= 0 (0: no limit)')
  if _NOTES.value is not None and not os.path.isfile(_NOTES.value):
    # A mistyped path would leave the discussion out of the report (and the published one).
    raise app.UsageError(f'--notes={_NOTES.value}: no such file')


def _train(out: str, settings: Any) -> list[RunStatus]:
  """Trains the study's missing runs; returns those that failed."""
  _enable_compilation_cache(out)
  t0 = time.monotonic()
  from avae_jax import distributed  # pylint: disable=g-import-not-at-top
  from avae_jax import trainer  # pylint: disable=g-import-not-at-top
  try:
    # Ctrl-C outside a run's training loop (calibration, evaluation) ends the study at
    # once; inside it, the run checkpoints its step first (TrainingInterrupted).
    with distributed.exit_on_interrupt('[study] interrupted by Ctrl-C; the same study.py '
                                       'command resumes the study'):
      statuses = run_study(out, settings, _MAX_HOURS.value)
  except trainer.TrainingInterrupted as e:
    print(f'[study] {e}; the same study.py command resumes the study', file=sys.stderr,
          flush=True)
    sys.exit(128 + e.signum)
  failed = [s for s in statuses if s.status != 'done']
  print(f'[study] {len(statuses) - len(failed)}/{len(statuses)} runs finished '
        f'(this session: {time.monotonic() - t0:.0f} s)', flush=True)
  return [s for s in failed if s.status.startswith('failed')]


def _report_and_publish(out: str, settings: Any) -> None:
  """Writes OUT's report, and copies it to --publish_dir where that is asked or due."""
  notes = _NOTES.value
  if notes is None and os.path.exists(os.path.join(out, 'discussion.md')):
    notes = os.path.join(out, 'discussion.md')
  with _shared_files_lock(out):
    report = study_report.write_report(out, settings, notes_path=notes, host=_host())
    print(f'[study] wrote {report}', flush=True)
    runs = [(d, v, seed) for d in study_report.setting_list(settings, 'datasets')
            for v in study_report.setting_list(settings, 'variants')
            for seed in range(int(settings.seeds))]
    finished = sum(study_report.is_finished(study_report.run_dir(out, *run)) for run in runs)
    publish = _PUBLISH.value
    if publish is None and settings.budget != 'test':
      # By default only the whole study replaces the checkout's report: one process of a
      # split study, or a study stopped by --max_hours, would publish part of it.
      partial = _partial(settings, finished, len(runs))
      if partial:
        print(f'[study] not published ({partial}): {_PUBLISH_DIR.value} keeps the report '
              'it has; --publish publishes this one', file=sys.stderr, flush=True)
      publish = not partial
    if publish and not finished:
      print(f'[study] not published: no run has finished, so {_PUBLISH_DIR.value} keeps the '
            'report it has', file=sys.stderr, flush=True)
    elif publish:
      dest = study_report.publish(out, _PUBLISH_DIR.value, notes_path=notes)
      print(f'[study] published to {dest}', flush=True)
      kept = study_report.published_notes(_PUBLISH_DIR.value)
      if notes is None and os.path.exists(kept):
        print(f'[study] kept {kept}, the discussion of the report published before, which '
              f'this report leaves out (--notes={kept} includes it)', file=sys.stderr,
              flush=True)


def main(argv: list[str]) -> None:
  """Runs the study (or only its report) and publishes the report if asked."""
  _check_flags(argv)
  from avae_jax import hugepages  # pylint: disable=g-import-not-at-top
  hugepages.reexec()  # first: a restart repeats everything before it
  cli.survive_a_gone_reader()  # `| head`: the study goes on, its output dropped
  from avae_jax import xla_flags  # pylint: disable=g-import-not-at-top
  xla_flags.apply()
  from avae_jax import summary  # pylint: disable=g-import-not-at-top
  summary.quiet_library_logs()
  out = os.path.abspath(_OUT.value)
  settings = settings_from_flags(study_budget(out))
  if _REPORT_ONLY.value and not os.path.exists(os.path.join(out, study_report.STUDY_FILE)):
    # A mistyped --out would otherwise give an empty report, published over docs/.
    raise app.UsageError(f'--out={_OUT.value} holds no study (no {study_report.STUDY_FILE}); '
                         '--report_only reports on the runs of an existing study')
  problem = files.output_dir_problem(out, 'the study directory (--out)')
  if not problem and (_PUBLISH.value or (_PUBLISH.value is None and settings.budget != 'test')):
    # Now, not when the report is published: after the whole study.
    problem = (files.output_dir_problem(_PUBLISH_DIR.value, 'the --publish_dir')
               or study_report.publish_problem(out, _PUBLISH_DIR.value))
  if problem:
    raise app.UsageError(problem)
  # A killed write's temporaries (train.py removes those of a run it trains; a finished
  # run's record and the study's own files are written here). Those of another study
  # process sharing OUT are kept while it lives.
  removed = files.remove_dead_temporaries(out, skip=(config_lib.CHECKPOINT_DIR, _COMPILATION_CACHE))
  if removed:
    print(f'[study] removed {len(removed)} temporary file(s) of a killed write in {out}',
          flush=True)
  if not _REPORT_ONLY.value:
    # Before the study file records this command's budget: a study that cannot start
    # must not hold its --out to a budget at which nothing ran.
    check_datasets(settings)
  with _shared_files_lock(out):
    seeds = check_study_file(out, settings, report_only=_REPORT_ONLY.value,
                             seeds_given=_SEEDS.value is not None)
  # A study extended with --seeds=5 stays at 5: a later command without the flag, or with
  # a smaller --seeds (a rerun, the report), must not leave the extra seeds out.
  settings.seeds = seeds
  failed_runs = [] if _REPORT_ONLY.value else _train(out, settings)
  _report_and_publish(out, settings)
  if failed_runs:
    # Last, and in the exit status: a script or a scheduler running the study must not
    # take it for a success, and the FAILED lines lie hours back in the log.
    print(f'[study] {len(failed_runs)} run(s) failed (their study_run.json has the '
          'traceback; a rerun retries them): ' + '; '.join(
              f'{d} {v} seed {k}: {status}' for d, v, k, status in failed_runs),
          file=sys.stderr, flush=True)
    sys.exit(1)


def _partial(settings: Any, finished: int, total: int) -> str:
  """Why the report is not the whole study of its budget ('' when it is)."""
  whole = study_config.get_config(settings.budget)
  left_out = [f'--{field}={settings[field]}' for field in ('datasets', 'variants')
              if settings[field] != whole[field]]
  if int(settings.seeds) < int(whole.seeds):
    # A quick --seeds=1 study is not the budget's study, however complete.
    left_out.append(f'--seeds={settings.seeds}')
  if left_out:
    return f'the study of {" and ".join(left_out)} only'
  if finished < total:
    return f'{total - finished} of its {total} runs have not finished'
  return ''


def _host() -> dict[str, Any]:
  """The machine the study ran on, for the report."""
  import jax  # pylint: disable=g-import-not-at-top
  return {'platform': platform.platform(), 'python': platform.python_version(),
          'cpu_count': os.cpu_count(), 'jax': jax.__version__,
          'devices': [str(d) for d in jax.local_devices()],
          'backend': jax.default_backend()}


if __name__ == '__main__':
  flags.mark_flags_as_required(['out'])
  logging.set_verbosity(logging.WARNING)
  app.run(cli.one_line_usage_errors(
      main, 'study.py', then='run the same study.py command to resume the study'))
