"""The one place that maps the per-device steps over devices: jax.pmap or jax.shard_map.

Both methods have the same calling convention: train states carry a leading device axis
(see `replicate`), the batch is (num_devices, per_device, H, W, C), the key is one PRNG
key shared by all devices, and the metrics come back as scalars (already averaged over
devices, so no device axis). Both give the same numbers to float32 rounding.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from avae_jax import checkpoint
from avae_jax import config_lib
from avae_jax import distributed
from avae_jax import steps

Steps = collections.namedtuple('Steps', ['pretrain', 'adversarial'])


def _mesh(devices: Sequence[Any], axis_name: str) -> Mesh:
  """The 1-D mesh of `devices` (the one pmap uses internally, for the same axis name)."""
  return Mesh(np.asarray(devices), (axis_name,))


def local_devices(config: Any) -> list[Any]:
  """The local devices a run uses: config.num_devices of them, or all (0)."""
  devs = jax.local_devices()
  if int(config.num_devices) < 0:
    raise config_lib.ConfigError(f'num_devices = {config.num_devices} is negative; use 0 '
                                 'for all local devices')
  n = int(config.num_devices) or len(devs)
  if n > len(devs):
    # On the CPU the count is cpu_devices' (one device unless the host is split).
    split = (f' (on the CPU, --config.cpu_devices={n} splits the host into {n})'
             if devs[0].platform == 'cpu' else '')
    raise config_lib.ConfigError(
        f'num_devices={n} is more than the {len(devs)} local device(s){split}')
  return devs[:n]


def replicate(tree: Any, devices: Sequence[Any],
              axis_name: str = steps.StepConfig.axis_name) -> Any:
  """Copies of every array leaf on each device, stacked on a new leading axis.

  The arrays are sharded over Mesh(devices, (axis_name,)), the layout that the mapped
  steps take and return (axis_name = StepConfig.axis_name), so no step recompiles or
  copies them. In a multi-process run `devices` are this process's and the mesh spans the
  corresponding devices of all processes, as in make_steps (every process passes the same
  tree).
  """
  devices = distributed.global_devices(devices)
  sharding = NamedSharding(_mesh(devices, axis_name), P(axis_name))
  n = len(devices)

  def put(leaf):
    if checkpoint.is_prng_key(leaf):
      # A typed PRNG key has no numpy form: its raw data is copied and wrapped again.
      return jax.random.wrap_key_data(put(jax.random.key_data(leaf)),
                                      impl=jax.random.key_impl(leaf))
    leaf = np.asarray(jax.device_get(leaf))
    return jax.device_put(np.broadcast_to(leaf[None], (n,) + leaf.shape), sharding)

  return jax.tree.map(put, tree)


def unreplicate(tree: Any) -> Any:
  """One device's copy of a replicated tree (drops the leading axis).

  Reads this process's first shard, so it also works for arrays that span the devices of
  several processes; all copies are equal.
  """
  # Wait for the step that made the tree before slicing it: small computations queued
  # behind a multi-device step can starve XLA:CPU's small thread pool (two processes under
  # load deadlocked so when ~100 eager slices were taken from the multi-device arrays;
  # slicing the single-device shards has not, and waiting costs nothing here).
  jax.block_until_ready(tree)
  return _first_rows(jax.tree.map(
      lambda leaf: leaf.addressable_shards[0].data if isinstance(leaf, jax.Array) else leaf,
      tree))


def _squeeze(tree: Any) -> Any:
  """Each leaf's first row: drops the leading block axis (shard_map's per-device view)."""
  return jax.tree.map(lambda leaf: leaf[0], tree)


# In one program: eager slices compile one per leaf shape.
_first_rows = jax.jit(_squeeze)


def _expand(tree: Any) -> Any:
  """Adds a leading axis of size 1 to every leaf (undoes `_squeeze`)."""
  return jax.tree.map(lambda leaf: leaf[None], tree)


class _Checked:
  """A mapped step that names the two easy mistakes in its arguments before JAX does.

  (pmap's own errors for them are an IndexError and an axis that cannot be squeezed.)
  """

  def __init__(self, fn: Any, devices: Sequence[Any], states: int):
    """Wraps `fn` over `devices`: its first `states` arguments are states, then the batch."""
    self._fn, self._states = fn, states
    # With several processes, the leading axis of an argument is every process's devices
    # (a global array) or this process's (pmap's view of its own rows).
    here = jax.process_index()
    self._sizes = sorted({len(devices), sum(d.process_index == here for d in devices)},
                         reverse=True)
    self._count = ' or '.join(map(str, self._sizes))

  def _check(self, args: tuple[Any, ...]) -> None:
    """Raises ValueError for a state without the device axis or a batch without it."""
    for state in args[:self._states]:
      if np.shape(state.step) not in [(n,) for n in self._sizes]:
        raise ValueError(f'a train state whose step has shape {np.shape(state.step)}: the '
                         f'mapped steps take states replicated over the {self._count} '
                         'devices (parallel.replicate(state, devices))')
    batch = args[self._states]
    if np.shape(batch)[:1] not in [(n,) for n in self._sizes]:
      raise ValueError(f'batch of shape {np.shape(batch)}: the leading axis must be the '
                       f'number of devices ({self._count}), shaped (devices, per_device, H, '
                       'W, C)')

  def __call__(self, *args: Any) -> Any:
    """The step, after the check."""
    self._check(args)
    return self._fn(*args)

  def lower(self, *args: Any) -> Any:
    """The step's lowering for these arguments (cost analysis), after the check."""
    self._check(args)
    return self._fn.lower(*args)


def make_steps(cfg: steps.StepConfig, devices: Sequence[Any], method: str = 'pmap') -> Steps:
  """The pretrain and adversarial steps mapped over `devices` with pmap or shard_map.

  pretrain(vae_state, batch, key) -> (vae_state, metrics) and
  adversarial(vae_state, disc_state, batch, key) -> (vae_state, disc_state, metrics).
  The state arguments are donated: do not use them after the call. A state without the
  devices' axis, or a batch without it, is a ValueError that says so.
  """
  # Multi-process: map over the same devices of every process, not only ours.
  devices = distributed.global_devices(devices)
  pre = functools.partial(steps.pretrain_step, cfg=cfg)
  adv = functools.partial(steps.adversarial_step, cfg=cfg)
  axis = cfg.axis_name
  if method == 'pmap':
    # Metrics are pmean-ed inside, hence equal on all devices: out_axes=None returns one.
    pretrain = jax.pmap(pre, axis_name=axis, in_axes=(0, 0, None), out_axes=(0, None),
                        devices=devices, donate_argnums=(0,))
    adversarial = jax.pmap(adv, axis_name=axis, in_axes=(0, 0, 0, None),
                           out_axes=(0, 0, None), devices=devices, donate_argnums=(0, 1))
  elif method == 'shard_map':
    mesh = _mesh(devices, axis)

    # Each device sees its (1, ...) block of the stacked states and batch (one row per
    # device: _Checked refuses a batch of k rows per device, whose blocks batch[0] would
    # cut to their first rows).
    def pre_block(vae_state, batch, key):
      vae_state, metrics = pre(_squeeze(vae_state), batch[0], key)
      return _expand(vae_state), metrics

    def adv_block(vae_state, disc_state, batch, key):
      vae_state, disc_state, metrics = adv(_squeeze(vae_state), _squeeze(disc_state),
                                           batch[0], key)
      return _expand(vae_state), _expand(disc_state), metrics

    pretrain = jax.jit(
        jax.shard_map(pre_block, mesh=mesh, in_specs=(P(axis), P(axis), P()),
                      out_specs=(P(axis), P())),
        donate_argnums=(0,))
    adversarial = jax.jit(
        jax.shard_map(adv_block, mesh=mesh, in_specs=(P(axis), P(axis), P(axis), P()),
                      out_specs=(P(axis), P(axis), P())),
        donate_argnums=(0, 1))
  else:
    raise ValueError(f'method must be one of {config_lib.PARALLEL_METHODS}, got {method!r}')
  return Steps(pretrain=_Checked(pretrain, devices, states=1),
               adversarial=_Checked(adversarial, devices, states=2))
