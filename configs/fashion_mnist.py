"""Fashion-MNIST 28x28: tfds 'fashion_mnist', or Debian's idx files with
`--config.dataset=arrays:/usr/share/datasets/fashion-mnist`."""

import ml_collections

from configs import mnist


def get_config(variant: str = 'avae_s') -> ml_collections.ConfigDict:
  """Returns the Fashion-MNIST configuration for `variant` (same budget as MNIST)."""
  c = mnist.get_config(variant)
  c.dataset = 'fashion_mnist'
  return c
