"""DINOv3-ViT weights: Flax <-> transformers state dicts are exact inverses (sr_jax.weights).

* Full-size ViT-B/16 and ViT-H+/16 (gated): our ``jax.eval_shape`` params and the meta-device
  transformers model have the same keys and shapes in both directions.
* Tiny models (no registers; gated with a K bias and no MLP biases): ``flax_to_state_dict`` loads
  with ``load_state_dict(strict=True)`` and converts back to the same params; a folder written by
  ``write_hub_folder`` loads in transformers with no missing key and back as the identity.
* ``common.random_params`` has a rule for every ViT leaf.
"""
import numpy as np
import pytest
from flax import traverse_util

from convert_weights.dinov3_original import VIT_PRESETS
from convert_weights.export import write_hub_folder
from sr_jax import pretrained
from sr_jax.methods import common
from sr_jax.weights import (convert_state_dict, flax_to_state_dict, flax_to_torch_shapes,
                            torch_key_to_flax_path, torch_to_flax_array)

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

PREFIX = pretrained.KNOWN_PREFIXES['dinov3_vit'][0]  # `model.` in memory, none on disk
TINY = {
    'no_registers': dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, patch_size=4, num_register_tokens=0),
    'gated_key_bias_no_mlp_bias': dict(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        patch_size=4, num_register_tokens=2, use_gated_mlp=True, hidden_act='silu',
        key_bias=True, mlp_bias=False, proj_bias=False),
}


def _torch_config(config):
  return transformers.DINOv3ViTConfig(
      **{k: v for k, v in config.items() if k not in ('model_type', 'architectures')})


def _disk_state(model):
  return {k.removeprefix(PREFIX): v for k, v in model.state_dict().items()}


def _assert_trees_equal(got, want):
  got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_array_equal(np.asarray(got[path]), want[path], err_msg='/'.join(path))


@pytest.mark.parametrize('name', ['vitb16', 'vith16plus'])
def test_full_size_keys_and_shapes_map_both_ways(name):
  config = VIT_PRESETS[name]
  abstract = pretrained.abstract_params(pretrained.build_model('dinov3_vit', config))
  with torch.device('meta'):
    shapes = {k: tuple(v.shape) for k, v in
              _disk_state(transformers.DINOv3ViTModel(_torch_config(config))).items()}
  assert flax_to_torch_shapes(abstract) == shapes
  flax_shapes = {p: tuple(leaf.shape) for p, leaf in traverse_util.flatten_dict(abstract).items()}
  mapped = {}
  for key, shape in shapes.items():
    path = torch_key_to_flax_path(key, len(shape))
    mapped[path] = torch_to_flax_array(np.zeros(shape, np.uint8), path[-1]).shape
  assert mapped == flax_shapes


def _random_params(config, seed):
  shapes = pretrained.abstract_params(pretrained.build_model('dinov3_vit', config))
  rng = np.random.default_rng(seed)
  params = traverse_util.unflatten_dict({
      p: rng.standard_normal(s.shape).astype(np.float32)
      for p, s in traverse_util.flatten_dict(shapes).items()})
  return params, shapes


@pytest.mark.parametrize('name', sorted(TINY))
def test_state_dict_loads_strict_and_converts_back_exactly(name):
  params, shapes = _random_params(TINY[name], 0)
  state = flax_to_state_dict(params)
  model = transformers.DINOv3ViTModel(_torch_config(TINY[name]))
  model.load_state_dict({(PREFIX + k if k.startswith('layer.') else k): torch.from_numpy(v)
                         for k, v in state.items()}, strict=True)
  loaded = {k: v.numpy() for k, v in _disk_state(model).items()}
  assert set(loaded) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  _assert_trees_equal(convert_state_dict(loaded, shapes), params)


@pytest.mark.parametrize('name', sorted(TINY))
def test_written_hub_folder_loads_upstream_and_back(name, tmp_path):
  params, _ = _random_params(TINY[name], 1)
  config = dict(TINY[name], model_type='dinov3_vit')
  folder = write_hub_folder(str(tmp_path / name), 'dinov3_vit', config, params)
  model, info = transformers.DINOv3ViTModel.from_pretrained(folder, output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  state = flax_to_state_dict(params)
  for key, value in _disk_state(model).items():
    np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)
  module, back = pretrained.load_dinov3(folder)
  assert module.num_prefix_tokens == 1 + TINY[name]['num_register_tokens']
  _assert_trees_equal(back, params)


def test_random_params_rules():
  config = dict(TINY['gated_key_bias_no_mlp_bias'], layerscale_value=0.25)
  module = pretrained.build_model('dinov3_vit', config)
  params = common.random_params('dinov3_vit', module, seed=3)
  emb = params['embeddings']
  assert np.all(emb['mask_token'] == 0)
  for token in (emb['cls_token'], emb['register_tokens']):
    assert 0 < np.std(token) < 0.05 and np.max(np.abs(token)) <= 0.04 * 1.14 + 1e-6
  assert np.all(params['layer_1']['layer_scale1']['lambda1'] == 0.25)
  again = common.random_params('dinov3_vit', module, seed=3)
  _assert_trees_equal(again, params)
