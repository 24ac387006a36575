"""The CPU fast paths of sr_jax/models/kernels.py compute what the plain lax / jax.nn ops compute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sr_jax.models import kernels

NHWC = ('NHWC', 'HWIO', 'NHWC')
TOL = dict(rtol=1e-5, atol=1e-5)  # float32; the paths only reorder sums


def _lax_conv(x, k, padding, groups=1):
  return lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=NHWC,
                                  feature_group_count=groups, precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize('shape,padding', [((1, 64, 64, 8), ((1, 1), (1, 1))),
                                           ((2, 47, 65, 5), ((1, 1), (1, 1))),
                                           ((1, 70, 60, 3), ((0, 0), (2, 1)))])
def test_winograd_3x3_equals_direct_convolution(shape, padding):
  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape)
  k = jax.random.normal(kk, (3, 3, shape[-1], 6)) / 3
  got = kernels.winograd_conv3x3(x, k, padding, precision=lax.Precision.HIGHEST)
  np.testing.assert_allclose(got, _lax_conv(x, k, padding), **TOL)


def test_conv_dispatch_takes_winograd_above_threshold_and_matches_lax():
  x = jax.random.normal(jax.random.key(1), (1, 72, 72, 4))  # 5184 >= WINOGRAD_MIN_PIXELS outputs
  k = jax.random.normal(jax.random.key(2), (3, 3, 4, 4))
  pad = ((1, 1), (1, 1))
  jaxpr = str(jax.make_jaxpr(lambda a, b: kernels.conv_general_dilated(
      a, b, (1, 1), pad, dimension_numbers=NHWC))(x, k))
  assert 'conv_general_dilated' not in jaxpr  # the Winograd route, not Eigen
  got = kernels.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=NHWC,
                                     precision=lax.Precision.HIGHEST)
  np.testing.assert_allclose(got, _lax_conv(x, k, pad), **TOL)


def test_depthwise_equals_grouped_convolution():
  x = jax.random.normal(jax.random.key(3), (2, 20, 17, 12))
  k = jax.random.normal(jax.random.key(4), (7, 7, 1, 12)) / 7
  pad = ((3, 3), (3, 3))
  got = kernels.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=NHWC,
                                     feature_group_count=12)
  np.testing.assert_allclose(got, _lax_conv(x, k, pad, groups=12), **TOL)


def test_winograd_gradients_equal_direct_convolution_gradients():
  x = jax.random.normal(jax.random.key(5), (1, 66, 66, 3))
  k = jax.random.normal(jax.random.key(6), (3, 3, 3, 5))
  pad = ((1, 1), (1, 1))
  loss = lambda conv: lambda a, b: jnp.sum(jnp.sin(conv(a, b)))
  fast = jax.grad(loss(lambda a, b: kernels.winograd_conv3x3(a, b, pad, lax.Precision.HIGHEST)),
                  argnums=(0, 1))(x, k)
  slow = jax.grad(loss(lambda a, b: _lax_conv(a, b, pad)), argnums=(0, 1))(x, k)
  for f, s in zip(fast, slow):
    np.testing.assert_allclose(f, s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('chunk_scores', [None, 64 * 40])  # one chunk; several chunks + padding
def test_chunked_attention_equals_dot_product_attention(chunk_scores):
  kq, kk, kv = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(kq, (2, 37, 3, 8))
  k = jax.random.normal(kk, (2, 40, 3, 8))
  v = jax.random.normal(kv, (2, 40, 3, 8))
  got = kernels.chunked_attention(q, k, v, chunk_scores=chunk_scores)
  np.testing.assert_allclose(got, jax.nn.dot_product_attention(q, k, v), **TOL)
