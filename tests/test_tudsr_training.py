"""TUDSR end to end on the tiny configs: stage 1 -> stage 2 (init from stage 1) -> eval.py x4 / x8,
resume in each stage, 1 vs 8 devices, N^2 updates per example with theta1 untouched, and the
two-LoRA inference against a hand composition of the paper's Eq. 2 (stage 1, bilinear, stage 2)."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file
from skimage import data as skdata

import tiny_runs
import tudsr_runs
from configs import tudsr as tudsr_config
from sr_jax.diffusion import schedules
from sr_jax.inference import pipeline
from sr_jax.methods import common, tudsr
from sr_jax.models import lora


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  return tudsr_runs.make_runs(tmp_path_factory.mktemp('tudsr'))


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _adapter(workdir, stage):
  path = os.path.join(workdir, 'export', tudsr.ADAPTER_DIRS[stage], 'adapter_model.safetensors')
  return load_file(path)


def _restore(workdir, step):
  """(state, step) of a TUDSR workdir's checkpoint, as load_generator restores it."""
  run = tudsr.run_config(workdir)
  cfgs = tudsr.model_configs(run)
  stage1_model = tudsr.run_config(run.init_from).model if run.model.stage == 2 else None
  models = tudsr.build_models(run, cfgs, stage1_model)
  init_fn, _ = tudsr.step_functions(models, run.optim)
  shapes = common.frozen_shapes(models.unet, run.model.frozen_param_dtype)
  return common.restore_train_state(run, workdir, functools.partial(init_fn, {'unet': shapes}),
                                    step)


def _adam_counts(opt_state):
  flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
  return {int(v) for path, v in flat if 'count' in jax.tree_util.keystr(path)}


def test_stage2_makes_n2_updates_per_example_and_keeps_theta1_bitwise(runs):
  rows = _rows(runs['s2'])
  assert [r['step'] for r in rows] == [4, 8]  # steps count updates: 4 chunks per batch
  for step in (4, 8):
    state, restored = _restore(runs['s2'], step)
    assert restored == step and int(state.step) == step
    for group in ('generator', 'heads'):  # N^2 G updates and N^2 D updates per batch
      assert _adam_counts(state.opt_state[group]) == {step}, group
  theta1, copied = _adapter(runs['s1'], 1), _adapter(runs['s2'], 1)
  assert theta1.keys() == copied.keys()
  for key, value in theta1.items():
    np.testing.assert_array_equal(copied[key], value, err_msg=key)
  moved = _adapter(runs['s2'], 2)
  assert max(float(np.abs(v).max()) for k, v in moved.items() if 'lora_B' in k) > 1e-5


@pytest.mark.parametrize('first, second', [('s1', 's1_resumed'), ('s2', 's2_resumed')])
def test_interrupted_stage_resumes_to_the_same_run(runs, first, second):
  """Same losses per step (so the same data stream) and the same LoRA after a restart."""
  rows, resumed = _rows(runs[first]), _rows(runs[second])
  assert [r['step'] for r in rows] == [r['step'] for r in resumed]
  for r, s in zip(rows, resumed):
    for key in ('g_loss', 'd_loss', 'g_ea_dists', 'g_gan', 'g_l1'):
      np.testing.assert_allclose(s[key], r[key], rtol=1e-5, err_msg=f'{key} at step {r["step"]}')
  stage = 1 if first == 's1' else 2
  for key, value in _adapter(runs[first], stage).items():
    np.testing.assert_allclose(_adapter(runs[second], stage)[key], value, rtol=1e-5, atol=1e-7,
                               err_msg=key)


def test_eight_devices_match_one_device(runs):
  """Same losses and LoRA on 8 fake devices as on 1. ea-DISTS (and the G loss it dominates) gets a
  wider bound, measured: the G outputs of the two batch splits differ by <= 6.5e-5 (float32
  rounding through UNet and VAE), and DISTS' (2 cov + c2) / (var_x + var_y + c2) on the near-flat
  chunks of one tiny-model sample turns that into 5e-3 on its score, 8e-4 on the batch mean; the
  same inputs give the same score to 6e-7. Adam then turns those gradient differences into LoRA-B
  differences of the size of the (small) updates of near-zero-gradient elements: measured over all
  lora_B tensors after the 16 updates, ||B8 - B1|| / ||B1|| = 3.5e-2 on one 2-core VM, while on
  another every element stayed within 1e-5 (XLA:CPU's code differs); lora_A moves by <= 6e-8. A
  sharding error (an example dropped, a gradient not averaged) moves every loss after the first
  update by more than these bounds and the LoRA by the whole update (relative difference ~1)."""
  one, eight = runs['s2'], runs['s2_8dev']  # stage 2's step holds stage 1's G and the same update
  bounds = {'d_loss': 1e-4, 'd_fake': 1e-4, 'd_real': 1e-4, 'g_gan': 1e-4, 'g_l1': 1e-4,
            'g_ea_dists': 3e-3, 'g_loss': 3e-3}
  for r1, r8 in zip(_rows(one), _rows(eight), strict=True):
    for key, rtol in bounds.items():
      np.testing.assert_allclose(r8[key], r1[key], rtol=rtol, err_msg=f'{key} at {r1["step"]}')
  lora1, lora8 = _adapter(one, 2), _adapter(eight, 2)
  assert max(float(np.abs(v).max()) for k, v in lora1.items() if 'lora_B' in k) > 1e-5
  lora_b = [key for key in lora1 if 'lora_B' in key]
  relative = (sum(float(np.sum((lora8[k] - lora1[k]) ** 2)) for k in lora_b)
              / sum(float(np.sum(lora1[k] ** 2)) for k in lora_b)) ** 0.5
  assert relative < 0.1, f'lora_B differs by {relative:.3g} (relative) between 8 and 1 devices'
  for key, value in lora1.items():
    if key not in lora_b:
      np.testing.assert_allclose(lora8[key], value, rtol=0, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------------------------ inference


def _settings(**overrides):
  config = tudsr_config.get_config('tiny_stage2')
  return pipeline.InferenceSettings.from_config(config, color_fix='none', **overrides)


def _generator(checkpoint, **eval_overrides):
  config = tudsr_config.get_config('tiny_stage2')
  config.eval.update(eval_overrides)
  return tudsr.load_generator(config, checkpoint)


def _photo(size, which='astronaut'):
  return Image.fromarray(getattr(skdata, which)()).resize(size, Image.BICUBIC)


def _eq2_stage(generator, params, x, key, timestep, lora_key):
  """TUDSR Eq. 2 written out: E, the UNet's eps with one LoRA, (z - sqrt(1-a) eps) / sqrt(a), D."""
  stage = generator.stages[0]
  unet, vae, codec = stage.step.unet, stage.vae, stage.codec
  moments = vae.apply({'params': params['vae']}, x, method='encode')
  mean, logvar = moments
  z = codec.to_latent(mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape))
  config = tudsr.unet_lora_config(tudsr_config.get_config('tiny_stage2').model)
  eps = lora.apply(unet, params['unet'], params[lora_key], config, z,
                   jnp.full((1,), timestep, jnp.int32), params['prompt_embeds'])
  alpha = float(schedules.ddpm_alphas_cumprod(tudsr_config.get_config('tiny_stage2')
                                              .model.scheduler_config)[timestep])
  z0 = (z - np.sqrt(1 - alpha) * eps) / np.sqrt(alpha)
  image = vae.apply({'params': params['vae']}, codec.from_latent(z0), method='decode')
  return jnp.clip(image, -1, 1)


def test_two_lora_inference_equals_a_hand_composition(runs):
  generator = _generator(runs['s2'])
  assert [(s.upscale, s.step.timestep) for s in generator.stages] == [(2, 200), (2, 50)]
  resolver = pipeline.SuperResolver(generator, _settings())
  lq = np.asarray(_photo((16, 16)))
  key = pipeline.image_noise_key(0, 'x')
  ours = resolver(np.asarray(Image.fromarray(lq).resize((32, 32), Image.BICUBIC)), key)
  params = generator.params
  x = jnp.asarray(np.asarray(Image.fromarray(lq).resize((32, 32), Image.BICUBIC)), jnp.float32)
  m = _eq2_stage(generator, params, (x / 127.5 - 1)[None], key, 200, tudsr.STAGE1_LORA)
  y = jax.image.resize(m, (1, 64, 64, 3), 'linear')  # Eq. 10
  out = _eq2_stage(generator, params, y, jax.random.fold_in(key, 1), 50, tudsr.STAGE2_LORA)
  hand = pipeline.to_uint8((np.asarray(out[0]) + 1) / 2)
  assert ours.shape == hand.shape == (64, 64, 3)
  assert np.abs(ours.astype(int) - hand.astype(int)).max() <= 1
  merged = pipeline.SuperResolver(_generator(runs['s2'], merge_adapters=True), _settings())
  assert 'unet' not in merged.generator.params
  assert np.abs(merged(np.asarray(Image.fromarray(lq).resize((32, 32), Image.BICUBIC)), key)
                .astype(int) - ours.astype(int)).max() <= 1


@pytest.mark.parametrize('upscale', [4, 8])
def test_output_is_exactly_input_times_upscale(runs, upscale):
  resolver = pipeline.SuperResolver(_generator(runs['s2'], upscale=upscale), _settings())
  for size in ((24, 16), (13, 10)):
    out = pipeline.super_resolve_image(resolver, _photo(size), 'p')
    assert out.size == (size[0] * upscale, size[1] * upscale)


def test_eval_py_x4_on_eight_devices_equals_one_device_and_the_bundle(runs, tmp_path):
  lq = tmp_path / 'lq'
  lq.mkdir()
  _photo((32, 24)).save(lq / 'astro.png')
  _photo((13, 10), 'chelsea').save(lq / 'cat.png')
  out8 = tmp_path / 'out8'
  cmd = [sys.executable, os.path.join(tiny_runs.REPO, 'eval.py'),
         '--config=configs/tudsr.py:tiny_stage2', f'--checkpoint={runs["s2"]}', f'--input={lq}',
         f'--output={out8}', '--upscale=4', '--color_fix=none']
  result = subprocess.run(cmd, cwd=tiny_runs.REPO, env=tiny_runs.subprocess_env(8),
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  with open(out8 / 'summary.json') as f:
    assert json.load(f)['images'] == 2
  one = pipeline.SuperResolver(_generator(runs['s2']), _settings(), devices=jax.devices()[:1])
  bundle = pipeline.SuperResolver(_generator(os.path.join(runs['s2'], 'export', 'inference')),
                                  _settings())
  assert bundle.generator.source['kind'] == 'bundle'
  for name, size in (('astro', (128, 96)), ('cat', (52, 40))):
    eight = np.asarray(Image.open(out8 / f'{name}.png').convert('RGB'), int)
    image = Image.open(lq / f'{name}.png').convert('RGB')
    a = np.asarray(pipeline.super_resolve_image(one, image, f'{name}.png'), int)
    b = np.asarray(pipeline.super_resolve_image(bundle, image, f'{name}.png'), int)
    assert eight.shape[:2] == a.shape[:2] == (size[1], size[0])
    assert np.abs(a - eight).max() <= 1 and np.abs(a - b).max() <= 1, name
