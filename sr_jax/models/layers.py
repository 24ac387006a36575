"""Building blocks shared by the diffusers-architecture UNet and VAE (Flax linen, NHWC).

Each module mirrors the diffusers PyTorch module of the same name, and its submodules carry the
PyTorch attribute names (``to_out_0``, ``ff/net_0/proj``, ``time_emb_proj`` ...), so checkpoints convert
with `sr_jax.weights.convert_state_dict` and no special cases. Epsilons follow diffusers: the UNet
ResNets take ``norm_eps`` from the config, Transformer2DModel's GroupNorm uses 1e-6 and its LayerNorms
1e-5, the VAE uses 1e-6 everywhere.

Precision: ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. Normalisation statistics
and the attention softmax are always computed in float32 (`GroupNorm` and Flax's LayerNorm compute
their statistics in float32; `jax.nn.dot_product_attention` takes float32 logits), so bf16 compute
stays close to fp32. `GroupNorm` is ``nn.GroupNorm`` with statistics XLA:CPU computes several times
faster (see `group_norm_moments`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from sr_jax.models import cpu_kernels

Dtype = Any

# nn.Conv with the CPU fast paths of `cpu_kernels.conv_general_dilated` (depthwise, Winograd 3x3); still an
# nn.Conv, so param names and LoRA interception are unchanged, and off the CPU it is plain lax.
Conv = functools.partial(nn.Conv, conv_general_dilated=cpu_kernels.conv_general_dilated)


def gelu_exact(x: jax.Array) -> jax.Array:
  """Exact GELU, ``0.5 * x * (1 + erf(x / sqrt(2)))``: PyTorch's formula (``F.gelu``, diffusers,
  transformers' "gelu"). ``jax.nn.gelu(approximate=False)`` computes ``erfc(-x / sqrt(2))``
  instead, whose XLA:CPU expansion (both branches and an ``exp``) is several times slower than this
  form; results agree to float32 rounding."""
  return 0.5 * x * (1.0 + lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': nn.silu,
    'swish': nn.silu,
    'gelu': gelu_exact,
    'relu': nn.relu,
    'mish': lambda x: x * jnp.tanh(nn.softplus(x)),
}


def maybe_remat(module_class: type[nn.Module], remat: bool) -> type[nn.Module]:
  """``nn.remat(module_class)`` when ``remat``: the block keeps only its inputs for the backward pass
  and recomputes its inside (param names are unchanged: children are built with explicit names).

  Per block, not per model: rematerialising a whole model recomputes all of its activations at once
  in the backward pass, so the peak does not move (benchmarks/RESULTS.md).
  """
  return nn.remat(module_class) if remat else module_class


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """diffusers ``get_activation``: the activation function called ``name`` (GELU is the exact erf form)."""
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f'unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}') from None


def conv_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch ``padding=(k - 1) // 2`` on both sides of both spatial axes."""
  p = (kernel_size - 1) // 2
  return ((p, p), (p, p))


def attention_implementation(dtype: Dtype, head_dim: int, q_len: int, kv_len: int) -> str | None:
  """cuDNN fused attention on GPU for half-precision compute and shapes it supports, else XLA.

  cuDNN's flash backward refuses odd sequence lengths (jax 0.11 on an H200: "Unsupported sequence
  length Q 4096, KV 77" when differentiating the UNet's cross-attention over 77 text tokens), and a
  layer cannot know whether it is differentiated, so odd lengths go to XLA; attention over 77 keys
  is a small part of the UNet's work.
  """
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if (half and jax.default_backend() == 'gpu' and head_dim % 8 == 0 and head_dim <= 128
      and q_len % 2 == 0 and kv_len % 2 == 0):
    return 'cudnn'
  return None


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep embedding (DDPM; diffusers ``get_timestep_embedding``), float32 (B, dim).

  Frequencies ``exp(-ln(max_period) * i / (dim/2 - freq_shift))``; ``[sin, cos]`` or, with
  ``flip_sin_to_cos``, ``[cos, sin]``; an odd ``dim`` is zero-padded by one.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """diffusers ``TimestepEmbedding``: linear_1 -> act -> linear_2 (-> optional post act)."""
  time_embed_dim: int
  act_fn: str = 'silu'
  out_dim: int | None = None
  post_act_fn: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sample: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.time_embed_dim, name='linear_1')(sample)
    x = get_activation(self.act_fn)(x)
    x = dense(self.out_dim or self.time_embed_dim, name='linear_2')(x)
    if self.post_act_fn is not None:
      x = get_activation(self.post_act_fn)(x)
    return x


def group_norm_moments(x: jax.Array, groups: int) -> tuple[jax.Array, jax.Array]:
  """float32 mean and variance of each (sample, channel group) of channels-last ``x``: (B, groups).

  The variance is ``E[x^2] - E[x]^2`` clamped at 0, as ``nn.GroupNorm``'s default
  ``use_fast_variance``. On the CPU both sums run per position over the group's channels first (the
  minor, contiguous axis), then over the positions, in one pass: XLA:CPU reduces a non-minor axis
  at a fraction of memory speed, and ``nn.GroupNorm``'s single reduction over (positions, channels
  in group) is one. Elsewhere it is that single reduction.
  """
  b, c = x.shape[0], x.shape[-1]
  if c % groups:
    raise ValueError(f'GroupNorm: {c} channels do not split into {groups} groups')
  xg = x.astype(jnp.float32).reshape(b, -1, groups, c // groups)
  if cpu_kernels.on_cpu():
    sums = jnp.stack([xg.sum(-1), (xg * xg).sum(-1)], axis=-1).sum(axis=1)  # (B, groups, 2)
    count = xg.shape[1] * xg.shape[3]
    mean, mean_sq = sums[..., 0] / count, sums[..., 1] / count
  else:
    mean, mean_sq = xg.mean(axis=(1, 3)), (xg * xg).mean(axis=(1, 3))
  return mean, jnp.maximum(mean_sq - mean * mean, 0.0)


class GroupNorm(nn.Module):
  """``nn.GroupNorm`` over channels-last input (same ``scale``/``bias`` params, same arithmetic:
  ``(x - mean) * (rsqrt(var + eps) * scale) + bias`` in float32, cast to ``dtype``), with statistics
  from :func:`group_norm_moments`."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), self.param_dtype)
    mean, var = group_norm_moments(x, self.num_groups)
    per_channel = lambda v: jnp.repeat(v, c // self.num_groups, axis=-1).reshape(
        (x.shape[0],) + (1,) * (x.ndim - 2) + (c,))
    mul = per_channel(lax.rsqrt(var + self.epsilon)) * scale.astype(jnp.float32)
    y = (x.astype(jnp.float32) - per_channel(mean)) * mul + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def _group_norm(groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str) -> GroupNorm:
  return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers ``ResnetBlock2D`` (``time_embedding_norm='default'``, pre-norm, no up/down).

  ``norm1 -> act -> conv1 (+ time_emb_proj(act(temb))) -> norm2 -> act -> conv2``, plus the input
  (through a 1x1 ``conv_shortcut`` when channels change), divided by ``output_scale_factor``.
  The time projection exists only when the block is called with ``temb`` (the VAE passes none).
  """
  out_channels: int
  groups: int = 32
  groups_out: int | None = None
  eps: float = 1e-6
  act_fn: str = 'silu'
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
    conv = functools.partial(Conv, self.out_channels, (3, 3), padding=((1, 1), (1, 1)),
                             dtype=self.dtype, param_dtype=self.param_dtype)
    act = get_activation(self.act_fn)
    h = act(_group_norm(self.groups, self.eps, self.dtype, self.param_dtype, 'norm1')(x))
    h = conv(name='conv1')(h)
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='time_emb_proj')(act(temb))
      h = h + t[:, None, None, :]
    groups_out = self.groups_out or self.groups
    h = act(_group_norm(groups_out, self.eps, self.dtype, self.param_dtype, 'norm2')(h))
    h = conv(name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype,
                  name='conv_shortcut')(x)
    out = x.astype(h.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nn.Module):
  """diffusers ``Downsample2D(use_conv=True)``: 3x3 conv, stride 2.

  ``padding=1`` pads one pixel on every side; ``padding=0`` (the VAE encoder) reproduces diffusers'
  asymmetric ``F.pad(x, (0, 1, 0, 1))`` by padding only bottom and right.
  """
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
    return Conv(self.out_channels, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype,
                   param_dtype=self.param_dtype, name='conv')(x)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of PyTorch ``F.interpolate(mode='nearest', size=...)`` (float32 scale, floor)."""
  scale = np.float32(in_size) / np.float32(out_size)
  idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(idx, in_size - 1)


def upsample_nearest(x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
  """Nearest-neighbour upsampling of NHWC ``x``: exactly 2x, or to ``output_size`` as PyTorch does."""
  b, h, w, c = x.shape
  if output_size is None or tuple(output_size) == (2 * h, 2 * w):
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)
  out_h, out_w = output_size
  x = jnp.take(x, _nearest_indices(h, out_h), axis=1)
  return jnp.take(x, _nearest_indices(w, out_w), axis=2)


class Upsample2D(nn.Module):
  """diffusers ``Upsample2D(use_conv=True)``: nearest upsampling (x2 or to ``output_size``), 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
    x = upsample_nearest(x, output_size)
    return Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   param_dtype=self.param_dtype, name='conv')(x)


class Attention(nn.Module):
  """diffusers ``Attention`` with ``AttnProcessor2_0`` (scaled dot-product, scale ``dim_head ** -0.5``).

  Self-attention when ``context`` is None, else cross-attention on it. A 4-D NHWC input is attended
  over its H*W positions and returned in NHWC. ``norm_num_groups`` adds the VAE's ``group_norm`` in
  front; ``residual_connection`` adds the input back; the result is divided by
  ``rescale_output_factor``. The softmax always runs in float32, which is what diffusers'
  ``upcast_attention``/``upcast_softmax`` ask for.
  """
  heads: int
  dim_head: int
  qkv_bias: bool = False
  out_bias: bool = True
  norm_num_groups: int | None = None
  eps: float = 1e-5
  residual_connection: bool = False
  rescale_output_factor: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    residual, spatial_shape = x, x.shape
    if self.norm_num_groups is not None:
      x = _group_norm(self.norm_num_groups, self.eps, self.dtype, self.param_dtype, 'group_norm')(x)
    if x.ndim == 4:
      x = x.reshape(x.shape[0], -1, x.shape[-1])
    context = x if context is None else context
    inner = self.heads * self.dim_head
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(inner, use_bias=self.qkv_bias, name='to_q')(x)
    k = dense(inner, use_bias=self.qkv_bias, name='to_k')(context)
    v = dense(inner, use_bias=self.qkv_bias, name='to_v')(context)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
    out = cpu_kernels.dot_product_attention(
        split(q), split(k), split(v),
        implementation=attention_implementation(q.dtype, self.dim_head, q.shape[1], k.shape[1]))
    out = out.reshape(out.shape[0], out.shape[1], inner)
    out = dense(spatial_shape[-1], use_bias=self.out_bias, name='to_out_0')(out)
    out = out.reshape(spatial_shape)
    if self.residual_connection:
      out = out + residual.astype(out.dtype)
    if self.rescale_output_factor != 1.0:
      out = out / self.rescale_output_factor
    return out


class GEGLU(nn.Module):
  """diffusers ``GEGLU``: ``proj`` to 2*dim_out, then ``hidden * gelu(gate)`` (exact GELU)."""
  dim_out: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(2 * self.dim_out, dtype=self.dtype, param_dtype=self.param_dtype, name='proj')(x)
    hidden, gate = jnp.split(x, 2, axis=-1)
    return hidden * gelu_exact(gate)


class FeedForward(nn.Module):
  """diffusers ``FeedForward`` with GEGLU: ``net_0`` (GEGLU to ``mult * dim``), dropout, ``net_2``."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    h = GEGLU(self.mult * dim, dtype=self.dtype, param_dtype=self.param_dtype, name='net_0')(x)
    return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name='net_2')(h)


class BasicTransformerBlock(nn.Module):
  """diffusers ``BasicTransformerBlock`` (layer_norm, self-attn, cross-attn, GEGLU feed-forward).

  Pre-norm residual sub-blocks: ``x += attn1(norm1(x))``, ``x += attn2(norm2(x), context)``,
  ``x += ff(norm3(x))``. LayerNorm eps 1e-5; q/k/v without bias, ``to_out_0`` with bias.
  """
  heads: int
  dim_head: int
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, name=name, **kw)
    attention = lambda name: Attention(self.heads, self.dim_head, name=name, **kw)
    x = x + attention('attn1')(norm('norm1')(x))
    x = x + attention('attn2')(norm('norm2')(x), context)
    x = x + FeedForward(name='ff', **kw)(norm('norm3')(x))
    return x


class Transformer2DModel(nn.Module):
  """diffusers ``Transformer2DModel`` on continuous NHWC input.

  GroupNorm (eps 1e-6) -> ``proj_in`` -> ``num_layers`` transformer blocks over the H*W tokens ->
  ``proj_out`` -> + input. The projections are Dense layers with ``use_linear_projection`` (SD2.x)
  and 1x1 convolutions otherwise (SD1.x), matching the checkpoint shapes.
  """
  heads: int
  dim_head: int
  num_layers: int = 1
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _projection(self, features: int, name: str) -> nn.Module:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.use_linear_projection:
      return nn.Dense(features, **kw)
    return Conv(features, (1, 1), **kw)

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    hidden = _group_norm(self.norm_num_groups, 1e-6, self.dtype, self.param_dtype, 'norm')(x)
    hidden = self._projection(inner, 'proj_in')(hidden)
    hidden = hidden.reshape(b, h * w, inner)
    block = maybe_remat(BasicTransformerBlock, self.remat)
    for i in range(self.num_layers):
      hidden = block(self.heads, self.dim_head, dtype=self.dtype, param_dtype=self.param_dtype,
                     name=f'transformer_blocks_{i}')(hidden, context)
    hidden = hidden.reshape(b, h, w, inner)
    hidden = self._projection(c, 'proj_out')(hidden)
    return hidden + x.astype(hidden.dtype)


class RMSNorm(nn.Module):
  """diffusers ``RMSNorm`` (``models/normalization.py``; Zhang & Sennrich 2019) over the last axis:
  ``x * rsqrt(mean(x^2) + eps) * scale``, the mean square and the product taken in float32, the
  result cast to ``dtype``. ``scale`` is torch's ``weight`` (shape ``(dim,)``, init 1); no bias
  (diffusers' ``bias=False`` default, the only form the SD3 and FLUX qk-norms use)."""
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * lax.rsqrt(mean_square + self.epsilon) * scale.astype(jnp.float32)).astype(self.dtype)
