"""Small OMGSR generator losses: latent representation refinement (LRR) and pixel L1.

OMGSR Eq. 13 weights (HEAD ``configs/omgsr_s_512.yml``): lambda_LRR = 5, lambda_L1 = 0.5; the weights are
applied by the training step, not here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def lrr_loss(z_lq: jax.Array, z_hq: jax.Array, noise: jax.Array, alpha_bar) -> jax.Array:
  """OMGSR Eq. 6, HEAD form: ``MSE(sqrt(a) z_H + sqrt(1 - a) eps, z_L)`` with a = alpha_bar_{t*}.

  Args:
    z_lq: latent of the LQ image from the LoRA VAE encoder (trainable path), (B, h, w, c).
    z_hq: latent of the HQ image from the frozen VAE; treated as a constant (the reference encodes
      it under ``no_grad``).
    noise: a fresh standard-normal draw, same shape (drawn by the caller every step).
    alpha_bar: alpha-bar at t* (e.g. 0.6357 for SD2.1-base, t* = 273).

  Returns:
    Scalar mean squared error over all elements (``F.mse_loss(..., reduction='mean')``).
  """
  alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
  target = jnp.sqrt(alpha_bar) * z_hq.astype(jnp.float32) + jnp.sqrt(1.0 - alpha_bar) * noise
  target = jax.lax.stop_gradient(target)
  return jnp.mean(jnp.square(z_lq.astype(jnp.float32) - target))


def l1_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """OMGSR L_1 of Eq. 13: mean absolute pixel error over all elements (images in [-1, 1])."""
  return jnp.mean(jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32)))
