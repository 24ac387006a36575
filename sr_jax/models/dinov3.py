"""DINOv3-ConvNeXt backbone in Flax linen (NHWC), matching `transformers.DINOv3ConvNextModel`.

The OMGSR discriminator and the DINOv3-ConvNeXt DISTS loss (OMGSR ``dinov3_gan/``) use this frozen
backbone on images in [-1, 1] mapped by :func:`imagenet_normalize` (no resize), and only the
feature maps of the first 3 stages, where stage i is ``downsample_layers`` followed by the ConvNeXt
blocks of stage i with no extra norm. The DISTS loss feeds an L2-pooled map of stage i into stage
i+1, hence :meth:`DINOv3ConvNextModel.stage`.

Param names mirror the keys that transformers' ``save_pretrained`` writes (and the hub files use):
``stages.N.downsample_layers.K.*``, ``stages.N.layers.K.{gamma, depthwise_conv, layer_norm,
pointwise_conv1, pointwise_conv2}.*`` and the final ``layer_norm.*`` (kept so that the param tree and
count match transformers; the stage outputs never use it). See `sr_jax/weights.py`.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sr_jax.models.layers import Conv, gelu_exact, maybe_remat

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ConvNeXt (and the DINOv3 release) initialise convs and linears with a truncated normal of std 0.02.
_kernel_init = nn.initializers.truncated_normal(0.02)


def imagenet_normalize(images: jax.Array) -> jax.Array:
  """Maps NHWC images in [-1, 1] to ImageNet-normalised backbone input (OMGSR ``dinov3_gan/``).

  x -> x * 0.5 + 0.5 (to [0, 1]), then (x - mean) / std per channel. No resize.
  """
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  x = images.astype(jnp.float32) * 0.5 + 0.5
  return ((x - mean) / std).astype(images.dtype)


class DINOv3ConvNextLayer(nn.Module):
  """One ConvNeXt block: depthwise 7x7 conv, LayerNorm, Linear 4C, exact GELU, Linear C, layer-scale
  ``gamma``, residual (drop-path is the identity at eval, the only mode we run)."""
  channels: int
  layer_norm_eps: float = 1e-6
  layer_scale_init_value: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c = self.channels
    self.depthwise_conv = Conv(c, (7, 7), padding=3, feature_group_count=c, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_init=_kernel_init)
    # LayerNorm runs in fp32 even under bf16 compute; its output is cast back to `dtype`.
    self.layer_norm = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32,
                                   param_dtype=self.param_dtype)
    self.pointwise_conv1 = nn.Dense(4 * c, dtype=self.dtype, param_dtype=self.param_dtype,
                                    kernel_init=_kernel_init)
    self.pointwise_conv2 = nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype,
                                    kernel_init=_kernel_init)
    self.gamma = self.param('gamma', nn.initializers.constant(self.layer_scale_init_value), (c,),
                            self.param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    residual = x
    h = self.depthwise_conv(x)
    h = self.layer_norm(h).astype(self.dtype)
    h = self.pointwise_conv1(h)
    h = gelu_exact(h)  # transformers' "gelu" is the exact erf form
    h = self.pointwise_conv2(h)
    h = h * self.gamma.astype(self.dtype)
    return residual + h


class DINOv3ConvNextStage(nn.Module):
  """Downsampling (stage 0: conv 4x4/4 then LayerNorm; later: LayerNorm then conv 2x2/2) + blocks."""
  stage_index: int
  out_channels: int
  depth: int
  layer_norm_eps: float = 1e-6
  layer_scale_init_value: float = 1e-6
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    norm = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype)
    patch = 4 if self.stage_index == 0 else 2
    conv = Conv(self.out_channels, (patch, patch), strides=patch, padding='VALID',
                   dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_kernel_init)
    # The order of this list is the torch `downsample_layers` index (0, 1).
    self.downsample_layers = [conv, norm] if self.stage_index == 0 else [norm, conv]
    layer = maybe_remat(DINOv3ConvNextLayer, self.remat)
    self.layers = [
        layer(self.out_channels, self.layer_norm_eps, self.layer_scale_init_value,
              dtype=self.dtype, param_dtype=self.param_dtype)
        for _ in range(self.depth)
    ]

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    for layer in self.downsample_layers:
      x = layer(x).astype(self.dtype)
    for layer in self.layers:
      x = layer(x)
    return x


class DINOv3ConvNextModel(nn.Module):
  """DINOv3-ConvNeXt backbone returning the NHWC output of each stage.

  ``apply({'params': p}, pixel_values, num_stages=None)`` takes ImageNet-normalised NHWC images
  (transformers' ``pixel_values`` transposed; see :func:`imagenet_normalize`) and returns the list
  of the first ``num_stages`` stage outputs (all stages when None), equal to transformers'
  ``hidden_states[1:]`` transposed to NHWC. Later stages are not computed.
  ``apply({'params': p}, x, i, method='stage')`` runs stage ``i`` alone.
  """
  hidden_sizes: Sequence[int] = (96, 192, 384, 768)
  depths: Sequence[int] = (3, 3, 9, 3)
  num_channels: int = 3
  layer_norm_eps: float = 1e-6
  layer_scale_init_value: float = 1e-6
  remat: bool = False  # rematerialise each ConvNeXt block (training through the frozen backbone)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **kwargs) -> 'DINOv3ConvNextModel':
    """Builds the model from a transformers ``DINOv3ConvNextConfig`` ``config.json`` dict.

    ``kwargs`` (e.g. ``dtype``, ``param_dtype``) override the config. ``drop_path_rate`` is ignored
    (drop-path is the identity at eval).
    """
    act = config.get('hidden_act', 'gelu')
    if act != 'gelu':
      raise ValueError(f'DINOv3-ConvNeXt: only hidden_act="gelu" (exact) is supported, got {act!r}')
    fields = dict(
        hidden_sizes=tuple(config.get('hidden_sizes') or (96, 192, 384, 768)),
        depths=tuple(config.get('depths') or (3, 3, 9, 3)),
        num_channels=int(config.get('num_channels', 3)),
        layer_norm_eps=float(config.get('layer_norm_eps', 1e-6)),
        layer_scale_init_value=float(config.get('layer_scale_init_value', 1e-6)),
    )
    if len(fields['hidden_sizes']) != len(fields['depths']):
      raise ValueError(f'hidden_sizes {fields["hidden_sizes"]} and depths {fields["depths"]} differ '
                       'in length')
    fields.update(kwargs)
    return cls(**fields)

  def setup(self):
    self.stages = [
        DINOv3ConvNextStage(i, size, depth, self.layer_norm_eps, self.layer_scale_init_value,
                            remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype)
        for i, (size, depth) in enumerate(zip(self.hidden_sizes, self.depths))
    ]
    # transformers' final norm over [pooled, patch tokens]; not part of any stage output, kept so the
    # checkpoint converts without special cases and the param count matches.
    self.layer_norm = nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32,
                                   param_dtype=self.param_dtype)

  def __call__(self, pixel_values: jax.Array, num_stages: int | None = None) -> list[jax.Array]:
    total = len(self.stages)
    num_stages = total if num_stages is None else num_stages
    if not 1 <= num_stages <= total:
      raise ValueError(f'num_stages must be in [1, {total}], got {num_stages}')
    if self.is_initializing():
      # Create every param (the tree must not depend on num_stages); init runs under jit/eval_shape.
      num_stages = total
      self.layer_norm(jnp.zeros((1, self.hidden_sizes[-1]), jnp.float32))
    outputs, x = [], pixel_values
    for stage in self.stages[:num_stages]:
      x = stage(x)
      outputs.append(x)
    return outputs

  def stage(self, x: jax.Array, index: int) -> jax.Array:
    """Applies stage ``index`` (its downsampling and blocks) alone to an NHWC input."""
    return self.stages[index](x)

  def dummy_inputs(self) -> jax.Array:
    """A 32x32 NHWC batch (the smallest size that survives all four downsamplings) for ``init``."""
    return jnp.zeros((1, 32, 32, self.num_channels), self.dtype)
