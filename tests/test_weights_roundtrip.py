"""Flax -> PyTorch is the exact inverse of PyTorch -> Flax (sr_jax.weights) for every model we mirror.

* Names: every state-dict key of the diffusers UNet (SD2.1, SD1, with class and addition embeddings),
  the AutoencoderKL (with and without quant convs) and transformers DINOv3-ConvNeXt maps to a Flax
  path and back to itself (models built on torch's meta device: no weights).
* Full-size SD2.1-base UNet and VAE: our ``jax.eval_shape`` params and the diffusers meta-device
  model have the same keys with the same shapes, in both directions.
* Tiny models with random params: ``flax_to_state_dict`` loads with ``load_state_dict(strict=True)``
  and converts back to the same params; a folder written by ``convert_weights.export.
  write_hub_folder`` loads in diffusers / transformers with no missing key, and our raw-folder
  loader (``sr_jax.pretrained.load_*``) reads it back as the identity.
* A Flax name whose PyTorch key would be a guess raises with the path.
"""
import jax
import numpy as np
import pytest
from flax import traverse_util

from convert_weights.export import write_hub_folder
from sr_jax import pretrained, weights
from sr_jax.weights import (UnmappableNameError, convert_state_dict, flax_path_to_torch_key,
                            flax_to_state_dict, flax_to_torch_shapes, torch_key_to_flax_path,
                            torch_to_flax_array)

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')
td = pytest.importorskip('tiny_diffusers')

TINY_VAE_NO_QUANT = dict(td.TINY_VAE, use_quant_conv=False, use_post_quant_conv=False)
TINY_DINOV3 = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1], layer_scale_init_value=0.5)
# kind, config: the tiny models both frameworks build (our UNet has no class/addition embeddings).
TINY_MODELS = {
    'unet_sd21': ('unet', td.TINY_UNET_SD21),
    'unet_sd1': ('unet', td.TINY_UNET_SD1),
    'vae': ('vae', td.TINY_VAE),
    'vae_no_quant_convs': ('vae', TINY_VAE_NO_QUANT),
    'dinov3': ('dinov3', TINY_DINOV3),
}
UNET_WITH_EMBEDDINGS = dict(td.TINY_UNET_SD21, class_embed_type='timestep',
                            addition_embed_type='text_time', addition_time_embed_dim=8,
                            projection_class_embeddings_input_dim=56)
# transformers 5 holds the DINOv3 backbone under `model.` in memory but saves it un-prefixed (the
# hub layout our converter reads and write_hub_folder writes); the final layer_norm has no prefix.
DINOV3_MEMORY_PREFIX = pretrained.KNOWN_PREFIXES['dinov3'][0]


def torch_model(kind, config):
  """The PyTorch model of ``kind`` for a config dict (random weights, or meta under torch.device)."""
  if kind == 'unet':
    return diffusers.UNet2DConditionModel(**config)
  if kind == 'vae':
    return diffusers.AutoencoderKL(**config)
  return transformers.DINOv3ConvNextModel(transformers.DINOv3ConvNextConfig(**config))


def hub_state(kind, model) -> dict[str, 'torch.Tensor']:
  """``model.state_dict()`` with the keys of the model's files on disk."""
  state = model.state_dict()
  if kind == 'dinov3':
    state = {k.removeprefix(DINOV3_MEMORY_PREFIX): v for k, v in state.items()}
  return state


def to_memory_keys(kind, state):
  if kind != 'dinov3':
    return state
  return {(k if k.startswith('layer_norm') else DINOV3_MEMORY_PREFIX + k): v
          for k, v in state.items()}


def flax_config(kind, config):
  """What our from_config reads: diffusers config dicts as they are, transformers' to_dict()."""
  if kind == 'dinov3':
    return transformers.DINOv3ConvNextConfig(**config).to_dict()
  return config


def random_params(kind, config, seed=0):
  """Every leaf of our param tree drawn N(0, 1): no leaf (norm scale, bias, gamma) is 0 or 1."""
  shapes = pretrained.abstract_params(pretrained.build_model(kind, flax_config(kind, config)))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes), shapes


def assert_trees_equal(got, want):
  got, want = traverse_util.flatten_dict(got), traverse_util.flatten_dict(want)
  assert set(got) == set(want)
  for path in want:
    np.testing.assert_array_equal(np.asarray(got[path]), want[path], err_msg='/'.join(path))


# --------------------------------------------------------------------------------- names only

KEY_MODELS = {
    'unet_sd21_full': ('unet', td.SD21_BASE_UNET_CONFIG),
    'unet_sd1': ('unet', td.TINY_UNET_SD1),
    'unet_class_and_addition_embeddings': ('unet', UNET_WITH_EMBEDDINGS),
    'vae_full': ('vae', td.SD21_BASE_VAE_CONFIG),
    'vae_no_quant_convs': ('vae', TINY_VAE_NO_QUANT),
    'dinov3': ('dinov3', TINY_DINOV3),
}


@pytest.mark.parametrize('name', sorted(KEY_MODELS))
def test_every_torch_key_maps_to_flax_and_back_to_itself(name):
  kind, config = KEY_MODELS[name]
  with torch.device('meta'):
    state = hub_state(kind, torch_model(kind, config))
  back = {k: flax_path_to_torch_key(torch_key_to_flax_path(k, v.ndim)) for k, v in state.items()}
  assert {k: b for k, b in back.items() if b != k} == {}
  if kind == 'unet':  # the names that broke the old suffix rule are there
    assert 'time_embedding.linear_1.weight' in state
  if name == 'unet_class_and_addition_embeddings':
    assert {'class_embedding.linear_2.bias', 'add_embedding.linear_1.weight'} <= set(state)


def _flax_shape(torch_shape, flax_leaf):
  """The Flax-layout shape of a torch tensor shape, through torch_to_flax_array on a zero-stride view
  (no memory for full-size tensors)."""
  return torch_to_flax_array(np.broadcast_to(np.zeros((), np.uint8), torch_shape), flax_leaf).shape


@pytest.mark.parametrize('kind', ['unet', 'vae'])
def test_full_size_sd21_keys_and_shapes_map_both_ways(kind):
  config = {'unet': td.SD21_BASE_UNET_CONFIG, 'vae': td.SD21_BASE_VAE_CONFIG}[kind]
  abstract = pretrained.abstract_params(pretrained.build_model(kind, config))  # jax.eval_shape
  with torch.device('meta'):
    torch_shapes = {k: tuple(v.shape) for k, v in torch_model(kind, config).state_dict().items()}
  # Flax -> torch: the same key set, every shape in the torch layout.
  assert flax_to_torch_shapes(abstract) == torch_shapes
  # torch -> Flax: every key lands on one of our paths with our shape.
  flax_shapes = {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(abstract).items()}
  mapped = {}
  for key, shape in torch_shapes.items():
    path = torch_key_to_flax_path(key, len(shape))
    mapped[path] = _flax_shape(shape, path[-1])
  assert mapped == flax_shapes
  print(f'{kind}: {len(torch_shapes)} keys, '
        f'{sum(int(np.prod(s)) for s in torch_shapes.values()):,} parameters')


# --------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize('name', sorted(TINY_MODELS))
def test_flax_state_dict_loads_strict_and_converts_back_exactly(name):
  kind, config = TINY_MODELS[name]
  params, shapes = random_params(kind, config)
  state = flax_to_state_dict(params)
  model = torch_model(kind, config)
  model.load_state_dict(to_memory_keys(kind, {k: torch.from_numpy(v) for k, v in state.items()}),
                        strict=True)
  loaded = {k: v.numpy() for k, v in hub_state(kind, model).items()}
  assert set(loaded) == set(state)
  for key, value in state.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  assert_trees_equal(convert_state_dict(loaded, shapes), params)


@pytest.mark.parametrize('name', sorted(TINY_MODELS))
def test_written_hub_folder_loads_upstream_and_back_as_the_identity(name, tmp_path):
  kind, config = TINY_MODELS[name]
  params, _ = random_params(kind, config, seed=1)
  folder = write_hub_folder(str(tmp_path / name), kind, flax_config(kind, config), params)
  cls = type(torch_model(kind, config)) if kind != 'dinov3' else transformers.DINOv3ConvNextModel
  model, info = cls.from_pretrained(folder, output_loading_info=True)
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  state = flax_to_state_dict(params)
  for key, value in hub_state(kind, model).items():
    np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)
  _, back = pretrained.load_model(kind, folder)
  assert_trees_equal(back, params)


# --------------------------------------------------------------------------------- refusals


def test_names_that_would_be_guessed_raise_with_the_path():
  assert flax_path_to_torch_key(('time_embedding', 'linear_1', 'kernel')) == \
      'time_embedding.linear_1.weight'
  assert flax_path_to_torch_key(('down_blocks_1', 'resnets_0', 'norm1', 'scale')) == \
      'down_blocks.1.resnets.0.norm1.weight'
  with pytest.raises(UnmappableNameError, match='head/Dense_0/kernel'):
    flax_to_state_dict({'head': {'Dense_0': {'kernel': np.zeros((2, 2))}}})
  assert 'Dense' not in weights.LIST_MODULE_NAMES
  with pytest.raises(UnmappableNameError, match='norm/kernel and norm/scale'):
    flax_to_state_dict({'norm': {'kernel': np.zeros((2, 2)), 'scale': np.zeros((2,))}})
