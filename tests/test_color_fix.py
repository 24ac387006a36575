"""AdaIN and wavelet colour fix equal a PyTorch port of StableSR's ``colorfix.py``; their properties.

The reference below follows StableSR ``scripts/wavelet_color_fix.py`` (as copied by OSEDiff / OMGSR):
``calc_mean_std`` (unbiased variance + 1e-5), ``adaptive_instance_normalization``, ``wavelet_blur``
(the [[1,2,1],[2,4,2],[1,2,1]]/16 kernel, ``F.conv2d`` with ``dilation=radius`` after replicate
padding of ``radius = 2**i``), 5-level ``wavelet_decomposition`` and ``wavelet_reconstruction``
(high frequency of the content + low frequency of the style). Ours is NHWC, theirs NCHW.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.inference import color_fix

torch = pytest.importorskip('torch')
F = torch.nn.functional


# ------------------------------------------------------------------------- StableSR in PyTorch


def ref_calc_mean_std(feat, eps=1e-5):
  b, c = feat.shape[:2]
  var = feat.reshape(b, c, -1).var(dim=2) + eps  # torch's default: unbiased
  return feat.reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1), var.sqrt().reshape(b, c, 1, 1)


def ref_adain(content, style):
  style_mean, style_std = ref_calc_mean_std(style)
  content_mean, content_std = ref_calc_mean_std(content)
  return (content - content_mean) / content_std * style_std + style_mean


def ref_wavelet_blur(image, radius):
  kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]],
                        dtype=image.dtype)
  channels = image.shape[1]
  kernel = kernel[None, None].repeat(channels, 1, 1, 1)
  image = F.pad(image, (radius, radius, radius, radius), mode='replicate')
  return F.conv2d(image, kernel, groups=channels, dilation=radius)


def ref_wavelet_decomposition(image, levels=5):
  high = torch.zeros_like(image)
  for i in range(levels):
    low = ref_wavelet_blur(image, 2 ** i)
    high += image - low
    image = low
  return high, low


def ref_wavelet_reconstruction(content, style):
  content_high, _ = ref_wavelet_decomposition(content)
  _, style_low = ref_wavelet_decomposition(style)
  return content_high + style_low


def _to_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _to_nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


def _images(shape=(2, 40, 56, 3), seed=0):
  """A detailed 'SR output' and a colour-shifted, smoother 'upscaled LQ', both in [0, 1]."""
  rng = np.random.default_rng(seed)
  target = rng.random(shape, dtype=np.float32)
  source = np.clip(0.6 * target + 0.3 * rng.random(shape[-1:], dtype=np.float32) +
                   0.05 * rng.random(shape, dtype=np.float32), 0, 1).astype(np.float32)
  return target, source


# -------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize('shape', [(2, 40, 56, 3), (1, 33, 17, 3)])
def test_adain_equals_stablesr_adaptive_instance_normalization(shape):
  target, source = _images(shape)
  theirs = _to_nhwc(ref_adain(_to_nchw(target), _to_nchw(source)))
  ours = np.asarray(color_fix.adain_color_fix(target, source))
  np.testing.assert_allclose(ours, theirs, atol=2e-6)
  np.testing.assert_allclose(np.asarray(color_fix.apply_color_fix('adain', target, source)),
                             np.clip(theirs, 0, 1), atol=2e-6)


@pytest.mark.parametrize('shape', [(2, 40, 56, 3), (1, 33, 17, 3)])
def test_wavelet_color_fix_equals_stablesr_wavelet_reconstruction(shape):
  # (1, 33, 17): the level-5 padding (16) is almost the whole width; replicate padding must still match.
  target, source = _images(shape, seed=1)
  theirs = _to_nhwc(ref_wavelet_reconstruction(_to_nchw(target), _to_nchw(source)))
  ours = np.asarray(color_fix.wavelet_color_fix(target, source))
  np.testing.assert_allclose(ours, theirs, atol=5e-6)
  np.testing.assert_allclose(np.asarray(color_fix.apply_color_fix('wavelet', target, source)),
                             np.clip(theirs, 0, 1), atol=5e-6)
  # The clamp matters on these inputs (the fix overshoots [0, 1]), so the comparison above tests it.
  assert theirs.min() < 0 or theirs.max() > 1


@pytest.mark.parametrize('dilation', [1, 2, 4, 8, 16])
def test_wavelet_blur_level_equals_dilated_conv2d_with_replicate_padding(dilation):
  image, _ = _images((1, 37, 45, 3), seed=2)
  theirs = _to_nhwc(ref_wavelet_blur(_to_nchw(image), dilation))
  np.testing.assert_allclose(np.asarray(color_fix.wavelet_blur(jnp.asarray(image), dilation)), theirs,
                             atol=1e-6)


def test_wavelet_decomposition_bands_equal_reference():
  image, _ = _images((1, 48, 48, 3), seed=3)
  high_t, low_t = ref_wavelet_decomposition(_to_nchw(image))
  high, low = color_fix.wavelet_decomposition(image)
  np.testing.assert_allclose(np.asarray(high), _to_nhwc(high_t), atol=5e-6)
  np.testing.assert_allclose(np.asarray(low), _to_nhwc(low_t), atol=5e-6)


# ---------------------------------------------------------------------------------- properties


def test_adain_output_has_the_source_channel_mean_and_std():
  target, source = _images((2, 40, 56, 3), seed=4)
  out = np.asarray(color_fix.adain_color_fix(target, source), np.float64)
  t, s = target.astype(np.float64), source.astype(np.float64)
  np.testing.assert_allclose(out.mean(axis=(1, 2)), s.mean(axis=(1, 2)), atol=1e-6)
  # Exactly: var_out = var_t / (var_t + eps) * (var_s + eps) (the eps in both normalisations).
  var_t, var_s = t.var(axis=(1, 2), ddof=1), s.var(axis=(1, 2), ddof=1)
  np.testing.assert_allclose(out.var(axis=(1, 2), ddof=1), var_t / (var_t + 1e-5) * (var_s + 1e-5),
                             rtol=1e-5)
  # ... which is the source's std to within eps / var (here < 1e-3 relative).
  np.testing.assert_allclose(out.std(axis=(1, 2), ddof=1), s.std(axis=(1, 2), ddof=1), rtol=1e-3)
  assert not np.allclose(t.std(axis=(1, 2)), s.std(axis=(1, 2)), rtol=0.1)  # it really moved


def test_channel_mean_std_are_per_image_and_per_channel():
  target, _ = _images((3, 20, 24, 3), seed=5)
  target[1] *= 0.25
  mean, std = color_fix.channel_mean_std(target)
  assert mean.shape == std.shape == (3, 1, 1, 3)
  for n in range(3):
    for c in range(3):
      x = target[n, ..., c].astype(np.float64)
      assert float(mean[n, 0, 0, c]) == pytest.approx(x.mean(), rel=1e-6)
      assert float(std[n, 0, 0, c]) == pytest.approx(np.sqrt(x.var(ddof=1) + 1e-5), rel=1e-5)


@pytest.mark.parametrize('method', ['adain', 'wavelet'])
def test_batched_fix_equals_per_image_fix(method):
  target, source = _images((3, 32, 40, 3), seed=6)
  batched = np.asarray(color_fix.apply_color_fix(method, target, source))
  single = np.stack([np.asarray(color_fix.apply_color_fix(method, target[i], source[i]))
                     for i in range(3)])
  np.testing.assert_allclose(batched, single, atol=1e-6)


def test_wavelet_high_plus_low_reconstructs_the_image():
  image, _ = _images((2, 45, 50, 3), seed=7)
  high, low = color_fix.wavelet_decomposition(image)
  np.testing.assert_allclose(np.asarray(high + low), image, atol=2e-6)
  # The residual low band is much smoother than the image, and the high band has ~zero mean.
  assert np.abs(np.diff(np.asarray(low), axis=1)).mean() < 0.1 * np.abs(np.diff(image, axis=1)).mean()
  assert abs(float(np.asarray(high).mean())) < 1e-2


def test_wavelet_of_a_constant_image_is_all_low_frequency():
  image = np.full((1, 24, 30, 3), 0.37, np.float32)
  high, low = color_fix.wavelet_decomposition(image)
  np.testing.assert_allclose(np.asarray(low), image, atol=1e-6)
  np.testing.assert_allclose(np.asarray(high), 0, atol=1e-6)


@pytest.mark.parametrize('method', ['adain', 'wavelet'])
def test_fixing_an_image_towards_itself_returns_it(method):
  image, _ = _images((1, 32, 32, 3), seed=8)
  np.testing.assert_allclose(np.asarray(color_fix.apply_color_fix(method, image, image)), image,
                             atol=3e-6)


def test_none_is_identity_and_unknown_method_raises():
  target, source = _images((1, 16, 16, 3), seed=9)
  out = color_fix.apply_color_fix('none', target, source)
  np.testing.assert_array_equal(np.asarray(out), target)
  with pytest.raises(ValueError, match="unknown colour fix 'histogram'"):
    color_fix.apply_color_fix('histogram', target, source)
  assert set(color_fix.COLOR_FIXES) == {'adain', 'wavelet', 'none'}
