"""JAX (jitted) vs PyTorch eager on the same random full-size weights: SD2.1-base UNet, VAE, ConvNeXt-L.

Builds each random PyTorch reference model at full size (diffusers ``UNet2DConditionModel`` /
``AutoencoderKL`` from the SD2.1-base configs, transformers ``DINOv3ConvNextModel`` Large), converts
its state dict with `sr_jax.weights.convert_state_dict` into our Flax module, checks that the outputs
agree (max abs error, and relative to the output scale), then times both, interleaved in one process
(JAX first on even repeats, torch first on odd ones, so machine noise hits both alike), and reports
medians and the JAX/PyTorch ratio. JAX: compile excluded, ``block_until_ready``; torch: eager under
``torch.inference_mode()``, ``torch.set_num_threads(--threads)`` (default: the cores XLA uses).

Workloads (batch ``--batch``, default 1): ``unet`` at a 64x64 latent (512² image) with 77 tokens of
1024-d context; ``vae_encode`` of a 512² image; ``vae_decode`` of a 64x64 latent to 512²;
``convnext``: the first 3 stages of DINOv3-ConvNeXt-L on a 512² image.

CPU (the acceptance check: JAX <= 1.0x PyTorch)::

  python benchmarks/models_vs_torch.py                         # all four, fp32, batch 1
  python benchmarks/models_vs_torch.py --only unet --repeats 5
  python benchmarks/models_vs_torch.py --append-results benchmarks/RESULTS.md

GPU (JAX only; the torch wheel here is CPU-only, so torch checks sample 0 on the CPU in fp32)::

  python benchmarks/models_vs_torch.py --device gpu --dtype bfloat16 --batch 8

prints ms/img and MFU = counted FLOPs / (time x peak); FLOPs per image are the counts of
our hand count cross-checked with XLA's cost analysis (XLA's own count is printed beside them).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ('unet', 'vae_encode', 'vae_decode', 'convnext')
# Forward TFLOP per image at these shapes (XLA cost analysis + hand count).
TFLOP_PER_IMAGE = {'unet': 0.787, 'vae_encode': 1.11, 'vae_decode': 2.50, 'convnext': 0.329}
# Dense bf16 peak TFLOP/s by substring of jax's device_kind (first match wins).
PEAK_BF16_TFLOPS = (('H200', 989.0), ('H100 PCIe', 756.0), ('H100', 989.0), ('A100', 312.0),
                    ('L4', 121.0))
CONVNEXT_L = dict(hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3])


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--only', default=','.join(WORKLOADS),
                 help=f'comma-separated subset of {",".join(WORKLOADS)}')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per framework (median)')
  p.add_argument('--device', choices=('cpu', 'gpu'), default='cpu')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='compute dtype (params are stored in it too: frozen inference)')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
  p.add_argument('--peak-tflops', type=float, default=None,
                 help='device peak for MFU (default: looked up from the device kind)')
  p.add_argument('--no-torch-timing', action='store_true', help='only check outputs against torch')
  p.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'out', 'models_vs_torch.json'))
  p.add_argument('--append-results', default=None, metavar='MD',
                 help='append the figures as a dated markdown table to this file')
  args = p.parse_args(argv)
  args.only = [w.strip() for w in args.only.split(',') if w.strip()]
  bad = sorted(set(args.only) - set(WORKLOADS))
  if bad:
    p.error(f'unknown workloads {bad}; choose from {WORKLOADS}')
  return args


# Imported after argument parsing so that --help is instant and JAX_PLATFORMS can be set first.
def _import_frameworks(args):
  os.environ.setdefault('JAX_PLATFORMS', 'cuda,cpu' if args.device == 'gpu' else 'cpu')
  sys.path[:0] = [REPO, os.path.join(REPO, 'tests')]
  global jax, jnp, np, torch
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  torch.set_num_threads(args.threads)


@dataclasses.dataclass
class Workload:
  """One model at one input: JAX callable + args, torch callable, outputs to compare."""
  name: str
  jax_fn: Callable  # jitted, (params, *inputs) -> pytree of arrays
  params: Any
  inputs: tuple
  torch_fn: Callable  # () -> list of NHWC numpy arrays (torch runs sample 0 only when verify_first)
  describe: str
  verify_first: bool = False  # the torch reference saw only sample 0


def _convert(torch_model, flax_model, strip_prefix: str = '', dtype=None,
             ignore_prefixes: tuple[str, ...] = ()) -> Any:
  """Random torch weights -> our Flax param tree on the default device."""
  from sr_jax.weights import convert_state_dict
  state = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v.detach().float().numpy()
           for k, v in torch_model.state_dict().items()}
  shapes = jax.eval_shape(flax_model.init, jax.random.key(0), *_as_tuple(flax_model.dummy_inputs()))
  params = convert_state_dict(state, shapes['params'], dtype=np.dtype(dtype or np.float32),
                              ignore_prefixes=ignore_prefixes)
  del state
  return jax.device_put(params)


def jit_model(fn: Callable) -> Callable:
  """``jax.jit`` with the options sr_jax compiles its models with (xla.compiler_options)."""
  from sr_jax import xla
  return jax.jit(fn, compiler_options=xla.compiler_options())


def _as_tuple(x):
  return x if isinstance(x, tuple) else (x,)


def _nchw(x: 'np.ndarray', dtype) -> 'torch.Tensor':
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)


def _nhwc(t: 'torch.Tensor') -> 'np.ndarray':
  return t.detach().float().numpy().transpose(0, 2, 3, 1)


class _Builder:
  """Builds the workloads for one (device, dtype, batch) setting."""

  def __init__(self, args):
    self.batch = args.batch
    self.jdtype = jnp.dtype(args.dtype)
    on_gpu = args.device == 'gpu'
    # On the GPU the torch reference runs on the CPU in fp32 on sample 0 only.
    self.verify_first = on_gpu
    self.tdtype = torch.float32 if on_gpu else getattr(torch, args.dtype)
    self.rng = np.random.default_rng(0)

  def _ref_inputs(self, *arrays):
    return [a[:1] if self.verify_first else a for a in arrays]

  def _run_torch(self, fn):
    def run():
      with torch.inference_mode():
        return fn()
    return run

  def unet(self) -> Workload:
    import diffusers
    import tiny_diffusers as td
    from sr_jax.models.unet import UNet2DConditionModel
    config = {k: v for k, v in td.SD21_BASE_UNET_CONFIG.items() if not k.startswith('_')}
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    model = UNet2DConditionModel.from_config(config, dtype=self.jdtype)
    params = _convert(ref, model, dtype=self.jdtype)
    ref = ref.to(self.tdtype)
    sample = self.rng.standard_normal((self.batch, 64, 64, 4)).astype(np.float32)
    timesteps = np.full((self.batch,), 499.0, np.float32)
    context = self.rng.standard_normal((self.batch, 77, 1024)).astype(np.float32)
    s, t, c = self._ref_inputs(sample, timesteps, context)
    ts, tt, tc = _nchw(s, self.tdtype), torch.from_numpy(t), torch.from_numpy(c).to(self.tdtype)
    jax_fn = jit_model(lambda p, *a: model.apply({'params': p}, *a))
    return Workload('unet', jax_fn, params, (sample, timesteps, context),
                    self._run_torch(lambda: [_nhwc(ref(ts, tt, tc).sample)]),
                    'SD2.1-base UNet, 64x64x4 latent, 77x1024 context', self.verify_first)

  def _vae(self, part: str):
    import diffusers
    import tiny_diffusers as td
    from sr_jax.models.vae import AutoencoderKL
    config = {k: v for k, v in td.SD21_BASE_VAE_CONFIG.items() if not k.startswith('_')}
    torch.manual_seed(1)
    ref = diffusers.AutoencoderKL(**config).eval()
    model = AutoencoderKL.from_config(config, parts=(part,), dtype=self.jdtype)
    other = ('encoder.', 'quant_conv.') if part == 'decoder' else ('decoder.', 'post_quant_conv.')
    params = _convert(ref, model, dtype=self.jdtype, ignore_prefixes=other)
    return ref.to(self.tdtype), model, params

  def vae_encode(self) -> Workload:
    ref, model, params = self._vae('encoder')
    images = self.rng.uniform(-1, 1, (self.batch, 512, 512, 3)).astype(np.float32)
    x = _nchw(self._ref_inputs(images)[0], self.tdtype)

    def torch_fn():
      dist = ref.encode(x).latent_dist
      return [_nhwc(dist.mean), _nhwc(dist.logvar)]
    jax_fn = jit_model(lambda p, a: model.apply({'params': p}, a, method='encode'))
    return Workload('vae_encode', jax_fn, params, (images,), self._run_torch(torch_fn),
                    'SD2.1-base VAE encoder, 512x512 image -> 64x64 mean, logvar', self.verify_first)

  def vae_decode(self) -> Workload:
    ref, model, params = self._vae('decoder')
    latents = self.rng.standard_normal((self.batch, 64, 64, 4)).astype(np.float32)
    z = _nchw(self._ref_inputs(latents)[0], self.tdtype)
    jax_fn = jit_model(lambda p, a: model.apply({'params': p}, a, method='decode'))
    return Workload('vae_decode', jax_fn, params, (latents,),
                    self._run_torch(lambda: [_nhwc(ref.decode(z).sample)]),
                    'SD2.1-base VAE decoder, 64x64 latent -> 512x512', self.verify_first)

  def convnext(self) -> Workload:
    import transformers
    from sr_jax.models.dinov3 import DINOv3ConvNextModel
    torch.manual_seed(2)
    config = transformers.DINOv3ConvNextConfig(**CONVNEXT_L)
    ref = transformers.DINOv3ConvNextModel(config).eval()
    with torch.no_grad():  # layer scale 1e-6 would hide the blocks from the output check
      for name, p in ref.named_parameters():
        if name.endswith('gamma'):
          p.copy_(0.1 + 0.02 * torch.randn_like(p))
    model = DINOv3ConvNextModel.from_config(config.to_dict(), dtype=self.jdtype)
    params = _convert(ref, model, strip_prefix='model.', dtype=self.jdtype)
    ref = ref.to(self.tdtype)
    images = self.rng.standard_normal((self.batch, 512, 512, 3)).astype(np.float32)
    x = _nchw(self._ref_inputs(images)[0], self.tdtype)

    def torch_fn():
      h, outs = x, []
      for stage in ref.model.stages[:3]:
        h = stage(h)
        outs.append(_nhwc(h))
      return outs
    jax_fn = jit_model(lambda p, a: model.apply({'params': p}, a, 3))
    return Workload('convnext', jax_fn, params, (images,), self._run_torch(torch_fn),
                    'DINOv3-ConvNeXt-L, first 3 stages, 512x512 image', self.verify_first)


def _jax_leaves(out) -> list:
  return [np.asarray(o, np.float32) for o in jax.tree.leaves(out)]


def compare(jax_out: list, torch_out: list, first_only: bool) -> dict[str, float]:
  """Max abs error, max error relative to the output scale, relative L2 error (worst output)."""
  errs = dict(max_abs_err=0.0, max_rel_err=0.0, rel_l2_err=0.0)
  for j, t in zip(jax_out, torch_out, strict=True):
    j = j[:1] if first_only else j
    diff = np.abs(j - t)
    errs['max_abs_err'] = max(errs['max_abs_err'], float(diff.max()))
    errs['max_rel_err'] = max(errs['max_rel_err'], float(diff.max() / max(1.0, np.abs(t).max())))
    errs['rel_l2_err'] = max(errs['rel_l2_err'], float(np.linalg.norm(j - t) / np.linalg.norm(t)))
  return errs


def _time_once(fn: Callable[[], Any]) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def run_workload(w: Workload, args) -> dict[str, Any]:
  """Compiles, checks outputs, then times JAX and torch interleaved."""
  t0 = time.perf_counter()
  compiled = w.jax_fn.lower(w.params, *w.inputs).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_tflop = float(cost.get('flops', 0.0)) / 1e12 / args.batch if cost else float('nan')
  inputs = [jax.device_put(x) for x in w.inputs]
  run_jax = lambda: jax.block_until_ready(compiled(w.params, *inputs))
  t0 = time.perf_counter()
  jax_out = _jax_leaves(run_jax())
  first_jax_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  torch_out = w.torch_fn()  # also the torch warm-up call
  first_torch_s = time.perf_counter() - t0
  errs = compare(jax_out, torch_out, w.verify_first)
  del jax_out, torch_out
  time_torch = not (args.no_torch_timing or w.verify_first)
  jax_s, torch_s = [], []
  for i in range(args.repeats):
    order = (0, 1) if i % 2 == 0 else (1, 0)
    for which in order:
      if which == 0:
        jax_s.append(_time_once(run_jax))
      elif time_torch:
        torch_s.append(_time_once(w.torch_fn))
  res = dict(workload=w.name, describe=w.describe, batch=args.batch, dtype=args.dtype,
             device=str(jax.devices()[0].device_kind), compile_s=compile_s,
             first_call_jax_s=first_jax_s, first_call_torch_s=first_torch_s,
             jax_s=jax_s, torch_s=torch_s, jax_median_s=statistics.median(jax_s),
             xla_tflop_per_img=xla_tflop, doc_tflop_per_img=TFLOP_PER_IMAGE[w.name], **errs)
  res['ms_per_img'] = 1e3 * res['jax_median_s'] / args.batch
  res['jax_tflops'] = res['doc_tflop_per_img'] * args.batch / res['jax_median_s']
  if torch_s:
    res['torch_median_s'] = statistics.median(torch_s)
    res['ratio_jax_over_torch'] = res['jax_median_s'] / res['torch_median_s']
  if args.peak_tflops:
    res['mfu'] = res['jax_tflops'] / args.peak_tflops
  return res


def _peak_tflops(args) -> float | None:
  if args.peak_tflops or args.device != 'gpu':
    return args.peak_tflops
  kind = jax.devices()[0].device_kind
  for key, peak in PEAK_BF16_TFLOPS:
    if key in kind:
      return peak if args.dtype == 'bfloat16' else None
  return None


def environment() -> dict[str, Any]:
  import diffusers
  import flax
  import jaxlib
  import transformers
  cpu = platform.processor() or 'unknown'
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  try:
    mem_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  except (ValueError, OSError):
    mem_gib = float('nan')
  return dict(
      date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
      cpu=cpu, cores=os.cpu_count(), mem_gib=round(mem_gib, 1), device=jax.devices()[0].device_kind,
      versions=dict(python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
                    flax=flax.__version__, torch=torch.__version__, diffusers=diffusers.__version__,
                    transformers=transformers.__version__, numpy=np.__version__),
      xla_flags=os.environ.get('XLA_FLAGS', ''), torch_threads=torch.get_num_threads())


def _fmt(x: Any, spec: str) -> str:
  return '–' if x is None else format(x, spec)


def markdown_table(results: list[dict], env: dict, args) -> str:
  """The figures as a markdown section (what goes into benchmarks/RESULTS.md)."""
  v = env['versions']
  head = (f"### {env['date'][:10]}: {args.device}, {args.dtype}, batch {args.batch}\n\n"
          f"Machine: {env['cpu']}, {env['cores']} cores, {env['mem_gib']} GiB; device "
          f"{env['device']}. jax/jaxlib {v['jax']}, flax {v['flax']}, torch {v['torch']} "
          f"({env['torch_threads']} threads), diffusers {v['diffusers']}, transformers "
          f"{v['transformers']}, numpy {v['numpy']}. XLA_FLAGS=`{env['xla_flags']}`. "
          f"Median of {args.repeats} interleaved calls.\n\n")
  rows = ['| workload | JAX s | PyTorch s | JAX/PyTorch | ms/img | TFLOP/s | MFU | max abs err | '
          'max err / scale | compile s |', '|' + '---|' * 10]
  for r in results:
    rows.append(
        f"| {r['workload']} | {r['jax_median_s']:.3f} | {_fmt(r.get('torch_median_s'), '.3f')} | "
        f"{_fmt(r.get('ratio_jax_over_torch'), '.2f')} | {r['ms_per_img']:.1f} | "
        f"{r['jax_tflops']:.3f} | {_fmt(r.get('mfu'), '.1%')} | {r['max_abs_err']:.2e} | "
        f"{r['max_rel_err']:.2e} | {r['compile_s']:.1f} |")
  return head + '\n'.join(rows) + '\n'


def _write_json(path: str, env: dict, args, results: list[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(dict(environment=env, args=vars(args), results=results), f, indent=2)


def main(argv=None) -> None:
  args = parse_args(argv)
  _import_frameworks(args)
  if args.device == 'gpu' and jax.default_backend() != 'gpu':
    raise SystemExit('--device gpu: JAX sees no GPU')
  args.peak_tflops = _peak_tflops(args)
  env = environment()
  print(f"{env['cpu']} x{env['cores']}, JAX device {env['device']}, torch threads "
        f"{env['torch_threads']}, {args.dtype}, batch {args.batch}", flush=True)
  builder, results, failed = _Builder(args), [], []
  for name in args.only:
    t0 = time.perf_counter()
    try:  # one workload failing (e.g. out of memory on a small GPU) must not lose the others
      w = getattr(builder, name)()
      print(f'[{name}] built and converted in {time.perf_counter() - t0:.1f} s', flush=True)
      r = run_workload(w, args)
    except Exception:  # pylint: disable=broad-except
      print(f'[{name}] FAILED:\n{traceback.format_exc()}', flush=True)
      failed.append(name)
      continue
    finally:
      w = None
      gc.collect()
    results.append(r)
    _write_json(args.out, env, args, results)  # after each workload, so a killed run keeps its figures
    ratio = r.get('ratio_jax_over_torch')
    print(f"[{name}] JAX {r['jax_median_s']:.3f} s ({r['ms_per_img']:.1f} ms/img, "
          f"{r['jax_tflops']:.3f} TFLOP/s{', MFU %.1f%%' % (100 * r['mfu']) if 'mfu' in r else ''})"
          f" | torch {_fmt(r.get('torch_median_s'), '.3f')} s | JAX/torch {_fmt(ratio, '.2f')} | "
          f"max err {r['max_abs_err']:.2e} (rel to scale {r['max_rel_err']:.2e}, "
          f"rel L2 {r['rel_l2_err']:.2e}) | compile {r['compile_s']:.1f} s | "
          f"XLA {r['xla_tflop_per_img']:.3f} TFLOP/img", flush=True)
  table = markdown_table(results, env, args)
  print('\n' + table)
  _write_json(args.out, env, args, results)
  print(f'wrote {args.out}')
  if args.append_results:
    with open(args.append_results, 'a') as f:
      f.write('\n' + table)
    print(f'appended to {args.append_results}')
  if failed:
    raise SystemExit(f'failed: {", ".join(failed)}')


if __name__ == '__main__':
  main()
