"""Folder evaluation behind ``eval.py``: SR every image of a folder, write PNGs, score, summarise.

Outputs in ``output_dir``: ``<input stem>.png`` per image, ``metrics.csv`` (one row per input: status,
seconds, every metric) and ``summary.json`` (means, counts, skipped inputs with reasons, settings).
Unreadable inputs are skipped with their reason; an output that already exists is kept (and scored)
unless ``overwrite``; the progress line shows an ETA.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image

from sr_jax import metrics as metrics_lib
from sr_jax.data.sources import IMAGE_EXTENSIONS, BadImageError, load_rgb
from sr_jax.inference import color_fix, one_step


@dataclasses.dataclass
class EvalOptions:
  input_dir: str
  output_dir: str
  gt_dir: str | None = None
  overwrite: bool = False
  crop_border: int = 0                                  # pixels removed per side before PSNR/SSIM
  pyiqa_metrics: Sequence[str] = tuple(metrics_lib.PYIQA_METRICS)


def list_images(folder: str) -> list[str]:
  """Image files (by extension) in ``folder``, sorted; a clear error for a missing folder."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'input folder {folder} does not exist')
  return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith('.'))


def read_rgb(path: str) -> Image.Image:
  """Any readable image (grayscale, RGBA, 16-bit, palette, EXIF-rotated) as 8-bit RGB, through the
  training loader (``sources.load_rgb``); raises ``BadImageError`` with the reason otherwise."""
  return Image.fromarray(load_rgb(path))


def find_gt(gt_dir: str, stem: str) -> str | None:
  """The ground-truth file with the same stem as the input, any image extension."""
  for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
    path = os.path.join(gt_dir, stem + ext)
    if os.path.isfile(path):
      return path
  return None


class Progress:
  """``[i/n] name  (x.x s/img, ETA m:ss)`` lines from the running mean time per processed image."""

  def __init__(self, total: int, log: Callable[[str], None]):
    self.total, self.log, self.start, self.done = total, log, time.time(), 0

  def update(self, name: str, status: str) -> None:
    self.done += 1
    per = (time.time() - self.start) / self.done
    eta = per * (self.total - self.done)
    self.log(f'[{self.done}/{self.total}] {name}: {status} ({per:.2f} s/img, '
             f'ETA {int(eta // 60)}:{int(eta % 60):02d})')


def _score(sr: np.ndarray, gt_path: str | None, options: EvalOptions,
           iqa: metrics_lib.PyiqaMetrics) -> tuple[dict, str]:
  """Pixel metrics (with GT) and the pyiqa metrics of one output; a note when GT is unusable."""
  gt, note = None, ''
  if options.gt_dir is not None:
    if gt_path is None:
      note = 'no ground truth with this name'
    else:
      try:
        gt = np.asarray(read_rgb(gt_path))
      except BadImageError as e:
        note = f'ground truth unreadable: {e}'
      if gt is not None and gt.shape != sr.shape:
        note, gt = f'ground truth is {gt.shape[1]}x{gt.shape[0]}, output {sr.shape[1]}x{sr.shape[0]}', None
  scores = metrics_lib.pixel_metrics(sr, gt, options.crop_border) if gt is not None else {}
  # Paired runs built the full-reference metrics too: they need this image's ground truth.
  if iqa.metrics and (gt is not None or options.gt_dir is None):
    scores.update(iqa.score(sr, gt))
  return scores, note


def _process(resolver: one_step.SuperResolver, path: str, out_path: str, overwrite: bool
             ) -> tuple[np.ndarray, str]:
  """SR of one input into ``out_path`` (or the kept existing output) -> (output, status)."""
  if os.path.isfile(out_path) and not overwrite:
    return np.asarray(read_rgb(out_path)), 'kept existing output'
  name = os.path.basename(path)
  out = one_step.super_resolve_image(resolver, read_rgb(path), name)
  tmp = out_path + '.tmp.png'
  out.save(tmp)
  os.replace(tmp, out_path)  # never leave a half-written PNG behind
  return np.asarray(out), 'done'


def evaluate_folder(resolver: one_step.SuperResolver, options: EvalOptions,
                    log: Callable[[str], None] = print) -> dict:
  """Runs the folder; returns (and writes) the summary."""
  paths = list_images(options.input_dir)
  os.makedirs(options.output_dir, exist_ok=True)
  paired = options.gt_dir is not None
  iqa = metrics_lib.PyiqaMetrics.create(options.pyiqa_metrics, paired=paired, log=log)
  rows, skipped = [], {}
  progress = Progress(len(paths), log)
  for path in paths:
    name = os.path.basename(path)
    stem = os.path.splitext(name)[0]
    start = time.time()
    try:
      sr, status = _process(resolver, path, os.path.join(options.output_dir, stem + '.png'),
                            options.overwrite)
    except BadImageError as e:
      skipped[name] = str(e)
      progress.update(name, f'skipped: {e}')
      continue
    seconds = time.time() - start
    gt_path = find_gt(options.gt_dir, stem) if paired else None
    scores, note = _score(sr, gt_path, options, iqa)
    rows.append({'image': name, 'status': status, 'seconds': round(seconds, 4), 'note': note,
                 **scores})
    progress.update(name, status + (f'; {note}' if note else ''))
  summary = _summarise(rows, skipped, resolver, options, iqa)
  if paired and 'fid' in iqa.metrics:
    summary['mean']['fid'] = iqa.fid(options.output_dir, options.gt_dir)
  _write_outputs(options.output_dir, rows, summary)
  return summary


def _summarise(rows: list[dict], skipped: dict, resolver: one_step.SuperResolver,
               options: EvalOptions, iqa: metrics_lib.PyiqaMetrics) -> dict:
  names = [k for row in rows for k in row if k not in ('image', 'status', 'seconds', 'note')]
  names = list(dict.fromkeys(names))
  mean = {}
  for n in names:
    values = [row[n] for row in rows if n in row and math.isfinite(row[n])]
    mean[n] = float(np.mean(values)) if values else None
  return {
      'images': len(rows), 'scored': {n: sum(n in r for r in rows) for n in names},
      'mean': mean, 'skipped_inputs': skipped, 'skipped_metrics': iqa.skipped,
      'settings': dataclasses.asdict(resolver.settings), 'devices': resolver.devices,
      'device_kind': jax.devices()[0].device_kind, 'crop_border': options.crop_border,
  }


def _write_outputs(output_dir: str, rows: list[dict], summary: dict) -> None:
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(os.path.join(output_dir, 'metrics.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns or ['image'])
    writer.writeheader()
    writer.writerows(rows)
  with open(os.path.join(output_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)


def settings_from_config(config: Any, **overrides) -> one_step.InferenceSettings:
  """``config.eval`` (see ``configs/omgsr.py``) with command-line ``overrides`` (None = keep)."""
  values = dict(config.eval) if 'eval' in config else {}
  values.update({k: v for k, v in overrides.items() if v is not None})
  if values.get('color_fix', 'adain') not in color_fix.COLOR_FIXES:
    raise ValueError(f"--color_fix must be one of {color_fix.COLOR_FIXES}, got {values['color_fix']!r}")
  return one_step.InferenceSettings(**values)
