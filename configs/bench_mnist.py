"""Benchmark shapes of MNIST 28x28x1 (two stages, widths (32, 64)), batch 64, latent 32.

  python benchmark.py --config=configs/bench_mnist.py
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the MNIST-shaped benchmark configuration."""
  c = default.get_config()
  c.dataset = 'shapes'
  c.image_size = 28
  c.channels = 1
  c.model.widths = (32, 64)
  c.model.latent_dim = 32
  c.batch_size = 64
  c.shapes.num_train = 512
  c.shapes.num_eval = 64
  c.loss.tc_estimator = 'mws'
  c.num_devices = 1
  return c
