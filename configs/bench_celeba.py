"""Benchmark shapes of CelebA 96x96 (Table I widths), batch 64, latent 32.

The data are the procedural shapes rendered at 96x96x3 (no download): the benchmark
times steps, and the shapes give the accuracy gating a realistic course.

  python benchmark.py --config=configs/bench_celeba.py
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the CelebA-shaped benchmark configuration."""
  c = default.get_config()
  c.dataset = 'shapes'
  c.image_size = 96
  c.channels = 3
  c.model.widths = (24, 48, 96, 192)
  c.model.latent_dim = 32
  c.batch_size = 64
  # A few batches are enough to time steps; rendering 8192 images at 96x96 is not.
  c.shapes.num_train = 512
  c.shapes.num_eval = 64
  # MWS, as the PyTorch twin computes it; both estimators cost the same.
  c.loss.tc_estimator = 'mws'
  c.num_devices = 1
  return c
