"""Flax DINOv3-ViT equals `transformers.DINOv3ViTModel` (eval mode) hidden state by hidden state.

Tiny random transformers models (every weight randomised: norm scales and layer scales away from 1,
all biases non-zero, tokens N(0, 1)) are saved with `save_pretrained` and converted with the real
path, `python -m convert_weights dinov3` (convert_weights.main), then loaded with
`pretrained.load_dinov3`. The original torch-hub layout is built from the same weights (fused qkv
with a K-masking bias_mask and a non-zero K bias it must drop, periods, (1, C) mask token),
`torch.save`d and converted with --allow-pickle.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert_weights
from sr_jax import pretrained
from sr_jax.models.dinov3_vit import DINOv3ViTModel
from sr_jax.weights import CheckpointError

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# hidden 64 / 4 heads: head_dim 16 (torch's arange(0, 1, 4 / head_dim) is exact for powers of 2).
CONFIGS = {
    'plain': dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_register_tokens=4, patch_size=16),
    'gated': dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_register_tokens=1, patch_size=16, use_gated_mlp=True, hidden_act='silu'),
}
SIZES = ((48, 80), (35, 50))  # non-square; the second is not a multiple of the patch (floored)


def _randomise(model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('lambda1'):
        p.copy_(0.5 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1 and name.endswith('weight'):  # LayerNorm scales
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      elif 'token' in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))


def _run_main(argv, capsys):
  code = convert_weights.main(argv)
  return code, capsys.readouterr().err


def _max_err(out, ref):
  return float(np.max(np.abs(np.asarray(out, np.float32) - ref)))


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
  """(name, torch model, hub folder, {size: (NHWC input, [hidden states], last_hidden_state)})."""
  torch.manual_seed(0)
  model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**CONFIGS[request.param]))
  model = model.eval()
  _randomise(model)
  folder = str(tmp_path_factory.mktemp(f'dinov3_vit_{request.param}'))
  model.save_pretrained(folder)
  refs = {}
  for i, (height, width) in enumerate(SIZES):
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
      out = model(x, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    refs[(height, width)] = (jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                             [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy())
  return request.param, model, folder, refs


def _check_outputs(model, params, refs, label):
  """Every hidden state and final_norm(last) against transformers; returns the worst err / scale."""
  forward = jax.jit(model.apply)
  final = jax.jit(lambda p, h: model.apply({'params': p}, h, method='final_norm'))
  worst = 0.0
  for size, (x, hidden, last) in refs.items():
    ours = forward({'params': params}, x)
    assert isinstance(ours, tuple) and len(ours) == len(hidden)
    for i, (out, ref) in enumerate(zip(ours, hidden)):
      assert out.shape == ref.shape, (size, i, out.shape, ref.shape)
      err, scale = _max_err(out, ref), float(np.max(np.abs(ref)))
      assert err <= 1e-4 * scale, f'{label} {size} hidden_states[{i}]: err {err:.3g} scale {scale:.3g}'
      worst = max(worst, err / scale)
    err, scale = _max_err(final(params, ours[-1]), last), float(np.max(np.abs(last)))
    assert err <= 1e-4 * scale, f'{label} {size} final_norm: err {err:.3g}, scale {scale:.3g}'
    worst = max(worst, err / scale)
  print(f'{label}: max err / scale {worst:.2e}')
  return worst


def test_converted_hub_folder_matches_transformers(reference, tmp_path, capsys):
  name, torch_model, folder, refs = reference
  out = str(tmp_path / 'converted')
  code, err = _run_main(['dinov3', '--src', folder, '--out', out], capsys)
  assert code == 0, err
  with open(os.path.join(out, pretrained.MARKER_FILE)) as f:
    assert json.load(f)['kind'] == 'dinov3_vit'
  model, params = pretrained.load_dinov3(out)
  assert isinstance(model, DINOv3ViTModel)
  assert model.num_prefix_tokens == 1 + torch_model.config.num_register_tokens
  assert model.patch_size == 16
  _check_outputs(model, params, refs, f'{name} hub folder')
  # The raw folder loads to the same params.
  _, raw = pretrained.load_dinov3(folder)
  for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_num_layers_runs_a_prefix_of_the_blocks(reference):
  _, _, folder, refs = reference
  model, params = pretrained.load_dinov3(folder)
  x = refs[SIZES[0]][0]
  full = jax.jit(model.apply)({'params': params}, x)
  for k in (0, 2):
    part = jax.jit(model.apply, static_argnums=2)({'params': params}, x, k)
    assert len(part) == k + 1
    for a, b in zip(part, full):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match='num_layers'):
    model.apply({'params': params}, x, 4)


def test_bf16_compute_and_remat(reference):
  _, _, folder, refs = reference
  x, hidden, _ = refs[SIZES[0]]
  model, params = pretrained.load_dinov3(folder, dtype=jnp.bfloat16, remat=True)
  assert model.remat
  ours = jax.jit(model.apply)({'params': params}, x)
  for i, (out, ref) in enumerate(zip(ours, hidden)):
    assert out.dtype == jnp.bfloat16
    err, scale = _max_err(out, ref), float(np.max(np.abs(ref)))
    assert err <= 3e-2 * scale, f'hidden_states[{i}]: bf16 err {err:.3g}, scale {scale:.3g}'


def original_state_dict(torch_model):
  """The weights of ``torch_model`` in the original torch-hub layout (inverse of the conversion):
  fused qkv, bias_mask zeroing a non-zero K bias, periods, (1, C) mask token, fc1/fc2 or w1/w2/w3."""
  cfg, state = torch_model.config, torch_model.state_dict()
  hidden, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
  out = {'cls_token': state['embeddings.cls_token'],
         'storage_tokens': state['embeddings.register_tokens'],
         'mask_token': state['embeddings.mask_token'].reshape(1, hidden),
         'patch_embed.proj.weight': state['embeddings.patch_embeddings.weight'],
         'patch_embed.proj.bias': state['embeddings.patch_embeddings.bias'],
         'rope_embed.periods': cfg.rope_theta ** (
             4 * torch.arange(head_dim // 4, dtype=torch.float32) / head_dim),
         'norm.weight': state['norm.weight'], 'norm.bias': state['norm.bias']}
  mlp = ({'gate_proj': 'w1', 'up_proj': 'w2', 'down_proj': 'w3'} if cfg.use_gated_mlp
         else {'up_proj': 'fc1', 'down_proj': 'fc2'})
  for i in range(cfg.num_hidden_layers):
    src, dst = f'model.layer.{i}.', f'blocks.{i}.'
    att = src + 'attention.'
    out[dst + 'attn.qkv.weight'] = torch.cat([state[att + f'{n}_proj.weight'] for n in 'qkv'])
    k_bias = torch.randn(hidden)  # must be masked away
    out[dst + 'attn.qkv.bias'] = torch.cat([state[att + 'q_proj.bias'], k_bias,
                                            state[att + 'v_proj.bias']])
    out[dst + 'attn.qkv.bias_mask'] = torch.cat([torch.ones(hidden), torch.zeros(hidden),
                                                 torch.ones(hidden)])
    out[dst + 'attn.proj.weight'] = state[att + 'o_proj.weight']
    out[dst + 'attn.proj.bias'] = state[att + 'o_proj.bias']
    for k in (1, 2):
      out[dst + f'norm{k}.weight'] = state[src + f'norm{k}.weight']
      out[dst + f'norm{k}.bias'] = state[src + f'norm{k}.bias']
      out[dst + f'ls{k}.gamma'] = state[src + f'layer_scale{k}.lambda1']
    for ours, theirs in mlp.items():
      for leaf in ('weight', 'bias'):
        out[dst + f'mlp.{theirs}.{leaf}'] = state[src + f'mlp.{ours}.{leaf}']
  return {k: v.clone().contiguous() for k, v in out.items()}


def test_original_pth_layout(reference, tmp_path, capsys):
  name, torch_model, _, refs = reference
  pth = str(tmp_path / 'dinov3_tiny_pretrain.pth')
  torch.save(original_state_dict(torch_model), pth)
  code, err = _run_main(['dinov3', '--src', pth, '--out', str(tmp_path / 'refused')], capsys)
  assert code == 1 and '--allow-pickle' in err and 'Traceback' not in err
  out = str(tmp_path / 'from_pth')
  code, err = _run_main(['dinov3', '--src', str(tmp_path), '--out', out, '--allow-pickle'], capsys)
  assert code == 0, err
  with open(os.path.join(out, 'config.json')) as f:
    config = json.load(f)
  for key in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
              'num_register_tokens', 'use_gated_mlp', 'hidden_act', 'key_bias', 'rope_theta'):
    assert config[key] == getattr(torch_model.config, key), key
  transformers.DINOv3ViTConfig(**config)  # transformers reads the written config
  model, params = pretrained.load_dinov3(out)
  _check_outputs(model, params, refs, f'{name} original .pth')


def test_original_pth_errors_name_the_key(reference, tmp_path, capsys):
  _, torch_model, _, _ = reference
  pth = str(tmp_path / 'damaged.pth')

  def convert(state, *extra):
    torch.save(state, pth)
    return _run_main(['dinov3', '--src', pth, '--out', str(tmp_path / 'out'), '--allow-pickle',
                      *extra], capsys)

  state = original_state_dict(torch_model)
  code, err = convert({**state, 'head.weight': torch.zeros(2, 2)})
  assert code == 1 and 'head.weight' in err and 'unexpected (1' in err, err
  code, err = convert({**state, 'blocks.1.attn.proj.bias': state['blocks.1.attn.proj.bias'][:-1]})
  assert code == 1 and 'shape mismatch for blocks.1.attn.proj.bias' in err, err
  code, err = convert(state, '--variant', 'vitb16')  # head_dim 64, not 16
  assert code == 1 and 'rope_embed.periods' in err, err
  code, err = convert(state, '--variant', 'fp16')
  assert code == 1 and 'vitb16' in err, err
  assert not os.path.exists(tmp_path / 'out')


def test_kind_comes_from_the_folder(reference):
  _, _, folder, _ = reference
  with pytest.raises(CheckpointError, match="model_type 'dinov3_vit'"):
    pretrained.load_model('dinov3', folder)
  assert pretrained.dinov3_kind(folder) == 'dinov3_vit'
