"""Loads the PyTorch reference (basicsr 1.4.2) degradation functions for parity tests and benchmarks.

Never imported by the training path. `load()` returns None (and `reason()` says why) when basicsr or torch
is absent. basicsr's package `__init__` imports torchvision and its whole model zoo, so only the three
files we compare against are executed, each on its own from its path:
  basicsr/data/degradations.py      kernels, noise (`random_add_*_noise_pt`)
  basicsr/utils/img_process_util.py `filter2D` (torch conv with reflect padding)
  basicsr/utils/diffjpeg.py         `DiffJPEG`
degradations.py imports `torchvision.transforms.functional_tensor.rgb_to_grayscale`, which torchvision
removed in 0.17 (and torchvision is not installed beside our pinned torch): while that file executes, a
stand-in module with the same three-weight formula is placed in `sys.modules` and removed afterwards.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import random
import sys
import types

import numpy as np

_FILES = {
    'degradations': ('data', 'degradations.py'),
    'img_process_util': ('utils', 'img_process_util.py'),
    'diffjpeg': ('utils', 'diffjpeg.py'),
}
_SHIM_NAMES = ('torchvision', 'torchvision.transforms', 'torchvision.transforms.functional_tensor')
_cache: dict[str, object] = {}


def _rgb_to_grayscale(img, num_output_channels: int = 1):
  """torchvision's formula: 0.2989 R + 0.587 G + 0.114 B, repeated to `num_output_channels`."""
  r, g, b = img.unbind(dim=-3)
  gray = (0.2989 * r + 0.587 * g + 0.114 * b).to(img.dtype).unsqueeze(dim=-3)
  if num_output_channels == 3:
    return gray.expand(img.shape)
  return gray


@contextlib.contextmanager
def _functional_tensor_shim():
  """Temporarily provides `torchvision.transforms.functional_tensor` (only names not importable)."""
  added = []
  try:
    have_torchvision = importlib.util.find_spec('torchvision') is not None
  except (ImportError, ValueError):
    have_torchvision = False
  names = _SHIM_NAMES[2:] if have_torchvision else _SHIM_NAMES
  for name in names:
    if name not in sys.modules:
      module = types.ModuleType(name)
      module.rgb_to_grayscale = _rgb_to_grayscale
      sys.modules[name] = module
      added.append(name)
  try:
    yield
  finally:
    for name in added:
      sys.modules.pop(name, None)


def _load_file(name: str, path: str) -> types.ModuleType:
  spec = importlib.util.spec_from_file_location(f'_sr_jax_basicsr_ref_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load() -> types.SimpleNamespace | None:
  """Namespace with `degradations`, `img_process_util`, `diffjpeg`, `torch`; None if unavailable."""
  if 'ns' in _cache:
    return _cache['ns']
  namespace = None
  try:
    import torch  # pylint: disable=g-import-not-at-top
    spec = importlib.util.find_spec('basicsr')
    if spec is None or not spec.submodule_search_locations:
      raise ImportError('basicsr is not installed (pip install --no-deps basicsr==1.4.2)')
    root = list(spec.submodule_search_locations)[0]
    modules = {}
    with _functional_tensor_shim():
      for name, (folder, filename) in _FILES.items():
        modules[name] = _load_file(name, os.path.join(root, folder, filename))
    namespace = types.SimpleNamespace(torch=torch, **modules)
    _cache['reason'] = ''
  except Exception as e:  # pylint: disable=broad-except  # any failure means: no reference here
    _cache['reason'] = f'basicsr reference unavailable: {type(e).__name__}: {e}'
  _cache['ns'] = namespace
  return namespace


def reason() -> str:
  """Why `load()` returned None ('' if it did not)."""
  load()
  return str(_cache.get('reason', ''))


class _ReferenceDegrader:
  """OMGSR's `degrade_process` with basicsr's functions and torch, for one preset (see below)."""

  def __init__(self, config, ref: types.SimpleNamespace):
    self.config, self.ref, self.torch = config, ref, ref.torch
    self.interpolate = ref.torch.nn.functional.interpolate
    self.filter2d = ref.img_process_util.filter2D
    self.jpeger = ref.diffjpeg.DiffJPEG(differentiable=False)
    self.size_max = max(config.kernel_sizes)

  def stage_kernel(self, stage):
    config, deg = self.config, self.ref.degradations
    size = random.choice(list(config.kernel_sizes))
    if np.random.uniform() < stage.sinc_prob:
      low = math.pi / 3 if size < config.sinc_size_split else math.pi / 5
      kernel = deg.circular_lowpass_kernel(np.random.uniform(low, math.pi), size, pad_to=False)
    else:
      kernel = deg.random_mixed_kernels(list(config.kernel_types), list(stage.kernel_probs), size,
                                        stage.blur_sigma, stage.blur_sigma, [-math.pi, math.pi],
                                        stage.betag_range, stage.betap_range, noise_range=None)
    pad = (self.size_max - size) // 2
    return self.torch.FloatTensor(np.pad(kernel, ((pad, pad), (pad, pad))))

  def final_sinc(self):
    config, size_max = self.config, self.size_max
    if np.random.uniform() < config.final_sinc_prob:
      size = random.choice(list(config.kernel_sizes))
      cutoff = np.random.uniform(*config.final_sinc_cutoff)
      return self.torch.FloatTensor(self.ref.degradations.circular_lowpass_kernel(cutoff, size, pad_to=size_max))
    pulse = self.torch.zeros(size_max, size_max)
    pulse[size_max // 2, size_max // 2] = 1
    return pulse

  def resize(self, out, size=None, scale=None):
    mode = random.choice(list(self.config.resize_modes))
    return self.interpolate(out, size=size, scale_factor=scale, mode=mode)

  @staticmethod
  def resize_scale(stage) -> float:
    kind = random.choices(['up', 'down', 'keep'], list(stage.resize_probs))[0]
    if kind == 'up':
      return np.random.uniform(1, stage.resize_range[1])
    return np.random.uniform(stage.resize_range[0], 1) if kind == 'down' else 1.0

  def noise(self, out, stage):
    deg = self.ref.degradations
    if np.random.uniform() < stage.gaussian_noise_prob:
      return deg.random_add_gaussian_noise_pt(out, sigma_range=stage.noise_sigma, clip=True, rounds=False,
                                              gray_prob=stage.gray_noise_prob)
    return deg.random_add_poisson_noise_pt(out, scale_range=stage.poisson_scale, gray_prob=stage.gray_noise_prob,
                                           clip=True, rounds=False)

  def jpeg(self, out, stage):
    quality = out.new_zeros(out.size(0)).uniform_(*stage.jpeg_quality)
    return self.jpeger(self.torch.clamp(out, 0, 1), quality=quality)

  def __call__(self, hq):
    with self.torch.no_grad():
      config, s1, s2, sf = self.config, self.config.stage1, self.config.stage2, self.config.scale
      img = self.torch.from_numpy(np.ascontiguousarray(hq.transpose(2, 0, 1)))[None].float()
      kernel1, kernel2, sinc = self.stage_kernel(s1), self.stage_kernel(s2), self.final_sinc()
      h, w = img.shape[2:]
      out = self.resize(self.filter2d(img, kernel1), scale=self.resize_scale(s1))
      out = self.jpeg(self.noise(out, s1), s1)
      if np.random.uniform() < s2.blur_prob:
        out = self.filter2d(out, kernel2)
      scale = self.resize_scale(s2)
      out = self.noise(self.resize(out, size=(int(h / sf * scale), int(w / sf * scale))), s2)
      if np.random.uniform() < 0.5:
        out = self.jpeg(self.filter2d(self.resize(out, size=(h // sf, w // sf)), sinc), s2)
      else:
        out = self.filter2d(self.resize(self.jpeg(out, s2), size=(h // sf, w // sf)), sinc)
      if config.resize_back:
        out = self.resize(out, size=(h, w))
      out = self.torch.clamp((out * 255.0).round(), 0, 255) / 255.0
      return out[0].permute(1, 2, 0).numpy()


def make_reference_degrader(config, ref: types.SimpleNamespace | None = None):
  """The PyTorch reference of `degradations.degrade` for a preset, as OMGSR runs it per image.

  Mirrors OMGSR `dataset/realesrgan.py` `degrade_process` (basicsr kernels, `filter2D` on kernels
  zero-padded to the largest size, `F.interpolate` area/bilinear/bicubic, `random_add_*_noise_pt`,
  DiffJPEG) with the numbers of `config`. Draws from Python's `random`, numpy's and torch's global
  generators (as the reference does). Returns f(hq float32 (H, W, 3) in [0, 1]) -> lq numpy.
  """
  return _ReferenceDegrader(config, ref or load())
