"""Checkpoints: a thin wrapper on orbax-checkpoint's CheckpointManager.

One checkpoint is one step directory `<directory>/<step>/` (the trainer's directory is
`<workdir>/checkpoints`) with three orbax items:

  state/     the arrays (StandardSave: tensorstore/OCDBT), stored as a nested
             dict whose keys are the pytree path of each leaf, so any pytree
             (dicts, optax namedtuples, flax dataclasses) restores into the
             structure of the template it is given; typed PRNG keys
             (jax.random.key) are stored as their key_data, zero-size arrays
             only in the manifest (no state/ when every leaf is empty);
  meta/      the caller's JSON (the trainer's: step, phase, seed, config hash, XLA:CPU
             thread count, process and device counts, training-set size, the
             metrics not yet logged);
  manifest/  JSON written by this module: path, shape, dtype and CRC-32 of
             every leaf (and a key's implementation), the CRC-32 of meta and
             the CRC-32 of the manifest's own other fields, checked on restore.

What is relied on from orbax (0.12.x, local or network file systems):

* A step is written into `<step>.orbax-checkpoint-tmp` and renamed to `<step>`
  only once every item is complete (`AtomicRenameTemporaryPath`; on gs:// orbax
  writes a `commit_success.txt` instead). Step discovery ignores the tmp
  names, so a save cut short by a crash (even SIGKILL) is never listed or
  loaded; leftover tmp directories are removed when a writable manager starts.
* orbax does not checksum array data: a flipped byte inside a compressed chunk
  restores silently as wrong numbers (a changed digit in meta's JSON, too).
  Hence the manifest: a checkpoint whose files are missing, truncated or whose
  data does not match its CRC-32 is reported with a warning and the previous
  checkpoint is used.

Multi-process: every process calls `save` and `restore` with the same host
arrays. Arrays go to orbax as globally replicated `jax.Array`s (one device per
process, `PartitionSpec()`), so orbax writes each array once, from the primary
process, and every process reads it back.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import sys
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from absl import logging
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import orbax.checkpoint as ocp

from avae_jax import files

PyTree = Any

_STATE, _META, _MANIFEST = 'state', 'meta', 'manifest'
_MANIFEST_VERSION = 1


class CheckpointError(RuntimeError):
  """A checkpoint exists but cannot be used."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's data does not match its manifest."""


class _TemplateMismatch(Exception):
  """The template given to restore does not describe the checkpoint.

  Its own class, so that restore tells it from an unreadable checkpoint (which it falls
  back from) and raises it as a ValueError: another model's checkpoint.
  """


class _LeafSpec(NamedTuple):
  """What a template leaf stores: its shape, canonical dtype, and a PRNG key's dtype."""
  shape: tuple[int, ...]
  dtype: str
  key: str | None


def _key_name(key: Any) -> str:
  """Returns the path component of one pytree key as a string."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _flatten(tree: PyTree) -> tuple[list[tuple[str, ...]], list[Any], Any]:
  """Returns (leaf paths as string tuples, leaves, treedef) of `tree`."""
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [tuple(_key_name(k) for k in path) for path, _ in with_path]
  if any(not n for n in names):
    raise ValueError('The checkpointed state must be a container (dict, tuple, '
                     'dataclass) of arrays, not a bare array.')
  # orbax names each array by its path joined with '.': {'a.b': x, 'a': {'b': y}} would
  # save both under one name, and the checkpoint would fail its checksums on every restore.
  joined = ['.'.join(n) for n in names]
  clashes = sorted({j for j in joined if joined.count(j) > 1})
  if clashes:
    raise ValueError(f'Leaves of the state share the path {clashes[0]!r} once their keys '
                     "are strings joined with '.' (orbax's array names); rename the keys.")
  return names, [leaf for _, leaf in with_path], treedef


def _path_str(name: tuple[str, ...]) -> str:
  """Returns a leaf path for messages, e.g. 'vae/params/Conv_0/kernel'."""
  return '/'.join(name)


def _nest(names: Sequence[tuple[str, ...]], values: Sequence[Any]) -> dict:
  """Builds the nested dict {path[0]: {path[1]: ... value}} orbax stores."""
  root: dict = {}
  for name, value in zip(names, values):
    node = root
    for part in name[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f'State path {_path_str(name)} clashes with a leaf.')
    if name[-1] in node:
      raise ValueError(f'State path {_path_str(name)} clashes with a subtree.')
    node[name[-1]] = value
  return root


def _lookup(tree: Mapping, name: tuple[str, ...]) -> Any:
  """Returns the value at path `name` of a nested dict."""
  node = tree
  for part in name:
    node = node[part]
  return node


def _canonical_dtype(dtype: Any) -> np.dtype:
  """Returns the dtype JAX stores for `dtype` (int64 -> int32 without x64)."""
  return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def is_prng_key(leaf: Any) -> bool:
  """Whether `leaf` is a typed PRNG key array (jax.random.key), which has no numpy form."""
  dtype = getattr(leaf, 'dtype', None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _to_host(leaf: Any, name: tuple[str, ...]) -> np.ndarray:
  """Returns a leaf as a host numpy array of its canonical JAX dtype (keys: their data)."""
  if is_prng_key(leaf):
    leaf = jax.random.key_data(leaf)
  array = np.asarray(jax.device_get(leaf))
  dtype = _canonical_dtype(array.dtype)
  if array.dtype == dtype:
    return array
  with np.errstate(over='ignore'):  # overflow is checked below, with the leaf's name
    converted = array.astype(dtype)
  # int64 -> int32 wraps around (2**40 becomes 0) and float64 -> float32 overflows to
  # inf: refuse values the stored dtype cannot hold rather than restore others.
  if np.issubdtype(array.dtype, np.integer):
    lost = not np.array_equal(converted.astype(array.dtype), array)
  else:
    lost = not np.array_equal(np.isfinite(converted), np.isfinite(array))
  if lost:
    raise ValueError(
        f'State leaf {_path_str(name)} holds {array.dtype} values that {dtype} (the dtype '
        'JAX stores without jax_enable_x64) cannot represent; enable x64 or keep such '
        'numbers in meta.')
  return converted


def _crc32(array: np.ndarray) -> int:
  """Returns the CRC-32 of an array's bytes in C order."""
  flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
  return zlib.crc32(flat) & 0xFFFFFFFF


def _json_crc32(value: Any) -> int:
  """Returns the CRC-32 of a JSON value's canonical text (sorted keys)."""
  # The value as read back from JSON (string keys, lists for tuples) gives the same text.
  return zlib.crc32(json.dumps(value, sort_keys=True).encode()) & 0xFFFFFFFF


def _spec(leaf: Any) -> _LeafSpec:
  """The shape, canonical dtype name and key dtype name of the data a template leaf stores."""
  if is_prng_key(leaf):  # a typed PRNG key is stored as its key_data (uint32)
    data = jax.eval_shape(jax.random.key_data, leaf)
    return _LeafSpec(tuple(int(d) for d in data.shape), _canonical_dtype(data.dtype).name,
                     str(leaf.dtype))
  if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
    shape, dtype = tuple(int(d) for d in leaf.shape), leaf.dtype
  else:  # Python scalars.
    array = np.asarray(leaf)
    shape, dtype = array.shape, array.dtype
  return _LeafSpec(shape, _canonical_dtype(dtype).name, None)


def _describe_spec(shape: tuple[int, ...], dtype: str, key: str | None) -> str:
  """Returns a stored leaf's description for messages, e.g. '(3, 4) float32'."""
  if key is None:
    return f'{shape} {dtype}'
  return f'{key} stored as {shape} {dtype}'


def _replicated_sharding() -> NamedSharding:
  """Returns a sharding that replicates over one device of every process."""
  # One device per process (not every device) keeps the temporary copy to one
  # accelerator per host while still being a global array orbax can save.
  first: dict[int, jax.Device] = {}
  for device in jax.devices():
    known = first.get(device.process_index)
    if known is None or device.id < known.id:
      first[device.process_index] = device
  devices = [first[p] for p in sorted(first)]
  return NamedSharding(Mesh(np.array(devices), ('process',)), PartitionSpec())


def all_processes_agree(ok: bool) -> bool:
  """Returns True iff `ok` holds on every process (collective when multi-process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.array(int(ok), np.int32))
  return bool(np.all(flags))


# Checkpoint directories read in this process: the reads' leftover errors name them.
_READ_DIRECTORIES: set[str] = set()


def _is_closed_loop_callback(unraisable: Any) -> bool:
  """Whether an unraisable exception is a read's callback into a closed event loop."""
  error = unraisable.exc_value
  return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


class _DropUnretrievedCheckpointErrors(std_logging.Filter):
  """Drops asyncio's reports of checkpoint errors nobody awaited (see the two below).

  Those of failed reads name a checkpoint directory read here; those of a save that
  filled the disk or was refused (the metadata's writes, say) report that, whatever the
  path.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    # asyncio's first line, e.g. 'Future exception was never retrieved', then the future.
    if not record.getMessage().partition('\n')[0].endswith('exception was never retrieved'):
      return True
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and _full_or_refused(error):
      return False
    return not any(d in str(error) for d in _READ_DIRECTORIES)


def _drop_closed_loop_callbacks() -> None:
  """Makes sys.unraisablehook drop tensorstore's callbacks into a closed event loop.

  When one read or write of a checkpoint fails, orbax closes that operation's event loop
  while tensorstore's other reads or writes are in flight; each of their completion
  callbacks then raises "Event loop is closed" into sys.unraisablehook: tens of
  tracebacks that say nothing the failure's own error does not. Once per process, for
  good; every other unraisable exception passes as before.
  """
  previous = sys.unraisablehook
  if getattr(previous, '_drops_closed_loop_callbacks', False):
    return

  def hook(unraisable: Any) -> None:
    if not _is_closed_loop_callback(unraisable):
      previous(unraisable)

  hook._drops_closed_loop_callbacks = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _quiet_failed_reads(directory: str) -> None:
  """Silences the noise of a failed restore of a checkpoint in `directory`.

  Besides the closed loop's callbacks (_drop_closed_loop_callbacks), each read that fails
  too is logged by asyncio as a "Future exception was never retrieved" with its error:
  with them, tens to hundreds of tracebacks around the one-line warning that says what
  happened, before the restore's error and long after it. So, before the first restore
  (and for good, once per process), asyncio's logger drops those reports whose error
  names a checkpoint directory read here.
  """
  _READ_DIRECTORIES.add(directory)
  _add_filter_once(std_logging.getLogger('asyncio'), _DropUnretrievedCheckpointErrors)
  _drop_closed_loop_callbacks()


def _add_filter_once(logger: std_logging.Logger, kind: type[std_logging.Filter]) -> None:
  """Adds a `kind()` filter to `logger` unless it has one."""
  if not any(isinstance(f, kind) for f in logger.filters):
    logger.addFilter(kind())


def _full_or_refused(error: BaseException) -> bool:
  """Whether `error`'s chain reports a full disk or a refused file (cli.exit_if_file_error)."""
  return files.out_of_space(error) is not None or files.denied(error) is not None


class _DropOrbaxFileErrorTracebacks(std_logging.Filter):
  """Drops orbax's logged tracebacks of a full disk or refused file (_quiet_failed_saves)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    from_orbax = f'{os.sep}orbax{os.sep}' in record.pathname
    return not (from_orbax and error is not None and _full_or_refused(error))


def _quiet_failed_saves() -> None:
  """Silences the noise of a save that fills the disk or is refused (once per process).

  orbax's background threads each log the failed write with its traceback (three of
  them, 40 lines each), asyncio reports the failed writes nobody awaited, and the closed
  loop's callbacks add tens more, before and after the save's own error reaches the
  caller (wait_until_finished), where train.py reports it in one line
  (cli.exit_if_file_error). A checkpoint folder that refuses the save (made read-only or
  immutable during training) gives two such tracebacks. So those records are dropped,
  carrying a full disk's or a refused file's error only: any other failure is logged as
  before.
  """
  _add_filter_once(logging.get_absl_logger(), _DropOrbaxFileErrorTracebacks)
  _add_filter_once(std_logging.getLogger('asyncio'), _DropUnretrievedCheckpointErrors)
  _drop_closed_loop_callbacks()
  # The writes the failed save never started, garbage-collected at the process's exit
  # (after train.py's line); the name is orbax's serialisation of the arrays.
  warnings.filterwarnings('ignore', category=RuntimeWarning,
                          message=r"coroutine 'async_serialize_from_host\.<locals>\.\w+' "
                                  'was never awaited')


def _describe(error: BaseException) -> str:
  """Returns a one-line description of an exception."""
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'[:300]


class _DropMessage(std_logging.Filter):
  """Drops log records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self._prefix = prefix

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self._prefix)


class _DropMissingMetadataNotes(_DropMessage):
  """Drops orbax's warning, from each of its reader threads, that a step has no metadata.

  Such a step (an empty folder, one copied in part) is reported once, as unreadable, by
  restore, which passes over it; one that reads without the file needs no note.
  """

  def __init__(self):
    super().__init__('Metadata file does not exist')


class Checkpointer:
  """Saves and restores (state, meta) by step in one directory, keeping the last `keep`."""

  def __init__(self, directory: str | os.PathLike, keep: int | None,
               *, async_save: bool = True, read_only: bool = False):
    """Opens (and, unless read_only, creates) the checkpoint directory.

    Args:
      directory: local path or a path orbax understands (gs://...).
      keep: number of most recent checkpoints kept; None or 0 keeps all.
      async_save: write in a background thread; `wait()` blocks until done.
      read_only: for evaluators: never write, delete or clean up anything
        (safe next to a running trainer).
    """
    directory = os.fspath(directory)
    if not files.is_remote(directory):
      directory = os.path.abspath(directory)  # tensorstore wants absolute paths.
    self.directory = directory
    self.read_only = read_only
    if keep is not None and keep < 0:
      # orbax's LatestN(-1) deletes every checkpoint, the one just saved too.
      raise ValueError(f'keep must be None, 0 (keep all) or positive; got {keep}.')
    policy = ocp.checkpoint_managers.LatestN(keep) if keep else None
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        create=not read_only,
        read_only=read_only,
        # A previous run killed mid-save leaves `<step>.orbax-checkpoint-tmp`.
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
        # The step's directories made in save(), not in a background thread: when that
        # thread's mkdir is refused (an immutable or read-only checkpoint folder), the
        # save's other threads wait for its signal for orbax's timeout (20 minutes), and
        # so does the process's exit.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        # Read-only: 0, as orbax would set it itself (with a warning).
        save_interval_steps=0 if read_only else 1,
    )
    _add_filter_once(logging.get_absl_logger(), _DropMissingMetadataNotes)  # opening reads
    # orbax warns on every read-only open; for an evaluator that is the intent, not news.
    read_only_notice = _DropMessage('Given directory is read only')
    logging.get_absl_logger().addFilter(read_only_notice)
    try:
      self._manager = ocp.CheckpointManager(directory, options=options)
    finally:
      logging.get_absl_logger().removeFilter(read_only_notice)
    if not read_only:
      _quiet_failed_saves()
    self._sharding = _replicated_sharding()
    self._bad_steps: set[int] = set()
    self._closed = False

  def all_steps(self) -> list[int]:
    """Returns the steps of all checkpoints, ascending.

    A writer lists its own asynchronous save from its start (`wait()` first for only the
    committed ones). A read-only checkpointer lists the directory anew on each call, so an
    evaluator beside a training run sees the steps committed since it was opened.
    """
    if self.read_only:
      # orbax caches the step list at open and updates it only on its own saves/deletes.
      self._manager.reload()
    return sorted(int(s) for s in self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Returns the latest step of `all_steps`, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: PyTree, meta: Mapping[str, Any],
           force: bool = False) -> bool:
    """Saves `state` (pytree of arrays) and `meta` (JSON) as checkpoint `step`.

    Returns False, saving nothing, if a checkpoint for `step` exists, unless
    `force`, which replaces it (orbax writes no step twice: the old one is deleted
    first, so a crash during the write leaves neither; the trainer never replaces
    one). Checkpoints that `restore` found unreadable are
    deleted first. Newer checkpoints than `step` (another run's future) make
    this raise ValueError, unless `force`, which deletes them. A state whose
    values the stored dtypes cannot hold (int64 beyond int32 without x64), or
    whose paths orbax would merge, raises ValueError before anything is
    deleted. With async_save the write continues in the background: call
    `wait()` or `close()` before the process exits.
    """
    if self.read_only:
      raise ValueError(f'Checkpointer for {self.directory} is read-only.')
    step = int(step)
    meta = dict(meta)
    try:
      meta_crc32 = _json_crc32(json.loads(json.dumps(meta, allow_nan=False)))
    except (TypeError, ValueError) as e:
      raise TypeError(f'Checkpoint meta must be JSON (ints, floats, str, lists, '
                      f'dicts): {e}') from e
    # A state that cannot be saved is refused before any checkpoint is deleted.
    names, leaves, _ = _flatten(state)
    host = [_to_host(leaf, name) for name, leaf in zip(names, leaves)]
    # A previous async save must be on disk before steps are listed/deleted.
    self._manager.wait_until_finished()
    existing = self.all_steps()
    for bad in sorted(self._bad_steps & set(existing)):
      logging.warning('Deleting unreadable checkpoint %d in %s.', bad,
                      self.directory)
      self._manager.delete(bad)
    self._bad_steps.clear()
    existing = self.all_steps()
    newer = [s for s in existing if s > step]
    if newer:
      if not force:
        raise ValueError(
            f'{self.directory} holds checkpoints {newer} newer than step {step}'
            ' (from another run?). Use a fresh directory, delete them, or pass '
            'force=True to delete them.')
      for s in newer:
        logging.warning('Deleting newer checkpoint %d in %s.', s, self.directory)
        self._manager.delete(s)
    if step in existing:
      if not force:
        logging.info('Checkpoint %d exists in %s; not saving.', step,
                     self.directory)
        return False
      logging.info('Replacing checkpoint %d in %s.', step, self.directory)
      self._manager.delete(step)

    entries = [{'path': list(name), 'shape': list(a.shape), 'dtype': a.dtype.name,
                'crc32': _crc32(a)} for name, a in zip(names, host)]
    for entry, leaf in zip(entries, leaves):
      if is_prng_key(leaf):  # restored as a key of the same implementation
        entry['key'], entry['key_impl'] = str(leaf.dtype), str(jax.random.key_impl(leaf))
    manifest = {'version': _MANIFEST_VERSION, 'leaves': entries, 'meta_crc32': meta_crc32}
    manifest['crc32'] = _json_crc32(manifest)
    # orbax refuses zero-size arrays ('Cannot save arrays with zero size') and an item
    # without arrays: the manifest's shape and dtype say all there is to restore of them.
    stored = [(name, a) for name, a in zip(names, host) if a.size]
    arrays = [
        jax.make_array_from_callback(
            a.shape, self._sharding, lambda index, a=a: np.asarray(a[index]))
        for _, a in stored]
    items = {_META: ocp.args.JsonSave(meta), _MANIFEST: ocp.args.JsonSave(manifest)}
    if stored:
      items[_STATE] = ocp.args.StandardSave(_nest([n for n, _ in stored], arrays))
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(**items),
        force=True,  # The caller decides when to save; no orbax interval.
    )
    return bool(saved)

  def restore(self, template: PyTree, step: int | None = None
             ) -> tuple[int, PyTree, dict] | None:
    """Returns (step, state, meta) of checkpoint `step` (default: latest readable).

    `template` is a pytree like the saved state (arrays or ShapeDtypeStruct);
    the state comes back in its structure as host numpy arrays (typed PRNG
    keys as jax keys of the saved implementation). Returns None if there is no
    checkpoint. With step=None an unreadable checkpoint is logged
    as a warning and the previous one is tried; CheckpointError if none can be
    read. ValueError if the template does not match the checkpoint's layout.
    A checkpoint deleted while it is read (pruned by a run training in the
    directory) is no damage: step=None takes the latest again, a chosen step
    raises FileNotFoundError.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    steps = self.all_steps()
    if step is not None and int(step) not in steps:
      raise FileNotFoundError(
          f'No checkpoint for step {int(step)} in {self.directory} (steps: {steps}).')
    if not steps:
      return None
    names, leaves, treedef = _flatten(template)
    specs = [_spec(leaf) for leaf in leaves]
    _quiet_failed_reads(self.directory)  # before: some of the noise comes before the error
    if step is not None:
      read = self._restore_chosen(int(step), names, specs)
    else:
      read = self._restore_latest_readable(steps[::-1], names, specs)
    if read is None:
      return None
    s, state_leaves, meta = read
    return s, jax.tree_util.tree_unflatten(treedef, state_leaves), meta

  def _read(self, step: int, names: list[tuple[str, ...]], specs: list[_LeafSpec]
            ) -> tuple[tuple[list[Any], dict] | None, BaseException | None]:
    """((leaves, meta), None) of checkpoint `step`, or (None, the error): as all agree."""
    read, error = None, None
    try:
      read = self._restore_step(step, names, specs)
    except _TemplateMismatch as e:
      raise ValueError(str(e)) from None
    except Exception as e:  # pylint: disable=broad-exception-caught
      error = e
    if not all_processes_agree(error is None) and error is None:
      read, error = None, CheckpointError('another process could not read it')
    return read, error

  def _restore_chosen(self, step: int, names: list[tuple[str, ...]],
                      specs: list[_LeafSpec]) -> tuple[int, list[Any], dict]:
    """(step, leaves, meta) of checkpoint `step`; its failure is raised, not passed over."""
    read, error = self._read(step, names, specs)
    if read is not None:
      logging.info('Restored checkpoint %d from %s.', step, self.directory)
      return (step,) + read
    if self._deleted(step):
      # A reader beside a training run (eval.py) lost the race with its pruning.
      raise FileNotFoundError(
          f'Checkpoint {step} in {self.directory} was deleted while it was read (pruned '
          f'by the run training there?); steps now: {self.all_steps()}.') from error
    logging.warning('Checkpoint %d in %s is unreadable (%s)', step, self.directory,
                    _describe(error))
    raise CheckpointError(f'Checkpoint {step} in {self.directory} is unreadable.') from error

  def _restore_latest_readable(self, candidates: list[int], names: list[tuple[str, ...]],
                               specs: list[_LeafSpec]) -> tuple[int, list[Any], dict] | None:
    """(step, leaves, meta) of the newest checkpoint that reads; None if all were deleted."""
    unreadable: list[int] = []
    last_error: BaseException | None = None
    tried: set[int] = set()
    while pending := [s for s in candidates if s not in tried]:
      s = pending[0]
      tried.add(s)
      read, error = self._read(s, names, specs)
      if read is not None:
        if unreadable:
          logging.warning('Restored checkpoint %d from %s instead of the '
                          'unreadable newer %s.', s, self.directory, unreadable)
        else:
          logging.info('Restored checkpoint %d from %s.', s, self.directory)
        return (s,) + read
      if self._deleted(s):
        # A reader beside a training run (eval.py) lost the race with its pruning: that
        # is no damage, and the run has committed a newer step meanwhile.
        logging.info('Checkpoint %d in %s was deleted while it was read; taking the '
                     'latest again.', s, self.directory)
      else:
        logging.warning('Checkpoint %d in %s is unreadable (%s); trying the previous one.',
                        s, self.directory, _describe(error))
        unreadable.append(s)
        self._bad_steps.add(s)
        last_error = error
      # As listed now (`_deleted` reloaded): a step that a running trainer is deleting
      # (orbax removes the files one by one) fails before it is gone, and that run has
      # committed a newer one meanwhile.
      candidates = self.all_steps()[::-1]
    if not unreadable:  # every checkpoint was deleted while being read
      return None
    raise CheckpointError(
        f'None of the checkpoints {unreadable} in {self.directory} can be read '
        f'(the last error: {_describe(last_error)}); start over in a new workdir, or delete '
        'the checkpoints directory to train this one from step 0.') from last_error

  def _deleted(self, step: int) -> bool:
    """Whether checkpoint `step` is gone from the directory on every process."""
    self._manager.reload()
    return all_processes_agree(step not in self.all_steps())

  def _restore_step(self, step: int, names: list[tuple[str, ...]],
                    specs: list[_LeafSpec]) -> tuple[list[Any], dict]:
    """Reads and verifies one checkpoint; returns (leaves in `names` order, meta)."""
    small = self._manager.restore(step, args=ocp.args.Composite(**{
        _META: ocp.args.JsonRestore(), _MANIFEST: ocp.args.JsonRestore()}))
    meta, manifest = small[_META], small[_MANIFEST]
    if not isinstance(meta, dict):
      raise CorruptCheckpointError(f'meta is {type(meta).__name__}, not a dict')
    if not isinstance(manifest, dict):
      raise CorruptCheckpointError('malformed manifest')
    # Absent in the manifests of earlier versions. Without it, a changed digit in a
    # shape would read as a checkpoint of another model, and the run would refuse its
    # workdir.
    body = {k: v for k, v in manifest.items() if k != 'crc32'}
    if manifest.get('crc32', _json_crc32(body)) != _json_crc32(body):
      raise CorruptCheckpointError('manifest does not match its checksum')
    try:
      entries = {tuple(e['path']): e for e in manifest['leaves']}
    except (TypeError, KeyError) as e:
      raise CorruptCheckpointError('malformed manifest') from e
    # Absent in the manifests of earlier versions.
    if manifest.get('meta_crc32', _json_crc32(meta)) != _json_crc32(meta):
      raise CorruptCheckpointError('meta does not match its checksum')
    self._check_template(step, entries, names, specs)

    stored = [(name, spec) for name, spec in zip(names, specs) if math.prod(spec.shape)]
    restored = {}
    if stored:  # zero-size leaves are not in orbax's item, which is absent without others
      abstract = _nest([n for n, _ in stored], [
          jax.ShapeDtypeStruct(spec.shape, np.dtype(spec.dtype), sharding=self._sharding)
          for _, spec in stored])
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract)}))[_STATE]
    leaves = []
    for name, (shape, dtype, key) in zip(names, specs):
      if math.prod(shape):
        array = np.asarray(_lookup(restored, name).addressable_data(0))
      else:
        array = np.zeros(shape, dtype)
      if array.shape != shape or array.dtype.name != dtype:
        raise CorruptCheckpointError(
            f'{_path_str(name)} restored as {array.shape} {array.dtype.name}')
      if _crc32(array) != entries[name]['crc32']:
        raise CorruptCheckpointError(
            f'{_path_str(name)} does not match its checksum')
      if key is not None:
        array = jax.random.wrap_key_data(array, impl=entries[name]['key_impl'])
        if str(array.dtype) != key:
          raise CorruptCheckpointError(f'{_path_str(name)} restored as {array.dtype}')
      leaves.append(array)
    return leaves, meta

  def _check_template(self, step: int, entries: Mapping[tuple[str, ...], Any],
                      names: list[tuple[str, ...]],
                      specs: list[_LeafSpec]) -> None:
    """Raises _TemplateMismatch if the template's paths/shapes/dtypes differ."""
    problems = []
    missing = [n for n in names if n not in entries]
    extra = [n for n in entries if n not in set(names)]
    problems += [f'{_path_str(n)} not in the checkpoint' for n in missing]
    problems += [f'{_path_str(n)} not in the template' for n in extra]
    for name, (shape, dtype, key) in zip(names, specs):
      entry = entries.get(name)
      if entry is None:
        continue
      saved = (tuple(entry['shape']), entry['dtype'], entry.get('key'))
      if saved != (shape, dtype, key):
        problems.append(f'{_path_str(name)}: checkpoint {_describe_spec(*saved)}, '
                        f'template {_describe_spec(shape, dtype, key)}')
    if problems:
      shown = '; '.join(problems[:5])
      more = f' (and {len(problems) - 5} more)' if len(problems) > 5 else ''
      raise _TemplateMismatch(
          f'Checkpoint {step} in {self.directory} does not match the template '
          f'(changed config?): {shown}{more}')

  def wait(self) -> None:
    """Blocks until every started save is committed on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources (idempotent)."""
    if not self._closed:
      self._closed = True
      self._manager.close()

  def __enter__(self) -> Checkpointer:
    """Returns self; `with` closes (and so waits for) the checkpointer."""
    return self

  def __exit__(self, *exc_info: Any) -> None:
    """Closes the checkpointer, waiting for pending saves."""
    self.close()

