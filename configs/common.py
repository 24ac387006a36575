"""Config pieces every method shares: tiny random models and variant parsing.

Tiny models keep the real architectures (SD2.1-base UNet and VAE, DINOv3-ConvNeXt) at toy sizes, so
a method's tiny variant trains and evaluates on a CPU in minutes with no download
(``config.model.source = 'random'``: weights drawn from ``config.seed``, see
``sr_jax.methods.common.load_frozen``).
"""
from __future__ import annotations

from typing import Sequence

import ml_collections

# OMGSR's UNet LoRA targets (train_omgsr_s.py), also used by TUDSR (same author, not stated).
UNET_LORA_TARGETS = ('conv1', 'conv2', 'conv_in', 'conv_shortcut', 'conv', 'conv_out',
                     'to_q', 'to_k', 'to_v', 'to_out.0')
TINY_UNET = dict(
    block_out_channels=[32, 64], down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
    up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'], layers_per_block=1,
    attention_head_dim=[2, 4], cross_attention_dim=32, norm_num_groups=8,
    use_linear_projection=True, upcast_attention=True, sample_size=16)
TINY_VAE = dict(
    block_out_channels=[16, 32, 32], down_block_types=['DownEncoderBlock2D'] * 3,
    up_block_types=['UpDecoderBlock2D'] * 3, layers_per_block=1, latent_channels=4,
    norm_num_groups=8, sample_size=64, scaling_factor=0.18215)
TINY_DINOV3 = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], layer_scale_init_value=0.5)
# DINOv3-ViT at toy size: 9 blocks (TUDSR's D reads hidden states 3, 6, 9), patch 8 (64 px -> 8x8).
TINY_DINOV3_VIT = dict(
    model_type='dinov3_vit', patch_size=8, hidden_size=32, intermediate_size=64,
    num_hidden_layers=9, num_attention_heads=2, num_register_tokens=2, layerscale_value=0.5,
    hidden_act='gelu', layer_norm_eps=1e-5, rope_theta=100.0, use_gated_mlp=False,
    query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True,
    num_channels=3, image_size=64)
# SD2.1-base's DDPM schedule (scaled-linear betas), as in its scheduler_config.json.
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                    num_train_timesteps=1000, prediction_type='epsilon')


def use_tiny_sd_models(model: ml_collections.ConfigDict, prompt_length: int = 8) -> None:
  """Points ``config.model`` at random tiny SD models (UNet, VAE, DINOv3, scheduler), float32."""
  model.source = 'random'
  model.unet_config = TINY_UNET
  model.vae_config = TINY_VAE
  model.dinov3_config = TINY_DINOV3
  model.scheduler_config = SD_SCHEDULER
  model.prompt_length = prompt_length
  model.compute_dtype = 'float32'
  model.frozen_param_dtype = 'float32'


def check_variant(method: str, arg: str, variants: Sequence[str]) -> str:
  """``arg`` if it is one of ``variants``, else a ValueError listing them."""
  if arg not in variants:
    raise ValueError(f'unknown {method} config variant {arg!r}; choose one of '
                     f'{", ".join(repr(v) for v in variants)}')
  return arg
