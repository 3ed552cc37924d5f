"""Times the training steps: one JSON line per case on stdout, then a table on stderr.

  python benchmark.py --config=configs/bench_celeba.py
  python benchmark.py --config=configs/bench_mnist.py --config.batch_size=128 --steps=20
  python benchmark.py --config=configs/bench_celeba.py --cases=pretrain_step,adversarial_step_both
  python benchmark.py --config=configs/bench_mnist.py --steps=12 --rounds=4
  python benchmark.py --config=configs/bench_mnist.py --cases=adversarial_step_both \\
    --profile_dir=/tmp/profile   # and a jax.profiler trace of 3 more steps

Cases (--cases, comma-separated; default all): pretrain_step, adversarial_step_both (both
updates taken: the gate pinned between the two thresholds, 0.6 by default),
adversarial_step_gated (the real gating on the config's data), vae_mse_pretrain_step (the
MSE-only 'vae' variant). Each JSON line has median/mean/p10/p90 step seconds, images/s
(from the mean), compile seconds, XLA's FLOP count of the step (as lowered), FLOP/s and its
fraction of the float32 matmul rate measured after the cases, peak device memory (null on
CPU) and the process's peak RSS.

--rounds=1 (the default) compiles and times the cases one after the other. With
--rounds=R > 1 every case is compiled first, then the cases take turns, R rounds of
about steps / R steps each (the order rotating between rounds): on a machine whose speed
drifts, comparisons between cases (the compound loss's cost, adversarial against
pre-training) are only fair that way. Each turn of a case starts with --rewarm untimed
steps (default 1): the first step after other work can be much slower than the steady
state. The twin, if asked for, then runs at the start of every round (a fresh process
each time, with its own warm-up), and its step times are the medians over its rounds.

The PyTorch twin (torch_twin.py, the same model in PyTorch) runs at the same sizes with
--twin_python and --twin_script; its step times and the ratio twin / avae_jax (above 1:
avae_jax is faster) are then added to the pretrain and adversarial_step_both lines:

  python3 -m venv /tmp/twin-bench && /tmp/twin-bench/bin/pip install torch==2.13.0 numpy
  python benchmark.py --config=configs/bench_celeba.py \\
    --twin_python=/tmp/twin-bench/bin/python --twin_script=/path/to/torch_twin.py

or run the twin alone with the same sizes (see docs/benchmarks.md):

  /tmp/twin-bench/bin/python torch_twin.py --image-size 96 --channels 3 \\
    --widths 24,48,96,192 --batch 64 --steps 10
"""

import json
import os
import signal
import sys

# Ctrl-C while the modules below load (seconds: JAX's) ends the program as the signal does
# by default, without a traceback through the imports; main's own handling
# (distributed.exit_on_interrupt) takes over from there. A background job keeps ignoring it.
if __name__ == '__main__' and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
  signal.signal(signal.SIGINT, signal.SIG_DFL)
# pylint: disable=wrong-import-position

from absl import app
from absl import flags
import jax
import ml_collections

from avae_jax import benchmarking
from avae_jax import cli
from avae_jax import config_lib
from avae_jax import distributed
from avae_jax import files
from avae_jax import hugepages
from avae_jax import parallel
from avae_jax import summary
from avae_jax import xla_flags

# Beside this file, not in the working directory: it may be run from anywhere.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                               'bench_celeba.py')
cli.define_config_file('config', _DEFAULT_CONFIG,
                              'Configuration file (image size, widths, batch, variant; '
                              'default: configs/bench_celeba.py).')
_STEPS = flags.DEFINE_integer('steps', 10,
                              'Timed steps per case (median, mean, p10, p90 over them).')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps per case after compilation.')
_ROUNDS = flags.DEFINE_integer('rounds', 1,
                               'Rounds the timed steps are split into, the cases taking '
                               'turns in each (1: each case timed in one block).')
_REWARM = flags.DEFINE_integer('rewarm', 1,
                               'With --rounds > 1: untimed steps of a case at the start of '
                               'each of its turns, so that only steady-state steps are timed.')
_CASES = flags.DEFINE_list('cases', list(benchmarking.CASES),
                           f'Cases to run, from {", ".join(benchmarking.CASES)}.')
_PEAK_N = flags.DEFINE_integer('matmul_peak_n', 2048,
                               'Side of the square float32 matmul timed for the peak rate '
                               '(0 skips it; peak_fraction is then null).', lower_bound=0)
_TWIN_PYTHON = cli.define_path_flag('twin_python', '',
                                    'Python of a venv with torch: also run the PyTorch twin.')
_TWIN_SCRIPT = cli.define_path_flag('twin_script', '', 'Path of torch_twin.py.')
_PROFILE_DIR = cli.define_path_flag(
    'profile_dir', '', 'Also trace --profile_steps steps of each case, after its timed ones, '
    'with jax.profiler into DIR/<case> (TensorBoard\'s profile plugin, ui.perfetto.dev).')
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 3, 'Steps per case in the trace.',
                                      lower_bound=1)


def main(argv: list[str]) -> None:
  """Runs the selected cases and prints their results."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  hugepages.reexec()  # first: a restart repeats everything before it
  cli.survive_a_gone_reader()  # `| head`: the work goes on, its output dropped
  # Ctrl-C ends the run at once with one line (a KeyboardInterrupt in a compilation gives
  # a traceback, and at times a segmentation fault; see distributed.exit_on_interrupt).
  with distributed.exit_on_interrupt('benchmark.py: interrupted by Ctrl-C'):
    _run()


def _check_run_flags() -> None:
  """UsageError for --cases, --steps, --warmup, --rewarm, --rounds or --twin_* that cannot run."""
  unknown = [c for c in _CASES.value if c not in benchmarking.CASES]
  if unknown:
    raise app.UsageError(f'unknown cases {unknown}; cases are {", ".join(benchmarking.CASES)}')
  if not _CASES.value or len(set(_CASES.value)) != len(_CASES.value):
    raise app.UsageError(f'--cases must name each case once, got {_CASES.value}')
  if _STEPS.value < 1 or _WARMUP.value < 0 or _REWARM.value < 0:
    raise app.UsageError('--steps must be >= 1, --warmup and --rewarm >= 0')
  if not 1 <= _ROUNDS.value <= _STEPS.value:
    raise app.UsageError(f'--rounds must be between 1 and --steps ({_STEPS.value}), '
                         f'got {_ROUNDS.value}')
  if bool(_TWIN_PYTHON.value) != bool(_TWIN_SCRIPT.value):
    raise app.UsageError('--twin_python and --twin_script go together (a python with torch '
                         'and the path of torch_twin.py)')
  if _PROFILE_DIR.value:
    problem = files.output_dir_problem(_PROFILE_DIR.value, 'the --profile_dir')
    if problem:
      raise app.UsageError(problem)


def _config_and_devices() -> tuple[ml_collections.ConfigDict, list[jax.Device]]:
  """The checked config and this host's devices for it (XLA's CPU flags applied first)."""
  # One process times its host's devices; under launch.py (or on a pod slice) each process
  # would time its own copy of the steps, or wait for the others at start-up.
  try:
    several = distributed.several_processes_requested()
  except distributed.DistributedConfigError as e:
    raise app.UsageError(str(e)) from e
  if several:
    raise app.UsageError('benchmark.py runs in one process on one host; run it without '
                         'launch.py and the distributed flags or AVAE_* settings (on a TPU '
                         'pod slice: on a single-host slice)')
  config = flags.FLAGS.config
  try:
    xla_flags.apply(cpu_devices=config_lib.cpu_devices(config),
                    extra=xla_flags.PROFILE_FLAGS if _PROFILE_DIR.value else None)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  try:
    devices = parallel.local_devices(config)
  except config_lib.ConfigError as e:
    raise app.UsageError(f'--config.{e}') from e
  try:  # train.py's checks: a bad value is one line here too, not a traceback from a step
    config_lib.validate(config, num_devices=len(devices) * jax.process_count())
    if 'adversarial_step_both' in _CASES.value:
      benchmarking.both_updates_accuracy(config)
  except (config_lib.ConfigError, ValueError) as e:
    raise app.UsageError(str(e)) from e
  return config, devices


def _twin_device(config: ml_collections.ConfigDict, devices: list[jax.Device]) -> str:
  """The twin's device ('cuda' beside a GPU backend, else 'cpu'); UsageError if it cannot run."""
  twin_device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
  if _TWIN_PYTHON.value:
    problem = benchmarking.twin_problem(_TWIN_PYTHON.value, _TWIN_SCRIPT.value, config,
                                        backend=jax.default_backend(),
                                        num_devices=len(devices))
    if not problem and _ROUNDS.value > 1:  # its first real run comes after compiling
      problem = benchmarking.twin_start_problem(_TWIN_PYTHON.value, _TWIN_SCRIPT.value,
                                                twin_device)
    if problem:
      raise app.UsageError(problem)
  return twin_device


def _run() -> None:
  """main's work, with Ctrl-C taken care of."""
  summary.quiet_library_logs()
  _check_run_flags()
  config, devices = _config_and_devices()
  # A compilation cache would make compile_s the time to load a cached program.
  jax.config.update('jax_enable_compilation_cache', False)
  twin_device = _twin_device(config, devices)
  twin_runs = []

  def run_twin(steps: int) -> None:
    # Never beside our cases: both use every core.
    try:
      twin_runs.append(benchmarking.run_twin(
          _TWIN_PYTHON.value, _TWIN_SCRIPT.value, config, steps, _WARMUP.value, twin_device))
    except RuntimeError as e:  # the twin's own error, not a traceback of ours
      sys.exit(f'benchmark.py: error: {e}')
    print(f'twin: {json.dumps(twin_runs[-1])}', file=sys.stderr, flush=True)

  twin_in_rounds = bool(_TWIN_PYTHON.value) and _ROUNDS.value > 1
  if _TWIN_PYTHON.value and not twin_in_rounds:
    run_twin(_STEPS.value)

  # Enough distinct batches that the gated case sees a varied stream.
  batches, dataset_size, data_description = benchmarking.load_batches(config, num=8)
  common = dict(steps=_STEPS.value, warmup=_WARMUP.value, devices=devices, batches=batches,
                dataset_size=dataset_size, profile_dir=_PROFILE_DIR.value or None,
                profile_steps=_PROFILE_STEPS.value)
  if _ROUNDS.value == 1:
    rows = []
    for case in _CASES.value:
      rows.append(benchmarking.run_case(config, case, **common))
      print(f'{case}: compiled in {rows[-1]["compile_s"]:.1f} s, median step '
            f'{rows[-1]["median_step_s"]:.4g} s', file=sys.stderr, flush=True)
  else:
    def compiled(prepared: benchmarking.PreparedCase) -> None:
      print(f'{prepared.name}: compiled in {prepared.compile_s:.1f} s', file=sys.stderr,
            flush=True)

    # The twin takes its turn in every round too, so that the ratio twin / ours is
    # measured under the same drift as the cases' comparisons with each other.
    rows = benchmarking.run_interleaved(config, _CASES.value, rounds=_ROUNDS.value,
                                        rewarm=_REWARM.value, on_compiled=compiled,
                                        on_round=run_twin if twin_in_rounds else None,
                                        **common)
  # The matmul rate last: measured first, its (n, n) operands and the autotuning of its
  # product set the device allocator's high-water mark that peak_memory_bytes reports
  # (on an H200 at n = 8192, 1632 MiB in every MNIST-shaped run, whatever the dtype).
  peak = benchmarking.matmul_peak_flops(_PEAK_N.value, device=devices[0]) \
      if _PEAK_N.value > 0 else None
  twin = benchmarking.merge_twin_runs(twin_runs) if twin_runs else None
  for row in rows:
    row['data'] = data_description
    benchmarking.add_matmul_peak(row, peak)
    print(json.dumps(benchmarking.add_twin(row, twin)), flush=True)
  print(benchmarking.format_table(rows), file=sys.stderr)
  if _PROFILE_DIR.value:
    print(f'jax.profiler traces ({_PROFILE_STEPS.value} step(s) per case): '
          + ', '.join(os.path.join(_PROFILE_DIR.value, c) for c in _CASES.value),
          file=sys.stderr)


if __name__ == '__main__':
  app.run(cli.one_line_usage_errors(main, 'benchmark.py'),
          flags_parser=cli.parse_flags)
