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
import os
import sys
import types

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


def make_reference_degrader(config, ref: types.SimpleNamespace | None = None):
  """The PyTorch reference of `degradations.degrade` for a preset, as OMGSR runs it per image.

  Mirrors OMGSR `dataset/realesrgan.py` `degrade_process` (basicsr kernels, `filter2D` on kernels
  zero-padded to the largest size, `F.interpolate` area/bilinear/bicubic, `random_add_*_noise_pt`,
  DiffJPEG) with the numbers of `config`. Draws from Python's `random`, numpy's and torch's global
  generators (as the reference does). Returns f(hq float32 (H, W, 3) in [0, 1]) -> lq numpy.
  """
  import math  # pylint: disable=g-import-not-at-top
  import random  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  ref = ref or load()
  torch, deg = ref.torch, ref.degradations
  interpolate, filter2d = torch.nn.functional.interpolate, ref.img_process_util.filter2D
  jpeger = ref.diffjpeg.DiffJPEG(differentiable=False)
  size_max = max(config.kernel_sizes)

  def stage_kernel(stage):
    size = random.choice(list(config.kernel_sizes))
    if np.random.uniform() < stage.sinc_prob:
      low = math.pi / 3 if size < config.sinc_size_split else math.pi / 5
      kernel = deg.circular_lowpass_kernel(np.random.uniform(low, math.pi), size, pad_to=False)
    else:
      kernel = deg.random_mixed_kernels(list(config.kernel_types), list(stage.kernel_probs), size,
                                        stage.blur_sigma, stage.blur_sigma, [-math.pi, math.pi],
                                        stage.betag_range, stage.betap_range, noise_range=None)
    pad = (size_max - size) // 2
    return torch.FloatTensor(np.pad(kernel, ((pad, pad), (pad, pad))))

  def resize_scale(stage):
    kind = random.choices(['up', 'down', 'keep'], list(stage.resize_probs))[0]
    if kind == 'up':
      return np.random.uniform(1, stage.resize_range[1])
    return np.random.uniform(stage.resize_range[0], 1) if kind == 'down' else 1.0

  def noise(out, stage):
    if np.random.uniform() < stage.gaussian_noise_prob:
      return deg.random_add_gaussian_noise_pt(out, sigma_range=stage.noise_sigma, clip=True, rounds=False,
                                              gray_prob=stage.gray_noise_prob)
    return deg.random_add_poisson_noise_pt(out, scale_range=stage.poisson_scale, gray_prob=stage.gray_noise_prob,
                                           clip=True, rounds=False)

  def jpeg(out, stage):
    quality = out.new_zeros(out.size(0)).uniform_(*stage.jpeg_quality)
    return jpeger(torch.clamp(out, 0, 1), quality=quality)

  def mode():
    return random.choice(list(config.resize_modes))

  @torch.no_grad()
  def degrade(hq):
    s1, s2, sf = config.stage1, config.stage2, config.scale
    img = torch.from_numpy(np.ascontiguousarray(hq.transpose(2, 0, 1)))[None].float()
    kernel1, kernel2 = stage_kernel(s1), stage_kernel(s2)
    if np.random.uniform() < config.final_sinc_prob:
      size = random.choice(list(config.kernel_sizes))
      sinc = torch.FloatTensor(deg.circular_lowpass_kernel(np.random.uniform(*config.final_sinc_cutoff), size,
                                                           pad_to=size_max))
    else:
      sinc = torch.zeros(size_max, size_max)
      sinc[size_max // 2, size_max // 2] = 1
    h, w = img.shape[2:]
    out = filter2d(img, kernel1)
    out = interpolate(out, scale_factor=resize_scale(s1), mode=mode())
    out = jpeg(noise(out, s1), s1)
    if np.random.uniform() < s2.blur_prob:
      out = filter2d(out, kernel2)
    scale = resize_scale(s2)
    out = interpolate(out, size=(int(h / sf * scale), int(w / sf * scale)), mode=mode())
    out = noise(out, s2)
    if np.random.uniform() < 0.5:
      out = filter2d(interpolate(out, size=(h // sf, w // sf), mode=mode()), sinc)
      out = jpeg(out, s2)
    else:
      out = jpeg(out, s2)
      out = filter2d(interpolate(out, size=(h // sf, w // sf), mode=mode()), sinc)
    if config.resize_back:
      out = interpolate(out, size=(h, w), mode=mode())
    out = torch.clamp((out * 255.0).round(), 0, 255) / 255.0
    return out[0].permute(1, 2, 0).numpy()

  return degrade
