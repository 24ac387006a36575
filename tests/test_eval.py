"""eval.py and one-step inference: reference preprocessing and tiling, bad inputs, metrics files,
workdir vs exported bundle, 1 vs 8 devices, end to end on the tiny checkpoint that train.py leaves."""
import csv
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

import tiny_diffusers as td
import tiny_runs
from configs import omgsr as omgsr_config
from sr_jax import evaluate, methods, metrics
from sr_jax.inference import pipeline, tiling

# Inputs: (name, maker). Sizes exercise the tiny config (process_size 64, x4, latent tile 16, VAE
# tile 32): tiled UNet everywhere, a tiled VAE on `big`, the enlarge-then-restore path on `tiny`.
GT_SIZE = (128, 96)


def _photo(array, size):
  return Image.fromarray(array).resize(size, Image.BICUBIC)


def _write_inputs(folder, gt_folder):
  os.makedirs(folder)
  os.makedirs(gt_folder)
  gt = _photo(skdata.astronaut(), GT_SIZE)
  gt.save(os.path.join(gt_folder, 'astro.png'))
  gt.resize((GT_SIZE[0] // 4, GT_SIZE[1] // 4), Image.BICUBIC).save(os.path.join(folder, 'astro.png'))
  _photo(skdata.chelsea(), (72, 48)).save(os.path.join(folder, 'big.jpg'))
  gray16 = (skdata.camera().astype(np.uint16) * 257)
  Image.fromarray(gray16).resize((24, 16)).save(os.path.join(folder, 'gray16.png'))
  rgba = np.dstack([skdata.coffee()[:40, :40], np.full((40, 40), 128, np.uint8)])
  Image.fromarray(rgba).save(os.path.join(folder, 'rgba.png'))
  _photo(skdata.coffee(), (7, 5)).save(os.path.join(folder, 'tiny.png'))
  with open(os.path.join(folder, 'broken.png'), 'wb') as f:
    f.write(b'not an image')


def _tiny_config():
  return omgsr_config.get_config('tiny')


@pytest.fixture(scope='module')
def eval_runs(tiny_train_runs, tmp_path_factory):
  """eval.py on 8 fake devices from the 1-device train.py workdir, plus the folders."""
  root = tmp_path_factory.mktemp('eval')
  lq, gt, out8 = str(root / 'lq'), str(root / 'gt'), str(root / 'out8')
  _write_inputs(lq, gt)
  cmd = [sys.executable, os.path.join(tiny_runs.REPO, 'eval.py'), '--config=configs/omgsr.py:tiny',
         f'--checkpoint={tiny_train_runs[1]}', f'--input={lq}', f'--output={out8}', f'--gt={gt}',
         '--color_fix=none']  # AdaIN's gain would scale a one-level rounding flip (devices test)
  result = subprocess.run(cmd, cwd=tiny_runs.REPO, env=tiny_runs.subprocess_env(8),
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return dict(workdir=tiny_train_runs[1], lq=lq, gt=gt, out8=out8, root=root, log=result.stderr)


def _load_generator(checkpoint):
  config = _tiny_config()
  return methods.get(config.method).load_generator(config, checkpoint)


@pytest.fixture(scope='module')
def workdir_resolver(eval_runs):
  return pipeline.SuperResolver(_load_generator(eval_runs['workdir']),
                                pipeline.InferenceSettings.from_config(_tiny_config()))


def _png(folder, name):
  return np.asarray(Image.open(os.path.join(folder, name)))


def test_eval_py_writes_outputs_metrics_and_skips_unreadable_inputs(eval_runs):
  out = eval_runs['out8']
  assert sorted(f for f in os.listdir(out) if f.endswith('.png')) == [
      'astro.png', 'big.png', 'gray16.png', 'rgba.png', 'tiny.png']
  assert _png(out, 'astro.png').shape == (GT_SIZE[1], GT_SIZE[0], 3)
  assert _png(out, 'big.png').shape == (192, 288, 3)
  assert _png(out, 'tiny.png').shape == (20, 28, 3)  # enlarged for the model, restored to x4
  with open(os.path.join(out, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['images'] == 5 and summary['devices'] == 8
  assert 'cannot decode' in summary['skipped_inputs']['broken.png']
  assert 'pyiqa is not installed' in summary['skipped_metrics']['lpips']
  with open(os.path.join(out, 'metrics.csv')) as f:
    rows = {row['image']: row for row in csv.DictReader(f)}
  expected = metrics.pixel_metrics(_png(out, 'astro.png'), _png(eval_runs['gt'], 'astro.png'))
  for name, value in expected.items():
    np.testing.assert_allclose(float(rows['astro.png'][name]), value, rtol=1e-9)
    np.testing.assert_allclose(summary['mean'][name], value, rtol=1e-9)
  assert rows['big.jpg']['note'] == 'no ground truth with this name'


def test_one_device_in_process_equals_eight_device_eval_py(eval_runs, workdir_resolver):
  out1 = str(eval_runs['root'] / 'out1')
  resolver = pipeline.SuperResolver(workdir_resolver.generator, dataclasses.replace(
      workdir_resolver.settings, color_fix='none'), devices=jax.devices()[:1])
  evaluate.evaluate_folder(resolver, evaluate.EvalOptions(eval_runs['lq'], out1), log=lambda _: None)
  for name in ('astro.png', 'big.png', 'gray16.png', 'rgba.png', 'tiny.png'):
    one, eight = _png(out1, name).astype(int), _png(eval_runs['out8'], name).astype(int)
    # Same program, other batch split: float32 sums may round differently: a value next to a
    # quantisation step can land one 8-bit level apart, nothing more.
    assert np.abs(one - eight).max() <= 1, name
    assert np.mean(one != eight) < 0.01, name


def test_exported_bundle_gives_the_workdir_checkpoint_output(eval_runs, workdir_resolver):
  bundle = _load_generator(os.path.join(eval_runs['workdir'], 'export', 'inference'))
  assert bundle.source['kind'] == 'bundle' and workdir_resolver.generator.source['step'] == 2
  resolver = pipeline.SuperResolver(bundle, workdir_resolver.settings)
  image = evaluate.read_rgb(os.path.join(eval_runs['lq'], 'astro.png'))
  a = np.asarray(pipeline.super_resolve_image(workdir_resolver, image, 'astro.png'), int)
  b = np.asarray(pipeline.super_resolve_image(resolver, image, 'astro.png'), int)
  assert np.abs(a - b).max() <= 1


def test_existing_outputs_are_kept_only_when_made_by_the_same_model(eval_runs, workdir_resolver,
                                                                   tmp_path):
  lq = str(tmp_path / 'lq')
  os.makedirs(lq)
  Image.open(os.path.join(eval_runs['lq'], 'astro.png')).save(os.path.join(lq, 'astro.png'))
  out = str(tmp_path / 'out')
  os.makedirs(out)
  marker = np.full((8, 8, 3), 7, np.uint8)  # a stale output: no record of what made it
  Image.fromarray(marker).save(os.path.join(out, 'astro.png'))
  quiet = lambda _: None
  evaluate.evaluate_folder(workdir_resolver, evaluate.EvalOptions(lq, out), log=quiet)
  assert _png(out, 'astro.png').shape == (GT_SIZE[1], GT_SIZE[0], 3)
  with open(os.path.join(out, 'metrics.csv')) as f:
    assert next(csv.DictReader(f))['status'].startswith('redone')
  made = evaluate._made_by(os.path.join(out, 'astro.png'))  # pylint: disable=protected-access
  assert made['generator']['step'] == 2 and made['generator']['kind'] == 'workdir'
  # Same model and settings: kept. Other settings (seed): redone. --overwrite: redone.
  summary = evaluate.evaluate_folder(workdir_resolver, evaluate.EvalOptions(lq, out), log=quiet)
  assert summary['images'] == 1 and summary['generator']['step'] == 2
  with open(os.path.join(out, 'metrics.csv')) as f:
    assert next(csv.DictReader(f))['status'] == 'kept existing output'
  other = pipeline.SuperResolver(workdir_resolver.generator,
                                 dataclasses.replace(workdir_resolver.settings, seed=9))
  evaluate.evaluate_folder(other, evaluate.EvalOptions(lq, out), log=quiet)
  with open(os.path.join(out, 'metrics.csv')) as f:
    assert next(csv.DictReader(f))['status'].startswith('redone')
  evaluate.evaluate_folder(other, evaluate.EvalOptions(lq, out, overwrite=True), log=quiet)
  with open(os.path.join(out, 'metrics.csv')) as f:
    assert next(csv.DictReader(f))['status'] == 'done'


def test_preprocess_follows_the_reference_sizes():
  img = Image.new('RGB', (37, 29))
  up, restore = pipeline.preprocess_lq(img, 64, 4)
  assert up.size == (144, 112) and restore is None           # 148x116 -> multiples of 8
  up, restore = pipeline.preprocess_lq(Image.new('RGB', (7, 5)), 64, 4)
  assert up.size == (88, 64) and restore == (28, 20)          # short side 5 -> 16 first
  up, restore = pipeline.preprocess_lq(Image.new('RGB', (512, 300)), 512, 4)
  assert up.size == (2048, 1200) and restore is None


def _stage(resolver):
  return resolver.stages[0]


def test_unet_tiling_with_one_tile_equals_the_untiled_path(workdir_resolver):
  runner = _stage(workdir_resolver)
  step_fn = lambda tiles: np.asarray(runner._step(runner.params, tiles, None, None))  # pylint: disable=protected-access
  z = np.random.default_rng(0).standard_normal((16, 12, 4)).astype(np.float32)
  assert not tiling.needs_tiling(16, 12, runner.stage.latent_tile)  # the reference's h w > tile^2
  np.testing.assert_allclose(runner.predict(z, None, None), step_fn(z[None])[0], rtol=1e-6,
                             atol=1e-6)
  # Same tile, batched with 7 repeats (another conv blocking): equal to float32 rounding.
  z16 = np.random.default_rng(1).standard_normal((16, 16, 4)).astype(np.float32)
  single = tiling.latent_tile_grid(16, 16, 16, 8)
  assert len(single) == 1
  np.testing.assert_allclose(tiling.tiled_prediction(step_fn, z16, single), step_fn(z16[None])[0],
                             rtol=1e-5, atol=1e-5)


def test_tiled_and_untiled_unet_stay_within_the_stated_tolerance(workdir_resolver):
  """Tiles see less context than the whole latent (the tiny UNet's attention is global), so tiled
  eps is not the untiled eps: on tiny checkpoints the relative RMS gap measured 0.27-0.38 (README);
  the blend itself is exact (test_latent_tiling.py) and equals the reference loop (below)."""
  runner = _stage(workdir_resolver)
  photo = _photo(skdata.astronaut(), (128, 128))
  x = np.asarray(photo, np.float32) / 127.5 - 1.0
  z = runner.encode(x, jax.random.key(0))
  assert tiling.needs_tiling(*z.shape[:2], runner.stage.latent_tile)
  alpha_bar = runner.stage.step.alpha_bar
  eps = lambda z_pred: (z - np.sqrt(alpha_bar) * z_pred) / np.sqrt(1 - alpha_bar)  # Eq. 7 inverted
  tiled = eps(runner.predict(z, None, None))
  untiled = eps(np.asarray(runner._step(runner.params, z[None], None, None))[0])  # pylint: disable=protected-access
  gap = np.sqrt(np.mean((tiled - untiled) ** 2) / np.mean(untiled ** 2))
  assert gap < 0.5, gap


def test_resolver_tiled_vae_matches_the_full_vae(workdir_resolver):
  runner = _stage(workdir_resolver)
  x = np.asarray(_photo(skdata.chelsea(), (160, 192)), np.float32) / 127.5 - 1.0  # latent 48x40
  f = runner.stage.vae_factor
  assert runner._vae_tiled(x.shape[0] // f, x.shape[1] // f)  # pylint: disable=protected-access
  params = runner.params['vae']
  tiled_mean, _ = runner.tiled_vae.encode(params, x)
  full = np.asarray(runner._one(runner._encode, x))  # pylint: disable=protected-access
  np.testing.assert_allclose(tiled_mean, full[..., :4], rtol=1e-4, atol=1e-4)
  z = runner.stage.codec.to_latent(tiled_mean)
  tiled_image = runner.decode(z)
  full_image = np.asarray(runner._one(runner._decode, z))  # pylint: disable=protected-access
  np.testing.assert_allclose(tiled_image, full_image, rtol=1e-4, atol=1e-4)


def _reference_tiled_eps(unet, latent, context, t, tile, overlap):
  """A direct port of the OSEDiff/OMGSR tile loop (NCHW torch), for parity."""
  _, _, h, w = latent.shape
  tile = min(tile, h, w)
  def starts(n):
    out, cur = [], 0
    while cur < n:
      if cur + tile >= n:
        out.append(max(n - tile, 0))
        break
      out.append(cur)
      cur += tile - overlap
    return out
  def gauss(n, centre):
    i = np.arange(n, dtype=np.float64)
    return np.exp(-(i - centre) ** 2 / n / n / (2 * 0.01)) / np.sqrt(2 * np.pi * 0.01)
  weights = torch.from_numpy(np.outer(gauss(tile, tile / 2), gauss(tile, (tile - 1) / 2)))
  total = torch.zeros_like(latent, dtype=torch.float64)
  norm = torch.zeros_like(latent, dtype=torch.float64)
  for x0 in starts(w):
    for y0 in starts(h):
      patch = latent[:, :, y0:y0 + tile, x0:x0 + tile]
      eps = unet(patch, t, encoder_hidden_states=context).sample
      total[:, :, y0:y0 + tile, x0:x0 + tile] += eps.double() * weights
      norm[:, :, y0:y0 + tile, x0:x0 + tile] += weights
  return (total / norm).float()


def test_tiled_epsilon_matches_a_torch_port_of_the_reference_loop(tmp_path):
  folder = td.save_tiny_unet(tmp_path / 'unet', td.TINY_UNET_SD21)
  unet, params = td.load_flax_unet(folder)
  rng = np.random.default_rng(0)
  latent = rng.standard_normal((28, 20, 4)).astype(np.float32)
  context = rng.standard_normal((1, 7, td.TINY_UNET_SD21['cross_attention_dim'])).astype(np.float32)
  apply = jax.jit(lambda tiles: unet.apply({'params': params}, tiles,
                                           np.full((tiles.shape[0],), 273, np.int32),
                                           np.broadcast_to(context, (tiles.shape[0],) + context.shape[1:])))
  grid = tiling.latent_tile_grid(28, 20, 16, 8)
  ours = tiling.tiled_prediction(lambda tiles: np.asarray(apply(tiles)), latent, grid, batch=4)
  with torch.no_grad():
    ref = _reference_tiled_eps(td.load_torch_unet(folder), td.nchw(latent[None]),
                               torch.from_numpy(context), torch.tensor([273]), 16, 8)
  ref = td.nhwc(ref)[0]
  assert np.abs(ours - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_perceptual_metrics_are_computed_in_jax_without_pyiqa(eval_runs, workdir_resolver,
                                                              tmp_path):
  import convert_weights  # pylint: disable=g-import-not-at-top
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  from sr_jax.losses import dists, lpips  # pylint: disable=g-import-not-at-top
  weights = str(tmp_path / 'perceptual')
  assert convert_weights.main(['perceptual', '--out', weights]) == 0
  lq = str(tmp_path / 'lq')
  os.makedirs(lq)
  Image.open(os.path.join(eval_runs['lq'], 'astro.png')).save(os.path.join(lq, 'astro.png'))
  out = str(tmp_path / 'out')
  summary = evaluate.evaluate_folder(workdir_resolver, evaluate.EvalOptions(
      lq, out, gt_dir=eval_runs['gt'], perceptual_weights=weights), log=lambda _: None)
  assert 'lpips' not in summary['skipped_metrics'] and 'dists' not in summary['skipped_metrics']
  sr = _png(out, 'astro.png').astype(np.float32)[None] / 255
  gt = _png(eval_runs['gt'], 'astro.png').astype(np.float32)[None] / 255
  params = pretrained.load_perceptual(weights)
  expected = {'lpips': lpips.lpips_distance(params, sr, gt, net='alex'),
              'lpips_vgg': lpips.lpips_distance(params, sr, gt, net='vgg'),
              'dists': dists.dists_distance(params, sr, gt)}
  for name, value in expected.items():
    np.testing.assert_allclose(summary['mean'][name], float(value[0]), rtol=1e-5, err_msg=name)
    assert 0.05 < summary['mean'][name] < 1.5, name  # a random tiny model is far from the photo
