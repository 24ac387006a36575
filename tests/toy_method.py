"""A test-only SR method, plugged in by its module path (``config.method = 'tests.toy_method'``).

It exists to prove that ``train.py`` and ``eval.py`` run any method through the registry and the
shared parts (trainer, data pipeline, accumulation, grouped optimizers, bundle, inference pipeline
with latent tiling, the tiled VAE and a per-image condition) without naming OMGSR.

Generator: a frozen random micro VAE; the step is a per-channel affine map of the latent plus a
shift from the LQ image's mean colour (the condition)::

  z_P = z_L * (1 + scale) + shift + colour(x_L) @ colour_to_latent

trained on the pixel MSE of the decoded image (gradients flow through the frozen decoder).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.diffusion import latents
from sr_jax.inference import one_step
from sr_jax.methods import base, common

NAME = 'tests.toy_method'
TOY_PARAMS_FILE = 'toy_step.safetensors'


@dataclasses.dataclass(frozen=True)
class AffineStep:
  """``(params, z, noise, cond) -> z_pred`` with ``params['toy']``; ``cond`` (B, 3) mean colours."""

  def __call__(self, params: Mapping[str, Any], z: jax.Array, noise: Any = None,
               cond: Any = None) -> jax.Array:
    del noise
    p = params['toy']
    out = z * (1.0 + p['scale']) + p['shift']
    if cond is not None:
      out = out + (cond @ p['colour_to_latent'])[:, None, None, :]
    return out


def mean_colour(params: Mapping[str, Any], images: jax.Array, z: jax.Array) -> jax.Array:
  """The condition: each image's mean RGB (B, 3), computed once per whole image."""
  del params, z
  return jnp.mean(images, axis=(1, 2))


def _stage(config: Any, vae: Any, vae_config: Mapping[str, Any]) -> base.LatentStage:
  codec = latents.LatentCodec.from_vae_config(vae_config)
  return base.LatentStage(vae=vae, codec=codec, step=AffineStep(),
                          upscale=int(config.eval.upscale),
                          process_size=int(config.eval.process_size), condition=mean_colour,
                          name='toy affine')


def _init_params(channels: int) -> dict:
  return {'scale': jnp.zeros((channels,)), 'shift': jnp.zeros((channels,)),
          'colour_to_latent': jnp.zeros((3, channels))}


def _loss(toy, stage, frozen, batch, rng):
  out = one_step.generate(stage, {**frozen, 'toy': toy}, batch['lq'], rng)
  loss = jnp.mean(jnp.square(out['sr'] - batch['hq']))
  return loss, {'loss': loss}


def train_step(stage, transforms, accum, state, frozen, batch):
  rng, step_rng = jax.random.split(state['rng'])

  def grads_fn(micro_batch, micro_rng, carry):
    grads, metrics = jax.grad(_loss, has_aux=True)(state['params']['generator'], stage, frozen,
                                                   micro_batch, micro_rng)
    return {'generator': grads}, carry, metrics

  grads, _, metrics = common.accumulate_gradients(grads_fn, state['params'], batch, accum, step_rng)
  params, opt_state, norms = common.optimizer_step(transforms, grads, state['opt_state'],
                                                   state['params'])
  metrics['grad_norm'] = norms['generator']
  return {'params': params, 'opt_state': opt_state, 'rng': rng, 'step': state['step'] + 1}, metrics


def init_state(transforms, channels, rng):
  params = {'generator': _init_params(channels)}
  return {'params': params, 'opt_state': common.init_optimizers(transforms, params), 'rng': rng,
          'step': jnp.zeros((), jnp.int32)}


def _frozen(config):
  m = config.model
  vae, params = common.load_frozen(m, 'vae', None, seed=config.seed, param_dtype=jnp.float32)
  return vae, {'vae': params}


def export(stage, config, state, frozen, directory):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from sr_jax import pretrained, sharding  # pylint: disable=g-import-not-at-top
  toy, frozen = sharding.gather_to_host((state['params']['generator'], frozen))
  if jax.process_index() != 0:
    return
  bundle = os.path.join(directory, 'inference')
  pretrained.save_converted(os.path.join(bundle, 'vae'), 'vae', dict(config.model.vae_config),
                            frozen['vae'], source='toy export')
  save_file({k: np.asarray(v) for k, v in toy.items()}, os.path.join(bundle, TOY_PARAMS_FILE))
  common.write_bundle(bundle, NAME, config, {'step': int(state['step'])})


def make_method(config) -> base.Method:
  vae, frozen = _frozen(config)
  stage = _stage(config, vae, dict(config.model.vae_config))
  transforms = {'generator': common.adamw(config.optim)}
  return base.Method(
      init_state=functools.partial(init_state, transforms, vae.latent_channels),
      train_step=functools.partial(train_step, stage, transforms,
                                   int(config.optim.grad_accum_steps)),
      frozen=frozen,
      sample=lambda state, frozen, batch: {
          'lq': batch['lq'], 'hq': batch['hq'],
          'sr': one_step.generate(stage, {**frozen, 'toy': state['params']['generator']},
                                  batch['lq'], jax.random.key(0))['sr']},
      export=functools.partial(export, stage, config))


def load_generator(config, checkpoint: str, step: int | None = None) -> base.Generator:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  if common.checkpoint_kind(checkpoint) == 'bundle':
    record = common.read_bundle(checkpoint, NAME)
    vae, vae_params = pretrained.load_vae(checkpoint)
    vae_config = common.model_config({'source': 'converted'}, 'vae', checkpoint)
    toy = {k: jnp.asarray(v) for k, v in load_file(os.path.join(checkpoint, TOY_PARAMS_FILE)).items()}
    source = {'method': NAME, 'checkpoint': checkpoint, 'kind': 'bundle', 'step': record['step']}
  else:
    vae, frozen = _frozen(config)
    vae_params, vae_config = frozen['vae'], dict(config.model.vae_config)
    transforms = {'generator': common.adamw(config.optim)}
    state, step = common.restore_train_state(
        config, checkpoint, functools.partial(init_state, transforms, vae.latent_channels), step)
    toy = state['params']['generator']
    source = {'method': NAME, 'checkpoint': checkpoint, 'kind': 'workdir', 'step': int(step)}
  return base.Generator(NAME, (_stage(config, vae, vae_config),), {'vae': vae_params, 'toy': toy},
                        source)
