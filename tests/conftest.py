"""Test setup: four forced CPU devices, so pmap, shard_map and cross-device BatchNorm run for real."""

import os

# Must happen before jax is imported anywhere in the test session.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from avae_jax import xla_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# The XLA:CPU flags that the programs use (train.py and the others call the same).
xla_flags.apply()
