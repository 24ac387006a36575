"""layers.gelu_exact: PyTorch's exact GELU formula, equal to jax.nn.gelu(approximate=False)."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from sr_jax.models import layers


def test_gelu_exact_equals_torch_and_jax_gelu():
  x = np.concatenate([np.linspace(-12, 12, 4801), np.random.default_rng(0).normal(0, 3, 10000)])
  x = x.astype(np.float32)
  ours = np.asarray(jax.jit(layers.gelu_exact)(x))
  want = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(ours, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours, jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  assert layers.get_activation('gelu') is layers.gelu_exact


def test_gelu_exact_keeps_bfloat16():
  x = jnp.linspace(-4, 4, 101, dtype=jnp.bfloat16)
  out = layers.gelu_exact(x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), jax.nn.gelu(x.astype(jnp.float32),
                                                                   approximate=False), atol=3e-2)
