"""Per-block rematerialisation (``remat=True`` on the UNet, VAE and DINOv3 modules) changes memory,
not maths: same param tree, same outputs, same LoRA and input gradients, no frozen-kernel gradient,
and fewer bytes kept for the backward pass."""
import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

import tiny_diffusers as td
from test_lora import assert_lora_grad_is_low_rank_only, random_lora
from sr_jax.models import lora
from sr_jax.models.dinov3 import DINOv3ConvNextModel
from sr_jax.models.unet import UNet2DConditionModel
from sr_jax.models.vae import AutoencoderKL

TINY_DINOV3 = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 2, 1], layer_scale_init_value=0.5)
UNET_LORA = lora.LoRAConfig(rank=3, alpha=6.0)
VAE_LORA = lora.LoRAConfig(rank=3, alpha=6.0, prefix='encoder')


def _inputs(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(rng.standard_normal(s).astype(np.float32) for s in shapes)


def _case(name):
  """(module class, config, from_config kwargs, LoRA config or None, input arrays, apply method)."""
  if name == 'unet_sd21':  # the SD1 layout wraps the same ResNet / transformer blocks
    config = td.TINY_UNET_SD21
    sample, context = _inputs([(2, 16, 12, 4), (2, 5, config['cross_attention_dim'])])
    return UNet2DConditionModel, config, {}, UNET_LORA, (sample, np.array([3., 700.]), context), None
  if name == 'vae_encoder':
    return (AutoencoderKL, td.TINY_VAE, dict(parts=('encoder',)), VAE_LORA,
            _inputs([(1, 64, 64, 3)]), 'encode')
  if name == 'vae_decoder':
    return (AutoencoderKL, td.TINY_VAE, dict(parts=('decoder',)), None, _inputs([(1, 16, 16, 4)]),
            'decode')
  return DINOv3ConvNextModel, TINY_DINOV3, {}, None, _inputs([(1, 64, 48, 3)]), None


def saved_activation_bytes(fn, *args) -> int:
  """Bytes of the >= 3-D arrays (activations, not biases, norms or LoRA factors) that the backward
  pass of ``fn`` keeps, read from ``jax.ad_checkpoint.print_saved_residuals`` ('f32[2,8,8,4] ...')."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(fn, *args)
  itemsize = {'f32': 4, 'bf16': 2, 'f16': 2}
  total = 0
  for dtype, dims in re.findall(r'^(\w+)\[([\d,]*)\]', out.getvalue(), re.M):
    shape = [int(d) for d in dims.split(',') if d]
    if len(shape) >= 3:
      total += int(np.prod(shape)) * itemsize.get(dtype, 4)
  return total


def _loss(module, params, lora_tree, lora_config, inputs, method):
  out = (lora.apply(module, params, lora_tree, lora_config, *inputs, method=method)
         if lora_config else module.apply({'params': params}, *inputs, method=method))
  return sum(jnp.mean(jnp.sin(o)) for o in jax.tree.leaves(out))


@pytest.mark.parametrize('name', ['unet_sd21', 'vae_encoder', 'vae_decoder', 'dinov3'])
def test_remat_keeps_params_outputs_and_gradients(name):
  cls, config, kwargs, lora_config, inputs, method = _case(name)
  plain, remat = cls.from_config(config, **kwargs), cls.from_config(config, remat=True, **kwargs)
  params = jax.jit(plain.init)(jax.random.key(0), *plain.dummy_inputs())['params']
  remat_shapes = jax.eval_shape(remat.init, jax.random.key(0), *remat.dummy_inputs())['params']
  assert jax.tree.structure(remat_shapes) == jax.tree.structure(params)

  tree = random_lora(params, lora_config) if lora_config else None
  # Differentiate w.r.t. the LoRA tree (generator modules) or the input (frozen modules).
  wrt = lambda m: lambda t, x: _loss(m, params, t, lora_config, x, method)
  argnums = 0 if lora_config else 1
  (value, grads), (remat_value, remat_grads) = [
      jax.jit(jax.value_and_grad(wrt(m), argnums=argnums))(tree, inputs) for m in (plain, remat)]
  np.testing.assert_allclose(remat_value, value, rtol=1e-6, atol=1e-7)
  for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))

  saved = [saved_activation_bytes(wrt(m), tree, inputs) for m in (plain, remat)]
  assert saved[1] < 0.7 * saved[0], f'remat keeps {saved[1]} activation bytes vs {saved[0]}'


def test_remat_unet_lora_gradient_forms_no_frozen_kernel_gradient():
  cls, config, kwargs, lora_config, inputs, _ = _case('unet_sd21')
  module = cls.from_config(config, remat=True, **kwargs)
  params = jax.jit(module.init)(jax.random.key(0), *module.dummy_inputs())['params']
  assert_lora_grad_is_low_rank_only(module, params, lora_config, random_lora(params, lora_config),
                                    *inputs, execute=False)
