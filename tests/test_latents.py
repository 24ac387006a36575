"""The latent codec (scaling and shift, posterior sampling) against diffusers, and its round trip."""
import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from sr_jax.diffusion import latents

# (config.json values, expected (scale, shift)): SD2.1, the SD3 VAE, the FLUX VAE, a bare config.
CODECS = [({'scaling_factor': 0.18215}, (0.18215, 0.0)),
          ({'scaling_factor': 1.5305, 'shift_factor': 0.0609}, (1.5305, 0.0609)),
          ({'scaling_factor': 0.3611, 'shift_factor': 0.1159}, (0.3611, 0.1159)),
          ({'shift_factor': None}, (0.18215, 0.0))]


@pytest.mark.parametrize('config,expected', CODECS)
def test_codec_reads_scale_and_shift_from_the_vae_config(config, expected):
  codec = latents.LatentCodec.from_vae_config(config)
  assert (codec.scaling_factor, codec.shift_factor) == expected


@pytest.mark.parametrize('config,_', CODECS[:3])
def test_codec_samples_like_diffusers_then_scales_and_shifts(config, _):
  codec = latents.LatentCodec.from_vae_config(config)
  rng = np.random.default_rng(0)
  moments = rng.normal(size=(2, 8, 5, 6)).astype(np.float32)  # NCHW: mean | logvar, 4 channels each
  moments[:, 4:] = moments[:, 4:] * 20 - 3  # some logvars beyond diffusers' clamp to [-30, 20]
  dist = DiagonalGaussianDistribution(torch.from_numpy(moments))
  sample = dist.sample(generator=torch.Generator().manual_seed(1)).numpy()
  reference = (sample - codec.shift_factor) * codec.scaling_factor
  noise = torch.randn((2, 4, 5, 6), generator=torch.Generator().manual_seed(1)).numpy()
  nhwc = lambda a: a.transpose(0, 2, 3, 1)
  mean, logvar = nhwc(moments[:, :4]), np.clip(nhwc(moments[:, 4:]), -30, 20)  # AutoencoderKL.encode
  ours = np.asarray(codec.encode(mean, logvar, nhwc(noise)))
  np.testing.assert_allclose(ours, nhwc(reference), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(codec.from_latent(codec.to_latent(mean))), mean, rtol=1e-6,
                             atol=1e-6)


def test_unknown_prediction_type_is_named():
  with pytest.raises(ValueError, match="unsupported prediction_type 'x0'"):
    latents.x0_from_prediction(np.zeros(2), np.zeros(2), 0.5, 'x0')
