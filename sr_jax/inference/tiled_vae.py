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

Attention modes (:class:`AttentionMode`). The exact attention costs ``tokens^2``, so it dominates
on very large images (a 3000 x 200 panorama). Above ``attention_max_tokens`` latent tokens it is
*windowed*, as vaehook runs it per padded tile: each query tile attends only to the keys of its
window, the tile plus ``attention_margin`` latent px each side, clipped to the image (other keys
masked): linear in the area, an approximation (errors: ``benchmarks/tiled_vae_attention.py``). The
whole image's keys and values go to the devices once; each tile cuts its window out there.

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
import itertools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from sr_jax import xla
from sr_jax.inference.tiling import ProgressFn
from sr_jax.models.layers import get_activation, upsample_nearest
from sr_jax.models.vae import VAE_EPS, AutoencoderKL

BORDER = 1  # zero border kept around every host buffer: the largest halo of any stage
_NEG = -1e30
ENCODER_PHASE, DECODER_PHASE = 'VAE encoder', 'VAE decoder'

# Exact attention up to this many latent tokens N = h * w, windowed above. Exact costs 4 C N^2 FLOPs
# (C = 512 in SD's VAE) + N^2 exps; the rest of SD's decoder ~6e8 FLOPs per token (encoder ~3e8), so
# the attention's share grows with N: ~5% of the decoder's FLOPs at 128^2 (1K output), ~20% at 256^2
# (2K), ~90% at 512^2 (4K). A window of (tile + 2 margin)^2 keys (192^2 at tile 128) only pays off
# well above its own size. CPU: 256^2, exact to a 2K output, ~9 TFLOP of attention (timings:
# benchmarks/RESULTS.md). GPU/TPU: 512^2, exact to 4K, ~0.14 PFLOP (~0.3 s at half an H200's bf16
# peak: an estimate, not measured).
CPU_ATTENTION_MAX_TOKENS = 2 ** 16
ACCELERATOR_ATTENTION_MAX_TOKENS = 2 ** 18
# Latent px of context each side of a query tile if windowed: ~3x vaehook's decoder tile padding (11).
DEFAULT_ATTENTION_MARGIN = 32
# Logits per online-softmax step and device, ~1 GiB float32 (tile 128, 8 tiles: 2048 keys, not 128^2).
LOGITS_PER_STEP = 2 ** 28


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


@dataclasses.dataclass(frozen=True)
class AttentionMode:
  """The mid-block attention of one call: ``tokens`` = h * w; ``margin``: None (exact global) or
  latent px of context each side of a query tile; ``window``: (rows, cols) of keys cut out per tile
  (tile + margins, at most the padded image); ``chunk``: keys per online-softmax step."""
  tokens: int
  margin: int | None = None
  window: tuple[int, int] | None = None
  chunk: int = 0

  @property
  def windowed(self) -> bool:
    return self.margin is not None

  def __str__(self) -> str:
    kind = f'windowed (margin {self.margin})' if self.windowed else 'exact (global)'
    return f'VAE attention {kind} over {self.tokens} tokens'


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
  """Single-head softmax attention of queries (B, T, C) over keys/values (N, C) shared or (B, N, C)
  per tile, validity (N,) / (B, N); keys chunked with an online softmax (exact up to rounding; memory
  B x T x chunk). Scale ``C ** -0.5``; logits, softmax float32, probabilities in the value dtype."""
  per_tile, (n, c) = k.ndim == 3, k.shape[-2:]
  scale, lead = c ** -0.5, k.shape[:1] if per_tile else ()

  def split(a):  # (..., N, ...) -> (N / chunk, ..., chunk, ...): the scan runs over the first axis
    a = a.reshape(lead + (n // chunk, chunk) + a.shape[len(lead) + 1:])
    return jnp.moveaxis(a, len(lead), 0)

  kc, vc, mc = split(k), split(v), split(key_valid)
  keys = 'bnc' if per_tile else 'nc'

  def step(carry, chunk_kvm):
    m, denom, acc = carry
    k_i, v_i, valid_i = chunk_kvm
    valid_i = valid_i[:, None] if per_tile else valid_i[None, None]
    logits = jnp.einsum(f'btc,{keys}->btn', q, k_i, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(valid_i, logits, _NEG)
    m_new = jnp.maximum(m, logits.max(-1))
    # Zeroed explicitly: a chunk of padding keys only would otherwise give exp(0) = 1.
    p = jnp.where(valid_i, jnp.exp(logits - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    acc = acc * corr[..., None] + jnp.einsum(f'btn,{keys}->btc', p.astype(v_i.dtype), v_i,
                                             preferred_element_type=jnp.float32)
    return (m_new, denom * corr + p.sum(-1), acc), None

  b, t, _ = q.shape
  init = (jnp.full((b, t), _NEG, jnp.float32), jnp.zeros((b, t), jnp.float32),
          jnp.zeros((b, t, v.shape[-1]), jnp.float32))
  (_, denom, acc), _ = jax.lax.scan(step, init, (kc, vc, mc))
  return (acc / denom[..., None]).astype(q.dtype)


def window_chunk(window: tuple[int, int], target: int) -> int:
  """Keys per online-softmax step in a (rows, cols) window: the most whole rows that divide
  ``rows`` and fit ``target`` keys (at least one row), so no padding keys are needed."""
  rows, cols = window
  fit = max(1, target // cols)
  return cols * max(r for r in range(1, rows + 1) if rows % r == 0 and r <= fit)


def window_keys(kv: jax.Array, origins: jax.Array, valid: jax.Array, tile: int,
                mode: AttentionMode) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keys, values (B, rows * cols, C) and validity (B, rows * cols) of the query tiles at ``origins``
  (B, 2), cut out of the keys|values image ``kv`` (hp, wp, 2C): the window starts ``margin`` before
  the tile, shifted inside the padded image; keys count within ``margin`` and the ``valid`` image."""
  (rows, cols), margin = mode.window, mode.margin
  limit = jnp.array([kv.shape[0] - rows, kv.shape[1] - cols], jnp.int32)
  starts = jnp.clip(origins - margin, 0, limit)
  cut = lambda s: jax.lax.dynamic_slice(kv, (s[0], s[1], 0), (rows, cols, kv.shape[-1]))
  windows = jax.vmap(cut)(starts).reshape(origins.shape[0], rows * cols, kv.shape[-1])

  def inside(axis: int, size: int) -> jax.Array:  # (B, size) bool along one axis
    pos = starts[:, axis, None] + jnp.arange(size)[None]
    lo = origins[:, axis, None]
    return (pos >= lo - margin) & (pos < lo + tile + margin) & (pos < valid[axis])

  key_valid = (inside(0, rows)[:, :, None] & inside(1, cols)[:, None, :]).reshape(-1, rows * cols)
  k, v = jnp.split(windows, 2, axis=-1)
  return k, v, key_valid


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
  return jax.jit(_stage_tiles, static_argnums=(0, 1, 2), compiler_options=xla.compiler_options())


def run_stage(*args):
  """Jitted :func:`_stage_tiles`."""
  return _jitted_stage()(*args)


def _stage_tiles(stage: Stage, net: Network, attention: AttentionMode | None, params, x, origins,
                 valid_in, valid_out, stats, residual, kv):
  """Tile batch of one stage -> (outputs zeroed outside the image, per-tile group moments).
  ``attention`` (static): ``kv`` is (keys, values, validity) if exact, (keys|values image,) if not."""
  halo_lo = stage.halo[0]
  in_mask = valid_mask(origins, x.shape[1:3], valid_in)
  if attention is not None and attention.windowed:
    kv = window_keys(kv[0], origins, valid_in, x.shape[1], attention)
  kv = None if kv is None else (*kv, attention.chunk)
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

  @property
  def tiles(self) -> int:
    """Tiles per stage: the same at every level (the core scales with the buffer)."""
    return (self.hp // self.tile) * (self.wp // self.tile)


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

  ``attention_max_tokens``: above this many latent tokens (h * w) the attention is windowed with
  ``attention_margin`` latent px each side of a query tile (None: the backend's
  :func:`default_attention_max_tokens`; ``sys.maxsize``: always exact). :meth:`attention_mode` gives
  the mode of a latent size, ``last_attention`` that of the latest call, for logs ("VAE attention
  windowed (margin 32) over 150000 tokens").
  """

  def __init__(self, vae: AutoencoderKL, tile: int = 64, batch: int = 8, sharding: Any = None,
               attention_max_tokens: int | None = None,
               attention_margin: int = DEFAULT_ATTENTION_MARGIN):
    self.vae = vae
    self.net = Network(vae.norm_num_groups, vae.act_fn, jnp.dtype(vae.dtype))
    self.latent_level = len(vae.block_out_channels) - 1
    self.tile = int(tile)
    self.sharding = sharding
    self.devices = 1 if sharding is None else sharding.mesh.size
    self.batch = max(self.devices, batch - batch % self.devices)
    if (attention_max_tokens or 0) < 0 or attention_margin < 0:
      raise ValueError('attention_max_tokens and attention_margin must be >= 0')
    self.attention_max_tokens = int(default_attention_max_tokens() if attention_max_tokens is None
                                    else attention_max_tokens)
    self.attention_margin = int(attention_margin)
    self.last_attention: AttentionMode | None = None

  def geometry(self, h: int, w: int) -> Geometry:
    t = self.tile
    return Geometry(h, w, math.ceil(h / t) * t, math.ceil(w / t) * t, t, self.latent_level)

  def attention_mode(self, h: int, w: int) -> AttentionMode | None:
    """The attention mode of an (h, w) latent (None: the VAE has no mid-block attention)."""
    if not self.vae.mid_block_add_attention:
      return None
    t, tokens = self.tile, h * w
    per_step = max(1, LOGITS_PER_STEP // (self.batch // self.devices * t * t))
    if tokens <= self.attention_max_tokens:  # keys: the padded image's, a multiple of t^2
      return AttentionMode(tokens, chunk=window_chunk((t, t), per_step))
    geometry, side = self.geometry(h, w), t + 2 * self.attention_margin
    window = (min(side, geometry.hp), min(side, geometry.wp))
    return AttentionMode(tokens, self.attention_margin, window, window_chunk(window, per_step))

  def encode(self, params: Any, image: np.ndarray, progress: ProgressFn | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, C_in) image -> posterior (mean, logvar), each (H / f, W / f, C_lat) float32; H and W
    must be multiples of the latent factor f. logvar clipped to [-30, 20] as ``AutoencoderKL``.
    ``progress(phase='VAE encoder', done, total)`` after each device call (tile batches over all
    stages; None: no calls)."""
    f = 2 ** self.latent_level
    if image.shape[0] % f or image.shape[1] % f:
      raise ValueError(f'image {image.shape[:2]} is not a multiple of the VAE factor {f}')
    geometry = self.geometry(image.shape[0] // f, image.shape[1] // f)
    moments = self._run(encoder_program(self.vae), params, image, 0, geometry, progress,
                        ENCODER_PHASE)
    mean, logvar = np.split(np.asarray(moments, np.float32), 2, axis=-1)
    return mean, np.clip(logvar, -30.0, 20.0)

  def decode(self, params: Any, latent: np.ndarray, progress: ProgressFn | None = None
             ) -> np.ndarray:
    """(h, w, C_lat) latent (unscaled) -> (h f, w f, C_out) image, float32. ``progress``: as in
    :meth:`encode`, phase ``'VAE decoder'``."""
    geometry = self.geometry(latent.shape[0], latent.shape[1])
    image = self._run(decoder_program(self.vae), params, latent, self.latent_level, geometry,
                      progress, DECODER_PHASE)
    return np.asarray(image, np.float32)

  def _run(self, program: list[Stage], params: Any, inputs: np.ndarray, level: int,
           geometry: Geometry, progress: ProgressFn | None, phase: str) -> np.ndarray:
    """Runs ``program`` on ``inputs`` (at ``level``); returns the valid part of the last buffer.
    ``progress`` counts device calls: every stage makes ``ceil(tiles / batch)``."""
    self.last_attention = self.attention_mode(geometry.h, geometry.w)
    total, done = len(program) * math.ceil(geometry.tiles / self.batch), itertools.count(1)
    tick = None if progress is None else (lambda: progress(phase, next(done), total))
    hp, wp = geometry.padded(level)
    buf = np.zeros((hp + 2 * BORDER, wp + 2 * BORDER, inputs.shape[-1]), np.dtype(self.net.dtype))
    buf[BORDER:BORDER + inputs.shape[0], BORDER:BORDER + inputs.shape[1]] = inputs
    buffers, stats = {'x': buf}, {}
    for stage in program:
      stage_params = {role: _get(params, path) for role, path in stage.params}
      stage_params = {k: v for k, v in stage_params.items() if v is not None}
      buffers[stage.dst], stats[stage.dst] = self._run_stage(stage, stage_params, buffers, stats,
                                                             geometry, tick)
    h, w = geometry.valid(program[-1].level_out)
    return buffers['x'][BORDER:BORDER + h, BORDER:BORDER + w]

  def _key_values(self, buffers, geometry: Geometry):
    """The attention's keys and values on every device: exact mode, all (N, C) and their validity;
    windowed, their (hp, wp, 2C) image (windows cut on the device)."""
    kv = buffers['kv'][BORDER:-BORDER, BORDER:-BORDER]
    place = (lambda a: jax.device_put(a)) if self.sharding is None else (
        lambda a: jax.device_put(a, jax.sharding.NamedSharding(self.sharding.mesh,
                                                               jax.sharding.PartitionSpec())))
    if self.last_attention.windowed:
      return (place(kv),)
    hp, wp, c2 = kv.shape
    valid = geometry.valid(self.latent_level)
    rows, cols = np.meshgrid(np.arange(hp), np.arange(wp), indexing='ij')
    key_valid = ((rows < valid[0]) & (cols < valid[1])).reshape(-1)
    k, v = np.split(kv.reshape(hp * wp, c2), 2, axis=-1)
    return place(k), place(v), place(key_valid)

  def _run_stage(self, stage: Stage, params: Any, buffers: dict, stats: dict, geometry: Geometry,
                 tick: Callable[[], None] | None = None):
    """One stage over every tile, in device batches -> (output buffer, its GroupNorm statistics).
    ``tick()`` after each device call."""
    c = geometry.core(stage.level_out)
    hp, wp = geometry.padded(stage.level_out)
    cores = [(y, x) for y in range(0, hp, c) for x in range(0, wp, c)]
    src = buffers[stage.src]
    residual_buf = buffers.get(stage.residual) if stage.residual else None
    attention = self.last_attention if stage.kind == 'attention_out' else None
    kv = self._key_values(buffers, geometry) if attention is not None else None
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
      y_tiles, parts = self._call(stage, attention, params, x_tiles, origins, valid_in, valid_out,
                                  stats_arg, res_tiles, kv)
      if tick is not None:
        tick()
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

  def _call(self, stage, attention, params, x_tiles, origins, valid_in, valid_out, stats,
            res_tiles, kv):
    """Pads the tile batch to ``self.batch``, shards it, runs the jitted stage, drops the padding."""
    count = len(x_tiles)
    extra = self.batch - count
    pad = lambda a: None if a is None else np.concatenate([a, np.repeat(a[-1:], extra, axis=0)])
    x_tiles, origins, res_tiles = pad(x_tiles), pad(origins), pad(res_tiles)
    put = (lambda a: a) if self.sharding is None else (
        lambda a: None if a is None else jax.device_put(a, self.sharding))
    # Without the (reported only) token count, a new image size recompiles only on new shapes.
    static = None if attention is None else dataclasses.replace(attention, tokens=0)
    y, parts = run_stage(stage.kernel_key(), self.net, static, params, put(x_tiles), put(origins),
                         valid_in, valid_out, stats, put(res_tiles), kv)
    y = np.asarray(y)[:count]
    return y, None if parts is None else np.asarray(parts)[:count]


def default_attention_max_tokens() -> int:
  """:data:`CPU_ATTENTION_MAX_TOKENS` on the CPU, else :data:`ACCELERATOR_ATTENTION_MAX_TOKENS`."""
  return CPU_ATTENTION_MAX_TOKENS if xla.on_cpu() else ACCELERATOR_ATTENTION_MAX_TOKENS
