r"""Peak memory of converting (and loading) a large sharded checkpoint, against its size.

Writes a synthetic FLUX.1-like transformer checkpoint in the diffusers layout (``transformer/
config.json`` + ``diffusion_pytorch_model-0000i-of-0000N.safetensors`` + index) into a temporary
folder: FLUX.1-dev's full width (3072, so every tensor has its real size: the largest, a single
block's ``proj_out``, is 94 MB in bf16) and the key set of `sr_jax.models.flux`, with ``--double``
double-stream and twice as many single-stream blocks, chosen from ``--size_gb`` (FLUX.1-dev itself:
19 + 38 blocks, 23.8 GB). Values are bf16 noise (one random buffer, sliced). Then, each in its own
subprocess, whose peak resident set is its ``ru_maxrss`` from ``os.wait4``:

* ``baseline``: import sr_jax and build the abstract params (what every run pays);
* ``convert``: `sr_jax.pretrained.convert_folder` into sharded params (``--max_shard_size``,
  ``--dtype`` source = bf16 kept);
* ``load`` (``--load``): `pretrained.load_flux_transformer` of the converted folder in bf16 (its
  params are on the host here, so the expected peak is baseline + the checkpoint);
* ``naive`` (``--naive``): the whole-checkpoint path a small model takes
  (`sr_jax.weights.read_state_dict` + `convert_state_dict` to float32), for comparison only: it
  needs about 3x the checkpoint in RAM.

::

  python benchmarks/convert_rss.py [--size_gb 4] [--source_shard_size 1GB] [--max_shard_size 2GB]
      [--load] [--naive] [--keep DIR] [--json benchmarks/out/convert_rss.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES_PER_PAIR_GB = 1.246  # one double (339.8M) + two single (2 x 141.6M) blocks in bf16, GB

CHILD = r'''
import json, sys
from sr_jax import pretrained
from sr_jax.models import flux
job, src, out, dtype, shard = sys.argv[1:6]
if job == 'baseline':
  with open(src + '/transformer/config.json') as f:
    model = flux.FluxTransformer2DModel.from_config(json.load(f))
  pretrained.abstract_params(model)
elif job == 'convert':
  pretrained.convert_folder(src + '/transformer', out, 'flux_transformer', dtype=dtype,
                            max_shard_size=shard)
elif job == 'load':
  import jax.numpy as jnp
  _, params = pretrained.load_flux_transformer(out, param_dtype=jnp.bfloat16)
elif job == 'naive':
  from sr_jax import weights
  with open(src + '/transformer/config.json') as f:
    model = flux.FluxTransformer2DModel.from_config(json.load(f))
  files = weights.find_weight_files(src + '/transformer', 'diffusion_pytorch_model')
  weights.convert_state_dict(weights.read_state_dict(files), pretrained.abstract_params(model))
'''


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--size_gb', type=float, default=4.0, help='target checkpoint size (bf16, GB)')
  p.add_argument('--double', type=int, default=None, help='double blocks (default: from --size_gb)')
  p.add_argument('--source_shard_size', default='1GB', help='shard size of the synthetic checkpoint')
  p.add_argument('--max_shard_size', default='2GB', help='shard size of the converted folder')
  p.add_argument('--dtype', default='source', help="converted dtype ('source': bf16 kept)")
  p.add_argument('--load', action='store_true', help='also load the converted folder (bf16)')
  p.add_argument('--naive', action='store_true', help='also the whole-checkpoint path (~3x RAM)')
  p.add_argument('--keep', default=None, help='work in this folder and keep it (default: a temp dir)')
  p.add_argument('--json', default=os.path.join(REPO, 'benchmarks', 'out', 'convert_rss.json'))
  args = p.parse_args(argv)
  if args.double is None:
    args.double = max(1, round(args.size_gb / BYTES_PER_PAIR_GB))
  return args


def write_checkpoint(folder: str, double: int, shard_size: str) -> dict:
  """The synthetic diffusers transformer folder; returns its config, size and tensor count."""
  import jax.numpy as jnp
  import numpy as np
  from sr_jax import pretrained, safetensors_io
  from sr_jax.models import flux
  from sr_jax.weights import flax_to_torch_shapes

  config = dict(flux.FLUX1_DEV_CONFIG, num_layers=double, num_single_layers=2 * double)
  shapes = flax_to_torch_shapes(pretrained.abstract_params(
      flux.FluxTransformer2DModel.from_config(config)))
  dtype = np.dtype(jnp.bfloat16)
  noise = np.random.default_rng(0).standard_normal(max(int(np.prod(s)) for s in shapes.values()),
                                                   dtype=np.float32).astype(dtype)
  entries = [(k, s, dtype) for k, s in sorted(shapes.items())]
  produce = lambda name: noise[:int(np.prod(shapes[name]))].reshape(shapes[name])
  out = os.path.join(folder, 'transformer')
  files = safetensors_io.write_sharded(out, 'diffusion_pytorch_model', entries, produce,
                                       max_shard_bytes=safetensors_io.parse_size(shard_size))
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(config, f)
  nbytes = sum(os.path.getsize(os.path.join(out, n)) for n in files)
  return dict(config=config, bytes=nbytes, files=len(files), tensors=len(entries),
              params=int(sum(np.prod(s) for s in shapes.values())),
              largest_tensor_bytes=int(noise.nbytes))


def run_child(job: str, src: str, out: str, args) -> dict:
  """One job in a fresh interpreter; its peak RSS (ru_maxrss, KiB on Linux) and wall time."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, '-c', CHILD, job, src, out, args.dtype,
                           args.max_shard_size], env=env, cwd=REPO)
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - start
  if proc.returncode:
    raise SystemExit(f'{job} failed with exit status {proc.returncode}')
  return dict(peak_rss_bytes=usage.ru_maxrss * 1024, seconds=seconds)


def main(argv=None) -> None:
  args = parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, REPO)
  work = args.keep or tempfile.mkdtemp(prefix='convert_rss_')
  os.makedirs(work, exist_ok=True)
  try:
    start = time.perf_counter()
    checkpoint = write_checkpoint(os.path.join(work, 'src'), args.double, args.source_shard_size)
    checkpoint['write_seconds'] = time.perf_counter() - start
    out = os.path.join(work, 'converted')
    jobs = ['baseline', 'convert'] + ['load'] * args.load + ['naive'] * args.naive
    results = {job: run_child(job, os.path.join(work, 'src'), out, args) for job in jobs}
    converted = sorted(n for n in os.listdir(out) if n.endswith('.safetensors'))
    checkpoint['converted_files'] = len(converted)
    checkpoint['converted_bytes'] = sum(os.path.getsize(os.path.join(out, n)) for n in converted)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
  gb = lambda b: b / 1e9
  lines = [f"synthetic FLUX.1-like checkpoint: width 3072, {args.double} double + "
           f"{2 * args.double} single blocks, {checkpoint['params']:,} params, "
           f"{checkpoint['tensors']} tensors in {checkpoint['files']} bf16 shards, "
           f"{gb(checkpoint['bytes']):.2f} GB (largest tensor "
           f"{checkpoint['largest_tensor_bytes'] / 1e6:.0f} MB); converted into "
           f"{checkpoint['converted_files']} files of <= {args.max_shard_size}", '',
           '| job | peak RSS GB | peak RSS / checkpoint | over baseline GB | seconds |',
           '|---|---|---|---|---|']
  base = results['baseline']['peak_rss_bytes']
  for job, r in results.items():
    rss = r['peak_rss_bytes']
    lines.append(f"| {job} | {gb(rss):.2f} | {rss / checkpoint['bytes']:.2f} | "
                 f"{gb(rss - base):.2f} | {r['seconds']:.1f} |")
  print('\n'.join(lines))
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, 'w') as f:
    json.dump(dict(args=vars(args), checkpoint=checkpoint, results=results), f, indent=2)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
