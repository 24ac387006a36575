"""A new user's first hour, timed: the tiny default run, a continuation, and an evaluation.

  python benchmarks/first_run.py [--out benchmarks/out/first_run.json]

Runs, each a fresh process as a user would type it, with a fresh JAX compilation cache (so the first
run pays every compile, as on a new machine) in a fresh workdir:

1. ``python train.py --config=configs/omgsr.py:tiny --workdir=W`` (the README's tiny default);
2. the same with ``--config.max_steps=42`` (continuing by 2 steps from the step-40 checkpoint);
3. ``python eval.py`` on three small LQ photos from that workdir.

Each process's stderr is read as it is written, so every log line gets a wall-clock time; the phase
table comes from the trainer's own log lines ("building the ... method", "initialising the train
state", "compiling the train step...", the first progress line, "exporting to", ...).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (phase name, the log text that starts it), in the order they occur.
TRAIN_MARKERS = (('imports + checks + data sources', None),
                 ('frozen models', 'building the'),
                 ('train state (init or restore) + first batch', 'mesh '),
                 ('trace the step', 'tracing the train step'),
                 ('compile the step (or load it from the cache)', 'compiling the train step'),
                 ('train steps (+ image grids, checkpoints)', 'compiled the train step'),
                 ('export', 'exporting to'))
EVAL_MARKERS = (('imports + checks', None),
                ('load generator', 'loading the'),
                ('images (compile + run)', ': stages'),)


def run_timed(cmd: list[str], env: dict) -> tuple[float, list[tuple[float, str]], int]:
  """Runs ``cmd``; returns (wall seconds, [(seconds since start, stderr line)], return code)."""
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, bufsize=1)
  lines = [(time.perf_counter() - start, line.rstrip()) for line in proc.stderr]
  code = proc.wait()
  return time.perf_counter() - start, lines, code


def phases(lines: list[tuple[float, str]], markers, total: float) -> dict[str, float]:
  """Seconds between consecutive markers (a marker not seen takes no time)."""
  times = []
  for name, text in markers:
    if text is None:
      times.append((name, 0.0))
      continue
    hit = next((t for t, line in lines if text in line), None)
    if hit is not None:
      times.append((name, hit))
  out = {}
  for (name, t), nxt in zip(times, times[1:] + [('end', total)]):
    out[name] = round(nxt[1] - t, 1)
  return out


def _write_lq(folder: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from skimage import data  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  for name in ('astronaut', 'chelsea', 'coffee'):
    Image.fromarray(getattr(data, name)()).resize((64, 48), Image.BICUBIC).save(
        os.path.join(folder, f'{name}.png'))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'out', 'first_run.json'))
  args = parser.parse_args(argv)
  root = tempfile.mkdtemp(prefix='sr_jax_first_run_')
  env = dict(os.environ, SR_JAX_CACHE_DIR=os.path.join(root, 'cache'), PYTHONUNBUFFERED='1')
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  workdir, lq = os.path.join(root, 'work'), os.path.join(root, 'lq')
  _write_lq(lq)
  train = [sys.executable, 'train.py', '--config=configs/omgsr.py:tiny', f'--workdir={workdir}']
  runs = [('first run (40 steps)', train, TRAIN_MARKERS),
          ('continuation (+2 steps)', train + ['--config.max_steps=42'], TRAIN_MARKERS),
          ('eval (3 images)', [sys.executable, 'eval.py', '--config=configs/omgsr.py:tiny',
                               f'--checkpoint={workdir}', f'--input={lq}',
                               f'--output={os.path.join(root, "out")}'], EVAL_MARKERS)]
  results = []
  for name, cmd, markers in runs:
    seconds, lines, code = run_timed(cmd, env)
    if code:
      print('\n'.join(line for _, line in lines[-20:]), file=sys.stderr)
      raise SystemExit(f'{name}: exit status {code}')
    results.append(dict(run=name, seconds=round(seconds, 1), phases=phases(lines, markers, seconds)))
    print(f'{name}: {seconds:.1f} s  {results[-1]["phases"]}', flush=True)
  print('\n| run | wall s | phases (s) |\n|---|---|---|')
  for r in results:
    detail = ', '.join(f'{k} {v}' for k, v in r['phases'].items())
    print(f"| {r['run']} | {r['seconds']} | {detail} |")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(dict(results=results, python=sys.version.split()[0], cpus=os.cpu_count()), f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
