"""The t* search command (OMGSR Eq. 3-5) runs end to end on the tiny config and reports its argmin."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import omgsr as omgsr_configs
from sr_jax import mid_timestep_search
from sr_jax import pretrained
from sr_jax.methods import common
from sr_jax.models.vae import AutoencoderKL, split_vae_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One down block: the smallest VAE with the tiny config's structure (keeps the init cheap).
MICRO_VAE = dict(block_out_channels=[8], down_block_types=['DownEncoderBlock2D'],
                 up_block_types=['UpDecoderBlock2D'], layers_per_block=1, latent_channels=4,
                 norm_num_groups=4, scaling_factor=0.5)


def _json_argmin(report: dict) -> int:
  curve = [math.inf if v is None else v for v in report['mean_loss']]
  return report['timesteps'][int(np.argmin(curve))]


def test_search_on_tiny_config_writes_report_with_argmin(tmp_path):
  config = omgsr_configs.get_config('tiny')
  assert config.data.crop_size == 64 and list(config.data.paths) == ['skimage:']
  # 3 pairs in batches of 2: the second batch is trimmed to one pair.
  result = mid_timestep_search.search_mid_timestep(config, num_pairs=3, batch_size=2,
                                                   out_dir=str(tmp_path / 'search'))
  assert os.path.isfile(result['json_path']) and os.path.isfile(result['png_path'])
  with open(result['json_path']) as f:
    report = json.load(f)
  t_star = report['optimal_timestep']
  assert isinstance(t_star, int) and 0 <= t_star <= 999
  assert len(report['mean_loss']) == 1000 and report['timesteps'] == list(range(1000))
  assert t_star == _json_argmin(report) == result['t_star']
  assert report['num_samples'] == 3
  np.testing.assert_allclose(
      [math.nan if v is None else v for v in report['mean_loss']], result['mean_curve'], rtol=1e-12)
  meta = report['metadata']
  assert meta['num_pairs'] == 3 and meta['data_paths'] == ['skimage:']
  assert meta['preset'] == config.data.preset and meta['config_t_star'] == config.model.t_star
  assert meta['loss_at_config_t_star'] == result['mean_curve'][config.model.t_star]
  assert meta['mean_lq_snr'] > 0 and meta['mean_hq_latent_power'] > 0


def test_flow_matching_search_is_eq_18_19_of_the_pair_statistics(tmp_path):
  """A FLUX scheduler config switches the same search to OMGSR-F's grid (sigma_t = time shift of
  t / 999, mu = 1.15); its curve is Eq. 18-19 of the per-pair statistics, computed here by hand."""
  config = omgsr_configs.get_config('tiny')
  config.model.scheduler_config = dict(
      _class_name='FlowMatchEulerDiscreteScheduler', num_train_timesteps=1000, shift=3.0,
      use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
      max_image_seq_len=4096)
  result = mid_timestep_search.search_mid_timestep(config, num_pairs=2, batch_size=2,
                                                   out_dir=str(tmp_path / 'flow'))
  power, noise_power = result['signal_power'], result['noise_power']
  assert power.shape == noise_power.shape == (2,)
  t = np.arange(1000) / 999
  with np.errstate(divide='ignore'):
    sigmas = np.exp(1.15) / (np.exp(1.15) + (1 / t - 1))
    snr_t = power[:, None] * (1 - sigmas) ** 2 / sigmas ** 2  # Eq. 18
  expected = np.abs(snr_t - (power / noise_power)[:, None]).mean(0)  # Eq. 19
  np.testing.assert_allclose(result['mean_curve'], expected, rtol=1e-12)
  t_star = result['t_star']
  assert t_star == int(np.argmin(expected))
  meta = result['metadata']
  assert meta['schedule'] == 'flow_matching' and meta['equation'].startswith('OMGSR Eq. 18-19')
  assert meta['sigma_at_t_star'] == pytest.approx(sigmas[t_star], rel=1e-12)
  with open(result['json_path']) as f:
    report = json.load(f)
  assert report['optimal_timestep'] == t_star and report['schedule']['kind'] == 'flow_matching'


def test_random_encoder_is_the_training_vae_encoder():
  """The search's encoder-only init equals the encoder half of the VAE tiny training builds.

  Flax derives each parameter's init key from its module path, whatever the key implementation; 'rbg'
  keys compile ~6x faster than threefry on CPU, so the check runs with them.
  """
  config = omgsr_configs.get_config('tiny')
  config.model.vae_config = MICRO_VAE
  with jax.default_prng_impl('rbg'):
    encoder, params, scheduler = mid_timestep_search.load_frozen_encoder(config)
    full = common.random_params('vae', AutoencoderKL.from_config(MICRO_VAE), config.seed)
  expected, _ = split_vae_params(full)
  assert jax.tree.structure(params['vae']) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(params['vae']), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert encoder.codec.scaling_factor == 0.5 and encoder.vae.parts == ('encoder',)
  assert scheduler == dict(config.model.scheduler_config)


def test_converted_source_loads_only_the_encoder(tmp_path):
  """'converted': the encoder half of <sd_path>/vae, the scheduler and scaling factor of the folder."""
  with jax.default_prng_impl('rbg'):
    config = omgsr_configs.get_config('tiny')
    config.seed = 4
    full = common.random_params('vae', AutoencoderKL.from_config(MICRO_VAE), config.seed)
  root = tmp_path / 'sd'
  os.makedirs(root)
  with open(tmp_path / 'vae_config.json', 'w') as f:
    json.dump(MICRO_VAE, f)
  pretrained.save_converted(root / 'vae', 'vae', str(tmp_path / 'vae_config.json'), full,
                            source='test')
  scheduler = dict(beta_schedule='linear', beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
  with open(root / pretrained.SCHEDULER_CONFIG_FILE, 'w') as f:
    json.dump(scheduler, f)
  pretrained.mark_pipeline_root(root, source='test', parts=('vae',))
  config = omgsr_configs.get_config('512')
  config.model.sd_path = str(root)
  encoder, params, got_scheduler = mid_timestep_search.load_frozen_encoder(config)
  expected, _ = split_vae_params(full)
  for got, want in zip(jax.tree.leaves(params['vae']), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert jax.tree.structure(params['vae']) == jax.tree.structure(expected)
  assert encoder.codec.scaling_factor == 0.5 and got_scheduler == scheduler
  assert encoder.vae.dtype == np.float32


def test_command_line_prints_t_star(tmp_path):
  out_dir = tmp_path / 'cli'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'sr_jax.mid_timestep_search', '--config=configs/omgsr.py:tiny',
       '--num_pairs=2', f'--out_dir={out_dir}'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  match = re.search(r'^t\* = (\d+)', proc.stdout, re.MULTILINE)
  assert match, proc.stdout
  with open(out_dir / 'mid_timestep.json') as f:
    report = json.load(f)
  assert int(match.group(1)) == report['optimal_timestep'] == _json_argmin(report)
  assert report['num_samples'] == 2
  assert os.path.isfile(out_dir / 'mid_timestep.png')
