"""Orbax checkpoints holding the train state and the data-iterator state together.

Layout of ``<workdir>/checkpoints`` (one folder per saved step, the newest ``keep`` kept)::

  <step>/
    _CHECKPOINT_METADATA                  orbax bookkeeping (written last: a folder without it, or a
                                          ``<step>.orbax-checkpoint-tmp*`` folder, is an unfinished
                                          save and is ignored on restore)
    state/                                the TrainState pytree (``ocp.args.StandardSave``, OCDBT +
                                          zarr; sharding-agnostic, restorable onto any mesh)
    data/process_<i>-of-<n>.json          each process's iterator ``get_state()``

Saves are asynchronous: ``save`` returns once the arrays are copied off the accelerators, the
writing continues in a background thread and is finalised by an atomic rename, so a process killed
mid-save leaves the previous checkpoint as the latest restorable one. Call ``wait_until_finished``
before exit (the trainer does, also on errors).

The iterator state is captured when ``save`` is called (not when the background thread runs), and
every process writes its own file: in multi-host runs each host reads a different shard of the data.
The checkpoint directory must be on storage all hosts share (GCS bucket, NFS/Lustre), never
host-local disk.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE = 'state'
DATA = 'data'


# ----------------------------------------------------------------------------------------------
# Iterator state as an orbax item
# ----------------------------------------------------------------------------------------------

def encode_iterator_state(state: Any) -> dict:
  """JSON-able envelope for ``get_state()``: grain DataLoader iterators return bytes, grain dataset
  iterators and simple iterators return JSON-able dicts."""
  if isinstance(state, bytes):
    try:
      return {'bytes_utf8': state.decode('utf-8')}
    except UnicodeDecodeError:
      return {'bytes_b64': base64.b64encode(state).decode('ascii')}
  return {'json': state}


def decode_iterator_state(envelope: dict) -> Any:
  if 'bytes_utf8' in envelope:
    return envelope['bytes_utf8'].encode('utf-8')
  if 'bytes_b64' in envelope:
    return base64.b64decode(envelope['bytes_b64'])
  return envelope['json']


def _process_file(directory: epath.Path) -> epath.Path:
  return epath.Path(directory) / f'process_{jax.process_index()}-of-{jax.process_count()}.json'


class IteratorStateHandler(ocp.CheckpointHandler):
  """Writes this process's iterator state to ``process_<i>-of-<n>.json``.

  Like grain's own handler, but for any iterator with ``get_state``/``set_state``, and the state is
  captured when ``save`` is called.
  """

  def save(self, directory: epath.Path, *args, **kwargs):
    save_args = kwargs.get('args', args[0] if args else None)
    _process_file(directory).write_text(json.dumps(save_args.envelope, indent=1))

  def restore(self, directory: epath.Path, *args, **kwargs) -> dict | None:
    filename = _process_file(directory)
    if not filename.exists():
      # Another process count than the saving run: the per-host streams cannot be continued.
      logging.warning('no iterator state %s; the data stream restarts from its beginning', filename)
      return None
    return json.loads(filename.read_text())

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  envelope: dict


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------------------------
# Manager
# ----------------------------------------------------------------------------------------------

def make_manager(directory: str, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  """CheckpointManager keeping the newest ``keep`` steps; async saves unless ``async_save=False``.

  The writer (the trainer) deletes leftovers of saves killed half-way, in the background, at
  start-up. Anything else that opens the directory while a run may be writing to it (evaluation,
  export, inspection) must pass ``read_only=True``: a second writer-mode manager would delete the
  running save's temporary folder.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      create=not read_only,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
  )
  # Orbax wants absolute paths; URLs (gs://...) are absolute already.
  directory = directory if '://' in directory else os.path.abspath(directory)
  return ocp.CheckpointManager(epath.Path(directory), options=options, item_names=(STATE, DATA))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any) -> None:
  """Starts an (async) save of ``state`` and the iterator's current position at ``step``.

  ``force=True``: the trainer decides when to save; the manager's own interval policy is bypassed.
  """
  envelope = encode_iterator_state(data_iterator.get_state()) if data_iterator is not None else {}
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state),
      DATA: IteratorStateSave(envelope),
  }), force=True)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator: Any,
            step: int | None = None) -> tuple[Any, int] | None:
  """Restores ``step`` (default: latest) onto the shardings carried by ``abstract_state``.

  ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` built for
  the *current* mesh, so a checkpoint written on another device count is resharded on load. The
  iterator (if given) is moved to the saved position. Returns ``(state, step)``, or ``None`` when
  there is no checkpoint.
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract_state),
      DATA: IteratorStateRestore(),
  }))
  envelope = restored[DATA]
  if data_iterator is not None and envelope:
    data_iterator.set_state(decode_iterator_state(envelope))
  logging.info('restored checkpoint at step %d from %s', step, manager.directory)
  return restored[STATE], step
