"""layers.GroupNorm: nn.GroupNorm's params and values, statistics reduced minor axis first."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.models import layers


@pytest.mark.parametrize('shape', [(2, 9, 7, 64), (1, 33, 96), (3, 4, 4, 32)])
def test_group_norm_equals_flax_group_norm(shape):
  x = 3.0 * jax.random.normal(jax.random.key(0), shape) + 1.5  # an offset, so E[x]^2 matters
  ours = layers.GroupNorm(num_groups=16, epsilon=1e-6)
  params = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(
      jnp.shape, nn.GroupNorm(num_groups=16, epsilon=1e-6).init(jax.random.key(1), x))
  keys = jax.random.split(jax.random.key(2), 2)
  params = {'params': {'scale': 1 + jax.random.normal(keys[0], (shape[-1],)),
                       'bias': jax.random.normal(keys[1], (shape[-1],))}}
  want = nn.GroupNorm(num_groups=16, epsilon=1e-6).apply(params, x)
  np.testing.assert_allclose(ours.apply(params, x), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('cpu_path', [True, False])
def test_group_norm_moments_are_per_sample_and_group(cpu_path, monkeypatch):
  monkeypatch.setattr(layers.cpu_kernels, 'on_cpu', lambda: cpu_path)  # the GPU/TPU path runs here too
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 8)) * jnp.arange(1, 9) + jnp.arange(8)
  mean, var = layers.group_norm_moments(x, 4)
  groups = np.asarray(x).reshape(2, 30, 4, 2).transpose(0, 2, 1, 3).reshape(2, 4, 60)
  np.testing.assert_allclose(mean, groups.mean(-1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(var, groups.var(-1), rtol=1e-4, atol=1e-5)


def test_group_norm_bfloat16_computes_in_float32_and_returns_bfloat16():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 64)).astype(jnp.bfloat16) + 4
  norm = layers.GroupNorm(num_groups=32, dtype=jnp.bfloat16)
  params = norm.init(jax.random.key(1), x)
  out = norm.apply(params, x)
  assert out.dtype == jnp.bfloat16
  want = layers.GroupNorm(num_groups=32).apply(params, x.astype(jnp.float32))
  np.testing.assert_allclose(out.astype(jnp.float32), want, atol=2e-2)


def test_group_norm_rejects_channels_that_do_not_split_into_groups():
  with pytest.raises(ValueError, match='30 channels do not split into 32 groups'):
    layers.GroupNorm(num_groups=32).init(jax.random.key(0), jnp.zeros((1, 4, 4, 30)))
