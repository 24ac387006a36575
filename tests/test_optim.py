"""Shared training pieces: optimizers over parameter groups and gradient accumulation."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sr_jax.methods import common

OPTIM = dict(learning_rate=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)


def _params():
  return {'generator': {'w': jnp.ones((3,))}, 'heads': {'v': jnp.full((2,), 2.0)}}


def _transforms():
  return {'generator': common.adamw(OPTIM), 'heads': common.adamw(OPTIM, learning_rate=0.01)}


def test_optimizer_step_updates_only_the_groups_given():
  transforms, params = _transforms(), _params()
  states = common.init_optimizers(transforms, params)
  grads = {'heads': {'v': jnp.array([1.0, -1.0])}}
  new_params, new_states, norms = common.optimizer_step(transforms, grads, states, params)
  assert new_params['generator'] is params['generator']
  assert new_states['generator'] is states['generator']
  # Adam's first step moves each entry by lr * sign(g) (bias-corrected), at the heads' own rate.
  np.testing.assert_allclose(new_params['heads']['v'], [1.99, 2.01], rtol=1e-5)
  np.testing.assert_allclose(norms['heads'], np.sqrt(2.0), rtol=1e-6)
  assert set(norms) == {'heads'}


def test_each_group_is_clipped_by_its_own_norm():
  transforms = {'a': optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)),
                'b': optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))}
  params = {'a': jnp.zeros((1,)), 'b': jnp.zeros((1,))}
  states = common.init_optimizers(transforms, params)
  grads = {'a': jnp.array([10.0]), 'b': jnp.array([0.5])}
  new_params, _, _ = common.optimizer_step(transforms, grads, states, params)
  np.testing.assert_allclose(new_params['a'], [-1.0])   # clipped to norm 1 within its group
  np.testing.assert_allclose(new_params['b'], [-0.5])   # untouched by group a's norm


def test_init_optimizers_names_a_missing_group():
  with pytest.raises(KeyError, match="no params for the optimizer groups \\['heads'\\]"):
    common.init_optimizers(_transforms(), {'generator': {}})


def test_accumulated_gradients_are_the_full_batch_mean_and_thread_the_carry():
  params = {'generator': {'w': jnp.arange(3.0)}}
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
  batch = {'lq': x, 'hq': x @ jnp.array([1.0, -2.0, 0.5])}
  loss = lambda p, b: jnp.mean((b['lq'] @ p['generator']['w'] - b['hq']) ** 2)

  def grads_fn(micro_batch, rng, carry):
    del rng
    return jax.grad(loss)(params, micro_batch), carry + 1, {'n': micro_batch['lq'].shape[0]}

  grads, carry, metrics = jax.jit(lambda b: common.accumulate_gradients(
      grads_fn, params, b, 4, jax.random.key(0), jnp.int32(0)))(batch)
  np.testing.assert_allclose(grads['generator']['w'], jax.grad(loss)(params, batch)['generator']['w'],
                             rtol=1e-5)
  assert int(carry) == 4 and float(metrics['n']) == 2.0


def test_micro_batches_take_every_count_th_example():
  batch = {'x': jnp.arange(6)}
  np.testing.assert_array_equal(common.split_micro_batches(batch, 2)['x'], [[0, 2, 4], [1, 3, 5]])
  with pytest.raises(ValueError, match='does not split into 4'):
    common.split_micro_batches(batch, 4)
