"""OMGSR discriminator: BlurPool, spectral norm, DiffAugment, head shapes, frozen backbone."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.losses import gan
from sr_jax.models import discriminator as disc
from sr_jax.models.dinov3 import DINOv3ConvNextModel

LARGE_CHANNELS = (192, 384, 768)


def test_blur_pool_by_hand():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 6, 4, 2)).astype(np.float32)
  a = np.array([1.0, 3.0, 3.0, 1.0])
  w = np.outer(a, a) / 64.0
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zero pad 1 on every side
  expected = np.zeros((1, 3, 2, 2), np.float32)
  for i in range(3):
    for j in range(2):
      expected[0, i, j] = np.einsum('hw,hwc->c', w, padded[0, 2 * i:2 * i + 4, 2 * j:2 * j + 4])
  np.testing.assert_allclose(jax.jit(disc.blur_pool)(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('resolution', [512, 1024, 64])
def test_large_heads_end_at_one_logit_per_level(resolution):
  heads = disc.DiscriminatorHeads(LARGE_CHANNELS, resolution)
  features = [jax.ShapeDtypeStruct(f.shape, f.dtype) for f in heads.dummy_inputs()]
  variables = jax.eval_shape(heads.init, jax.random.key(0), features)
  logits = jax.eval_shape(lambda v, f: heads.apply(v, f), variables, features)
  assert [l.shape for l in logits] == [(1, 1, 1)] * 3
  # Channel flow (OMGSR dinov3_convnext_disc.py, 512): L0 192->96->96->96->1, L2 768->384->192->96->1.
  params = variables['params']
  if resolution == 512:
    assert [params['decoders_0'][f'conv_{k}']['kernel'].shape[-1] for k in range(3)] == [96, 96, 96]
    assert [params['decoders_2'][f'conv_{k}']['kernel'].shape[-1] for k in range(3)] == [384, 192, 96]
  assert params['decoders_1']['conv_out']['kernel'].shape[:2] == (1, 1)
  assert variables['spectral']['decoders_0']['conv_0']['v'].shape == (192 * 9,)


def test_unknown_resolution_raises():
  with pytest.raises(ValueError, match='got 768'):
    disc.head_config(768)


def _random_variables(module, *args, seed=0):
  """Variables filled from numpy on the ``eval_shape`` tree: a jitted ``init`` spends seconds per
  threefry draw compiling on the CPU CI machine. u, v normalised as their initialiser does."""
  shapes = jax.eval_shape(lambda key: module.init(key, *args), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    value = rng.normal(size=leaf.shape).astype(np.float32) * 0.2
    if path[0].key == 'spectral':
      value /= np.linalg.norm(value)
    return jnp.asarray(value)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _sn_conv():
  conv = disc.SpectralNormConv(features=6, kernel_size=3, strides=2, padding=1)
  x = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  return conv, x, _random_variables(conv, x, True)


def test_spectral_norm_power_iteration_converges_to_unit_sigma():
  conv, x, variables = _sn_conv()

  @jax.jit
  def iterate(v):
    def body(_, spectral):
      _, upd = conv.apply({'params': v['params'], 'spectral': spectral}, x, True,
                          mutable=['spectral'])
      return upd['spectral']
    return jax.lax.fori_loop(0, 200, body, v['spectral'])

  spectral = iterate(variables)
  kernel = np.asarray(variables['params']['kernel'], np.float64)
  matrix = kernel.transpose(3, 2, 0, 1).reshape(6, -1)
  sigma_true = np.linalg.svd(matrix, compute_uv=False)[0]
  sigma, _, _ = disc.spectral_sigma(jnp.asarray(matrix, jnp.float32), spectral['u'],
                                    spectral['v'], False)
  assert float(sigma) == pytest.approx(sigma_true, rel=1e-4)
  assert np.linalg.svd(matrix / float(sigma), compute_uv=False)[0] == pytest.approx(1.0, rel=1e-4)
  # Eval mode: no iteration, state untouched (an immutable apply cannot write it).
  out_eval = conv.apply({'params': variables['params'], 'spectral': spectral}, x, False)
  assert out_eval.shape == (2, 4, 4, 6)


def test_spectral_norm_matches_torch_spectral_norm():
  torch = pytest.importorskip('torch')
  conv, x, variables = _sn_conv()
  kernel = np.asarray(variables['params']['kernel'])
  tconv = torch.nn.Conv2d(4, 6, 3, 2, 1)
  with torch.no_grad():
    tconv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
    tconv.bias.copy_(torch.from_numpy(np.array(variables['params']['bias'])))
  tconv = torch.nn.utils.spectral_norm(tconv)
  with torch.no_grad():
    tconv.weight_u.copy_(torch.from_numpy(np.array(variables['spectral']['u'])))
    tconv.weight_v.copy_(torch.from_numpy(np.array(variables['spectral']['v'])))
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  apply = jax.jit(lambda v, inp, train: conv.apply(v, inp, train, mutable=['spectral']),
                  static_argnums=2)
  for train in (True, True, False):  # two training calls (u, v advance), then eval
    tconv.train(train)
    with torch.no_grad():
      expected = tconv(tx).numpy().transpose(0, 2, 3, 1)
    out, updates = apply(variables, x, train)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    variables = {'params': variables['params'], 'spectral': updates['spectral']}
    np.testing.assert_allclose(variables['spectral']['u'], tconv.weight_u.numpy(), atol=1e-5)
    np.testing.assert_allclose(variables['spectral']['v'], tconv.weight_v.numpy(), atol=1e-5)


def _np_diff_augment(x, p):
  """numpy port of the DiffAugment reference (NCHW index arithmetic, transposed to NHWC)."""
  b, h, w, _ = x.shape
  x = x + p['brightness'][:, None, None, None]
  m = x.mean(axis=3, keepdims=True)
  x = (x - m) * p['saturation'][:, None, None, None] + m
  m = x.mean(axis=(1, 2, 3), keepdims=True)
  x = (x - m) * p['contrast'][:, None, None, None] + m
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.empty_like(x)
  for n in range(b):
    rows = np.clip(np.arange(h) + p['translate_h'][n] + 1, 0, h + 1)
    cols = np.clip(np.arange(w) + p['translate_w'][n] + 1, 0, w + 1)
    out[n] = padded[n][rows][:, cols]
  cut_h, cut_w = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
  mask = np.ones((b, h, w), x.dtype)
  for n in range(b):
    rows = np.clip(np.arange(cut_h) + p['cutout_h'][n] - cut_h // 2, 0, h - 1)
    cols = np.clip(np.arange(cut_w) + p['cutout_w'][n] - cut_w // 2, 0, w - 1)
    mask[n][np.ix_(rows, cols)] = 0
  return out * mask[..., None]


def test_diff_augment_matches_reference_and_is_deterministic():
  x = np.random.default_rng(2).uniform(-1, 1, size=(6, 16, 12, 3)).astype(np.float32)
  augment = jax.jit(disc.diff_augment)
  key = jax.random.key(7)
  out = np.asarray(augment(x, key))
  assert out.shape == x.shape
  np.testing.assert_array_equal(out, np.asarray(augment(x, key)))
  assert not np.allclose(out, np.asarray(augment(x, jax.random.key(8))))
  draw = jax.jit(disc._draw_augment_params, static_argnums=(1, 2, 3))
  params = {k: np.asarray(v) for k, v in draw(key, 6, 16, 12).items()}
  assert np.abs(params['translate_h']).max() <= 2 and np.abs(params['translate_w']).max() <= 2
  assert params['cutout_h'].min() >= 0 and params['cutout_h'].max() <= 16  # randint(0, 16 + 1)
  np.testing.assert_allclose(out, _np_diff_augment(x, params), rtol=1e-5, atol=1e-5)


def test_diff_augment_draw_ranges():
  p = jax.jit(disc._draw_augment_params, static_argnums=(1, 2, 3))(jax.random.key(0), 4000, 8, 7)
  # Reference: randint(-1, 2) for an 8 (or 7) pixel side; cutout size 4 -> randint(0, 9), size 4
  # of side 7 -> int(4.0) = 4 -> randint(0, 8).
  assert set(np.unique(p['translate_h']).tolist()) == {-1, 0, 1}
  assert set(np.unique(p['cutout_h']).tolist()) == set(range(9))
  assert set(np.unique(p['cutout_w']).tolist()) == set(range(8))
  assert 0.0 <= float(p['saturation'].min()) and float(p['saturation'].max()) < 2.0
  assert -0.5 <= float(p['brightness'].min()) and float(p['brightness'].max()) < 0.5


def _random_tiny_dino():
  model = DINOv3ConvNextModel.from_config(dict(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1]))
  shapes = jax.eval_shape(model.init, jax.random.key(0), model.dummy_inputs())['params']
  rng = np.random.default_rng(0)
  fill = lambda leaf: jnp.asarray(rng.normal(size=leaf.shape).astype(np.float32) * 0.1)
  return model, jax.tree.map(fill, shapes)  # random init; eval_shape avoids a slow jitted init


def test_discriminator_call_shapes_at_512():
  dino, dino_params = _random_tiny_dino()
  heads = disc.DiscriminatorHeads(channels=(16, 32, 48), resolution=512)
  head_vars = jax.eval_shape(heads.init, jax.random.key(1), heads.dummy_inputs())
  images = jax.ShapeDtypeStruct((2, 512, 512, 3), jnp.float32)
  logits, spectral = jax.eval_shape(
      lambda v, x: disc.discriminator_logits(dino, dino_params, heads, v, x, jax.random.key(2),
                                             train=True), head_vars, images)
  assert [l.shape for l in logits] == [(2, 1, 1)] * 3
  assert jax.tree.structure(spectral) == jax.tree.structure(head_vars['spectral'])


def test_discriminator_call_trains_heads_only():
  dino, dino_params = _random_tiny_dino()
  # Small custom heads on 64^2 images keep the compile short; the 512/1024 tables are checked above.
  heads = disc.DiscriminatorHeads(channels=(16, 32, 48),
                                  level_configs=(((0.5,), (2,)), ((0.5,), (2,)), ((0.5,), (1,))))
  features = [jnp.zeros((1, 16 // 2 ** i, 16 // 2 ** i, c)) for i, c in enumerate((16, 32, 48))]
  head_vars = _random_variables(heads, features, seed=1)
  images = np.random.default_rng(3).uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32)

  @jax.jit
  def generator_step(dino_p, head_p, spectral, x, key):
    def loss_fn(dino_p, head_p, x):
      logits, new_spectral = disc.discriminator_logits(
          dino, dino_p, heads, {'params': head_p, 'spectral': spectral}, x, key, train=True)
      return gan.generator_gan_loss(logits), (logits, new_spectral)
    return jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(dino_p, head_p, x)

  (g_dino, g_heads, g_images), (logits, new_spectral) = generator_step(
      dino_params, head_vars['params'], head_vars['spectral'], images, jax.random.key(4))
  assert [l.shape for l in logits] == [(2, 2, 2), (2, 1, 1), (2, 1, 1)]
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_dino))  # frozen backbone
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(g_heads))
  assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(g_heads))
  assert np.isfinite(np.asarray(g_images)).all() and np.any(np.asarray(g_images))  # reaches G
  # Train mode: one power iteration per call (a 1-element u of the 1-channel conv stays +-1).
  for level in range(3):
    old, new = head_vars['spectral'][f'decoders_{level}'], new_spectral[f'decoders_{level}']
    assert not np.allclose(old['conv_0']['u'], new['conv_0']['u'])
    assert not np.allclose(old['conv_out']['v'], new['conv_out']['v'])
  # Eval mode returns the stored state unchanged.
  _, same = jax.jit(lambda v, x: disc.discriminator_logits(dino, dino_params, heads, v, x, None,
                                                           train=False))(head_vars, images)
  assert jax.tree.all(jax.tree.map(np.array_equal, same, head_vars['spectral']))
