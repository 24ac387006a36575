"""OMGSR multi-level discriminator: frozen DINOv3-ConvNeXt + trainable per-level heads (Sec. 3.6).

OMGSR HEAD ``dinov3_gan/dinov3_convnext_disc.py``, which we follow:

* Every D call (real, fake and the generator pass) first applies DiffAugment
  'color,translation,cutout' in [-1, 1] space, then :func:`imagenet_normalize` (no resize), then the
  first 3 stages of the frozen backbone (stage i = downsample i + blocks i, no extra norm).
* One head per stage output, repeated ``[BlurPool([1,3,3,1] outer, stride 2, zero pad 1) ->
  spectral-norm Conv3x3 (stride s, pad 1, out = int(ratio * in)) -> LeakyReLU(0.2)]``, then
  ``BlurPool -> spectral-norm Conv1x1 -> 1 channel``; no normalisation layers. Ratio / stride tables
  for 512 and 1024 are :data:`HEAD_CONFIGS`; every level ends at a 1x1 logit map at those sizes.
* The paper's Eq. 9 sigmoid is inside the BCE loss (``sr_jax/losses/gan.py``); heads return logits.

Spectral normalisation mirrors ``torch.nn.utils.spectral_norm`` (one power iteration per call, eps
1e-12, weight viewed as (out, in * kh * kw)). The power-iteration vectors ``u`` (out,) and ``v``
(in * kh * kw,) live in the ``'spectral'`` variable collection, initialised to normalised Gaussians:

* training mode (``update_spectral=True``): ``v = normalize(W^T u)``, ``u = normalize(W v)``,
  ``sigma = u . W v``; the new u, v are returned as the updated ``'spectral'`` collection (apply with
  ``mutable=['spectral']``) and must be passed back on the next call - exactly torch's in-place update.
  u and v are constants for autodiff (torch computes them under ``no_grad``).
* eval mode (``update_spectral=False``): no iteration; ``sigma = u . W v`` with the stored u, v
  (torch's eval path).

The reference calls D in train mode for all three passes per step, so u, v advance three times per
step; the caller threads the state through the G pass, the fake pass and the real pass.

Param names: no PyTorch checkpoint of these heads exists (they are trained from scratch and OMGSR
saves only the LoRA adapters), so the names are ours: ``decoders_<level>/conv_<k>`` and ``conv_out``.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.models.dinov3 import imagenet_normalize

# (channel ratios, strides) per level, from MultiLevelConvNeXtDiscHead._get_configs (HEAD).
HEAD_CONFIGS = {
    512: (((0.5, 1.0, 1.0), (2, 2, 2)),
          ((0.5, 0.5, 1.0), (1, 2, 2)),
          ((0.5, 0.5, 0.5), (1, 1, 2))),
    1024: (((0.5, 1.0, 1.0, 1.0), (1, 2, 2, 2)),
           ((0.5, 0.5, 1.0, 1.0), (1, 1, 2, 2)),
           ((0.5, 0.5, 0.5, 1.0), (1, 1, 1, 2))),
    # Ours, for tiny test runs on 64 px crops (features 16/8/4 px): also ends at 1x1 per level.
    64: (((0.5, 1.0), (2, 1)),
         ((0.5, 1.0), (1, 1)),
         ((0.5,), (1,))),
}
NUM_LEVELS = 3
DIFFAUGMENT_POLICY = ('color', 'translation', 'cutout')
_SN_EPS = 1e-12


def head_config(resolution: int) -> tuple:
  """The (ratios, strides) per level for ``resolution`` (the reference uses the 512 table for every
  resolution other than 1024; we accept only the sizes of :data:`HEAD_CONFIGS`)."""
  if resolution not in HEAD_CONFIGS:
    raise ValueError(f'discriminator heads are defined for resolutions {sorted(HEAD_CONFIGS)}, '
                     f'got {resolution}')
  return HEAD_CONFIGS[resolution]


def blur_pool(x: jax.Array, stride: int = 2) -> jax.Array:
  """BlurPool (antialiased-cnns, filt_size 4, ``pad_type='zero'``): depthwise conv with
  ``[1,3,3,1] outer [1,3,3,1] / 64``, zero pad 1 on every side, stride 2. NHWC."""
  a = np.array([1.0, 3.0, 3.0, 1.0])
  filt = a[:, None] * a[None, :]
  filt = jnp.asarray(filt / filt.sum(), x.dtype)
  channels = x.shape[-1]
  kernel = jnp.tile(filt[:, :, None, None], (1, 1, 1, channels))
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=channels)


def _l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x), _SN_EPS)


def spectral_sigma(weight_matrix: jax.Array, u: jax.Array, v: jax.Array,
                   power_iteration: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """torch ``spectral_norm`` estimate of the top singular value of ``weight_matrix`` (out, fan_in).

  Returns ``(sigma, u, v)``; with ``power_iteration`` one step updates v then u first. u and v are
  returned with ``stop_gradient`` so sigma is differentiated through W only (as in torch).
  """
  if power_iteration:
    w = jax.lax.stop_gradient(weight_matrix)
    v = _l2_normalize(w.T @ u)
    u = _l2_normalize(w @ v)
  u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
  return u @ (weight_matrix @ v), u, v


class SpectralNormConv(nn.Module):
  """``spectral_norm(nn.Conv2d(in, features, k, stride, padding))`` in NHWC with explicit u/v state."""
  features: int
  kernel_size: int
  strides: int = 1
  padding: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, update_spectral: bool) -> jax.Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    fan_in = in_features * k * k
    # torch Conv2d default init (kaiming_uniform a=sqrt(5) -> U(+-1/sqrt(fan_in)) for weight and bias).
    bound = 1.0 / np.sqrt(fan_in)
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    kernel = self.param('kernel', uniform, (k, k, in_features, self.features), self.param_dtype)
    bias = self.param('bias', uniform, (self.features,), self.param_dtype)
    u_var = self.variable('spectral', 'u', lambda: _l2_normalize(
        jax.random.normal(self.make_rng('params'), (self.features,), jnp.float32)))
    v_var = self.variable('spectral', 'v', lambda: _l2_normalize(
        jax.random.normal(self.make_rng('params'), (fan_in,), jnp.float32)))
    # torch's weight (out, in, kh, kw) flattened row-wise, so u/v match torch's weight_u/weight_v.
    matrix = jnp.transpose(kernel.astype(jnp.float32), (3, 2, 0, 1)).reshape(self.features, fan_in)
    sigma, u, v = spectral_sigma(matrix, u_var.value, v_var.value, update_spectral)
    if update_spectral and not self.is_initializing():
      u_var.value, v_var.value = u, v
    normalized = (kernel.astype(jnp.float32) / sigma).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), normalized, window_strides=(self.strides, self.strides),
        padding=((self.padding, self.padding), (self.padding, self.padding)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias.astype(self.dtype)


class DiscriminatorHead(nn.Module):
  """One level: ``[BlurPool -> SN-Conv3x3(stride s) -> LeakyReLU(0.2)] * n -> BlurPool -> SN-Conv1x1``.

  Returns logits of shape (B, h, w) (the channel axis of size 1 squeezed, as the reference does).
  """
  ratios: Sequence[float]
  strides: Sequence[int]
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, update_spectral: bool) -> jax.Array:
    channels = x.shape[-1]
    x = x.astype(self.dtype)
    for k, (ratio, stride) in enumerate(zip(self.ratios, self.strides)):
      channels = int(channels * ratio)
      x = blur_pool(x)
      x = SpectralNormConv(channels, 3, stride, 1, dtype=self.dtype, param_dtype=self.param_dtype,
                           name=f'conv_{k}')(x, update_spectral)
      x = nn.leaky_relu(x, 0.2)
    x = blur_pool(x)
    x = SpectralNormConv(1, 1, dtype=self.dtype, param_dtype=self.param_dtype,
                         name='conv_out')(x, update_spectral)
    return x[..., 0].astype(jnp.float32)


class DiscriminatorHeads(nn.Module):
  """The trainable multi-level heads (OMGSR Eq. 9 without the sigmoid).

  ``channels`` are the backbone's first three hidden sizes ((192, 384, 768) for ConvNeXt-Large).
  ``level_configs`` overrides the (ratios, strides) table of ``resolution`` (e.g. small test heads).
  ``apply(vars, features, update_spectral, mutable=['spectral'] if training)``.
  """
  channels: Sequence[int] = (192, 384, 768)
  resolution: int = 512
  level_configs: Sequence[tuple[Sequence[float], Sequence[int]]] | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], update_spectral: bool = False) -> list[jax.Array]:
    configs = self.level_configs or head_config(self.resolution)
    if len(features) != len(self.channels):
      raise ValueError(f'expected {len(self.channels)} feature maps, got {len(features)}')
    logits = []
    for level, (feat, (ratios, strides)) in enumerate(zip(features, configs)):
      if feat.shape[-1] != self.channels[level]:
        raise ValueError(f'level {level}: expected {self.channels[level]} channels, got {feat.shape}')
      head = DiscriminatorHead(ratios, strides, dtype=self.dtype, param_dtype=self.param_dtype,
                               name=f'decoders_{level}')
      logits.append(head(feat, update_spectral))
    return logits

  def dummy_inputs(self) -> list[jax.Array]:
    """Feature maps of a ``resolution``-sized image (strides 4, 8, 16) for ``init``; use
    ``jax.eval_shape`` / ``jax.jit`` for init at full size."""
    sizes = [self.resolution // 4, self.resolution // 8, self.resolution // 16]
    return [jnp.zeros((1, s, s, c), self.dtype) for s, c in zip(sizes, self.channels)]


# ------------------------------------------------------------------------------------ DiffAugment


def _uniform_int(u: jax.Array, low: int, high: int) -> jax.Array:
  """Maps U[0, 1) draws to integers uniform in [low, high) (clipped against float rounding)."""
  return jnp.clip(low + jnp.floor(u * (high - low)).astype(jnp.int32), low, high - 1)


def _draw_augment_params(rng: jax.Array, batch: int, height: int, width: int) -> dict:
  """Per-sample random draws of DiffAugment (same distributions as the reference torch code).

  A single ``uniform`` draw feeds all seven parameters: each threefry call costs seconds of XLA
  compile time on CPU, and DiffAugment runs in every discriminator call.
  """
  u = jax.random.uniform(rng, (7, batch), jnp.float32)
  shift_h, shift_w = int(height * 0.125 + 0.5), int(width * 0.125 + 0.5)
  cut_h, cut_w = int(height * 0.5 + 0.5), int(width * 0.5 + 0.5)
  return dict(
      brightness=u[0] - 0.5,        # add [-0.5, 0.5)
      saturation=u[1] * 2.0,        # x [0, 2)
      contrast=u[2] + 0.5,          # x [0.5, 1.5)
      translate_h=_uniform_int(u[3], -shift_h, shift_h + 1),
      translate_w=_uniform_int(u[4], -shift_w, shift_w + 1),
      cutout_h=_uniform_int(u[5], 0, height + (1 - cut_h % 2)),
      cutout_w=_uniform_int(u[6], 0, width + (1 - cut_w % 2)),
  )


def _translate(x: jax.Array, shift_h: jax.Array, shift_w: jax.Array) -> jax.Array:
  """out[b, i, j] = x[b, i + shift_h, j + shift_w], zero outside (the reference's padded gather)."""
  _, height, width, _ = x.shape
  rows = jnp.arange(height)[None, :] + shift_h[:, None]            # (B, H)
  cols = jnp.arange(width)[None, :] + shift_w[:, None]             # (B, W)
  valid = (((rows >= 0) & (rows < height))[:, :, None]
           & ((cols >= 0) & (cols < width))[:, None, :])           # (B, H, W)
  rows, cols = jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1)
  gathered = jax.vmap(lambda img, r, c: img[r][:, c])(x, rows, cols)
  return jnp.where(valid[..., None], gathered, 0).astype(x.dtype)


def _cutout(x: jax.Array, center_h: jax.Array, center_w: jax.Array) -> jax.Array:
  """Zeroes a (H/2 x W/2) square whose top-left is ``center - size // 2`` (clipped to the image)."""
  _, height, width, _ = x.shape
  cut_h, cut_w = int(height * 0.5 + 0.5), int(width * 0.5 + 0.5)
  top, left = center_h - cut_h // 2, center_w - cut_w // 2
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= top[:, None]) & (rows < top[:, None] + cut_h)
  in_cols = (cols >= left[:, None]) & (cols < left[:, None] + cut_w)
  mask = 1.0 - (in_rows[:, :, None] & in_cols[:, None, :]).astype(x.dtype)
  return x * mask[..., None]


def diff_augment(images: jax.Array, rng: jax.Array,
                 policy: Sequence[str] = DIFFAUGMENT_POLICY) -> jax.Array:
  """DiffAugment (Zhao et al. 2020) 'color,translation,cutout' on NHWC images in [-1, 1].

  color: brightness ``x + U[-0.5, 0.5)``, saturation ``(x - mean_c) * U[0, 2) + mean_c``, contrast
  ``(x - mean_chw) * U[0.5, 1.5) + mean_chw``; translation by up to 1/8 of each side with zero fill;
  cutout of a half-size square. All draws are per sample; a pure, differentiable function of
  (images, rng): the same rng gives the same augmentation.
  """
  batch, height, width, _ = images.shape
  p = _draw_augment_params(rng, batch, height, width)
  x = images
  for name in policy:
    if name == 'color':
      x = x + p['brightness'][:, None, None, None].astype(x.dtype)
      mean = x.mean(axis=-1, keepdims=True)
      x = (x - mean) * p['saturation'][:, None, None, None].astype(x.dtype) + mean
      mean = x.mean(axis=(1, 2, 3), keepdims=True)
      x = (x - mean) * p['contrast'][:, None, None, None].astype(x.dtype) + mean
    elif name == 'translation':
      x = _translate(x, p['translate_h'], p['translate_w'])
    elif name == 'cutout':
      x = _cutout(x, p['cutout_h'], p['cutout_w'])
    else:
      raise ValueError(f'unknown DiffAugment policy {name!r}')
  return x


# ------------------------------------------------------------------------------- full D call


def discriminator_logits(dino: nn.Module, dino_params: Any, heads: DiscriminatorHeads,
                         head_vars: Any, images: jax.Array, rng: jax.Array | None,
                         train: bool) -> tuple[list[jax.Array], Any]:
  """One OMGSR discriminator call: DiffAugment -> ImageNet norm -> frozen DINOv3 stages 0-2 -> heads.

  Args:
    dino: the ``DINOv3ConvNextModel``; ``dino_params`` its frozen params (wrapped in
      ``stop_gradient``: no gradient ever reaches them; gradients do reach ``images``).
    heads, head_vars: the heads and their variables ``{'params': ..., 'spectral': ...}``.
    images: NHWC in [-1, 1] (pass ``stop_gradient(x_P)`` for the fake pass, Eq. 14).
    rng: DiffAugment key (a fresh one per call); None skips augmentation.
    train: one spectral-norm power iteration and the updated state returned (the reference runs D
      in train mode for every pass); False uses the stored u, v unchanged.

  Returns:
    (per-level logits [(B, h, w)] * 3, the ``'spectral'`` collection to use for the next call).
  """
  x = images if rng is None else diff_augment(images, rng)
  params = jax.lax.stop_gradient(dino_params)
  features = dino.apply({'params': params}, imagenet_normalize(x), num_stages=NUM_LEVELS)
  if train:
    logits, updates = heads.apply(head_vars, features, True, mutable=['spectral'])
    return logits, updates['spectral']
  return heads.apply(head_vars, features, False), head_vars['spectral']
