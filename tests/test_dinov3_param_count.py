"""The Flax DINOv3-ConvNeXt-Large param tree has exactly the transformers parameter count."""
import jax
import numpy as np

from sr_jax.models.dinov3 import DINOv3ConvNextModel

# sum(p.numel() for p in transformers.DINOv3ConvNextModel(large_config).parameters()), counted on
# the meta device with transformers 5.23 (includes the final `layer_norm`, 2 x 1536).
LARGE_PARAMS = 196_230_336


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
