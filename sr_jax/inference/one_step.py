"""The one-step generator of a :class:`~sr_jax.methods.base.LatentStage`, as one jittable function.

``generate`` is the whole computation on a batch of (already upscaled) LQ images::

  x --VAE encode (+ the stage's encoder LoRA, if any)--> (mean, logvar)
    --sample with noise from ``key``, codec--> z_L --[condition]--> step --> z_P
    --codec^-1, VAE decode--> clamp to [-1, 1]

Training calls it with the LoRA trees beside the frozen weights, evaluation (through
``sr_jax.inference.pipeline``, which splits it into tileable pieces) and the benchmarks with merged
weights. The pieces below are what the pipeline runs separately.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from sr_jax.models import lora


def encode_moments(stage: Any, params: Mapping[str, Any], images: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """VAE posterior ``(mean, logvar)`` of NHWC images in [-1, 1]; with the encoder LoRA
  ``params[stage.vae_key + '_lora']`` (``stage.vae_lora``) when the params carry one."""
  vae = stage.vae
  adapter = params.get(stage.vae_key + '_lora')
  return lora.apply(vae, params[stage.vae_key], adapter, getattr(stage, 'vae_lora', None),
                    images.astype(vae.dtype), method='encode')


def encode_latent(stage: Any, params: Mapping[str, Any], images: jax.Array,
                  key: jax.Array) -> jax.Array:
  """Images -> the sampled backbone latent (``latent_dist.sample()`` then the codec), noise from
  ``key`` (drawn for the whole latent, so tiles and whole images see the same draw)."""
  mean, logvar = encode_moments(stage, params, images)
  noise = jax.random.normal(key, mean.shape, jnp.float32)
  return stage.codec.encode(mean, logvar, noise)


def step_noise(stage: Any, key: jax.Array, shape: tuple[int, ...]) -> jax.Array | None:
  """The standard-normal input of a step that reads one (``stage.uses_noise``), else None."""
  if not stage.uses_noise:
    return None
  return jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.float32)


def decode_latent(stage: Any, params: Mapping[str, Any], z: jax.Array) -> jax.Array:
  """Backbone latent -> image in [-1, 1] (clamped, as the references do), float32."""
  vae = stage.vae
  images = vae.apply({'params': params[stage.vae_key]},
                     stage.codec.from_latent(z).astype(vae.dtype), method='decode')
  return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


def generate(stage: Any, params: Mapping[str, Any], images: jax.Array, key: jax.Array
             ) -> dict[str, jax.Array]:
  """The one-step generator on a batch: ``{'sr', 'z_lq', 'z_pred'}`` (see the module docstring)."""
  z_lq = encode_latent(stage, params, images, key)
  cond = stage.condition(params, images, z_lq) if stage.condition is not None else None
  z_pred = stage.step(params, z_lq, step_noise(stage, key, z_lq.shape), cond)
  return {'sr': decode_latent(stage, params, z_pred), 'z_lq': z_lq, 'z_pred': z_pred}
