"""DINOv3-ViT backbone in Flax linen, matching `transformers.DINOv3ViTModel` in eval mode.

Reference: transformers 5.23.0 ``models/dinov3_vit/modeling_dinov3_vit.py`` (facts and sizes in
shared/reference/next-methods.md Sec. 2.2). The TUDSR discriminator
(:mod:`sr_jax.models.vit_discriminator`) runs this frozen backbone on ImageNet-normalised NHWC images
and reads a few hidden states, each passed through the final ``norm``; hence the public API:

* ``apply({'params': p}, pixel_values, num_layers=None)`` returns the tuple of hidden states of
  transformers' ``outputs.hidden_states`` (``output_hidden_states=True``): ``[embeddings, block 1
  output, ..., block L output]``, each (B, 1 + R + h w, C), none final-normed. ``num_layers=k`` runs
  only the first k blocks and returns k + 1 states (later blocks are not computed).
* ``apply(vars, x, method='final_norm')`` is the final LayerNorm ``norm`` (transformers'
  ``last_hidden_state`` is ``final_norm(hidden_states[-1])``).
* ``num_prefix_tokens`` (CLS + R registers) and ``patch_size``.

Eval mode only: RoPE uses the plain patch-centre coordinates (``pos_embed_shift/jitter/rescale`` are
training-time augmentations in transformers and are ignored), drop-path and attention dropout are
the identity, and ``mask_token`` (pre-training masking) is kept as a param but never used.

Param names mirror the keys ``save_pretrained`` writes (no ``model.`` prefix on disk):
``embeddings/{cls_token, mask_token, register_tokens, patch_embeddings}``,
``layer_<i>/{norm1, attention/{q,k,v,o}_proj, layer_scale1/lambda1, norm2,
mlp/{gate_proj, up_proj, down_proj}, layer_scale2/lambda1}`` and ``norm``; see `sr_jax/weights.py`.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.models import cpu_kernels
from sr_jax.models.layers import Conv, attention_implementation, get_activation, maybe_remat

# transformers' _init_weights: truncated normal of std initializer_range (0.02) for linears, convs
# and the CLS / register tokens; mask token zeros; layer scales layerscale_value.
_kernel_init = nn.initializers.truncated_normal(0.02)


def _layer_norm(eps: float, param_dtype: Any, name: str | None = None) -> nn.LayerNorm:
  """torch LayerNorm: float32 statistics with the two-pass variance (the ViT residual stream has
  large-magnitude channels, where E[x^2] - E[x]^2 loses precision)."""
  return nn.LayerNorm(eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False,
                      name=name)


def rope_cos_sin(num_patches_h: int, num_patches_w: int, head_dim: int, theta: float
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``DINOv3ViTRopePositionEmbedding.forward`` in eval mode: (h w, head_dim) float32 cos and sin.

  Patch centres ``(i + 0.5) / n`` per axis (normalised separately), mapped to [-1, 1], row-major
  (y, x) per token; ``inv_freq = theta ** -(4 k / head_dim)``, k < head_dim / 4; angles
  ``2 pi coord inv_freq`` as (hw, 2, head_dim / 4) flattened to [y-freqs | x-freqs], tiled twice.
  Static shapes, so numpy at trace time (constants in the compiled program).
  """
  if head_dim % 4:
    raise ValueError(f'DINOv3-ViT RoPE needs head_dim divisible by 4, got {head_dim}')
  inv_freq = (1.0 / np.float32(theta) ** (np.arange(head_dim // 4, dtype=np.float32)
                                          * np.float32(4.0 / head_dim))).astype(np.float32)
  coords_h = np.arange(0.5, num_patches_h, dtype=np.float32) / np.float32(num_patches_h)
  coords_w = np.arange(0.5, num_patches_w, dtype=np.float32) / np.float32(num_patches_w)
  coords = np.stack(np.meshgrid(coords_h, coords_w, indexing='ij'), axis=-1).reshape(-1, 2)
  coords = np.float32(2.0) * coords - np.float32(1.0)
  angles = np.float32(2 * math.pi) * coords[:, :, None] * inv_freq[None, None, :]
  angles = np.tile(angles.reshape(angles.shape[0], -1), (1, 2))
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the patch tokens of (B, N, heads, head_dim) ``x``; the first N - h w (CLS, registers)
  are untouched (transformers ``apply_rotary_pos_emb``). ``rotate_half(x) = [-x2, x1]``."""
  prefix = x.shape[1] - cos.shape[0]
  head, patches = x[:, :prefix], x[:, prefix:]
  half = patches.shape[-1] // 2
  rotated = jnp.concatenate([-patches[..., half:], patches[..., :half]], axis=-1)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  patches = (patches.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)
  return jnp.concatenate([head, patches], axis=1)


class DINOv3ViTEmbeddings(nn.Module):
  """Patch embedding (Conv2d k = s = patch) + CLS and register tokens: (B, 1 + R + h w, C)."""
  hidden_size: int
  patch_size: int
  num_register_tokens: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    c, p = self.hidden_size, self.patch_size
    self.cls_token = self.param('cls_token', _kernel_init, (1, 1, c), self.param_dtype)
    # Pre-training masking only (bool_masked_pos); kept so the checkpoint converts 1:1.
    self.mask_token = self.param('mask_token', nn.initializers.zeros, (1, 1, c), self.param_dtype)
    self.register_tokens = self.param('register_tokens', _kernel_init,
                                      (1, self.num_register_tokens, c), self.param_dtype)
    self.patch_embeddings = Conv(c, (p, p), strides=p, padding='VALID', dtype=self.dtype,
                                 param_dtype=self.param_dtype, kernel_init=_kernel_init)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    patches = self.patch_embeddings(pixel_values.astype(self.dtype))
    b = patches.shape[0]
    patches = patches.reshape(b, -1, self.hidden_size)  # row-major, as torch's flatten(2)
    prefix = jnp.concatenate([self.cls_token, self.register_tokens], axis=1).astype(self.dtype)
    return jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]), patches], axis=1)


class DINOv3ViTAttention(nn.Module):
  """Self-attention with RoPE on the patch tokens; scale ``head_dim ** -0.5``, fp32 softmax.
  Biases per config: the released models have q, v and o biases and no k bias."""
  num_heads: int
  query_bias: bool = True
  key_bias: bool = False
  value_bias: bool = True
  proj_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    b, n, c = x.shape
    head_dim = c // self.num_heads
    dense = lambda bias, name: nn.Dense(c, use_bias=bias, dtype=self.dtype,
                                        param_dtype=self.param_dtype, kernel_init=_kernel_init,
                                        name=name)
    split = lambda t: t.reshape(b, n, self.num_heads, head_dim)
    q = split(dense(self.query_bias, 'q_proj')(x))
    k = split(dense(self.key_bias, 'k_proj')(x))
    v = split(dense(self.value_bias, 'v_proj')(x))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = cpu_kernels.dot_product_attention(
        q, k, v, implementation=attention_implementation(q.dtype, head_dim, n, n))
    return dense(self.proj_bias, 'o_proj')(out.reshape(b, n, c))


class DINOv3ViTMLP(nn.Module):
  """``down_proj(act(up_proj(x)))``, or gated (SwiGLU for the "plus" sizes):
  ``down_proj(act(gate_proj(x)) * up_proj(x))``."""
  intermediate_size: int
  hidden_act: str = 'gelu'
  use_gated_mlp: bool = False
  mlp_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda features, name: nn.Dense(features, use_bias=self.mlp_bias, dtype=self.dtype,
                                            param_dtype=self.param_dtype,
                                            kernel_init=_kernel_init, name=name)
    act = get_activation(self.hidden_act)  # transformers' "gelu" is the exact erf form
    if self.use_gated_mlp:
      h = act(dense(self.intermediate_size, 'gate_proj')(x)) * dense(self.intermediate_size,
                                                                   'up_proj')(x)
    else:
      h = act(dense(self.intermediate_size, 'up_proj')(x))
    return dense(x.shape[-1], 'down_proj')(h)


class DINOv3ViTLayerScale(nn.Module):
  """Per-channel scale ``lambda1`` (own module so the path is ``layer_scale<k>/lambda1``)."""
  init_value: float = 1.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('lambda1', nn.initializers.constant(self.init_value), (x.shape[-1],),
                       self.param_dtype)
    return x * scale.astype(x.dtype)


class DINOv3ViTLayer(nn.Module):
  """One pre-norm block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``."""
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float = 1e-5
  layerscale_value: float = 1.0
  hidden_act: str = 'gelu'
  use_gated_mlp: bool = False
  query_bias: bool = True
  key_bias: bool = False
  value_bias: bool = True
  proj_bias: bool = True
  mlp_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _layer_norm(self.layer_norm_eps, self.param_dtype, 'norm1')(x).astype(self.dtype)
    h = DINOv3ViTAttention(self.num_heads, self.query_bias, self.key_bias, self.value_bias,
                           self.proj_bias, name='attention', **kw)(h, cos, sin)
    x = x + DINOv3ViTLayerScale(self.layerscale_value, self.param_dtype, name='layer_scale1')(h)
    h = _layer_norm(self.layer_norm_eps, self.param_dtype, 'norm2')(x).astype(self.dtype)
    h = DINOv3ViTMLP(self.intermediate_size, self.hidden_act, self.use_gated_mlp, self.mlp_bias,
                     name='mlp', **kw)(h)
    return x + DINOv3ViTLayerScale(self.layerscale_value, self.param_dtype, name='layer_scale2')(h)


# DINOv3ViTConfig fields we read, with transformers' defaults (the ViT-S/16 sizes).
CONFIG_DEFAULTS: dict[str, Any] = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
    patch_size=16, num_channels=3, num_register_tokens=0, layer_norm_eps=1e-5, rope_theta=100.0,
    layerscale_value=1.0, use_gated_mlp=False, hidden_act='gelu', query_bias=True,
    key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True)


def _square_patch(patch_size: Any) -> int:
  if isinstance(patch_size, (list, tuple)):
    if len(set(patch_size)) != 1:
      raise ValueError(f'DINOv3-ViT: only square patches are supported, got {patch_size}')
    patch_size = patch_size[0]
  return int(patch_size)


class DINOv3ViTModel(nn.Module):
  """DINOv3-ViT backbone returning all hidden states (see the module docstring for the API)."""
  hidden_size: int = 384
  num_hidden_layers: int = 12
  num_attention_heads: int = 6
  intermediate_size: int = 1536
  patch_size: int = 16
  num_channels: int = 3
  num_register_tokens: int = 0
  layer_norm_eps: float = 1e-5
  rope_theta: float = 100.0
  layerscale_value: float = 1.0
  use_gated_mlp: bool = False
  hidden_act: str = 'gelu'
  query_bias: bool = True
  key_bias: bool = False
  value_bias: bool = True
  proj_bias: bool = True
  mlp_bias: bool = True
  remat: bool = False  # rematerialise each block (training through the frozen backbone)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **kwargs) -> 'DINOv3ViTModel':
    """Builds the model from a transformers ``DINOv3ViTConfig`` ``config.json`` dict.

    ``kwargs`` (``dtype``, ``param_dtype``, ``remat``) override the config. Training-only fields
    (``drop_path_rate``, ``attention_dropout``, ``pos_embed_shift/jitter/rescale``) and backbone
    fields (``out_features``, ``apply_layernorm`` ...) are ignored.
    """
    model_type = config.get('model_type', 'dinov3_vit')
    if model_type != 'dinov3_vit':
      raise ValueError(f'DINOv3-ViT: config.json has model_type {model_type!r}, not "dinov3_vit"')
    fields = {name: config.get(name, default) for name, default in CONFIG_DEFAULTS.items()}
    fields['patch_size'] = _square_patch(fields['patch_size'])
    get_activation(fields['hidden_act'])  # unsupported activations fail here, not at trace time
    if fields['hidden_size'] % fields['num_attention_heads']:
      raise ValueError(f'hidden_size {fields["hidden_size"]} is not a multiple of '
                       f'num_attention_heads {fields["num_attention_heads"]}')
    fields.update(kwargs)
    return cls(**fields)

  @property
  def num_prefix_tokens(self) -> int:
    """CLS + register tokens in front of the patch tokens of every hidden state."""
    return 1 + self.num_register_tokens

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def setup(self):
    self.embeddings = DINOv3ViTEmbeddings(self.hidden_size, self.patch_size,
                                          self.num_register_tokens, dtype=self.dtype,
                                          param_dtype=self.param_dtype)
    block = maybe_remat(DINOv3ViTLayer, self.remat)
    self.layer = [
        block(self.num_attention_heads, self.intermediate_size, self.layer_norm_eps,
              self.layerscale_value, self.hidden_act, self.use_gated_mlp, self.query_bias,
              self.key_bias, self.value_bias, self.proj_bias, self.mlp_bias, dtype=self.dtype,
              param_dtype=self.param_dtype)
        for _ in range(self.num_hidden_layers)
    ]
    self.norm = _layer_norm(self.layer_norm_eps, self.param_dtype)

  def __call__(self, pixel_values: jax.Array, num_layers: int | None = None
               ) -> tuple[jax.Array, ...]:
    """NHWC ImageNet-normalised pixels -> (embeddings, block 1, ..., block k outputs), k =
    ``num_layers`` (default all). Sides are floored to whole patches, as the torch conv does."""
    total = self.num_hidden_layers
    num_layers = total if num_layers is None else num_layers
    if not 0 <= num_layers <= total:
      raise ValueError(f'num_layers must be in [0, {total}], got {num_layers}')
    if self.is_initializing():
      num_layers = total  # every param exists whatever num_layers is (init runs under jit)
    _, height, width, _ = pixel_values.shape
    h, w = height // self.patch_size, width // self.patch_size
    cos, sin = (jnp.asarray(a) for a in rope_cos_sin(h, w, self.head_dim, self.rope_theta))
    x = self.embeddings(pixel_values)
    hidden = [x]
    for block in self.layer[:num_layers]:
      x = block(x, cos, sin)
      hidden.append(x)
    if self.is_initializing():
      self.norm(x)
    return tuple(hidden)

  def final_norm(self, hidden_state: jax.Array) -> jax.Array:
    """The final LayerNorm ``norm`` (in ``dtype``): transformers' ``last_hidden_state`` is
    ``final_norm(hidden_states[-1])``; the TUDSR discriminator applies it to each level."""
    return self.norm(hidden_state).astype(self.dtype)

  def dummy_inputs(self) -> jax.Array:
    """A one-patch NHWC batch for ``init`` (the param shapes do not depend on the image size)."""
    return jnp.zeros((1, self.patch_size, self.patch_size, self.num_channels), self.dtype)
