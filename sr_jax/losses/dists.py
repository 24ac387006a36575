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

DISTS with VGG16 and learned weights (Ding et al. 2020), exactly as PyPI ``dists-pytorch`` 0.1
(``DISTS_pytorch/DISTS_pt.py``), and TUDSR's edge-aware ea-DISTS (TUDSR Eq. 5), below Dv3CD:

* Images in [0, 1]. Level 0 is the raw image (3 channels); levels 1-5 are VGG16 relu1_2 ... relu5_3
  of the ImageNet-normalised image, with VGG's max-pools replaced by stride-2 L2 pooling
  (:func:`sr_jax.models.vgg.l2_pool`); the stage outputs themselves are compared un-pooled.
* ``alpha``, ``beta``: the learned (1475,) per-channel weights of ``weights.pt`` (stored there as
  (1, 1475, 1, 1)), both divided by ``sum(alpha) + sum(beta)`` and split by the level channels
  :data:`DISTS_CHANNELS` = (3, 64, 128, 256, 512, 512).
* Per sample: ``1 - sum_l sum_c (alpha S1 + beta S2)`` with the S1, S2, c1 = c2 = 1e-6 and biased
  (H, W) statistics above; no batch mean (the reference's ``batch_average=False``; ``squeeze`` of
  its (B, 1, 1, 1) score). The covariance is the reference's ``E[xy] - E[x] E[y]`` computed as
  ``E[(x - E[x]) (y - E[y])]``: the same number without float32 cancellation. At the raw-image
  level mean^2 / var is ~20, and XLA's float32 sums made the one-pass form give DISTS(x, x) =
  -1.5e-6 on 128x128 photos (torch's more accurate sums hide it); now S2(x, x) = 1 exactly. In
  float64 both forms give the reference's scores and gradients to 1e-13 (tests).
* ea-DISTS = ``DISTS(x, y) + DISTS(S(x), S(y))``; S is the Sobel magnitude of OMGSR's OC-EA-DISTS
  (method-facts §2.1; TUDSR states none): grayscale = plain channel mean; ``Gx = [[-1, 0, 1],
  [-2, 0, 2], [-1, 0, 1]]``, ``Gy = Gx^T`` as cross-correlations (torch ``conv2d``), zero pad 1, no
  bias; ``sqrt(Gx^2 + Gy^2 + 1e-6)``, not clipped or rescaled. OMGSR fed the 1-channel map to
  DISTS, where it broadcasts against the 3-channel ImageNet mean/std (backbone) and its single
  level-0 S1/S2 multiplies all three level-0 alphas/betas; repeating the map to 3 identical channels
  is the same computation, which is what :func:`ea_dists_distance` does (tested against the reference
  fed the 1-channel map).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.models.dinov3 import IMAGENET_MEAN, IMAGENET_STD, imagenet_normalize
from sr_jax.models.vgg import (VGG16, VGG16_STAGE_CHANNELS, l2_pool, l2_pool_filter,
                               statistics_dtype)

DISTS_C1 = 1e-6
DISTS_C2 = 1e-6
NUM_DINO_LEVELS = 3  # the first three ConvNeXt stages (OMGSR Sec. 3.6.1)


def hanning_filter_3x3() -> np.ndarray:
  """``hanning(5)[1:-1] = [0.5, 1, 0.5]`` outer product, normalised to sum 1 (DISTS L2 pooling)."""
  return l2_pool_filter()


def hanning_l2_pool(x: jax.Array) -> jax.Array:
  """OMGSR Eq. 10 ``L2Pooling(x) = sqrt(conv2d(x^2, w_h) + 1e-12)``: DISTS' L2 pooling
  (:func:`sr_jax.models.vgg.l2_pool`) at stride 1, as OMGSR's Dv3CD; NHWC, float32 out."""
  return l2_pool(x, stride=1)


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


# ------------------------------------------------------------------- DISTS (VGG16) and ea-DISTS

# Channels of DISTS' six levels: the raw image, then VGG16 relu1_2 ... relu5_3 (1475 in all).
DISTS_CHANNELS = (3,) + tuple(VGG16_STAGE_CHANNELS)
SOBEL_GX = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
SOBEL_EPS = 1e-6


def dists_vgg_features(vgg_params: Any, images: jax.Array, *, dtype: Any = jnp.float32
                       ) -> list[jax.Array]:
  """DISTS' representation: ``[x] + [VGG16 relu1_2, ..., relu5_3 with L2 pooling]`` (``forward_once``).

  Args:
    vgg_params: (frozen) params of :class:`sr_jax.models.vgg.VGG16`.
    images: NHWC in [0, 1] with 3 channels (or 1, broadcast against the ImageNet mean/std).
    dtype: backbone compute dtype; level 0 and the pooling are float32 (float64 for float64 input).
  """
  x = images.astype(statistics_dtype(images))
  normalized = (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)
  stages = VGG16(dtype=dtype).apply({'params': jax.lax.stop_gradient(vgg_params)},
                                    normalized.astype(dtype), downsample='l2')
  return [x] + stages


def dists_level_weights(alpha: jax.Array, beta: jax.Array
                        ) -> tuple[list[jax.Array], list[jax.Array]]:
  """The reference's ``alpha / w_sum`` and ``beta / w_sum``, ``w_sum = sum(alpha) + sum(beta)``,
  split per level by :data:`DISTS_CHANNELS` (float32, or float64)."""
  dtype = statistics_dtype(alpha, beta)
  alpha = jnp.reshape(alpha, (-1,)).astype(dtype)
  beta = jnp.reshape(beta, (-1,)).astype(dtype)
  if alpha.shape != (sum(DISTS_CHANNELS),) or beta.shape != alpha.shape:
    raise ValueError(f'DISTS alpha/beta must hold {sum(DISTS_CHANNELS)} weights each, got '
                     f'{alpha.shape} and {beta.shape}')
  w_sum = alpha.sum() + beta.sum()
  splits = np.cumsum(DISTS_CHANNELS)[:-1]
  return jnp.split(alpha / w_sum, splits), jnp.split(beta / w_sum, splits)


def dists_score_from_weighted_features(feats_x: Sequence[jax.Array], feats_y: Sequence[jax.Array],
                                       alpha: jax.Array, beta: jax.Array, c1: float = DISTS_C1,
                                       c2: float = DISTS_C2) -> jax.Array:
  """DISTS with learned weights: per-sample ``1 - sum_l sum_c (alpha S1 + beta S2)``, shape (B,).

  S1 = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1) (texture), S2 = (2 cov_xy + c2) /
  (var_x + var_y + c2) (structure), biased statistics over (H, W) per channel in float32 (float64
  for float64 features), the covariance in the two-pass form (module docstring). A level with one
  channel (an edge map, see the module docstring) broadcasts against its three weights.
  """
  alphas, betas = dists_level_weights(alpha, beta)
  texture = structure = 0.0
  for fx, fy, a, b in zip(feats_x, feats_y, alphas, betas):
    dtype = statistics_dtype(fx, fy)
    fx, fy = fx.astype(dtype), fy.astype(dtype)
    mx, my = fx.mean(axis=(1, 2)), fy.mean(axis=(1, 2))
    s1 = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
    dx, dy = fx - mx[:, None, None], fy - my[:, None, None]
    var_x, var_y = jnp.square(dx).mean(axis=(1, 2)), jnp.square(dy).mean(axis=(1, 2))
    cov = (dx * dy).mean(axis=(1, 2))  # = E[xy] - E[x]E[y], see the module docstring
    s2 = (2 * cov + c2) / (var_x + var_y + c2)
    texture = texture + (a * s1).sum(axis=-1)
    structure = structure + (b * s2).sum(axis=-1)
  return 1.0 - (texture + structure)


def dists_distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array, *,
                   dtype: Any = jnp.float32) -> jax.Array:
  """Per-sample DISTS (B,) between NHWC images in [0, 1] (``DISTS_pt.DISTS()(x, y)``).

  Args:
    params: the perceptual param tree (:func:`sr_jax.pretrained.load_perceptual`); uses ``'vgg16'``
      and ``'dists'`` (``{'alpha': (1475,), 'beta': (1475,)}``).
    x, y: (B, H, W, 3) images in [0, 1]; both are differentiable. At H, W >= 32 relu5_3 (H / 16)
      has more than one position (on one, its structure term is the constant 1).
    dtype: backbone compute dtype (statistics stay float32).
  """
  batch = x.shape[0]
  features = dists_vgg_features(params['vgg16'], jnp.concatenate([x, y.astype(x.dtype)], axis=0),
                                dtype=dtype)
  weights = jax.lax.stop_gradient(params['dists'])
  return dists_score_from_weighted_features([f[:batch] for f in features],
                                            [f[batch:] for f in features],
                                            weights['alpha'], weights['beta'])


def dists_loss(params: Mapping[str, Any], x: jax.Array, y: jax.Array, *,
               dtype: Any = jnp.float32) -> jax.Array:
  """:func:`dists_distance` averaged over the batch (``batch_average=True``)."""
  return jnp.mean(dists_distance(params, x, y, dtype=dtype))


def sobel_edge_magnitude(images: jax.Array) -> jax.Array:
  """The Sobel operator S of TUDSR Eq. 5 (OMGSR OC-EA-DISTS choices, module docstring).

  ``sqrt((Gx * g)^2 + (Gy * g)^2 + 1e-6)`` with ``g`` the channel mean of NHWC ``images``, ``*`` a
  cross-correlation with zero padding 1. Returns (B, H, W, 1) float32 (float64 for float64 input).
  """
  gray = images.astype(statistics_dtype(images)).mean(axis=-1, keepdims=True)
  gx = np.asarray(SOBEL_GX)
  kernel = jnp.asarray(np.stack([gx, gx.T], axis=-1)[:, :, None, :], gray.dtype)  # HWIO (3, 3, 1, 2)
  grad = jax.lax.conv_general_dilated(
      gray, kernel, window_strides=(1, 1), padding=((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
  return jnp.sqrt(jnp.sum(jnp.square(grad), axis=-1, keepdims=True) + SOBEL_EPS)


def ea_dists_distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array, *,
                      dtype: Any = jnp.float32) -> jax.Array:
  """TUDSR Eq. 5 per sample: ``dists(x, y) + dists(S(x), S(y))``, shape (B,).

  ``S`` is :func:`sobel_edge_magnitude`, repeated to 3 channels (module docstring). Images and edge
  maps go through the backbone in one batch. Args as :func:`dists_distance`.
  """
  batch = x.shape[0]
  edges = lambda images: jnp.repeat(sobel_edge_magnitude(images), 3, axis=-1)
  x = x.astype(statistics_dtype(x))
  y = y.astype(x.dtype)
  both = dists_distance(params, jnp.concatenate([x, edges(x)], axis=0),
                        jnp.concatenate([y, edges(y)], axis=0), dtype=dtype)
  return both[:batch] + both[batch:]


def ea_dists_loss(params: Mapping[str, Any], x: jax.Array, y: jax.Array, *,
                  dtype: Any = jnp.float32) -> jax.Array:
  """TUDSR's ``L_ea-dists`` (Eq. 5, weighted by lambda_1 in Eq. 8 by the caller): the batch mean of
  :func:`ea_dists_distance`."""
  return jnp.mean(ea_dists_distance(params, x, y, dtype=dtype))
