"""Noise schedules for one-step diffusion SR: DDPM (SD2.1) and flow matching (SD3 / FLUX).

The one-step generators only need the schedule value at one mid-timestep t* (OMGSR: 273 for
SD2.1-base, 244 for FLUX.1-dev in the OMGSR HEAD configs), so the schedules are plain numpy arrays
computed once on the host in float64, and the noising / x0-prediction formulas are jnp functions that
take the schedule value as a scalar (Python float or array).

DDPM ``alphas_cumprod`` follows diffusers' ``DDPMScheduler`` from a scheduler ``config.json`` dict;
diffusers computes it in float32, we compute in float64 (differences ~1e-7, checked in
``tests/test_schedules.py``).

Flow matching follows OMGSR Eq. 16 (supplementary): ``z_t = (1 - sigma) z_H + sigma eps``, with
the grids of diffusers' ``FlowMatchEulerDiscreteScheduler`` (training grid, ``set_timesteps``
sampling sigmas, static SD3 shift and FLUX's resolution-dependent shift; checked in
``tests/test_flow_matching.py``), the SD3 training recipe (logit-normal timesteps, loss weighting,
x0-preconditioned loss) and OMGSR-F's t* grid. The inverse one-step predictions (eps / v /
velocity -> x0) are in :mod:`sr_jax.diffusion.latents`; the multi-step Euler sampler in
:mod:`sr_jax.diffusion.samplers`. :class:`NoisingSchedule` describes either kind for the t* search.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.diffusion import latents

# diffusers DDPMScheduler defaults (used for keys missing from a config dict).
_DDPM_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                      beta_schedule='linear', trained_betas=None, rescale_betas_zero_snr=False)


# ------------------------------------------------------------------------------------------ DDPM


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
  """diffusers ``betas_for_alpha_bar`` with the 'cosine' transform (``squaredcos_cap_v2``)."""
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                   for i in range(num_steps)], np.float64)


def ddpm_betas(config: Mapping[str, Any]) -> np.ndarray:
  """The DDPM betas (float64, length ``num_train_timesteps``) of a diffusers scheduler config.

  Supports ``beta_schedule`` 'linear' (linspace(b0, b1, N)), 'scaled_linear' (Stable Diffusion:
  linspace(sqrt b0, sqrt b1, N) ** 2), 'squaredcos_cap_v2' and explicit ``trained_betas``.
  """
  cfg = {**_DDPM_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
  if cfg['rescale_betas_zero_snr']:
    raise ValueError('rescale_betas_zero_snr=True is not supported (no sr_jax base model uses it)')
  n = int(cfg['num_train_timesteps'])
  if cfg['trained_betas'] is not None:
    return np.asarray(cfg['trained_betas'], np.float64)
  b0, b1 = float(cfg['beta_start']), float(cfg['beta_end'])
  schedule = cfg['beta_schedule']
  if schedule == 'linear':
    return np.linspace(b0, b1, n, dtype=np.float64)
  if schedule == 'scaled_linear':
    return np.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=np.float64) ** 2
  if schedule == 'squaredcos_cap_v2':
    return _cosine_betas(n)
  raise ValueError(f'unsupported beta_schedule {schedule!r}; supported: linear, scaled_linear, '
                   'squaredcos_cap_v2 or trained_betas')


def ddpm_alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
  """``alphas_cumprod`` (alpha-bar_t for t = 0..N-1, float64) of a diffusers DDPM scheduler config.

  This is the alpha_t of OMGSR Eq. 1 / alpha-bar_t of Eq. 3, 6, 7, indexed by the integer timestep
  the UNet receives (diffusers' convention, t = 0 is the first noising step). SD2.1-base:
  ``alphas_cumprod[273] = 0.6357``.
  """
  return np.cumprod(1.0 - ddpm_betas(config))


def ddpm_add_noise(z0: jax.Array, noise: jax.Array, alpha_bar) -> jax.Array:
  """OMGSR Eq. 1: ``z_t = sqrt(alpha_bar) z0 + sqrt(1 - alpha_bar) eps``."""
  alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
  return (jnp.sqrt(alpha_bar) * z0 + jnp.sqrt(1.0 - alpha_bar) * noise).astype(z0.dtype)


# ------------------------------------------------------------------------------- flow matching


def flow_static_shift(sigma, shift: float):
  """SD3 static timestep shift: ``sigma' = s sigma / (1 + (s - 1) sigma)`` (diffusers
  ``FlowMatchEulerDiscreteScheduler``, ``shift`` in its config; SD3 / SD3.5: s = 3).

  Equals :func:`flow_time_shift` with ``mu = log(s)``. Works on numpy or jnp arrays.
  """
  if not shift > 0:
    raise ValueError(f'flow-matching shift must be > 0, got {shift!r}')
  return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
  """FLUX's resolution-dependent shift mu: linear from (256, 0.5) to (4096, 1.15) in the number of
  image tokens (diffusers ``pipeline_flux.calculate_shift``; OMGSR
  ``mid_timestep_flux.get_lin_function``)."""
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return float(base_shift + slope * (image_seq_len - base_seq_len))


def flux_image_seq_len(height: int, width: int, vae_scale: int = 8, patch_size: int = 2) -> int:
  """Number of FLUX image tokens for an image of ``height x width`` pixels (1024^2 -> 4096)."""
  return (height // vae_scale // patch_size) * (width // vae_scale // patch_size)


def flow_time_shift(sigma, mu: float, exponent: float = 1.0) -> np.ndarray:
  """FLUX exponential time shift: ``sigma' = e^mu / (e^mu + (1/sigma - 1)^exponent)`` (diffusers
  ``FlowMatchEulerDiscreteScheduler._time_shift_exponential``).

  numpy, float64; sigma = 0 maps to 0 and sigma = 1 to 1.
  """
  sigma = np.asarray(sigma, np.float64)
  with np.errstate(divide='ignore'):
    odds = np.where(sigma > 0, 1.0 / np.maximum(sigma, 1e-300) - 1.0, np.inf) ** exponent
  return np.where(sigma > 0, math.exp(mu) / (math.exp(mu) + odds), 0.0)


# The FlowMatchEulerDiscreteScheduler options sr_jax does not implement, with the value that means
# "off"; a scheduler config that turns one on is refused by FlowMatchConfig.from_scheduler_config.
_FLOW_OPTIONS_OFF = dict(invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
                         use_exponential_sigmas=False, use_beta_sigmas=False,
                         time_shift_type='exponential', stochastic_sampling=False)


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
  """The diffusers ``FlowMatchEulerDiscreteScheduler`` settings: SD3 / SD3.5 (static shift 3) and
  FLUX (``use_dynamic_shifting``: mu from the image token count, exponential time shift).

  Defaults are diffusers' constructor defaults; :data:`SD3_FLOW_MATCH` and :data:`FLUX_FLOW_MATCH`
  are the two base models' ``scheduler/scheduler_config.json``.
  """
  num_train_timesteps: int = 1000
  shift: float = 1.0
  use_dynamic_shifting: bool = False
  base_shift: float = 0.5
  max_shift: float = 1.15
  base_image_seq_len: int = 256
  max_image_seq_len: int = 4096

  def __post_init__(self):
    if not self.shift > 0:
      raise ValueError(f'flow-matching shift must be > 0, got {self.shift!r}')
    if int(self.num_train_timesteps) < 1:
      raise ValueError(f'num_train_timesteps must be >= 1, got {self.num_train_timesteps!r}')

  @classmethod
  def from_scheduler_config(cls, config: Mapping[str, Any]) -> 'FlowMatchConfig':
    """From a diffusers scheduler ``config.json`` dict; missing or null keys take diffusers'
    defaults, other keys (``_class_name``, ...) are ignored, unsupported options raise."""
    for key, off in _FLOW_OPTIONS_OFF.items():
      value = config.get(key, off)
      if value is not None and value != off:
        raise ValueError(f'unsupported FlowMatchEulerDiscreteScheduler option {key}={value!r} '
                         f'(only {key}={off!r} is implemented)')
    kwargs = {f.name: config[f.name] for f in dataclasses.fields(cls)
              if config.get(f.name) is not None}
    return cls(**kwargs)

  def mu(self, image_seq_len: int) -> float:
    """diffusers ``calculate_shift`` with this config's sequence lengths and shifts."""
    return flux_mu(image_seq_len, self.base_image_seq_len, self.max_image_seq_len,
                   self.base_shift, self.max_shift)


SD3_FLOW_MATCH = FlowMatchConfig(shift=3.0)
FLUX_FLOW_MATCH = FlowMatchConfig(shift=3.0, use_dynamic_shifting=True)


def flow_training_sigmas(config: FlowMatchConfig) -> np.ndarray:
  """The training grid of diffusers ``FlowMatchEulerDiscreteScheduler.__init__`` (float64, (N,)).

  ``s_i = (N - i) / N`` for i = 0..N-1 (diffusers: ``linspace(1, N, N)[::-1] / N``), descending
  from 1 to 1/N; with a static shift ``sigma_i = shift s_i / (1 + (shift - 1) s_i)`` (SD3: 1 ...
  0.002994), with ``use_dynamic_shifting`` unshifted (FLUX: 1 ... 0.001). Training indices index
  this array; the transformer is fed :func:`flow_sigma_to_timestep` of it.
  """
  n = int(config.num_train_timesteps)
  sigmas = np.linspace(1.0, n, n, dtype=np.float64)[::-1] / n
  return sigmas if config.use_dynamic_shifting else flow_static_shift(sigmas, config.shift)


def flow_sigma_to_timestep(sigma, num_train_timesteps: int = 1000):
  """``t = sigma N``: the timestep diffusers feeds SD3's transformer (``scheduler.timesteps``,
  ``_sigma_to_t``). FLUX's pipeline divides it by 1000 again, i.e. feeds sigma."""
  return sigma * num_train_timesteps


def flow_timestep_to_sigma(timestep, num_train_timesteps: int = 1000):
  """``sigma = t / N``, the inverse of :func:`flow_sigma_to_timestep`."""
  return timestep / num_train_timesteps


def flow_inference_sigmas(config: FlowMatchConfig, num_inference_steps: int | None = None, *,
                          sigmas=None, mu: float | None = None) -> np.ndarray:
  """diffusers ``FlowMatchEulerDiscreteScheduler.set_timesteps``: the sampling sigmas, terminal 0
  appended (float64, (num_inference_steps + 1,)).

  Without ``sigmas``: ``linspace(sigma_max, sigma_min, n)`` over the ends of
  :func:`flow_training_sigmas` - already shifted for a static shift, and shifted again here (SD3
  N = 4: 1, 0.85769, 0.60215, 0.0089286, 0). Given ``sigmas`` (FluxPipeline:
  ``linspace(1, 1/n, n)``, see :func:`flux_pipeline_sigmas`) those are shifted. The shift is the
  static one, or with ``use_dynamic_shifting`` :func:`flow_time_shift` with ``mu`` (required).
  Timesteps are :func:`flow_sigma_to_timestep` of all but the last.
  """
  if config.use_dynamic_shifting and mu is None:
    raise ValueError('mu must be given when use_dynamic_shifting is set (FLUX: flux_mu(seq_len))')
  if sigmas is None:
    if num_inference_steps is None or int(num_inference_steps) < 1:
      raise ValueError(f'num_inference_steps must be >= 1, got {num_inference_steps!r}')
    grid = flow_training_sigmas(config)
    sigmas = np.linspace(grid[0], grid[-1], int(num_inference_steps))
  else:
    sigmas = np.asarray(sigmas, np.float64).reshape(-1)
    if num_inference_steps is not None and len(sigmas) != num_inference_steps:
      raise ValueError(f'{len(sigmas)} sigmas given for num_inference_steps={num_inference_steps}')
  if config.use_dynamic_shifting:
    shifted = flow_time_shift(sigmas, mu)
  else:
    shifted = flow_static_shift(sigmas, config.shift)
  return np.concatenate([shifted, [0.0]])


def flux_pipeline_sigmas(num_inference_steps: int, image_seq_len: int,
                         config: FlowMatchConfig = FLUX_FLOW_MATCH) -> np.ndarray:
  """diffusers ``FluxPipeline.__call__``: ``set_timesteps(sigmas=linspace(1, 1/n, n),
  mu=calculate_shift(image_seq_len))`` -> the n + 1 sampling sigmas (see
  :func:`flow_inference_sigmas`)."""
  n = int(num_inference_steps)
  if n < 1:
    raise ValueError(f'num_inference_steps must be >= 1, got {num_inference_steps!r}')
  return flow_inference_sigmas(config, sigmas=np.linspace(1.0, 1.0 / n, n),
                               mu=config.mu(image_seq_len))


def flow_mid_timestep_sigmas(config: FlowMatchConfig, num_steps: int = 999,
                             image_seq_len: int = 4096) -> np.ndarray:
  """sigma_t for the integer timesteps t = 0..num_steps of OMGSR-F's t* grid (float64, ascending).

  OMGSR ``mid_timestep/mid_timestep_flux.py`` shifts ``linspace(1, 0, num_steps + 1)`` and reads
  timestep t as ``sigmas[-(t + 1)]``, i.e. ``sigma_t = shift(t / num_steps)``. The shift is the
  config's: FLUX (dynamic) the time shift with ``mu = config.mu(image_seq_len)`` - OMGSR always
  uses the 1024^2 length 4096, mu = 1.15, and its HEAD t* = 244 gives sigma = 0.50511; a static
  shift (SD3, an sr_jax extension: OMGSR defines the FLUX grid only) applies
  :func:`flow_static_shift`.
  """
  unshifted = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  if config.use_dynamic_shifting:
    return flow_time_shift(unshifted, config.mu(image_seq_len))
  return flow_static_shift(unshifted, config.shift)


def flux_mid_timestep_sigmas(num_steps: int = 999, image_seq_len: int = 4096) -> np.ndarray:
  """:func:`flow_mid_timestep_sigmas` for FLUX (OMGSR-F): sigma_244 = 0.50511 at 1024^2."""
  return flow_mid_timestep_sigmas(FLUX_FLOW_MATCH, num_steps, image_seq_len)


def _per_sample(value, like: jax.Array) -> jax.Array:
  """A scalar or one value per sample ((B,)) as float32, broadcastable against ``like`` (B, ...)."""
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 1 and like.ndim > 1:
    value = value.reshape((-1,) + (1,) * (like.ndim - 1))
  return value


def flow_add_noise(z0: jax.Array, noise: jax.Array, sigma) -> jax.Array:
  """OMGSR Eq. 16 (flow matching): ``z_t = (1 - sigma) z0 + sigma eps`` (diffusers
  ``FlowMatchEulerDiscreteScheduler.scale_noise``); sigma a scalar or one per sample (B,)."""
  sigma = _per_sample(sigma, z0)
  return ((1.0 - sigma) * z0 + sigma * noise).astype(z0.dtype)


def flow_velocity_target(z0: jax.Array, noise: jax.Array) -> jax.Array:
  """The rectified-flow velocity ``v = eps - z0 = d z_t / d sigma`` (OMGSR Eq. 17; diffusers
  ``train_dreambooth_sd3.py`` ``target = noise - model_input``)."""
  return noise - z0


# --------------------------------------------------------------- flow-matching training (SD3)

# --weighting_scheme of diffusers' SD3 training scripts (train_dreambooth_sd3.py, DiT4SR's
# train_dit4sr.py).
SD3_WEIGHTING_SCHEMES = ('none', 'sigma_sqrt', 'logit_normal', 'mode', 'cosmap')


def _check_weighting_scheme(weighting_scheme: str) -> None:
  if weighting_scheme not in SD3_WEIGHTING_SCHEMES:
    raise ValueError(f'unknown weighting_scheme {weighting_scheme!r}; supported: '
                     + ', '.join(SD3_WEIGHTING_SCHEMES))


def sample_timestep_density(rng: jax.Array, batch_size: int, weighting_scheme: str = 'logit_normal',
                            logit_mean: float = 0.0, logit_std: float = 1.0,
                            mode_scale: float = 1.29) -> jax.Array:
  """diffusers ``training_utils.compute_density_for_timestep_sampling`` (SD3 paper Sec. 3.1): u in
  [0, 1), (B,) float32.

  'logit_normal': ``u = sigmoid(N(logit_mean, logit_std^2))``; 'mode':
  ``u = 1 - x - mode_scale (cos^2(pi x / 2) - 1 + x)`` with x ~ U[0, 1); the others uniform.
  """
  _check_weighting_scheme(weighting_scheme)
  if weighting_scheme == 'logit_normal':
    normal = logit_mean + logit_std * jax.random.normal(rng, (batch_size,), jnp.float32)
    return jax.nn.sigmoid(normal)
  x = jax.random.uniform(rng, (batch_size,), jnp.float32)
  if weighting_scheme == 'mode':
    return 1.0 - x - mode_scale * (jnp.cos(math.pi * x / 2.0) ** 2 - 1.0 + x)
  return x


def timestep_indices_from_density(u: jax.Array, num_train_timesteps: int = 1000) -> jax.Array:
  """``indices = (u N).long()`` (diffusers SD3 training): int32 indices into
  :func:`flow_training_sigmas`. The product is float32 as in torch; u = 1 (where diffusers would
  index past the grid) is clipped to N - 1."""
  index = (jnp.asarray(u, jnp.float32) * num_train_timesteps).astype(jnp.int32)
  return jnp.clip(index, 0, num_train_timesteps - 1)


def sample_flow_training_sigmas(rng: jax.Array, batch_size: int, training_sigmas,
                                weighting_scheme: str = 'logit_normal', logit_mean: float = 0.0,
                                logit_std: float = 1.0,
                                mode_scale: float = 1.29) -> tuple[jax.Array, jax.Array]:
  """SD3 / DiT4SR training timesteps: u (:func:`sample_timestep_density`) -> index
  (:func:`timestep_indices_from_density`) -> ``(sigma, timestep = sigma N)``, each (B,) float32.

  ``training_sigmas`` is :func:`flow_training_sigmas` of the scheduler config (its length is N).
  """
  grid = jnp.asarray(training_sigmas, jnp.float32)
  n = grid.shape[0]
  u = sample_timestep_density(rng, batch_size, weighting_scheme, logit_mean, logit_std, mode_scale)
  sigma = grid[timestep_indices_from_density(u, n)]
  return sigma, flow_sigma_to_timestep(sigma, n)


def sd3_loss_weighting(weighting_scheme: str, sigma) -> jax.Array:
  """diffusers ``training_utils.compute_loss_weighting_for_sd3``: 'sigma_sqrt' ``sigma^-2``,
  'cosmap' ``2 / (pi (1 - 2 sigma + 2 sigma^2))``, the others 1 (same shape as ``sigma``)."""
  _check_weighting_scheme(weighting_scheme)
  sigma = jnp.asarray(sigma, jnp.float32)
  if weighting_scheme == 'sigma_sqrt':
    return sigma ** -2.0
  if weighting_scheme == 'cosmap':
    return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma ** 2))
  return jnp.ones_like(sigma)


def flow_matching_loss(model_output: jax.Array, z_t: jax.Array, z0: jax.Array, noise: jax.Array,
                       sigma, weighting_scheme: str = 'logit_normal',
                       precondition_outputs: bool = True) -> jax.Array:
  """The SD3 rectified-flow loss of diffusers ``train_dreambooth_sd3.py`` and DiT4SR
  ``train_dit4sr.py`` (scalar, float32).

  With ``precondition_outputs`` (DiT4SR: on) the velocity is turned into ``x0_hat = z_t - sigma
  v_hat`` (:func:`sr_jax.diffusion.latents.x0_from_velocity`) and compared with z0; otherwise
  ``v_hat`` is compared with ``eps - z0``. ``mean_B mean(w(sigma) (pred - target)^2)`` with
  :func:`sd3_loss_weighting`; sigma a scalar or one per sample (B,).
  """
  sigma = _per_sample(sigma, z_t)
  if precondition_outputs:
    prediction, target = latents.x0_from_velocity(z_t, model_output, sigma), z0
  else:
    prediction, target = model_output, flow_velocity_target(z0, noise)
  weighting = sd3_loss_weighting(weighting_scheme, sigma)
  error = weighting * jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(jnp.mean(error.reshape(error.shape[0], -1), axis=1))


# -------------------------------------------------------- one description for the t* search


@dataclasses.dataclass(frozen=True, eq=False)
class NoisingSchedule:
  """``z_t = alpha_t z0 + sigma_t eps`` for the integer timesteps t = 0..T-1, either kind.

  What the t* search needs from a schedule: DDPM (OMGSR Eq. 1) ``alpha_t^2 = alpha_bar_t``,
  ``sigma_t^2 = 1 - alpha_bar_t``; flow matching (OMGSR Eq. 16) ``alpha_t = 1 - sigma_t``.
  ``values`` is the schedule's own number per t (alpha_bar_t or sigma_t), named by ``value_name``.
  """
  kind: str                 # 'ddpm' | 'flow_matching'
  alpha_squared: np.ndarray
  sigma_squared: np.ndarray
  values: np.ndarray
  value_name: str           # 'alpha_bar' | 'sigma'

  @classmethod
  def ddpm(cls, alphas_cumprod) -> 'NoisingSchedule':
    """From ``alphas_cumprod`` (:func:`ddpm_alphas_cumprod`)."""
    a = np.asarray(alphas_cumprod, np.float64)
    return cls('ddpm', a, 1.0 - a, a, 'alpha_bar')

  @classmethod
  def flow_matching(cls, sigmas) -> 'NoisingSchedule':
    """From sigma_t per timestep (e.g. :func:`flow_mid_timestep_sigmas`)."""
    s = np.asarray(sigmas, np.float64)
    return cls('flow_matching', np.square(1.0 - s), np.square(s), s, 'sigma')

  @property
  def timesteps(self) -> np.ndarray:
    return np.arange(len(self.values))


def is_flow_matching_config(config: Mapping[str, Any]) -> bool:
  """Whether a diffusers scheduler config dict is a flow-matching one (``_class_name``
  FlowMatch..., or, without a class name, a ``shift`` / ``use_dynamic_shifting`` key)."""
  name = str(config.get('_class_name') or '')
  if name:
    return name.startswith('FlowMatch')
  return 'shift' in config or 'use_dynamic_shifting' in config


def noising_schedule_from_scheduler_config(config: Mapping[str, Any],
                                           image_seq_len: int = 4096) -> NoisingSchedule:
  """The t* candidates of a base model's scheduler config: DDPM ``alphas_cumprod`` (t = 0..N-1),
  or for flow matching OMGSR-F's grid :func:`flow_mid_timestep_sigmas` (t = 0..N-1, mu from
  ``image_seq_len`` when the shift is dynamic)."""
  if is_flow_matching_config(config):
    flow = FlowMatchConfig.from_scheduler_config(config)
    return NoisingSchedule.flow_matching(
        flow_mid_timestep_sigmas(flow, flow.num_train_timesteps - 1, image_seq_len))
  return NoisingSchedule.ddpm(ddpm_alphas_cumprod(config))
