"""grain pipeline: batch contract, seeded determinism, worker-count independence, resume, sharding."""
import numpy as np
import pytest

from sr_jax.data import pipeline

CROP = 48
BATCH = 3


@pytest.fixture(scope='module')
def config():
  return pipeline.source_config(['skimage:astronaut,chelsea,coffee,camera,coins'], crop_size=CROP)


def _take(config, count, seed=0, state=None, **kwargs):
  kwargs.setdefault('process_index', 0)
  kwargs.setdefault('process_count', 1)
  it = pipeline.make_train_iterator(config, seed=seed, batch_size=kwargs.pop('batch_size', BATCH), **kwargs)
  try:
    if state is not None:
      it.set_state(state)
    batches = []
    for _ in range(count):
      try:
        batches.append(next(it))
      except StopIteration:
        break
    return batches, it.get_state()
  finally:
    if hasattr(it, 'close'):
      it.close()


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['hq'], y['hq'])
    np.testing.assert_array_equal(x['lq'], y['lq'])


def test_batches_have_the_documented_contract(config):
  (batch,), _ = _take(config, 1)
  assert set(batch) == {'hq', 'lq'}
  for key in ('hq', 'lq'):
    assert batch[key].shape == (BATCH, CROP, CROP, 3) and batch[key].dtype == np.float32
    assert -1.0 <= batch[key].min() and batch[key].max() <= 1.0
  levels = (batch['lq'] + 1) / 2 * 255
  np.testing.assert_allclose(levels, np.rint(levels), atol=1e-3)  # LQ on the 8-bit grid
  assert not np.array_equal(batch['hq'], batch['lq'])


def test_same_seed_same_batches_and_other_seed_differs(config):
  first, _ = _take(config, 3, seed=5)
  again, _ = _take(config, 3, seed=5)
  other, _ = _take(config, 3, seed=6)
  _assert_same(first, again)
  assert not np.array_equal(first[0]['lq'], other[0]['lq'])


def test_worker_counts_give_identical_streams_and_resume(config):
  serial, _ = _take(config, 4, worker_count=0)
  one, _ = _take(config, 4, worker_count=1)
  _assert_same(serial, one)
  head, state = _take(config, 2, worker_count=2)
  _assert_same(serial[:2], head)
  tail, _ = _take(config, 2, worker_count=2, state=state)  # resumed from the saved iterator state
  _assert_same(serial[2:], tail)


def test_resume_from_saved_state_matches_uninterrupted_run(config):
  uninterrupted, _ = _take(config, 5, read_threads=2)
  _, state = _take(config, 3)
  resumed, _ = _take(config, 2, state=state, read_threads=2)
  _assert_same(uninterrupted[3:], resumed)


def test_processes_take_interleaved_shards_of_one_global_stream(config):
  whole, _ = _take(config, 4, batch_size=1)
  shard0, _ = _take(config, 2, batch_size=1, process_index=0, process_count=2)
  shard1, _ = _take(config, 2, batch_size=1, process_index=1, process_count=2)
  _assert_same(whole[0::2], shard0)
  _assert_same(whole[1::2], shard1)
  with pytest.raises(ValueError):
    _take(config, 1, process_index=2, process_count=2)


def test_epochs_visit_every_image_once_in_a_fresh_order(config):
  maker = pipeline.make_pair_maker(config, seed=9)
  n = len(maker.entries)
  assert sorted(maker.permutation(0)) == list(range(n)) == sorted(maker.permutation(1))
  assert any(not np.array_equal(maker.permutation(e), maker.permutation(0)) for e in range(1, 5))
  batches, _ = _take(config, 10, batch_size=1, num_epochs=1)
  assert len(batches) == n  # asked for 10, one epoch has n records
  assert len({b['hq'].tobytes() for b in batches}) == n


def test_default_config_uses_bundled_photos_and_jax_process_index():
  config = pipeline.source_config(crop_size=32)
  assert config.paths == ['skimage:'] and config.preset == 'omgsr_512'
  it = pipeline.make_train_iterator(config, seed=0, batch_size=2)
  assert next(it)['hq'].shape == (2, 32, 32, 3)
