"""The training loop with a toy method: outputs, resume equivalence, NaN stop, 8 devices = 1 device.

The toy method (tests/toy_training.py) fits a linear "generator" with Adam on a deterministic data
stream; it carries params, optimizer moments, a PRNG key and a step counter, and a "large" frozen
and trainable array that the FSDP mesh splits.
"""
import json
import logging as std_logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from absl import logging
from PIL import Image

import toy_training as toy
from sr_jax import summary
from sr_jax import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One Method object for all in-process runs: jax reuses its trace/compile caches across runs.
METHOD = toy.make_method()


def _train(workdir, method=METHOD, **overrides):
  return trainer.train_and_evaluate(toy.make_config(**overrides), str(workdir), method,
                                    data_factory=toy.toy_data_factory)


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, 'checkpoints')) if p.isdigit())


def run_toy_subprocess(workdir, device_count, overrides=None, extra_args=(), check=True):
  """Runs tests/toy_training.py in a fresh interpreter with ``device_count`` fake CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={device_count}')
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tests', 'toy_training.py'), str(workdir),
       json.dumps(overrides or {}), *extra_args],
      env=env, capture_output=True, text=True, timeout=300)
  if check and proc.returncode != 0:
    raise AssertionError(f'subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """6 toy steps in one go, on this process's devices; the reference for the other runs."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  _train(workdir)
  return workdir


def test_run_writes_checkpoints_events_samples_export_and_progress(uninterrupted, tmp_path,
                                                                    caplog):
  logging.set_verbosity(logging.INFO)
  caplog.set_level(std_logging.INFO, logger='absl')
  workdir = tmp_path / 'run'
  _train(workdir, max_steps=4, log_every=2, sample_every=2, checkpoint_every=3)

  assert _steps(workdir) == [3, 4]  # every 3 steps, plus the final one
  assert os.path.exists(workdir / 'export' / 'params.npz')
  assert json.loads((workdir / 'config.json').read_text())['checkpoint_every'] == 3
  assert sorted(os.listdir(workdir / 'samples')) == ['step_00000002.png', 'step_00000004.png']
  grid = np.asarray(Image.open(workdir / 'samples' / 'step_00000004.png'))
  # A header row naming the columns, then 2 examples x (LQ | SR | HQ).
  assert grid.shape == (summary.LABEL_HEIGHT + 2 * (4 + 2) + 2, 3 * (4 + 2) + 2, 3)

  (event_file,) = os.listdir(workdir / 'tensorboard')
  events = summary.read_events(str(workdir / 'tensorboard' / event_file))
  scalars = {e['step']: e['scalars'] for e in events if e['scalars']}
  assert sorted(scalars) == [2, 4]
  assert {'loss', 'mse', 'grad_norm', 'perf/steps_per_sec', 'perf/tflops_per_device'} <= set(
      scalars[4])
  images = [e for e in events if e['images']]
  assert [e['step'] for e in images] == [2, 4]
  assert list(images[0]['images'].values())[0].startswith(b'\x89PNG')

  # The logged loss is the mean over the interval: steps 3-4 of the uninterrupted run.
  reference = {m['step']: m for m in _metrics(uninterrupted)}
  logged = {m['step']: m for m in _metrics(workdir)}
  np.testing.assert_allclose(logged[4]['loss'], (reference[3]['loss'] + reference[4]['loss']) / 2,
                             rtol=1e-6)
  progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith('step 4/4')]
  assert progress and 'ETA 0:00:00' in progress[0] and 'steps/s' in progress[0]
  assert 'TFLOP/s/dev' in progress[0] and 'MFU' not in progress[0]  # no MFU on CPU


def test_interrupted_run_matches_uninterrupted(uninterrupted, tmp_path):
  workdir = tmp_path / 'interrupted'
  _train(workdir, max_steps=3)
  assert _steps(workdir) == [2, 3]
  _train(workdir, max_steps=6)  # resumes at step 3: params, Adam moments, PRNG key, data position
  assert _steps(workdir) == [2, 3, 4, 6]
  assert [m['step'] for m in _metrics(workdir)] == [1, 2, 3, 4, 5, 6]
  losses = [m['loss'] for m in _metrics(workdir)]
  np.testing.assert_array_equal(losses, [m['loss'] for m in _metrics(uninterrupted)])
  for name, value in toy.load_export(uninterrupted).items():
    np.testing.assert_array_equal(toy.load_export(workdir)[name], value, err_msg=name)


def test_resume_from_an_earlier_checkpoint_keeps_one_metrics_row_per_step(uninterrupted, tmp_path):
  """Steps replayed after a resume from an older checkpoint replace their rows, never duplicate."""
  workdir = tmp_path / 'replayed'
  shutil.copytree(uninterrupted, workdir)
  shutil.rmtree(workdir / 'checkpoints' / '6')  # as if the run had died before saving step 6
  _train(workdir, max_steps=6)                  # resumes at step 4 and logs steps 5 and 6 again
  steps = [m['step'] for m in _metrics(workdir)]
  assert steps == [1, 2, 3, 4, 5, 6]
  np.testing.assert_array_equal([m['loss'] for m in _metrics(workdir)],
                                [m['loss'] for m in _metrics(uninterrupted)])


def test_max_steps_at_or_below_the_latest_checkpoint_says_so(uninterrupted, tmp_path, caplog):
  caplog.set_level(std_logging.WARNING, logger='absl')
  workdir = tmp_path / 'behind'
  shutil.copytree(uninterrupted / 'checkpoints', workdir / 'checkpoints')
  _train(workdir, max_steps=4)
  assert 'latest checkpoint is at step 6 >= max_steps 4: nothing to train' in caplog.text


@pytest.mark.parametrize('log_every', [1, 10])
def test_nan_stops_naming_the_step_without_checkpointing_it(tmp_path, log_every):
  # log_every=10: the NaN of step 5 is only seen before the step-6 checkpoint, and still named.
  workdir = tmp_path / 'nan'
  with pytest.raises(FloatingPointError, match=r"\['loss'\] at step 5\b"):
    _train(workdir, method=NAN_METHOD, log_every=log_every)
  assert _steps(workdir) == [2, 4]
  assert not os.path.exists(workdir / 'export')


NAN_METHOD = toy.make_method(nan_at_step=5)


def test_resume_when_already_done_exports_without_training(uninterrupted, tmp_path):
  workdir = tmp_path / 'done'
  shutil.copytree(uninterrupted / 'checkpoints', workdir / 'checkpoints')
  _train(workdir, max_steps=6)
  assert not os.path.exists(workdir / 'metrics.jsonl')
  assert _steps(workdir) == [2, 4, 6]
  np.testing.assert_array_equal(toy.load_export(workdir)['w'], toy.load_export(uninterrupted)['w'])


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  """The same 6 toy steps on 8 fake CPU devices, mesh data=4 x fsdp=2 (big arrays FSDP-split)."""
  workdir = tmp_path_factory.mktemp('eight_devices')
  proc = run_toy_subprocess(workdir, 8, {'mesh': {'data': 4, 'fsdp': 2}})
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {'devices': 8}
  return workdir


def test_eight_devices_match_one_device(uninterrupted, eight_devices):
  one, eight = _metrics(uninterrupted), _metrics(eight_devices)
  for key in ('loss', 'mse', 'grad_norm'):
    np.testing.assert_allclose([m[key] for m in eight], [m[key] for m in one], rtol=1e-5,
                               err_msg=key)
  for name, value in toy.load_export(uninterrupted).items():
    np.testing.assert_allclose(toy.load_export(eight_devices)[name], value, rtol=1e-5, atol=1e-7,
                               err_msg=name)


def test_restore_onto_another_device_count(uninterrupted, eight_devices, tmp_path):
  # Steps 1-4 ran on 8 devices (data=4, fsdp=2); steps 5-6 continue on this process's mesh.
  workdir = tmp_path / 'moved'
  shutil.copytree(eight_devices / 'checkpoints', workdir / 'checkpoints')
  shutil.rmtree(workdir / 'checkpoints' / '6')
  _train(workdir, max_steps=6)
  assert [m['step'] for m in _metrics(workdir)] == [5, 6]
  for name, value in toy.load_export(uninterrupted).items():
    np.testing.assert_allclose(toy.load_export(workdir)[name], value, rtol=1e-5, atol=1e-7,
                               err_msg=name)


def test_two_processes_share_one_run(tmp_path):
  """jax.distributed on CPU: 2 processes x 2 devices, mesh data=2 x fsdp=2, as on 2 GPU hosts."""
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    port = sock.getsockname()[1]
  workdir = tmp_path / 'multi'
  procs = []
  for process_id in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
               XLA_FLAGS='--xla_force_host_platform_device_count=2',
               JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
               JAX_PROCESS_ID=str(process_id), JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'tests', 'toy_training.py'), str(workdir),
         json.dumps({'mesh': {'data': 2, 'fsdp': 2}, 'max_steps': 4})],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  for proc in procs:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    assert json.loads(stdout.strip().splitlines()[-1]) == {'devices': 4}
  data_dir = workdir / 'checkpoints' / '4' / 'data'
  for process_id in range(2):  # each host's own data position
    state = json.loads((data_dir / f'process_{process_id}-of-2.json').read_text())
    assert state == {'json': {'index': 4}}
  assert len(os.listdir(workdir / 'tensorboard')) == 1  # process 0 only
  assert [m['step'] for m in _metrics(workdir)] == [1, 2, 3, 4]
  assert toy.load_export(workdir)['big'].shape == toy.BIG_SHAPE


def test_options_from_config_and_peak_table():
  options = trainer.TrainerOptions.from_config(toy.make_config(mesh={'data': 2, 'fsdp': 4}))
  assert options.mesh == {'data': 2, 'fsdp': 4} and options.max_steps == 6
  assert options.async_checkpoints and options.distributed == 'auto'

  class Device:
    platform = 'gpu'
    device_kind = 'NVIDIA H100 80GB HBM3'
  assert trainer.peak_tflops(Device()) == 989.0
  Device.device_kind = 'TPU v5 lite'
  assert trainer.peak_tflops(Device()) == 197.0
  Device.device_kind = 'TPU v5'
  assert trainer.peak_tflops(Device()) == 459.0
  Device.platform = 'cpu'
  assert trainer.peak_tflops(Device()) is None


def test_summary_pieces():
  assert summary.crc32c(b'123456789') == 0xE3069283  # the CRC-32C check value
  line = summary.progress_line(50, 200, {'loss': 0.5}, 2.0, tflops_per_device=100.0, mfu=0.25)
  assert line == ('step 50/200 (25.0%) | loss 0.5 | 2 steps/s | 100 TFLOP/s/dev | MFU 25.0% | '
                  'ETA 0:01:15')
  grid = summary.image_grid([-np.ones((3, 2, 2, 3)), np.ones((3, 4, 4, 3))], pad=1)
  assert grid.shape == (3 * 5 + 1, 2 * 5 + 1, 3)
  assert grid[1, 1].tolist() == [0, 0, 0] and grid[1, 6].tolist() == [255, 255, 255]
  labelled = summary.image_grid([-np.ones((3, 2, 2, 3)), np.ones((3, 16, 16, 3))], pad=1,
                                labels=['LQ', 'SR'])
  header = labelled[:summary.LABEL_HEIGHT]
  assert labelled.shape[0] == summary.LABEL_HEIGHT + 3 * 17 + 1
  assert (header < 128).any() and (header == 255).mean() > 0.5  # dark text on white
