r"""SD3.5-Medium MMDiT (sr_jax.models.mmdit): forward vs PyTorch, DiT4SR training-step memory, GPU MFU.

Workloads (``--only``, comma-separated):

* ``forward``: JAX (jitted) vs diffusers ``SD3Transformer2DModel`` eager on the CPU, the same random
  weights (torch's default init, converted leaf by leaf), SD3.5-M width, ``--layers`` blocks (default
  all 24), a ``--latent`` square latent (default 64 = 512 px), ``--context`` text tokens (default 154,
  DiT4SR's), fp32, batch 1. Outputs are compared (max abs error, relative to the output scale), then
  the two are timed in alternation (median of ``--repeats``). Memory: the fp32 weights exist twice
  (torch and JAX), 2 x 9.0 GB at 24 layers, plus activations and XLA's compile: about 20 GB; on a
  smaller machine use ``--layers 12`` (figures then scale with depth). On 2 cores one full-depth
  forward takes minutes per framework.
* ``train_memory``: XLA's compiled memory (arguments + outputs + temp - aliased, per device) of one
  DiT4SR training step: SD3.5-M with the LR branch, frozen base in bf16, the control params
  (350,877,696) trained in fp32 with AdamW (state donated), bf16 compute, remat per block, batch
  ``--batch`` at a 64 x 64 latent; compiled on ``jax.ShapeDtypeStruct`` inputs only (nothing is
  allocated), on the device of ``--device``. Reports whether the peak fits 80 GB.
* ``gpu_forward`` (``--device gpu`` only): bf16 params and compute, random weights materialised on
  the GPU, ms/img and MFU = hand-counted FLOPs / (time x peak) at a 64 x 64 latent, batch ``--batch``.

Every JAX program here is built by ``jax.jit(...).lower(...)``; ``--lower_only`` stops there (no
compile, no weights, no torch), which checks the full-size path cheaply. ``--tiny`` swaps in a
small config (width 64, 3 blocks) for smoke tests::

  python benchmarks/mmdit.py                                   # CPU: forward + train_memory
  python benchmarks/mmdit.py --only forward --layers 12 --repeats 3
  python benchmarks/mmdit.py --device gpu --only gpu_forward,train_memory --batch 8
  python benchmarks/mmdit.py --tiny --repeats 1                # smoke test

Prints a markdown table; JSON in ``benchmarks/out/mmdit.json`` (``--out``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ('forward', 'train_memory', 'gpu_forward')
GIB = 2 ** 30
FITS_BYTES = 80e9  # an 80 GB accelerator (A100/H100-80GB)
TINY_CONFIG = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
                   attention_head_dim=32, num_attention_heads=2, joint_attention_dim=96,
                   caption_projection_dim=64, pooled_projection_dim=48, pos_embed_max_size=48,
                   qk_norm='rms_norm', dual_attention_layers=[0, 1])


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--only', default=None, help=f'comma-separated subset of {",".join(WORKLOADS)} '
                 '(default: forward,train_memory on cpu; gpu_forward,train_memory on gpu)')
  p.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
  p.add_argument('--layers', type=int, default=None, help='transformer blocks (default: all 24)')
  p.add_argument('--latent', type=int, default=64, help='latent side (64 = 512 px)')
  p.add_argument('--context', type=int, default=154, help='text tokens')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--repeats', type=int, default=2, help='timed calls per framework (median)')
  p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
  p.add_argument('--peak_tflops', type=float, default=None, help='device peak for MFU')
  p.add_argument('--tiny', action='store_true', help='small config (smoke test)')
  p.add_argument('--lower_only', action='store_true', help='lower the JAX programs, no compile')
  p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'out', 'mmdit.json'))
  args = p.parse_args(argv)
  default = 'gpu_forward,train_memory' if args.device == 'gpu' else 'forward,train_memory'
  args.only = [w.strip() for w in (args.only or default).split(',') if w.strip()]
  bad = sorted(set(args.only) - set(WORKLOADS))
  if bad:
    p.error(f'unknown workloads {bad}; choose from {WORKLOADS}')
  if 'gpu_forward' in args.only and args.device != 'gpu':
    p.error('gpu_forward needs --device gpu')
  args.dtype = 'bfloat16' if args.device == 'gpu' else 'float32'  # what mvt._peak_tflops reads
  return args


def _setup(args):
  """JAX_PLATFORMS from --device (mvt._import_frameworks), then the shared module globals."""
  sys.path[:0] = [REPO, os.path.join(REPO, 'benchmarks')]
  global jax, jnp, np, torch, optax, traverse_util, mvt  # pylint: disable=global-statement
  global diffusers, mmdit, weights, xla  # pylint: disable=global-statement
  import models_vs_torch as mvt
  mvt._import_frameworks(args)  # pylint: disable=protected-access
  import jax
  import jax.numpy as jnp
  import numpy as np
  import diffusers
  import optax
  import torch
  from flax import traverse_util
  from sr_jax import weights, xla
  from sr_jax.models import mmdit


def model_config(args) -> dict[str, Any]:
  config = dict(TINY_CONFIG if args.tiny else mmdit.SD35_MEDIUM_CONFIG)
  if args.layers:
    config['num_layers'] = args.layers
    config['dual_attention_layers'] = [i for i in config['dual_attention_layers'] if i < args.layers]
  return config


def _inputs(model, batch: int, latent: int, context: int, abstract: bool) -> tuple:
  """(latents, timesteps, encoder_hidden_states, pooled[, lr_latents]): shapes or random arrays."""
  shapes = [(batch, latent, latent, model.in_channels), (batch,),
            (batch, context, model.joint_attention_dim), (batch, model.pooled_projection_dim)]
  if model.lr_branch:
    shapes.append(shapes[0])
  if abstract:
    return tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
  rng = np.random.default_rng(0)
  arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  arrays[1] = np.full((batch,), 750.0, np.float32)  # sigma 0.75 (x 1000, as diffusers)
  return tuple(arrays)


def forward_flops(model, batch: int, latent: int, context: int) -> float:
  """Hand count (2 FLOP per multiply-add) of one forward: every matmul, the attention scores and
  weighted sums, and the control conv; elementwise work is left out."""
  d, p, m = model.inner_dim, model.patch_size, 4 * model.inner_dim
  n, ctx = (latent // p) ** 2, context
  t = 2 * n if model.lr_branch else n
  lr_qkv = 6 * n * d * d if model.lr_branch else 0
  flops = 2 * t * p * p * model.in_channels * d                     # pos_embed.proj
  flops += 2 * (256 * d + d * d + model.pooled_projection_dim * d + d * d)  # time_text_embed
  flops += 2 * ctx * model.joint_attention_dim * d                  # context_embedder
  flops += 2 * d * 2 * d + 2 * n * d * p * p * model.out_channels   # norm_out, proj_out
  for i in range(model.num_layers):
    last, dual = i == model.num_layers - 1, i in model.dual_attention_layers
    flops += 2 * d * d * ((9 if dual else 6) + (2 if last else 6))  # adaLN linears
    flops += 6 * t * d * d + 6 * ctx * d * d + 4 * (t + ctx) ** 2 * d + 2 * t * d * d + lr_qkv
    flops += 0 if last else 2 * ctx * d * d                         # to_add_out
    if dual:
      flops += 6 * t * d * d + 4 * t * t * d + 2 * t * d * d + lr_qkv
    flops += 4 * t * d * m + (2 * 9 * n * m if model.lr_branch else 0)
    flops += 0 if last else 4 * ctx * d * m                         # ff_context
  return float(batch * flops)


def _xla_flops(stage) -> float:
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


def _memory(compiled) -> dict[str, float]:
  analysis = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
            'alias_size_in_bytes', 'generated_code_size_in_bytes')
  mem = {f: int(getattr(analysis, f, 0) or 0) for f in fields}
  mem['peak_bytes'] = (mem['argument_size_in_bytes'] + mem['output_size_in_bytes']
                       + mem['temp_size_in_bytes'] - mem['alias_size_in_bytes'])
  mem['peak_gib'] = mem['peak_bytes'] / GIB
  return mem


def _abstract_params(model, dtype) -> Any:
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


# ------------------------------------------------------------------------------------- forward

def torch_to_jax_leafwise(torch_model, model) -> dict:
  """The random torch weights as our param tree, one leaf at a time (one fp32 copy, not two)."""
  expected = traverse_util.flatten_dict(_abstract_params(model, jnp.float32))
  flat = {}
  for key, tensor in torch_model.state_dict().items():
    if any(key.startswith(prefix) for prefix in model.checkpoint_ignore_prefixes()):
      continue
    path = weights.torch_key_to_flax_path(key, tensor.ndim)
    array = weights.torch_to_flax_array(tensor.detach().numpy(), path[-1])
    if path not in expected or array.shape != expected[path].shape:
      raise ValueError(f'{key}: {array.shape} does not fit the Flax model')
    flat[path] = jnp.asarray(array)
  missing = sorted('/'.join(p) for p in set(expected) - set(flat))
  if missing:
    raise ValueError(f'params missing from the torch model: {missing[:8]}')
  return traverse_util.unflatten_dict(flat)


def run_forward(args, config) -> dict[str, Any]:
  model = mmdit.SD3Transformer2DModel.from_config(config)
  fn = jax.jit(model.apply, compiler_options=xla.compiler_options())
  abstract = _inputs(model, args.batch, args.latent, args.context, abstract=True)
  seconds, lowered = _timed(lambda: fn.lower({'params': _abstract_params(model, jnp.float32)},
                                             *abstract))
  res = dict(workload='forward', layers=model.num_layers, lower_s=seconds,
             flop_hand=forward_flops(model, args.batch, args.latent, args.context))
  if args.lower_only:
    return res
  torch.manual_seed(0)
  torch_model = diffusers.SD3Transformer2DModel(
      **{k: v for k, v in config.items() if not k.startswith('_')}).eval()
  variables = {'params': torch_to_jax_leafwise(torch_model, model)}
  res['compile_s'], compiled = _timed(lowered.compile)
  res['flop_xla'] = _xla_flops(compiled)
  inputs = [jax.device_put(x) for x in _inputs(model, args.batch, args.latent, args.context, False)]
  # pylint: disable-next=protected-access
  torch_inputs = dict(hidden_states=mvt._nchw(np.asarray(inputs[0]), torch.float32),
                      timestep=torch.from_numpy(np.array(inputs[1])),
                      encoder_hidden_states=torch.from_numpy(np.array(inputs[2])),
                      pooled_projections=torch.from_numpy(np.array(inputs[3])))

  def run_jax():
    return jax.block_until_ready(compiled(variables, *inputs))

  def run_torch():
    with torch.inference_mode():
      return torch_model(**torch_inputs).sample

  res['first_jax_s'], jax_out = _timed(run_jax)
  res['first_torch_s'], torch_out = _timed(run_torch)
  # pylint: disable-next=protected-access
  res.update(mvt.compare([np.asarray(jax_out, np.float32)], [mvt._nhwc(torch_out)], False))
  del jax_out, torch_out
  jax_s, torch_s = [], []
  for i in range(args.repeats):  # alternate which goes first, so machine noise hits both alike
    for which in ((0, 1) if i % 2 == 0 else (1, 0)):
      (jax_s if which == 0 else torch_s).append(_timed(run_jax if which == 0 else run_torch)[0])
  res.update(jax_s=jax_s, torch_s=torch_s, jax_median_s=statistics.median(jax_s),
             torch_median_s=statistics.median(torch_s))
  res['ratio_jax_over_torch'] = res['jax_median_s'] / res['torch_median_s']
  res['jax_tflops'] = res['flop_hand'] / res['jax_median_s'] / 1e12
  return res


# -------------------------------------------------------------------------------- train_memory

def dit4sr_train_step(model, tx):
  """(control, opt_state, frozen, batch) -> (control, opt_state, loss): DiT4SR's precondition_outputs
  loss mean((x_sigma - sigma v_hat - z_hr)^2), gradients of the control params only."""

  def loss_fn(control, frozen, batch):
    params = mmdit.merge_params(frozen, control)
    v_hat = model.apply({'params': params}, batch['noisy'], batch['timesteps'] * 1000.0,
                        batch['context'], batch['pooled'], batch['lr'])
    sigma = batch['timesteps'][:, None, None, None]
    x0_hat = batch['noisy'] - sigma * v_hat.astype(jnp.float32)
    return jnp.mean((x0_hat - batch['hr']) ** 2)

  def step(control, opt_state, frozen, batch):
    loss, grads = jax.value_and_grad(loss_fn)(control, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, control)
    return optax.apply_updates(control, updates), opt_state, loss

  return step


def run_train_memory(args, config) -> dict[str, Any]:
  model = mmdit.SD3Transformer2DModel.from_config(config, lr_branch=True, remat=True,
                                                  dtype=jnp.bfloat16)
  frozen, _ = mmdit.split_control_params(_abstract_params(model, jnp.bfloat16))
  _, control = mmdit.split_control_params(_abstract_params(model, jnp.float32))
  tx = optax.adamw(5e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2)  # DiT4SR's recipe
  opt_state = jax.eval_shape(tx.init, control)
  latents, _, context, pooled, _ = _inputs(model, args.batch, args.latent, args.context, True)
  batch = dict(noisy=latents, hr=latents, lr=latents, context=context, pooled=pooled,
               timesteps=jax.ShapeDtypeStruct((args.batch,), jnp.float32))
  step = jax.jit(dit4sr_train_step(model, tx), donate_argnums=(0, 1))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  res = dict(workload='train_memory', layers=model.num_layers, trainable=count(control),
             frozen=count(frozen), batch=args.batch,
             flop_hand_forward=forward_flops(model, args.batch, args.latent, args.context))
  res['lower_s'], lowered = _timed(lambda: step.lower(control, opt_state, frozen, batch))
  if args.lower_only:
    return res
  options = xla.training_compiler_options()
  res['compile_s'], compiled = _timed(lambda: lowered.compile(options))
  res['memory'] = _memory(compiled)
  res['flop_xla'] = _xla_flops(compiled)
  res['fits_80gb'] = res['memory']['peak_bytes'] <= FITS_BYTES
  return res


# --------------------------------------------------------------------------------- gpu_forward

def run_gpu_forward(args, config) -> dict[str, Any]:
  model = mmdit.SD3Transformer2DModel.from_config(config, dtype=jnp.bfloat16,
                                                  param_dtype=jnp.bfloat16)
  inputs = _inputs(model, args.batch, args.latent, args.context, abstract=False)
  fn = jax.jit(model.apply)
  res = dict(workload='gpu_forward', layers=model.num_layers, batch=args.batch,
             flop_hand=forward_flops(model, args.batch, args.latent, args.context))
  res['lower_s'], lowered = _timed(lambda: fn.lower(
      {'params': _abstract_params(model, jnp.bfloat16)}, *inputs))
  if args.lower_only:
    return res
  params = jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs())['params']
  res['compile_s'], compiled = _timed(lowered.compile)
  res['flop_xla'] = _xla_flops(compiled)
  inputs = [jax.device_put(x) for x in inputs]
  run = lambda: jax.block_until_ready(compiled({'params': params}, *inputs))
  run()
  times = [_timed(run)[0] for _ in range(max(3, args.repeats))]
  res.update(jax_s=times, jax_median_s=statistics.median(times))
  res['ms_per_img'] = 1e3 * res['jax_median_s'] / args.batch
  res['jax_tflops'] = res['flop_hand'] / res['jax_median_s'] / 1e12
  peak = mvt._peak_tflops(args)  # pylint: disable=protected-access
  res['mfu'] = res['jax_tflops'] / peak if peak else None
  return res


# ------------------------------------------------------------------------------------- report

def _fmt(x, spec) -> str:
  return '–' if x is None else format(x, spec)


def markdown(results: list[dict], env: dict, args) -> str:
  head = (f"### {env['date'][:10]}: SD3.5-M MMDiT ({'tiny' if args.tiny else 'full width'}), "
          f"{args.device}, latent {args.latent}, {args.context} text tokens\n\n"
          f"Machine: {env['cpu']}, {env['cores']} cores, {env['mem_gib']} GiB; device "
          f"{env['device']}; jax {env['versions']['jax']}, torch {env['versions']['torch']}.\n\n")
  rows = ['| workload | layers | JAX s | PyTorch s | JAX/PyTorch | max err / scale | ms/img | '
          'TFLOP (hand) | TFLOP/s | MFU | XLA peak GiB | fits 80 GB | compile s |',
          '|' + '---|' * 13]
  for r in results:
    mem = r.get('memory', {})
    flop = r.get('flop_hand', r.get('flop_hand_forward'))
    rows.append(
        f"| {r['workload']} | {r['layers']} | {_fmt(r.get('jax_median_s'), '.3f')} | "
        f"{_fmt(r.get('torch_median_s'), '.3f')} | {_fmt(r.get('ratio_jax_over_torch'), '.2f')} | "
        f"{_fmt(r.get('max_rel_err'), '.2e')} | {_fmt(r.get('ms_per_img'), '.1f')} | "
        f"{flop / 1e12:.3f} | {_fmt(r.get('jax_tflops'), '.3f')} | {_fmt(r.get('mfu'), '.1%')} | "
        f"{_fmt(mem.get('peak_gib'), '.2f')} | {_fmt(r.get('fits_80gb'), '')} | "
        f"{_fmt(r.get('compile_s'), '.1f')} |")
  return head + '\n'.join(rows) + '\n'


def main(argv=None) -> None:
  args = parse_args(argv)
  _setup(args)
  if args.device == 'gpu' and jax.default_backend() != 'gpu':
    raise SystemExit('--device gpu: JAX sees no GPU')
  env, config = mvt.environment(), model_config(args)
  runners = dict(forward=run_forward, train_memory=run_train_memory, gpu_forward=run_gpu_forward)
  results = []
  for name in args.only:
    seconds, res = _timed(lambda name=name: runners[name](args, config))
    res['total_s'] = seconds
    results.append(res)
    print(json.dumps(res), flush=True)
    gc.collect()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:  # after each workload, so a killed run keeps its figures
      json.dump(dict(environment=env, args=vars(args), config=config, results=results), f,
                indent=2)
  print('\n' + markdown(results, env, args))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
