"""Blur kernels: closed-form definitions, basicsr 1.4.2 parity (when installed), the random draws."""
import math

import numpy as np
import pytest
from scipy import integrate, special, stats

from sr_jax.data import basicsr_reference
from sr_jax.data import degradations
from sr_jax.data import blur_kernels

PARAMS = [(7, 0.5, 2.0, 0.3), (13, 1.2, 0.7, -2.5), (21, 3.0, 0.2, 1.1), (41, 2.2, 2.9, 3.0)]


def _grid(size):
  c = (size - 1) / 2
  y, x = np.mgrid[0:size, 0:size]
  return x - c, y - c


@pytest.mark.parametrize('size,sx,sy,theta', PARAMS)
def test_gaussian_kernels_match_closed_form(size, sx, sy, theta):
  x, y = _grid(size)
  iso = np.exp(-(x**2 + y**2) / (2 * sx**2))
  np.testing.assert_allclose(blur_kernels.gaussian_kernel(size, sx), iso / iso.sum(), rtol=0, atol=1e-12)
  cov = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
  cov = cov @ np.diag([sx**2, sy**2]) @ cov.T
  pdf = stats.multivariate_normal([0, 0], cov).pdf(np.stack([x, y], -1))
  np.testing.assert_allclose(blur_kernels.gaussian_kernel(size, sx, sy, theta), pdf / pdf.sum(), rtol=0, atol=1e-12)


@pytest.mark.parametrize('size,sx,sy,theta', PARAMS)
@pytest.mark.parametrize('beta', [0.5, 1.0, 2.7])
def test_generalized_and_plateau_match_closed_form(size, sx, sy, theta, beta):
  x, y = _grid(size)
  q = (x**2 + y**2) / sx**2
  generalized = np.exp(-0.5 * q**beta)
  plateau = 1 / (1 + q**beta)
  np.testing.assert_allclose(blur_kernels.generalized_gaussian_kernel(size, sx, beta=beta),
                             generalized / generalized.sum(), rtol=0, atol=1e-12)
  np.testing.assert_allclose(blur_kernels.plateau_kernel(size, sx, beta=beta), plateau / plateau.sum(), rtol=0,
                             atol=1e-12)
  if beta == 1.0:  # the generalised Gaussian with beta = 1 is the Gaussian
    np.testing.assert_allclose(blur_kernels.generalized_gaussian_kernel(size, sx, sy, theta, 1.0),
                               blur_kernels.gaussian_kernel(size, sx, sy, theta), rtol=0, atol=1e-14)


@pytest.mark.parametrize('cutoff', [math.pi / 5, 1.3, math.pi])
def test_sinc_kernel_is_inverse_fourier_transform_of_disc(cutoff):
  # h(r) = 1/(2 pi) int_0^w k J0(k r) dk, the inverse 2-D FT of the disc of radius w, before truncation.
  size = 9
  raw = np.zeros((size, size))
  x, y = _grid(size)
  for (i, j), r in np.ndenumerate(np.hypot(x, y)):
    raw[i, j] = integrate.quad(lambda k, r=r: k * special.j0(k * r), 0, cutoff)[0] / (2 * np.pi)
  np.testing.assert_allclose(blur_kernels.sinc_kernel(cutoff, size), raw / raw.sum(), rtol=0, atol=1e-9)
  padded = blur_kernels.sinc_kernel(cutoff, size, pad_to=21)
  assert padded.shape == (21, 21) and padded[6:15, 6:15].sum() == pytest.approx(1.0)


def test_every_kernel_sums_to_one_and_is_symmetric():
  rng = np.random.default_rng(0)
  config = degradations.preset('omgsr_1024')
  for _ in range(200):
    for stage in (config.stage1, config.stage2):
      k = blur_kernels.random_stage_kernel(rng, config.kernel_sizes, config.sinc_size_split, 0.3,
                                      config.kernel_types, stage.kernel_probs, stage.blur_sigma,
                                      stage.betag_range, stage.betap_range)
      assert k.shape[0] == k.shape[1] and k.shape[0] in config.kernel_sizes
      assert abs(k.sum() - 1.0) < 1e-12
      np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)  # point-symmetric: correlation == conv


def test_mixed_kernel_type_frequencies_follow_probabilities():
  rng = np.random.default_rng(1)
  probs = np.array([0.45, 0.25, 0.12, 0.03, 0.12, 0.03])
  draws = np.array([blur_kernels.draw_choice(rng, probs) for _ in range(20000)])
  observed = np.bincount(draws, minlength=6)
  assert stats.chisquare(observed, probs * len(draws)).pvalue > 1e-3


def test_random_mixed_kernel_uses_only_the_generator():
  a = blur_kernels.random_mixed_kernel(np.random.default_rng(5), 21)
  np.random.seed(0)
  b = blur_kernels.random_mixed_kernel(np.random.default_rng(5), 21)
  np.testing.assert_array_equal(a, b)


def _reference():
  ref = basicsr_reference.load()
  if ref is None:
    pytest.skip(basicsr_reference.reason())
  return ref.degradations


@pytest.mark.parametrize('size,sx,sy,theta', PARAMS)
def test_kernels_match_basicsr(size, sx, sy, theta):
  ref = _reference()
  ours_vs_ref = [
      (blur_kernels.gaussian_kernel(size, sx), ref.bivariate_Gaussian(size, sx, sy, theta, isotropic=True)),
      (blur_kernels.gaussian_kernel(size, sx, sy, theta), ref.bivariate_Gaussian(size, sx, sy, theta, isotropic=False)),
      (blur_kernels.sinc_kernel(min(sx, math.pi), size, pad_to=41),
       ref.circular_lowpass_kernel(min(sx, math.pi), size, 41)),
  ]
  for beta in (0.5, 1.6, 4.0):
    ours_vs_ref += [
        (blur_kernels.generalized_gaussian_kernel(size, sx, None, 0, beta),
         ref.bivariate_generalized_Gaussian(size, sx, sy, theta, beta, isotropic=True)),
        (blur_kernels.generalized_gaussian_kernel(size, sx, sy, theta, beta),
         ref.bivariate_generalized_Gaussian(size, sx, sy, theta, beta, isotropic=False)),
        (blur_kernels.plateau_kernel(size, sx, None, 0, beta), ref.bivariate_plateau(size, sx, sy, theta, beta, isotropic=True)),
        (blur_kernels.plateau_kernel(size, sx, sy, theta, beta),
         ref.bivariate_plateau(size, sx, sy, theta, beta, isotropic=False)),
    ]
  for ours, theirs in ours_vs_ref:
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    assert abs(theirs.sum() - 1) < 1e-9


def test_mixed_kernel_distribution_matches_basicsr():
  """Same type mix and parameter ranges: compare the kernels' centre weights by a two-sample KS test."""
  ref = _reference()
  import random  # pylint: disable=g-import-not-at-top
  random.seed(0)
  np.random.seed(0)
  rng = np.random.default_rng(0)
  args = (blur_kernels.KERNEL_TYPES, [0.45, 0.25, 0.12, 0.03, 0.12, 0.03], 21)
  theirs = [ref.random_mixed_kernels(*args, (0.2, 3), (0.2, 3), (-math.pi, math.pi), (0.5, 4), (1, 2),
                                     noise_range=None)[10, 10] for _ in range(1500)]
  ours = [blur_kernels.random_mixed_kernel(rng, 21, *args[:2], (0.2, 3), (0.5, 4), (1, 2))[10, 10] for _ in range(1500)]
  assert stats.ks_2samp(ours, theirs).pvalue > 1e-3
