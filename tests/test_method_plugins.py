"""Methods are plugins: the registry, the two contracts, and a test-only method (tests/toy_method.py)
that trains with `train.py` and evaluates with `eval.py` without either naming OMGSR."""
import ast
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

import tiny_runs
import toy_method_config
from sr_jax import methods
from sr_jax.inference import one_step, pipeline

TOY_CONFIG = 'tests/toy_method_config.py'
# Where the shared parts live: none of them may import a method module by name.
METHOD_AGNOSTIC = ('train.py', 'eval.py', 'sr_jax/trainer.py', 'sr_jax/evaluate.py',
                   'sr_jax/mid_timestep_search.py', 'sr_jax/inference/one_step.py',
                   'sr_jax/inference/pipeline.py', 'sr_jax/inference/tiling.py',
                   'sr_jax/inference/tiled_vae.py', 'sr_jax/inference/color_fix.py')


def _run(script, *args):
  cmd = [sys.executable, os.path.join(tiny_runs.REPO, script), *args]
  result = subprocess.run(cmd, cwd=tiny_runs.REPO, env=tiny_runs.subprocess_env(1),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope='module')
def toy_run(tmp_path_factory):
  """train.py then eval.py (workdir and bundle) on the toy method; LQ images need latent tiling
  (48x32 px -> 24x16 latent > 16^2) and the tiled VAE (> 8^2 latent px)."""
  root = tmp_path_factory.mktemp('toy')
  workdir, lq = str(root / 'work'), str(root / 'lq')
  os.makedirs(lq)
  for name, photo in (('astro', skdata.astronaut()), ('cat', skdata.chelsea())):
    Image.fromarray(photo).resize((12, 8), Image.BICUBIC).save(os.path.join(lq, f'{name}.png'))
  train = _run('train.py', f'--config={TOY_CONFIG}', f'--workdir={workdir}')
  bundle = os.path.join(workdir, 'export', 'inference')
  outs = {}
  for kind, checkpoint in (('workdir', workdir), ('bundle', bundle)):
    outs[kind] = str(root / f'out_{kind}')
    _run('eval.py', f'--config={TOY_CONFIG}', f'--checkpoint={checkpoint}', f'--input={lq}',
         f'--output={outs[kind]}')
  return dict(workdir=workdir, bundle=bundle, lq=lq, outs=outs, train_log=train.stderr)


def test_unknown_method_lists_the_known_ones():
  with pytest.raises(methods.UnknownMethodError, match="unknown method 'nope'; known methods: omgsr"):
    methods.get('nope')
  with pytest.raises(methods.UnknownMethodError, match='cannot import no_such_pkg.method'):
    methods.get('no_such_pkg.method')
  with pytest.raises(methods.UnknownMethodError, match='lacks make_method, load_generator'):
    methods.get('sr_jax.methods.common')


def test_register_names_a_plugin_module():
  methods.register('toy_for_test', 'tests.toy_method')
  assert methods.get('toy_for_test').NAME == 'tests.toy_method'
  assert 'toy_for_test' in methods.names()
  with pytest.raises(ValueError, match='already registered'):
    methods.register('omgsr', 'tests.toy_method')


def test_shared_parts_never_import_a_method_module():
  for path in METHOD_AGNOSTIC:
    with open(os.path.join(tiny_runs.REPO, path)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        imported = [f'{node.module}.{a.name}' for a in node.names]
      elif isinstance(node, ast.Import):
        imported = [a.name for a in node.names]
      else:
        continue
      for name in imported:
        part = name.removeprefix('sr_jax.methods.').split('.')[0]
        assert not (name.startswith('sr_jax.methods.') and part not in ('base', 'common')), (
            f'{path} imports the method module {name}')


def test_toy_method_trains_through_train_py(toy_run):
  workdir = toy_run['workdir']
  log = toy_run['train_log']
  assert 'checkpoint_manager.py' not in log  # orbax's INFO lines are kept out of the progress log
  assert 'samples (LQ | SR | HQ) written to' in log and 'exporting to' in log
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '3']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2, 3] and all(np.isfinite(r['loss']) for r in rows)
  with open(os.path.join(toy_run['bundle'], 'generator.json')) as f:
    record = json.load(f)
  assert record['method'] == 'tests.toy_method' and record['config']['max_steps'] == 3
  assert any(f.endswith('.png') for f in os.listdir(os.path.join(workdir, 'samples')))


def test_toy_method_evaluates_through_eval_py_from_workdir_and_bundle(toy_run):
  outs = toy_run['outs']
  for name in ('astro.png', 'cat.png'):
    workdir_png = np.asarray(Image.open(os.path.join(outs['workdir'], name)), int)
    bundle_png = np.asarray(Image.open(os.path.join(outs['bundle'], name)), int)
    assert workdir_png.shape == (32, 48, 3)
    assert np.abs(workdir_png - bundle_png).max() <= 1, name
  with open(os.path.join(outs['workdir'], 'summary.json')) as f:
    summary = json.load(f)
  assert summary['generator']['method'] == 'tests.toy_method'
  assert summary['generator']['kind'] == 'workdir' and summary['generator']['step'] == 3
  assert summary['images'] == 2


def _toy_generator(checkpoint):
  config = toy_method_config.get_config()
  return methods.get(config.method).load_generator(config, checkpoint)


def test_pipeline_equals_the_one_step_generator_on_an_untiled_image(toy_run):
  """SuperResolver (separate jitted encode / condition / step / decode) == one_step.generate."""
  generator = _toy_generator(toy_run['bundle'])
  stage = generator.stages[0]
  settings = pipeline.InferenceSettings(vae_tile=0, color_fix='none')
  resolver = pipeline.SuperResolver(generator, settings)
  lq = np.asarray(Image.fromarray(skdata.coffee()).resize((24, 16), Image.BICUBIC), np.uint8)
  assert 12 * 8 <= stage.latent_tile ** 2  # one latent tile: no blending
  key = jax.random.key(3)
  ours = resolver(lq, key)
  x = lq.astype(np.float32)[None] / 127.5 - 1.0
  direct = jax.jit(lambda p, x, k: one_step.generate(stage, p, x, k)['sr'])(generator.params, x, key)
  direct = pipeline.to_uint8((np.asarray(direct)[0] + 1.0) / 2.0)
  assert np.abs(ours.astype(int) - direct.astype(int)).max() <= 1
  # The condition is trained (zero at init), so the step above did use it.
  trained = np.asarray(generator.params['toy']['colour_to_latent'])
  assert np.abs(trained).max() > 0


def test_tiled_inference_uses_the_tiled_vae_and_latent_tiles(toy_run):
  """Large input: the tiled VAE (exact) and the latent tile grid give the output of the untiled
  VAE with the same latent tiles (the affine toy step is position-independent, so tiling is a
  no-op up to float32 rounding)."""
  generator = _toy_generator(toy_run['bundle'])
  lq = np.asarray(Image.fromarray(skdata.astronaut()).resize((48, 40), Image.BICUBIC), np.uint8)
  key = jax.random.key(4)
  tiled = pipeline.SuperResolver(generator, pipeline.InferenceSettings(vae_tile=8, color_fix='none'))
  untiled = pipeline.SuperResolver(generator, pipeline.InferenceSettings(vae_tile=0,
                                                                         color_fix='none'))
  runner = tiled.stages[0]
  assert runner._vae_tiled(24, 20)  # pylint: disable=protected-access
  a, b = tiled(lq, key).astype(int), untiled(lq, key).astype(int)
  assert np.abs(a - b).max() <= 1


def test_unreadable_inputs_are_rows_with_their_reason(toy_run, tmp_path):
  from sr_jax import evaluate  # pylint: disable=g-import-not-at-top
  lq = tmp_path / 'lq'
  lq.mkdir()
  (lq / 'broken.png').write_bytes(b'not an image')
  resolver = pipeline.SuperResolver(_toy_generator(toy_run['bundle']), pipeline.InferenceSettings())
  summary = evaluate.evaluate_folder(resolver, evaluate.EvalOptions(str(lq), str(tmp_path / 'out')),
                                     log=lambda _: None)
  assert summary['images'] == 0 and 'broken.png' in summary['skipped_inputs']
  with open(tmp_path / 'out' / 'metrics.csv') as f:
    rows = f.read().splitlines()
  assert rows[0].startswith('image,status') and rows[1].startswith('broken.png,skipped: ')


def test_large_images_report_progress_inside_the_image(toy_run):
  from sr_jax import evaluate  # pylint: disable=g-import-not-at-top
  generator = _toy_generator(toy_run['bundle'])
  resolver = pipeline.SuperResolver(generator, pipeline.InferenceSettings(vae_tile=8, batch=4,
                                                                          color_fix='none'))
  lines = []
  resolver.progress = evaluate.InImageProgress('big.png', lines.append, interval=0.0)
  lq = np.asarray(Image.fromarray(skdata.astronaut()).resize((64, 48), Image.BICUBIC), np.uint8)
  resolver(lq, jax.random.key(0))
  phases = {line.split(': ')[1].rsplit(' ', 3)[0] for line in lines}
  assert phases == {'VAE encoder', 'latent tiles', 'VAE decoder'}, lines
  last = [line for line in lines if 'VAE decoder' in line][-1]
  done, total = last.split('VAE decoder ')[1].split(' ')[0].split('/')
  assert done == total and int(total) > 10, last
