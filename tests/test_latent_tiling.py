"""Latent tiling: the OSEDiff / OMGSR tile grid and Gaussian blend, against a direct port of the loop.

The reference (OSEDiff ``osediff.py`` forward with ``latent_tiled_size`` / ``latent_tiled_overlap``,
copied by OMGSR) counts tiles per axis with ``while cur < length: cur = max(n * tile - overlap * n, 0) +
tile; n += 1``, then visits ``for row in range(grid_rows): for col in range(grid_cols)`` (row: x, col:
y), offsets ``max(k * tile - overlap * k, 0)`` except the last row / column, which is flush with the
border (``w - tile`` / ``h - tile``). It is ported as written below, independently of tiling.py.
"""
import math

import numpy as np
import pytest

from sr_jax.inference import tiling


def reference_grid(h, w, tile_size, tile_overlap):
  """OSEDiff's grid loop, line for line (offsets as (y, x), in its visiting order)."""
  tile_size = min(tile_size, min(h, w))
  grid_rows = 0
  cur_x = 0
  while cur_x < w:
    cur_x = max(grid_rows * tile_size - tile_overlap * grid_rows, 0) + tile_size
    grid_rows += 1
  grid_cols = 0
  cur_y = 0
  while cur_y < h:
    cur_y = max(grid_cols * tile_size - tile_overlap * grid_cols, 0) + tile_size
    grid_cols += 1
  offsets = []
  ofs_x = ofs_y = None
  for row in range(grid_rows):
    for col in range(grid_cols):
      if col < grid_cols - 1 or row < grid_rows - 1:
        ofs_x = max(row * tile_size - tile_overlap * row, 0)
        ofs_y = max(col * tile_size - tile_overlap * col, 0)
      if row == grid_rows - 1:
        ofs_x = w - tile_size
      if col == grid_cols - 1:
        ofs_y = h - tile_size
      offsets.append((ofs_y, ofs_x))
  return tile_size, offsets


def reference_gaussian_weights(tile_width, tile_height):
  """OSEDiff's ``_gaussian_weights`` (numpy / math version, one channel)."""
  var = 0.01
  midpoint = (tile_width - 1) / 2
  x_probs = [math.exp(-(x - midpoint) * (x - midpoint) / (tile_width * tile_width) / (2 * var)) /
             math.sqrt(2 * math.pi * var) for x in range(tile_width)]
  midpoint = tile_height / 2
  y_probs = [math.exp(-(y - midpoint) * (y - midpoint) / (tile_height * tile_height) / (2 * var)) /
             math.sqrt(2 * math.pi * var) for y in range(tile_height)]
  return np.outer(y_probs, x_probs)


def reference_blend(tile_preds, offsets, h, w, tile):
  """OSEDiff's accumulation: ``noise_pred[..] += pred * weights; contributors[..] += weights``."""
  weights = reference_gaussian_weights(tile, tile)[..., None]
  noise_pred = np.zeros((h, w, tile_preds.shape[-1]))
  contributors = np.zeros((h, w, tile_preds.shape[-1]))
  for pred, (y, x) in zip(tile_preds, offsets):
    noise_pred[y:y + tile, x:x + tile] += pred * weights
    contributors[y:y + tile, x:x + tile] += weights
  return noise_pred / contributors


GRID_CASES = [  # (h, w, tile, overlap)
    (64, 64, 64, 32), (65, 64, 64, 32), (96, 128, 64, 32), (128, 96, 64, 32), (100, 200, 64, 32),
    (200, 100, 64, 16), (128, 128, 64, 32), (129, 257, 64, 32), (90, 90, 64, 0), (96, 160, 48, 24),
    (40, 100, 64, 16),  # the tile shrinks to 40, overlap 16 stays
    (17, 300, 64, 8), (300, 17, 64, 8),
]


@pytest.mark.parametrize('h,w,tile,overlap', GRID_CASES)
def test_grid_offsets_equal_the_reference_loop(h, w, tile, overlap):
  ref_tile, ref_offsets = reference_grid(h, w, tile, overlap)
  grid = tiling.latent_tile_grid(h, w, tile, overlap)
  assert grid.tile == ref_tile
  assert list(grid.offsets) == ref_offsets  # same tiles, same order
  assert len(grid) == len(ref_offsets)


def test_grid_for_known_sizes_by_hand():
  # 96 x 128 latent (768 x 1024 image), tile 64, overlap 32: ys 0, 32; xs 0, 32, 64.
  grid = tiling.latent_tile_grid(96, 128, 64, 32)
  assert grid.offsets == ((0, 0), (32, 0), (0, 32), (32, 32), (0, 64), (32, 64))
  # 100 wide: starts 0, 32 and then the flush tile at 36 (not 64, which would overrun).
  assert tiling.tile_starts(100, 64, 32) == [0, 32, 36]
  assert tiling.tile_starts(64, 64, 32) == [0]
  assert tiling.tile_starts(65, 64, 32) == [0, 1]
  assert tiling.tile_starts(128, 64, 32) == [0, 32, 64]


def test_overlap_not_below_a_shrunk_tile_falls_back_to_half_the_tile():
  # Latent 20 px tall: the tile shrinks to 20 <= overlap 32, where the reference would loop forever.
  grid = tiling.latent_tile_grid(20, 300, 64, 32)
  assert (grid.tile, grid.overlap) == (20, 10)
  _, ref_offsets = reference_grid(20, 300, 64, 10)
  assert list(grid.offsets) == ref_offsets


def test_tile_starts_rejects_bad_arguments():
  with pytest.raises(ValueError, match='must be in'):
    tiling.tile_starts(32, 64, 8)
  with pytest.raises(ValueError, match='overlap 64 must be smaller'):
    tiling.tile_starts(128, 64, 64)


@pytest.mark.parametrize('tile,overlap', [(64, 32), (48, 8), (32, 31)])
def test_grid_tiles_stay_inside_and_cover_every_position(tile, overlap):
  rng = np.random.default_rng(0)
  for h, w in [(int(a), int(b)) for a, b in rng.integers(8, 260, size=(40, 2))]:
    grid = tiling.latent_tile_grid(h, w, tile, overlap)
    cover = np.zeros((h, w), int)
    for y, x in grid.offsets:
      assert 0 <= y <= h - grid.tile and 0 <= x <= w - grid.tile
      cover[y:y + grid.tile, x:x + grid.tile] += 1
    assert cover.min() >= 1, (h, w)
    assert len(set(grid.offsets)) == len(grid.offsets)


@pytest.mark.parametrize('h,w', [(64, 64), (5, 7), (7, 5), (1, 3)])
def test_gaussian_weights_equal_the_reference_formula(h, w):
  ours = tiling.gaussian_tile_weights(h, w)
  np.testing.assert_allclose(ours, reference_gaussian_weights(w, h), rtol=1e-14, atol=0)
  assert ours.dtype == np.float64 and ours.shape == (h, w)


def test_gaussian_weights_keep_the_y_half_pixel_asymmetry():
  weights = tiling.gaussian_tile_weights(64, 64)
  np.testing.assert_allclose(weights, weights[:, ::-1], rtol=1e-14)  # symmetric in x: centre 31.5
  assert not np.allclose(weights, weights[::-1, :], rtol=1e-6)  # not in y: centre 32
  assert weights[32, 31] == weights.max() and weights[32, 32] == weights.max()
  np.testing.assert_allclose(weights[1:, :], weights[1:, :][::-1, :], rtol=1e-14)  # symmetric about y=32
  # Peak value: (1 / sqrt(2 pi 0.01))^2 times the x profile at +-0.5 px.
  peak = 1 / (2 * np.pi * 0.01) * np.exp(-0.25 / 64 ** 2 / 0.02)
  assert weights.max() == pytest.approx(peak, rel=1e-14)


def test_needs_tiling_only_when_the_latent_has_more_positions_than_a_tile():
  assert not tiling.needs_tiling(64, 64, 64)
  assert tiling.needs_tiling(64, 65, 64)
  assert not tiling.needs_tiling(32, 128, 64)  # 4096 positions = one tile, although 128 > 64 wide
  assert tiling.needs_tiling(33, 128, 64)
  assert not tiling.needs_tiling(10, 10, 64)


def test_blend_of_identical_constant_tiles_is_that_constant():
  grid = tiling.latent_tile_grid(100, 150, 64, 32)
  tiles = np.full((len(grid), 64, 64, 4), -0.7321, np.float32)
  out = tiling.blend_tiles(tiles, grid)
  assert out.shape == (100, 150, 4) and out.dtype == np.float32
  np.testing.assert_allclose(out, -0.7321, rtol=1e-6)


@pytest.mark.parametrize('h,w,tile,overlap', [(100, 150, 64, 32), (96, 96, 32, 8), (20, 300, 64, 32)])
def test_blend_tiles_equals_the_reference_accumulation(h, w, tile, overlap):
  rng = np.random.default_rng(1)
  grid = tiling.latent_tile_grid(h, w, tile, overlap)
  preds = rng.normal(size=(len(grid), grid.tile, grid.tile, 4)).astype(np.float32)
  theirs = reference_blend(preds.astype(np.float64), grid.offsets, h, w, grid.tile)
  np.testing.assert_allclose(tiling.blend_tiles(preds, grid), theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('eps_fn', [lambda t: t * 2, lambda t: np.tanh(t) * 3 + 1],
                         ids=['times2', 'tanh'])
@pytest.mark.parametrize('h,w', [(100, 150), (64, 200), (129, 65)])
def test_tiling_a_position_independent_fn_equals_the_untiled_fn(eps_fn, h, w):
  rng = np.random.default_rng(2)
  latent = rng.normal(size=(h, w, 4)).astype(np.float32)
  grid = tiling.latent_tile_grid(h, w, 64, 32)
  assert len(grid) > 1
  out = tiling.tiled_prediction(eps_fn, latent, grid, batch=3)
  np.testing.assert_allclose(out, eps_fn(latent), rtol=1e-6, atol=1e-6)


def _non_local_fn(tiles):
  """Depends on the whole tile (a box blur plus the tile mean): tiling changes it unless one tile."""
  blurred = (tiles + np.roll(tiles, 1, axis=1) + np.roll(tiles, 1, axis=2)) / 3
  return blurred - tiles.mean(axis=(1, 2, 3), keepdims=True)


@pytest.mark.parametrize('h,w,tile,overlap', [(64, 64, 64, 32), (40, 40, 64, 32), (32, 32, 96, 16)])
def test_one_tile_covering_the_whole_latent_equals_the_untiled_result(h, w, tile, overlap):
  # (40, 40) and (32, 32) are smaller than the tile: it shrinks to the latent, still one tile.
  rng = np.random.default_rng(3)
  latent = rng.normal(size=(h, w, 4)).astype(np.float32)
  grid = tiling.latent_tile_grid(h, w, tile, overlap)
  assert grid.offsets == ((0, 0),) and grid.tile == h
  out = tiling.tiled_prediction(_non_local_fn, latent, grid)
  np.testing.assert_allclose(out, _non_local_fn(latent[None])[0], rtol=1e-6, atol=1e-6)


def test_non_local_fn_shows_tiling_is_not_a_no_op():
  rng = np.random.default_rng(4)
  latent = rng.normal(size=(96, 128, 4)).astype(np.float32)
  grid = tiling.latent_tile_grid(96, 128, 64, 32)
  out = tiling.tiled_prediction(_non_local_fn, latent, grid)
  assert np.abs(out - _non_local_fn(latent[None])[0]).max() > 1e-3


def test_pad_batch_repeats_the_last_item():
  items = np.arange(5 * 2).reshape(5, 2)
  padded, count = tiling.pad_batch(items, 4)
  assert count == 5 and padded.shape == (8, 2)
  np.testing.assert_array_equal(padded[:5], items)
  np.testing.assert_array_equal(padded[5:], np.repeat(items[-1:], 3, axis=0))
  same, count = tiling.pad_batch(items, 5)
  assert same is items and count == 5


@pytest.mark.parametrize('n,batch,multiple,chunk', [
    (10, 4, 1, 4), (10, 4, 3, 3), (10, 2, 4, 4), (3, 8, 1, 8), (8, 8, 2, 8), (1, 1, 1, 1)])
def test_map_batched_pads_every_call_to_one_shape_and_trims(n, batch, multiple, chunk):
  items = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
  seen = []

  def fn(x):
    seen.append(x.copy())
    return x * 10 + 1

  out = tiling.map_batched(fn, items, batch, multiple)
  np.testing.assert_array_equal(out, items * 10 + 1)
  assert {s.shape for s in seen} == {(chunk, 3)}  # one shape: compiled once
  assert len(seen) == math.ceil(n / chunk)
  assert chunk % multiple == 0
  # Padding rows are copies of the chunk's last real item.
  last = seen[-1]
  real = n - chunk * (len(seen) - 1)
  np.testing.assert_array_equal(last[real:], np.repeat(items[-1:], chunk - real, axis=0))


def test_blending_clean_latents_equals_the_clean_latent_of_blended_epsilons():
  """The pipeline blends each tile's x0 (OMGSR Eq. 7 applied per tile); the reference blends eps
  and then takes one x0. Eq. 7 is affine in eps per pixel and the weights are normalised, so the
  two agree to float32 rounding."""
  rng = np.random.default_rng(5)
  latent = rng.normal(size=(40, 56, 4)).astype(np.float32)
  grid = tiling.latent_tile_grid(40, 56, 16, 8)
  assert len(grid) > 4
  alpha_bar = 0.6357
  eps_of_tile = lambda tiles: np.tanh(tiles * 1.7) + tiles.mean(axis=(1, 2), keepdims=True)
  x0 = lambda z, eps: (z - np.sqrt(1 - alpha_bar) * eps) / np.sqrt(alpha_bar)
  reference = x0(latent, tiling.tiled_prediction(eps_of_tile, latent, grid))
  ours = tiling.tiled_prediction(lambda tiles: x0(tiles, eps_of_tile(tiles)), latent, grid)
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('batch,multiple', [(3, 1), (4, 3), (100, 1)])
def test_progress_receives_one_monotone_count_per_batch_ending_at_the_total(batch, multiple):
  latent = np.random.default_rng(6).normal(size=(100, 150, 4)).astype(np.float32)
  grid = tiling.latent_tile_grid(100, 150, 64, 32)
  calls = []
  out = tiling.tiled_prediction(lambda t: t * 2, latent, grid, batch, multiple,
                                progress=lambda *args: calls.append(args))
  np.testing.assert_allclose(out, latent * 2, rtol=1e-6)
  chunk = max(multiple, batch - batch % multiple)  # map_batched's rounding of the batch
  total = math.ceil(len(grid) / chunk)
  assert calls == [('latent tiles', done, total) for done in range(1, total + 1)]


def test_map_batched_reports_progress_under_the_given_phase_after_each_call():
  seen = []
  fn = lambda x: seen.append(len(seen)) or x
  calls = []
  tiling.map_batched(fn, np.zeros((5, 2)), 2, progress=lambda *a: calls.append((*a, len(seen))),
                     phase='steps')
  assert calls == [('steps', 1, 3, 1), ('steps', 2, 3, 2), ('steps', 3, 3, 3)]
