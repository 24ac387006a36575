r"""Trains any registered method (``config.method``) on GPUs, TPUs or the CPU.

  python train.py --config=configs/omgsr.py:tiny --workdir=/tmp/omgsr_tiny     # tiny default
  python train.py --config=configs/omgsr.py --workdir=runs/omgsr_s --config.max_steps=6000 \
      --config.data.paths=/data/LSDIR,/data/ffhq_first10k.txt

A run resumes from the latest checkpoint in --workdir. Multi-host: start the same command on every
host; `jax.distributed.initialize` is called when a cluster environment is detected (see README).
The config file, its keys, the method and the data sources are checked before any model is built.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from sr_jax import cli

cli.register_sequence_parsers()
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config: configs/<method>.py[:variant]; override keys with '
    '--config.key=value (sequences: --config.key=a,b or a Python literal).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs, samples, exports.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.quiet_library_logs()
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    cli.check_train_inputs(config, workdir)
  except cli.InputError as e:
    cli.exit_with_error(str(e))
  from sr_jax import sharding, trainer, xla  # pylint: disable=g-import-not-at-top  # after the checks
  xla.enable_compilation_cache()
  # Before anything touches a device: multi-host launches need the coordinator first.
  sharding.initialize_distributed(config.get('distributed', 'auto'))
  try:
    trainer.train_and_evaluate(config, workdir)
  except FloatingPointError as e:  # the trainer stopped before checkpointing the bad step
    cli.exit_with_error(str(e), cli.RUN_ERROR)


if __name__ == '__main__':
  cli.preflight_config(sys.argv)
  app.run(main)
