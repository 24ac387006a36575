"""DINOv3-ConvNeXt DISTS (Dv3CD) loss of OMGSR (Eq. 10-11), as in the HEAD code.

HEAD ``dinov3_gan/dinov3_convnext_dists.py`` (method-facts §1.5), which we follow exactly:

* Level 0 is the raw image mapped to [0, 1] (3 channels), **not** ImageNet-normalised and **not**
  L2-pooled (Eq. 10 also writes ``L^0 = x``; original DISTS does the same).
* The backbone input is the ImageNet-normalised image (:func:`imagenet_normalize`); levels 1-3 are the
  outputs of DINOv3-ConvNeXt stages 0-2, each L2-pooled (square -> depthwise 3x3 Hanning
  ``[0.5, 1, 0.5]`` outer product normalised to sum 1, stride 1, zero pad 1 -> ``sqrt(. + 1e-12)``),
  and **the pooled map is what the next stage receives** (Eq. 10:
  ``L^l = L2Pool(Stage_l(Down_l(L^{l-1})))``). Original DISTS (VGG) instead uses stride-2 L2 pooling
  as the downsampling between stages and compares the un-pooled stage outputs.
* Weights: not learned, uniform ``alpha = beta = 1 / (2 sum C)`` per channel, sum C = 3 + C0 + C1 + C2
  (1347 for ConvNeXt-Large); this is Eq. 11's ``1/alpha`` with ``alpha = 2 sum_l C(L^l)``.
* ``c1 = c2 = 1e-6``; structure term on channel means, texture term on biased variance / covariance
  over (H, W); score = ``1 - sum_l sum_c alpha (S1 + S2)``; loss = mean over the batch.

The backbone is frozen: its params are wrapped in ``stop_gradient``; gradients flow to the images.
Pooling and statistics run in float32 whatever the backbone compute dtype.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.models.dinov3 import imagenet_normalize

DISTS_C1 = 1e-6
DISTS_C2 = 1e-6
NUM_DINO_LEVELS = 3  # the first three ConvNeXt stages (OMGSR Sec. 3.6.1)


def hanning_filter_3x3() -> np.ndarray:
  """``hanning(5)[1:-1] = [0.5, 1, 0.5]`` outer product, normalised to sum 1 (DISTS L2 pooling)."""
  a = np.hanning(5)[1:-1]
  g = a[:, None] * a[None, :]
  return (g / g.sum()).astype(np.float32)


def hanning_l2_pool(x: jax.Array) -> jax.Array:
  """OMGSR Eq. 10 ``L2Pooling(x) = sqrt(conv2d(x^2, w_h) + 1e-12)``: depthwise 3x3, stride 1, pad 1.

  NHWC in, NHWC float32 out (same spatial size).
  """
  x = x.astype(jnp.float32)
  channels = x.shape[-1]
  kernel = jnp.tile(jnp.asarray(hanning_filter_3x3())[:, :, None, None], (1, 1, 1, channels))
  out = jax.lax.conv_general_dilated(
      jnp.square(x), kernel, window_strides=(1, 1), padding=((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels,
      precision=jax.lax.Precision.HIGHEST)
  return jnp.sqrt(out + 1e-12)


def l2pooled_dinov3_features(dino: nn.Module, dino_params: Any, images: jax.Array,
                             num_levels: int = NUM_DINO_LEVELS) -> list[jax.Array]:
  """OMGSR Eq. 10 (L2Dv3C): ``[x in [0, 1]] + [L2-pooled stage outputs 0..num_levels-1]``.

  Args:
    dino: a ``DINOv3ConvNextModel``.
    dino_params: its (frozen) params.
    images: NHWC in [-1, 1].
  """
  params = jax.lax.stop_gradient(dino_params)
  features = [images.astype(jnp.float32) * 0.5 + 0.5]
  h = imagenet_normalize(images)
  for index in range(num_levels):
    h = dino.apply({'params': params}, h, index, method='stage')
    h = hanning_l2_pool(h)
    features.append(h)
  return features


def dists_uniform_weight(channels: Sequence[int]) -> float:
  """HEAD's per-channel alpha = beta = 1 / (2 sum C) (Eq. 11's 1/alpha)."""
  return 1.0 / (2.0 * float(sum(channels)))


def dists_score_from_features(feats_x: Sequence[jax.Array], feats_y: Sequence[jax.Array],
                              c1: float = DISTS_C1, c2: float = DISTS_C2) -> jax.Array:
  """OMGSR Eq. 11 for given feature lists: per-sample ``1 - sum_l sum_c w (S1 + S2)``, shape (B,).

  ``w = 1 / (2 sum_l C_l)`` (uniform). S1 = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1) and
  S2 = (2 cov_xy + c2) / (var_x + var_y + c2), statistics over (H, W) per channel (biased).
  """
  weight = dists_uniform_weight([f.shape[-1] for f in feats_x])
  similarity = 0.0
  for fx, fy in zip(feats_x, feats_y):
    fx, fy = fx.astype(jnp.float32), fy.astype(jnp.float32)
    mx = fx.mean(axis=(1, 2))
    my = fy.mean(axis=(1, 2))
    s1 = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
    var_x = jnp.square(fx - mx[:, None, None]).mean(axis=(1, 2))
    var_y = jnp.square(fy - my[:, None, None]).mean(axis=(1, 2))
    cov = (fx * fy).mean(axis=(1, 2)) - mx * my
    s2 = (2 * cov + c2) / (var_x + var_y + c2)
    similarity = similarity + weight * (s1 + s2).sum(axis=-1)
  return 1.0 - similarity


def dv3cd_distance(dino: nn.Module, dino_params: Any, pred: jax.Array,
                   target: jax.Array) -> jax.Array:
  """Per-sample Dv3CD distance (B,) between NHWC images in [-1, 1] (OMGSR Eq. 10-11).

  Both images go through the backbone in one batch; the target is treated as a constant.
  """
  batch = pred.shape[0]
  target = jax.lax.stop_gradient(target).astype(pred.dtype)
  features = l2pooled_dinov3_features(dino, dino_params, jnp.concatenate([pred, target], axis=0))
  return dists_score_from_features([f[:batch] for f in features], [f[batch:] for f in features])


def dv3cd_loss(dino: nn.Module, dino_params: Any, pred: jax.Array, target: jax.Array) -> jax.Array:
  """OMGSR Eq. 11 loss ``L_Dv3CD(x_P, x_H)``: :func:`dv3cd_distance` averaged over the batch
  (lambda_3 = 5 is applied by the training step)."""
  return jnp.mean(dv3cd_distance(dino, dino_params, pred, target))
