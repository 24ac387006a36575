"""Image-quality metrics for SR evaluation: PSNR and SSIM (standard definitions), pyiqa bridge.

PSNR and SSIM follow the definitions used across the SR literature (basicsr's ``calculate_psnr`` /
``calculate_ssim``, pyiqa's ``psnr`` / ``ssim`` with ``test_y_channel``):

* inputs are 8-bit images (H, W, 3) RGB (or (H, W) / (H, W, C) without ``y_channel``), or float
  arrays on the 0..255 scale; other integer types (16-bit), other ranks and borders that crop the whole
  image raise ``ValueError``;
* ``crop_border`` pixels are removed on every side first;
* ``y_channel=True`` compares the luma of ITU-R BT.601 "studio swing" YCbCr,
  ``Y = 16 + 65.481 R + 128.553 G + 24.966 B`` with R, G, B in [0, 1] (Y in [16, 235]);
* PSNR = ``10 log10(255^2 / MSE)`` over all pixels (and channels), float64; ``inf`` when equal;
* SSIM (Wang et al. 2004): 11x11 Gaussian window, sigma 1.5, ``C1 = (0.01 * 255)^2``,
  ``C2 = (0.03 * 255)^2``, population (co)variances, the SSIM map over the "valid" positions (the
  window fully inside the image), averaged; for RGB the mean of the per-channel SSIMs. This equals
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255)``.

``tests/test_metrics.py`` checks both against scikit-image and basicsr on the bundled photos.

LPIPS (v0.1, AlexNet: pyiqa's default ``lpips``; and VGG: ``lpips_vgg``) and DISTS are computed in
JAX (:class:`PerceptualMetrics`, ``sr_jax.losses``) when a perceptual weights folder is given
(``python -m convert_weights perceptual --out DIR``; equal to the ``lpips`` / ``DISTS_pytorch``
packages on the same weights, ``tests/test_perceptual_*.py``). The other learned and no-reference
metrics (NIQE, MUSIQ, MANIQA, CLIPIQA, FID, and LPIPS/DISTS without our weights) come from pyiqa, an
optional PyTorch extra (``pip install pyiqa``; its weights must already be in its cache, this tool
never downloads). Without it, or without a metric's weights, that metric is skipped with one line.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Sequence

import numpy as np
from scipy import ndimage

# BT.601 luma on [0, 1] RGB, output on the 0..255 scale.
Y_WEIGHTS = np.array([65.481, 128.553, 24.966], np.float64)
Y_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
DATA_RANGE = 255.0

# Our metric name -> (pyiqa metric name, kind): 'fr' full-reference, 'nr' no-reference, 'fid' folders.
PYIQA_METRICS: dict[str, tuple[str, str]] = {
    'lpips': ('lpips', 'fr'),
    'dists': ('dists', 'fr'),
    'niqe': ('niqe', 'nr'),
    'musiq': ('musiq', 'nr'),
    'maniqa': ('maniqa-pipal', 'nr'),  # the PIPAL-trained head, as OSEDiff's evaluation
    'clipiqa': ('clipiqa', 'nr'),
    'fid': ('fid', 'fid'),
}
PIXEL_METRICS = ('psnr_y', 'ssim_y', 'psnr_rgb', 'ssim_rgb')
# Full-reference metrics computed in JAX from a perceptual weights folder (names as pyiqa's).
PERCEPTUAL_METRICS = ('lpips', 'lpips_vgg', 'dists')


# ------------------------------------------------------------------------------------ PSNR / SSIM


def crop_border(img: np.ndarray, border: int) -> np.ndarray:
  """Removes ``border`` pixels from each side of the two spatial axes."""
  if border <= 0:
    return img
  return img[border:-border, border:-border, ...]


def rgb_to_y(img: np.ndarray) -> np.ndarray:
  """(H, W, 3) RGB on 0..255 -> (H, W, 1) BT.601 luma on 0..255 (16..235), float64."""
  rgb = np.asarray(img, np.float64) / 255.0
  return (rgb @ Y_WEIGHTS + Y_OFFSET)[..., None]


def _prepare(img: np.ndarray, border: int, y_channel: bool) -> np.ndarray:
  img = np.asarray(img)
  if np.issubdtype(img.dtype, np.integer) and img.dtype != np.uint8:
    raise ValueError(f'integer images must be uint8 (0..255), got {img.dtype}; '
                     'rescale other bit depths to 0..255 floats first')
  if img.ndim == 2:
    img = img[..., None]
  if img.ndim != 3:
    raise ValueError(f'expected one (H, W) or (H, W, C) image, got shape {img.shape}')
  if border > 0 and min(img.shape[:2]) <= 2 * border:
    raise ValueError(f'crop_border {border} leaves nothing of a {img.shape[0]}x{img.shape[1]} image')
  img = crop_border(img, border)
  if y_channel:
    if img.shape[-1] != 3:
      raise ValueError(f'y_channel needs RGB images, got {img.shape[-1]} channels')
    return rgb_to_y(img)
  return img.astype(np.float64)


def _check_pair(img1: np.ndarray, img2: np.ndarray) -> None:
  if np.shape(img1) != np.shape(img2):
    raise ValueError(f'image shapes differ: {np.shape(img1)} vs {np.shape(img2)}')


def psnr(img1: np.ndarray, img2: np.ndarray, crop: int = 0, y_channel: bool = False) -> float:
  """Peak signal-to-noise ratio in dB of two 0..255 images (see the module docstring)."""
  _check_pair(img1, img2)
  a, b = _prepare(img1, crop, y_channel), _prepare(img2, crop, y_channel)
  mse = float(np.mean((a - b) ** 2))
  if mse == 0.0:
    return float('inf')
  return float(10.0 * np.log10(DATA_RANGE ** 2 / mse))


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """Normalised 1-D Gaussian taps; SSIM's 2-D window is their outer product."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2
  taps = np.exp(-x ** 2 / (2 * sigma ** 2))
  return taps / taps.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
  """Separable correlation with ``taps`` along both axes, keeping only the valid positions."""
  out = ndimage.correlate1d(img, taps, axis=0, mode='constant')
  out = ndimage.correlate1d(out, taps, axis=1, mode='constant')
  r = len(taps) // 2
  return out[r:-r, r:-r]


def ssim_single_channel(a: np.ndarray, b: np.ndarray) -> float:
  """SSIM (Wang et al. 2004, Eq. 13) of two (H, W) float64 images on 0..255, mean of the valid map."""
  if min(a.shape) < SSIM_WINDOW:
    raise ValueError(f'SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {a.shape}')
  taps = gaussian_window_1d()
  c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
  mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
  var_a = _filter_valid(a * a, taps) - mu_a ** 2
  var_b = _filter_valid(b * b, taps) - mu_b ** 2
  cov = _filter_valid(a * b, taps) - mu_a * mu_b
  ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return float(ssim_map.mean())


def ssim(img1: np.ndarray, img2: np.ndarray, crop: int = 0, y_channel: bool = False) -> float:
  """Structural similarity of two 0..255 images; mean over channels (see the module docstring)."""
  _check_pair(img1, img2)
  a, b = _prepare(img1, crop, y_channel), _prepare(img2, crop, y_channel)
  return float(np.mean([ssim_single_channel(a[..., c], b[..., c]) for c in range(a.shape[-1])]))


def pixel_metrics(sr: np.ndarray, gt: np.ndarray, crop: int = 0) -> dict[str, float]:
  """PSNR and SSIM on the Y channel and on RGB: {psnr_y, ssim_y, psnr_rgb, ssim_rgb}."""
  return {'psnr_y': psnr(sr, gt, crop, True), 'ssim_y': ssim(sr, gt, crop, True),
          'psnr_rgb': psnr(sr, gt, crop, False), 'ssim_rgb': ssim(sr, gt, crop, False)}


# ------------------------------------------------------------------------------------------ pyiqa


@dataclasses.dataclass
class PyiqaMetrics:
  """The pyiqa metrics that could be built; ``skipped`` maps each other requested name to why.

  Build with :meth:`create`. Images are passed as uint8 (H, W, 3) arrays; FID compares two folders.
  """
  metrics: dict[str, Any]
  skipped: dict[str, str]
  torch: Any = None
  device: str = 'cpu'

  @classmethod
  def create(cls, names: Sequence[str], paired: bool, device: str = 'cpu',
             log: Callable[[str], None] = print) -> 'PyiqaMetrics':
    """Builds each of ``names`` (keys of :data:`PYIQA_METRICS`) that applies (full-reference ones
    and FID only when ``paired``); logs one line per metric that is skipped, and why."""
    skipped: dict[str, str] = {}
    wanted = []
    for name in names:
      if name not in PYIQA_METRICS:
        raise ValueError(f'unknown metric {name!r}; pyiqa metrics: {sorted(PYIQA_METRICS)}')
      if PYIQA_METRICS[name][1] in ('fr', 'fid') and not paired:
        skipped[name] = 'needs ground truth (--gt)'
      else:
        wanted.append(name)
    metrics, torch, pyiqa = {}, None, None
    if wanted:
      try:
        torch = importlib.import_module('torch')
        pyiqa = importlib.import_module('pyiqa')
      except ImportError as e:
        for name in wanted:
          skipped[name] = f'pyiqa is not installed ({e}); `pip install pyiqa` to enable it'
        wanted = []
    for name in wanted:
      try:
        metrics[name] = pyiqa.create_metric(PYIQA_METRICS[name][0], device=device)
      except Exception as e:  # pylint: disable=broad-except  # missing weights, no network, ...
        skipped[name] = f'pyiqa could not build it (weights not in its cache?): {type(e).__name__}: {e}'
    for name, reason in skipped.items():
      log(f'metric {name} skipped: {reason}')
    return cls(metrics, skipped, torch, device)

  def image_metrics(self) -> list[str]:
    return [n for n in self.metrics if PYIQA_METRICS[n][1] != 'fid']

  def _tensor(self, img: np.ndarray):
    x = np.ascontiguousarray(np.asarray(img, np.float32).transpose(2, 0, 1)[None] / 255.0)
    return self.torch.from_numpy(x).to(self.device)

  def score(self, sr: np.ndarray, gt: np.ndarray | None) -> dict[str, float]:
    """Every per-image metric of ``sr`` (full-reference ones against ``gt``)."""
    out = {}
    with self.torch.no_grad():
      for name in self.image_metrics():
        args = (self._tensor(sr),) if PYIQA_METRICS[name][1] == 'nr' else (
            self._tensor(sr), self._tensor(gt))
        out[name] = float(self.metrics[name](*args).item())
    return out

  def fid(self, sr_dir: str, gt_dir: str) -> float | None:
    """FID between two image folders, when FID is enabled."""
    if 'fid' not in self.metrics:
      return None
    with self.torch.no_grad():
      return float(self.metrics['fid'](sr_dir, gt_dir))


@dataclasses.dataclass
class PerceptualMetrics:
  """LPIPS (AlexNet, VGG) and DISTS in JAX with the weights of ``convert_weights perceptual``.

  Build with :meth:`create`; :meth:`score` takes uint8 (H, W, 3) SR and ground-truth images.
  """
  params: Any
  functions: dict[str, Callable]

  @classmethod
  def create(cls, weights_dir: str, names: Sequence[str] = PERCEPTUAL_METRICS
             ) -> 'PerceptualMetrics':
    import jax  # pylint: disable=g-import-not-at-top
    from sr_jax import pretrained, xla  # pylint: disable=g-import-not-at-top
    from sr_jax.losses import dists, lpips  # pylint: disable=g-import-not-at-top
    unknown = sorted(set(names) - set(PERCEPTUAL_METRICS))
    if unknown:
      raise ValueError(f'unknown perceptual metrics {unknown}; choose from {PERCEPTUAL_METRICS}')
    every = {'lpips': functools.partial(lpips.lpips_distance, net='alex'),
             'lpips_vgg': functools.partial(lpips.lpips_distance, net='vgg'),
             'dists': dists.dists_distance}
    jit = lambda fn: jax.jit(fn, compiler_options=xla.compiler_options())
    return cls(pretrained.load_perceptual(weights_dir), {n: jit(every[n]) for n in names})

  def score(self, sr: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    as01 = lambda img: np.asarray(img, np.float32)[None] / np.float32(255.0)
    x, y = as01(sr), as01(gt)
    return {name: float(np.asarray(fn(self.params, x, y))[0]) for name, fn in self.functions.items()}
