"""Real-ESRGAN second-order degradation (Wang et al. 2021, Sec. 3) on the host CPU with numpy / OpenCV.

Public entry (kept stable for the trainer and for external checks):

    from sr_jax.data import degradations
    config = degradations.preset('omgsr_512')          # ml_collections.ConfigDict
    lq = degradations.degrade(hq, rng, config)         # hq float32 HWC RGB in [0, 1]

`lq` is float32 with the shape of `hq` (the LQ is resized back to the HQ size, as OMGSR and OSEDiff train),
every value k/255 for an integer k. All randomness comes from the `numpy.random.Generator` passed in, in a
fixed order, so the same generator state gives the same `lq`.

The order of operations follows OMGSR `dataset/realesrgan.py` (`degrade_process`, a copy of Real-ESRGAN's
`realesrgan_model.feed_data`) per image:
  stage 1: blur(k1) -> random resize -> Gaussian or Poisson noise -> JPEG
  stage 2: blur(k2) with `blur_prob` -> random resize to (H / scale * s) -> noise ->
           50/50 [resize to H / scale + final sinc, JPEG] or [JPEG, resize to H / scale + final sinc]
  resize back to H x W (random mode) -> quantise to 8 bit.
Colour jitter and gray conversion of the LQ are off (probability 0) in both references and not implemented.

Where this deviates from the PyTorch reference, and why (all measured in tests/benchmarks):
- JPEG: a real libjpeg codec through `cv2.imencode` at an integer quality (the uniform draw rounded) instead
  of basicsr's DiffJPEG at a float quality. Both use the IJG quality scaling and 4:2:0 chroma subsampling;
  the codec is exact JPEG (incl. its rounding) and several times faster on a CPU.
- Resize: bilinear and bicubic by `cv2.resize` (a = -0.75, half-pixel centres, no antialias: the
  formulas of `torch.nn.functional.interpolate(align_corners=False)`, equal to ~2e-5); 'area' is torch's
  adaptive average pooling as sparse matrix products (OpenCV's INTER_AREA is a different filter).
  The first-stage output size is floor(H * s) like torch's `scale_factor`; torch then maps coordinates
  with 1 / s rather than H / floor(H * s), a sub-pixel shift we do not reproduce.
- Blur: `cv2.filter2D` with BORDER_REFLECT_101 (= torch `reflect` padding) on the kernel's own size
  instead of a zero-padded 21 x 21 (41 x 41) kernel: the same result, since the zero taps add nothing
  (and it also works on images smaller than the padding, where torch's reflect pad fails). Kernels of
  numerical rank r are applied as r separable passes when that is cheaper (max error 1e-6).
- Poisson noise is sampled exactly by inverse-CDF tables per 8-bit level (the reference calls
  `torch.poisson`); the distribution is the same, the random stream is numpy's.
- The number of distinct levels that sets the Poisson 'vals' is counted with a histogram, per image.
- Random draws: one numpy Generator for everything (the reference mixes Python's `random`, numpy's and
  torch's global generators), so streams differ draw by draw while every distribution is the same.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import cv2
import ml_collections
import numpy as np
from scipy import sparse
from scipy import special

from sr_jax.data import blur_kernels

RESIZE_MODES = ('area', 'bilinear', 'bicubic')
_CV2_INTERPOLATION = {'bilinear': cv2.INTER_LINEAR, 'bicubic': cv2.INTER_CUBIC}
# torchvision `rgb_to_grayscale` weights, used by basicsr for gray Poisson noise.
_GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], dtype=np.float32)

# --------------------------------------------------------------------------------------------------
# Presets: every number of OMGSR `dataset/params_realesrgan.yml` and `dataset/realesrgan.py`, and of
# OSEDiff `dataloaders/params_realesrgan.yml`, lives here.
# --------------------------------------------------------------------------------------------------
_KERNEL_PROBS = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # order of blur_kernels.KERNEL_TYPES


def _stage(*, blur_sigma, resize_range, noise_sigma, poisson_scale, jpeg_quality, resize_probs,
           blur_prob=1.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      blur_prob=blur_prob,                 # stage 1 always blurs; stage 2 with `second_blur_prob`
      kernel_probs=_KERNEL_PROBS,
      sinc_prob=0.1,                       # sinc instead of a mixed kernel
      blur_sigma=blur_sigma,
      betag_range=(0.5, 4.0),              # generalised Gaussian shape
      betap_range=(1.0, 2.0),              # plateau shape
      resize_probs=resize_probs,           # up, down, keep
      resize_range=resize_range,
      gaussian_noise_prob=0.5,             # else Poisson
      noise_sigma=noise_sigma,             # on the 0..255 scale
      poisson_scale=poisson_scale,
      gray_noise_prob=0.4,
      jpeg_quality=jpeg_quality,
  ))


def _omgsr(scale: int, kernel_sizes: Sequence[int], sinc_size_split: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      scale=scale,
      kernel_sizes=tuple(kernel_sizes),
      sinc_size_split=sinc_size_split,     # sinc cutoff U[pi/3, pi] below, U[pi/5, pi] at or above
      kernel_types=blur_kernels.KERNEL_TYPES,
      resize_modes=RESIZE_MODES,
      final_sinc_prob=0.8,
      final_sinc_cutoff=(math.pi / 3, math.pi),
      resize_back=True,                    # LQ resized back to the HQ size (`resize_bak=True`)
      stage1=_stage(blur_sigma=(0.2, 3.0), resize_range=(0.3, 1.5), noise_sigma=(1.0, 15.0),
                    poisson_scale=(0.05, 2.0), jpeg_quality=(60.0, 95.0), resize_probs=(0.2, 0.7, 0.1)),
      stage2=_stage(blur_prob=0.5, blur_sigma=(0.2, 1.5), resize_range=(0.6, 1.2), noise_sigma=(1.0, 12.0),
                    poisson_scale=(0.05, 1.0), jpeg_quality=(60.0, 100.0), resize_probs=(0.3, 0.4, 0.3)),
  ))


def _osediff() -> ml_collections.ConfigDict:
  config = _omgsr(4, range(7, 22, 2), 13)
  config.stage1 = _stage(blur_sigma=(0.2, 3.0), resize_range=(0.15, 1.5), noise_sigma=(1.0, 30.0),
                         poisson_scale=(0.05, 3.0), jpeg_quality=(30.0, 95.0), resize_probs=(0.2, 0.7, 0.1))
  config.stage2 = _stage(blur_prob=0.8, blur_sigma=(0.2, 1.5), resize_range=(0.3, 1.2), noise_sigma=(1.0, 25.0),
                         poisson_scale=(0.05, 2.5), jpeg_quality=(30.0, 95.0), resize_probs=(0.3, 0.4, 0.3))
  return config


_PRESETS = {
    'omgsr_512': lambda: _omgsr(4, range(7, 22, 2), 13),     # x4, odd kernels 7..21
    'omgsr_1024': lambda: _omgsr(8, range(11, 42, 2), 25),   # x8, odd kernels 11..41
    'osediff': _osediff,                                      # x4, harsher noise / JPEG / resize
}
PRESET_NAMES = tuple(_PRESETS)


def preset(name: str) -> ml_collections.ConfigDict:
  """A fresh degradation ConfigDict: 'omgsr_512', 'omgsr_1024' or 'osediff'."""
  if name not in _PRESETS:
    raise ValueError(f'unknown degradation preset {name!r}; known: {PRESET_NAMES}')
  return _PRESETS[name]()


# --------------------------------------------------------------------------------------------------
# Operators. Images are float32 HWC (any channel count for blur / resize, RGB for noise / JPEG).
# --------------------------------------------------------------------------------------------------
def _trim_kernel(kernel: np.ndarray, tolerance: float = 1e-9) -> np.ndarray:
  """Drops outer rings whose total |weight| is below `tolerance` (they change no float32 output)."""
  while kernel.shape[0] > 1:
    ring = np.abs(kernel).sum() - np.abs(kernel[1:-1, 1:-1]).sum()
    if ring >= tolerance:
      break
    kernel = kernel[1:-1, 1:-1]
  return kernel


def _separable_is_cheaper(rank: int, size: int) -> bool:
  """Cost model fitted to OpenCV 5 float32 timings on 512^2 RGB, one core (in ms, shared machine).

  A rank-1 term (a 1 x K and a K x 1 `cv2.filter2D` pass and a sum) costs about 3 + 0.1 K: memory passes
  dominate. A K x K `cv2.filter2D` costs about 2 + 0.06 K^2 below 130 taps and switches to a DFT of
  roughly constant cost (~33) above.
  """
  direct = 2.0 + 0.06 * size * size if size * size < 130 else 33.0
  return rank * (3.0 + 0.1 * size) < direct


def blur(img: np.ndarray, kernel: np.ndarray | None, tolerance: float = 1e-6) -> np.ndarray:
  """Correlates every channel with `kernel`, reflect-101 border (torch `F.pad(mode='reflect')`).

  A kernel of numerical rank r (Frobenius residual * K below `tolerance`, which bounds the change of any
  output in [0, 1]) runs as r row-then-column passes when `_separable_is_cheaper`, else as one 2-D filter.
  None is the identity (Real-ESRGAN's pulse kernel).
  """
  if kernel is None:
    return img
  kernel = _trim_kernel(np.asarray(kernel, dtype=np.float64))
  size = kernel.shape[0]
  border = cv2.BORDER_REFLECT_101
  if size == 1:
    return img * np.float32(kernel[0, 0])
  u, s, vt = np.linalg.svd(kernel)
  residual = np.sqrt(np.cumsum((s**2)[::-1])[::-1])  # residual[r] = ||kernel - rank-r part||_F
  rank = next((r for r in range(1, size) if residual[r] * size < tolerance), size)
  if not _separable_is_cheaper(rank, size):
    return cv2.filter2D(img, -1, kernel.astype(np.float32), borderType=border)
  out = None
  for i in range(rank):
    row = vt[i][None, :].astype(np.float32)
    column = (u[:, i] * s[i])[:, None].astype(np.float32)
    # Two 1-D filter2D passes: faster than sepFilter2D in OpenCV 5 for these sizes.
    part = cv2.filter2D(cv2.filter2D(img, -1, row, borderType=border), -1, column, borderType=border)
    out = part if out is None else cv2.add(out, part, dst=out)
  return out


@functools.lru_cache(maxsize=256)
def _area_matrix(n: int, m: int) -> sparse.csr_matrix:
  """(m, n) averaging matrix of torch `adaptive_avg_pool`: row i averages [floor(i n / m), ceil((i+1) n / m))."""
  i = np.arange(m)
  start, end = (i * n) // m, -((-(i + 1) * n) // m)
  count = end - start
  rows = np.repeat(i, count)
  cols = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count) + np.repeat(start, count)
  values = np.repeat((1.0 / count).astype(np.float32), count)
  return sparse.csr_matrix((values, (rows, cols)), shape=(m, n))


def _area_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """torch `interpolate(mode='area')` = adaptive average pooling, as two sparse matrix products."""
  h, w, c = img.shape
  out = (_area_matrix(h, height) @ img.reshape(h, w * c)).reshape(height, w, c)
  out = _area_matrix(w, width) @ out.transpose(1, 0, 2).reshape(w, height * c)
  return np.ascontiguousarray(out.reshape(width, height, c).transpose(1, 0, 2), dtype=np.float32)


def resize(img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
  """Resizes to (height, width) like `torch.nn.functional.interpolate(align_corners=False)`, no antialias.

  'bilinear' / 'bicubic' (a = -0.75): `cv2.resize`, the same formulas as torch (agree to ~2e-5).
  'area': torch's definition (adaptive average pooling over integer bins, which is close to nearest
  neighbour when enlarging), as two sparse averaging-matrix products; OpenCV's INTER_AREA weights partial
  pixels and interpolates when enlarging, so it is not used.
  """
  height, width = max(1, int(height)), max(1, int(width))
  if img.shape[:2] == (height, width):
    return img
  if mode == 'area':
    return _area_resize(img, height, width)
  out = cv2.resize(img, (width, height), interpolation=_CV2_INTERPOLATION[mode])
  return out if out.ndim == img.ndim else out[..., None]


def add_gaussian_noise(img: np.ndarray, rng: np.random.Generator, sigma: float, gray: bool) -> np.ndarray:
  """img + N(0, (sigma/255)^2), one draw per pixel shared by the channels when `gray`; clipped to [0, 1]."""
  h, w, c = img.shape
  noise = rng.standard_normal((h, w, 1 if gray else c), dtype=np.float32)
  noise *= np.float32(sigma / 255.0)
  return np.clip(img + noise, 0.0, 1.0)


_GUIDE_BITS = 11  # guide table of 2^11 entries per level (>= 4x the support of Poisson(256))


@functools.lru_cache(maxsize=16)
def _poisson_tables(vals: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Inverse-CDF tables of Poisson(level / 255 * vals) for the 256 8-bit levels.

  Returns (cdf, guide, row): `cdf` flat (256 * row) float64; `guide` flat (256 * 2^_GUIDE_BITS) int16,
  guide[l, j] = the draw for every u in [j / M, (j + 1) / M) when that interval maps to one value,
  else -(smallest candidate) - 1 (the sampler then searches the CDF from there).
  """
  lam = np.arange(256, dtype=np.float64) / 255.0 * vals
  k_max = int(math.ceil(vals + 12.0 * math.sqrt(vals) + 20.0))  # tail mass beyond < 1e-20
  cdf = special.pdtr(np.arange(k_max + 1)[None, :], lam[:, None])  # Poisson CDF
  cdf[:, -1] = 1.0  # guarantees the search below stops
  size = 1 << _GUIDE_BITS
  lower = np.arange(size) / size
  guide = np.stack([np.searchsorted(row, lower, side='right') for row in cdf])
  sure = np.take_along_axis(cdf, guide, axis=1) >= (np.arange(size) + 1) / size
  guide = np.where(sure, guide, -guide - 1).astype(np.int16)
  return cdf.ravel(), guide.ravel(), k_max + 1


def sample_poisson_levels(rng: np.random.Generator, levels: np.ndarray, vals: int) -> np.ndarray:
  """Exact draws of Poisson(levels / 255 * vals) for uint8 `levels`: inverse CDF of one uniform each.

  u = (32 random bits) / 2^32; its top bits index a guide table that settles most draws in one lookup;
  the rest step through the CDF from the guide's lower bound (k = min{k : CDF(k) > u}).
  """
  cdf, guide, row = _poisson_tables(int(vals))
  n = levels.size
  bits = rng.bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
  flat_levels = levels.reshape(-1).astype(np.uint32)
  k = guide[(flat_levels << _GUIDE_BITS) | (bits >> (32 - _GUIDE_BITS))].astype(np.int32)
  unsure = np.flatnonzero(k < 0)
  if unsure.size:
    u = bits[unsure] * (1.0 / 2**32)
    base = flat_levels[unsure].astype(np.int64) * row
    k_unsure = -k[unsure].astype(np.int64) - 1
    step = np.flatnonzero(cdf[base + k_unsure] <= u)
    while step.size:
      k_unsure[step] += 1
      step = step[cdf[base[step] + k_unsure[step]] <= u[step]]
    k[unsure] = k_unsure
  return k.reshape(levels.shape)


def _distinct_levels(levels: np.ndarray) -> int:
  """Number of distinct values in a uint8 array (a histogram; np.unique would sort)."""
  hist = cv2.calcHist([levels.reshape(levels.shape[0], -1)], [0], None, [256], [0, 256])
  return int(np.count_nonzero(hist))


def add_poisson_noise(img: np.ndarray, rng: np.random.Generator, scale: float, gray: bool) -> np.ndarray:
  """Shot noise as basicsr `generate_poisson_noise_pt`, clipped to [0, 1].

  The image (its gray version when `gray`) is rounded to 8-bit levels; vals = 2^ceil(log2(#levels used));
  noise = Poisson(level * vals / 255) / vals - level / 255, times `scale`, added to the unrounded image.
  """
  base = img @ _GRAY_WEIGHTS if gray else img
  levels = np.clip(np.rint(base * 255.0), 0, 255).astype(np.uint8)
  distinct = _distinct_levels(levels)
  vals = int(2 ** math.ceil(math.log2(max(distinct, 1))))
  counts = sample_poisson_levels(rng, levels, vals).astype(np.float32)
  noise = counts * np.float32(1.0 / vals) - levels.astype(np.float32) * np.float32(1.0 / 255.0)
  noise *= np.float32(scale)
  if gray:
    noise = noise[..., None]
  return np.clip(img + noise, 0.0, 1.0)


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
  """Encodes and decodes with libjpeg (OpenCV) at integer `quality`; input clipped to [0, 1] first."""
  u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
  ok, encoded = cv2.imencode('.jpg', cv2.cvtColor(u8, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  if not ok:
    raise RuntimeError('JPEG encoding failed')
  decoded = cv2.cvtColor(cv2.imdecode(encoded, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  return decoded.astype(np.float32) / np.float32(255.0)


def quantize_8bit(img: np.ndarray) -> np.ndarray:
  """round(clip(x) * 255) / 255 as float32: the LQ lies on the 8-bit grid."""
  return (np.clip(np.rint(img * 255.0), 0, 255) / 255.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Random draws of one stage.
# --------------------------------------------------------------------------------------------------
def random_resize_scale(rng: np.random.Generator, probs: Sequence[float], scale_range: Sequence[float]) -> float:
  """'up' U(1, hi), 'down' U(lo, 1) or 'keep' 1 with probabilities `probs`."""
  kind = blur_kernels.draw_choice(rng, probs)
  if kind == 0:
    return float(rng.uniform(1.0, scale_range[1]))
  if kind == 1:
    return float(rng.uniform(scale_range[0], 1.0))
  return 1.0


def random_mode(rng: np.random.Generator, modes: Sequence[str]) -> str:
  return modes[int(rng.integers(len(modes)))]


def random_noise(img: np.ndarray, rng: np.random.Generator, stage: ml_collections.ConfigDict) -> np.ndarray:
  """Gaussian noise with `gaussian_noise_prob`, else Poisson; gray (channel-shared) with `gray_noise_prob`."""
  if rng.random() < stage.gaussian_noise_prob:
    sigma = float(rng.uniform(*stage.noise_sigma))
    return add_gaussian_noise(img, rng, sigma, gray=bool(rng.random() < stage.gray_noise_prob))
  scale = float(rng.uniform(*stage.poisson_scale))
  return add_poisson_noise(img, rng, scale, gray=bool(rng.random() < stage.gray_noise_prob))


def random_jpeg(img: np.ndarray, rng: np.random.Generator, quality_range: Sequence[float]) -> np.ndarray:
  """JPEG at quality round(U(quality_range))."""
  return jpeg(img, int(round(rng.uniform(*quality_range))))


def _stage_kernel(rng: np.random.Generator, config: ml_collections.ConfigDict,
                  stage: ml_collections.ConfigDict) -> np.ndarray:
  return blur_kernels.random_stage_kernel(rng, config.kernel_sizes, config.sinc_size_split, stage.sinc_prob,
                                     config.kernel_types, stage.kernel_probs, stage.blur_sigma,
                                     stage.betag_range, stage.betap_range)


def degrade(hq: np.ndarray, rng: np.random.Generator, config: ml_collections.ConfigDict) -> np.ndarray:
  """Synthetic LQ of `hq` by the two-stage Real-ESRGAN model of `config` (see the module docstring).

  Args:
    hq: float32 (H, W, 3) RGB in [0, 1].
    rng: the record's generator; the same state gives the same output.
    config: a preset (`preset(name)`) or a ConfigDict of the same shape.
  Returns:
    float32 (H, W, 3) in [0, 1] on the 8-bit grid ((H // scale, W // scale, 3) if `resize_back` is off).
  """
  hq = np.asarray(hq, dtype=np.float32)
  if hq.ndim != 3 or hq.shape[2] != 3:
    raise ValueError(f'hq must be (H, W, 3), got {hq.shape}')
  height, width = hq.shape[:2]
  s1, s2, sf = config.stage1, config.stage2, config.scale
  kernel1 = _stage_kernel(rng, config, s1)
  kernel2 = _stage_kernel(rng, config, s2)
  final_sinc = blur_kernels.random_final_sinc_kernel(rng, config.kernel_sizes, config.final_sinc_prob,
                                                config.final_sinc_cutoff)
  # Stage 1.
  out = blur(hq, kernel1) if rng.random() < s1.blur_prob else hq
  scale = random_resize_scale(rng, s1.resize_probs, s1.resize_range)
  out = resize(out, int(height * scale), int(width * scale), random_mode(rng, config.resize_modes))
  out = random_noise(out, rng, s1)
  out = random_jpeg(out, rng, s1.jpeg_quality)
  # Stage 2.
  if rng.random() < s2.blur_prob:
    out = blur(out, kernel2)
  scale = random_resize_scale(rng, s2.resize_probs, s2.resize_range)
  out = resize(out, int(height / sf * scale), int(width / sf * scale), random_mode(rng, config.resize_modes))
  out = random_noise(out, rng, s2)
  lq_height, lq_width = height // sf, width // sf
  if rng.random() < 0.5:  # [resize + sinc] then JPEG
    out = resize(out, lq_height, lq_width, random_mode(rng, config.resize_modes))
    out = random_jpeg(blur(out, final_sinc), rng, s2.jpeg_quality)
  else:                   # JPEG then [resize + sinc]
    out = random_jpeg(out, rng, s2.jpeg_quality)
    out = blur(resize(out, lq_height, lq_width, random_mode(rng, config.resize_modes)), final_sinc)
  if config.resize_back:
    out = resize(out, height, width, random_mode(rng, config.resize_modes))
  return quantize_8bit(out)
