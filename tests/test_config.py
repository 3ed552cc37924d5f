"""Config files and validation: every config loads the way train.py loads it, and every
invalid value stops with a ConfigError that names the field, before anything is traced."""

import ast
import hashlib
import io
import json
import os
import re
import subprocess
import sys

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import pytest

from avae_jax import cli
from avae_jax import config_lib
from avae_jax import parallel
from configs import celeba
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET_CONFIGS = ('default', 'mnist', 'fashion_mnist', 'celeba')


def load_config_file(spec: str, *overrides: str) -> ml_collections.ConfigDict:
  """Loads `configs/<spec>` exactly as train.py's --config flag does (':variant' included)."""
  argv = ['train.py', f'--config={os.path.join(ROOT, "configs", spec)}', *overrides]
  values = flags.FlagValues()
  # The override flags are read from sys_argv (sys.argv by default), as in train.py.
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def set_path(config: ml_collections.ConfigDict, path: str, value) -> None:
  """config.a.b = value for path 'a.b'."""
  *parents, leaf = path.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


# ------------------------------------------------------------------ the config files


def test_default_config_validates_and_is_offline():
  c = load_config_file('default.py')
  config_lib.validate(c, num_devices=1)
  assert c.dataset == 'shapes' and c.variant == 'avae_s' and c.download is False
  assert config_lib.check_image_size(c.image_size, c.model.widths) == 32 // 8


@pytest.mark.parametrize('name', DATASET_CONFIGS)
@pytest.mark.parametrize('variant', [None, 'vae', 'avae', 'vae_s', 'avae_s'])
def test_dataset_configs_load_and_validate(name, variant):
  spec = f'{name}.py' if variant is None else f'{name}.py:{variant}'
  c = load_config_file(spec)
  assert c.variant == (variant or 'avae_s')
  # The global batch must split over common device counts (1 GPU ... 8 TPU cores).
  for n in (1, 2, 4, 8):
    config_lib.validate(c, num_devices=n)
  if c.variant in ('vae', 'vae_s'):
    assert config_lib.adversarial_steps(c) == 0 < c.adversarial_steps
  else:
    assert config_lib.adversarial_steps(c) == c.adversarial_steps > 0


def test_config_file_overrides_apply_on_top_of_the_variant():
  c = load_config_file('mnist.py:vae', '--config.batch_size=32', '--config.model.widths=(8,16)')
  assert (c.variant, c.batch_size, tuple(c.model.widths)) == ('vae', 32, (8, 16))
  config_lib.validate(c, num_devices=4)


@pytest.mark.parametrize('spec', ['default.py', 'mnist.py:vae', 'celeba.py'])
def test_data_dir_can_be_set_from_the_command_line(spec):
  # A bucket or a folder of prepared tfds data, e.g. on a TPU VM (README: Datasets).
  assert load_config_file(spec).data_dir is None
  c = load_config_file(spec, '--config.data_dir=gs://bucket/tfds')
  assert c.data_dir == 'gs://bucket/tfds'
  config_lib.validate(c, num_devices=1)


_PROGRAM_ARGS = {
    'train.py': ['--config=configs/default.py', '--workdir=WORKDIR'],
    'eval.py': ['--config=configs/default.py', '--workdir=WORKDIR'],
    # benchmark.py's --config has a default file, read when the flag is defined.
    'benchmark.py': [],
}


def _check_misspelt(tmp_path, program: str, cases: list[tuple[list[str], str]]) -> None:
  """PROGRAM with each case's overrides stops with its one-line message, creating nothing."""
  args = [a.replace('WORKDIR', str(tmp_path / 'w')) for a in _PROGRAM_ARGS[program]]
  for overrides, message in cases:
    proc = subprocess.run([sys.executable, program, *args, *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1
    assert f'FATAL Flags parsing error: {message}' in proc.stderr, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr and not proc.stdout
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('program', list(_PROGRAM_ARGS))
def test_a_misspelt_override_stops_with_one_line(tmp_path, program):
  _check_misspelt(tmp_path, program, [
      (['--config.batchsize=3'], "--config.batchsize: the config has no field 'batchsize'. "
                                 'Did you mean "batch_size" instead of "batchsize"?'),
      (['--config.eval.nope=2'], "--config.eval.nope: the config has no field 'nope'\n")])


# Parsed as the config file is loaded (train.py, eval.py) or as the flag is defined
# (benchmark.py): one of each.
@pytest.mark.parametrize('program', ['train.py', 'benchmark.py'])
def test_an_override_at_the_wrong_level_names_the_right_one(tmp_path, program):
  _check_misspelt(tmp_path, program, [
      # Of two overrides the one whose path the config lacks is named.
      (['--config.eval.num_images=5', '--config.num_images=3'],
       "--config.num_images: the config has no field 'num_images'. Did you mean "
       '--config.eval.num_images?'),
      # A missing group on the path (ml_collections' KeyError), the rest of it kept.
      (['--config.weights.gabor=2'], "--config.weights.gabor: the config has no field "
                                     "'weights'. Did you mean --config.loss.weights.gabor?")])


@pytest.mark.parametrize('program', ['train.py'])
def test_an_override_without_a_config_file_names_the_missing_flag(tmp_path, program):
  # (eval.py applies such overrides to the workdir's config.json: test_eval_cli.py.)
  proc = subprocess.run([sys.executable, program, f'--workdir={tmp_path / "w"}',
                         '--config.batch_size=3'], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 1
  assert ('FATAL Flags parsing error: --config.batch_size overrides a field of the config '
          'file: give the file with --config=FILE') in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr and not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('override, message', [
    # absl's and ml_collections' reasons, in apply_overrides' words (eval.py's): a bool's
    # was "flag --config.eval.fid=yes: ('Non-boolean argument to boolean flag', 'yes')".
    ('--config.eval.fid=yes', '--config.eval.fid=yes: expected true or false'),
    ('--config.batch_size=abc', '--config.batch_size=abc: expected an integer'),
    ('--config.optimizer.b1=x', '--config.optimizer.b1=x: expected a number'),
])
def test_an_override_value_that_does_not_parse_stops_with_one_line(tmp_path, override,
                                                                   message):
  proc = subprocess.run([sys.executable, 'train.py', '--config=configs/default.py',
                         f'--workdir={tmp_path / "w"}', override], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert f'FATAL Flags parsing error: {message}\n' in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'w')


_BAD_CONFIGS = [
    ('configs/defualt.py', "--config=configs/defualt.py: no such file 'configs/defualt.py'"),
    ('configs', "--config=configs: 'configs' is a directory; --config takes a Python config "
                'file'),
    ('W/config.json', '--config=W/config.json: --config takes a Python config file'),
    ('W/syntax.py', '--config=W/syntax.py could not be loaded: SyntaxError: invalid syntax'),
    ('W/name.py', "--config=W/name.py could not be loaded: NameError: name 'nope' is not "
                  'defined'),
    ('configs/study.py', '--config=configs/study.py is not a training config (it has no '
                         'variant, dataset, image_size, channels, model, loss, eval)'),
    # A TypeError or ValueError of get_config was printed with its whole traceback.
    ('configs/bench_mnist.py:vae', '--config=configs/bench_mnist.py:vae could not be loaded: '
                                   'TypeError: get_config() takes 0 positional arguments but '
                                   '1 was given'),
    ('W/value.py:big', '--config=W/value.py:big could not be loaded: ValueError: no budget '
                       "'big'"),
    # It named the module ml_collections made of the file: "AttributeError: module
    # 'config_config' has no attribute 'get_config'".
    ('W/none.py', '--config=W/none.py could not be loaded: it defines no get_config()'),
]


def _check_bad_config(tmp_path, program: str, spec: str, message: str,
                      *overrides: str) -> None:
  """PROGRAM --config=SPEC OVERRIDES (W: tmp_path, holding the bad files) exits 1 with MESSAGE."""
  (tmp_path / 'config.json').write_text('{"enabled": false}')
  (tmp_path / 'syntax.py').write_text('def get_config(:\n')
  (tmp_path / 'name.py').write_text('def get_config():\n  return nope\n')
  (tmp_path / 'none.py').write_text('CONFIG = {}\n')
  (tmp_path / 'value.py').write_text('def get_config(budget):\n'
                                     '  raise ValueError(f"no budget {budget!r}")\n')
  # A field computed by a power of batch_size (float overflow is an ArithmeticError too).
  (tmp_path / 'power.py').write_text('from configs import default\n'
                                     'def get_config():\n'
                                     '  c = default.get_config()\n'
                                     "  c.scale = c.get_ref('batch_size') * 1.0\n"
                                     "  c.big = c.get_ref('scale') ** 100\n"
                                     '  return c\n')
  spec, message = spec.replace('W', str(tmp_path)), message.replace('W', str(tmp_path))
  workdir = [f'--workdir={tmp_path / "w"}'] if program == 'train.py' else []
  proc = subprocess.run([sys.executable, program, f'--config={spec}', *overrides, *workdir],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1, program
  assert f'FATAL Flags parsing error: {message}' in proc.stderr, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('spec, message', _BAD_CONFIGS)
def test_a_config_file_that_cannot_be_used_stops_with_one_line(tmp_path, spec, message):
  _check_bad_config(tmp_path, 'train.py', spec, message)


def test_benchmark_py_reads_its_config_file_as_train_py_does(tmp_path):
  # The same loader (cli.define_config_file): two of the cases above, a missing file and
  # an error of get_config, stand for all.
  for spec, message in _BAD_CONFIGS:
    if spec in ('configs/defualt.py', 'W/value.py:big'):
      _check_bad_config(tmp_path, 'benchmark.py', spec, message)


@pytest.mark.parametrize('form', ['=', ' '])
def test_of_a_config_field_given_twice_the_last_wins(tmp_path, form):
  # ml_collections concatenated a tuple given twice: (8, 16) then (4, 4) gave (8, 16, 4, 4),
  # in absl's --config.FIELD VALUE form too. Seen through the error that image size 18 is
  # not divisible by the widths' 2**2 = 4 (the concatenation's four stages would say 16).
  overrides = []
  for field, value in [('image_size', '32'), ('model.widths', '(8,16)'),
                       ('image_size', '18'), ('model.widths', '(4,4)')]:
    overrides += ([f'--config.{field}={value}'] if form == '=' else
                  [f'--config.{field}', value])
  proc = subprocess.run([sys.executable, 'train.py', '--config=configs/default.py',
                         f'--workdir={tmp_path / "w"}', *overrides], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert ('image_size 18 is not divisible by 2**len(model.widths) = 4 (widths (4, 4))'
          in proc.stderr), proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / 'w')


def test_repeated_overrides_in_every_form_of_absls_keep_the_last():
  argv = ['train.py', '--config.model.widths', '8,16', '--config.batch_size', '16',
          '--config.model.widths=(4,4)', '--config.batch_size', '32',
          '--config.model.widths', '2,4', '--config.loss.kl_weight', '-1.5',
          '--noconfig.eval.fid']
  kept = cli._last_overrides_win(argv)  # pylint: disable=protected-access
  assert kept == ['train.py', '--config.batch_size=32', '--config.model.widths=2,4',
                  '--config.loss.kl_weight=-1.5', '--config.eval.fid=false']
  c = load_config_file('default.py', *kept[1:])
  assert (tuple(c.model.widths), c.batch_size, c.loss.kl_weight, c.eval.fid) == (
      (2, 4), 32, -1.5, False)
  # A value given to --noconfig.FIELD is left for absl to refuse, not made a false.
  assert cli.joined_overrides(['x', '--noconfig.eval.fid=true']) == [
      'x', '--noconfig.eval.fid=true']
  # A flag after an override is no value of it; after '--' nothing is an override.
  assert cli.joined_overrides(
      ['x', '--config.eval.fid', '--workdir=w', '--', '--config.seed', '3']) == [
          'x', '--config.eval.fid', '--workdir=w', '--', '--config.seed', '3']


def test_the_config_flags_may_take_one_dash(tmp_path):
  # absl reads -config=FILE as --config=FILE; parse_flags took the overrides for ones
  # given without a config file and stopped with a false usage error.
  assert cli.joined_overrides(
      ['x', '-config', 'c.py', '-config.model.widths', '8,16', '-noconfig.eval.fid',
       '-configure', '-workdir=w']) == [
           'x', '--config', 'c.py', '--config.model.widths=8,16', '--config.eval.fid=false',
           '-configure', '-workdir=w']
  proc = subprocess.run([sys.executable, 'train.py', '-config=configs/default.py',
                         f'--workdir={tmp_path / "w"}', '--config.image_size=18'], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert 'image_size 18 is not divisible by 2**len(model.widths) = 8' in proc.stderr, (
      proc.stderr[-2000:])


def test_config_spec_reads_every_form_of_the_flag(tmp_path):
  for args, spec in [(['--config=a.py:vae'], 'a.py:vae'), (['--config', 'a.py'], 'a.py'),
                     (['-config=a.py'], 'a.py'), (['-config', 'a.py'], 'a.py'),
                     (['--config=a.py', '-config=b.py'], 'b.py'),
                     (['--config.batch_size=3'], None), (['--', '--config=a.py'], None)]:
    assert cli.config_spec(['eval.py', *args]) == spec, args
  # eval.py took -config=FILE for no config file: it set the overrides aside for the
  # workdir's config.json and evaluated with the file's values, the overrides ignored.
  (tmp_path / 'w').mkdir()
  proc = subprocess.run([sys.executable, 'eval.py', '-config=configs/default.py',
                         f'--workdir={tmp_path / "w"}', '--config.eval.num_images=1'],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert 'eval.num_images = 1: the evaluation needs at least 2 images' in proc.stderr, (
      proc.stderr[-2000:])


def test_an_override_of_a_field_that_is_none_in_a_loaded_config_is_its_text():
  # A config.json keeps an unset data_dir as null: eval.py's --config.data_dir=DIR (no
  # Python literal) must set the folder, as --config.data_dir does with a config file.
  c = ml_collections.ConfigDict(json.loads(default.get_config().to_json()))
  assert c.data_dir is None
  cli.apply_overrides(c, [('--config.data_dir', '/data/tfds')])
  assert c.data_dir == '/data/tfds'


def test_overrides_of_a_loaded_config_parse_as_the_fields_types():
  c = default.get_config()
  _, overrides = cli.split_overrides([
      'eval.py', '--workdir=w', '--config.eval.fid=false', '--config.eval.num_images=12',
      '--config.loss.kl_weight=2', '--config.model.widths=(4, 8)', '--config.dataset=shapes',
      '--config.calibrate.enabled'])
  cli.apply_overrides(c, overrides)
  assert c.eval.fid is False and c.calibrate.enabled is True
  assert c.eval.num_images == 12 and isinstance(c.eval.num_images, int)
  assert c.loss.kl_weight == 2.0 and isinstance(c.loss.kl_weight, float)
  assert tuple(c.model.widths) == (4, 8) and c.dataset == 'shapes'
  # One number for a tuple field is a tuple of one (as absl's own parser makes it).
  cli.apply_overrides(c, [('--config.model.widths', '8')])
  assert tuple(c.model.widths) == (8,)
  # Booleans in absl's words, as with a --config file.
  cli.apply_overrides(c, [('--config.eval.fid', 'T'), ('--config.calibrate.enabled', 'f')])
  assert c.eval.fid is True and c.calibrate.enabled is False
  cli.apply_overrides(c, [('--config.eval.fid', '0'), ('--config.calibrate.enabled', '1')])
  assert c.eval.fid is False and c.calibrate.enabled is True
  for override, message in [('--config.eval.num_images=many', 'expected an integer'),
                            ('--config.eval.fid=maybe', 'expected true or false'),
                            ('--config.eval.fid=yes', 'expected true or false'),  # as absl
                            ('--config.model.widths=(4,x)',
                             r'expected a tuple such as \(8,\)$'),
                            ('--config.model.nope=1', "no field 'nope'"),
                            ('--config.eval=1', "'eval' is a group of fields")]:
    with pytest.raises(config_lib.ConfigError, match=message):
      cli.apply_overrides(c, cli.split_overrides(['x', override])[1])


def test_overrides_of_a_loaded_config_are_split_off_in_every_form(tmp_path):
  rest, overrides = cli.split_overrides([
      'eval.py', '-config.eval.num_images=12', '-workdir=w', '-config.model.widths', '4,8',
      '-noconfig.eval.fid', '--', '--config.seed=3'])
  assert rest == ['eval.py', '-workdir=w', '--', '--config.seed=3']
  assert overrides == [('--config.eval.num_images', '12'), ('--config.model.widths', '4,8'),
                       ('--config.eval.fid', 'false')]
  # eval.py without --config stopped on -config.FIELD=VALUE with 'give the file with
  # --config=FILE' instead of applying it to the workdir's config.json.
  (tmp_path / 'config.json').write_text(json.dumps(default.get_config().to_dict()))
  proc = subprocess.run([sys.executable, 'eval.py', f'--workdir={tmp_path}',
                         '-config.eval.num_images=1'], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 1
  assert 'eval.num_images = 1: the evaluation needs at least 2 images' in proc.stderr, (
      proc.stderr[-2000:])


def test_a_misspelt_override_of_a_loaded_config_suggests_the_field():
  # eval.py applies overrides to a workdir's config.json; its message matches train.py's.
  c = default.get_config()
  for override, message in [
      ('--config.batchsize=3', "--config.batchsize: the config has no field 'batchsize'. "
                               'Did you mean "batch_size" instead of "batchsize"?'),
      ('--config.eval.fidd=1', "--config.eval.fidd: the config has no field 'fidd'. "
                               'Did you mean "fid" instead of "fidd"?'),
      ('--config.modl.widths=(4,)', "--config.modl.widths: the config has no field 'modl'. "
                                    'Did you mean "model" instead of "modl"?'),
      # A field of that name at another level is the likelier meaning.
      ('--config.traversal_dims=3', "--config.traversal_dims: the config has no field "
                                    "'traversal_dims'. Did you mean --config.eval.traversal_dims?"),
      ('--config.model.batch_size=4', "--config.model.batch_size: the config has no field "
                                      "'batch_size'. Did you mean --config.batch_size or "
                                      '--config.eval.batch_size?')]:
    with pytest.raises(config_lib.ConfigError) as e:
      cli.apply_overrides(c, cli.split_overrides(['x', override])[1])
    assert str(e.value) == message
  with pytest.raises(config_lib.ConfigError) as e:
    cli.apply_overrides(c, cli.split_overrides(['x', '--config.eval.nope=2'])[1])
  assert str(e.value) == "--config.eval.nope: the config has no field 'nope'"
  # A group given a value, a field given a path below it, a missing group on the path.
  for override, message in [
      ('--config.eval=1', "--config.eval: 'eval' is a group of fields: override one "
                          '(--config.eval.FIELD)'),
      ('--config.batch_size.x=1', "--config.batch_size.x: 'batch_size' is a field with no "
                                  'fields under it: --config.batch_size=VALUE'),
      ('--config.weights.gabor=2', "--config.weights.gabor: the config has no field "
                                   "'weights'. Did you mean --config.loss.weights.gabor?"),
      ('--config.loss.gabor=2', "--config.loss.gabor: the config has no field 'gabor'. "
                                'Did you mean --config.loss.weights.gabor?')]:
    with pytest.raises(config_lib.ConfigError) as e:
      cli.apply_overrides(c, cli.split_overrides(['x', override])[1])
    assert str(e.value) == message


def test_celeba_is_the_papers_setup():
  c = load_config_file('celeba.py')
  assert (c.dataset, c.image_size, c.channels) == ('celeb_a', 96, 3)
  # Table I: four stages 24-48-96-192 down to 6x6x192, 48 hidden units, 32 latent dims.
  assert tuple(c.model.widths) == (24, 48, 96, 192)
  assert config_lib.check_image_size(c.image_size, c.model.widths) == 6
  assert (c.model.hidden_dim, c.model.latent_dim) == (48, 32)
  # 100 epochs of pre-training over CelebA's 162,770 training images, in whole steps.
  assert 0 <= 100 * 162_770 - c.pretrain_steps * c.batch_size < c.batch_size
  assert celeba.TRAIN_EXAMPLES == 162_770
  # "We probed the loss components for 1 epoch."
  assert c.calibrate.enabled and c.calibrate.batches == 162_770 // 64


@pytest.mark.parametrize('spec, train_examples, epochs', [
    ('celeba.py', 162_770, (100, 10)), ('mnist.py', 60_000, (20, 5)),
    ('fashion_mnist.py', 60_000, (20, 5))])
def test_dataset_configs_count_epochs_at_any_batch_size(spec, train_examples, epochs):
  # Fixed at batch 64, --config.batch_size=256 trained CelebA for 400 epochs.
  for batch in (64, 256):
    c = load_config_file(spec, f'--config.batch_size={batch}')
    assert (c.pretrain_steps, c.adversarial_steps, c.calibrate.batches) == (
        epochs[0] * train_examples // batch, epochs[1] * train_examples // batch,
        train_examples // batch)
  # A step count given on the command line is taken as it is.
  c = load_config_file(spec, '--config.batch_size=256', '--config.pretrain_steps=10')
  assert (c.pretrain_steps, c.adversarial_steps) == (10, epochs[1] * train_examples // 256)


@pytest.mark.parametrize('spec', ['mnist.py', 'celeba.py'])
def test_a_bad_batch_size_of_a_dataset_config_is_named_not_the_count_it_computes(spec):
  # The dataset configs compute calibrate.batches (one epoch) from the batch size: a
  # negative batch size was reported as a negative calibrate.batches, the user's field
  # unnamed.
  c = load_config_file(spec, '--config.batch_size=-64')
  with pytest.raises(config_lib.ConfigError, match=r'^batch_size = -64 must be >= 2 '):
    config_lib.validate(c, num_devices=1)
  c = load_config_file(spec, '--config.batch_size=1000000')
  with pytest.raises(config_lib.ConfigError, match=r'calibrate\.batches = 0 must be >= 1 .*'
                     r'is batch_size 1000000 larger than the training split\?'):
    config_lib.validate(c, num_devices=1)


def test_a_zero_batch_size_of_a_dataset_config_is_one_line():
  proc = subprocess.run([sys.executable, 'train.py', '--config=configs/mnist.py',
                         '--config.batch_size=0', '--workdir=unused'], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert ('FATAL Flags parsing error: --config=configs/mnist.py: a field computed from '
          'others cannot be computed (integer division or modulo by zero); is '
          '--config.batch_size 0?') in proc.stderr


def test_an_overflow_in_a_computed_field_is_one_line_without_the_zero_hint(tmp_path):
  _check_bad_config(tmp_path, 'train.py', 'W/power.py',
                    '--config=W/power.py: a field computed from others cannot be computed '
                    "((34, 'Numerical result out of range'))\n", '--config.batch_size=10000')


def test_mnist_configs_are_28x28_gray_with_two_stages():
  for name, dataset in (('mnist.py', 'mnist'), ('fashion_mnist.py', 'fashion_mnist')):
    c = load_config_file(name)
    assert (c.dataset, c.image_size, c.channels) == (dataset, 28, 1)
    assert config_lib.check_image_size(c.image_size, c.model.widths) == 7


def test_unknown_variant_in_the_config_argument_fails_validation():
  c = load_config_file('mnist.py:vea')
  with pytest.raises(config_lib.ConfigError, match=r"unknown variant 'vea'.*avae_s"):
    config_lib.validate(c, num_devices=1)


# ------------------------------------------------------------------ variant switches


@pytest.mark.parametrize('variant, compound, tc, adversarial', [
    ('vae', False, False, False),
    ('avae', False, False, True),
    ('vae_s', True, True, False),
    ('avae_s', True, True, True),
])
def test_variant_switches(variant, compound, tc, adversarial):
  c = default.get_config()
  c.variant = variant
  c.loss.weights.sobel = 0.0
  c.loss.tc_weight = 0.25
  spec = config_lib.variant_spec(variant)
  assert (spec.compound_loss, spec.total_correlation, spec.adversarial) == (
      compound, tc, adversarial)
  weights = config_lib.reconstruction_weights(c)
  if compound:  # zero weights are dropped (the term is not even computed)
    assert weights == {'mae': 1.0, 'mse': 1.0, 'dssim': 1.0, 'gabor': 1.0}
  else:  # the vanilla VAE's MSE alone, whatever the config's compound weights say
    assert weights == {'mse': 1.0}
  assert config_lib.tc_weight(c) == (0.25 if tc else 0.0)
  assert config_lib.adversarial_steps(c) == (c.adversarial_steps if adversarial else 0)


def test_check_image_size_returns_the_bottleneck_side():
  assert config_lib.check_image_size(96, (24, 48, 96, 192)) == 6
  assert config_lib.check_image_size(28, (4, 8)) == 7
  assert config_lib.check_image_size(16, (4,)) == 8
  for size, widths in ((28, (4, 8, 16)), (18, (4, 8)), (16, ())):
    with pytest.raises(config_lib.ConfigError, match='widths'):
      config_lib.check_image_size(size, widths)
  for size in (0, -8):
    with pytest.raises(config_lib.ConfigError, match=f'image_size must be > 0, got {size}'):
      config_lib.check_image_size(size, (4,))


# ------------------------------------------------------------------ validation errors


INVALID = [
    # (field, value, message pattern)
    ('variant', 'gan', r"unknown variant 'gan'; choose one of vae, avae, vae_s, avae_s"),
    ('dataset', 'imagenet', r"unknown dataset 'imagenet'.*shapes.*folder:PATH.*arrays:PATH"),
    ('loss.weights.mae', -1.0, r'loss\.weights\.mae = -1\.0 is negative'),
    ('loss.weights.gabor', -0.5, r'loss\.weights\.gabor = -0\.5 is negative'),
    ('loss.kl_weight', -1.0, r'loss\.kl_weight = -1\.0 is negative'),
    ('loss.tc_weight', -2.0, r'loss\.tc_weight = -2\.0 is negative'),
    ('loss.adversarial_weight', -1.0, r'loss\.adversarial_weight = -1\.0 is negative'),
    ('loss.reconstruction_scale', -3.0, r'loss\.reconstruction_scale = -3\.0 is negative'),
    # NaN passes "< 0" and would only fail as a non-finite loss after compiling.
    ('loss.weights.sobel', float('nan'), r'loss\.weights\.sobel = nan is negative or NaN'),
    ('loss.kl_weight', float('nan'), r'loss\.kl_weight = nan is negative or NaN'),
    ('optimizer.learning_rate', float('nan'), r'optimizer\.learning_rate = nan'),
    ('loss.tc_estimator', 'kde', r'tc_estimator must be one of'),
    ('image_size', 30, r'image_size 30 is not divisible by 2\*\*len\(model.widths\) = 8'),
    # 0 is divisible by 8: it was reported as not divisible.
    ('image_size', 0, r'image_size must be > 0, got 0'),
    ('model.widths', (), r'model\.widths must name at least one stage'),
    ('channels', 2, r'channels must be 1 or 3'),
    ('batch_size', 6, r'batch_size 6 is not divisible by the 4 devices'),
    ('pretrain_steps', -1, r'pretrain_steps and adversarial_steps must be >= 0'),
    ('adversarial_steps', -5, r'pretrain_steps and adversarial_steps must be >= 0'),
    ('parallel', 'vmap', r"parallel must be one of \('pmap', 'shard_map'\), got 'vmap'"),
    ('model.dtype', 'float16', r"model\.dtype must be 'float32' or 'bfloat16'"),
    # Was checked only when the model was built, in a workdir created and locked for it.
    ('model.conv_backward', 'cutom', r"model\.conv_backward must be one of auto, xla, "
                                     r"custom, got 'cutom'"),
    ('gating.train_disc_below', 1.5, r'gating thresholds'),
    ('gating.train_vae_above', -0.1, r'gating thresholds'),
    # Values that used to fail only after compiling (modulo by zero in the loop, a model
    # without units) or after the whole training (the evaluation).
    ('log_every', 0, r'log_every = 0 must be >= 1'),
    ('stop_check_every', 0, r'stop_check_every = 0 must be >= 1'),
    ('seed', -1, r'seed = -1 must be >= 0'),  # else the data loader's error, after set-up
    # PRNGKey keeps 32 bits: 2**32 drew seed 0's parameters; 2**63 overflowed in PRNGKey.
    ('seed', 2**32, r'seed = 4294967296 must be >= 0 and < 2\*\*32'),
    ('seed', 2**63, r'seed = 9223372036854775808 must be >= 0 and < 2\*\*32'),
    # Infinities, like NaN, would only fail as a non-finite loss after compiling.
    ('loss.weights.mse', float('inf'), r'loss\.weights\.mse = inf is infinite'),
    ('loss.reconstruction_scale', float('inf'), r'loss\.reconstruction_scale = inf is infinite'),
    ('optimizer.learning_rate', float('inf'), r'optimizer\.learning_rate = inf is infinite'),
    ('gabor.sigma', float('nan'), r'gabor\.sigma = nan must be > 0 and finite'),
    ('gabor.wavelengths', (4.0, float('inf')), r'gabor\.wavelengths = \(4\.0, inf\).*finite'),
    # The text of an override that ml_collections could not parse as a tuple (a TypeError
    # traceback), and a bool.
    ('gabor.wavelengths', ('abc',), r"gabor\.wavelengths 'abc' must name at least one "
                                    r'wavelength, each > 0 and finite \(a number of pixels\)'),
    ('gabor.wavelengths', (4.0, True), r'gabor\.wavelengths = \(4\.0, True\) must'),
    ('eval.traversal_range', float('nan'), r'eval\.traversal_range > 0'),
    # A NaN momentum trained with finite losses and evaluated to NaN at the end.
    ('model.bn_momentum', float('nan'), r'model\.bn_momentum = nan must lie in \[0, 1\]'),
    ('model.bn_momentum', 1.5, r'model\.bn_momentum = 1\.5 must lie in \[0, 1\]'),
    # Both were "not divisible by the 1 devices in use".
    ('batch_size', 0, r'batch_size = 0 must be >= 2'),
    ('batch_size', -4, r'batch_size = -4 must be >= 2'),
    ('checkpoint_every', 0, r'checkpoint_every = 0 must be >= 1'),
    ('image_every', -1, r'image_every = -1 must be >= 1'),
    ('keep_checkpoints', -1, r'keep_checkpoints = -1 is negative'),
    ('model.latent_dim', 0, r'model\.latent_dim = 0 must be >= 1'),
    ('model.hidden_dim', 0, r'model\.hidden_dim = 0 must be >= 1'),
    ('model.widths', (4, 0), r'model\.widths \(4, 0\) must all be whole numbers >= 1'),
    ('model.widths', (4.5, 8), r'model\.widths \(4\.5, 8\) must all be whole numbers'),
    # The text of an override that ml_collections could not parse as a tuple.
    ('model.widths', ('(4,8,x)',), r"model\.widths '\(4,8,x\)' must all be whole numbers"),
    ('optimizer.learning_rate', -1e-3, r'optimizer\.learning_rate = -0\.001 is negative'),
    ('optimizer.disc_learning_rate', -1.0, r'optimizer\.disc_learning_rate = -1\.0 is negative'),
    ('optimizer.b1', 1.5, r'optimizer\.b1 = 1\.5 must lie in \[0, 1\)'),
    ('optimizer.b2', 1.0, r'optimizer\.b2 = 1\.0 must lie in \[0, 1\)'),
    ('optimizer.b1', -0.1, r'optimizer\.b1 = -0\.1 must lie in \[0, 1\)'),
    ('crop_size', -2, r'crop_size = -2 is negative'),
    ('crop_size', -1, r'crop_size = -1 is negative'),
    ('eval_fraction', float('nan'), r'eval_fraction = nan must lie in \[0, 1\)'),
    ('eval_fraction', -0.2, r'eval_fraction = -0\.2 must lie in \[0, 1\)'),
    ('eval_fraction', 1.0, r'eval_fraction = 1\.0 must lie in \[0, 1\)'),
    ('calibrate.batches', 0, r'calibrate\.batches = 0 must be >= 1'),
    ('eval.num_images', 1, r'eval\.num_images = 1.*at least 2'),
    ('eval.num_images', -4, r'eval\.num_images = -4.*at least 2'),
    ('eval.mig_num_images', 1, r'eval\.mig_num_images = 1.*at least 2'),
    ('eval.mig_num_images', -1, r'eval\.mig_num_images = -1.*at least 2'),
    ('eval.inception_batch_size', 0, r'eval\.inception_batch_size = 0 must be >= 1'),
    ('eval.batch_size', 0, r'eval\.batch_size = 0 must be >= 1'),
    ('eval.grid_size', 1, r'eval\.grid_size = 1 must be >= 2'),
    ('eval.grid_size', 0, r'eval\.grid_size = 0 must be >= 2'),
    ('eval.traversal_dims', -1, r'eval\.traversal_dims must be >= 0'),
    ('eval.traversal_range', 0.0, r'eval\.traversal_range > 0'),
    ('eval.traversal_range', 1e39, r'traversal_range > 0 \(at most float32.s largest number, '
                                   r'3\.4e38\), got 4 and 1e\+39'),
    ('eval.traversal_dims', 33, r'eval\.traversal_dims = 33 is more than the model has '
                                r'\(model\.latent_dim = 32\)'),
    ('gabor.size', 10, r'gabor\.size = 10 must be an odd number'),
    ('gabor.size', 0, r'gabor\.size = 0 must be an odd number'),
    ('gabor.size', 1, r'gabor\.size = 1 must be an odd number >= 3'),
    ('gabor.sigma', 0.0, r'gabor\.sigma = 0\.0 must be > 0'),
    ('gabor.sigma', float('inf'), r'gabor\.sigma = inf must be > 0 and finite'),
    ('gabor.orientations', 0, r'gabor\.orientations = 0 must be a whole number >= 1'),
    ('gabor.wavelengths', (), r'gabor\.wavelengths = \(\) must name at least one'),
    ('gabor.wavelengths', (4.0, -8.0), r'gabor\.wavelengths = \(4\.0, -8\.0\).*each > 0'),
    # A wavelength of 0 divides by zero in the bank; True is no count.
    ('gabor.wavelengths', (0.0, 4.0), r'gabor\.wavelengths = \(0\.0, 4\.0\).*each > 0'),
    ('gabor.orientations', True, r'gabor\.orientations = True must be a whole number'),
    ('seed', True, r'seed = True must be >= 0'),
]


def test_differences_are_listed_by_field_name():
  # The changed settings that the trainer, eval.py and the API name, in one order.
  old = {'z': 1, 'a': {'y': 1, 'b': 2}, 'm': 3}
  new = {'z': 2, 'a': {'y': 0, 'b': 3}, 'm': 3, 'c': 4}
  assert config_lib.differences(old, new) == [
      ('a.b', 2, 3), ('a.y', 1, 0), ('c', None, 4), ('z', 1, 2)]


def test_as_many_traversal_dims_as_latent_dims_is_valid():
  c = default.get_config()
  c.eval.traversal_dims = c.model.latent_dim  # every dimension: the bound itself
  config_lib.validate(c, num_devices=4)


@pytest.mark.parametrize('field, value, pattern', INVALID, ids=[f'{f}={v}' for f, v, _ in INVALID])
def test_validate_rejects_with_a_clear_message(field, value, pattern):
  c = default.get_config()
  set_path(c, field, value)
  with pytest.raises(config_lib.ConfigError, match=pattern):
    config_lib.validate(c, num_devices=4)


def test_validate_names_every_group_s_problem_at_once():
  # Three mistakes in three groups of settings: one run names all three, in order.
  c = default.get_config()
  c.batch_size, c.optimizer.b1, c.eval.grid_size = 1, 1.5, 1
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=1)
  lines = str(e.value).splitlines()
  assert lines[0] == '3 problems in the config:'
  assert [line[:16] for line in lines[1:]] == [
      '  - batch_size =', '  - optimizer.b1', '  - eval.grid_si']
  c.optimizer.b1, c.eval.grid_size = 0.9, 2  # one mistake: its message alone
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=1)
  assert str(e.value).startswith('batch_size = 1 must be >= 2')


def test_settings_that_the_dataset_ignores_are_named_for_shapes_only():
  c = default.get_config()
  assert config_lib.ignored_settings(c) == []  # the defaults: nothing set
  c.crop_size, c.train_split, c.eval_fraction = 20, 'train[:50%]', 0.1
  assert config_lib.ignored_settings(c) == [
      'crop_size=20', "train_split='train[:50%]'", 'eval_fraction=0.1']
  c.dataset = 'folder:/data/faces'  # a folder crops and holds out eval_fraction
  assert config_lib.ignored_settings(c) == []


def test_each_conv_backward_choice_means_what_the_readme_says():
  # custom everywhere, xla nowhere, auto on the CPU only (these tests run on the CPU).
  from avae_jax import conv  # pylint: disable=g-import-not-at-top
  assert {b: conv.uses_custom(b) for b in config_lib.CONV_BACKWARDS} == {
      'custom': True, 'xla': False, 'auto': jax.default_backend() == 'cpu'}
  with pytest.raises(ValueError, match="got 'cutom'"):
    conv.uses_custom('cutom')


def test_images_smaller_than_the_ssim_window_need_the_term_off():
  c = default.get_config()
  c.image_size, c.model.widths = 8, (8,)
  with pytest.raises(config_lib.ConfigError, match=r'image_size 8 is smaller than the SSIM'):
    config_lib.validate(c, num_devices=1)
  c.loss.weights.dssim = 0.0  # still probed by the calibration
  with pytest.raises(config_lib.ConfigError, match=r'calibrate\.enabled=False'):
    config_lib.validate(c, num_devices=1)
  c.calibrate.enabled = False
  config_lib.validate(c, num_devices=1)
  c.loss.weights.dssim, c.variant = 1.0, 'avae'  # MSE alone
  config_lib.validate(c, num_devices=1)


def test_calibration_batches_only_matter_when_enabled():
  c = default.get_config()
  c.calibrate.enabled, c.calibrate.batches = False, 0
  config_lib.validate(c, num_devices=1)


def test_unknown_reconstruction_term_is_rejected():
  c = default.get_config()
  c.loss.weights.l3 = 1.0
  with pytest.raises(config_lib.ConfigError, match=r'loss\.weights\.l3 is not a reconstruction'):
    config_lib.validate(c, num_devices=1)


def test_a_compound_loss_needs_a_reconstruction_term():
  c = default.get_config()
  for term in config_lib.RECONSTRUCTION_TERMS:
    c.loss.weights[term] = 0.0
  with pytest.raises(config_lib.ConfigError, match=r"'avae_s' with every loss\.weights\.\* "
                     'at 0 has no reconstruction term'):
    config_lib.validate(c, num_devices=1)
  c.loss.weights.gabor = 0.5
  config_lib.validate(c, num_devices=1)
  c.loss.weights.gabor, c.variant = 0.0, 'avae'  # MSE alone, whatever the weights say
  config_lib.validate(c, num_devices=1)


def test_a_seed_that_is_not_a_whole_number_is_rejected():
  # A config file's seed = 1.5 (the command line refuses it) was truncated to 1.
  fields = default.get_config().to_dict()
  fields['seed'] = 1.5
  with pytest.raises(config_lib.ConfigError, match=r'seed = 1\.5 must be .*a whole number'):
    config_lib.validate(ml_collections.ConfigDict(fields), num_devices=1)


def test_a_config_without_a_field_of_the_default_is_one_config_error():
  # A user's config that lacks a field stopped with a KeyError traceback from validate.
  c = default.get_config()
  del c['stop_check_every']
  del c.calibrate['batches']
  with pytest.raises(config_lib.ConfigError,
                     match=r'has no calibrate\.batches, stop_check_every: start it from'):
    config_lib.validate(c, num_devices=1)
  c = default.get_config()
  del c['cpu_devices']  # read with its default (configs written before it existed)
  del c.loss.weights['gabor']  # a term left out is switched off
  config_lib.validate(c, num_devices=1)


@pytest.mark.parametrize('path, kind', [('batch_size', int), ('model.latent_dim', int),
                                        ('loss.kl_weight', float)])
def test_an_unset_placeholder_is_one_config_error(path, kind):
  # An unset placeholder stopped with a TypeError traceback ('<=' between None and int).
  c = default.get_config()
  set_path(c, path, ml_collections.config_dict.placeholder(kind))
  with pytest.raises(config_lib.ConfigError, match=rf'{re.escape(path)} is not set'):
    config_lib.validate(c, num_devices=1)


def test_counts_must_be_ints():
  # A config file written from scratch: latent_dim = 4.0 trained, then failed in JAX at the
  # training figures; pretrain_steps = 2.5 trained 2 steps.
  fields = default.get_config().to_dict()
  fields['model']['latent_dim'] = 4.0
  with pytest.raises(config_lib.ConfigError, match=r'model\.latent_dim = 4\.0 must be a whole'):
    config_lib.validate(ml_collections.ConfigDict(fields), num_devices=1)
  fields = default.get_config().to_dict()
  fields['pretrain_steps'] = 2.5
  with pytest.raises(config_lib.ConfigError, match=r'pretrain_steps = 2\.5 must be a whole'):
    config_lib.validate(ml_collections.ConfigDict(fields), num_devices=1)
  fields = default.get_config().to_dict()
  fields['batch_size'] = 64.0  # whole, but a float: said so, not truncated somewhere
  with pytest.raises(config_lib.ConfigError, match=r'batch_size = 64\.0 must be a whole'):
    config_lib.validate(ml_collections.ConfigDict(fields), num_devices=1)


def test_every_count_of_the_default_config_refuses_a_float():
  # Each int field of configs/default.py, not only the three above: a count left out of
  # the checks (eval.grid_size = 4.0, say) would pass the range checks and fail later.
  counts = {k: v for k, v in config_lib.flatten(default.get_config().to_dict()).items()
            if isinstance(v, int) and not isinstance(v, bool)}
  assert len(counts) > 20
  for path, value in counts.items():
    fields = default.get_config().to_dict()
    *groups, leaf = path.split('.')
    node = fields
    for group in groups:
      node = node[group]
    node[leaf] = float(value)
    with pytest.raises(config_lib.ConfigError, match=rf'^{re.escape(path)} = .*whole number'):
      config_lib.validate(ml_collections.ConfigDict(fields), num_devices=1)


@pytest.mark.parametrize('path, value, pattern', [
    ('model.widths', 16, r'model\.widths = 16 must be a tuple .* \(16,\) with its comma'),
    ('gabor.wavelengths', 4.0, r'gabor\.wavelengths = 4\.0 must be a tuple .* \(4\.0,\)')])
def test_a_tuple_field_written_without_its_comma_is_one_config_error(path, value, pattern):
  # `widths = (16)` in a config file written from scratch is the number 16: it stopped
  # with "TypeError: 'int' object is not iterable".
  fields = default.get_config().to_dict()
  group, leaf = path.split('.')
  fields[group][leaf] = value
  with pytest.raises(config_lib.ConfigError, match=pattern):
    config_lib.validate(ml_collections.ConfigDict(fields), num_devices=1)


def test_valid_edge_values_pass():
  c = default.get_config()
  c.loss.weights.mae = 0.0      # a term switched off
  c.loss.kl_weight = 0.0
  c.adversarial_steps = 0
  c.gating.train_disc_below, c.gating.train_vae_above = 1.0, 0.0
  c.batch_size = 12
  c.seed = 2**32 - 1            # the largest seed the PRNG keys tell apart
  c.model.bn_momentum = 1.0
  c.keep_checkpoints = 0        # keep every checkpoint
  c.eval_fraction = 0.0         # no split held out of an arrays/folder dataset
  config_lib.validate(c, num_devices=3)
  config_lib.validate(c, num_devices=4)


def test_local_devices_follows_num_devices():
  c = default.get_config()
  assert parallel.local_devices(c) == jax.local_devices()
  c.num_devices = 1
  assert parallel.local_devices(c) == jax.local_devices()[:1]
  c.num_devices = len(jax.local_devices()) + 1
  with pytest.raises(config_lib.ConfigError,
                     match=r'local device\(s\) \(on the CPU, --config\.cpu_devices='):
    parallel.local_devices(c)
  c.num_devices = -1  # would otherwise slice off the last device
  with pytest.raises(config_lib.ConfigError, match=r'num_devices = -1 is negative; use 0'):
    parallel.local_devices(c)


def test_a_batch_of_one_is_refused_whatever_the_estimator():
  # BatchNorm over one image gave every image the same code (KL 0 at every step); only
  # the MSS estimator's need of two was checked, and its message advised mws.
  c = default.get_config()
  for field, value in (('loss.tc_estimator', 'mss'), ('loss.tc_estimator', 'mws'),
                       ('variant', 'avae')):
    d = c.copy_and_resolve_references()
    d.update_from_flattened_dict({field: value, 'batch_size': 1})
    with pytest.raises(config_lib.ConfigError) as info:
      config_lib.validate(d, num_devices=1)
    assert str(info.value) == ('batch_size = 1 must be >= 2 (BatchNorm normalises over the '
                               'batch: over one image every image gets the same code)')
  c.batch_size = 2
  config_lib.validate(c, num_devices=2)  # one image per device: BatchNorm sees both


@pytest.mark.parametrize('changes, band', [
    ({}, None),                                          # the paper's 0.7 > 0.5
    ({'gating.train_disc_below': 0.4, 'gating.train_vae_above': 0.6}, (0.4, 0.6)),
    ({'gating.train_disc_below': 0.5}, (0.5, 0.5)),      # accuracy exactly 0.5
    ({'gating.train_disc_below': 0.4, 'variant': 'vae_s'}, None),   # no adversarial phase
    ({'gating.train_disc_below': 0.4, 'adversarial_steps': 0}, None),
])
def test_gating_dead_band(changes, band):
  c = default.get_config()
  c.update_from_flattened_dict(changes)
  assert config_lib.gating_dead_band(c) == band


def test_fill_missing_adds_only_the_absent_fields():
  reference = ml_collections.ConfigDict(
      {'a': 1, 'b': {'c': 2, 'd': {'e': 3}}, 'f': {'g': 4}, 'h': (5, 6)})
  config = ml_collections.ConfigDict({'a': 10, 'b': {'d': {}}, 'x': 'kept'})
  added = config_lib.fill_missing(config, reference)
  assert sorted(added) == ['b.c', 'b.d.e', 'f', 'h']
  assert config.to_dict() == {'a': 10, 'b': {'c': 2, 'd': {'e': 3}}, 'x': 'kept',
                              'f': {'g': 4}, 'h': (5, 6)}
  # The added sub-config is a copy: changing it leaves the reference as it was.
  config.f.g = 40
  assert reference.f.g == 4
  assert config_lib.fill_missing(config, reference) == []


def _top_level_items(text):
  """'a, (b, c), d' -> ['a', '(b, c)', 'd']."""
  items, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += ch in '([{'
    depth -= ch in ')]}'
    if ch == ',' and depth == 0:
      items.append(text[start:i].strip())
      start = i + 1
  return items + [text[start:].strip()]


def _readme_value(text):
  """A default as the README's table writes it: a Python literal, or `word` for a string."""
  text = text.strip('`')
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def test_the_readme_config_table_has_every_field_with_its_default():
  with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')) as f:
    readme = f.read()
  table = readme[readme.index('## Config fields'):readme.index('## Datasets')]
  values = {}

  def walk(d, prefix=''):
    for k, v in d.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}.')
      else:
        values[prefix + k] = v

  walk(default.get_config().to_dict())
  documented = set()
  for cell, defaults in re.findall(r'^\| (`[^|]*) \| ([^|]*) \|', table, re.M):
    fields = []
    for name in re.findall(r'`([^`]+)`', cell):
      group = re.fullmatch(r'(.*)\{(.*)\}', name)  # loss.weights.{mae,mse}
      fields += [group[1] + f for f in group[2].split(',')] if group else [name]
    given = _top_level_items(defaults.strip())
    if len(given) == 1:
      given *= len(fields)
    assert len(given) == len(fields), (fields, defaults)
    for name, text in zip(fields, given):
      assert name in values, f'the README documents {name}, which default.py does not have'
      assert _readme_value(text) == values[name], (name, text, values[name])
    documented.update(fields)
  assert sorted(set(values) - documented) == []


def test_the_config_hash_fingerprints_the_layout_as_saved_checkpoints_do():
  # Checkpoints record it: the flat JSON of these six settings, as every version wrote it.
  config = celeba.get_config()
  m = config.model
  flat = {'variant': 'avae_s', 'image_size': 96, 'channels': 3, 'widths': list(m.widths),
          'latent_dim': m.latent_dim, 'hidden_dim': m.hidden_dim}
  want = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]
  assert config_lib.layout_hash(config) == want
  assert config_lib.layout_settings(config) == dict(
      variant='avae_s', image_size=96, channels=3,
      model=dict(widths=[24, 48, 96, 192], latent_dim=m.latent_dim, hidden_dim=m.hidden_dim))


def test_relative_local_paths_are_joined_to_the_current_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  here = str(tmp_path)
  cases = [('folder:imgs', f'folder:{here}/imgs'), ('arrays:./d/', f'arrays:{here}/d/'),
           ('arrays:x/*.npy', f'arrays:{here}/x/*.npy'), ('folder:/abs/imgs', 'folder:/abs/imgs'),
           ('folder:~/imgs', 'folder:~/imgs'), ('arrays:gs://b/x.npz', 'arrays:gs://b/x.npz'),
           ('shapes', 'shapes'), ('mnist', 'mnist')]
  for given, recorded in cases:
    c = default.get_config()
    c.dataset = given
    config_lib.make_paths_absolute(c)
    assert c.dataset == recorded, given
  c = default.get_config()
  c.data_dir, c.eval.inception_weights = 'tfds', 'w/pt_inception.npz'
  config_lib.make_paths_absolute(c)
  assert (c.data_dir, c.eval.inception_weights) == (f'{here}/tfds', f'{here}/w/pt_inception.npz')
  c = default.get_config()  # unset: still unset (tfds' default, the cache folder)
  config_lib.make_paths_absolute(c)
  assert c.data_dir is None and c.eval.inception_weights == ''


def test_a_path_flag_expands_the_home_directory(monkeypatch):
  # bash leaves `~` in --workdir=~/run: a folder named '~' was made in the current one.
  monkeypatch.setenv('HOME', '/home/someone')
  values = flags.FlagValues()
  holder = cli.define_path_flag('out', None, 'a path', flag_values=values)
  values(['prog', '--out=~/run'])
  assert holder.value == '/home/someone/run'
  values(['prog', '--out=runs/~x'])
  assert holder.value == 'runs/~x'


def test_output_to_a_gone_reader_is_dropped_and_the_program_goes_on():
  read_end, write_end = os.pipe()
  os.close(read_end)  # the reader has gone (`| head` has exited)
  stream = open(write_end, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  wrapped = cli._ReaderGoneStream(stream)  # pylint: disable=protected-access
  try:
    with pytest.raises(BrokenPipeError):  # what a plain print would raise
      print('x' * 10, file=stream, flush=True)
    print('progress', file=wrapped, flush=True)
    print('more', file=wrapped, flush=True)
    assert os.path.realpath(f'/proc/self/fd/{write_end}') == os.devnull
  finally:
    wrapped.close()


def test_both_output_streams_survive_a_gone_reader_once(monkeypatch):
  # `train.py 2>&1 | head` loses stderr's reader as well; a closed stream stays closed.
  out, err = io.StringIO(), io.StringIO()
  monkeypatch.setattr(sys, 'stdout', out)
  monkeypatch.setattr(sys, 'stderr', err)
  cli.survive_a_gone_reader()
  cli.survive_a_gone_reader()  # a second call wraps nothing twice
  for stream, inner in ((sys.stdout, out), (sys.stderr, err)):
    assert isinstance(stream, cli._ReaderGoneStream)  # pylint: disable=protected-access
    assert stream._stream is inner  # pylint: disable=protected-access
  monkeypatch.setattr(sys, 'stderr', None)
  cli.survive_a_gone_reader()
  assert sys.stderr is None


def test_a_config_argument_may_hold_a_colon(tmp_path):
  # FILE:ARG splits at the first ':' (as ml_collections does): ARG may be a path.
  (tmp_path / 'data.py').write_text(
      'from configs import default\n'
      'def get_config(dataset):\n'
      '  c = default.get_config()\n'
      '  c.dataset = dataset\n'
      '  return c\n')
  spec = f'{tmp_path / "data.py"}:folder:/data/images'
  cli._check_config_file(spec)  # pylint: disable=protected-access
  # load_config_file's join keeps the absolute path as it is.
  assert load_config_file(spec).dataset == 'folder:/data/images'


def test_a_config_flag_without_its_file_at_the_end_reads_as_no_file():
  """A bare --config as the last word has no FILE after it: no spec, not an IndexError."""
  assert cli.config_spec(['train.py', '--workdir=w', '--config']) is None
  assert cli.config_spec(['train.py', '--config=a.py', '-config']) == 'a.py'


def test_override_words_for_false_are_read_in_any_case():
  """absl reads a boolean's words in any case: FALSE and F are false, as TRUE and T true."""
  c = default.get_config()
  for text in ('False', 'FALSE', 'F'):
    c.eval.fid = True
    cli.apply_overrides(c, [('--config.eval.fid', text)])
    assert c.eval.fid is False, text


def test_an_override_of_a_number_field_keeps_its_type_and_value():
  """A float field takes 0.5 as 0.5; an integer field refuses 2.5, not truncating it to 2."""
  c = default.get_config()
  cli.apply_overrides(c, [('--config.loss.kl_weight', '0.5'),
                          ('--config.optimizer.b1', '1e-1')])
  assert (c.loss.kl_weight, c.optimizer.b1) == (0.5, 0.1)
  with pytest.raises(config_lib.ConfigError,
                     match=r'^--config\.eval\.num_images=2\.5: expected an integer$'):
    cli.apply_overrides(c, [('--config.eval.num_images', '2.5')])


def test_an_override_without_a_value_of_a_loaded_config_is_a_config_error():
  """eval.py's --config.batch_size with no value (a non-bool field) names the =VALUE form."""
  c = default.get_config()
  with pytest.raises(config_lib.ConfigError, match=r'^--config\.batch_size needs a value '
                     r'\(--config\.batch_size=VALUE\)$'):
    cli.apply_overrides(c, [('--config.batch_size', None)])


def test_a_bad_tuple_override_of_a_json_config_shows_the_tuple_form():
  """config.json keeps widths as a JSON list; the message still shows a Python tuple."""
  c = ml_collections.ConfigDict({'model': {'widths': [4, 8]}})
  with pytest.raises(config_lib.ConfigError,
                     match=r'^--config\.model\.widths=\(4,x\): expected a tuple such as '
                     r'\(4, 8\)$'):
    cli.apply_overrides(c, [('--config.model.widths', '(4,x)')])


def test_the_largest_float32_is_a_valid_traversal_range():
  """eval.traversal_range may be float32's largest number itself (the bound is inclusive)."""
  c = default.get_config()
  c.eval.traversal_range = 3.4028234663852886e38  # (2 - 2**-23) * 2**127
  assert c.eval.traversal_range == (2 - 2**-23) * 2.0**127
  config_lib.validate(c, num_devices=1)


def test_differences_name_fields_nested_deeper_and_ignore_list_or_tuple():
  """A field two groups down keeps its full dotted name; a JSON list equals its tuple."""
  old = {'loss': {'weights': {'gabor': 1.0}}, 'model': {'widths': [4, 8]}}
  new = {'loss': {'weights': {'gabor': 0.5}}, 'model': {'widths': (4, 8)}}
  assert config_lib.differences(old, new) == [('loss.weights.gabor', 1.0, 0.5)]


def test_cpu_devices_zero_is_valid_and_a_negative_count_is_refused():
  """cpu_devices 0 (or absent) keeps one CPU device; -1 is a ConfigError naming it."""
  c = default.get_config()
  c.cpu_devices = 0
  assert config_lib.cpu_devices(c) == 0
  assert config_lib.cpu_devices(ml_collections.ConfigDict({})) == 0
  c.cpu_devices = -1
  with pytest.raises(config_lib.ConfigError, match=r'^cpu_devices = -1 is negative'):
    config_lib.cpu_devices(c)

