"""Tiled VAE encode/decode with whole-image GroupNorm statistics: equal to the untiled VAE.

Why tiles: the SD VAE's activations at the image resolution (128-512 channels at 2K-4K px) dominate
inference memory. Why not naive tiles: every VAE block starts with a GroupNorm whose statistics are
taken over the *whole* image, and the mid-block self-attention is global, so running the network on
tiles independently changes every normalisation and leaves seams (multidiffusion-upscaler's vaehook,
which the reference ships but has switched off, aggregates GroupNorm statistics across padded tiles
and runs the attention per tile, so it only approximates the full VAE).

Design ("GroupNorm-synchronised stages"). The encoder and the decoder are cut into *stages* at every
point that needs whole-image information, i.e. every GroupNorm and the attention::

  resnet   = [GN1 -> SiLU -> conv1]  [GN2 -> SiLU -> conv2 + shortcut(x)]
  attention= [GN -> k, v for all positions]  [GN -> q; softmax(q k^T / sqrt(C)) v over ALL keys -> out + x]
  plus conv_in, the stride-2 downsampler, nearest-x2 + conv upsampler, [GN -> SiLU -> conv_out]

Between stages the activation of the whole image lives in host memory (numpy, compute dtype). A stage
runs tile by tile on the devices: each tile reads its window of the stage input with the halo its
convolutions need (1 px; the stride-2 conv reads one more row/column, the upsampler one input pixel
around), so every output pixel is computed from exactly the values the untiled network uses, and
writes the core of its output. GroupNorm statistics: each stage also returns, per tile, the count,
mean and sum of squared deviations of every channel group of its output over the valid pixels; the
host combines them in float64 over all tiles (Chan's parallel-variance formula), and the next stage
normalises with these whole-image statistics, exactly what the untiled GroupNorm computes. The
attention's keys and values are computed tile-wise for every position, then each query tile attends
to all of them (chunked over keys with an online softmax, so memory is query-tile x key-chunk).
Hence tiled == untiled up to floating-point summation order: no seams, no tolerance beyond rounding
(``tests/test_tiled_vae.py`` measures it). Zero padding at the image border is reproduced by keeping the
host buffers zero outside the image and masking activations before each convolution.

Geometry: tiles are squares of ``tile`` latent pixels (``tile * 2^k`` at a level ``k`` steps above the
latent); the image is padded up to a multiple of the tile (masked, excluded from statistics and from
attention keys). All tiles of a stage have one shape, so each stage compiles once for every image
size (the attention stage once per latent size). Tiles are processed in batches sharded over the
devices' ``data`` axis. Memory: on the devices, one batch of tile windows; on the host, about three
whole-image activations of the widest stage (e.g. ~3 x 0.5 GiB at a 2K output in bf16 for SD's 128
channels at full resolution, ~3 x 4 GiB at 4K), instead of the untiled network's whole working set on
the device.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sr_jax.models import kernels
from sr_jax.models.layers import get_activation, upsample_nearest
from sr_jax.models.vae import VAE_EPS, AutoencoderKL

BORDER = 1  # zero border kept around every host buffer: the largest halo of any stage
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class Stage:
  """One tile-wise step. ``params``: (role, path in the VAE param tree) pairs; ``level``: log2 of the
  downsampling factor of the buffer (0 = image); ``halo``: (before, after) input pixels each side;
  ``moments``: whether a later GroupNorm reads the output (the last stage's channels, e.g. 3, need
  not be a multiple of the groups)."""
  kind: str
  params: tuple[tuple[str, tuple[str, ...]], ...]
  src: str
  dst: str
  level_in: int
  level_out: int
  residual: str | None = None
  halo: tuple[int, int] = (1, 1)
  moments: bool = True

  def kernel_key(self) -> 'Stage':
    """What the jitted tile function depends on, so equal-shaped stages share one compile."""
    return dataclasses.replace(self, params=(), src='', dst='', level_in=0,
                               level_out=self.level_out - self.level_in, residual=None)


@dataclasses.dataclass(frozen=True)
class Network:
  """Static description shared by every stage: norm groups, activation, compute dtype."""
  groups: int
  act_fn: str
  dtype: Any


# ------------------------------------------------------------------------------ programs


def _resnet(path: tuple[str, ...], level: int) -> list[Stage]:
  """ResnetBlock2D as two stages: [GN1 SiLU conv1] -> h, [GN2 SiLU conv2 + shortcut(x)] -> x."""
  p = lambda *names: tuple((role, path + (name,)) for role, name in names)
  return [Stage('norm_act_conv', p(('norm', 'norm1'), ('conv', 'conv1')), 'x', 'h', level, level),
          Stage('norm_act_conv_add', p(('norm', 'norm2'), ('conv', 'conv2'),
                                       ('shortcut', 'conv_shortcut')),
                'h', 'x', level, level, residual='x')]


def _mid_block(path: tuple[str, ...], level: int, attention: bool) -> list[Stage]:
  stages = _resnet(path + ('resnets_0',), level)
  if attention:
    attn = path + ('attentions_0',)
    roles = lambda *names: tuple((n, attn + (n,)) for n in names)
    stages += [Stage('attention_kv', roles('group_norm', 'to_k', 'to_v'), 'x', 'kv', level, level,
                     halo=(0, 0), moments=False),
               Stage('attention_out', roles('group_norm', 'to_q', 'to_out_0'), 'x', 'x', level,
                     level, halo=(0, 0))]
  return stages + _resnet(path + ('resnets_1',), level)


def encoder_program(vae: AutoencoderKL) -> list[Stage]:
  """The stages of ``Encoder`` + ``quant_conv``: image buffer 'x' (level 0) -> moments (latent level)."""
  n = len(vae.block_out_channels)
  stages = [Stage('conv', (('conv', ('encoder', 'conv_in')),), 'x', 'x', 0, 0)]
  level = 0
  for i in range(n):
    for j in range(vae.layers_per_block):
      stages += _resnet(('encoder', f'down_blocks_{i}', f'resnets_{j}'), level)
    if i < n - 1:
      stages.append(Stage('downsample', (('conv', ('encoder', f'down_blocks_{i}', 'downsamplers_0',
                                                   'conv')),), 'x', 'x', level, level + 1,
                          halo=(0, 1)))
      level += 1
  stages += _mid_block(('encoder', 'mid_block'), level, vae.mid_block_add_attention)
  stages.append(Stage('norm_act_conv', (('norm', ('encoder', 'conv_norm_out')),
                                        ('conv', ('encoder', 'conv_out')),
                                        ('pointwise', ('quant_conv',))), 'x', 'x', level, level,
                        moments=False))
  return stages


def decoder_program(vae: AutoencoderKL) -> list[Stage]:
  """The stages of ``post_quant_conv`` + ``Decoder``: latent buffer 'x' -> image (level 0)."""
  n = len(vae.block_out_channels)
  level = n - 1
  stages = [Stage('pointwise_conv', (('pointwise', ('post_quant_conv',)),
                                     ('conv', ('decoder', 'conv_in'))), 'x', 'x', level, level)]
  stages += _mid_block(('decoder', 'mid_block'), level, vae.mid_block_add_attention)
  for i in range(n):
    for j in range(vae.layers_per_block + 1):
      stages += _resnet(('decoder', f'up_blocks_{i}', f'resnets_{j}'), level)
    if i < n - 1:
      stages.append(Stage('upsample', (('conv', ('decoder', f'up_blocks_{i}', 'upsamplers_0',
                                                 'conv')),), 'x', 'x', level, level - 1))
      level -= 1
  stages.append(Stage('norm_act_conv', (('norm', ('decoder', 'conv_norm_out')),
                                        ('conv', ('decoder', 'conv_out'))), 'x', 'x', level, level,
                        moments=False))
  return stages


# ------------------------------------------------------------------------- tile operations


def conv_valid(params: Mapping[str, Any], x: jax.Array, dtype: Any, stride: int = 1) -> jax.Array:
  """The VAE's ``nn.Conv`` on a window that already holds its halo (no padding)."""
  kernel = params['kernel']
  conv = nn.Conv(kernel.shape[-1], kernel.shape[:2], strides=(stride, stride), padding='VALID',
                 dtype=dtype, param_dtype=kernel.dtype)
  return conv.apply({'params': params}, x)


def dense(params: Mapping[str, Any], x: jax.Array, dtype: Any) -> jax.Array:
  kernel = params['kernel']
  return nn.Dense(kernel.shape[-1], use_bias='bias' in params, dtype=dtype,
                  param_dtype=kernel.dtype).apply({'params': params}, x)


def group_norm_with_stats(params: Mapping[str, Any], x: jax.Array, mean: jax.Array, var: jax.Array,
                          dtype: Any) -> jax.Array:
  """GroupNorm with given per-channel statistics, in flax's operation order (float32 math, cast to
  ``dtype``): ``(x - mean) * (rsqrt(var + eps) * scale) + bias``, eps = 1e-6 (diffusers' VAE)."""
  mul = jax.lax.rsqrt(var + VAE_EPS) * params['scale'].astype(jnp.float32)
  y = (x - mean) * mul + params['bias'].astype(jnp.float32)
  return y.astype(dtype)


def valid_mask(origins: jax.Array, size: tuple[int, int], valid: jax.Array) -> jax.Array:
  """(B, h, w, 1) bool: which positions of windows at ``origins`` (B, 2) lie inside the image of
  ``valid`` = (height, width) pixels at that level."""
  rows = origins[:, 0, None] + jnp.arange(size[0])[None]
  cols = origins[:, 1, None] + jnp.arange(size[1])[None]
  inside_r = (rows >= 0) & (rows < valid[0])
  inside_c = (cols >= 0) & (cols < valid[1])
  return (inside_r[:, :, None] & inside_c[:, None, :])[..., None]


def group_moments(y: jax.Array, mask: jax.Array, groups: int) -> jax.Array:
  """(B, groups, 3) float32: per tile and channel group, (count, mean, sum of squared deviations) of
  ``y`` over the masked positions: the partial GroupNorm statistics of the next stage, combined on the
  host with Chan's parallel formula (:func:`combine_moments`), which stays accurate where
  ``E[x^2] - E[x]^2`` would cancel."""
  b, h, w, c = y.shape
  size = c // groups
  weight = jnp.broadcast_to(mask, (b, h, w, 1)).astype(jnp.float32)  # 0/1, so weight^2 = weight
  y = y.astype(jnp.float32).reshape(b, h, w, groups, size)
  # Each sum runs over the group's channels (the minor axis) first: see layers.group_norm_moments.
  count = jnp.broadcast_to(weight.sum(axis=(1, 2)) * size, (b, groups))
  mean = (y.sum(axis=-1) * weight).sum(axis=(1, 2)) / jnp.maximum(count, 1.0)
  dev = y - mean[:, None, None, :, None]
  return jnp.stack([count, mean, ((dev * dev).sum(axis=-1) * weight).sum(axis=(1, 2))], axis=-1)


def combine_moments(parts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(tiles, groups, 3) partial moments -> whole-image (mean, variance) per group, float64."""
  parts = np.asarray(parts, np.float64)
  count, mean, m2 = parts[..., 0], parts[..., 1], parts[..., 2]
  total = count.sum(0)
  grand = (count * mean).sum(0) / total
  return grand, (m2 + count * (mean - grand) ** 2).sum(0) / total


def attend_all_keys(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                    chunk: int) -> jax.Array:
  """Single-head softmax attention of queries (B, T, C) over all keys/values (N, C), keys chunked
  with an online softmax (exact up to rounding; memory B x T x chunk). Scale ``C ** -0.5``; logits and
  softmax in float32, probabilities cast to the value dtype, as ``jax.nn.dot_product_attention``."""
  n, c = k.shape
  scale = c ** -0.5
  kc, vc, mc = (a.reshape((n // chunk, chunk) + a.shape[1:]) for a in (k, v, key_valid))

  def step(carry, chunk_kvm):
    m, denom, acc = carry
    k_i, v_i, valid_i = chunk_kvm
    logits = jnp.einsum('btc,nc->btn', q, k_i, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(valid_i[None, None], logits, _NEG)
    m_new = jnp.maximum(m, logits.max(-1))
    # Zeroed explicitly: a chunk of padding keys only would otherwise give exp(0) = 1.
    p = jnp.where(valid_i[None, None], jnp.exp(logits - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    acc = acc * corr[..., None] + jnp.einsum('btn,nc->btc', p.astype(v_i.dtype), v_i,
                                             preferred_element_type=jnp.float32)
    return (m_new, denom * corr + p.sum(-1), acc), None

  b, t, _ = q.shape
  init = (jnp.full((b, t), _NEG, jnp.float32), jnp.zeros((b, t), jnp.float32),
          jnp.zeros((b, t, v.shape[-1]), jnp.float32))
  (_, denom, acc), _ = jax.lax.scan(step, init, (kc, vc, mc))
  return (acc / denom[..., None]).astype(q.dtype)


def _normed(net: Network, p, x, stats, in_mask, activate: bool = True):
  h = group_norm_with_stats(p['norm'], x, stats[0], stats[1], net.dtype)
  if activate:
    h = get_activation(net.act_fn)(h)
  return jnp.where(in_mask, h, jnp.zeros((), h.dtype))  # the conv's zero padding at the border


def stage_compute(stage: Stage, net: Network, p, x, in_mask, stats, residual, kv):
  """The stage's operation on a batch of windows ``x`` (B, h + halo, w + halo, C) -> cores."""
  dtype, kind = net.dtype, stage.kind
  if kind == 'conv':
    return conv_valid(p['conv'], x, dtype)
  if kind == 'pointwise_conv':  # post_quant_conv (1x1) then conv_in, zero outside the image
    if 'pointwise' in p:
      x = conv_valid(p['pointwise'], x, dtype)
    return conv_valid(p['conv'], jnp.where(in_mask, x, jnp.zeros((), x.dtype)), dtype)
  if kind == 'downsample':
    return conv_valid(p['conv'], x, dtype, stride=2)
  if kind == 'upsample':  # window of c/2 + 2 -> nearest x2 -> crop to c + 2 -> 3x3 conv -> c
    up = upsample_nearest(x)[:, 1:-1, 1:-1]
    return conv_valid(p['conv'], up, dtype)
  if kind == 'norm_act_conv':
    y = conv_valid(p['conv'], _normed(net, p, x, stats, in_mask), dtype)
    return conv_valid(p['pointwise'], y, dtype) if 'pointwise' in p else y
  if kind == 'norm_act_conv_add':
    y = conv_valid(p['conv'], _normed(net, p, x, stats, in_mask), dtype)
    if 'shortcut' in p:
      residual = conv_valid(p['shortcut'], residual, dtype)
    return residual.astype(y.dtype) + y
  if kind == 'attention_kv':
    h = group_norm_with_stats(p['group_norm'], x, stats[0], stats[1], dtype)
    return jnp.concatenate([dense(p['to_k'], h, dtype), dense(p['to_v'], h, dtype)], axis=-1)
  if kind == 'attention_out':
    b, th, tw, c = x.shape
    h = group_norm_with_stats(p['group_norm'], x, stats[0], stats[1], dtype)
    q = dense(p['to_q'], h, dtype).reshape(b, th * tw, -1)
    k, v, key_valid, chunk = kv
    out = attend_all_keys(q, k, v, key_valid, chunk)
    out = dense(p['to_out_0'], out, dtype).reshape(b, th, tw, c)
    return out + x.astype(out.dtype)
  raise ValueError(f'unknown stage kind {kind!r}')


@functools.cache
def _jitted_stage() -> Callable:
  # Built on first use: the compiler options depend on the backend, unknown at import.
  return jax.jit(_stage_tiles, static_argnums=(0, 1, 2), compiler_options=kernels.compiler_options())


def run_stage(*args):
  """Jitted :func:`_stage_tiles`."""
  return _jitted_stage()(*args)


def _stage_tiles(stage: Stage, net: Network, chunk: int, params, x, origins, valid_in, valid_out,
                 stats, residual, kv):
  """Tile batch of one stage -> (outputs zeroed outside the image, per-tile group moments)."""
  halo_lo = stage.halo[0]
  in_mask = valid_mask(origins, x.shape[1:3], valid_in)
  kv = None if kv is None else (*kv, chunk)
  y = stage_compute(stage, net, params, x, in_mask, stats, residual, kv)
  scale = 2.0 ** (stage.level_in - stage.level_out)  # output pixels per input pixel
  out_origins = jnp.round((origins + halo_lo) * scale).astype(jnp.int32)
  out_mask = valid_mask(out_origins, y.shape[1:3], valid_out)
  y = jnp.where(out_mask, y, jnp.zeros((), y.dtype))
  if not stage.moments:
    return y, None
  return y, group_moments(y, out_mask, net.groups)


# ------------------------------------------------------------------------------- executor


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any | None:
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Tile grid of one image: padded latent (hp, wp), valid latent (h, w), tile, latent level."""
  h: int
  w: int
  hp: int
  wp: int
  tile: int
  latent_level: int

  def factor(self, level: int) -> int:
    return 2 ** (self.latent_level - level)

  def padded(self, level: int) -> tuple[int, int]:
    return self.hp * self.factor(level), self.wp * self.factor(level)

  def valid(self, level: int) -> np.ndarray:
    return np.array([self.h * self.factor(level), self.w * self.factor(level)], np.int32)

  def core(self, level: int) -> int:
    return self.tile * self.factor(level)


def window(stage: Stage, geometry: Geometry, y: int, x: int) -> tuple[int, int, int, int]:
  """Input window (y0, x0, height, width), unbordered input coordinates, of the output core at
  (y, x)."""
  c = geometry.core(stage.level_out)
  lo, hi = stage.halo
  shift = stage.level_out - stage.level_in  # +1 down, -1 up, 0 same level
  to_in = (lambda v: v * 2) if shift > 0 else (lambda v: v // 2) if shift < 0 else (lambda v: v)
  size = to_in(c) + lo + hi
  return to_in(y) - lo, to_in(x) - lo, size, size


class TiledVAE:
  """Runs the VAE encoder or decoder of ``vae`` stage by stage over tiles (see the module docstring).

  ``tile``: core tile side in latent pixels; ``batch``: tiles per device call (rounded to a multiple of
  the device count); ``sharding``: a ``NamedSharding`` splitting the leading axis over devices (None:
  the default device). ``params`` passed to :meth:`encode` / :meth:`decode` are the VAE (sub)tree
  (``encoder`` + ``quant_conv`` and/or ``post_quant_conv`` + ``decoder``), already on the devices.
  """

  def __init__(self, vae: AutoencoderKL, tile: int = 64, batch: int = 8, sharding: Any = None):
    self.vae = vae
    self.net = Network(vae.norm_num_groups, vae.act_fn, jnp.dtype(vae.dtype))
    self.latent_level = len(vae.block_out_channels) - 1
    self.tile = int(tile)
    self.sharding = sharding
    self.devices = 1 if sharding is None else sharding.mesh.size
    self.batch = max(self.devices, batch - batch % self.devices)

  def geometry(self, h: int, w: int) -> Geometry:
    t = self.tile
    return Geometry(h, w, math.ceil(h / t) * t, math.ceil(w / t) * t, t, self.latent_level)

  def encode(self, params: Any, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C_in) image -> posterior (mean, logvar), each (H / f, W / f, C_lat) float32; H and W
    must be multiples of the latent factor f. logvar clipped to [-30, 20] as ``AutoencoderKL``."""
    f = 2 ** self.latent_level
    if image.shape[0] % f or image.shape[1] % f:
      raise ValueError(f'image {image.shape[:2]} is not a multiple of the VAE factor {f}')
    geometry = self.geometry(image.shape[0] // f, image.shape[1] // f)
    moments = self._run(encoder_program(self.vae), params, image, 0, geometry)
    mean, logvar = np.split(np.asarray(moments, np.float32), 2, axis=-1)
    return mean, np.clip(logvar, -30.0, 20.0)

  def decode(self, params: Any, latent: np.ndarray) -> np.ndarray:
    """(h, w, C_lat) latent (unscaled) -> (h f, w f, C_out) image, float32."""
    geometry = self.geometry(latent.shape[0], latent.shape[1])
    image = self._run(decoder_program(self.vae), params, latent, self.latent_level, geometry)
    return np.asarray(image, np.float32)

  def _run(self, program: list[Stage], params: Any, inputs: np.ndarray, level: int,
           geometry: Geometry) -> np.ndarray:
    """Runs ``program`` on ``inputs`` (at ``level``); returns the valid part of the last buffer."""
    hp, wp = geometry.padded(level)
    buf = np.zeros((hp + 2 * BORDER, wp + 2 * BORDER, inputs.shape[-1]), np.dtype(self.net.dtype))
    buf[BORDER:BORDER + inputs.shape[0], BORDER:BORDER + inputs.shape[1]] = inputs
    buffers, stats = {'x': buf}, {}
    for stage in program:
      stage_params = {role: _get(params, path) for role, path in stage.params}
      stage_params = {k: v for k, v in stage_params.items() if v is not None}
      buffers[stage.dst], stats[stage.dst] = self._run_stage(stage, stage_params, buffers, stats,
                                                             geometry)
    h, w = geometry.valid(program[-1].level_out)
    return buffers['x'][BORDER:BORDER + h, BORDER:BORDER + w]

  def _key_values(self, buffers, geometry: Geometry):
    """All keys and values (N, C) of the attention level, their validity, on every device."""
    kv = buffers['kv'][BORDER:-BORDER, BORDER:-BORDER]
    hp, wp, c2 = kv.shape
    valid = geometry.valid(self.latent_level)
    rows, cols = np.meshgrid(np.arange(hp), np.arange(wp), indexing='ij')
    key_valid = ((rows < valid[0]) & (cols < valid[1])).reshape(-1)
    k, v = np.split(kv.reshape(hp * wp, c2), 2, axis=-1)
    place = (lambda a: jax.device_put(a)) if self.sharding is None else (
        lambda a: jax.device_put(a, jax.sharding.NamedSharding(self.sharding.mesh,
                                                               jax.sharding.PartitionSpec())))
    return place(k), place(v), place(key_valid)

  def _run_stage(self, stage: Stage, params: Any, buffers: dict, stats: dict, geometry: Geometry):
    """One stage over every tile, in device batches -> (output buffer, its GroupNorm statistics)."""
    c = geometry.core(stage.level_out)
    hp, wp = geometry.padded(stage.level_out)
    cores = [(y, x) for y in range(0, hp, c) for x in range(0, wp, c)]
    src = buffers[stage.src]
    residual_buf = buffers.get(stage.residual) if stage.residual else None
    kv = self._key_values(buffers, geometry) if stage.kind == 'attention_out' else None
    stage_stats = stats.get(stage.src)
    stats_arg = None if stage_stats is None else tuple(jnp.asarray(s, jnp.float32)
                                                       for s in stage_stats)
    valid_in, valid_out = geometry.valid(stage.level_in), geometry.valid(stage.level_out)
    # Writing in place is safe unless the stage reads halos of the buffer it writes (src == dst);
    # a residual read is the tile's own core, taken before the tile is written.
    old = buffers.get(stage.dst) if stage.dst != stage.src else None
    out, moments = None, []
    for start in range(0, len(cores), self.batch):
      batch = cores[start:start + self.batch]
      wins = [window(stage, geometry, y, x) for y, x in batch]
      x_tiles = np.stack([src[y0 + BORDER:y0 + BORDER + sh, x0 + BORDER:x0 + BORDER + sw]
                          for y0, x0, sh, sw in wins])
      origins = np.array([w[:2] for w in wins], np.int32)
      res_tiles = None if residual_buf is None else np.stack(
          [residual_buf[y + BORDER:y + BORDER + c, x + BORDER:x + BORDER + c] for y, x in batch])
      y_tiles, parts = self._call(stage, params, x_tiles, origins, valid_in, valid_out, stats_arg,
                                  res_tiles, kv)
      if out is None:
        shape = (hp + 2 * BORDER, wp + 2 * BORDER, y_tiles.shape[-1])
        reuse = old is not None and old.shape == shape and old.dtype == y_tiles.dtype
        out = old if reuse else np.zeros(shape, y_tiles.dtype)
      for (y, x), tile in zip(batch, y_tiles):
        out[y + BORDER:y + BORDER + c, x + BORDER:x + BORDER + c] = tile
      if parts is not None:
        moments.append(parts)
    if not moments:
      return out, None
    mean, var = combine_moments(np.concatenate(moments))
    size = out.shape[-1] // self.net.groups
    return out, (np.repeat(mean, size).astype(np.float32), np.repeat(var, size).astype(np.float32))

  def _call(self, stage, params, x_tiles, origins, valid_in, valid_out, stats, res_tiles, kv):
    """Pads the tile batch to ``self.batch``, shards it, runs the jitted stage, drops the padding."""
    count = len(x_tiles)
    extra = self.batch - count
    pad = lambda a: None if a is None else np.concatenate([a, np.repeat(a[-1:], extra, axis=0)])
    x_tiles, origins, res_tiles = pad(x_tiles), pad(origins), pad(res_tiles)
    put = (lambda a: a) if self.sharding is None else (
        lambda a: None if a is None else jax.device_put(a, self.sharding))
    chunk = self.tile * self.tile
    y, parts = run_stage(stage.kernel_key(), self.net, chunk, params, put(x_tiles), put(origins),
                         valid_in, valid_out, stats, put(res_tiles), kv)
    y = np.asarray(y)[:count]
    return y, None if parts is None else np.asarray(parts)[:count]
