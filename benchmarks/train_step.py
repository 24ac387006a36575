r"""Full-size OMGSR-S training step: XLA compiled memory, FLOPs and step time.

SD2.1-base UNet + VAE shapes and DINOv3-ConvNeXt-L with random weights (no download), 512 crops,
batch 1 (one micro-batch), the real `configs/omgsr.py` recipe otherwise::

  python benchmarks/train_step.py                      # compile + memory, then time 2 steps (CPU: slow)
  python benchmarks/train_step.py --no_run             # compiled memory and FLOPs only
  python benchmarks/train_step.py --batch 8 --dtype bfloat16   # on a GPU: samples/s and MFU

Prints a table and writes JSON (default benchmarks/out/train_step.json).
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))

from configs import omgsr as omgsr_config  # noqa: E402
from sr_jax import trainer  # noqa: E402
from sr_jax.methods import omgsr  # noqa: E402
from sr_jax import xla  # noqa: E402
from tiny_diffusers import SD21_BASE_UNET_CONFIG, SD21_BASE_VAE_CONFIG  # noqa: E402

DINOV3_LARGE = dict(hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3],
                    layer_scale_init_value=1e-6)
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                    num_train_timesteps=1000, prediction_type='epsilon')


def full_size_config(batch: int, dtype: str, remat: bool):
  config = omgsr_config.get_config('512')
  config.model.source = 'random'
  config.model.unet_config = SD21_BASE_UNET_CONFIG
  config.model.vae_config = SD21_BASE_VAE_CONFIG
  config.model.dinov3_config = DINOV3_LARGE
  config.model.scheduler_config = SD_SCHEDULER
  config.model.prompt_length = 77
  config.model.compute_dtype = dtype
  config.model.frozen_param_dtype = dtype
  config.model.remat = remat
  config.optim.grad_accum_steps = 1
  config.batch_size = batch
  return config


def compile_step(config):
  """Lowers and compiles the step on abstract inputs (no weight is allocated)."""
  cfgs = omgsr.model_configs(config)
  models = omgsr.build_models(config, cfgs)
  frozen_shapes = jax.eval_shape(lambda: omgsr.load_frozen(config))
  init_fn, step_fn = omgsr.step_functions(models, config.optim)
  state_shapes = jax.eval_shape(lambda rng: init_fn(frozen_shapes, rng), jax.random.key(0))
  size = config.data.crop_size
  batch = {k: jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32)
           for k in ('hq', 'lq')}
  start = time.perf_counter()
  lowered = jax.jit(step_fn, donate_argnums=0).lower(state_shapes, frozen_shapes, batch)
  compiled = lowered.compile(xla.training_compiler_options())
  return init_fn, compiled, time.perf_counter() - start


def memory_report(compiled) -> dict:
  analysis = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes', 'alias_size_in_bytes')
  report = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
  report['peak_estimate_bytes'] = (report['argument_size_in_bytes'] + report['output_size_in_bytes']
                                   + report['temp_size_in_bytes'] - report['alias_size_in_bytes'])
  return report


def time_steps(config, init_fn, compiled, steps: int) -> list[float]:
  _, frozen, _ = omgsr.build(config)
  state = jax.jit(lambda rng: init_fn(jax.eval_shape(lambda: frozen), rng))(jax.random.key(0))
  rng = np.random.default_rng(0)
  size = config.data.crop_size
  batch = {k: jnp.asarray(rng.uniform(-1, 1, (config.batch_size, size, size, 3)), jnp.float32)
           for k in ('hq', 'lq')}
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--remat', action='store_true')
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--no_run', action='store_true', help='compile and report memory only')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'out',
                                                    'train_step.json'))
  args = parser.parse_args()
  config = full_size_config(args.batch, args.dtype, args.remat)
  init_fn, compiled, compile_s = compile_step(config)
  device = jax.devices()[0]
  result = {'device': device.device_kind, 'platform': device.platform, 'cpu': platform.processor(),
            'batch': args.batch, 'dtype': args.dtype, 'remat': args.remat, 'compile_s': compile_s,
            'memory': memory_report(compiled),
            'flops_per_sample': config.flops_per_sample}
  if not args.no_run:
    times = time_steps(config, init_fn, compiled, args.steps)
    step_s = float(np.median(times[1:] if len(times) > 1 else times))
    result.update(step_times_s=times, step_s=step_s, samples_per_s=args.batch / step_s)
    peak = trainer.peak_tflops(device)
    if peak:
      result['mfu'] = config.flops_per_sample * args.batch / step_s / (peak * 1e12)
  gib = result['memory']['peak_estimate_bytes'] / 2**30
  print('| device | batch | dtype | compile s | XLA peak estimate | step s | samples/s | MFU |')
  print('|---|---|---|---|---|---|---|---|')
  print(f"| {result['device']} | {args.batch} | {args.dtype} | {compile_s:.0f} | {gib:.2f} GiB | "
        f"{result.get('step_s', float('nan')):.1f} | {result.get('samples_per_s', float('nan')):.3f} | "
        f"{result.get('mfu', float('nan')):.1%} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
