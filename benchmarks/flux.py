r"""FLUX.1 transformer: forward JAX vs PyTorch on the CPU; OMGSR-F LoRA step memory under FSDP.

``forward``: diffusers ``FluxTransformer2DModel`` with random weights (torch's default init) at FLUX
full width (3072 = 24 heads x 128, FLUX.1-dev embedders, guidance embeds) and reduced depth
(``--double`` / ``--single`` blocks, default 2 + 2), converted into `sr_jax.models.flux` with
`convert_state_dict`; a ``--latent`` square latent (default 64 -> 32 x 32 = 1024 image tokens) and
``--text_len`` T5 tokens (default 512), fp32, batch 1. The torch model gets the inputs as
FluxPipeline hands them over (packed latents, image / text ids). Outputs are compared, then both
are timed, alternating (JAX first on even repeats). Peak RAM is about 3 x the fp32 weights
(torch, the numpy conversion, JAX): ~12 GB at the default depth.

``train_memory``: XLA's compiled memory (per device: arguments + outputs + temporaries - aliased) of
one OMGSR-F LoRA training step of FLUX.1-dev: forward + backward with respect to the OMGSR-F LoRA
(13 target suffixes, 343 modules, r = alpha = ``--rank`` 64, fp32) only, AdamW (lr 5e-5, wd 1e-4)
update, frozen base in bfloat16, bfloat16 compute, remat per block; ``--latent`` 128 (1024^2
images), ``--batch_per_device`` 1, 512 text tokens, sigma 0.50511 and guidance 1.0 (OMGSR-F), loss
``mean((z_L - sigma v - z_H)^2)`` (the transformer part of the step only: no VAE, DINOv3 or GAN
terms). Mesh ``fsdp = --fsdp`` (8) on fake CPU devices (the script re-executes itself with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` when needed); frozen params, LoRA and
optimizer state are split by `sr_jax.sharding.fsdp_shardings` (LoRA and moments with
``--lora_min_size``), the batch over the devices. Only abstract inputs (ShapeDtypeStructs with
shardings) are compiled: nothing is materialised. ``--double`` / ``--single`` shrink the depth
for scaling runs. Caveat: XLA:CPU is not XLA:GPU (the CPU attention is the chunked path of
`cpu_kernels`, GPU uses cuDNN flash), so the figure estimates the GPU's and is to be checked on
one; the depth-scaling figures and what they suggest about XLA:CPU are in RESULTS.md.

::

  python benchmarks/flux.py forward [--double 2 --single 2 --latent 64 --text_len 512 --repeats 3]
  python benchmarks/flux.py train_memory [--fsdp 8 --latent 128 --batch_per_device 1 --rank 64]
  python benchmarks/flux.py forward --tiny         # smoke tests: tiny width, seconds, < 1 GB
  python benchmarks/flux.py train_memory --tiny

JSON: ``benchmarks/out/flux_<command>.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'
# OMGSR-F (next-methods.md Sec. 6): t* = 244 -> sigma 0.50511; guidance 1.0; AdamW 5e-5, wd 1e-4.
OMGSR_F_SIGMA, OMGSR_F_GUIDANCE, LEARNING_RATE, WEIGHT_DECAY = 0.50511, 1.0, 5e-5, 1e-4
GPU_BYTES = 80e9  # "fits an 80 GB GPU" (H100 / A100 80 GB)
# --tiny: the test suite's sizes (2 heads x 16, small embedders).
TINY = dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
            pooled_projection_dim=12, axes_dims_rope=[4, 6, 6], in_channels=16)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  f = sub.add_parser('forward', help='JAX vs PyTorch eager forward on this CPU (fp32)')
  f.add_argument('--double', type=int, default=2, help='double-stream blocks (FLUX.1: 19)')
  f.add_argument('--single', type=int, default=2, help='single-stream blocks (FLUX.1: 38)')
  f.add_argument('--latent', type=int, default=64, help='latent side (image side / 8)')
  f.add_argument('--text_len', type=int, default=512)
  f.add_argument('--repeats', type=int, default=3, help='timed calls per framework (median)')
  f.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
  t = sub.add_parser('train_memory', help='XLA memory of a FLUX.1-dev LoRA step under FSDP')
  t.add_argument('--fsdp', type=int, default=8, help='fake CPU devices = fsdp axis size')
  t.add_argument('--latent', type=int, default=128, help='latent side (1024^2 images: 128)')
  t.add_argument('--batch_per_device', type=int, default=1)
  t.add_argument('--text_len', type=int, default=512)
  t.add_argument('--rank', type=int, default=64)
  t.add_argument('--lora_min_size', type=int, default=2 ** 16,
                 help='FSDP-split LoRA factors and moments with at least this many elements')
  t.add_argument('--no_remat', action='store_true')
  t.add_argument('--double', type=int, default=19, help='double-stream blocks (fewer: scaling)')
  t.add_argument('--single', type=int, default=38, help='single-stream blocks')
  for q in (f, t):
    q.add_argument('--tiny', action='store_true', help='tiny width (smoke test)')
    q.add_argument('--out', default=None, help='JSON (default benchmarks/out/flux_<command>.json)')
  args = p.parse_args(argv)
  if args.tiny:
    args.latent, args.text_len = min(args.latent, 8), min(args.text_len, 8)
    if args.command == 'train_memory':
      args.rank, args.lora_min_size = min(args.rank, 4), 256
  args.out = args.out or os.path.join(REPO, 'benchmarks', 'out', f'flux_{args.command}.json')
  return args


def _reexec_with_fake_devices(count: int) -> None:
  """Restarts this script with ``count`` fake CPU devices (XLA_FLAGS is read when jax starts)."""
  flags = os.environ.get('XLA_FLAGS', '')
  if f'{DEVICE_COUNT_FLAG}={count}' in flags:
    return
  flags = ' '.join(f for f in flags.split() if not f.startswith(DEVICE_COUNT_FLAG))
  env = dict(os.environ, XLA_FLAGS=f'{flags} {DEVICE_COUNT_FLAG}={count}'.strip(),
             JAX_PLATFORMS='cpu')
  os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


def _imports(with_torch: bool, threads: int = 1):
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path[:0] = [REPO, os.path.join(REPO, 'benchmarks')]
  global jax, jnp, np, mvt, lora, flux  # pylint: disable=global-statement
  import jax
  import jax.numpy as jnp
  import numpy as np
  import models_vs_torch as mvt
  from sr_jax.models import flux, lora
  if with_torch:
    global torch, diffusers  # pylint: disable=global-statement
    import diffusers
    import torch
    mvt._import_frameworks(argparse.Namespace(device='cpu', threads=threads))  # environment()'s


def model_config(args, **overrides) -> dict:
  """FLUX1_DEV_CONFIG with ``overrides``; ``--tiny``: TINY widths and at most 2 + 2 blocks."""
  config = dict(flux.FLUX1_DEV_CONFIG, **overrides)
  if args.tiny:
    config.update(TINY, num_layers=min(config['num_layers'], 2),
                  num_single_layers=min(config['num_single_layers'], 2))
  return config


def _finish(args, result: dict, table: str) -> None:
  result['max_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print('\n' + table)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2, default=str)
  print(f'wrote {args.out} (max RSS {result["max_rss_gib"]:.2f} GiB)')


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


# ---------------------------------------------------------------------------------------- forward

def torch_forward(model, latents, sigmas, context, pooled, guidance):
  """diffusers' transformer called as FluxPipeline calls it; NHWC numpy output."""
  b, h, w, c = latents.shape
  pipe = diffusers.FluxPipeline
  packed = pipe._pack_latents(torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))),
                              b, c, h, w)
  img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, 'cpu', torch.float32)
  with torch.inference_mode():
    out = model(hidden_states=packed, encoder_hidden_states=torch.from_numpy(context),
                pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(sigmas),
                img_ids=img_ids, txt_ids=torch.zeros(context.shape[1], 3),
                guidance=torch.from_numpy(guidance)).sample
  return pipe._unpack_latents(out, h * 8, w * 8, 8).numpy().transpose(0, 2, 3, 1)


def build_forward(args):
  """(our model, converted params, torch model, numpy inputs) at the requested sizes."""
  from sr_jax.weights import convert_state_dict
  config = model_config(args, num_layers=args.double, num_single_layers=args.single)
  torch.manual_seed(0)
  torch_model = diffusers.FluxTransformer2DModel(
      **{k: v for k, v in config.items() if not k.startswith('_')}).eval()
  model = flux.FluxTransformer2DModel.from_config(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']
  state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  params = jax.device_put(convert_state_dict(state, shapes))
  del state
  rng = np.random.default_rng(0)
  inputs = (rng.standard_normal((1, args.latent, args.latent, model.latent_channels)),
            np.array([OMGSR_F_SIGMA]),
            rng.standard_normal((1, args.text_len, model.joint_attention_dim)),
            rng.standard_normal((1, model.pooled_projection_dim)), np.array([OMGSR_F_GUIDANCE]))
  return model, params, torch_model, tuple(np.asarray(x, np.float32) for x in inputs)


def forward(args) -> None:
  _imports(with_torch=True, threads=args.threads)
  env = mvt.environment()
  start = time.perf_counter()
  model, params, torch_model, inputs = build_forward(args)
  build_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = mvt.jit_model(model.apply).lower({'params': params}, *inputs).compile()
  compile_s = time.perf_counter() - start
  run_jax = lambda: jax.block_until_ready(compiled({'params': params}, *inputs))
  run_torch = lambda: torch_forward(torch_model, *inputs)
  errs = mvt.compare([np.asarray(run_jax(), np.float32)], [run_torch()], first_only=False)
  times = {'jax': [], 'torch': []}
  for i in range(args.repeats):
    for name in (('jax', 'torch') if i % 2 == 0 else ('torch', 'jax')):
      fn = run_jax if name == 'jax' else run_torch
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  jax_s, torch_s = statistics.median(times['jax']), statistics.median(times['torch'])
  tokens = (args.latent // 2) ** 2
  result = dict(command='forward', environment=env, args=vars(args), build_s=build_s,
                compile_s=compile_s, xla_tflop=_flops(compiled) / 1e12, times_s=times,
                jax_median_s=jax_s, torch_median_s=torch_s, ratio_jax_over_torch=jax_s / torch_s,
                image_tokens=tokens, **errs)
  table = (f"FLUX forward, width {model.inner_dim}, {args.double} double + {args.single} single "
           f"blocks, {tokens} image + {args.text_len} text tokens, fp32, batch 1, "
           f"{env['cpu']} x{env['cores']}; median of {args.repeats} alternating calls\n\n"
           '| JAX s | PyTorch s | JAX/PyTorch | XLA TFLOP | max abs err | max err / scale | '
           'rel L2 err | compile s |\n|' + '---|' * 8 + '\n'
           f"| {jax_s:.3f} | {torch_s:.3f} | {jax_s / torch_s:.2f} | {result['xla_tflop']:.3f} | "
           f"{errs['max_abs_err']:.2e} | {errs['max_rel_err']:.2e} | {errs['rel_l2_err']:.2e} | "
           f'{compile_s:.1f} |')
  _finish(args, result, table)


# ----------------------------------------------------------------------------------- train_memory

def train_abstracts(args, mesh):
  """(model, LoRA config, optimizer, {name: (abstract tree, shardings)}) for the step's inputs."""
  import optax
  from sr_jax import sharding
  config = model_config(args, num_layers=args.double, num_single_layers=args.single)
  model = flux.FluxTransformer2DModel.from_config(config, dtype=jnp.bfloat16,
                                                  param_dtype=jnp.bfloat16, remat=not args.no_remat)
  frozen = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']
  lora_config = lora.LoRAConfig(rank=args.rank, alpha=args.rank,
                                target_modules=flux.OMGSR_F_LORA_TARGETS, init='gaussian')
  adapters = jax.eval_shape(lambda: lora.init_lora_params(jax.random.key(1), frozen, lora_config))
  optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  opt_state = jax.eval_shape(optimizer.init, adapters)
  b, side = args.batch_per_device * mesh.size, args.latent
  latent = jax.ShapeDtypeStruct((b, side, side, model.latent_channels), jnp.bfloat16)
  batch = {'z_lq': latent, 'z_hq': latent,
           'context': jax.ShapeDtypeStruct((b, args.text_len, model.joint_attention_dim),
                                           jnp.bfloat16),
           'pooled': jax.ShapeDtypeStruct((b, model.pooled_projection_dim), jnp.bfloat16)}
  trees = {
      'lora': (adapters, sharding.fsdp_shardings(adapters, mesh, args.lora_min_size)),
      'opt_state': (opt_state, sharding.fsdp_shardings(opt_state, mesh, args.lora_min_size)),
      'frozen': (frozen, sharding.fsdp_shardings(frozen, mesh)),
      'batch': (batch, jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)),
  }
  return model, lora_config, optimizer, trees


def make_step(model, lora_config, optimizer):
  """One LoRA step: x0 = z_L - sigma v(z_L), loss mean((x0 - z_H)^2), grads w.r.t. LoRA, AdamW."""
  import optax

  def step(adapters, opt_state, frozen, batch):
    b = batch['z_lq'].shape[0]
    sigma = jnp.full((b,), OMGSR_F_SIGMA, jnp.float32)

    def loss_fn(adapters):
      v = lora.apply(model, frozen, adapters, lora_config, batch['z_lq'], sigma, batch['context'],
                     batch['pooled'], jnp.full((b,), OMGSR_F_GUIDANCE, jnp.float32))
      z_lq = batch['z_lq'].astype(jnp.float32)
      x0 = z_lq - sigma[:, None, None, None] * v.astype(jnp.float32)
      return jnp.mean((x0 - batch['z_hq'].astype(jnp.float32)) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(adapters)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  return step


def _per_device_bytes(tree, shardings) -> int:
  return sum(int(np.prod(s.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
             for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _memory(compiled) -> dict:
  analysis = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'alias_size_in_bytes', 'generated_code_size_in_bytes')
  mem = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
  mem['peak_bytes'] = (mem['argument_size_in_bytes'] + mem['output_size_in_bytes']
                       + mem['temp_size_in_bytes'] - mem['alias_size_in_bytes'])
  return mem


def train_memory(args) -> None:
  _reexec_with_fake_devices(args.fsdp)
  _imports(with_torch=False)
  from sr_jax import sharding, xla
  mesh = sharding.make_mesh({'data': 1, 'fsdp': args.fsdp})
  model, lora_config, optimizer, trees = train_abstracts(args, mesh)
  abstract = {k: sharding.with_sharding(tree, sh) for k, (tree, sh) in trees.items()}
  out_shardings = (trees['lora'][1], trees['opt_state'][1], sharding.replicated(mesh))
  step = jax.jit(make_step(model, lora_config, optimizer), out_shardings=out_shardings,
                 donate_argnums=(0, 1))
  start = time.perf_counter()
  compiled = step.lower(abstract['lora'], abstract['opt_state'], abstract['frozen'],
                        abstract['batch']).compile(xla.training_compiler_options())
  compile_s = time.perf_counter() - start
  mem = _memory(compiled)
  held = {k: _per_device_bytes(*trees[k]) for k in ('frozen', 'lora', 'opt_state', 'batch')}
  counts = {k: sum(a.size for a in jax.tree.leaves(trees[k][0])) for k in ('frozen', 'lora')}
  gib = lambda x: x / 2**30
  fits = mem['peak_bytes'] <= GPU_BYTES
  result = dict(command='train_memory', args=vars(args), devices=jax.device_count(),
                compile_s=compile_s, memory_per_device=mem, held_per_device_bytes=held,
                param_counts=counts, lora_modules=len(lora.target_paths(trees['frozen'][0],
                                                                       lora_config)),
                xla_tflop_per_device=_flops(compiled) / 1e12, fits_80gb=fits,
                image_tokens=(args.latent // 2) ** 2,
                global_batch=args.batch_per_device * args.fsdp)
  print(f'compiled in {compile_s:.0f} s', flush=True)
  depth = f'{args.double} + {args.single} blocks' if (args.double, args.single) != (19, 38) else ''
  table = (f"FLUX.1-dev{' (tiny width)' if args.tiny else ''}{depth and f' ({depth})'} OMGSR-F "
           f"LoRA step: "
           f"{result['lora_modules']} LoRA modules (r {args.rank}, {counts['lora']:,} params), "
           f"frozen {counts['frozen']:,} params bf16, remat {not args.no_remat}; "
           f"{result['image_tokens']} image + {args.text_len} text tokens, fsdp {args.fsdp}, "
           f"{args.batch_per_device} per device (global {result['global_batch']}); XLA:CPU, "
           'per device\n\n| frozen GiB | LoRA + AdamW GiB | args GiB | outputs GiB | temp GiB | '
           'alias GiB | peak GiB | fits 80 GB | TFLOP/device | compile s |\n|' + '---|' * 10 + '\n'
           f"| {gib(held['frozen']):.3f} | {gib(held['lora'] + held['opt_state']):.3f} | "
           f"{gib(mem['argument_size_in_bytes']):.3f} | {gib(mem['output_size_in_bytes']):.3f} | "
           f"{gib(mem['temp_size_in_bytes']):.3f} | {gib(mem['alias_size_in_bytes']):.3f} | "
           f"{gib(mem['peak_bytes']):.3f} | {'yes' if fits else 'no'} | "
           f"{result['xla_tflop_per_device']:.2f} | {compile_s:.0f} |")
  _finish(args, result, table)


def main(argv=None) -> None:
  args = parse_args(argv)
  forward(args) if args.command == 'forward' else train_memory(args)


if __name__ == '__main__':
  main()
