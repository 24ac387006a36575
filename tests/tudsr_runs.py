"""`train.py` runs of the tiny TUDSR configs shared by tests/test_tudsr_training.py (one session
fixture: stage 1, stage 2 from it, interrupted twins, 8-device twins). Each run is a real
subprocess, as a user runs it; twins of a run reuse its compiled step from the persistent cache."""
import os
import subprocess
import sys

from tiny_runs import REPO, subprocess_env

# Adam eps = 1 for the same reason as tiny_runs.TRAINER_OVERRIDES (1 vs 8 devices compare params
# to float32 rounding, not to sign flips of near-zero gradients); batch 8 splits over 8 devices.
COMMON = ('--config.batch_size=8', '--config.optim.eps=1.0', '--config.sample_every=0')
STAGE1 = ('--config=configs/tudsr.py:tiny_stage1', '--config.max_steps=4', '--config.log_every=1',
          '--config.checkpoint_every=2') + COMMON
# Stage 2 at a 10x smaller rate: 4 updates per call at the tiny default's 1e-2 amplify float32
# rounding between 1 and 8 devices to ~1e-3 in ea-DISTS by the second chunk (the forward alone
# agrees to 8e-7); at 1e-3 the runs stay within rounding while an update is still 1e-4..1e-3.
STAGE2 = ('--config=configs/tudsr.py:tiny_stage2', '--config.max_steps=8', '--config.log_every=4',
          '--config.checkpoint_every=4', '--config.optim.learning_rate=1e-3') + COMMON


def run_train_py(workdir: str, args, devices: int = 1, extra=()) -> subprocess.CompletedProcess:
  cmd = [sys.executable, os.path.join(REPO, 'train.py'), f'--workdir={workdir}', *args, *extra]
  return subprocess.run(cmd, cwd=REPO, env=subprocess_env(devices), capture_output=True, text=True,
                        timeout=1800)


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
  assert result.returncode == 0, result.stderr[-6000:]
  return result


def make_runs(root) -> dict:
  """{name: workdir}: 's1', 's1_resumed' (2 steps, then on to 4); 's2' (from 's1'), 's2_resumed'
  (4 updates = 1 batch, then 8), 's2_8dev'. Devices are compared in stage 2 only: its step runs
  stage 1's G and the same GAN update (and an 8-device compile costs two minutes here)."""
  runs = {name: str(root / name) for name in
          ('s1', 's1_resumed', 's2', 's2_resumed', 's2_8dev')}
  checked(run_train_py(runs['s1'], STAGE1))
  checked(run_train_py(runs['s1_resumed'], STAGE1, extra=('--config.max_steps=2',)))
  checked(run_train_py(runs['s1_resumed'], STAGE1))
  init = (f'--config.init_from={runs["s1"]}',)
  checked(run_train_py(runs['s2'], STAGE2 + init))
  checked(run_train_py(runs['s2_resumed'], STAGE2 + init, extra=('--config.max_steps=4',)))
  checked(run_train_py(runs['s2_resumed'], STAGE2 + init))
  checked(run_train_py(runs['s2_8dev'], STAGE2 + init, devices=8))
  return runs
