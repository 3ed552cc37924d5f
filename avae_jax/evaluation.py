"""The evaluation program: the paper's Table III metrics, FID at four taps, MIG, figures.

`evaluate` runs over the first config.eval.num_images images of the eval split (the same
images for every model compared, since FID is biased by sample size):

  * sharpness (variance of the Laplacian of the luma) of the images, of their
    reconstructions decode(mu) and of as many random samples decode(z), z ~ N(0, I)
    drawn from a key fixed by config.seed;
  * MSE and cosine similarity between images and reconstructions;
  * FID of the reconstructions and of the random samples against the images, at the
    Inception taps 64, 192, 768 and 2048 (skipped, with the reason in the results, when
    config.eval.fid is False or the weights are missing);
  * MIG of the posterior means on datasets with ground-truth factors (shapes, dsprites),
    over config.eval.mig_num_images images (0: the whole eval split; its plug-in
    estimate is biased upwards on few images), with the MIG of the same codes shuffled
    across images, the estimator's floor at that count;

Keys of the results (and metrics.json): step; num_images, num_samples, fid_num_images
(how many images each metric used); gt_/rec_/sample_sharpness_mean/_std;
rec_mse(_std), rec_cosine_similarity(_std) (per-image values, mean and std over images);
kl_mean (KL(q(z|x) || N(0, I)) summed over the latent dims, mean over images);
fid_rec_{64,192,768,2048}, fid_sample_{...}; on a dataset with factors mig, mig_shuffled
and mig_num_images; and 'fid_skipped' / 'mig_skipped' (the reason, a string) in place of
the FID / MIG keys when those were not computed.

`evaluate` writes out_dir/metrics.json, out_dir/table.md (laid out like Table III) and the PNG
figures of Figures 2-3: reconstructions (ground truth on top), random samples, linear
interpolations between encoded images (the two images at the ends of each row), and
latent traversals of the dimensions with the largest average KL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import time
import zipfile
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jaxlib
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from avae_jax import api
from avae_jax import config_lib
from avae_jax import data
from avae_jax import files
from avae_jax import inception
from avae_jax import metrics as metrics_lib
from avae_jax import summary
from avae_jax import visualize
from avae_jax import xla_flags

TAPS = inception.TAPS
METRICS_FILE = 'metrics.json'
TABLE_FILE = 'table.md'
FIGURES = config_lib.FIGURES
VARIANT_NAMES = config_lib.VARIANT_NAMES  # Table III's columns
TAP_NAMES = config_lib.TAP_NAMES
# Folded into PRNGKey(config.seed) for the random samples, so they do not reuse the
# training keys derived from the same seed.
_SAMPLE_KEY = 0x5A3B1E
# Under the user's cache directory: the data's Inception features (real_features_dir).
REAL_FEATURES_DIR = 'fid_real_features'
# Part of every key: a new layout of the cached file, or a change in what decides the
# features, makes the old files misses.
_REAL_FEATURES_FORMAT = 1


def _posterior_means(model: api.TrainedModel, source: data.Source, batch: int, start: int,
                     stop: int, is_main: bool) -> np.ndarray:
  """The posterior means of eval images start .. stop - 1 (encoder only)."""
  # Labelled with the images' range: the first `start` codes are the evaluation's own.
  progress = _Progress(f'codes for MIG (images {start}..{stop - 1})', stop - start, is_main)
  means = []
  for x, mask in data.eval_batches(source, batch, stop, start=start):
    k = int(mask.sum())
    means.append(np.asarray(model.encode(x)[0])[:k])
    progress.update(k)
  return np.concatenate(means)


def _stage(what: str, enabled: bool) -> None:
  """Prints 'eval: <what> ...' (process 0): the silent stretches say what is running."""
  if enabled:
    print(f'eval: {what} ...', flush=True)


class _Progress:
  """Prints 'eval: <what> done/total images | rate | ETA' now and then (process 0).

  The first batch compiles the programs the later ones reuse: the rate and the ETA count
  from its end, so that a compilation of a minute does not stretch the ETA of a run that
  then takes seconds ('?' until a second batch is timed).
  """

  def __init__(self, what: str, total: int, enabled: bool, every_s: float = 10.0,
               clock: Callable[[], float] = time.monotonic):
    self.what, self.total, self.enabled, self.every_s = what, int(total), enabled, every_s
    self.clock = clock
    self.start = self.last = clock()
    self.done = 0
    # (time, images done) at the end of the first batch.
    self.timed_from: tuple[float, int] | None = None

  def update(self, n: int) -> None:
    """Counts n more images; prints on the first batch, every every_s seconds and at the end."""
    first = self.done == 0
    self.done += int(n)
    now = self.clock()
    if first:
      self.timed_from = (now, self.done)
    if not self.enabled or not (first or self.done >= self.total
                                or now - self.last >= self.every_s):
      return
    self.last = now
    elapsed = now - self.start
    t0, done0 = self.timed_from
    timed = self.done - done0
    rate = timed / (now - t0) if timed > 0 and now > t0 else float('nan')
    eta = (self.total - self.done) / rate if rate > 0 else float('nan')
    if self.done >= self.total:
      eta = 0.0
    rate_text = f'{rate:.1f} images/s' if math.isfinite(rate) else '? images/s'
    line = (f'eval: {self.what} {self.done}/{self.total} images '
            f'({100.0 * self.done / max(self.total, 1):.0f}%) | {rate_text} | '
            f'ETA {summary.format_duration(eta)} | elapsed {summary.format_duration(elapsed)}')
    print(line, flush=True)


def fid_weights_problem(config: ml_collections.ConfigDict) -> str | None:
  """Why the evaluation would find no FID weights file (inception.weights_problem), or None.

  None too where FID is off.
  """
  if not bool(config.eval.fid):
    return None
  return inception.weights_problem(_weights_setting(config))


def _weights_setting(config: ml_collections.ConfigDict) -> str | None:
  """eval.inception_weights, None for the cache's file ('' or absent in older configs)."""
  return str(config.eval.get('inception_weights', '') or '') or None


def _inception_params(config: ml_collections.ConfigDict, override: Any,
                      devices: Sequence[Any]) -> tuple[Any, str | None]:
  """(params placed on the devices, None) or (None, the reason FID is skipped)."""
  if override is not None:
    params = override
  elif not bool(config.eval.fid):
    return None, 'config.eval.fid is False'
  else:
    setting = _weights_setting(config)
    # A finished training run must not lose its evaluation over missing weights.
    try:
      params = inception.load_params(setting)
    except (FileNotFoundError, IsADirectoryError) as e:  # its message says what to do
      return None, str(e)
    except (OSError, ValueError) as e:
      return None, (f'FID Inception weights unavailable: {e}\n'
                    f'{inception.how_to_get_weights(setting)}')
  # The replicated layout inception.features uses, so that it does not copy them per batch.
  mesh = Mesh(np.asarray(devices), ('batch',))
  return jax.device_put(params, NamedSharding(mesh, PartitionSpec())), None


class _Features:
  """Accumulates the four Inception taps of image batches (only the valid rows).

  cached: the taps of all the images, read from the cache; add() then runs nothing.
  """

  def __init__(self, params: Any, batch_size: int, devices: Sequence[Any],
               cached: dict[int, np.ndarray] | None = None):
    self.params, self.batch_size, self.devices = params, batch_size, devices
    self.cached = cached
    self.taps: dict[int, list[np.ndarray]] = {d: [] for d in TAPS}

  def add(self, images: np.ndarray, count: int) -> None:
    """Adds the taps of images[:count], run in whole Inception batches (one compilation)."""
    if self.params is None or self.cached is not None:
      return
    # The Inception batches that hold the valid rows, not the padding of the last image
    # batch beyond them (up to 3x the work at CelebA's 200-image batches): whole ones, or
    # the image batch if it is smaller, so that the compiled shape is the same.
    whole = -(-count // self.batch_size) * self.batch_size
    f = inception.features(self.params, images[:whole], batch_size=self.batch_size,
                           devices=self.devices)
    for d in TAPS:
      self.taps[d].append(np.asarray(f[d][:count]))  # float32; the FID uses float64

  def features(self) -> dict[int, np.ndarray]:
    """The (N, dim) features per tap."""
    if self.cached is not None:
      return self.cached
    return {d: np.concatenate(v) for d, v in self.taps.items()}


def real_features_dir() -> str:
  """Where the data's Inception features are cached: REAL_FEATURES_DIR in the user's cache."""
  return os.path.join(files.user_cache_dir(), REAL_FEATURES_DIR)


def _cpu_model() -> str:
  """The host CPU's model name and instruction-set flags (XLA:CPU compiles for them)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
      lines = f.read().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  wanted = [line for line in lines if line.startswith(('model name', 'flags', 'Features'))]
  return '\n'.join(dict.fromkeys(wanted))  # once, not once per core


def _real_features_path(params: Any, eval_source: data.Source, batch: int, n: int,
                        inception_batch: int, devices: Sequence[Any]) -> str:
  """The cache file of the first n eval images' features: named by what decides their bits.

  That is the images themselves (the data pass reads them once more, without the model),
  the Inception weights, and how the features are computed: the image and Inception batch
  sizes, the devices, the CPU and XLA:CPU's thread count (the order of its sums), the
  matmul precision, the jax/jaxlib versions and XLA_FLAGS. A file found under the name
  therefore holds the features this evaluation would compute.
  """
  setting = {'format': _REAL_FEATURES_FORMAT, 'num_images': n, 'batch': batch,
             'inception_batch': inception_batch, 'devices': len(devices),
             'platform': devices[0].platform,
             'device_kinds': sorted({d.device_kind for d in devices}),
             'platform_version': str(devices[0].client.platform_version),
             'matmul_precision': str(jax.config.jax_default_matmul_precision),
             'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
             'xla_flags': os.environ.get('XLA_FLAGS', ''), 'taps': list(TAPS)}
  if devices[0].platform == 'cpu':
    setting['cpu'] = _cpu_model()
    setting['cpu_threads'] = xla_flags.process_cpu_threads()
  key = hashlib.sha256(json.dumps(setting, sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.ascontiguousarray(np.asarray(leaf))
    key.update(f'{jax.tree_util.keystr(path)} {value.dtype} {value.shape}'.encode())
    key.update(value.data)
  for x, mask in data.eval_batches(eval_source, batch, n):
    key.update(np.ascontiguousarray(x[:int(mask.sum())], np.float32).data)
  return os.path.join(real_features_dir(), f'{key.hexdigest()}.npz')


def _read_real_features(path: str, n: int) -> dict[int, np.ndarray] | None:
  """The cached taps at path; None when there is no file or it is damaged (then warned)."""
  if not os.path.isfile(path):
    return None
  try:
    taps = {}
    with zipfile.ZipFile(path) as archive:
      for d in TAPS:
        # ZipFile.read checks the member's CRC-32, which np.load does not: a damaged byte
        # in a member's header or values would otherwise give other features silently.
        member = archive.read(f'tap_{d}.npy')
        taps[d] = np.lib.format.read_array(io.BytesIO(member), allow_pickle=False)
        if taps[d].shape != (n, d) or taps[d].dtype != np.float32:
          raise ValueError(f'tap {d} holds {taps[d].shape} {taps[d].dtype} values, not '
                           f'({n}, {d}) float32')
  except Exception as e:  # pylint: disable=broad-except  (any damage: compute them again)
    logging.warning('the cached Inception features %s cannot be read (%s: %s): they are '
                    'computed again and the file replaced', path, type(e).__name__, e)
    return None
  return taps


def _write_real_features(path: str, taps: dict[int, np.ndarray]) -> None:
  """Caches the taps at path (atomically); a warning where it cannot."""
  buffer = io.BytesIO()
  np.savez(buffer, **{f'tap_{d}': np.asarray(t, np.float32) for d, t in taps.items()})
  try:
    files.write_bytes(path, buffer.getvalue())
  except OSError as e:
    logging.warning('could not cache the Inception features of the images in %s (%s); the '
                    'next evaluation computes them again', path, e)


def kl_per_dim(mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
  """KL(q(z_j|x) || N(0, 1)) per latent dimension, averaged over the images."""
  mu, logvar = np.asarray(mu, np.float64), np.asarray(logvar, np.float64)
  return np.mean(0.5 * (mu ** 2 + np.exp(logvar) - 1.0 - logvar), axis=0)


def _mean_std(values: list[np.ndarray]) -> tuple[float, float]:
  v = np.concatenate(values)
  return float(np.mean(v)), float(np.std(v))


def _fmt(value: Any, std: Any = None) -> str:
  if value is None:
    return '-'
  text = f'{value:.6g}' if isinstance(value, float) else str(value)
  return text if std is None else f'{text} ± {std:.4g}'


def format_table(results: dict[str, Any], config: ml_collections.ConfigDict,
                 source_name: str = '') -> str:
  """Markdown table laid out like the paper's Table III, plus samples' rows and MIG."""
  r = results.get
  model = VARIANT_NAMES.get(str(config.variant), str(config.variant))
  fid_note = 'skipped' if 'fid_skipped' in results else '-'
  rows = [
      ('Sharpness (Laplace)', _fmt(r('gt_sharpness_mean'), r('gt_sharpness_std')),
       _fmt(r('rec_sharpness_mean'), r('rec_sharpness_std'))),
      ('Cosine similarity', '1', _fmt(r('rec_cosine_similarity'))),
      ('Mean Squared Error', '0', _fmt(r('rec_mse'))),
  ]
  for d in TAPS:
    rows.append((f'FID - {TAP_NAMES[d]} (d={d})', '-',
                 _fmt(r(f'fid_rec_{d}')) if f'fid_rec_{d}' in results else fid_note))
  rows.append(('Sharpness of random samples (Laplace)', '-',
               _fmt(r('sample_sharpness_mean'), r('sample_sharpness_std'))))
  for d in TAPS:
    rows.append((f'FID of random samples - {TAP_NAMES[d]} (d={d})', '-',
                 _fmt(r(f'fid_sample_{d}')) if f'fid_sample_{d}' in results else fid_note))
  rows.append(('MIG (posterior means vs ground-truth factors)', '-',
               _fmt(r('mig')) if 'mig' in results else '-'))
  lines = [f'# Evaluation: {model}, step {r("step")}', '',
           f'| Metric | Ground Truth | {model} |', '|---|---|---|']
  lines += [f'| {a} | {b} | {c} |' for a, b, c in rows]
  split = f' of {source_name}' if source_name else ''
  lines += ['',
            f'Reconstructions (decoded posterior means) of the first {r("num_images")} '
            f'images{split}; {r("num_samples")} random samples, z ~ N(0, I) with seed '
            f'{int(config.seed)}. Sharpness: mean ± std over images.']
  if 'fid_skipped' in results:
    lines.append(f'FID skipped: {results["fid_skipped"]}')
  else:
    lines.append(f'FID: {r("fid_num_images")} real images against as many reconstructions '
                 'and as many samples (FID is biased by sample size: compare equal counts).')
  if 'mig' in results:
    lines.append(f'MIG over {r("mig_num_images")} images '
                 f'({config_lib.MIG_BINS} bins); the same codes, each '
                 f'dimension shuffled across the images, score {_fmt(r("mig_shuffled"))} '
                 '(the estimator\'s floor at this count).')
  elif 'mig_skipped' in results:
    lines.append(f'MIG skipped: {results["mig_skipped"]}')
  return '\n'.join(lines) + '\n'


def _fid(real: np.ndarray, other: np.ndarray) -> float:
  """The Frechet distance of two (N, dim) feature sets; NaN if either holds NaN or inf."""
  if not (np.all(np.isfinite(real)) and np.all(np.isfinite(other))):
    # A diverged model's images: NaN like its other metrics, not a traceback that loses them.
    return math.nan
  return metrics_lib.frechet_distance_of_features(real, other)


def _mig_results(ev: Any, model: api.TrainedModel, eval_source: data.Source,
                 mu_all: np.ndarray, batch: int, n: int, is_main: bool) -> dict[str, Any]:
  """MIG and its shuffled baseline over the codes of eval.mig_num_images images."""
  # MIG needs only the codes, and many of them: its plug-in entropies are biased upwards
  # on few images (at 100, shuffled codes score as high as a trained model's).
  # 0 (or a config saved before the field) is the whole split.
  mig_n = data.image_count(int(ev.get('mig_num_images', 0)), eval_source.num_examples)
  codes = mu_all[:mig_n]
  if mig_n > n:
    codes = np.concatenate([codes, _posterior_means(model, eval_source, batch, n, mig_n,
                                                    is_main)])
  factors = np.asarray(eval_source.factors)[:mig_n]
  _stage(f'MIG over {mig_n} images', is_main)
  if not np.all(np.isfinite(codes)):
    # A diverged model's codes: NaN like its other metrics, not a skipped MIG.
    return {'mig': math.nan, 'mig_shuffled': math.nan, 'mig_num_images': mig_n}
  try:
    return {'mig': metrics_lib.mig(codes, factors),
            'mig_shuffled': metrics_lib.shuffled_mig(codes, factors), 'mig_num_images': mig_n}
  except ValueError as e:
    logging.warning('MIG skipped: %s', e)
    return {'mig_skipped': str(e)}


def _figures(model: api.TrainedModel, shown_x: np.ndarray, shown_rec: np.ndarray,
             shown_samples: np.ndarray, g: int, traversal_dims: Sequence[int],
             traversal_range: float) -> dict[str, np.ndarray]:
  """The evaluation's figures: g x g grids, the interpolations and traversals if any."""
  figures = {
      'reconstructions': visualize.reconstructions(shown_x, shown_rec,
                                                   min(len(shown_x), g * max(1, g // 2)),
                                                   ncol=g),
      'samples': visualize.samples(shown_samples, g),
  }
  pairs = min(g, len(shown_x) // 2)
  if pairs:
    x0, x1 = shown_x[0:2 * pairs:2], shown_x[1:2 * pairs:2]
    rows = np.asarray(model.interpolate(x0, x1, g))
    rows = np.concatenate([x0[:, None], rows, x1[:, None]], axis=1)
    figures['interpolations'] = visualize.interpolations(rows)
  if traversal_dims:
    values = np.linspace(-traversal_range, traversal_range, g)
    figures['traversals'] = visualize.traversals(np.asarray(
        model.traverse(shown_x[0], traversal_dims, values)))
  return figures


def evaluate(config: ml_collections.ConfigDict, model: api.TrainedModel,
             eval_source: data.Source,
             out_dir: str, devices: Sequence[Any] | None = None,
             writer: summary.SummaryWriter | None = None, *,
             inception_params: Any = None) -> dict[str, Any]:
  """Computes the metrics, writes metrics.json, table.md and the figures; returns the metrics.

  devices: local devices for the Inception network and the batch size (default: all
    local); the model computes on its own model.devices.
  writer: if given, the figures, the table and the scalars also go to TensorBoard.
  inception_params: Inception weights to use instead of loading config.eval's (tests).
  Values are floats and ints, plus 'fid_skipped' / 'mig_skipped' (str) when skipped.
  Only process 0 writes files.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  is_main = jax.process_index() == 0
  ev = config.eval
  n = data.image_count(int(ev.num_images), eval_source.num_examples)
  if n < 2:
    raise data.DataError(f'evaluation needs at least 2 images; {eval_source.name!r} has '
                         f'{eval_source.num_examples} and eval.num_images={ev.num_images}')
  if is_main and int(ev.num_images) > n:  # FID is comparable only at equal image counts
    print(f'eval: eval.num_images={ev.num_images} is more than the eval split has: using '
          f'its {n} images', flush=True)
  n_dev = len(devices)
  # Every batch has the same size and splits evenly over the devices: one compilation.
  batch = max(n_dev, math.ceil(int(ev.batch_size) / n_dev) * n_dev)
  g = max(1, int(ev.grid_size))
  started = time.monotonic()

  if inception_params is None and bool(ev.fid):
    _stage('loading the Inception weights', is_main)
  params, fid_skipped = _inception_params(config, inception_params, devices)
  if fid_skipped and is_main:
    print(f'eval: FID skipped: {fid_skipped}', flush=True)

  # Images and reconstructions.
  # The Inception network runs in chunks of its own: its 299x299 activations dominate the
  # evaluation's memory (config.eval.get: configs saved before the field existed).
  inception_batch = int(ev.get('inception_batch_size', 8)) * n_dev
  # The data's features are the same for every model evaluated on it: computed once,
  # then read from the cache.
  cache_path = cached = None
  if params is not None and bool(ev.get('cache_real_features', True)):
    cache_path = _real_features_path(params, eval_source, batch, n, inception_batch, devices)
    files.remove_killed_cache_writes(real_features_dir(), ('.npz',))
    cached = _read_real_features(cache_path, n)
    if cached is not None and is_main:
      print(f'eval: the Inception features of the images are read from {cache_path}',
            flush=True)
  real_f = _Features(params, inception_batch, devices, cached)
  rec_f = _Features(params, inception_batch, devices)
  # The first batch compiles the programs that every later batch reuses.
  _stage('compiling the model' + ('' if fid_skipped else ' and the Inception network'),
         is_main)
  images = _image_pass(model, eval_source, batch, n, g * g, real_f, rec_f, is_main)
  key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), _SAMPLE_KEY)
  sample_f = _Features(params, inception_batch, devices)
  sample_sharp, shown_samples = _sample_pass(model, key, batch, n, g * g, sample_f, is_main)

  results: dict[str, Any] = {'step': int(model.step or 0), 'num_images': n, 'num_samples': n}
  results['gt_sharpness_mean'], results['gt_sharpness_std'] = _mean_std(images.gt_sharpness)
  results['rec_sharpness_mean'], results['rec_sharpness_std'] = _mean_std(images.rec_sharpness)
  results['rec_mse'], results['rec_mse_std'] = _mean_std(images.mse)
  results['rec_cosine_similarity'], results['rec_cosine_similarity_std'] = _mean_std(
      images.cosine)
  results['sample_sharpness_mean'], results['sample_sharpness_std'] = _mean_std(sample_sharp)
  kl = kl_per_dim(images.mu, images.logvar)
  results['kl_mean'] = float(np.sum(kl))

  if fid_skipped:
    results['fid_skipped'] = fid_skipped
  else:
    # 8 float64 Frechet distances of up to 2048 dimensions: no progress line of their
    # own, so the stage is named.
    _stage('FID statistics and distances', is_main)
    real, rec, smp = real_f.features(), rec_f.features(), sample_f.features()
    if cache_path is not None and cached is None:
      _write_real_features(cache_path, real)
    results['fid_num_images'] = n
    for d in TAPS:
      results[f'fid_rec_{d}'] = _fid(real[d], rec[d])
      results[f'fid_sample_{d}'] = _fid(real[d], smp[d])

  if eval_source.factors is not None:
    results.update(_mig_results(ev, model, eval_source, images.mu, batch, n, is_main))

  # Figures (Figure 3 a-c, Figure 2); interpolations and traversals compile programs.
  _stage('figures', is_main)
  traversal_dims = [int(d) for d in np.argsort(-kl, kind='stable')[:int(ev.traversal_dims)]]
  figures = _figures(model, images.shown_x, images.shown_rec, shown_samples, g,
                     traversal_dims, float(ev.traversal_range))

  table = format_table(results, config, eval_source.name)
  if traversal_dims:
    table += (f'Traversals: latent dimensions {traversal_dims} (largest average KL first), '
              f'values -{ev.traversal_range}..{ev.traversal_range}, around the first image.\n')
  if is_main:
    _write_outputs(out_dir, results, figures, table, writer)
    print(table, flush=True)
    print(f'eval: wrote {METRICS_FILE}, {TABLE_FILE} and {len(figures)} figures to {out_dir} '
          f'in {summary.format_duration(time.monotonic() - started)}', flush=True)
  return results


@dataclasses.dataclass
class _ImagePass:
  """Per-image metrics and codes of the evaluated images, and the first ones for figures."""
  gt_sharpness: list[np.ndarray]
  rec_sharpness: list[np.ndarray]
  mse: list[np.ndarray]
  cosine: list[np.ndarray]
  mu: np.ndarray
  logvar: np.ndarray
  shown_x: np.ndarray
  shown_rec: np.ndarray


def _image_pass(model: api.TrainedModel, eval_source: data.Source, batch: int, n: int,
                shown: int, real_f: _Features, rec_f: _Features, is_main: bool) -> _ImagePass:
  """Encodes and reconstructs the first n eval images; their features go to real_f, rec_f."""
  gt, rec, mse, cos, mus, logvars, shown_x, shown_rec = [], [], [], [], [], [], [], []
  progress = _Progress('images and reconstructions', n, is_main)
  for x, mask in data.eval_batches(eval_source, batch, n):
    k = int(mask.sum())
    mu, logvar = model.encode(x)
    x_rec = np.asarray(model.decode(mu))
    mus.append(np.asarray(mu)[:k])
    logvars.append(np.asarray(logvar)[:k])
    gt.append(metrics_lib.sharpness(x[:k]))
    rec.append(metrics_lib.sharpness(x_rec[:k]))
    mse.append(metrics_lib.mse(x[:k], x_rec[:k]))
    cos.append(metrics_lib.cosine_similarity(x[:k], x_rec[:k]))
    if sum(len(s) for s in shown_x) < shown:
      shown_x.append(x[:k])
      shown_rec.append(x_rec[:k])
    real_f.add(x, k)
    rec_f.add(x_rec, k)
    progress.update(k)
  return _ImagePass(gt, rec, mse, cos, np.concatenate(mus), np.concatenate(logvars),
                    np.concatenate(shown_x), np.concatenate(shown_rec))


def _sample_pass(model: api.TrainedModel, key: jax.Array, batch: int, n: int, shown: int,
                 sample_f: _Features, is_main: bool) -> tuple[list[np.ndarray], np.ndarray]:
  """(sharpness of n random samples, the first `shown` samples); features go to sample_f.

  All codes are drawn at once, so that they do not depend on the batch size or the device
  count; the last batch is padded with zero codes (one compiled decoder) and the padding
  dropped.
  """
  sharpness, shown_samples = [], []
  num_draw = max(n, shown)
  codes = np.asarray(jax.random.normal(key, (num_draw, model.latent_dim), np.float32))
  codes = np.pad(codes, ((0, -num_draw % batch), (0, 0)))
  progress = _Progress('random samples', n, is_main)
  for start in range(0, num_draw, batch):
    samples = np.asarray(model.decode(codes[start:start + batch]))
    k = max(0, min(batch, n - start))
    if len(shown_samples) * batch < shown:
      shown_samples.append(samples)
    if k:
      sharpness.append(metrics_lib.sharpness(samples[:k]))
      sample_f.add(samples, k)
      progress.update(k)
  return sharpness, np.concatenate(shown_samples)[:shown]


def _write_outputs(out_dir: str, results: dict[str, Any], figures: dict[str, np.ndarray],
                   table: str, writer: summary.SummaryWriter | None) -> None:
  """metrics.json, table.md and the figures in out_dir, and to TensorBoard with a writer."""
  # The numbers first: a figure that cannot be written does not lose them.
  files.write_json(os.path.join(out_dir, METRICS_FILE), results)
  files.write_text(os.path.join(out_dir, TABLE_FILE), table)
  for name in FIGURES:  # one not made this time (no traversal dims) goes: it is stale
    path = os.path.join(out_dir, f'{name}.png')
    if name in figures:
      visualize.save_png(path, figures[name])
    else:
      files.remove(path)
  if writer is not None:
    step = results['step']
    for name, image in figures.items():
      writer.image(step, f'eval/{name}', image)
    writer.text(step, 'eval/table', table)
    writer.scalars(step, {f'eval/{k}': v for k, v in results.items()
                          if isinstance(v, (int, float)) and k != 'step'})
    writer.flush()
