"""`python -m convert_weights export`: a trained generator as diffusers folders that PyTorch loads.

On the tiny OMGSR run of the `tiny_train_runs` fixture (its workdir and its exported bundle, with
the run's saved config or `--config`): `UNet2DConditionModel.from_pretrained(OUT/unet)`,
`AutoencoderKL.from_pretrained(OUT/vae)` and `DDPMScheduler.from_pretrained(OUT/scheduler)` load,
and the weights equal the merged params of `load_generator` through the method registry. Problems
(missing checkpoint, a generator without a UNet, no saved config) end with one error line, exit 1.
"""
import json
import os

import numpy as np
import pytest

import convert_weights
from configs import common as config_common
from configs import omgsr as omgsr_config
from sr_jax import methods
from sr_jax.methods import common
from sr_jax.weights import flax_to_state_dict

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')


def run_export(capsys, *args) -> tuple[int, str]:
  status = convert_weights.main(['export', *map(str, args)])
  return status, capsys.readouterr().err


def assert_folder_holds(out, generator_params, atol=0.0):
  """OUT/unet and OUT/vae load in diffusers with the generator's (merged) weights."""
  for kind, cls in (('unet', diffusers.UNet2DConditionModel), ('vae', diffusers.AutoencoderKL)):
    model, info = cls.from_pretrained(os.path.join(out, kind), output_loading_info=True)
    assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
    want = flax_to_state_dict(generator_params[kind])
    got = model.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
      np.testing.assert_allclose(got[key].numpy(), value, rtol=0, atol=atol, err_msg=f'{kind}: {key}')
  scheduler = diffusers.DDPMScheduler.from_pretrained(out, subfolder='scheduler')
  assert scheduler.config.beta_schedule == config_common.SD_SCHEDULER['beta_schedule']


@pytest.fixture(scope='module')
def run(tiny_train_runs):
  workdir = tiny_train_runs[1]
  return dict(workdir=workdir, bundle=os.path.join(workdir, 'export', 'inference'),
              config=omgsr_config.get_config('tiny'))


def test_workdir_export_loads_in_diffusers_with_the_merged_generator_weights(run, tmp_path, capsys):
  """Compared with the trainer's bundle: the generator of the same (last) checkpoint, merged the same
  way, so only float32 rounding may differ (loading the workdir generator again would double the
  test's time)."""
  status, err = run_export(capsys, '--checkpoint', run['workdir'], '--out', tmp_path)
  assert status == 0, err
  generator = methods.get('omgsr').load_generator(run['config'], run['bundle'])
  assert_folder_holds(tmp_path, generator.params, atol=1e-6)
  with open(tmp_path / 'export_info.json') as f:
    info = json.load(f)
  assert (info['method'], info['source']['kind'], info['source']['step']) == ('omgsr', 'workdir', 2)


def test_bundle_export_loads_in_diffusers_with_the_bundle_weights(run, tmp_path, capsys):
  for out, config_args in ((tmp_path / 'saved_config', ()),
                           (tmp_path / 'config_file', ('--config', 'configs/omgsr.py:tiny'))):
    status, err = run_export(capsys, '--checkpoint', run['bundle'], '--out', out, *config_args)
    assert status == 0, err
    generator = methods.get('omgsr').load_generator(run['config'], run['bundle'])
    assert_folder_holds(out, generator.params)


# A method plugin (see sr_jax.methods) whose generator has a VAE stage but no UNet.
VAE_ONLY_PLUGIN = '''
from sr_jax.methods import base

def make_method(config):
  raise ValueError('this test plugin only has a generator')

def load_generator(config, checkpoint, step=None):
  stage = base.LatentStage(vae=None, codec=None, step=lambda params, z, noise, cond: z, upscale=1,
                           process_size=8)
  return base.Generator(config.method, (stage,), {'vae': {}}, {'kind': 'bundle'})
'''


def _vae_only_bundle(folder, monkeypatch) -> str:
  """An exported bundle (generator.json naming a plugin method) of a generator without a UNet."""
  os.makedirs(os.path.join(folder, 'vae_only_plugin'))
  with open(os.path.join(folder, 'vae_only_plugin', 'method.py'), 'w') as f:
    f.write(VAE_ONLY_PLUGIN)
  monkeypatch.syspath_prepend(folder)
  bundle = os.path.join(folder, 'bundle')
  common.write_bundle(bundle, 'vae_only_plugin.method', {'method': 'vae_only_plugin.method'}, {})
  return bundle


def test_problems_end_with_one_error_line(tmp_path, capsys, monkeypatch):
  cases = {
      'no such folder': tmp_path / 'missing',
      'neither an inference bundle': tmp_path,
      "'vae_only_plugin.method' generator has no UNET": _vae_only_bundle(str(tmp_path / 'plugin'),
                                                                         monkeypatch),
  }
  os.makedirs(tmp_path / 'old_run' / 'checkpoints')
  cases['config.json not found (the trainer writes it): pass --config'] = tmp_path / 'old_run'
  for expected, checkpoint in cases.items():
    status, err = run_export(capsys, '--checkpoint', checkpoint, '--out', tmp_path / 'out')
    assert status == 1 and expected in err, (expected, err)
    assert len(err.strip().splitlines()) == 1, err
