"""LoRA through a method interceptor (sr_jax.models.lora), on a toy model named like diffusers.

Proves: PEFT target matching (suffixes, prefix, exclusions), shapes and init, B = 0 leaves the model
unchanged, the interceptor sees the right scope paths under jit and grad, the gradient w.r.t. the
LoRA tree never materialises a frozen-kernel-shaped array, merge == unmerged, and the PEFT state-dict /
adapter-folder round trip (no torch here; PEFT parity is in test_lora_vs_peft.py).
"""
import dataclasses
import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sr_jax.models import lora
from sr_jax.weights import CheckpointError, flax_path_to_torch_key

CONV3 = dict(kernel_size=(3, 3), padding=((1, 1), (1, 1)))


class ToyResnet(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, name='conv1', **CONV3)(nn.silu(x))
    h = nn.Conv(self.features, name='conv2', **CONV3)(nn.silu(h))
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), name='conv_shortcut')(x)
    return x + h


class ToyAttention(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)
    q, k, v = (nn.Dense(c, use_bias=False, name=n)(tokens) for n in ('to_q', 'to_k', 'to_v'))
    weights = jax.nn.softmax(jnp.einsum('bqc,bkc->bqk', q, k) / np.sqrt(c), axis=-1)
    out = nn.Dense(c, name='to_out_0')(jnp.einsum('bqk,bkc->bqc', weights, v))
    return x + out.reshape(b, h, w, c)


class ToyBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    x = ToyResnet(self.features, name='resnets_0')(x)
    x = ToyAttention(name='attentions_0')(x)
    return ToyDownsample(self.features, name='downsamplers_0')(x)


class ToyDownsample(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.features, strides=(2, 2), name='conv', **CONV3)(x)


class ToyEncoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, name='conv_in', **CONV3)(x)
    x = ToyBlock(12, name='down_blocks_0')(x)
    x = nn.Dense(12, name='proj_in')(x)  # not a target
    return nn.Conv(6, name='conv_out', **CONV3)(nn.silu(x))


class ToyDecoder(nn.Module):
  @nn.compact
  def __call__(self, z):
    h = nn.Conv(5, name='conv_in', **CONV3)(z)
    return nn.Conv(3, name='conv_out', **CONV3)(nn.silu(h))


class ToyNet(nn.Module):
  """encoder (conv_in, down_blocks.0.{resnets.0, attentions.0, downsamplers.0.conv}, proj_in, conv_out),
  quant_conv, decoder (conv_in, conv_out): every OMGSR target kind, plus look-alikes that must not
  match."""

  def setup(self):
    self.encoder = ToyEncoder()
    self.quant_conv = nn.Conv(6, (1, 1))
    self.decoder = ToyDecoder()

  def __call__(self, x):
    return self.decoder(self.quant_conv(self.encoder(x)))

  def encode(self, x):
    return self.encoder(x)


ALL_TARGETS = {
    'encoder.conv_in', 'encoder.down_blocks.0.resnets.0.conv1', 'encoder.down_blocks.0.resnets.0.conv2',
    'encoder.down_blocks.0.resnets.0.conv_shortcut', 'encoder.down_blocks.0.attentions.0.to_q',
    'encoder.down_blocks.0.attentions.0.to_k', 'encoder.down_blocks.0.attentions.0.to_v',
    'encoder.down_blocks.0.attentions.0.to_out.0', 'encoder.down_blocks.0.downsamplers.0.conv',
    'encoder.conv_out', 'decoder.conv_in', 'decoder.conv_out'}
CONFIG = lora.LoRAConfig(rank=4, alpha=8.0)


def toy_inputs(seed=0):
  return np.random.default_rng(seed).standard_normal((2, 8, 8, 3)).astype(np.float32)


def random_like(tree, seed, std):
  """numpy normal arrays shaped like ``tree`` (jax.random would compile one program per shape)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda l: (std * rng.standard_normal(l.shape)).astype(np.float32), tree)


@functools.lru_cache(maxsize=None)
def toy_params():
  """Kernels ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2): activations stay O(1)."""
  shapes = jax.eval_shape(ToyNet().init, jax.random.key(0), toy_inputs())['params']
  unit = random_like(shapes, seed=0, std=1.0)
  return traverse_util.unflatten_dict({
      path: (leaf / np.sqrt(np.prod(leaf.shape[:-1])) if path[-1] == 'kernel' else 0.1 * leaf
             ).astype(np.float32)
      for path, leaf in traverse_util.flatten_dict(unit).items()})


def random_lora(params, config, seed=1, std=0.1):
  """A LoRA tree with non-zero A and B (B = 0 at init would hide every mistake)."""
  return random_like(jax.eval_shape(
      functools.partial(lora.init_lora_params, config=config), jax.random.key(0), params),
                     seed, std)


def names(paths):
  return {flax_path_to_torch_key(p) for p in paths}


def test_targets_follow_peft_suffix_rules_prefix_and_exclusions():
  params = toy_params()
  assert names(lora.target_paths(params, CONFIG)) == ALL_TARGETS  # not quant_conv, not proj_in
  encoder_only = lora.LoRAConfig(rank=4, alpha=4, prefix='encoder')
  assert names(lora.target_paths(params, encoder_only)) == {n for n in ALL_TARGETS
                                                            if n.startswith('encoder.')}
  excluded = lora.LoRAConfig(rank=4, alpha=4, exclude_modules=['conv_in', 'attentions.0.to_k'])
  assert names(lora.target_paths(params, excluded)) == ALL_TARGETS - {
      'encoder.conv_in', 'decoder.conv_in', 'encoder.down_blocks.0.attentions.0.to_k'}
  regex = lora.LoRAConfig(rank=4, alpha=4, target_modules=r'.*attentions\.0\.to_[qkv]')
  assert len(lora.target_paths(params, regex)) == 3
  assert lora.module_matches(CONFIG, 'a.to_out.0') and not lora.module_matches(CONFIG, 'a.to_out.1')
  with pytest.raises(ValueError, match='match no Dense/Conv'):
    lora.target_paths(params, lora.LoRAConfig(rank=4, alpha=4, target_modules=['nope']))
  with pytest.raises(ValueError, match='match no Dense/Conv'):
    lora.target_paths(params, lora.LoRAConfig(rank=4, alpha=4, prefix='unet'))


@pytest.mark.parametrize('init', ['default', 'gaussian'])
def test_init_shapes_statistics_and_identity(init):
  params = toy_params()
  config = lora.LoRAConfig(rank=4, alpha=8, init=init)
  tree = lora.init_lora_params(jax.random.key(3), params, config)
  conv = tree['encoder']['down_blocks_0']['resnets_0']['conv1']
  assert conv['lora_A'].shape == (3, 3, 8, 4) and conv['lora_B'].shape == (1, 1, 4, 12)
  dense = tree['encoder']['down_blocks_0']['attentions_0']['to_out_0']
  assert dense['lora_A'].shape == (12, 4) and dense['lora_B'].shape == (4, 12)
  assert all(not np.any(b) for b in jax.tree.leaves(
      {k: v['lora_B'] for k, v in lora._adapters(tree).items()}))
  a = np.asarray(tree['encoder']['down_blocks_0']['downsamplers_0']['conv']['lora_A'])  # 432 values
  if init == 'gaussian':  # PEFT: normal_(std=1/r)
    assert abs(a.std() - 1 / 4) < 0.03
  else:  # PEFT: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)), fan_in = 3*3*12
    bound = 1 / np.sqrt(108)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
  x = toy_inputs()
  base = jax.jit(ToyNet().apply)({'params': params}, x)
  with_lora = jax.jit(lambda lp: lora.apply(ToyNet(), params, lp, config, x))(tree)
  # equal up to float rounding: XLA fuses the program with the (zero) branch differently
  np.testing.assert_allclose(with_lora, base, rtol=0, atol=1e-6 * np.abs(base).max())


def test_interceptor_sees_scope_paths_under_jit_and_grad(monkeypatch):
  params = toy_params()
  tree = random_lora(params, CONFIG)
  seen = []

  def spy(original):
    def branch(layer, *args):
      seen.append(tuple(layer.scope.path))
      return original(layer, *args)
    return branch

  monkeypatch.setattr(lora, '_low_rank_conv', spy(lora._low_rank_conv))
  monkeypatch.setattr(lora, '_low_rank_dense', spy(lora._low_rank_dense))
  x = toy_inputs()
  loss = lambda lp: jnp.mean(lora.apply(ToyNet(), params, lp, CONFIG, x) ** 2)
  jax.jit(jax.grad(loss))(tree)
  assert sorted(seen) == sorted(lora._adapters(tree))  # each LoRA layer intercepted exactly once
  # a method other than __call__, and LoRA layers it never calls, are fine
  out = jax.jit(lambda lp: lora.apply(ToyNet(), params, lp, CONFIG, x, method='encode'))(tree)
  assert out.shape == (2, 4, 4, 6)


def test_lora_changes_the_output_and_an_empty_tree_does_not():
  params, x = toy_params(), toy_inputs()
  base = jax.jit(ToyNet().apply)({'params': params}, x)
  out = jax.jit(lambda lp: lora.apply(ToyNet(), params, lp, CONFIG, x))(random_lora(params, CONFIG))
  assert np.abs(out - base).max() > 1e-2 * np.abs(base).max()
  empty = jax.jit(lambda p: lora.apply(ToyNet(), p, {}, CONFIG, x))(params)
  np.testing.assert_allclose(empty, base, rtol=0, atol=1e-6 * np.abs(base).max())


def _walk_eqns(jaxpr):
  """Every equation of a jaxpr, including those of nested jaxprs (pjit, custom_vjp, remat, cond)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for item in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(item, 'jaxpr', item)
        if hasattr(inner, 'eqns'):
          yield from _walk_eqns(inner)


# Layout-only ops: the input gradient of a frozen conv legitimately flips its kernel (``rev``).
LAYOUT_PRIMITIVES = {'rev', 'transpose', 'reshape', 'convert_element_type', 'copy', 'copy_p', 'squeeze',
                     'expand_dims'}


def frozen_shaped_outputs(fn, params, *args) -> tuple[list[tuple[str, tuple]], Any]:
  """(primitive, shape) of every computing equation in ``fn``'s jaxpr (any primitive but layout-only
  ones) whose output has a frozen kernel's shape (a kernel gradient would be one), and ``fn``'s
  output shapes."""
  kernel_shapes = {tuple(k.shape) for k in lora._layer_kernels(params).values()}
  closed, out_shapes = jax.make_jaxpr(fn, return_shape=True)(params, *args)
  found = [(eqn.primitive.name, tuple(v.aval.shape)) for eqn in _walk_eqns(closed.jaxpr)
           if eqn.primitive.name not in LAYOUT_PRIMITIVES
           for v in eqn.outvars if tuple(getattr(v.aval, 'shape', ())) in kernel_shapes]
  return found, out_shapes


def assert_lora_grad_is_low_rank_only(module, params, config, tree, *inputs, method=None,
                                      execute=True):
  """Grad w.r.t. the LoRA tree: same structure as the tree, and no op yields a frozen-kernel shape.

  ``execute=False`` only traces (no backward-pass compile), for bigger models.
  """
  lora_shapes = {tuple(l.shape) for l in jax.tree.leaves(tree)}
  kernel_shapes = {tuple(k.shape) for k in lora._layer_kernels(params).values()}
  assert not lora_shapes & kernel_shapes, 'ambiguous test: a LoRA shape equals a frozen kernel shape'

  def loss(p, lp):
    out = lora.apply(module, p, lp, config, *inputs, method=method)
    return sum(jnp.mean(o ** 2) for o in jax.tree.leaves(out))

  lora_grad = jax.grad(loss, argnums=1)
  found, grads = frozen_shaped_outputs(lora_grad, params, tree)
  assert found == []
  if execute:
    grads = jax.jit(lora_grad)(params, tree)
  assert jax.tree.structure(grads) == jax.tree.structure(tree)
  assert all(g.shape == l.shape for g, l in zip(jax.tree.leaves(grads), jax.tree.leaves(tree)))
  # control: differentiating w.r.t. the frozen params does produce kernel-shaped gradient ops
  assert frozen_shaped_outputs(jax.grad(loss, argnums=0), params, tree)[0]
  return grads


def test_grad_wrt_lora_never_forms_frozen_kernel_gradients():
  params, x = toy_params(), toy_inputs()
  tree = random_lora(params, CONFIG)
  grads = assert_lora_grad_is_low_rank_only(ToyNet(), params, CONFIG, tree, x)
  assert all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_merge_of_zero_lora_is_identity_and_merge_matches_unmerged():
  params, x = toy_params(), toy_inputs()
  fresh = lora.init_lora_params(jax.random.key(0), params, CONFIG)
  merged_fresh = lora.merge(params, fresh, CONFIG)
  assert jax.tree.structure(merged_fresh) == jax.tree.structure(params)
  for got, want in zip(jax.tree.leaves(merged_fresh), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)
  tree = random_lora(params, CONFIG)
  unmerged = jax.jit(lambda lp: lora.apply(ToyNet(), params, lp, CONFIG, x))(tree)
  merged = jax.jit(ToyNet().apply)({'params': lora.merge(params, tree, CONFIG)}, x)
  np.testing.assert_allclose(merged, unmerged, atol=1e-4 * max(1, np.abs(unmerged).max()))
  # merge keeps the frozen dtype
  bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(lora.merge(bf16, tree, CONFIG)))


class Unsupported(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), kernel_dilation=2, name='conv')(x)
    return nn.ConvTranspose(4, (3, 3), name='conv_out')(x)


@pytest.mark.parametrize('target, error', [('conv', ValueError), ('conv_out', TypeError)])
def test_layers_lora_cannot_reproduce_are_refused(target, error):
  x = np.zeros((1, 8, 8, 3), np.float32)
  params = jax.eval_shape(Unsupported().init, jax.random.key(0), x)['params']
  config = lora.LoRAConfig(rank=2, alpha=2, target_modules=[target])
  tree = jax.eval_shape(functools.partial(lora.init_lora_params, config=config), jax.random.key(0),
                        params)
  with pytest.raises(error, match=target):
    jax.eval_shape(lambda p, lp: lora.apply(Unsupported(), p, lp, config, x), params, tree)


def test_peft_state_dict_layout_and_round_trip():
  params = toy_params()
  tree = random_lora(params, CONFIG)
  state = lora.to_peft_state_dict(tree, CONFIG)
  assert state['encoder.down_blocks.0.resnets.0.conv1.lora_A.weight'].shape == (4, 8, 3, 3)
  assert state['encoder.down_blocks.0.resnets.0.conv1.lora_B.weight'].shape == (12, 4, 1, 1)
  assert state['encoder.down_blocks.0.attentions.0.to_out.0.lora_A.weight'].shape == (4, 12)
  assert state['encoder.down_blocks.0.attentions.0.to_out.0.lora_B.weight'].shape == (12, 4)
  assert len(state) == 2 * len(ALL_TARGETS)
  for prefix in ('', lora.PEFT_MODEL_PREFIX):
    back = lora.from_peft_state_dict({prefix + k: v for k, v in state.items()}, params, CONFIG)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, tree))


def test_peft_state_dict_errors_name_the_keys():
  params = toy_params()
  state = lora.to_peft_state_dict(random_lora(params, CONFIG), CONFIG)
  extra = dict(state, **{'encoder.quant_conv.lora_A.weight': np.zeros((4, 6, 1, 1), np.float32)})
  with pytest.raises(CheckpointError, match=r'unknown \(1\).*encoder\.quant_conv\.lora_A\.weight'):
    lora.from_peft_state_dict(extra, params, CONFIG)
  missing = {k: v for k, v in state.items() if k != 'decoder.conv_in.lora_B.weight'}
  with pytest.raises(CheckpointError, match=r'missing \(1\).*decoder\.conv_in\.lora_B\.weight'):
    lora.from_peft_state_dict(missing, params, CONFIG)
  with pytest.raises(CheckpointError, match='shape mismatch for decoder.conv_in.lora_A.weight'):
    lora.from_peft_state_dict(dict(state, **{'decoder.conv_in.lora_A.weight': np.zeros(
        (2, 6, 3, 3), np.float32)}), params, CONFIG)


def test_adapter_folder_round_trip_with_prefix(tmp_path):
  params = toy_params()
  config = lora.LoRAConfig(rank=4, alpha=8, init='gaussian', prefix='encoder')
  tree = random_lora(params, config)
  lora.save_peft_adapter(tmp_path, tree, config, base_model_name_or_path='toy')
  adapter_config = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert adapter_config['r'] == 4 and adapter_config['lora_alpha'] == 8
  assert adapter_config['init_lora_weights'] == 'gaussian'
  assert adapter_config['exclude_modules'] == r'(?!encoder\.).*'
  back, back_config = lora.load_peft_adapter(tmp_path, params)
  assert back_config == config
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, tree))
  with pytest.raises(ValueError, match='use_dora'):
    lora.config_from_peft(dict(adapter_config, use_dora=True))


def test_adapter_folder_round_trip_relative_to_a_sub_module(tmp_path):
  """module_prefix='encoder': keys and config of the encoder alone (OMGSR's PeftModel(vae.encoder)),
  read back into the whole-model tree; configs that would select other layers there are refused."""
  params = toy_params()
  config = lora.LoRAConfig(rank=4, alpha=8, init='gaussian', prefix='encoder')
  tree = random_lora(params, config)
  lora.save_peft_adapter(tmp_path, tree, config, module_prefix='encoder')
  adapter_config = json.loads((tmp_path / 'adapter_config.json').read_text())
  assert adapter_config['exclude_modules'] is None
  assert adapter_config['target_modules'] == list(config.target_modules)
  keys = set(lora.to_peft_state_dict(tree, config, module_prefix='encoder'))
  assert 'down_blocks.0.attentions.0.to_out.0.lora_B.weight' in keys
  assert len(keys) == 2 * len([n for n in ALL_TARGETS if n.startswith('encoder.')])
  back, back_config = lora.load_peft_adapter(tmp_path, params, module_prefix='encoder')
  assert back_config == config
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, tree))
  with pytest.raises(ValueError, match='regex'):
    lora.peft_adapter_config(dataclasses.replace(config, target_modules=r'.*conv'), None, 'encoder')
  with pytest.raises(ValueError, match="'encoder.conv_in' names part of the module prefix"):
    lora.peft_adapter_config(dataclasses.replace(config, target_modules=('encoder.conv_in',)),
                             None, 'encoder')
  with pytest.raises(ValueError, match='not both'):
    lora.load_peft_adapter(tmp_path, params, prefix='encoder', module_prefix='encoder')
