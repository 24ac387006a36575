"""FLUX.1 transformer (diffusers ``FluxTransformer2DModel``) in Flax linen, on unpacked NHWC
latents.

References: diffusers 0.42.1 ``models/transformers/transformer_flux.py``
(``FluxTransformer2DModel``, ``FluxTransformerBlock``, ``FluxSingleTransformerBlock``,
``FluxAttention`` + ``FluxAttnProcessor``, ``FluxPosEmbed``), ``models/embeddings.py``
(``get_1d_rotary_pos_embed``, ``apply_rotary_emb``,
``CombinedTimestep[Guidance]TextProjEmbeddings``, ``PixArtAlphaTextProjection``),
``models/normalization.py`` (``AdaLayerNormZero[Single]``, ``AdaLayerNormContinuous``) and
``pipelines/flux/pipeline_flux.py`` (``_pack_latents``, ``_unpack_latents``,
``_prepare_latent_image_ids``). Facts and sizes: shared/reference/next-methods.md Sec. 6
(FLUX.1-dev = :data:`FLUX1_DEV_CONFIG`, 11,901,408,320 parameters).

API::

  model = FluxTransformer2DModel.from_config(config_json_dict, dtype=jnp.bfloat16, remat=True)
  out = model.apply({'params': p}, latents, timesteps, encoder_hidden_states, pooled_projections,
                    guidance)

``latents`` are NHWC (B, H, W, in_channels / 4) *unpacked* VAE latents (H, W even). The module does
what FluxPipeline does around the transformer: 2x2 packing into (B, H/2 * W/2, in_channels) tokens
with channel order ``c * 4 + 2 * dy + dx``, image ids ``[0, row, col]`` on the H/2 x W/2 grid, text
ids zeros, and unpacking of the output back to NHWC (B, H, W, out_channels / 4). ``timesteps`` and
``guidance`` (B,) are the numbers diffusers' transformer receives: sigma in [0, 1] (FluxPipeline
passes ``timestep / 1000``) and the raw guidance scale (3.5 by default; OMGSR-F passes 1.0); both
are multiplied by 1000 inside, after a cast to the compute dtype as diffusers does
(``timestep.to(hidden_states.dtype) * 1000``: in bfloat16 sigma 0.50511 becomes t = 504).
``guidance`` is required exactly when ``guidance_embeds`` (FLUX.1-dev) and refused otherwise
(FLUX.1-schnell), as diffusers' embedder classes do.

Param paths follow `sr_jax.weights` (``transformer_blocks_3/attn/to_out_0/kernel`` is torch
``transformer_blocks.3.attn.to_out.0.weight``, ``single_transformer_blocks_0/norm/linear``,
``time_text_embed/guidance_embedder/linear_1``), so a diffusers state dict converts with
``convert_state_dict(state, abstract_params)`` and nothing else. LoRA targets by torch name:
:data:`OMGSR_F_LORA_TARGETS`.

Precision: ``dtype`` is the compute dtype (and that of the residual streams, as in diffusers),
``param_dtype`` the storage dtype. LayerNorm statistics (two-pass), the adaLN modulation, the
RMSNorm mean square, the rotary embedding and the attention softmax
(`cpu_kernels.dot_product_attention`; cuDNN flash attention on GPU in half precision) run in
float32. The rotary tables are computed in
numpy float64 at trace time (static shapes), as diffusers does on the CPU and CUDA.

Joint sequence: text tokens first, then image tokens (``[text, image]``, the reverse of SD3).
diffusers concatenates and splits the two in every single-stream block; here they are concatenated
once before the single-stream blocks and split once after them (the same numbers).

Init (only for training from scratch or tests; real runs load the checkpoint): torch ``nn.Linear``'s
default kernel distribution, zero biases, RMSNorm scales 1.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.models import cpu_kernels
from sr_jax.models.layers import (RMSNorm, TimestepEmbedding, attention_implementation, maybe_remat,
                                  timestep_embedding)
# The float32 LayerNorm statistics and adaLN modulation are SD3's (eps 1e-6 in both models).
from sr_jax.models.mmdit import layer_norm, modulate

Dtype = Any

# black-forest-labs/FLUX.1-dev transformer/config.json (next-methods.md Sec. 6).
FLUX1_DEV_CONFIG: dict[str, Any] = {
    '_class_name': 'FluxTransformer2DModel',
    'attention_head_dim': 128, 'axes_dims_rope': [16, 56, 56], 'guidance_embeds': True,
    'in_channels': 64, 'joint_attention_dim': 4096, 'num_attention_heads': 24, 'num_layers': 19,
    'num_single_layers': 38, 'out_channels': None, 'patch_size': 1, 'pooled_projection_dim': 768,
}
# FluxTransformer2DModel.__init__ defaults (diffusers 0.42.1): the fields read from config.json.
CONFIG_DEFAULTS: dict[str, Any] = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
    pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
# OMGSR-F's transformer LoRA (wuer5/OMGSR train/train_omgsr_f.py set_flux_transformer_lora), PEFT
# suffix semantics: every double block's 12 projections, the single blocks' to_q/to_k/to_v (they
# have no to_out, ff or added projections) and x_embedder: 19 * 12 + 38 * 3 + 1 = 343 modules.
OMGSR_F_LORA_TARGETS = (
    'x_embedder', 'attn.to_k', 'attn.to_q', 'attn.to_v', 'attn.to_out.0', 'attn.add_k_proj',
    'attn.add_q_proj', 'attn.add_v_proj', 'attn.to_add_out', 'ff.net.0.proj', 'ff.net.2',
    'ff_context.net.0.proj', 'ff_context.net.2')
ROPE_THETA = 10000.0       # FluxPosEmbed(theta=10000): fixed in diffusers, not a config field
NORM_EPS = 1e-6            # the qk RMSNorms (LayerNorms: mmdit.LAYER_NORM_EPS, also 1e-6)
TIMESTEP_CHANNELS = 256    # sinusoid width of the timestep and guidance embedders
MLP_RATIO = 4              # FeedForward mult and FluxSingleTransformerBlock mlp_ratio
PACK = 2                   # FluxPipeline's 2x2 latent packing

# torch nn.Linear's default kernel distribution (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))).
_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def _dense(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=_kernel_init,
                  name=name)


# ----------------------------------------------------------------------------- packing, ids, RoPE

def pack_latents(latents: jax.Array) -> jax.Array:
  """FluxPipeline ``_pack_latents`` on NHWC: (B, H, W, C) -> (B, H/2 * W/2, 4 C), token order
  row-major over the (H/2, W/2) grid, channel ``c * 4 + 2 * dy + dx``."""
  b, h, w, c = latents.shape
  if h % PACK or w % PACK:
    raise ValueError(f'FLUX packs 2x2 latent patches: H and W must be even, got {h}x{w}')
  x = latents.reshape(b, h // PACK, PACK, w // PACK, PACK, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, H/2, W/2, C, dy, dx)
  return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: jax.Array, height: int, width: int) -> jax.Array:
  """FluxPipeline ``_unpack_latents`` to NHWC: (B, H/2 * W/2, 4 C) -> (B, H, W, C)."""
  b, _, channels = tokens.shape
  c = channels // (PACK * PACK)
  x = tokens.reshape(b, height // PACK, width // PACK, c, PACK, PACK)
  x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, H/2, dy, W/2, dx, C)
  return x.reshape(b, height, width, c)


def position_ids(text_len: int, grid_h: int, grid_w: int) -> np.ndarray:
  """``cat(txt_ids, img_ids)``: (text_len + grid_h * grid_w, 3) float64; text ids zeros, image ids
  ``[0, row, col]`` row-major (FluxPipeline ``_prepare_latent_image_ids``)."""
  rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing='ij')
  image = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
  return np.concatenate([np.zeros((text_len, 3)), image], axis=0).astype(np.float64)


def rope_cos_sin(ids: np.ndarray, axes_dims: Sequence[int], theta: float = ROPE_THETA
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``FluxPosEmbed`` without the repeat-interleave: float32 (S, sum(axes_dims) / 2) cos and sin.

  Per axis i of width d: angles ``ids[:, i] * theta ** -(arange(0, d, 2) / d)`` in float64
  (``get_1d_rotary_pos_embed(..., freqs_dtype=float64)``); the axes are concatenated. diffusers'
  tables repeat each column twice (pairs of channels share an angle); :func:`apply_rope` uses the
  pairs directly.
  """
  if ids.shape[-1] != len(axes_dims):
    raise ValueError(f'{ids.shape[-1]} id axes but axes_dims_rope has {len(axes_dims)} entries')
  angles = []
  for i, dim in enumerate(axes_dims):
    if dim % 2:
      raise ValueError(f'axes_dims_rope entries must be even, got {tuple(axes_dims)}')
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles.append(np.outer(ids[:, i].astype(np.float32).astype(np.float64), freqs))
  angles = np.concatenate(angles, axis=-1)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` with ``use_real_unbind_dim=-1`` (FLUX's
  pairwise-interleaved form) on (B, S, heads, D): channel pairs (2j, 2j + 1) rotate by angle j,
  ``(x0 c - x1 s, x1 c + x0 s)``, in float32, cast back to ``x.dtype``."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------- embeddings, norms

def round_to_dtype(x: jax.Array, dtype: Dtype) -> jax.Array:
  """float32 ``x`` rounded (to nearest even) to the precision of ``dtype``, kept in float32: what
  torch's ``x.to(dtype)`` does to the value. ``lax.reduce_precision``, because XLA may skip the
  rounding of a plain ``astype(bf16)`` followed by float32 arithmetic (excess precision)."""
  info = jnp.finfo(dtype)
  if info.bits >= 32:
    return x
  return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


class CombinedTimestepTextProjEmbeddings(nn.Module):
  """diffusers ``CombinedTimestepGuidanceTextProjEmbeddings`` (``guidance_embeds``) or
  ``CombinedTimestepTextProjEmbeddings``: ``timestep_embedder(sinusoid(t)) [+
  guidance_embedder(sinusoid(g))] + text_embedder(pooled)``. Sinusoid: 256 channels ``[cos, sin]``
  (flip_sin_to_cos, shift 0) in float32, cast to the compute dtype; the embedders are
  Linear-SiLU-Linear (``text_embedder`` is PixArtAlphaTextProjection(act_fn='silu'), same names).
  ``t`` and ``g`` are already x1000."""
  embedding_dim: int
  guidance_embeds: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, timesteps: jax.Array, guidance: jax.Array | None,
               pooled_projections: jax.Array) -> jax.Array:
    kw = dict(act_fn='silu', dtype=self.dtype, param_dtype=self.param_dtype)
    sinusoid = lambda t: timestep_embedding(t, TIMESTEP_CHANNELS, flip_sin_to_cos=True,
                                            freq_shift=0.0).astype(self.dtype)
    emb = TimestepEmbedding(self.embedding_dim, name='timestep_embedder', **kw)(sinusoid(timesteps))
    if self.guidance_embeds:
      emb = emb + TimestepEmbedding(self.embedding_dim, name='guidance_embedder', **kw)(
          sinusoid(guidance))
    return emb + TimestepEmbedding(self.embedding_dim, name='text_embedder', **kw)(
        pooled_projections.astype(self.dtype))


class AdaLayerNormZero(nn.Module):
  """The modulation of diffusers ``AdaLayerNormZero`` (6 chunks: shift_msa, scale_msa, gate_msa,
  shift_mlp, scale_mlp, gate_mlp) or ``AdaLayerNormZeroSingle`` (3: shift, scale, gate):
  ``linear(silu(temb))`` split into (B, 1, dim) chunks. The norm itself is :func:`layer_norm`."""
  num_chunks: int = 6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, temb: jax.Array) -> tuple[jax.Array, ...]:
    emb = _dense(self.num_chunks * temb.shape[-1], 'linear', self.dtype, self.param_dtype)(
        nn.silu(temb))
    return tuple(jnp.split(emb[:, None, :], self.num_chunks, axis=-1))


class AdaLayerNormContinuous(nn.Module):
  """diffusers ``AdaLayerNormContinuous(elementwise_affine=False, eps=1e-6)``: ``linear(silu(c))``
  split into **(scale, shift)** (the reverse of AdaLN-Zero's order);
  ``LN(x) * (1 + scale) + shift``."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, conditioning: jax.Array) -> jax.Array:
    emb = _dense(2 * x.shape[-1], 'linear', self.dtype, self.param_dtype)(nn.silu(conditioning))
    scale, shift = jnp.split(emb[:, None, :], 2, axis=-1)
    return modulate(layer_norm(x), shift, scale, self.dtype)


class GELU(nn.Module):
  """diffusers ``GELU(approximate='tanh')``: Linear ``proj`` then tanh-approximate GELU."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.gelu(_dense(self.features, 'proj', self.dtype, self.param_dtype)(x),
                       approximate=True)


class FeedForward(nn.Module):
  """diffusers ``FeedForward(activation_fn='gelu-approximate')``: ``net_0`` (GELU to 4 dim), dropout
  (identity), ``net_2``."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GELU(MLP_RATIO * x.shape[-1], name='net_0', **kw)(x)
    return _dense(x.shape[-1], 'net_2', **kw)(h)


# ----------------------------------------------------------------------------------- attention

def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention over (B, S, heads, D), scale D ** -0.5, through the project's helper."""
  b, s, heads, d = q.shape
  out = cpu_kernels.dot_product_attention(
      q, k, v, implementation=attention_implementation(q.dtype, d, s, s))
  return out.reshape(b, s, heads * d)


class FluxAttention(nn.Module):
  """diffusers ``FluxAttention`` + ``FluxAttnProcessor``.

  Image (or, in single blocks, joint) tokens ``x``: ``to_q/to_k/to_v`` with bias, per-head RMSNorm
  ``norm_q/norm_k``. With ``context`` (double blocks): text tokens through ``add_{q,k,v}_proj`` and
  ``norm_added_{q,k}``, put **in front** of the image tokens; RoPE on the joint q and k; attention;
  the outputs split back and projected by ``to_out_0`` (image) and ``to_add_out`` (text). Without
  ``context`` (``pre_only``, single blocks) the attention output is returned unprojected.
  """
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _qkv(self, x: jax.Array, names: tuple[str, str, str], norms: tuple[str, str]):
    inner = self.heads * self.head_dim
    split = lambda t: t.reshape(*t.shape[:2], self.heads, self.head_dim)
    q, k, v = (split(_dense(inner, n, self.dtype, self.param_dtype)(x)) for n in names)
    norm = lambda name: RMSNorm(NORM_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    return norm(norms[0])(q), norm(norms[1])(k), v

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None, cos: jax.Array,
               sin: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    q, k, v = self._qkv(x, ('to_q', 'to_k', 'to_v'), ('norm_q', 'norm_k'))
    if context is not None:
      cq, ck, cv = self._qkv(context, ('add_q_proj', 'add_k_proj', 'add_v_proj'),
                             ('norm_added_q', 'norm_added_k'))
      q, k, v = (jnp.concatenate(pair, axis=1) for pair in ((cq, q), (ck, k), (cv, v)))
    out = _attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    if context is None:
      return out, None
    text_len = context.shape[1]
    image_out = _dense(x.shape[-1], 'to_out_0', self.dtype, self.param_dtype)(out[:, text_len:])
    text_out = _dense(context.shape[-1], 'to_add_out', self.dtype, self.param_dtype)(
        out[:, :text_len])
    return image_out, text_out


# -------------------------------------------------------------------------------------- blocks

class FluxTransformerBlock(nn.Module):
  """diffusers ``FluxTransformerBlock`` (double stream): AdaLN-Zero ``norm1`` / ``norm1_context``,
  joint attention ``attn``, then per stream a gated residual, LayerNorm (``norm2``, no params)
  modulated by the mlp chunks and the feed-forward ``ff`` / ``ff_context``.
  Returns (text tokens, image tokens), as diffusers."""
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, temb: jax.Array, cos: jax.Array,
               sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(
        6, name='norm1', **kw)(temb)
    c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = AdaLayerNormZero(
        6, name='norm1_context', **kw)(temb)
    attn_out, context_out = FluxAttention(self.heads, self.head_dim, name='attn', **kw)(
        modulate(layer_norm(x), shift, scale, self.dtype),
        modulate(layer_norm(context), c_shift, c_scale, self.dtype), cos, sin)
    x = x + gate * attn_out
    ff_in = modulate(layer_norm(x), shift_mlp, scale_mlp, self.dtype)
    x = x + gate_mlp * FeedForward(name='ff', **kw)(ff_in)
    context = context + c_gate * context_out
    ff_in = modulate(layer_norm(context), c_shift_mlp, c_scale_mlp, self.dtype)
    context = context + c_gate_mlp * FeedForward(name='ff_context', **kw)(ff_in)
    return context, x


class FluxSingleTransformerBlock(nn.Module):
  """diffusers ``FluxSingleTransformerBlock`` on the joint [text, image] tokens: AdaLN-Zero-Single
  ``norm`` (shift, scale, gate); attention (``attn``, no output projection) in parallel with the MLP
  ``act(proj_mlp(.))`` (4 dim, tanh GELU); ``proj_out`` of their concatenation, gated, residual."""
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, temb: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = h.shape[-1]
    shift, scale, gate = AdaLayerNormZero(3, name='norm', **kw)(temb)
    normed = modulate(layer_norm(h), shift, scale, self.dtype)
    mlp = jax.nn.gelu(_dense(MLP_RATIO * dim, 'proj_mlp', **kw)(normed), approximate=True)
    attn, _ = FluxAttention(self.heads, self.head_dim, name='attn', **kw)(normed, None, cos, sin)
    out = _dense(dim, 'proj_out', **kw)(jnp.concatenate([attn, mlp], axis=-1))
    return h + gate * out


# --------------------------------------------------------------------------------------- model

class FluxTransformer2DModel(nn.Module):
  """diffusers ``FluxTransformer2DModel`` on unpacked NHWC latents (see the module docstring)."""
  in_channels: int = 64
  out_channels: int | None = None
  num_layers: int = 19
  num_single_layers: int = 38
  attention_head_dim: int = 128
  num_attention_heads: int = 24
  joint_attention_dim: int = 4096
  pooled_projection_dim: int = 768
  guidance_embeds: bool = False
  axes_dims_rope: tuple[int, ...] = (16, 56, 56)
  remat: bool = False  # rematerialise each block (double and single) in the backward pass
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **kwargs) -> 'FluxTransformer2DModel':
    """Builds the model from a diffusers transformer ``config.json`` dict (``FLUX1_DEV_CONFIG``).

    ``kwargs`` (``dtype``, ``param_dtype``, ``remat``) override the config. ``patch_size`` must be 1
    (every FLUX.1 checkpoint; the pipeline's 2x2 packing is the patching); ``sum(axes_dims_rope)``
    must be ``attention_head_dim``.
    """
    class_name = config.get('_class_name', 'FluxTransformer2DModel')
    if class_name != 'FluxTransformer2DModel':
      raise ValueError(f'FLUX: config.json is for {class_name!r}, not FluxTransformer2DModel')
    if int(config.get('patch_size', 1)) != 1:
      raise ValueError(f'FLUX: only patch_size 1 is supported, got {config["patch_size"]}')
    fields = {name: config.get(name, default) for name, default in CONFIG_DEFAULTS.items()
              if name != 'patch_size'}
    fields['axes_dims_rope'] = tuple(int(d) for d in fields['axes_dims_rope'])
    fields['out_channels'] = fields['out_channels'] or fields['in_channels']
    fields.update(kwargs)
    model = cls(**fields)
    model.check_config()
    return model

  def check_config(self) -> None:
    """Raises ValueError for sizes the forward cannot run with."""
    if sum(self.axes_dims_rope) != self.attention_head_dim:
      raise ValueError(f'axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim '
                       f'{self.attention_head_dim}')
    for name in ('in_channels', 'output_channels'):
      if getattr(self, name) % (PACK * PACK):
        raise ValueError(f'FLUX {name} {getattr(self, name)} is not a multiple of 4 (2x2 packing)')

  @property
  def inner_dim(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    """Packed output channels (``out_channels or in_channels``); the NHWC output has a quarter."""
    return self.out_channels or self.in_channels

  @property
  def latent_channels(self) -> int:
    """Channels of the unpacked NHWC input (16 for FLUX.1)."""
    return self.in_channels // (PACK * PACK)

  def dummy_inputs(self, batch: int = 1, height: int = 2, width: int = 2,
                   text_len: int = 1) -> tuple[jax.Array, ...]:
    """Inputs for ``init``: (latents, timesteps, encoder_hidden_states, pooled_projections[,
    guidance]), guidance only with ``guidance_embeds``."""
    inputs = (jnp.zeros((batch, height, width, self.latent_channels), jnp.float32),
              jnp.full((batch,), 0.5, jnp.float32),
              jnp.zeros((batch, text_len, self.joint_attention_dim), jnp.float32),
              jnp.zeros((batch, self.pooled_projection_dim), jnp.float32))
    return inputs + ((jnp.ones((batch,), jnp.float32),) if self.guidance_embeds else ())

  def _conditioning(self, timesteps: jax.Array, guidance: jax.Array | None,
                    pooled_projections: jax.Array) -> jax.Array:
    """temb: ``time_text_embed`` of ``t * 1000`` (and ``g * 1000``), cast to ``dtype`` first."""
    if self.guidance_embeds != (guidance is not None):
      raise ValueError('FLUX: guidance is required with guidance_embeds (FLUX.1-dev) and not '
                       f'accepted without (guidance_embeds={self.guidance_embeds})')
    batch = pooled_projections.shape[0]
    rounded = functools.partial(round_to_dtype, dtype=self.dtype)
    scaled = lambda t: rounded(rounded(jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,)))
                               * 1000)
    embed = CombinedTimestepTextProjEmbeddings(self.inner_dim, self.guidance_embeds,
                                               dtype=self.dtype, param_dtype=self.param_dtype,
                                               name='time_text_embed')
    return embed(scaled(timesteps), None if guidance is None else scaled(guidance),
                 pooled_projections)

  @nn.compact
  def __call__(self, latents: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
               pooled_projections: jax.Array, guidance: jax.Array | None = None) -> jax.Array:
    """NHWC (B, H, W, in_channels / 4) latents -> NHWC (B, H, W, out_channels / 4) prediction."""
    _, height, width, channels = latents.shape
    if channels * PACK * PACK != self.in_channels:
      raise ValueError(f'FLUX: latents have {channels} channels, the model packs '
                       f'{self.latent_channels} x 4 = in_channels {self.in_channels}')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _dense(self.inner_dim, 'x_embedder', **kw)(pack_latents(latents.astype(self.dtype)))
    temb = self._conditioning(timesteps, guidance, pooled_projections)
    context = _dense(self.inner_dim, 'context_embedder', **kw)(
        encoder_hidden_states.astype(self.dtype))
    text_len = context.shape[1]
    ids = position_ids(text_len, height // PACK, width // PACK)
    cos, sin = (jnp.asarray(t) for t in rope_cos_sin(ids, self.axes_dims_rope))
    heads, head_dim = self.num_attention_heads, self.attention_head_dim
    double = maybe_remat(FluxTransformerBlock, self.remat)
    for i in range(self.num_layers):
      context, x = double(heads, head_dim, name=f'transformer_blocks_{i}', **kw)(
          x, context, temb, cos, sin)
    single = maybe_remat(FluxSingleTransformerBlock, self.remat)
    h = jnp.concatenate([context, x], axis=1)
    for i in range(self.num_single_layers):
      h = single(heads, head_dim, name=f'single_transformer_blocks_{i}', **kw)(h, temb, cos, sin)
    x = AdaLayerNormContinuous(name='norm_out', **kw)(h[:, text_len:], temb)
    out = _dense(self.output_channels, 'proj_out', **kw)(x)
    return unpack_latents(out, height, width)
