"""Folder evaluation behind ``eval.py``: SR every image of a folder, write PNGs, score, summarise.

Outputs in ``output_dir``: ``<input stem>.png`` per image, ``metrics.csv`` (one row per input:
status, seconds, every metric; skipped inputs with their reason) and ``summary.json`` (means, counts,
skipped inputs, what made the outputs), both rewritten after every image so an interrupted run keeps
its scores. Every PNG records what made it (:func:`provenance`: method, checkpoint, step, settings)
in a text chunk; an existing output is kept (and scored) only when that record matches the current
run, and redone otherwise (``overwrite`` redoes it anyway). The progress line shows an ETA.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from typing import Callable, Sequence

import jax
import numpy as np
from PIL import Image, PngImagePlugin

from sr_jax import metrics as metrics_lib
from sr_jax.data.sources import IMAGE_EXTENSIONS, BadImageError, load_rgb
from sr_jax.inference import pipeline


@dataclasses.dataclass
class EvalOptions:
  input_dir: str
  output_dir: str
  gt_dir: str | None = None
  overwrite: bool = False
  crop_border: int = 0                                  # pixels removed per side before PSNR/SSIM
  pyiqa_metrics: Sequence[str] = tuple(metrics_lib.PYIQA_METRICS)
  perceptual_weights: str | None = None                 # convert_weights perceptual --out DIR


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


class InImageProgress:
  """Progress inside one image: ``  name: VAE decoder 120/658 (ETA 1:05)`` lines, at most one per
  ``interval`` seconds (a small image prints none), from the tiled pipeline's device calls."""

  def __init__(self, name: str, log: Callable[[str], None], interval: float = 10.0):
    self.name, self.log, self.interval = name, log, interval
    self.phase, self.phase_start, self.last = None, time.time(), time.time()

  def __call__(self, phase: str, done: int, total: int) -> None:
    now = time.time()
    if phase != self.phase:
      self.phase, self.phase_start = phase, now
    if now - self.last < self.interval and done < total:
      return
    if now - self.last >= self.interval:
      eta = (now - self.phase_start) / max(done, 1) * (total - done)
      self.log(f'  {self.name}: {phase} {done}/{total} (ETA {int(eta // 60)}:{int(eta % 60):02d})')
      self.last = now


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
           iqa: metrics_lib.PyiqaMetrics, perceptual: metrics_lib.PerceptualMetrics | None
           ) -> tuple[dict, str]:
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
  if perceptual is not None and gt is not None:
    scores.update(perceptual.score(sr, gt))
  # Paired runs built the full-reference metrics too: they need this image's ground truth.
  if iqa.metrics and (gt is not None or options.gt_dir is None):
    scores.update(iqa.score(sr, gt))
  return scores, note


PROVENANCE_KEY = 'sr_jax'  # the PNG text chunk that records what made an output


def provenance(resolver: pipeline.SuperResolver) -> dict:
  """What made an output: the generator's source (method, checkpoint, kind, step) and settings."""
  source = dict(resolver.generator.source)
  if 'checkpoint' in source:
    source['checkpoint'] = os.path.abspath(source['checkpoint'])
  return {'generator': source, 'settings': dataclasses.asdict(resolver.settings),
          'stages': [{'name': st.name, 'upscale': st.upscale, 'process_size': st.process_size}
                     for st in resolver.generator.stages]}


def _made_by(path: str) -> dict | None:
  try:
    with Image.open(path) as image:
      text = image.info.get(PROVENANCE_KEY)
    return json.loads(text) if text else None
  except (OSError, ValueError):
    return None


def _process(resolver: pipeline.SuperResolver, path: str, out_path: str, overwrite: bool,
             record: dict) -> tuple[np.ndarray, str]:
  """SR of one input into ``out_path`` (or the kept existing output) -> (output, status)."""
  status = 'done'
  if os.path.isfile(out_path) and not overwrite:
    if _made_by(out_path) == record:
      return np.asarray(read_rgb(out_path)), 'kept existing output'
    status = 'redone: the existing output was made by another model or settings'
  name = os.path.basename(path)
  out = pipeline.super_resolve_image(resolver, read_rgb(path), name)
  info = PngImagePlugin.PngInfo()
  info.add_text(PROVENANCE_KEY, json.dumps(record, sort_keys=True))
  tmp = out_path + '.tmp.png'
  out.save(tmp, pnginfo=info)
  os.replace(tmp, out_path)  # never leave a half-written PNG behind
  return np.asarray(out), status


def evaluate_folder(resolver: pipeline.SuperResolver, options: EvalOptions,
                    log: Callable[[str], None] = print) -> dict:
  """Runs the folder; returns (and writes) the summary."""
  paths = list_images(options.input_dir)
  if not paths:
    log(f'warning: no images in {options.input_dir} ({"/".join(IMAGE_EXTENSIONS)})')
  os.makedirs(options.output_dir, exist_ok=True)
  paired = options.gt_dir is not None
  perceptual = None
  pyiqa_names = list(options.pyiqa_metrics)
  if options.perceptual_weights and paired:
    perceptual = metrics_lib.PerceptualMetrics.create(options.perceptual_weights)
    pyiqa_names = [n for n in pyiqa_names if n not in metrics_lib.PERCEPTUAL_METRICS]
    log(f'LPIPS (alex, vgg) and DISTS in JAX with the weights in {options.perceptual_weights}')
  iqa = metrics_lib.PyiqaMetrics.create(pyiqa_names, paired=paired, log=log)
  record = provenance(resolver)
  rows, skipped = [], {}
  progress = Progress(len(paths), log)
  for path in paths:
    name = os.path.basename(path)
    stem = os.path.splitext(name)[0]
    start = time.time()
    resolver.progress, resolver.log = InImageProgress(name, log), log
    try:
      sr, status = _process(resolver, path, os.path.join(options.output_dir, stem + '.png'),
                            options.overwrite, record)
    except BadImageError as e:
      skipped[name] = str(e)
      rows.append({'image': name, 'status': f'skipped: {e}'})
      progress.update(name, f'skipped: {e}')
      _write_outputs(options.output_dir, rows, _summarise(rows, skipped, resolver, options, iqa))
      continue
    seconds = time.time() - start
    gt_path = find_gt(options.gt_dir, stem) if paired else None
    scores, note = _score(sr, gt_path, options, iqa, perceptual)
    rows.append({'image': name, 'status': status, 'seconds': round(seconds, 4), 'note': note,
                 **scores})
    progress.update(name, status + (f'; {note}' if note else ''))
    _write_outputs(options.output_dir, rows, _summarise(rows, skipped, resolver, options, iqa))
  summary = _summarise(rows, skipped, resolver, options, iqa)
  if paired and 'fid' in iqa.metrics:
    summary['mean']['fid'] = iqa.fid(options.output_dir, options.gt_dir)
  _write_outputs(options.output_dir, rows, summary)
  return summary


def _summarise(rows: list[dict], skipped: dict, resolver: pipeline.SuperResolver,
               options: EvalOptions, iqa: metrics_lib.PyiqaMetrics) -> dict:
  names = [k for row in rows for k in row if k not in ('image', 'status', 'seconds', 'note')]
  names = list(dict.fromkeys(names))
  mean = {}
  for n in names:
    values = [row[n] for row in rows if n in row and math.isfinite(row[n])]
    mean[n] = float(np.mean(values)) if values else None
  return {
      'images': len(rows) - len(skipped), 'scored': {n: sum(n in r for r in rows) for n in names},
      'mean': mean, 'skipped_inputs': skipped, 'skipped_metrics': iqa.skipped,
      **provenance(resolver), 'devices': resolver.devices,
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
