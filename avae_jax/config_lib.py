"""The four model variants as settings of one code path, and config validation."""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import hashlib
import json
import math
import numbers
import os
import re
import sys
import textwrap
from typing import Any, Mapping, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

VARIANTS = ('vae', 'avae', 'vae_s', 'avae_s')
TFDS_DATASETS = ('mnist', 'fashion_mnist', 'celeb_a', 'dsprites')
RECONSTRUCTION_TERMS = ('mae', 'mse', 'dssim', 'sobel', 'gabor')
PARALLEL_METHODS = ('pmap', 'shard_map')  # config.parallel (parallel.py maps with them)
TC_ESTIMATORS = ('mws', 'mss')
SSIM_WINDOW = 11  # the 1 - SSIM term's Gaussian window (README: The four models)
CONV_BACKWARDS = ('auto', 'xla', 'custom')  # model.conv_backward (conv.BACKWARDS)
# Names shared by the evaluation and the study report, which imports no JAX: Table III's
# columns, the Inception taps' names by width (inception.TAPS), and the figures.
VARIANT_NAMES = {'vae': 'VAE', 'avae': 'AVAE', 'vae_s': 'VAE-S', 'avae_s': 'AVAE-S'}
TAP_NAMES = {64: 'first max pooling', 192: 'second max pooling', 768: 'pre-aux classifier',
             2048: 'final average pooling'}
FIGURES = ('reconstructions', 'samples', 'interpolations', 'traversals')


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


def _overrides(argv: Sequence[str]) -> list[str]:
  """The --config.FIELD overrides on a command line, as given (without their values)."""
  return [name for name, _ in split_overrides(argv)[1]]


def _unknown_field(error: AttributeError, argv: Sequence[str]) -> str | None:
  """The one-line message for ml_collections' error on an unknown override, else None."""
  # ml_collections raises AttributeError(KeyError("'name'\nDid you mean ...?")).
  missing = error.args[0] if error.args else None
  if not isinstance(missing, KeyError) or not missing.args:
    return None
  field, _, hint = str(missing.args[0]).partition('\n')
  field = field.strip("'")
  named = [o for o in _overrides(argv) if field in o.split('.')[1:]]
  if not named:
    return None
  message = f"{named[0]}: the config has no field '{field}'"
  return f'{message}. {hint}' if hint else message


def _usage_error(message: str) -> None:
  """Exits as absl does for a flag that does not parse."""
  if '\n' in message:  # absl's layout of a message of several lines
    sys.stderr.write(f'FATAL Flags parsing error:\n{textwrap.indent(message, "  ")}\n')
  else:
    sys.stderr.write(f'FATAL Flags parsing error: {message}\n')
  sys.stderr.write('Pass --helpshort or --helpfull to see help on flags.\n')
  sys.exit(1)


# What an override of a field of each type must be, in train.py's and eval.py's messages.
_EXPECTED = {bool: 'true or false', int: 'an integer', float: 'a number'}
# absl's and ml_collections' reasons for an override's value that does not parse, and the
# field type each is about (a bool's message was "('Non-boolean argument to boolean flag',
# 'yes')").
_VALUE_ERRORS = (('Non-boolean argument to boolean flag', bool),
                 ('invalid literal for int()', int),
                 ('could not convert string to float', float))


def _value_error(message: str) -> str:
  """absl's message for an override's value that does not parse, as apply_overrides words it."""
  match = re.fullmatch(r'flag (--config\.[^=]+=.*?): (.*)', message, re.S)
  if match:
    for reason, kind in _VALUE_ERRORS:
      if reason in match.group(2):
        return f'{match.group(1)}: expected {_EXPECTED[kind]}'
  return message


def _stop_on_unknown_field(error: AttributeError, argv: Sequence[str]) -> None:
  """Exits with absl's one-line usage error if `error` is an unknown config override."""
  message = _unknown_field(error, argv)
  if message is not None:
    _usage_error(message)


# Top-level fields every training config has (a study or benchmark settings file has not).
_TRAINING_FIELDS = ('variant', 'dataset', 'image_size', 'channels', 'model', 'loss', 'eval')


def config_spec(argv: Sequence[str]) -> str | None:
  """The last --config=FILE[:ARG] (or --config FILE[:ARG]) on the command line, if any.

  absl reads the flag with one dash too (-config=FILE).
  """
  spec = None
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a == '--':
      break
    if a.startswith(('--config=', '-config=')):
      spec = a.split('=', 1)[1]
    elif a in ('--config', '-config') and i + 1 < len(args):
      spec = args[i + 1]
  return spec


def _check_config_file(spec: str) -> None:
  """Exits with one line if the file of --config=FILE[:ARG] is not a Python file there is."""
  path = spec.split(':', 1)[0]
  if path.endswith('.json'):
    _usage_error(f'--config={spec}: --config takes a Python config file (configs/*.py); '
                 "eval.py reads a workdir's config.json itself when --config is not given")
  if not os.path.isfile(path):
    _usage_error(f'--config={spec}: no such file {path!r}')


def _load_error(spec: str | None, error: Exception, argv: Sequence[str]) -> None:
  """Exits with one line for an error raised while loading the --config file."""
  if isinstance(error, AttributeError):
    _stop_on_unknown_field(error, argv)
  # ml_collections may wrap the file's own error (a SyntaxError, a NameError, ...) in an
  # OSError that names it; the cause is the error itself.
  cause = error.__cause__ or error
  what = f'--config={spec}' if spec is not None else 'the default --config file'
  if isinstance(cause, AttributeError) and "attribute 'get_config'" in str(cause):
    # ml_collections' message names the module it made of the file ('config_config').
    _usage_error(f'{what} could not be loaded: it defines no get_config(), the function '
                 'that returns the config (see configs/default.py)')
  _usage_error(f'{what} could not be loaded: {type(cause).__name__}: {cause}')


def _check_training_config(spec: str | None, argv: Sequence[str]) -> None:
  """Exits with one line if the loaded --config fails to load or is not a training config."""
  try:
    config = flags.FLAGS['config'].value
  except Exception as e:  # pylint: disable=broad-except
    _load_error(spec, e, argv)
    raise
  if config is not None:
    missing = [f for f in _TRAINING_FIELDS if f not in config]
    if missing:
      _usage_error(f'--config={spec} is not a training config (it has no '
                   f'{", ".join(missing)}); see configs/default.py')
    try:  # fields computed from others (the dataset configs' epochs of batch_size)
      config.to_dict()
    except ArithmeticError as e:
      _usage_error(f'--config={spec}: a field computed from others cannot be computed '
                   f'({e}); is --config.batch_size 0?')


# How ml_collections starts the message of an error raised by a config file's get_config.
_CONFIG_FILE_ERROR = 'Error whilst parsing config file:'


def _is_value(arg: str) -> bool:
  """Whether a command-line word is a value rather than a flag (a number may start with -)."""
  if not arg.startswith('-'):
    return True
  try:
    float(arg)
  except ValueError:
    return False
  return True


def joined_overrides(argv: Sequence[str]) -> list[str]:
  """argv with --config.FIELD VALUE as --config.FIELD=VALUE, --noconfig.FIELD as =false.

  absl reads all three forms, and each with one dash as with two (-config=FILE), which
  become two dashes here. The programs take no positional arguments, so a word after an
  override can only be its value. Nothing after a '--' is touched.
  """
  out, i = [argv[0]], 1
  while i < len(argv):
    arg = argv[i]
    if arg == '-config' or arg.startswith(('-config=', '-config.', '-noconfig.')):
      # absl's single-dash form; config_spec and the checks below look for two dashes.
      arg = '-' + arg
    if arg == '--':
      out += argv[i:]
      break
    if arg.startswith('--noconfig.') and '=' not in arg:
      out.append(f'--config.{arg[len("--noconfig."):]}=false')
    elif (arg.startswith('--config.') and '=' not in arg and i + 1 < len(argv)
          and argv[i + 1] != '--' and _is_value(argv[i + 1])):
      out.append(f'{arg}={argv[i + 1]}')
      i += 1
    else:
      out.append(arg)
    i += 1
  return out


def _flags_end(argv: Sequence[str]) -> int:
  """The index of argv's '--', after which absl reads no flags (len(argv) without one)."""
  return argv.index('--') if '--' in argv else len(argv)


def _last_overrides_win(argv: Sequence[str]) -> list[str]:
  """argv with only the last of each repeated --config.FIELD override, in the = form.

  absl keeps the last value of a repeated flag, but ml_collections appends the values of
  a repeated tuple field: --config.model.widths=(8,16) --config.model.widths=(4,4) would
  give (8, 16, 4, 4). The space form (--config.model.widths 8,16) is joined first, or its
  repeats would be appended likewise.
  """
  argv = joined_overrides(argv)
  end = _flags_end(argv)

  def is_override(i: int, a: str) -> bool:
    return 0 < i < end and a.startswith('--config.') and '=' in a

  last = {a.split('=', 1)[0]: i for i, a in enumerate(argv) if is_override(i, a)}
  return [a for i, a in enumerate(argv)
          if not (is_override(i, a) and last[a.split('=', 1)[0]] != i)]


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing (app.run's flags_parser), with config mistakes as usage errors.

  For an override such as --config.batchsize=3, ml_collections raises an AttributeError
  that absl would print as a 40-line traceback; this stops with one line instead, as
  absl does for a value that does not parse. So do an override given without the config
  file it would apply to and a --config file that is missing, fails to load or is not a
  training config. Of an override given twice the last wins, tuples too.
  """
  argv = _last_overrides_win(argv)
  overrides = _overrides(argv)
  spec = config_spec(argv)
  no_default = 'config' in flags.FLAGS and flags.FLAGS['config'].default is None
  if overrides and spec is None and no_default:
    # absl would only say "Unknown command line flag 'config.batch_size'".
    _usage_error(f'{overrides[0]} overrides a field of the config file: give the file with '
                 '--config=FILE')
  if spec is not None and 'config' in flags.FLAGS:
    _check_config_file(spec)
  try:
    rest = flags.FLAGS(list(argv))
  except flags.Error as e:
    # ml_collections turns a TypeError or ValueError of get_config (a variant given to a
    # file whose get_config takes none, a bad argument) into a flag error that holds the
    # whole traceback, which absl would print as it is.
    if 'config' in flags.FLAGS and _CONFIG_FILE_ERROR in str(e):
      cause = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
      _usage_error(f'--config={spec} could not be loaded: {cause}')
    _usage_error(_value_error(str(e)))  # as absl's app.parse_flags_with_usage reports it
  except Exception as e:  # pylint: disable=broad-except
    if 'config' not in flags.FLAGS:
      raise
    _load_error(spec, e, argv)
    raise
  if 'config' in flags.FLAGS:
    _check_training_config(spec, argv)
  return rest


def one_line_usage_errors(main: Any, program: str) -> Any:
  """`main` for app.run, ending on its app.UsageError with one line.

  absl would print the module's docstring and every flag's help before the message.
  """
  def run(argv: list[str]) -> Any:
    try:
      return main(argv)
    except app.UsageError as e:
      sys.exit(f'{program}: error: {e}')
  return run


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
  """(argv without its --config.FIELD[=VALUE] overrides, [(--config.FIELD, VALUE or None)]).

  Every form absl reads counts (joined_overrides); nothing after a '--' does.
  """
  argv = joined_overrides(argv)
  end = _flags_end(argv)
  rest, overrides = [argv[0]], []
  for i, a in enumerate(argv[1:], 1):
    if i < end and a.startswith('--config.'):
      name, eq, value = a.partition('=')
      overrides.append((name, value if eq else None))
    else:
      rest.append(a)
  return rest, overrides


def _override_value(name: str, text: str | None, old: Any) -> Any:
  """`text` parsed as the type of the field's current value `old` (as ml_collections does)."""
  if isinstance(old, bool):
    # absl's words (t and f too), as --config.FIELD=VALUE reads them with a config file.
    if text is None or text.lower() in ('true', 't', '1'):
      return True
    if text.lower() in ('false', 'f', '0'):
      return False
    raise ConfigError(f'{name}={text}: expected {_EXPECTED[bool]}')
  if text is None:
    raise ConfigError(f'{name} needs a value ({name}=VALUE)')
  try:
    if isinstance(old, int):
      return int(text)
    if isinstance(old, float):
      return float(text)
    if isinstance(old, str):
      return text
    if isinstance(old, (tuple, list)):
      value = ast.literal_eval(text)
      value = value if isinstance(value, (tuple, list)) else (value,)
      return type(old)(value)
    return ast.literal_eval(text)  # None or another literal
  except (ValueError, SyntaxError) as e:
    if old is None:
      return text  # a string field that was unset
    if isinstance(old, (tuple, list)):  # a list where the config came from JSON
      kind = f'a tuple such as {tuple(old)}'
    else:
      kind = _EXPECTED.get(type(old), type(old).__name__)
    raise ConfigError(f'{name}={text}: expected {kind}') from e


def _no_field(name: str, field: str, node: ml_collections.ConfigDict) -> ConfigError:
  """The error for an override of a missing field, with ml_collections' suggestion."""
  message = f"{name}: the config has no field '{field}'"
  keys = [str(k) for k in node.keys() if str(k) != field]  # a field that is not a leaf
  matches = difflib.get_close_matches(field, keys, 1, 0.75)
  if matches:
    message += f'. Did you mean "{matches[0]}" instead of "{field}"?'
  return ConfigError(message)


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str | None]]) -> None:
  """Sets (--config.FIELD, VALUE) overrides on a loaded config, e.g. a workdir's config.json."""
  for name, text in overrides:
    *parents, leaf = name[len('--config.'):].split('.')
    node = config
    for part in parents:
      if not isinstance(node.get(part), ml_collections.ConfigDict):
        raise _no_field(name, part, node)
      node = node[part]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      raise _no_field(name, leaf, node)
    node[leaf] = _override_value(name, text, node[leaf])


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


def define_workdir_flag(help_string: str) -> flags.FlagHolder:
  """The required --workdir flag of train.py and eval.py; an empty value is a flag error."""
  holder = flags.DEFINE_string('workdir', None, help_string)
  flags.mark_flag_as_required('workdir')
  # An empty --workdir= passes the required check and would fail later, naming no
  # directory.
  flags.register_validator('workdir', bool, message='--workdir must not be empty')
  return holder


def define_config_file(name: str, default: str | None, help_string: str,
                       **kwargs: Any) -> None:
  """config_flags.DEFINE_config_file, with an unknown config field as a usage error.

  A flag with a default file reads that file, and the overrides on sys.argv, when it is
  defined (at import) rather than when the flags are parsed, so parse_flags is too late
  for it.
  """
  try:
    config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except AttributeError as e:
    _stop_on_unknown_field(e, sys.argv)
    raise


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
  widths = tuple(config.model.widths)
  if any(not _is_int(w) or w < 1 for w in widths):
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


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks every value that would otherwise fail late; raises ConfigError with the fix."""
  variant_spec(config.variant)
  ds = str(config.dataset)
  if not (ds in TFDS_DATASETS or ds == 'shapes' or ds.startswith('folder:')
          or ds.startswith('arrays:')):
    raise ConfigError(
        f'unknown dataset {ds!r}; choose one of {", ".join(TFDS_DATASETS)}, shapes, '
        'folder:PATH (a folder of images) or arrays:PATH (.npy, .npz, idx, idx.gz)')
  check_model(config)
  # SSIM's window must fit in the image; the calibration probes every term, SSIM too.
  probes_ssim = 'dssim' in reconstruction_weights(config) or (
      variant_spec(config.variant).compound_loss and config.calibrate.enabled)
  if probes_ssim and config.image_size < SSIM_WINDOW:
    raise ConfigError(
        f'image_size {config.image_size} is smaller than the SSIM term\'s '
        f'{SSIM_WINDOW}x{SSIM_WINDOW} window: use images of at least {SSIM_WINDOW} pixels, '
        'or switch the term off (loss.weights.dssim=0 and calibrate.enabled=False)')
  if config.channels not in (1, 3):
    raise ConfigError(f'channels must be 1 or 3, got {config.channels}')
  # The data's order comes from numpy's SeedSequence, which takes no negative seed; the
  # PRNG keys (jax.random.PRNGKey) keep only the low 32 bits of a larger one, so seed and
  # seed + 2**32 would share parameters and keys (and from 2**63 PRNGKey overflows).
  if not _is_int(config.seed) or not 0 <= config.seed < 2**32:
    raise ConfigError(f'seed = {config.seed} must be >= 0 and < 2**32 (a whole number: '
                      'the PRNG keys take 32 bits of it)')
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
  if config.batch_size <= 0:
    raise ConfigError(f'batch_size = {config.batch_size} must be >= 1')
  if config.batch_size % num_devices:
    raise ConfigError(f'batch_size {config.batch_size} is not divisible by the '
                      f'{num_devices} devices in use; the batch is split evenly across them')
  # MSS splits the dataset into one stratum per other member of the (global) batch.
  if tc_weight(config) and config.loss.tc_estimator == 'mss' and config.batch_size < 2:
    raise ConfigError(f'batch_size {config.batch_size}: the minibatch-stratified TC '
                      'estimator needs a batch of at least 2 (or loss.tc_estimator=mws)')
  if config.pretrain_steps < 0 or config.adversarial_steps < 0:
    raise ConfigError('pretrain_steps and adversarial_steps must be >= 0')
  if config.parallel not in PARALLEL_METHODS:
    raise ConfigError(f"parallel must be 'pmap' or 'shard_map', got {config.parallel!r}")
  g = config.gating
  if not 0.0 <= g.train_vae_above <= 1.0 or not 0.0 <= g.train_disc_below <= 1.0:
    raise ConfigError('gating thresholds are accuracies and must lie in [0, 1]')
  # The values below otherwise fail only after compilation (a modulo by zero in the loop,
  # a model without units) or, worse, after the whole training (evaluation).
  for name in ('log_every', 'checkpoint_every', 'image_every', 'stop_check_every'):
    if config[name] < 1:
      raise ConfigError(f'{name} = {config[name]} must be >= 1 (a number of steps)')
  if config.keep_checkpoints < 0:
    raise ConfigError(f'keep_checkpoints = {config.keep_checkpoints} is negative; '
                      'use 0 to keep every checkpoint')
  # The running averages' decay: outside [0, 1] (or NaN) the BatchNorm statistics that the
  # evaluation uses diverge while the training losses, on batch statistics, look fine.
  if not 0.0 <= config.model.bn_momentum <= 1.0:
    raise ConfigError(f'model.bn_momentum = {config.model.bn_momentum} must lie in [0, 1] '
                      "(the decay of BatchNorm's running averages)")
  for name in ('latent_dim', 'hidden_dim'):
    if config.model[name] < 1:
      raise ConfigError(f'model.{name} = {config.model[name]} must be >= 1')
  for name in ('learning_rate', 'disc_learning_rate'):
    _check_nonnegative(f'optimizer.{name}', config.optimizer[name])
  for name in ('b1', 'b2'):
    # Adam's moment decays; at 1 or above its bias correction divides by 1 - b**t <= 0.
    if not 0.0 <= config.optimizer[name] < 1.0:
      raise ConfigError(f'optimizer.{name} = {config.optimizer[name]} must lie in [0, 1) '
                        "(Adam's decay rate)")
  # The held-out share of folders and array files without an eval file (NaN would crash
  # the loader with a traceback; a negative share would read as 0).
  if not 0.0 <= config.get('eval_fraction', 0.05) < 1.0:
    raise ConfigError(f'eval_fraction = {config.eval_fraction} must lie in [0, 1) (the '
                      'share of the images held out for evaluation)')
  if config.crop_size < 0:
    raise ConfigError(f'crop_size = {config.crop_size} is negative; 0 means the largest '
                      'centred square')
  if config.calibrate.enabled and config.calibrate.batches < 1:
    raise ConfigError(f'calibrate.batches = {config.calibrate.batches} must be >= 1 '
                      'when calibrate.enabled (or disable the calibration)')
  validate_eval(config)
  _validate_gabor(config.gabor)


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
  if (config.eval.traversal_dims < 0 or not config.eval.traversal_range > 0
      or math.isinf(config.eval.traversal_range)):
    raise ConfigError('eval.traversal_dims must be >= 0 and eval.traversal_range > 0, got '
                      f'{config.eval.traversal_dims} and {config.eval.traversal_range}')


def _check_nonnegative(name: str, value: float) -> None:
  """Raises ConfigError unless `value` is a finite number >= 0 (a weight, scale or rate)."""
  if not value >= 0:  # NaN too: it would only fail after compilation
    raise ConfigError(f'{name} = {value} is negative or NaN; it must be >= 0')
  if math.isinf(value):  # its loss or update would be NaN
    raise ConfigError(f'{name} = {value} is infinite; it must be a finite number >= 0')


def _is_int(value: Any) -> bool:
  """Whether value is a whole number of an integer type (not a float, not a bool)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate_gabor(gabor: ml_collections.ConfigDict) -> None:
  """Checks the Gabor bank's settings (filters.gabor_bank would fail after start-up)."""
  if not _is_int(gabor.size) or gabor.size < 3 or gabor.size % 2 == 0:
    # A 1x1 kernel minus its mean is zero: L_Gabor would be 0 whatever the images.
    raise ConfigError(f'gabor.size = {gabor.size} must be an odd number >= 3 (the kernel '
                      'has a centre pixel and a neighbourhood)')
  if not 0 < gabor.sigma < math.inf:  # NaN too: a NaN filter bank, a NaN loss
    raise ConfigError(f'gabor.sigma = {gabor.sigma} must be > 0 and finite')
  if not _is_int(gabor.orientations) or gabor.orientations < 1:
    raise ConfigError(f'gabor.orientations = {gabor.orientations} must be a whole number '
                      '>= 1')
  if not gabor.wavelengths or any(not 0 < w < math.inf for w in gabor.wavelengths):
    raise ConfigError(f'gabor.wavelengths = {tuple(gabor.wavelengths)} must name at least '
                      'one wavelength, each > 0 and finite (pixels)')


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


def config_hash(config: ml_collections.ConfigDict) -> str:
  """A short fingerprint of layout_settings, which a checkpoint records."""
  settings = layout_settings(config)
  model = settings.pop('model')
  keys = {**settings, **model}  # flat, as the checkpoints of earlier runs were fingerprinted
  return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
