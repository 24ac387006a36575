"""sr-jax: one-step diffusion super-resolution for real-world images, in JAX/Flax."""
__version__ = '0.1.0'
