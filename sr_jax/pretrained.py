"""Pretrained UNet, VAE and DINOv3 (ConvNeXt or ViT) loaders, and the sr_jax converted-folder format.

Loading::

  unet, unet_params = pretrained.load_unet('ckpt/sd21')              # pipeline root or unet/ folder
  vae, vae_params = pretrained.load_vae('ckpt/sd21', parts=('encoder',))
  dino, dino_params = pretrained.load_dinov3('ckpt/dinov3-convnext-large')
  vit, vit_params = pretrained.load_dinov3('ckpt/dinov3-vitb16')     # DINOv3ViTModel
  context = pretrained.load_prompt_embeds('ckpt/sd21')                # (1, L, C), the empty prompt

Each ``load_*`` takes a folder that is one of

* a raw diffusers / transformers model folder in the hub layout: ``config.json`` plus
  ``diffusion_pytorch_model.safetensors`` (diffusers) or ``model.safetensors`` (transformers), or a
  sharded ``*.safetensors.index.json`` with its shards, or a ``--variant`` such as
  ``diffusion_pytorch_model.fp16.safetensors``. fp32, fp16 and bf16 tensors all load (numpy reads
  bf16 through ml_dtypes). Pickles (``*.bin``) load only with ``allow_pickle=True`` (needs torch);
* a diffusers pipeline root holding ``unet/`` and ``vae/`` subfolders (``load_unet`` / ``load_vae``);
* our converted folder (below), or the root of a converted SD pipeline.

Raw checkpoints go through :func:`sr_jax.weights.convert_state_dict` against the abstract param tree
(``jax.eval_shape`` of the module init on ``module.dummy_inputs()``), so a checkpoint that does not fit
its config fails with a :class:`~sr_jax.weights.CheckpointError` listing missing and unexpected keys or
naming the key and both shapes. ``load_dinov3`` reads the family from the folder: the marker kind of a
converted folder, else ``config.json``'s ``model_type`` (``"dinov3_vit"`` -> kind ``"dinov3_vit"``,
:class:`~sr_jax.models.dinov3_vit.DINOv3ViTModel`; ``"dinov3_convnext"`` or none -> kind ``"dinov3"``).
transformers keeps a DINOv3 checkpoint's keys un-prefixed on disk, but
a state dict taken from the in-memory model (or older exports) carries the base-model prefix
``model.`` on every backbone key; that one known prefix is stripped (:data:`KNOWN_PREFIXES`), nothing
else is guessed.

Converted folder format (version :data:`FORMAT_VERSION`), written by ``python -m convert_weights``::

  DIR/config.json          the original model config, copied verbatim
  DIR/params.safetensors   the Flax param tree, keys '/'-joined Flax paths
                           ('down_blocks_0/resnets_1/conv1/kernel'), values already in Flax layout
                           (no transposes at load time); float32 unless converted with --dtype
  DIR/sr_jax.json          marker: {"format": "sr_jax", "format_version": 1, "kind": "unet" | "vae" |
                           "dinov3" | "dinov3_vit", "model_class", "source", "dtype",
                           "num_params"}

A converted SD pipeline root holds ``unet/`` and ``vae/`` (each a converted folder),
``scheduler_config.json`` (copied), an ``sr_jax.json`` marker of kind ``"sd"`` and the prompt
embeddings: ``prompt_embeds.safetensors`` with one float32 array (1, L, C) per prompt under the keys
``prompt_0``, ``prompt_1``, ... and ``prompt_embeds.json`` =
``{"format_version": 1, "prompts": {"prompt_0": "", ...}, "text_encoder": source, "max_length": L}``.
The load path of converted folders needs only numpy, safetensors and jax (no torch, no transformers).

Perceptual-loss weights (LPIPS, DISTS, ea-DISTS), written by ``python -m convert_weights perceptual``
and read by :func:`load_perceptual`, are one converted folder without ``config.json``: its
``params.safetensors`` holds the groups ``vgg16/features_<i>/{kernel,bias}`` and
``alexnet/features_<i>/...`` (torchvision ``features``, :mod:`sr_jax.models.vgg`),
``lpips_vgg/lin<k>/model_1/kernel`` and ``lpips_alex/...`` (LPIPS v0.1 heads) and ``dists/alpha``,
``dists/beta`` ((1475,) each); the marker has kind ``"perceptual"`` and ``"sources"`` (group -> origin)::

  params = pretrained.load_perceptual('ckpt/perceptual')
  d = lpips.lpips_distance(params, x, y, net='vgg')     # sr_jax.losses.lpips; also dists.dists_distance
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file as _load_safetensors
from safetensors.numpy import save_file as _save_safetensors

from sr_jax.models.dinov3 import DINOv3ConvNextModel
from sr_jax.models.dinov3_vit import DINOv3ViTModel
from sr_jax.models.unet import UNet2DConditionModel
from sr_jax.models.vae import DECODER_PARAMS, ENCODER_PARAMS, AutoencoderKL
from sr_jax.weights import (SAFETENSORS_INDEX_SUFFIX, CheckpointError, convert_state_dict,
                            find_weight_files, read_state_dict)

FORMAT_NAME = 'sr_jax'
FORMAT_VERSION = 1
MARKER_FILE = 'sr_jax.json'
PARAMS_FILE = 'params.safetensors'
CONFIG_FILE = 'config.json'
SCHEDULER_CONFIG_FILE = 'scheduler_config.json'
PROMPT_EMBEDS_FILE = 'prompt_embeds.safetensors'
PROMPT_EMBEDS_JSON = 'prompt_embeds.json'
# The base-model prefix of transformers' DINOv3ConvNext/ViT PreTrainedModel; stripped from keys
# carrying it (in memory `model.stages.*` / `model.layer.*`; on disk un-prefixed).
KNOWN_PREFIXES: dict[str, tuple[str, ...]] = {'unet': (), 'vae': (), 'dinov3': ('model.',),
                                              'dinov3_vit': ('model.',)}
# config.json `model_type` of each DINOv3 kind (load_dinov3 picks the kind from it).
DINOV3_MODEL_TYPES = {'dinov3': 'dinov3_convnext', 'dinov3_vit': 'dinov3_vit'}
STORAGE_DTYPES = {'float32': np.float32, 'float16': np.float16, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """How one model family is stored in the hub layout."""
  name: str
  model_class: type
  weights_stem: str  # safetensors file stem
  pickle_stem: str  # pickle file stem (transformers names it differently)
  pipeline_subfolder: str | None  # subfolder of a diffusers pipeline root


KINDS: dict[str, ModelKind] = {
    'unet': ModelKind('unet', UNet2DConditionModel, 'diffusion_pytorch_model',
                      'diffusion_pytorch_model', 'unet'),
    'vae': ModelKind('vae', AutoencoderKL, 'diffusion_pytorch_model', 'diffusion_pytorch_model',
                     'vae'),
    'dinov3': ModelKind('dinov3', DINOv3ConvNextModel, 'model', 'pytorch_model', None),
    'dinov3_vit': ModelKind('dinov3_vit', DINOv3ViTModel, 'model', 'pytorch_model', None),
}


# ------------------------------------------------------------------------------------ files

def _read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write('\n')


def is_converted(folder: str) -> bool:
  """Whether ``folder`` is one of our converted folders (it has the ``sr_jax.json`` marker)."""
  return os.path.isfile(os.path.join(folder, MARKER_FILE))


def resolve_model_folder(path: str | os.PathLike, kind: str) -> str:
  """Returns the folder holding ``kind``'s ``config.json``: ``path`` itself or its pipeline subfolder."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such folder (expected a {kind} model folder)')
  if os.path.isfile(os.path.join(path, CONFIG_FILE)):
    return path
  sub = KINDS[kind].pipeline_subfolder
  if sub and os.path.isfile(os.path.join(path, sub, CONFIG_FILE)):
    return os.path.join(path, sub)
  where = f' or {os.path.join(path, sub, CONFIG_FILE)} (pipeline root)' if sub else ''
  raise FileNotFoundError(f'missing {os.path.join(path, CONFIG_FILE)}{where}: not a {kind} folder')


def find_checkpoint_files(folder: str, weights_stem: str, pickle_stem: str | None = None, *,
                          variant: str | None = None, allow_pickle: bool = False) -> list[str]:
  """The weight files of a raw hub-layout folder: ``<stem>[.<variant>].safetensors``, a sharded
  index, or (only with ``allow_pickle``) ``<pickle_stem>[.<variant>].bin``.

  diffusers names safetensors and pickles alike (``diffusion_pytorch_model``); transformers uses
  ``model.safetensors`` but ``pytorch_model.bin``, hence the separate ``pickle_stem``.
  """
  suffix = f'.{variant}' if variant else ''
  stem = weights_stem + suffix
  try:
    return find_weight_files(folder, stem, allow_pickle=allow_pickle)
  except FileNotFoundError:
    pass
  if variant:  # diffusers/transformers name a sharded variant's index '<stem>.safetensors.index.<v>.json'
    index = os.path.join(folder, f'{weights_stem}.safetensors.index.{variant}.json')
    if os.path.isfile(index):
      shards = sorted(set(_read_json(index)['weight_map'].values()))
      missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
      if missing:
        raise FileNotFoundError(f'{index} lists {missing}, which do not exist')
      return [os.path.join(folder, s) for s in shards]
  pickle_file = os.path.join(folder, (pickle_stem or weights_stem) + suffix + '.bin')
  if os.path.isfile(pickle_file):
    if not allow_pickle:
      raise CheckpointError(
          f'{folder} holds only the pickle file {os.path.basename(pickle_file)}; loading pickles runs '
          'arbitrary code, so it is refused unless you pass --allow-pickle (allow_pickle=True)')
    return [pickle_file]
  present = sorted(n for n in os.listdir(folder) if n.endswith(('.safetensors', '.bin', '.json')))
  raise FileNotFoundError(
      f'missing weights in {folder}: expected {stem}.safetensors or {stem}{SAFETENSORS_INDEX_SUFFIX}'
      f' (the folder has {present})')


def strip_known_prefixes(state: Mapping[str, np.ndarray], prefixes: Sequence[str]
                         ) -> dict[str, np.ndarray]:
  """Removes each of ``prefixes`` from the keys that start with it (see :data:`KNOWN_PREFIXES`)."""
  out: dict[str, np.ndarray] = {}
  for key, value in state.items():
    for prefix in prefixes:
      if key.startswith(prefix):
        key = key[len(prefix):]
        break
    if key in out:
      raise CheckpointError(f'key {key} appears both with and without a prefix {tuple(prefixes)}')
    out[key] = value
  return out


# ------------------------------------------------------------------------------------ models

def build_model(kind: str, config: Mapping[str, Any], **kwargs) -> Any:
  """``KINDS[kind].model_class.from_config(config, **kwargs)``; a DINOv3 config of the other family
  (its ``model_type``) is refused by name rather than built into a wrong model."""
  found = config.get('model_type')
  if kind in DINOV3_MODEL_TYPES and found in DINOV3_MODEL_TYPES.values() \
      and found != DINOV3_MODEL_TYPES[kind]:
    raise CheckpointError(f'config has model_type {found!r}, but kind {kind!r} is '
                          f'{DINOV3_MODEL_TYPES[kind]!r} (use pretrained.load_dinov3, which picks '
                          'the kind from the folder)')
  return KINDS[kind].model_class.from_config(config, **kwargs)


def dinov3_kind(path: str | os.PathLike) -> str:
  """``'dinov3_vit'`` or ``'dinov3'`` (ConvNeXt) for a DINOv3 folder: the marker kind of a converted
  folder, else ``config.json``'s ``model_type`` (none: ConvNeXt, as before the ViT existed)."""
  folder = os.fspath(path)
  if is_converted(folder):
    kind = _read_json(os.path.join(folder, MARKER_FILE)).get('kind')
    if kind in DINOV3_MODEL_TYPES:
      return kind
  config_path = os.path.join(folder, CONFIG_FILE)
  if os.path.isfile(config_path):
    found = _read_json(config_path).get('model_type')
    for kind, model_type in DINOV3_MODEL_TYPES.items():
      if found == model_type:
        return kind
  return 'dinov3'  # load_model names what is missing or wrong


@functools.lru_cache(maxsize=16)
def abstract_params(module: Any) -> Any:
  """The param tree of ``module`` as ``jax.ShapeDtypeStruct`` leaves (nothing is computed).

  Cached per module config: tracing a full UNet init takes seconds and shapes never change.
  """
  inputs = module.dummy_inputs()
  if not isinstance(inputs, tuple):
    inputs = (inputs,)
  return jax.eval_shape(module.init, jax.random.key(0), *inputs)['params']


def _unbuilt_vae_params(module: Any) -> tuple[str, ...]:
  """Top-level VAE param names of the halves ``module`` does not build (their keys are dropped)."""
  if not isinstance(module, AutoencoderKL):
    return ()
  names = {'encoder': ENCODER_PARAMS, 'decoder': DECODER_PARAMS}
  return tuple(n for part, ns in names.items() if part not in module.parts for n in ns)


def convert_raw_folder(folder: str, kind: str, module: Any, *, variant: str | None = None,
                       allow_pickle: bool = False) -> dict:
  """Reads a raw hub-layout folder and converts it to ``module``'s Flax param tree (float32 numpy)."""
  spec = KINDS[kind]
  files = find_checkpoint_files(folder, spec.weights_stem, spec.pickle_stem, variant=variant,
                                allow_pickle=allow_pickle)
  state = strip_known_prefixes(read_state_dict(files), KNOWN_PREFIXES.get(kind, ()))
  ignore = tuple(f'{name}.' for name in _unbuilt_vae_params(module))
  try:
    return convert_state_dict(state, abstract_params(module), ignore_prefixes=ignore)
  except CheckpointError as e:
    raise CheckpointError(f'{kind} checkpoint in {folder}: {e}') from None


def read_converted_params(folder: str, expected: Any, *, drop_top_level: Sequence[str] = ()) -> dict:
  """Reads ``params.safetensors`` of a converted folder and checks it against the ``expected`` tree.

  Top-level subtrees named in ``drop_top_level`` are skipped (a VAE built with only some parts).
  """
  params_path = os.path.join(folder, PARAMS_FILE)
  if not os.path.isfile(params_path):
    raise FileNotFoundError(f'missing {params_path} (the folder has the {MARKER_FILE} marker of a '
                            'converted folder)')
  stored = _load_safetensors(params_path)
  want = {'/'.join(path): leaf for path, leaf in traverse_util.flatten_dict(expected).items()}
  flat, unexpected = {}, []
  for key, value in stored.items():
    if key.split('/', 1)[0] in drop_top_level:
      continue
    if key not in want:
      unexpected.append(key)
      continue
    shape = tuple(want[key].shape)
    if value.shape != shape:
      raise CheckpointError(f'shape mismatch for {key} in {folder}/{PARAMS_FILE}: stored '
                            f'{value.shape}, model expects {shape}')
    flat[tuple(key.split('/'))] = value
  missing = sorted(k for k in want if tuple(k.split('/')) not in flat)
  if missing or unexpected:
    raise CheckpointError(
        f'{folder}/{PARAMS_FILE} does not match the model config:\n'
        f'  missing ({len(missing)}): {missing}\n  unexpected ({len(unexpected)}): {sorted(unexpected)}')
  return traverse_util.unflatten_dict(flat)


def _read_marker(folder: str, kind: str) -> dict[str, Any]:
  marker = _read_json(os.path.join(folder, MARKER_FILE))
  if marker.get('format') != FORMAT_NAME or marker.get('format_version', 0) > FORMAT_VERSION:
    raise CheckpointError(f'{folder}/{MARKER_FILE}: format {marker.get("format")!r} version '
                          f'{marker.get("format_version")} is not readable by this sr_jax '
                          f'(reads {FORMAT_NAME!r} <= {FORMAT_VERSION})')
  if marker.get('kind') != kind:
    raise CheckpointError(f'{folder} holds a converted {marker.get("kind")!r}, not a {kind!r}')
  return marker


def load_model(kind: str, path: str | os.PathLike, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, allow_pickle: bool = False,
               variant: str | None = None, **model_kwargs) -> tuple[Any, dict]:
  """Builds ``kind``'s module from the folder's config and loads its params (jnp, ``param_dtype``)."""
  folder = resolve_model_folder(path, kind)
  converted = is_converted(folder)
  if converted:
    _read_marker(folder, kind)
  config = _read_json(os.path.join(folder, CONFIG_FILE))
  module = build_model(kind, config, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
  if converted:
    params = read_converted_params(folder, abstract_params(module),
                                   drop_top_level=_unbuilt_vae_params(module))
  else:
    params = convert_raw_folder(folder, kind, module, variant=variant, allow_pickle=allow_pickle)
  # Cast on the host (numpy, ml_dtypes for bf16): eager jnp casts would compile one program per shape.
  storage = np.dtype(param_dtype)
  return module, jax.tree.map(lambda a: jnp.asarray(np.asarray(a).astype(storage, copy=False)), params)


def load_unet(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
              allow_pickle: bool = False, variant: str | None = None
              ) -> tuple[UNet2DConditionModel, dict]:
  """``(UNet2DConditionModel, params)`` from a unet folder, a pipeline root or a converted folder."""
  return load_model('unet', path, dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle,
                    variant=variant)


def load_vae(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
             parts: Sequence[str] = ('encoder', 'decoder'), allow_pickle: bool = False,
             variant: str | None = None) -> tuple[AutoencoderKL, dict]:
  """``(AutoencoderKL, params)``; ``parts`` builds only the encoder or decoder half (and loads it)."""
  return load_model('vae', path, dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle,
                    variant=variant, parts=tuple(parts))


def load_dinov3(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                *, allow_pickle: bool = False, variant: str | None = None, **model_kwargs
                ) -> tuple[DINOv3ConvNextModel | DINOv3ViTModel, dict]:
  """``(DINOv3ConvNextModel or DINOv3ViTModel, params)`` from a transformers folder or a converted
  folder; the family comes from the folder (:func:`dinov3_kind`). ``model_kwargs``: e.g. ``remat``."""
  return load_model(dinov3_kind(path), path, dtype=dtype, param_dtype=param_dtype,
                    allow_pickle=allow_pickle, variant=variant, **model_kwargs)


# ------------------------------------------------------------------------------------ writing

def save_converted(out: str | os.PathLike, kind: str, config: str | Mapping[str, Any], params: Any,
                   *, source: str, dtype: str = 'float32') -> str:
  """Writes ``params`` (a Flax tree) as a converted folder: config.json (copied from the path
  ``config`` or dumped from the mapping ``config``), params.safetensors and the marker."""
  out = os.fspath(out)
  os.makedirs(out, exist_ok=True)
  storage = STORAGE_DTYPES[dtype]
  flat = {'/'.join(path): np.ascontiguousarray(np.asarray(value).astype(storage))
          for path, value in traverse_util.flatten_dict(params).items()}
  _save_safetensors(flat, os.path.join(out, PARAMS_FILE))
  if isinstance(config, Mapping):
    _write_json(os.path.join(out, CONFIG_FILE), dict(config))
  else:
    shutil.copyfile(config, os.path.join(out, CONFIG_FILE))
  _write_json(os.path.join(out, MARKER_FILE), {
      'format': FORMAT_NAME, 'format_version': FORMAT_VERSION, 'kind': kind,
      'model_class': KINDS[kind].model_class.__name__, 'source': source, 'dtype': dtype,
      'num_params': int(sum(v.size for v in flat.values()))})
  return out


def convert_folder(src: str | os.PathLike, out: str | os.PathLike, kind: str, *,
                   source: str | None = None, dtype: str = 'float32', variant: str | None = None,
                   allow_pickle: bool = False) -> str:
  """Converts a raw hub-layout folder (or a pipeline root) into our format at ``out``."""
  folder = resolve_model_folder(src, kind)
  config_path = os.path.join(folder, CONFIG_FILE)
  module = build_model(kind, _read_json(config_path))
  params = convert_raw_folder(folder, kind, module, variant=variant, allow_pickle=allow_pickle)
  return save_converted(out, kind, config_path, params, source=source or os.fspath(src), dtype=dtype)


def mark_pipeline_root(out: str | os.PathLike, *, source: str, parts: Sequence[str]) -> None:
  """Writes the ``sr_jax.json`` marker of a converted SD pipeline root (kind ``"sd"``)."""
  _write_json(os.path.join(os.fspath(out), MARKER_FILE), {
      'format': FORMAT_NAME, 'format_version': FORMAT_VERSION, 'kind': 'sd', 'source': source,
      'parts': list(parts)})


def save_prompt_embeds(out: str | os.PathLike, prompts: Sequence[str], embeds: Sequence[np.ndarray],
                       *, source: str) -> None:
  """Writes prompt_embeds.safetensors (``prompt_<i>`` -> (1, L, C) float32) and prompt_embeds.json."""
  out = os.fspath(out)
  arrays = {f'prompt_{i}': np.ascontiguousarray(np.asarray(e, np.float32)).reshape((1,) + e.shape[-2:])
            for i, e in enumerate(embeds)}
  _save_safetensors(arrays, os.path.join(out, PROMPT_EMBEDS_FILE))
  _write_json(os.path.join(out, PROMPT_EMBEDS_JSON), {
      'format_version': FORMAT_VERSION, 'prompts': {f'prompt_{i}': p for i, p in enumerate(prompts)},
      'text_encoder': source, 'max_length': int(next(iter(arrays.values())).shape[1])})


def load_prompt_embeds(folder: str | os.PathLike, prompt: str = '') -> jax.Array:
  """The (1, L, C) text embedding of ``prompt`` stored by ``convert_weights sd`` in ``folder``."""
  folder = os.fspath(folder)
  index_path = os.path.join(folder, PROMPT_EMBEDS_JSON)
  if not os.path.isfile(index_path):
    raise FileNotFoundError(f'missing {index_path}: run `python -m convert_weights sd` first')
  prompts = _read_json(index_path)['prompts']
  keys = [key for key, text in prompts.items() if text == prompt]
  if not keys:
    raise KeyError(f'prompt {prompt!r} was not encoded in {folder}; available: '
                   f'{sorted(prompts.values())} (convert again with --prompt)')
  return jnp.asarray(_load_safetensors(os.path.join(folder, PROMPT_EMBEDS_FILE))[keys[0]])


# ------------------------------------------------------------------------------------ perceptual

def load_perceptual(path: str | os.PathLike) -> dict[str, Any]:
  """The frozen params of the perceptual losses from a ``convert_weights perceptual`` folder.

  Returns ``{'vgg16', 'alexnet', 'lpips_vgg', 'lpips_alex', 'dists'}`` (float32 jnp trees), the
  ``params`` argument of :func:`sr_jax.losses.lpips.lpips_distance`,
  :func:`sr_jax.losses.dists.dists_distance` and :func:`sr_jax.losses.dists.ea_dists_distance`.

  Raises:
    FileNotFoundError: the folder or its marker / params file is missing.
    CheckpointError: wrong marker kind or version, or params missing, unexpected or mis-shaped
      (each named with both shapes).
  """
  # Imported here, so that loading a UNet, VAE or DINOv3 does not import the perceptual losses.
  from sr_jax.losses.dists import DISTS_CHANNELS
  from sr_jax.losses.lpips import lpips_heads
  from sr_jax.models.vgg import VGG16, AlexNet

  folder = os.fspath(path)
  if not is_converted(folder):
    raise FileNotFoundError(f'{folder}: no {MARKER_FILE} marker (write the folder with '
                            f'`python -m convert_weights perceptual --out {folder}`)')
  _read_marker(folder, 'perceptual')
  per_channel = jax.ShapeDtypeStruct((sum(DISTS_CHANNELS),), jnp.float32)
  expected = {
      'vgg16': abstract_params(VGG16()), 'alexnet': abstract_params(AlexNet()),
      'lpips_vgg': abstract_params(lpips_heads('vgg')),
      'lpips_alex': abstract_params(lpips_heads('alex')),
      'dists': {'alpha': per_channel, 'beta': per_channel},
  }
  params = read_converted_params(folder, expected)
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)
