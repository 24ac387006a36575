"""Pretrained UNet, VAE, DINOv3 (ConvNeXt or ViT), SD3 / FLUX transformer loaders, and the sr_jax
converted-folder format.

Loading::

  unet, unet_params = pretrained.load_unet('ckpt/sd21')              # pipeline root or unet/ folder
  vae, vae_params = pretrained.load_vae('ckpt/sd21', parts=('encoder',))
  dino, dino_params = pretrained.load_dinov3('ckpt/dinov3-convnext-large')
  vit, vit_params = pretrained.load_dinov3('ckpt/dinov3-vitb16')     # DINOv3ViTModel
  context = pretrained.load_prompt_embeds('ckpt/sd21')                # (1, L, C), the empty prompt
  mmdit, p = pretrained.load_sd3_transformer('ckpt/sd35m', param_dtype=jnp.bfloat16, lr_branch=True)
  flux, p = pretrained.load_flux_transformer('ckpt/flux1-dev', shardings=mesh)   # FSDP-placed
  context, pooled = pretrained.load_pooled_prompt_embeds('ckpt/sd35m')  # SD3 / FLUX prompts

Each ``load_*`` takes a folder that is one of

* a raw diffusers / transformers model folder in the hub layout: ``config.json`` plus
  ``diffusion_pytorch_model.safetensors`` (diffusers) or ``model.safetensors`` (transformers), or a
  sharded ``*.safetensors.index.json`` with its shards, or a ``--variant`` such as
  ``diffusion_pytorch_model.fp16.safetensors``. fp32, fp16 and bf16 tensors all load (numpy reads
  bf16 through ml_dtypes). Pickles (``*.bin``) load only with ``allow_pickle=True`` (needs torch);
* a diffusers pipeline root holding ``unet/``, ``vae/`` or ``transformer/`` subfolders;
* our converted folder (below), or the root of a converted SD / SD3 / FLUX pipeline.

Memory: checkpoints are read one tensor at a time (`sr_jax.safetensors_io`): the peak is the loaded
params plus one tensor, never a second copy of the checkpoint. With ``shardings`` (a pytree of
``jax.sharding.Sharding`` matching the params, one sharding for all, or a ``Mesh``, which means
`sr_jax.sharding.fsdp_shardings`) each device's slice of a split param is read from the file on its
own (``jax.make_array_from_callback``), so an FSDP-split model is never whole on one device or on
the host. Params are cast to ``param_dtype`` on the host (through float32 when both differ).

DiT4SR (``load_sd3_transformer(path, lr_branch=True)``): a DiT4SR checkpoint holds the control
params and they are loaded; a plain SD3 / SD3.5 checkpoint holds none of them, and then they are
the module's own init with ``init_rng`` (default ``jax.random.key(0)``): zero ``to_{q,k,v}_control``
and ``control_conv``, torch-default ``to_out_control`` (:mod:`sr_jax.models.mmdit`), equal to those
of ``module.init(init_rng, ...)``. A checkpoint with only some of them is refused, naming the rest.

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
                           ('source': each tensor in the checkpoint's dtype). Above
                           ``max_shard_size`` (default 2 GiB): params-00001-of-0000N.safetensors ...
                           and params.safetensors.index.json, as transformers shards
  DIR/sr_jax.json          marker: {"format": "sr_jax", "format_version": 2, "kind": "unet" | "vae" |
                           "dinov3" | "dinov3_vit" | "sd3_transformer" | "flux_transformer",
                           "model_class", "source", "dtype", "num_params"}

Version 1 (single params.safetensors, no 'source' dtype) reads as before; version 2 adds the shards.
A converted SD pipeline root holds ``unet/`` and ``vae/`` (each a converted folder),
``scheduler_config.json`` (copied), an ``sr_jax.json`` marker of kind ``"sd"`` and the prompt
embeddings: ``prompt_embeds.safetensors`` with one float32 array (1, L, C) per prompt under the keys
``prompt_0``, ``prompt_1``, ... and ``prompt_embeds.json`` =
``{"format_version": 1, "prompts": {"prompt_0": "", ...}, "text_encoder": source, "max_length": L}``.
SD3 / FLUX roots (kinds ``"sd3"``, ``"flux"``) hold ``transformer/`` and ``vae/`` instead, and their
prompt embeddings also have the pooled text embedding (1, P) of each prompt under ``pooled_<i>``
(``"pooled_dim": P`` in the json; :func:`load_pooled_prompt_embeds`).
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

from sr_jax import param_loading
from sr_jax.models.dinov3 import DINOv3ConvNextModel
from sr_jax.models.dinov3_vit import DINOv3ViTModel
from sr_jax.models.flux import FluxTransformer2DModel
from sr_jax.models.mmdit import SD3Transformer2DModel
from sr_jax.models.unet import UNet2DConditionModel
from sr_jax.models.vae import DECODER_PARAMS, ENCODER_PARAMS, AutoencoderKL
from sr_jax.safetensors_io import DEFAULT_MAX_SHARD_BYTES, TensorSource, find_written, parse_size
from sr_jax.weights import SAFETENSORS_INDEX_SUFFIX, CheckpointError, find_weight_files

FORMAT_NAME = 'sr_jax'
FORMAT_VERSION = 2  # 2: params may be sharded (params-0000i-of-0000N.safetensors + index)
PROMPT_EMBEDS_VERSION = 1
MARKER_FILE = 'sr_jax.json'
PARAMS_STEM = 'params'
PARAMS_FILE = PARAMS_STEM + '.safetensors'
CONFIG_FILE = 'config.json'
SCHEDULER_CONFIG_FILE = 'scheduler_config.json'
PROMPT_EMBEDS_FILE = 'prompt_embeds.safetensors'
PROMPT_EMBEDS_JSON = 'prompt_embeds.json'
# The base-model prefix of transformers' DINOv3ConvNext/ViT PreTrainedModel; stripped from keys
# carrying it (in memory `model.stages.*` / `model.layer.*`; on disk un-prefixed).
KNOWN_PREFIXES: dict[str, tuple[str, ...]] = {'dinov3': ('model.',), 'dinov3_vit': ('model.',)}
# config.json `model_type` of each DINOv3 kind (load_dinov3 picks the kind from it).
DINOV3_MODEL_TYPES = {'dinov3': 'dinov3_convnext', 'dinov3_vit': 'dinov3_vit'}
STORAGE_DTYPES = {'float32': np.float32, 'float16': np.float16, 'bfloat16': jnp.bfloat16}
SOURCE_DTYPE = 'source'  # convert_folder(dtype=...): keep each tensor's checkpoint dtype


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
    'sd3_transformer': ModelKind('sd3_transformer', SD3Transformer2DModel,
                                 'diffusion_pytorch_model', 'diffusion_pytorch_model',
                                 'transformer'),
    'flux_transformer': ModelKind('flux_transformer', FluxTransformer2DModel,
                                  'diffusion_pytorch_model', 'diffusion_pytorch_model',
                                  'transformer'),
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
    if os.path.isfile(os.path.join(folder, stem + SAFETENSORS_INDEX_SUFFIX)):
      raise  # the index names a shard that is not there
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


def _ignored_torch_prefixes(module: Any) -> tuple[str, ...]:
  """Checkpoint keys that hold no param of ``module``: unbuilt VAE halves, and what the module
  itself names (the SD3 sin-cos buffer, DiT4SR's unused attn2 modules)."""
  own = getattr(module, 'checkpoint_ignore_prefixes', None)
  return tuple(f'{name}.' for name in _unbuilt_vae_params(module)) + (tuple(own()) if own else ())


def raw_reader(folder: str, kind: str, module: Any, *, variant: str | None = None,
               allow_pickle: bool = False) -> param_loading.CheckpointReader:
  """The checked, not yet read params of a raw hub-layout folder for ``module``."""
  spec = KINDS[kind]
  files = find_checkpoint_files(folder, spec.weights_stem, spec.pickle_stem, variant=variant,
                                allow_pickle=allow_pickle)
  source = TensorSource.from_files(files)
  source = source.renamed(strip_known_prefixes({k: k for k in source}, KNOWN_PREFIXES.get(kind, ())))
  try:
    return param_loading.torch_reader(source, module, abstract_params(module), where=folder,
                                      ignore_prefixes=_ignored_torch_prefixes(module))
  except CheckpointError as e:
    raise CheckpointError(f'{kind} checkpoint in {folder}: {e}') from None


def converted_reader(folder: str, expected: Any, *, module: Any = None,
                     drop_top_level: Sequence[str] = ()) -> param_loading.CheckpointReader:
  """The checked, not yet read params of a converted folder (single or sharded params file)."""
  files = find_written(folder, PARAMS_STEM)
  if files is None:
    raise FileNotFoundError(f'missing {os.path.join(folder, PARAMS_FILE)} (the folder has the '
                            f'{MARKER_FILE} marker of a converted folder)')
  return param_loading.converted_reader(
      TensorSource.from_files(files), expected, module=module, drop_top_level=drop_top_level,
      where=param_loading.converted_files_where(folder, files, PARAMS_STEM))


def read_converted_params(folder: str, expected: Any, *, drop_top_level: Sequence[str] = ()) -> dict:
  """Reads the params of a converted folder, checked against the ``expected`` tree (numpy, stored
  dtype). Top-level subtrees named in ``drop_top_level`` are skipped (a VAE built with only some
  parts)."""
  reader = converted_reader(folder, expected, drop_top_level=drop_top_level)
  return traverse_util.unflatten_dict({p: read(None) for p, read in reader.leaves.items()})


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
               variant: str | None = None, shardings: Any = None,
               init_rng: jax.Array | None = None, **model_kwargs) -> tuple[Any, dict]:
  """Builds ``kind``'s module from the folder's config and loads its params (jnp, ``param_dtype``),
  one tensor at a time; ``shardings``, ``init_rng``: see the module docstring."""
  folder = resolve_model_folder(path, kind)
  converted = is_converted(folder)
  if converted:
    _read_marker(folder, kind)
  config = _read_json(os.path.join(folder, CONFIG_FILE))
  module = build_model(kind, config, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
  expected = abstract_params(module)
  if converted:
    reader = converted_reader(folder, expected, module=module,
                              drop_top_level=_unbuilt_vae_params(module))
  else:
    reader = raw_reader(folder, kind, module, variant=variant, allow_pickle=allow_pickle)
  return module, param_loading.place_params(reader, expected, param_dtype, shardings=shardings,
                                            module=module, init_rng=init_rng)


def load_unet(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
              allow_pickle: bool = False, variant: str | None = None
              ) -> tuple[UNet2DConditionModel, dict]:
  """``(UNet2DConditionModel, params)`` from a unet folder, a pipeline root or a converted folder."""
  return load_model('unet', path, dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle,
                    variant=variant)


def load_vae(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, *,
             parts: Sequence[str] = ('encoder', 'decoder'), allow_pickle: bool = False,
             variant: str | None = None) -> tuple[AutoencoderKL, dict]:
  """``(AutoencoderKL, params)``; ``parts`` builds only the encoder or decoder half (and loads it).
  SD3 / FLUX VAEs (16 latent channels, no quant convs) load the same way; their latent shift and
  scale are `sr_jax.diffusion.latents.LatentCodec.from_vae_config` of the folder's config."""
  return load_model('vae', path, dtype=dtype, param_dtype=param_dtype, allow_pickle=allow_pickle,
                    variant=variant, parts=tuple(parts))


def load_dinov3(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                *, allow_pickle: bool = False, variant: str | None = None, **model_kwargs
                ) -> tuple[DINOv3ConvNextModel | DINOv3ViTModel, dict]:
  """``(DINOv3ConvNextModel or DINOv3ViTModel, params)`` from a transformers folder or a converted
  folder; the family comes from the folder (:func:`dinov3_kind`). ``model_kwargs``: e.g. ``remat``."""
  return load_model(dinov3_kind(path), path, dtype=dtype, param_dtype=param_dtype,
                    allow_pickle=allow_pickle, variant=variant, **model_kwargs)


def load_sd3_transformer(path: str | os.PathLike, dtype: Any = jnp.float32,
                         param_dtype: Any = jnp.float32, *, allow_pickle: bool = False,
                         variant: str | None = None, shardings: Any = None,
                         init_rng: jax.Array | None = None, **model_kwargs
                         ) -> tuple[SD3Transformer2DModel, dict]:
  """``(SD3Transformer2DModel, params)`` from a diffusers pipeline root (``transformer/``), a
  ``transformer/`` folder (single or sharded safetensors) or a converted folder.

  ``model_kwargs`` go to ``SD3Transformer2DModel.from_config``: ``remat``, ``lr_branch``,
  ``lr_qk_norm_quirk``, ``lr_ffn_control_scale`` or any config field. With ``lr_branch=True`` a
  plain SD3 / SD3.5 checkpoint gets the DiT4SR control params from the module's init (zero
  ``to_{q,k,v}_control`` and ``control_conv``) with ``init_rng``, and a DiT4SR checkpoint loads
  its own (module docstring). ``shardings``: per-device placement (module docstring).
  """
  return load_model('sd3_transformer', path, dtype=dtype, param_dtype=param_dtype,
                    allow_pickle=allow_pickle, variant=variant, shardings=shardings,
                    init_rng=init_rng, **model_kwargs)


def load_flux_transformer(path: str | os.PathLike, dtype: Any = jnp.float32,
                          param_dtype: Any = jnp.float32, *, allow_pickle: bool = False,
                          variant: str | None = None, shardings: Any = None, **model_kwargs
                          ) -> tuple[FluxTransformer2DModel, dict]:
  """``(FluxTransformer2DModel, params)`` from a diffusers pipeline root, a ``transformer/``
  folder (FLUX.1-dev: 3 shards + index) or a converted folder; ``model_kwargs``: e.g. ``remat``.
  ``shardings``: per-device placement (module docstring); FLUX.1-dev is 23.8 GB in bfloat16."""
  return load_model('flux_transformer', path, dtype=dtype, param_dtype=param_dtype,
                    allow_pickle=allow_pickle, variant=variant, shardings=shardings,
                    **model_kwargs)


# ------------------------------------------------------------------------------------ writing

def _write_marker(out: str, kind: str, *, source: str, dtype: str, num_params: int) -> None:
  _write_json(os.path.join(out, MARKER_FILE), {
      'format': FORMAT_NAME, 'format_version': FORMAT_VERSION, 'kind': kind,
      'model_class': KINDS[kind].model_class.__name__, 'source': source, 'dtype': dtype,
      'num_params': num_params})


def _copy_config(config: str | Mapping[str, Any], out: str) -> None:
  if isinstance(config, Mapping):
    _write_json(os.path.join(out, CONFIG_FILE), dict(config))
  else:
    shutil.copyfile(config, os.path.join(out, CONFIG_FILE))


def _stored_dtype_name(reader: param_loading.CheckpointReader, dtype: str) -> str:
  """The marker's ``dtype``: the requested one, or for 'source' the checkpoint's (or 'mixed')."""
  if dtype != SOURCE_DTYPE:
    return dtype
  found = {np.dtype(d).name for d in reader.dtypes.values()}
  return found.pop() if len(found) == 1 else 'mixed'


def save_converted(out: str | os.PathLike, kind: str, config: str | Mapping[str, Any], params: Any,
                   *, source: str, dtype: str = 'float32',
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES) -> str:
  """Writes ``params`` (a Flax tree) as a converted folder: config.json (copied from the path
  ``config`` or dumped from the mapping ``config``), params.safetensors (or shards) and the marker."""
  out = os.fspath(out)
  os.makedirs(out, exist_ok=True)
  flat = {p: np.asarray(v) for p, v in traverse_util.flatten_dict(params).items()}
  expected = traverse_util.unflatten_dict(
      {p: jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in flat.items()})
  reader = param_loading.converted_reader(
      TensorSource.from_arrays({'/'.join(p): v for p, v in flat.items()}), expected, where=out)
  return _write_converted(out, kind, config, reader, source=source, dtype=dtype,
                          max_shard_size=max_shard_size)


def _write_converted(out: str, kind: str, config: str | Mapping[str, Any],
                     reader: param_loading.CheckpointReader, *, source: str, dtype: str,
                     max_shard_size: int | str) -> str:
  os.makedirs(out, exist_ok=True)
  storage = None if dtype == SOURCE_DTYPE else STORAGE_DTYPES[dtype]
  count = param_loading.write_params(out, PARAMS_STEM, reader, storage,
                                     max_shard_bytes=parse_size(max_shard_size))
  _copy_config(config, out)
  _write_marker(out, kind, source=source, dtype=_stored_dtype_name(reader, dtype), num_params=count)
  return out


def convert_folder(src: str | os.PathLike, out: str | os.PathLike, kind: str, *,
                   source: str | None = None, dtype: str = 'float32', variant: str | None = None,
                   allow_pickle: bool = False,
                   max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES) -> str:
  """Converts a raw hub-layout folder (or a pipeline root) into our format at ``out``, one tensor at
  a time (peak memory: one output shard of ``max_shard_size``). ``dtype``: a key of
  :data:`STORAGE_DTYPES`, or ``'source'`` to keep each tensor's checkpoint dtype."""
  if dtype != SOURCE_DTYPE and dtype not in STORAGE_DTYPES:
    raise ValueError(f'dtype {dtype!r}: expected one of {sorted(STORAGE_DTYPES)} or {SOURCE_DTYPE!r}')
  folder = resolve_model_folder(src, kind)
  config_path = os.path.join(folder, CONFIG_FILE)
  module = build_model(kind, _read_json(config_path))
  reader = raw_reader(folder, kind, module, variant=variant, allow_pickle=allow_pickle)
  return _write_converted(os.fspath(out), kind, config_path, reader, source=source or os.fspath(src),
                          dtype=dtype, max_shard_size=max_shard_size)


def mark_pipeline_root(out: str | os.PathLike, *, source: str, parts: Sequence[str],
                       kind: str = 'sd') -> None:
  """Writes the ``sr_jax.json`` marker of a converted pipeline root (kind ``"sd"``, ``"sd3"`` or
  ``"flux"``)."""
  _write_json(os.path.join(os.fspath(out), MARKER_FILE), {
      'format': FORMAT_NAME, 'format_version': FORMAT_VERSION, 'kind': kind, 'source': source,
      'parts': list(parts)})


def save_prompt_embeds(out: str | os.PathLike, prompts: Sequence[str], embeds: Sequence[np.ndarray],
                       *, source: str, pooled: Sequence[np.ndarray] | None = None) -> None:
  """Writes prompt_embeds.safetensors (``prompt_<i>`` -> (1, L, C) float32, and with ``pooled``
  ``pooled_<i>`` -> (1, P)) and prompt_embeds.json."""
  out = os.fspath(out)
  arrays = {f'prompt_{i}': np.ascontiguousarray(np.asarray(e, np.float32)).reshape((1,) + e.shape[-2:])
            for i, e in enumerate(embeds)}
  index = {'format_version': PROMPT_EMBEDS_VERSION,
           'prompts': {f'prompt_{i}': p for i, p in enumerate(prompts)}, 'text_encoder': source,
           'max_length': int(next(iter(arrays.values())).shape[1])}
  if pooled is not None:
    arrays.update({f'pooled_{i}': np.ascontiguousarray(np.asarray(e, np.float32)).reshape(1, -1)
                   for i, e in enumerate(pooled)})
    index['pooled_dim'] = int(arrays['pooled_0'].shape[1])
  _save_safetensors(arrays, os.path.join(out, PROMPT_EMBEDS_FILE))
  _write_json(os.path.join(out, PROMPT_EMBEDS_JSON), index)


def _prompt_key(folder: str, prompt: str) -> str:
  index_path = os.path.join(folder, PROMPT_EMBEDS_JSON)
  if not os.path.isfile(index_path):
    raise FileNotFoundError(f'missing {index_path}: run `python -m convert_weights` (sd, sd3 or '
                            'flux) first')
  prompts = _read_json(index_path)['prompts']
  keys = [key for key, text in prompts.items() if text == prompt]
  if not keys:
    raise KeyError(f'prompt {prompt!r} was not encoded in {folder}; available: '
                   f'{sorted(prompts.values())} (convert again with --prompt)')
  return keys[0]


def load_prompt_embeds(folder: str | os.PathLike, prompt: str = '') -> jax.Array:
  """The (1, L, C) text embedding of ``prompt`` stored by ``convert_weights`` in ``folder``."""
  folder = os.fspath(folder)
  key = _prompt_key(folder, prompt)
  return jnp.asarray(_load_safetensors(os.path.join(folder, PROMPT_EMBEDS_FILE))[key])


def load_pooled_prompt_embeds(folder: str | os.PathLike, prompt: str = ''
                              ) -> tuple[jax.Array, jax.Array]:
  """``(prompt_embeds (1, L, C), pooled (1, P))`` of ``prompt`` stored by ``convert_weights sd3`` /
  ``flux``: SD3 L = 77 + T5 length, C = 4096, P = 2048; FLUX L = T5 length, P = 768."""
  folder = os.fspath(folder)
  key = _prompt_key(folder, prompt)
  stored = _load_safetensors(os.path.join(folder, PROMPT_EMBEDS_FILE))
  pooled_key = 'pooled_' + key.split('_', 1)[1]
  if pooled_key not in stored:
    raise KeyError(f'{folder}/{PROMPT_EMBEDS_FILE} has no pooled embeddings (written by '
                   '`convert_weights sd`, whose UNet takes none): use load_prompt_embeds')
  return jnp.asarray(stored[key]), jnp.asarray(stored[pooled_key])


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
