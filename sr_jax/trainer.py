"""Method-agnostic training loop: mesh, sharded state, jitted step, logging, checkpoints, resume.

A training *method* is a :class:`sr_jax.methods.Method`: pure functions plus the frozen arrays
they read, made by ``methods.get(config.method).make_method(config)``. The trainer owns everything
else and names no method:

1. builds the ``('data', 'fsdp')`` mesh (``sr_jax.sharding``) and places ``method.frozen`` on it
   (replicated, or FSDP-split when large and ``mesh.fsdp > 1``);
2. creates the train state already sharded (``jax.eval_shape`` +
   ``jit(init_state, out_shardings)``), or restores the latest checkpoint onto the current mesh
   (any device count) together with the data-iterator position;
3. compiles ``method.train_step`` ahead of time with explicit shardings and donated state, and runs
   it on batches each process reads for itself (``jax.make_array_from_process_local_data``);
4. every ``log_every`` steps: metric means, steps/s, ETA, TFLOP/s per device, MFU (accelerators);
   every ``sample_every``: an LQ | SR | HQ grid; every ``checkpoint_every``: an async orbax save;
5. stops with ``FloatingPointError`` naming the first step whose metrics were NaN/Inf, before any
   checkpoint of that step or later is written;
6. at the end: a final checkpoint, all saves awaited, then ``method.export(...)`` into
   ``<workdir>/export``.

Config keys read (``ml_collections.ConfigDict``; defaults in ``TrainerOptions``):
  max_steps          total optimizer steps (a resumed run continues up to it); steps count
                     optimizer updates: a method making ``updates_per_step`` updates per call
                     advances the step by that much, and max_steps / log_every / sample_every /
                     checkpoint_every must be multiples of it
  batch_size         global batch (all processes); divisible by the device count
  log_every          steps between metric logs / NaN checks (default 50)
  sample_every       steps between image grids, 0 = never (default 1000)
  checkpoint_every   steps between checkpoints (default 1000); a final one is always written
  keep_checkpoints   newest checkpoints kept (default 3)
  seed               PRNG seed for ``method.init_state`` (default 0)
  mesh               e.g. ``{'data': -1, 'fsdp': 1}``; one axis may be -1 ("all the rest")
  fsdp_min_size      arrays with at least this many elements are FSDP-split (default 2**20)
  sample_count       examples per image grid (default 4)
  async_checkpoints  background checkpoint writes (default True)
  checkpoint_dir     where checkpoints go (default ``<workdir>/checkpoints``); e.g. a gs:// bucket
                     shared by all hosts while logs stay on the local disk of process 0
  distributed        'auto' | 'on' | 'off': ``jax.distributed.initialize`` policy (default 'auto')
  peak_tflops        per-device peak for MFU, overrides the device table (default: table)
  prng_impl          PRNG of the key given to ``init_state`` (default: jax's, threefry); 'rbg' is
                     faster on TPU/GPU but its bits may depend on the sharding
  cpu_memory_scheduler  compile CPU steps with XLA's memory-optimised scheduler (default True: the
                     full-size step fits 24 GiB with it; tiny configs turn it off, it slows them)
  cpu_optimization_level  XLA's CPU backend optimisation level for the step and the image grids
                     (default None: XLA's; tiny configs use 1, which compiles them faster)
  method             the method's registered name or module path (``sr_jax.methods.get``; only
                     when no method is passed)
  data, data_workers, data_read_threads
                     the default data factory's ``sr_jax.data.pipeline`` source config, grain
                     worker processes per host (default 0) and read threads (default 1)

Outputs in ``workdir``: ``checkpoints/`` (see ``sr_jax.checkpointing``), ``tensorboard/``,
``samples/step_<step>.png``, ``metrics.jsonl``, ``config.json``, ``export/``. Only process 0 writes
logs, images and the config; every process takes part in checkpoints (on shared storage).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sr_jax import checkpointing
from sr_jax import methods
from sr_jax import sharding
from sr_jax import summary
from sr_jax import xla


DataFactory = Callable[[Any], Iterator[dict]]
"""``config -> iterator`` of this process's batches (``batch_size // process_count`` examples) as
dicts of numpy arrays, with ``get_state()`` / ``set_state(state)`` (grain iterators qualify)."""


@dataclasses.dataclass(frozen=True)
class TrainerOptions:
  """The config keys the loop reads (see the module docstring)."""
  max_steps: int
  batch_size: int
  log_every: int = 50
  sample_every: int = 1000
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  seed: int = 0
  mesh: Mapping[str, int] = dataclasses.field(default_factory=lambda: {'data': -1, 'fsdp': 1})
  fsdp_min_size: int = sharding.DEFAULT_FSDP_MIN_SIZE
  sample_count: int = 4
  async_checkpoints: bool = True
  checkpoint_dir: str | None = None
  distributed: str = 'auto'
  peak_tflops: float | None = None
  prng_impl: str | None = None
  cpu_memory_scheduler: bool = True
  cpu_optimization_level: int | None = None

  @classmethod
  def from_config(cls, config: Any) -> 'TrainerOptions':
    values = {}
    for field in dataclasses.fields(cls):
      if field.name in config:
        value = config[field.name]
        values[field.name] = dict(value) if field.name == 'mesh' else value
    return cls(**values)


# Dense bf16 peak per device (TFLOP/s). Order matters: 'TPU v5 lite' before 'TPU v5'.
PEAK_TFLOPS = (
    ('H200', 989.0), ('H100', 989.0), ('A100', 312.0),
    ('TPU v4', 275.0), ('TPU v5 lite', 197.0), ('TPU v5e', 197.0), ('TPU v5p', 459.0),
    ('TPU v5', 459.0), ('TPU v6 lite', 918.0), ('TPU v6e', 918.0),
)


def peak_tflops(device: Any) -> float | None:
  """Peak dense bf16 TFLOP/s of ``device`` from its ``device_kind``; None when unknown or CPU."""
  if device.platform == 'cpu':
    return None
  kind = device.device_kind
  return next((peak for name, peak in PEAK_TFLOPS if name.lower() in kind.lower()), None)


# ----------------------------------------------------------------------------------------------
# The jitted step and its metric tracker
# ----------------------------------------------------------------------------------------------

def init_tracker(metric_names: tuple[str, ...], step: int) -> dict:
  """Device-side metric sums plus the first step with non-finite metrics (-1: none yet).

  Keeping these on the device lets the host dispatch steps without waiting for results; the host
  reads them only when it logs or checkpoints.
  """
  return {
      'sums': {k: jnp.zeros((), jnp.float32) for k in metric_names},
      'count': jnp.zeros((), jnp.int32),
      'step': jnp.asarray(step, jnp.int32),
      'first_bad_step': jnp.asarray(-1, jnp.int32),
      'bad_metrics': {k: jnp.zeros((), jnp.bool_) for k in metric_names},
  }


def reset_sums(tracker: dict) -> dict:
  return {**tracker, 'sums': jax.tree.map(jnp.zeros_like, tracker['sums']),
          'count': jnp.zeros_like(tracker['count'])}


@functools.lru_cache(maxsize=8)
def jitted_train_step(train_step: Callable) -> Callable:
  """``jax.jit(train_step)``, one object per ``train_step``: the metric names are read from its
  trace (``jax.eval_shape``) and :func:`make_step_fn` calls it, so jax traces the step once."""
  return jax.jit(train_step)


@functools.lru_cache(maxsize=8)
def make_step_fn(train_step: Callable, updates_per_step: int = 1) -> Callable:
  """Wraps ``train_step`` to fold its metrics into the tracker (sums, NaN/Inf bookkeeping); the
  tracker's step advances by ``updates_per_step`` per call.

  Cached per ``train_step`` so that repeated runs in one process (tests, notebooks) reuse jax's
  trace and compile caches, which are keyed on the function object.
  """
  inner = jitted_train_step(train_step)  # inlined when step_fn is compiled

  def step_fn(state, frozen, batch, tracker):
    state, metrics = inner(state, frozen, batch)
    metrics = {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}
    bad = {k: ~jnp.isfinite(v) for k, v in metrics.items()}
    any_bad = jnp.any(jnp.stack(list(bad.values()))) if bad else jnp.bool_(False)
    step = tracker['step'] + updates_per_step
    first = (tracker['first_bad_step'] < 0) & any_bad
    return state, {
        'sums': {k: tracker['sums'][k] + metrics[k] for k in metrics},
        'count': tracker['count'] + 1,
        'step': step,
        'first_bad_step': jnp.where(first, step, tracker['first_bad_step']),
        'bad_metrics': {k: jnp.where(first, bad[k], tracker['bad_metrics'][k]) for k in bad},
    }
  return step_fn


def check_finite(tracker: dict) -> None:
  """Raises ``FloatingPointError`` naming the first step (and metrics) that went NaN/Inf."""
  first_bad, bad_metrics = jax.device_get((tracker['first_bad_step'], tracker['bad_metrics']))
  if first_bad >= 0:
    names = sorted(k for k, v in bad_metrics.items() if v)
    raise FloatingPointError(f'non-finite metrics {names} at step {int(first_bad)}; stopping '
                             'without checkpointing that step')


@dataclasses.dataclass
class _Run:
  """Everything the loop needs, built once by ``_setup``."""
  options: TrainerOptions
  workdir: str
  method: methods.Method
  mesh: jax.sharding.Mesh
  frozen: Any
  state_shardings: Any
  abstract_state: Any
  manager: Any
  writer: summary.SummaryWriter
  data_iterator: Any
  is_main: bool


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------

def _write_config(config: Any, workdir: str) -> None:
  """``<workdir>/config.json``: what this run was started with (a resumed run overwrites it)."""
  if hasattr(config, 'to_json_best_effort'):
    text = config.to_json_best_effort(indent=2, sort_keys=True)
  else:
    text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(text)


def _default_method(config: Any) -> methods.Method:
  return methods.get(config.method).make_method(config)


def _default_data_factory(config: Any) -> Iterator[dict]:
  """``sr_jax.data.pipeline`` on ``config.data``: this process's share of ``config.batch_size``."""
  from sr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.make_train_iterator(
      config.data, seed=config.seed, batch_size=config.batch_size // jax.process_count(),
      worker_count=config.get('data_workers', 0), read_threads=config.get('data_read_threads', 1))


def check_step_intervals(options: TrainerOptions, updates_per_step: int) -> None:
  """Step counts must be whole train_step calls when one call makes several updates."""
  if updates_per_step < 1:
    raise ValueError(f'updates_per_step must be >= 1, got {updates_per_step}')
  for key in ('max_steps', 'log_every', 'sample_every', 'checkpoint_every'):
    value = getattr(options, key)
    if value % updates_per_step:
      raise ValueError(f'config.{key}={value} must be a multiple of the {updates_per_step} '
                       f'optimizer updates one training step of this method makes (steps count '
                       f'updates)')


def _check_batch_size(options: TrainerOptions, mesh: jax.sharding.Mesh) -> None:
  replicas = mesh.shape['data'] * mesh.shape['fsdp']
  if options.batch_size % replicas or options.batch_size % jax.process_count():
    raise ValueError(f'batch_size {options.batch_size} must divide by the {replicas} batch shards '
                     f'and the {jax.process_count()} processes')


def _root_key(options: TrainerOptions) -> jax.Array:
  return jax.random.key(options.seed, impl=options.prng_impl)


def _restore_or_init(run: _Run) -> tuple[Any, int]:
  """Latest checkpoint (state + iterator position) on the current mesh, else a fresh state."""
  restored = checkpointing.restore(run.manager, run.abstract_state, run.data_iterator)
  metrics_file = os.path.join(run.workdir, 'metrics.jsonl')
  if restored is not None:
    step = restored[1]
    if run.is_main:  # a resume from an earlier checkpoint replays later steps: drop their rows
      summary.drop_jsonl_rows_after(metrics_file, step)
    if step >= run.options.max_steps:
      logging.warning('the latest checkpoint is at step %d >= max_steps %d: nothing to train (pass '
                      '--config.max_steps=N with N > %d to continue)', step,
                      run.options.max_steps, step)
    return restored
  logging.info('initialising the train state (no checkpoint in %s)', run.manager.directory)
  state = sharding.create_sharded_state(run.method.init_state, _root_key(run.options),
                                        run.state_shardings)
  if run.is_main:
    summary.drop_jsonl_rows_after(metrics_file, 0)
  return state, 0


def _compile(run: _Run, state: Any, batch: dict) -> tuple[Any, Any, Any, float | None]:
  """AOT-compiled (step, tracker, tracker reset) and the per-device FLOPs of one step (if known)."""
  mesh = run.mesh
  replicated = sharding.replicated(mesh)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, run.frozen)
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
  logging.info('tracing the train step...')
  _, metric_shapes = jax.eval_shape(jitted_train_step(run.method.train_step), state, run.frozen,
                                    batch)
  names = tuple(metric_shapes)
  tracker_fn = jax.jit(functools.partial(init_tracker, names), out_shardings=replicated)
  tracker = tracker_fn(0)
  tracker_shardings = jax.tree.map(lambda _: replicated, tracker)
  logging.info('compiling the train step...')
  start = time.time()
  step_fn = jax.jit(
      make_step_fn(run.method.train_step, run.method.updates_per_step),
      in_shardings=(run.state_shardings, frozen_shardings, batch_shardings, tracker_shardings),
      out_shardings=(run.state_shardings, tracker_shardings),
      donate_argnums=(0, 3),
  ).lower(state, run.frozen, batch, tracker).compile(
      xla.training_compiler_options(memory_scheduler=run.options.cpu_memory_scheduler,
                                    cpu_optimization_level=run.options.cpu_optimization_level))
  logging.info('compiled the train step in %.1f s', time.time() - start)
  reset_fn = jax.jit(reset_sums, out_shardings=tracker_shardings, donate_argnums=0)
  flops = None
  if run.method.flops_per_sample is not None:
    flops = run.method.flops_per_sample * run.options.batch_size / mesh.size
  else:
    cost = step_fn.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = (cost or {}).get('flops') or None  # per device: the SPMD-partitioned program
  if flops:  # the log's rate is in updates (steps), a call makes updates_per_step of them
    flops /= run.method.updates_per_step
  return step_fn, tracker_fn, reset_fn, flops


def _setup(options: TrainerOptions, workdir: str, method: methods.Method, data_iterator: Any,
           config: Any) -> _Run:
  mesh = sharding.make_mesh(options.mesh)
  _check_batch_size(options, mesh)
  check_step_intervals(options, method.updates_per_step)
  logging.info('mesh %s over %d devices (%s), %d processes', dict(mesh.shape), mesh.size,
               jax.devices()[0].device_kind, jax.process_count())
  frozen = method.frozen if method.frozen is not None else {}
  frozen = sharding.put_global(frozen, sharding.fsdp_shardings(frozen, mesh, options.fsdp_min_size))
  abstract_state, state_shardings = sharding.abstract_state(
      method.init_state, _root_key(options), mesh, options.fsdp_min_size)
  is_main = jax.process_index() == 0
  if is_main:
    _write_config(config, workdir)
  return _Run(
      options=options, workdir=workdir, method=method, mesh=mesh, frozen=frozen,
      state_shardings=state_shardings, abstract_state=abstract_state,
      manager=checkpointing.make_manager(
          options.checkpoint_dir or os.path.join(workdir, 'checkpoints'),
          options.keep_checkpoints, options.async_checkpoints),
      writer=summary.SummaryWriter(os.path.join(workdir, 'tensorboard'), enabled=is_main),
      data_iterator=data_iterator, is_main=is_main)


# ----------------------------------------------------------------------------------------------
# Loop pieces
# ----------------------------------------------------------------------------------------------

def _log(run: _Run, step: int, tracker: dict, steps_per_sec: float,
         flops_per_step: float | None) -> None:
  """Metric means over the interval + throughput: TensorBoard, metrics.jsonl, progress line."""
  sums, count = jax.device_get((tracker['sums'], tracker['count']))
  metrics = {k: float(v) / max(int(count), 1) for k, v in sums.items()}
  perf = {'perf/steps_per_sec': steps_per_sec}
  tflops = mfu = None
  if flops_per_step:
    tflops = flops_per_step * steps_per_sec / 1e12
    perf['perf/tflops_per_device'] = tflops
    peak = run.options.peak_tflops or peak_tflops(jax.devices()[0])
    if peak:
      mfu = tflops / peak
      perf['perf/mfu'] = mfu
  if run.is_main:
    run.writer.scalars(step, {**metrics, **perf})
    run.writer.flush()
    summary.append_jsonl(os.path.join(run.workdir, 'metrics.jsonl'),
                         {'step': step, **metrics, **perf})
  logging.info('%s', summary.progress_line(step, run.options.max_steps, metrics, steps_per_sec,
                                           tflops, mfu))


def _write_samples(run: _Run, step: int, sample_fn: Callable, state: Any, batch: dict) -> None:
  images = sharding.gather_to_host(sample_fn(state, run.frozen, batch))
  if not run.is_main:
    return
  keys = [k for k in ('lq', 'sr', 'hq') if k in images] or list(images)
  grid = summary.image_grid([np.asarray(images[k])[:run.options.sample_count] for k in keys],
                            labels=[k.upper() for k in keys])
  path = os.path.join(run.workdir, 'samples', f'step_{step:08d}.png')
  summary.save_png(path, grid)
  logging.info('samples (%s) written to %s', ' | '.join(k.upper() for k in keys), path)
  run.writer.image(step, 'samples/' + '_'.join(keys), grid)
  run.writer.flush()


def _save(run: _Run, step: int, state: Any, tracker: dict) -> None:
  check_finite(tracker)  # never persist a state that has seen NaN/Inf
  checkpointing.save(run.manager, step, state, run.data_iterator)
  logging.info('checkpoint at step %d started', step)


def _next_batch(run: _Run) -> dict | None:
  try:
    return sharding.shard_batch(next(run.data_iterator), run.mesh)
  except StopIteration:
    logging.warning('the data iterator is exhausted; stopping early')
    return None


def _train_loop(run: _Run, state: Any, step: int) -> tuple[Any, int]:
  """Runs steps ``step+1 .. max_steps`` and checkpoints the last one; returns (state, step)."""
  options = run.options
  last_saved = step
  batch = _next_batch(run) if step < options.max_steps else None
  if batch is None:
    return state, step
  step_fn, tracker_fn, reset_fn, flops_per_step = _compile(run, state, batch)
  sample_fn = (jax.jit(run.method.sample, compiler_options=xla.compiler_options(
      options.cpu_optimization_level))
               if run.method.sample is not None else None)
  sample_batch = batch  # a fixed batch: grids stay comparable across steps
  tracker = tracker_fn(step)
  last_log_step, last_log_time = step, time.time()
  while batch is not None:
    state, tracker = step_fn(state, run.frozen, batch, tracker)
    step += run.method.updates_per_step
    if step % options.log_every == 0 or step == options.max_steps:
      check_finite(tracker)
      now = time.time()
      _log(run, step, tracker, (step - last_log_step) / max(now - last_log_time, 1e-9),
           flops_per_step)
      tracker = reset_fn(tracker)
      last_log_step, last_log_time = step, time.time()
    if sample_fn is not None and options.sample_every and step % options.sample_every == 0:
      _write_samples(run, step, sample_fn, state, sample_batch)
    if step % options.checkpoint_every == 0 or run.manager.reached_preemption(step):
      _save(run, step, state, tracker)
      last_saved = step
    if step >= options.max_steps:
      break
    batch = _next_batch(run)
  if step > last_saved:
    _save(run, step, state, tracker)
  return state, step


def train_and_evaluate(config: Any, workdir: str, method: methods.Method | None = None,
                       data_factory: DataFactory | None = None) -> Any:
  """Trains ``method`` (default: ``methods.get(config.method).make_method(config)``) on batches
  from ``data_factory`` (default: ``sr_jax.data.pipeline.make_train_iterator`` on ``config.data``,
  ``config.seed``, this process's share of ``config.batch_size``), resuming from
  ``<workdir>/checkpoints`` if it holds a checkpoint. Returns the final train state."""
  options = TrainerOptions.from_config(config)
  sharding.initialize_distributed(options.distributed)
  # The data sources first: a wrong path fails in seconds, before any model is built.
  data_iterator = (data_factory or _default_data_factory)(config)
  try:
    if method is None:
      logging.info('building the %s method (frozen weights, modules)', config.method)
      method = _default_method(config)
    run = _setup(options, workdir, method, data_iterator, config)
  except BaseException:
    _close_iterator(data_iterator)
    raise
  try:
    state, step = _restore_or_init(run)
    start_step = step
    state, step = _train_loop(run, state, step)
    run.manager.wait_until_finished()
    logging.info('trained steps %d..%d; checkpoints at %s', start_step, step,
                 run.manager.all_steps())
    if method.export is not None:
      export_dir = os.path.join(workdir, 'export')
      logging.info('exporting to %s', export_dir)
      method.export(state, run.frozen, export_dir)
    return state
  finally:
    # Await in-flight saves even when a step raised: a half-written newest checkpoint would be
    # ignored on restart, but losing the previous good one's finalisation would not.
    run.manager.wait_until_finished()
    run.manager.close()
    run.writer.close()
    _close_iterator(run.data_iterator)


def _close_iterator(iterator: Any) -> None:
  if hasattr(iterator, 'close'):  # grain worker processes
    iterator.close()
