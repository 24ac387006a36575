"""DINOv3-ViT checkpoints in the original torch-hub layout (``facebookresearch/dinov3``, e.g.
``dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth``) -> transformers ``DINOv3ViTModel`` keys and config.

The original ``DinoVisionTransformer`` (``dinov3/models/vision_transformer.py``,
``dinov3/layers/{attention,ffn_layers,rope_position_encoding}.py``) stores::

  cls_token (1,1,C)  storage_tokens (1,R,C)  mask_token (1,C)  patch_embed.proj.{weight,bias}
  rope_embed.periods (head_dim/4,)           norm.{weight,bias}
  blocks.<i>.{norm1, norm2}.{weight,bias}    blocks.<i>.ls{1,2}.gamma
  blocks.<i>.attn.qkv.{weight (3C,C), bias (3C), bias_mask (3C)}  blocks.<i>.attn.proj.{weight,bias}
  blocks.<i>.mlp.{fc1,fc2}.*  (ffn "mlp")  or  blocks.<i>.mlp.{w1,w2,w3}.*  (SwiGLU, "plus" sizes)

The mapping follows transformers' ``convert_dinov3_vit_to_hf.py``: qkv split in three along the
output axis (rows ordered q, k, v); the effective qkv bias is ``bias * bias_mask``
(``LinearKMaskedBias``), whose K third is 0 in the released models, so the K bias is dropped
(``key_bias=False``; a checkpoint whose mask keeps it, or without a mask, gets ``key_bias=True``);
SwiGLU ``w1, w2, w3`` are ``gate_proj, up_proj, down_proj`` (``w3(silu(w1 x) * w2 x)``); the mask
token becomes (1,1,C); ``periods`` are checked against ``rope_theta`` and dropped (transformers
recomputes ``inv_freq = 1 / periods``). ``local_cls_norm`` (applied only to local crops in training)
is dropped; any other unknown key is reported as unexpected under its original name.

The config comes from a preset (:data:`VIT_PRESETS`, the values of transformers'
``get_dinov3_config`` and the original hub builders) or, without one, from the tensor shapes
(:func:`infer_config`): hidden size, channels and patch from ``patch_embed``, depth from the blocks,
heads from ``periods`` (head_dim = 4 len(periods)), ``rope_theta`` from the periods, registers,
MLP kind and width, and the biases. ``layer_norm_eps`` is not in the file: 1e-5, as every released
ViT ("layernormbf16").
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from sr_jax.weights import CheckpointError

_BASE = dict(
    model_type='dinov3_vit', architectures=['DINOv3ViTModel'], patch_size=16, num_channels=3,
    image_size=224, num_register_tokens=4, layer_norm_eps=1e-5, rope_theta=100.0,
    layerscale_value=1.0, query_bias=True, key_bias=False, value_bias=True, proj_bias=True,
    mlp_bias=True, hidden_act='gelu', use_gated_mlp=False, initializer_range=0.02,
    attention_dropout=0.0, drop_path_rate=0.0, pos_embed_shift=None, pos_embed_jitter=None,
    pos_embed_rescale=2.0)
_GATED = dict(use_gated_mlp=True, hidden_act='silu')
# name -> DINOv3ViTConfig dict. SwiGLU width: int(ratio C 2/3) rounded up to a multiple of 8.
VIT_PRESETS: dict[str, dict[str, Any]] = {
    'vits16': dict(_BASE, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                   intermediate_size=1536),
    'vits16plus': dict(_BASE, **_GATED, hidden_size=384, num_hidden_layers=12,
                       num_attention_heads=6, intermediate_size=1536),
    'vitb16': dict(_BASE, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                   intermediate_size=3072),
    'vitl16': dict(_BASE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                   intermediate_size=4096),
    'vith16plus': dict(_BASE, **_GATED, hidden_size=1280, num_hidden_layers=32,
                       num_attention_heads=20, intermediate_size=5120),
}
DROPPED_PREFIXES = ('local_cls_norm.',)
_BLOCK = re.compile(r'blocks\.(\d+)\.(.+)')
_BLOCK_RENAMES = {
    'norm1.weight': 'norm1.weight', 'norm1.bias': 'norm1.bias',
    'norm2.weight': 'norm2.weight', 'norm2.bias': 'norm2.bias',
    'attn.proj.weight': 'attention.o_proj.weight', 'attn.proj.bias': 'attention.o_proj.bias',
    'ls1.gamma': 'layer_scale1.lambda1', 'ls2.gamma': 'layer_scale2.lambda1',
    'mlp.fc1.weight': 'mlp.up_proj.weight', 'mlp.fc1.bias': 'mlp.up_proj.bias',
    'mlp.fc2.weight': 'mlp.down_proj.weight', 'mlp.fc2.bias': 'mlp.down_proj.bias',
    'mlp.w1.weight': 'mlp.gate_proj.weight', 'mlp.w1.bias': 'mlp.gate_proj.bias',
    'mlp.w2.weight': 'mlp.up_proj.weight', 'mlp.w2.bias': 'mlp.up_proj.bias',
    'mlp.w3.weight': 'mlp.down_proj.weight', 'mlp.w3.bias': 'mlp.down_proj.bias',
}
_TOP_RENAMES = {
    'cls_token': 'embeddings.cls_token', 'storage_tokens': 'embeddings.register_tokens',
    'patch_embed.proj.weight': 'embeddings.patch_embeddings.weight',
    'patch_embed.proj.bias': 'embeddings.patch_embeddings.bias',
    'norm.weight': 'norm.weight', 'norm.bias': 'norm.bias',
}


def is_original_layout(state: Mapping[str, Any]) -> bool:
  """Whether a state dict has the original torch-hub key names (``blocks.0...``, ``patch_embed``)."""
  return 'patch_embed.proj.weight' in state or any(k.startswith('blocks.') for k in state)


def find_pth(src: str) -> str | None:
  """The ``.pth`` of ``src``: ``src`` itself, or the one ``.pth`` of a folder without hub weights
  (``config.json`` + ``model.safetensors``); None when ``src`` is not of that layout."""
  if os.path.isfile(src):
    if not src.endswith(('.pth', '.pt')):
      raise CheckpointError(f'{src}: expected a torch-hub .pth file or a model folder')
    return src
  if not os.path.isdir(src) or os.path.isfile(os.path.join(src, 'config.json')):
    return None
  found = sorted(n for n in os.listdir(src) if n.endswith('.pth'))
  if len(found) > 1:
    raise CheckpointError(f'{src} holds several .pth files {found}: pass the file itself as --src')
  return os.path.join(src, found[0]) if found else None


def _block_count(state: Mapping[str, Any]) -> int:
  indices = {int(m.group(1)) for m in map(_BLOCK.fullmatch, state) if m}
  if indices != set(range(len(indices))):
    raise CheckpointError(f'blocks are not numbered 0..n-1: {sorted(indices)}')
  return len(indices)


def _qkv_bias_parts(state: Mapping[str, np.ndarray], block: int, hidden: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """(q, k, v) effective biases of one block (``bias * bias_mask``), None without a qkv bias."""
  bias = state.get(f'blocks.{block}.attn.qkv.bias')
  if bias is None:
    return None
  mask = state.get(f'blocks.{block}.attn.qkv.bias_mask')
  bias = np.asarray(bias, np.float32) * (1.0 if mask is None else np.asarray(mask, np.float32))
  if not np.all(np.isfinite(bias)):
    raise CheckpointError(f'blocks.{block}.attn.qkv.bias * bias_mask is not finite (an '
                          'uninitialised bias_mask?)')
  return bias[:hidden], bias[hidden:2 * hidden], bias[2 * hidden:]


def _key_bias_kept(state: Mapping[str, np.ndarray]) -> bool:
  """False when every block masks its K bias (``bias_mask`` K third all 0), True when none does."""
  kept = set()
  for i in range(_block_count(state)):
    mask = state.get(f'blocks.{i}.attn.qkv.bias_mask')
    if f'blocks.{i}.attn.qkv.bias' not in state:
      kept.add(False)
    elif mask is None:
      kept.add(True)
    else:
      third = len(mask) // 3
      kept.add(bool(np.any(np.asarray(mask)[third:2 * third] != 0)))
  if len(kept) > 1:
    raise CheckpointError('blocks disagree on whether the K bias is masked (attn.qkv.bias_mask)')
  return kept.pop() if kept else False


def rope_theta_from_periods(periods: np.ndarray) -> float:
  """``base`` with ``periods[k] = base ** (4 k / head_dim)`` (rope_position_encoding.py); a
  checkpoint built from min/max periods instead has no transformers equivalent and is refused."""
  periods = np.asarray(periods, np.float64)
  head_dim = 4 * len(periods)
  if len(periods) < 2:
    raise CheckpointError(f'rope_embed.periods has {len(periods)} entries: cannot infer rope_theta')
  base = float(periods[1] ** (head_dim / 4))
  if abs(base - round(base)) <= 1e-4 * base:
    base = float(round(base))
  want = base ** (4 * np.arange(len(periods)) / head_dim)
  if not np.allclose(periods, want, rtol=1e-4):
    raise CheckpointError('rope_embed.periods are not base ** (4 k / head_dim) for any base '
                          '(min/max-period RoPE is not supported by DINOv3ViTModel)')
  return base


def infer_config(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """A transformers ``DINOv3ViTConfig`` dict from the shapes of an original-layout state dict."""
  for key in ('patch_embed.proj.weight', 'rope_embed.periods', 'blocks.0.attn.qkv.weight'):
    if key not in state:
      raise CheckpointError(f'cannot infer the DINOv3-ViT config: the checkpoint has no {key} '
                            f'(pass --variant, one of {sorted(VIT_PRESETS)})')
  hidden, channels, patch_h, patch_w = np.shape(state['patch_embed.proj.weight'])
  head_dim = 4 * len(state['rope_embed.periods'])
  gated = 'blocks.0.mlp.w1.weight' in state
  up = state['blocks.0.mlp.w1.weight' if gated else 'blocks.0.mlp.fc1.weight']
  if patch_h != patch_w:
    raise CheckpointError(f'patch_embed.proj.weight: non-square patch {patch_h}x{patch_w}')
  if hidden % head_dim:
    raise CheckpointError(f'rope_embed.periods implies head_dim {head_dim}, which does not divide '
                          f'the hidden size {hidden}')
  registers = np.shape(state['storage_tokens'])[1] if 'storage_tokens' in state else 0
  has_qkv_bias = 'blocks.0.attn.qkv.bias' in state
  return dict(
      _BASE, **(_GATED if gated else {}), hidden_size=int(hidden), num_channels=int(channels),
      patch_size=int(patch_h), num_hidden_layers=_block_count(state),
      num_attention_heads=int(hidden // head_dim), intermediate_size=int(np.shape(up)[0]),
      num_register_tokens=int(registers), rope_theta=rope_theta_from_periods(
          state['rope_embed.periods']), query_bias=has_qkv_bias, value_bias=has_qkv_bias,
      key_bias=_key_bias_kept(state), proj_bias='blocks.0.attn.proj.bias' in state,
      mlp_bias=f'blocks.0.mlp.{"w1" if gated else "fc1"}.bias' in state)


def _check_periods(state: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
  periods = state.get('rope_embed.periods')
  if periods is None:
    return
  head_dim = config['hidden_size'] // config['num_attention_heads']
  want = config['rope_theta'] ** (4 * np.arange(head_dim // 4) / head_dim)
  if np.shape(periods) != want.shape or not np.allclose(periods, want, rtol=1e-4):
    raise CheckpointError(
        f'rope_embed.periods {np.shape(periods)} do not match head_dim {head_dim} and rope_theta '
        f'{config["rope_theta"]} of the config (wrong --variant?)')


def _rename(key: str) -> str | None:
  """The transformers (disk) key of one original key, None for keys handled elsewhere."""
  if key in _TOP_RENAMES:
    return _TOP_RENAMES[key]
  found = _BLOCK.fullmatch(key)
  if found and found.group(2) in _BLOCK_RENAMES:
    return f'layer.{found.group(1)}.{_BLOCK_RENAMES[found.group(2)]}'
  return None


def to_transformers_state(state: Mapping[str, np.ndarray], config: Mapping[str, Any]
                          ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Original-layout state dict -> (transformers disk-key state dict, transformers key -> original
  key). Unknown original keys are passed through under their own name (so that conversion reports
  them as unexpected); layer scales absent from the file (``layerscale_init=None``) become ones."""
  hidden = config['hidden_size']
  out: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}

  def put(new: str, value: np.ndarray, old: str) -> None:
    out[new], origin[new] = np.asarray(value), old

  _check_periods(state, config)
  for key, value in state.items():
    found = _BLOCK.fullmatch(key)
    if key == 'mask_token':
      put('embeddings.mask_token', np.reshape(value, (1, 1, -1)), key)
    elif key == 'rope_embed.periods' or key.startswith(DROPPED_PREFIXES):
      continue
    elif found and found.group(2) == 'attn.qkv.weight':
      q, k, v = np.split(np.asarray(value), 3, axis=0)
      for name, part in (('q', q), ('k', k), ('v', v)):
        put(f'layer.{found.group(1)}.attention.{name}_proj.weight', part, key)
    elif found and found.group(2) == 'attn.qkv.bias':
      q, k, v = _qkv_bias_parts(state, int(found.group(1)), hidden)
      if not config['key_bias'] and np.any(k != 0):
        raise CheckpointError(f'{key}: the K bias is neither masked (bias_mask) nor zero, but the '
                              'config has key_bias=False')
      for name, part, kept in (('q', q, config['query_bias']), ('k', k, config['key_bias']),
                               ('v', v, config['value_bias'])):
        if kept:
          put(f'layer.{found.group(1)}.attention.{name}_proj.bias', part, key)
    elif found and found.group(2) == 'attn.qkv.bias_mask':
      continue  # folded into the biases above
    else:
      new = _rename(key)
      put(new if new is not None else key, value, key)
  if 'embeddings.register_tokens' not in out and config['num_register_tokens'] == 0:
    put('embeddings.register_tokens', np.zeros((1, 0, hidden), np.float32), '(none)')
  for i in range(config['num_hidden_layers']):
    for k in (1, 2):
      if f'blocks.{i}.ls{k}.gamma' not in state:
        put(f'layer.{i}.layer_scale{k}.lambda1', np.ones((hidden,), np.float32), '(none)')
  return out, origin


def check_against(converted: Mapping[str, np.ndarray], origin: Mapping[str, str],
                  expected: Mapping[str, tuple[int, ...]]) -> None:
  """Names every mismatch by its original key: unexpected keys, missing ones, shape mismatches
  (``expected``: transformers key -> torch-layout shape, e.g. ``weights.flax_to_torch_shapes``)."""
  for key, value in converted.items():
    if key in expected and tuple(np.shape(value)) != tuple(expected[key]):
      raise CheckpointError(
          f'shape mismatch for {origin.get(key, key)} (as {key}): checkpoint '
          f'{tuple(np.shape(value))}, the config expects {tuple(expected[key])} (wrong --variant?)')
  unexpected = sorted(origin.get(k, k) for k in converted if k not in expected)
  missing = sorted(k for k in expected if k not in converted)
  if missing or unexpected:
    raise CheckpointError(
        'original DINOv3-ViT checkpoint keys do not match the config:\n'
        f'  missing ({len(missing)}, transformers names): {missing}\n'
        f'  unexpected ({len(unexpected)}, original names): {unexpected}')


def convert_pth(path: str, out: str, *, arch: str | None = None, dtype: str = 'float32',
                allow_pickle: bool = False, source: str | None = None) -> str:
  """Converts an original-layout ``.pth`` into a converted ``dinov3_vit`` folder at ``out``
  (``config.json`` = the preset ``arch`` or the inferred config, in transformers' form)."""
  from sr_jax import pretrained, weights  # pylint: disable=g-import-not-at-top  (imports jax)

  if not allow_pickle:
    raise CheckpointError(
        f'{path} is a torch pickle (the original torch-hub layout); loading pickles runs arbitrary '
        'code, so it is refused unless you pass --allow-pickle (trusted files only)')
  if arch is not None and arch not in VIT_PRESETS:
    raise CheckpointError(f'--variant {arch!r}: for a .pth source --variant names the architecture, '
                          f'one of {sorted(VIT_PRESETS)} (or leave it out to infer it from the '
                          'shapes)')
  state = weights.read_state_dict([path])  # torch.load(weights_only=True)
  if not is_original_layout(state):
    raise CheckpointError(f'{path}: not the original DINOv3-ViT layout (no patch_embed.proj.weight '
                          f'or blocks.*); keys start {sorted(state)[:5]}')
  config = dict(VIT_PRESETS[arch]) if arch else infer_config(state)
  module = pretrained.build_model('dinov3_vit', config)
  abstract = pretrained.abstract_params(module)
  converted, origin = to_transformers_state(state, config)
  try:
    check_against(converted, origin, weights.flax_to_torch_shapes(abstract))
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
  params = weights.convert_state_dict(converted, abstract)
  return pretrained.save_converted(out, 'dinov3_vit', config, params, source=source or path,
                                   dtype=dtype)
