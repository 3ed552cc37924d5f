"""avae_jax: AVAE-S (sharpened adversarial VAE) in JAX/Flax."""

__version__ = '0.1.0'
