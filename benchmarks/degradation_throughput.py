"""Degradation throughput and LQ statistics: ours (numpy / OpenCV) vs the PyTorch reference (basicsr).

    python benchmarks/degradation_throughput.py [--preset omgsr_512] [--pairs 60] [--out results.json]

On one core (OpenCV and torch limited to one thread) it degrades the same 512 x 512 HQ crops of the
scikit-image colour photos with `degradations.degrade` and with the reference pipeline built from basicsr
1.4.2's functions as OMGSR runs them (`basicsr_reference.make_reference_degrader`; skipped when basicsr
is absent), and reports pairs/s, the ratio, and the LQ-vs-HQ PSNR distribution of both. `--record` also
times whole records (crop + flip + degrade + scaling to [-1, 1]) through `pipeline.PairMaker`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sr_jax.data import basicsr_reference  # noqa: E402
from sr_jax.data import degradations  # noqa: E402
from sr_jax.data import pipeline  # noqa: E402
from sr_jax.data import sources  # noqa: E402


def hq_crops(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
  """`count` random size^2 crops (float32 [0, 1]) cycling over the bundled colour photos."""
  rng = np.random.default_rng(seed)
  photos = [sources.load_rgb('skimage:' + name) for name in sources.SKIMAGE_COLOR_PHOTOS]
  return [sources.random_crop(photos[i % len(photos)], size, rng).astype(np.float32) / 255.0
          for i in range(count)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  return float(10 * np.log10(1.0 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))


def run(fn, crops: list[np.ndarray], pairs: int) -> tuple[dict[str, float], list[float]]:
  """Rates of fn over `pairs` calls (after one warm-up), and the PSNR of every output.

  pairs_per_s is wall-clock; pairs_per_cpu_s divides by this process's CPU time, which on a single thread
  is the per-core rate and stays meaningful on a shared, loaded machine.
  """
  fn(crops[0], 0)
  outputs, elapsed, cpu = [], 0.0, 0.0
  for i in range(pairs):
    hq = crops[i % len(crops)]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    lq = fn(hq, i + 1)
    elapsed += time.perf_counter() - wall0
    cpu += time.process_time() - cpu0
    outputs.append(psnr(lq, hq))
  return dict(pairs_per_s=pairs / elapsed, pairs_per_cpu_s=pairs / cpu), outputs


def summary(scores: list[float]) -> dict[str, float]:
  p5, p25, p50, p75, p95 = np.percentile(scores, [5, 25, 50, 75, 95])
  return dict(mean=float(np.mean(scores)), p5=p5, p25=p25, median=p50, p75=p75, p95=p95)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='omgsr_512')
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--pairs', type=int, default=60)
  parser.add_argument('--record', action='store_true', help='also time whole records via PairMaker')
  parser.add_argument('--out', default='')
  args = parser.parse_args()

  import cv2  # pylint: disable=g-import-not-at-top
  cv2.setNumThreads(1)
  config = degradations.preset(args.preset)
  crops = hq_crops(16, args.size)
  results = dict(preset=args.preset, size=args.size, pairs=args.pairs, cpu=platform.processor() or platform.machine(),
                 load_average=os.getloadavg()[0])

  ours_rate, ours_psnr = run(lambda hq, i: degradations.degrade(hq, np.random.default_rng([1, i]), config),
                             crops, args.pairs)
  results['ours'] = dict(**ours_rate, psnr=summary(ours_psnr))

  if args.record:
    maker = pipeline.make_pair_maker(pipeline.source_config(['skimage:' + ','.join(sources.SKIMAGE_COLOR_PHOTOS)],
                                                            args.size, args.preset), seed=0)
    record_rate, _ = run(lambda hq, i: (maker(i)['lq'] + 1) / 2, crops, args.pairs)
    results['ours_record'] = record_rate

  ref = basicsr_reference.load()
  if ref is None:
    results['reference'] = dict(unavailable=basicsr_reference.reason())
  else:
    import random  # pylint: disable=g-import-not-at-top
    ref.torch.set_num_threads(1)
    random.seed(0)
    np.random.seed(0)
    ref.torch.manual_seed(0)
    degrade_ref = basicsr_reference.make_reference_degrader(config, ref)
    ref_rate, ref_psnr = run(lambda hq, i: degrade_ref(hq), crops, args.pairs)
    results['reference'] = dict(**ref_rate, psnr=summary(ref_psnr))
    results['speedup_wall'] = ours_rate['pairs_per_s'] / ref_rate['pairs_per_s']
    results['speedup_cpu'] = ours_rate['pairs_per_cpu_s'] / ref_rate['pairs_per_cpu_s']

  print(json.dumps(results, indent=2))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
