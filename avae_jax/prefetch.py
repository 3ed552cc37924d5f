"""Batches onto the devices from a background thread, while the devices run the step.

`to_devices` takes the numpy batches of `avae_jax.data` (one row per local device) and
yields jax.Arrays sharded over the devices that the steps map over.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
from jax import sharding
import numpy as np

from avae_jax import distributed

_ITEM, _END, _ERROR = 0, 1, 2


def _put(out: queue.Queue, stop: threading.Event, item: tuple[int, Any]) -> bool:
  """Queues an item unless stopped; False once the consumer has stopped the producer."""
  while not stop.is_set():
    try:
      out.put(item, timeout=0.05)
      return True
    except queue.Full:
      continue
  return False


def _produce(iterator: Iterator[Any], to_devices: Callable[[Any], Any],
             out: queue.Queue, stop: threading.Event) -> None:
  """The producer thread's loop: batches to devices into `out` until the end or `stop`."""
  try:
    for batch in iterator:
      if stop.is_set():
        return
      if not _put(out, stop, (_ITEM, to_devices(batch))):
        return
    _put(out, stop, (_END, None))
  except BaseException as e:  # pylint: disable=broad-except
    _put(out, stop, (_ERROR, e))


class DevicePrefetcher:
  """Iterator of device arrays filled by a background thread; see to_devices."""

  def __init__(self, iterator: Iterator[Any], devices: Sequence[Any], size: int = 2,
               axis_name: str = 'batch'):
    """Starts the producer thread (arguments as to_devices takes them)."""
    devices = list(devices)
    if not devices:
      raise ValueError('prefetch.to_devices needs at least one device')
    # Multi-process: one global array over the same devices of every process (the mesh
    # that parallel.make_steps maps over), assembled from each process's own rows.
    mesh = sharding.Mesh(np.array(distributed.global_devices(devices)), (axis_name,))
    shard = sharding.NamedSharding(mesh, sharding.PartitionSpec(axis_name))
    count, multiprocess = len(devices), jax.process_count() > 1
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(size)))
    self._stop = threading.Event()
    self._done = False

    def leaf_to_devices(x: Any) -> Any:
      x = np.asarray(x)
      if x.ndim == 0 or x.shape[0] != count:
        raise ValueError(f'prefetch.to_devices: leading axis of a batch leaf is '
                         f'{x.shape[:1]}, expected {count} (one row per device)')
      if multiprocess:
        return jax.make_array_from_process_local_data(shard, x)
      return jax.device_put(x, shard)

    # The thread holds the queue, the event and this closure, not this object: a
    # prefetcher dropped without close() is then collected, and __del__ stops the thread
    # (a bound method as its target would keep the object alive, and the thread polling,
    # for good).
    self._thread = threading.Thread(
        target=_produce,
        args=(iter(iterator), lambda batch: jax.tree.map(leaf_to_devices, batch),
              self._queue, self._stop),
        name='prefetch.to_devices', daemon=True)
    self._thread.start()

  def __iter__(self) -> 'DevicePrefetcher':
    """The prefetcher itself."""
    return self

  def __next__(self) -> Any:
    """The next batch on the devices; the producer's exception if it failed."""
    if self._done:
      raise StopIteration
    kind, value = self._queue.get()
    if kind == _ITEM:
      return value
    self.close()
    if kind == _ERROR:
      raise value
    raise StopIteration

  def close(self, timeout: float = 5.0) -> None:
    """Stops the producer thread and drops queued batches."""
    self._done = True
    self._stop.set()
    try:
      while True:
        self._queue.get_nowait()
    except queue.Empty:
      pass
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout)

  def __enter__(self) -> 'DevicePrefetcher':
    """The prefetcher, closed when the block ends."""
    return self

  def __exit__(self, *exc: Any) -> None:
    """Closes the prefetcher."""
    self.close()

  def __del__(self) -> None:
    """Tells the producer thread to stop (without waiting for it)."""
    try:
      self._done = True
      self._stop.set()
    except Exception:  # pylint: disable=broad-except
      pass


def to_devices(iterator: Iterator[Any], devices: Sequence[Any], size: int = 2,
               axis_name: str = 'batch') -> DevicePrefetcher:
  """Background-thread device_put of batches whose leading axis has one row per device.

  Each leaf (len(devices), ...) becomes a jax.Array sharded over a 1-D mesh of
  distributed.global_devices(devices) (NamedSharding(Mesh(..., (axis_name,)), P(axis_name)),
  what jax.device_put_sharded became): on one process that mesh is `devices`; with
  several, this process's rows are its slice of one global array over every process's
  devices. pmap and shard_map over that mesh take it without copies. At most `size` + 1
  batches wait on the devices (`size` queued, one put while the queue is full). An
  exception in the producer is re-raised by next(); close() (or leaving a `with` block)
  stops the thread.
  """
  return DevicePrefetcher(iterator, devices, size=size, axis_name=axis_name)
