"""Super-resolution of whole images of any size with any method's :class:`~sr_jax.methods.base.Generator`.

Per image (the reference inference flow of OMGSR / OSEDiff / S3Diff, generalised to several stages)::

  LQ --preprocess (short side >= process_size / upscale, resize x upscale, multiple of 8)--> x
  for each stage (later stages first resize the previous output x upscale):
    x --VAE encoder (tiled when large)--> posterior --sample, codec--> z_L
    z_L --[condition on the whole image]--> step per latent tile, Gaussian blend --> z_P
    z_P --VAE decoder (tiled when large)--> clamp
  --colour fix towards the upscaled LQ--> SR

Every device call takes a batch (latent tiles, VAE tiles, or one image repeated to the device count)
sharded over the ``data`` axis of a 1-D mesh over all devices; noise is drawn on the host from a key
of the seed and the image name, so outputs do not depend on the device count or the batching.
Nothing here knows which method it runs.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from sr_jax import xla
from sr_jax.inference import color_fix, one_step, tiling
from sr_jax.inference import tiled_vae as tiled_vae_lib

SIZE_MULTIPLE = 8  # the reference's final LANCZOS resize to a multiple of 8 pixels


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
  """The method-agnostic knobs (``config.eval``); scale and process size belong to the stages."""
  latent_overlap: int = 32      # latent px between UNet tiles
  vae_tile: int = 128           # latent px; the VAE runs tiled when h * w > vae_tile^2 (0: never)
  batch: int = 8                # latent tiles (and VAE tiles) per device call, all devices together
  color_fix: str = 'adain'
  seed: int = 0
  # VAE mid-block attention: exact over all keys up to this many latent tokens, windowed above
  # (None: the backend's default, see sr_jax.inference.tiled_vae); margin of the windows in latent px.
  vae_attention_max_tokens: int | None = None
  vae_attention_margin: int = tiled_vae_lib.DEFAULT_ATTENTION_MARGIN
  cpu_optimization_level: int | None = None  # XLA's CPU backend level (None: XLA's default)

  @classmethod
  def from_config(cls, config: Any, **overrides) -> 'InferenceSettings':
    """The fields of ``config.eval`` that are settings here, then ``overrides`` (None = keep)."""
    values = dict(config.eval) if 'eval' in config else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in values.items() if k in names}
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values.get('color_fix', 'adain') not in color_fix.COLOR_FIXES:
      raise ValueError(f'color_fix must be one of {color_fix.COLOR_FIXES}, got '
                       f"{values['color_fix']!r}")
    return cls(**values)


# ------------------------------------------------------------------------------- preprocessing


def preprocess_lq(image: Image.Image, process_size: int, upscale: int, enlarge: bool = True
                  ) -> tuple[Image.Image, tuple[int, int] | None]:
  """The reference's input: a short side below ``process_size / upscale`` is first enlarged to it
  (bicubic; only with ``enlarge``), then bicubic x ``upscale``, then LANCZOS down to a multiple of 8.
  Returns the upscaled RGB image and, when the input was enlarged, the output size the reference
  resizes back to."""
  width, height = image.size
  restore_size = None
  min_side = process_size // upscale
  if enlarge and min(width, height) < min_side:
    scale = min_side / min(width, height)
    image = image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.BICUBIC)
    restore_size = (upscale * width, upscale * height)
  image = image.resize((image.width * upscale, image.height * upscale), Image.BICUBIC)
  size = (image.width - image.width % SIZE_MULTIPLE, image.height - image.height % SIZE_MULTIPLE)
  if size != image.size:
    image = image.resize(size, Image.LANCZOS)
  return image, restore_size


def resize_between_stages(image: np.ndarray, upscale: int, method: str, multiple: int
                          ) -> np.ndarray:
  """(H, W, 3) float image x ``upscale`` with ``jax.image.resize`` ``method``, cropped to a
  multiple of the next stage's VAE factor."""
  height, width = image.shape[0] * upscale, image.shape[1] * upscale
  out = jax.image.resize(jnp.asarray(image), (height, width, image.shape[2]), method)
  return np.asarray(out)[:height - height % multiple, :width - width % multiple]


def image_noise_key(seed: int, name: str) -> jax.Array:
  """The noise key of one image: the seed and a stable hash of its name."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


def to_uint8(image01: np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8 as torchvision's ``ToPILImage`` (``x * 255``, truncated)."""
  return (np.clip(image01, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------- inference


class _StageRunner:
  """One stage's jitted pieces on the mesh: encode, condition, tiled step, decode.

  ``progress(phase, done, total)`` hears of every device call of the tiled pieces (latent tiles,
  VAE tiles); ``log`` gets one line when the VAE attention is windowed.
  """

  def __init__(self, stage: Any, params: Any, settings: InferenceSettings, mesh: Mesh,
               progress: tiling.ProgressFn | None = None, log: Callable[[str], None] | None = None):
    self.stage, self.params, self.settings = stage, params, settings
    self.progress, self.log = progress, log
    self.devices = mesh.size
    self.batched = NamedSharding(mesh, P('data'))
    options = xla.compiler_options(settings.cpu_optimization_level)
    jit = lambda fn: jax.jit(fn, out_shardings=self.batched, compiler_options=options)
    self._encode = jit(lambda p, x: jnp.concatenate(one_step.encode_moments(stage, p, x), -1))
    self._decode = jit(lambda p, z: one_step.decode_latent(stage, p, z))
    self._step = jit(lambda p, z, noise, cond: stage.step(p, z, noise, cond))
    self._condition = jit(stage.condition) if stage.condition is not None else None
    self.tiled_vae = tiled_vae_lib.TiledVAE(
        stage.vae, tile=settings.vae_tile or 1, batch=settings.batch, sharding=self.batched,
        attention_max_tokens=settings.vae_attention_max_tokens,
        attention_margin=settings.vae_attention_margin)
    self.has_vae_lora = params.get(stage.vae_key + '_lora') is not None

  def _put(self, tree):
    return jax.device_put(tree, self.batched)

  def _one(self, fn: Callable, *items: Any) -> Any:
    """``fn(params, *items)`` on one item each, repeated to the device count (an even shard)."""
    batch = jax.tree.map(lambda a: np.repeat(np.asarray(a)[None], self.devices, axis=0), items)
    out = fn(self.params, *self._put(batch))
    return jax.tree.map(lambda a: np.asarray(a)[0], out)

  def _vae_tiled(self, h: int, w: int) -> bool:
    tile = self.settings.vae_tile
    tiled = bool(tile) and h * w > tile * tile
    if tiled and self.has_vae_lora:
      raise ValueError('the tiled VAE needs plain VAE params: merge the encoder LoRA into '
                       f'params[{self.stage.vae_key!r}] when loading the generator')
    return tiled

  def encode(self, image: np.ndarray, key: jax.Array) -> np.ndarray:
    """(H, W, 3) in [-1, 1] -> the sampled latent (``latent_dist.sample()``, then the codec)."""
    f = self.stage.vae_factor
    vae_params = self.params[self.stage.vae_key]
    if self._vae_tiled(image.shape[0] // f, image.shape[1] // f):
      mean, logvar = self.tiled_vae.encode(vae_params, image, self.progress)
      self._log_attention()
    else:
      moments = np.asarray(self._one(self._encode, image), np.float32)
      mean, logvar = np.split(moments, 2, axis=-1)
    noise = np.asarray(jax.random.normal(key, mean.shape, jnp.float32))
    return self.stage.codec.to_latent(mean + np.exp(0.5 * logvar) * noise)  # numpy, on the host

  def predict(self, z: np.ndarray, noise: np.ndarray | None, cond: Any) -> np.ndarray:
    """The step on a (h, w, C) latent: tiled + Gaussian-blended when it is larger than one tile."""
    h, w, channels = z.shape
    inputs = z if noise is None else np.concatenate([z, noise], axis=-1)

    def step_tiles(tiles: np.ndarray) -> np.ndarray:
      batch = tiles.shape[0]
      tile_noise = None if noise is None else tiles[..., channels:]
      tile_cond = jax.tree.map(lambda a: np.broadcast_to(a, (batch,) + a.shape[1:]), cond)
      return self._step(self.params, *self._put((tiles[..., :channels], tile_noise, tile_cond)))

    if not tiling.needs_tiling(h, w, self.stage.latent_tile):
      return tiling.map_batched(step_tiles, inputs[None], self.devices, self.devices)[0]
    grid = tiling.latent_tile_grid(h, w, self.stage.latent_tile, self.settings.latent_overlap)
    return tiling.tiled_prediction(step_tiles, inputs, grid, self.settings.batch, self.devices,
                                   progress=self.progress)

  def decode(self, z: np.ndarray) -> np.ndarray:
    """(h, w, C) backbone latent -> (H, W, 3) image clamped to [-1, 1]."""
    if self._vae_tiled(*z.shape[:2]):
      vae_input = np.asarray(self.stage.codec.from_latent(z), np.float32)
      image = self.tiled_vae.decode(self.params[self.stage.vae_key], vae_input, self.progress)
      self._log_attention()
    else:
      image = self._one(self._decode, z)
    return np.clip(np.asarray(image, np.float32), -1.0, 1.0)

  def _log_attention(self) -> None:
    mode = self.tiled_vae.last_attention
    if self.log is not None and mode is not None and mode.windowed:
      self.log(f'{mode} (exact up to {self.tiled_vae.attention_max_tokens} tokens)')

  def __call__(self, image: np.ndarray, key: jax.Array) -> np.ndarray:
    z = self.encode(image, key)
    cond = None
    if self._condition is not None:
      cond = jax.tree.map(lambda a: a[None], self._one(self._condition, image, z))
    noise = one_step.step_noise(self.stage, key, z.shape)
    return self.decode(self.predict(z, None if noise is None else np.asarray(noise), cond))


class SuperResolver:
  """Jitted, sharded SR of a generator's stages with ``settings`` over all devices (or ``devices``).

  ``progress`` / ``log``: see :class:`_StageRunner`; both may be replaced between images (the
  evaluation loop sets them per image to print progress inside large images).
  """

  def __init__(self, generator: Any, settings: InferenceSettings, devices=None,
               progress: tiling.ProgressFn | None = None, log: Callable[[str], None] | None = None):
    self.generator, self.settings = generator, settings
    devices = np.asarray(devices if devices is not None else jax.devices())
    self.mesh = Mesh(devices, ('data',))
    self.devices = devices.size
    self.params = jax.device_put(generator.params, NamedSharding(self.mesh, P()))
    self.progress, self.log = progress, log
    report = lambda *args: self.progress(*args) if self.progress is not None else None
    say = lambda line: self.log(line) if self.log is not None else None
    self.stages = [_StageRunner(stage, self.params, settings, self.mesh, report, say)
                   for stage in generator.stages]

  @property
  def first_stage(self) -> Any:
    return self.generator.stages[0]

  def __call__(self, lq_upscaled: np.ndarray, key: jax.Array) -> np.ndarray:
    """(H, W, 3) uint8 LQ upscaled for the first stage -> uint8 SR (before the colour fix)."""
    x = lq_upscaled.astype(np.float32) / 127.5 - 1.0
    for index, runner in enumerate(self.stages):
      if index:
        x = resize_between_stages(x, runner.stage.upscale, runner.stage.resize,
                                  runner.stage.vae_factor)
      x = runner(x, key if index == 0 else jax.random.fold_in(key, index))
    return to_uint8((x + 1.0) / 2.0)


def super_resolve_image(resolver: SuperResolver, image: Image.Image, name: str) -> Image.Image:
  """The whole flow on one RGB image: preprocess, SR, colour fix, size restore."""
  s, first = resolver.settings, resolver.first_stage
  upscaled, restore_size = preprocess_lq(image, first.process_size, first.upscale,
                                         first.enlarge_small_inputs)
  lq = np.asarray(upscaled, np.uint8)
  sr = resolver(lq, image_noise_key(s.seed, name))
  if s.color_fix != 'none':
    reference = lq if lq.shape == sr.shape else np.asarray(
        upscaled.resize((sr.shape[1], sr.shape[0]), Image.BICUBIC), np.uint8)
    fixed = color_fix.apply_color_fix(s.color_fix, sr.astype(np.float32) / 255.0,
                                      reference.astype(np.float32) / 255.0)
    sr = to_uint8(np.asarray(fixed))
  out = Image.fromarray(sr)
  if restore_size is not None:
    scale = resolver.generator.upscale // first.upscale
    out = out.resize((restore_size[0] * scale, restore_size[1] * scale), Image.BICUBIC)
  target = (image.width * resolver.generator.upscale, image.height * resolver.generator.upscale)
  if resolver.generator.exact_output_size and out.size != target:
    out = out.resize(target, Image.BICUBIC)
  return out
