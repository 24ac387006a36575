"""LQ-vs-HQ PSNR of the presets on the bundled scikit-image colour photos (fixed seeds, so deterministic).

Measured (benchmarks/degradation_throughput.py and this test, 256^2 and 512^2 crops of the 7 colour photos):
omgsr_512 mean ~25 dB, 5-95 % range ~18.5-33 dB; osediff mean ~23 dB, 5-95 % ~17.5-29.5 dB. The band
asserted below, a mean in [21, 29] dB, brackets that: every LQ went through a x4 reduction, so on average
it cannot beat the plain x4 bicubic round trip of the same crop (~27-28 dB here), and the mild OMGSR
noise (sigma <= 15/255) and JPEG (q >= 60) keep it well above what a heavy degradation gives (< 20 dB).
"""
import numpy as np
import pytest

from sr_jax.data import basicsr_reference
from sr_jax.data import degradations
from sr_jax.data import sources

CROP = 256
DRAWS = 4


@pytest.fixture(scope='module')
def crops():
  rng = np.random.default_rng(0)
  photos = [sources.load_rgb('skimage:' + n) for n in sources.SKIMAGE_COLOR_PHOTOS]
  return [sources.random_crop(p, CROP, rng).astype(np.float32) / 255 for p in photos for _ in range(DRAWS)]


def _psnr(a, b):
  return float(10 * np.log10(1 / np.mean((a.astype(np.float64) - b) ** 2)))


def _scores(crops, degrade):
  return np.array([_psnr(degrade(hq, i), hq) for i, hq in enumerate(crops)])


def _report(name, scores):
  p5, p50, p95 = np.percentile(scores, [5, 50, 95])
  print(f'{name}: n={scores.size} mean {scores.mean():.2f} dB, p5 {p5:.2f}, median {p50:.2f}, p95 {p95:.2f}')


def test_omgsr_512_psnr_band_and_osediff_is_harsher(crops):
  omgsr = _scores(crops, lambda hq, i: degradations.degrade(hq, np.random.default_rng([0, i]),
                                                            degradations.preset('omgsr_512')))
  osediff = _scores(crops, lambda hq, i: degradations.degrade(hq, np.random.default_rng([0, i]),
                                                              degradations.preset('osediff')))
  bicubic = _scores(crops, lambda hq, i: degradations.quantize_8bit(degradations.resize(
      degradations.resize(hq, CROP // 4, CROP // 4, 'bicubic'), CROP, CROP, 'bicubic')))
  _report('omgsr_512', omgsr)
  _report('osediff', osediff)
  _report('x4 bicubic round trip', bicubic)
  assert 21.0 <= omgsr.mean() <= 29.0
  assert omgsr.mean() < bicubic.mean()
  assert np.percentile(omgsr, 5) > 14.0
  assert osediff.mean() < omgsr.mean() - 0.5


def test_psnr_distribution_matches_the_pytorch_reference(crops):
  ref = basicsr_reference.load()
  if ref is None:
    pytest.skip(basicsr_reference.reason())
  import random  # pylint: disable=g-import-not-at-top
  random.seed(0)
  np.random.seed(0)
  ref.torch.manual_seed(0)
  config = degradations.preset('omgsr_512')
  degrade_ref = basicsr_reference.make_reference_degrader(config, ref)
  small = [hq[::2, ::2] for hq in crops[::2]]  # 14 crops of 128^2: the PyTorch pipeline is slow
  theirs = _scores(small, lambda hq, i: degrade_ref(hq))
  ours = _scores(small, lambda hq, i: degradations.degrade(hq, np.random.default_rng([1, i]), config))
  _report('omgsr_512 ours', ours)
  _report('omgsr_512 PyTorch reference', theirs)
  assert abs(ours.mean() - theirs.mean()) < 2.0
  assert abs(np.median(ours) - np.median(theirs)) < 2.0
