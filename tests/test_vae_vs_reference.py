"""Our Flax AutoencoderKL reproduces diffusers' PyTorch AutoencoderKL (encode and decode).

A tiny random diffusers VAE is saved with ``save_pretrained``, converted from its safetensors with
`sr_jax.weights.convert_state_dict`, and run on non-square images/latents: fp32 posterior mean,
log-variance and decoded images agree to 1e-4 relative to the output scale; bf16 compute to 2e-2 in
relative L2 norm. Encoder-only and decoder-only models take the matching subtrees of the full tree.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_diffusers as td
from sr_jax.models.vae import DECODER_PARAMS, ENCODER_PARAMS, AutoencoderKL


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  folder = td.save_tiny_vae(tmp_path_factory.mktemp('vae'), td.TINY_VAE)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 24, 40, 3)).astype(np.float32)
  latents = rng.standard_normal((2, 5, 7, 4)).astype(np.float32)
  vae = td.load_torch_vae(folder)
  with torch.no_grad():
    posterior = vae.encode(td.nchw(images)).latent_dist
    decoded = vae.decode(td.nchw(latents)).sample
  return dict(folder=folder, images=images, latents=latents, mean=td.nhwc(posterior.mean),
              logvar=td.nhwc(posterior.logvar), decoded=td.nhwc(decoded))


def _encode_decode(vae, params, images, latents):
  encode = jax.jit(lambda p, x: vae.apply({'params': p}, x, method='encode'))
  decode = jax.jit(lambda p, z: vae.apply({'params': p}, z, method='decode'))
  mean, logvar = encode(params, images)
  as_np = lambda a: np.asarray(a, np.float32)
  return as_np(mean), as_np(logvar), as_np(decode(params, latents))


def _assert_close(out, ref, name):
  assert out.shape == ref.shape, name
  err = np.abs(out - ref).max()
  assert err <= 1e-4 * max(1.0, np.abs(ref).max()), (name, err)


def test_fp32_matches_diffusers(reference):
  vae, params = td.load_flax_vae(reference['folder'])
  assert set(params) == set(ENCODER_PARAMS + DECODER_PARAMS)
  outs = _encode_decode(vae, params, reference['images'], reference['latents'])
  for out, name in zip(outs, ('mean', 'logvar', 'decoded')):
    _assert_close(out, reference[name], name)


def test_bf16_compute_close_to_diffusers_fp32(reference):
  vae, params = td.load_flax_vae(reference['folder'], dtype=jnp.bfloat16)
  outs = _encode_decode(vae, params, reference['images'], reference['latents'])
  for out, name in zip(outs, ('mean', 'logvar', 'decoded')):
    ref = reference[name]
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert rel <= 2e-2, (name, rel)


def test_encoder_only_and_decoder_only_use_subtrees_of_the_full_tree(reference):
  _, full = td.load_flax_vae(reference['folder'])
  encoder, enc_params = td.load_flax_vae(reference['folder'], parts=('encoder',))
  decoder, dec_params = td.load_flax_vae(reference['folder'], parts=('decoder',))
  assert set(enc_params) == set(ENCODER_PARAMS) and set(dec_params) == set(DECODER_PARAMS)
  trees_equal = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  assert trees_equal(enc_params, {k: full[k] for k in ENCODER_PARAMS})
  mean, _ = jax.jit(lambda p, x: encoder.apply({'params': p}, x, method='encode'))(
      {k: full[k] for k in ENCODER_PARAMS}, reference['images'])
  _assert_close(np.asarray(mean), reference['mean'], 'encoder-only mean')
  decoded = jax.jit(lambda p, z: decoder.apply({'params': p}, z, method='decode'))(
      dec_params, reference['latents'])
  _assert_close(np.asarray(decoded), reference['decoded'], 'decoder-only decode')
  with pytest.raises(ValueError, match='decoder'):
    encoder.apply({'params': enc_params}, reference['latents'], method='decode')


def test_unsupported_config_features_are_named():
  with pytest.raises(ValueError, match='AttnDownEncoderBlock2D'):
    AutoencoderKL.from_config(dict(td.TINY_VAE, down_block_types=['AttnDownEncoderBlock2D'] * 3))


def test_vae_without_quant_convs_matches_diffusers_and_splits(tmp_path):
  """The SD3 / FLUX VAE layout (16 latent channels, no quant_conv / post_quant_conv, a shift)."""
  from sr_jax.diffusion.latents import LatentCodec  # pylint: disable=g-import-not-at-top
  from sr_jax.inference.tiled_vae import TiledVAE  # pylint: disable=g-import-not-at-top
  from sr_jax.models.vae import split_vae_params  # pylint: disable=g-import-not-at-top
  config = dict(td.TINY_VAE, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=1.5305, shift_factor=0.0609)
  folder = td.save_tiny_vae(tmp_path / 'vae3', config)
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (1, 32, 24, 3)).astype(np.float32)
  latents = rng.standard_normal((1, 8, 6, 16)).astype(np.float32)
  torch_vae = td.load_torch_vae(folder)
  with torch.no_grad():
    posterior = torch_vae.encode(td.nchw(images)).latent_dist
    decoded = torch_vae.decode(td.nchw(latents)).sample
  vae, params = td.load_flax_vae(folder)
  assert 'quant_conv' not in params and 'post_quant_conv' not in params
  mean, logvar, out = _encode_decode(vae, params, images, latents)
  _assert_close(mean, td.nhwc(posterior.mean), 'mean')
  _assert_close(logvar, td.nhwc(posterior.logvar), 'logvar')
  _assert_close(out, td.nhwc(decoded), 'decoded')
  encoder, decoder = split_vae_params(params)
  assert set(encoder) == {'encoder'} and set(decoder) == {'decoder'}
  codec = LatentCodec.from_vae_config(td.read_config(folder))
  assert (codec.scaling_factor, codec.shift_factor) == (1.5305, 0.0609)
  # The exact tiled VAE runs this layout too (tiles of 2 latent px: many tiles).
  tiled = TiledVAE(vae, tile=2, batch=4)
  tiled_mean, _ = tiled.encode(params, images[0])
  np.testing.assert_allclose(tiled_mean, mean[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(tiled.decode(params, latents[0]), out[0], rtol=1e-4, atol=1e-4)


def test_sd3_flux_vaes_through_pretrained_load_vae_and_the_codec(tmp_path):
  """16-channel VAEs as `pretrained.load_vae` gives them (raw pipeline root, converted sharded
  folder), with the latent shift: our codec + VAE equal diffusers' pipelines' formulas, SD3
  (shift 0.0609, scale 1.5305) and FLUX (0.1159, 0.3611): encode ``(mean - shift) * scale``,
  decode ``vae.decode(z / scale + shift)``."""
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  from sr_jax.diffusion.latents import LatentCodec  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  images = rng.uniform(-1, 1, (1, 24, 16, 3)).astype(np.float32)
  z = rng.standard_normal((1, 6, 4, 16)).astype(np.float32)
  # One program for both VAEs (same architecture; shift and scale live in the codec).
  run = jax.jit(lambda vae, p, latents: (vae.apply({'params': p}, images, method='encode')[0],
                                         vae.apply({'params': p}, latents, method='decode')),
                static_argnums=0)
  for name, shift, scale in (('sd3', 0.0609, 1.5305), ('flux', 0.1159, 0.3611)):
    config = dict(td.TINY_VAE, latent_channels=16, use_quant_conv=False,
                  use_post_quant_conv=False, scaling_factor=scale, shift_factor=shift)
    td.save_tiny_vae(tmp_path / name / 'vae', config, seed=4)
    pretrained.convert_folder(tmp_path / name, tmp_path / f'{name}_converted', 'vae',
                              max_shard_size='40KB')
    assert os.path.isfile(tmp_path / f'{name}_converted' / 'params.safetensors.index.json')
    torch_vae = td.load_torch_vae(str(tmp_path / name / 'vae'))
    with torch.no_grad():
      ref_latent = (torch_vae.encode(td.nchw(images)).latent_dist.mean - shift) * scale
      ref_decoded = torch_vae.decode(td.nchw(z) / scale + shift).sample
    vae, params = pretrained.load_vae(str(tmp_path / name))  # the pipeline root
    _, converted = pretrained.load_vae(str(tmp_path / f'{name}_converted'))
    assert jax.tree.all(jax.tree.map(np.array_equal, params, converted))
    assert vae.latent_channels == 16 and 'quant_conv' not in params
    codec = LatentCodec.from_vae_config(td.read_config(str(tmp_path / name / 'vae')))
    assert (codec.shift_factor, codec.scaling_factor) == (shift, scale)
    mean, decoded = run(vae, params, np.asarray(codec.from_latent(z)))
    _assert_close(np.asarray(codec.to_latent(mean)), td.nhwc(ref_latent), f'{name} latent')
    _assert_close(np.asarray(decoded), td.nhwc(ref_decoded), f'{name} decoded')


def test_full_size_sd3_vae_param_count_equals_diffusers():
  """The SD3 / FLUX VAE (next-methods.md Sec. 1.3, Sec. 6): 83,819,683 params, by jax.eval_shape
  and by diffusers on the meta device, with the same key count."""
  import diffusers  # pylint: disable=g-import-not-at-top
  config = {k: v for k, v in td.SD21_BASE_VAE_CONFIG.items() if not k.startswith('_')}
  config.update(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024)
  vae = AutoencoderKL.from_config(config)
  shapes = jax.eval_shape(vae.init, jax.random.key(0), *vae.dummy_inputs())['params']
  ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
  with torch.device('meta'):
    reference = diffusers.AutoencoderKL(**config)
  assert ours == sum(p.numel() for p in reference.parameters()) == 83_819_683
  assert len(jax.tree.leaves(shapes)) == len(reference.state_dict())
