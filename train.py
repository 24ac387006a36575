r"""Trains a method (OMGSR now) on GPUs, TPUs or the CPU.

  python train.py --config=configs/omgsr.py:tiny --workdir=/tmp/omgsr_tiny     # tiny default
  python train.py --config=configs/omgsr.py --workdir=runs/omgsr_s --config.max_steps=6000

A run resumes from the latest checkpoint in --workdir. Multi-host: start the same command on every
host; `jax.distributed.initialize` is called when a cluster environment is detected (see README).
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from sr_jax import sharding
from sr_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config: configs/<method>.py[:variant]; override keys with '
    '--config.key=value.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs, samples, exports.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # Before anything touches a device: multi-host launches need the coordinator first.
  sharding.initialize_distributed(_CONFIG.value.get('distributed', 'auto'))
  trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
