"""PyTorch state dicts <-> Flax param trees, read with numpy (no torch at run time).

The naming convention every sr_jax model follows, so that conversion is mechanical:

* A Flax module is named after the PyTorch attribute it mirrors; list indices are joined to the list
  name with an underscore. Torch key ``down_blocks.0.resnets.1.conv1.weight`` is Flax path
  ``('down_blocks_0', 'resnets_1', 'conv1', 'kernel')``; ``to_out.0.bias`` is ``('to_out_0', 'bias')``.
* Leaves: a Linear ``weight`` (out, in) is a Dense ``kernel`` (in, out); a Conv2d ``weight``
  (O, I/groups, kh, kw) is a Conv ``kernel`` (kh, kw, I/groups, O); a norm ``weight`` (C,) is ``scale``;
  ``bias`` stays ``bias``; any other parameter (e.g. ConvNeXt ``gamma``) keeps its name and shape.

Conversion is driven by the *expected* tree (from ``jax.eval_shape`` of the Flax init), so a checkpoint
that does not fit the config fails with every missing and unexpected key listed, and a shape mismatch
names the key and both shapes.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file as _load_safetensors_numpy

SAFETENSORS_INDEX_SUFFIX = '.safetensors.index.json'


class CheckpointError(ValueError):
  """A checkpoint does not match what the model config expects (the message names the keys)."""


def torch_key_to_flax_path(key: str, value_ndim: int) -> tuple[str, ...]:
  """Maps a PyTorch state-dict key to the Flax param path of our models (see module docstring)."""
  parts: list[str] = []
  for token in key.split('.'):
    if token.isdigit() and parts:
      parts[-1] = f'{parts[-1]}_{token}'
    else:
      parts.append(token)
  leaf = parts[-1]
  if leaf == 'weight':
    parts[-1] = 'kernel' if value_ndim >= 2 else 'scale'
  return tuple(parts)


def flax_path_to_torch_key(path: Iterable[str]) -> str:
  """Inverse of :func:`torch_key_to_flax_path` for paths whose names do not end in ``_<digits>``
  unless that suffix is a list index (true for every LoRA target module and its parents)."""
  parts = list(path)
  if parts[-1] in ('kernel', 'scale'):
    parts[-1] = 'weight'
  return '.'.join(re.sub(r'_(\d+)$', r'.\1', p) for p in parts)


def torch_to_flax_array(value: np.ndarray, flax_leaf: str) -> np.ndarray:
  """Transposes one PyTorch tensor into the Flax layout (Linear and Conv2d kernels)."""
  if flax_leaf == 'kernel' and value.ndim == 2:
    return value.T
  if flax_leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value


def flax_to_torch_array(value: np.ndarray, flax_leaf: str) -> np.ndarray:
  """Inverse of :func:`torch_to_flax_array`."""
  if flax_leaf == 'kernel' and value.ndim == 2:
    return value.T
  if flax_leaf == 'kernel' and value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  return value


def _shape_of(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, 'shape', np.shape(leaf)))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], expected_params: Any, *,
                       ignore_prefixes: tuple[str, ...] = (), dtype: Any = np.float32) -> dict:
  """Builds a Flax param tree from a PyTorch state dict.

  Args:
    state_dict: torch key -> numpy array.
    expected_params: the Flax param tree (arrays or ``jax.ShapeDtypeStruct``) that the model expects.
    ignore_prefixes: torch keys starting with one of these are dropped silently (e.g. a VAE decoder
      when only the encoder is built).
    dtype: dtype of the returned arrays.

  Raises:
    CheckpointError: listing missing and unexpected keys, or naming a key whose shape differs.
  """
  expected = traverse_util.flatten_dict(expected_params)
  converted, unexpected = {}, []
  for key, value in state_dict.items():
    if any(key.startswith(p) for p in ignore_prefixes):
      continue
    path = torch_key_to_flax_path(key, np.ndim(value))
    if path not in expected:
      unexpected.append(key)
      continue
    array = torch_to_flax_array(np.asarray(value), path[-1])
    want = _shape_of(expected[path])
    if array.shape != want:
      raise CheckpointError(
          f'shape mismatch for {key}: checkpoint {tuple(np.shape(value))} -> {array.shape} in Flax '
          f'layout, model expects {want} at {"/".join(path)}')
    converted[path] = array.astype(dtype)
  missing = [flax_path_to_torch_key(p) for p in expected if p not in converted]
  if missing or unexpected:
    raise CheckpointError(
        'checkpoint keys do not match the model config:\n'
        f'  missing ({len(missing)}): {sorted(missing)}\n'
        f'  unexpected ({len(unexpected)}): {sorted(unexpected)}')
  return traverse_util.unflatten_dict(converted)


def flax_to_state_dict(params: Any) -> dict[str, np.ndarray]:
  """Flax param tree -> PyTorch-layout state dict (the inverse of :func:`convert_state_dict`)."""
  return {flax_path_to_torch_key(path): np.ascontiguousarray(flax_to_torch_array(np.asarray(v), path[-1]))
          for path, v in traverse_util.flatten_dict(params).items()}


def find_weight_files(folder: str, stem: str, *, allow_pickle: bool = False) -> list[str]:
  """Returns the weight files of a model folder in the hub layout.

  Looks for ``{stem}.safetensors``, then a sharded ``{stem}.safetensors.index.json``; a pickle
  ``{stem}.bin`` is accepted only with ``allow_pickle`` because unpickling runs arbitrary code.
  """
  single = os.path.join(folder, stem + '.safetensors')
  if os.path.isfile(single):
    return [single]
  index = os.path.join(folder, stem + SAFETENSORS_INDEX_SUFFIX)
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    files = [os.path.join(folder, s) for s in shards]
    for shard in files:
      if not os.path.isfile(shard):
        raise FileNotFoundError(f'{index} lists {shard}, which does not exist')
    return files
  pickle_file = os.path.join(folder, stem + '.bin')
  if os.path.isfile(pickle_file):
    if not allow_pickle:
      raise CheckpointError(
          f'{folder} holds only the pickle file {os.path.basename(pickle_file)}; loading pickles runs '
          'arbitrary code, so it is refused unless you pass --allow-pickle (allow_pickle=True)')
    return [pickle_file]
  raise FileNotFoundError(
      f'no weights in {folder}: expected {stem}.safetensors or {stem}{SAFETENSORS_INDEX_SUFFIX}')


def read_state_dict(files: list[str]) -> dict[str, np.ndarray]:
  """Reads safetensors (with numpy) or, for files already allowed by :func:`find_weight_files`,
  a torch pickle (needs torch installed)."""
  state: dict[str, np.ndarray] = {}
  for path in files:
    if path.endswith('.safetensors'):
      state.update(_load_safetensors_numpy(path))
    else:
      import torch  # only for explicitly allowed pickle checkpoints
      loaded = torch.load(path, map_location='cpu', weights_only=True)
      state.update({k: v.float().numpy() if v.is_floating_point() else v.numpy()
                    for k, v in loaded.items()})
  return state
