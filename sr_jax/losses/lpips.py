"""LPIPS v0.1 (Zhang et al. 2018, Eq. 1) with VGG16 or AlexNet, exactly as PyPI ``lpips`` 0.1.4.

``lpips.LPIPS(net=..., version='0.1')`` in eval mode, called with ``normalize=True`` (images in
[0, 1]); we follow it step by step:

* inputs ``x in [0, 1]`` -> ``2 x - 1`` -> ScalingLayer ``(x - shift) / scale`` with shift
  ``[-.030, -.088, -.188]``, scale ``[.458, .448, .450]`` (:func:`lpips_scaling`);
* backbone features: VGG16 relu1_2 ... relu5_3 or AlexNet relu1 ... relu5 (:mod:`sr_jax.models.vgg`);
* each feature unit-normalised over channels, ``f / (sqrt(sum_c f^2) + 1e-10)``
  (:func:`unit_normalize_channels`), the two images' normalised features subtracted and squared;
* the learned 1x1 linear head of each layer (``lin<k>``: 1 output, no bias; its dropout is inactive in
  eval), then the spatial mean, then the sum over layers (:func:`lpips_from_features`).

Params: the tree returned by :func:`sr_jax.pretrained.load_perceptual`; ``net='vgg'`` reads its
``'vgg16'`` and ``'lpips_vgg'`` groups, ``net='alex'`` its ``'alexnet'`` and ``'lpips_alex'``. The heads'
param names mirror ``lpips``' state dict (``lin0.model.1.weight`` <-> ``lin0/model_1/kernel``,
:class:`LPIPSLinearHeads`), so ``weights/v0.1/{vgg,alex}.pth`` converts with
:func:`sr_jax.weights.convert_state_dict`.

All params are frozen (``stop_gradient``: no gradient of a weight is ever formed); gradients flow to
both images. Normalisation, differences and means run in float32 whatever the backbone dtype
(float64 if the inputs are: how the tests check the arithmetic itself).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sr_jax.models.layers import Conv
from sr_jax.models.vgg import (ALEXNET_STAGE_CHANNELS, VGG16_STAGE_CHANNELS, VGG16, AlexNet,
                               statistics_dtype)

LPIPS_SHIFT = (-.030, -.088, -.188)
LPIPS_SCALE = (.458, .448, .450)
LPIPS_EPS = 1e-10
# net name (lpips' spelling) -> (backbone class, backbone param group, head param group, channels).
LPIPS_NETS: dict[str, tuple[type[nn.Module], str, str, Sequence[int]]] = {
    'vgg': (VGG16, 'vgg16', 'lpips_vgg', VGG16_STAGE_CHANNELS),
    'alex': (AlexNet, 'alexnet', 'lpips_alex', ALEXNET_STAGE_CHANNELS),
}


class NetLinLayer(nn.Module):
  """``lpips.NetLinLayer`` in eval mode: ``model.0`` is dropout (inactive, no params), ``model.1`` a
  1x1 conv to one channel without bias."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv(1, (1, 1), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                name='model_1')(x)


class LPIPSLinearHeads(nn.Module):
  """The five ``lin<k>`` heads of ``lpips.LPIPS``; ``__call__`` maps the list of squared normalised
  feature differences to the list of per-layer (B, H_k, W_k, 1) maps."""
  channels: Sequence[int] = VGG16_STAGE_CHANNELS
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, diffs: Sequence[jax.Array]) -> list[jax.Array]:
    if len(diffs) != len(self.channels):
      raise ValueError(f'LPIPS heads take {len(self.channels)} layers, got {len(diffs)}')
    return [NetLinLayer(self.dtype, self.param_dtype, name=f'lin{k}')(d) for k, d in enumerate(diffs)]

  def dummy_inputs(self) -> tuple[list[jax.Array]]:
    """One 1x1 map per layer with that layer's channels."""
    return ([jnp.zeros((1, 1, 1, c), self.dtype) for c in self.channels],)


def lpips_heads(net: str) -> LPIPSLinearHeads:
  """The :class:`LPIPSLinearHeads` of ``net`` (``'vgg'`` or ``'alex'``), float32."""
  return LPIPSLinearHeads(channels=tuple(_net_spec(net)[3]))


def _net_spec(net: str) -> tuple[type[nn.Module], str, str, Sequence[int]]:
  if net not in LPIPS_NETS:
    raise ValueError(f"LPIPS net must be one of {sorted(LPIPS_NETS)} (lpips' names), got {net!r}")
  return LPIPS_NETS[net]


def lpips_scaling(images: jax.Array) -> jax.Array:
  """``lpips.ScalingLayer`` after ``normalize=True``: ``(2 x - 1 - shift) / scale``, float32 NHWC."""
  dtype = statistics_dtype(images)
  x = images.astype(dtype) * 2.0 - 1.0
  return (x - jnp.asarray(LPIPS_SHIFT, dtype)) / jnp.asarray(LPIPS_SCALE, dtype)


def unit_normalize_channels(features: jax.Array, eps: float = LPIPS_EPS) -> jax.Array:
  """``lpips.normalize_tensor``: ``f / (||f||_2 over channels + eps)`` (LPIPS Eq. 1's hat-y), float32."""
  f = features.astype(statistics_dtype(features))
  return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


def lpips_from_features(heads: LPIPSLinearHeads, head_params: Any, feats_x: Sequence[jax.Array],
                        feats_y: Sequence[jax.Array]) -> jax.Array:
  """LPIPS Eq. 1 on given features: ``sum_l mean_hw w_l . (hat-y_x^l - hat-y_y^l)^2``, shape (B,)."""
  diffs = [jnp.square(unit_normalize_channels(fx) - unit_normalize_channels(fy))
           for fx, fy in zip(feats_x, feats_y)]
  per_layer = heads.apply({'params': jax.lax.stop_gradient(head_params)}, diffs)
  return sum(jnp.mean(m.astype(statistics_dtype(m)), axis=(1, 2, 3)) for m in per_layer)


def lpips_distance(params: Mapping[str, Any], x: jax.Array, y: jax.Array, net: str = 'vgg', *,
                   dtype: Any = jnp.float32) -> jax.Array:
  """Per-sample LPIPS v0.1 distance (B,) between NHWC images in [0, 1] (LPIPS Eq. 1).

  Args:
    params: the perceptual param tree (:func:`sr_jax.pretrained.load_perceptual`); uses the backbone
      and head groups of ``net`` (:data:`LPIPS_NETS`).
    x, y: (B, H, W, 3) images in [0, 1]; both are differentiable.
    net: ``'vgg'`` or ``'alex'``.
    dtype: compute dtype of the backbone (statistics stay float32).
  """
  backbone_class, backbone_group, head_group, channels = _net_spec(net)
  backbone = backbone_class(dtype=dtype)
  batch = x.shape[0]
  inputs = lpips_scaling(jnp.concatenate([x, y.astype(x.dtype)], axis=0)).astype(dtype)
  features = backbone.apply({'params': jax.lax.stop_gradient(params[backbone_group])}, inputs)
  heads = LPIPSLinearHeads(channels=tuple(channels))
  return lpips_from_features(heads, params[head_group], [f[:batch] for f in features],
                             [f[batch:] for f in features])


def lpips_loss(params: Mapping[str, Any], x: jax.Array, y: jax.Array, net: str = 'vgg', *,
               dtype: Any = jnp.float32) -> jax.Array:
  """:func:`lpips_distance` averaged over the batch (a scalar loss)."""
  return jnp.mean(lpips_distance(params, x, y, net, dtype=dtype))
