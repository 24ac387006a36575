"""torchvision VGG16 and AlexNet ``features`` in Flax linen (NHWC): the backbones of LPIPS and DISTS.

Only the convolutional ``features`` part exists (no ``avgpool`` / ``classifier``): that is all that
LPIPS (``lpips`` 0.1.4 ``pretrained_networks.py``) and DISTS (``DISTS_pytorch/DISTS_pt.py``) use.
The layout is torchvision's ``features`` Sequential, and every conv is named after its index there,
so torch key ``features.0.weight`` is Flax path ``('features_0', 'kernel')`` and a torchvision state
dict converts with :func:`sr_jax.weights.convert_state_dict` (``classifier.*`` keys dropped):

* VGG16 (configuration "D"): 13 convs 3x3 / pad 1, each followed by ReLU, at indices 0, 2, 5, 7,
  10, 12, 14, 17, 19, 21, 24, 26, 28; 2x2 / stride 2 max-pools at 4, 9, 16, 23, 30.
* AlexNet: conv 11x11 / stride 4 / pad 2 (index 0), max-pool 3 / 2 (2), conv 5x5 / pad 2 (3),
  max-pool (5), convs 3x3 / pad 1 (6, 8, 10), max-pool (12); a ReLU after every conv.

Both models return the ReLU outputs the perceptual losses compare (the final max-pools, 30 and 12,
feed only the classifier and are not computed):

* ``VGG16`` -> relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS' slices 0-3, 4-8, 9-15, 16-22,
  23-29). With ``downsample='l2'`` the four max-pools between them are replaced by DISTS' L2 pooling
  (:func:`l2_pool`), as ``DISTS_pt.DISTS`` builds its ``stage1`` ... ``stage5``.
* ``AlexNet`` -> relu1 ... relu5 (LPIPS' slices 0-1, 2-4, 5-7, 8-9, 10-11).

torchvision's max-pools floor the output size (``ceil_mode=False``), which is ``padding='VALID'``.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.models.layers import Conv

Dtype = Any

# torchvision features index of every VGG16 conv, grouped by the stage whose last ReLU is returned.
VGG16_STAGE_CONVS: tuple[tuple[int, ...], ...] = (
    (0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CONV_INDICES = tuple(i for stage in VGG16_STAGE_CONVS for i in stage)
VGG16_STAGE_CHANNELS = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

# AlexNet convs: (features index, out channels, kernel size, stride, padding), one per returned ReLU.
ALEXNET_CONVS: tuple[tuple[int, int, int, int, int], ...] = (
    (0, 64, 11, 4, 2), (3, 192, 5, 1, 2), (6, 384, 3, 1, 1), (8, 256, 3, 1, 1), (10, 256, 3, 1, 1))
ALEXNET_CONV_INDICES = tuple(conv[0] for conv in ALEXNET_CONVS)
ALEXNET_STAGE_CHANNELS = tuple(conv[1] for conv in ALEXNET_CONVS)
# Stages whose conv is preceded by a 3x3 / stride 2 max-pool (features indices 2 and 5).
ALEXNET_POOLED_STAGES = (1, 2)


def statistics_dtype(*values: Any) -> jnp.dtype:
  """The dtype the perceptual losses pool, normalise and average in: float32, or float64 when an
  input is float64 (low-precision backbone outputs are widened; float64 runs stay float64)."""
  return jnp.promote_types(jnp.result_type(*values), jnp.float32)


def l2_pool_filter() -> np.ndarray:
  """DISTS L2pooling's filter: ``a = hanning(5)[1:-1] = [0.5, 1, 0.5]``, ``a a^T / sum(a a^T)`` (3x3)."""
  a = np.hanning(5)[1:-1]
  g = a[:, None] * a[None, :]
  return (g / g.sum()).astype(np.float32)


def l2_pool(x: jax.Array, stride: int = 2) -> jax.Array:
  """DISTS L2 pooling (``DISTS_pt.L2pooling``): ``sqrt(conv2d(x^2, g) + 1e-12)``, depthwise.

  ``g`` is :func:`l2_pool_filter`, zero padding 1 (``(filter_size - 2) // 2`` for DISTS' filter size
  5), stride ``stride`` (2 replaces VGG's max-pools). NHWC in; computed and returned in
  :func:`statistics_dtype` (float32 for float32 / bfloat16 input).
  """
  x = x.astype(statistics_dtype(x))
  channels = x.shape[-1]
  kernel = jnp.tile(jnp.asarray(l2_pool_filter(), x.dtype)[:, :, None, None], (1, 1, 1, channels))
  out = jax.lax.conv_general_dilated(
      jnp.square(x), kernel, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels,
      precision=jax.lax.Precision.HIGHEST)
  return jnp.sqrt(out + 1e-12)


def _max_pool(x: jax.Array, window: int) -> jax.Array:
  """torchvision ``MaxPool2d(window, stride=2)`` (floor mode)."""
  return nn.max_pool(x, (window, window), strides=(2, 2), padding='VALID')


class VGG16(nn.Module):
  """torchvision ``vgg16().features`` up to relu5_3; ``__call__`` returns the five stage outputs.

  ``apply({'params': p}, x, downsample='max')`` takes NHWC input already normalised as the caller's
  metric wants (LPIPS' ScalingLayer, DISTS' ImageNet mean/std) and returns
  ``[relu1_2, relu2_2, relu3_3, relu4_3, relu5_3]`` (channels :data:`VGG16_STAGE_CHANNELS`) in
  ``dtype``. ``downsample='l2'`` puts :func:`l2_pool` (stride 2) where the max-pools were (DISTS).
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, downsample: str = 'max') -> list[jax.Array]:
    if downsample not in ('max', 'l2'):
      raise ValueError(f"VGG16 downsample must be 'max' or 'l2', got {downsample!r}")
    conv = functools.partial(Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                             param_dtype=self.param_dtype)
    h = x.astype(self.dtype)
    stages = []
    for stage, (indices, channels) in enumerate(zip(VGG16_STAGE_CONVS, VGG16_STAGE_CHANNELS)):
      if stage > 0:
        h = _max_pool(h, 2) if downsample == 'max' else l2_pool(h).astype(self.dtype)
      for index in indices:
        h = nn.relu(conv(channels, name=f'features_{index}')(h))
      stages.append(h)
    return stages

  def dummy_inputs(self) -> jax.Array:
    """One 32x32 RGB image (NHWC): large enough for every stage (the last one is 2x2)."""
    return jnp.zeros((1, 32, 32, 3), self.dtype)


class AlexNet(nn.Module):
  """torchvision ``alexnet().features`` up to relu5; ``__call__`` returns ``[relu1, ..., relu5]``.

  Input: NHWC, normalised by the caller (LPIPS' ScalingLayer). Outputs in ``dtype``, channels
  :data:`ALEXNET_STAGE_CHANNELS`.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    h = x.astype(self.dtype)
    stages = []
    for stage, (index, channels, kernel, stride, pad) in enumerate(ALEXNET_CONVS):
      if stage in ALEXNET_POOLED_STAGES:
        h = _max_pool(h, 3)
      h = Conv(channels, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
               dtype=self.dtype, param_dtype=self.param_dtype, name=f'features_{index}')(h)
      h = nn.relu(h)
      stages.append(h)
    return stages

  def dummy_inputs(self) -> jax.Array:
    """One 64x64 RGB image (NHWC): relu5 is then 3x3."""
    return jnp.zeros((1, 64, 64, 3), self.dtype)

