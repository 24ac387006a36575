"""A stand-in ``torchvision`` (plain torch) for the LPIPS / DISTS reference packages, offline.

``lpips`` 0.1.4 and ``dists-pytorch`` 0.1 import torchvision at import time and take their backbones
from ``torchvision.models.vgg16(pretrained=True).features`` / ``alexnet(...).features``; torchvision
cannot be installed beside our torch pin, and ``pretrained=True`` would download. :func:`installed`
puts this module's ``torchvision``, ``torchvision.models`` and ``torchvision.transforms`` in
``sys.modules`` for the duration of a ``with`` block (import the reference packages inside it).

``vgg16(...)`` / ``alexnet(...)`` return a module whose ``features`` is torchvision's exact Sequential
(same indices, layer types and hyper-parameters). Its weights are the state dict registered with
:func:`use_weights` for that model if any, else a seeded random init (He-normal weights so features
neither vanish nor explode through 13 layers, small random biases). Nothing touches the network.
"""
from __future__ import annotations

import contextlib
import sys
import types
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn

VGG16_LAYOUT = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')

_registered: dict[str, Mapping[str, np.ndarray]] = {}
_seeds = {'vgg16': 0, 'alexnet': 1}


def vgg16_features() -> nn.Sequential:
  """torchvision ``vgg16().features``: conv 3x3 pad 1 + ReLU(inplace), MaxPool2d(2, 2) at 'M'."""
  layers: list[nn.Module] = []
  channels = 3
  for v in VGG16_LAYOUT:
    if v == 'M':
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      channels = v
  return nn.Sequential(*layers)


def alexnet_features() -> nn.Sequential:
  """torchvision ``alexnet().features``."""
  return nn.Sequential(
      nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2),
      nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
      nn.MaxPool2d(kernel_size=3, stride=2))


class _Classifier(nn.Module):
  """torchvision's model object, reduced to the ``features`` the reference packages read."""

  def __init__(self, name: str, features: nn.Sequential):
    super().__init__()
    self.features = features
    weights = _registered.get(name)
    if weights is not None:
      self.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    else:
      _random_init(self.features, _seeds[name])


def _random_init(features: nn.Sequential, seed: int) -> None:
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for layer in features:
      if isinstance(layer, nn.Conv2d):
        fan_in = layer.weight[0].numel()
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * np.sqrt(2 / fan_in))
        layer.bias.copy_(0.05 * torch.randn(layer.bias.shape, generator=generator))


def vgg16(pretrained: bool = False, weights: object = None, progress: bool = True, **kwargs) -> nn.Module:
  """torchvision ``models.vgg16`` signature; weights from :func:`use_weights` or seeded random."""
  del pretrained, weights, progress, kwargs  # never downloads: see the module docstring
  return _Classifier('vgg16', vgg16_features())


def alexnet(pretrained: bool = False, weights: object = None, progress: bool = True, **kwargs) -> nn.Module:
  """torchvision ``models.alexnet`` signature; weights from :func:`use_weights` or seeded random."""
  del pretrained, weights, progress, kwargs
  return _Classifier('alexnet', alexnet_features())


@contextlib.contextmanager
def use_weights(**state_dicts: Mapping[str, np.ndarray]) -> Iterator[None]:
  """Inside the block, ``vgg16()`` / ``alexnet()`` load these torch-layout ``features.*`` state dicts."""
  previous = dict(_registered)
  _registered.update(state_dicts)
  try:
    yield
  finally:
    _registered.clear()
    _registered.update(previous)


@contextlib.contextmanager
def installed() -> Iterator[types.ModuleType]:
  """``sys.modules['torchvision']`` (+ ``.models``, ``.transforms``) is this stand-in inside the block."""
  package = types.ModuleType('torchvision')
  models = types.ModuleType('torchvision.models')
  models.vgg16, models.alexnet = vgg16, alexnet
  transforms = types.ModuleType('torchvision.transforms')  # DISTS_pt imports it (for prepare_image)
  package.models, package.transforms = models, transforms
  names = {'torchvision': package, 'torchvision.models': models, 'torchvision.transforms': transforms}
  saved = {name: sys.modules.get(name) for name in names}
  sys.modules.update(names)
  try:
    yield package
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
