"""PSNR / SSIM equal scikit-image's and basicsr's (Y channel, crop 4) on the bundled photos; input
contract (inf, shapes, crop, dtypes); the pyiqa bridge skips cleanly without pyiqa.

Tolerances: scikit-image computes in float64 like us, so we ask for 1e-9 relative (the observed gap is
~1e-15). basicsr's ``to_y_channel`` computes the luma in float32, so against it 1e-6 relative (the
observed gap is ~1e-8).
"""
import contextlib
import importlib.util
import io
import os
import sys
import types

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import metrics as skmetrics

from sr_jax import metrics

SKIMAGE_RTOL = 1e-9
BASICSR_RTOL = 1e-6
PHOTOS = ('astronaut', 'chelsea', 'coffee')


# ----------------------------------------------------------------------------------------- fixtures


def _jpeg_roundtrip(img: np.ndarray, quality: int = 30) -> np.ndarray:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, 'JPEG', quality=quality)
  return np.asarray(Image.open(buf).convert('RGB'))


def _blur_and_noise(img: np.ndarray, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  blurred = ndimage.gaussian_filter(img.astype(np.float64), sigma=(1.2, 1.2, 0))
  return np.clip(np.round(blurred + rng.normal(0, 6.0, img.shape)), 0, 255).astype(np.uint8)


DEGRADATIONS = {'jpeg30': _jpeg_roundtrip, 'blur_noise': _blur_and_noise}


@pytest.fixture(scope='module', params=[(p, d) for p in PHOTOS for d in DEGRADATIONS],
                ids=lambda pd: f'{pd[0]}-{pd[1]}')
def pair(request):
  photo, degradation = request.param
  gt = getattr(skdata, photo)()
  return DEGRADATIONS[degradation](gt), gt


@contextlib.contextmanager
def _temporary_modules(modules: dict):
  saved = {name: sys.modules.get(name) for name in modules}
  sys.modules.update(modules)
  try:
    yield
  finally:
    for name, old in saved.items():
      if old is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = old


@pytest.fixture(scope='module')
def basicsr_psnr_ssim():
  """basicsr/metrics/psnr_ssim.py executed from its file (``import basicsr`` needs torchvision).

  It imports ``basicsr.metrics.metric_util`` (real file), ``basicsr.utils.color_util`` (real file),
  ``basicsr.utils.bgr2ycbcr`` and ``basicsr.utils.registry.METRIC_REGISTRY`` (stubs); the stubs live
  in ``sys.modules`` only while the files execute.
  """
  pytest.importorskip('torch')
  pytest.importorskip('cv2')
  spec = importlib.util.find_spec('basicsr')
  if spec is None or not spec.submodule_search_locations:
    pytest.skip('basicsr is not installed (pip install --no-deps basicsr==1.4.2)')
  root = list(spec.submodule_search_locations)[0]

  def package(name):
    module = types.ModuleType(name)
    module.__path__ = []
    return module

  registry = types.ModuleType('basicsr.utils.registry')
  registry.METRIC_REGISTRY = types.SimpleNamespace(register=lambda *a, **k: (lambda fn: fn))
  stubs = {'basicsr': package('basicsr'), 'basicsr.utils': package('basicsr.utils'),
           'basicsr.metrics': package('basicsr.metrics'), 'basicsr.utils.registry': registry}
  loaded = {}
  with _temporary_modules(stubs):
    for name, rel in (('basicsr.utils.color_util', 'utils/color_util.py'),
                      ('basicsr.metrics.metric_util', 'metrics/metric_util.py'),
                      ('basicsr.metrics.psnr_ssim', 'metrics/psnr_ssim.py')):
      file_spec = importlib.util.spec_from_file_location(name, os.path.join(root, rel))
      module = importlib.util.module_from_spec(file_spec)
      with _temporary_modules(loaded):  # the files loaded so far, for the next one's imports
        file_spec.loader.exec_module(module)
      loaded[name] = module
      if name == 'basicsr.utils.color_util':
        stubs['basicsr.utils'].bgr2ycbcr = module.bgr2ycbcr  # metric_util's `from basicsr.utils import`
  return loaded['basicsr.metrics.psnr_ssim']


def _skimage_ssim(a, b, channel_axis=None):
  return skmetrics.structural_similarity(
      a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255,
      channel_axis=channel_axis)


# ----------------------------------------------------------------------------- reference parity


def test_rgb_psnr_and_ssim_equal_skimage(pair):
  sr, gt = pair
  assert metrics.psnr(sr, gt) == pytest.approx(
      skmetrics.peak_signal_noise_ratio(gt, sr, data_range=255), rel=SKIMAGE_RTOL)
  assert metrics.ssim(sr, gt) == pytest.approx(_skimage_ssim(gt, sr, channel_axis=-1), rel=SKIMAGE_RTOL)


def test_y_channel_psnr_and_ssim_with_crop_equal_skimage_on_bt601_luma(pair):
  sr, gt = pair
  # Independent luma: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255, after a 4 px crop.
  def luma(img):
    rgb = img[4:-4, 4:-4].astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0
  y_sr, y_gt = luma(sr), luma(gt)
  assert metrics.psnr(sr, gt, crop=4, y_channel=True) == pytest.approx(
      skmetrics.peak_signal_noise_ratio(y_gt, y_sr, data_range=255), rel=SKIMAGE_RTOL)
  assert metrics.ssim(sr, gt, crop=4, y_channel=True) == pytest.approx(
      _skimage_ssim(y_gt, y_sr), rel=SKIMAGE_RTOL)


def test_y_channel_psnr_and_ssim_equal_basicsr_crop4(pair, basicsr_psnr_ssim):
  sr, gt = pair
  bgr_sr, bgr_gt = sr[..., ::-1], gt[..., ::-1]  # basicsr reads cv2's BGR order
  ours = metrics.pixel_metrics(sr, gt, crop=4)
  theirs_psnr = basicsr_psnr_ssim.calculate_psnr(bgr_sr, bgr_gt, crop_border=4, test_y_channel=True)
  theirs_ssim = basicsr_psnr_ssim.calculate_ssim(bgr_sr, bgr_gt, crop_border=4, test_y_channel=True)
  assert ours['psnr_y'] == pytest.approx(theirs_psnr, rel=BASICSR_RTOL)
  assert ours['ssim_y'] == pytest.approx(theirs_ssim, rel=BASICSR_RTOL)
  # Sanity that the degradation is real (not a trivial pair): PSNR in a plausible band.
  assert 20.0 < ours['psnr_y'] < 45.0 and 0.5 < ours['ssim_y'] < 0.999
  assert 'basicsr.utils.registry' not in sys.modules  # the import stubs did not leak


def test_rgb_psnr_and_ssim_equal_basicsr_crop4(pair, basicsr_psnr_ssim):
  sr, gt = pair
  ours = metrics.pixel_metrics(sr, gt, crop=4)
  assert ours['psnr_rgb'] == pytest.approx(
      basicsr_psnr_ssim.calculate_psnr(sr, gt, crop_border=4), rel=SKIMAGE_RTOL)
  assert ours['ssim_rgb'] == pytest.approx(
      basicsr_psnr_ssim.calculate_ssim(sr, gt, crop_border=4), rel=BASICSR_RTOL)


def test_grayscale_2d_images_equal_skimage_and_reject_y_channel():
  gt = skdata.camera()
  sr = _blur_and_noise(gt[..., None])[..., 0]
  assert metrics.psnr(sr, gt, crop=4) == pytest.approx(
      skmetrics.peak_signal_noise_ratio(gt[4:-4, 4:-4], sr[4:-4, 4:-4], data_range=255),
      rel=SKIMAGE_RTOL)
  assert metrics.ssim(sr, gt) == pytest.approx(_skimage_ssim(gt, sr), rel=SKIMAGE_RTOL)
  with pytest.raises(ValueError, match='y_channel needs RGB'):
    metrics.psnr(sr, gt, y_channel=True)


def test_psnr_matches_closed_form_for_a_constant_offset():
  gt = np.full((32, 40, 3), 100, np.uint8)
  sr = gt + np.uint8(5)  # MSE = 25 on RGB
  assert metrics.psnr(sr, gt) == pytest.approx(10 * np.log10(255.0 ** 2 / 25.0), rel=1e-12)
  # On Y, a uniform +5 on R, G, B shifts Y by 5 * (65.481 + 128.553 + 24.966) / 255 = 5 * 219 / 255.
  dy = 5 * 219.0 / 255.0
  assert metrics.psnr(sr, gt, y_channel=True) == pytest.approx(
      10 * np.log10(255.0 ** 2 / dy ** 2), rel=1e-12)


def test_gaussian_window_equals_skimage_and_opencv_taps():
  cv2 = pytest.importorskip('cv2')
  taps = metrics.gaussian_window_1d()
  assert taps.shape == (11,)
  np.testing.assert_allclose(taps, cv2.getGaussianKernel(11, 1.5)[:, 0], rtol=1e-12)
  x = np.arange(11) - 5.0
  np.testing.assert_allclose(taps, np.exp(-x ** 2 / 4.5) / np.exp(-x ** 2 / 4.5).sum(), rtol=1e-14)


# ------------------------------------------------------------------------------- input contract


def test_identical_images_give_infinite_psnr_and_unit_ssim():
  gt = skdata.chelsea()
  assert metrics.psnr(gt, gt.copy()) == float('inf')
  assert metrics.psnr(gt, gt.copy(), crop=4, y_channel=True) == float('inf')
  assert metrics.ssim(gt, gt.copy()) == pytest.approx(1.0, abs=1e-12)
  assert metrics.ssim(gt, gt.copy(), crop=4, y_channel=True) == pytest.approx(1.0, abs=1e-12)
  assert all(v == float('inf') or v == pytest.approx(1.0) for v in metrics.pixel_metrics(gt, gt).values())


@pytest.mark.parametrize('fn', [metrics.psnr, metrics.ssim])
def test_mismatched_shapes_raise_value_error(fn):
  a = np.zeros((32, 32, 3), np.uint8)
  with pytest.raises(ValueError, match='shapes differ'):
    fn(a, np.zeros((32, 33, 3), np.uint8))
  with pytest.raises(ValueError, match='shapes differ'):
    fn(a, np.zeros((32, 32), np.uint8))


@pytest.mark.parametrize('fn', [metrics.psnr, metrics.ssim])
def test_batched_or_1d_inputs_raise_value_error(fn):
  with pytest.raises(ValueError, match=r'\(H, W\)'):
    fn(np.zeros((2, 32, 32, 3), np.uint8), np.ones((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match=r'\(H, W\)'):
    fn(np.zeros(64, np.uint8), np.ones(64, np.uint8))


def test_ssim_on_images_smaller_than_the_window_raises_value_error():
  with pytest.raises(ValueError, match='at least 11x11'):
    metrics.ssim(np.zeros((10, 40, 3), np.uint8), np.ones((10, 40, 3), np.uint8))
  with pytest.raises(ValueError, match='at least 11x11'):  # 20 px minus a 5 px crop on each side
    metrics.ssim(np.zeros((20, 40, 3), np.uint8), np.ones((20, 40, 3), np.uint8), crop=5)


@pytest.mark.parametrize('fn', [metrics.psnr, metrics.ssim])
def test_crop_that_removes_the_whole_image_raises_value_error(fn):
  with pytest.raises(ValueError, match='crop_border 10'):
    fn(np.zeros((20, 40, 3), np.uint8), np.ones((20, 40, 3), np.uint8), crop=10)


@pytest.mark.parametrize('y_channel', [False, True])
def test_crop_removes_exactly_the_border(y_channel):
  gt = skdata.astronaut()[:96, :128]
  sr = _blur_and_noise(gt)
  for fn in (metrics.psnr, metrics.ssim):
    cropped = fn(sr[4:-4, 4:-4], gt[4:-4, 4:-4], 0, y_channel)
    assert fn(sr, gt, 4, y_channel) == cropped
    # Vandalising the 4 px border changes nothing once cropped, and changes the uncropped value.
    vandal = sr.copy()
    vandal[:4] = 255 - vandal[:4]
    vandal[:, -4:] = 0
    assert fn(vandal, gt, 4, y_channel) == cropped
    assert fn(vandal, gt, 0, y_channel) < fn(sr, gt, 0, y_channel) - 1e-3
  assert metrics.crop_border(gt, 0) is gt
  assert metrics.crop_border(gt, 3).shape == (90, 122, 3)


def test_float_inputs_on_the_255_scale_are_accepted():
  gt = skdata.coffee()[:128, :160]
  sr = _blur_and_noise(gt)
  # Integral floats give exactly the uint8 result.
  for dtype in (np.float32, np.float64):
    assert metrics.pixel_metrics(sr.astype(dtype), gt.astype(dtype), crop=4) == metrics.pixel_metrics(
        sr, gt, crop=4)
  # Non-integral floats (e.g. an unquantised model output) equal scikit-image on the same floats.
  rng = np.random.default_rng(1)
  sr_float = np.clip(gt + rng.normal(0, 4.0, gt.shape), 0, 255)
  assert metrics.psnr(sr_float, gt) == pytest.approx(
      skmetrics.peak_signal_noise_ratio(gt.astype(np.float64), sr_float, data_range=255),
      rel=SKIMAGE_RTOL)
  assert metrics.ssim(sr_float, gt) == pytest.approx(
      _skimage_ssim(gt.astype(np.float64), sr_float, channel_axis=-1), rel=SKIMAGE_RTOL)


def test_16_bit_images_raise_instead_of_being_read_on_the_255_scale():
  gt = skdata.chelsea()[:64, :64].astype(np.uint16) * 257
  with pytest.raises(ValueError, match='uint8'):
    metrics.psnr(gt, gt)
  with pytest.raises(ValueError, match='uint8'):
    metrics.ssim(gt, gt, y_channel=True)


# ------------------------------------------------------------------------------------------ pyiqa


def test_pyiqa_metrics_skip_with_one_line_each_when_pyiqa_is_missing():
  if importlib.util.find_spec('pyiqa') is not None:
    pytest.skip('pyiqa is installed here')
  lines = []
  bridge = metrics.PyiqaMetrics.create(['lpips', 'niqe', 'musiq', 'fid'], paired=True, log=lines.append)
  assert bridge.metrics == {}
  assert set(bridge.skipped) == {'lpips', 'niqe', 'musiq', 'fid'}
  assert len(lines) == 4
  for name in ('lpips', 'niqe', 'musiq', 'fid'):
    (line,) = [l for l in lines if l.startswith(f'metric {name} skipped:')]
    assert 'pyiqa is not installed' in line and 'pip install pyiqa' in line
  assert bridge.image_metrics() == []
  assert bridge.fid('a', 'b') is None


def test_pyiqa_metrics_skip_when_import_is_blocked(monkeypatch):
  monkeypatch.setitem(sys.modules, 'pyiqa', None)  # import pyiqa -> ImportError, installed or not
  lines = []
  bridge = metrics.PyiqaMetrics.create(list(metrics.PYIQA_METRICS), paired=True, log=lines.append)
  assert bridge.metrics == {} and len(lines) == len(metrics.PYIQA_METRICS)
  assert all('pyiqa is not installed' in reason for reason in bridge.skipped.values())


def test_unpaired_mode_skips_full_reference_metrics_and_fid(monkeypatch):
  monkeypatch.setitem(sys.modules, 'pyiqa', None)
  lines = []
  bridge = metrics.PyiqaMetrics.create(['lpips', 'dists', 'niqe', 'fid'], paired=False, log=lines.append)
  assert len(lines) == 4
  for name in ('lpips', 'dists', 'fid'):
    assert bridge.skipped[name] == 'needs ground truth (--gt)'
  assert 'pyiqa is not installed' in bridge.skipped['niqe']


def test_unpaired_mode_with_only_full_reference_metrics_does_not_import_pyiqa(monkeypatch):
  def boom(name):
    raise AssertionError(f'imported {name}')
  monkeypatch.setattr(metrics.importlib, 'import_module', boom)
  lines = []
  bridge = metrics.PyiqaMetrics.create(['lpips', 'dists', 'fid'], paired=False, log=lines.append)
  assert bridge.metrics == {} and len(lines) == 3
  assert all(l.endswith('needs ground truth (--gt)') for l in lines)


def test_unknown_metric_name_raises_value_error():
  with pytest.raises(ValueError, match="unknown metric 'psnr'"):
    metrics.PyiqaMetrics.create(['psnr'], paired=True, log=lambda _: None)


class _FakeMetric:
  def __init__(self, name):
    self.name, self.calls = name, []

  def __call__(self, *tensors):
    self.calls.append(tensors)
    return sum(t.double().mean() for t in tensors)


def test_with_a_stub_pyiqa_builds_what_applies_and_feeds_nchw_unit_range_tensors(monkeypatch):
  torch = pytest.importorskip('torch')
  built = []

  def create_metric(name, device):
    built.append((name, device))
    if name == 'musiq':
      raise FileNotFoundError('weights not cached')
    return _FakeMetric(name)

  monkeypatch.setitem(sys.modules, 'pyiqa', types.SimpleNamespace(create_metric=create_metric))
  lines = []
  bridge = metrics.PyiqaMetrics.create(['lpips', 'niqe', 'musiq', 'maniqa'], paired=False,
                                       log=lines.append)
  # lpips is full-reference: never built unpaired; musiq failed to build: skipped, one line each.
  assert built == [('niqe', 'cpu'), ('musiq', 'cpu'), ('maniqa-pipal', 'cpu')]
  assert sorted(bridge.metrics) == ['maniqa', 'niqe'] and sorted(bridge.skipped) == ['lpips', 'musiq']
  assert len(lines) == 2 and 'FileNotFoundError' in bridge.skipped['musiq']

  sr = np.full((8, 6, 3), 51, np.uint8)
  scores = bridge.score(sr, None)
  assert scores == {'niqe': pytest.approx(0.2), 'maniqa': pytest.approx(0.2)}
  (tensors,) = bridge.metrics['niqe'].calls
  assert len(tensors) == 1 and tuple(tensors[0].shape) == (1, 3, 8, 6)
  assert tensors[0].dtype == torch.float32

  paired = metrics.PyiqaMetrics.create(['lpips'], paired=True, log=lines.append)
  gt = np.full((8, 6, 3), 255, np.uint8)
  assert paired.score(sr, gt) == {'lpips': pytest.approx(1.2)}
  assert len(paired.metrics['lpips'].calls[0]) == 2
