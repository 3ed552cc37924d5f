"""CelebA 96x96 as in the paper: Table I widths, 100 pre-training epochs.

tfds 'celeb_a' needs prepared data under data_dir (CelebA's automatic download often
fails); with the images downloaded by hand use
`--config.dataset=folder:/path/to/img_align_celeba`.
"""

import ml_collections

from configs import default

TRAIN_EXAMPLES = 162_770  # CelebA's official training split


def get_config(variant: str = 'avae_s') -> ml_collections.ConfigDict:
  """Returns the CelebA configuration for `variant`."""
  c = default.get_config()
  c.variant = variant
  c.dataset = 'celeb_a'
  c.eval_split = 'validation'
  c.image_size = 96
  c.crop_size = 148   # centre square of the aligned 218x178 faces, then resized to 96
  c.channels = 3
  c.model.widths = (24, 48, 96, 192)  # Table I; 96 / 16 = 6
  c.batch_size = 64
  c.pretrain_steps = 100 * TRAIN_EXAMPLES // c.batch_size    # the paper's 100 epochs
  c.adversarial_steps = 10 * TRAIN_EXAMPLES // c.batch_size  # 10 epochs of fine-tuning
  c.calibrate.enabled = True
  c.calibrate.batches = 200
  c.log_every = 200
  c.image_every = 5000
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.eval.num_images = 10_000
  c.eval.batch_size = 200
  return c
