"""`TiledVAE` (GroupNorm-synchronised stage-by-stage tiles) equals the untiled `AutoencoderKL`.

A tiny random VAE (3 levels, factor 4, mid-block attention, 8 norm groups) whose GroupNorm scales
and every bias are randomised, so a wrong statistic, mask or halo shows up. Tolerance (float32): max abs
difference <= 1e-4 on outputs of scale ~1-3 (`ATOL`); measured ~3e-6, i.e. summation-order rounding.
Decoding a tile on its own differs from the full decode by ~1.3 (last test: asserted > 1e-2).
"""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sr_jax.inference.tiled_vae import TiledVAE, combine_moments
from sr_jax.models.vae import AutoencoderKL

ATOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(block_out_channels=[32, 64, 64], down_block_types=['DownEncoderBlock2D'] * 3,
              up_block_types=['UpDecoderBlock2D'] * 3, layers_per_block=1, latent_channels=4,
              norm_num_groups=8)
FACTOR = 4


def tiny_vae(seed: int = 0):
  """The tiny VAE and random params: kernels ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.3^2), every
  norm and layer bias N(0, 0.3^2). Drawn with numpy from the param shapes (an eager ``init`` of
  the VAE takes ~10 s on 2 cores)."""
  vae = AutoencoderKL.from_config(CONFIG)
  shapes = jax.eval_shape(vae.init, jax.random.key(0), *vae.dummy_inputs())['params']
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    name = path[-1].key
    if name == 'kernel':
      return noise / np.sqrt(np.prod(leaf.shape[:-1]))
    return 1 + 0.3 * noise if name == 'scale' else 0.3 * noise

  return vae, jax.tree_util.tree_map_with_path(draw, shapes)


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
print(json.dumps({'devices': jax.device_count(), 'err': float(np.abs(out - ref['image']).max())}))
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
  assert out['devices'] == 4 and out['err'] <= ATOL, out


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
