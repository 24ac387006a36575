r"""Full-size TUDSR-S: stage-2 train step (XLA memory, time); 128->512, ->1024 inference vs torch.

``train``: ``configs/tudsr.py:stage2`` at full size (SD2.1-base UNet + LoRA r 32, VAE, VGG16
ea-DISTS, DINOv3-ViT-B D; random weights), batch 1, 1024 crops: one ``train_step`` = the frozen
G_theta1 pass + N^2 = 4 chunk updates at R = 512 (theta1: a LoRA of the stage-1 shape). Compiled on
abstract inputs with the trainer's options: XLA memory (peak = args + outputs + temp - alias, as
``train_step.py``) and FLOPs, also of one ``gan_update``; XLA counts a scan body once, so FLOPs per
call = train_step + 3 gan_update. ``--steps N`` materialises the weights and times N calls of each
(the whole step and one chunk update alone, alternating).

``infer``: the TUDSR generator (Fig. 2b, no colour fix) on a random 128² LQ, x4 = M2N2 and x8 =
M4N2 (stage 2 on a 128² latent: 9 tiles of 64, overlap 32). JAX: ``pipeline.SuperResolver`` on
``tudsr._generator`` (adapters unmerged on one UNet; and ``eval.merge_adapters``). PyTorch:
diffusers + peft with the same weights and adapters (our PEFT export, ``set_adapter`` per stage),
input, noise and the reference tile loop. uint8 outputs are compared, then calls alternate::

  python benchmarks/tudsr.py train [--steps 2] [--remat]          # bfloat16, compile-only default
  python benchmarks/tudsr.py infer [--cases m4n2] [--repeats 3]   # CPU fp32
  python benchmarks/tudsr.py infer --device gpu --dtype bfloat16 --repeats 5   # ms/img, MFU

JSON: ``benchmarks/out/tudsr_{train,infer}.json``. Inference FLOPs: XLA cost analysis of the lowered
pieces per stage (encode, one UNet tile x the grid's tiles without batch padding, decode).
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from unittest import mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {'m2n2': 4, 'm4n2': 8}                   # case -> eval.upscale (M N with N = 2)
PAPER_H800_S = {'m2n2': 0.0596, 'm4n2': 0.4201}  # TUDSR paper, 128->512 and 128->1024, one H800
# transformers DINOv3ViTConfig of facebook/dinov3-vitb16-pretrain-lvd1689m (next-methods.md 2.2).
DINOV3_VIT_B = dict(
    model_type='dinov3_vit', patch_size=16, hidden_size=768, intermediate_size=3072,
    num_hidden_layers=12, num_attention_heads=12, num_register_tokens=4, layerscale_value=1.0,
    hidden_act='gelu', layer_norm_eps=1e-5, rope_theta=100.0, use_gated_mlp=False, query_bias=True,
    key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True, num_channels=3, image_size=224)
LORA_B_RELATIVE = 0.1  # random LoRA B: each branch adds ~this x its input's std


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  t = sub.add_parser('train', help='stage-2 train step: compiled memory, FLOPs, optional timing')
  t.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16'])
  t.add_argument('--frozen_dtype', default='bfloat16', choices=['float32', 'bfloat16'])
  t.add_argument('--remat', action='store_true')
  t.add_argument('--steps', type=int, default=0, help='timed train_step calls (0: compile only)')
  t.add_argument('--no_run', action='store_true', help='compile only (the default: --steps 0)')
  t.add_argument('--no_chunk', action='store_true', help='do not compile one gan_update alone')
  i = sub.add_parser('infer', help='128->512 (M2N2) and 128->1024 (M4N2), JAX vs PyTorch')
  i.add_argument('--cases', default='m2n2,m4n2')
  i.add_argument('--repeats', type=int, default=1, help='timed calls each, after the checked ones')
  i.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  i.add_argument('--tile_batch', type=int, default=0, help='latent tiles per call (0: eval.batch)')
  i.add_argument('--no_torch', action='store_true')
  i.add_argument('--no_merged', action='store_true', help='skip JAX with merge_adapters=True')
  i.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
  i.add_argument('--cache_dir', default=os.path.join(tempfile.gettempdir(), 'sr_jax_tudsr_bench'),
                 help="JAX persistent compilation cache ('off': none)")
  for q in (t, i):
    q.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
    q.add_argument('--peak_tflops', type=float, default=None, help='device peak for MFU')
    q.add_argument('--out', default=None, help='JSON (default benchmarks/out/tudsr_<command>.json)')
  args = p.parse_args(argv)
  args.out = args.out or os.path.join(REPO, 'benchmarks', 'out', f'tudsr_{args.command}.json')
  return args


def _setup(args):
  """JAX_PLATFORMS from --device, then the imports every function shares (module globals)."""
  os.environ.setdefault('JAX_PLATFORMS', 'cuda,cpu' if args.device == 'gpu' else 'cpu')
  sys.path[:0] = [REPO, os.path.join(REPO, 'tests'), os.path.join(REPO, 'benchmarks')]
  global jax, jnp, np, torch, Image, traverse_util, mvt, td  # pylint: disable=global-statement
  global xla, pretrained, common, tudsr, lora, pipeline  # pylint: disable=global-statement
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import traverse_util
  from PIL import Image
  import models_vs_torch as mvt
  import tiny_diffusers as td
  from sr_jax import pretrained, xla
  from sr_jax.inference import pipeline
  from sr_jax.methods import common, tudsr
  from sr_jax.models import lora
  torch.set_num_threads(getattr(args, 'threads', os.cpu_count()))


def _peak_tflops(args) -> float | None:
  if args.peak_tflops or args.device != 'gpu' or args.dtype != 'bfloat16':
    return args.peak_tflops
  kind = jax.devices()[0].device_kind
  return next((peak for key, peak in mvt.PEAK_BF16_TFLOPS if key in kind), None)


def _flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


def _finish(path, result):
  result['max_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2, default=str)
  print(f'wrote {path}')


def _fmt(x, spec) -> str:
  return '–' if x is None else format(x, spec)


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


# ------------------------------------------------------------------------------------- train


def full_size_config(dtype: str, frozen_dtype: str, remat: bool):
  from configs import common as config_common  # pylint: disable=g-import-not-at-top
  from configs import tudsr as tudsr_config  # pylint: disable=g-import-not-at-top
  config = tudsr_config.get_config('stage2')
  m = config.model
  m.source = 'random'
  m.unet_config, m.vae_config = td.SD21_BASE_UNET_CONFIG, td.SD21_BASE_VAE_CONFIG
  m.dinov3_vit_config, m.scheduler_config = DINOV3_VIT_B, config_common.SD_SCHEDULER
  m.prompt_length = 77
  m.compute_dtype, m.frozen_param_dtype, m.remat = dtype, frozen_dtype, remat
  config.optim.grad_accum_steps = 1
  config.batch_size = 1
  return config


def _zero_params(kind, module, seed):
  """``common.random_params`` without the numpy draws (zeros of its tree: traced, not allocated)."""
  del kind, seed
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), pretrained.abstract_params(module))


def frozen_shapes(config, models):
  """``jax.eval_shape`` of ``tudsr.load_frozen`` (draws stubbed) + theta1 (``STAGE1_LORA``)."""
  with mock.patch.object(common, 'random_params', _zero_params):
    shapes = jax.eval_shape(lambda: tudsr.load_frozen(config))
  shapes[tudsr.STAGE1_LORA] = jax.eval_shape(lambda: lora.init_lora_params(
      jax.random.key(1), shapes['unet'], models.stage1.step.lora_config))
  return shapes


def _compile(name, fn, donate, *shapes, options):
  seconds, compiled = _timed(
      lambda: jax.jit(fn, donate_argnums=donate).lower(*shapes).compile(options))
  analysis = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'generated_code_size_in_bytes', 'alias_size_in_bytes')
  mem = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
  mem['peak_estimate_bytes'] = (mem['argument_size_in_bytes'] + mem['output_size_in_bytes']
                                + mem['temp_size_in_bytes'] - mem['alias_size_in_bytes'])
  mem['peak_estimate_gib'] = mem['peak_estimate_bytes'] / 2**30
  report = dict(compile_s=seconds, memory=mem, xla_flops=_flops(compiled.cost_analysis()))
  print(f"{name}: compiled in {seconds:.0f} s, XLA peak estimate {mem['peak_estimate_gib']:.2f} "
        f"GiB, {report['xla_flops'] / 1e12:.2f} TFLOP (XLA count)", flush=True)
  return compiled, report


def compile_train(config, chunk: bool):
  """(models, init_fn, frozen shapes, compiled train_step, {'train_step', 'gan_update'} reports)."""
  cfgs = tudsr.model_configs(config)
  models = tudsr.build_models(config, cfgs, stage1_model=config.model)
  frozen = frozen_shapes(config, models)
  init_fn, step_fn = tudsr.step_functions(models, config.optim)
  state = jax.eval_shape(lambda rng: init_fn(frozen, rng), jax.random.key(0))
  options = xla.training_compiler_options(bool(config.cpu_memory_scheduler),
                                          config.cpu_optimization_level)
  image = lambda size: jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.float32)
  crop, r = int(config.data.crop_size), int(config.model.resolution)
  compiled, report = _compile('train_step (G_theta1 + 4 chunk updates)', step_fn, 0, state, frozen,
                              {'hq': image(crop), 'lq': image(crop)}, options=options)
  reports, programs = {'train_step': report}, {'train_step': compiled}
  if chunk:
    update = functools.partial(tudsr.gan_update, models, tudsr.optimizers(config.optim),
                               int(config.optim.grad_accum_steps))
    programs['gan_update'], reports['gan_update'] = _compile(
        'gan_update (one chunk)', update, (0, 1, 2), state.params, state.opt_state, state.spectral,
        frozen, {'hq': image(r), 'lq': image(r)}, jax.random.key(0), options=options)
  return models, init_fn, frozen, programs, reports


def _random_images(config, size: int) -> dict:
  rng = np.random.default_rng(0)
  return {k: jnp.asarray(rng.uniform(-1, 1, (config.batch_size, size, size, 3)), jnp.float32)
          for k in ('hq', 'lq')}


def time_train(config, models, init_fn, shapes, programs, steps: int) -> dict[str, list[float]]:
  """Materialises the weights, then times ``steps`` calls of each compiled program: the whole
  ``train_step`` and (if compiled) one chunk's ``gan_update`` alone, alternating."""
  start = time.perf_counter()
  frozen = tudsr.load_frozen(config)  # numpy draws, in frozen_param_dtype
  frozen[tudsr.STAGE1_LORA] = lora.init_lora_params(jax.random.key(1), shapes['unet'],
                                                    models.stage1.step.lora_config)
  state = jax.jit(lambda rng: init_fn(shapes, rng))(jax.random.key(0))
  print(f'materialised the weights in {time.perf_counter() - start:.0f} s', flush=True)
  batch = _random_images(config, int(config.data.crop_size))
  chunk = _random_images(config, models.resolution)
  times = {name: [] for name in programs}
  for _ in range(steps):
    for name, program in programs.items():
      start = time.perf_counter()
      if name == 'train_step':
        state, metrics = program(state, frozen, batch)
      else:
        params, opt_state, spectral, metrics = program(
            state.params, state.opt_state, state.spectral, frozen, chunk, jax.random.key(2))
        state = state.replace(params=params, opt_state=opt_state, spectral=spectral)
      jax.block_until_ready(metrics)
      times[name].append(time.perf_counter() - start)
      print(f'{name}: {times[name][-1]:.1f} s', flush=True)
  return times


def run_train(args):
  steps = 0 if args.no_run else args.steps
  config = full_size_config(args.dtype, args.frozen_dtype, args.remat)
  models, init_fn, shapes, programs, reports = compile_train(config, chunk=not args.no_chunk)
  updates = models.updates_per_step
  result = dict(device=jax.devices()[0].device_kind, batch=1, crop=int(config.data.crop_size),
                chunk=models.resolution, updates_per_call=updates, dtype=args.dtype,
                frozen_dtype=args.frozen_dtype, remat=args.remat, compiled=reports)
  if 'gan_update' in reports:
    result['flops_per_call'] = (reports['train_step']['xla_flops']
                                + (updates - 1) * reports['gan_update']['xla_flops'])
  if steps:
    times = time_train(config, models, init_fn, shapes, programs, steps)
    median = lambda ts: float(statistics.median(ts[1:] if len(ts) > 1 else ts))
    call_s = median(times['train_step'])
    result.update(call_times_s=times['train_step'], call_s=call_s, update_s=call_s / updates)
    if 'gan_update' in times:
      result.update(chunk_update_times_s=times['gan_update'],
                    chunk_update_s=median(times['gan_update']))
    peak = _peak_tflops(args)
    if peak and 'flops_per_call' in result:
      result['mfu'] = result['flops_per_call'] / call_s / (peak * 1e12)
  print('\n| program | device | dtype | remat | compile s | XLA peak estimate (target <= 24 GiB) '
        '| XLA TFLOP | s per call | s per update | MFU |')
  print('|---' * 10 + '|')
  for name, r in reports.items():
    whole = name == 'train_step'
    call = result.get('call_s' if whole else 'chunk_update_s')
    update = result.get('update_s') if whole else call
    print(f"| {name} | {result['device']} | {args.dtype} | {args.remat} | {r['compile_s']:.0f} | "
          f"{r['memory']['peak_estimate_gib']:.2f} GiB | {r['xla_flops'] / 1e12:.2f} | "
          f"{_fmt(call, '.1f')} | {_fmt(update, '.1f')} | "
          f"{_fmt(result.get('mfu') if whole else None, '.1%')} |")
  if 'flops_per_call' in result:
    print(f"FLOPs per call (train_step + {updates - 1} x gan_update, XLA counts a scan body once): "
          f"{result['flops_per_call'] / 1e12:.2f} TFLOP")
  _finish(args.out, result)


# ------------------------------------------------------------------------------------- infer


def _to_device_leafwise(tree):
  """numpy tree -> device arrays one leaf at a time (one host copy of one leaf at a time)."""
  flat = traverse_util.flatten_dict(tree)
  del tree
  for key in list(flat):
    flat[key] = jax.device_put(flat[key])
  return traverse_util.unflatten_dict(flat)


def random_lora(unet_params, config, seed: int):
  """A LoRA tree: A as initialised (Gaussian), B random with ``|B A x| ~ LORA_B_RELATIVE |x|``."""
  tree = lora.init_lora_params(jax.random.key(seed), unet_params, config)
  flat = traverse_util.flatten_dict(tree)
  rng = np.random.default_rng(seed)
  for path in [p for p in flat if p[-1] == lora.LORA_B]:
    fan_in = np.prod(flat[path[:-1] + (lora.LORA_A,)].shape[:-1])
    std = LORA_B_RELATIVE * np.sqrt(config.rank / fan_in)
    flat[path] = (std * rng.standard_normal(flat[path].shape)).astype(np.float32)
  return jax.device_put(traverse_util.unflatten_dict(flat))


def build_weights(args, config, adapter_dir: str):
  """JAX (unet, vae), params {unet, vae, prompt_embeds, both LoRAs} and (unless --no_torch) the
  diffusers models with the same weights, the adapters loaded as 'theta1' / 'theta2'."""
  import diffusers  # pylint: disable=g-import-not-at-top
  from sr_jax.models.unet import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from sr_jax.models.vae import AutoencoderKL  # pylint: disable=g-import-not-at-top
  from sr_jax.weights import convert_state_dict  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(args.dtype)
  unet_cfg, vae_cfg = ({k: v for k, v in c.items() if not k.startswith('_')}
                       for c in (td.SD21_BASE_UNET_CONFIG, td.SD21_BASE_VAE_CONFIG))
  torch.manual_seed(0)
  refs = (diffusers.UNet2DConditionModel(**unet_cfg).eval(),
          diffusers.AutoencoderKL(**vae_cfg).eval())
  mods = (UNet2DConditionModel.from_config(unet_cfg, dtype=dtype),
          AutoencoderKL.from_config(vae_cfg, dtype=dtype))
  params = {}
  for name, ref, mod in zip(('unet', 'vae'), refs, mods):
    state = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
    params[name] = _to_device_leafwise(convert_state_dict(state, pretrained.abstract_params(mod),
                                                          dtype=np.dtype(dtype)))
    del state
    if not args.no_torch and args.device == 'cpu':
      # File-backed (mmap) torch weights: the kernel can page them out while JAX runs (the 1024²
      # VAE decode alone takes 8.5 GiB of XLA temp) instead of the OOM killer ending the run.
      path = os.path.join(adapter_dir, f'{name}.pt')
      torch.save(ref.state_dict(), path)
      ref.load_state_dict(torch.load(path, mmap=True), assign=True)
  prompt = np.random.default_rng(1).standard_normal((1, 77, 1024)).astype(np.float32)
  params['prompt_embeds'] = jnp.asarray(prompt)
  lora_config = tudsr.unet_lora_config(config.model)
  for k, key in ((1, tudsr.STAGE1_LORA), (2, tudsr.STAGE2_LORA)):
    params[key] = random_lora(params['unet'], lora_config, seed=10 + k)
    if not args.no_torch:
      folder = os.path.join(adapter_dir, f'theta{k}')
      lora.save_peft_adapter(folder, params[key], lora_config, key_prefix='')
      refs[0].load_lora_adapter(folder, prefix=None, weight_name=lora.ADAPTER_WEIGHTS_NAME,
                                adapter_name=f'theta{k}')
  torch_models = None
  if not args.no_torch:
    dev = torch.device('cuda' if args.device == 'gpu' else 'cpu')
    tdtype = getattr(torch, args.dtype)
    torch_models = dict(unet=refs[0].to(dev, tdtype), vae=refs[1].to(dev, tdtype), device=dev,
                        dtype=tdtype, prompt=torch.from_numpy(prompt).to(dev, tdtype))
  return mods, params, lora_config, torch_models


def stage_constants(config) -> dict:
  from sr_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  alphas, m = schedules.ddpm_alphas_cumprod(dict(config.model.scheduler_config)), config.model
  return {'n': int(m.n), 't1': int(m.t1), 't2': int(m.t2),
          'alpha_bar_t1': float(alphas[int(m.t1)]), 'alpha_bar_t2': float(alphas[int(m.t2)])}


def make_resolver(args, config, mods, params, lora_config, consts, upscale: int, merge: bool):
  from sr_jax.diffusion import latents  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.eval.update(upscale=upscale, merge_adapters=merge, color_fix='none')
  if args.tile_batch:
    config.eval.batch = args.tile_batch
  codec = latents.LatentCodec.from_vae_config(dict(config.model.vae_config))
  # pylint: disable-next=protected-access
  generator = tudsr._generator(config, *mods, codec, params, {1: lora_config, 2: lora_config},
                               consts, {'kind': 'benchmark (random full-size weights)'})
  return pipeline.SuperResolver(generator, pipeline.InferenceSettings.from_config(config))


def tiled_eps(unet, z, t, context, tile: int, overlap: int):
  """The reference tile loop (OSEDiff / OMGSR; tests/test_eval.py's port), NCHW torch."""
  _, _, h, w = z.shape
  if h * w <= tile * tile:
    return unet(z, t, encoder_hidden_states=context).sample
  tile = min(tile, h, w)

  def starts(n):  # the reference's ``while cur < n`` loop: strided starts, then one flush tile
    return list(range(0, n - tile, tile - overlap)) + [n - tile]

  def gauss(n, centre):
    i = np.arange(n, dtype=np.float64)
    return np.exp(-(i - centre) ** 2 / n / n / (2 * 0.01)) / np.sqrt(2 * np.pi * 0.01)
  weights = np.outer(gauss(tile, tile / 2), gauss(tile, (tile - 1) / 2))
  weights = torch.from_numpy(weights).to(z.device)
  total = torch.zeros_like(z, dtype=torch.float64)
  norm = torch.zeros_like(z, dtype=torch.float64)
  for x0 in starts(w):
    for y0 in starts(h):
      eps = unet(z[:, :, y0:y0 + tile, x0:x0 + tile], t, encoder_hidden_states=context).sample
      total[:, :, y0:y0 + tile, x0:x0 + tile] += eps.double() * weights
      norm[:, :, y0:y0 + tile, x0:x0 + tile] += weights
  return (total / norm).to(z.dtype)


def torch_generator(tm, consts, plan, noises, tile: int, overlap: int, sf: float):
  """uint8 LQ (upscaled x M) -> uint8 SR; per stage (adapter k, scale): [bilinear x scale], encode,
  sample with the pipeline's noise, x sf, UNet + theta_k eps at t_k (tiled), x0, decode, clamp."""
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def run(lq_upscaled):
    with torch.inference_mode():
      x = torch.from_numpy(lq_upscaled.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1.0)
      x = x.to(tm['device'], tm['dtype'])
      for index, (k, scale) in enumerate(plan):
        if index:
          x = F.interpolate(x, scale_factor=scale, mode='bilinear', align_corners=False)
        dist = tm['vae'].encode(x).latent_dist
        z = (dist.mean + dist.std * noises[index]) * sf
        tm['unet'].set_adapter(f'theta{k}')
        t, ab = torch.tensor([consts[f't{k}']], device=tm['device']), consts[f'alpha_bar_t{k}']
        eps = tiled_eps(tm['unet'], z, t, tm['prompt'], tile, overlap)
        x = tm['vae'].decode((z - (1 - ab) ** 0.5 * eps) / ab ** 0.5 / sf).sample.clamp(-1, 1)
      out = x[0].float().cpu().numpy().transpose(1, 2, 0)  # .cpu() waits for a GPU
    return (np.clip((out + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(np.uint8)  # pipeline.to_uint8
  return run


def pipeline_flops(resolver, lq_shape) -> float:
  """FLOPs of one image through the resolver's stages (XLA cost analysis of the lowered pieces:
  encode, one UNet tile x the tiles of the grid (not the padding of the last batch), decode)."""
  from sr_jax.inference import one_step, tiling  # pylint: disable=g-import-not-at-top
  total, (h, w) = 0.0, lq_shape
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  cost = lambda fn, *a: _flops(jax.jit(fn).lower(resolver.params, *a).cost_analysis())
  for index, stage in enumerate(resolver.generator.stages):
    h, w = (h * stage.upscale, w * stage.upscale) if index else (h, w)
    lh, lw, tile = h // stage.vae_factor, w // stage.vae_factor, stage.latent_tile
    tiles, side = 1, (lh, lw)
    if tiling.needs_tiling(lh, lw, tile):
      grid = tiling.latent_tile_grid(lh, lw, tile, resolver.settings.latent_overlap)
      tiles, side = len(grid), (grid.tile, grid.tile)
    total += cost(lambda q, x, s=stage: one_step.encode_moments(s, q, x), shape(1, h, w, 3))
    total += tiles * cost(lambda q, z, s=stage: s.step(q, z, None, None), shape(1, *side, 4))
    total += cost(lambda q, z, s=stage: one_step.decode_latent(s, q, z), shape(1, lh, lw, 4))
  return total


def _diff(a, b) -> dict:
  d = np.abs(a.astype(np.int16) - b.astype(np.int16))
  return dict(max_levels=int(d.max()), mean_levels=float(d.mean()),
              frac_over_1=float((d > 1).mean()))


def contenders(args, case, config, weights, consts, lq_up, key, names) -> tuple[dict, dict]:
  """{name: () -> uint8 SR} for ``names`` of 'jax', 'jax_merged', 'torch'; facts of the JAX run."""
  mods, params, lora_config, tm = weights
  upscale, n = CASES[case], consts['n']
  fns, info = {}, {}
  for name, merge in (('jax', False), ('jax_merged', True)):
    if name not in names:
      continue
    resolver = make_resolver(args, config, mods, params, lora_config, consts, upscale, merge)
    fns[name] = functools.partial(resolver, lq_up, key)
    if not merge:
      info = dict(tflop_per_img=pipeline_flops(resolver, lq_up.shape[:2]) / 1e12,
                  stages=list(resolver.generator.source['stages']),
                  tile_batch=resolver.settings.batch, overlap=resolver.settings.latent_overlap,
                  tile=resolver.stages[-1].stage.latent_tile)
  if 'torch' in names:
    plan, noises, size = ((1, upscale // n), (2, n)), [], lq_up.shape[0]
    for index, (_, scale) in enumerate(plan):  # the pipeline's draws: fold_in(key, stage index)
      size *= scale if index else 1
      noise = np.asarray(jax.random.normal(jax.random.fold_in(key, index) if index else key,
                                           (size // 8, size // 8, 4)))
      noises.append(torch.from_numpy(noise.transpose(2, 0, 1)[None].copy()).to(tm['device'],
                                                                                tm['dtype']))
    sf = float(config.model.vae_config.get('scaling_factor') or 0.18215)
    fns['torch'] = functools.partial(torch_generator(tm, consts, plan, noises, info['tile'],
                                                     info['overlap'], sf), lq_up)
  return fns, info


def run_case(args, case, config, weights, consts, names) -> dict:
  """Checked first calls of the contenders ``names`` ('jax' first), then rotating timed calls."""
  lq = Image.fromarray(np.random.default_rng(7).integers(0, 256, (128, 128, 3), np.uint8))
  upscale = CASES[case]
  lq_up = np.asarray(pipeline.preprocess_lq(lq, 512, upscale // consts['n'], enlarge=False)[0])
  fns, res = contenders(args, case, config, weights, consts, lq_up, jax.random.key(0), names)
  res.update(case=case, upscale=upscale, lq=128, out=128 * upscale)
  outs = {}
  for name, fn in fns.items():  # first calls (JAX compiles here): checked, not timed
    res[f'first_{name}_s'], outs[name] = _timed(fn)
    print(f"{case} {name}: first call {res[f'first_{name}_s']:.1f} s, output mean "
          f"{outs[name].mean():.1f} std {outs[name].std():.1f}", flush=True)
  for other in ('torch', 'jax_merged'):
    if other in outs:
      res[f'diff_jax_vs_{other}'] = _diff(outs['jax'], outs[other])
      print(f"{case}: JAX vs {other}: {res[f'diff_jax_vs_{other}']}", flush=True)
  names, times = list(fns), {name: [] for name in fns}
  for i in range(args.repeats):
    for name in names[i % len(names):] + names[:i % len(names)]:
      times[name].append(_timed(fns[name])[0])
      print(f'{case} {name}: {times[name][-1]:.1f} s', flush=True)
  for name, ts in times.items():
    res[f'{name}_s'], res[f'{name}_median_s'] = ts, statistics.median(ts) if ts else None
  return res


def summarise(phases: list[dict], peak) -> dict:
  """One case: JAX vs PyTorch from the phase with torch, merged vs unmerged from its own phase."""
  res = {k: v for k, v in phases[0].items() if not k.startswith(('first_', 'jax', 'diff_'))}
  torch_phase = next((p for p in phases if p.get('torch_median_s')), {})
  merged_phase = next((p for p in phases if p.get('jax_merged_median_s')), {})
  jax_s = (torch_phase or phases[0]).get('jax_median_s')
  torch_s, merged_s = torch_phase.get('torch_median_s'), merged_phase.get('jax_merged_median_s')
  res.update(phases=phases, jax_median_s=jax_s, torch_median_s=torch_s,
             jax_merged_median_s=merged_s, paper_h800_s=PAPER_H800_S[res['case']],
             diff_jax_vs_torch=torch_phase.get('diff_jax_vs_torch'),
             diff_jax_vs_jax_merged=merged_phase.get('diff_jax_vs_jax_merged'))
  res['ratio_jax_over_torch'] = jax_s / torch_s if jax_s and torch_s else None
  unmerged_s = merged_phase.get('jax_median_s')
  res['ratio_merged_over_unmerged'] = merged_s / unmerged_s if merged_s and unmerged_s else None
  if jax_s:
    res.update(jax_ms_per_img=1e3 * jax_s, jax_tflops=res['tflop_per_img'] / jax_s)
    res['mfu'] = res['jax_tflops'] / peak if peak else None
  return res


def print_table(results):
  print('\n| case | JAX s | PyTorch s | JAX/PyTorch (target <= 1.0) | JAX merged s '
        '| merged/unmerged | max diff JAX-PyTorch (8-bit) | max diff merged-unmerged | TFLOP/img '
        '| paper H800 s | JAX ms/img | MFU |')
  print('|---' * 12 + '|')
  for r in results:
    level = lambda k, r=r: (r.get(f'diff_jax_vs_{k}') or {}).get('max_levels')
    print(f"| {r['case']} 128->{r['out']} | {_fmt(r.get('jax_median_s'), '.1f')} | "
          f"{_fmt(r.get('torch_median_s'), '.1f')} | {_fmt(r['ratio_jax_over_torch'], '.2f')} | "
          f"{_fmt(r.get('jax_merged_median_s'), '.1f')} | "
          f"{_fmt(r['ratio_merged_over_unmerged'], '.2f')} | {_fmt(level('torch'), 'd')} | "
          f"{_fmt(level('jax_merged'), 'd')} | {r['tflop_per_img']:.2f} | {r['paper_h800_s']} | "
          f"{_fmt(r.get('jax_ms_per_img'), '.0f')} | {_fmt(r.get('mfu'), '.1%')} |")


def run_infer(args):
  """Phase 1: JAX vs PyTorch; phase 2, with the torch models freed (memory): JAX unmerged vs
  merged (two more UNet copies). Either phase alone with --no_merged / --no_torch."""
  # pylint: disable-next=protected-access
  mvt._import_frameworks(args)  # the module globals mvt.environment() reads
  if args.cache_dir != 'off':
    xla.enable_compilation_cache(args.cache_dir)  # phase 2 reuses phase 1's programs
  if args.device == 'gpu' and not torch.cuda.is_available():
    args.no_torch = True  # a CPU torch in fp32 is no reference for GPU timings
  config = full_size_config(args.dtype, args.dtype, False)
  consts, env, peak = stage_constants(config), mvt.environment(), _peak_tflops(args)
  print(f"{env['cpu']} x{env['cores']}, JAX {env['device']}, {args.dtype}, torch threads "
        f"{torch.get_num_threads()}", flush=True)
  phases = [names for names, skip in ((('jax', 'torch'), args.no_torch),
                                      (('jax', 'jax_merged'), args.no_merged)) if not skip]
  cases, results = args.cases.split(','), {}
  with tempfile.TemporaryDirectory() as adapter_dir:
    seconds, weights = _timed(lambda: build_weights(args, config, adapter_dir))
    print(f'built and converted in {seconds:.0f} s', flush=True)
    for names in phases or [('jax',)]:
      if 'torch' not in names:
        weights = weights[:3] + (None,)
      gc.collect()
      for case in cases:
        results.setdefault(case, []).append(run_case(args, case, config, weights, consts, names))
        print(json.dumps(results[case][-1], default=str), flush=True)
        gc.collect()
        _finish(args.out, dict(environment=env, args=vars(args), consts=consts, partial=True,
                               results=[summarise(r, peak) for r in results.values()]))
  results = [summarise(results[case], peak) for case in cases]
  print_table(results)
  _finish(args.out, dict(environment=env, args=vars(args), consts=consts, results=results))


def main(argv=None):
  args = parse_args(argv)
  _setup(args)
  (run_train if args.command == 'train' else run_infer)(args)


if __name__ == '__main__':
  main()
