"""diffusers ``UNet2DConditionModel`` in Flax linen (NHWC): the Stable Diffusion 1.x/2.x denoiser.

Built from a diffusers ``config.json`` dict with :meth:`UNet2DConditionModel.from_config`; param names
mirror the PyTorch state-dict keys (``down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k``), so
`sr_jax.weights.convert_state_dict` loads a checkpoint mechanically::

  unet = UNet2DConditionModel.from_config(config)
  shapes = jax.eval_shape(unet.init, jax.random.key(0), *unet.dummy_inputs())['params']
  params = convert_state_dict(torch_state_dict_as_numpy, shapes)
  eps = unet.apply({'params': params}, latents_nhwc, timesteps, text_embeddings)

Supported: positional (sinusoidal) time embedding, CrossAttnDownBlock2D / DownBlock2D /
UNetMidBlock2DCrossAttn / CrossAttnUpBlock2D / UpBlock2D, linear or 1x1-conv transformer projections,
per-block head counts, several transformer layers per block (SDXL-style lists). Config features that
change the network and are not implemented (class or addition embeddings, dual or only cross attention,
other block types, ...) raise a ValueError naming them when set to a non-default value.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from sr_jax.models.layers import (Conv, Downsample2D, GroupNorm, ResnetBlock2D, TimestepEmbedding,
                                  Transformer2DModel, Upsample2D, conv_padding, get_activation,
                                  maybe_remat, timestep_embedding)

Dtype = Any
_log = logging.getLogger(__name__)

_DOWN_BLOCKS = ('CrossAttnDownBlock2D', 'DownBlock2D')
_UP_BLOCKS = ('CrossAttnUpBlock2D', 'UpBlock2D')
_MID_BLOCKS = ('UNetMidBlock2DCrossAttn', None)

# diffusers config keys that only describe the checkpoint or only affect block types we do not build.
_IGNORED_KEYS = frozenset({
    'sample_size', 'dropout', 'resnet_skip_time_act', 'resnet_out_scale_factor', 'cross_attention_norm',
    'addition_embed_type_num_heads',
})
# Keys whose non-default values select features we do not implement: key -> accepted values.
_UNSUPPORTED_UNLESS = {
    'only_cross_attention': (False,),
    'mid_block_only_cross_attention': (None, False),
    'dual_cross_attention': (False,),
    'encoder_hid_dim': (None,),
    'encoder_hid_dim_type': (None,),
    'class_embed_type': (None,),
    'addition_embed_type': (None,),
    'addition_time_embed_dim': (None,),
    'num_class_embeds': (None,),
    'projection_class_embeddings_input_dim': (None,),
    'class_embeddings_concat': (False,),
    'resnet_time_scale_shift': ('default',),
    'time_embedding_type': ('positional',),
    'time_cond_proj_dim': (None,),
    'attention_type': ('default',),
    'reverse_transformer_layers_per_block': (None,),
}
# Implemented keys and their diffusers defaults.
_DEFAULTS = {
    'in_channels': 4, 'out_channels': 4, 'center_input_sample': False, 'flip_sin_to_cos': True,
    'freq_shift': 0,
    'down_block_types': ('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                         'DownBlock2D'),
    'mid_block_type': 'UNetMidBlock2DCrossAttn',
    'up_block_types': ('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    'block_out_channels': (320, 640, 1280, 1280), 'layers_per_block': 2, 'downsample_padding': 1,
    'mid_block_scale_factor': 1.0, 'act_fn': 'silu', 'norm_num_groups': 32, 'norm_eps': 1e-5,
    'cross_attention_dim': 1280, 'transformer_layers_per_block': 1, 'attention_head_dim': 8,
    'num_attention_heads': None, 'use_linear_projection': False, 'upcast_attention': False,
    'time_embedding_dim': None, 'time_embedding_act_fn': None, 'timestep_post_act': None,
    'conv_in_kernel': 3, 'conv_out_kernel': 3,
}


def _per_block(value: Any, n: int, key: str) -> tuple:
  """An int (or None) broadcast to ``n`` blocks, or a list of length ``n``."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f'UNet config: {key} has {len(value)} entries for {n} down blocks')
    return tuple(value)
  return (value,) * n


def _strip_unet_res(block_type: str | None) -> str | None:
  # diffusers' get_down_block/get_up_block drop a leading 'UNetRes' from block type names.
  if block_type is not None and block_type.startswith('UNetRes'):
    return block_type[7:]
  return block_type


def parse_unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Validates a diffusers UNet2DConditionModel config and returns our constructor kwargs.

  Raises:
    ValueError: naming every config feature set to a value this implementation does not support.
  """
  unknown = [k for k in config
             if not k.startswith('_') and k not in _DEFAULTS and k not in _UNSUPPORTED_UNLESS
             and k not in _IGNORED_KEYS]
  if unknown:  # diffusers itself ignores keys its constructor does not take; so do we.
    _log.warning('UNet config: ignoring keys unknown to diffusers: %s', sorted(unknown))
  bad = [f'{k}={config[k]!r}' for k, ok in _UNSUPPORTED_UNLESS.items()
         if k in config and config[k] not in ok
         and not (isinstance(config[k], (list, tuple)) and all(v in ok for v in config[k]))]
  if config.get('dropout', 0.0):
    bad.append(f"dropout={config['dropout']!r}")
  c = {k: config.get(k, v) for k, v in _DEFAULTS.items()}
  down = tuple(_strip_unet_res(t) for t in c['down_block_types'])
  up = tuple(_strip_unet_res(t) for t in c['up_block_types'])
  bad += [f'down block type {t!r}' for t in down if t not in _DOWN_BLOCKS]
  bad += [f'up block type {t!r}' for t in up if t not in _UP_BLOCKS]
  if c['mid_block_type'] not in _MID_BLOCKS:
    bad.append(f"mid_block_type={c['mid_block_type']!r}")
  if c['norm_num_groups'] is None:
    bad.append('norm_num_groups=None')
  cross_dims = set(_per_block(c['cross_attention_dim'], len(down), 'cross_attention_dim'))
  if len(cross_dims) != 1:
    bad.append(f"cross_attention_dim={c['cross_attention_dim']!r} (one context width per UNet)")
  for name in ('act_fn', 'time_embedding_act_fn', 'timestep_post_act'):
    if c[name] is not None:
      get_activation(c[name])  # raises for unsupported activations
  if bad:
    raise ValueError('UNet config uses features sr_jax does not implement: ' + ', '.join(bad))
  n = len(down)
  if len(up) != n or len(c['block_out_channels']) != n:
    raise ValueError(f'UNet config: {n} down blocks, {len(up)} up blocks, '
                     f"{len(c['block_out_channels'])} block_out_channels")
  # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (historic misnomer).
  # upcast_attention needs no attribute: our attention softmax always runs in float32.
  heads = c['num_attention_heads'] or c['attention_head_dim']
  return dict(
      in_channels=c['in_channels'], out_channels=c['out_channels'],
      center_input_sample=bool(c['center_input_sample']), flip_sin_to_cos=bool(c['flip_sin_to_cos']),
      freq_shift=float(c['freq_shift']), down_block_types=down, mid_block_type=c['mid_block_type'],
      up_block_types=up, block_out_channels=tuple(c['block_out_channels']),
      layers_per_block=_per_block(c['layers_per_block'], n, 'layers_per_block'),
      transformer_layers_per_block=_per_block(c['transformer_layers_per_block'], n,
                                              'transformer_layers_per_block'),
      num_attention_heads=_per_block(heads, n, 'attention_head_dim'),
      cross_attention_dim=cross_dims.pop(), downsample_padding=c['downsample_padding'],
      mid_block_scale_factor=float(c['mid_block_scale_factor']), act_fn=c['act_fn'],
      norm_num_groups=c['norm_num_groups'], norm_eps=float(c['norm_eps']),
      use_linear_projection=bool(c['use_linear_projection']),
      time_embedding_dim=c['time_embedding_dim'], time_embedding_act_fn=c['time_embedding_act_fn'],
      timestep_post_act=c['timestep_post_act'], conv_in_kernel=c['conv_in_kernel'],
      conv_out_kernel=c['conv_out_kernel'])


class _BlockMixin:
  """Shared constructors of the ResNet and transformer children of a UNet block."""

  def _resnet(self, out_channels: int, name: str, scale: float = 1.0) -> ResnetBlock2D:
    return maybe_remat(ResnetBlock2D, self.remat)(
        out_channels, groups=self.norm_num_groups, eps=self.norm_eps, act_fn=self.act_fn,
        output_scale_factor=scale, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _transformer(self, channels: int, name: str) -> Transformer2DModel:
    return Transformer2DModel(self.num_heads, channels // self.num_heads,
                              num_layers=self.transformer_layers, norm_num_groups=self.norm_num_groups,
                              use_linear_projection=self.use_linear_projection, remat=self.remat,
                              dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DownBlock(nn.Module, _BlockMixin):
  """diffusers ``CrossAttnDownBlock2D`` (``cross_attention=True``) or ``DownBlock2D``.

  Returns the output and the skip tensors: one per ResNet (+transformer) layer and one after the
  downsampler.
  """
  out_channels: int
  num_layers: int
  cross_attention: bool
  add_downsample: bool
  num_heads: int = 1
  transformer_layers: int = 1
  use_linear_projection: bool = False
  downsample_padding: int = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  act_fn: str = 'silu'
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    skips = []
    for i in range(self.num_layers):
      x = self._resnet(self.out_channels, f'resnets_{i}')(x, temb)
      if self.cross_attention:
        x = self._transformer(self.out_channels, f'attentions_{i}')(x, context)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, padding=self.downsample_padding, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='downsamplers_0')(x)
      skips.append(x)
    return x, skips


class MidBlockCrossAttn(nn.Module, _BlockMixin):
  """diffusers ``UNetMidBlock2DCrossAttn``: resnet, then (transformer, resnet)."""
  num_heads: int
  transformer_layers: int = 1
  use_linear_projection: bool = False
  output_scale_factor: float = 1.0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  act_fn: str = 'silu'
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context):
    channels = x.shape[-1]
    x = self._resnet(channels, 'resnets_0', self.output_scale_factor)(x, temb)
    x = self._transformer(channels, 'attentions_0')(x, context)
    return self._resnet(channels, 'resnets_1', self.output_scale_factor)(x, temb)


class UpBlock(nn.Module, _BlockMixin):
  """diffusers ``CrossAttnUpBlock2D`` (``cross_attention=True``) or ``UpBlock2D``.

  Each layer concatenates the last remaining skip tensor on channels before its ResNet; the
  upsampler goes to ``upsample_size`` (the next skip's spatial size) as diffusers does for inputs
  whose size is not a multiple of the total downsampling.
  """
  out_channels: int
  num_layers: int
  cross_attention: bool
  add_upsample: bool
  num_heads: int = 1
  transformer_layers: int = 1
  use_linear_projection: bool = False
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  act_fn: str = 'silu'
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips: Sequence[jax.Array], temb, context, upsample_size=None):
    skips = list(skips)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
      x = self._resnet(self.out_channels, f'resnets_{i}')(x, temb)
      if self.cross_attention:
        x = self._transformer(self.out_channels, f'attentions_{i}')(x, context)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='upsamplers_0')(x, upsample_size)
    return x


class UNet2DConditionModel(nn.Module):
  """diffusers ``UNet2DConditionModel`` (NHWC): ``eps = unet(sample, timesteps, context)``.

  Build it with :meth:`from_config`; attribute meanings follow the diffusers config keys, with
  per-block values already expanded to tuples and ``num_attention_heads`` resolved the diffusers way.
  """
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  down_block_types: tuple[str, ...] = _DEFAULTS['down_block_types']
  mid_block_type: str | None = 'UNetMidBlock2DCrossAttn'
  up_block_types: tuple[str, ...] = _DEFAULTS['up_block_types']
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
  transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
  num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
  cross_attention_dim: int = 1280
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = 'silu'
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  use_linear_projection: bool = False
  time_embedding_dim: int | None = None
  time_embedding_act_fn: str | None = None
  timestep_post_act: str | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  remat: bool = False                   # rematerialise each ResNet and transformer block (training)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **kwargs) -> 'UNet2DConditionModel':
    """Builds the model from a diffusers ``config.json`` dict; ``kwargs`` add e.g. ``dtype``."""
    return cls(**parse_unet_config(config), **kwargs)

  def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Small (sample, timesteps, context) for ``init``: the smallest latent every level accepts."""
    side = 2 ** (len(self.block_out_channels) - 1)
    return (jnp.zeros((batch, side, side, self.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, 1, self.cross_attention_dim), jnp.float32))

  def _block_kwargs(self, i: int) -> dict[str, Any]:
    return dict(num_heads=self.num_attention_heads[i],
                use_linear_projection=self.use_linear_projection, norm_num_groups=self.norm_num_groups,
                norm_eps=self.norm_eps, act_fn=self.act_fn, remat=self.remat, dtype=self.dtype,
                param_dtype=self.param_dtype)

  def _time_embedding(self, timesteps: jax.Array, batch: int) -> jax.Array:
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
    t_emb = timestep_embedding(timesteps, self.block_out_channels[0],
                               flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
    emb = TimestepEmbedding(self.time_embedding_dim or 4 * self.block_out_channels[0],
                            act_fn=self.act_fn, post_act_fn=self.timestep_post_act, dtype=self.dtype,
                            param_dtype=self.param_dtype, name='time_embedding')(t_emb.astype(self.dtype))
    if self.time_embedding_act_fn is not None:
      emb = get_activation(self.time_embedding_act_fn)(emb)
    return emb

  @nn.compact
  def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array
               ) -> jax.Array:
    """Predicts the UNet output for NHWC ``sample`` (B, h, w, C_in).

    Args:
      sample: noisy latents, NHWC.
      timesteps: (B,) or a scalar (broadcast to the batch); may be fractional.
      encoder_hidden_states: context (B, L, cross_attention_dim), e.g. CLIP text embeddings.

    Returns:
      (B, h, w, out_channels) in the compute dtype.
    """
    n = len(self.block_out_channels)
    x = sample.astype(self.dtype)
    if self.center_input_sample:
      x = 2 * x - 1.0
    temb = self._time_embedding(timesteps, x.shape[0])
    context = encoder_hidden_states.astype(self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.block_out_channels[0], (self.conv_in_kernel,) * 2,
             padding=conv_padding(self.conv_in_kernel), name='conv_in')(x)

    skips = [x]
    for i, block_type in enumerate(self.down_block_types):
      x, block_skips = DownBlock(
          self.block_out_channels[i], self.layers_per_block[i],
          cross_attention=block_type == 'CrossAttnDownBlock2D', add_downsample=i < n - 1,
          transformer_layers=self.transformer_layers_per_block[i],
          downsample_padding=self.downsample_padding, name=f'down_blocks_{i}',
          **self._block_kwargs(i))(x, temb, context)
      skips += block_skips

    if self.mid_block_type is not None:
      x = MidBlockCrossAttn(transformer_layers=self.transformer_layers_per_block[-1],
                            output_scale_factor=self.mid_block_scale_factor, name='mid_block',
                            **self._block_kwargs(n - 1))(x, temb, context)

    for i, block_type in enumerate(self.up_block_types):
      level = n - 1 - i  # up block i mirrors down block `level`
      num_layers = self.layers_per_block[level] + 1
      block_skips, skips = skips[-num_layers:], skips[:-num_layers]
      upsample_size = skips[-1].shape[1:3] if i < n - 1 else None
      x = UpBlock(
          self.block_out_channels[level], num_layers,
          cross_attention=block_type == 'CrossAttnUpBlock2D', add_upsample=i < n - 1,
          transformer_layers=self.transformer_layers_per_block[level], name=f'up_blocks_{i}',
          **self._block_kwargs(level))(x, block_skips, temb, context, upsample_size)

    x = GroupNorm(num_groups=self.norm_num_groups, epsilon=self.norm_eps, dtype=self.dtype,
                  param_dtype=self.param_dtype, name='conv_norm_out')(x)
    x = get_activation(self.act_fn)(x)
    return conv(self.out_channels, (self.conv_out_kernel,) * 2,
                padding=conv_padding(self.conv_out_kernel), name='conv_out')(x)
