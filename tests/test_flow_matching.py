"""Flow matching against diffusers 0.42: FlowMatchEulerDiscreteScheduler grids (SD3 static shift,
FLUX dynamic shift), SD3 training (logit-normal timesteps, loss weighting, x0-preconditioned loss)
and the Euler CFG sampler (a linear velocity field and a tiny random SD3 transformer)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.diffusion import latents, samplers, schedules

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers import training_utils  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

SD3 = dict(num_train_timesteps=1000, shift=3.0)  # SD3 / SD3.5 scheduler_config.json
FLUX = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def _config(kwargs):
  return schedules.FlowMatchConfig.from_scheduler_config(
      dict(FlowMatchEulerDiscreteScheduler(**kwargs).config))


def _flux_reference_sigmas(num_steps, image_seq_len):
  """What FluxPipeline.__call__ does: sigmas = linspace(1, 1/n, n), mu = calculate_shift."""
  scheduler = FlowMatchEulerDiscreteScheduler(**FLUX)
  mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
  scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
  return scheduler


# ------------------------------------------------------------------------------------- grids


@pytest.mark.parametrize('kwargs', [SD3, FLUX, dict(num_train_timesteps=100, shift=1.0)],
                         ids=['sd3', 'flux', 'unshifted'])
def test_training_grid_and_timesteps_equal_diffusers(kwargs):
  reference = FlowMatchEulerDiscreteScheduler(**kwargs)
  config = _config(kwargs)
  sigmas = schedules.flow_training_sigmas(config)
  np.testing.assert_allclose(sigmas, reference.sigmas.numpy(), rtol=1e-6, atol=0)
  timesteps = schedules.flow_sigma_to_timestep(sigmas, config.num_train_timesteps)
  np.testing.assert_allclose(timesteps, reference.timesteps.numpy(), rtol=1e-6, atol=0)
  back = schedules.flow_timestep_to_sigma(timesteps, config.num_train_timesteps)
  np.testing.assert_allclose(back, sigmas, rtol=1e-15)


def test_sd3_grid_values():
  sigmas = schedules.flow_training_sigmas(schedules.SD3_FLOW_MATCH)
  assert sigmas[0] == 1.0 and sigmas[-1] == pytest.approx(0.002994012, rel=1e-6)
  # s = 0.25 / 0.5 / 0.75 (indices 750 / 500 / 250) -> sigma = 0.5 / 0.75 / 0.9
  np.testing.assert_allclose(sigmas[[750, 500, 250]], [0.5, 0.75, 0.9], rtol=1e-12)


@pytest.mark.parametrize('num_steps', [1, 2, 4, 28, 40])
def test_sd3_inference_sigmas_equal_set_timesteps(num_steps):
  reference = FlowMatchEulerDiscreteScheduler(**SD3)
  reference.set_timesteps(num_steps)
  sigmas = schedules.flow_inference_sigmas(schedules.SD3_FLOW_MATCH, num_steps)
  assert sigmas.shape == (num_steps + 1,) and sigmas[-1] == 0.0
  np.testing.assert_allclose(sigmas, reference.sigmas.numpy(), rtol=1e-6, atol=0)
  np.testing.assert_allclose(schedules.flow_sigma_to_timestep(sigmas[:-1]),
                             reference.timesteps.numpy(), rtol=1e-6)


def test_sd3_four_step_sigmas_reshift_the_shifted_ends():
  # diffusers re-shifts the already shifted sigma_min 0.002994 -> 0.0089286 (not a typo).
  np.testing.assert_allclose(schedules.flow_inference_sigmas(schedules.SD3_FLOW_MATCH, 4),
                             [1.0, 0.8576923, 0.6021505, 0.0089286, 0.0], rtol=0, atol=1e-7)


@pytest.mark.parametrize('num_steps', [1, 4, 28, 50])
@pytest.mark.parametrize('image_seq_len', [256, 1024, 4096, 6000])
def test_flux_pipeline_sigmas_equal_calculate_shift_and_set_timesteps(num_steps, image_seq_len):
  reference = _flux_reference_sigmas(num_steps, image_seq_len)
  ours = schedules.flux_pipeline_sigmas(num_steps, image_seq_len, _config(FLUX))
  np.testing.assert_allclose(ours, reference.sigmas.numpy(), rtol=2e-6, atol=0)
  np.testing.assert_allclose(schedules.flow_sigma_to_timestep(ours[:-1]),
                             reference.timesteps.numpy(), rtol=2e-6)


def test_dynamic_shift_without_explicit_sigmas_equals_set_timesteps():
  reference = FlowMatchEulerDiscreteScheduler(**FLUX)
  mu = schedules.flux_mu(schedules.flux_image_seq_len(768, 512))
  assert mu == pytest.approx(calculate_shift(1536))
  reference.set_timesteps(12, mu=mu)
  np.testing.assert_allclose(schedules.flow_inference_sigmas(schedules.FLUX_FLOW_MATCH, 12, mu=mu),
                             reference.sigmas.numpy(), rtol=2e-6)


def test_omgsr_f_mid_timestep_244_is_sigma_0_50511():
  """OMGSR-F t* = 244: OMGSR's grid t / 999 with mu = calculate_shift(4096) = 1.15. diffusers' own
  1000-step grids do not give it: (t + 1)/1000 unshifted 0.50614, the static shift 3 0.49227."""
  sigmas = schedules.flux_mid_timestep_sigmas()
  assert schedules.FLUX_FLOW_MATCH.mu(4096) == pytest.approx(1.15)
  assert sigmas[244] == pytest.approx(0.50511, abs=5e-6)
  assert sigmas[244] == pytest.approx(np.exp(1.15) / (np.exp(1.15) + 999 / 244 - 1), rel=1e-12)
  np.testing.assert_allclose(sigmas, schedules.flow_time_shift(np.arange(1000) / 999, 1.15),
                             rtol=1e-12)
  static = schedules.flow_mid_timestep_sigmas(schedules.SD3_FLOW_MATCH)
  assert static[244] == pytest.approx(0.49227, abs=5e-6)


def test_bad_scheduler_settings_are_named():
  with pytest.raises(ValueError, match='shift must be > 0, got 0.0'):
    schedules.FlowMatchConfig(shift=0.0)
  with pytest.raises(ValueError, match='shift must be > 0, got -1'):
    schedules.flow_static_shift(np.ones(3), -1)
  with pytest.raises(ValueError, match='use_karras_sigmas=True'):
    schedules.FlowMatchConfig.from_scheduler_config(dict(SD3, use_karras_sigmas=True))
  with pytest.raises(ValueError, match="time_shift_type='linear'"):
    schedules.FlowMatchConfig.from_scheduler_config(dict(FLUX, time_shift_type='linear'))
  with pytest.raises(ValueError, match='mu must be given'):
    schedules.flow_inference_sigmas(schedules.FLUX_FLOW_MATCH, 4)
  with pytest.raises(ValueError, match='num_inference_steps must be >= 1, got 0'):
    schedules.flow_inference_sigmas(schedules.SD3_FLOW_MATCH, 0)
  assert _config(SD3) == schedules.SD3_FLOW_MATCH and _config(FLUX) == schedules.FLUX_FLOW_MATCH


# ------------------------------------------------------------------------ training timesteps


@pytest.mark.parametrize('scheme,kwargs', [('logit_normal', dict(logit_mean=0.0, logit_std=1.0)),
                                           ('logit_normal', dict(logit_mean=0.5, logit_std=1.3)),
                                           ('mode', dict(mode_scale=1.29)),
                                           ('none', {})])
def test_timestep_density_has_diffusers_distribution(scheme, kwargs):
  from scipy import stats
  n = 100_000
  ours = np.asarray(jax.jit(lambda k: schedules.sample_timestep_density(k, n, scheme, **kwargs))(
      jax.random.key(0)))
  ref_kwargs = {**dict(logit_mean=0.0, logit_std=1.0, mode_scale=1.29), **kwargs}
  reference = training_utils.compute_density_for_timestep_sampling(
      scheme, n, generator=torch.Generator().manual_seed(0), **ref_kwargs).numpy()
  assert ours.dtype == np.float32 and ours.shape == (n,)
  assert 0.0 <= ours.min() and ours.max() < 1.0
  # Two-sample Kolmogorov-Smirnov: the 0.1% critical value for n = m = 1e5 is 0.0087.
  assert stats.ks_2samp(ours, reference).statistic < 0.0087
  grid = schedules.flow_training_sigmas(schedules.SD3_FLOW_MATCH)
  ours_sigma = grid[np.asarray(schedules.timestep_indices_from_density(ours))]
  ref_sigma = grid[(torch.from_numpy(reference) * 1000).long().numpy()]
  assert abs(ours_sigma.mean() - ref_sigma.mean()) < 0.005


def test_density_to_index_to_sigma_is_the_sd3_training_mapping():
  """u -> (u N).long() -> scheduler.timesteps[index] and get_sigmas (train_dreambooth_sd3)."""
  reference = FlowMatchEulerDiscreteScheduler(**SD3)
  edges = [0.0, 4.9e-4, 5e-4, 0.25, 0.5, 0.999, 0.9999999]
  u = torch.cat([torch.tensor(edges, dtype=torch.float32),
                 torch.sigmoid(torch.randn(200, generator=torch.Generator().manual_seed(1)))])
  indices = (u * reference.config.num_train_timesteps).long()
  ref_timesteps = reference.timesteps[indices]
  lookup = [(reference.timesteps == t).nonzero().item() for t in ref_timesteps]  # get_sigmas
  ref_sigmas = reference.sigmas[lookup]
  ours = np.asarray(schedules.timestep_indices_from_density(jnp.asarray(u.numpy())))
  np.testing.assert_array_equal(ours, indices.numpy())
  grid = schedules.flow_training_sigmas(schedules.SD3_FLOW_MATCH)
  np.testing.assert_allclose(grid[ours], ref_sigmas.numpy(), rtol=1e-6)
  assert int(schedules.timestep_indices_from_density(jnp.ones(1))[0]) == 999  # clipped, not past
  # The sampler returns the same pair for its own draw.
  key = jax.random.key(3)
  sigma, t = schedules.sample_flow_training_sigmas(key, 64, grid)
  u_ours = schedules.sample_timestep_density(key, 64)
  np.testing.assert_array_equal(sigma, jnp.asarray(grid, jnp.float32)[
      schedules.timestep_indices_from_density(u_ours)])
  np.testing.assert_allclose(t, np.asarray(sigma) * 1000, rtol=1e-7)


def test_unknown_weighting_scheme_is_named():
  with pytest.raises(ValueError, match="unknown weighting_scheme 'uniform'"):
    schedules.sample_timestep_density(jax.random.key(0), 2, 'uniform')
  with pytest.raises(ValueError, match="unknown weighting_scheme 'logit-normal'"):
    schedules.sd3_loss_weighting('logit-normal', 0.5)


# ----------------------------------------------------------------------------- noising, loss


def test_noising_equals_scale_noise_and_velocity_round_trips():
  reference = FlowMatchEulerDiscreteScheduler(**SD3)
  rng = np.random.default_rng(0)
  z0 = rng.standard_normal((3, 4, 5, 16)).astype(np.float32)
  noise = rng.standard_normal(z0.shape).astype(np.float32)
  index = np.array([10, 500, 990])
  timesteps = reference.timesteps[index]
  ref = reference.scale_noise(torch.from_numpy(z0), timesteps, torch.from_numpy(noise)).numpy()
  sigma = reference.sigmas[index].numpy()  # one per sample
  z_t = schedules.flow_add_noise(z0, noise, sigma)
  np.testing.assert_allclose(z_t, ref, rtol=1e-6, atol=1e-6)
  v = schedules.flow_velocity_target(z0, noise)
  np.testing.assert_array_equal(v, noise - z0)
  np.testing.assert_allclose(latents.x0_from_velocity(z_t, v, sigma[:, None, None, None]), z0,
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('scheme', schedules.SD3_WEIGHTING_SCHEMES)
def test_loss_weighting_equals_compute_loss_weighting_for_sd3(scheme):
  sigma = torch.tensor([0.003, 0.2, 0.5, 0.9, 1.0]).reshape(-1, 1, 1, 1)
  reference = training_utils.compute_loss_weighting_for_sd3(scheme, sigma).numpy()
  np.testing.assert_allclose(schedules.sd3_loss_weighting(scheme, sigma.numpy()), reference,
                             rtol=1e-6)


def _dreambooth_sd3_loss(model_pred, z_t, z0, noise, sigma, scheme, precondition):
  """The loss of diffusers train_dreambooth_sd3.py / DiT4SR train_dit4sr.py, in torch."""
  model_pred, z_t, z0, noise = (torch.from_numpy(np.array(a)) for a in (model_pred, z_t, z0, noise))
  sigmas = torch.from_numpy(sigma).reshape(-1, 1, 1, 1)
  if precondition:
    model_pred = model_pred * (-sigmas) + z_t
  weighting = training_utils.compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
  target = z0 if precondition else noise - z0
  loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(
      target.shape[0], -1), 1)
  return loss.mean().item()


@pytest.mark.parametrize('precondition', [True, False])
@pytest.mark.parametrize('scheme', ['logit_normal', 'sigma_sqrt', 'cosmap', 'none'])
def test_flow_matching_loss_equals_dreambooth_sd3(scheme, precondition):
  rng = np.random.default_rng(4)
  z0, noise, model_pred = (rng.standard_normal((3, 4, 4, 16)).astype(np.float32) for _ in range(3))
  sigma = np.array([0.05, 0.5, 0.97], np.float32)
  z_t = np.asarray(schedules.flow_add_noise(z0, noise, sigma))
  loss = jax.jit(schedules.flow_matching_loss, static_argnums=(5, 6))(
      model_pred, z_t, z0, noise, sigma, scheme, precondition)
  reference = _dreambooth_sd3_loss(model_pred, z_t, z0, noise, sigma, scheme, precondition)
  assert float(loss) == pytest.approx(reference, rel=1e-6)


# ----------------------------------------------------------------------------------- sampler


def _linear_field(seed, channels=6, cond_dim=5):
  """v = z W + (t / 1000) c P + lr A: z-, t-, condition- and shared-input-dependent."""
  rng = np.random.default_rng(seed)
  w = (rng.standard_normal((channels, channels)) / channels).astype(np.float32)
  p = rng.standard_normal((cond_dim, channels)).astype(np.float32)
  a = (0.3 * rng.standard_normal((channels, channels))).astype(np.float32)

  def ours(z, t, cond, lr):
    return z @ w + (t / 1000.0) * (cond @ p)[:, None, None, :] + lr @ a

  def torch_ref(z, t, cond, lr):
    tt = lambda x: torch.from_numpy(x)  # noqa: E731
    return z @ tt(w) + (t / 1000.0) * (cond @ tt(p))[:, None, None, :] + lr @ tt(a)

  return ours, torch_ref


def _diffusers_cfg_loop(scheduler, velocity, z, cond, uncond, guidance_scale, **shared):
  """The SD3 / DiT4SR pipelines' denoising loop: two branches, CFG, scheduler.step."""
  z = torch.from_numpy(z)
  shared = {k: torch.from_numpy(v) for k, v in shared.items()}
  for t in scheduler.timesteps:
    v_cond = velocity(z, t, cond, **shared)
    v_uncond = velocity(z, t, uncond, **shared)
    v = v_uncond + guidance_scale * (v_cond - v_uncond)
    z = scheduler.step(v, t, z, return_dict=False)[0]
  return z.numpy()


def _assert_relative(ours, ref, tol=1e-5):
  err = float(np.abs(np.asarray(ours) - ref).max()) / float(np.abs(ref).max())
  print(f'relative error {err:.3g} (output scale {float(np.abs(ref).max()):.3g})')
  assert err <= tol, f'relative error {err:.3g}'


@pytest.mark.parametrize('kind,num_steps,guidance', [('sd3', 28, 7.0), ('dit4sr', 40, 8.0),
                                                     ('flux', 8, 3.5)])
def test_euler_cfg_sampler_equals_diffusers_step_loop(kind, num_steps, guidance):
  velocity, torch_velocity = _linear_field(seed=num_steps)
  rng = np.random.default_rng(0)
  z_init = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
  lr = rng.standard_normal(z_init.shape).astype(np.float32)
  cond, uncond = (rng.standard_normal((2, 5)).astype(np.float32) for _ in range(2))
  if kind == 'flux':
    scheduler = _flux_reference_sigmas(num_steps, 1024)
    sigmas = schedules.flux_pipeline_sigmas(num_steps, 1024)
  else:
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3)
    scheduler.set_timesteps(num_steps)
    sigmas = schedules.flow_inference_sigmas(schedules.SD3_FLOW_MATCH, num_steps)
  reference = _diffusers_cfg_loop(scheduler, torch_velocity, z_init, torch.from_numpy(cond),
                                  torch.from_numpy(uncond), guidance, lr=lr)
  sample = jax.jit(lambda z, c, u, s, lr: samplers.euler_sample(
      velocity, z, s, c, u, guidance, shared=dict(lr=lr)))
  _assert_relative(sample(z_init, cond, uncond, sigmas, lr), reference)


def test_sampler_without_uncond_is_plain_euler_and_trajectory_steps():
  velocity, _ = _linear_field(seed=1)
  rng = np.random.default_rng(1)
  z = rng.standard_normal((1, 2, 2, 6)).astype(np.float32)
  cond, lr = rng.standard_normal((1, 5)).astype(np.float32), np.zeros_like(z)
  sigmas = schedules.flow_inference_sigmas(schedules.SD3_FLOW_MATCH, 3)
  final, trajectory = samplers.euler_sample(velocity, z, sigmas, cond, shared=dict(lr=lr),
                                            return_trajectory=True)
  expected = z
  for i in range(3):
    v = velocity(expected, np.float32(sigmas[i]) * 1000, cond, lr)
    expected = expected + (np.float32(sigmas[i + 1]) - np.float32(sigmas[i])) * v
    np.testing.assert_allclose(trajectory[i], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(final, trajectory[-1])
  with pytest.raises(ValueError, match='at least 2 entries'):
    samplers.euler_sample(velocity, z, np.ones(1), cond, shared=dict(lr=lr))


def test_euler_cfg_sampler_with_tiny_sd3_transformer_equals_diffusers(tmp_path):
  """Our SD3Transformer2DModel (converted from a tiny random diffusers one) inside the jitted
  sampler vs diffusers' model in the scheduler.step loop: 4 steps, CFG 7."""
  from sr_jax.models import mmdit
  from sr_jax.weights import convert_state_dict
  config = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                caption_projection_dim=16, pooled_projection_dim=10, pos_embed_max_size=8)
  torch.manual_seed(0)
  torch_model = diffusers.SD3Transformer2DModel(**config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # random everything (zero-initialised AdaLN would hide mapping mistakes)
    for p in torch_model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel() if p.ndim > 1 else 10))
  model = mmdit.SD3Transformer2DModel.from_config(json.loads(json.dumps(dict(torch_model.config))))
  abstract = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  params = convert_state_dict(state, abstract, ignore_prefixes=model.checkpoint_ignore_prefixes())

  rng = np.random.default_rng(2)
  z_init = rng.standard_normal((1, 6, 6, 4)).astype(np.float32)
  cond = (rng.standard_normal((1, 5, 12)).astype(np.float32),
          rng.standard_normal((1, 10)).astype(np.float32))
  uncond = (np.zeros_like(cond[0]), np.zeros_like(cond[1]))

  def torch_velocity(z, t, c):
    with torch.no_grad():
      out = torch_model(hidden_states=z.permute(0, 3, 1, 2), timestep=t.expand(z.shape[0]),
                        encoder_hidden_states=torch.from_numpy(c[0]),
                        pooled_projections=torch.from_numpy(c[1])).sample
    return out.permute(0, 2, 3, 1)

  def velocity(z, t, c):
    return model.apply({'params': params}, z, t, c[0], c[1])

  scheduler = FlowMatchEulerDiscreteScheduler(**SD3)
  scheduler.set_timesteps(4)
  reference = _diffusers_cfg_loop(scheduler, torch_velocity, z_init, cond, uncond, 7.0)
  sigmas = schedules.flow_inference_sigmas(schedules.SD3_FLOW_MATCH, 4)
  ours = jax.jit(lambda z: samplers.euler_sample(velocity, z, sigmas, cond, uncond, 7.0))(z_init)
  _assert_relative(ours, reference)
