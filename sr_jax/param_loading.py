"""Checkpoint -> Flax params leaf by leaf: checked first, then read, cast and placed one at a time.

The pieces behind `sr_jax.pretrained`'s loaders and converters (folder layouts and model kinds live
there). A :class:`CheckpointReader` holds, per Flax param path, a function that reads that leaf (or a
slice of it) in Flax layout from the checkpoint files (`sr_jax.safetensors_io.TensorSource`), after
the key names and shapes were checked against the model's abstract params: nothing is read before
the whole checkpoint is known to fit. :func:`place_params` then builds the param tree (host arrays,
or ``jax.make_array_from_callback`` per device shard), :func:`write_params` writes it as (sharded)
safetensors; both hold at most one tensor (one output shard) besides their result.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sr_jax.models import mmdit
from sr_jax.safetensors_io import (DEFAULT_MAX_SHARD_BYTES, INDEX_SUFFIX, Index, TensorSource,
                                   write_sharded)
from sr_jax.weights import (CheckpointError, plan_conversion, torch_index_for_flax,
                            torch_to_flax_array)

_log = logging.getLogger(__name__)
Path = tuple[str, ...]
LeafReader = Callable[[Index | None], np.ndarray]


@dataclasses.dataclass(frozen=True)
class CheckpointReader:
  """One checkpoint's params, not yet read.

  ``leaves``: Flax path -> reader of that leaf (``index`` None: all of it) in Flax layout and the
  stored dtype; ``shapes`` / ``dtypes``: each leaf's Flax shape and stored dtype; ``init_paths``:
  params of the model that the checkpoint does not hold and that come from the module's init (see
  :func:`absent_init_params`).
  """
  where: str
  leaves: Mapping[Path, LeafReader]
  shapes: Mapping[Path, tuple[int, ...]]
  dtypes: Mapping[Path, np.dtype]
  init_paths: tuple[Path, ...] = ()


def absent_init_params(module: Any, expected: Sequence[Path], stored_names: Sequence[str]
                       ) -> tuple[Path, ...]:
  """The params of ``module`` to take from its init because the checkpoint has none of them.

  Only DiT4SR's control params of an ``lr_branch`` SD3 model: a plain SD3 / SD3.5 checkpoint has
  none (then all come from the init); a DiT4SR checkpoint has all (then none do). Everything else
  must be in the checkpoint.
  """
  if not (isinstance(module, mmdit.SD3Transformer2DModel) and module.lr_branch):
    return ()
  if any(mmdit.is_control_param(re.split(r'[./]', name)) for name in stored_names):
    return ()  # a DiT4SR checkpoint: a missing control param is an error, named by the check
  return tuple(p for p in expected if mmdit.is_control_param(p))


def _read_torch_leaf(source: TensorSource, key: str, leaf: str, index: Index | None) -> np.ndarray:
  torch_index = None if index is None else torch_index_for_flax(index, leaf)
  return torch_to_flax_array(source.read(key, torch_index), leaf)


def torch_reader(source: TensorSource, module: Any, expected: Any, *, where: str,
                 ignore_prefixes: tuple[str, ...] = ()) -> CheckpointReader:
  """Reader of a PyTorch-layout checkpoint (torch keys and layouts) for ``module``.

  Raises:
    CheckpointError: missing / unexpected keys listed, or a shape mismatch named
      (:func:`sr_jax.weights.plan_conversion`).
  """
  flat = traverse_util.flatten_dict(expected)
  init_paths = absent_init_params(module, list(flat), list(source))
  want = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in init_paths})
  plan = plan_conversion(source.shapes(), want, ignore_prefixes=ignore_prefixes)
  leaves = {path: functools.partial(_read_torch_leaf, source, key, path[-1])
            for path, key in plan.items()}
  return CheckpointReader(where, leaves, {p: tuple(flat[p].shape) for p in plan},
                          {p: source[k].dtype for p, k in plan.items()}, init_paths)


def converted_reader(source: TensorSource, expected: Any, *, where: str, module: Any = None,
                     drop_top_level: Sequence[str] = ()) -> CheckpointReader:
  """Reader of our converted params ('/'-joined Flax paths, Flax layout) for the ``expected`` tree.

  Top-level subtrees named in ``drop_top_level`` are skipped (a VAE built with only some parts).

  Raises:
    CheckpointError: a shape mismatch named with both shapes, or missing / unexpected keys listed.
  """
  flat = {'/'.join(p): leaf for p, leaf in traverse_util.flatten_dict(expected).items()}
  init = {'/'.join(p) for p in absent_init_params(module, [tuple(k.split('/')) for k in flat],
                                                  list(source))}
  want = {k: v for k, v in flat.items() if k not in init}
  keys, unexpected = [], []
  for key, info in source.items():
    if key.split('/', 1)[0] in drop_top_level:
      continue
    if key not in want:
      unexpected.append(key)
      continue
    shape = tuple(want[key].shape)
    if info.shape != shape:
      raise CheckpointError(f'shape mismatch for {key} in {where}: stored {info.shape}, model '
                            f'expects {shape}')
    keys.append(key)
  missing = sorted(set(want) - set(keys))
  if missing or unexpected:
    raise CheckpointError(
        f'{where} does not match the model config:\n'
        f'  missing ({len(missing)}): {missing}\n  unexpected ({len(unexpected)}): {sorted(unexpected)}')
  path = lambda k: tuple(k.split('/'))
  return CheckpointReader(where, {path(k): functools.partial(source.read, k) for k in keys},
                          {path(k): source[k].shape for k in keys},
                          {path(k): source[k].dtype for k in keys},
                          tuple(path(k) for k in sorted(init)))


def converted_files_where(folder: str, files: Sequence[str], stem: str) -> str:
  """How messages name a converted folder's params: its one file, or its shard index."""
  name = os.path.basename(files[0]) if len(files) == 1 else stem + INDEX_SUFFIX
  return f'{folder}/{name}'


# ------------------------------------------------------------------------------------ placing

def cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """``array`` in ``dtype`` on the host, through float32 when both differ (as a float32 conversion
  followed by a cast would round)."""
  if array.dtype == dtype:
    return array
  return array.astype(np.float32, copy=False).astype(dtype, copy=False)


def flat_shardings(shardings: Any, expected: Any) -> dict[Path, jax.sharding.Sharding] | None:
  """Per-leaf shardings from a pytree of shardings, one ``Sharding`` for every leaf, or a ``Mesh``
  (`sr_jax.sharding.fsdp_shardings` of ``expected``); None stays None."""
  if shardings is None:
    return None
  flat = traverse_util.flatten_dict(expected)
  if isinstance(shardings, jax.sharding.Mesh):
    from sr_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
    shardings = sharding_lib.fsdp_shardings(expected, shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    return {p: shardings for p in flat}
  given = traverse_util.flatten_dict(shardings)
  missing = sorted('/'.join(p) for p in flat if p not in given)
  if missing:
    raise ValueError(f'shardings has no entry for {missing[:5]} ({len(missing)} params)')
  return given


def _place_leaf(read: LeafReader, shape: tuple[int, ...], dtype: np.dtype,
                sharding: jax.sharding.Sharding | None) -> jax.Array:
  if sharding is None:
    return jnp.asarray(cast(read(None), dtype))
  if sharding.is_fully_replicated:
    return jax.device_put(cast(read(None), dtype), sharding)
  # Each device's slice is read from the file on its own: the whole param never exists.
  return jax.make_array_from_callback(shape, sharding, lambda index: cast(read(index), dtype))


def init_params(module: Any, paths: Sequence[Path], shardings: Mapping[Path, Any] | None,
                rng: jax.Array) -> dict[Path, jax.Array]:
  """The leaves ``paths`` of ``module.init(rng, *module.dummy_inputs())`` (equal values), computed
  under one jit that returns only them: XLA drops the init of every other param."""
  names = ['/'.join(p) for p in paths]

  def init(key):
    flat = traverse_util.flatten_dict(module.init(key, *module.dummy_inputs())['params'], sep='/')
    return {n: flat[n] for n in names}

  out = None if shardings is None else {n: shardings[p] for n, p in zip(names, paths)}
  values = jax.jit(init, out_shardings=out)(rng)
  return {tuple(n.split('/')): values[n] for n in names}


def place_params(reader: CheckpointReader, expected: Any, param_dtype: Any, *,
                 shardings: Any = None, module: Any = None, init_rng: jax.Array | None = None
                 ) -> dict:
  """The param tree: every leaf read, cast to ``param_dtype`` and placed, one leaf at a time; the
  reader's ``init_paths`` from ``module``'s init with ``init_rng`` (default ``jax.random.key(0)``)."""
  flat = traverse_util.flatten_dict(expected)
  per_leaf = flat_shardings(shardings, expected)
  storage = np.dtype(param_dtype)
  out = {path: _place_leaf(read, tuple(flat[path].shape), storage,
                           None if per_leaf is None else per_leaf[path])
         for path, read in reader.leaves.items()}
  if reader.init_paths:
    _log.info('%s has none of the %d DiT4SR control params: initialised as the module does',
              reader.where, len(reader.init_paths))
    rng = jax.random.key(0) if init_rng is None else init_rng
    out.update(init_params(module, reader.init_paths, per_leaf, rng))
  return traverse_util.unflatten_dict(out)


def write_params(folder: str, stem: str, reader: CheckpointReader, dtype: Any | None, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> int:
  """Writes the reader's params under '/'-joined Flax paths, each leaf in ``dtype`` (None: its
  stored dtype), sharded as `sr_jax.safetensors_io.write_sharded` does; returns the param count.

  Raises:
    CheckpointError: the reader has params to initialise (a converted folder holds a checkpoint).
  """
  if reader.init_paths:
    raise CheckpointError(f'{reader.where} lacks {len(reader.init_paths)} params; a converted '
                          'folder holds only what the checkpoint has')
  storage = {'/'.join(p): np.dtype(dtype) if dtype is not None else reader.dtypes[p]
             for p in reader.leaves}
  entries = [(name, reader.shapes[tuple(name.split('/'))], storage[name]) for name in storage]
  produce = lambda name: cast(reader.leaves[tuple(name.split('/'))](None), storage[name])
  write_sharded(folder, stem, entries, produce, max_shard_bytes=max_shard_bytes)
  return int(sum(np.prod(shape, dtype=np.int64) for _, shape, _ in entries))
