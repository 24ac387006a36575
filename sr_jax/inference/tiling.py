"""Latent tiling of a one-step backbone: the OSEDiff / OMGSR tile grid and Gaussian blend.

When a latent is larger than the backbone's training size (OMGSR: ``h * w > tile ** 2`` with tile =
process_size / 8 = 64 latent px, overlap 32; OMGSR ``infer/omgsr_s_infer_model.py``), the reference
cuts it into square tiles, runs every tile through the UNet on its own, and blends the noise
predictions::

  eps(p) = sum_k g_k(p) eps_k(p) / sum_k g_k(p)        (g_k: the Gaussian weight map of tile k)

Then one clean latent (OMGSR Eq. 7) and one decode of the whole latent follow. The same routine is in
OSEDiff ``test_osediff.py``, S3Diff ``src/s3diff_tile.py``, OMGSR and SMFSR; we keep its details,
quirks included:

* grid: along each axis, starts ``0, s, 2s, ...`` (``s = tile - overlap``) while a tile still ends
  before the border, then one last tile flush with the border (``length - tile``);
* the tile shrinks to ``min(tile, h, w)`` on latents thinner than a tile; square tiles always;
* Gaussian weights with variance 0.01 of the tile side, **x-centre (W - 1) / 2 but y-centre H / 2**
  (an inherited off-by-half asymmetry, kept so that outputs match the reference);
* only when ``overlap >= tile`` (possible when the tile shrank) do we differ: the reference then loops
  forever, we use ``overlap = tile // 2``.

Progress: :func:`map_batched` and :func:`tiled_prediction` take an optional ``progress(phase, done,
total)`` (:data:`ProgressFn`, shared with the tiled VAE), called after every device call with the
number of batches done and the total, known before the first call; a large image otherwise runs for
minutes without a sign of life.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

GAUSSIAN_VARIANCE = 0.01
LATENT_TILES_PHASE = 'latent tiles'

# progress(phase, done, total): ``done`` of ``total`` batches (device calls) of ``phase`` finished.
ProgressFn = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """Square tiles of side ``tile`` at ``offsets`` (y0, x0) covering a ``height`` x ``width`` latent.

  Offsets are in the reference's order (outer loop over x starts, inner over y starts).
  """
  height: int
  width: int
  tile: int
  overlap: int
  offsets: tuple[tuple[int, int], ...]

  def __len__(self) -> int:
    return len(self.offsets)


def needs_tiling(height: int, width: int, tile: int) -> bool:
  """The reference's rule: tile only when the latent has more positions than one tile."""
  return height * width > tile * tile


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
  """Tile starts along one axis: ``n (tile - overlap)`` while a tile ends before ``length``, then one
  tile flush with the end (the reference's ``while cur < length`` grid loop)."""
  if not 0 < tile <= length:
    raise ValueError(f'tile {tile} must be in [1, {length}]')
  stride = tile - overlap
  if stride <= 0:
    raise ValueError(f'overlap {overlap} must be smaller than the tile {tile}')
  count = 1 + max(0, math.ceil((length - tile) / stride))
  return [n * stride for n in range(count - 1)] + [length - tile]


def latent_tile_grid(height: int, width: int, tile: int, overlap: int) -> TileGrid:
  """The reference grid for a ``height`` x ``width`` latent (see the module docstring)."""
  tile = min(tile, height, width)
  if overlap >= tile:
    overlap = tile // 2  # the reference would loop forever here
  ys = tile_starts(height, tile, overlap)
  xs = tile_starts(width, tile, overlap)
  offsets = tuple((y, x) for x in xs for y in ys)
  return TileGrid(height, width, tile, overlap, offsets)


def gaussian_tile_weights(height: int, width: int, variance: float = GAUSSIAN_VARIANCE) -> np.ndarray:
  """The reference's blend weights, (height, width) float64: ``outer(g_y, g_x)`` with
  ``g(i) = exp(-(i - c)^2 / n^2 / (2 var)) / sqrt(2 pi var)``, ``c = (W - 1) / 2`` along x and
  ``c = H / 2`` along y (the inherited asymmetry)."""
  def profile(n: int, centre: float) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    return np.exp(-(i - centre) ** 2 / (n * n) / (2 * variance)) / np.sqrt(2 * np.pi * variance)
  return np.outer(profile(height, height / 2), profile(width, (width - 1) / 2))


def extract_tiles(latent: np.ndarray, grid: TileGrid) -> np.ndarray:
  """(h, w, C) latent -> (N, tile, tile, C) tiles at the grid offsets."""
  t = grid.tile
  return np.stack([latent[y:y + t, x:x + t] for y, x in grid.offsets])


def blend_tiles(tiles: np.ndarray, grid: TileGrid,
                variance: float = GAUSSIAN_VARIANCE) -> np.ndarray:
  """Per-tile predictions (N, tile, tile, C) -> the Gaussian-weighted mean (h, w, C), float32.

  Accumulated in float64 (the reference accumulates float64 products into float32 buffers; the two
  agree to float32 rounding).
  """
  t = grid.tile
  weights = gaussian_tile_weights(t, t, variance)[..., None]
  total = np.zeros((grid.height, grid.width, tiles.shape[-1]), np.float64)
  norm = np.zeros((grid.height, grid.width, 1), np.float64)
  for tile, (y, x) in zip(tiles, grid.offsets):
    total[y:y + t, x:x + t] += weights * np.asarray(tile, np.float64)
    norm[y:y + t, x:x + t] += weights
  return (total / norm).astype(np.float32)


def pad_batch(items: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
  """Pads the leading axis to a multiple of ``multiple`` by repeating the last item; returns
  ``(padded, real count)``. Repeats (not zeros) keep the padding rows numerically harmless."""
  count = items.shape[0]
  extra = -count % multiple
  if extra:
    items = np.concatenate([items, np.repeat(items[-1:], extra, axis=0)])
  return items, count


def map_batched(fn: Callable[[np.ndarray], np.ndarray], items: np.ndarray, batch: int,
                multiple: int = 1, progress: ProgressFn | None = None,
                phase: str = LATENT_TILES_PHASE) -> np.ndarray:
  """``fn`` over ``items`` in chunks of ``batch`` (each padded to a multiple of ``multiple``, e.g. the
  device count), concatenated. Every call sees the same chunk shape, so ``fn`` compiles once.

  ``progress`` (None: not called) receives ``(phase, chunks done, chunks in all)`` after each call of
  ``fn``, once its output is on the host (so a device call is counted when it has finished).
  """
  batch = max(multiple, batch - batch % multiple)
  total = math.ceil(items.shape[0] / batch)
  outs = []
  for index, start in enumerate(range(0, items.shape[0], batch)):
    chunk, count = pad_batch(items[start:start + batch], batch)
    outs.append(np.asarray(fn(chunk))[:count])
    if progress is not None:
      progress(phase, index + 1, total)
  return np.concatenate(outs)


def tiled_prediction(predict_fn: Callable[[np.ndarray], np.ndarray], latent: np.ndarray,
                     grid: TileGrid, batch: int = 8, multiple: int = 1,
                     progress: ProgressFn | None = None) -> np.ndarray:
  """The blended prediction over a (h, w, C) latent: every tile through ``predict_fn`` (batches of
  ``batch`` tiles, padded to a multiple of ``multiple``), then :func:`blend_tiles`.

  ``predict_fn`` may return the backbone output (the reference blends epsilon) or the clean latent
  computed from it: one-step predictions are affine in the backbone output per pixel, and the blend
  weights are normalised, so both orders give the same latent (``tests/test_latent_tiling.py``).
  ``progress``: as in :func:`map_batched`, phase ``'latent tiles'``, counted in tile batches.
  """
  tiles = extract_tiles(latent, grid)
  return blend_tiles(map_batched(predict_fn, tiles, batch, multiple, progress), grid)
