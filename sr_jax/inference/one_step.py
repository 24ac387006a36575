"""One-step SR of whole images of any size with a trained OMGSR generator (method-facts §1.7).

Per image (the reference ``infer_omgsr_s.py`` flow)::

  LQ --preprocess (short side >= process_size/upscale, bicubic x upscale, multiple of 8)--> x_L
  x_L --VAE encoder (tiled when large)--> posterior --sample x scaling--> z_L
  z_L --UNet eps at t* (latent tiles + Gaussian blend when h w > tile^2)--> eps --OMGSR Eq. 7--> z_P
  z_P --VAE decoder (tiled when large)--> clamp --colour fix towards x_L--> SR

The weights come merged (LoRA folded in) from an exported inference bundle or from a training
workdir's latest checkpoint. Every device call takes a batch (UNet tiles, or one image repeated to the
device count) sharded over the ``data`` axis of a 1-D mesh over all devices; the posterior noise is
drawn on the host from a key of the seed and the image name, so outputs do not depend on the device
count or the batching.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from sr_jax.diffusion import schedules
from sr_jax.inference import color_fix, tiling
from sr_jax.inference.tiled_vae import TiledVAE
from sr_jax.models import kernels
from sr_jax.models.unet import UNet2DConditionModel
from sr_jax.models.vae import AutoencoderKL

BUNDLE_FILE = 'omgsr.json'
SIZE_MULTIPLE = 8  # the reference's final LANCZOS resize to a multiple of 8 pixels


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """What the reference's inference flags set (``configs/omgsr.py`` ``config.eval``)."""
  process_size: int = 512       # training resolution; the latent tile is process_size / VAE factor
  upscale: int = 4
  latent_overlap: int = 32      # latent px between UNet tiles
  vae_tile: int = 128           # latent px; the VAE runs tiled when h * w > vae_tile^2 (0: never)
  batch: int = 8                # UNet tiles (and VAE tiles) per device call, all devices together
  color_fix: str = 'adain'
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class OneStepModel:
  """Modules, merged weights {unet, vae, prompt_embeds} and the constants of one-step inference."""
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  params: Mapping[str, Any]
  t_star: int
  alpha_bar: float
  scaling_factor: float

  @property
  def vae_factor(self) -> int:
    return 2 ** (len(self.vae.block_out_channels) - 1)


# ------------------------------------------------------------------------------------- loading


def load_inference_bundle(path: str, dtype: Any = jnp.float32) -> OneStepModel:
  """An exported bundle (``<workdir>/export/inference``: unet/, vae/, prompt embeds, omgsr.json)."""
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, BUNDLE_FILE)) as f:
    meta = json.load(f)
  unet, unet_params = pretrained.load_unet(path, dtype=dtype, param_dtype=dtype)
  vae, vae_params = pretrained.load_vae(path, dtype=dtype, param_dtype=dtype)
  prompt = pretrained.load_prompt_embeds(path, meta['prompt'])
  return OneStepModel(unet, vae, {'unet': unet_params, 'vae': vae_params, 'prompt_embeds': prompt},
                      int(meta['t_star']), float(meta['alpha_bar']), float(meta['scaling_factor']))


def load_training_checkpoint(config: Any, workdir: str, step: int | None = None) -> OneStepModel:
  """The generator of ``workdir``'s latest (or ``step``) checkpoint, LoRA merged into the frozen
  weights that ``config`` names (the run's own config: same models, same seed)."""
  from sr_jax import checkpointing, sharding  # pylint: disable=g-import-not-at-top
  from sr_jax.methods import omgsr  # pylint: disable=g-import-not-at-top
  models, frozen, cfgs = omgsr.build(config)
  init_fn, _ = omgsr.step_functions(models, config.optim)
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  abstract, _ = sharding.abstract_state(
      lambda rng: init_fn(jax.eval_shape(lambda: frozen), rng), jax.random.key(0), mesh)
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{workdir} is neither an inference bundle (no {BUNDLE_FILE}) nor a '
                            f'training workdir (no checkpoints/)')
  manager = checkpointing.make_manager(directory, read_only=True)
  restored = checkpointing.restore(manager, abstract, None, step)
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  state, _ = restored
  params = omgsr.merged_inference_params(models, sharding.gather_to_host(state.generator),
                                         jax.device_get(frozen))
  dtype = jnp.dtype(config.model.compute_dtype)
  return OneStepModel(UNet2DConditionModel.from_config(cfgs['unet'], dtype=dtype),
                      AutoencoderKL.from_config(cfgs['vae'], dtype=dtype), params,
                      models.t_star, models.alpha_bar, models.scaling_factor)


def load_model(config: Any, checkpoint: str) -> OneStepModel:
  """``checkpoint``: an exported inference bundle, or a training workdir (its latest checkpoint)."""
  if os.path.isfile(os.path.join(checkpoint, BUNDLE_FILE)):
    return load_inference_bundle(checkpoint, jnp.dtype(config.model.compute_dtype))
  return load_training_checkpoint(config, checkpoint)


# ------------------------------------------------------------------------------- preprocessing


def preprocess_lq(image: Image.Image, process_size: int, upscale: int
                  ) -> tuple[Image.Image, tuple[int, int] | None]:
  """The reference's input: a short side below ``process_size / upscale`` is first enlarged to it
  (bicubic), then bicubic x ``upscale``, then LANCZOS down to a multiple of 8. Returns the upscaled
  RGB image and, when the input was enlarged, the output size the reference resizes back to."""
  width, height = image.size
  restore_size = None
  min_side = process_size // upscale
  if min(width, height) < min_side:
    scale = min_side / min(width, height)
    image = image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.BICUBIC)
    restore_size = (upscale * width, upscale * height)
  image = image.resize((image.width * upscale, image.height * upscale), Image.BICUBIC)
  size = (image.width - image.width % SIZE_MULTIPLE, image.height - image.height % SIZE_MULTIPLE)
  if size != image.size:
    image = image.resize(size, Image.LANCZOS)
  return image, restore_size


def image_noise_key(seed: int, name: str) -> jax.Array:
  """The posterior-sampling key of one image: the seed and a stable hash of its name."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


# ----------------------------------------------------------------------------------- inference


class SuperResolver:
  """Jitted, sharded one-step SR of ``model`` with ``settings`` over all devices (or ``devices``)."""

  def __init__(self, model: OneStepModel, settings: InferenceSettings, devices=None):
    self.model, self.settings = model, settings
    devices = np.asarray(devices if devices is not None else jax.devices())
    self.mesh = Mesh(devices, ('data',))
    self.devices = devices.size
    batched = NamedSharding(self.mesh, P('data'))
    self.params = jax.device_put(model.params, NamedSharding(self.mesh, P()))
    self.latent_tile = settings.process_size // model.vae_factor
    jit = lambda fn: jax.jit(fn, in_shardings=(None, batched), out_shardings=batched,
                             compiler_options=kernels.compiler_options())
    self._encode = jit(lambda p, x: jnp.concatenate(
        model.vae.apply({'params': p}, x.astype(model.vae.dtype), method='encode'), axis=-1))
    self._decode = jit(lambda p, z: model.vae.apply(
        {'params': p}, z.astype(model.vae.dtype), method='decode'))
    self._eps = jit(functools.partial(unet_epsilon, model))
    self.tiled_vae = TiledVAE(model.vae, tile=settings.vae_tile or 1, batch=settings.batch,
                              sharding=batched)

  def _one(self, fn: Callable, params: Any, item: np.ndarray) -> np.ndarray:
    """``fn`` on one item, repeated to the device count so the batch shards evenly."""
    return tiling.map_batched(lambda b: fn(params, b), item[None], self.devices, self.devices)[0]

  def _vae_tiled(self, h: int, w: int) -> bool:
    tile = self.settings.vae_tile
    return bool(tile) and h * w > tile * tile

  def encode(self, image: np.ndarray, key: jax.Array) -> np.ndarray:
    """(H, W, 3) in [-1, 1] -> the sampled latent x scaling factor (``latent_dist.sample()``)."""
    f = self.model.vae_factor
    if self._vae_tiled(image.shape[0] // f, image.shape[1] // f):
      mean, logvar = self.tiled_vae.encode(self.params['vae'], image)
    else:
      moments = np.asarray(self._one(self._encode, self.params['vae'], image), np.float32)
      mean, logvar = np.split(moments, 2, axis=-1)
      logvar = np.clip(logvar, -30.0, 20.0)
    noise = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
    return (mean + np.exp(0.5 * logvar) * noise) * self.model.scaling_factor

  def epsilon(self, z: np.ndarray) -> np.ndarray:
    """The UNet's eps at t* of a (h, w, C) latent: tiled + Gaussian-blended when it is large."""
    h, w = z.shape[:2]
    if not tiling.needs_tiling(h, w, self.latent_tile):
      return self._one(self._eps, self.params, z)
    grid = tiling.latent_tile_grid(h, w, self.latent_tile, self.settings.latent_overlap)
    return tiling.tiled_epsilon(lambda tiles: self._eps(self.params, tiles), z, grid,
                                self.settings.batch, self.devices)

  def decode(self, z: np.ndarray) -> np.ndarray:
    """(h, w, C) unscaled latent -> (H, W, 3) image clamped to [-1, 1]."""
    if self._vae_tiled(*z.shape[:2]):
      image = self.tiled_vae.decode(self.params['vae'], z)
    else:
      image = self._one(self._decode, self.params['vae'], z)
    return np.clip(np.asarray(image, np.float32), -1.0, 1.0)

  def __call__(self, lq_upscaled: np.ndarray, key: jax.Array) -> np.ndarray:
    """(H, W, 3) uint8 upscaled LQ -> (H, W, 3) uint8 SR (before the colour fix)."""
    x = lq_upscaled.astype(np.float32) / 127.5 - 1.0
    z_lq = self.encode(x, key)
    eps = self.epsilon(z_lq)
    z_pred = np.asarray(schedules.ddpm_x0_from_epsilon(z_lq, eps, self.model.alpha_bar))
    sr = self.decode(z_pred / self.model.scaling_factor)
    return to_uint8((sr + 1.0) / 2.0)


def one_step_sr(model: OneStepModel, params: Mapping[str, Any], images: jax.Array,
                noise: jax.Array, micro_batch: int | None = None) -> jax.Array:
  """The untiled one-step computation on a batch (jit it): (B, H, W, 3) upscaled LQ in [-1, 1] and
  posterior noise (B, H/f, W/f, C) ~ N(0, 1) -> SR (B, H, W, 3) in [-1, 1]. Equal to
  :class:`SuperResolver` on images whose latent fits one tile (benchmarks/inference.py times it).

  ``micro_batch``: run the batch ``micro_batch`` images at a time (``lax.map``), so that activation
  memory is that of a micro-batch (a batch of 8 at 512² in fp32 needs 27 GiB of XLA temp otherwise).
  """
  if micro_batch and micro_batch < images.shape[0]:
    return jax.lax.map(lambda xs: one_step_sr(model, params, xs[0][None], xs[1][None])[0],
                       (images, noise), batch_size=micro_batch)
  vae = model.vae
  mean, logvar = vae.apply({'params': params['vae']}, images.astype(vae.dtype), method='encode')
  z = (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise)
  z = z * model.scaling_factor
  z_pred = schedules.ddpm_x0_from_epsilon(z, unet_epsilon(model, params, z), model.alpha_bar)
  sr = vae.apply({'params': params['vae']}, (z_pred / model.scaling_factor).astype(vae.dtype),
                 method='decode')
  return jnp.clip(sr.astype(jnp.float32), -1.0, 1.0)


def unet_epsilon(model: OneStepModel, params: Mapping[str, Any], latents: jax.Array) -> jax.Array:
  """The UNet's eps at t* with the stored prompt embedding, for a batch of (scaled) latents."""
  batch = latents.shape[0]
  context = jnp.broadcast_to(params['prompt_embeds'], (batch,) + params['prompt_embeds'].shape[1:])
  timesteps = jnp.full((batch,), model.t_star, jnp.int32)
  eps = model.unet.apply({'params': params['unet']}, latents.astype(model.unet.dtype), timesteps,
                         context.astype(model.unet.dtype))
  return eps.astype(jnp.float32)


def to_uint8(image01: np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8 as torchvision's ``ToPILImage`` (``x * 255``, truncated)."""
  return (np.clip(image01, 0.0, 1.0) * 255.0).astype(np.uint8)


def super_resolve_image(resolver: SuperResolver, image: Image.Image, name: str) -> Image.Image:
  """The whole reference flow on one RGB image: preprocess, SR, colour fix, size restore."""
  s = resolver.settings
  upscaled, restore_size = preprocess_lq(image, s.process_size, s.upscale)
  lq = np.asarray(upscaled, np.uint8)
  sr = resolver(lq, image_noise_key(s.seed, name))
  if s.color_fix != 'none':
    fixed = color_fix.apply_color_fix(s.color_fix, sr.astype(np.float32) / 255.0,
                                      lq.astype(np.float32) / 255.0)
    sr = to_uint8(np.asarray(fixed))
  out = Image.fromarray(sr)
  if restore_size is not None:
    out = out.resize(restore_size, Image.BICUBIC)
  return out
