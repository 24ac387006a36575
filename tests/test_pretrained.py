"""`sr_jax.pretrained` loads raw diffusers/transformers folders and our converted folders alike.

Tiny random models are saved in the hub layout; loading a raw folder gives outputs equal to the
PyTorch model (a loose check: the deep parity tests are the `*_vs_reference` files), and the converted
folder gives bit-identical params. Also: pipeline roots, VAE halves, sharded and bf16 checkpoints,
the `model.` prefix of transformers state dicts, and a torch-free load path for converted folders.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sr_jax import pretrained
from sr_jax.weights import CheckpointError

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tiny = pytest.importorskip('tiny_diffusers')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFFUSERS_WEIGHTS = 'diffusion_pytorch_model.safetensors'
# Smaller than tiny_diffusers' configs (compile time); deep parity lives in the *_vs_reference tests.
SMALL_UNET = {
    'block_out_channels': [16], 'down_block_types': ['CrossAttnDownBlock2D'],
    'up_block_types': ['CrossAttnUpBlock2D'], 'layers_per_block': 1, 'attention_head_dim': 2,
    'cross_attention_dim': 24, 'norm_num_groups': 8, 'use_linear_projection': True, 'sample_size': 8,
}
SMALL_VAE = {
    'block_out_channels': [8, 16], 'down_block_types': ['DownEncoderBlock2D'] * 2,
    'up_block_types': ['UpDecoderBlock2D'] * 2, 'layers_per_block': 1, 'latent_channels': 4,
    'norm_num_groups': 4, 'sample_size': 16,
}


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """Raw tiny models in the hub layout: a pipeline root with unet/ and vae/, and a dinov3 folder."""
  root = tmp_path_factory.mktemp('pipeline')
  tiny.save_tiny_unet(root / 'unet', SMALL_UNET)
  tiny.save_tiny_vae(root / 'vae', SMALL_VAE)
  torch.manual_seed(0)
  config = transformers.DINOv3ConvNextConfig(hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1],
                                             layer_scale_init_value=0.5)
  dino = transformers.DINOv3ConvNextModel(config).eval()
  dino_dir = tmp_path_factory.mktemp('dinov3')
  dino.save_pretrained(str(dino_dir))
  return {'root': str(root), 'unet': str(root / 'unet'), 'vae': str(root / 'vae'),
          'dinov3': str(dino_dir)}


@pytest.fixture(scope='module')
def converted(folders, tmp_path_factory):
  out = tmp_path_factory.mktemp('converted')
  for kind in ('unet', 'vae', 'dinov3'):
    pretrained.convert_folder(folders[kind], out / kind, kind)
  return {kind: str(out / kind) for kind in ('unet', 'vae', 'dinov3')}


def _assert_close(out, ref, rel=1e-4):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert out.shape == ref.shape
  err, scale = float(np.max(np.abs(out - ref))), max(1.0, float(np.max(np.abs(ref))))
  assert err <= rel * scale, f'max err {err:.3g} at scale {scale:.3g}'


def _assert_trees_equal(a, b):
  flat_a, flat_b = (dict(jax.tree_util.tree_leaves_with_path(t)) for t in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for path, leaf in flat_a.items():
    assert leaf.dtype == flat_b[path].dtype, path
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]), err_msg=str(path))


def _rounded(tree, dtype):
  """``tree`` rounded to ``dtype`` and back to float32 (on the host)."""
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x).astype(dtype).astype(np.float32)), tree)


def test_unet_raw_folder_matches_torch(folders):
  unet, params = pretrained.load_unet(folders['unet'])
  assert isinstance(unet, pretrained.UNet2DConditionModel)
  assert all(isinstance(x, jax.Array) and x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((1, 5, unet.cross_attention_dim)).astype(np.float32)
  out = jax.jit(unet.apply)({'params': params}, sample, jnp.array([321.0]), context)
  with torch.no_grad():
    ref = tiny.load_torch_unet(folders['unet'])(tiny.nchw(sample), 321, torch.from_numpy(context))
  _assert_close(out, tiny.nhwc(ref.sample))


def test_vae_raw_folder_matches_torch(folders):
  vae, params = pretrained.load_vae(folders['root'])  # pipeline root
  images = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)

  @jax.jit
  def encode_decode(p, x):
    mean, _ = vae.apply({'params': p}, x, method='encode')
    return mean, vae.apply({'params': p}, mean, method='decode')

  mean, decoded = encode_decode(params, images)
  torch_vae = tiny.load_torch_vae(folders['vae'])
  with torch.no_grad():
    ref_mean = torch_vae.encode(tiny.nchw(images)).latent_dist.mean
    ref_decoded = torch_vae.decode(ref_mean).sample
  _assert_close(mean, tiny.nhwc(ref_mean))
  _assert_close(decoded, tiny.nhwc(ref_decoded))


def test_dinov3_raw_folder_matches_torch(folders):
  model, params = pretrained.load_dinov3(folders['dinov3'])
  x = np.random.default_rng(2).standard_normal((1, 32, 32, 3)).astype(np.float32)
  outs = jax.jit(model.apply)({'params': params}, x)
  torch_model = transformers.DINOv3ConvNextModel.from_pretrained(folders['dinov3']).eval()
  with torch.no_grad():
    refs = torch_model(tiny.nchw(x), output_hidden_states=True).hidden_states[1:]
  for out, ref in zip(outs, refs):
    _assert_close(out, tiny.nhwc(ref))


@pytest.mark.parametrize('kind', ['unet', 'vae', 'dinov3'])
def test_converted_folder_gives_identical_params(folders, converted, kind):
  load = getattr(pretrained, f'load_{kind}')
  raw_module, raw = load(folders[kind])
  conv_module, conv = load(converted[kind])
  assert raw_module == conv_module
  _assert_trees_equal(raw, conv)
  marker = json.load(open(os.path.join(converted[kind], pretrained.MARKER_FILE)))
  assert marker['kind'] == kind and marker['format_version'] == pretrained.FORMAT_VERSION
  assert set(os.listdir(converted[kind])) == {'config.json', 'params.safetensors', 'sr_jax.json'}
  stored = load_file(os.path.join(converted[kind], pretrained.PARAMS_FILE))
  assert all('/' in key and '.' not in key for key in stored)


def test_vae_parts_and_dtypes(folders, converted):
  _, full = pretrained.load_vae(folders['vae'])
  for path in (folders['vae'], converted['vae']):
    encoder, enc = pretrained.load_vae(path, parts=('encoder',))
    assert encoder.parts == ('encoder',) and set(enc) == {'encoder', 'quant_conv'}
    decoder, dec = pretrained.load_vae(path, jnp.bfloat16, jnp.bfloat16, parts=['decoder'])
    assert set(dec) == {'decoder', 'post_quant_conv'} and decoder.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(dec))
    _assert_trees_equal(enc, {k: full[k] for k in enc})


def test_pipeline_root_and_kind_checks(folders, converted, tmp_path):
  _, from_root = pretrained.load_unet(folders['root'])
  _, direct = pretrained.load_unet(folders['unet'])
  _, from_converted_root = pretrained.load_unet(os.path.dirname(converted['unet']))
  _assert_trees_equal(from_root, direct)
  _assert_trees_equal(from_converted_root, direct)
  with pytest.raises(CheckpointError, match="converted 'vae', not a 'unet'"):
    pretrained.load_unet(converted['vae'])
  with pytest.raises(FileNotFoundError, match='config.json'):
    pretrained.load_dinov3(folders['root'])
  with pytest.raises(FileNotFoundError, match='no such folder'):
    pretrained.load_unet(str(tmp_path / 'nowhere'))


def test_bf16_and_sharded_checkpoints(folders, tmp_path):
  _, reference = pretrained.load_vae(folders['vae'])
  bf16_dir = tmp_path / 'bf16'
  shutil.copytree(folders['vae'], bf16_dir)
  state = load_file(str(bf16_dir / DIFFUSERS_WEIGHTS))
  save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()},
            str(bf16_dir / DIFFUSERS_WEIGHTS))
  _, params = pretrained.load_vae(str(bf16_dir))
  _assert_trees_equal(params, _rounded(reference, ml_dtypes.bfloat16))

  sharded_dir = tmp_path / 'sharded'
  tiny.load_torch_vae(folders['vae']).save_pretrained(str(sharded_dir), max_shard_size='10KB')
  assert os.path.isfile(sharded_dir / 'diffusion_pytorch_model.safetensors.index.json')
  _, params = pretrained.load_vae(str(sharded_dir))
  _assert_trees_equal(params, reference)


def test_fp16_variant(folders, tmp_path):
  _, reference = pretrained.load_unet(folders['unet'])
  tiny.load_torch_unet(folders['unet']).to(torch.float16).save_pretrained(str(tmp_path),
                                                                          variant='fp16')
  assert os.path.isfile(tmp_path / 'diffusion_pytorch_model.fp16.safetensors')
  with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors'):
    pretrained.load_unet(str(tmp_path))
  _, params = pretrained.load_unet(str(tmp_path), variant='fp16')
  _assert_trees_equal(params, _rounded(reference, np.float16))


def test_transformers_model_prefix_is_stripped(folders, tmp_path):
  _, reference = pretrained.load_dinov3(folders['dinov3'])
  shutil.copy(os.path.join(folders['dinov3'], 'config.json'), tmp_path)
  state = load_file(os.path.join(folders['dinov3'], 'model.safetensors'))
  # As the in-memory transformers model names them: the backbone under `model.`, the final norm not.
  save_file({(k if k.startswith('layer_norm') else f'model.{k}'): v for k, v in state.items()},
            str(tmp_path / 'model.safetensors'))
  _, params = pretrained.load_dinov3(str(tmp_path))
  _assert_trees_equal(params, reference)


def test_converted_mismatch_is_named(converted, tmp_path):
  folder = tmp_path / 'unet'
  shutil.copytree(converted['unet'], folder)
  stored = load_file(str(folder / pretrained.PARAMS_FILE))
  stored['conv_in/bias'] = stored['conv_in/bias'][:-1]
  save_file(stored, str(folder / pretrained.PARAMS_FILE))
  with pytest.raises(CheckpointError, match=r'conv_in/bias.*\(15,\).*\(16,\)'):
    pretrained.load_unet(str(folder))
  os.remove(folder / pretrained.PARAMS_FILE)
  with pytest.raises(FileNotFoundError, match='params.safetensors'):
    pretrained.load_unet(str(folder))


def test_prompt_embeds_roundtrip(tmp_path):
  embeds = [np.full((1, 4, 6), i, np.float32) for i in range(2)]
  pretrained.save_prompt_embeds(tmp_path, ['', 'a photo'], embeds, source='test')
  np.testing.assert_array_equal(pretrained.load_prompt_embeds(tmp_path), embeds[0])
  np.testing.assert_array_equal(pretrained.load_prompt_embeds(tmp_path, 'a photo'), embeds[1])
  with pytest.raises(KeyError, match='a photo'):
    pretrained.load_prompt_embeds(tmp_path, 'other')


def test_converted_load_path_imports_no_torch(converted):
  code = ('import sys; from sr_jax import pretrained; '
          f'pretrained.load_vae({converted["vae"]!r}); pretrained.load_dinov3({converted["dinov3"]!r}); '
          'bad = [m for m in ("torch", "transformers", "diffusers") if m in sys.modules]; '
          'assert not bad, bad')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
