r"""The mid-timestep t* search command (OMGSR Sec. 3.3, Eq. 3-5 / 18-19): data -> frozen VAE -> t*.

    python -m sr_jax.mid_timestep_search --config=configs/omgsr.py --num_pairs=1000 \
        --out_dir=runs/mid_timestep
    python -m sr_jax.mid_timestep_search --config=configs/omgsr.py:tiny --num_pairs=8 \
        --out_dir=/tmp/mid_timestep                       # tiny random VAE, bundled photos, CPU

It prints t* and writes ``<out_dir>/mid_timestep.json`` (t*, the mean loss curve over t = 0..999,
metadata) and ``<out_dir>/mid_timestep.png`` (the curve, t* circled). Set ``config.model.t_star`` (or
``--config.model.t_star=...`` when training) to the printed value. ``--config.key=value`` overrides
work as for ``train.py``, e.g. ``--config.data.paths="('/data/LSDIR',)"``, ``--config.seed=7``.

What it measures (the OMGSR HEAD scripts ``mid_timestep/mid_timestep_sd.py`` and
``mid_timestep_flux.py``):

* the pairs are the first ``num_pairs`` records of the training stream: ``config.data`` and
  ``config.seed`` through ``sr_jax.data.pipeline`` (same crops, flips and degradations as training).
  The reference walks its whole dataset once; pass the image count as ``--num_pairs`` to do the
  same (more pairs than images start a second epoch with new crops and degradations);
* HQ and LQ are encoded by the FROZEN VAE encoder (no LoRA) to sampled latents, shifted and scaled
  by the VAE config, exactly :func:`sr_jax.inference.one_step.encode_latent` as the OMGSR training
  step encodes HQ;
* per sample: E[z_H^2] and E[(z_L - z_H)^2] (Eq. 3-4), then the dataset mean of
  ``|SNR(z_t) - SNR(z_L)|`` for t = 0..999, accumulated by
  :class:`sr_jax.diffusion.mid_timestep.MidTimestepAccumulator` over the base model's schedule
  (:func:`sr_jax.diffusion.schedules.noising_schedule_from_scheduler_config`): a DDPM scheduler
  config gives ``alphas_cumprod`` (Eq. 5), a ``FlowMatchEulerDiscreteScheduler`` config OMGSR-F's
  grid ``sigma_t = shift(t / 999)`` (Eq. 18-19; FLUX: mu at 1024^2 tokens as the reference, so
  t* = 244 is sigma = 0.50511). Same code path for both; the report names the kind and, for flow
  matching, sigma at t* (what OMGSR-F's transformer is fed).

The VAE always runs in float32 here, whatever ``config.model.compute_dtype``: the reference loads it
in float32 for the search, and bf16 rounding of z_L - z_H would add noise power to Eq. 4.

Weights: ``config.model.source == 'converted'`` loads only the encoder half of the VAE in
``config.model.sd_path`` and its ``scheduler_config.json``; ``'random'`` (the tiny config) initialises
the encoder from ``config.model.vae_config`` with ``common.load_frozen``, as tiny training does, so
the tiny search sees the same encoder (flax derives a parameter's init key from its module path, so an
encoder-only init equals the encoder half of the full init; ``tests/test_mid_timestep_search.py``
checks it).

Flow matching needs a flow-matching base model's VAE (SD3 / FLUX: 16 latent channels, their own
scaling and shift, read from its VAE config by the latent codec): flow-matching sigmas on SD
latents would produce a t* that means nothing.

Runs on one process and one device (the default device); the VAE encoder is the only model built.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sr_jax.diffusion import latents, mid_timestep
from sr_jax.diffusion import schedules
from sr_jax.inference import one_step
from sr_jax.methods import base, common
from sr_jax import xla

def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def load_frozen_encoder(config) -> tuple[base.LatentStage, Any, dict]:
  """Config -> (an encoder-only stage, float32 encoder params under 'vae', scheduler config dict).

  Builds nothing else: ``common.load_frozen`` gives the converted encoder half of
  ``config.model.sd_path``, or the random tiny encoder (the encoder half of the random VAE that
  tiny training uses).
  """
  m = config.model
  common.check_source(m)
  module, params = common.load_frozen(m, 'vae', m.get('sd_path'), seed=config.seed,
                                      param_dtype=jnp.float32, parts=('encoder',))
  if m.source == 'random':
    scheduler_config = dict(m.scheduler_config)
  else:
    from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
    scheduler_config = _read_json(os.path.join(m.sd_path, pretrained.SCHEDULER_CONFIG_FILE))
  codec = latents.LatentCodec.from_vae_config(common.model_config(m, 'vae', m.get('sd_path')))
  stage = base.LatentStage(vae=module, codec=codec, step=None, upscale=1, process_size=0,
                           name='frozen VAE encoder')
  return stage, {'vae': params}, scheduler_config


def make_pair_statistics_fn(encoder: base.LatentStage) -> Callable:
  """Jitted ``(params, hq, lq, rng) -> (E[z_H^2], E[(z_L - z_H)^2])``, each (B,), for Eq. 3-4.

  HQ and LQ go through one encoder call (a 2B batch); each latent is ``latent_dist.sample()`` x
  scaling factor, as the reference and the OMGSR training step.
  """
  @functools.partial(jax.jit, compiler_options=xla.compiler_options())
  def pair_statistics(params, hq, lq, rng):
    images = jnp.concatenate([hq, lq], axis=0)
    z = one_step.encode_latent(encoder, params, images, rng)
    z_h, z_l = jnp.split(z, 2, axis=0)
    return mid_timestep.latent_pair_statistics(z_h, z_l)
  return pair_statistics


def _metadata(config, *, num_pairs: int, batch_size: int, encoder: base.LatentStage,
              scheduler_config: dict, schedule: schedules.NoisingSchedule, curve: np.ndarray,
              power_sum: float, lq_snr_sum: float, seconds: float) -> dict:
  """What the JSON records next to t*: the data, the model and the config's current t* to compare."""
  data, m = config.data, config.model
  config_t_star = m.get('t_star')
  in_range = config_t_star is not None and 0 <= int(config_t_star) < len(curve)
  return dict(
      command='python -m sr_jax.mid_timestep_search',
      equation=(('OMGSR Eq. 18-19 (flow matching)' if schedule.kind == 'flow_matching'
                 else 'OMGSR Eq. 3-5 (DDPM)')
                + '; latents from the frozen VAE encoder, sampled, shifted and scaled'),
      schedule=schedule.kind,
      num_pairs=num_pairs, batch_size=batch_size, seed=int(config.seed),
      data_paths=[str(p) for p in data.paths], resize_to_crop=[bool(f) for f in data.resize_to_crop],
      repeats=[int(r) for r in data.repeats], crop_size=int(data.crop_size), preset=str(data.preset),
      model_source=str(m.source), sd_path=str(m.sd_path) if m.source == 'converted' else None,
      vae_dtype='float32', scaling_factor=encoder.codec.scaling_factor,
      shift_factor=encoder.codec.shift_factor,
      scheduler_config=json.loads(json.dumps(scheduler_config, default=str)),
      config_t_star=int(config_t_star) if config_t_star is not None else None,
      loss_at_config_t_star=float(curve[int(config_t_star)]) if in_range else None,
      mean_hq_latent_power=power_sum / num_pairs, mean_lq_snr=lq_snr_sum / num_pairs,
      seconds=round(seconds, 2))


def _make_iterator(config, batch_size: int):
  from sr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.make_train_iterator(
      config.data, seed=config.seed, batch_size=batch_size, process_index=0, process_count=1,
      worker_count=config.get('data_workers', 0), read_threads=config.get('data_read_threads', 1))


def _stream_statistics(config, encoder: base.LatentStage, params: Any, num_pairs: int, batch_size: int,
                       add: Callable[[np.ndarray, np.ndarray], None]) -> None:
  """Feeds ``add`` the per-sample statistics of the first ``num_pairs`` pairs of the stream.

  The host fetches batch i's statistics after dispatching batch i + 1, so loading overlaps encoding;
  the last batch is trimmed to ``num_pairs`` (every batch has the same shape: one compilation).
  """
  pair_statistics = make_pair_statistics_fn(encoder)
  base_rng = jax.random.key(config.seed)
  num_batches = -(-num_pairs // batch_size)
  iterator = _make_iterator(config, batch_size)
  pending, seen, log_every = None, 0, max(1, num_batches // 10)
  try:
    for index in range(num_batches):
      batch = next(iterator)
      stats = pair_statistics(params, jnp.asarray(batch['hq']), jnp.asarray(batch['lq']),
                              jax.random.fold_in(base_rng, index))
      if pending is not None:
        seen += _take(pending, num_pairs - seen, add)
      pending = stats
      if (index + 1) % log_every == 0:
        print(f'  batch {index + 1}/{num_batches}', flush=True)
    seen += _take(pending, num_pairs - seen, add)
  finally:
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()
  assert seen == num_pairs, (seen, num_pairs)


def _take(stats, limit: int, add: Callable[[np.ndarray, np.ndarray], None]) -> int:
  power, noise_power = (np.asarray(x, np.float64)[:limit] for x in jax.device_get(stats))
  add(power, noise_power)
  return len(power)


def search_mid_timestep(config, num_pairs: int, batch_size: int = 8, out_dir: str = '.',
                        name: str = 'mid_timestep', flow_image_seq_len: int = 4096) -> dict:
  """OMGSR Eq. 5 / 19: ``t* = argmin_t mean_i |SNR(z_t^(i)) - SNR(z_L^(i))|`` over the pairs.

  Args:
    config: an OMGSR config (``configs/omgsr.py``): uses ``config.data``, ``config.seed``,
      ``config.data_workers`` and ``config.model`` (source, sd_path / vae_config, scheduler, t_star).
    num_pairs: how many (HQ, LQ) pairs of the training stream to encode.
    batch_size: pairs per encoder call (2 x batch_size images).
    out_dir: where ``<name>.json`` and ``<name>.png`` go (created if missing).
    name: file stem of the report.
    flow_image_seq_len: image tokens that set FLUX's mu for a dynamic-shift flow-matching scheduler
      (OMGSR: 4096, i.e. 1024^2, whatever the crop); unused otherwise.

  Returns:
    dict with ``t_star``, ``loss_at_t_star``, ``config_t_star``, ``loss_at_config_t_star``,
    ``num_pairs``, ``mean_curve`` ((1000,) float64 numpy, index = timestep), ``schedule`` (the
    :class:`~sr_jax.diffusion.schedules.NoisingSchedule` searched), ``signal_power`` and
    ``noise_power`` (per pair E[z_H^2] and E[(z_L - z_H)^2], (num_pairs,) float64: the curve of
    any other schedule follows from them), ``json_path``, ``png_path``, ``metadata`` (as written to
    the JSON).
  """
  if num_pairs < 1 or batch_size < 1:
    raise ValueError(f'num_pairs and batch_size must be >= 1, got {num_pairs}, {batch_size}')
  batch_size = min(batch_size, num_pairs)
  start = time.perf_counter()
  encoder, params, scheduler_config = load_frozen_encoder(config)
  schedule = schedules.noising_schedule_from_scheduler_config(scheduler_config, flow_image_seq_len)
  accumulator = mid_timestep.MidTimestepAccumulator.for_schedule(schedule)
  pairs = {'power': [], 'noise_power': []}

  def add(power, noise_power):
    accumulator.add_statistics(power, noise_power)
    pairs['power'].append(power)
    pairs['noise_power'].append(noise_power)

  _stream_statistics(config, encoder, params, num_pairs, batch_size, add)
  signal_power, noise_power = (np.concatenate(pairs[k]) for k in ('power', 'noise_power'))
  curve = accumulator.mean_curve()
  metadata = _metadata(config, num_pairs=num_pairs, batch_size=batch_size, encoder=encoder,
                       scheduler_config=scheduler_config, schedule=schedule, curve=curve,
                       power_sum=float(signal_power.sum()),
                       lq_snr_sum=float((signal_power / noise_power).sum()),
                       seconds=time.perf_counter() - start)
  t_star = accumulator.optimal_timestep()
  metadata[f'{schedule.value_name}_at_t_star'] = float(schedule.values[t_star])
  json_path, png_path = mid_timestep.write_mid_timestep_report(out_dir, accumulator, name=name,
                                                               metadata=metadata)
  return dict(t_star=t_star, loss_at_t_star=float(curve[t_star]),
              config_t_star=metadata['config_t_star'],
              loss_at_config_t_star=metadata['loss_at_config_t_star'], num_pairs=num_pairs,
              mean_curve=curve, schedule=schedule, signal_power=signal_power,
              noise_power=noise_power, json_path=json_path, png_path=png_path, metadata=metadata)


# ---------------------------------------------------------------------------------- command line


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'OMGSR config file, e.g. configs/omgsr.py:tiny.',
                                  lock_config=True)
  flags.DEFINE_integer('num_pairs', 1000, 'Pairs of the training stream to encode (OMGSR Eq. 5 N).')
  flags.DEFINE_integer('batch_size', 8, 'Pairs per encoder call.')
  flags.DEFINE_string('out_dir', 'runs/mid_timestep', 'Where <name>.json and <name>.png go.')
  flags.DEFINE_string('name', 'mid_timestep', 'File stem of the report.')
  flags.mark_flags_as_required(['config'])
  return flags.FLAGS


def main(argv) -> None:
  """``python -m sr_jax.mid_timestep_search --config=... --num_pairs=N --out_dir=DIR``."""
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  FLAGS = flags.FLAGS  # pylint: disable=invalid-name
  result = search_mid_timestep(FLAGS.config, FLAGS.num_pairs, FLAGS.batch_size, FLAGS.out_dir,
                               FLAGS.name)
  meta = result['metadata']
  print(f"pairs: {result['num_pairs']}  data: {meta['data_paths']}  preset: {meta['preset']}  "
        f"crop: {meta['crop_size']}  mean SNR(z_L): {meta['mean_lq_snr']:.4g}")
  if result['config_t_star'] is not None and result['loss_at_config_t_star'] is not None:
    print(f"config t_star = {result['config_t_star']} (loss {result['loss_at_config_t_star']:.6g})")
  print(f"report: {result['json_path']}  plot: {result['png_path']}")
  print(f"t* = {result['t_star']} (loss {result['loss_at_t_star']:.6g})", flush=True)


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
