"""Tests of avae_jax.prefetch: rows onto their devices, errors, back-pressure, shutdown."""

import gc
import threading
import time

import jax
import numpy as np
import pytest

from avae_jax import data
from avae_jax import prefetch


def test_prefetch_puts_one_row_per_device():
  devices = jax.devices()[:4]
  batches = [np.random.default_rng(i).random((len(devices), 2, 3)).astype(np.float32)
             for i in range(5)]
  with prefetch.to_devices(iter(batches), devices, size=2) as it:
    got = list(it)
    # Ended, it stays ended: a next() (a loop over it again) stops at once, not waits for
    # a batch that never comes (in a thread, so that such a wait fails instead of hanging).
    again = []
    thread = threading.Thread(target=lambda: again.append(next(it, 'ended')), daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert again == ['ended']
  assert len(got) == 5
  for x, y in zip(got, batches):
    np.testing.assert_array_equal(np.asarray(x), y)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.device for s in shards] == devices
    for i, s in enumerate(shards):
      np.testing.assert_array_equal(np.asarray(s.data)[0], y[i])


def test_prefetch_propagates_producer_errors():
  def producer():
    yield np.zeros((1, 2), np.float32)
    raise RuntimeError('broken input')
  it = prefetch.to_devices(producer(), jax.devices()[:1])
  np.testing.assert_array_equal(np.asarray(next(it)), np.zeros((1, 2)))
  with pytest.raises(RuntimeError, match='broken input'):
    next(it)
  bad = prefetch.to_devices(iter([np.zeros((3, 2))]), jax.devices()[:2])
  with pytest.raises(ValueError, match='leading axis'):
    next(bad)


def _prefetch_threads():
  return {t for t in threading.enumerate() if t.name == 'prefetch.to_devices' and t.is_alive()}


def test_prefetch_close_stops_the_thread():
  src = data.Source(lambda idx: np.zeros((len(idx), 2, 2, 1), np.float32), 40, (2, 2, 1))
  before = _prefetch_threads()  # other tests' prefetchers, if any are still winding down
  it = prefetch.to_devices(data.batches(src, batch_size=4, seed=0, num_local_devices=2),
                           jax.devices()[:2], size=2)
  first = next(it)
  assert first.shape == (2, 2, 2, 2, 1)
  assert len(_prefetch_threads() - before) == 1
  it.close(timeout=120)  # generous: the producer may be mid-batch on a loaded machine
  assert not _prefetch_threads() - before
  with pytest.raises(StopIteration):
    next(it)


# size 0 is size 1, not a queue without a bound that reads the whole input ahead.
@pytest.mark.parametrize('size,queued', [(2, 2), (0, 1)])
def test_prefetch_reads_at_most_size_batches_ahead(size, queued):
  pulled = []

  def counted():
    for i in range(100):
      pulled.append(i)
      yield np.full((1, 2), i, np.float32)
  with prefetch.to_devices(counted(), jax.devices()[:1], size=size) as it:
    np.testing.assert_array_equal(np.asarray(next(it)), [[0.0, 0.0]])
    # The producer runs ahead as far as it may: the batch taken, `queued` in the queue and
    # one waiting to be put; then no further.
    deadline = time.monotonic() + 60
    while len(pulled) < 1 + queued + 1 and time.monotonic() < deadline:
      time.sleep(0.01)
    time.sleep(0.5)
    assert len(pulled) == 1 + queued + 1, len(pulled)
    np.testing.assert_array_equal(np.asarray(next(it)), [[1.0, 1.0]])


def test_prefetcher_dropped_without_close_stops_its_thread():
  def endless():
    while True:
      yield np.zeros((1, 2), np.float32)
  it = prefetch.to_devices(endless(), jax.devices()[:1], size=1)
  next(it)
  thread = it._thread  # pylint: disable=protected-access
  # As a loop left by break or an exception, without `with`, leaves it: no close().
  del it
  gc.collect()
  thread.join(timeout=60)  # generous: the producer may be mid-batch on a loaded machine
  assert not thread.is_alive()


def test_prefetch_a_scalar_leaf_is_named():
  """A leaf without the device axis (a scalar) is the ValueError naming the leading axis."""
  it = prefetch.to_devices(iter([{'x': np.zeros((1, 2)), 'n': np.float32(3)}]),
                           jax.devices()[:1])
  with pytest.raises(ValueError, match=r'leading axis of a batch leaf is \(\), expected 1'):
    next(it)
