"""OMGSR losses vs hand computations: LRR (Eq. 6), L1, BCE GAN (Eq. 12, 14), Dv3CD (Eq. 10-11)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.losses import basic, dists, gan
from sr_jax.models.dinov3 import DINOv3ConvNextModel, imagenet_normalize

TINY_DINO = dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])


def random_dino(config, seed=0):
  """A DINOv3-ConvNeXt with random params filled from numpy on the ``eval_shape`` tree.

  (A jitted ``init`` compiles for 10-20 s on the 2-core CI machine, mostly truncated-normal
  sampling; the structure is what matters here.) Layer scale 0.5 so the blocks contribute.
  """
  model = DINOv3ConvNextModel.from_config(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), model.dummy_inputs())['params']
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'gamma':
      return jnp.full(leaf.shape, 0.5, leaf.dtype)
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if name == 'scale':
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray(noise * (0.01 if name == 'bias' else 0.1))

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module')
def tiny_dino():
  return random_dino(TINY_DINO)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _np_bce(logits, target):
  s = _sigmoid(np.asarray(logits, np.float64))
  return -(target * np.log(s) + (1 - target) * np.log(1 - s))


def test_lrr_loss_by_hand():
  rng = np.random.default_rng(0)
  z_l, z_h, eps = (rng.normal(size=(2, 3, 3, 4)).astype(np.float32) for _ in range(3))
  a = 0.6357
  expected = np.mean((np.sqrt(a) * z_h + np.sqrt(1 - a) * eps - z_l) ** 2)
  loss, (grad_l, grad_h) = jax.jit(jax.value_and_grad(basic.lrr_loss, argnums=(0, 1)))(
      z_l, z_h, eps, a)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(grad_l, 2 * (z_l - np.sqrt(a) * z_h - np.sqrt(1 - a) * eps) / z_l.size,
                             rtol=1e-4, atol=1e-7)
  assert not np.any(grad_h)  # the HQ latent comes from the frozen VAE: a constant target


def test_l1_loss_by_hand():
  rng = np.random.default_rng(1)
  x, y = rng.uniform(-1, 1, size=(2, 2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(basic.l1_loss(x, y), np.abs(x - y).mean(), rtol=1e-6)


def test_gan_losses_by_hand():
  rng = np.random.default_rng(2)
  shapes = [(2, 3, 3), (2, 2, 2), (2, 1, 1)]
  fake = [rng.normal(size=s).astype(np.float32) * 3 for s in shapes]
  real = [rng.normal(size=s).astype(np.float32) * 3 for s in shapes]

  def by_hand(levels, target):  # per level mean over (h, w), summed over levels, mean over batch
    return np.mean(sum(_np_bce(l, target).reshape(2, -1).mean(1) for l in levels))

  np.testing.assert_allclose(jax.jit(gan.generator_gan_loss)(fake), by_hand(fake, 0.8), rtol=1e-5)
  loss_fake, loss_real = jax.jit(gan.discriminator_gan_loss)(fake, real)
  np.testing.assert_allclose(loss_fake, by_hand(fake, 0.0), rtol=1e-5)
  np.testing.assert_allclose(loss_real, by_hand(real, 0.8), rtol=1e-5)
  # Stable for large logits; minimum of the soft-label BCE at sigmoid(x) = 0.8.
  assert np.isfinite(gan.bce_with_logits(jnp.array([-1e4, 1e4]), 0.8)).all()
  grad = jax.jit(jax.grad(lambda x: gan.bce_with_logits(x, 0.8).sum()))(np.log([4.0]))
  np.testing.assert_allclose(grad, 0.0, atol=1e-6)


def test_hanning_l2_pool_by_hand():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1, 4, 5, 2)).astype(np.float32)
  w = np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5]) / 4.0
  padded = np.pad(x ** 2, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = np.zeros_like(x)
  for i in range(4):
    for j in range(5):
      expected[0, i, j] = np.einsum('hw,hwc->c', w, padded[0, i:i + 3, j:j + 3])
  np.testing.assert_allclose(dists.hanning_filter_3x3(), w, rtol=1e-7)
  np.testing.assert_allclose(dists.hanning_l2_pool(x), np.sqrt(expected + 1e-12), rtol=1e-5)


def test_dists_score_from_features_by_hand():
  rng = np.random.default_rng(4)
  shapes = [(2, 6, 6, 3), (2, 3, 3, 5)]
  fx = [np.abs(rng.normal(size=s)).astype(np.float32) for s in shapes]
  fy = [np.abs(rng.normal(size=s)).astype(np.float32) for s in shapes]
  w = 1.0 / (2 * (3 + 5))
  total = np.zeros(2)
  for a, b in zip(fx, fy):
    a, b = a.astype(np.float64), b.astype(np.float64)
    for n in range(2):
      for c in range(a.shape[-1]):
        x, y = a[n, ..., c], b[n, ..., c]
        s1 = (2 * x.mean() * y.mean() + 1e-6) / (x.mean() ** 2 + y.mean() ** 2 + 1e-6)
        cov = np.mean((x - x.mean()) * (y - y.mean()))
        s2 = (2 * cov + 1e-6) / (x.var() + y.var() + 1e-6)
        total[n] += w * (s1 + s2)
  np.testing.assert_allclose(dists.dists_score_from_features(fx, fy), 1 - total, rtol=1e-4,
                             atol=1e-6)


def test_l2pooled_features_structure(tiny_dino):
  model, params = tiny_dino
  x = np.random.default_rng(5).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)

  @jax.jit
  def features_and_level2_by_hand(p, im):
    # Level 2 = L2Pool(stage 1(L2Pool(stage 0(imagenet_normalize(x))))): pooled maps feed the next.
    h = model.apply({'params': p}, imagenet_normalize(im), 0, method='stage')
    h = model.apply({'params': p}, dists.hanning_l2_pool(h), 1, method='stage')
    return dists.l2pooled_dinov3_features(model, p, im), dists.hanning_l2_pool(h)

  feats, level2 = features_and_level2_by_hand(params, x)
  assert [f.shape for f in feats] == [(2, 32, 32, 3), (2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 48)]
  np.testing.assert_allclose(feats[0], x * 0.5 + 0.5, rtol=1e-6)  # level 0: raw image, unpooled
  np.testing.assert_allclose(feats[2], level2, rtol=1e-5, atol=1e-6)


def test_dv3cd_identity_positive_and_gradients(tiny_dino):
  model, params = tiny_dino
  rng = np.random.default_rng(6)
  x = rng.uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
  loss_and_grads = jax.jit(jax.value_and_grad(
      lambda p, a, b: dists.dv3cd_loss(model, p, a, b), argnums=(0, 1, 2)))
  same, _ = loss_and_grads(params, x, x)
  assert abs(float(same)) < 1e-6
  loss, (g_params, g_pred, g_target) = loss_and_grads(params, y, x)
  assert float(loss) > 1e-3
  assert np.isfinite(np.asarray(g_pred)).all() and np.abs(np.asarray(g_pred)).max() > 0
  assert all(not np.any(np.asarray(g)) for g in jax.tree_util.tree_leaves(g_params))  # frozen
  assert not np.any(np.asarray(g_target))
