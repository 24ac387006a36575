"""SD3 / FLUX transformer loaders: DiT4SR control params, per-device placement, streamed shards.

Tiny random diffusers models saved sharded (`save_pretrained(max_shard_size=...)`). Checked:
* ``load_sd3_transformer(plain SD3.5, lr_branch=True)``: the base params are the checkpoint's,
  the control params equal ``module.init``'s (zero q/k/v control projections); a DiT4SR checkpoint
  loads its own control params; one with only some is refused naming the missing key; a DiT4SR
  checkpoint without ``lr_branch`` names its control keys as unexpected;
* ``shardings`` on 8 fake CPU devices (subprocess): FSDP-split leaves equal the unsharded load and
  every read of a split leaf is that device's slice only, from raw (transposed) and converted
  folders, the LR-branch init included;
* `sr_jax.safetensors_io`: sizes, shard plans, the index, stale shards removed on re-conversion,
  and that a shard is on disk before the next shard's tensors are produced (bounded memory).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sr_jax import pretrained, safetensors_io
from sr_jax.models import mmdit
from sr_jax.weights import CheckpointError, flax_to_state_dict

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
tp = pytest.importorskip('tiny_pipelines')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """Sharded raw SD3.5-like and FLUX-like transformer folders, and their converted folders."""
  tmp = tmp_path_factory.mktemp('transformers')
  out = {}
  for name, cls, config in (('sd3', diffusers.SD3Transformer2DModel, tp.SD3_TRANSFORMER),
                            ('flux', diffusers.FluxTransformer2DModel, tp.FLUX_TRANSFORMER)):
    model = tp._transformer(cls, config, seed=5)  # pylint: disable=protected-access
    model.save_pretrained(str(tmp / name), max_shard_size='40KB')
    kind = f'{name}_transformer'
    pretrained.convert_folder(str(tmp / name), str(tmp / f'{name}_converted'), kind,
                              max_shard_size='30KB')
    out[name], out[f'{name}_converted'] = str(tmp / name), str(tmp / f'{name}_converted')
  assert os.path.isfile(os.path.join(out['flux'], 'diffusion_pytorch_model.safetensors.index.json'))
  return out


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_lr_branch_over_a_plain_checkpoint_takes_the_module_init(folders):
  _, plain = pretrained.load_sd3_transformer(folders['sd3'])
  for path in (folders['sd3'], folders['sd3_converted']):
    model, params = pretrained.load_sd3_transformer(path, lr_branch=True)
    assert model.lr_branch
    base, control = mmdit.split_control_params(params)
    _assert_trees_equal(base, plain)
    reference = jax.jit(model.init)(jax.random.key(0), *model.dummy_inputs())['params']
    _assert_trees_equal(control, mmdit.split_control_params(reference)[1])
  attn = control['transformer_blocks_0']['attn']
  assert not np.any(np.asarray(attn['to_q_control']['kernel']))  # zero-initialised
  assert np.any(np.asarray(attn['to_out_control']['kernel']))  # torch-default init
  _, other = pretrained.load_sd3_transformer(folders['sd3'], lr_branch=True,
                                             init_rng=jax.random.key(1))
  assert not np.array_equal(other['transformer_blocks_0']['attn']['to_out_control']['kernel'],
                            attn['to_out_control']['kernel'])


def _write_dit4sr(folder, params, config_from, drop=()):
  os.makedirs(folder)
  state = {k: v for k, v in flax_to_state_dict(params).items() if k not in drop}
  save_file(state, os.path.join(folder, 'diffusion_pytorch_model.safetensors'))
  with open(os.path.join(config_from, 'config.json')) as f, \
      open(os.path.join(folder, 'config.json'), 'w') as g:
    g.write(f.read())


def test_dit4sr_checkpoint_loads_its_control_params(folders, tmp_path):
  _, params = pretrained.load_sd3_transformer(folders['sd3'], lr_branch=True)
  rng = np.random.default_rng(0)
  trained = jax.tree_util.tree_map_with_path(
      lambda p, v: rng.standard_normal(v.shape).astype(np.float32)
      if mmdit.is_control_param(p) else np.asarray(v), params)
  _write_dit4sr(str(tmp_path / 'dit4sr'), trained, folders['sd3'])
  _, loaded = pretrained.load_sd3_transformer(str(tmp_path / 'dit4sr'), lr_branch=True)
  _assert_trees_equal(loaded, trained)
  with pytest.raises(CheckpointError, match=r'unexpected \(\d+\).*to_q_control'):
    pretrained.load_sd3_transformer(str(tmp_path / 'dit4sr'))
  key = 'transformer_blocks.0.attn2.to_k_control.weight'
  _write_dit4sr(str(tmp_path / 'partial'), trained, folders['sd3'], drop=(key,))
  with pytest.raises(CheckpointError, match=rf'missing \(1\).*{key}'):
    pretrained.load_sd3_transformer(str(tmp_path / 'partial'), lr_branch=True)


def test_converted_folder_is_sharded_and_reconverts_cleanly(folders, tmp_path):
  folder = folders['flux_converted']
  with open(os.path.join(folder, 'params.safetensors.index.json')) as f:
    index = json.load(f)
  files = sorted(set(index['weight_map'].values()))
  assert len(files) > 2 and files[0] == f'params-00001-of-{len(files):05d}.safetensors'
  stored = {}
  for name in files:
    stored.update(load_file(os.path.join(folder, name)))
  assert index['metadata']['total_size'] == sum(v.nbytes for v in stored.values())
  for name in files:  # at most max_shard_size per file, unless one tensor alone is larger
    members = [k for k, v in index['weight_map'].items() if v == name]
    assert len(members) == 1 or sum(stored[k].nbytes for k in members) <= 30_000, name
  _, raw = pretrained.load_flux_transformer(folders['flux'])
  _, ours = pretrained.load_flux_transformer(folder)
  _assert_trees_equal(raw, ours)
  again = str(tmp_path / 'again')
  pretrained.convert_folder(folders['flux'], again, 'flux_transformer', max_shard_size='30KB')
  pretrained.convert_folder(folders['flux'], again, 'flux_transformer', dtype='bfloat16')
  assert sorted(n for n in os.listdir(again) if n.startswith('params')) == ['params.safetensors']
  with open(os.path.join(again, 'sr_jax.json')) as f:
    assert json.load(f)['dtype'] == 'bfloat16'
  _, bf16 = pretrained.load_flux_transformer(again)
  _assert_trees_equal(bf16, jax.tree.map(
      lambda a: np.asarray(a).astype(pretrained.STORAGE_DTYPES['bfloat16']).astype(np.float32), raw))


def test_sizes_plans_and_streamed_writing(tmp_path):
  assert safetensors_io.parse_size('2GB') == 2 * 10**9
  assert safetensors_io.parse_size('2GiB') == 2 * 2**30
  assert safetensors_io.parse_size('500 kb') == 500_000 and safetensors_io.parse_size(7) == 7
  with pytest.raises(ValueError, match='lots'):
    safetensors_io.parse_size('lots')
  assert safetensors_io.plan_shards([('a', 4), ('b', 4), ('c', 9), ('d', 1)], 8) == [
      ['a', 'b'], ['c'], ['d']]
  entries = [(f't{i}', (4, 8), np.dtype(np.float32)) for i in range(6)]  # 128 bytes each
  produced = []

  def produce(name):  # when shard k's first tensor is made, shards < k are already written
    produced.append((name, sorted(n for n in os.listdir(tmp_path) if n.endswith('.safetensors'))))
    return np.full((4, 8), int(name[1:]), np.float32)

  names = safetensors_io.write_sharded(str(tmp_path), 'w', entries, produce, max_shard_bytes=256)
  assert names == [f'w-0000{i}-of-00003.safetensors' for i in (1, 2, 3)]
  assert [len(files) for _, files in produced] == [0, 0, 1, 1, 2, 2]
  source = safetensors_io.TensorSource.from_files(safetensors_io.find_written(str(tmp_path), 'w'))
  assert sorted(source) == [e[0] for e in entries]
  np.testing.assert_array_equal(source.read('t3', (slice(1, 3), slice(None))), np.full((2, 8), 3))
  with pytest.raises(ValueError, match='t0: produced'):
    safetensors_io.write_sharded(str(tmp_path), 'w', entries, lambda n: np.zeros((1,)))


EIGHT_DEVICES = textwrap.dedent('''
  import json, sys
  import jax, numpy as np
  from sr_jax import pretrained, safetensors_io, sharding
  folders = json.loads(sys.argv[1])
  reads, original = [], safetensors_io.TensorSource.read
  def recording(self, name, index=None):
    array = original(self, name, index)
    reads.append((name, array.size, int(np.prod(self[name].shape))))
    return array
  safetensors_io.TensorSource.read = recording
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 8})
  out = {}
  cases = (('flux', pretrained.load_flux_transformer, {}), ('flux_converted',
           pretrained.load_flux_transformer, {}), ('sd3', pretrained.load_sd3_transformer,
           {'lr_branch': True}))
  for name, load, kwargs in cases:
    model, whole = load(folders[name], **kwargs)
    shards = sharding.fsdp_shardings(pretrained.abstract_params(model), mesh, min_size=256)
    del reads[:]
    _, placed = load(folders[name], shardings=shards, **kwargs)
    split = [p for p, v in jax.tree_util.tree_leaves_with_path(placed)
             if not v.sharding.is_fully_replicated]
    equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(placed)))
    partial = [r for r in reads if r[1] < r[2]]
    names = {r[0] for r in partial}
    out[name] = dict(split=len(split), equal=equal, read_split=len(names),
                     eight_reads_each=all(sum(r[0] == n for r in partial) == 8 for n in names),
                     eighth=all(8 * r[1] == r[2] for r in partial),
                     whole_reads_of_split=sum(r[0] in names and r[1] == r[2] for r in reads))
  _, by_mesh = pretrained.load_flux_transformer(folders['flux_converted'], shardings=mesh)
  out['mesh_leaves_on_8'] = all(len(v.sharding.device_set) == 8 for v in jax.tree.leaves(by_mesh))
  print(json.dumps(out))
''')


def test_shardings_read_only_each_devices_slice(folders):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-c', EIGHT_DEVICES, json.dumps(folders)], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  print(out)
  assert out.pop('mesh_leaves_on_8')
  for name, found in out.items():
    assert found['equal'] and 0 < found['read_split'] <= found['split'], (name, found)
    assert found['eight_reads_each'] and found['eighth'], (name, found)
    assert found['whole_reads_of_split'] == 0, (name, found)
  assert out['flux']['read_split'] == out['flux']['split']  # every split leaf came from slices
  assert out['sd3']['split'] > out['sd3']['read_split']  # and the LR-branch init is split too
