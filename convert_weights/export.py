"""``python -m convert_weights export``: a trained generator as diffusers folders for PyTorch users.

Usage::

  python -m convert_weights export --checkpoint runs/omgsr_s --out exported/omgsr_s \\
      [--config configs/omgsr.py[:VARIANT]] [--step N]

``--checkpoint`` is a training workdir (its latest checkpoint, or ``--step``) or its exported bundle
(``WORKDIR/export/inference``). The generator is loaded through the method registry
(``methods.get(config.method).load_generator(config, checkpoint)``) and written as::

  OUT/unet/config.json + diffusion_pytorch_model.safetensors   (LoRA merged, float32)
  OUT/vae/config.json + diffusion_pytorch_model.safetensors    (LoRA merged, float32)
  OUT/scheduler/scheduler_config.json                          (when the source has one)
  OUT/export_info.json                                         (method, checkpoint, step, t*, ...)

so that ``diffusers.UNet2DConditionModel.from_pretrained('OUT/unet')`` and
``diffusers.AutoencoderKL.from_pretrained('OUT/vae')`` load them. Without ``--config`` the run's own
config is read: ``WORKDIR/config.json`` (written by the trainer) or the bundle's ``generator.json``.
The generator is loaded with float32 compute and frozen weights whatever the config says, so the LoRA
is merged into the float32 frozen weights, as the reference's ``merge_and_unload`` does. The model
configs come from where the generator's weights come from (the bundle's converted folders, or
``config.model``: ``<kind>_config`` for random models, the converted ``sd_path`` otherwise) and are
checked against the params. Writing needs numpy and safetensors only (no torch).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
from typing import Any, Mapping

import numpy as np

KINDS = ('unet', 'vae')
DIFFUSERS_CLASSES = {'unet': 'UNet2DConditionModel', 'vae': 'AutoencoderKL'}
SCHEDULER_SUBFOLDER = 'scheduler'
INFO_FILE = 'export_info.json'
RUN_CONFIG_FILE = 'config.json'  # the trainer's copy of the run's config in the workdir


class ExportError(ValueError):
  """The checkpoint cannot be exported (the message says why)."""


def add_parser(commands: Any) -> argparse.ArgumentParser:
  """Registers the ``export`` subcommand on the ``add_subparsers`` object ``commands``."""
  parser = commands.add_parser(
      'export', help='a trained generator (workdir or bundle) as merged diffusers unet/ + vae/')
  parser.add_argument('--checkpoint', required=True, help='training workdir or exported bundle')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--config', default=None, metavar='FILE[:VARIANT]',
                      help='config file (default: the run config saved with the checkpoint)')
  parser.add_argument('--step', type=int, default=None,
                      help='checkpoint step of a workdir (default: the latest)')
  return parser


# ------------------------------------------------------------------------------------ configs


def load_config_file(spec: str) -> Any:
  """``get_config(VARIANT)`` of the config file ``spec = 'FILE[:VARIANT]'`` (as ``--config`` of
  train.py; run from the repository root so that ``configs`` imports)."""
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'--config {path}: no such file')
  module_spec = importlib.util.spec_from_file_location('_sr_jax_export_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ExportError(f'--config {path} defines no get_config()')
  return module.get_config(variant) if variant else module.get_config()


def saved_run_config(checkpoint: str) -> Any:
  """The config a checkpoint was made with: ``WORKDIR/config.json`` or the bundle's record."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sr_jax.methods import common  # pylint: disable=g-import-not-at-top
  if common.checkpoint_kind(checkpoint) == 'bundle':
    file = common.bundle_file(checkpoint)
    with open(file) as f:
      record = json.load(f)
    if not isinstance(record.get('config'), dict):
      raise ExportError(f'{file} records no training config: pass --config')
    return ml_collections.ConfigDict(record['config'])
  file = os.path.join(checkpoint, RUN_CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(f'{file} not found (the trainer writes it): pass --config')
  with open(file) as f:
    return ml_collections.ConfigDict(json.load(f))


def with_float32_weights(config: Any) -> Any:
  """A copy of ``config`` computing and storing frozen weights in float32 (when it has the fields),
  so that nothing is rounded to bfloat16 before the merge."""
  config = copy.deepcopy(config)
  model = config.get('model')
  if model is not None:
    for field in ('compute_dtype', 'frozen_param_dtype'):
      if field in model:
        model[field] = 'float32'
  return config


def source_configs(config: Any, checkpoint: str) -> dict[str, Any]:
  """The reference ``config.json`` dicts of the UNet and VAE (and the scheduler config, when there
  is one) from where the generator's weights come from."""
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  from sr_jax.methods import common  # pylint: disable=g-import-not-at-top
  if common.checkpoint_kind(checkpoint) == 'bundle':
    cfgs = {kind: common.model_config({'source': 'converted'}, kind, checkpoint) for kind in KINDS}
    scheduler = os.path.join(checkpoint, pretrained.SCHEDULER_CONFIG_FILE)
  else:
    model = config.get('model')
    if model is None or model.get('source') not in ('random', 'converted'):
      raise ExportError(f'config.model.source must be random or converted to find the model '
                        f'configs of {checkpoint}')
    try:
      cfgs = {kind: common.model_config(model, kind, model.get('sd_path')) for kind in KINDS}
    except (KeyError, TypeError) as e:
      raise ExportError(f'cannot find the UNet / VAE configs in config.model ({e!r}): this export '
                        f'reads <kind>_config (random models) or sd_path (converted)') from None
    if model.source == 'random':
      scheduler = model.get('scheduler_config')
    else:
      scheduler = os.path.join(model.sd_path, pretrained.SCHEDULER_CONFIG_FILE)
  if isinstance(scheduler, str):
    if not os.path.isfile(scheduler):
      return cfgs
    with open(scheduler) as f:
      scheduler = json.load(f)
  if scheduler is not None:
    cfgs['scheduler'] = dict(scheduler)
  return cfgs


# ------------------------------------------------------------------------------------ generator


def merged_unet_and_vae(generator: Any) -> dict[str, tuple[Any, Any]]:
  """``{'unet': (module, params), 'vae': (module, params)}`` of a loaded generator, any LoRA tree
  still beside them (``params[step.lora_key]``, ``params[vae_key + '_lora']``) merged in.

  Raises:
    ExportError: no UNet or no VAE, several of either, or a VAE built without both halves.
  """
  from sr_jax.models import lora  # pylint: disable=g-import-not-at-top
  params, unets, vaes = generator.params, {}, {}
  for stage in generator.stages:
    step = stage.step
    if getattr(step, 'unet', None) is not None:
      key, lora_key = getattr(step, 'unet_key', 'unet'), getattr(step, 'lora_key', None)
      unets[(key, lora_key)] = (step.unet, params[key], params.get(lora_key), step.lora_config)
    vaes[stage.vae_key] = (stage.vae, params[stage.vae_key], params.get(stage.vae_key + '_lora'),
                           stage.vae_lora)
  out = {}
  for kind, found in (('unet', unets), ('vae', vaes)):
    if len(found) != 1:
      what = f'no {kind.upper()}' if not found else f'{len(found)} different {kind.upper()}s'
      raise ExportError(f'the {generator.method!r} generator has {what} ({len(generator.stages)} '
                        'stage(s)); export writes exactly one UNet and one VAE')
    module, base, tree, lora_config = next(iter(found.values()))
    if kind == 'vae' and set(getattr(module, 'parts', ())) != {'encoder', 'decoder'}:
      raise ExportError(f'the generator VAE has parts {module.parts}; a diffusers AutoencoderKL '
                        'needs the encoder and the decoder')
    out[kind] = (module, lora.merge(base, tree, lora_config) if tree else base)
  return out


def check_config_fits(kind: str, config: Mapping[str, Any], params: Any) -> None:
  """Raises ExportError naming the keys when ``config`` builds a model with other params."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  want = traverse_util.flatten_dict(pretrained.abstract_params(pretrained.build_model(kind, config)))
  got = traverse_util.flatten_dict(params)
  missing = sorted('/'.join(p) for p in set(want) - set(got))
  unexpected = sorted('/'.join(p) for p in set(got) - set(want))
  shapes = sorted('/'.join(p) for p in set(want) & set(got)
                  if tuple(want[p].shape) != tuple(np.shape(got[p])))
  if missing or unexpected or shapes:
    raise ExportError(f'the {kind} config does not fit the generator params: missing '
                      f'{missing[:8]}, unexpected {unexpected[:8]}, other shapes {shapes[:8]}')


# ------------------------------------------------------------------------------------ writing


def write_hub_folder(out: str, kind: str, config: Mapping[str, Any], params: Any) -> str:
  """Writes Flax ``params`` as a hub-layout PyTorch folder: ``config.json`` (``_class_name`` added
  for diffusers kinds when missing) and ``<stem>.safetensors`` in the PyTorch layout, float32
  (``diffusion_pytorch_model`` for unet / vae, ``model`` for dinov3)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from sr_jax import pretrained, weights  # pylint: disable=g-import-not-at-top
  os.makedirs(out, exist_ok=True)
  config = dict(config)
  if kind in DIFFUSERS_CLASSES:
    config.setdefault('_class_name', DIFFUSERS_CLASSES[kind])
  state = {k: np.ascontiguousarray(v.astype(np.float32))
           for k, v in weights.flax_to_state_dict(params).items()}
  save_file(state, os.path.join(out, pretrained.KINDS[kind].weights_stem + '.safetensors'),
            metadata={'format': 'pt'})
  with open(os.path.join(out, pretrained.CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return out


def export_checkpoint(checkpoint: str, out: str, config: Any = None, step: int | None = None
                      ) -> dict[str, str]:
  """Writes the merged UNet / VAE (and scheduler config) of ``checkpoint`` under ``out``; returns
  {part: folder}. ``config`` defaults to the run's saved config (see the module docstring)."""
  from sr_jax import methods  # pylint: disable=g-import-not-at-top
  from sr_jax.methods import common  # pylint: disable=g-import-not-at-top
  common.checkpoint_kind(checkpoint)  # a clear error for a missing or foreign folder, first
  config = with_float32_weights(saved_run_config(checkpoint) if config is None else config)
  if not config.get('method'):
    raise ExportError('the config names no method (config.method)')
  method = methods.get(config.method)
  kwargs = {} if step is None else {'step': step}
  generator = method.load_generator(config, checkpoint, **kwargs)
  models = merged_unet_and_vae(generator)
  cfgs = source_configs(config, checkpoint)
  written = {}
  for kind in KINDS:
    check_config_fits(kind, cfgs[kind], models[kind][1])
    written[kind] = write_hub_folder(os.path.join(out, kind), kind, cfgs[kind], models[kind][1])
  if 'scheduler' in cfgs:
    folder = os.path.join(out, SCHEDULER_SUBFOLDER)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'scheduler_config.json'), 'w') as f:
      json.dump(cfgs['scheduler'], f, indent=2, sort_keys=True)
    written['scheduler'] = folder
  with open(os.path.join(out, INFO_FILE), 'w') as f:
    json.dump({'format': 'sr_jax diffusers export', 'method': generator.method, 'dtype': 'float32',
               'source': dict(generator.source)}, f, indent=2, sort_keys=True, default=str)
  return written


def run(args: argparse.Namespace) -> None:
  """The ``export`` subcommand."""
  config = load_config_file(args.config) if args.config else None
  written = export_checkpoint(args.checkpoint, args.out, config, args.step)
  for part, folder in written.items():
    print(f'{part}: {args.checkpoint} -> {folder}')
