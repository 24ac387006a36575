"""The CPU fast paths of sr_jax/models/cpu_kernels.py compute what the plain lax / jax.nn ops compute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sr_jax.models import cpu_kernels
from sr_jax.models import layers
from sr_jax.models.dinov3 import DINOv3ConvNextLayer
from sr_jax import xla

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
  got = cpu_kernels.winograd_conv3x3(x, k, padding, precision=lax.Precision.HIGHEST)
  np.testing.assert_allclose(got, _lax_conv(x, k, padding), **TOL)


def _dispatch(x, k, pad):
  return lambda: cpu_kernels.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=NHWC,
                                              precision=lax.Precision.HIGHEST)


def _primitives(fn):
  return {e.primitive.name for e in jax.make_jaxpr(fn)().jaxpr.eqns}


def test_conv_dispatch_picks_each_path_by_size_and_channels_and_matches_lax(monkeypatch):
  pad = ((1, 1), (1, 1))
  small = jax.random.normal(jax.random.key(1), (2, 9, 7, 4))    # small maps: XLA's convolution
  k = jax.random.normal(jax.random.key(2), (3, 3, 4, 5))
  assert 'conv_general_dilated' in _primitives(_dispatch(small, k, pad))
  k1x3 = jax.random.normal(jax.random.key(3), (1, 3, 4, 5))   # any kernel size, asymmetric padding
  np.testing.assert_allclose(_dispatch(small, k1x3, ((0, 0), (2, 0)))(),
                             _lax_conv(small, k1x3, ((0, 0), (2, 0))), **TOL)

  big = jax.random.normal(jax.random.key(4), (1, 20, 20, 4))    # 400 pixels: lax
  assert 'conv_general_dilated' in _primitives(_dispatch(big, k, pad))
  monkeypatch.setattr(cpu_kernels, 'WINOGRAD_MIN_PIXELS', 400)      # a small model of the VAE rule
  assert 'conv_general_dilated' not in _primitives(_dispatch(big, k, pad))  # Winograd
  np.testing.assert_allclose(_dispatch(big, k, pad)(), _lax_conv(big, k, pad), **TOL)


@pytest.mark.parametrize('channels', [12, 7, 192])  # blocks of 6; 7 of 1 (prime); 3 of 64
def test_depthwise_equals_grouped_convolution(channels):
  x = jax.random.normal(jax.random.key(3), (2, 20, 17, channels))
  k = jax.random.normal(jax.random.key(4), (7, 7, 1, channels)) / 7
  pad = ((3, 3), (3, 3))
  conv = lambda a, b: cpu_kernels.conv_general_dilated(a, b, (1, 1), pad, dimension_numbers=NHWC,
                                                   feature_group_count=channels)
  np.testing.assert_allclose(conv(x, k), _lax_conv(x, k, pad, groups=channels), **TOL)
  loss = lambda fn: lambda a, b: jnp.sum(jnp.sin(fn(a, b)))
  fast = jax.grad(loss(conv), argnums=(0, 1))(x, k)
  slow = jax.grad(loss(lambda a, b: _lax_conv(a, b, pad, groups=channels)), argnums=(0, 1))(x, k)
  for f, s in zip(fast, slow):
    np.testing.assert_allclose(f, s, rtol=1e-4, atol=1e-4)


def test_depthwise_bfloat16_accumulates_in_float32():
  x = jax.random.normal(jax.random.key(3), (1, 16, 16, 8)).astype(jnp.bfloat16)
  k = (jax.random.normal(jax.random.key(4), (7, 7, 1, 8)) / 7).astype(jnp.bfloat16)
  got = cpu_kernels.depthwise_conv(x, k, ((3, 3), (3, 3)))
  assert got.dtype == jnp.bfloat16
  want = _lax_conv(x.astype(jnp.float32), k.astype(jnp.float32), ((3, 3), (3, 3)), groups=8)
  np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.bfloat16).astype(jnp.float32),
                             rtol=1e-2, atol=1e-2)


def test_depthwise_is_computed_once_in_a_convnext_block():
  """The block's LayerNorm reads the convolution three times (mean, mean of squares, normalisation):
  compiled with sr_jax's options, the 49 taps appear once, not once per reader (144 without the
  loop over channel blocks)."""
  layer = DINOv3ConvNextLayer(128)
  x = jnp.ones((1, 16, 16, 128))
  params = layer.init(jax.random.key(0), x)
  compiled = jax.jit(layer.apply, compiler_options=xla.compiler_options()).lower(params, x)
  hlo = compiled.compile().as_text()
  taps = [line for line in hlo.splitlines()
          if ' slice(' in line and line.split('=')[1].strip().startswith('f32[1,16,16,')]
  assert len(taps) == 49, len(taps)


@pytest.mark.parametrize('conv,shape', [(cpu_kernels.winograd_conv3x3, (1, 66, 66, 3))])
def test_fast_conv_gradients_equal_direct_convolution_gradients(conv, shape):
  x = jax.random.normal(jax.random.key(5), shape)
  k = jax.random.normal(jax.random.key(6), (3, 3, 3, 5))
  pad = ((1, 1), (1, 1))
  loss = lambda fn: lambda a, b: jnp.sum(jnp.sin(fn(a, b)))
  fast = jax.grad(loss(lambda a, b: conv(a, b, pad, lax.Precision.HIGHEST)), argnums=(0, 1))(x, k)
  slow = jax.grad(loss(lambda a, b: _lax_conv(a, b, pad)), argnums=(0, 1))(x, k)
  for f, s in zip(fast, slow):
    np.testing.assert_allclose(f, s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('chunk_scores', [None, 16 * 40])  # one block; 3 blocks + padding
def test_chunked_attention_equals_dot_product_attention(chunk_scores):
  kq, kk, kv = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(kq, (2, 37, 3, 8))
  k = jax.random.normal(kk, (2, 40, 3, 8))
  v = jax.random.normal(kv, (2, 40, 3, 8))
  got = cpu_kernels.chunked_attention(q, k, v, chunk_scores=chunk_scores)
  np.testing.assert_allclose(got, jax.nn.dot_product_attention(q, k, v), **TOL)


def test_winograd_derivative_is_one_direct_conv_without_frozen_kernel_gradient():
  """Differentiating w.r.t. the input only: the tangent map is one direct conv (no kernel-gradient
  conv, and not the Winograd transforms, whose transpose would hold 4x-sized tiles)."""
  x = jax.random.normal(jax.random.key(8), (2, 66, 64, 3))  # batch 2: the per-image lax.map path
  k = jax.random.normal(jax.random.key(9), (3, 3, 3, 5))
  pad = ((1, 1), (1, 1))
  loss = lambda a: jnp.sum(jnp.sin(cpu_kernels.winograd_conv3x3(a, k, pad, lax.Precision.HIGHEST)))
  np.testing.assert_allclose(
      jax.grad(loss)(x), jax.grad(lambda a: jnp.sum(jnp.sin(_lax_conv(a, k, pad))))(x),
      rtol=1e-4, atol=1e-4)
  linear = jax.linearize(loss, x)[1]
  eqns = [e.primitive.name for e in jax.make_jaxpr(linear)(x).jaxpr.eqns]
  assert eqns.count('conv_general_dilated') == 1 and 'dot_general' not in eqns, eqns


def test_chunked_attention_gradients_match_and_scores_are_recomputed():
  kq, kk, kv = jax.random.split(jax.random.key(10), 3)
  q = jax.random.normal(kq, (1, 64, 2, 8))
  k = jax.random.normal(kk, (1, 48, 2, 8))
  v = jax.random.normal(kv, (1, 48, 2, 8))
  loss = lambda attend: lambda *qkv: jnp.sum(jnp.sin(attend(*qkv)))
  chunked = lambda *qkv: cpu_kernels.chunked_attention(*qkv, chunk_scores=16 * 48)  # 4 blocks/head
  got = jax.grad(loss(chunked), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  # Kept for the backward: q/k/v-sized arrays only, never a (chunks of) score-sized one.
  _, linear = jax.linearize(loss(chunked), q, k, v)
  kept = sum(c.size for c in jax.tree.leaves(linear) if hasattr(c, 'size'))
  assert kept < 2 * 64 * 48, kept


def test_compiler_options_keep_dots_off_ynnpack_on_cpu():
  options = xla.compiler_options()
  assert options == {'xla_cpu_experimental_ynn_fusion_type': ''}  # the tests run on the CPU
  assert xla.training_compiler_options() == {
      **options, 'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
  dense_gelu = lambda a, b: jax.nn.gelu(a @ b + 1.0)
  x = jnp.ones((64, 64))
  hlo = lambda **kw: jax.jit(dense_gelu, **kw).lower(x, x).compile().as_text()
  assert 'ynn_fusion' in hlo()  # jaxlib's default, slower on every model (benchmarks/RESULTS.md)
  assert 'ynn_fusion' not in hlo(compiler_options=options)


def test_cudnn_attention_only_for_half_precision_and_even_sequence_lengths(monkeypatch):
  # cuDNN's flash backward refuses odd lengths (the UNet's 77 text tokens): seen on an H200, jax 0.11.
  monkeypatch.setattr(layers.jax, 'default_backend', lambda: 'gpu')
  assert layers.attention_implementation(jnp.bfloat16, 64, 4096, 4096) == 'cudnn'
  assert layers.attention_implementation(jnp.float16, 64, 1024, 78) == 'cudnn'
  assert layers.attention_implementation(jnp.bfloat16, 64, 4096, 77) is None
  assert layers.attention_implementation(jnp.bfloat16, 512, 4096, 4096) is None  # VAE mid-block
  assert layers.attention_implementation(jnp.float32, 64, 4096, 4096) is None
  monkeypatch.setattr(layers.jax, 'default_backend', lambda: 'cpu')
  assert layers.attention_implementation(jnp.bfloat16, 64, 4096, 4096) is None


@pytest.mark.parametrize('n', [77, 256, 4096, 384])
def test_row_max_equals_max_over_the_last_axis(n):
  x = jax.random.normal(jax.random.key(n), (3, 5, n))
  x = x.at[1, 2, n // 3].set(50.0)  # the max inside one slice, away from the first
  np.testing.assert_array_equal(cpu_kernels.row_max(x), x.max(axis=-1))
