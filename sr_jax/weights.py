"""PyTorch state dicts <-> Flax param trees, read with numpy (no torch at run time).

The naming convention every sr_jax model follows, so that conversion is mechanical:

* A Flax module is named after the PyTorch attribute it mirrors; list indices are joined to the list
  name with an underscore. Torch key ``down_blocks.0.resnets.1.conv1.weight`` is Flax path
  ``('down_blocks_0', 'resnets_1', 'conv1', 'kernel')``; ``to_out.0.bias`` is ``('to_out_0', 'bias')``.
  Some real attribute names end in ``_<digits>`` too (``time_embedding.linear_1``), so the way back
  (Flax -> PyTorch) needs to know which is which: :data:`LIST_MODULE_NAMES` are the PyTorch lists of
  the models we mirror, :data:`DIGIT_SUFFIX_NAMES` the attributes whose digits are part of the name,
  and any other ``<name>_<digits>`` raises :class:`UnmappableNameError` rather than guess.
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
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file as _load_safetensors_numpy

SAFETENSORS_INDEX_SUFFIX = '.safetensors.index.json'


# PyTorch ``nn.ModuleList`` / ``nn.Sequential`` attributes of the models we mirror (diffusers
# UNet2DConditionModel, AutoencoderKL, SD3Transformer2DModel and FluxTransformer2DModel, transformers
# DINOv3ConvNextModel and DINOv3ViTModel):
# ``<name>_<i>`` in Flax is item ``i`` of the list, torch ``<name>.<i>``.
LIST_MODULE_NAMES = frozenset({
    'down_blocks', 'up_blocks', 'resnets', 'attentions', 'transformer_blocks', 'downsamplers',
    'upsamplers', 'to_out', 'net',                      # diffusers UNet / VAE
    'stages', 'downsample_layers', 'layers',            # transformers DINOv3-ConvNeXt
    'layer',                                            # transformers DINOv3-ViT (`model.layer`)
    'features', 'model',                                # torchvision VGG16 / AlexNet, LPIPS heads
    'single_transformer_blocks',                        # diffusers FluxTransformer2DModel
})
# Attributes whose ``_<digits>`` is part of the PyTorch name: diffusers ``TimestepEmbedding.linear_1``
# and ``linear_2`` (the UNet's time embedding, and its class / addition embeddings).
DIGIT_SUFFIX_NAMES = frozenset({'linear_1', 'linear_2'})
_DIGIT_SUFFIX = re.compile(r'(.+)_(\d+)')
assert not {_DIGIT_SUFFIX.fullmatch(n).group(1) for n in DIGIT_SUFFIX_NAMES} & LIST_MODULE_NAMES


class CheckpointError(ValueError):
  """A checkpoint does not match what the model config expects (the message names the keys)."""


class UnmappableNameError(ValueError):
  """A Flax path has a ``<name>_<digits>`` module that is neither a known list item nor a known
  digit-suffixed attribute, so its PyTorch key would be a guess."""


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


def _torch_name(part: str, path: tuple[str, ...]) -> str:
  """One Flax module name -> its dotted PyTorch form (``resnets_1`` -> ``resnets.1``)."""
  found = _DIGIT_SUFFIX.fullmatch(part)
  if found is None or part in DIGIT_SUFFIX_NAMES:
    return part
  if found.group(1) in LIST_MODULE_NAMES:
    return f'{found.group(1)}.{found.group(2)}'
  raise UnmappableNameError(
      f'cannot map Flax path {"/".join(path)} to a PyTorch key: is {part!r} item {found.group(2)} '
      f'of a list {found.group(1)!r} or an attribute named {part!r}? Add it to '
      'sr_jax.weights.LIST_MODULE_NAMES or DIGIT_SUFFIX_NAMES')


def flax_path_to_torch_key(path: Iterable[str]) -> str:
  """Inverse of :func:`torch_key_to_flax_path`: exact for the models we mirror (see module docstring).

  Raises:
    UnmappableNameError: naming the path, for a ``<name>_<digits>`` module that is in neither
      :data:`LIST_MODULE_NAMES` nor :data:`DIGIT_SUFFIX_NAMES`.
  """
  path = tuple(path)
  parts = [_torch_name(p, path) for p in path]
  if parts[-1] in ('kernel', 'scale'):
    parts[-1] = 'weight'
  return '.'.join(parts)


def torch_to_flax_array(value: np.ndarray, flax_leaf: str) -> np.ndarray:
  """Transposes one PyTorch tensor into the Flax layout (Linear and Conv2d kernels)."""
  if flax_leaf == 'kernel' and value.ndim == 2:
    return value.T
  if flax_leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value


def _flax_to_torch_axes(ndim: int, flax_leaf: str) -> tuple[int, ...] | None:
  """The transpose taking a Flax leaf to the PyTorch layout (None: the layouts agree)."""
  if flax_leaf == 'kernel' and ndim == 2:
    return (1, 0)
  if flax_leaf == 'kernel' and ndim == 4:
    return (3, 2, 0, 1)
  return None


def flax_to_torch_array(value: np.ndarray, flax_leaf: str) -> np.ndarray:
  """Inverse of :func:`torch_to_flax_array`."""
  axes = _flax_to_torch_axes(value.ndim, flax_leaf)
  return value if axes is None else value.transpose(axes)


def _shape_of(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, 'shape', np.shape(leaf)))


def torch_to_flax_shape(shape: Sequence[int], flax_leaf: str) -> tuple[int, ...]:
  """The shape :func:`torch_to_flax_array` gives a tensor of ``shape``."""
  shape = tuple(int(n) for n in shape)
  axes = _flax_to_torch_axes(len(shape), flax_leaf)
  if axes is None:
    return shape
  back = tuple(int(a) for a in np.argsort(axes))  # the inverse permutation: torch -> Flax
  return tuple(shape[a] for a in back)


def torch_index_for_flax(index: tuple[slice, ...], flax_leaf: str) -> tuple[slice, ...]:
  """The index of a torch-layout tensor that holds the elements of ``flax_array[index]``, so that a
  device's shard of a Flax param is read from the checkpoint without reading the rest:
  ``torch_to_flax_array(torch_value[torch_index_for_flax(i, leaf)], leaf) == flax_value[i]``."""
  axes = _flax_to_torch_axes(len(index), flax_leaf)
  return index if axes is None else tuple(index[a] for a in axes)


def plan_conversion(shapes: Mapping[str, Sequence[int]], expected_params: Any, *,
                    ignore_prefixes: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
  """Checks a checkpoint's keys and shapes (no values needed) against the expected Flax tree.

  Args:
    shapes: torch key -> tensor shape (e.g. from safetensors headers).
    expected_params: the Flax param tree (arrays or ``jax.ShapeDtypeStruct``) the model expects.
    ignore_prefixes: torch keys starting with one of these are dropped silently.

  Returns:
    Flax path -> torch key, for every expected param.

  Raises:
    CheckpointError: listing missing and unexpected keys, or naming a key whose shape differs.
  """
  expected = traverse_util.flatten_dict(expected_params)
  plan, unexpected = {}, []
  for key, shape in shapes.items():
    if any(key.startswith(p) for p in ignore_prefixes):
      continue
    path = torch_key_to_flax_path(key, len(shape))
    if path not in expected:
      unexpected.append(key)
      continue
    flax_shape, want = torch_to_flax_shape(shape, path[-1]), _shape_of(expected[path])
    if flax_shape != want:
      raise CheckpointError(
          f'shape mismatch for {key}: checkpoint {tuple(shape)} -> {flax_shape} in Flax '
          f'layout, model expects {want} at {"/".join(path)}')
    plan[path] = key
  missing = [_key_for_message(p) for p in expected if p not in plan]
  if missing or unexpected:
    raise CheckpointError(
        'checkpoint keys do not match the model config:\n'
        f'  missing ({len(missing)}): {sorted(missing)}\n'
        f'  unexpected ({len(unexpected)}): {sorted(unexpected)}')
  return plan


def convert_state_dict(state_dict: Mapping[str, np.ndarray], expected_params: Any, *,
                       ignore_prefixes: tuple[str, ...] = (), dtype: Any = np.float32) -> dict:
  """Builds a Flax param tree from a PyTorch state dict (checked by :func:`plan_conversion`).

  Args:
    state_dict: torch key -> numpy array.
    expected_params: the Flax param tree (arrays or ``jax.ShapeDtypeStruct``) that the model expects.
    ignore_prefixes: torch keys starting with one of these are dropped silently (e.g. a VAE decoder
      when only the encoder is built).
    dtype: dtype of the returned arrays.

  Raises:
    CheckpointError: listing missing and unexpected keys, or naming a key whose shape differs.
  """
  plan = plan_conversion({k: np.shape(v) for k, v in state_dict.items()}, expected_params,
                         ignore_prefixes=ignore_prefixes)
  return traverse_util.unflatten_dict({
      path: torch_to_flax_array(np.asarray(state_dict[key]), path[-1]).astype(dtype)
      for path, key in plan.items()})


def _key_for_message(path: tuple[str, ...]) -> str:
  try:
    return flax_path_to_torch_key(path)
  except UnmappableNameError:
    return '/'.join(path)


def _torch_keys(params: Any) -> dict[str, tuple[tuple[str, ...], Any]]:
  """torch key -> (Flax path, leaf) for every leaf of ``params``; two paths on one key raise."""
  keys: dict[str, tuple[tuple[str, ...], Any]] = {}
  for path, leaf in traverse_util.flatten_dict(params).items():
    key = flax_path_to_torch_key(path)
    if key in keys:
      raise UnmappableNameError(f'Flax paths {"/".join(keys[key][0])} and {"/".join(path)} both '
                                f'map to the PyTorch key {key}')
    keys[key] = (path, leaf)
  return keys


def flax_to_state_dict(params: Any) -> dict[str, np.ndarray]:
  """Flax param tree -> PyTorch-layout state dict (the inverse of :func:`convert_state_dict`).

  Raises:
    UnmappableNameError: a path whose PyTorch key would be a guess, or two paths on one key.
  """
  return {key: np.ascontiguousarray(flax_to_torch_array(np.asarray(leaf), path[-1]))
          for key, (path, leaf) in _torch_keys(params).items()}


def flax_to_torch_shapes(params: Any) -> dict[str, tuple[int, ...]]:
  """The keys and shapes :func:`flax_to_state_dict` gives, for any tree with shaped leaves (e.g. the
  ``jax.ShapeDtypeStruct`` tree of ``jax.eval_shape``): checks a full-size mapping without weights."""
  out = {}
  for key, (path, leaf) in _torch_keys(params).items():
    shape = _shape_of(leaf)
    axes = _flax_to_torch_axes(len(shape), path[-1])
    out[key] = shape if axes is None else tuple(shape[a] for a in axes)
  return out


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
