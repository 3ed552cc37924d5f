"""Trains an AVAE-S model (or VAE / AVAE / VAE-S) and evaluates it.

  python train.py --config=configs/default.py --workdir=/tmp/avae
  python train.py --config=configs/celeba.py --workdir=gs://bucket/run --config.batch_size=256

Running again on a workdir that has checkpoints resumes from the latest one. SIGTERM or
Ctrl-C during training lets the step in progress finish, checkpoints it, then stops.
"""

import signal
import sys
from typing import NoReturn

# Ctrl-C while the modules below load (seconds: JAX's) ends the program as the signal does
# by default, without a traceback through the imports; main's own handling
# (distributed.exit_on_interrupt) takes over from there. A background job keeps ignoring it.
if __name__ == '__main__' and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
  signal.signal(signal.SIGINT, signal.SIG_DFL)
# pylint: disable=wrong-import-position

from absl import app
from absl import flags
from absl import logging

from avae_jax import checkpoint
from avae_jax import cli
from avae_jax import config_lib
from avae_jax import data
from avae_jax import distributed
from avae_jax import hugepages
from avae_jax import summary
from avae_jax import trainer
from avae_jax import xla_flags

_WORKDIR = cli.define_workdir_flag('Directory for checkpoints, summaries and figures.')
cli.define_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flag_as_required('config')


# A wrong setting, missing data or a diverged loss: the message says what to do; a
# traceback through the trainer would only bury it.
_EXPLAINED = (config_lib.ConfigError, distributed.DistributedConfigError, data.DataError,
              trainer.NonFiniteLossError, checkpoint.CheckpointError)


# What to do after a full disk or a refused file (cli.exit_if_file_error).
_THEN = 'run the same command to resume from the latest checkpoint (those saved so far are kept)'


_INTERRUPTED = ('train.py: interrupted by Ctrl-C; the checkpoints saved so far are kept, and '
                'the same command resumes from the latest one')


def main(argv: list[str]) -> None:
  """Entry point: initialise the distributed runtime if asked, then train and evaluate."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  hugepages.reexec()  # first: a restart repeats everything before it
  cli.survive_a_gone_reader()  # `| head`: the work goes on, its output dropped
  config = flags.FLAGS.config
  try:
    # Ctrl-C outside the training loop (start-up, calibration, evaluation), or a second
    # one inside it, ends the run at once: nothing to checkpoint then, and a traceback
    # would tell nothing.
    with distributed.exit_on_interrupt(_INTERRUPTED):
      xla_flags.apply(cpu_devices=config_lib.cpu_devices(config))
      summary.quiet_library_logs()
      distributed.initialize()
      # With several processes, one that fails alone ends at once, so that the others
      # stop within the distributed timeout instead of waiting for it at exit. A stop by
      # signal happens in every process at the same step.
      with distributed.exit_on_error(together=(trainer.TrainingInterrupted,)):
        try:
          trainer.train_and_evaluate(config, _WORKDIR.value)
        except _EXPLAINED as e:
          _fail(e)
        except Exception as e:  # pylint: disable=broad-except
          cli.exit_if_file_error(e, 'train.py', _THEN)
          raise
  except trainer.TrainingInterrupted as e:
    print(f'train.py: {e}; run the same command again to resume', file=sys.stderr,
          flush=True)
    sys.exit(128 + e.signum)  # the shell's status for death by that signal
  except _EXPLAINED as e:
    _fail(e)


def _fail(error: Exception) -> NoReturn:
  """Prints one line for an error that explains itself and exits with status 1."""
  print(f'train.py: error: {error}', file=sys.stderr, flush=True)
  sys.exit(1)


if __name__ == '__main__':
  logging.set_verbosity(logging.INFO)
  app.run(cli.one_line_usage_errors(main, 'train.py', then=_THEN),
          flags_parser=cli.parse_flags)
