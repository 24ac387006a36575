"""Degradation operators and `degrade`: definitions, determinism, output contract, PyTorch parity."""
import math

import cv2
import numpy as np
import pytest
from scipy import stats

from sr_jax.data import basicsr_reference
from sr_jax.data import degradations
from sr_jax.data import blur_kernels


def _image(h=64, w=80, seed=0):
  rng = np.random.default_rng(seed)
  base = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 2.0)
  return np.clip((base - base.min()) / (base.max() - base.min()), 0, 1).astype(np.float32)


def _torch_reference():
  ref = basicsr_reference.load()
  if ref is None:
    pytest.skip(basicsr_reference.reason())
  return ref


def _to_torch(ref, img):
  return ref.torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))[None]


def _from_torch(t):
  return t[0].permute(1, 2, 0).detach().numpy()


def test_blur_matches_direct_correlation_with_reflect_border():
  img = _image()
  rng = np.random.default_rng(3)
  for _ in range(20):
    kernel = blur_kernels.random_mixed_kernel(rng, int(rng.choice([7, 13, 21])))
    size = kernel.shape[0]
    padded = np.pad(img, ((size // 2,) * 2, (size // 2,) * 2, (0, 0)), mode='reflect')  # torch 'reflect'
    windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(0, 1))
    expected = np.einsum('hwcij,ij->hwc', windows, kernel)
    np.testing.assert_allclose(degradations.blur(img, kernel), expected, atol=2e-6)
  assert degradations.blur(img, None) is img


def test_blur_matches_basicsr_filter2d_on_padded_kernels():
  ref = _torch_reference()
  img = _image(48, 40)
  rng = np.random.default_rng(4)
  for _ in range(10):
    kernel = blur_kernels.random_stage_kernel(rng, range(7, 22, 2), 13, 0.3, blur_kernels.KERNEL_TYPES,
                                         [0.45, 0.25, 0.12, 0.03, 0.12, 0.03], (0.2, 3), (0.5, 4), (1, 2))
    pad = (21 - kernel.shape[0]) // 2
    theirs = ref.img_process_util.filter2D(_to_torch(ref, img), ref.torch.FloatTensor(np.pad(kernel, pad))[None])
    np.testing.assert_allclose(degradations.blur(img, kernel), _from_torch(theirs), atol=5e-6)


@pytest.mark.parametrize('mode', degradations.RESIZE_MODES)
@pytest.mark.parametrize('size', [(16, 20), (33, 47), (100, 130)])
def test_resize_matches_torch_interpolate(mode, size):
  ref = _torch_reference()
  img = _image(48, 64)
  theirs = ref.torch.nn.functional.interpolate(_to_torch(ref, img), size=size, mode=mode)
  np.testing.assert_allclose(degradations.resize(img, *size, mode), _from_torch(theirs), atol=5e-5)


def test_resize_area_is_block_mean_and_keep_is_identity():
  img = _image(32, 48)
  np.testing.assert_allclose(degradations.resize(img, 16, 12, 'area'),
                             img.reshape(16, 2, 12, 4, 3).mean(axis=(1, 3)), atol=1e-6)
  assert degradations.resize(img, 32, 48, 'bicubic') is img


@pytest.mark.parametrize('gray', [False, True])
def test_gaussian_noise_has_the_requested_sigma(gray):
  img = np.full((256, 256, 3), 0.5, np.float32)
  noise = degradations.add_gaussian_noise(img, np.random.default_rng(0), 10.0, gray) - img
  assert noise.std() == pytest.approx(10 / 255, rel=0.02)
  assert abs(noise.mean()) < 1e-3
  channels_equal = np.array_equal(noise[..., 0], noise[..., 1])
  assert channels_equal == gray


def test_poisson_sampler_is_exact():
  rng = np.random.default_rng(0)
  for level in (0, 2, 40, 128, 255):
    for vals in (256, 32):
      draws = degradations.sample_poisson_levels(rng, np.full(50000, level, np.uint8), vals)
      lam = level / 255 * vals
      ks = np.arange(int(lam + 8 * math.sqrt(lam) + 8))
      expected = stats.poisson.pmf(ks, lam) * draws.size
      keep = expected > 5
      if keep.sum() < 2:
        assert np.all(draws == 0)
        continue
      observed = np.bincount(draws, minlength=ks.size)[:ks.size]
      chi2 = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
      assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4


@pytest.mark.parametrize('gray', [False, True])
def test_poisson_noise_variance_matches_definition(gray):
  # 8-bit level l, vals = 2^ceil(log2(#levels)): Var(noise) = scale^2 * l / (255 * vals).
  levels = np.tile(np.arange(256, dtype=np.uint8), 2048).reshape(2048, 256)  # all levels: vals = 256
  img = np.repeat((levels.astype(np.float32) / 255)[..., None], 3, axis=2)
  noise = degradations.add_poisson_noise(img, np.random.default_rng(1), 0.5, gray) - img
  for level in (60, 128):
    part = noise[levels == level]
    assert part.var() == pytest.approx(0.25 * level / (255 * 256), rel=0.1)
  assert np.array_equal(noise[..., 0], noise[..., 2]) == gray


def test_poisson_noise_statistics_match_basicsr():
  ref = _torch_reference()
  img = _image(128, 128)
  ours = degradations.add_poisson_noise(img, np.random.default_rng(2), 1.0, False) - img
  ref.torch.manual_seed(0)
  theirs = _from_torch(ref.degradations.add_poisson_noise_pt(_to_torch(ref, img), scale=1.0, gray_noise=0)) - img
  assert ours.std() == pytest.approx(theirs.std(), rel=0.05)


def test_jpeg_is_a_real_codec_on_the_8bit_grid():
  img = _image(64, 64)
  low, high = degradations.jpeg(img, 30), degradations.jpeg(img, 95)
  for out in (low, high):
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_array_equal(out * 255, np.rint(out * 255))
  assert np.mean((low - img) ** 2) > np.mean((high - img) ** 2)
  u8 = np.rint(img * 255).astype(np.uint8)
  ok, encoded = cv2.imencode('.jpg', u8[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 30])
  np.testing.assert_array_equal(np.rint(low * 255), cv2.imdecode(encoded, cv2.IMREAD_COLOR)[..., ::-1])


def test_jpeg_error_close_to_diffjpeg():
  # On a photo the codecs agree within about 1 dB; libjpeg's smoother chroma upsampling makes it the
  # more faithful one (DiffJPEG repeats chroma samples), more so on saturated synthetic colour.
  ref = _torch_reference()
  import skimage.data  # pylint: disable=g-import-not-at-top
  img = skimage.data.astronaut()[100:228, 150:278].astype(np.float32) / 255
  jpeger = ref.diffjpeg.DiffJPEG(differentiable=False)
  for quality in (30, 60, 95):
    ours = degradations.jpeg(img, quality)
    theirs = _from_torch(jpeger(_to_torch(ref, img), quality=ref.torch.tensor([float(quality)])))
    psnr = lambda a: -10 * np.log10(np.mean((a - img) ** 2))
    assert -0.3 < psnr(ours) - psnr(theirs) < 1.5


@pytest.mark.parametrize('name', degradations.PRESET_NAMES)
def test_degrade_contract_and_determinism(name):
  config = degradations.preset(name)
  hq = _image(64, 72)
  outs = [degradations.degrade(hq, np.random.default_rng([7, i]), config) for i in range(6)]
  for lq in outs:
    assert lq.shape == hq.shape and lq.dtype == np.float32
    assert 0.0 <= lq.min() and lq.max() <= 1.0
    np.testing.assert_array_equal(lq * 255, np.rint(lq * 255))
  again = degradations.degrade(hq, np.random.default_rng([7, 0]), config)
  np.testing.assert_array_equal(outs[0], again)
  assert not np.array_equal(outs[0], outs[1])
  rng = np.random.default_rng(11)
  rng.random()
  state = rng.bit_generator.state
  first = degradations.degrade(hq, rng, config)
  rng.bit_generator.state = state
  np.testing.assert_array_equal(first, degradations.degrade(hq, rng, config))


def test_degrade_handles_odd_and_tiny_shapes():
  config = degradations.preset('omgsr_1024')
  for shape in [(37, 53, 3), (8, 8, 3)]:
    hq = np.random.default_rng(0).random(shape).astype(np.float32)
    assert degradations.degrade(hq, np.random.default_rng(0), config).shape == shape
  with pytest.raises(ValueError):
    degradations.degrade(np.zeros((8, 8)), np.random.default_rng(0), config)


def test_presets_hold_the_facts_numbers():
  small, large, osediff = (degradations.preset(n) for n in ('omgsr_512', 'omgsr_1024', 'osediff'))
  assert (small.scale, small.kernel_sizes, small.sinc_size_split) == (4, tuple(range(7, 22, 2)), 13)
  assert (large.scale, large.kernel_sizes, large.sinc_size_split) == (8, tuple(range(11, 42, 2)), 25)
  assert small.stage1.noise_sigma == (1.0, 15.0) and small.stage2.noise_sigma == (1.0, 12.0)
  assert small.stage1.jpeg_quality == (60.0, 95.0) and small.stage2.jpeg_quality == (60.0, 100.0)
  assert small.stage2.blur_prob == 0.5 and small.final_sinc_prob == 0.8
  assert osediff.stage1.resize_range == (0.15, 1.5) and osediff.stage1.noise_sigma == (1.0, 30.0)
  assert osediff.stage2.blur_prob == 0.8 and osediff.stage2.jpeg_quality == (30.0, 95.0)
  assert osediff.stage2.poisson_scale == (0.05, 2.5)
  small.scale = 2
  assert degradations.preset('omgsr_512').scale == 4  # a fresh copy each call
  with pytest.raises(ValueError, match='unknown degradation preset'):
    degradations.preset('nope')
