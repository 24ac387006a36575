"""Flax DINOv3-ConvNeXt equals `transformers.DINOv3ConvNextModel` stage by stage.

A tiny random transformers model (every weight randomised, layer-scale gamma far from zero so the
blocks matter) is saved with `save_pretrained`, read back with numpy and converted with
`sr_jax.weights.convert_state_dict` without special cases.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.models.dinov3 import DINOv3ConvNextModel, imagenet_normalize
from sr_jax.weights import convert_state_dict, find_weight_files, read_state_dict

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

HIDDEN_SIZES = [16, 32, 48, 64]
DEPTHS = [1, 2, 2, 1]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Returns (flax model, flax params, NHWC input, list of NHWC reference stage outputs)."""
  torch.manual_seed(0)
  config = transformers.DINOv3ConvNextConfig(
      hidden_sizes=HIDDEN_SIZES, depths=DEPTHS, layer_scale_init_value=0.5)
  model = transformers.DINOv3ConvNextModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('gamma'):
        p.copy_(0.5 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1 and name.endswith('weight'):  # 1-D weights are exactly the LayerNorm scales
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:  # every bias non-zero
        p.copy_(0.1 * torch.randn_like(p))
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn_like(p) / np.sqrt(fan_in))
  folder = str(tmp_path_factory.mktemp('dinov3_convnext'))
  model.save_pretrained(folder)

  x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    out = model(x, output_hidden_states=True)
  # hidden_states[0] is the input itself; entries 1..4 are the stage outputs.
  assert len(out.hidden_states) == len(DEPTHS) + 1
  np.testing.assert_array_equal(out.hidden_states[0].numpy(), x.numpy())
  refs = [h.numpy().transpose(0, 2, 3, 1) for h in out.hidden_states[1:]]

  with open(os.path.join(folder, 'config.json')) as f:
    flax_model = DINOv3ConvNextModel.from_config(json.load(f))
  state = read_state_dict(find_weight_files(folder, 'model'))
  expected = jax.eval_shape(flax_model.init, jax.random.key(0), flax_model.dummy_inputs())['params']
  params = convert_state_dict(state, expected)
  return flax_model, params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), refs


def _max_err(out, ref):
  return float(np.max(np.abs(np.asarray(out, np.float32) - ref)))


def test_fp32_stage_outputs_match_transformers(reference):
  model, params, x, refs = reference
  outs = jax.jit(model.apply)({'params': params}, x)
  assert len(outs) == 4
  for i, (out, ref) in enumerate(zip(outs, refs)):
    assert out.shape == ref.shape, (i, out.shape, ref.shape)
    err, scale = _max_err(out, ref), max(1.0, float(np.max(np.abs(ref))))
    assert err <= 1e-4 * scale, f'stage {i}: max err {err:.3g}, scale {scale:.3g}'


def test_bf16_compute_close(reference):
  model, params, x, refs = reference
  bf16 = model.clone(dtype=jnp.bfloat16)
  outs = jax.jit(bf16.apply)({'params': params}, x)
  for i, (out, ref) in enumerate(zip(outs, refs)):
    assert out.dtype == jnp.bfloat16
    err, scale = _max_err(out, ref), float(np.max(np.abs(ref)))
    assert err <= 2e-2 * scale, f'stage {i}: bf16 max err {err:.3g}, scale {scale:.3g}'


def test_stage_chaining_and_num_stages(reference):
  model, params, x, _ = reference
  full = jax.jit(model.apply)({'params': params}, x)
  first3 = jax.jit(model.apply, static_argnums=2)({'params': params}, x, 3)
  assert len(first3) == 3
  run_stage = jax.jit(lambda p, h, i: model.apply({'params': p}, h, i, method='stage'),
                      static_argnums=2)
  h = x
  for i in range(4):
    h = run_stage(params, h, i)
    np.testing.assert_allclose(np.asarray(h), np.asarray(full[i]), rtol=0, atol=1e-5)
    if i < 3:
      np.testing.assert_allclose(np.asarray(first3[i]), np.asarray(full[i]), rtol=0, atol=1e-5)


def test_imagenet_normalize():
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 5, 7, 3)), jnp.float32)
  mean = np.array([0.485, 0.456, 0.406])
  std = np.array([0.229, 0.224, 0.225])
  want = ((np.asarray(images) * 0.5 + 0.5) - mean) / std
  np.testing.assert_allclose(np.asarray(imagenet_normalize(images)), want, rtol=1e-6, atol=1e-6)
