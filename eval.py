r"""One-step SR of a folder of real LQ images with a trained model, and its scores.

  python eval.py --config=configs/omgsr.py:tiny --checkpoint=/tmp/omgsr_tiny \
      --input=LQ_DIR --output=OUT_DIR [--gt=GT_DIR]
  python eval.py --config=configs/omgsr.py --checkpoint=runs/omgsr_s/export/inference \
      --input=RealSR/LQ --output=out/realsr --gt=RealSR/HR --crop_border=4

--checkpoint is a training --workdir (its latest checkpoint, with the run's config) or an exported
inference bundle (<workdir>/export/inference). Images and UNet/VAE tiles are sharded over all local
devices. Writes <stem>.png per input, metrics.csv and summary.json into --output.
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sr_jax import evaluate
from sr_jax.inference import color_fix, one_step

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The training config of the model: configs/<method>.py[:variant].')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Training workdir or inference bundle.')
_INPUT = flags.DEFINE_string('input', None, 'Folder of LQ images.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output folder (created).')
_GT = flags.DEFINE_string('gt', None, 'Ground-truth folder (same file stems): paired metrics.')
_UPSCALE = flags.DEFINE_integer('upscale', None, 'Scale factor (default: config.eval.upscale).')
_COLOR_FIX = flags.DEFINE_enum('color_fix', None, list(color_fix.COLOR_FIXES),
                               'Colour fix (default: config.eval.color_fix, adain).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Recompute outputs that already exist.')
_CROP = flags.DEFINE_integer('crop_border', 0, 'Pixels removed on each side before PSNR/SSIM.')
_METRICS = flags.DEFINE_list('metrics', list(evaluate.metrics_lib.PYIQA_METRICS),
                             'pyiqa metrics to try (skipped when pyiqa or weights are missing).')
_SEED = flags.DEFINE_integer('seed', None, 'Seed of the posterior sampling.')
flags.mark_flags_as_required(['config', 'checkpoint', 'input', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  settings = evaluate.settings_from_config(config, upscale=_UPSCALE.value,
                                           color_fix=_COLOR_FIX.value, seed=_SEED.value)
  model = one_step.load_model(config, _CHECKPOINT.value)
  resolver = one_step.SuperResolver(model, settings)
  logging.info('one-step SR at t*=%d on %d device(s), settings %s', model.t_star, resolver.devices,
               settings)
  options = evaluate.EvalOptions(_INPUT.value, _OUTPUT.value, _GT.value, _OVERWRITE.value,
                                 _CROP.value, tuple(_METRICS.value))
  summary = evaluate.evaluate_folder(resolver, options, log=logging.info)
  logging.info('%d images; means %s; skipped %s', summary['images'], summary['mean'],
               summary['skipped_inputs'] or 'none')


if __name__ == '__main__':
  app.run(main)
