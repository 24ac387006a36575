"""DISTS, ea-DISTS and LPIPS (VGG, AlexNet) equal the PyTorch reference packages on random backbones.

References: ``dists-pytorch`` 0.1 (``DISTS_pytorch.DISTS_pt.DISTS``) and ``lpips`` 0.1.4
(``lpips.LPIPS``), imported under the stand-in torchvision of ``fake_torchvision`` (seeded random
VGG16 / AlexNet ``features``; nothing is downloaded). DISTS gets random alpha/beta (its own
``normal_(0.1, 0.01)`` init, which does not sum to 1, so the normalisation is exercised); LPIPS uses
its packaged v0.1 heads. Every JAX param comes from the reference module's own state dict through
``sr_jax.weights.convert_state_dict``, so the torchvision index layout is checked as well.

Acceptance in float32: scores within 1e-5 absolute, gradients w.r.t. the first image within 1e-4 of
the largest reference gradient entry; d(x, x) = 0 up to float rounding.

DISTS' input gradient is at the float32 noise floor of that criterion, in the reference as much as
here: L2 pooling's derivative ``w x / sqrt(sum w x^2 + 1e-12)`` depends only on the ratios of its
inputs, so ReLU outputs of ~1e-6 (whose float32 rounding is O(1) relative) get O(1)-wrong pool
gradients. Measured on 64x64 pairs over six input seeds, the torch float32 gradient was 4e-5 ... 1.8e-3
from the same reference run in float64 (ours: 1.6e-5 ... 1.2e-3); raising that 1e-12 to 1e-6 in both
removed the outliers. So the float32 comparison is made on one fixed input (seed 0: 2.7e-5), and
:func:`test_dists_float64_matches_reference_exactly` proves the arithmetic is the reference's in
float64, where there is no such noise (scores 1e-16, gradients 1e-13).
"""
import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fake_torchvision
from sr_jax import pretrained, xla
from sr_jax.losses import dists, lpips
from sr_jax.models.vgg import VGG16, AlexNet
from sr_jax.weights import convert_state_dict

torch = pytest.importorskip('torch')

SIZE = 64
BATCH = 2
SCORE_ATOL = 1e-5
GRAD_RTOL = 1e-4
# Reference backbone keys: DISTS' stage<k>.<features index>.*, lpips' net.slice<k>.<features index>.*
_BACKBONE_KEY = re.compile(r'^(?:stage\d|net\.slice\d)\.(\d+)\.(weight|bias)$')


def _numpy_state(module):
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def _backbone_params(reference, backbone):
  """The reference's backbone convs renamed to torchvision ``features.<i>.*`` and converted."""
  features = {}
  for key, value in _numpy_state(reference).items():
    match = _BACKBONE_KEY.match(key)
    if match:
      features[f'features.{match.group(1)}.{match.group(2)}'] = value
  return convert_state_dict(features, pretrained.abstract_params(backbone))


def _head_params(reference, net):
  heads = {k: v for k, v in _numpy_state(reference).items() if re.match(r'^lin\d\.', k)}
  return convert_state_dict(heads, pretrained.abstract_params(lpips.lpips_heads(net)))


@pytest.fixture(scope='module')
def references():
  """{'dists' | 'vgg' | 'alex': (torch reference module, JAX params of the same weights)}."""
  with fake_torchvision.installed():
    lpips_reference = pytest.importorskip('lpips')
    dists_reference = pytest.importorskip('DISTS_pytorch.DISTS_pt')
    torch.manual_seed(0)
    dists_model = dists_reference.DISTS(load_weights=False).eval()
    lpips_models = {net: lpips_reference.LPIPS(net=net, verbose=False).eval()
                    for net in ('vgg', 'alex')}
  alpha, beta = (dists_model.alpha.detach().numpy(), dists_model.beta.detach().numpy())
  assert alpha.shape == (1, 1475, 1, 1) and abs(float(alpha.sum() + beta.sum()) - 1.0) > 0.1
  out = {'dists': (dists_model, {'vgg16': _backbone_params(dists_model, VGG16()),
                                 'dists': {'alpha': alpha.reshape(-1), 'beta': beta.reshape(-1)}})}
  for net, model in lpips_models.items():
    group, head_group = lpips.LPIPS_NETS[net][1:3]
    backbone = VGG16() if net == 'vgg' else AlexNet()
    out[net] = (model, {group: _backbone_params(model, backbone), head_group: _head_params(model, net)})
  return out


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32)
  y = np.clip(x + 0.15 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
  return x, y


_JAX_DISTANCES = {
    'dists': dists.dists_distance,
    'vgg': lambda p, x, y: lpips.lpips_distance(p, x, y, net='vgg'),
    'alex': lambda p, x, y: lpips.lpips_distance(p, x, y, net='alex'),
    'ea_dists': dists.ea_dists_distance,
}


@pytest.fixture(scope='module')
def distance_and_grad():
  """name -> jitted ``(params, x, y) -> (distance (B,), d sum(distance) / d x)`` (compiled once)."""
  def build(distance):
    def fn(params, x, y):
      total_and_scores = lambda a: (lambda d: (d.sum(), d))(distance(params, a, y))
      (_, scores), grad = jax.value_and_grad(total_and_scores, has_aux=True)(x)
      return scores, grad
    return jax.jit(fn, compiler_options=xla.compiler_options())
  return {name: build(fn) for name, fn in _JAX_DISTANCES.items()}


def _torch_distance_and_grad(distance, x, y):
  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  ty = torch.tensor(y.transpose(0, 3, 1, 2))
  score = distance(tx, ty).reshape(-1)
  score.sum().backward()
  return score.detach().numpy(), tx.grad.numpy().transpose(0, 2, 3, 1)


def _torch_call(name, model):
  if name == 'dists':
    return lambda a, b: model(a, b, require_grad=True)
  return lambda a, b: model(a, b, normalize=True)


def _assert_parity(name, score, grad, ref_score, ref_grad):
  score_err = float(np.max(np.abs(np.asarray(score) - ref_score)))
  grad_err = float(np.max(np.abs(np.asarray(grad) - ref_grad)) / np.max(np.abs(ref_grad)))
  print(f'{name}: scores {np.asarray(score)} vs {ref_score}; max |score err| {score_err:.2e}, '
        f'grad rel err {grad_err:.2e}')
  assert np.asarray(score).shape == (BATCH,)
  assert score_err <= SCORE_ATOL, (name, score_err)
  assert grad_err <= GRAD_RTOL, (name, grad_err)


@pytest.mark.parametrize('name', ['dists', 'vgg', 'alex'])
def test_distance_and_input_gradient_match_reference(references, images, distance_and_grad, name):
  model, params = references[name]
  x, y = images
  score, grad = distance_and_grad[name](params, x, y)
  ref_score, ref_grad = _torch_distance_and_grad(_torch_call(name, model), x, y)
  assert np.all(ref_score > 1e-3)  # the images differ enough for the comparison to mean something
  _assert_parity(name, score, grad, ref_score, ref_grad)


@pytest.mark.parametrize('name', ['dists', 'vgg', 'alex'])
def test_distance_to_itself_is_zero(references, images, distance_and_grad, name):
  _, params = references[name]
  x, _ = images
  score, _ = distance_and_grad[name](params, x, x)
  print(f'{name}(x, x) = {np.asarray(score)}')
  # DISTS: S1 = S2 = 1 exactly; 1 - sum(weights) rounds. LPIPS: the features of both copies are
  # bitwise equal, but XLA fuses their two normalisations into the heads' input differently, so the
  # normalised features differ by ~1 ulp (squared: ~1e-16).
  assert np.max(np.abs(np.asarray(score))) <= (1e-6 if name == 'dists' else 1e-12)


def _numpy_sobel_magnitude(images):
  """Hand-written TUDSR Eq. 5 S: channel mean, zero pad 1, Sobel cross-correlation, magnitude."""
  gray = images.astype(np.float64).mean(axis=-1)
  padded = np.pad(gray, ((0, 0), (1, 1), (1, 1)))
  gx_kernel = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float64)
  h, w = gray.shape[1:]
  window = lambda i, j: padded[:, i:i + h, j:j + w]
  gx = sum(gx_kernel[i, j] * window(i, j) for i in range(3) for j in range(3))
  gy = sum(gx_kernel.T[i, j] * window(i, j) for i in range(3) for j in range(3))
  return np.sqrt(gx ** 2 + gy ** 2 + 1e-6)[..., None].astype(np.float32)


def _torch_sobel_magnitude(images):
  """The same S in torch (NCHW), as OMGSR's OC-EA-DISTS writes it: a 1 -> 2 channel conv."""
  gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
  weight = torch.stack([gx, gx.T])[:, None]
  grad = torch.nn.functional.conv2d(images.mean(dim=1, keepdim=True), weight, padding=1)
  return torch.sqrt((grad ** 2).sum(dim=1, keepdim=True) + 1e-6)


def test_ea_dists_matches_hand_computation(references, images, distance_and_grad):
  """TUDSR Eq. 5 = reference DISTS(x, y) + reference DISTS fed the 1-channel Sobel maps."""
  model, params = references['dists']
  x, y = images
  edges_x, edges_y = _numpy_sobel_magnitude(x), _numpy_sobel_magnitude(y)
  np.testing.assert_allclose(np.asarray(dists.sobel_edge_magnitude(jnp.asarray(x))), edges_x,
                             rtol=1e-5, atol=1e-5)
  nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2))
  with torch.no_grad():
    by_hand = (model(nchw(x), nchw(y)) + model(nchw(edges_x), nchw(edges_y))).numpy()
  score, grad = distance_and_grad['ea_dists'](params, x, y)
  ref_score, ref_grad = _torch_distance_and_grad(
      lambda a, b: model(a, b, require_grad=True)
      + model(_torch_sobel_magnitude(a), _torch_sobel_magnitude(b), require_grad=True), x, y)
  np.testing.assert_allclose(ref_score, by_hand, rtol=0, atol=1e-6)
  _assert_parity('ea_dists', score, grad, by_hand, ref_grad)


def test_frozen_params_get_no_gradient(references, images):
  """stop_gradient on every weight: the gradient w.r.t. the params is identically zero."""
  x, y = images
  params = {**references['dists'][1], **references['alex'][1]}
  loss = lambda p, a, b: dists.dists_loss(p, a, b) + lpips.lpips_loss(p, a, b, net='alex')
  grads = jax.jit(jax.grad(loss), compiler_options=xla.compiler_options())(params, x, y)
  assert set(grads) == {'vgg16', 'dists', 'alexnet', 'lpips_alex'}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert not np.any(np.asarray(g)), jax.tree_util.keystr(path)


def test_dists_float64_matches_reference_exactly(references):
  """In float64 our DISTS and its input gradient are the reference's to rounding (no float32 noise).

  The reference keeps the ImageNet mean/std as float32 buffers; in float64 we use the decimal
  constants, so its buffers are set to those (in float32 the two are the same numbers).
  """
  model = copy.deepcopy(references['dists'][0]).double()
  model.mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, -1, 1, 1)
  model.std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, -1, 1, 1)
  rng = np.random.default_rng(1)
  x = rng.uniform(0, 1, (1, 24, 24, 3))  # small: float64 convolutions are slow on the CPU
  y = np.clip(x + 0.15 * rng.standard_normal(x.shape), 0, 1)
  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  ref_score = model(tx, torch.tensor(y.transpose(0, 3, 1, 2)), require_grad=True)
  ref_score.sum().backward()
  ref_grad = tx.grad.numpy().transpose(0, 2, 3, 1)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), references['dists'][1])
  with jax.enable_x64(True):
    def total_and_scores(a, b, p):
      d = dists.dists_distance(p, a, b, dtype=jnp.float64)
      return d.sum(), d
    (_, score), grad = jax.jit(jax.value_and_grad(total_and_scores, has_aux=True),
                               compiler_options=xla.compiler_options())(x, y, params)
    assert score.dtype == jnp.float64 and grad.dtype == jnp.float64
  score_err = float(np.max(np.abs(np.asarray(score) - ref_score.detach().numpy())))
  grad_err = float(np.max(np.abs(np.asarray(grad) - ref_grad)) / np.max(np.abs(ref_grad)))
  print(f'dists float64: max |score err| {score_err:.2e}, grad rel err {grad_err:.2e}')
  assert score_err <= 1e-12 and grad_err <= 1e-10, (score_err, grad_err)
