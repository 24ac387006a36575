"""Multi-level BCE GAN losses with one-sided soft labels: OMGSR (Eq. 12, 14, 15) sums the levels,
TUDSR (Eq. 6, 7) averages them.

OMGSR HEAD ``dinov3_gan/dinov3_convnext_disc.py``: BCE-with-logits; the real target and
the generator target are 0.8, the fake target 0; for each level the per-pixel BCE is averaged over the
logit map, the levels are summed, and the result is averaged over the batch. The paper's Eq. 9
"Sigmoid" is folded into the BCE (logits in, numerically stable).

Each level's logits have shape (B, h, w) (or (B,) / (B, h, w, 1), both accepted).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

REAL_LABEL = 0.8
FAKE_LABEL = 0.0


def bce_with_logits(logits: jax.Array, target) -> jax.Array:
  """Elementwise ``BCEWithLogits``: ``-(t log s(x) + (1 - t) log(1 - s(x)))``."""
  logits = logits.astype(jnp.float32)
  return -(target * jax.nn.log_sigmoid(logits) + (1.0 - target) * jax.nn.log_sigmoid(-logits))


def multilevel_bce(level_logits: Sequence[jax.Array], target: float) -> jax.Array:
  """``sum_l mean_{h,w} BCE(logit_l, target)``, averaged over the batch (scalar)."""
  total = 0.0
  for logits in level_logits:
    per_pixel = bce_with_logits(logits, target)
    total = total + per_pixel.reshape(per_pixel.shape[0], -1).mean(axis=1)
  return jnp.mean(total)


def generator_gan_loss(fake_logits: Sequence[jax.Array], real_label: float = REAL_LABEL) -> jax.Array:
  """OMGSR Eq. 12: ``L_g = sum_l E[BCE(logit_l(x_P), label_real)]`` with the soft label 0.8."""
  return multilevel_bce(fake_logits, real_label)


def discriminator_gan_loss(fake_logits: Sequence[jax.Array], real_logits: Sequence[jax.Array],
                           real_label: float = REAL_LABEL,
                           fake_label: float = FAKE_LABEL) -> tuple[jax.Array, jax.Array]:
  """OMGSR Eq. 14: ``(L_fake, L_real)``; Eq. 15 is ``lambda_2 (L_fake + L_real)`` (lambda_2 = 0.5,
  applied by the training step). ``fake_logits`` must come from detached generator images."""
  return multilevel_bce(fake_logits, fake_label), multilevel_bce(real_logits, real_label)


def level_mean_bce(level_logits: Sequence[jax.Array], target: float) -> jax.Array:
  """TUDSR Eq. 6 / 7: ``(1 / L) sum_l BCE(label, logit_l)`` over the L levels, each level's BCE the
  mean over its logit map and the batch (scalar)."""
  if not level_logits:
    raise ValueError('level_mean_bce needs at least one level of logits')
  return multilevel_bce(level_logits, target) / len(level_logits)


def mean_logit(level_logits: Sequence[jax.Array]) -> jax.Array:
  """The mean of the per-level mean logits (a D-health metric: real should sit above fake)."""
  return jnp.mean(jnp.stack([jnp.mean(l) for l in level_logits]))


def discriminator_metrics(loss: jax.Array, loss_fake: jax.Array, loss_real: jax.Array,
                          fake_logits: Sequence[jax.Array], real_logits: Sequence[jax.Array]
                          ) -> dict[str, jax.Array]:
  """The D metrics every GAN method logs: d_loss, d_fake, d_real, d_logit_fake, d_logit_real."""
  return {'d_loss': loss, 'd_fake': loss_fake, 'd_real': loss_real,
          'd_logit_fake': mean_logit(fake_logits), 'd_logit_real': mean_logit(real_logits)}
