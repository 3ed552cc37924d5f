"""The four model variants as settings of one code path, and config validation."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import math
import numbers
import os
from typing import Any, Mapping, Sequence

import ml_collections

VARIANTS = ('vae', 'avae', 'vae_s', 'avae_s')
TFDS_DATASETS = ('mnist', 'fashion_mnist', 'celeb_a', 'dsprites')
# The terms of Eq. 5, in the order they are summed and reported.
RECONSTRUCTION_TERMS = ('mae', 'mse', 'dssim', 'sobel', 'gabor')
PARALLEL_METHODS = ('pmap', 'shard_map')  # config.parallel (parallel.py maps with them)
TC_ESTIMATORS = ('mws', 'mss')
SSIM_WINDOW = 11  # the 1 - SSIM term's Gaussian window (README: The four models)
CONV_BACKWARDS = ('auto', 'xla', 'custom')  # model.conv_backward (conv.py)
# Names shared by the evaluation and the study report, which imports no JAX: Table III's
# columns, the Inception taps' names by width (inception.TAPS), and the figures.
VARIANT_NAMES = {'vae': 'VAE', 'avae': 'AVAE', 'vae_s': 'VAE-S', 'avae_s': 'AVAE-S'}
TAP_NAMES = {64: 'first max pooling', 192: 'second max pooling', 768: 'pre-aux classifier',
             2048: 'final average pooling'}
FIGURES = ('reconstructions', 'samples', 'interpolations', 'traversals')
MIG_BINS = 20  # the histogram bins of MIG's codes (metrics.mig), named in the tables
# A workdir's records: the run's config (the trainer writes it, api and the report read
# it), its training log, its checkpoints, the final evaluation's results and its folder.
CONFIG_FILE = 'config.json'
TRAIN_LOG_FILE = 'metrics.jsonl'
CHECKPOINT_DIR = 'checkpoints'
FINAL_METRICS_FILE = 'final_metrics.json'
EVAL_DIR = 'eval'
STUDY_FILE = 'study.json'  # study.py's --out: the budget, seeds and commands of the study


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  """What a variant switches on: the compound loss, the TC term, the adversarial phase."""
  compound_loss: bool
  total_correlation: bool
  adversarial: bool


_SPECS = {
    'vae': VariantSpec(compound_loss=False, total_correlation=False, adversarial=False),
    'avae': VariantSpec(compound_loss=False, total_correlation=False, adversarial=True),
    'vae_s': VariantSpec(compound_loss=True, total_correlation=True, adversarial=False),
    'avae_s': VariantSpec(compound_loss=True, total_correlation=True, adversarial=True),
}


_FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(ValueError):
  """A config value that cannot work; raised before anything is compiled."""


def variant_spec(variant: str) -> VariantSpec:
  """Returns the switches of `variant`, or raises ConfigError naming the valid ones."""
  if variant not in _SPECS:
    raise ConfigError(f'unknown variant {variant!r}; choose one of {", ".join(VARIANTS)}')
  return _SPECS[variant]


def reconstruction_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The λ's of Eq. 5 that the config's variant uses (MSE alone for vae/avae)."""
  if not variant_spec(config.variant).compound_loss:
    return {'mse': 1.0}
  return {k: float(config.loss.weights[k]) for k in RECONSTRUCTION_TERMS
          if float(config.loss.weights.get(k, 0.0)) != 0.0}


def configured_reconstruction_scale(config: Mapping[str, Any]) -> float:
  """loss.reconstruction_scale as set: 0 (or absent) for the default, H*W*C."""
  return float(config.get('loss', {}).get('reconstruction_scale') or 0.0)


def reconstruction_scale(config: Mapping[str, Any]) -> float:
  """loss.reconstruction_scale, where 0 stands for H*W*C (a config or config.json's dict)."""
  scale = configured_reconstruction_scale(config)
  if scale == 0.0:
    # Per-image terms are pixel means; H*W*C turns them into sums, the scale at which
    # they weigh against the KL summed over latent dims.
    scale = float(int(config['image_size']) ** 2 * int(config['channels']))
  return scale


def tc_weight(config: ml_collections.ConfigDict) -> float:
  """The total-correlation weight, zero for variants without the TC term."""
  return float(config.loss.tc_weight) if variant_spec(config.variant).total_correlation else 0.0


def adversarial_steps(config: ml_collections.ConfigDict) -> int:
  """Steps of adversarial fine-tuning; the paper's VAE and VAE-S have none."""
  return int(config.adversarial_steps) if variant_spec(config.variant).adversarial else 0


def gating_dead_band(config: ml_collections.ConfigDict) -> tuple[float, float] | None:
  """The accuracies [lo, hi] at which neither gated update runs, or None if there are none.

  The discriminator updates below gating.train_disc_below, the VAE above
  gating.train_vae_above; with the first at or under the second, an accuracy between them
  updates neither model, so the adversarial phase can stall there.
  """
  below, above = float(config.gating.train_disc_below), float(config.gating.train_vae_above)
  if adversarial_steps(config) and below <= above:
    return below, above
  return None


def cpu_devices(config: ml_collections.ConfigDict) -> int:
  """config.cpu_devices (0 when the config has none), or ConfigError if it is negative."""
  n = int(config.get('cpu_devices', 0))
  if n < 0:
    raise ConfigError(f'cpu_devices = {n} is negative; 0 keeps one CPU device')
  return n


def fill_missing(config: ml_collections.ConfigDict,
                 reference: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Adds to `config` every field of `reference` it lacks; returns their dotted names."""
  added = []
  for key, value in reference.items():
    if key not in config:
      config[key] = copy.deepcopy(value)
      added.append(prefix + key)
    elif (isinstance(value, ml_collections.ConfigDict)
          and isinstance(config[key], ml_collections.ConfigDict)):
      added += fill_missing(config[key], value, f'{prefix}{key}.')
  return added


def check_image_size(image_size: int, widths: tuple[int, ...] | list[int]) -> int:
  """Returns the bottleneck side image_size / 2**len(widths), or raises ConfigError."""
  if not widths:
    raise ConfigError('model.widths must name at least one stage')
  factor = 2 ** len(widths)
  if image_size <= 0:  # 0 is divisible by any factor, and no image has that size
    raise ConfigError(f'image_size must be > 0, got {image_size}')
  if image_size % factor:
    raise ConfigError(
        f'image_size {image_size} is not divisible by 2**len(model.widths) = {factor} '
        f'(widths {tuple(widths)}): choose widths so that image_size / {factor} is whole')
  return image_size // factor


def check_model(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], str, str]:
  """(widths, dtype, conv_backward) of config.model, checked with the image size."""
  widths = config.model.widths
  if not isinstance(widths, (tuple, list)):
    # `widths = (16)` in a config file is the number 16, not a tuple of one.
    raise ConfigError(f'model.widths = {widths!r} must be a tuple of stage widths, e.g. '
                      f'({widths},) with its comma for one stage')
  widths = tuple(widths)
  if any(not is_int(w) or w < 1 for w in widths):
    # ml_collections keeps an override it cannot parse as a tuple of its text: show the text.
    shown = repr(widths[0]) if len(widths) == 1 and isinstance(widths[0], str) else widths
    raise ConfigError(f'model.widths {shown} must all be whole numbers >= 1 (channels of '
                      'the stages), e.g. (32, 64)')
  widths = tuple(int(w) for w in widths)
  check_image_size(int(config.image_size), widths)
  dtype = str(config.model.dtype)
  if dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got {dtype!r}")
  backward = str(config.model.get('conv_backward', 'auto'))
  if backward not in CONV_BACKWARDS:
    raise ConfigError(f'model.conv_backward must be one of {", ".join(CONV_BACKWARDS)}, '
                      f'got {backward!r}')
  return widths, dtype, backward


# Fields a config may lack: the code reads them with their defaults (configs written before
# they existed). Any other field of configs/default.py that a config lacks is refused.
OPTIONAL_FIELDS = ('data_dir', 'download', 'eval_fraction', 'cpu_devices',
                   'model.conv_backward', 'eval.mig_num_images', 'eval.inception_batch_size',
                   'eval.inception_weights', 'eval.cache_real_features')
# Fields that count things (pixels, images, steps, units): a float such as 4.0 or 2.5 would
# pass the range checks and fail in JAX after training (a latent size), or be truncated
# (the seed has a check of its own, with its range).
INT_FIELDS = ('image_size', 'channels', 'crop_size', 'batch_size', 'pretrain_steps',
              'adversarial_steps', 'num_devices', 'cpu_devices', 'log_every', 'image_every',
              'checkpoint_every', 'keep_checkpoints', 'stop_check_every',
              'shapes.num_train', 'shapes.num_eval', 'model.latent_dim', 'model.hidden_dim',
              'calibrate.batches', 'gabor.size', 'gabor.orientations', 'eval.num_images',
              'eval.mig_num_images', 'eval.batch_size', 'eval.inception_batch_size',
              'eval.grid_size', 'eval.traversal_dims')


def lookup(config: ml_collections.ConfigDict, parts: Sequence[str]) -> tuple[bool, Any]:
  """(whether `config` has the field or group at the path `parts`, its value or None)."""
  node: Any = config
  for part in parts:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False, None
    node = node[part]
  return True, node


def _default_fields() -> dict[str, Any]:
  """configs/default.py's fields, flattened ('model.latent_dim': 32): every field there is."""
  from configs import default  # pylint: disable=g-import-not-at-top
  return flatten(default.get_config().to_dict())


def _check_fields(config: ml_collections.ConfigDict) -> None:
  """Refuses a config without configs/default.py's fields, or with unset or fractional counts.

  Without this a config file that omits a field, or leaves a placeholder unset, stopped
  with a KeyError or TypeError traceback from the checks below.
  """
  reference = _default_fields()
  # A reconstruction term left out of loss.weights is switched off (weight 0).
  missing = [k for k in reference if k not in OPTIONAL_FIELDS
             and not k.startswith('loss.weights.') and not lookup(config, k.split('.'))[0]]
  if missing:
    raise ConfigError(f'the config has no {", ".join(missing)}: start it from '
                      'configs/default.py\'s get_config(), which holds every field')
  for name, default_value in reference.items():
    present, value = lookup(config, name.split('.'))
    if present and value is None and default_value is not None:
      raise ConfigError(f'{name} is not set (a placeholder left empty): give it a value, '
                        f'e.g. --config.{name}=VALUE')
  for name in INT_FIELDS:
    present, value = lookup(config, name.split('.'))
    if not present:
      continue
    if not is_int(value):
      raise ConfigError(f'{name} = {value!r} must be a whole number of type int')


def unread_fields(config: ml_collections.ConfigDict) -> list[str]:
  """The config's fields that configs/default.py lacks, which no code reads.

  Each with the closest field that it lacks, where one is close: a misspelt field in a
  config file ('model.latent_dims (model.latent_dim?)') leaves the field it meant as it
  was, where a misspelt --config. override is refused. A helper field of the user's own
  (a value other fields refer to) is listed too: a warning, not an error.
  """
  known = list(_default_fields())
  unread = []
  for name in flatten(config.to_dict()):
    if name not in known and not name.startswith('loss.weights.'):  # those are checked
      close = difflib.get_close_matches(name, known, n=1)
      unread.append(f'{name} ({close[0]}?)' if close else name)
  return unread


# The procedural dataset draws its own held-out images at the config's size: it has no
# splits to name and nothing to crop.
_SHAPES_IGNORES = ('crop_size', 'train_split', 'eval_split', 'eval_fraction')


def ignored_settings(config: ml_collections.ConfigDict) -> list[str]:
  """'field=value' for each field set away from its default that the dataset does not use."""
  if str(config.dataset) != 'shapes':
    return []
  defaults = _default_fields()
  return [f'{name}={config[name]!r}' for name in _SHAPES_IGNORES
          if name in config and config[name] != defaults[name]]


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks every value that would otherwise fail late; raises ConfigError with the fix."""
  # These two alone: the checks below read the fields and the variant they check.
  _check_fields(config)
  variant_spec(config.variant)
  problems = []
  # Each group stops at its first problem; the groups' problems are reported together, so
  # that a config with several mistakes does not take one run per mistake.
  for check, args in ((_validate_data, (config,)), (_validate_model, (config,)),
                      (_validate_loss, (config,)), (_validate_run, (config, num_devices)),
                      (_validate_optimizer, (config,)), (validate_eval, (config,)),
                      (_validate_gabor, (config.gabor,))):
    try:
      check(*args)
    except ConfigError as e:
      problems.append(str(e))
  if len(problems) == 1:
    raise ConfigError(problems[0])
  if problems:
    raise ConfigError(f'{len(problems)} problems in the config:\n' +
                      '\n'.join(f'  - {p}' for p in problems))


DATASET_PATH_PREFIXES = ('folder:', 'arrays:')


def _absolute(path: str) -> str:
  """A relative local path joined to the current directory; others (`~`, gs://) as given."""
  if not path or '://' in path or path.startswith('~') or os.path.isabs(path):
    return path
  return os.path.abspath(path) + (os.sep if path.endswith(os.sep) else '')


def make_paths_absolute(config: ml_collections.ConfigDict) -> None:
  """Joins the config's relative local paths to the current directory, in place.

  config.json then names the same files to eval.py and api.load from any directory: a
  relative path would be read against theirs (dataset folder:/arrays:, data_dir,
  eval.inception_weights).
  """
  ds = str(config.dataset)
  for prefix in DATASET_PATH_PREFIXES:
    if ds.startswith(prefix):
      config.dataset = prefix + _absolute(ds[len(prefix):])
  if config.get('data_dir'):
    config.data_dir = _absolute(str(config.data_dir))
  if config.get('eval') is not None and config.eval.get('inception_weights'):
    config.eval.inception_weights = _absolute(str(config.eval.inception_weights))


def _validate_data(config: ml_collections.ConfigDict) -> None:
  """validate's part: the dataset's name, channels, held-out share and crop."""
  ds = str(config.dataset)
  if not (ds in TFDS_DATASETS or ds == 'shapes' or ds.startswith(DATASET_PATH_PREFIXES)):
    raise ConfigError(
        f'unknown dataset {ds!r}; choose one of {", ".join(TFDS_DATASETS)}, shapes, '
        'folder:PATH (a folder of images) or arrays:PATH (.npy, .npz, idx, idx.gz)')
  if config.channels not in (1, 3):
    raise ConfigError(f'channels must be 1 or 3, got {config.channels}')
  # The held-out share of folders and array files without an eval file (NaN would crash
  # the loader with a traceback; a negative share would read as 0).
  if not 0.0 <= config.get('eval_fraction', 0.05) < 1.0:
    raise ConfigError(f'eval_fraction = {config.eval_fraction} must lie in [0, 1) (the '
                      'share of the images held out for evaluation)')
  if config.crop_size < 0:
    raise ConfigError(f'crop_size = {config.crop_size} is negative; 0 means the largest '
                      'centred square')


def _validate_model(config: ml_collections.ConfigDict) -> None:
  """validate's part: the widths against the image size, BatchNorm's decay, the sizes."""
  check_model(config)
  # The running averages' decay: outside [0, 1] (or NaN) the BatchNorm statistics that the
  # evaluation uses diverge while the training losses, on batch statistics, look fine.
  if not 0.0 <= config.model.bn_momentum <= 1.0:
    raise ConfigError(f'model.bn_momentum = {config.model.bn_momentum} must lie in [0, 1] '
                      "(the decay of BatchNorm's running averages)")
  # A model without units fails only after compilation.
  for name in ('latent_dim', 'hidden_dim'):
    if config.model[name] < 1:
      raise ConfigError(f'model.{name} = {config.model[name]} must be >= 1')


def _validate_loss(config: ml_collections.ConfigDict) -> None:
  """validate's part: the loss's terms (the calibration's too), weights and estimator."""
  # SSIM's window must fit in the image; the calibration probes every term, SSIM too.
  probes_ssim = 'dssim' in reconstruction_weights(config) or (
      variant_spec(config.variant).compound_loss and config.calibrate.enabled)
  if probes_ssim and config.image_size < SSIM_WINDOW:
    raise ConfigError(
        f'image_size {config.image_size} is smaller than the SSIM term\'s '
        f'{SSIM_WINDOW}x{SSIM_WINDOW} window: use images of at least {SSIM_WINDOW} pixels, '
        'or switch the term off (loss.weights.dssim=0 and calibrate.enabled=False)')
  for name, value in dict(config.loss.weights).items():
    if name not in RECONSTRUCTION_TERMS:
      raise ConfigError(f'loss.weights.{name} is not a reconstruction term; '
                        f'terms are {", ".join(RECONSTRUCTION_TERMS)}')
    _check_nonnegative(f'loss.weights.{name}', value)
  if variant_spec(config.variant).compound_loss and not reconstruction_weights(config):
    raise ConfigError(f'variant {config.variant!r} with every loss.weights.* at 0 has no '
                      'reconstruction term; give at least one term a positive weight')
  for name in ('kl_weight', 'tc_weight', 'adversarial_weight', 'reconstruction_scale'):
    _check_nonnegative(f'loss.{name}', config.loss[name])
  if config.loss.tc_estimator not in TC_ESTIMATORS:
    raise ConfigError(f'loss.tc_estimator must be one of {TC_ESTIMATORS}, '
                      f'got {config.loss.tc_estimator!r}')


def _validate_run(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """validate's part: the seed, batch, steps, calibration, mapping, gating, intervals."""
  # The data's order comes from numpy's SeedSequence, which takes no negative seed; the
  # PRNG keys (jax.random.PRNGKey) keep only the low 32 bits of a larger one, so seed and
  # seed + 2**32 would share parameters and keys (and from 2**63 PRNGKey overflows).
  if not is_int(config.seed) or not 0 <= config.seed < 2**32:
    raise ConfigError(f'seed = {config.seed} must be >= 0 and < 2**32 (a whole number: '
                      'the PRNG keys take 32 bits of it)')
  # BatchNorm normalises with the batch's statistics (the global batch's, over the
  # devices): over one image every feature is 0, so every image would get the same code
  # and KL 0. (A batch of one device's share is fine.)
  if config.batch_size < 2:
    raise ConfigError(f'batch_size = {config.batch_size} must be >= 2 (BatchNorm normalises '
                      'over the batch: over one image every image gets the same code)')
  if config.batch_size % num_devices:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by the '
                      f'{num_devices} devices in use; the batch is split evenly across them')
  if config.pretrain_steps < 0 or config.adversarial_steps < 0:
    raise ConfigError('pretrain_steps and adversarial_steps must be >= 0')
  # After the batch size's own checks: the dataset configs compute this count (one
  # epoch) from it, and a bad batch size was reported as a bad calibrate.batches.
  if config.calibrate.enabled and config.calibrate.batches < 1:
    raise ConfigError(f'calibrate.batches = {config.calibrate.batches} must be >= 1 '
                      'when calibrate.enabled (or disable the calibration); where a config '
                      'computes it as one epoch of batches (configs/mnist.py, celeba.py): '
                      f'is batch_size {config.batch_size} larger than the training split?')
  if config.parallel not in PARALLEL_METHODS:
    raise ConfigError(f'parallel must be one of {PARALLEL_METHODS}, got {config.parallel!r}')
  g = config.gating
  if not 0.0 <= g.train_vae_above <= 1.0 or not 0.0 <= g.train_disc_below <= 1.0:
    raise ConfigError('gating thresholds are accuracies and must lie in [0, 1]')
  # Otherwise a modulo by zero in the loop, after compilation.
  for name in ('log_every', 'checkpoint_every', 'image_every', 'stop_check_every'):
    if config[name] < 1:
      raise ConfigError(f'{name} = {config[name]} must be >= 1 (a number of steps)')
  if config.keep_checkpoints < 0:
    raise ConfigError(f'keep_checkpoints = {config.keep_checkpoints} is negative; '
                      'use 0 to keep every checkpoint')


def _validate_optimizer(config: ml_collections.ConfigDict) -> None:
  """validate's part: Adam's learning rates and decays."""
  for name in ('learning_rate', 'disc_learning_rate'):
    _check_nonnegative(f'optimizer.{name}', config.optimizer[name])
  for name in ('b1', 'b2'):
    # Adam's moment decays; at 1 or above its bias correction divides by 1 - b**t <= 0.
    if not 0.0 <= config.optimizer[name] < 1.0:
      raise ConfigError(f'optimizer.{name} = {config.optimizer[name]} must lie in [0, 1) '
                        "(Adam's decay rate)")


def validate_eval(config: ml_collections.ConfigDict) -> None:
  """Checks the eval.* settings (eval.py's own check; validate includes it)."""
  if config.eval.get('inception_batch_size', 8) < 1:
    raise ConfigError(f'eval.inception_batch_size = {config.eval.inception_batch_size} '
                      'must be >= 1')
  if config.eval.num_images == 1 or config.eval.num_images < 0:
    raise ConfigError(f'eval.num_images = {config.eval.num_images}: the evaluation needs at '
                      'least 2 images (0 = the whole eval split)')
  mig_n = config.eval.get('mig_num_images', 0)
  if mig_n == 1 or mig_n < 0:
    raise ConfigError(f'eval.mig_num_images = {mig_n}: MIG needs at least 2 images (0 = '
                      'the whole eval split)')
  if config.eval.batch_size < 1:
    raise ConfigError(f'eval.batch_size = {config.eval.batch_size} must be >= 1')
  # The figures: an interpolation row needs both ends, a traversal at least two values.
  if config.eval.grid_size < 2:
    raise ConfigError(f'eval.grid_size = {config.eval.grid_size} must be >= 2 (images per '
                      'row of the figures)')
  # The codes are float32: a range beyond its largest number would sweep from -inf to inf.
  if (config.eval.traversal_dims < 0 or not config.eval.traversal_range > 0
      or not config.eval.traversal_range <= _FLOAT32_MAX):
    raise ConfigError('eval.traversal_dims must be >= 0 and eval.traversal_range > 0 (at most '
                      'float32\'s largest number, 3.4e38), got '
                      f'{config.eval.traversal_dims} and {config.eval.traversal_range}')
  # A model has latent_dim dimensions to sweep; more would silently draw fewer rows.
  if config.eval.traversal_dims > config.model.latent_dim:
    raise ConfigError(f'eval.traversal_dims = {config.eval.traversal_dims} is more than the '
                      f'model has (model.latent_dim = {config.model.latent_dim})')


def _check_nonnegative(name: str, value: float) -> None:
  """Raises ConfigError unless `value` is a finite number >= 0 (a weight, scale or rate)."""
  if not value >= 0:  # NaN too: it would only fail after compilation
    raise ConfigError(f'{name} = {value} is negative or NaN; it must be >= 0')
  if math.isinf(value):  # its loss or update would be NaN
    raise ConfigError(f'{name} = {value} is infinite; it must be a finite number >= 0')


def is_int(value: Any) -> bool:
  """Whether value is a whole number of an integer type (not a float, not a bool)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
  """Whether value is a real number (an int or a float, not a bool)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _validate_gabor(gabor: ml_collections.ConfigDict) -> None:
  """Checks the Gabor bank's settings (filters.gabor_bank would fail after start-up)."""
  if not is_int(gabor.size) or gabor.size < 3 or gabor.size % 2 == 0:
    # A 1x1 kernel minus its mean is zero: L_Gabor would be 0 whatever the images.
    raise ConfigError(f'gabor.size = {gabor.size} must be an odd number >= 3 (the kernel '
                      'has a centre pixel and a neighbourhood)')
  if not 0 < gabor.sigma < math.inf:  # NaN too: a NaN filter bank, a NaN loss
    raise ConfigError(f'gabor.sigma = {gabor.sigma} must be > 0 and finite')
  if not is_int(gabor.orientations) or gabor.orientations < 1:
    raise ConfigError(f'gabor.orientations = {gabor.orientations} must be a whole number '
                      '>= 1')
  wavelengths = gabor.wavelengths
  if not isinstance(wavelengths, (tuple, list)):
    # `wavelengths = (4.0)` in a config file is the number 4.0, not a tuple of one.
    raise ConfigError(f'gabor.wavelengths = {wavelengths!r} must be a tuple of wavelengths, '
                      f'e.g. ({wavelengths},) with its comma for one')
  wavelengths = tuple(wavelengths)
  if not wavelengths or any(not _is_real(w) or not 0 < w < math.inf for w in wavelengths):
    # ml_collections keeps an override it cannot parse as a tuple of its text: show the text.
    shown = (repr(wavelengths[0]) if len(wavelengths) == 1 and isinstance(wavelengths[0], str)
             else f'= {wavelengths}')
    raise ConfigError(f'gabor.wavelengths {shown} must name at least one wavelength, each '
                      '> 0 and finite (a number of pixels)')


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} for a nested mapping such as config.to_dict(); lists become tuples."""
  out: dict[str, Any] = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """(field, old value, new value) for each field of two nested mappings that differs."""
  a, b = flatten(old), flatten(new)
  return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def layout_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The settings a checkpoint's arrays depend on, and the variant, as config fields."""
  m = config.model
  return dict(variant=config.variant, image_size=int(config.image_size),
              channels=int(config.channels),
              model=dict(widths=[int(w) for w in m.widths], latent_dim=int(m.latent_dim),
                         hidden_dim=int(m.hidden_dim)))


def layout_hash(config: ml_collections.ConfigDict) -> str:
  """A short fingerprint of layout_settings, which a checkpoint records."""
  settings = layout_settings(config)
  model = settings.pop('model')
  keys = {**settings, **model}  # flat, as the checkpoints of earlier runs were fingerprinted
  return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def same_layout(recorded: str | None, config: ml_collections.ConfigDict) -> bool:
  """Whether a recorded layout_hash is config's; None (an earlier version recorded none) is."""
  return recorded in (None, layout_hash(config))
