"""One-step OMGSR inference, 128 -> 512 (x4): JAX vs a PyTorch diffusers implementation, same weights.

The timed computation is the whole one-step generator on bicubic-upscaled 512² inputs (the reference's
``omgsr_s_infer_model`` with merged LoRA): VAE encoder -> posterior sample x scaling -> SD2.1-base
UNet eps at t* = 273 with a 77x1024 prompt embedding -> x0 (OMGSR Eq. 7) -> VAE decoder -> clamp.
JAX: ``sr_jax.inference.one_step.generate`` on OMGSR's stage, jitted (compile excluded); PyTorch: diffusers
``UNet2DConditionModel`` + ``AutoencoderKL`` eager under ``inference_mode``. Both get the same random
full-size weights (converted with ``sr_jax.weights``), inputs and posterior noise; outputs are checked
against each other before timing. Calls alternate between the frameworks.

  python benchmarks/inference.py --batches 1                          # CPU: batch 1 latency
  python benchmarks/inference.py --batches 8 --repeats 1 --micro-batch 2   # CPU (24 GiB): batch 8
  python benchmarks/inference.py --device gpu --dtype bfloat16 --batches 1,8 --torch-device cuda

GPU: ms/img and MFU from 4.40 TFLOP per image (XLA cost analysis, cross-checked by hand).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFLOP_PER_IMAGE = 4.40  # encoder 1.11 + UNet 0.787 + decoder 2.50 at 512²
T_STAR = 273


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--batches', default='1,8', help='comma-separated batch sizes')
  p.add_argument('--repeats', type=int, default=3,
                 help='timed calls per framework and batch after the checked first calls; 0 = time '
                      'the first calls themselves (minutes-long CPU calls at batch 8)')
  p.add_argument('--lq-size', type=int, default=128, help='LQ side; the model sees 4x this')
  p.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
  p.add_argument('--no-torch', action='store_true', help='JAX only')
  p.add_argument('--torch-device', choices=('cpu', 'cuda'), default='cpu',
                 help='where PyTorch runs; on cuda in --dtype, on the CPU in fp32 unless --device cpu')
  p.add_argument('--micro-batch', type=int, default=0,
                 help='JAX runs batches this many images at a time (lax.map; 0 = whole batch); on a '
                      '24 GiB CPU machine batch 8 at 512² needs 2')
  p.add_argument('--peak-tflops', type=float, default=None, help='device peak for MFU')
  p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'out', 'inference.json'))
  args = p.parse_args(argv)
  args.batches = [int(b) for b in args.batches.split(',')]
  return args


def build(args):
  """(jitted JAX fn, params, torch fn(images, noise), model) with the same random weights."""
  import diffusers
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import models_vs_torch as mvt
  import tiny_diffusers as td
  from sr_jax.diffusion import latents, schedules
  from sr_jax.inference import one_step
  from sr_jax.methods import omgsr
  from sr_jax.models.unet import UNet2DConditionModel
  from sr_jax.models.vae import AutoencoderKL

  dtype = jnp.dtype(args.dtype)
  unet_cfg = {k: v for k, v in td.SD21_BASE_UNET_CONFIG.items() if not k.startswith('_')}
  vae_cfg = {k: v for k, v in td.SD21_BASE_VAE_CONFIG.items() if not k.startswith('_')}
  torch.manual_seed(0)
  ref_unet = diffusers.UNet2DConditionModel(**unet_cfg).eval()
  ref_vae = diffusers.AutoencoderKL(**vae_cfg).eval()
  unet = UNet2DConditionModel.from_config(unet_cfg, dtype=dtype)
  vae = AutoencoderKL.from_config(vae_cfg, dtype=dtype)
  prompt = np.random.default_rng(1).standard_normal((1, 77, 1024)).astype(np.float32)
  params = {'unet': mvt._convert(ref_unet, unet, dtype=dtype),  # pylint: disable=protected-access
            'vae': mvt._convert(ref_vae, vae, dtype=dtype),  # pylint: disable=protected-access
            'prompt_embeds': jnp.asarray(prompt)}
  alpha_bar = float(schedules.ddpm_alphas_cumprod(
      dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
           num_train_timesteps=1000))[T_STAR])
  sf = vae_cfg.get('scaling_factor', 0.18215)
  stage = omgsr.latent_stage(unet, vae, latents.LatentCodec.from_vae_config(vae_cfg), T_STAR,
                             alpha_bar, {'upscale': 4, 'process_size': 512})
  micro = args.micro_batch or None

  def generate(p, x, key):
    # Micro-batches (lax.map) bound the activation memory: batch 8 at 512² in fp32 needs 27 GiB.
    if micro and micro < x.shape[0]:
      one = lambda item: one_step.generate(stage, p, item[0][None], item[1])['sr'][0]
      return jax.lax.map(one, (x, jax.random.split(key, x.shape[0])), batch_size=micro)
    return one_step.generate(stage, p, x, key)['sr']

  jax_fn = mvt.jit_model(generate)
  on_cuda = args.torch_device == 'cuda'
  tdtype = getattr(torch, args.dtype) if args.device == 'cpu' or on_cuda else torch.float32
  tdev = torch.device(args.torch_device)
  ref_unet, ref_vae = ref_unet.to(tdev, tdtype), ref_vae.to(tdev, tdtype)
  tprompt = torch.from_numpy(prompt).to(tdev, tdtype)
  as_torch = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).to(tdev, tdtype)

  def torch_fn(images, noise):
    with torch.inference_mode():
      dist = ref_vae.encode(as_torch(images)).latent_dist
      z = dist.mean + dist.std * as_torch(noise)
      z = z * sf
      b = z.shape[0]
      eps = ref_unet(z, torch.full((b,), T_STAR, device=tdev), tprompt.expand(b, -1, -1)).sample
      z0 = (z - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5
      out = ref_vae.decode(z0 / sf).sample.clamp(-1, 1)
      return out.float().cpu().numpy().transpose(0, 2, 3, 1)  # .cpu() waits for the GPU
  return jax_fn, params, torch_fn


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def posterior_noise(key, batch: int, size: int, micro: int | None):
  """The posterior noise the JAX generator draws from ``key`` (per image when micro-batched)."""
  import jax
  import numpy as np
  shape = (batch, size // 8, size // 8, 4)
  if micro and micro < batch:
    keys = jax.random.split(key, batch)
    return np.concatenate([np.asarray(jax.random.normal(k, (1,) + shape[1:])) for k in keys])
  return np.asarray(jax.random.normal(key, shape))


def run_batch(args, jax_fn, params, torch_fn, batch):
  import jax
  import numpy as np
  size = 4 * args.lq_size
  rng = np.random.default_rng(batch)
  images = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  key = jax.random.key(batch)
  noise = posterior_noise(key, batch, size, args.micro_batch or None)
  start = time.perf_counter()
  compiled = jax_fn.lower(params, images, key).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  temp_gib = getattr(memory, 'temp_size_in_bytes', 0) / 2**30 if memory is not None else float('nan')
  print(f'batch {batch}: compiled in {compile_s:.0f} s, XLA temp memory {temp_gib:.2f} GiB', flush=True)
  run_jax = lambda: np.asarray(jax.block_until_ready(compiled(params, images, key)))
  first_jax, jax_out = _timed(run_jax)
  res = dict(batch=batch, size=size, compile_s=compile_s, xla_temp_gib=temp_gib, first_jax_s=first_jax)
  jax_s, torch_s = [], []
  if not args.no_torch:
    first_torch, torch_out = _timed(lambda: torch_fn(images, noise))
    res['first_torch_s'] = first_torch
    diff = np.abs(jax_out - torch_out)
    res.update(max_abs_err=float(diff.max()), mean_abs_err=float(diff.mean()))
  for i in range(args.repeats):
    for which in ((0, 1) if i % 2 == 0 else (1, 0)):
      if which == 0:
        jax_s.append(_timed(run_jax)[0])
      elif not args.no_torch:
        torch_s.append(_timed(lambda: torch_fn(images, noise))[0])
  if args.repeats == 0:
    jax_s, torch_s = [first_jax], ([] if args.no_torch else [res['first_torch_s']])
  res['jax_s'], res['torch_s'] = jax_s, torch_s
  res['jax_median_s'] = statistics.median(jax_s)
  res['jax_ms_per_img'] = 1e3 * res['jax_median_s'] / batch
  res['jax_img_per_s'] = batch / res['jax_median_s']
  res['jax_tflops'] = TFLOP_PER_IMAGE * (size / 512) ** 2 * batch / res['jax_median_s']
  if args.peak_tflops:
    res['mfu'] = res['jax_tflops'] / args.peak_tflops
  if torch_s:
    res['torch_median_s'] = statistics.median(torch_s)
    res['torch_img_per_s'] = batch / res['torch_median_s']
    res['ratio_jax_over_torch'] = res['jax_median_s'] / res['torch_median_s']
  return res


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cuda,cpu' if args.device == 'gpu' else 'cpu')
  sys.path[:0] = [REPO, os.path.join(REPO, 'tests'), os.path.join(REPO, 'benchmarks')]
  import models_vs_torch as mvt
  mvt._import_frameworks(args)  # pylint: disable=protected-access  # its module globals, torch threads
  import jax
  args.peak_tflops = mvt._peak_tflops(args)  # pylint: disable=protected-access  # device_kind -> peak
  env = mvt.environment()
  print(f"{env['cpu']} x{env['cores']}, JAX device {env['device']}, {args.dtype}", flush=True)
  start = time.perf_counter()
  jax_fn, params, torch_fn = build(args)
  print(f'built and converted in {time.perf_counter() - start:.1f} s', flush=True)
  results = []
  for batch in args.batches:
    r = run_batch(args, jax_fn, params, torch_fn, batch)
    results.append(r)
    print(json.dumps(r), flush=True)
  print(f"\n| batch | {args.lq_size}->{4 * args.lq_size} | JAX s | PyTorch s | JAX/PyTorch | "
        "JAX ms/img | JAX img/s | PyTorch img/s | TFLOP/s | MFU | max abs err | compile s |")
  print('|---' * 12 + '|')
  fmt = lambda x, spec: '–' if x is None else format(x, spec)
  for r in results:
    print(f"| {r['batch']} | {jax.devices()[0].device_kind} | {r['jax_median_s']:.2f} | "
          f"{fmt(r.get('torch_median_s'), '.2f')} | {fmt(r.get('ratio_jax_over_torch'), '.2f')} | "
          f"{r['jax_ms_per_img']:.0f} | {r['jax_img_per_s']:.3f} | "
          f"{fmt(r.get('torch_img_per_s'), '.3f')} | {r['jax_tflops']:.3f} | "
          f"{fmt(r.get('mfu'), '.1%')} | {fmt(r.get('max_abs_err'), '.1e')} | {r['compile_s']:.0f} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(environment=env, args=vars(args), results=results), f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
