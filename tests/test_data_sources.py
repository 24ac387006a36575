"""Image sources: listing, every bad-input kind (files made here), conversions, crops, skip policy."""
import io
import logging

import cv2
import numpy as np
import pytest
from PIL import Image

from sr_jax.data import pipeline
from sr_jax.data import sources


def _gradient(h=48, w=64):
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def _save(img: Image.Image, path, **kwargs):
  img.save(path, **kwargs)
  return str(path)


@pytest.fixture
def good_png(tmp_path):
  return _save(Image.fromarray(_gradient()), tmp_path / 'good.png')


def test_listing_is_recursive_sorted_and_filters_extensions(tmp_path):
  (tmp_path / 'b' / 'c').mkdir(parents=True)
  for name in ['b/c/z.PNG', 'b/a.webp', 'x.bmp', 'y.tif', 'w.jpeg', 'notes.txt', 'b/readme.md']:
    fmt = {'.png': 'PNG', '.webp': 'WEBP', '.bmp': 'BMP', '.tif': 'TIFF', '.jpeg': 'JPEG'}.get(
        name[name.rfind('.'):].lower())
    if fmt:
      _save(Image.fromarray(_gradient()), tmp_path / name, format=fmt)
    else:
      (tmp_path / name).write_text('x')
  listed = [p[len(str(tmp_path)) + 1:] for p in sources.list_source(str(tmp_path))]
  assert listed == ['w.jpeg', 'x.bmp', 'y.tif', 'b/a.webp', 'b/c/z.PNG']
  for path in sources.list_source(str(tmp_path)):
    assert sources.load_rgb(path).shape == (48, 64, 3)


def test_text_lists_resolve_relative_paths_and_skip_comments(tmp_path, good_png):
  (tmp_path / 'list.txt').write_text(f'# LSDIR-style list\n\ngood.png\n{good_png}\n')
  assert sources.list_source(str(tmp_path / 'list.txt')) == [good_png, good_png]


def test_build_index_flags_and_repeats(tmp_path):
  (tmp_path / 'faces').mkdir()
  face = _save(Image.fromarray(_gradient(100, 100)), tmp_path / 'faces' / 'f.png')
  (tmp_path / 'ffhq.txt').write_text(face + '\n')
  entries = sources.build_index([str(tmp_path / 'ffhq.txt'), 'skimage:astronaut'], [True, False], [3, 1])
  assert [e.resize_to_crop for e in entries] == [True, True, True, False]
  assert sources.load_rgb(entries[0], crop_size=64).shape == (64, 64, 3)  # whole face resized to the crop
  with pytest.raises(ValueError, match='2 paths'):
    sources.build_index([str(tmp_path / 'ffhq.txt'), 'skimage:'], [True, False, True])


def _bytes(img: Image.Image, **kwargs) -> bytes:
  buffer = io.BytesIO()
  img.save(buffer, **kwargs)
  return buffer.getvalue()


@pytest.mark.parametrize('kind', ['empty', 'truncated_png', 'truncated_jpeg', 'garbage', 'text_as_png',
                                  'float_tiff', 'tiny', 'missing'])
def test_unusable_files_raise_bad_image_with_a_reason(tmp_path, kind):
  path = tmp_path / f'{kind}.png'
  png = _bytes(Image.fromarray(_gradient()), format='PNG')
  jpeg = _bytes(Image.fromarray(_gradient()), format='JPEG')
  data = {'empty': b'', 'truncated_png': png[:len(png) // 2], 'truncated_jpeg': jpeg[:len(jpeg) // 2],
          'garbage': np.random.default_rng(0).bytes(2000), 'text_as_png': b'hello, not an image',
          'float_tiff': _bytes(Image.fromarray(np.ones((40, 40), np.float32)), format='TIFF'),
          'tiny': _bytes(Image.fromarray(_gradient(4, 5)), format='PNG')}.get(kind)
  if data is not None:
    path.write_bytes(data)
  with pytest.raises(sources.BadImageError) as error:
    sources.load_rgb(str(path), min_side=32)
  reason = str(error.value)
  expected = {'empty': 'empty', 'tiny': 'too small', 'missing': 'cannot read', 'float_tiff': 'mode F'}
  assert expected.get(kind, 'cannot decode') in reason


def test_gray_palette_and_alpha_images_become_rgb(tmp_path):
  gray = _gradient()[..., 0]
  out = sources.load_rgb(_save(Image.fromarray(gray), tmp_path / 'gray.png'))
  assert out.shape == (48, 64, 3) and np.array_equal(out[..., 0], gray) and np.array_equal(out[..., 2], gray)
  rgba = np.dstack([_gradient(), np.full((48, 64), 255, np.uint8)])
  rgba[:10, :10, 3] = 0  # fully transparent corner -> white
  out = sources.load_rgb(_save(Image.fromarray(rgba, 'RGBA'), tmp_path / 'rgba.png'))
  assert np.all(out[:10, :10] == 255) and np.array_equal(out[20:, 20:], _gradient()[20:, 20:])
  la = np.dstack([gray, np.full_like(gray, 128)])
  out = sources.load_rgb(_save(Image.fromarray(la, 'LA'), tmp_path / 'la.png'))
  expected = np.rint(gray * (128 / 255) + 255 * (127 / 255))
  assert np.abs(out[..., 1].astype(float) - expected).max() <= 1
  palette = Image.fromarray(_gradient()).convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
  out = sources.load_rgb(_save(palette, tmp_path / 'p.png'))
  assert out.shape == (48, 64, 3) and np.array_equal(out, np.asarray(palette.convert('RGB')))
  out = sources.load_rgb(_save(palette, tmp_path / 'p_transparent.png', transparency=0))
  assert out.shape == (48, 64, 3)


def test_16bit_png_is_rounded_to_8bit(tmp_path):
  gray16 = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
  cv2.imwrite(str(tmp_path / 'g16.png'), gray16)
  out = sources.load_rgb(str(tmp_path / 'g16.png'))
  np.testing.assert_array_equal(out[..., 1], np.rint(gray16 / 257).astype(np.uint8))
  rgb16 = np.stack([gray16, 65535 - gray16, gray16 // 2], -1)
  cv2.imwrite(str(tmp_path / 'rgb16.png'), rgb16[..., ::-1])
  out = sources.load_rgb(str(tmp_path / 'rgb16.png'))
  assert np.abs(out.astype(int) - (rgb16 / 257)).max() <= 1


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
  cmyk = Image.new('CMYK', (48, 40), (0, 255, 0, 0))  # full magenta ink
  out = sources.load_rgb(_save(cmyk, tmp_path / 'cmyk.jpg', quality=95))
  assert out.shape == (40, 48, 3)
  assert np.abs(out.reshape(-1, 3).mean(0) - [255, 0, 255]).max() < 8


def test_exif_orientation_is_applied(tmp_path):
  img = Image.fromarray(_gradient(40, 64))
  exif = Image.Exif()
  exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
  out = sources.load_rgb(_save(img, tmp_path / 'rot.jpg', exif=exif, quality=98))
  assert out.shape == (64, 40, 3)
  expected = np.asarray(img.transpose(Image.Transpose.ROTATE_270))
  assert np.abs(out.astype(int) - expected).mean() < 3


def test_random_crop_reflect_pads_small_images_and_flips():
  img = _gradient(40, 50)
  rng = np.random.default_rng(0)
  crop = sources.random_crop(img, 64, rng)
  assert crop.shape == (64, 64, 3)
  big = _gradient(100, 120)
  crop = sources.random_crop(big, 64, np.random.default_rng(1))
  found = [(y, x) for y in range(37) for x in range(57) if np.array_equal(big[y:y + 64, x:x + 64], crop)]
  assert len(found) == 1
  flips = [sources.random_hflip(big, np.random.default_rng(i)) is not big for i in range(200)]
  assert 70 < sum(flips) < 130
  flipped = next(sources.random_hflip(big, np.random.default_rng(i)) for i in range(200)
                 if sources.random_hflip(big, np.random.default_rng(i)) is not big)
  np.testing.assert_array_equal(flipped, big[:, ::-1])


def test_skimage_source_loads_offline():
  for name in sources.SKIMAGE_PHOTOS:
    img = sources.load_rgb('skimage:' + name)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
  with pytest.raises(sources.BadImageError):
    sources.load_rgb('skimage:not_a_photo')


def test_sources_without_a_readable_image_fail_at_start(tmp_path):
  (tmp_path / 'bad').mkdir()
  (tmp_path / 'bad' / 'a.jpg').write_bytes(b'')
  (tmp_path / 'bad' / 'b.png').write_bytes(b'not a png')
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'missing.txt').write_text('nowhere/1.png\nnowhere/2.png\n')
  for source, message in [(tmp_path / 'bad', 'none of the first 2 of 2 files'),
                          (tmp_path / 'empty', 'contains no'), (tmp_path / 'missing.txt', 'cannot read'),
                          (tmp_path / 'nope', 'neither a folder')]:
    config = pipeline.source_config([str(source)], crop_size=32)
    with pytest.raises(ValueError, match=message):
      pipeline.make_pair_maker(config, seed=0)


def test_pair_maker_skips_bad_files_deterministically_and_logs_once(tmp_path, caplog):
  folder = tmp_path / 'mixed'
  folder.mkdir()
  for i in range(3):
    _save(Image.fromarray(np.roll(_gradient(80, 80), 7 * i, axis=1)), folder / f'good{i}.png')
  (folder / 'empty.png').write_bytes(b'')
  (folder / 'trunc.jpg').write_bytes(_bytes(Image.fromarray(_gradient(80, 80)), format='JPEG')[:300])
  _save(Image.fromarray(_gradient(8, 8)), folder / 'tiny.png')
  config = pipeline.source_config([str(folder)], crop_size=32, preset='omgsr_512')
  maker = pipeline.make_pair_maker(config, seed=3)
  before = sources.SKIPS.count
  with caplog.at_level(logging.WARNING):
    first = [maker(i) for i in range(12)]  # two epochs of 6 files, 3 of them bad
  assert sources.SKIPS.count - before >= 6
  for name in ('empty.png', 'trunc.jpg', 'tiny.png'):
    lines = [r for r in caplog.records if name in r.getMessage()]
    assert len(lines) == 1 and 'skipping image' in lines[0].getMessage()  # once per path, with the reason
    assert str(folder / name) in sources.SKIPS.bad_paths
  again = pipeline.make_pair_maker(config, seed=3)
  for i, record in enumerate(first):
    assert record['hq'].shape == (32, 32, 3) and record['lq'].shape == (32, 32, 3)
    np.testing.assert_array_equal(record['lq'], again(i)['lq'])
