"""The latent codec of a diffusion VAE and the one-step clean-latent predictions.

Between pixels and the diffusion backbone every method does the same three things:

* sample the VAE posterior, ``x = mean + exp(logvar / 2) noise`` (diffusers
  ``DiagonalGaussianDistribution.sample``; logvar already clamped to [-30, 20] by the VAE);
* map the sample into the backbone's latent space, ``z = (x - shift) scale`` and back,
  ``x = z / scale + shift`` (:class:`LatentCodec`). SD1/SD2: shift 0, scale 0.18215; the SD3 VAE:
  shift 0.0609, scale 1.5305; the FLUX VAE: shift 0.1159, scale 0.3611 (their ``config.json``);
* turn the backbone output at the injected noise level into the clean latent: epsilon -> x0 (DDPM,
  OMGSR Eq. 7), v -> x0 (DDPM v-prediction), velocity -> x0 (flow matching, OMGSR-F).

These are the only places those formulas live; the noise schedules themselves (alpha-bar, sigma) are
in :mod:`sr_jax.diffusion.schedules`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

DEFAULT_SCALING_FACTOR = 0.18215  # diffusers' AutoencoderKL default (the SD1/SD2 VAE)


def sample_posterior(mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
  """``latent_dist.sample()`` with the given standard-normal ``noise``: ``mean + exp(logvar/2) noise``,
  in float32."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * noise.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LatentCodec:
  """``z = (x - shift_factor) * scaling_factor`` between VAE samples ``x`` and backbone latents ``z``."""
  scaling_factor: float = DEFAULT_SCALING_FACTOR
  shift_factor: float = 0.0

  @classmethod
  def from_vae_config(cls, config: Mapping[str, Any]) -> 'LatentCodec':
    """From a diffusers VAE ``config.json`` dict (missing or null keys take diffusers' defaults)."""
    scale = config.get('scaling_factor')
    shift = config.get('shift_factor')
    return cls(float(DEFAULT_SCALING_FACTOR if scale is None else scale),
               float(0.0 if shift is None else shift))

  def to_latent(self, sample: jax.Array) -> jax.Array:
    """VAE posterior sample -> backbone latent."""
    return (sample - self.shift_factor) * self.scaling_factor

  def from_latent(self, latent: jax.Array) -> jax.Array:
    """Backbone latent -> VAE decoder input."""
    return latent / self.scaling_factor + self.shift_factor

  def encode(self, mean: jax.Array, logvar: jax.Array, noise: jax.Array) -> jax.Array:
    """Posterior moments and noise -> backbone latent (a sampled, not the mean, latent)."""
    return self.to_latent(sample_posterior(mean, logvar, noise))


def x0_from_epsilon(z_t: jax.Array, eps: jax.Array, alpha_bar) -> jax.Array:
  """OMGSR Eq. 7: one-step ``x0 = (z_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar)``.

  In OMGSR ``z_t`` is the (LoRA-VAE) LQ latent injected at t*, and ``eps_hat`` the UNet output.
  """
  alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
  return ((z_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)).astype(z_t.dtype)


def x0_from_prediction(z_t: jax.Array, model_output: jax.Array, alpha_bar,
                       prediction_type: str = 'epsilon') -> jax.Array:
  """x0 from a DDPM model output of any diffusers ``prediction_type``.

  'epsilon' is OMGSR Eq. 7; 'v_prediction' (SD2.1-768) is ``sqrt(a) z_t - sqrt(1-a) v``; 'sample'
  returns the output unchanged.
  """
  if prediction_type == 'epsilon':
    return x0_from_epsilon(z_t, model_output, alpha_bar)
  if prediction_type == 'v_prediction':
    alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
    out = jnp.sqrt(alpha_bar) * z_t - jnp.sqrt(1.0 - alpha_bar) * model_output
    return out.astype(z_t.dtype)
  if prediction_type == 'sample':
    return model_output
  raise ValueError(f'unsupported prediction_type {prediction_type!r}; supported: epsilon, '
                   'v_prediction, sample')


def x0_from_velocity(z_t: jax.Array, velocity: jax.Array, sigma) -> jax.Array:
  """OMGSR-F one-step prediction: ``x0 = z_t - sigma v_hat`` (velocity ``v = eps - z0``, OMGSR
  Eq. 16-17)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return (z_t - sigma * velocity).astype(z_t.dtype)
