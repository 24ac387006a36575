"""`TiledVAE` (GroupNorm-synchronised stage-by-stage tiles) equals the untiled `AutoencoderKL`.

A tiny random VAE (3 levels, factor 4, mid-block attention, 8 norm groups) whose GroupNorm scales
and every bias are randomised, so a wrong statistic, mask or halo shows up. Tolerance (float32): max abs
difference <= 1e-4 on outputs of scale ~1-3 (`ATOL`); measured ~3e-6, i.e. summation-order rounding.
Decoding a tile on its own differs from the full decode by ~1.3 (last test: asserted > 1e-2).

Windowed attention (above ``attention_max_tokens``): equal to the exact mode when the window covers
the latent; an approximation otherwise, whose error on the 16x20 latent with tile 4 and margin 4 is
the figure ``benchmarks/tiled_vae_attention.py`` measures (case ``test``, ``benchmarks/RESULTS.md``).
"""
import functools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import tiny_diffusers
from sr_jax.inference import tiled_vae
from sr_jax.inference.tiled_vae import TiledVAE, combine_moments
from sr_jax.models.vae import AutoencoderKL

ATOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(block_out_channels=[32, 64, 64], down_block_types=['DownEncoderBlock2D'] * 3,
              up_block_types=['UpDecoderBlock2D'] * 3, layers_per_block=1, latent_channels=4,
              norm_num_groups=8)
FACTOR = 4


def tiny_vae(seed: int = 0):
  """The tiny VAE and random params (``tiny_diffusers.random_flax_vae``: randomised norms and
  biases, so a wrong statistic, mask or halo shows up)."""
  return tiny_diffusers.random_flax_vae(CONFIG, seed)


VAE, PARAMS = tiny_vae()


@functools.cache
def full_encode(h: int, w: int):
  image = np.random.default_rng(h * 1000 + w).uniform(-1, 1, (h, w, 3)).astype(np.float32)
  mean, logvar = jax.jit(lambda p, x: VAE.apply({'params': p}, x, method='encode'))(
      PARAMS, image[None])
  return image, np.asarray(mean[0]), np.asarray(logvar[0])


@functools.cache
def full_decode(h: int, w: int):
  latent = np.random.default_rng(h * 1000 + w + 1).standard_normal((h, w, 4)).astype(np.float32)
  image = jax.jit(lambda p, z: VAE.apply({'params': p}, z, method='decode'))(PARAMS, latent[None])
  return latent, np.asarray(image[0])


def assert_close(out: np.ndarray, ref: np.ndarray, name: str):
  assert out.shape == ref.shape and out.dtype == np.float32, (name, out.shape, ref.shape)
  err = float(np.abs(out - ref).max())
  assert err <= ATOL, (name, err, float(np.abs(ref).max()))


def check_encode(tiled: TiledVAE, h: int, w: int):
  image, mean, logvar = full_encode(h, w)
  tiled_mean, tiled_logvar = tiled.encode(PARAMS, image)
  assert_close(tiled_mean, mean, 'mean')
  assert_close(tiled_logvar, logvar, 'logvar')


def check_decode(tiled: TiledVAE, h: int, w: int):
  latent, image = full_decode(h, w)
  assert_close(tiled.decode(PARAMS, latent), image, 'decoded')


def test_tiled_encode_equals_full_encode_on_image_4x_larger_than_tile():
  # 64x80 image, latent 16x20: 4x5 tiles of 4x4 latent px; device batches of 8, 8, 4 (+4 padding).
  check_encode(TiledVAE(VAE, tile=4, batch=8), 16 * FACTOR, 20 * FACTOR)


def test_tiled_decode_equals_full_decode_on_image_4x_larger_than_tile():
  check_decode(TiledVAE(VAE, tile=4, batch=8), 16, 20)  # latent 16x20 -> 64x80 image: 4x5 tiles


def test_size_not_a_multiple_of_the_tile_is_padded_and_masked_exactly():
  # Latent 10x13 -> padded 12x16: 3x4 tiles, the last tile row/column partly padding, and whole
  # attention key chunks (one padded latent row each) made only of padding.
  tiled = TiledVAE(VAE, tile=4, batch=8)
  check_decode(tiled, 10, 13)
  check_encode(tiled, 10 * FACTOR, 13 * FACTOR)


def test_one_tile_covering_the_whole_image_equals_untiled():
  check_decode(TiledVAE(VAE, tile=16, batch=1), 10, 13)  # one padded tile
  check_decode(TiledVAE(VAE, tile=16, batch=1), 16, 16)  # one exact tile


def test_tiles_sharded_over_a_device_mesh_equal_untiled():
  mesh = Mesh(np.array(jax.devices()), ('data',))
  tiled = TiledVAE(VAE, tile=4, batch=8, sharding=NamedSharding(mesh, P('data')))
  check_decode(tiled, 10, 13)
  check_encode(tiled, 10 * FACTOR, 13 * FACTOR)


# Fake CPU devices need XLA_FLAGS before jax is imported: a subprocess, given the untiled decode.
FOUR_DEVICES = '''
import json, sys, numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import test_tiled_vae as t
mesh = Mesh(np.array(jax.devices()), ('data',))
tiled = t.TiledVAE(t.VAE, tile=4, batch=8, sharding=NamedSharding(mesh, P('data')))
ref = np.load(sys.argv[1])
out = tiled.decode(t.PARAMS, ref['latent'])
windowed = t.TiledVAE(t.VAE, tile=4, batch=8, sharding=NamedSharding(mesh, P('data')),
                      attention_max_tokens=0, attention_margin=16)  # windows cover the latent
out_windowed = windowed.decode(t.PARAMS, ref['latent'])
print(json.dumps({'devices': jax.device_count(), 'err': float(np.abs(out - ref['image']).max()),
                  'windowed_err': float(np.abs(out_windowed - ref['image']).max())}))
'''


def test_tiles_sharded_over_four_fake_cpu_devices_equal_untiled(tmp_path):
  if jax.device_count() >= 4:  # this process already has several devices: no subprocess needed
    test_tiles_sharded_over_a_device_mesh_equal_untiled()
    return
  latent, image = full_decode(10, 13)
  np.savez(tmp_path / 'ref.npz', latent=latent, image=image)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join([REPO, f'{REPO}/tests']),
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  proc = subprocess.run([sys.executable, '-c', FOUR_DEVICES, str(tmp_path / 'ref.npz')], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['devices'] == 4 and out['err'] <= ATOL and out['windowed_err'] <= ATOL, out


def test_combined_tile_moments_equal_whole_image_mean_and_variance():
  rng = np.random.default_rng(0)
  values = [rng.normal(5.0, 0.1, (n, 2)) for n in (7, 1, 30)]  # offset mean: cancellation-prone
  parts = np.stack([np.stack([np.full(2, len(v)), v.mean(0), ((v - v.mean(0)) ** 2).sum(0)], -1)
                    for v in values])
  mean, var = combine_moments(parts)
  whole = np.concatenate(values)
  np.testing.assert_allclose(mean, whole.mean(0), rtol=1e-12)
  np.testing.assert_allclose(var, whole.var(0), rtol=1e-10)


def test_independent_tiles_would_differ_far_beyond_the_tolerance():
  # The top-left 4x4 latent tile decoded on its own (its own GroupNorm statistics, attention and
  # zero padding) vs the same region of the full decode: the tolerance above is meaningful.
  latent, image = full_decode(16, 20)
  alone = VAE.apply({'params': PARAMS}, latent[None, :4, :4], method='decode')[0]
  assert float(np.abs(np.asarray(alone) - image[:16, :16]).max()) > 100 * ATOL


# Windowed-mode error on the 16x20 latent, tile 4, margin 4 (window 12x12), measured on 2026-12-03
# by benchmarks/tiled_vae_attention.py (case 'test'): decoded max 0.2419 / mean 0.0375 (outputs of
# scale ~2.8), posterior mean max 0.1448 / mean 0.0303. Bounds: those figures rounded up.
WINDOWED_DECODE_ERROR = dict(max=0.25, mean=0.04)
WINDOWED_MEAN_ERROR = dict(max=0.15, mean=0.032)


def test_windowed_attention_with_a_window_covering_the_latent_equals_untiled():
  # Margin 16 around 4x4 tiles of a 10x13 latent: every window holds the whole image, so the
  # windowed mode computes the global attention (cut from the device-side key image, masked).
  tiled = TiledVAE(VAE, tile=4, batch=8, attention_max_tokens=0, attention_margin=16)
  check_decode(tiled, 10, 13)
  assert tiled.last_attention.windowed and tiled.last_attention.window == (12, 16)
  check_encode(tiled, 10 * FACTOR, 13 * FACTOR)


def test_attention_is_windowed_only_above_max_tokens():
  tiled = TiledVAE(VAE, tile=4, batch=8, attention_max_tokens=16 * 20, attention_margin=2)
  exact = tiled.attention_mode(16, 20)  # 320 tokens: at the threshold
  windowed = tiled.attention_mode(16, 21)
  assert not exact.windowed and exact.window is None and exact.chunk == 16
  assert windowed.windowed and windowed.margin == 2 and windowed.window == (8, 8)
  assert str(exact) == 'VAE attention exact (global) over 320 tokens'
  assert str(windowed) == 'VAE attention windowed (margin 2) over 336 tokens'
  # The window never exceeds the padded latent (a thin panorama: 4 rows of tiles).
  assert tiled.attention_mode(3, 200).window == (4, 8)
  assert TiledVAE(VAE).attention_max_tokens == tiled_vae.default_attention_max_tokens()
  no_attention = AutoencoderKL.from_config(dict(CONFIG, mid_block_add_attention=False))
  assert TiledVAE(no_attention).attention_mode(512, 512) is None
  with pytest.raises(ValueError, match='must be >= 0'):
    TiledVAE(VAE, attention_margin=-1)


def test_online_softmax_chunk_bounds_the_logits_per_step_at_large_tiles():
  # 8 tiles of 128^2 queries: 2048 keys a step (2^28 logits), whole rows of the 192-wide window;
  # small tiles keep one step per tile of keys (exact mode) as before.
  large = TiledVAE(VAE, tile=128, batch=8, attention_max_tokens=256 * 256)
  assert large.attention_mode(256, 256).chunk == 2048
  assert large.attention_mode(512, 512).chunk == 192 * 8
  assert TiledVAE(VAE, tile=64, batch=8).attention_mode(256, 256).chunk == 64 * 64
  assert 8 * 128 * 128 * large.attention_mode(512, 512).chunk <= tiled_vae.LOGITS_PER_STEP


def test_windowed_attention_error_stays_within_the_measured_bound():
  latent, image = full_decode(16, 20)
  pixels, mean, _ = full_encode(16 * FACTOR, 20 * FACTOR)
  tiled = TiledVAE(VAE, tile=4, batch=8, attention_max_tokens=16 * 20 - 1, attention_margin=4)
  decoded = np.abs(tiled.decode(PARAMS, latent) - image)
  assert tiled.last_attention.windowed and tiled.last_attention.window == (12, 12)
  windowed_mean = np.abs(tiled.encode(PARAMS, pixels)[0] - mean)
  for err, bound in ((decoded, WINDOWED_DECODE_ERROR), (windowed_mean, WINDOWED_MEAN_ERROR)):
    assert err.max() <= bound['max'] and err.mean() <= bound['mean'], (err.max(), err.mean())
    assert err.max() > 100 * ATOL  # an approximation indeed: the bound is not vacuous


def test_progress_counts_every_tile_batch_of_all_stages_up_to_the_total():
  # 10x13 latent, tile 4: 3x4 = 12 tiles, batches of 8 -> 2 device calls per stage.
  tiled = TiledVAE(VAE, tile=4, batch=8)
  calls = []
  progress = lambda *args: calls.append(args)
  latent, image = full_decode(10, 13)
  assert_close(tiled.decode(PARAMS, latent, progress=progress), image, 'decoded')
  pixels, _, _ = full_encode(10 * FACTOR, 13 * FACTOR)
  tiled.encode(PARAMS, pixels, progress=progress)
  for phase, program in (('VAE decoder', tiled_vae.decoder_program(VAE)),
                         ('VAE encoder', tiled_vae.encoder_program(VAE))):
    counts = [(done, total) for name, done, total in calls if name == phase]
    total = len(program) * math.ceil(12 / 8)
    assert counts == [(done, total) for done in range(1, total + 1)], (phase, counts)
  decoder_calls = len(tiled_vae.decoder_program(VAE)) * 2
  assert [name for name, _, _ in calls] == (['VAE decoder'] * decoder_calls +
                                            ['VAE encoder'] * (len(calls) - decoder_calls))
