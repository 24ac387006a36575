"""Full-size models have exactly the reference parameter counts (shapes only, via jax.eval_shape).

The counts are those of the PyTorch reference models for the same configs; the key test also checks
that every tensor of a full-size diffusers checkpoint maps onto our param tree by the mechanical
naming convention of `sr_jax.weights`, with the right shape (PyTorch models built on the meta device,
so no weights are allocated).
"""
import functools

import jax
import numpy as np
import pytest
from flax import traverse_util

import tiny_diffusers as td
from sr_jax.models.unet import UNet2DConditionModel
from sr_jax.models.vae import AutoencoderKL
from sr_jax.weights import torch_key_to_flax_path, torch_to_flax_array

# --- UNet and VAE (Stable Diffusion 2.1-base) ---

SD_CASES = {
    'sd21_base_unet': (UNet2DConditionModel, td.SD21_BASE_UNET_CONFIG, 865_910_724),
    'sd21_base_vae': (AutoencoderKL, td.SD21_BASE_VAE_CONFIG, 83_653_863),
}


@functools.lru_cache(maxsize=None)
def _param_shapes(name):
  cls, config, _ = SD_CASES[name]
  model = cls.from_config(config)
  return jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']


@pytest.mark.parametrize('name', sorted(SD_CASES))
def test_sd_param_count(name):
  _, _, expected = SD_CASES[name]
  shapes = _param_shapes(name)
  assert sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes)) == expected


@pytest.mark.parametrize('name', sorted(SD_CASES))
def test_sd_checkpoint_keys_map_onto_param_tree(name):
  import diffusers
  import torch
  _, config, _ = SD_CASES[name]
  torch_cls = getattr(diffusers, config['_class_name'])
  with torch.device('meta'):
    reference = torch_cls(**{k: v for k, v in config.items() if not k.startswith('_')})
  expected = traverse_util.flatten_dict(_param_shapes(name))
  mapped = {}
  for key, tensor in reference.state_dict().items():
    path = torch_key_to_flax_path(key, tensor.ndim)
    empty = np.broadcast_to(np.float32(0), tuple(tensor.shape))  # no allocation
    mapped[path] = torch_to_flax_array(empty, path[-1]).shape
  assert set(mapped) == set(expected)
  assert {p: tuple(s.shape) for p, s in expected.items()} == mapped
