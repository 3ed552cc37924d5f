"""Train states and the two per-device training steps (Algorithm 1; README: The four models).

`pretrain_step` and `adversarial_step` are per-device functions: the batch is the device's
share, and gradients, metrics, the discriminator accuracy that drives the gating and the
BatchNorm statistics are all reduced over `cfg.axis_name`. `parallel.py` maps them over
devices (pmap or shard_map); on one device they run the same way (an axis of size 1).

Results do not depend on the device count: the latent noise of the whole global batch is
drawn from the step key and each device takes its rows, BatchNorm uses global-batch
statistics, and the total-correlation estimate sees the posteriors of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from avae_jax import config_lib
from avae_jax import conv
from avae_jax import losses
from avae_jax import models

Array = jax.Array
Metrics = dict[str, Array]


class TrainState(struct.PyTreeNode):
  """Parameters, BatchNorm statistics and optimizer state of one network.

  flax.training.train_state.TrainState's fields with the BatchNorm statistics added (as
  flax/examples/imagenet's) and the module kept instead of its `apply_fn`: the steps
  re-bind the module to their axis name (`mapped_apply`) so that BatchNorm averages its
  batch statistics across devices, and `apply_fn` (usable outside the steps, e.g. in a
  notebook) is derived from it. `step` is an int32 array from the start, the type a
  checkpoint restores.
  """
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  module: nn.Module = struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, module: nn.Module, params: Any, batch_stats: Any,
             tx: optax.GradientTransformation) -> 'TrainState':
    """A fresh state at step 0."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), tx=tx, module=module)

  @property
  def apply_fn(self) -> Callable[..., Any]:
    """The module's apply without a device axis."""
    return self.module.apply

  def apply_gradients(self, *, grads: Any, batch_stats: Any) -> 'TrainState':
    """One optimizer update; also stores the BatchNorm statistics of the forward pass."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(step=self.step + 1, params=optax.apply_updates(self.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)

  def mapped_apply(self, axis_name: str | None) -> Callable[..., Any]:
    """The module's apply with BatchNorm statistics averaged over `axis_name`."""
    return self.module.clone(axis_name=axis_name).apply


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Every number the steps use; frozen and hashable, so it is a static argument."""
  recon_weights: tuple[tuple[str, float], ...]
  gabor: losses.GaborSpec | None
  kl_weight: float
  tc_weight: float
  tc_estimator: str
  dataset_size: int
  reconstruction_scale: float
  adversarial_weight: float
  train_disc_below: float
  train_vae_above: float
  latent_dim: int
  axis_name: str = 'batch'
  force_accuracy: float | None = None
  # Whether the discriminator's backward pass runs inside its update's lax.cond branch
  # (skipped with the update): not with XLA's own convolution gradients on the CPU, which
  # run about 90x slower in a branch (conv.py).
  disc_backward_in_branch: bool = True

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, dataset_size: int,
                  **overrides: Any) -> 'StepConfig':
    """The step settings of `config` (variant switches applied, scale resolved)."""
    weights = config_lib.reconstruction_weights(config)
    scale = config_lib.reconstruction_scale(config)
    backward = str(config.model.get('conv_backward', 'auto'))
    values = dict(
        recon_weights=tuple(sorted(weights.items())),
        gabor=losses.GaborSpec.from_config(config.gabor) if 'gabor' in weights else None,
        kl_weight=float(config.loss.kl_weight),
        tc_weight=config_lib.tc_weight(config),
        tc_estimator=str(config.loss.tc_estimator),
        dataset_size=int(dataset_size),
        reconstruction_scale=scale,
        adversarial_weight=float(config.loss.adversarial_weight),
        train_disc_below=float(config.gating.train_disc_below),
        train_vae_above=float(config.gating.train_vae_above),
        latent_dim=int(config.model.latent_dim),
        # (An invalid choice is models.create_models' error to report.)
        disc_backward_in_branch=jax.default_backend() != 'cpu' or (
            backward in config_lib.CONV_BACKWARDS and conv.uses_custom(backward)))
    values.update(overrides)
    return cls(**values)


def _init_fn(vae: models.VAE, disc: models.Discriminator, image_shape: tuple[int, ...],
             latent_dim: int, key: Array) -> tuple[Any, Any]:
  """Initial variables of both models."""
  x = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
  eps = jnp.zeros((2, latent_dim), jnp.float32)
  k_vae, k_disc = jax.random.split(key)
  return vae.init(k_vae, x, eps, train=False), disc.init(k_disc, x, train=False)


# XLA:CPU's default LLVM optimisation of the initializers' many unrolled threefry hashes
# took most of a small run's start-up: compiling the initialisation took 19.5 s at 16x16
# and 18.5 s at 96x96, against 4.0 s and 6.0 s at level 1, whose parameters were
# bit-identical at both sizes. The option is XLA's, for this one program only.
_CPU_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


@functools.cache
def _init_variables(backend: str) -> Callable[..., tuple[Any, Any]]:
  """_init_fn jitted for `backend`, once per architecture (the modules hash)."""
  options = _CPU_INIT_COMPILER_OPTIONS if backend == 'cpu' else None
  return jax.jit(_init_fn, static_argnums=(0, 1, 2, 3), compiler_options=options)


def create_train_states(config: ml_collections.ConfigDict, key: Array,
                        image_shape: tuple[int, int, int]) -> tuple[TrainState, TrainState]:
  """Initialised (vae_state, disc_state), unreplicated, with Adam from config.optimizer."""
  expected = (int(config.image_size), int(config.image_size), int(config.channels))
  if tuple(image_shape) != expected:
    raise config_lib.ConfigError(
        f'the data has images of shape {tuple(image_shape)} but the config asks for '
        f'{expected} (image_size, image_size, channels)')
  vae, disc = models.create_models(config)
  # Under a transformation (jax.eval_shape of a checkpoint's template) the initialisation
  # is traced into the caller's program, which takes no compiler options of its own.
  traced = isinstance(key, jax.core.Tracer)
  init = _init_fn if traced else _init_variables(jax.default_backend())
  v_vars, d_vars = init(vae, disc, expected, int(config.model.latent_dim), key)
  opt = config.optimizer
  vae_tx = optax.adam(float(opt.learning_rate), b1=float(opt.b1), b2=float(opt.b2))
  disc_tx = optax.adam(float(opt.disc_learning_rate), b1=float(opt.b1), b2=float(opt.b2))
  vae_state = TrainState.create(module=vae, params=v_vars['params'],
                                batch_stats=v_vars['batch_stats'], tx=vae_tx)
  disc_state = TrainState.create(module=disc, params=d_vars['params'],
                                 batch_stats=d_vars['batch_stats'], tx=disc_tx)
  return vae_state, disc_state


# ---------------------------------------------------------------------------------------
# Pieces shared by both steps.


def _device_noise(key: Array, per_device: int, cfg: StepConfig) -> Array:
  """This device's rows of the global batch's latent noise (independent of device count)."""
  num_devices = jax.lax.axis_size(cfg.axis_name)
  index = jax.lax.axis_index(cfg.axis_name)
  eps = jax.random.normal(key, (num_devices * per_device, cfg.latent_dim), jnp.float32)
  return jax.lax.dynamic_slice_in_dim(eps, index * per_device, per_device, axis=0)


def _vae_loss(params: Any, state: TrainState, x: Array, eps: Array,
              cfg: StepConfig) -> tuple[tuple[Array, Array], tuple[Any, Metrics]]:
  """((L_VAE, x_rec), (new batch_stats, metrics)) for this device's batch.

  L_VAE = mean_i(scale * L_REC_i + kl_weight * KL_i) + tc_weight * TC. Its gradient,
  pmean-ed over devices, is the gradient of the global-batch loss.
  """
  apply = state.mapped_apply(cfg.axis_name)
  (x_rec, z, mu, logvar), new_vars = apply(
      {'params': params, 'batch_stats': state.batch_stats}, x, eps, train=True,
      mutable=['batch_stats'])
  rec, terms = losses.reconstruction_loss(x, x_rec, cfg.recon_weights, cfg.gabor)
  kl = losses.kl_divergence(mu, logvar)
  loss = jnp.mean(cfg.reconstruction_scale * rec + cfg.kl_weight * kl)
  metrics = {'rec': jnp.mean(rec), **{k: jnp.mean(v) for k, v in terms.items()},
             'kl': jnp.mean(kl)}
  if cfg.tc_weight:
    # q(z) is estimated from the posteriors of the whole global batch; this device's
    # samples are rows index * m ... of it.
    m = x.shape[0]
    mu_all = jax.lax.all_gather(mu, cfg.axis_name, tiled=True)
    logvar_all = jax.lax.all_gather(logvar, cfg.axis_name, tiled=True)
    tc = losses.total_correlation(z, mu_all, logvar_all, cfg.dataset_size, cfg.tc_estimator,
                                  row_offset=jax.lax.axis_index(cfg.axis_name) * m)
    loss = loss + cfg.tc_weight * tc
    metrics['tc'] = tc
  metrics['loss'] = loss
  return (loss, x_rec), (new_vars['batch_stats'], metrics)


def _pmean(tree: Any, cfg: StepConfig) -> Any:
  """Mean over the devices of the step's axis."""
  return jax.lax.pmean(tree, cfg.axis_name)


# ---------------------------------------------------------------------------------------
# The steps.


def pretrain_step(vae_state: TrainState, batch: Array, key: Array, *,
                  cfg: StepConfig) -> tuple[TrainState, Metrics]:
  """One VAE update on L_VAE (Algorithm 1, first loop).

  Metrics (pmean-ed over devices): 'loss' (L_VAE), 'rec' (sum of the weighted
  reconstruction terms, pixel means, before reconstruction_scale), each active term by
  name (unweighted), 'kl', and 'tc' when the variant has the TC term.
  """
  eps = _device_noise(key, batch.shape[0], cfg)

  def loss_fn(params):
    (loss, _), aux = _vae_loss(params, vae_state, batch, eps, cfg)
    return loss, aux

  (_, (batch_stats, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      vae_state.params)
  vae_state = vae_state.apply_gradients(grads=_pmean(grads, cfg), batch_stats=batch_stats)
  return vae_state, _pmean(metrics, cfg)


def _disc_loss(logit_real: Array, logit_fake: Array) -> Array:
  """Discriminator BCE: real labelled 1, fake 0 (mean over the batch of each)."""
  return jnp.mean(jax.nn.softplus(-logit_real)) + jnp.mean(jax.nn.softplus(logit_fake))


def _generator_loss(logit_fake: Array) -> Array:
  """Non-saturating generator loss -log D(x_rec) = softplus(-logit), batch mean."""
  return jnp.mean(jax.nn.softplus(-logit_fake))


def gate(correct: Array, total: int, train_disc_below: float,
         train_vae_above: float) -> tuple[Array, Array]:
  """(update D, update the VAE) for `correct` of `total` answers: acc < below, acc > above.

  Decided on whole numbers of answers, so that the decision does not depend on the
  device count: a float32 accuracy averaged over devices can round across a threshold
  (28 of 40 answers is 0.7 on one device, and 0.6999999 as the float32 mean of four
  devices' 3, 10, 9 and 6 of 10). The accuracy c / total is compared as Python's
  correctly rounded float64 quotient, so an accuracy equal to the threshold the config
  writes (3 of 10 against 0.3, 40 of 120 against 1 / 3) is on it, as Algorithm 1's
  strict tests need; the binary value of 0.3, slightly below 3/10, would count it above.
  """
  total = int(total)
  below, above = float(train_disc_below), float(train_vae_above)
  if math.isnan(below) or math.isnan(above):
    # Every comparison with NaN is false: the VAE would update at every accuracy.
    raise ValueError(f'gating thresholds must be numbers, got train_disc_below={below}, '
                     f'train_vae_above={above}')
  # c / total never decreases with c, so the counts that pass each test are a prefix
  # (acc < below) or a suffix (acc > above) of 0..total: two integer bounds.
  n_below = sum(1 for c in range(total + 1) if c / total < below)
  n_not_above = sum(1 for c in range(total + 1) if c / total <= above)
  return correct < n_below, correct >= n_not_above


def adversarial_step(vae_state: TrainState, disc_state: TrainState, batch: Array, key: Array,
                     *, cfg: StepConfig) -> tuple[TrainState, TrainState, Metrics]:
  """One gated adversarial step (Algorithm 1, second loop).

  The discriminator's accuracy on this batch (real = x, fake = x_rec, threshold 0.5) is
  measured with the current parameters as a count of correct answers summed over the
  devices, so every device takes the same branch, whatever the device count (see gate).
  If it is below train_disc_below the discriminator takes a BCE step (the fake under
  stop_gradient); if it is above train_vae_above the VAE takes a step on
  L_VAE + adversarial_weight * (-log D(x_rec)) with the discriminator as it was before
  its update. A state that is not updated is returned unchanged (step counter and
  BatchNorm statistics included). Forward passes are shared: the VAE runs once on the
  batch and the discriminator once on x and once on x_rec, the pass that both its BCE
  and the generator loss differentiate. The discriminator's backward pass for its own
  update runs inside that update's lax.cond branch, so a step that skips the update
  skips it too; the VAE's (with the generator's pass through the discriminator) always
  runs, and lax.cond selects only its optimizer update. (On the CPU with XLA's own
  convolution gradients, which ran about 90x slower inside a branch than
  conv.conv_general_dilated's custom ones, the models' default there,
  cfg.disc_backward_in_branch is False and that pass always runs too; docs/benchmarks.md,
  items 1 and 21.)

  Metrics (pmean-ed): those of pretrain_step ('loss' is L_VAE, without the adversarial
  term), 'disc_loss' (BCE), 'gen_loss' (-log D(x_rec)), 'disc_accuracy' (measured, also
  when cfg.force_accuracy drives the gate), 'disc_updated' and 'vae_updated' (0 or 1).
  """
  x = batch
  eps = _device_noise(key, x.shape[0], cfg)

  # VAE forward, keeping the linearisation for the VAE update.
  (vae_loss, x_rec), vae_vjp, (vae_stats, metrics) = jax.vjp(
      lambda p: _vae_loss(p, vae_state, x, eps, cfg), vae_state.params, has_aux=True)

  # Discriminator forwards on the real and the fake batch (separate BatchNorm batches,
  # as in the PyTorch twin). The fake pass is linearised in both the discriminator parameters
  # (for its BCE step; x_rec is then a constant, i.e. under stop_gradient) and in x_rec
  # (for the generator loss, through the discriminator as it is now).
  disc_apply = disc_state.mapped_apply(cfg.axis_name)

  def disc_forward(params, batch_stats, images):
    logits, new_vars = disc_apply({'params': params, 'batch_stats': batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    return logits, new_vars['batch_stats']

  logit_real, real_vjp, stats_after_real = jax.vjp(
      lambda p: disc_forward(p, disc_state.batch_stats, x), disc_state.params, has_aux=True)
  logit_fake, fake_vjp, disc_stats = jax.vjp(
      lambda p, images: disc_forward(p, stats_after_real, images), disc_state.params, x_rec,
      has_aux=True)

  # Real and fake batches are the same size, so the accuracy is the fraction of correct
  # answers over both.
  correct = jax.lax.psum(jnp.sum(logit_real > 0, dtype=jnp.int32)
                         + jnp.sum(logit_fake < 0, dtype=jnp.int32), cfg.axis_name)
  total = 2 * x.shape[0] * jax.lax.axis_size(cfg.axis_name)
  accuracy = correct.astype(jnp.float32) / total
  if cfg.force_accuracy is None:
    update_disc, update_vae = gate(correct, total, cfg.train_disc_below, cfg.train_vae_above)
  else:
    forced = jnp.float32(cfg.force_accuracy)
    update_disc, update_vae = forced < cfg.train_disc_below, forced > cfg.train_vae_above

  disc_loss, (ct_real, ct_fake) = jax.value_and_grad(_disc_loss, argnums=(0, 1))(
      logit_real, logit_fake)
  gen_loss, ct_gen = jax.value_and_grad(_generator_loss)(logit_fake)

  _, ct_x_rec = fake_vjp(ct_gen)
  (vae_grads,) = vae_vjp((jnp.ones_like(vae_loss), cfg.adversarial_weight * ct_x_rec))
  vae_grads = _pmean(vae_grads, cfg)

  def disc_gradients():
    (g_real,) = real_vjp(ct_real)
    g_fake, _ = fake_vjp(ct_fake)
    return _pmean(jax.tree.map(jnp.add, g_real, g_fake), cfg)

  # Every device takes the same branch (the gate is global), so a pmean inside is safe.
  disc_grads = None if cfg.disc_backward_in_branch else disc_gradients()

  def disc_update(state):
    grads = disc_gradients() if disc_grads is None else disc_grads
    return state.apply_gradients(grads=grads, batch_stats=disc_stats)

  def vae_update(state):
    return state.apply_gradients(grads=vae_grads, batch_stats=vae_stats)

  new_disc = jax.lax.cond(update_disc, disc_update, lambda s: s, disc_state)
  new_vae = jax.lax.cond(update_vae, vae_update, lambda s: s, vae_state)

  metrics = dict(metrics, disc_loss=disc_loss, gen_loss=gen_loss)
  metrics = _pmean(metrics, cfg)
  metrics.update(disc_accuracy=accuracy, disc_updated=update_disc.astype(jnp.float32),
                 vae_updated=update_vae.astype(jnp.float32))
  return new_vae, new_disc, metrics


def state_tree(vae_state: TrainState, disc_state: TrainState) -> dict[str, Any]:
  """The arrays of both train states as one tree: what a checkpoint holds."""
  def arrays(s):
    return {'step': s.step, 'params': s.params, 'batch_stats': s.batch_stats,
            'opt_state': s.opt_state}
  return {'vae': arrays(vae_state), 'disc': arrays(disc_state)}


def from_state_tree(vae_state: TrainState, disc_state: TrainState,
                    tree: dict[str, Any]) -> tuple[TrainState, TrainState]:
  """Puts the arrays of a `state_tree` (e.g. restored) back into the train states."""
  def put(s, t):
    return s.replace(step=t['step'], params=t['params'], batch_stats=t['batch_stats'],
                     opt_state=t['opt_state'])
  return put(vae_state, tree['vae']), put(disc_state, tree['disc'])
