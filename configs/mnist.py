"""MNIST 28x28 (tfds 'mnist'): two stages, so 28 / 4 = 7.

`--config=configs/mnist.py:vae` picks a variant.
"""

import ml_collections

from configs import default

TRAIN_EXAMPLES = 60_000


def get_config(variant: str = 'avae_s') -> ml_collections.ConfigDict:
  """Returns the MNIST configuration for `variant`."""
  c = default.get_config()
  c.variant = variant
  c.dataset = 'mnist'
  c.image_size = 28
  c.channels = 1
  c.model.widths = (32, 64)
  c.batch_size = 64
  # In epochs: references to batch_size, so that --config.batch_size=256 keeps them so.
  batch = c.get_ref('batch_size')
  c.pretrain_steps = 20 * TRAIN_EXAMPLES // batch    # 20 epochs
  c.adversarial_steps = 5 * TRAIN_EXAMPLES // batch  # 5 epochs
  c.calibrate.batches = TRAIN_EXAMPLES // batch  # the paper probes the terms for 1 epoch
  c.log_every = 100
  c.image_every = 2000
  c.checkpoint_every = 2000
  c.eval.num_images = 10_000
  return c
