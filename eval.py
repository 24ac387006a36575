r"""Super-resolution of a folder of real LQ images with a trained model of any method, and its scores.

  python eval.py --config=configs/omgsr.py:tiny --checkpoint=/tmp/omgsr_tiny \
      --input=LQ_DIR --output=OUT_DIR [--gt=GT_DIR]
  python eval.py --config=configs/omgsr.py --checkpoint=runs/omgsr_s/export/inference \
      --input=RealSR/LQ --output=out/realsr --gt=RealSR/HR --crop_border=4

--checkpoint is a training --workdir (its latest checkpoint, with the run's config) or an exported
inference bundle (<workdir>/export/inference). The method is ``config.method``; its generator comes
from ``methods.get(config.method).load_generator``. Images and latent/VAE tiles are sharded over all
local devices. Writes <stem>.png per input, metrics.csv and summary.json into --output.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sr_jax import cli
from sr_jax import evaluate
from sr_jax import methods
from sr_jax import xla
from sr_jax.inference import color_fix, pipeline

cli.register_sequence_parsers()
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
_PERCEPTUAL = flags.DEFINE_string(
    'perceptual_weights', None, 'Folder of `python -m convert_weights perceptual`: LPIPS (alex, vgg) '
    'and DISTS computed in JAX, without pyiqa (default: config.eval.perceptual_weights).')
flags.mark_flags_as_required(['config', 'checkpoint', 'input', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.quiet_library_logs()
  config = _CONFIG.value
  perceptual = _PERCEPTUAL.value or config.eval.get('perceptual_weights')
  try:
    cli.check_eval_inputs(config, _CHECKPOINT.value, _INPUT.value, _OUTPUT.value, _GT.value,
                          perceptual)
  except cli.InputError as e:
    cli.exit_with_error(str(e))
  xla.enable_compilation_cache()
  if _UPSCALE.value is not None:
    config.eval.upscale = _UPSCALE.value
  settings = pipeline.InferenceSettings.from_config(config, color_fix=_COLOR_FIX.value,
                                                    seed=_SEED.value)
  logging.info('loading the %s generator from %s', config.method, _CHECKPOINT.value)
  generator = methods.get(config.method).load_generator(config, _CHECKPOINT.value)
  resolver = pipeline.SuperResolver(generator, settings)
  logging.info('%s: stages %s on %d device(s), settings %s', generator.method,
               [stage.name for stage in generator.stages], resolver.devices, settings)
  options = evaluate.EvalOptions(_INPUT.value, _OUTPUT.value, _GT.value, _OVERWRITE.value,
                                 _CROP.value, tuple(_METRICS.value), perceptual)
  summary = evaluate.evaluate_folder(resolver, options, log=logging.info)
  logging.info('%d images; means %s; skipped %s', summary['images'], summary['mean'],
               summary['skipped_inputs'] or 'none')


if __name__ == '__main__':
  cli.preflight_config(sys.argv)
  app.run(main)
