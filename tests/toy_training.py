"""A toy training method and data stream for the trainer tests (also runnable as a subprocess).

The "generator" is a per-channel linear map ``sr = (lq @ w + b) * frozen['gain']`` fitted by Adam to
``hq``; the train step also draws noise from a PRNG key in the state, so a resumed run only matches
an uninterrupted one if keys, optimizer moments and the data position are all restored.

Subprocess use (multi-device runs need XLA_FLAGS set before jax is imported)::

  python tests/toy_training.py WORKDIR '{"max_steps": 6, ...}' [--kill-after-save-at STEP]
"""
from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np

IMAGE_SHAPE = (4, 4, 3)
BIG_SHAPE = (16, 64)  # a "large" frozen array and trainable array, FSDP-split in the tests


class ToyIterator:
  """Deterministic batches: batch i depends only on (seed, i, process). Has get_state/set_state."""

  def __init__(self, local_batch: int, seed: int = 0):
    self.local_batch, self.seed, self.index = local_batch, seed, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng([self.seed, self.index, jax.process_index()])
    self.index += 1
    lq = rng.uniform(-1, 1, (self.local_batch, *IMAGE_SHAPE)).astype(np.float32)
    hq = np.clip(0.8 * lq[..., ::-1] + 0.1, -1, 1).astype(np.float32)
    return {'lq': lq, 'hq': hq}

  def get_state(self) -> dict:
    return {'index': self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state['index'])


def toy_data_factory(config):
  import jax  # pylint: disable=g-import-not-at-top
  return ToyIterator(config.batch_size // jax.process_count(), seed=config.get('data_seed', 0))


def _optimizer():
  import optax  # pylint: disable=g-import-not-at-top
  return optax.adam(1e-2)


def init_state(rng):
  """Params, Adam state, a PRNG key and a step counter.

  The toy re-keys with 'unsafe_rbg': threefry's random-bit kernels take seconds to compile on CPU,
  which would dominate these tests. All draws are small and replicated, so every mesh computes the
  same numbers.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  key = jax.random.wrap_key_data(jnp.tile(jax.random.key_data(rng), 2), impl='unsafe_rbg')
  k_w, k_big, k_state = jax.random.split(key, 3)
  params = {'w': 0.1 * jax.random.normal(k_w, (3, 3)), 'b': jnp.zeros((3,)),
            'big': 0.01 * jax.random.normal(k_big, BIG_SHAPE)}
  return {'params': params, 'opt_state': _optimizer().init(params), 'rng': k_state,
          'step': jnp.zeros((), jnp.int32)}


def _predict(params, frozen, lq):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return (jnp.einsum('nhwc,cd->nhwd', lq, params['w']) + params['b']) * frozen['gain']


def train_step(state, frozen, batch, nan_at_step=None):
  """One Adam step on MSE; ``nan_at_step`` (1-based) poisons that step's loss with NaN."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  rng, noise_key = jax.random.split(state['rng'])
  lq = batch['lq'] + 0.01 * jax.random.normal(noise_key, (3,))  # replicated draw

  def loss_fn(params):
    mse = jnp.mean((_predict(params, frozen, lq) - batch['hq']) ** 2)
    ridge = jnp.mean((params['big'] @ frozen['big'].T) ** 2)  # exercises the FSDP-split arrays
    loss = mse + 1e-3 * ridge
    if nan_at_step is not None:
      loss = jnp.where(state['step'] + 1 == nan_at_step, jnp.nan, loss)
    return loss, mse

  (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = _optimizer().update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new_state = {'params': params, 'opt_state': opt_state, 'rng': rng, 'step': state['step'] + 1}
  return new_state, {'loss': loss, 'mse': mse, 'grad_norm': optax.tree.norm(grads)}


def sample(state, frozen, batch):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sr = jnp.clip(_predict(state['params'], frozen, batch['lq']), -1, 1)
  return {'lq': batch['lq'][:, ::2, ::2], 'sr': sr, 'hq': batch['hq']}  # LQ smaller on purpose


def export(state, frozen, directory):
  import jax  # pylint: disable=g-import-not-at-top
  from sr_jax import sharding  # pylint: disable=g-import-not-at-top
  params = sharding.gather_to_host(state['params'])
  if jax.process_index() == 0:
    os.makedirs(directory, exist_ok=True)
    np.savez(os.path.join(directory, 'params.npz'), **params)


def make_method(nan_at_step=None, flops_per_sample=None):
  from sr_jax.methods import base  # pylint: disable=g-import-not-at-top
  frozen = {'gain': np.float32(1.5),
            'big': np.linspace(-1, 1, np.prod(BIG_SHAPE), dtype=np.float32).reshape(BIG_SHAPE)}
  return base.Method(
      init_state=init_state,
      train_step=functools.partial(train_step, nan_at_step=nan_at_step),
      frozen=frozen, sample=sample, export=export, flops_per_sample=flops_per_sample)


def make_config(**overrides):
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      max_steps=6, batch_size=8, log_every=1, sample_every=3, checkpoint_every=2,
      keep_checkpoints=10, seed=0, mesh={'data': -1, 'fsdp': 1}, fsdp_min_size=64,
      sample_count=2))
  config.update(overrides)
  return config


def load_export(workdir) -> dict:
  with np.load(os.path.join(workdir, 'export', 'params.npz')) as f:
    return dict(f)


def _main(argv):
  """Subprocess entry: run the toy training, optionally SIGKILL itself right after a save starts."""
  import signal  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from sr_jax import checkpointing, trainer  # pylint: disable=g-import-not-at-top
  workdir, overrides = argv[1], json.loads(argv[2])
  logging.set_verbosity(logging.INFO)
  if '--kill-after-save-at' in argv:
    kill_step = int(argv[argv.index('--kill-after-save-at') + 1])
    real_save = checkpointing.save

    def save_then_die(manager, step, state, data_iterator):
      real_save(manager, step, state, data_iterator)
      if step == kill_step:  # the async write has started, not finished: die like a preemption
        os.kill(os.getpid(), signal.SIGKILL)
    checkpointing.save = save_then_die
  trainer.train_and_evaluate(make_config(**overrides), workdir, make_method(),
                             data_factory=toy_data_factory)
  import jax  # pylint: disable=g-import-not-at-top
  print(json.dumps({'devices': jax.device_count()}))


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _main(sys.argv)
