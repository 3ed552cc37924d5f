"""Step-throughput benchmark of the training steps (used by benchmark.py).

Each case compiles one mapped training step ahead of time (`lower(...).compile()`, so
compile time is measured apart from run time), runs it `warmup` times, then times
`steps` calls, each synchronised with `jax.block_until_ready`. The batches are placed on
the devices before timing: the input pipeline is not part of a step's time. With one
round (`run_case`) the cases are compiled and timed one after the other; with several
(`run_interleaved`) all are compiled first and their steps are timed in turns, so that
a drift of the machine's speed affects every case alike.

Cases:
  pretrain_step           the VAE step on L_VAE (compound loss + KL + TC for avae_s)
  adversarial_step_both   the adversarial step with both updates taken (the gate pinned
                          between the thresholds, 0.6 by default): the step's worst case,
                          compared with the twin's adversarial step (docs/benchmarks.md:
                          the twin's discriminator update is itself gated)
  adversarial_step_gated  the adversarial step with the real gating on the config's data
                          (the procedural shapes in the benchmark configs)
  vae_mse_pretrain_step   the pretrain step of the plain 'vae' variant (MSE + KL): what the
                          compound loss and the TC term add
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from avae_jax import config_lib
from avae_jax import data
from avae_jax import xla_flags

CASES = ('pretrain_step', 'adversarial_step_both', 'adversarial_step_gated',
         'vae_mse_pretrain_step')
# Every JSON line carries these fields (tests/test_benchmark.py checks them).
FIELDS = ('step', 'median_step_s', 'mean_step_s', 'p10_step_s', 'p90_step_s', 'images_per_s',
          'compile_s',
          'flops', 'flops_per_s', 'peak_fraction', 'matmul_peak_flops_per_s',
          'peak_memory_bytes', 'peak_rss_bytes', 'devices', 'dtype', 'image_size',
          'channels', 'batch_size', 'steps', 'rounds', 'rewarm_steps', 'backend', 'device_kind',
          'variant', 'disc_updated_fraction', 'vae_updated_fraction', 'conv_backward', 'xla_flags',
          'glibc_tunables', 'cpu_threads', 'matmul_precision', 'data', 'twin_median_step_s',
          'twin_ratio')
# Dataset size N for the total-correlation term when the data do not say; it only shifts
# constants, never the work done.
DEFAULT_DATASET_SIZE = 200_000
# The twin's step names for our cases (the twin times only these two).
TWIN_STEPS = {'pretrain_step': 'pretrain_step', 'adversarial_step_both': 'adversarial_step'}


def both_updates_accuracy(config: ml_collections.ConfigDict) -> float:
  """The accuracy the 'both' case pins the gate to, between the two thresholds.

  There the discriminator (accuracy < train_disc_below) and the VAE (> train_vae_above)
  both update.
  """
  low, high = float(config.gating.train_vae_above), float(config.gating.train_disc_below)
  if not low < high:
    raise ValueError(f'adversarial_step_both needs gating.train_vae_above ({low:g}) < '
                     f'gating.train_disc_below ({high:g}): no accuracy takes both updates')
  mid = 0.5 * (low + high)
  # The step compares the forced accuracy with the thresholds in float32, where a midpoint
  # can round onto a threshold and skip that update (0.5 and 0.50000005: the VAE's).
  if not np.float32(low) < np.float32(mid) < np.float32(high):
    raise ValueError(f'adversarial_step_both needs gating.train_vae_above ({low!r}) < '
                     f'gating.train_disc_below ({high!r}) in float32, in which the step '
                     'compares them: no accuracy takes both updates')
  return mid


def matmul_peak_flops(n: int = 2048, repeats: int = 5, device: Any = None) -> float:
  """Measured float32 matmul rate (FLOP/s) of one (n, n) @ (n, n) jnp.dot, best of repeats."""
  device = device or jax.devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  b = jax.device_put(jnp.full((n, n), 0.5, jnp.float32), device)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def structured_batches(num: int, batch_size: int, image_size: int, channels: int,
                       seed: int = 0) -> np.ndarray:
  """(num, batch, H, W, C) float32 images of random filled rectangles and discs on black.

  A stand-in for the config's data where it cannot be read (load_batches): images with
  edges and flat regions, so that the discriminator's accuracy (and with it the gating)
  moves as on real data, unlike on uniform noise.
  """
  rng = np.random.default_rng(seed)
  n = num * batch_size
  yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
  out = np.zeros((n, image_size, image_size, channels), np.float32)
  for i in range(n):
    for _ in range(rng.integers(1, 4)):
      cy, cx = rng.uniform(0, image_size, 2)
      r = rng.uniform(0.08, 0.3) * image_size
      colour = rng.uniform(0.3, 1.0, channels).astype(np.float32)
      if rng.random() < 0.5:
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
      else:
        mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= 0.6 * r)
      out[i][mask] = colour
  return out.reshape((num, batch_size, image_size, image_size, channels))


def load_batches(config: ml_collections.ConfigDict, num: int) -> tuple[np.ndarray, int, str]:
  """(batches (num, batch, H, W, C), dataset_size, description) from the config's data.

  Uses avae_jax.data (the benchmark configs name the procedural shapes, which need no
  download); falls back to structured_batches when the dataset cannot be read (a tfds
  dataset that is not prepared, say).
  """
  b, size, channels = int(config.batch_size), int(config.image_size), int(config.channels)
  try:
    source = data.load(config, 'train')
  except data.DataError as e:
    print(f'benchmark: data unavailable ({e}); using synthetic structured images',
          file=sys.stderr)
    return structured_batches(num, b, size, channels), DEFAULT_DATASET_SIZE, 'synthetic'
  images = source.get(np.arange(num * b) % source.num_examples)  # float32
  return (images.reshape((num, b, size, size, channels)), int(source.num_examples),
          str(config.dataset))


def _percentile(times: Sequence[float], q: float) -> float:
  return float(np.percentile(np.asarray(times), q))


def _cost_flops(lowered: Any) -> float | None:
  """'flops' of XLA's cost analysis of one device's step as lowered (None where unavailable).

  The program before optimisation: after it, a GPU's convolutions are cuDNN calls, which
  the analysis does not count (an H200's CelebA-shaped pre-training step came to 2.2 of
  its 167 GFLOP). On a CPU the two counts differ by under 0.5%.
  """
  try:
    cost = lowered.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def _peak_memory(devices: Sequence[Any]) -> int | None:
  """The largest peak_bytes_in_use over the devices' memory_stats(), or None (CPU)."""
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def peak_rss_bytes() -> int:
  """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024)


def case_config(config: ml_collections.ConfigDict, case: str) -> ml_collections.ConfigDict:
  """The config a case runs: the MSE-only case switches the variant to 'vae'."""
  config = copy.deepcopy(config)
  if case == 'vae_mse_pretrain_step':
    with config.unlocked():
      config.variant = 'vae'
  return config


@dataclasses.dataclass
class PreparedCase:
  """One case compiled and warmed up: `call(i)` runs its step on batch and key i."""
  name: str
  config: ml_collections.ConfigDict
  devices: Sequence[Any]
  compile_s: float
  call: Callable[[int], Any]
  flops: float | None = None  # XLA's count for one device's step (_cost_flops)
  metrics: list[Any] = dataclasses.field(default_factory=list)  # of the timed steps
  calls: int = 0

  def run_untimed(self, steps: int) -> None:
    """Runs the next `steps` calls without timing them (warm-up)."""
    for _ in range(steps):
      jax.block_until_ready(self.call(self.calls))
      self.calls += 1

  def time_steps(self, steps: int) -> list[float]:
    """Seconds of the next `steps` synchronised calls; their metrics are kept."""
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      _, metrics = jax.block_until_ready(self.call(self.calls))
      times.append(time.perf_counter() - t)
      self.metrics.append(metrics)
      self.calls += 1
    return times


def prepare_case(config: ml_collections.ConfigDict, case: str, *, steps: int, warmup: int,
                 devices: Sequence[Any], batches: np.ndarray, dataset_size: int,
                 untimed: int = 0) -> PreparedCase:
  """Compiles one case ahead of time and runs its `warmup` untimed steps.

  Keys are made for warmup + steps + `untimed` calls (those run untimed later on).
  """
  from avae_jax import parallel  # pylint: disable=g-import-not-at-top
  from avae_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  if case not in CASES:
    raise ValueError(f'unknown case {case!r}; cases are {", ".join(CASES)}')
  config = case_config(config, case)
  n = len(devices)
  b = int(config.batch_size)
  if b % n:
    raise ValueError(f'batch_size {b} is not divisible by the {n} devices')
  overrides = {}
  if case == 'adversarial_step_both':
    overrides['force_accuracy'] = both_updates_accuracy(config)
  cfg = steps_lib.StepConfig.from_config(config, dataset_size, **overrides)
  mapped = parallel.make_steps(cfg, devices, method=str(config.parallel))
  image_shape = batches.shape[2:]
  vae_state, disc_state = steps_lib.create_train_states(
      config, jax.random.PRNGKey(int(config.seed)), image_shape)
  vae_state = parallel.replicate(vae_state, devices, cfg.axis_name)
  disc_state = parallel.replicate(disc_state, devices, cfg.axis_name)
  # The device batches, laid out as the mapped steps take them (the trainer's layout).
  per_device = b // n
  sharding = NamedSharding(Mesh(np.asarray(devices), (cfg.axis_name,)), P(cfg.axis_name))
  dev_batches = [jax.device_put(x.reshape((n, per_device) + tuple(image_shape)), sharding)
                 for x in batches]
  # The keys are made before timing: each would otherwise add a dispatch to its step. In
  # one program: one dispatch per key took 0.36 ms, 36 s before compiling 100,000 steps.
  base_key = jax.random.PRNGKey(int(config.seed) + 1)
  keys = list(jax.vmap(lambda i: jax.random.fold_in(base_key, i))(
      jnp.arange(warmup + steps + untimed, dtype=jnp.uint32)))
  adversarial = case.startswith('adversarial')

  t0 = time.perf_counter()
  if adversarial:
    lowered = mapped.adversarial.lower(vae_state, disc_state, dev_batches[0], keys[0])
  else:
    lowered = mapped.pretrain.lower(vae_state, dev_batches[0], keys[0])
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  flops = _cost_flops(lowered)  # after the timing: it is not part of the compilation

  states = {'vae': vae_state, 'disc': disc_state}

  def call(i: int) -> Any:
    x = dev_batches[i % len(dev_batches)]
    if adversarial:
      states['vae'], states['disc'], metrics = compiled(states['vae'], states['disc'], x,
                                                        keys[i])
    else:
      states['vae'], metrics = compiled(states['vae'], x, keys[i])
    return states['vae'], metrics

  prepared = PreparedCase(case, config, devices, compile_s, call, flops)
  prepared.run_untimed(warmup)
  return prepared


def case_row(prepared: PreparedCase, times: Sequence[float], *, rounds: int,
             rewarm: int = 0) -> dict[str, Any]:
  """The result row of a timed case: the FIELDS of one JSON line.

  add_matmul_peak fills the two matmul-peak fields.
  """
  config, devices = prepared.config, prepared.devices
  b = int(config.batch_size)
  disc_frac = vae_frac = None
  if prepared.name.startswith('adversarial'):
    disc_frac = float(np.mean([float(m['disc_updated']) for m in prepared.metrics]))
    vae_frac = float(np.mean([float(m['vae_updated']) for m in prepared.metrics]))
  median, mean = float(np.median(times)), float(np.mean(times))
  flops = prepared.flops
  if flops:
    # XLA's cost analysis counts the program of one device; every device runs it.
    flops *= len(devices)
  flops_per_s = flops / median if flops else None
  return dict(
      step=prepared.name,
      median_step_s=median,
      # The gated case's times are bimodal (steps with and without the discriminator's
      # update): the median is one mode, the mean what a run gets, hence the throughput.
      mean_step_s=mean,
      p10_step_s=_percentile(times, 10),
      p90_step_s=_percentile(times, 90),
      images_per_s=b / mean,
      compile_s=prepared.compile_s,
      flops=flops,
      flops_per_s=flops_per_s,
      peak_fraction=None,
      matmul_peak_flops_per_s=None,
      peak_memory_bytes=_peak_memory(devices),
      peak_rss_bytes=peak_rss_bytes(),
      devices=len(devices),
      dtype=str(config.model.dtype),
      image_size=int(config.image_size),
      channels=int(config.channels),
      batch_size=b,
      steps=len(times),
      rounds=int(rounds),
      rewarm_steps=int(rewarm),
      backend=jax.default_backend(),
      device_kind=devices[0].device_kind,
      variant=str(config.variant),
      disc_updated_fraction=disc_frac,
      vae_updated_fraction=vae_frac,
      conv_backward=str(config.model.get('conv_backward', 'auto')),
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      # Huge pages for malloc or not (avae_jax.hugepages) change the step times.
      glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),
      cpu_threads=xla_flags.process_cpu_threads(),  # a pinned process runs on fewer
      # TF32 or full float32 on a recent NVIDIA GPU (JAX_DEFAULT_MATMUL_PRECISION); None:
      # the backend's default.
      matmul_precision=jax.config.jax_default_matmul_precision,
      data=None,  # benchmark.py names the data source (the config's dataset or synthetic)
      twin_median_step_s=None,
      twin_ratio=None,
  )


def add_matmul_peak(row: dict[str, Any], matmul_peak: float | None) -> dict[str, Any]:
  """Fills matmul_peak_flops_per_s and peak_fraction from one device's measured rate."""
  # Accelerators add their rates; a CPU's devices share its cores, and the one
  # measurement used all of them already.
  if matmul_peak and row['backend'] != 'cpu':
    matmul_peak *= row['devices']
  row['matmul_peak_flops_per_s'] = matmul_peak
  row['peak_fraction'] = (row['flops_per_s'] / matmul_peak
                          if row['flops_per_s'] and matmul_peak else None)
  return row


def profile_case(prepared: PreparedCase, directory: str, steps: int) -> None:
  """Traces the case's next `steps` calls with jax.profiler into DIRECTORY/<case>.

  After the timed steps, so that the profiler's cost is in none of them. The trace holds
  an xplane.pb (TensorBoard's profile plugin) and a perfetto_trace.json.gz
  (ui.perfetto.dev); on a CPU it has XLA's per-operation events only with
  xla_flags.PROFILE_FLAGS set before JAX started (benchmark.py sets them).
  """
  with jax.profiler.trace(os.path.join(directory, prepared.name), create_perfetto_trace=True):
    prepared.run_untimed(steps)


def run_case(config: ml_collections.ConfigDict, case: str, *, steps: int, warmup: int,
             devices: Sequence[Any], batches: np.ndarray, dataset_size: int,
             profile_dir: str | None = None, profile_steps: int = 3) -> dict[str, Any]:
  """Compiles and times one case in one block of steps; returns its result row.

  With `profile_dir`, `profile_steps` more steps are then traced (profile_case).
  """
  prepared = prepare_case(config, case, steps=steps, warmup=warmup, devices=devices,
                          batches=batches, dataset_size=dataset_size,
                          untimed=profile_steps if profile_dir else 0)
  row = case_row(prepared, prepared.time_steps(steps), rounds=1)
  if profile_dir:
    profile_case(prepared, profile_dir, profile_steps)
  return row


def round_sizes(steps: int, rounds: int) -> list[int]:
  """`steps` split over `rounds` rounds as evenly as possible (earlier rounds get more)."""
  if rounds < 1 or steps < rounds:
    raise ValueError(f'need 1 <= rounds <= steps, got {rounds} rounds of {steps} steps')
  return [steps // rounds + (r < steps % rounds) for r in range(rounds)]


def run_interleaved(config: ml_collections.ConfigDict, cases: Sequence[str], *, steps: int,
                    warmup: int, rounds: int, devices: Sequence[Any], batches: np.ndarray,
                    dataset_size: int, rewarm: int = 1,
                    on_compiled: Callable[[PreparedCase], None] | None = None,
                    on_round: Callable[[int], None] | None = None,
                    profile_dir: str | None = None, profile_steps: int = 3,
                    ) -> list[dict[str, Any]]:
  """Compiles every case, then times them in rounds: each case's share, in turn.

  A shared machine's speed drifts over minutes; timed in blocks one after the other,
  two cases can differ by more than the effect under study (docs/benchmarks.md).
  Interleaved, every case sees the same drift. The order rotates from round to round,
  so that no case always follows the same one. Each turn starts with `rewarm` untimed
  steps: the first step after other work can be far slower than the steady state (on
  the project's CPU machine the adversarial step's first step after a turn of another
  case took up to 1 s longer, in the kernel, refaulting memory that had been handed
  back; docs/benchmarks.md, item 17). `on_round(steps)` runs first in every round
  (benchmark.py runs the twin's share there). With `profile_dir`, each case then traces
  `profile_steps` more steps (profile_case).
  """
  if rewarm < 0:
    raise ValueError(f'rewarm must be >= 0, got {rewarm}')
  sizes = round_sizes(steps, rounds)
  prepared = []
  for case in cases:
    prepared.append(prepare_case(config, case, steps=steps, warmup=warmup, devices=devices,
                                 batches=batches, dataset_size=dataset_size,
                                 untimed=rounds * rewarm + (profile_steps if profile_dir else 0)))
    if on_compiled:
      on_compiled(prepared[-1])
  times: dict[str, list[float]] = {p.name: [] for p in prepared}
  for r, size in enumerate(sizes):
    if on_round:
      on_round(size)
    for k in range(len(prepared)):
      p = prepared[(r + k) % len(prepared)]
      p.run_untimed(rewarm)
      times[p.name] += p.time_steps(size)
  if profile_dir:
    for p in prepared:
      profile_case(p, profile_dir, profile_steps)
  return [case_row(p, times[p.name], rounds=rounds, rewarm=rewarm) for p in prepared]


# The model and Gabor bank the twin always builds (its command line sets only the sizes;
# its loss has every reconstruction term, KL, TC and the generator loss: twin_problem
# checks those weights apart).
_TWIN_SETTINGS = {'variant': 'avae_s', 'model.latent_dim': 32, 'model.hidden_dim': 48,
                  'loss.tc_estimator': 'mws', 'model.dtype': 'float32', 'gabor.size': 11,
                  'gabor.sigma': 2.5, 'gabor.wavelengths': (4.0, 8.0), 'gabor.orientations': 4}


def twin_problem(python: str, script: str, config: ml_collections.ConfigDict,
                 backend: str = 'cpu', num_devices: int = 1) -> str | None:
  """Why the twin cannot run, or would time other work than `config`'s; else None."""
  if not os.path.isfile(python) or not os.access(python, os.X_OK):
    return f'--twin_python={python} is not an executable file'
  if not os.path.isfile(script):
    return f'--twin_script={script} does not exist'
  if backend not in ('cpu', 'gpu'):
    return f'the twin runs on a CPU or one CUDA GPU, not beside JAX on {backend}'
  if backend != 'cpu' and num_devices != 1:
    return (f'the twin runs on one GPU; use --config.num_devices=1 to compare with it '
            f'(this run has {num_devices})')
  flat = config_lib.flatten(config.to_dict())
  differ = [f'{k}={flat.get(k)!r} (the twin: {v!r})'
            for k, v in _TWIN_SETTINGS.items() if flat.get(k) != v]
  # A term at weight 0 is not computed here; the twin computes every one.
  off = [t for t in config_lib.RECONSTRUCTION_TERMS
         if t not in config_lib.reconstruction_weights(config)]
  off += [name for name in ('kl_weight', 'adversarial_weight')
          if not float(config.loss[name]) > 0]
  off += ['tc_weight'] if not config_lib.tc_weight(config) > 0 else []
  differ += [f'loss {t} at weight 0 (the twin computes it)' for t in off]
  if differ:
    return ('the PyTorch twin builds one model and loss; twin_ratio would compare other '
            'work: ' + ', '.join(differ) + ' (configs/bench_*.py match it)')
  return None


def twin_start_problem(python: str, script: str, device: str = 'cpu') -> str | None:
  """Why the twin fails to run at all (one step of each kind at a tiny size), or None."""
  # 16 px: the twin's SSIM window (11 px, unpadded) must fit in the image.
  tiny = ml_collections.ConfigDict({'image_size': 16, 'channels': 1, 'batch_size': 2,
                                    'model': {'widths': (2,)}})
  try:
    run_twin(python, script, tiny, steps=1, warmup=0, device=device)
  except RuntimeError as e:
    return f'the twin cannot run: {e}'
  return None


def twin_command(python: str, script: str, config: ml_collections.ConfigDict, steps: int,
                 warmup: int, device: str = 'cpu') -> list[str]:
  """The command line that runs the PyTorch twin at the config's sizes on `device`."""
  widths = ','.join(str(int(w)) for w in config.model.widths)
  cmd = [python, script, '--image-size', str(int(config.image_size)), '--channels',
         str(int(config.channels)), '--widths', widths, '--batch', str(int(config.batch_size)),
         '--steps', str(int(steps)), '--warmup', str(int(warmup))]
  return cmd if device == 'cpu' else cmd + ['--device', device]


@contextlib.contextmanager
def _ctrl_c_raises() -> Any:
  """Inside the block, Ctrl-C raises KeyboardInterrupt (Python's own handler).

  benchmark.py's handler ends the process at once (distributed.exit_on_interrupt), which
  would leave a twin that subprocess.run waits for running on; on the KeyboardInterrupt,
  subprocess.run kills it, and the exception then reaches that handler's block. An
  ignored Ctrl-C stays ignored.
  """
  if threading.current_thread() is not threading.main_thread() or \
      signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    yield
    return
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def run_twin(python: str, script: str, config: ml_collections.ConfigDict, steps: int,
             warmup: int, device: str = 'cpu') -> dict[str, Any]:
  """Runs the twin as a subprocess (on torch's `device`) and returns its JSON result."""
  cmd = twin_command(python, script, config, steps, warmup, device)
  with _ctrl_c_raises():
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f'the twin ({" ".join(cmd)}) exited with status {out.returncode}:\n'
                       f'{out.stderr[-3000:]}')
  lines = [l for l in out.stdout.splitlines() if l.strip().startswith('{')]
  if not lines:
    raise RuntimeError(f'the twin printed no JSON line: {out.stdout!r} {out.stderr!r}')
  try:
    result = json.loads(lines[-1])
  except ValueError as e:
    raise RuntimeError(f'the twin\'s last JSON line does not parse ({e}): '
                       f'{lines[-1][:500]!r}') from None
  # Without its step times the comparison would come out empty without a word.
  keys = [name + '_s' for name in TWIN_STEPS.values()]
  if not isinstance(result, dict) or not all(
      isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool)
      for k in keys):
    raise RuntimeError(f'the twin\'s JSON line lacks numbers for {", ".join(keys)}: '
                       f'{lines[-1][:500]!r}')
  return result


def merge_twin_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One twin result from its per-round runs: each step time the median over the runs."""
  if not runs:
    raise ValueError('no twin runs to merge')
  merged = dict(runs[-1])
  for name in TWIN_STEPS.values():
    key = name + '_s'
    values = [float(r[key]) for r in runs if r.get(key)]
    if values:
      merged[key] = float(np.median(values))
  merged['runs'] = len(runs)
  return merged


def add_twin(row: dict[str, Any], twin: dict[str, Any] | None) -> dict[str, Any]:
  """Fills twin_median_step_s and twin_ratio (twin time / avae_jax time) where comparable."""
  if twin and row['step'] in TWIN_STEPS:
    t = twin.get(TWIN_STEPS[row['step']] + '_s')
    if t:
      row['twin_median_step_s'] = float(t)
      row['twin_ratio'] = float(t) / row['median_step_s']
  return row


def _fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
  if value is None:
    return '-'
  return f'{value * scale:.{digits}f}'


def _seconds(value: float | None) -> str:
  """Seconds to three significant digits (a GPU's steps take milliseconds)."""
  return '-' if value is None else f'{value:.3g}'


def _percent(fraction: float | None) -> str:
  """A fraction as a percentage; two significant digits below 1% (a GPU's 0.09%)."""
  if fraction is None:
    return '-'
  return f'{100 * fraction:.0f}%' if 100 * fraction >= 1 else f'{100 * fraction:.2g}%'


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """A fixed-width table of the result rows, for people."""
  header = ('step', 'median s', 'mean s', 'p10 s', 'p90 s', 'img/s', 'compile s', 'GFLOP',
            'GFLOP/s', 'of peak', 'twin s', 'twin/ours')
  lines = []
  for r in rows:
    lines.append((r['step'], _seconds(r['median_step_s']), _seconds(r['mean_step_s']),
                  _seconds(r['p10_step_s']),
                  _seconds(r['p90_step_s']), _fmt(r['images_per_s'], digits=1),
                  _fmt(r['compile_s'], digits=1), _fmt(r['flops'], 1e-9, 1),
                  _fmt(r['flops_per_s'], 1e-9, 1), _percent(r['peak_fraction']),
                  _seconds(r['twin_median_step_s']), _fmt(r['twin_ratio'], digits=2)))
  widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
  fmt = lambda cells: '  '.join(c.rjust(w) if i else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths)))
  out = [fmt(header), fmt(['-' * w for w in widths])] + [fmt(l) for l in lines]
  if rows:
    r = rows[0]
    out.append(f"{r['backend']} ({r['device_kind']}) x{r['devices']}, {r['image_size']}x"
               f"{r['image_size']}x{r['channels']}, batch {r['batch_size']}, {r['dtype']}, "
               f"{r['steps']} timed steps"
               + (f" in {r['rounds']} interleaved rounds, each turn after "
                  f"{r.get('rewarm_steps', 0)} untimed" if r.get('rounds', 1) > 1 else '')
               + "; matmul peak "
               f"{_fmt(r['matmul_peak_flops_per_s'], 1e-9, 1)} GFLOP/s"
               + (f"; {r['cpu_threads']} XLA:CPU threads" if r.get('cpu_threads') else '')
               + (f"; GLIBC_TUNABLES={r['glibc_tunables']}" if r.get('glibc_tunables') else ''))
  return '\n'.join(out)
