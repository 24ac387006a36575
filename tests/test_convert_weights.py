"""`python -m convert_weights` on a tiny SD pipeline and a tiny DINOv3 folder, and its error messages.

The pipeline is assembled in the hub layout from tiny random parts: unet/ and vae/ (diffusers),
text_encoder/ (transformers CLIPTextModel), tokenizer/ (a CLIP BPE tokenizer built from a vocab and
merges written here: nothing is downloaded) and scheduler/.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import convert_weights
from sr_jax import pretrained

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tiny = pytest.importorskip('tiny_diffusers')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 16
HIDDEN = 32
UNET = {
    'block_out_channels': [16, 32], 'down_block_types': ['CrossAttnDownBlock2D', 'DownBlock2D'],
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D'], 'layers_per_block': 1,
    'attention_head_dim': [2, 4], 'cross_attention_dim': HIDDEN, 'norm_num_groups': 8,
    'use_linear_projection': True, 'sample_size': 8,
}
VAE = {
    'block_out_channels': [8, 16], 'down_block_types': ['DownEncoderBlock2D'] * 2,
    'up_block_types': ['UpDecoderBlock2D'] * 2, 'layers_per_block': 1, 'latent_channels': 4,
    'norm_num_groups': 4, 'sample_size': 16,
}
SCHEDULER = {'_class_name': 'DDPMScheduler', 'beta_start': 0.00085, 'beta_end': 0.012,
             'beta_schedule': 'scaled_linear', 'num_train_timesteps': 1000,
             'prediction_type': 'epsilon'}
SPECIAL = {'bos_token': '<|startoftext|>', 'eos_token': '<|endoftext|>',
           'unk_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'}


def _write_tokenizer(folder):
  """A CLIP BPE tokenizer in the SD hub layout: letters, end-of-word letters and a few merges."""
  os.makedirs(folder)
  letters = 'abcdefghijklmnopqrstuvwxyz'
  merges = ['h e', 'l l', 'he ll', 'hell o</w>', 'p h', 'ph o', 'pho t', 'phot o</w>']
  tokens = ['<|startoftext|>', '<|endoftext|>', *letters, *(c + '</w>' for c in letters),
            'he', 'll', 'hell', 'hello</w>', 'ph', 'pho', 'phot', 'photo</w>']
  with open(os.path.join(folder, 'vocab.json'), 'w') as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(folder, 'merges.txt'), 'w') as f:
    f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
  with open(os.path.join(folder, 'special_tokens_map.json'), 'w') as f:
    json.dump(SPECIAL, f)
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'CLIPTokenizer', 'model_max_length': MAX_LENGTH, **SPECIAL}, f)
  return len(tokens)


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
  root = tmp_path_factory.mktemp('sd_pipeline')
  tiny.save_tiny_unet(root / 'unet', UNET)
  tiny.save_tiny_vae(root / 'vae', VAE)
  vocab_size = _write_tokenizer(root / 'tokenizer')
  torch.manual_seed(0)
  text_config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
      pad_token_id=1)
  transformers.CLIPTextModel(text_config).save_pretrained(str(root / 'text_encoder'))
  os.makedirs(root / 'scheduler')
  with open(root / 'scheduler' / 'scheduler_config.json', 'w') as f:
    json.dump(SCHEDULER, f)
  with open(root / 'model_index.json', 'w') as f:
    json.dump({'_class_name': 'StableDiffusionPipeline'}, f)
  return str(root)


@pytest.fixture(scope='module')
def converted(pipeline, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('out') / 'sd')
  assert convert_weights.main(['sd', '--src', pipeline, '--out', out, '--prompt', '',
                               '--prompt', 'hello photo']) == 0
  return out


def _reference_embedding(root, prompt):
  """The transformers computation: max_length padding, truncation, last hidden state."""
  tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(root, 'tokenizer'))
  model = transformers.CLIPTextModel.from_pretrained(os.path.join(root, 'text_encoder')).eval()
  ids = tokenizer(prompt, padding='max_length', max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors='pt').input_ids
  assert ids.shape == (1, MAX_LENGTH)
  with torch.no_grad():
    return model(ids).last_hidden_state.numpy()


def _assert_trees_equal(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _run_main(argv, capsys):
  code = convert_weights.main(argv)
  err = capsys.readouterr().err
  return code, err


def test_sd_outputs(pipeline, converted):
  assert set(os.listdir(converted)) >= {'unet', 'vae', 'scheduler_config.json', 'sr_jax.json',
                                        'prompt_embeds.safetensors', 'prompt_embeds.json'}
  for kind in ('unet', 'vae'):
    assert pretrained.is_converted(os.path.join(converted, kind))
    _, raw = getattr(pretrained, f'load_{kind}')(pipeline)
    _, ours = getattr(pretrained, f'load_{kind}')(converted)
    _assert_trees_equal(raw, ours)
  with open(os.path.join(converted, 'scheduler_config.json')) as f:
    assert json.load(f) == SCHEDULER
  with open(os.path.join(converted, 'sr_jax.json')) as f:
    assert json.load(f)['kind'] == 'sd'
  with open(os.path.join(converted, 'prompt_embeds.json')) as f:
    index = json.load(f)
  assert index['prompts'] == {'prompt_0': '', 'prompt_1': 'hello photo'}
  assert index['max_length'] == MAX_LENGTH


@pytest.mark.parametrize('prompt', ['', 'hello photo'])
def test_prompt_embedding_equals_transformers(pipeline, converted, prompt):
  embeds = pretrained.load_prompt_embeds(converted, prompt)
  assert embeds.shape == (1, MAX_LENGTH, HIDDEN) and embeds.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(embeds), _reference_embedding(pipeline, prompt))


def test_module_entry_point(pipeline, converted, tmp_path):
  out = tmp_path / 'sd'
  result = subprocess.run([sys.executable, '-m', 'convert_weights', 'sd', '--src', pipeline,
                           '--out', str(out)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / 'prompt_embeds.json') as f:
    assert json.load(f)['prompts'] == {'prompt_0': ''}  # the default: the empty prompt
  np.testing.assert_array_equal(np.asarray(pretrained.load_prompt_embeds(out)),
                                np.asarray(pretrained.load_prompt_embeds(converted, '')))
  assert load_file(str(out / 'unet' / 'params.safetensors')).keys() == load_file(
      os.path.join(converted, 'unet', 'params.safetensors')).keys()


def test_dinov3(tmp_path, capsys):
  config = transformers.DINOv3ConvNextConfig(hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1])
  transformers.DINOv3ConvNextModel(config).save_pretrained(str(tmp_path / 'src'))
  code, err = _run_main(['dinov3', '--src', str(tmp_path / 'src'), '--out', str(tmp_path / 'out'),
                         '--dtype', 'bfloat16'], capsys)
  assert code == 0, err
  _, raw = pretrained.load_dinov3(str(tmp_path / 'src'))
  _, ours = pretrained.load_dinov3(str(tmp_path / 'out'))
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(pretrained.STORAGE_DTYPES['bfloat16'])
                         .astype(np.float32), raw)
  _assert_trees_equal(rounded, ours)


def _edit_weights(path, edit):
  state = load_file(path)
  edit(state)
  save_file(state, path)


def _truncate_conv_in_bias(state):
  state['conv_in.bias'] = state['conv_in.bias'][:-1]


UNET_WEIGHTS = os.path.join('unet', 'diffusion_pytorch_model.safetensors')
VAE_WEIGHTS = os.path.join('vae', 'diffusion_pytorch_model.safetensors')
ERROR_CASES = {
    'missing weights': (lambda root: os.remove(os.path.join(root, VAE_WEIGHTS)),
                        ['vae', 'diffusion_pytorch_model.safetensors']),
    'missing scheduler': (lambda root: os.remove(os.path.join(root, 'scheduler',
                                                              'scheduler_config.json')),
                          ['missing', 'scheduler_config.json']),
    'missing text encoder': (lambda root: os.remove(os.path.join(root, 'text_encoder',
                                                                 'model.safetensors')),
                             ['text_encoder', 'model.safetensors']),
    'shape mismatch': (lambda root: _edit_weights(os.path.join(root, UNET_WEIGHTS),
                                                  _truncate_conv_in_bias),
                       ['shape mismatch', 'conv_in.bias', '(15,)', '(16,)']),
    'unexpected key': (lambda root: _edit_weights(
        os.path.join(root, UNET_WEIGHTS),
        lambda s: s.update({'extra_head.weight': np.zeros((2, 2), np.float32)})),
        ['unexpected (1)', 'extra_head.weight', 'missing (0)']),
    'missing key': (lambda root: _edit_weights(os.path.join(root, VAE_WEIGHTS),
                                               lambda s: s.pop('decoder.conv_out.bias')),
                    ['missing (1)', 'decoder.conv_out.bias', 'unexpected (0)']),
}


@pytest.mark.parametrize('case', sorted(ERROR_CASES))
def test_errors_name_the_problem(pipeline, tmp_path, capsys, case):
  root = str(tmp_path / 'src')
  shutil.copytree(pipeline, root)
  damage, expected = ERROR_CASES[case]
  damage(root)
  code, err = _run_main(['sd', '--src', root, '--out', str(tmp_path / 'out')], capsys)
  assert code == 1
  assert err.startswith('convert_weights sd: error:') and 'Traceback' not in err
  for text in expected:
    assert text in err, (text, err)


def test_pickle_needs_allow_pickle(pipeline, converted, tmp_path, capsys):
  root = str(tmp_path / 'src')
  shutil.copytree(pipeline, root)
  for sub, stem, pickle_name in (('unet', 'diffusion_pytorch_model', 'diffusion_pytorch_model.bin'),
                                 ('text_encoder', 'model', 'pytorch_model.bin')):
    weights = os.path.join(root, sub, stem + '.safetensors')
    torch.save({k: torch.from_numpy(v) for k, v in load_file(weights).items()},
               os.path.join(root, sub, pickle_name))
    os.remove(weights)
  code, err = _run_main(['sd', '--src', root, '--out', str(tmp_path / 'refused')], capsys)
  assert code == 1 and '--allow-pickle' in err and 'diffusion_pytorch_model.bin' in err
  out = str(tmp_path / 'out')
  code, err = _run_main(['sd', '--src', root, '--out', out, '--allow-pickle'], capsys)
  assert code == 0, err
  _, from_pickle = pretrained.load_unet(out)
  _, from_safetensors = pretrained.load_unet(converted)
  _assert_trees_equal(from_pickle, from_safetensors)
  np.testing.assert_array_equal(np.asarray(pretrained.load_prompt_embeds(out)),
                                np.asarray(pretrained.load_prompt_embeds(converted)))


def test_text_encoder_pickle_refused(pipeline, tmp_path, capsys):
  root = str(tmp_path / 'src')
  shutil.copytree(pipeline, root)
  weights = os.path.join(root, 'text_encoder', 'model.safetensors')
  torch.save({k: torch.from_numpy(v) for k, v in load_file(weights).items()},
             os.path.join(root, 'text_encoder', 'pytorch_model.bin'))
  os.remove(weights)
  code, err = _run_main(['sd', '--src', root, '--out', str(tmp_path / 'out')], capsys)
  assert code == 1 and 'pytorch_model.bin' in err and '--allow-pickle' in err


def test_unknown_source(tmp_path, capsys):
  code, err = _run_main(['dinov3', '--src', str(tmp_path / 'nowhere'), '--out', str(tmp_path)],
                        capsys)
  assert code == 1 and 'no such folder' in err


def test_offline_unknown_hub_id(tmp_path):
  env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), JAX_PLATFORMS='cpu')
  env.pop('HF_HUB_CACHE', None)
  result = subprocess.run(
      [sys.executable, '-m', 'convert_weights', 'sd', '--src', 'nobody-here/no-such-model',
       '--out', str(tmp_path / 'out')], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
      timeout=120)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr, result.stderr
  assert 'nobody-here/no-such-model' in result.stderr and 'HF_HUB_OFFLINE' in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
