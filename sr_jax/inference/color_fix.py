"""Colour correction of SR outputs towards the (bicubic-upscaled) input: AdaIN and wavelet.

Both come from StableSR and are used unchanged by OSEDiff, OMGSR and SMFSR (``wavelet_color_fix.py``).
The diffusion output keeps its details but can drift in colour; both fixes take the colour from the
upscaled LQ image:

* **AdaIN** (OMGSR's default): per image and channel, the output is normalised and given the input's
  mean and standard deviation, ``std = sqrt(unbiased variance + 1e-5)``.
* **wavelet**: a 5-level a-trous decomposition with the 3x3 kernel ``[1, 2, 1] x [1, 2, 1] / 16``
  dilated by ``2^i`` at level i, replicate padding; the output keeps its high frequencies (the sum of
  the 5 detail layers) and takes the input's residual low frequency.

Images are float arrays (..., H, W, C), values in [0, 1] as the reference (which applies the fix to the
8-bit output and 8-bit upscaled input, then clamps to [0, 1]). Work in jnp, so they run on device and
under jit; numpy inputs are accepted.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5
COLOR_FIXES = ('adain', 'wavelet', 'none')
# The a-trous kernel: outer([1, 2, 1], [1, 2, 1]) / 16.
_KERNEL_1D = (0.25, 0.5, 0.25)


def channel_mean_std(image: jax.Array, eps: float = ADAIN_EPS) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and ``sqrt(unbiased var + eps)`` over the spatial axes (StableSR's
  ``calc_mean_std``); shapes (..., 1, 1, C)."""
  image = jnp.asarray(image, jnp.float32)
  mean = jnp.mean(image, axis=(-3, -2), keepdims=True)
  var = jnp.var(image, axis=(-3, -2), keepdims=True, ddof=1)
  return mean, jnp.sqrt(var + eps)


def adain_color_fix(target: jax.Array, source: jax.Array, eps: float = ADAIN_EPS) -> jax.Array:
  """AdaIN: ``(target - mu_t) / sigma_t * sigma_s + mu_s`` per channel (not clamped)."""
  target = jnp.asarray(target, jnp.float32)
  t_mean, t_std = channel_mean_std(target, eps)
  s_mean, s_std = channel_mean_std(source, eps)
  return (target - t_mean) / t_std * s_std + s_mean


def wavelet_blur(image: jax.Array, dilation: int) -> jax.Array:
  """One a-trous level: the 3x3 [1,2,1]x[1,2,1]/16 kernel with holes of ``dilation``, replicate pad."""
  d = dilation
  pad = [(0, 0)] * (image.ndim - 3) + [(d, d), (d, d), (0, 0)]
  padded = jnp.pad(image, pad, mode='edge')
  h, w = image.shape[-3], image.shape[-2]
  out = jnp.zeros_like(image)
  for i, ky in enumerate(_KERNEL_1D):
    for j, kx in enumerate(_KERNEL_1D):
      out = out + (ky * kx) * padded[..., i * d:i * d + h, j * d:j * d + w, :]
  return out


def wavelet_decomposition(image: jax.Array, levels: int = WAVELET_LEVELS
                          ) -> tuple[jax.Array, jax.Array]:
  """(high, low): ``high = sum_i (low_i - low_{i+1})`` over ``levels`` levels, ``low`` the residual
  after the last blur; ``high + low == image`` up to rounding."""
  low = jnp.asarray(image, jnp.float32)
  high = jnp.zeros_like(low)
  for i in range(levels):
    blurred = wavelet_blur(low, 2 ** i)
    high = high + (low - blurred)
    low = blurred
  return high, low


def wavelet_color_fix(target: jax.Array, source: jax.Array,
                      levels: int = WAVELET_LEVELS) -> jax.Array:
  """Wavelet colour fix: the target's high frequencies plus the source's low frequency (not clamped)."""
  high, _ = wavelet_decomposition(target, levels)
  _, low = wavelet_decomposition(source, levels)
  return high + low


@jax.jit
def _adain_clipped(target, source):
  return jnp.clip(adain_color_fix(target, source), 0.0, 1.0)


@jax.jit
def _wavelet_clipped(target, source):
  return jnp.clip(wavelet_color_fix(target, source), 0.0, 1.0)


def apply_color_fix(method: str, target: jax.Array, source: jax.Array) -> jax.Array:
  """``method`` in :data:`COLOR_FIXES` of ``target`` towards ``source`` (same shape), clamped to
  [0, 1] as the reference. ``'none'`` returns ``target`` unchanged."""
  if method == 'none':
    return jnp.asarray(target, jnp.float32)
  if method == 'adain':
    return _adain_clipped(target, source)
  if method == 'wavelet':
    return _wavelet_clipped(target, source)
  raise ValueError(f'unknown colour fix {method!r}; choose one of {COLOR_FIXES}')
