"""DDPM and flow-matching schedules: OMGSR constants, diffusers parity, one-step round trips."""
import math

import jax
import numpy as np
import pytest

from sr_jax.diffusion import latents, schedules

SD21_BASE_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule='scaled_linear', prediction_type='epsilon',
                           trained_betas=None, clip_sample=False)


def test_sd21_base_alpha_bar_at_omgsr_mid_timesteps():
  alphas_cumprod = schedules.ddpm_alphas_cumprod(SD21_BASE_SCHEDULER)
  assert alphas_cumprod.shape == (1000,)
  # OMGSR HEAD t* = 273, paper-era t* = 195 (configs/omgsr_s_512.yml history), OSEDiff t = 999.
  assert alphas_cumprod[273] == pytest.approx(0.6357, abs=1e-4)
  assert math.sqrt(alphas_cumprod[273]) == pytest.approx(0.7973, abs=1e-4)
  assert math.sqrt(1 - alphas_cumprod[273]) == pytest.approx(0.6035, abs=1e-4)
  assert alphas_cumprod[195] == pytest.approx(0.7614, abs=1e-4)
  assert alphas_cumprod[999] == pytest.approx(0.00466, abs=1e-5)


@pytest.mark.parametrize('config', [
    SD21_BASE_SCHEDULER,
    dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear'),
    dict(num_train_timesteps=100, beta_schedule='squaredcos_cap_v2'),
])
def test_alphas_cumprod_match_diffusers(config):
  diffusers = pytest.importorskip('diffusers')
  reference = diffusers.DDPMScheduler(**config).alphas_cumprod.numpy()
  np.testing.assert_allclose(schedules.ddpm_alphas_cumprod(config), reference, rtol=2e-5, atol=1e-7)


def test_unsupported_schedule_raises():
  with pytest.raises(ValueError, match='beta_schedule'):
    schedules.ddpm_betas(dict(beta_schedule='sigmoid'))


def test_ddpm_one_step_inverts_noising():
  z0, eps = np.random.default_rng(0).normal(size=(2, 1, 4, 4, 4)).astype(np.float32)
  alpha_bar = 0.6357
  v = math.sqrt(alpha_bar) * eps - math.sqrt(1 - alpha_bar) * z0  # v-prediction target

  @jax.jit
  def round_trips(z0, eps, v):
    z_t = schedules.ddpm_add_noise(z0, eps, alpha_bar)
    return (z_t, latents.x0_from_epsilon(z_t, eps, alpha_bar),
            latents.x0_from_prediction(z_t, v, alpha_bar, 'v_prediction'))

  z_t, from_eps, from_v = round_trips(z0, eps, v)
  np.testing.assert_allclose(z_t, math.sqrt(alpha_bar) * z0 + math.sqrt(1 - alpha_bar) * eps,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(from_eps, z0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(from_v, z0, rtol=1e-5, atol=1e-5)


def test_flow_one_step_inverts_noising():
  z0, eps = np.random.default_rng(1).normal(size=(2, 1, 4, 4, 16)).astype(np.float32)
  sigma = 0.505
  x0 = jax.jit(lambda z0, eps: latents.x0_from_velocity(
      schedules.flow_add_noise(z0, eps, sigma), eps - z0, sigma))(z0, eps)
  np.testing.assert_allclose(x0, z0, rtol=1e-5, atol=1e-5)


def test_flux_mid_timestep_sigma():
  assert schedules.flux_image_seq_len(1024, 1024) == 4096
  assert schedules.flux_mu(256) == pytest.approx(0.5)
  assert schedules.flux_mu(4096) == pytest.approx(1.15)
  sigmas = schedules.flux_mid_timestep_sigmas()
  assert sigmas.shape == (1000,)
  assert sigmas[0] == 0.0 and sigmas[999] == pytest.approx(1.0)
  assert np.all(np.diff(sigmas) > 0)
  assert sigmas[244] == pytest.approx(0.505, abs=1e-3)  # OMGSR HEAD configs/omgsr_f_1024.yml t* = 244
  # The static shift with s = e^mu is the same map.
  grid = np.linspace(0.01, 1.0, 50)
  np.testing.assert_allclose(schedules.flow_time_shift(grid, 0.7),
                             schedules.flow_static_shift(grid, math.exp(0.7)), rtol=1e-12)


def test_flow_sigmas_match_diffusers():
  diffusers = pytest.importorskip('diffusers')
  static = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
  base = np.linspace(1.0, 1.0 / 1000, 1000)
  np.testing.assert_allclose(schedules.flow_static_shift(base, 3.0), static.sigmas.numpy()[:1000],
                             rtol=1e-5)
  dynamic = diffusers.FlowMatchEulerDiscreteScheduler(
      num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
      base_image_seq_len=256, max_image_seq_len=4096)
  mu = schedules.flux_mu(schedules.flux_image_seq_len(512, 512))
  dynamic.set_timesteps(num_inference_steps=8, mu=mu)
  # diffusers' grid runs from sigma_max = 1 to sigma_min = 1 / num_train_timesteps before shifting.
  np.testing.assert_allclose(schedules.flow_time_shift(np.linspace(1.0, 1.0 / 1000, 8), mu),
                             dynamic.sigmas.numpy()[:8], rtol=1e-5)
