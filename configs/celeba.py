"""CelebA 96x96 as in the paper: Table I widths, 100 pre-training epochs.

tfds 'celeb_a' needs prepared data under data_dir (CelebA's automatic download often
fails); with the images downloaded by hand use
`--config.dataset=folder:/path/to/img_align_celeba`. The step counts are epochs of the
official training split: a folder's train split is 95% of all 202,599 images (its last 5%,
in file-name order, are the eval split, not the official validation images), so they make
about 85 epochs of it.
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
  # In epochs: references to batch_size, so that --config.batch_size=256 keeps them so.
  batch = c.get_ref('batch_size')
  c.pretrain_steps = 100 * TRAIN_EXAMPLES // batch    # the paper's 100 epochs
  c.adversarial_steps = 10 * TRAIN_EXAMPLES // batch  # 10 epochs of fine-tuning
  c.calibrate.enabled = True
  c.calibrate.batches = TRAIN_EXAMPLES // batch  # the paper probes the terms for 1 epoch
  c.log_every = 200
  c.image_every = 5000
  c.checkpoint_every = 5000
  c.keep_checkpoints = 3
  c.eval.num_images = 10_000
  c.eval.batch_size = 200
  return c
