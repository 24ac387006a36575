"""Tiny random diffusers models (PyTorch reference) and the real SD2.1-base configs, for tests.

Usage::

  folder = save_tiny_unet(tmp_path / 'unet', TINY_UNET_SD21)   # config.json + safetensors
  torch_unet = load_torch_unet(folder)
  unet, params = load_flax_unet(folder)                          # our Flax model + converted params

The builders randomise every GroupNorm/LayerNorm scale and bias (diffusers initialises them to 1/0),
so a mapping mistake in norm params cannot hide. Importing this module imports torch and diffusers.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import torch

from sr_jax.models.unet import UNet2DConditionModel
from sr_jax.models.vae import AutoencoderKL
from sr_jax.weights import convert_state_dict, find_weight_files, read_state_dict

WEIGHTS_STEM = 'diffusion_pytorch_model'

# stabilityai/stable-diffusion-2-1-base unet/config.json (865,910,724 parameters).
SD21_BASE_UNET_CONFIG: dict[str, Any] = {
    '_class_name': 'UNet2DConditionModel',
    '_diffusers_version': '0.10.0.dev0',
    'act_fn': 'silu',
    'attention_head_dim': [5, 10, 20, 20],
    'block_out_channels': [320, 640, 1280, 1280],
    'center_input_sample': False,
    'cross_attention_dim': 1024,
    'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                         'DownBlock2D'],
    'downsample_padding': 1,
    'dual_cross_attention': False,
    'flip_sin_to_cos': True,
    'freq_shift': 0,
    'in_channels': 4,
    'layers_per_block': 2,
    'mid_block_scale_factor': 1,
    'norm_eps': 1e-05,
    'norm_num_groups': 32,
    'num_class_embeds': None,
    'only_cross_attention': False,
    'out_channels': 4,
    'sample_size': 64,
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
    'use_linear_projection': True,
}

# stabilityai/stable-diffusion-2-1-base vae/config.json (83,653,863 parameters).
SD21_BASE_VAE_CONFIG: dict[str, Any] = {
    '_class_name': 'AutoencoderKL',
    '_diffusers_version': '0.10.0.dev0',
    'act_fn': 'silu',
    'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4,
    'in_channels': 3,
    'latent_channels': 4,
    'layers_per_block': 2,
    'norm_num_groups': 32,
    'out_channels': 3,
    'sample_size': 768,
    'up_block_types': ['UpDecoderBlock2D'] * 4,
}

# SD2.1-like: list "attention_head_dim" (= heads per block), linear projections, upcast attention,
# last level without attention (DownBlock2D / UpBlock2D), two resnets per down block.
TINY_UNET_SD21: dict[str, Any] = {
    'block_out_channels': [32, 64],
    'down_block_types': ['CrossAttnDownBlock2D', 'DownBlock2D'],
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D'],
    'layers_per_block': 2,
    'attention_head_dim': [2, 4],
    'cross_attention_dim': 48,
    'norm_num_groups': 8,
    'use_linear_projection': True,
    'upcast_attention': True,
    'sample_size': 16,
}

# SD1-like: int head count, 1x1-conv projections, attention at every level, two transformer layers in
# the inner level, the other sinusoid convention.
TINY_UNET_SD1: dict[str, Any] = {
    'block_out_channels': [32, 64],
    'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
    'up_block_types': ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
    'layers_per_block': 1,
    'attention_head_dim': 2,
    'transformer_layers_per_block': [1, 2],
    'cross_attention_dim': 40,
    'norm_num_groups': 8,
    'use_linear_projection': False,
    'flip_sin_to_cos': False,
    'freq_shift': 1,
    'sample_size': 16,
}

# Three levels (two asymmetric-padding downsamplers), mid-block attention, groups of 4 channels.
TINY_VAE: dict[str, Any] = {
    'block_out_channels': [16, 32, 32],
    'down_block_types': ['DownEncoderBlock2D'] * 3,
    'up_block_types': ['UpDecoderBlock2D'] * 3,
    'layers_per_block': 1,
    'latent_channels': 4,
    'norm_num_groups': 8,
    'sample_size': 32,
}


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
  """Gives every GroupNorm/LayerNorm a non-trivial affine transform."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
        module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))


def save_tiny_model(cls: type, folder: str | os.PathLike, config: Mapping[str, Any],
                    seed: int = 0) -> str:
  """Builds ``cls(**config)`` (a diffusers model class) with random weights and saves it."""
  torch.manual_seed(seed)
  model = cls(**config)
  _randomise_norms(model, seed + 1)
  model.save_pretrained(str(folder), safe_serialization=True)
  return str(folder)


def save_tiny_unet(folder: str | os.PathLike, config: Mapping[str, Any], seed: int = 0) -> str:
  import diffusers
  return save_tiny_model(diffusers.UNet2DConditionModel, folder, config, seed)


def save_tiny_vae(folder: str | os.PathLike, config: Mapping[str, Any], seed: int = 0) -> str:
  import diffusers
  return save_tiny_model(diffusers.AutoencoderKL, folder, config, seed)


def load_torch_unet(folder: str):
  import diffusers
  return diffusers.UNet2DConditionModel.from_pretrained(folder).eval()


def load_torch_vae(folder: str):
  import diffusers
  return diffusers.AutoencoderKL.from_pretrained(folder).eval()


def read_config(folder: str) -> dict[str, Any]:
  with open(os.path.join(folder, 'config.json')) as f:
    return json.load(f)


def convert_folder(folder: str, model, ignore_prefixes: tuple[str, ...] = ()) -> dict:
  """Reads the folder's safetensors with numpy and converts them to ``model``'s param tree."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']
  state = read_state_dict(find_weight_files(folder, WEIGHTS_STEM))
  return convert_state_dict(state, shapes, ignore_prefixes=ignore_prefixes)


def load_flax_unet(folder: str, **kwargs) -> tuple[UNet2DConditionModel, dict]:
  """Our UNet built from the folder's config.json, and its converted params."""
  unet = UNet2DConditionModel.from_config(read_config(folder), **kwargs)
  return unet, convert_folder(folder, unet)


def load_flax_vae(folder: str, **kwargs) -> tuple[AutoencoderKL, dict]:
  """Our VAE built from the folder's config.json (``parts=`` allowed), and its converted params."""
  vae = AutoencoderKL.from_config(read_config(folder), **kwargs)
  ignore = tuple(f'{name}.' for part, names in (('encoder', ('encoder', 'quant_conv')),
                                                ('decoder', ('decoder', 'post_quant_conv')))
                 if part not in vae.parts for name in names)
  return vae, convert_folder(folder, vae, ignore_prefixes=ignore)


def nchw(x: np.ndarray) -> torch.Tensor:
  """NHWC numpy -> NCHW torch."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
  """NCHW torch -> NHWC numpy."""
  return x.detach().float().numpy().transpose(0, 2, 3, 1)


def random_flax_vae(config: Mapping[str, Any], seed: int = 0):
  """Our VAE of ``config`` and random params with non-trivial norms and biases: kernels
  ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.3^2), every norm and layer bias N(0, 0.3^2). Drawn with
  numpy from the param shapes (an eager ``init`` of a VAE takes seconds on 2 cores)."""
  vae = AutoencoderKL.from_config(config)
  shapes = jax.eval_shape(vae.init, jax.random.key(0), *vae.dummy_inputs())['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == 'kernel':
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return 1 + 0.3 * noise if name == 'scale' else 0.3 * noise

  return vae, jax.tree_util.tree_map_with_path(draw, shapes)
