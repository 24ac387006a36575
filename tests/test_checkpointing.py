"""Checkpoints: a kill -9 during an async save leaves the previous checkpoint restorable, and the
resumed run reaches the uninterrupted result; iterator states of every kind round-trip."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toy_training as toy
from sr_jax import checkpointing
from sr_jax import sharding
from sr_jax import trainer
from test_trainer import METHOD  # shared: jax's compile cache is keyed on the function objects
from test_trainer import run_toy_subprocess


def _train(workdir, **overrides):
  return trainer.train_and_evaluate(toy.make_config(**overrides), str(workdir), METHOD,
                                    data_factory=toy.toy_data_factory)


def test_kill_during_async_save_then_resume(tmp_path):
  reference = tmp_path / 'reference'
  _train(reference)

  workdir = tmp_path / 'killed'
  proc = run_toy_subprocess(workdir, 1, extra_args=['--kill-after-save-at', '4'], check=False)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  # The step-4 save was cut off before its atomic rename: only a tmp folder (if anything) is left.
  entries = os.listdir(workdir / 'checkpoints')
  assert '2' in entries and '4' not in entries, entries
  manager = checkpointing.make_manager(str(workdir / 'checkpoints'), read_only=True)
  assert manager.latest_step() == 2
  manager.close()

  _train(workdir)  # resumes from step 2, saves 4 again over the debris, runs to 6
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  # The killed run logged steps 1-4; the resume replaced the rows of the steps it replayed (3, 4).
  assert [m['step'] for m in rows] == [1, 2, 3, 4, 5, 6]
  resumed = rows[2:]
  with open(reference / 'metrics.jsonl') as f:
    expected = [json.loads(line) for line in f][2:]
  np.testing.assert_allclose([m['loss'] for m in resumed], [m['loss'] for m in expected],
                             rtol=1e-6)
  for name, value in toy.load_export(reference).items():
    np.testing.assert_allclose(toy.load_export(workdir)[name], value, rtol=1e-6, err_msg=name)
  assert sorted(int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit()) == [2, 4, 6]


class _Iterator:
  def __init__(self, state):
    self.state = state

  def get_state(self):
    return self.state

  def set_state(self, state):
    self.state = state


@pytest.mark.parametrize('state', [
    {'index': 7, 'nested': {'epoch': 1}},   # grain DatasetIterator style
    b'{"last_seen_indices": {"0": 3}}',     # grain DataLoader style (JSON bytes)
    b'\xff\x00binary',                      # anything else
])
def test_state_and_iterator_round_trip(tmp_path, state):
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  init = lambda rng: {'w': jax.random.uniform(rng, (4, 3)), 'key': rng, 'n': jnp.int32(3)}
  abstract, shardings = sharding.abstract_state(init, jax.random.key(0, impl='unsafe_rbg'), mesh)
  saved = sharding.create_sharded_state(init, jax.random.key(0, impl='unsafe_rbg'), shardings)
  manager = checkpointing.make_manager(str(tmp_path / 'ck'), keep=2)
  checkpointing.save(manager, 5, saved, _Iterator(state))
  manager.wait_until_finished()
  assert 'process_0-of-1.json' in os.listdir(tmp_path / 'ck' / '5' / 'data')

  target = _Iterator(None)
  restored, step = checkpointing.restore(manager, abstract, target)
  manager.close()
  assert step == 5 and target.state == state
  np.testing.assert_array_equal(restored['w'], saved['w'])
  assert restored['w'].sharding == shardings['w']
  np.testing.assert_array_equal(jax.random.key_data(restored['key']),
                                jax.random.key_data(saved['key']))
  assert checkpointing.restore(checkpointing.make_manager(str(tmp_path / 'empty')), abstract,
                               target) is None
