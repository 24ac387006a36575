"""Safetensors checkpoints read and written one tensor at a time, so that memory stays bounded.

FLUX.1-dev's transformer is 23.8 GB in bfloat16 (next-methods.md Sec. 6); converting or loading it on
a 24 GiB machine must never hold the whole tree, nor two copies of it.

Reading: a :class:`TensorSource` maps tensor names to tensors in safetensors files without reading
them (shapes and dtypes come from the file headers). :meth:`TensorSource.read` opens the file, copies
one tensor, or one slice of it (a device's shard of an FSDP-split parameter), and closes the file
again. Closing matters: safetensors memory-maps the file, and every page of a mapping that stays
open counts in the process's resident set until it is closed, so reading a whole shard through one
open handle would make the peak resident set as large as the shard (`benchmarks/convert_rss.py`
measures the peak). Pickles (``.bin``, only where the caller allowed them) are read whole with torch
and held in memory: they are small or legacy.

Writing: :func:`write_sharded` writes the hub layout that transformers and diffusers write,
``<stem>.safetensors`` or ``<stem>-00001-of-0000N.safetensors`` ... plus ``<stem>.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``). The tensors are produced one at
a time by a callback and each shard is written with safetensors' ``save_file`` as soon as it is full,
so the peak is one shard (``max_shard_bytes``), not the checkpoint.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_SUFFIX = '.safetensors.index.json'
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
# safetensors header dtype codes (the ones a model checkpoint holds) -> numpy.
DTYPES: dict[str, np.dtype] = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_),
}
_SIZE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*$', re.IGNORECASE)

Index = tuple[slice, ...]


def parse_size(size: int | str) -> int:
  """Bytes from ``2147483648``, ``'2GB'`` (10^9), ``'2GiB'`` (2^30), ``'500MB'``, ``'64KiB'``."""
  if isinstance(size, int):
    return size
  found = _SIZE.match(str(size))
  if found is None:
    raise ValueError(f'cannot read the size {size!r} (write e.g. 2GB, 500MB, 2GiB or a byte count)')
  number, unit, binary = found.groups()
  power = 'KMGT'.index(unit.upper()) + 1 if unit else 0
  return int(float(number) * (1024 if binary else 1000) ** power)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor is: its shape and dtype, and its file (None: held in memory) and stored name."""
  shape: tuple[int, ...]
  dtype: np.dtype
  file: str | None
  stored_name: str


def _full_index(index: Index | None, shape: tuple[int, ...]) -> bool:
  return index is None or all(s.indices(n)[:3] == (0, n, 1) for s, n in zip(index, shape))


class TensorSource(Mapping[str, TensorInfo]):
  """name -> :class:`TensorInfo` over safetensors files (and in-memory arrays); reads on demand."""

  def __init__(self, entries: Mapping[str, TensorInfo],
               arrays: Mapping[str, np.ndarray] | None = None):
    self._entries = dict(entries)
    self._arrays = dict(arrays or {})

  @classmethod
  def from_files(cls, files: Sequence[str]) -> 'TensorSource':
    """Reads the headers of safetensors ``files`` (pickles: loaded whole, see the module docstring).

    Raises:
      ValueError: a tensor name present in two files, or an unknown dtype (both named).
    """
    entries: dict[str, TensorInfo] = {}
    arrays: dict[str, np.ndarray] = {}
    for path in files:
      if path.endswith('.safetensors'):
        found = _read_header(path)
      else:
        loaded = _read_pickle(path)
        arrays.update(loaded)
        found = {k: TensorInfo(v.shape, v.dtype, None, k) for k, v in loaded.items()}
      for name, info in found.items():
        if name in entries:
          raise ValueError(f'tensor {name} is in both {entries[name].file} and {path}')
        entries[name] = info
    return cls(entries, arrays)

  @classmethod
  def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> 'TensorSource':
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    return cls({k: TensorInfo(v.shape, v.dtype, None, k) for k, v in arrays.items()}, arrays)

  def __getitem__(self, name: str) -> TensorInfo:
    return self._entries[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: info.shape for name, info in self._entries.items()}

  def renamed(self, new_to_old: Mapping[str, str]) -> 'TensorSource':
    """The same tensors under new names (``new_to_old`` covers the names to keep)."""
    return TensorSource({new: self._entries[old] for new, old in new_to_old.items()}, self._arrays)

  def read(self, name: str, index: Index | None = None) -> np.ndarray:
    """Tensor ``name`` (or ``tensor[index]``, an index of slices) as a numpy array in its dtype."""
    info = self._entries[name]
    if info.file is None:
      array = self._arrays[info.stored_name]
      return array if index is None else array[index]
    # One open per read: the mapping (and its resident pages) is released on close.
    with safe_open(info.file, framework='numpy') as f:
      if _full_index(index, info.shape):
        return f.get_tensor(info.stored_name)
      return f.get_slice(info.stored_name)[tuple(slice(*s.indices(n)[:2])
                                                  for s, n in zip(index, info.shape))]


def _read_header(path: str) -> dict[str, TensorInfo]:
  with safe_open(path, framework='numpy') as f:
    out = {}
    for name in f.keys():
      piece = f.get_slice(name)
      code = piece.get_dtype()
      if code not in DTYPES:
        raise ValueError(f'{path}: tensor {name} has dtype {code}, which sr_jax does not read '
                         f'({sorted(DTYPES)})')
      out[name] = TensorInfo(tuple(piece.get_shape()), DTYPES[code], path, name)
    return out


def _read_pickle(path: str) -> dict[str, np.ndarray]:
  import torch  # only for pickles the caller allowed (allow_pickle)
  loaded = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in loaded.items()}


# ------------------------------------------------------------------------------------ writing

def shard_file_names(stem: str, count: int) -> list[str]:
  """``<stem>.safetensors`` for one shard, else ``<stem>-0000i-of-0000N.safetensors``."""
  if count == 1:
    return [f'{stem}.safetensors']
  return [f'{stem}-{i + 1:05d}-of-{count:05d}.safetensors' for i in range(count)]


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
  """Groups names (in order) into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
  shards: list[list[str]] = [[]]
  used = 0
  for name, nbytes in sizes:
    if shards[-1] and used + nbytes > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += nbytes
  return shards


def remove_written(folder: str, stem: str) -> None:
  """Deletes what :func:`write_sharded` may have written before (a re-conversion may shard
  differently, and a stale index or shard would be read)."""
  for path in glob.glob(os.path.join(glob.escape(folder), f'{glob.escape(stem)}*.safetensors')) + [
      os.path.join(folder, stem + INDEX_SUFFIX)]:
    if os.path.isfile(path) and re.fullmatch(
        rf'{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?',
        os.path.basename(path)):
      os.remove(path)


def write_sharded(folder: str, stem: str, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                  produce: Callable[[str], np.ndarray], *,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[str]:
  """Writes tensors ``produce(name)`` for ``entries`` (name, shape, dtype) as (sharded) safetensors.

  ``produce`` is called once per name, in order, and must return an array of that shape and dtype.
  Returns the written file names (relative to ``folder``).

  Raises:
    ValueError: naming a produced tensor whose shape or dtype is not the announced one.
  """
  os.makedirs(folder, exist_ok=True)
  remove_written(folder, stem)
  announced = {name: (tuple(shape), np.dtype(dtype)) for name, shape, dtype in entries}
  sizes = [(name, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)
           for name, shape, dtype in entries]
  shards = plan_shards(sizes, max_shard_bytes)
  names = shard_file_names(stem, len(shards))
  for file_name, members in zip(names, shards):
    tensors = {}
    for name in members:
      array = np.ascontiguousarray(produce(name))
      if (array.shape, array.dtype) != announced[name]:
        raise ValueError(f'{name}: produced {array.shape} {array.dtype}, announced '
                         f'{announced[name][0]} {announced[name][1]}')
      tensors[name] = array
    save_file(tensors, os.path.join(folder, file_name))
    del tensors  # one shard at a time
  if len(names) > 1:
    weight_map = {name: file_name for file_name, members in zip(names, shards) for name in members}
    with open(os.path.join(folder, stem + INDEX_SUFFIX), 'w') as f:
      json.dump({'metadata': {'total_size': sum(n for _, n in sizes)}, 'weight_map': weight_map}, f,
                indent=2, sort_keys=True)
      f.write('\n')
  return names


def find_written(folder: str, stem: str) -> list[str] | None:
  """The files :func:`write_sharded` wrote in ``folder`` (paths), or None when there are none.

  Raises:
    FileNotFoundError: the index lists a shard that does not exist (named).
  """
  single = os.path.join(folder, f'{stem}.safetensors')
  if os.path.isfile(single):
    return [single]
  index = os.path.join(folder, stem + INDEX_SUFFIX)
  if not os.path.isfile(index):
    return None
  with open(index) as f:
    shards = sorted(set(json.load(f)['weight_map'].values()))
  paths = [os.path.join(folder, s) for s in shards]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{index} lists {missing}, which do not exist')
  return paths
