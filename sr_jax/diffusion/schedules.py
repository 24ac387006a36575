"""Noise schedules for one-step diffusion SR: DDPM (SD2.1) and flow matching (SD3 / FLUX).

The one-step generators only need the schedule value at one mid-timestep t* (OMGSR: 273 for
SD2.1-base, 244 for FLUX.1-dev in the OMGSR HEAD configs), so the schedules are plain numpy arrays
computed once on the host in float64, and the noising / x0-prediction formulas are jnp functions that
take the schedule value as a scalar (Python float or array).

DDPM ``alphas_cumprod`` follows diffusers' ``DDPMScheduler`` from a scheduler ``config.json`` dict;
diffusers computes it in float32, we compute in float64 (differences ~1e-7, checked in
``tests/test_schedules.py``).

Flow matching follows OMGSR Eq. 16 (supplementary): ``z_t = (1 - sigma) z_H + sigma eps``. The
inverse one-step predictions (eps / v / velocity -> x0) are in :mod:`sr_jax.diffusion.latents`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# diffusers DDPMScheduler defaults (used for keys missing from a config dict).
_DDPM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                      beta_schedule='linear', trained_betas=None, rescale_betas_zero_snr=False)


# ------------------------------------------------------------------------------------------ DDPM


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  """diffusers ``betas_for_alpha_bar`` with the 'cosine' transform (``squaredcos_cap_v2``)."""
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                   for i in range(num_steps)], np.float64)


def ddpm_betas(config: Mapping[str, Any]) -> np.ndarray:
  """The DDPM betas (float64, length ``num_train_timesteps``) of a diffusers scheduler config.

  Supports ``beta_schedule`` 'linear' (linspace(b0, b1, N)), 'scaled_linear' (Stable Diffusion:
  linspace(sqrt b0, sqrt b1, N) ** 2), 'squaredcos_cap_v2' and explicit ``trained_betas``.
  """
  cfg = {**_DDPM_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
  if cfg['rescale_betas_zero_snr']:
    raise ValueError('rescale_betas_zero_snr=True is not supported (no sr_jax base model uses it)')
  n = int(cfg['num_train_timesteps'])
  if cfg['trained_betas'] is not None:
    return np.asarray(cfg['trained_betas'], np.float64)
  b0, b1 = float(cfg['beta_start']), float(cfg['beta_end'])
  schedule = cfg['beta_schedule']
  if schedule == 'linear':
    return np.linspace(b0, b1, n, dtype=np.float64)
  if schedule == 'scaled_linear':
    return np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2
  if schedule == 'squaredcos_cap_v2':
    return _cosine_betas(n)
  raise ValueError(f'unsupported beta_schedule {schedule!r}; supported: linear, scaled_linear, '
                   'squaredcos_cap_v2 or trained_betas')


def ddpm_alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
  """``alphas_cumprod`` (alpha-bar_t for t = 0..N-1, float64) of a diffusers DDPM scheduler config.

  This is the alpha_t of OMGSR Eq. 1 / alpha-bar_t of Eq. 3, 6, 7, indexed by the integer timestep
  the UNet receives (diffusers' convention, t = 0 is the first noising step). SD2.1-base:
  ``alphas_cumprod[273] = 0.6357``.
  """
  return np.cumprod(1.0 - ddpm_betas(config))


def ddpm_add_noise(z0: jax.Array, noise: jax.Array, alpha_bar) -> jax.Array:
  """OMGSR Eq. 1: ``z_t = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) eps``."""
  alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
  return (jnp.sqrt(alpha_bar) * z0 + jnp.sqrt(1.0 - alpha_bar) * noise).astype(z0.dtype)


# ------------------------------------------------------------------------------- flow matching


def flow_static_shift(sigma, shift: float):
  """SD3-style static timestep shift: ``sigma' = s sigma / (1 + (s - 1) sigma)``.

  Equals :func:`flow_time_shift` with ``mu = log(s)``. Works on numpy or jnp arrays.
  """
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """FLUX's resolution-dependent shift mu: linear from (256, 0.5) to (4096, 1.15) in the number of
  image tokens (diffusers ``calculate_shift``; OMGSR ``mid_timestep_flux.get_lin_function``)."""
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return float(base_shift + slope * (image_seq_len - base_seq_len))


def flux_image_seq_len(height: int, width: int, vae_scale: int = 8, patch_size: int = 2) -> int:
  """Number of FLUX image tokens for an image of ``height x width`` pixels (1024^2 -> 4096)."""
  return (height // vae_scale // patch_size) * (width // vae_scale // patch_size)


def flow_time_shift(sigma, mu: float, exponent: float = 1.0) -> np.ndarray:
  """FLUX exponential time shift: ``sigma' = e^mu / (e^mu + (1/sigma - 1)^exponent)``.

  numpy, float64; sigma = 0 maps to 0 and sigma = 1 to 1.
  """
  sigma = np.asarray(sigma, np.float64)
  with np.errstate(divide='ignore'):
    odds = np.where(sigma > 0, 1.0 / np.maximum(sigma, 1e-300) - 1.0, np.inf) ** exponent
  return np.where(sigma > 0, math.exp(mu) / (math.exp(mu) + odds), 0.0)


def flux_mid_timestep_sigmas(num_steps: int = 999, image_seq_len: int = 4096) -> np.ndarray:
  """sigma_t for the integer timesteps t = 0..num_steps of OMGSR-F's t* grid (OMGSR ``mid_timestep/mid_timestep_flux.py``).

  OMGSR's ``mid_timestep_flux.py`` shifts ``linspace(1, 0, num_steps + 1)`` with
  ``mu = flux_mu(image_seq_len)`` and reads timestep t as ``sigmas[-(t + 1)]``, i.e.
  ``sigma_t = time_shift(mu, t / num_steps)``. It always uses the 1024^2 sequence length (4096);
  HEAD t* = 244 gives sigma ~ 0.505.
  """
  unshifted = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  return flow_time_shift(unshifted, flux_mu(image_seq_len))


def flow_add_noise(z0: jax.Array, noise: jax.Array, sigma) -> jax.Array:
  """OMGSR Eq. 16 (flow matching): ``z_t = (1 - sigma) z0 + sigma eps``."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return ((1.0 - sigma) * z0 + sigma * noise).astype(z0.dtype)
