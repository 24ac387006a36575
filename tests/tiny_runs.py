"""`train.py` runs of the tiny OMGSR config shared by the training and evaluation tests (a session
fixture in conftest.py: each run compiles the tiny train step, minutes on 2 CPU cores)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Adam's eps is raised from 1e-8 to 1 for these runs. The gradients of 1 and 8 devices differ at the
# float32 rounding level, moved to ~2e-4 relative (g_grad_norm) by the kinks of clamp and L1 and the
# cancellations of GroupNorm backward. With eps = 1e-8 Adam's first step is lr * sign(g), so entries
# with a near-zero gradient flip by 2 lr; with eps = 1 the update is ~0.5 lr g, so params agree to
# ~2.5e-6 while a sharding error (a gradient not averaged, a wrong example) moves them by the whole
# update (1e-4..1e-3).
TRAINER_OVERRIDES = ('--config.max_steps=2', '--config.batch_size=8', '--config.log_every=1',
                     '--config.sample_every=2', '--config.checkpoint_every=1',
                     '--config.optim.eps=1.0')


def apply_overrides(config, overrides=TRAINER_OVERRIDES):
  """``--config.a.b=value`` strings applied to an ml_collections config (value typed as the field)."""
  for key_value in overrides:
    key, value = key_value.removeprefix('--config.').split('=')
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = type(node[leaf])(value)
  return config


def subprocess_env(devices: int) -> dict:
  """The test environment with ``devices`` fake CPU devices and the repo importable."""
  return dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              PYTHONPATH=REPO)


def run_train_py(workdir: str, devices: int) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(REPO, 'train.py'), '--config=configs/omgsr.py:tiny',
         f'--workdir={workdir}', *TRAINER_OVERRIDES]
  return subprocess.run(cmd, cwd=REPO, env=subprocess_env(devices), capture_output=True, text=True,
                        timeout=1200)
