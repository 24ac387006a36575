"""Our Flax UNet2DConditionModel reproduces diffusers' PyTorch UNet2DConditionModel.

Tiny random diffusers UNets (SD2.1-like and SD1-like configs) are saved with ``save_pretrained``, their
safetensors read with numpy and converted with `sr_jax.weights.convert_state_dict` (no special cases),
and both models run on the same non-square latents: fp32 must agree to 1e-4 relative to the output
scale, bf16 compute to 2e-2 in relative L2 norm.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_diffusers as td
from sr_jax.models.unet import UNet2DConditionModel

# name -> (config, latent height/width, timesteps). SD1-like runs at a size the UNet's total
# downsampling does not divide (diffusers then upsamples to the skip sizes) and with a scalar timestep.
CASES = {
    'sd21': (td.TINY_UNET_SD21, (16, 24), np.array([10.0, 980.0], np.float32)),
    'sd1': (td.TINY_UNET_SD1, (15, 22), np.float32(500.0)),
}


@pytest.fixture(scope='module', params=sorted(CASES))
def case(request, tmp_path_factory):
  config, (h, w), timesteps = CASES[request.param]
  folder = td.save_tiny_unet(tmp_path_factory.mktemp(f'unet_{request.param}'), config)
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, h, w, 4)).astype(np.float32)
  context = rng.standard_normal((2, 7, config['cross_attention_dim'])).astype(np.float32)
  with torch.no_grad():
    ref = td.load_torch_unet(folder)(td.nchw(sample), torch.from_numpy(np.asarray(timesteps)),
                                     torch.from_numpy(context)).sample
  return dict(folder=folder, inputs=(sample, timesteps, context), ref=td.nhwc(ref))


def _run(folder, inputs, dtype):
  unet, params = td.load_flax_unet(folder, dtype=dtype)
  return np.asarray(jax.jit(unet.apply)({'params': params}, *inputs), np.float32)


def test_fp32_matches_diffusers(case):
  out = _run(case['folder'], case['inputs'], jnp.float32)
  ref = case['ref']
  assert out.shape == ref.shape
  err = np.abs(out - ref).max()
  assert err <= 1e-4 * max(1.0, np.abs(ref).max()), err


def test_bf16_compute_close_to_diffusers_fp32(case):
  out = _run(case['folder'], case['inputs'], jnp.bfloat16)
  ref = case['ref']
  rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
  assert rel <= 2e-2, rel


def test_unsupported_config_features_are_named():
  config = dict(td.TINY_UNET_SD21, class_embed_type='timestep', addition_embed_type='text',
                down_block_types=['SimpleCrossAttnDownBlock2D', 'DownBlock2D'])
  with pytest.raises(ValueError) as info:
    UNet2DConditionModel.from_config(config)
  for feature in ('class_embed_type', 'addition_embed_type', 'SimpleCrossAttnDownBlock2D'):
    assert feature in str(info.value)


def test_attention_head_dim_is_the_head_count_as_in_diffusers():
  unet = UNet2DConditionModel.from_config({**td.SD21_BASE_UNET_CONFIG, '_class_name': 'x'})
  assert unet.num_attention_heads == (5, 10, 20, 20)
  explicit = UNet2DConditionModel.from_config({**td.TINY_UNET_SD1, 'num_attention_heads': [4, 8]})
  assert explicit.num_attention_heads == (4, 8)
