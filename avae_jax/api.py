"""Using a trained model: load it from a workdir, then encode, decode, sample, interpolate.

  from avae_jax import api
  model = api.TrainedModel.load('/tmp/avae')          # latest checkpoint, config.json
  mu, logvar = model.encode(images)                     # images: (B, H, W, C) in [0, 1]
                                                        # (or uint8, scaled from 0..255)
  x_rec = model.reconstruct(images)                     # decode(mu): the posterior mean
  x_gen = model.sample(jax.random.PRNGKey(0), 16)       # decode(z), z ~ N(0, I)
  rows = model.interpolate(x0, x1, steps=8)             # (8, H, W, C)
  grid = model.traverse(x0, dims=[0, 3], values=np.linspace(-2.5, 2.5, 7))

Every method runs jitted with BatchNorm in inference mode (running statistics) and returns
jax arrays (np.asarray makes them numpy). Batches whose size is a multiple of the number of
devices are split over the devices; other batches run replicated. Float images outside [0, 1]
(e.g. floats in 0..255) or with a NaN are refused with a ValueError, as the `arrays:` data
loader refuses them.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Sequence
import warnings

from etils import epath
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import jax.numpy as jnp
import ml_collections
import numpy as np

from avae_jax import checkpoint
from avae_jax import config_lib
from avae_jax import files
from avae_jax import metrics
from avae_jax import models
from avae_jax import steps
from avae_jax import visualize

CONFIG_FILE = config_lib.CONFIG_FILE
CHECKPOINT_DIR = config_lib.CHECKPOINT_DIR


class WorkdirError(ValueError):
  """A workdir from which no model can be loaded; the message says why and what to do."""


class NoCheckpointError(WorkdirError):
  """The workdir holds no checkpoint (or not the requested step)."""


class IncompatibleCheckpointError(WorkdirError):
  """The checkpoint was written by another model (variant, image size, widths, ...)."""


def refuse_a_file(workdir: str) -> None:
  """Raises WorkdirError where WORKDIR is a file (its config.json, say), not a directory."""
  path = epath.Path(workdir)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'{workdir} is a file, not a directory '
                       '(the --workdir of a train.py run)')


def require_checkpoint(workdir: str) -> None:
  """Raises NoCheckpointError, saying what is wrong, where WORKDIR/checkpoints has none."""
  refuse_a_file(workdir)
  ckpt_dir = epath.Path(workdir) / config_lib.CHECKPOINT_DIR
  if ckpt_dir.exists() and not ckpt_dir.is_dir():
    raise NoCheckpointError(f'no checkpoint in {workdir}: {ckpt_dir} is a file, not the '
                            'directory of checkpoints that train.py writes')
  if not ckpt_dir.is_dir() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    raise NoCheckpointError(
        f'no checkpoint in {ckpt_dir}: train a model there first '
        f'(python train.py --config=... --workdir={workdir})')


def read_config(workdir: str, fill_defaults: bool = False) -> ml_collections.ConfigDict | None:
  """The config a training run wrote to WORKDIR/config.json, or None if there is none.

  With fill_defaults, fields the file lacks (a workdir of an older version, written
  before they existed) get configs/default.py's values, with a warning naming them.
  """
  refuse_a_file(os.path.expanduser(workdir))
  path = os.path.join(os.path.expanduser(workdir), CONFIG_FILE)
  if not files.exists(path):
    return None
  try:
    fields = files.read_json(path)
    # ConfigDict raises AttributeError for a list, and takes a JSON string or number.
    if not isinstance(fields, dict):
      raise TypeError(f'it holds a JSON {type(fields).__name__}, not an object')
    config = ml_collections.ConfigDict(fields)
  except (ValueError, TypeError) as e:
    raise WorkdirError(f'{path} is not a readable config (JSON): {e}') from e
  if fill_defaults:
    # Imported here: the configs package sits beside avae_jax, and only this needs it.
    from configs import default  # pylint: disable=g-import-not-at-top
    added = config_lib.fill_missing(config, default.get_config())
    if added:
      # Without them the model or the evaluation would stop with an AttributeError.
      warnings.warn(f'{path} lacks {", ".join(added)} (written by an older version?); '
                    'using the values of configs/default.py for them', stacklevel=2)
  return config


def _hash(saved: ml_collections.ConfigDict) -> str | None:
  """config_lib.layout_hash of a saved config; None if it lacks a field the hash reads."""
  try:
    return config_lib.layout_hash(saved)
  except AttributeError:  # an older version's config.json: the checkpoint's hash decides
    return None


def _differences(saved: ml_collections.ConfigDict,
                 config: ml_collections.ConfigDict) -> str | None:
  """'name: workdir X, config Y; ...' for the model settings that differ (None: none)."""
  diffs = [f'{k}: workdir {a!r}, config {b!r}' for k, a, b in
           config_lib.differences(config_lib.layout_settings(saved),
                                  config_lib.layout_settings(config))]
  return '; '.join(diffs) or None


def model_differences(workdir: str, config: ml_collections.ConfigDict) -> str | None:
  """The model settings where `config` differs from WORKDIR/config.json (None: none, or unknown)."""
  try:
    saved = read_config(workdir)
    return None if saved is None else _differences(saved, config)
  except (WorkdirError, AttributeError):  # unreadable, or an older version's without a field
    return None


def _state_template(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Shapes and dtypes of the tree the trainer checkpoints, without initialising anything."""
  shape = (int(config.image_size), int(config.image_size), int(config.channels))
  vae_state, disc_state = jax.eval_shape(
      lambda: steps.create_train_states(config, jax.random.PRNGKey(0), shape))
  return steps.state_tree(vae_state, disc_state)


# The inference programs, jitted once per process with the (hashable) module as a static
# argument: every TrainedModel of the same architecture shares their compiled programs,
# e.g. the final evaluations of the runs of a study.


@jax.jit
def _range_stats(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """min(x), max(x) and whether x holds a NaN: one program (one dispatch, not three)."""
  return x.min(), x.max(), jnp.isnan(x).any()


@functools.partial(jax.jit, static_argnums=0)
def _encode(module: Any, variables: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Posterior means and log-variances of images x."""
  return module.apply(variables, x, train=False, method='encode')


@functools.partial(jax.jit, static_argnums=0)
def _decode(module: Any, variables: Any, z: jax.Array) -> jax.Array:
  """Decoded images of codes z."""
  return module.apply(variables, z, train=False, method='decode')


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(module: Any, variables: Any, x: jax.Array) -> jax.Array:
  """Decoded posterior means of x."""
  return _decode(module, variables, _encode(module, variables, x)[0])


@functools.partial(jax.jit, static_argnums=0)
def _interpolate(module: Any, variables: Any, x0: jax.Array, x1: jax.Array,
                 t: jax.Array) -> jax.Array:
  """Decoded codes on the lines from x0 to x1 at fractions t: (pairs, len(t), H, W, C)."""
  z0, _ = _encode(module, variables, x0)
  z1, _ = _encode(module, variables, x1)
  # (1 - t) z0 + t z1 is exactly z0 at t = 0 and z1 at t = 1.
  z = (1.0 - t)[None, :, None] * z0[:, None] + t[None, :, None] * z1[:, None]
  p, s = z.shape[:2]
  # z.shape[-1], not -1: with no pairs, -1 has nothing to divide.
  return _decode(module, variables, z.reshape(p * s, z.shape[-1])).reshape((p, s) + x0.shape[1:])


@functools.partial(jax.jit, static_argnums=0)
def _traverse(module: Any, variables: Any, x: jax.Array, dims: jax.Array,
              values: jax.Array) -> jax.Array:
  """Decoded codes of x with dimension dims[i] set to each value: (dims, values, H, W, C)."""
  mu, _ = _encode(module, variables, x)
  codes = jnp.broadcast_to(mu, (dims.shape[0], values.shape[0], mu.shape[-1]))
  hit = jnp.arange(mu.shape[-1])[None, None, :] == dims[:, None, None]
  codes = jnp.where(hit, values[None, :, None], codes)
  images = _decode(module, variables, codes.reshape(-1, mu.shape[-1]))
  return images.reshape((dims.shape[0], values.shape[0]) + x.shape[1:])


class TrainedModel:
  """A VAE with its trained parameters and BatchNorm statistics, ready for inference."""

  def __init__(self, config: ml_collections.ConfigDict, params: Any, batch_stats: Any, *,
               step: int | None = None, devices: Sequence[Any] | None = None):
    """Builds the VAE of `config` around the given variables (see load / from_state)."""
    self.config = config
    self.step = None if step is None else int(step)
    self.module, _ = models.create_models(config)
    self.image_shape = (int(config.image_size), int(config.image_size), int(config.channels))
    self.latent_dim = int(config.model.latent_dim)
    self.devices = list(jax.local_devices() if devices is None else devices)
    if not self.devices:
      raise ValueError('devices must name at least one device (None: the local devices)')
    if len(set(self.devices)) != len(self.devices):
      # A mesh accepts it, but a batch split over it fails later, deep in jax's device_put.
      raise ValueError(f'devices names a device more than once: {self.devices}')
    mesh = Mesh(np.asarray(self.devices), ('batch',))
    self._replicated = NamedSharding(mesh, PartitionSpec())
    self._split = NamedSharding(mesh, PartitionSpec('batch'))
    self.variables = jax.device_put({'params': params, 'batch_stats': batch_stats},
                                    self._replicated)

  # ------------------------------------------------------------------------- construction

  @classmethod
  def from_state(cls, config: ml_collections.ConfigDict, vae_state: Any, *,
                 step: int | None = None,
                 devices: Sequence[Any] | None = None) -> 'TrainedModel':
    """Wraps an (unreplicated) VAE TrainState, labelled `step` (default: its update count).

    The state's own count lags behind a run's global step once gated adversarial steps
    skip the VAE's update; the trainer passes the global step.
    """
    if np.ndim(vae_state.step) != 0:
      # A replicated state's parameters carry the devices' axis, which the model would
      # only refuse at its first use, deep in flax.
      raise ValueError(f'vae_state is replicated (its step has shape '
                       f'{np.shape(vae_state.step)}): pass parallel.unreplicate(vae_state)')
    if step is None:
      step = int(np.asarray(jax.device_get(vae_state.step)))
    return cls(config, vae_state.params, vae_state.batch_stats, step=step, devices=devices)

  @classmethod
  def load(cls, workdir: str, step: int | None = None,
           config: ml_collections.ConfigDict | None = None, *,
           devices: Sequence[Any] | None = None) -> 'TrainedModel':
    """Restores the VAE of WORKDIR/checkpoints (latest, or `step`) as a TrainedModel.

    The model is built from WORKDIR/config.json unless `config` is given; a given config
    must describe the same model as the workdir (config_lib.layout_settings: variant,
    image size, channels, model.widths, latent_dim and hidden_dim).
    Raises NoCheckpointError or IncompatibleCheckpointError (WorkdirErrors) with the
    reason, or checkpoint.CheckpointError when the checkpoint asked for (or, without
    `step`, every one) cannot be read.
    """
    workdir = os.path.expanduser(str(workdir))  # '~/runs/a', as the programs' --workdir
    # The checkpointer takes int(step): step=2.5 would restore step 2, step=True step 1.
    step = None if step is None else visualize.integer(step, 'step', 0)
    require_checkpoint(workdir)
    ckpt_dir = epath.Path(workdir) / config_lib.CHECKPOINT_DIR
    if config is None:
      config = read_config(workdir, fill_defaults=True)
      if config is None:
        raise WorkdirError(f'{workdir} has no {CONFIG_FILE}; pass the training config')
    else:
      try:
        saved = read_config(workdir)
      except WorkdirError as e:
        # The given config builds the model; the checkpoint's own fingerprint checks it.
        warnings.warn(f'{e}; using the given config', stacklevel=2)
        saved = None
      if saved is not None and not config_lib.same_layout(_hash(saved), config):
        raise IncompatibleCheckpointError(
            f'{workdir} holds another model than the config describes '
            f'({_differences(saved, config) or "settings differ"}); use the config the '
            'model was trained with')
    template = _state_template(config)
    ckpt = checkpoint.Checkpointer(str(ckpt_dir), keep=None, async_save=False, read_only=True)
    try:
      restored = ckpt.restore(template, step=step)
    except FileNotFoundError as e:
      raise NoCheckpointError(str(e)) from None
    except ValueError as e:  # the checkpoint's arrays do not fit this config's model
      raise IncompatibleCheckpointError(
          f'the checkpoint in {ckpt_dir} does not fit the model of the config '
          f'(variant {config.variant}, image_size {config.image_size}, channels '
          f'{config.channels}, widths {tuple(config.model.widths)}, latent_dim '
          f'{config.model.latent_dim}): {e}') from None
    finally:
      ckpt.close()
    if restored is None:
      raise NoCheckpointError(f'no readable checkpoint in {ckpt_dir}')
    got_step, tree, meta = restored
    if not config_lib.same_layout(meta.get('config_hash'), config):
      raise IncompatibleCheckpointError(
          f'checkpoint {got_step} in {ckpt_dir} was written for another model than the '
          f'config describes (variant {config.variant}, image_size {config.image_size}); '
          'use the config the model was trained with')
    vae = tree['vae']
    return cls(config, vae['params'], vae['batch_stats'], step=got_step, devices=devices)

  # ------------------------------------------------------------------------- helpers

  def _put(self, x: jax.Array | np.ndarray) -> jax.Array:
    """Splits a batch over the devices when its size allows, else replicates it."""
    n = len(self.devices)
    sharding = self._split if x.shape[0] % n == 0 and x.shape[0] else self._replicated
    return jax.device_put(x, sharding)

  def _images(self, images: Any, what: str = 'images') -> jax.Array:
    """Checks (B, H, W, C) images of the model's shape; returns them float32 on device.

    Float images must lie in [0, 1] (up to metrics.RANGE_TOLERANCE); uint8 images (as PIL and
    image files give them) are scaled from 0..255, as the data pipeline does.
    """
    x = images if isinstance(images, jax.Array) else np.asarray(images)
    metrics.check_image_dtype(x.dtype, what)
    if x.dtype == np.uint8:
      x = x.astype(np.float32) * np.float32(1.0 / 255.0)
    else:
      x = x.astype(np.float32)
      if x.size:
        # Float images in 0..255 would otherwise be encoded as they are, without an error.
        # A NaN passes the range comparisons, and XLA:CPU's min and max skip it.
        stats = (_range_stats(x) if isinstance(x, jax.Array)
                 else (x.min(), x.max(), np.isnan(x).any()))
        lo, hi, nan = map(float, jax.device_get(stats))
        metrics.check_unit_range(math.nan if nan else lo, hi, what)
    if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
      raise ValueError(f'{what} must be (B, {", ".join(map(str, self.image_shape))}) '
                       f'float images in [0, 1] for this model; got shape {tuple(x.shape)}')
    return self._put(x)

  def _pair_images(self, x: Any, what: str) -> tuple[jax.Array, bool]:
    """One image (H, W, C) or a batch; returns the batch and whether it was one image."""
    # As _images takes them: PIL images and nested lists become arrays before indexing.
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    single = x.ndim == 3
    if single and tuple(x.shape) != self.image_shape:
      # Checked here: _images would name the shape with the batch axis added to it.
      hwc = ', '.join(map(str, self.image_shape))
      raise ValueError(f'{what} must be one image ({hwc}) or a batch (B, {hwc}) of images in '
                       f'[0, 1] for this model; got shape {tuple(x.shape)}')
    return self._images(x[None] if single else x, what), single

  # ------------------------------------------------------------------------- public

  def encode(self, images: Any) -> tuple[jax.Array, jax.Array]:
    """(mu, logvar), each (B, latent_dim), of q(z|x) for (B, H, W, C) images."""
    return _encode(self.module, self.variables, self._images(images))

  def decode(self, z: Any) -> jax.Array:
    """Images (B, H, W, C) in [0, 1] for latent codes z (B, latent_dim)."""
    z = z if isinstance(z, jax.Array) else np.asarray(z)
    # The cast to float32 would drop a complex code's imaginary part with a warning only.
    if not (jnp.issubdtype(z.dtype, jnp.floating) or jnp.issubdtype(z.dtype, jnp.integer)):
      raise ValueError(f'z must be real numbers, got dtype {z.dtype}')
    z = z.astype(np.float32)
    if z.ndim != 2 or z.shape[1] != self.latent_dim:
      raise ValueError(f'z must be (B, {self.latent_dim}); got shape {tuple(z.shape)}')
    return _decode(self.module, self.variables, self._put(z))

  def reconstruct(self, images: Any) -> jax.Array:
    """decode(mu): reconstructions from the posterior mean, (B, H, W, C)."""
    return _reconstruct(self.module, self.variables, self._images(images))

  def sample(self, key: jax.Array, n: int) -> jax.Array:
    """n images decoded from z ~ N(0, I) drawn with `key`."""
    z = jax.random.normal(key, (visualize.integer(n, 'n', 0), self.latent_dim), jnp.float32)
    return self.decode(z)

  def interpolate(self, x0: Any, x1: Any, steps: int) -> jax.Array:
    """Decodes `steps` codes on the line between the posterior means of x0 and x1.

    x0, x1: one image each (H, W, C) -> (steps, H, W, C), or P pairs (P, H, W, C) ->
    (P, steps, H, W, C). The first and last images are decode(mu(x0)) and decode(mu(x1)).
    """
    steps = visualize.integer(steps, 'steps', 2)
    a, single = self._pair_images(x0, 'x0')
    b, single_b = self._pair_images(x1, 'x1')
    if single != single_b:  # else the result's shape would follow x0's alone
      raise ValueError(f'x0 and x1 must both be one image (H, W, C) or both batches '
                       f'(P, H, W, C); got {"one image" if single else "a batch"} and '
                       f'{"one image" if single_b else "a batch"}')
    if a.shape != b.shape:
      raise ValueError(f'x0 {a.shape} and x1 {b.shape} differ in shape')
    t = jnp.linspace(0.0, 1.0, steps, dtype=jnp.float32)
    out = _interpolate(self.module, self.variables, a, b, t)
    return out[0] if single else out

  def traverse(self, image: Any, dims: Sequence[int], values: Sequence[float]) -> jax.Array:
    """(len(dims), len(values), H, W, C): row i decodes mu(image) with z[dims[i]] = values[j]."""
    x, single = self._pair_images(image, 'image')
    if not single and x.shape[0] != 1:
      raise ValueError(f'traverse takes one image, got a batch of {x.shape[0]}')
    dims, values = visualize.traversal_axes(dims, values, self.latent_dim)
    return _traverse(self.module, self.variables, x, dims, values)
