"""Evaluates a trained model: Table III metrics, FID at four Inception taps, MIG, figures.

  python eval.py --config=configs/default.py --workdir=/tmp/avae
  python eval.py --config=configs/celeba.py --workdir=/tmp/celeba --step=20000

  python eval.py --workdir=/tmp/avae

Without --config, the config train.py saved in WORKDIR/config.json is used, with any
--config.FIELD=VALUE overrides applied to it (e.g. --config.eval.num_images=1000); with
--config, it must describe the model the workdir holds (its eval.* fields may differ;
changed data settings are named in a warning). Restores the
latest (or --step) checkpoint of WORKDIR and writes WORKDIR/eval/metrics.json, table.md
and the PNG figures (also to TensorBoard under WORKDIR/eval). FID needs the Inception weights:
`python -m avae_jax.inception fetch` (without them FID is skipped with that advice).
"""

import contextlib
import os
import signal
import sys
from typing import Iterator
import warnings

# Ctrl-C while the modules below load (seconds: JAX's) ends the program as the signal does
# by default, without a traceback through the imports; main's own handling
# (distributed.exit_on_interrupt) takes over from there. A background job keeps ignoring it.
if __name__ == '__main__' and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
  signal.signal(signal.SIGINT, signal.SIG_DFL)
# pylint: disable=wrong-import-position

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections

from avae_jax import api
from avae_jax import checkpoint
from avae_jax import cli
from avae_jax import config_lib
from avae_jax import data
from avae_jax import distributed
from avae_jax import evaluation
from avae_jax import files
from avae_jax import hugepages
from avae_jax import parallel
from avae_jax import summary
from avae_jax import xla_flags

_WORKDIR = cli.define_workdir_flag('Training directory holding checkpoints/.')
# Bounded here: a negative step would reach api.TrainedModel.load as a ValueError
# traceback instead of a usage error.
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: latest).',
                             lower_bound=0)
cli.define_config_file('config', None, 'The training configuration file (default: '
                              "the one train.py saved in WORKDIR).", lock_config=True)
# Without --config, the --config.FIELD=VALUE overrides apply to WORKDIR/config.json.
_SAVED_CONFIG_OVERRIDES: list[tuple[str, str | None]] = []


def _parse_flags(argv: list[str]) -> list[str]:
  """cli.parse_flags, keeping the overrides aside when no --config file is given."""
  if cli.config_spec(argv) is None:
    argv, overrides = cli.split_overrides(argv)
    _SAVED_CONFIG_OVERRIDES.extend(overrides)
  return cli.parse_flags(argv)


# What to do after a full disk or a refused file (cli.exit_if_file_error).
_THEN = 'run it again'
# Errors that say what is wrong and what to do: one message, no traceback.
_EXPLAINED = (api.WorkdirError, config_lib.ConfigError, distributed.DistributedConfigError,
              data.DataError, checkpoint.CheckpointError)


@contextlib.contextmanager
def _warnings_as_lines(show: bool = True) -> Iterator[None]:
  """Prints the library's warnings inside as eval.py's one-line warnings (where `show`)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    try:
      yield
    finally:
      for w in caught if show else ():
        print(f'eval.py: warning: {w.message}', file=sys.stderr, flush=True)


def main(argv: list[str]) -> None:
  """Restores the model, evaluates it on the eval split and writes WORKDIR/eval."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  hugepages.reexec()  # first: a restart repeats everything before it
  cli.survive_a_gone_reader()  # `| head`: the work goes on, its output dropped
  config = flags.FLAGS.config
  workdir = _WORKDIR.value
  summary.quiet_library_logs()
  if not files.exists(workdir):
    sys.exit(f'eval.py: error: {workdir} does not exist (the --workdir of a train.py run)')
  try:
    api.refuse_a_file(workdir)
    # Ctrl-C ends the evaluation at once (a KeyboardInterrupt can be lost, see
    # distributed.exit_on_interrupt).
    with distributed.exit_on_interrupt('eval.py: interrupted by Ctrl-C'):
      # Whether num_devices is config.json's: the training machine's count.
      saved_devices = False
      if config is None:
        with _warnings_as_lines():  # the fields an older version's file lacks
          config = api.read_config(workdir, fill_defaults=True)
        if config is None:
          # An untrained workdir (a first run stopped before its first checkpoint) has no
          # config either: what it lacks first is the model.
          api.require_checkpoint(workdir)
          raise api.WorkdirError(f'{workdir} has no {api.CONFIG_FILE} (written by train.py); '
                                 'pass the training config with --config=...')
        cli.apply_overrides(config, _SAVED_CONFIG_OVERRIDES)
        saved_devices = '--config.num_devices' not in dict(_SAVED_CONFIG_OVERRIDES)
      # Relative paths (a --config's, or an older config.json's) name this directory's.
      config_lib.make_paths_absolute(config)
      config_lib.validate_eval(config)
      xla_flags.apply(cpu_devices=config_lib.cpu_devices(config))
      distributed.initialize()
      # With several processes, one that fails alone ends at once (see train.py).
      with distributed.exit_on_error():
        try:
          _evaluate(config, workdir, saved_devices)
        except _EXPLAINED as e:
          # Raised here, inside exit_on_error, as SystemExit: that prints no traceback.
          sys.exit(f'eval.py: error: {e}')
        except Exception as e:  # pylint: disable=broad-except
          cli.exit_if_file_error(e, 'eval.py', _THEN)
          raise
  except _EXPLAINED as e:
    sys.exit(f'eval.py: error: {e}')


# The settings that decide which images the eval split holds (and, for shapes, the seed).
_DATA_FIELDS = ('dataset', 'train_split', 'eval_split', 'eval_fraction', 'crop_size')


def _other_data_settings(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """The data settings of `config` that change the eval images from the training run's.

  As 'field old -> new', against WORKDIR/config.json (nothing where it has none readable).
  """
  try:
    # A field an older version's file lacks had its default's meaning (a missing crop_size
    # was no crop); read_config names such fields where the file is the config.
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      saved = api.read_config(workdir, fill_defaults=True)
  except api.WorkdirError:
    return []
  if saved is None:
    return []
  config_lib.make_paths_absolute(saved)  # as `config`'s were (an older file's are relative)
  on_shapes = config.dataset == 'shapes'
  # The shapes images are rendered at their size: no splits, fraction or crop to change.
  fields = ('dataset', 'seed') if on_shapes else _DATA_FIELDS

  def pick(c: ml_collections.ConfigDict) -> dict[str, object]:
    d = c.to_dict()
    picked = {k: d.get(k) for k in fields}
    if on_shapes:
      # The shapes eval split is drawn from the seed and num_eval alone: num_train changes
      # only the training images, which never include it. Other datasets ignore both.
      picked['shapes'] = {'num_eval': (d.get('shapes') or {}).get('num_eval')}
    return picked
  return [f'{k} {a!r} -> {b!r}' for k, a, b in config_lib.differences(pick(saved), pick(config))]


def _evaluate(config: ml_collections.ConfigDict, workdir: str, saved_devices: bool) -> None:
  """main's work once the config is known and the distributed runtime is up.

  `saved_devices`: config.num_devices is config.json's (not one the command line gave).
  """
  is_main = jax.process_index() == 0  # prints and writes, as in the evaluation itself
  available = len(jax.local_devices())
  if saved_devices and int(config.num_devices) > available:
    # The saved count is the training machine's; the evaluation runs on any count.
    if is_main:
      print(f'eval: {api.CONFIG_FILE} asks for num_devices={config.num_devices}, this '
            f'machine has {available}: using all {available}', flush=True)
    config.num_devices = 0
  devices = parallel.local_devices(config)
  with _warnings_as_lines(is_main):  # a damaged config.json beside a given config
    model = api.TrainedModel.load(workdir, step=_STEP.value, config=config, devices=devices)
  if is_main:
    print(f'eval: restored step {model.step} from {workdir}', flush=True)
  # After the load, which refuses a config whose model does not match the checkpoint's.
  changed = _other_data_settings(workdir, config)
  if changed and is_main:
    # Allowed (another split on purpose), but another seed or eval size on shapes draws
    # another eval set, which may hold the run's training images.
    print(f'eval.py: warning: the eval data differs from the training run\'s '
          f'({api.CONFIG_FILE}): {"; ".join(changed)}; the evaluation images may include '
          'training images', file=sys.stderr, flush=True)
  source = data.load(config, 'eval')
  out_dir = os.path.join(workdir, config_lib.EVAL_DIR)
  if is_main:
    # Before the evaluation's minutes, not at its first write.
    problem = files.output_dir_problem(out_dir, 'the evaluation directory')
    if problem:
      raise api.WorkdirError(problem)
    # Left by an evaluation killed between a write and its rename (train.py's resume
    # removes the workdir's; an evaluation on its own must too).
    removed = files.remove_dead_temporaries(out_dir)
    if removed:
      print(f'eval: removed {len(removed)} temporary file(s) of a killed write in {out_dir}',
            flush=True)
  with summary.SummaryWriter(out_dir, enabled=is_main) as writer:
    evaluation.evaluate(config, model, source, out_dir=out_dir, devices=devices,
                        writer=writer)


if __name__ == '__main__':
  # Warnings only: orbax and XLA log every restore at INFO; progress lines are printed.
  logging.set_verbosity(logging.WARNING)
  app.run(cli.one_line_usage_errors(main, 'eval.py', then=_THEN),
          flags_parser=_parse_flags)
