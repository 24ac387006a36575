"""Pre-computed mid-timestep t* (OMGSR Sec. 3.3, Eq. 3-5; flow matching Eq. 18-19).

For every candidate timestep t the SNR of the pre-trained noisy latent z_t is compared with the SNR
of the LQ latent z_L, per sample; t* minimises the dataset mean of ``|SNR(z_t) - SNR(z_L)|``.

Paper vs code: the OMGSR HEAD script ``mid_timestep/mid_timestep_sd.py`` uses the SNR
form of the paper (Eq. 3-4), which replaced an earlier noise-power matching rule
(``|MSE(z_t, z_H) - MSE(z_L, z_H)|``) - we follow HEAD. Other HEAD details we keep:

* candidates are t = 999..0 (the paper says 999..1; t = 0 is never the argmin in practice);
* the SNR is per sample (HEAD runs batch size 1; with a larger batch it would pool the batch - we
  always compute per sample, which is what Eq. 5 writes);
* latents come from the frozen VAE, sampled and scaled (the streaming command feeds them here).

Both schedule kinds take one code path: a :class:`~sr_jax.diffusion.schedules.NoisingSchedule`
gives alpha_t^2 and sigma_t^2 of ``z_t = alpha_t z_H + sigma_t eps`` per candidate t, and Eq. 3 /
Eq. 18 are both ``SNR(z_t) = alpha_t^2 E[z_H^2] / sigma_t^2`` (:func:`snr_factor`).

The stream is reduced to two numbers per sample (mean z_H^2 and mean (z_L - z_H)^2) on the device;
the 1000-point loss curves are accumulated in float64 on the host.

The report is a JSON file and a PNG line plot drawn with PIL (matplotlib is not a dependency).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.diffusion import schedules


def _per_sample_mean_square(x) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return jnp.mean(jnp.square(x).reshape(x.shape[0], -1), axis=1)


def snr_factor(schedule: schedules.NoisingSchedule) -> np.ndarray:
  """SNR(z_t) per unit signal power, ``alpha_t^2 / sigma_t^2`` for every candidate t (float64).

  One formula for both kinds: OMGSR Eq. 3 (DDPM, ``alpha_bar / (1 - alpha_bar)``) and Eq. 18 (flow
  matching, ``(1 - sigma)^2 / sigma^2``). sigma_t = 0 (the clean end of a flow grid) gives +inf.
  """
  a2 = np.asarray(schedule.alpha_squared, np.float64)
  s2 = np.asarray(schedule.sigma_squared, np.float64)
  with np.errstate(divide='ignore'):
    return np.where(s2 > 0, a2 / np.maximum(s2, 1e-300), np.inf)


def _snr_of_latent(alpha_squared, sigma_squared, z_h) -> jax.Array:
  power = _per_sample_mean_square(z_h)
  factor = jnp.asarray(alpha_squared, jnp.float32) / jnp.asarray(sigma_squared, jnp.float32)
  return power[:, None] * factor if factor.ndim else power * factor


def snr_of_noised_latent(alpha_bar, z_h) -> jax.Array:
  """OMGSR Eq. 3: ``SNR(z_t) = alpha_bar E[z_H^2] / (1 - alpha_bar)`` (E[eps^2] = 1).

  Args:
    alpha_bar: scalar or array of shape (T,) (one value per candidate timestep).
    z_h: HQ latents, shape (B, ...); the expectation is the mean over all non-batch axes.

  Returns:
    (B,) for a scalar ``alpha_bar``, (B, T) for a (T,) array.
  """
  alpha_bar = jnp.asarray(alpha_bar, jnp.float32)
  return _snr_of_latent(alpha_bar, 1.0 - alpha_bar, z_h)


def snr_of_flow_latent(sigma, z_h) -> jax.Array:
  """OMGSR Eq. 18: ``SNR(z_t) = (1 - sigma)^2 E[z_H^2] / sigma^2`` (shapes as
  :func:`snr_of_noised_latent`)."""
  sigma = jnp.asarray(sigma, jnp.float32)
  return _snr_of_latent(jnp.square(1.0 - sigma), jnp.square(sigma), z_h)


def snr_of_lq_latent(z_h, z_l) -> jax.Array:
  """OMGSR Eq. 4: ``SNR(z_L) = E[z_H^2] / E[(z_L - z_H)^2]`` per sample, shape (B,)."""
  z_h = jnp.asarray(z_h, jnp.float32)
  return _per_sample_mean_square(z_h) / _per_sample_mean_square(jnp.asarray(z_l, jnp.float32) - z_h)


def mid_timestep_loss_curves(snr_factor, signal_power, lq_snr) -> np.ndarray:
  """Per-sample summand of OMGSR Eq. 5 / 19: ``|SNR(z_t) - SNR(z_L)|`` for every candidate t.

  Args:
    snr_factor: (T,) SNR(z_t) per unit signal power (:func:`snr_factor` of a schedule).
    signal_power: (B,) per-sample E[z_H^2].
    lq_snr: (B,) per-sample SNR(z_L) (Eq. 4).

  Returns:
    (B, T) float64 array.
  """
  snr_t = np.asarray(signal_power, np.float64)[:, None] * np.asarray(snr_factor, np.float64)[None]
  return np.abs(snr_t - np.asarray(lq_snr, np.float64)[:, None])


@jax.jit
def latent_pair_statistics(z_h: jax.Array, z_l: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sample E[z_H^2] and E[(z_L - z_H)^2] (all that Eq. 3-5 need from a latent pair)."""
  z_h = jnp.asarray(z_h, jnp.float32)
  return _per_sample_mean_square(z_h), _per_sample_mean_square(jnp.asarray(z_l, jnp.float32) - z_h)


class MidTimestepAccumulator:
  """Streams (z_H, z_L) batches and keeps the running dataset mean of the Eq. 5 / 19 loss curve.

  ``snr_factor[t]`` is SNR(z_t) per unit signal power for timestep index t; build it from a
  :class:`~sr_jax.diffusion.schedules.NoisingSchedule` of either kind with :meth:`for_schedule`
  (:meth:`for_ddpm` and :meth:`for_flow_matching` are shorthands); t* = argmin of
  :meth:`mean_curve`.
  """

  def __init__(self, snr_factor, timesteps=None, schedule: schedules.NoisingSchedule | None = None):
    self.snr_factor = np.asarray(snr_factor, np.float64)
    self.timesteps = (np.arange(len(self.snr_factor)) if timesteps is None
                      else np.asarray(timesteps))
    self.schedule = schedule
    self._sum = np.zeros_like(self.snr_factor)
    self.count = 0

  @classmethod
  def for_schedule(cls, schedule: schedules.NoisingSchedule) -> 'MidTimestepAccumulator':
    """Candidates t = 0..T-1 of a DDPM or flow-matching schedule (OMGSR Eq. 3-5 / 18-19)."""
    return cls(snr_factor(schedule), schedule.timesteps, schedule)

  @classmethod
  def for_ddpm(cls, alphas_cumprod) -> 'MidTimestepAccumulator':
    """Candidates t = 0..N-1 of a DDPM schedule (OMGSR Eq. 3-5)."""
    return cls.for_schedule(schedules.NoisingSchedule.ddpm(alphas_cumprod))

  @classmethod
  def for_flow_matching(cls, sigmas) -> 'MidTimestepAccumulator':
    """Candidates t = 0..N-1 with ``sigmas[t]`` (e.g. ``flux_mid_timestep_sigmas()``; Eq. 18-19)."""
    return cls.for_schedule(schedules.NoisingSchedule.flow_matching(sigmas))

  def add(self, z_h, z_l) -> None:
    """Adds a batch of latent pairs (B, ...) - each sample counts once."""
    power, noise_power = jax.device_get(latent_pair_statistics(z_h, z_l))
    self.add_statistics(power, noise_power)

  def add_statistics(self, signal_power, noise_power) -> None:
    """Adds per-sample E[z_H^2] and E[(z_L - z_H)^2] (e.g. gathered from several hosts)."""
    power = np.asarray(signal_power, np.float64).reshape(-1)
    lq_snr = power / np.asarray(noise_power, np.float64).reshape(-1)
    self._sum += mid_timestep_loss_curves(self.snr_factor, power, lq_snr).sum(axis=0)
    self.count += power.shape[0]

  def mean_curve(self) -> np.ndarray:
    """Dataset mean of ``|SNR(z_t) - SNR(z_L)|`` for every candidate t (OMGSR Eq. 5)."""
    if self.count == 0:
      raise ValueError('no samples were added')
    return self._sum / self.count

  def optimal_timestep(self) -> int:
    """t* = argmin_t of :meth:`mean_curve` (OMGSR Eq. 5 / 19)."""
    return int(self.timesteps[int(np.argmin(self.mean_curve()))])


def _finite_or_none(values) -> list:
  return [float(v) if math.isfinite(v) else None for v in np.asarray(values, np.float64)]


def write_mid_timestep_report(out_dir: str, accumulator: MidTimestepAccumulator, *,
                              name: str = 'mid_timestep',
                              metadata: Mapping[str, Any] | None = None) -> tuple[str, str]:
  """Writes ``<name>.json`` (t*, sample count, curve, the schedule's alpha_bar_t or sigma_t;
  non-finite values as null) and ``<name>.png``.

  Returns the two paths.
  """
  os.makedirs(out_dir, exist_ok=True)
  curve = accumulator.mean_curve()
  t_star = accumulator.optimal_timestep()
  report = dict(optimal_timestep=t_star,
                loss_at_optimum=float(curve[int(np.argmin(curve))]),
                num_samples=accumulator.count,
                timesteps=[int(t) for t in accumulator.timesteps],
                mean_loss=_finite_or_none(curve),
                metadata=dict(metadata or {}))
  schedule = accumulator.schedule
  if schedule is not None:  # the noise level of every candidate: alpha_bar_t or sigma_t
    report['schedule'] = {'kind': schedule.kind,
                          schedule.value_name: _finite_or_none(schedule.values)}
  equation = 'Eq. 19' if schedule is not None and schedule.kind == 'flow_matching' else 'Eq. 5'
  json_path = os.path.join(out_dir, f'{name}.json')
  with open(json_path, 'w') as f:
    json.dump(report, f, indent=1)
  png_path = os.path.join(out_dir, f'{name}.png')
  plot_loss_curve(png_path, accumulator.timesteps, curve, t_star,
                  title=f'OMGSR {equation} mean |SNR(z_t) - SNR(z_L)|, t* = {t_star} '
                        f'(N = {accumulator.count})')
  return json_path, png_path


# ----------------------------------------------------------------------------- PIL line plot


def _nice_ticks(lo: float, hi: float, count: int = 6) -> np.ndarray:
  span = max(hi - lo, 1e-12)
  raw = span / count
  step = 10 ** math.floor(math.log10(raw))
  step *= min((m for m in (1, 2, 5, 10) if m * step >= raw), default=10)
  return np.arange(math.ceil(lo / step) * step, hi + 0.5 * step, step)


def plot_loss_curve(path: str, timesteps, curve, t_star: int, *, title: str = '',
                    log_y: bool = True, size: tuple[int, int] = (960, 560)) -> None:
  """Draws the loss curve over t with PIL: axes, ticks, the curve and a red circle at t*.

  ``log_y`` plots log10 of the loss (the curve spans orders of magnitude near t = 0); non-finite
  points are skipped.
  """
  from PIL import Image, ImageDraw  # pillow is a runtime dependency; imported lazily

  t = np.asarray(timesteps, np.float64)
  y = np.asarray(curve, np.float64)
  if log_y:
    with np.errstate(divide='ignore'):
      y = np.log10(np.maximum(y, 1e-12))
  ok = np.isfinite(y)
  width, height = size
  left, right, top, bottom = 90, 30, 50, 60
  t_lo, t_hi = float(t.min()), float(t.max())
  y_lo, y_hi = float(y[ok].min()), float(y[ok].max())
  if y_hi - y_lo < 1e-12:
    y_lo, y_hi = y_lo - 1.0, y_hi + 1.0

  def to_px(tt, yy):
    px = left + (tt - t_lo) / max(t_hi - t_lo, 1e-12) * (width - left - right)
    py = height - bottom - (yy - y_lo) / (y_hi - y_lo) * (height - top - bottom)
    return float(px), float(py)

  image = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(image)
  draw.rectangle([left, top, width - right, height - bottom], outline='black')
  for tick in _nice_ticks(t_lo, t_hi):
    px, _ = to_px(tick, y_lo)
    draw.line([px, height - bottom, px, height - bottom + 5], fill='black')
    draw.text((px - 12, height - bottom + 8), f'{tick:g}', fill='black')
  for tick in _nice_ticks(y_lo, y_hi):
    _, py = to_px(t_lo, tick)
    draw.line([left - 5, py, left, py], fill='black')
    draw.line([left, py, width - right, py], fill=(225, 225, 225))
    draw.text((8, py - 6), f'{10.0 ** tick if log_y else tick:.3g}', fill='black')
  points = [to_px(tt, yy) for tt, yy, good in zip(t, y, ok) if good]
  if len(points) > 1:
    draw.line(points, fill=(30, 80, 200), width=2)
  star = int(np.argmin(np.where(np.isfinite(curve), curve, np.inf)))
  cx, cy = to_px(t[star], y[star])
  draw.ellipse([cx - 8, cy - 8, cx + 8, cy + 8], outline='red', width=3)
  draw.text((cx + 10, cy - 22), f't* = {t_star}', fill='red')
  draw.text((left, 15), title, fill='black')
  draw.text(((width - left) // 2 + left - 30, height - 25), 'timestep t', fill='black')
  draw.text((8, top - 30), 'loss (log scale)' if log_y else 'loss', fill='black')
  image.save(path)
