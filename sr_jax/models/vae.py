"""diffusers ``AutoencoderKL`` (the Stable Diffusion VAE) in Flax linen, NHWC.

Param tree (top level, as the diffusers state dict): ``encoder``, ``quant_conv``, ``decoder``,
``post_quant_conv``. ``parts`` builds only some of them: training uses a LoRA'd encoder and a frozen
decoder as two separate models over the same checkpoint::

  vae = AutoencoderKL.from_config(config)                            # both halves
  encoder = AutoencoderKL.from_config(config, parts=('encoder',))   # encoder + quant_conv only
  decoder = AutoencoderKL.from_config(config, parts=('decoder',))   # post_quant_conv + decoder only
  mean, logvar = encoder.apply({'params': p_enc}, images, method='encode')
  images = decoder.apply({'params': p_dec}, latents, method='decode')

``encode``/``decode`` also work on the full model with the full tree, and a part's params are the
matching subtrees of the full tree. The latent ``scaling_factor`` is not applied here: callers read
``config['scaling_factor']``.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from sr_jax.models.layers import (Attention, Conv, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D,
                                  get_activation, maybe_remat)

Dtype = Any
_log = logging.getLogger(__name__)

VAE_EPS = 1e-6  # diffusers hard-codes this epsilon for every norm of the VAE
ENCODER_PARAMS = ('encoder', 'quant_conv')
DECODER_PARAMS = ('post_quant_conv', 'decoder')

# Keys that describe latents for callers (scaling) or tiling, not the network.
_IGNORED_KEYS = frozenset({'sample_size', 'scaling_factor', 'shift_factor', 'latents_mean',
                           'latents_std', 'force_upcast'})
_DEFAULTS = {
    'in_channels': 3, 'out_channels': 3, 'down_block_types': ('DownEncoderBlock2D',),
    'up_block_types': ('UpDecoderBlock2D',), 'block_out_channels': (64,), 'layers_per_block': 1,
    'act_fn': 'silu', 'latent_channels': 4, 'norm_num_groups': 32, 'use_quant_conv': True,
    'use_post_quant_conv': True, 'mid_block_add_attention': True,
}


def split_vae_params(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """Full AutoencoderKL params -> (encoder [+ quant_conv], [post_quant_conv +] decoder); VAEs
  without quant convs (SD3, FLUX) have neither conv."""
  return ({k: params[k] for k in ENCODER_PARAMS if k in params},
          {k: params[k] for k in DECODER_PARAMS if k in params})


def parse_vae_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Validates a diffusers AutoencoderKL config and returns our constructor kwargs.

  Raises:
    ValueError: naming config features this implementation does not support.
  """
  unknown = [k for k in config if not k.startswith('_') and k not in _DEFAULTS
             and k not in _IGNORED_KEYS]
  if unknown:  # diffusers itself ignores keys its constructor does not take; so do we.
    _log.warning('VAE config: ignoring keys unknown to diffusers: %s', sorted(unknown))
  c = {k: config.get(k, v) for k, v in _DEFAULTS.items()}
  bad = [f'down block type {t!r}' for t in c['down_block_types'] if t != 'DownEncoderBlock2D']
  bad += [f'up block type {t!r}' for t in c['up_block_types'] if t != 'UpDecoderBlock2D']
  n = len(c['block_out_channels'])
  if len(c['down_block_types']) != n or len(c['up_block_types']) != n:
    bad.append(f"{len(c['down_block_types'])} down / {len(c['up_block_types'])} up blocks for "
               f'{n} block_out_channels')
  if bad:
    raise ValueError('VAE config uses features sr_jax does not implement: ' + ', '.join(bad))
  get_activation(c['act_fn'])  # raises for unsupported activations
  return dict(
      in_channels=c['in_channels'], out_channels=c['out_channels'],
      block_out_channels=tuple(c['block_out_channels']), layers_per_block=c['layers_per_block'],
      act_fn=c['act_fn'], latent_channels=c['latent_channels'], norm_num_groups=c['norm_num_groups'],
      use_quant_conv=bool(c['use_quant_conv']), use_post_quant_conv=bool(c['use_post_quant_conv']),
      mid_block_add_attention=bool(c['mid_block_add_attention']))


class _VAEModule(nn.Module):
  """Attributes and helpers shared by every VAE module (all fields have defaults so subclasses
  can add their own)."""
  norm_num_groups: int = 32
  act_fn: str = 'silu'
  remat: bool = False  # rematerialise each ResNet block and the attention (training)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _shared(self) -> dict[str, Any]:
    return dict(norm_num_groups=self.norm_num_groups, act_fn=self.act_fn, remat=self.remat,
                dtype=self.dtype, param_dtype=self.param_dtype)

  def _resnet(self, out_channels: int, name: str) -> ResnetBlock2D:
    return maybe_remat(ResnetBlock2D, self.remat)(
        out_channels, groups=self.norm_num_groups, eps=VAE_EPS, act_fn=self.act_fn, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)

  def _conv(self, features: int, name: str | None, kernel: int = 3) -> nn.Conv:
    pad = (kernel - 1) // 2
    return Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

  def _norm_act(self, x: jax.Array, name: str) -> jax.Array:
    x = GroupNorm(num_groups=self.norm_num_groups, epsilon=VAE_EPS, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=name)(x)
    return get_activation(self.act_fn)(x)


class DownEncoderBlock2D(_VAEModule):
  """diffusers ``DownEncoderBlock2D``: resnets, then a stride-2 conv padded (0, 1, 0, 1)."""
  out_channels: int = 0
  num_layers: int = 2
  add_downsample: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = self._resnet(self.out_channels, f'resnets_{i}')(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='downsamplers_0')(x)
    return x


class UpDecoderBlock2D(_VAEModule):
  """diffusers ``UpDecoderBlock2D``: resnets, then nearest x2 upsampling and a 3x3 conv."""
  out_channels: int = 0
  num_layers: int = 3
  add_upsample: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = self._resnet(self.out_channels, f'resnets_{i}')(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='upsamplers_0')(x)
    return x


class UNetMidBlock2D(_VAEModule):
  """diffusers ``UNetMidBlock2D`` of the VAE: resnet, then (single-head self-attention, resnet)."""
  add_attention: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    x = self._resnet(channels, 'resnets_0')(x)
    if self.add_attention:
      # diffusers: heads = channels // attention_head_dim, with attention_head_dim = channels.
      attention = maybe_remat(Attention, self.remat)
      x = attention(1, channels, qkv_bias=True, norm_num_groups=self.norm_num_groups, eps=VAE_EPS,
                    residual_connection=True, dtype=self.dtype, param_dtype=self.param_dtype,
                    name='attentions_0')(x)
    return self._resnet(channels, 'resnets_1')(x)


class Encoder(_VAEModule):
  """diffusers VAE ``Encoder``: conv_in, DownEncoderBlock2Ds, mid block, GroupNorm-SiLU-conv_out to
  ``out_channels`` (2 * latent channels: mean and log-variance)."""
  block_out_channels: tuple[int, ...] = (64,)
  out_channels: int = 8
  layers_per_block: int = 2
  mid_block_add_attention: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = self.block_out_channels
    x = self._conv(channels[0], 'conv_in')(x.astype(self.dtype))
    for i, ch in enumerate(channels):
      x = DownEncoderBlock2D(out_channels=ch, num_layers=self.layers_per_block,
                             add_downsample=i < len(channels) - 1, name=f'down_blocks_{i}',
                             **self._shared())(x)
    x = UNetMidBlock2D(add_attention=self.mid_block_add_attention, name='mid_block',
                       **self._shared())(x)
    return self._conv(self.out_channels, 'conv_out')(self._norm_act(x, 'conv_norm_out'))


class Decoder(_VAEModule):
  """diffusers VAE ``Decoder``: conv_in, mid block, UpDecoderBlock2Ds (``layers_per_block + 1``
  resnets each), GroupNorm-SiLU-conv_out to ``out_channels``."""
  block_out_channels: tuple[int, ...] = (64,)
  out_channels: int = 3
  layers_per_block: int = 2
  mid_block_add_attention: bool = True

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    channels = self.block_out_channels[::-1]
    x = self._conv(channels[0], 'conv_in')(z.astype(self.dtype))
    x = UNetMidBlock2D(add_attention=self.mid_block_add_attention, name='mid_block',
                       **self._shared())(x)
    for i, ch in enumerate(channels):
      x = UpDecoderBlock2D(out_channels=ch, num_layers=self.layers_per_block + 1,
                           add_upsample=i < len(channels) - 1, name=f'up_blocks_{i}',
                           **self._shared())(x)
    return self._conv(self.out_channels, 'conv_out')(self._norm_act(x, 'conv_norm_out'))


class AutoencoderKL(_VAEModule):
  """diffusers ``AutoencoderKL`` (NHWC). Build with :meth:`from_config`.

  Methods: ``encode(images) -> (mean, logvar)`` with logvar clamped to [-30, 20] as diffusers'
  ``DiagonalGaussianDistribution`` does; ``decode(latents) -> images``; ``__call__(x)`` encodes and
  decodes the mean (for ``parts=('decoder',)`` it only decodes ``x``). ``parts`` selects which halves
  exist: ``'encoder'`` owns params ``encoder`` + ``quant_conv``, ``'decoder'`` owns
  ``post_quant_conv`` + ``decoder``.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  latent_channels: int = 4
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  parts: tuple[str, ...] = ('encoder', 'decoder')

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **kwargs) -> 'AutoencoderKL':
    """Builds the model from a diffusers ``config.json`` dict; ``kwargs`` add e.g. ``dtype``, ``parts``."""
    if 'parts' in kwargs:
      kwargs['parts'] = tuple(kwargs['parts'])
    return cls(**parse_vae_config(config), **kwargs)

  def setup(self):
    unknown = set(self.parts) - {'encoder', 'decoder'}
    if unknown or not self.parts:
      raise ValueError(f"AutoencoderKL parts must be a non-empty subset of ('encoder', 'decoder'), "
                       f'got {self.parts!r}')
    common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                  mid_block_add_attention=self.mid_block_add_attention, **self._shared())
    if 'encoder' in self.parts:
      self.encoder = Encoder(out_channels=2 * self.latent_channels, **common)
      if self.use_quant_conv:
        self.quant_conv = self._conv(2 * self.latent_channels, None, kernel=1)
    if 'decoder' in self.parts:
      self.decoder = Decoder(out_channels=self.out_channels, **common)
      if self.use_post_quant_conv:
        self.post_quant_conv = self._conv(self.latent_channels, None, kernel=1)

  def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array]:
    """A small input for ``init``: an image, or latents when only the decoder is built."""
    side = 2 ** (len(self.block_out_channels) - 1)
    if 'encoder' in self.parts:
      return (jnp.zeros((batch, side, side, self.in_channels), jnp.float32),)
    return (jnp.zeros((batch, 1, 1, self.latent_channels), jnp.float32),)

  def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """NHWC images (typically in [-1, 1]) -> latent posterior ``(mean, logvar)``, each (B, h, w, C_lat)."""
    if 'encoder' not in self.parts:
      raise ValueError("this AutoencoderKL was built without 'encoder' in parts")
    moments = self.encoder(images)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents: jax.Array) -> jax.Array:
    """NHWC latents (unscaled: divide by ``scaling_factor`` first) -> images (B, H, W, C_out)."""
    if 'decoder' not in self.parts:
      raise ValueError("this AutoencoderKL was built without 'decoder' in parts")
    z = latents.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: jax.Array) -> jax.Array:
    if 'encoder' in self.parts:
      x, _ = self.encode(x)
    if 'decoder' in self.parts:
      x = self.decode(x)
    return x
