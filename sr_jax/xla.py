"""XLA compiler options per platform, and the persistent compilation cache (no model code here).

Every jitted model program (training steps, inference, benchmarks) is compiled with
:func:`compiler_options` (training steps: :func:`training_compiler_options`); both are empty off the
CPU. Why each option exists, with its measured effect, is recorded in ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

from typing import Any

import jax

# jaxlib 0.10's XLA:CPU hands each dot with its elementwise neighbours to YNNPACK, which needs its
# operands materialised (bias broadcasts, shifted copies of a depthwise input): slower on every
# model here. An empty fusion-type list turns it off.
_CPU_NO_YNN_FUSION = {'xla_cpu_experimental_ynn_fusion_type': ''}
# XLA:CPU's default scheduler orders ops for thread concurrency and hoists rematerialised forward
# blocks to the start of the backward pass, so remat saved nothing; GPU/TPU schedule for memory.
_CPU_MEMORY_SCHEDULER = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def on_cpu() -> bool:
  """True when the default backend (the one ``jax.jit`` compiles for) is the CPU."""
  return jax.default_backend() == 'cpu'


def compiler_options(cpu_optimization_level: int | None = None) -> dict[str, Any]:
  """Options for compiling model code on this backend (``jax.jit(..., compiler_options=...)`` or
  ``Lowered.compile``): on the CPU, YNNPACK fusions off, and ``cpu_optimization_level`` (XLA's
  backend/LLVM level; None: XLA's default) when given; empty elsewhere. Level 1 compiles the tiny
  models' programs faster and runs them no slower (benchmarks/RESULTS.md, "First run")."""
  if not on_cpu():
    return {}
  options = dict(_CPU_NO_YNN_FUSION)
  if cpu_optimization_level is not None:
    options['xla_backend_optimization_level'] = int(cpu_optimization_level)
  return options


def training_compiler_options(memory_scheduler: bool = True,
                              cpu_optimization_level: int | None = None) -> dict[str, Any]:
  """:func:`compiler_options` for a training step: on the CPU also the memory-optimised scheduler
  (unless ``memory_scheduler=False``: it lowers the peak of large steps, and slows small ones)."""
  if not on_cpu():
    return {}
  return {**compiler_options(cpu_optimization_level),
          **(_CPU_MEMORY_SCHEDULER if memory_scheduler else {})}


def default_cache_dir() -> str:
  """``$SR_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/sr_jax/jax`` (``~/.cache/sr_jax/jax``)."""
  import os  # pylint: disable=g-import-not-at-top
  if os.environ.get('SR_JAX_CACHE_DIR'):
    return os.environ['SR_JAX_CACHE_DIR']
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'sr_jax', 'jax')


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache (programs that took >= 1 s to compile), so a
  resumed run or an evaluation of the same model does not compile again. Keeps a cache directory
  set by ``JAX_COMPILATION_CACHE_DIR``; ``SR_JAX_CACHE_DIR=off`` disables it. Returns the directory.
  """
  import os  # pylint: disable=g-import-not-at-top
  if os.environ.get('SR_JAX_CACHE_DIR', '').lower() == 'off':
    return None
  directory = directory or os.environ.get('JAX_COMPILATION_CACHE_DIR') or default_cache_dir()
  jax.config.update('jax_compilation_cache_dir', directory)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  return directory
