"""Image sources for training: folders, path lists, the bundled scikit-image photos; decoding and crops.

A source is one string:
  - a folder: every image below it, recursively (.jpg .jpeg .png .webp .bmp .tif .tiff, any case), sorted;
  - a text file (`.txt`): one image path a line (LSDIR / FFHQ style lists; blank and '#' lines ignored;
    relative paths are taken relative to the text file's folder);
  - `skimage:` or `skimage:name,name`: photos bundled with scikit-image (no download), for tiny runs.

Bad-input policy. Files are decoded with Pillow and converted to RGB uint8 where that is meaningful:
grayscale / palette / CMYK / YCbCr -> RGB; RGBA / LA / transparent palette -> composited on white;
16-bit grayscale -> rounded to 8 bit (16-bit RGB PNGs are reduced to 8 bit by Pillow); EXIF orientation
applied. Files that are empty, truncated, undecodable, of an unknown value range (float mode 'F') or whose
short side is below `min_image_side` raise `BadImageError`; the pipeline skips them with one logged line
per path (path + reason) and counts every skip in `SKIPS`. `check_sources` fails at start, with a clear
message, for a source that lists no file or none that decodes.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import threading
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.tif', '.tiff')
SKIMAGE_PREFIX = 'skimage:'
# Natural photographs bundled with scikit-image (load offline); colour first, then grayscale.
SKIMAGE_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry',
                  'retina', 'camera', 'moon', 'coins', 'brick', 'grass', 'gravel', 'clock', 'cell', 'page',
                  'text')
SKIMAGE_COLOR_PHOTOS = SKIMAGE_PHOTOS[:7]
_LOG = logging.getLogger(__name__)


class BadImageError(Exception):
  """An image that cannot be used; the message is the reason that gets logged."""


@dataclasses.dataclass(frozen=True)
class ImageEntry:
  """One training image: where it is and whether it is resized whole to the crop size (FFHQ faces)."""
  path: str
  resize_to_crop: bool = False


class SkipLog:
  """Counts skipped reads; logs one line per bad path (per process). Thread-safe."""

  def __init__(self):
    self._lock = threading.Lock()
    self.count = 0
    self.bad_paths: dict[str, str] = {}

  def record(self, path: str, reason: str) -> None:
    with self._lock:
      self.count += 1
      if path in self.bad_paths:
        return
      self.bad_paths[path] = reason
    _LOG.warning('skipping image %s: %s', path, reason)

  def known_bad(self, path: str) -> str | None:
    return self.bad_paths.get(path)


SKIPS = SkipLog()  # this process's skips (each grain worker process has its own)


# --------------------------------------------------------------------------------------------------
# Listing.
# --------------------------------------------------------------------------------------------------
def _list_folder(folder: str) -> list[str]:
  found = []
  for root, dirs, files in os.walk(folder, followlinks=True):
    dirs.sort()
    found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
  return found


def _list_text(list_file: str) -> list[str]:
  base = os.path.dirname(os.path.abspath(list_file))
  with open(list_file, encoding='utf-8') as f:
    lines = [line.strip() for line in f]
  return [line if os.path.isabs(line) else os.path.join(base, line)
          for line in lines if line and not line.startswith('#')]


def list_source(source: str) -> list[str]:
  """Image paths of one source string (folder, .txt list or `skimage:[names]`), in a fixed order."""
  if source.startswith(SKIMAGE_PREFIX):
    names = [n for n in source[len(SKIMAGE_PREFIX):].split(',') if n] or list(SKIMAGE_PHOTOS)
    return [SKIMAGE_PREFIX + n for n in names]
  if os.path.isdir(source):
    paths = _list_folder(source)
    if not paths:
      raise ValueError(f'image source {source!r} contains no {"/".join(IMAGE_EXTENSIONS)} files')
    return paths
  if os.path.isfile(source) and source.lower().endswith('.txt'):
    paths = _list_text(source)
    if not paths:
      raise ValueError(f'image list {source!r} lists no paths')
    return paths
  raise ValueError(f'image source {source!r} is neither a folder, a .txt list nor "{SKIMAGE_PREFIX}[names]"')


def _per_source(values, count: int, default, name: str) -> list:
  """Broadcasts a scalar or a 0/1-element list to `count` sources; checks a longer list's length."""
  if values is None or isinstance(values, (bool, int)):
    return [default if values is None else values] * count
  values = list(values)
  if len(values) in (0, 1):
    return [values[0] if values else default] * count
  if len(values) != count:
    raise ValueError(f'{name} has {len(values)} entries for {count} paths')
  return values


def list_sources(paths: Sequence[str]) -> dict[str, list[str]]:
  """{source: its image paths} for every source string (each listed once)."""
  if isinstance(paths, str):
    paths = [paths]
  if not paths:
    raise ValueError('no image sources given')
  return {source: list_source(source) for source in paths}


def build_index(paths: Sequence[str], resize_to_crop=None, repeats=None,
                listed: dict[str, list[str]] | None = None) -> list[ImageEntry]:
  """All images of `paths`; `resize_to_crop` and `repeats` are a value or one value per path.

  `listed` (from `list_sources`) avoids listing the folders again.
  """
  listed = listed or list_sources(paths)
  flags = _per_source(resize_to_crop, len(listed), False, 'resize_to_crop')
  counts = _per_source(repeats, len(listed), 1, 'repeats')
  entries = []
  for (source, files), flag, count in zip(listed.items(), flags, counts):
    entries.extend([ImageEntry(p, bool(flag)) for p in files] * int(count))
  return entries


# --------------------------------------------------------------------------------------------------
# Decoding.
# --------------------------------------------------------------------------------------------------
def _composite_on_white(img: Image.Image) -> Image.Image:
  rgba = img.convert('RGBA')
  background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(background, rgba).convert('RGB')


def to_rgb(img: Image.Image) -> Image.Image:
  """Pillow image of any common mode -> 8-bit RGB (see the module docstring for the rules)."""
  mode = img.mode
  if mode == 'RGB':
    return img
  if mode.startswith('I'):  # 16-bit PNG / TIFF gray ('I;16*'), or 32-bit integer holding 16-bit values
    values = np.asarray(img).astype(np.float64)
    if values.size and (values.min() < 0 or values.max() > 65535):
      raise BadImageError(f'integer image (mode {mode}) outside the 16-bit range')
    gray = np.rint(values / 257.0).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))
  if mode == 'F':
    raise BadImageError('floating-point image (mode F) has no defined value range')
  if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (mode == 'P' and 'transparency' in img.info):
    return _composite_on_white(img)
  return img.convert('RGB')  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _check_size(width: int, height: int, min_side: int) -> None:
  if min(width, height) < min_side:
    raise BadImageError(f'too small ({width}x{height}; the short side must be >= {min_side})')


def decode_image(data: bytes, min_side: int = 1) -> Image.Image:
  """Encoded bytes -> RGB Pillow image, EXIF orientation applied; raises BadImageError."""
  if not data:
    raise BadImageError('empty file')
  try:
    img = Image.open(io.BytesIO(data))
    _check_size(img.width, img.height, min_side)  # before decoding pixels: cheap rejection
    img.load()
    try:
      img = ImageOps.exif_transpose(img)
    except Exception:  # pylint: disable=broad-except  # broken EXIF: keep the stored orientation
      pass
    img = to_rgb(img)
  except BadImageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # Pillow raises many types for bad data
    raise BadImageError(f'cannot decode ({type(e).__name__}: {e})') from e
  _check_size(img.width, img.height, min_side)
  return img


@functools.lru_cache(maxsize=None)
def _load_skimage(name: str) -> Image.Image:
  """A bundled photo as RGB (cached per process: 17 small images)."""
  import skimage.data  # pylint: disable=g-import-not-at-top  # only for the bundled-photo source
  if name not in SKIMAGE_PHOTOS:
    raise BadImageError(f'not a bundled scikit-image photo (known: {", ".join(SKIMAGE_PHOTOS)})')
  array = getattr(skimage.data, name)()
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=2)
  return to_rgb(Image.fromarray(np.ascontiguousarray(array[..., :3]).astype(np.uint8)))


def load_rgb(entry: ImageEntry | str, crop_size: int = 0, min_side: int = 1) -> np.ndarray:
  """Reads one image as uint8 (H, W, 3) RGB; resized whole to crop_size^2 (Lanczos) if the entry asks.

  Raises BadImageError with the reason for any unusable file (missing, empty, truncated, ...).
  """
  if isinstance(entry, str):
    entry = ImageEntry(entry)
  path = entry.path
  if path.startswith(SKIMAGE_PREFIX):
    img = _load_skimage(path[len(SKIMAGE_PREFIX):])
  else:
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:
      raise BadImageError(f'cannot read ({type(e).__name__}: {e.strerror or e})') from e
    img = decode_image(data, min_side)
  if entry.resize_to_crop and crop_size and img.size != (crop_size, crop_size):
    img = img.resize((crop_size, crop_size), Image.Resampling.LANCZOS)
  return np.asarray(img, dtype=np.uint8)


def check_sources(listed: dict[str, list[str]], min_side: int = 1, max_tries: int = 1000) -> None:
  """Fails with a clear message when a source has no readable image (tries its files in order).

  `listed` is `list_sources(paths)`. Gives up on a source after `max_tries` bad files in a row.
  """
  for source, files in listed.items():
    reasons = []
    for path in files[:max_tries]:
      try:
        load_rgb(ImageEntry(path), min_side=min_side)
        break
      except BadImageError as e:
        reasons.append(f'{path}: {e}')
    else:
      shown = '; '.join(reasons[:3])
      raise ValueError(f'image source {source!r}: none of the first {len(reasons)} of {len(files)} files '
                       f'is a readable image (min side {min_side}). First errors: {shown}')


# --------------------------------------------------------------------------------------------------
# Crops.
# --------------------------------------------------------------------------------------------------
def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A random size x size crop; a side shorter than `size` is reflect-padded at a random offset first."""
  height, width = img.shape[:2]
  pad_h, pad_w = max(0, size - height), max(0, size - width)
  top, left = int(rng.integers(pad_h + 1)), int(rng.integers(pad_w + 1))
  if pad_h or pad_w:
    img = np.pad(img, ((top, pad_h - top), (left, pad_w - left), (0, 0)), mode='reflect')
  y = int(rng.integers(img.shape[0] - size + 1))
  x = int(rng.integers(img.shape[1] - size + 1))
  return img[y:y + size, x:x + size]


def random_hflip(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors left-right with probability 1/2."""
  return img[:, ::-1] if rng.random() < 0.5 else img
