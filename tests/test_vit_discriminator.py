"""TUDSR ViT discriminator heads: vs plain PyTorch, shapes, frozen backbone, DiffAugment."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.losses import gan
from sr_jax.models import vit_discriminator as vd
from sr_jax.models.dinov3 import imagenet_normalize


def _random_variables(module, *args, seed=0):
  """Variables filled from numpy on the ``eval_shape`` tree (no slow jitted init): kernels
  U(+-1/sqrt(fan_in)) like torch, 1-D params N(0, 0.2) (LayerNorm scales around 1), u/v normalised."""
  shapes = jax.eval_shape(lambda key: module.init(key, *args), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [getattr(p, 'key', '') for p in path]
    if names[0] == 'spectral':
      value = rng.normal(size=leaf.shape)
      value /= np.linalg.norm(value)
    elif len(leaf.shape) == 2:
      value = rng.uniform(-1, 1, size=leaf.shape) / np.sqrt(leaf.shape[0])
    else:
      value = rng.normal(size=leaf.shape) * 0.2 + (1.0 if names[-1] == 'scale' else 0.0)
    return jnp.asarray(value.astype(np.float32))

  return jax.tree_util.tree_map_with_path(fill, shapes)


# ------------------------------------------------------------------------------ building blocks


def test_space_to_depth_channel_order():
  x = np.random.default_rng(0).normal(size=(2, 4, 6, 3)).astype(np.float32)
  out = np.asarray(vd.space_to_depth(jnp.asarray(x)))
  assert out.shape == (2, 2, 3, 12)
  for i in range(2):
    for j in range(3):
      for c in range(3):
        for s1 in range(2):
          for s2 in range(2):  # einops '(h s1) (w s2) c -> (h w) (c s1 s2)'
            np.testing.assert_array_equal(out[:, i, j, 4 * c + 2 * s1 + s2],
                                          x[:, 2 * i + s1, 2 * j + s2, c])
  with pytest.raises(ValueError, match='even'):
    vd.space_to_depth(jnp.zeros((1, 3, 4, 2)))


@pytest.mark.parametrize('size', [(6, 5), (2, 2), (1, 3)])
def test_token_blur_pool_by_hand(size):
  x = np.random.default_rng(1).normal(size=(1, *size, 2)).astype(np.float32)
  a = np.array([1.0, 4.0, 6.0, 4.0, 1.0])
  w = np.outer(a, a) / 256.0
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='reflect')
  expected = np.zeros_like(x)
  for i in range(size[0]):
    for j in range(size[1]):
      expected[0, i, j] = np.einsum('hw,hwc->c', w, padded[0, i:i + 5, j:j + 5])
  np.testing.assert_allclose(vd.token_blur_pool(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------- vs a PyTorch reference


def _torch_heads(torch, channels, num_levels, num_downsamples, grid):
  """The heads as described (OMGSR f83a88f dinov3_vit_discrminator.py), in plain PyTorch on
  (B, N, C) token lists: pixel_unshuffle's channel order (c, s1, s2) is einops'."""
  tnn, F = torch.nn, torch.nn.functional

  class BlurPool(tnn.Module):
    def __init__(self, channels):
      super().__init__()
      a = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
      filt = a[:, None] * a[None, :]
      self.register_buffer('filt', (filt / filt.sum())[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x):  # NCHW
      return F.conv2d(tnn.ReflectionPad2d(2)(x), self.filt, groups=x.shape[1])

  class Block(tnn.Module):  # DINOv3 SelfAttentionBlock(dim, dim // 64 heads), qkv_bias False
    def __init__(self, dim):
      super().__init__()
      self.heads = max(1, dim // 64)
      self.norm1, self.norm2 = tnn.LayerNorm(dim), tnn.LayerNorm(dim)
      self.qkv = tnn.Linear(dim, 3 * dim, bias=False)
      self.proj = tnn.Linear(dim, dim)
      self.fc1, self.fc2 = tnn.Linear(dim, 4 * dim), tnn.Linear(4 * dim, dim)

    def forward(self, x):
      b, n, c = x.shape
      qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads)
      q, k, v = [t.transpose(1, 2) for t in torch.unbind(qkv, 2)]
      a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
      x = x + self.proj(a)
      return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

  class Head(tnn.Module):
    def __init__(self):
      super().__init__()
      dims = [channels // 2 ** k for k in range(num_downsamples + 1)]
      self.down = tnn.ModuleList(tnn.utils.spectral_norm(tnn.Linear(4 * dims[k], dims[k + 1]))
                                 for k in range(num_downsamples))
      self.blur = tnn.ModuleList(BlurPool(dims[k + 1]) for k in range(num_downsamples))
      self.blocks = tnn.ModuleList(Block(dims[k + 1]) for k in range(num_downsamples - 1))
      self.out = tnn.utils.spectral_norm(tnn.Linear(dims[-1], 1))

    def forward(self, x):  # (B, h * w, C)
      h, w = grid
      for k in range(num_downsamples):
        b, _, c = x.shape
        x = F.pixel_unshuffle(x.transpose(1, 2).reshape(b, c, h, w), 2)
        h, w = h // 2, w // 2
        x = self.down[k](x.flatten(2).transpose(1, 2))
        x = F.leaky_relu(x, 0.2)
        x = self.blur[k](x.transpose(1, 2).reshape(b, -1, h, w)).flatten(2).transpose(1, 2)
        if k < num_downsamples - 1:
          x = self.blocks[k](x)
      return self.out(x)  # (B, h' w', 1)

  return tnn.ModuleList(Head() for _ in range(num_levels))


def _copy_into_torch(torch, theads, variables):
  t = lambda a: torch.from_numpy(np.array(a, np.float32))

  def sn_linear(module, params, spectral):
    module.weight_orig.copy_(t(params['kernel']).T)
    module.bias.copy_(t(params['bias']))
    module.weight_u.copy_(t(spectral['u']))
    module.weight_v.copy_(t(spectral['v']))

  def linear(module, params):
    module.weight.copy_(t(params['kernel']).T)
    if 'bias' in params:
      module.bias.copy_(t(params['bias']))

  with torch.no_grad():
    for i, head in enumerate(theads):
      p, s = variables['params'][f'decoders_{i}'], variables['spectral'][f'decoders_{i}']
      for k, down in enumerate(head.down):
        sn_linear(down, p[f'down_{k}'], s[f'down_{k}'])
      for k, block in enumerate(head.blocks):
        bp = p[f'block_{k}']
        for name in ('qkv', 'proj', 'fc1', 'fc2'):
          linear(getattr(block, name), bp[name])
        for name in ('norm1', 'norm2'):
          getattr(block, name).weight.copy_(t(bp[name]['scale']))
          getattr(block, name).bias.copy_(t(bp[name]['bias']))
      sn_linear(head.out, p['out'], s['out'])


def _torch_spectral(theads, num_downsamples):
  return [dict([(f'down_{k}', (h.down[k].weight_u.numpy(), h.down[k].weight_v.numpy()))
                for k in range(num_downsamples)] + [('out', (h.out.weight_u.numpy(),
                                                             h.out.weight_v.numpy()))])
          for h in theads]


@pytest.mark.parametrize('channels,grid,num_downsamples', [(256, (16, 12), 2), (32, (8, 8), 1)])
def test_heads_match_torch_reference(channels, grid, num_downsamples):
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  heads = vd.ViTDiscriminatorHeads(channels=channels, num_downsamples=num_downsamples)
  rng = np.random.default_rng(3)
  features = [rng.normal(size=(2, *grid, channels)).astype(np.float32) for _ in range(3)]
  variables = _random_variables(heads, [jnp.asarray(f) for f in features], seed=4)
  theads = _torch_heads(torch, channels, 3, num_downsamples, grid)
  _copy_into_torch(torch, theads, variables)
  tfeat = [torch.from_numpy(f.reshape(2, -1, channels)) for f in features]
  apply = jax.jit(lambda v, f, train: heads.apply(v, f, train, mutable=['spectral']),
                  static_argnums=2)
  out_grid = (grid[0] // 2 ** num_downsamples, grid[1] // 2 ** num_downsamples)
  worst = 0.0
  for train in (True, True, True, False):  # three training calls (u, v advance), then eval
    theads.train(train)
    with torch.no_grad():
      expected = [h(f).numpy().reshape(2, *out_grid) for h, f in zip(theads, tfeat)]
    logits, updates = apply(variables, features, train)
    for out, ref in zip(logits, expected):
      assert out.shape == (2, *out_grid)
      err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
      worst = max(worst, err)
      np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    variables = {'params': variables['params'], 'spectral': updates['spectral']}
    for level, tstate in enumerate(_torch_spectral(theads, num_downsamples)):
      for name, (u, v) in tstate.items():
        state = variables['spectral'][f'decoders_{level}'][name]
        np.testing.assert_allclose(state['u'], u, atol=1e-6)
        np.testing.assert_allclose(state['v'], v, atol=1e-6)
  print(f'max |jax - torch| / max |torch| = {worst:.2e}')


# ------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize('resolution,patch,channels,out_side', [
    (512, 16, 768, 8), (1024, 16, 768, 8), (64, 16, 32, 2), (64, 8, 32, 4)])
def test_head_shapes(resolution, patch, channels, out_side):
  heads = vd.ViTDiscriminatorHeads(channels=channels, resolution=resolution, patch_size=patch)
  features = [jax.ShapeDtypeStruct(f.shape, f.dtype) for f in heads.dummy_inputs()]
  assert features[0].shape == (1, resolution // patch, resolution // patch, channels)
  variables = jax.eval_shape(heads.init, jax.random.key(0), features)
  logits = jax.eval_shape(lambda v, f: heads.apply(v, f), variables, features)
  assert [l.shape for l in logits] == [(1, out_side, out_side)] * 3
  p = variables['params']['decoders_2']
  n = vd.head_downsamples(resolution)
  dims = [channels // 2 ** k for k in range(n + 1)]  # 768 -> 384 -> 192 (-> 96 at 1024)
  assert [p[f'down_{k}']['kernel'].shape for k in range(n)] == [
      (4 * dims[k], dims[k + 1]) for k in range(n)]
  assert sorted(k for k in p if k.startswith('block_')) == [f'block_{k}' for k in range(n - 1)]
  assert p['out']['kernel'].shape == (dims[-1], 1)
  if resolution == 512:
    block = p['block_0']
    assert 'bias' not in block['qkv'] and block['qkv']['kernel'].shape == (384, 3 * 384)
    assert block['fc1']['kernel'].shape == (384, 4 * 384)
    assert variables['spectral']['decoders_0']['down_0']['v'].shape == (4 * 768,)
  assert vd.attention_heads(384) == 6 and vd.attention_heads(16) == 1


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='got 768'):
    vd.head_downsamples(768)
  heads = vd.ViTDiscriminatorHeads(channels=32, resolution=512)
  with pytest.raises(ValueError, match='divisible'):
    jax.eval_shape(heads.init, jax.random.key(0), [jnp.zeros((1, 6, 6, 32))] * 3)


# -------------------------------------------------------------------- with a stand-in backbone


class TinyViT(nn.Module):
  """Stand-in with the DINOv3ViTModel API: ``__call__(x, num_layers)`` -> (embeddings, block 1, ...,
  block k) of (B, prefix + h w, C) tokens, ``final_norm``, ``num_prefix_tokens``, ``patch_size``."""
  hidden: int = 32
  depth: int = 10
  patch_size: int = 16
  num_registers: int = 2

  @property
  def num_prefix_tokens(self):
    return 1 + self.num_registers

  def setup(self):
    self.patch = nn.Conv(self.hidden, (self.patch_size,) * 2, strides=self.patch_size,
                         padding='VALID')
    self.prefix = self.param('prefix', nn.initializers.normal(1.0),
                             (1, self.num_prefix_tokens, self.hidden))
    self.blocks = [nn.Dense(self.hidden) for _ in range(self.depth)]
    self.norm = nn.LayerNorm(1e-6)

  def __call__(self, x, num_layers=None):
    b = x.shape[0]
    tokens = self.patch(x).reshape(b, -1, self.hidden)  # row-major patches
    h = jnp.concatenate([jnp.broadcast_to(self.prefix, (b, *self.prefix.shape[1:])), tokens], 1)
    hidden = [h]
    for block in self.blocks[:num_layers]:
      h = h + jnp.tanh(block(h)) + 0.1 * h.mean(axis=1, keepdims=True)  # mixes tokens
      hidden.append(h)
    if self.is_initializing():
      self.norm(h)
    return tuple(hidden)

  def final_norm(self, x):
    return self.norm(x)


def _tiny_setup(patch=16):
  dino = TinyViT(patch_size=patch)
  images = np.random.default_rng(5).uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32)
  dino_params = _random_variables(dino, images[:1], seed=6)['params']
  heads = vd.ViTDiscriminatorHeads(channels=32, resolution=64, patch_size=patch)
  head_vars = _random_variables(heads, heads.dummy_inputs(), seed=7)
  return dino, dino_params, heads, head_vars, images


def test_vit_features_select_levels_norm_and_grid():
  dino, dino_params, _, _, images = _tiny_setup(patch=8)
  feats = jax.jit(lambda p, x: vd.vit_features(dino, p, x, (3, 6, 9)))(dino_params, images)
  hidden = dino.apply({'params': dino_params}, imagenet_normalize(jnp.asarray(images)))
  assert len(hidden) == 11
  for level, feat in zip((3, 6, 9), feats):
    assert feat.shape == (2, 8, 8, 32)
    normed = np.asarray(dino.apply({'params': dino_params}, hidden[level], method='final_norm'))
    np.testing.assert_allclose(feat, normed[:, 3:].reshape(2, 8, 8, 32), rtol=1e-5, atol=1e-5)
    # Patch token 1 + R + 8 r + c sits at grid row r, column c.
    np.testing.assert_allclose(feat[:, 2, 5], normed[:, 3 + 8 * 2 + 5], rtol=1e-5, atol=1e-5)


def test_discriminator_call_trains_heads_only():
  dino, dino_params, heads, head_vars, images = _tiny_setup(patch=16)  # 4x4 tokens -> 2x2 logits

  @jax.jit
  def generator_step(dino_p, head_p, spectral, x, key):
    def loss_fn(dino_p, head_p, x):
      logits, new_spectral = vd.vit_discriminator_logits(
          dino, dino_p, heads, {'params': head_p, 'spectral': spectral}, x, key, train=True)
      return gan.generator_gan_loss(logits), (logits, new_spectral)
    return jax.grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(dino_p, head_p, x)

  (g_dino, g_heads, g_images), (logits, new_spectral) = generator_step(
      dino_params, head_vars['params'], head_vars['spectral'], images, jax.random.key(8))
  assert [l.shape for l in logits] == [(2, 2, 2)] * 3
  assert all(np.isfinite(np.asarray(l)).all() for l in logits)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_dino))  # frozen backbone
  assert all(np.isfinite(np.asarray(g)).all() and np.any(np.asarray(g))
             for g in jax.tree.leaves(g_heads))
  assert np.isfinite(np.asarray(g_images)).all() and np.any(np.asarray(g_images))
  for level in range(3):  # one power iteration per train call
    old, new = head_vars['spectral'][f'decoders_{level}'], new_spectral[f'decoders_{level}']
    assert not np.allclose(old['down_0']['u'], new['down_0']['u'])
    assert not np.allclose(old['out']['v'], new['out']['v'])

  call = jax.jit(lambda v, x, key: vd.vit_discriminator_logits(dino, dino_params, heads, v, x, key,
                                                               train=False))
  same_a, state = call(head_vars, images, jax.random.key(9))
  same_b, _ = call(head_vars, images, jax.random.key(9))
  other, _ = call(head_vars, images, jax.random.key(10))
  assert jax.tree.all(jax.tree.map(np.array_equal, state, head_vars['spectral']))  # eval: unchanged
  assert all(np.array_equal(a, b) for a, b in zip(same_a, same_b))  # same rng -> same output
  assert not all(np.allclose(a, b) for a, b in zip(same_a, other))
  # rng None: no augmentation = heads on the plain features.
  plain, _ = jax.jit(lambda v, x: vd.vit_discriminator_logits(dino, dino_params, heads, v, x, None,
                                                              train=False))(head_vars, images)
  feats = vd.vit_features(dino, dino_params, jnp.asarray(images), heads.levels)
  direct = heads.apply(head_vars, feats, False)
  for a, b in zip(plain, direct):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_vit_features_of_the_real_dinov3_vit():
  """The same selection on ``DINOv3ViTModel`` (the tiny config of configs/tudsr.py), non-square."""
  from configs import common as config_common  # pylint: disable=g-import-not-at-top
  from sr_jax.models.dinov3_vit import DINOv3ViTModel  # pylint: disable=g-import-not-at-top
  dino = DINOv3ViTModel.from_config(config_common.TINY_DINOV3_VIT)
  images = np.random.default_rng(11).uniform(-1, 1, size=(2, 48, 64, 3)).astype(np.float32)
  params = _random_variables(dino, images[:1], seed=12)['params']
  feats = vd.vit_features(dino, params, jnp.asarray(images), (3, 6, 9))
  hidden = dino.apply({'params': params}, imagenet_normalize(jnp.asarray(images)))
  assert len(hidden) == 10 and dino.num_prefix_tokens == 3
  for level, feat in zip((3, 6, 9), feats):
    assert feat.shape == (2, 6, 8, 32)
    normed = np.asarray(dino.apply({'params': params}, hidden[level], method='final_norm'))
    np.testing.assert_allclose(feat, normed[:, 3:].reshape(2, 6, 8, 32), rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda p: sum(jnp.sum(f) for f in vd.vit_features(dino, p, images, (3,))))(
      params)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))  # frozen backbone
