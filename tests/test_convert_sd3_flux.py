"""`python -m convert_weights sd3` / `flux` on tiny random diffusers pipelines, and their errors.

The pipelines (`tiny_pipelines`: SD3.5-like MMDiT with a dual-attention block, FLUX.1-dev-like
transformer, 16-channel VAEs without quant convs, CLIP-L / CLIP-G / T5 text encoders, offline
tokenizers) are built in memory and saved with `save_pretrained(max_shard_size=30KB)`, so every
part is a sharded checkpoint with an index as the hub's large models are. The converter writes
its own shards (`--max-shard-size 20KB`). Checked: the converted transformer equals diffusers'
output on the stored prompt embeddings (fp32 <= 1e-4 x scale), the converted params equal the raw
folder's bitwise, the embeddings equal the pipelines' own `encode_prompt` bitwise, and each broken
input ends in one `error:` line naming the file or key.
"""
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import convert_weights
from sr_jax import pretrained

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
tp = pytest.importorskip('tiny_pipelines')
import test_flux_vs_reference as flux_ref  # noqa: E402  (after the importorskips)
import test_mmdit_vs_reference as mmdit_ref  # noqa: E402

SD3_T5, FLUX_T5 = 10, 12
PROMPTS = ('', 'hello photo')


def _convert(name, pipe, tmp, extra=()):
  root, out = str(tmp / f'{name}_src'), str(tmp / f'{name}_out')
  pipe.save_pretrained(root, max_shard_size='30KB')
  length = SD3_T5 if name == 'sd3' else FLUX_T5
  assert convert_weights.main([name, '--src', root, '--out', out, '--prompt', PROMPTS[1],
                               '--max-sequence-length', str(length), '--max-shard-size', '20KB',
                               *extra]) == 0
  return root, out


@pytest.fixture(scope='module')
def sd3(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('sd3')
  pipe = tp.sd3_pipeline(str(tmp))
  root, out = _convert('sd3', pipe, tmp)
  return dict(pipe=pipe, root=root, out=out)


@pytest.fixture(scope='module')
def flux(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('flux')
  pipe = tp.flux_pipeline(str(tmp))
  root, out = _convert('flux', pipe, tmp)
  return dict(pipe=pipe, root=root, out=out)


def _stored(out):
  pairs = [pretrained.load_pooled_prompt_embeds(out, p) for p in PROMPTS]
  return (np.concatenate([np.asarray(e) for e, _ in pairs]),
          np.concatenate([np.asarray(p) for _, p in pairs]))


def _assert_trees_equal(a, b):
  import jax
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (path, x), (_, y) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_sd3_layout_and_params(sd3):
  out = sd3['out']
  assert set(os.listdir(out)) == {'transformer', 'vae', 'scheduler_config.json', 'sr_jax.json',
                                  'prompt_embeds.safetensors', 'prompt_embeds.json'}
  with open(os.path.join(out, 'sr_jax.json')) as f:
    assert json.load(f)['kind'] == 'sd3'
  with open(os.path.join(out, 'transformer', 'sr_jax.json')) as f:
    marker = json.load(f)
  assert (marker['kind'], marker['dtype'], marker['format_version']) == (
      'sd3_transformer', 'float32', 2)
  assert os.path.isfile(os.path.join(out, 'transformer', 'params.safetensors.index.json'))
  with open(os.path.join(out, 'scheduler_config.json')) as f:
    assert json.load(f)['shift'] == 3.0
  _, raw = pretrained.load_sd3_transformer(sd3['root'])
  _, ours = pretrained.load_sd3_transformer(out)
  _assert_trees_equal(raw, ours)
  _, raw_vae = pretrained.load_vae(sd3['root'])
  _, our_vae = pretrained.load_vae(out)
  _assert_trees_equal(raw_vae, our_vae)
  assert 'quant_conv' not in our_vae


def test_sd3_transformer_on_stored_embeddings_equals_diffusers(sd3):
  import jax
  model, params = pretrained.load_sd3_transformer(sd3['out'])
  context, pooled = _stored(sd3['out'])
  inputs = mmdit_ref.random_inputs(tp.SD3_TRANSFORMER)
  inputs.update(context=context, pooled=pooled)
  out = jax.jit(model.apply)({'params': params}, *mmdit_ref.flax_inputs(inputs))
  mmdit_ref.assert_close(out, mmdit_ref.torch_forward(sd3['pipe'].transformer, inputs),
                         'converted sd3 transformer on stored embeddings')


def _assert_float32_rounding(ours, ref):
  # The converter runs the pipeline's own float32 encoder ops, but in another call on freshly loaded
  # modules: the CPU BLAS may round the small projections differently (1 ulp seen on some CPUs).
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=4e-7, atol=1e-7)


@pytest.mark.parametrize('prompt', PROMPTS)
def test_sd3_embeddings_equal_pipeline_encode_prompt(sd3, prompt):
  with torch.no_grad():
    ref, _, ref_pooled, _ = sd3['pipe'].encode_prompt(
        prompt, None, None, do_classifier_free_guidance=False, max_sequence_length=SD3_T5)
  embeds, pooled = pretrained.load_pooled_prompt_embeds(sd3['out'], prompt)
  assert embeds.shape == (1, tp.CLIP_LENGTH + SD3_T5, tp.T5_WIDTH) and pooled.shape == (1, 40)
  _assert_float32_rounding(embeds, ref)
  _assert_float32_rounding(pooled, ref_pooled)
  assert np.all(np.asarray(embeds)[0, :tp.CLIP_LENGTH, 40:] == 0)  # CLIP channels zero-padded


def test_flux_transformer_and_embeddings_equal_diffusers(flux):
  import jax
  out = flux['out']
  with open(os.path.join(out, 'transformer', 'sr_jax.json')) as f:
    assert json.load(f)['kind'] == 'flux_transformer'
  model, params = pretrained.load_flux_transformer(out)
  _, raw = pretrained.load_flux_transformer(flux['root'])
  _assert_trees_equal(raw, params)
  for prompt in PROMPTS:
    with torch.no_grad():
      ref, ref_pooled, text_ids = flux['pipe'].encode_prompt(prompt, None,
                                                             max_sequence_length=FLUX_T5)
    embeds, pooled = pretrained.load_pooled_prompt_embeds(out, prompt)
    assert embeds.shape == (1, FLUX_T5, tp.T5_WIDTH) and not text_ids.any()
    _assert_float32_rounding(embeds, ref)
    _assert_float32_rounding(pooled, ref_pooled)
  context, pooled = _stored(out)
  latents = np.random.default_rng(0).standard_normal((2, 6, 10, 16)).astype(np.float32)
  ours = jax.jit(model.apply)({'params': params}, latents, flux_ref.SIGMAS, context, pooled,
                              flux_ref.GUIDANCE)
  ref = flux_ref.torch_forward(flux['pipe'].transformer, latents, flux_ref.SIGMAS, context, pooled,
                               flux_ref.GUIDANCE)
  flux_ref.assert_close(ours, ref, 'converted flux transformer on stored embeddings')


def test_sd_embeddings_have_no_pooled(tmp_path):
  pretrained.save_prompt_embeds(tmp_path, [''], [np.zeros((1, 3, 4), np.float32)], source='t')
  with pytest.raises(KeyError, match='no pooled'):
    pretrained.load_pooled_prompt_embeds(tmp_path)


# --- errors ----------------------------------------------------------------------------------------

TRANSFORMER = 'transformer'
WEIGHTS_INDEX = 'diffusion_pytorch_model.safetensors.index.json'


def _shard_of(root, key):
  with open(os.path.join(root, TRANSFORMER, WEIGHTS_INDEX)) as f:
    return os.path.join(root, TRANSFORMER, json.load(f)['weight_map'][key])


def _edit_key(root, key, edit):
  path = _shard_of(root, key)
  state = load_file(path)
  edit(state)
  save_file(state, path)


def _pickle_transformer(root):
  folder = os.path.join(root, TRANSFORMER)
  state = {}
  for name in os.listdir(folder):
    if name.endswith('.safetensors'):
      state.update(load_file(os.path.join(folder, name)))
      os.remove(os.path.join(folder, name))
  os.remove(os.path.join(folder, WEIGHTS_INDEX))
  torch.save({k: torch.from_numpy(v) for k, v in state.items()},
             os.path.join(folder, 'diffusion_pytorch_model.bin'))


BIAS = 'proj_out.bias'
ERROR_CASES = {
    'missing shard': (lambda root: os.remove(_shard_of(root, BIAS)),
                      [WEIGHTS_INDEX, 'which does not exist']),
    'missing key': (lambda root: _edit_key(root, BIAS, lambda s: s.pop(BIAS)),
                    ['missing (1)', BIAS, 'unexpected (0)']),
    'unexpected key': (lambda root: _edit_key(
        root, BIAS, lambda s: s.update({'extra_head.weight': np.zeros((2, 2), np.float32)})),
                       ['unexpected (1)', 'extra_head.weight', 'missing (0)']),
    'shape mismatch': (lambda root: _edit_key(root, BIAS, lambda s: s.update({BIAS: s[BIAS][:-1]})),
                       ['shape mismatch', BIAS, '(63,)', '(64,)']),
    'pickle refused': (_pickle_transformer, ['diffusion_pytorch_model.bin', '--allow-pickle']),
    'missing tokenizer': (lambda root: shutil.rmtree(os.path.join(root, 'tokenizer_3')),
                          ['missing', 'tokenizer_3']),
    'missing text encoder': (lambda root: os.remove(os.path.join(root, 'text_encoder_2',
                                                                 'model.safetensors.index.json')),
                             ['text_encoder_2', 'model.safetensors']),
    'missing scheduler': (lambda root: os.remove(os.path.join(root, 'scheduler',
                                                              'scheduler_config.json')),
                          ['missing', 'scheduler_config.json']),
}


@pytest.mark.parametrize('case', sorted(ERROR_CASES))
def test_errors_name_the_problem(sd3, tmp_path, capsys, case):
  root, out = str(tmp_path / 'src'), tmp_path / 'out'
  shutil.copytree(sd3['root'], root)
  damage, expected = ERROR_CASES[case]
  damage(root)
  code = convert_weights.main(['sd3', '--src', root, '--out', str(out)])
  err = capsys.readouterr().err
  assert code == 1
  assert err.startswith('convert_weights sd3: error:') and 'Traceback' not in err, err
  for text in expected:
    assert text in err, (text, err)
  if case.startswith('missing t'):  # inputs are checked before the transformer is converted
    assert not out.exists()


def test_pickle_with_allow_pickle_and_bad_shard_size(sd3, tmp_path, capsys):
  root = str(tmp_path / 'src')
  shutil.copytree(sd3['root'], root)
  _pickle_transformer(root)
  out = str(tmp_path / 'out')
  assert convert_weights.main(['sd3', '--src', root, '--out', out, '--allow-pickle',
                               '--max-sequence-length', str(SD3_T5)]) == 0, capsys.readouterr().err
  _, from_pickle = pretrained.load_sd3_transformer(out)
  _, reference = pretrained.load_sd3_transformer(sd3['out'])
  _assert_trees_equal(from_pickle, reference)
  assert os.path.isfile(os.path.join(out, TRANSFORMER, pretrained.PARAMS_FILE))
  capsys.readouterr()
  code = convert_weights.main(['flux', '--src', root, '--out', out, '--max-shard-size', 'lots'])
  err = capsys.readouterr().err
  assert code == 1 and err.startswith('convert_weights flux: error:') and "'lots'" in err
