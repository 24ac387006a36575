"""Device mesh, batch and FSDP sharding, state created already sharded, multi-host setup.

The mesh has two axes, both data parallel:

* ``data``: plain data parallelism; every array not chosen for FSDP is replicated along it.
* ``fsdp``: fully-sharded data parallelism (ZeRO-3): large arrays (frozen UNet/VAE/DINOv3 weights,
  and any large trainable array with its optimizer moments) are split along their largest axis that
  the ``fsdp`` size divides; XLA all-gathers them where they are used.

The batch is split over both axes (``P(('data', 'fsdp'))``): FSDP replicas would otherwise compute
the same examples twice. With ``fsdp=1`` this is ordinary data parallelism over ``data``.

Everything is built so that multi-host runs need no special casing: arrays are created by jitted
functions with ``out_shardings`` or from per-process data (``make_array_from_process_local_data``,
``make_array_from_callback``), never by ``device_put`` of a host value onto remote devices.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')
# Arrays with fewer elements stay replicated: sharding a bias or a LoRA factor saves nothing and
# costs an all-gather per use.
DEFAULT_FSDP_MIN_SIZE = 2 ** 20


# ----------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------

def _multi_process_env_present() -> bool:
  """True when a launcher that starts several JAX processes is visible in the environment."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  # SLURM (srun): one process per task; a single task needs no coordination service.
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
    return True
  # Open MPI (mpirun).
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  # Cloud TPU pod slices (GKE/JobSet and some TPU VM images) list the workers.
  if len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return True
  return False


def initialize_distributed(mode: str = 'auto', **kwargs) -> None:
  """Connects the JAX processes of a multi-host job (``jax.distributed.initialize``).

  Must run before anything touches a JAX device (first thing in ``main``).

  Manual launches (no scheduler) set, on every host, ``JAX_COORDINATOR_ADDRESS=host0:port`` (read
  by JAX) plus ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read here: JAX itself does not).

  Args:
    mode: ``'off'``: never; ``'on'``: always (JAX auto-detects SLURM, Open MPI, Cloud TPU, GKE, or
      reads ``JAX_COORDINATOR_ADDRESS``/``kwargs``); ``'auto'``: only when a multi-process launcher
      is visible in the environment (see ``_multi_process_env_present``) or ``kwargs`` are given.
    **kwargs: passed to ``jax.distributed.initialize`` (``coordinator_address``, ``num_processes``,
      ``process_id``, ``local_device_ids``).
  """
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"distributed mode must be 'auto', 'on' or 'off', got {mode!r}")
  if mode == 'off' or jax.distributed.is_initialized():
    return
  for name, key in (('JAX_NUM_PROCESSES', 'num_processes'), ('JAX_PROCESS_ID', 'process_id')):
    if os.environ.get(name):
      kwargs.setdefault(key, int(os.environ[name]))
  if mode == 'on' or kwargs or _multi_process_env_present():
    jax.distributed.initialize(**kwargs)
    logging.info('jax.distributed initialised: process %d of %d, %d local / %d global devices',
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())


# ----------------------------------------------------------------------------------------------
# Mesh and shardings
# ----------------------------------------------------------------------------------------------

def mesh_shape(mesh_config: Mapping[str, int] | None, num_devices: int) -> tuple[int, int]:
  """Resolves ``{'data': -1, 'fsdp': 2}`` (one axis may be -1: "the rest") to concrete sizes."""
  cfg = dict(mesh_config or {'data': -1, 'fsdp': 1})
  unknown = set(cfg) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}')
  sizes = [int(cfg.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {cfg}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'{num_devices} devices do not divide into mesh {cfg}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {cfg} -> {sizes} needs {math.prod(sizes)} devices, have {num_devices}')
  return sizes[0], sizes[1]


def make_mesh(mesh_config: Mapping[str, int] | None = None, devices=None) -> Mesh:
  """A ``('data', 'fsdp')`` mesh over all (global) devices, with Auto axis types.

  ``jax.make_mesh`` picks a device order that follows the physical topology (ICI rings on TPU,
  NVLink islands on GPU); Auto axes let XLA propagate shardings we do not annotate (the default of
  ``jax.make_mesh`` is Explicit axes, which would require sharding annotations in every model).
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data`` and ``fsdp``; other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
  """PartitionSpec that splits the largest axis divisible by ``fsdp_size`` (ties: the later axis).

  Small arrays, scalars and arrays with no divisible axis stay replicated.
  """
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  candidates = [(dim, i) for i, dim in enumerate(shape) if dim % fsdp_size == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return P(*spec)


def fsdp_shardings(tree: Any, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> Any:
  """NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs): FSDP if large, else
  replicated.

  PRNG key arrays and other extended dtypes are always replicated (their trailing key-data axis is
  not visible in ``shape`` and they are tiny).
  """
  fsdp_size = mesh.shape['fsdp']

  def one(leaf):
    shape = tuple(getattr(leaf, 'shape', ()))
    dtype = getattr(leaf, 'dtype', None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))

  return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------------------------
# Placing arrays
# ----------------------------------------------------------------------------------------------

def put_global(tree: Any, shardings: Any) -> Any:
  """Places a pytree whose values are identical on every process onto global ``shardings``.

  Host values (numpy) are cut with ``make_array_from_callback``, which only touches this process's
  shards, so it works unchanged on multi-host meshes. Device arrays are moved with ``device_put``
  when that stays within what one controller may do (single process, or already global arrays);
  process-local device arrays in a multi-host run take the host path.
  """
  multi_process = jax.process_count() > 1

  def one(x, sharding):
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return x
      if not multi_process or not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(one, tree, shardings)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's slice of the global batch into global arrays split along the batch axis.

  Each process passes ``global_batch / process_count`` examples; the global shape follows.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def with_sharding(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings: the restore target and the AOT-compile signature."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def abstract_state(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh,
                   min_size: int = DEFAULT_FSDP_MIN_SIZE) -> tuple[Any, Any]:
  """(abstract state with shardings, shardings) of ``init_fn(rng)``; nothing is allocated."""
  shapes = jax.eval_shape(init_fn, rng)
  shardings = fsdp_shardings(shapes, mesh, min_size)
  return with_sharding(shapes, shardings), shardings


def create_sharded_state(init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                         shardings: Any) -> Any:
  """Runs ``init_fn`` under jit with ``out_shardings``: each device materialises only its shards."""
  return jax.jit(init_fn, out_shardings=shardings)(rng)


def gather_to_host(tree: Any) -> Any:
  """Numpy copy of a pytree of global arrays on every process (all-gathers remote shards)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
