"""Command-line flags of the programs: --config, its overrides and one-line usage errors.

train.py, eval.py and benchmark.py parse --config=FILE and --config.FIELD=VALUE with absl
and ml_collections; their mistakes (and study.py's) become one-line usage errors here.

`parse_flags` is the programs' absl flags parser; `apply_overrides` applies
--config.FIELD=VALUE overrides to a config read from a workdir's config.json (eval.py).
"""

from __future__ import annotations

import ast
import difflib
import errno
import os
import re
import sys
import textwrap
from typing import Any, NoReturn, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from avae_jax import config_lib
from avae_jax import files


def _overrides(argv: Sequence[str]) -> list[str]:
  """The --config.FIELD overrides on a command line, as given (without their values)."""
  return [name for name, _ in split_overrides(argv)[1]]


def _unknown_field(error: Exception, argv: Sequence[str]) -> str | None:
  """The one-line message for ml_collections' error on an unknown override, else None."""
  # ml_collections raises AttributeError(KeyError("'name'\nDid you mean ...?")) for a
  # missing field, KeyError("'name'") for a missing group on the override's path.
  missing = error if isinstance(error, KeyError) else (error.args[0] if error.args else None)
  if not isinstance(missing, KeyError) or not missing.args:
    return None
  field, _, hint = str(missing.args[0]).partition('\n')
  field = field.strip("'")
  # Suggestions come from configs/default.py, whose fields the programs' configs share.
  from configs import default  # pylint: disable=g-import-not-at-top
  root = default.get_config()
  # The override that names the missing field: of several, the first whose path to it
  # the config lacks (--config.eval.num_images=5 --config.num_images=3 blames the second).
  named = []
  for name in _overrides(argv):
    path = _field_path(name)
    if field in path:
      index = path.index(field)
      named.append((_node(root, path[:index + 1]) is not None, name, index))
  if not named:
    return None
  _, name, index = min(named, key=lambda n: n[0])  # the first lacking one, else the first
  return _missing_field_message(name, index, root, hint)


def _field_path(name: str) -> list[str]:
  """The config path an override names: ['eval', 'num_images'] for --config.eval.num_images."""
  return name[len('--config.'):].split('.')


def _node(config: ml_collections.ConfigDict, parts: Sequence[str]) -> Any:
  """The field or group at the path `parts` of `config`, or None where there is none."""
  return config_lib.lookup(config, parts)[1]


def _paths_named(config: ml_collections.ConfigDict, field: str,
                 prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  """The paths of the fields and groups called `field` at any level of `config`."""
  paths = []
  for key, value in config.items():
    if key == field:
      paths.append(prefix + (key,))
    if isinstance(value, ml_collections.ConfigDict):
      paths += _paths_named(value, field, prefix + (key,))
  return paths


def _missing_field_message(name: str, index: int, root: ml_collections.ConfigDict,
                           near_miss: str) -> str:
  """The one line for an override whose part `index` is not where the override puts it.

  The same name elsewhere in the config, where the rest of the override's path is a
  field that takes a value (--config.eval.num_images for --config.num_images,
  --config.loss.weights.gabor for --config.weights.gabor), is the likelier meaning; else
  `near_miss`, a same-level suggestion such as ml_collections' 'Did you mean
  "batch_size" instead of "batchsize"?'.
  """
  parts = _field_path(name)
  field, rest = parts[index], tuple(parts[index + 1:])
  there, path = _node(root, parts[:index + 1]), '.'.join(parts[:index + 1])
  if isinstance(there, ml_collections.ConfigDict) and not rest:  # a group given a value
    return f"{name}: '{path}' is a group of fields: override one (--config.{path}.FIELD)"
  if there is not None and not isinstance(there, ml_collections.ConfigDict) and rest:
    return f"{name}: '{path}' is a field with no fields under it: --config.{path}=VALUE"
  message = f"{name}: the config has no field '{field}'"
  elsewhere = []
  for path in _paths_named(root, field):
    node = _node(root, path + rest)
    if (path + rest != tuple(parts) and node is not None
        and not isinstance(node, ml_collections.ConfigDict)):
      elsewhere.append('--config.' + '.'.join(path + rest))
  if elsewhere:
    return f'{message}. Did you mean {" or ".join(elsewhere)}?'
  return f'{message}. {near_miss}' if near_miss else message


def _usage_error(message: str) -> NoReturn:
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


def _stop_on_unknown_field(error: Exception, argv: Sequence[str]) -> None:
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
  if os.path.isdir(path):  # it said "no such file"
    _usage_error(f'--config={spec}: {path!r} is a directory; --config takes a Python config '
                 'file (configs/*.py)')
  if not os.path.isfile(path):
    _usage_error(f'--config={spec}: no such file {path!r}')


def _load_error(spec: str | None, error: Exception, argv: Sequence[str]) -> NoReturn:
  """Exits with one line for an error raised while loading the --config file."""
  if isinstance(error, (AttributeError, KeyError)):
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
  if config is not None:
    missing = [f for f in _TRAINING_FIELDS if f not in config]
    if missing:
      _usage_error(f'--config={spec} is not a training config (it has no '
                   f'{", ".join(missing)}); see configs/default.py')
    try:  # fields computed from others (the dataset configs' epochs of batch_size)
      config.to_dict()
    except ArithmeticError as e:  # a division by zero, or an overflow
      hint = '; is --config.batch_size 0?' if isinstance(e, ZeroDivisionError) else ''
      _usage_error(f'--config={spec}: a field computed from others cannot be computed '
                   f'({e}){hint}')


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
  if 'config' in flags.FLAGS:
    _check_training_config(spec, argv)
  return rest


def one_line_usage_errors(main: Any, program: str, then: str | None = None) -> Any:
  """`main` for app.run, ending on its app.UsageError with one line.

  absl would print the module's docstring and every flag's help before the message.
  `then`: what to do once the disk has space or the file is accessible, where a write
  fails so; that too then ends with one line (exit_if_file_error).
  """
  def run(argv: list[str]) -> Any:
    try:
      return main(argv)
    except app.UsageError as e:
      sys.exit(f'{program}: error: {e}')
    except Exception as e:  # pylint: disable=broad-except
      if then is not None:
        exit_if_file_error(e, program, then)
      raise
  return run


def exit_if_file_error(error: BaseException, program: str, then: str) -> None:
  """Exits with one line where `error`'s chain reports a full disk, a refused or blocked file.

  A full disk fails the write in progress and then every clean-up that writes: a chain of
  tracebacks that says less than the first failure's message (files.out_of_space). A file
  refused (no permission, immutable, a read-only file system) is named (files.denied), and
  so is a directory where a file goes or the reverse (files.in_the_way).
  `then`: what to do after freeing space, making the file accessible or moving it aside.
  """
  full = files.out_of_space(error)
  if full is not None:
    sys.exit(f'{program}: error: out of disk space: {full}; free space and {then}')
  refused = files.denied(error)
  if refused is not None:
    sys.exit(f'{program}: error: {refused}; make it accessible and {then}')
  blocked = files.in_the_way(error)
  if blocked is not None:
    path = os.fspath(blocked.filename)
    if blocked.errno == errno.EISDIR:
      sys.exit(f'{program}: error: {path} is a directory, where a file goes; move it aside '
               f'and {then}')
    # ENOTDIR names the path that was opened, EEXIST the directory that was to be made:
    # what is in the way is that path or a file above it.
    in_way = path
    while in_way != os.path.dirname(in_way) and not os.path.isfile(in_way):
      in_way = os.path.dirname(in_way)
    where = f'{in_way} is a file' if os.path.isfile(in_way) else f'a file on the path {path} is'
    sys.exit(f'{program}: error: {where} where a directory goes; move it aside and {then}')


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
    raise config_lib.ConfigError(f'{name}={text}: expected {_EXPECTED[bool]}')
  if text is None:
    raise config_lib.ConfigError(f'{name} needs a value ({name}=VALUE)')
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
    raise config_lib.ConfigError(f'{name}={text}: expected {kind}') from e


def _no_field(name: str, index: int, node: ml_collections.ConfigDict,
              root: ml_collections.ConfigDict) -> config_lib.ConfigError:
  """The error for an override whose part `index` `node` lacks, suggestions as parse_flags'."""
  field = _field_path(name)[index]
  keys = [str(k) for k in node.keys() if str(k) != field]  # a field that is not a leaf
  matches = difflib.get_close_matches(field, keys, 1, 0.75)
  near_miss = f'Did you mean "{matches[0]}" instead of "{field}"?' if matches else ''
  return config_lib.ConfigError(_missing_field_message(name, index, root, near_miss))


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[tuple[str, str | None]]) -> None:
  """Sets (--config.FIELD, VALUE) overrides on a loaded config, e.g. a workdir's config.json."""
  for name, text in overrides:
    *parents, leaf = _field_path(name)
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node.get(part), ml_collections.ConfigDict):
        raise _no_field(name, i, node, config)
      node = node[part]
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      raise _no_field(name, len(parents), node, config)
    node[leaf] = _override_value(name, text, node[leaf])


class _PathParser(flags.ArgumentParser):
  """A path flag's value with `~` expanded: a shell leaves it in `--workdir=~/run`."""

  syntactic_help = 'a path'

  def parse(self, argument: str | None) -> str | None:
    """The argument with `~` or `~user` at its start expanded."""
    return None if argument is None else os.path.expanduser(argument)

  def flag_type(self) -> str:
    """Listed as a string flag in --help."""
    return 'string'


def define_path_flag(name: str, default: str | None, help_string: str,
                     flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
  """A string flag naming a file or directory, `~` expanded as the shell would."""
  return flags.DEFINE(_PathParser(), name, default, help_string, flag_values=flag_values,
                      serializer=flags.ArgumentSerializer())


def define_workdir_flag(help_string: str) -> flags.FlagHolder:
  """The required --workdir flag of train.py and eval.py; an empty value is a flag error."""
  holder = define_path_flag('workdir', None, help_string)
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
  except (AttributeError, KeyError) as e:
    _stop_on_unknown_field(e, sys.argv)
    raise


class _ReaderGoneStream:
  """A program's stdout or stderr that goes on, writing to /dev/null, once its reader goes.

  Writing to a pipe whose reader has exited (`train.py | head -3`, a `tee` killed with the
  job) raises BrokenPipeError wherever the program happens to print: a progress line
  would end the training or the evaluation before its files are written.
  """

  def __init__(self, stream: Any):
    """Wraps `stream` (sys.stdout or sys.stderr)."""
    self._stream = stream

  def _to_devnull(self) -> None:
    """Points the stream's descriptor at /dev/null: the reader will read nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
      os.dup2(devnull, self._stream.fileno())
    finally:
      os.close(devnull)

  def write(self, text: str) -> int:
    """Writes `text`, or drops it once the reader has gone."""
    try:
      return self._stream.write(text)
    except BrokenPipeError:
      self._to_devnull()
      return len(text)

  def flush(self) -> None:
    """Flushes; the buffered text goes to /dev/null once the reader has gone."""
    try:
      self._stream.flush()
    except BrokenPipeError:
      self._to_devnull()
      self._stream.flush()

  def __getattr__(self, name: str) -> Any:
    """Everything else as the wrapped stream has it."""
    return getattr(self._stream, name)


def survive_a_gone_reader() -> None:
  """Makes the program's stdout and stderr drop their output once their reader has gone.

  The programs call it first thing (after hugepages.reexec): their work, checkpoints and
  files go on without the output's reader. A closed stream (None: `>&-`) stays closed.
  """
  for name in ('stdout', 'stderr'):
    stream = getattr(sys, name)
    if stream is not None and not isinstance(stream, _ReaderGoneStream):
      setattr(sys, name, _ReaderGoneStream(stream))
