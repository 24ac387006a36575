"""SD3 / SD3.5 MMDiT (diffusers ``SD3Transformer2DModel``) in Flax linen, with DiT4SR's LR branch.

References: diffusers 0.42.1 ``models/transformers/transformer_sd3.py`` (the model),
``models/attention.py`` (``JointTransformerBlock``), ``models/attention_processor.py``
(``Attention`` + ``JointAttnProcessor2_0``), ``models/normalization.py`` (``AdaLayerNormZero``,
``SD35AdaLayerNormZeroX``, ``AdaLayerNormContinuous``, ``RMSNorm``), ``models/embeddings.py``
(``PatchEmbed``, ``get_2d_sincos_pos_embed``, ``CombinedTimestepTextProjEmbeddings``); Esser et al.
2024, "Scaling Rectified Flow Transformers" (SD3). Facts and sizes: shared/reference/next-methods.md
Sec. 1.1 (SD3.5-Medium = :data:`SD35_MEDIUM_CONFIG`, 2,243,171,520 parameters).

API::

  model = SD3Transformer2DModel.from_config(config_json_dict, dtype=jnp.bfloat16)
  out = model.apply({'params': p}, latents, timesteps, encoder_hidden_states, pooled_projections)

``latents`` NHWC (B, h, w, in_channels) -> NHWC (B, h, w, out_channels); ``timesteps`` (B,) are
the numbers diffusers' transformer receives (the scheduler's sigma * 1000). Param paths follow
`sr_jax.weights` (``transformer_blocks_3/attn/to_out_0/kernel`` is torch
``transformer_blocks.3.attn.to_out.0.weight``), so a diffusers state dict converts with
``convert_state_dict(state, abstract_params, ignore_prefixes=model.checkpoint_ignore_prefixes())``.

Positional table: recomputed, not a param. diffusers stores the whole
``pos_embed_max_size``-square sin-cos table as the persistent buffer ``pos_embed.pos_embed``
(226,492,416 numbers for SD3.5-M, 0.9 GB in fp32). It is a pure function of the config, so
:class:`PatchEmbed` computes only the centre crop it needs, in numpy at trace time (a constant of
the compiled program), with the same float32 grid and float64 frequencies as diffusers (the tests
compare the two tables). Checkpoints that contain the buffer convert by ignoring the key
(:data:`IGNORED_CHECKPOINT_PREFIXES`).

Precision: ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. LayerNorm statistics
(two-pass), the adaLN modulation, the RMSNorm mean square and the attention softmax
(`cpu_kernels.dot_product_attention`; cuDNN flash attention on GPU in half precision) run in float32.

DiT4SR LR branch (``lr_branch=True``; Duan et al., ICCV 2025, github.com/Adam-duan/DiT4SR
``model_dit4sr_r1/attention.py`` and ``transformer_sd3.py``, read for the facts, not copied: that
code is under a non-commercial licence). The LR latent (same size as ``latents``) goes through the
same ``pos_embed`` and its tokens follow the noisy ones, so every block sees 2N image tokens that share
all AdaLN modulations and the FFN weights. Per attention (``attn`` and, in dual blocks, ``attn2``):
the LR q/k/v are ``to_{q,k,v}_control(to_{q,k,v}(lr))`` (control layers zero-initialised), qk-normed
with the image norms, attended in the order [noisy, LR, context] (``attn``) or [noisy, LR]
(``attn2``); the LR output is ``to_out_control(attention_out + attention_in)``. In the FFN, the LR
half of the GELU activations, as its token grid, goes through the zero-initialised depthwise 3x3
``control_conv`` and is added, times ``lr_ffn_control_scale`` (DiT4SR: 1.2), to the noisy half
before ``net_2``. The LR half is dropped before ``norm_out``. Torch names are DiT4SR's, so released
checkpoints convert; the trainable set is every param with "control" in its name
(:func:`trainable_control_mask`; 350,877,696 numbers for SD3.5-M).

* ``to_out_control`` init: DiT4SR copies ``to_out[0]``'s weights at construction, before the SD3.5
  checkpoint is loaded, i.e. a copy of a *random* torch init, not of the pretrained projection.
  Here it is an independent draw from that same distribution (torch ``nn.Linear``'s default,
  U(+-1/sqrt(fan_in)) for kernel and bias).
* qk-norm: DiT4SR-r1 (default). ``lr_qk_norm_quirk=True`` reproduces the first release
  (``model_dit4sr/attention.py``), whose LR keys are ``norm_k`` applied twice to the *noisy* keys
  (the LR key projection is computed and discarded).
* ``attn2`` in DiT4SR is built with context projections it never uses (``add_{q,k,v}_proj``,
  ``to_add_out``, ``norm_added_{q,k}``); they are not held here, and
  :meth:`SD3Transformer2DModel.checkpoint_ignore_prefixes` drops them from DiT4SR checkpoints.
* DiT4SR needs square grids (``sqrt(N)``); here the LR grid is the latent's (h/p, w/p), row-major
  like the tokens, which is the same on square latents.
* At zero control (fresh init) the model is NOT SD3.5: the LR tokens have keys 0 (logit 0) and values
  0, so every noisy query gives N extra softmax terms of weight exp(0) to a zero value. The noisy
  output then does not depend on the LR latent and equals SD3.5 with N zero-key, zero-value tokens
  appended to every attention (``tests/test_dit4sr_lr_branch_vs_reference.py`` checks exactly this).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sr_jax.models import cpu_kernels
from sr_jax.models.layers import (Conv, RMSNorm, TimestepEmbedding, attention_implementation,
                                  maybe_remat, timestep_embedding)

Dtype = Any

# stabilityai/stable-diffusion-3.5-medium transformer/config.json (next-methods.md Sec. 1.1).
SD35_MEDIUM_CONFIG: dict[str, Any] = {
    '_class_name': 'SD3Transformer2DModel',
    'sample_size': 128, 'patch_size': 2, 'in_channels': 16, 'out_channels': 16, 'num_layers': 24,
    'attention_head_dim': 64, 'num_attention_heads': 24, 'joint_attention_dim': 4096,
    'caption_projection_dim': 1536, 'pooled_projection_dim': 2048, 'pos_embed_max_size': 384,
    'qk_norm': 'rms_norm', 'dual_attention_layers': list(range(13)),
}
# SD3Transformer2DModel.__init__ defaults (diffusers 0.42.1): the fields read from config.json.
CONFIG_DEFAULTS: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64,
    num_attention_heads=18, joint_attention_dim=4096, caption_projection_dim=1152,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96, dual_attention_layers=(),
    qk_norm=None)
QK_NORMS = (None, 'rms_norm')
# Checkpoint keys that hold no param here: the sin-cos buffer (recomputed, see module docstring).
IGNORED_CHECKPOINT_PREFIXES = ('pos_embed.pos_embed',)
# DiT4SR's attn2 (an AttentionZero with context projections) carries these unused modules.
DIT4SR_UNUSED_ATTN2_MODULES = ('add_q_proj', 'add_k_proj', 'add_v_proj', 'to_add_out',
                               'norm_added_q', 'norm_added_k')
CONTROL_MARKER = 'control'  # DiT4SR `--trainable_modules control`
LAYER_NORM_EPS = 1e-6
TIMESTEP_CHANNELS = 256

# torch nn.Linear's default init (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), bias the same).
_torch_linear_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _torch_linear_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# --------------------------------------------------------------------------------- embeddings

def sincos_pos_embed(embed_dim: int, rows: np.ndarray, cols: np.ndarray, max_size: int,
                     base_size: int, interpolation_scale: float = 1.0) -> np.ndarray:
  """Rows of diffusers' ``get_2d_sincos_pos_embed(embed_dim, max_size, base_size=base_size,
  interpolation_scale=...)`` table at grid cells (r, c), r in ``rows``, c in ``cols``, row-major:
  (len(rows) * len(cols), embed_dim) float32.

  Grid coordinate ``i / (max_size / base_size) / interpolation_scale`` (float32, as diffusers);
  the first half of the channels encodes the column, the second the row, each as
  ``[sin(pos w_k), cos(pos w_k)]`` with ``w_k = 10000 ** -(k / (embed_dim / 4))`` (float64).
  """
  if embed_dim % 4:
    raise ValueError(f'sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}')
  grid = (np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)
          / np.float32(interpolation_scale))
  omega = 1.0 / 10000.0 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))

  def embed_1d(index: np.ndarray) -> np.ndarray:
    angles = np.outer(grid[index].astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  col, row = embed_1d(np.asarray(cols)), embed_1d(np.asarray(rows))
  half = embed_dim // 2
  table = np.concatenate([np.broadcast_to(col[None], (len(rows), len(cols), half)),
                          np.broadcast_to(row[:, None], (len(rows), len(cols), half))], axis=-1)
  return table.reshape(-1, embed_dim).astype(np.float32)


def cropped_pos_embed(embed_dim: int, grid_h: int, grid_w: int, max_size: int, base_size: int,
                      interpolation_scale: float = 1.0) -> np.ndarray:
  """``PatchEmbed.cropped_pos_embed``: the centred (grid_h, grid_w) window of the table,
  top = (max_size - grid_h) // 2, left = (max_size - grid_w) // 2; (grid_h * grid_w, embed_dim)."""
  if grid_h > max_size or grid_w > max_size:
    raise ValueError(f'latent grid {grid_h}x{grid_w} (after patching) exceeds pos_embed_max_size '
                     f'{max_size}')
  top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
  return sincos_pos_embed(embed_dim, np.arange(top, top + grid_h), np.arange(left, left + grid_w),
                          max_size, base_size, interpolation_scale)


class PatchEmbed(nn.Module):
  """diffusers ``PatchEmbed`` with SD3 cropping: Conv2d ``proj`` (kernel = stride = patch) on NHWC
  latents, tokens row-major, plus the centre crop of the sin-cos table: (B, h/p * w/p, embed_dim)."""
  embed_dim: int
  patch_size: int
  pos_embed_max_size: int
  base_size: int
  interpolation_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, latents: jax.Array) -> jax.Array:
    p = self.patch_size
    x = Conv(self.embed_dim, (p, p), strides=p, padding='VALID', dtype=self.dtype,
             param_dtype=self.param_dtype, name='proj')(latents.astype(self.dtype))
    b, grid_h, grid_w, _ = x.shape
    pos = cropped_pos_embed(self.embed_dim, grid_h, grid_w, self.pos_embed_max_size,
                            self.base_size, self.interpolation_scale)
    return x.reshape(b, grid_h * grid_w, self.embed_dim) + jnp.asarray(pos, self.dtype)[None]


class CombinedTimestepTextProjEmbeddings(nn.Module):
  """diffusers ``CombinedTimestepTextProjEmbeddings``: ``timestep_embedder(sinusoid_256(t)) +
  text_embedder(pooled)``; sinusoid ``[cos, sin]`` (flip_sin_to_cos, shift 0); both embedders are
  Linear-SiLU-Linear (``text_embedder`` is diffusers' PixArtAlphaTextProjection(act_fn='silu'))."""
  embedding_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timesteps: jax.Array, pooled_projections: jax.Array) -> jax.Array:
    kw = dict(act_fn='silu', dtype=self.dtype, param_dtype=self.param_dtype)
    sinusoid = timestep_embedding(timesteps, TIMESTEP_CHANNELS, flip_sin_to_cos=True, freq_shift=0.0)
    time_emb = TimestepEmbedding(self.embedding_dim, name='timestep_embedder', **kw)(
        sinusoid.astype(self.dtype))
    text_emb = TimestepEmbedding(self.embedding_dim, name='text_embedder', **kw)(pooled_projections)
    return time_emb + text_emb


# ----------------------------------------------------------------------------- normalisation

def layer_norm(x: jax.Array, eps: float = LAYER_NORM_EPS) -> jax.Array:
  """``nn.LayerNorm(elementwise_affine=False)`` over the last axis, float32, two-pass variance."""
  x = x.astype(jnp.float32)
  centred = x - x.mean(axis=-1, keepdims=True)
  return centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)


def modulate(normed: jax.Array, shift: jax.Array, scale: jax.Array, dtype: Dtype) -> jax.Array:
  """adaLN ``normed * (1 + scale) + shift`` in float32, cast to ``dtype``."""
  f32 = jnp.float32
  return (normed * (1.0 + scale.astype(f32)) + shift.astype(f32)).astype(dtype)


class AdaLayerNormZero(nn.Module):
  """The modulation of diffusers ``AdaLayerNormZero`` (6 chunks: shift_msa, scale_msa, gate_msa,
  shift_mlp, scale_mlp, gate_mlp) or ``SD35AdaLayerNormZeroX`` (9: the same, then shift_msa2,
  scale_msa2, gate_msa2): ``linear(silu(temb))`` split into (B, 1, dim) chunks. The caller
  normalises once (:func:`layer_norm`) and applies them with :func:`modulate`."""
  num_chunks: int = 6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, temb: jax.Array) -> tuple[jax.Array, ...]:
    emb = nn.Dense(self.num_chunks * temb.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                   name='linear')(nn.silu(temb))
    return tuple(jnp.split(emb[:, None, :], self.num_chunks, axis=-1))


class AdaLayerNormContinuous(nn.Module):
  """diffusers ``AdaLayerNormContinuous`` (LayerNorm without affine): ``linear(silu(cond))`` is split
  into **(scale, shift)** (the reverse of AdaLN-Zero's order); ``LN(x) * (1 + scale) + shift``."""
  eps: float = LAYER_NORM_EPS
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, conditioning: jax.Array) -> jax.Array:
    emb = nn.Dense(2 * x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype,
                   name='linear')(nn.silu(conditioning))
    scale, shift = jnp.split(emb[:, None, :], 2, axis=-1)
    return modulate(layer_norm(x, self.eps), shift, scale, self.dtype)


# ---------------------------------------------------------------------------------- attention

def _concat_tokens(*parts: jax.Array) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)


class JointAttention(nn.Module):
  """diffusers ``Attention`` + ``JointAttnProcessor2_0`` (SD3), with DiT4SR's AttentionZero LR path.

  Image tokens ``x`` (B, T, dim): ``to_q/to_k/to_v``, per-head ``norm_q/norm_k`` (RMSNorm when
  ``qk_norm='rms_norm'``); with ``added_kv`` (``attn``) context tokens through ``add_{q,k,v}_proj``
  and ``norm_added_{q,k}`` are appended; softmax attention, scale head_dim ** -0.5; image output
  ``to_out_0``, context output ``to_add_out`` (absent when ``context_pre_only``). With
  ``lr_branch``, the last T - ``num_noisy`` image tokens are LR tokens (see the module docstring).
  Returns (image output (B, T, dim), context output or None).
  """
  dim: int
  heads: int
  head_dim: int
  qk_norm: str | None = None
  added_kv: bool = False
  context_pre_only: bool = False
  lr_branch: bool = False
  lr_qk_norm_quirk: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    inner = self.heads * self.head_dim
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(RMSNorm, LAYER_NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype)
    self.to_q, self.to_k, self.to_v = dense(inner), dense(inner), dense(inner)
    self.to_out_0 = dense(self.dim)
    if self.qk_norm:
      self.norm_q, self.norm_k = norm(), norm()
    if self.added_kv:
      self.add_q_proj, self.add_k_proj, self.add_v_proj = dense(inner), dense(inner), dense(inner)
      if self.qk_norm:
        self.norm_added_q, self.norm_added_k = norm(), norm()
      if not self.context_pre_only:
        self.to_add_out = dense(self.dim)
    if self.lr_branch:
      zero = functools.partial(dense, inner, kernel_init=nn.initializers.zeros,
                               bias_init=nn.initializers.zeros)
      self.to_q_control, self.to_k_control, self.to_v_control = zero(), zero(), zero()
      self.to_out_control = dense(self.dim, kernel_init=_torch_linear_kernel_init,
                                  bias_init=_torch_linear_bias_init(inner))

  def _split_heads(self, t: jax.Array) -> jax.Array:
    return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim)

  def _image_qkv(self, x: jax.Array, num_noisy: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
    if self.lr_branch:  # LR tokens: control projection on top of the shared one
      n = num_noisy
      q = _concat_tokens(q[:, :n], self.to_q_control(q[:, n:]))
      k = _concat_tokens(k[:, :n], self.to_k_control(k[:, n:]))
      v = _concat_tokens(v[:, :n], self.to_v_control(v[:, n:]))
    q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
    if self.qk_norm:
      q, k = self.norm_q(q), self.norm_k(k)
      if self.lr_branch and self.lr_qk_norm_quirk:  # first DiT4SR release: norm_k(norm_k(noisy keys))
        k = _concat_tokens(k[:, :num_noisy], self.norm_k(k[:, :num_noisy]))
    return q, k, v

  def _context_qkv(self, context: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v = (self._split_heads(f(context)) for f in (self.add_q_proj, self.add_k_proj,
                                                        self.add_v_proj))
    if self.qk_norm:
      q, k = self.norm_added_q(q), self.norm_added_k(k)
    return q, k, v

  def __call__(self, x: jax.Array, context: jax.Array | None = None, num_noisy: int | None = None
               ) -> tuple[jax.Array, jax.Array | None]:
    b, tokens, _ = x.shape
    num_noisy = tokens if num_noisy is None else num_noisy
    q, k, v = self._image_qkv(x, num_noisy)
    if context is not None:
      cq, ck, cv = self._context_qkv(context)
      q, k, v = _concat_tokens(q, cq), _concat_tokens(k, ck), _concat_tokens(v, cv)
    out = cpu_kernels.dot_product_attention(
        q, k, v, implementation=attention_implementation(q.dtype, self.head_dim, q.shape[1],
                                                         k.shape[1]))
    out = out.reshape(b, out.shape[1], self.heads * self.head_dim)
    image, context_out = out[:, :tokens], out[:, tokens:]
    if self.lr_branch:  # LR residual (the modulated LR input) before to_out_control
      image = _concat_tokens(self.to_out_0(image[:, :num_noisy]),
                             self.to_out_control(image[:, num_noisy:] + x[:, num_noisy:]))
    else:
      image = self.to_out_0(image)
    if context is None or self.context_pre_only:
      return image, None
    return image, self.to_add_out(context_out)


# ------------------------------------------------------------------------------- feed-forward

class GELU(nn.Module):
  """diffusers ``GELU(approximate='tanh')``: Linear ``proj`` then tanh-approximate GELU."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name='proj')(x)
    return jax.nn.gelu(x, approximate=True)


class FeedForward(nn.Module):
  """diffusers ``FeedForward(activation_fn='gelu-approximate')``: ``net_0`` (GELU to mult * dim),
  dropout (identity), ``net_2``. With ``lr_grid`` (DiT4SR ``FeedForwardControl``) the second half
  of the tokens is the LR grid (``lr_grid`` = (rows, cols)): its activations go through the
  depthwise 3x3 ``control_conv`` (zero init) and are added x ``control_scale`` to the first half."""
  mult: int = 4
  lr_grid: tuple[int, int] | None = None
  control_scale: float = 1.2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GELU(self.mult * x.shape[-1], name='net_0', **kw)(x)
    if self.lr_grid is not None:
      b, tokens, channels = h.shape
      n = tokens // 2
      conv = Conv(channels, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=channels,
                  kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
                  name='control_conv', **kw)
      lr_h = conv(h[:, n:].reshape(b, *self.lr_grid, channels)).reshape(b, n, channels)
      h = _concat_tokens(h[:, :n] + self.control_scale * lr_h, h[:, n:])
    return nn.Dense(x.shape[-1], name='net_2', **kw)(h)


# ------------------------------------------------------------------------------------- blocks

class JointTransformerBlock(nn.Module):
  """diffusers ``JointTransformerBlock`` (MMDiT): AdaLN-Zero ``norm1`` (SD35AdaLayerNormZeroX with
  ``use_dual_attention``), ``norm1_context`` (AdaLN-Zero; AdaLayerNormContinuous when
  ``context_pre_only``, the last block, whose context output is dropped), joint ``attn``, optional
  image-only ``attn2``, gated ``ff`` and ``ff_context``. ``lr_grid`` switches on the DiT4SR LR
  branch (the second half of ``x`` is the LR tokens). Returns (context or None, x)."""
  dim: int
  heads: int
  head_dim: int
  context_pre_only: bool = False
  use_dual_attention: bool = False
  qk_norm: str | None = None
  lr_grid: tuple[int, int] | None = None
  lr_qk_norm_quirk: bool = False
  lr_ffn_control_scale: float = 1.2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array
               ) -> tuple[jax.Array | None, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lr = self.lr_grid is not None
    num_noisy = x.shape[1] // 2 if lr else None
    attention = functools.partial(JointAttention, self.dim, self.heads, self.head_dim, self.qk_norm,
                                  lr_branch=lr, lr_qk_norm_quirk=self.lr_qk_norm_quirk, **kw)
    mod = AdaLayerNormZero(9 if self.use_dual_attention else 6, name='norm1', **kw)(temb)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
    x_normed = layer_norm(x)
    if self.context_pre_only:
      context_in = AdaLayerNormContinuous(name='norm1_context', **kw)(context, temb)
    else:
      c_mod = AdaLayerNormZero(6, name='norm1_context', **kw)(temb)
      context_in = modulate(layer_norm(context), c_mod[0], c_mod[1], self.dtype)
    attn_out, context_attn_out = attention(added_kv=True, context_pre_only=self.context_pre_only,
                                           name='attn')(
        modulate(x_normed, shift_msa, scale_msa, self.dtype), context_in, num_noisy)
    x = x + gate_msa * attn_out
    if self.use_dual_attention:  # attn2 reads the same LN(x) with its own shift/scale
      attn2_out, _ = attention(name='attn2')(modulate(x_normed, mod[6], mod[7], self.dtype), None,
                                             num_noisy)
      x = x + mod[8] * attn2_out
    ff = FeedForward(lr_grid=self.lr_grid, control_scale=self.lr_ffn_control_scale, name='ff', **kw)
    x = x + gate_mlp * ff(modulate(layer_norm(x), shift_mlp, scale_mlp, self.dtype))
    if self.context_pre_only:
      return None, x
    context = context + c_mod[2] * context_attn_out
    context_ff_in = modulate(layer_norm(context), c_mod[3], c_mod[4], self.dtype)
    context = context + c_mod[5] * FeedForward(name='ff_context', **kw)(context_ff_in)
    return context, x


def unpatchify(x: jax.Array, grid_h: int, grid_w: int, patch: int, channels: int) -> jax.Array:
  """(B, grid_h * grid_w, p * p * C) tokens -> NHWC (B, grid_h p, grid_w p, C); each token's
  features are (p_row, p_col, C), as diffusers' ``einsum('nhwpqc->nchpwq')``."""
  b = x.shape[0]
  x = x.reshape(b, grid_h, grid_w, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid_h * patch, grid_w * patch, channels)


class SD3Transformer2DModel(nn.Module):
  """diffusers ``SD3Transformer2DModel`` (SD3 / SD3.5), optionally with DiT4SR's LR branch (see the
  module docstring for the API, the positional table and the LR branch)."""
  sample_size: int = 128
  patch_size: int = 2
  in_channels: int = 16
  num_layers: int = 18
  attention_head_dim: int = 64
  num_attention_heads: int = 18
  joint_attention_dim: int = 4096
  caption_projection_dim: int = 1152
  pooled_projection_dim: int = 2048
  out_channels: int = 16
  pos_embed_max_size: int = 96
  dual_attention_layers: tuple[int, ...] = ()
  qk_norm: str | None = None
  lr_branch: bool = False  # DiT4SR LR tokens and control layers
  lr_qk_norm_quirk: bool = False  # the first DiT4SR release's doubled norm_k on LR keys
  lr_ffn_control_scale: float = 1.2  # DiT4SR FeedForwardControl: noisy += 1.2 * control_conv(LR)
  remat: bool = False  # rematerialise each transformer block in the backward pass
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **kwargs) -> 'SD3Transformer2DModel':
    """Builds the model from a diffusers ``transformer/config.json`` dict (keys starting with '_'
    and unknown keys are ignored). ``kwargs`` (``dtype``, ``param_dtype``, ``remat``, ``lr_branch``,
    ``lr_qk_norm_quirk``, ``lr_ffn_control_scale``, or any config field) override the config."""
    fields = {name: config.get(name, default) for name, default in CONFIG_DEFAULTS.items()}
    fields.update(kwargs)
    if fields['out_channels'] is None:
      fields['out_channels'] = fields['in_channels']
    fields['dual_attention_layers'] = tuple(int(i) for i in fields['dual_attention_layers'] or ())
    if fields['qk_norm'] not in QK_NORMS:
      raise ValueError(f'SD3 qk_norm {fields["qk_norm"]!r} is not supported; supported: {QK_NORMS}')
    if fields['pos_embed_max_size'] is None:
      raise ValueError('SD3Transformer2DModel needs pos_embed_max_size (every SD3 config sets it)')
    inner = fields['num_attention_heads'] * fields['attention_head_dim']
    if fields['caption_projection_dim'] != inner:
      raise ValueError(f'caption_projection_dim {fields["caption_projection_dim"]} must equal '
                       f'num_attention_heads x attention_head_dim = {inner}')
    return cls(**fields)

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  def dummy_inputs(self, batch: int = 1) -> tuple[jax.Array, ...]:
    """Small (latents, timesteps, encoder_hidden_states, pooled_projections[, lr_latents]) for
    ``init``: a 2 x 2 token grid and one context token."""
    side = 2 * self.patch_size
    latents = jnp.zeros((batch, side, side, self.in_channels), jnp.float32)
    inputs = (latents, jnp.zeros((batch,), jnp.float32),
              jnp.zeros((batch, 1, self.joint_attention_dim), jnp.float32),
              jnp.zeros((batch, self.pooled_projection_dim), jnp.float32))
    return inputs + (latents,) if self.lr_branch else inputs

  def checkpoint_ignore_prefixes(self) -> tuple[str, ...]:
    """Torch key prefixes to pass to ``convert_state_dict(ignore_prefixes=...)``: the sin-cos buffer,
    and with ``lr_branch`` the unused context modules of DiT4SR's ``attn2``."""
    unused = tuple(f'transformer_blocks.{i}.attn2.{name}.' for i in self.dual_attention_layers
                   for name in DIT4SR_UNUSED_ATTN2_MODULES) if self.lr_branch else ()
    return IGNORED_CHECKPOINT_PREFIXES + unused

  def _check_inputs(self, latents: jax.Array, lr_latents: jax.Array | None) -> None:
    if latents.ndim != 4 or latents.shape[-1] != self.in_channels:
      raise ValueError(f'latents must be NHWC with {self.in_channels} channels, got {latents.shape}')
    if latents.shape[1] % self.patch_size or latents.shape[2] % self.patch_size:
      raise ValueError(f'latent sides {latents.shape[1:3]} must be multiples of patch_size '
                       f'{self.patch_size}')
    if self.lr_branch and (lr_latents is None or lr_latents.shape != latents.shape):
      raise ValueError(f'lr_branch needs lr_latents of the latents shape {latents.shape}, got '
                       f'{None if lr_latents is None else lr_latents.shape}')
    if not self.lr_branch and lr_latents is not None:
      raise ValueError('lr_latents given to a model built without lr_branch')

  def _block(self, index: int, lr_grid: tuple[int, int] | None) -> nn.Module:
    block = maybe_remat(JointTransformerBlock, self.remat)
    return block(self.inner_dim, self.num_attention_heads, self.attention_head_dim,
                 context_pre_only=index == self.num_layers - 1,
                 use_dual_attention=index in self.dual_attention_layers, qk_norm=self.qk_norm,
                 lr_grid=lr_grid, lr_qk_norm_quirk=self.lr_qk_norm_quirk,
                 lr_ffn_control_scale=self.lr_ffn_control_scale, dtype=self.dtype,
                 param_dtype=self.param_dtype, name=f'transformer_blocks_{index}')

  @nn.compact
  def __call__(self, latents: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array, lr_latents: jax.Array | None = None) -> jax.Array:
    """NHWC latents (and, with ``lr_branch``, LR latents of the same shape) -> NHWC prediction."""
    self._check_inputs(latents, lr_latents)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, _ = latents.shape
    p = self.patch_size
    grid = (height // p, width // p)
    patch_embed = PatchEmbed(self.inner_dim, p, self.pos_embed_max_size, self.sample_size // p,
                             name='pos_embed', **kw)
    x = patch_embed(latents)
    if self.lr_branch:  # LR tokens after the noisy ones, through the same patch embedding
      x = _concat_tokens(x, patch_embed(lr_latents))
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (b,))
    temb = CombinedTimestepTextProjEmbeddings(self.inner_dim, name='time_text_embed', **kw)(
        timesteps, pooled_projections)
    context = nn.Dense(self.caption_projection_dim, name='context_embedder', **kw)(
        encoder_hidden_states)
    for i in range(self.num_layers):
      context, x = self._block(i, grid if self.lr_branch else None)(x, context, temb)
    x = x[:, :grid[0] * grid[1]]  # drop the LR half
    x = AdaLayerNormContinuous(name='norm_out', **kw)(x, temb)
    x = nn.Dense(p * p * self.out_channels, name='proj_out', **kw)(x)
    return unpatchify(x, grid[0], grid[1], p, self.out_channels)


# ------------------------------------------------------------------------ DiT4SR control params

def _name(entry: Any) -> str:
  return str(getattr(entry, 'key', entry))  # a plain name or a jax.tree_util DictKey


def is_control_param(path: Sequence[Any]) -> bool:
  """Whether a param path (names, or ``jax.tree_util`` keys) is one DiT4SR trains: its torch name
  contains "control" (``to_{q,k,v,out}_control``, ``ff.control_conv``)."""
  return any(CONTROL_MARKER in _name(entry) for entry in path)


def trainable_control_mask(params: Mapping[str, Any]) -> dict:
  """The param tree's structure with True on DiT4SR's trainable (control) leaves, False elsewhere
  (an ``optax.masked`` / ``multi_transform`` mask)."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({path: is_control_param(path) for path in flat})


def split_control_params(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """(frozen base params, control params): two disjoint trees; ``merge_params`` joins them. The base
  tree has exactly the SD3 checkpoint's params, so a converted SD3.5 tree plus a fresh control tree
  is a DiT4SR initialisation."""
  flat = traverse_util.flatten_dict(params)
  base = {p: v for p, v in flat.items() if not is_control_param(p)}
  control = {p: v for p, v in flat.items() if is_control_param(p)}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(control)


def merge_params(*trees: Mapping[str, Any]) -> dict:
  """Union of disjoint param trees (raises on a path present in two)."""
  merged: dict = {}
  for tree in trees:
    for path, leaf in traverse_util.flatten_dict(tree).items():
      if path in merged:
        raise ValueError(f'param {"/".join(path)} is in more than one tree')
      merged[path] = leaf
  return traverse_util.unflatten_dict(merged)
