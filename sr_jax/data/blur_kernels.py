"""Blur kernels of the Real-ESRGAN degradation model (Wang et al. 2021, Sec. 3.1).

Every kernel is a closed-form function of its parameters on an odd K x K grid centred at zero, normalised
to sum 1 and returned as float64 (so it can be compared with the basicsr 1.4.2 numpy functions to 1e-6).
The `random_*` functions draw parameters from a `numpy.random.Generator` passed in explicitly: no global
random state is read, so a record's degradation depends only on the generator it is given.

Conventions shared with basicsr: the grid axis is x = column offset, y = row offset; the covariance of an
anisotropic kernel is R(theta) diag(sx^2, sy^2) R(theta)^T; a shape parameter beta is drawn 50/50 from
[beta_lo, 1] or [1, beta_hi] (so beta = 1, the Gaussian, sits at the median).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import special

KERNEL_TYPES = ('iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso')


def mesh_grid(kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (xx, yy): column and row offsets from the centre of an odd K x K grid."""
  if kernel_size % 2 != 1:
    raise ValueError(f'kernel size must be odd, got {kernel_size}')
  axis = np.arange(kernel_size, dtype=np.float64) - (kernel_size - 1) / 2
  xx, yy = np.meshgrid(axis, axis)
  return xx, yy


def covariance(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
  """Rotated 2x2 covariance R(theta) diag(sigma_x^2, sigma_y^2) R(theta)^T."""
  cos, sin = math.cos(theta), math.sin(theta)
  rotation = np.array([[cos, -sin], [sin, cos]])
  return rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T


def _mahalanobis_sq(kernel_size: int, sigma_x: float, sigma_y: float | None, theta: float) -> np.ndarray:
  """Quadratic form q = p^T Sigma^-1 p at every grid point p = (x, y); isotropic when sigma_y is None."""
  xx, yy = mesh_grid(kernel_size)
  if sigma_y is None:
    return (xx**2 + yy**2) / sigma_x**2
  inv = np.linalg.inv(covariance(sigma_x, sigma_y, theta))
  return inv[0, 0] * xx**2 + (inv[0, 1] + inv[1, 0]) * xx * yy + inv[1, 1] * yy**2


def _normalise(kernel: np.ndarray) -> np.ndarray:
  return kernel / np.sum(kernel)


def gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float | None = None,
                    theta: float = 0.0) -> np.ndarray:
  """Bivariate Gaussian exp(-q/2), q = p^T Sigma^-1 p; isotropic (sigma_x only) when sigma_y is None."""
  return _normalise(np.exp(-0.5 * _mahalanobis_sq(kernel_size, sigma_x, sigma_y, theta)))


def generalized_gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float | None = None,
                                theta: float = 0.0, beta: float = 1.0) -> np.ndarray:
  """Generalised Gaussian exp(-0.5 q^beta) as in Real-ESRGAN (Pascal et al. 2013); beta = 1 is the Gaussian."""
  return _normalise(np.exp(-0.5 * np.power(_mahalanobis_sq(kernel_size, sigma_x, sigma_y, theta), beta)))


def plateau_kernel(kernel_size: int, sigma_x: float, sigma_y: float | None = None,
                   theta: float = 0.0, beta: float = 1.0) -> np.ndarray:
  """Plateau-shaped kernel 1 / (1 + q^beta) (flat top, heavy tail) as in Real-ESRGAN."""
  return _normalise(1.0 / (np.power(_mahalanobis_sq(kernel_size, sigma_x, sigma_y, theta), beta) + 1.0))


def sinc_kernel(cutoff: float, kernel_size: int, pad_to: int = 0) -> np.ndarray:
  """2-D circularly symmetric ideal low-pass (sinc) kernel, truncated to K x K and renormalised.

  h(r) = cutoff J1(cutoff r) / (2 pi r), the inverse Fourier transform of the disc |w| <= cutoff
  (cutoff in radians per pixel, pi = Nyquist); h(0) = cutoff^2 / (4 pi) is its limit at r = 0.
  `pad_to` (odd, larger than kernel_size) zero-pads the result to that size.
  """
  xx, yy = mesh_grid(kernel_size)
  radius = np.sqrt(xx**2 + yy**2)
  with np.errstate(divide='ignore', invalid='ignore'):
    kernel = cutoff * special.j1(cutoff * radius) / (2 * np.pi * radius)
  centre = (kernel_size - 1) // 2
  kernel[centre, centre] = cutoff**2 / (4 * np.pi)
  kernel = _normalise(kernel)
  if pad_to > kernel_size:
    pad = (pad_to - kernel_size) // 2
    kernel = np.pad(kernel, pad)
  return kernel


def _draw_beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
  """Shape parameter: 50/50 from [lo, 1] or [1, hi] (Real-ESRGAN's draw; assumes lo <= 1 <= hi)."""
  if rng.random() < 0.5:
    return float(rng.uniform(beta_range[0], 1.0))
  return float(rng.uniform(1.0, beta_range[1]))


def draw_choice(rng: np.random.Generator, probs: Sequence[float]) -> int:
  """Index drawn with the given (not necessarily normalised) probabilities, from one uniform draw."""
  cumulative = np.cumsum(np.asarray(probs, dtype=np.float64))
  return int(min(np.searchsorted(cumulative / cumulative[-1], rng.random(), side='right'), len(probs) - 1))


def random_mixed_kernel(rng: np.random.Generator, kernel_size: int,
                        kernel_types: Sequence[str] = KERNEL_TYPES,
                        kernel_probs: Sequence[float] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03),
                        sigma_range: Sequence[float] = (0.2, 3.0),
                        betag_range: Sequence[float] = (0.5, 4.0),
                        betap_range: Sequence[float] = (1.0, 2.0),
                        rotation_range: Sequence[float] = (-math.pi, math.pi)) -> np.ndarray:
  """Real-ESRGAN's mixed-kernel draw (basicsr `random_mixed_kernels`, no multiplicative kernel noise).

  Picks a type with `kernel_probs`; sigma_x ~ U(sigma_range); anisotropic types also draw
  sigma_y ~ U(sigma_range) and theta ~ U(rotation_range); generalised / plateau types draw beta from
  `betag_range` / `betap_range` with `_draw_beta`.
  """
  kernel_type = kernel_types[draw_choice(rng, kernel_probs)]
  sigma_x = float(rng.uniform(*sigma_range))
  sigma_y, theta = None, 0.0
  if kernel_type.endswith('aniso'):
    sigma_y = float(rng.uniform(*sigma_range))
    theta = float(rng.uniform(*rotation_range))
  if kernel_type in ('iso', 'aniso'):
    return gaussian_kernel(kernel_size, sigma_x, sigma_y, theta)
  if kernel_type.startswith('generalized'):
    return generalized_gaussian_kernel(kernel_size, sigma_x, sigma_y, theta, _draw_beta(rng, betag_range))
  if kernel_type.startswith('plateau'):
    return plateau_kernel(kernel_size, sigma_x, sigma_y, theta, _draw_beta(rng, betap_range))
  raise ValueError(f'unknown kernel type {kernel_type!r}; known: {KERNEL_TYPES}')


def random_stage_kernel(rng: np.random.Generator, kernel_sizes: Sequence[int], sinc_size_split: int,
                        sinc_prob: float, kernel_types: Sequence[str], kernel_probs: Sequence[float],
                        sigma_range: Sequence[float], betag_range: Sequence[float],
                        betap_range: Sequence[float]) -> np.ndarray:
  """Blur kernel of one degradation stage (Real-ESRGAN `random_kernels`, first and second kernel).

  Size ~ U(kernel_sizes); with probability `sinc_prob` a sinc kernel with cutoff ~ U[pi/3, pi] when the
  size is below `sinc_size_split`, else U[pi/5, pi] (wider kernels may cut lower); otherwise a mixed kernel.
  """
  kernel_size = int(kernel_sizes[int(rng.integers(len(kernel_sizes)))])
  if rng.random() < sinc_prob:
    low = math.pi / 3 if kernel_size < sinc_size_split else math.pi / 5
    return sinc_kernel(float(rng.uniform(low, math.pi)), kernel_size)
  return random_mixed_kernel(rng, kernel_size, kernel_types, kernel_probs, sigma_range, betag_range,
                             betap_range)


def random_final_sinc_kernel(rng: np.random.Generator, kernel_sizes: Sequence[int], sinc_prob: float,
                             cutoff_range: Sequence[float]) -> np.ndarray | None:
  """Final-stage sinc kernel with probability `sinc_prob`, else None (the identity 'pulse' kernel)."""
  if rng.random() >= sinc_prob:
    return None
  kernel_size = int(kernel_sizes[int(rng.integers(len(kernel_sizes)))])
  return sinc_kernel(float(rng.uniform(*cutoff_range)), kernel_size)
