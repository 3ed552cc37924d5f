"""Settings of the reproduction study (study.py): the four models on two datasets.

`get_config(budget)` returns the study's settings for one budget:

  * 'cpu': the whole study (2 datasets x 4 models x 3 seeds), sized for about 75 minutes
    on two CPU cores from the measured step times (docs/benchmarks.md: 0.22 s / 0.41 s
    per pre-training / adversarial step at the default 32x32 config) and about 80 s of
    evaluation per run over 100 images (the Inception network at 299x299 dominates it on
    a CPU: about 0.25 s per image and pass, three passes per image). Its runs took 52
    minutes in all, 20-27 minutes of wall time as two one-core processes, one per pair
    of models (docs/results.md).
  * 'accelerator': the same design at a budget for one GPU/TPU (Fashion-MNIST 20 + 5
    epochs as in configs/fashion_mnist.py, shapes 8x larger, full evaluation sets).
  * 'test': a tiny budget that runs end to end in about two minutes on 2 cores
    (tests/test_study.py).

Every model of a dataset gets the same steps, batch, evaluation images and seeds; the
models differ only in `variant`. `run_config` turns (settings, dataset, variant, seed)
into the trainer's config.
"""

from __future__ import annotations

from typing import Mapping

import ml_collections

from configs import default

BUDGETS = ('cpu', 'accelerator', 'test')
DATASETS = ('shapes', 'fashion_mnist')
VARIANTS = ('vae', 'avae', 'vae_s', 'avae_s')
FASHION_MNIST_ARRAYS = 'arrays:/usr/share/datasets/fashion-mnist'
# Its training images (train-images-idx3-ubyte.gz); avae_jax/study_report.py has the same.
FASHION_MNIST_TRAIN = 60000


def _dataset(**kwargs) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kwargs)


def get_config(budget: str = 'cpu') -> ml_collections.ConfigDict:
  """Returns the study's settings for `budget` ('cpu', 'accelerator' or 'test')."""
  if budget not in BUDGETS:
    raise ValueError(f'unknown budget {budget!r}; choose one of {", ".join(BUDGETS)}')
  s = ml_collections.ConfigDict()
  s.budget = budget
  s.seeds = 3
  s.datasets = ','.join(DATASETS)
  s.variants = ','.join(VARIANTS)
  # 1 device: on a CPU host XLA parallelises each convolution over the cores itself.
  # 0 (all local devices) on an accelerator host.
  s.num_devices = 1

  # Shapes: 32x32 RGB, three stages (32/8 = 4); latent 10 as usual for dSprites-like
  # data (six factors). MIG uses the whole eval split (1024 images; the default
  # eval.mig_num_images), the other metrics eval_num_images.
  shapes = _dataset(
      dataset='shapes', image_size=32, channels=3, widths=(16, 32, 64), latent_dim=10,
      hidden_dim=48, num_train=8192, num_eval=1024,
      batch_size=64, pretrain_steps=300, adversarial_steps=100,
      eval_num_images=100, calibrate_batches=32, fid=True, grid_size=8)
  # Fashion-MNIST at its native 28x28: no resampling, so the ground-truth sharpness is
  # the data's own; two stages (28/4 = 7), latent 32 as in Table I.
  fmnist = _dataset(
      dataset=FASHION_MNIST_ARRAYS, image_size=28, channels=1, widths=(32, 64),
      latent_dim=32, hidden_dim=48, num_train=0, num_eval=0,
      batch_size=64, pretrain_steps=300, adversarial_steps=100,
      eval_num_images=100, calibrate_batches=32, fid=True, grid_size=8)

  if budget == 'accelerator':
    s.num_devices = 0
    shapes.update(num_train=65536, num_eval=4096, pretrain_steps=20 * 65536 // 64,
                  adversarial_steps=5 * 65536 // 64, eval_num_images=4096,
                  calibrate_batches=65536 // 64)
    n = FASHION_MNIST_TRAIN
    fmnist.update(pretrain_steps=20 * n // 64, adversarial_steps=5 * n // 64,
                  eval_num_images=10000, calibrate_batches=n // 64)
  elif budget == 'test':
    s.seeds = 1
    for d in (shapes, fmnist):
      d.update(widths=(4, 8), latent_dim=4, hidden_dim=8, batch_size=8,
               pretrain_steps=6, adversarial_steps=4, eval_num_images=16,
               calibrate_batches=2, fid=False, grid_size=4)
    shapes.update(image_size=16, num_train=64, num_eval=16)
  s.shapes = shapes
  s.fashion_mnist = fmnist
  return s


def run_config(settings: ml_collections.ConfigDict, dataset: str, variant: str, seed: int,
               weights: Mapping[str, float] | None = None) -> ml_collections.ConfigDict:
  """The trainer config of one run: `variant` on `dataset` with `seed` at the study's budget.

  weights: the λ's calibrated once per dataset by the study (vae_s/avae_s use them; the
  trainer's per-run calibration is off so that every seed and both *_s models share them).
  """
  d = settings[dataset]
  c = default.get_config()
  c.seed = int(seed)
  c.variant = variant
  c.dataset = d.dataset
  c.image_size = d.image_size
  c.channels = d.channels
  if d.dataset == 'shapes':
    c.shapes.num_train = d.num_train
    c.shapes.num_eval = d.num_eval
  c.model.widths = tuple(d.widths)
  c.model.latent_dim = d.latent_dim
  c.model.hidden_dim = d.hidden_dim
  c.batch_size = d.batch_size
  c.pretrain_steps = d.pretrain_steps
  c.adversarial_steps = d.adversarial_steps
  c.num_devices = settings.num_devices
  c.calibrate.enabled = False
  c.calibrate.batches = d.calibrate_batches
  if weights is not None:
    for k, v in weights.items():
      c.loss.weights[k] = float(v)
  total = d.pretrain_steps + d.adversarial_steps
  c.log_every = max(1, min(25, total // 40))
  # A few checkpoints per run: enough to resume, few enough not to cost much time.
  c.checkpoint_every = max(1, total // 4, min(total, 50))
  c.image_every = total
  c.keep_checkpoints = 2
  c.eval.num_images = d.eval_num_images
  c.eval.batch_size = min(100, d.eval_num_images)
  c.eval.fid = bool(d.fid)
  c.eval.grid_size = d.grid_size
  c.eval.traversal_dims = min(4, d.latent_dim)
  return c
