"""TUDSR discriminator: frozen DINOv3-ViT-B + trainable multi-level heads (paper Sec. 3.5, Fig. 3).

The TUDSR paper says only "features of layers 3, 6 and 9 of a frozen DINOv3-ViT-B, one trainable head
per level, BlurPool for anti-aliasing"; its code is not public. We follow the same author's ViT
discriminator in OMGSR (commit f83a88f, ``dino_gan/dinov3_vit_discrminator.py`` and its
``dino_gan/dinov3_vit_attention.py``; summarised in shared/reference/method-facts.md Sec. 2.1),
read for facts only:

Features (:func:`vit_features`)
  Images in [-1, 1] -> ``x * 0.5 + 0.5`` -> ImageNet mean/std (:func:`imagenet_normalize`), no
  resize; the backbone runs only up to block ``max(levels)`` (the proxy breaks out of its block loop
  after the last level taken). The proxy takes 0-indexed blocks [2, 5, 8] = our 1-indexed levels
  (3, 6, 9) = transformers' ``hidden_states[3], [6], [9]``. Each is passed through the backbone's
  final ``norm`` and its prefix tokens (cls + 4 registers) are dropped; the patch tokens are laid
  out row-major on the (H/p, W/p) grid, which we return as an NHWC grid.

Head per level (:class:`ViTDiscriminatorHead`), repeated ``num_downsamples`` times:
  * space-to-depth 2x2, channels ordered ``(c, s1, s2)``, i.e. new channel ``4 c + 2 s1 + s2``
    for the token at row ``2 i + s1``, column ``2 j + s2`` (einops
    ``'b (h s1) (w s2) c -> b (h w) (c s1 s2)'`` in the proxy), then spectral-norm
    Linear(4 C -> C // 2) with bias (the proxy writes ``nn.Linear(dim * 4, out_dim, 1)``: the 1 is ``bias=True``);
  * LeakyReLU(0.2);
  * token BlurPool: depthwise ``[1,4,6,4,1] outer [1,4,6,4,1] / 256`` (antialiased-cnns filt_size 5),
    stride 1, reflect pad 2 on every side, on the token grid;
  * a pre-norm transformer block (DINOv3 ``SelfAttentionBlock`` defaults) except after the last
    downsample: ``x + proj(attn(LN(x)))`` then ``x + fc2(GELU(fc1(LN(x))))``; LayerNorm eps 1e-5
    (torch default ``nn.LayerNorm``), fused qkv Linear without bias (output channels ordered
    (3, heads, head_dim)), proj with bias, MLP hidden 4 x dim with bias, exact GELU, no layer scale
    (``init_values=None``), no RoPE, no dropout, scale ``head_dim ** -0.5``. The proxy uses
    ``heads = dim // 64``; we use ``max(1, dim // 64)`` so that tiny test dims work (the proxy
    would divide by zero below 64).
  Then a spectral-norm Linear(C_last -> 1) per token. Channels halve at each downsample
  (768 -> 384 -> 192 at 512 px, -> 96 at 1024 px). No normalisation outside the attention blocks.

Number of downsamples (:data:`HEAD_DOWNSAMPLES`): the proxy uses dims [C, C/2, C/4, C/8] (3
downsamples) at 1024 px and [C, C/2, C/4] (2) at every other size: 512 px -> 32^2 tokens -> 8^2
logits, 1024 px -> 64^2 -> 8^2. We accept only the sizes of the table; 64 (1 downsample) is ours,
for tiny test runs (4^2 tokens at patch 16 -> 2^2 logits; 8^2 at patch 8 -> 4^2). ``num_downsamples``
overrides the table.

Choices of ours where the proxy is silent or cannot run:
  * Logits are returned as (B, h', w') grids (the proxy returns (B, h' w', 1) token lists; the loss
    averages them per sample either way). Non-square grids work; sides must be divisible by
    ``2 ** num_downsamples`` (einops would raise otherwise; so do we).
  * Reflect padding uses numpy's rule, which keeps reflecting when the pad (2) is not smaller than
    the grid side; torch's ``ReflectionPad2d`` raises there (grids of 2x2 or 1x1 tokens, only met
    by tiny test models). For sides >= 3 both agree.
  * Init: the proxy leaves torch's defaults (nothing re-initialises the heads), so every Linear here
    draws weight and bias from U(+-1/sqrt(fan_in)) and LayerNorm starts at scale 1, bias 0.
  * Spectral norm is :func:`sr_jax.models.discriminator.spectral_sigma` (torch ``spectral_norm``
    semantics, one power iteration per train-mode call, u/v in the ``'spectral'`` collection; see
    that module), on the torch weight matrix (out, in) = our kernel transposed.

The full D call :func:`vit_discriminator_logits` has the contract of
:func:`sr_jax.models.discriminator.discriminator_logits` (DiffAugment 'color,translation,cutout' in
[-1, 1] first). The proxy's loss (BCE, real target 0.8, learned softmax level weights) lives in the
loss code, not here. Param names are ours (no checkpoint of the heads exists):
``decoders_<i>/{down_<k>, block_<k>/{norm1, qkv, proj, norm2, fc1, fc2}, out}``.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.models import cpu_kernels
from sr_jax.models.dinov3 import imagenet_normalize
from sr_jax.models.discriminator import _l2_normalize, diff_augment, spectral_sigma
from sr_jax.models.layers import attention_implementation, gelu_exact

LEVELS = (3, 6, 9)
# Downsamples per head (OMGSR f83a88f MultiLevelViTDiscHead dim_list; 64 is ours for tiny tests).
HEAD_DOWNSAMPLES = {512: 2, 1024: 3, 64: 1}
_BLUR_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)


def head_downsamples(resolution: int) -> int:
  """Number of space-to-depth steps per head for ``resolution`` (sizes of :data:`HEAD_DOWNSAMPLES`)."""
  if resolution not in HEAD_DOWNSAMPLES:
    raise ValueError(f'ViT discriminator heads are defined for resolutions '
                     f'{sorted(HEAD_DOWNSAMPLES)}, got {resolution}')
  return HEAD_DOWNSAMPLES[resolution]


def attention_heads(dim: int) -> int:
  """Heads of a head's attention block: ``dim // 64`` (the proxy), at least 1."""
  return max(1, dim // 64)


def _torch_linear_init(fan_in: int):
  """torch ``nn.Linear`` default init for weight and bias: U(+-1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def space_to_depth(x: jax.Array) -> jax.Array:
  """(B, 2h, 2w, C) -> (B, h, w, 4C) with channel ``4 c + 2 s1 + s2`` from token (2i + s1, 2j + s2)."""
  b, height, width, c = x.shape
  if height % 2 or width % 2:
    raise ValueError(f'space-to-depth needs an even token grid, got {height}x{width}')
  x = x.reshape(b, height // 2, 2, width // 2, 2, c)
  return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, height // 2, width // 2, 4 * c)


def token_blur_pool(x: jax.Array) -> jax.Array:
  """BlurPool (antialiased-cnns filt_size 5, stride 1, reflect pad 2) on an NHWC token grid."""
  a = np.asarray(_BLUR_TAPS)
  filt = np.outer(a, a)
  filt = jnp.asarray(filt / filt.sum(), x.dtype)
  channels = x.shape[-1]
  kernel = jnp.tile(filt[:, :, None, None], (1, 1, 1, channels))
  pad = (len(_BLUR_TAPS) - 1) // 2
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)


class SpectralNormDense(nn.Module):
  """``spectral_norm(nn.Linear(in, features))`` on the last axis, with explicit u/v state.

  Kernel (in, features) = torch weight transposed; u (features,), v (in,) as torch's
  ``weight_u``/``weight_v``. ``update_spectral`` runs one power iteration and writes u, v back.
  """
  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, update_spectral: bool) -> jax.Array:
    fan_in = x.shape[-1]
    init = _torch_linear_init(fan_in)
    kernel = self.param('kernel', init, (fan_in, self.features), self.param_dtype)
    u_var = self.variable('spectral', 'u', lambda: _l2_normalize(
        jax.random.normal(self.make_rng('params'), (self.features,), jnp.float32)))
    v_var = self.variable('spectral', 'v', lambda: _l2_normalize(
        jax.random.normal(self.make_rng('params'), (fan_in,), jnp.float32)))
    kernel32 = kernel.astype(jnp.float32)
    sigma, u, v = spectral_sigma(kernel32.T, u_var.value, v_var.value, update_spectral)
    if update_spectral and not self.is_initializing():
      u_var.value, v_var.value = u, v
    y = jnp.matmul(x.astype(self.dtype), (kernel32 / sigma).astype(self.dtype))
    if self.use_bias:
      y = y + self.param('bias', init, (self.features,), self.param_dtype).astype(self.dtype)
    return y


class HeadAttentionBlock(nn.Module):
  """DINOv3 ``SelfAttentionBlock`` as the proxy builds it (pre-norm, no layer scale, no RoPE) on
  (B, N, dim) tokens."""
  num_heads: int
  mlp_ratio: float = 4.0
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, dim = x.shape
    if dim % self.num_heads:
      raise ValueError(f'attention dim {dim} is not divisible by {self.num_heads} heads')
    head_dim = dim // self.num_heads
    hidden = int(dim * self.mlp_ratio)

    def dense(features, fan_in, name, use_bias=True):
      init = _torch_linear_init(fan_in)
      return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=init, bias_init=init, name=name)

    def norm(name):
      return nn.LayerNorm(self.layer_norm_eps, dtype=jnp.float32, param_dtype=self.param_dtype,
                          name=name)

    h = norm('norm1')(x).astype(self.dtype)
    qkv = dense(3 * dim, dim, 'qkv', use_bias=False)(h).reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attn = cpu_kernels.dot_product_attention(
        q, k, v, implementation=attention_implementation(q.dtype, head_dim, n, n))
    x = x + dense(dim, dim, 'proj')(attn.reshape(b, n, dim))
    h = norm('norm2')(x).astype(self.dtype)
    h = dense(dim, hidden, 'fc2')(gelu_exact(dense(hidden, dim, 'fc1')(h)))
    return x + h


class ViTDiscriminatorHead(nn.Module):
  """One level: ``[space-to-depth + SN-Linear(4C -> C/2) -> LeakyReLU(0.2) -> token BlurPool
  (-> attention block unless last)] * num_downsamples -> SN-Linear(C -> 1)``.

  Input (B, h, w, C) token grid; returns float32 logits (B, h / 2^n, w / 2^n).
  """
  num_downsamples: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, update_spectral: bool) -> jax.Array:
    x = x.astype(self.dtype)
    for k in range(self.num_downsamples):
      dim = x.shape[-1] // 2
      x = space_to_depth(x)
      x = SpectralNormDense(dim, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=f'down_{k}')(x, update_spectral)
      x = nn.leaky_relu(x, 0.2)
      x = token_blur_pool(x)
      if k != self.num_downsamples - 1:
        b, h, w, c = x.shape
        block = HeadAttentionBlock(attention_heads(c), dtype=self.dtype,
                                   param_dtype=self.param_dtype, name=f'block_{k}')
        x = block(x.reshape(b, h * w, c)).reshape(b, h, w, c)
    x = SpectralNormDense(1, dtype=self.dtype, param_dtype=self.param_dtype,
                          name='out')(x, update_spectral)
    return x[..., 0].astype(jnp.float32)


class ViTDiscriminatorHeads(nn.Module):
  """TUDSR's trainable multi-level heads (Eq. 4; logits, the sigmoid is in the BCE loss).

  ``channels``: the backbone width (768 for ViT-B); ``levels``: 1-indexed blocks whose outputs feed
  one head each; ``resolution`` picks ``num_downsamples`` from :data:`HEAD_DOWNSAMPLES` unless given;
  ``patch_size`` only sizes :meth:`dummy_inputs`.
  ``apply(vars, features, update_spectral, mutable=['spectral'] if training)``, features a list of
  (B, h, w, channels) grids (see :func:`vit_features`).
  """
  channels: int = 768
  levels: Sequence[int] = LEVELS
  resolution: int = 512
  patch_size: int = 16
  num_downsamples: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _downsamples(self) -> int:
    n = head_downsamples(self.resolution) if self.num_downsamples is None else self.num_downsamples
    if n < 1:
      raise ValueError(f'num_downsamples must be >= 1, got {n}')
    return n

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], update_spectral: bool = False) -> list[jax.Array]:
    n = self._downsamples()
    if len(features) != len(self.levels):
      raise ValueError(f'expected {len(self.levels)} feature grids, got {len(features)}')
    logits = []
    for i, feat in enumerate(features):
      if feat.ndim != 4 or feat.shape[-1] != self.channels:
        raise ValueError(f'level {self.levels[i]}: expected (B, h, w, {self.channels}), '
                         f'got {feat.shape}')
      if feat.shape[1] % 2 ** n or feat.shape[2] % 2 ** n:
        raise ValueError(f'level {self.levels[i]}: a {feat.shape[1]}x{feat.shape[2]} token grid '
                         f'is not divisible by 2^{n}')
      head = ViTDiscriminatorHead(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                  name=f'decoders_{i}')
      logits.append(head(feat, update_spectral))
    return logits

  def dummy_inputs(self) -> list[jax.Array]:
    """Token grids of a ``resolution``-sized image for ``init`` (use ``jax.eval_shape`` / ``jax.jit``
    for init at full size)."""
    side = self.resolution // self.patch_size
    return [jnp.zeros((1, side, side, self.channels), self.dtype) for _ in self.levels]


# ------------------------------------------------------------------------------- full D call


def vit_features(dino: nn.Module, dino_params: Any, images: jax.Array,
                 levels: Sequence[int] = LEVELS) -> list[jax.Array]:
  """Frozen DINOv3-ViT features of ``levels`` as NHWC token grids.

  ``images``: NHWC in [-1, 1] (mapped by :func:`imagenet_normalize`). Runs the backbone up to block
  ``max(levels)``, applies its final LayerNorm to each selected hidden state, drops the
  ``dino.num_prefix_tokens`` prefix tokens and returns [(B, H // p, W // p, C)] per level.
  ``dino_params`` are wrapped in ``stop_gradient`` (gradients still reach ``images``).
  """
  if not levels or min(levels) < 1:
    raise ValueError(f'levels are 1-indexed block numbers, got {levels}')
  params = {'params': jax.lax.stop_gradient(dino_params)}
  hidden = dino.apply(params, imagenet_normalize(images), num_layers=max(levels))
  b, height, width, _ = images.shape
  h, w = height // dino.patch_size, width // dino.patch_size
  prefix = dino.num_prefix_tokens
  grids = []
  for level in levels:
    tokens = hidden[level]
    if tokens.shape[1] != prefix + h * w:
      raise ValueError(f'level {level}: {tokens.shape[1]} tokens, expected {prefix} + {h}*{w}')
    tokens = dino.apply(params, tokens[:, prefix:], method='final_norm')
    grids.append(tokens.reshape(b, h, w, tokens.shape[-1]))
  return grids


def vit_discriminator_logits(dino: nn.Module, dino_params: Any, heads: ViTDiscriminatorHeads,
                             head_vars: Any, images: jax.Array, rng: jax.Array | None,
                             train: bool) -> tuple[list[jax.Array], Any]:
  """One TUDSR discriminator call: DiffAugment -> ImageNet norm -> frozen DINOv3-ViT -> heads.

  Args:
    dino: the DINOv3-ViT backbone; ``dino_params`` its frozen params (no gradient reaches them).
    heads, head_vars: the heads and their variables ``{'params': ..., 'spectral': ...}``.
    images: NHWC in [-1, 1] (``stop_gradient(x)`` for the fake pass).
    rng: DiffAugment key (fresh per call); None skips augmentation.
    train: one spectral-norm power iteration per SN layer, updated state returned; False uses the
      stored u, v unchanged.

  Returns:
    (per-level logits [(B, h', w')] * len(heads.levels), the ``'spectral'`` collection for the next
    call).
  """
  x = images if rng is None else diff_augment(images, rng)
  features = vit_features(dino, dino_params, x, heads.levels)
  if train:
    logits, updates = heads.apply(head_vars, features, True, mutable=['spectral'])
    return logits, updates['spectral']
  return heads.apply(head_vars, features, False), head_vars['spectral']
