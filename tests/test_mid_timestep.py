"""Mid-timestep search (OMGSR Eq. 3-5, 18-19): synthetic latents with a known SNR recover t*."""
import json

import numpy as np
import pytest

from sr_jax.diffusion import mid_timestep as mt
from sr_jax.diffusion import schedules

SD21_BASE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule='scaled_linear')


def _pair_matching(rng, snr_factor, shape=(4, 8, 8)):
  """(z_H, z_L) with SNR(z_L) = SNR(z_t) exactly, for the t whose SNR(z_t) / E[z_H^2] = snr_factor.

  Eq. 3: SNR(z_t) = snr_factor E[z_H^2]; Eq. 4: SNR(z_L) = E[z_H^2] / E[(z_L - z_H)^2]; they agree
  when the empirical mean square of z_L - z_H is 1 / snr_factor, whatever the signal power.
  """
  z_h = rng.normal(size=shape) * rng.uniform(0.5, 1.5)
  noise = rng.normal(size=shape)
  noise *= np.sqrt(1.0 / snr_factor / np.mean(noise ** 2))
  return z_h, z_h + noise


def test_snr_formulas_by_hand():
  rng = np.random.default_rng(0)
  z_h = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
  z_l = z_h + 0.3 * rng.normal(size=z_h.shape).astype(np.float32)
  power = (z_h ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(mt.snr_of_noised_latent(0.6, z_h), 0.6 * power / 0.4, rtol=1e-5)
  curve = mt.snr_of_noised_latent(np.array([0.2, 0.6]), z_h)
  assert curve.shape == (3, 2)
  np.testing.assert_allclose(curve[:, 0], 0.25 * power, rtol=1e-5)
  np.testing.assert_allclose(mt.snr_of_flow_latent(0.5, z_h), power, rtol=1e-5)
  expected = power / ((z_l - z_h) ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(mt.snr_of_lq_latent(z_h, z_l), expected, rtol=1e-5)


@pytest.mark.parametrize('t_true', [273, 600, 50])
def test_ddpm_search_recovers_known_timestep(t_true):
  alphas_cumprod = schedules.ddpm_alphas_cumprod(SD21_BASE)
  snr_factor = alphas_cumprod[t_true] / (1 - alphas_cumprod[t_true])
  rng = np.random.default_rng(t_true)
  acc = mt.MidTimestepAccumulator.for_ddpm(alphas_cumprod)
  for _ in range(2):  # streamed in two batches of 3
    pairs = [_pair_matching(rng, snr_factor) for _ in range(3)]
    acc.add(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
  assert acc.count == 6
  assert acc.optimal_timestep() == t_true
  assert acc.mean_curve().shape == (1000,)


def test_flux_search_recovers_known_timestep():
  sigmas = schedules.flux_mid_timestep_sigmas()
  sigma = sigmas[244]
  acc = mt.MidTimestepAccumulator.for_flow_matching(sigmas)
  rng = np.random.default_rng(1)
  z_h, z_l = _pair_matching(rng, (1 - sigma) ** 2 / sigma ** 2, shape=(16, 8, 8))
  acc.add(z_h[None], z_l[None])
  assert np.isinf(acc.mean_curve()[0])  # sigma_0 = 0: infinite SNR, never the argmin
  assert acc.optimal_timestep() == 244


def _numpy_eq5_or_eq19(z_h, z_l, snr_per_power):
  """Eq. 3/18 and 4 by hand:
  mean_i |snr_per_power[t] E[z_H^2]_i - E[z_H^2]_i / E[(z_L - z_H)^2]_i|."""
  power = (z_h ** 2).reshape(len(z_h), -1).mean(1)
  lq_snr = power / ((z_l - z_h) ** 2).reshape(len(z_h), -1).mean(1)
  return np.abs(power[:, None] * snr_per_power[None] - lq_snr[:, None]).mean(0)


def _flux_sigmas_by_hand():
  """OMGSR mid_timestep_flux.py: time shift of t / 999 with mu = 0.5 + (1.15 - 0.5)/(4096 - 256)
  (4096 - 256) = 1.15."""
  t = np.arange(1000) / 999
  with np.errstate(divide='ignore'):
    return np.exp(1.15) / (np.exp(1.15) + (1 / t - 1))


@pytest.mark.parametrize('kind', ['ddpm', 'flow_matching'])
def test_mixed_dataset_matches_numpy_and_streaming_is_order_free(kind):
  alphas_cumprod = schedules.ddpm_alphas_cumprod(SD21_BASE)
  sigmas = _flux_sigmas_by_hand()
  rng = np.random.default_rng(2)
  z_h = rng.normal(size=(5, 4, 4, 4)) * rng.uniform(0.5, 2.0, size=(5, 1, 1, 1))
  z_l = z_h + rng.normal(size=z_h.shape) * rng.uniform(0.2, 2.0, size=(5, 1, 1, 1))
  if kind == 'ddpm':
    schedule = schedules.NoisingSchedule.ddpm(alphas_cumprod)
    expected = _numpy_eq5_or_eq19(z_h, z_l, alphas_cumprod / (1 - alphas_cumprod))  # Eq. 3-5
  else:
    schedule = schedules.noising_schedule_from_scheduler_config(dict(
        _class_name='FlowMatchEulerDiscreteScheduler', num_train_timesteps=1000, shift=3.0,
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15))  # FLUX.1-dev's config
    np.testing.assert_allclose(schedule.values, sigmas, rtol=1e-12)
    with np.errstate(divide='ignore'):
      expected = _numpy_eq5_or_eq19(z_h, z_l, (1 - sigmas) ** 2 / sigmas ** 2)  # Eq. 18-19
    assert np.isinf(expected[0])
  assert schedule.kind == kind
  whole = mt.MidTimestepAccumulator.for_schedule(schedule)
  whole.add(z_h, z_l)
  streamed = mt.MidTimestepAccumulator.for_schedule(schedule)
  streamed.add(z_h[3:], z_l[3:])
  streamed.add(z_h[:3], z_l[:3])
  np.testing.assert_allclose(whole.mean_curve(), expected, rtol=1e-4)
  np.testing.assert_allclose(streamed.mean_curve(), whole.mean_curve(), rtol=1e-12)
  assert whole.optimal_timestep() == int(np.argmin(expected))


def test_schedule_kind_follows_the_scheduler_config():
  ddpm = schedules.noising_schedule_from_scheduler_config(SD21_BASE)
  assert ddpm.kind == 'ddpm' and ddpm.value_name == 'alpha_bar'
  np.testing.assert_array_equal(ddpm.values, schedules.ddpm_alphas_cumprod(SD21_BASE))
  sd3 = schedules.noising_schedule_from_scheduler_config(dict(num_train_timesteps=1000, shift=3.0))
  assert sd3.kind == 'flow_matching' and sd3.value_name == 'sigma'
  t = np.arange(1000) / 999
  np.testing.assert_allclose(sd3.values, 3 * t / (1 + 2 * t), rtol=1e-12)  # static shift 3
  # One formula for both kinds: alpha^2 / sigma^2.
  np.testing.assert_allclose(mt.snr_factor(ddpm)[[0, 273, 999]],
                             [a / (1 - a) for a in ddpm.values[[0, 273, 999]]], rtol=1e-12)
  with np.errstate(divide='ignore'):
    np.testing.assert_allclose(mt.snr_factor(sd3), (1 - sd3.values) ** 2 / sd3.values ** 2,
                               rtol=1e-12)
  with pytest.raises(ValueError, match='use_karras_sigmas'):
    schedules.noising_schedule_from_scheduler_config(dict(shift=3.0, use_karras_sigmas=True))


def test_empty_accumulator_raises():
  with pytest.raises(ValueError):
    mt.MidTimestepAccumulator(np.ones(4)).mean_curve()


def test_report_writes_json_and_png(tmp_path):
  from PIL import Image
  sigmas = schedules.flux_mid_timestep_sigmas(num_steps=99)
  acc = mt.MidTimestepAccumulator.for_flow_matching(sigmas)
  rng = np.random.default_rng(3)
  z_h, z_l = _pair_matching(rng, 1.0)  # sigma = 0.5: t / 99 = 1 / (1 + e^mu), mu = 1.15 -> t ~ 23.8
  acc.add(z_h[None], z_l[None])
  json_path, png_path = mt.write_mid_timestep_report(str(tmp_path), acc, name='flux',
                                                     metadata={'model': 'tiny'})
  report = json.loads(open(json_path).read())
  assert report['optimal_timestep'] == acc.optimal_timestep() == 24
  assert report['num_samples'] == 1 and report['metadata'] == {'model': 'tiny'}
  assert report['mean_loss'][0] is None and len(report['timesteps']) == 100
  assert report['schedule']['kind'] == 'flow_matching'
  np.testing.assert_allclose(report['schedule']['sigma'], sigmas, rtol=1e-12)
  image = Image.open(png_path)
  assert image.size == (960, 560)
  pixels = np.asarray(image.convert('RGB'))
  assert (pixels != 255).any(axis=-1).mean() > 0.005  # something was drawn
