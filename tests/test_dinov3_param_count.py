"""The Flax DINOv3-ConvNeXt-Large and DINOv3-ViT-B/16 param trees have exactly the transformers
parameter counts (shapes from `jax.eval_shape`: no weights are materialised)."""
import jax
import numpy as np

from convert_weights.dinov3_original import VIT_PRESETS
from sr_jax.models.dinov3 import DINOv3ConvNextModel
from sr_jax.models.dinov3_vit import DINOv3ViTModel

# sum(p.numel() for p in transformers.DINOv3ConvNextModel(large_config).parameters()), counted on
# the meta device with transformers 5.23 (includes the final `layer_norm`, 2 x 1536).
LARGE_PARAMS = 196_230_336
# The same count for DINOv3ViTModel(get_dinov3_config("vitb")) (shared/reference/next-methods.md
# Sec. 2.2): 12 blocks of 7,087,872, embeddings 598,272 (incl. cls, mask and 4 register tokens)
# and the final norm.
VITB16_PARAMS = 85_660_416


def _count(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0), model.dummy_inputs())['params']
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))


def test_large_param_count():
  model = DINOv3ConvNextModel.from_config(
      {'hidden_sizes': [192, 384, 768, 1536], 'depths': [3, 3, 27, 3], 'layer_norm_eps': 1e-6,
       'layer_scale_init_value': 1e-6, 'hidden_act': 'gelu', 'num_channels': 3})
  assert _count(model) == LARGE_PARAMS


def test_param_paths_follow_checkpoint_keys():
  model = DINOv3ConvNextModel.from_config({'hidden_sizes': [8, 16, 24, 32], 'depths': [1, 1, 2, 1]})
  shapes = jax.eval_shape(model.init, jax.random.key(0), model.dummy_inputs())['params']
  assert shapes['stages_0']['downsample_layers_0']['kernel'].shape == (4, 4, 3, 8)
  assert shapes['stages_0']['downsample_layers_1']['scale'].shape == (8,)
  assert shapes['stages_1']['downsample_layers_0']['scale'].shape == (8,)
  assert shapes['stages_1']['downsample_layers_1']['kernel'].shape == (2, 2, 8, 16)
  assert shapes['stages_2']['layers_1']['gamma'].shape == (24,)
  assert shapes['stages_2']['layers_1']['depthwise_conv']['kernel'].shape == (7, 7, 1, 24)
  assert shapes['stages_3']['layers_0']['pointwise_conv1']['kernel'].shape == (32, 128)
  assert shapes['layer_norm']['scale'].shape == (32,)


def test_vitb16_param_count():
  model = DINOv3ViTModel.from_config(VIT_PRESETS['vitb16'])
  assert (model.hidden_size, model.num_hidden_layers, model.num_register_tokens) == (768, 12, 4)
  assert _count(model) == VITB16_PARAMS


def test_vit_param_paths_follow_checkpoint_keys():
  model = DINOv3ViTModel.from_config(dict(VIT_PRESETS['vitb16'], num_hidden_layers=2))
  shapes = jax.eval_shape(model.init, jax.random.key(0), model.dummy_inputs())['params']
  assert shapes['embeddings']['patch_embeddings']['kernel'].shape == (16, 16, 3, 768)
  assert shapes['embeddings']['register_tokens'].shape == (1, 4, 768)
  assert shapes['embeddings']['mask_token'].shape == (1, 1, 768)
  attention = shapes['layer_1']['attention']
  assert set(attention['k_proj']) == {'kernel'}  # no K bias
  assert set(attention['q_proj']) == set(attention['v_proj']) == {'kernel', 'bias'}
  assert shapes['layer_1']['layer_scale2']['lambda1'].shape == (768,)
  assert shapes['layer_0']['mlp']['up_proj']['kernel'].shape == (768, 3072)
  assert shapes['norm']['scale'].shape == (768,)
