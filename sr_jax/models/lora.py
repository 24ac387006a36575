"""LoRA for any Flax model built from plain ``nn.Dense`` / ``nn.Conv``, PEFT-compatible.

LoRA (Hu et al. 2021, Eq. 3): a frozen layer ``W`` becomes ``h = W x + (alpha / r) B A x`` with
``A: in -> r`` and ``B: r -> out``. OMGSR trains only such A/B pairs on the UNet and on the VAE encoder
(``train/train_omgsr_s.py``: targets conv1, conv2, conv_in, conv_shortcut, conv, conv_out, to_q, to_k, to_v,
to_out.0; alpha = r; 'gaussian' init).

Design: the LoRA params are their own pytree, beside the frozen params, mirroring the module paths::

  {'down_blocks_0': {'resnets_0': {'conv1': {'lora_A': (3, 3, in, r), 'lora_B': (1, 1, r, out)}}}}

The models know nothing about LoRA. :func:`apply` runs ``module.apply`` under a Flax method interceptor
that, for each ``nn.Dense`` / ``nn.Conv`` whose scope path is in the LoRA tree, returns
``base(x) + scale * B(A(x))``. The frozen kernel is used only by the base forward, so ``jax.grad`` with
respect to the LoRA tree never forms a gradient of a full frozen weight. A conv's A is a conv with the
base conv's kernel size, strides and padding; its B is a 1x1 conv (PEFT's ``lora.Conv2d``).

Names follow PEFT: a module matches if its dotted torch name (``sr_jax.weights`` convention, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0``) equals a target or ends with
``'.' + target``; a string target is a regex that must match the whole name. PEFT adapter folders
(``adapter_config.json`` + ``adapter_model.safetensors``) are read and written without torch.

Sub-module adapters (``module_prefix``). OMGSR's trainer wraps ``vae.encoder`` itself in a
``PeftModel``, so its VAE adapter names modules relative to the encoder (``base_model.model.conv_in``)
and its inference code loads it with ``PeftModel.from_pretrained(vae.encoder, dir)``. Our LoRA trees
always mirror the whole model (``{'encoder': {'conv_in': ...}}``); ``module_prefix='encoder'`` on the
PEFT functions writes and reads that sub-module's layout, ``module_prefix=None`` (default) the whole
model's (``base_model.model.encoder.conv_in`` with an ``exclude_modules`` regex for the rest). The
layout is never guessed from the keys; a mismatch names the unknown and missing keys and, when the
keys fit the other layout, says which ``module_prefix`` would read them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from sr_jax.weights import (CheckpointError, flax_path_to_torch_key, flax_to_torch_array,
                            torch_to_flax_array)

# OMGSR train/train_omgsr_s.py set_unet_lora / set_vae_encoder_lora.
OMGSR_TARGET_MODULES = ('conv1', 'conv2', 'conv_in', 'conv_shortcut', 'conv', 'conv_out', 'to_q', 'to_k',
                        'to_v', 'to_out.0')
LORA_A, LORA_B = 'lora_A', 'lora_B'
PEFT_MODEL_PREFIX = 'base_model.model.'  # keys in files written by PeftModel.save_pretrained
ADAPTER_CONFIG_NAME = 'adapter_config.json'
ADAPTER_WEIGHTS_NAME = 'adapter_model.safetensors'
INITS = ('default', 'gaussian')

ModulePath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Which modules get LoRA, with what rank and scale.

  Attributes:
    rank: r, the inner dimension of A and B.
    alpha: PEFT's ``lora_alpha``; the branch is scaled by ``alpha / rank`` (OMGSR uses alpha = rank).
    target_modules: module-name suffixes (PEFT list semantics) or one regex matched against the whole
      dotted torch name (PEFT string semantics).
    init: 'default' = PEFT ``init_lora_weights=True`` (A ~ kaiming_uniform(a=sqrt(5)), i.e.
      U(+-1/sqrt(fan_in))); 'gaussian' = A ~ N(0, std=1/r), as PEFT. B = 0 in both, so a fresh adapter
      leaves the model unchanged.
    prefix: only modules whose dotted torch name starts with ``prefix + '.'`` (e.g. 'encoder' for
      OMGSR's VAE-encoder LoRA, which leaves quant_conv and the decoder alone).
    exclude_modules: PEFT ``exclude_modules`` (suffix list or whole-name regex), checked first.
  """
  rank: int
  alpha: float
  target_modules: tuple[str, ...] | str = OMGSR_TARGET_MODULES
  init: str = 'default'
  prefix: str | None = None
  exclude_modules: tuple[str, ...] | str | None = None

  def __post_init__(self):
    for name in ('target_modules', 'exclude_modules'):
      value = getattr(self, name)
      if value is not None and not isinstance(value, str):
        object.__setattr__(self, name, tuple(value))
    if self.rank <= 0:
      raise ValueError(f'LoRA rank must be positive, got {self.rank}')
    if self.init not in INITS:
      raise ValueError(f'LoRA init must be one of {INITS}, got {self.init!r}')
    if self.prefix is not None:
      object.__setattr__(self, 'prefix', self.prefix.strip('.'))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _matches(patterns: tuple[str, ...] | str, name: str) -> bool:
  """PEFT ``check_target_module_exists``: regex fullmatch for a string, else equality or suffix."""
  if isinstance(patterns, str):
    return re.fullmatch(patterns, name) is not None
  return any(name == p or name.endswith('.' + p) for p in patterns)


def module_matches(config: LoRAConfig, torch_name: str) -> bool:
  """Whether the module with this dotted torch name gets LoRA under ``config``."""
  if config.prefix is not None and not torch_name.startswith(config.prefix + '.'):
    return False
  if config.exclude_modules and _matches(config.exclude_modules, torch_name):
    return False
  return _matches(config.target_modules, torch_name)


def _layer_kernels(params: Mapping[str, Any]) -> dict[ModulePath, Any]:
  """Module path -> kernel for every node of the param tree that holds a ``kernel`` leaf."""
  flat = traverse_util.flatten_dict(params)
  return {path[:-1]: leaf for path, leaf in flat.items() if path[-1] == 'kernel'}


def _relative_name(torch_name: str, module_prefix: str | None) -> str | None:
  """``torch_name`` relative to the sub-module ``module_prefix`` (None: outside it)."""
  if module_prefix is None:
    return torch_name
  return torch_name[len(module_prefix) + 1:] if torch_name.startswith(module_prefix + '.') else None


def _named_targets(params: Mapping[str, Any], config: LoRAConfig, module_prefix: str | None = None,
                   allow_none: bool = False) -> dict[ModulePath, str]:
  """Flax path -> torch name relative to ``module_prefix`` of each layer ``config`` targets, with
  ``config`` matched against the relative names (as PEFT does on the wrapped sub-module). No match
  raises unless ``allow_none`` (an adapter to check key by key)."""
  kernels = _layer_kernels(params)
  named = {}
  for path in kernels:
    name = _relative_name(flax_path_to_torch_key(path), module_prefix)
    if name is not None and module_matches(config, name):
      named[path] = name
  if not named and not allow_none:
    some = sorted(flax_path_to_torch_key(p) for p in kernels)[:12]
    within = f' within {module_prefix!r}' if module_prefix else ''
    raise ValueError(
        f'LoRA target_modules={config.target_modules!r} (prefix={config.prefix!r}, '
        f'exclude_modules={config.exclude_modules!r}) match no Dense/Conv layer{within}; layers '
        f'include {some}')
  for path in named:
    if np.ndim(kernels[path]) not in (2, 4):
      raise ValueError(f'LoRA supports Dense (2-D) and 2-D Conv (4-D) kernels; '
                       f'{flax_path_to_torch_key(path)} has kernel shape {np.shape(kernels[path])}')
  return named


def target_paths(params: Mapping[str, Any], config: LoRAConfig) -> list[ModulePath]:
  """Flax module paths (in tree order) of the Dense/Conv layers that ``config`` targets.

  Raises:
    ValueError: if nothing matches (a wrong target list or prefix should not train nothing silently).
  """
  return list(_named_targets(params, config))


def _lora_shapes(kernel_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Dense (in, out) -> A (in, r), B (r, out);
  Conv (kh, kw, in, out) -> A (kh, kw, in, r), B (1, 1, r, out)."""
  *window_and_in, out = kernel_shape
  ones = (1,) * (len(kernel_shape) - 2)
  return (*window_and_in, rank), (*ones, rank, out)


def init_lora_params(rng: jax.Array, params: Mapping[str, Any], config: LoRAConfig,
                     dtype: Any = jnp.float32) -> dict:
  """A fresh LoRA tree for the layers of ``params`` (arrays or ShapeDtypeStructs) that ``config`` targets.

  A follows PEFT's ``reset_lora_parameters`` (see :class:`LoRAConfig`.init); B is zero.
  """
  kernels = _layer_kernels(params)
  paths = target_paths(params, config)
  shapes = tuple(_lora_shapes(np.shape(kernels[p]), config.rank) for p in paths)
  pairs = _draw_lora(rng, shapes, config.init, config.rank, jnp.dtype(dtype))
  flat = {}
  for path, (a, b) in zip(paths, pairs):
    flat[path + (LORA_A,)], flat[path + (LORA_B,)] = a, b
  return traverse_util.unflatten_dict(flat)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _draw_lora(rng: jax.Array, shapes: tuple, init: str, rank: int, dtype: Any) -> list:
  """All (A, B) pairs from one RNG draw, in one compiled program (eager per-layer draws each compile)."""
  sizes = [math.prod(a_shape) for a_shape, _ in shapes]
  if init == 'gaussian':
    noise = jax.random.normal(rng, (sum(sizes),), dtype) / rank
  else:
    noise = jax.random.uniform(rng, (sum(sizes),), dtype, -1.0, 1.0)
  pairs, start = [], 0
  for (a_shape, b_shape), size in zip(shapes, sizes):
    a = noise[start:start + size].reshape(a_shape)
    start += size
    if init == 'default':  # kaiming_uniform(a=sqrt(5)): bound = sqrt(6 / ((1 + 5) fan_in))
      a = a / math.sqrt(math.prod(a_shape[:-1]))
    pairs.append((a, jnp.zeros(b_shape, dtype)))
  return pairs


def _adapters(lora_params: Mapping[str, Any] | None) -> dict[ModulePath, dict[str, Any]]:
  """Module path -> {'lora_A': A, 'lora_B': B}, checking that each module has both."""
  adapters: dict[ModulePath, dict[str, Any]] = {}
  for path, leaf in traverse_util.flatten_dict(lora_params or {}).items():
    if path[-1] not in (LORA_A, LORA_B):
      raise ValueError(f'LoRA tree leaf {"/".join(path)} is neither {LORA_A} nor {LORA_B}')
    adapters.setdefault(path[:-1], {})[path[-1]] = leaf
  for path, pair in adapters.items():
    if len(pair) != 2:
      raise ValueError(f'LoRA tree at {"/".join(path)} has only {sorted(pair)}')
  return adapters


def _low_rank_dense(layer: nn.Dense, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=layer.dtype)
  contract_last = lambda u, w: lax.dot_general(u, w, (((u.ndim - 1,), (0,)), ((), ())),
                                               precision=layer.precision)
  return contract_last(contract_last(x, a), b)


def _low_rank_conv(layer: nn.Conv, x: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
  """A: the base conv's own geometry (kernel, strides, padding) with r outputs; B: a 1x1 conv."""
  unsupported = {name: getattr(layer, name) for name in ('kernel_dilation', 'input_dilation')
                 if getattr(layer, name) not in (None, 1) and set(np.ravel(getattr(layer, name))) != {1}}
  if layer.feature_group_count != 1:
    unsupported['feature_group_count'] = layer.feature_group_count
  if layer.mask is not None:
    unsupported['mask'] = 'set'
  if unsupported:
    # PEFT's lora.Conv2d copies only kernel size, stride and padding; anything else would not merge.
    raise ValueError(f'LoRA on {"/".join(layer.scope.path)}: conv settings {unsupported} '
                              'are not supported')
  a_conv = layer.clone(parent=None, features=a.shape[-1], use_bias=False)
  h = a_conv.apply({'params': {'kernel': a}}, x)
  h, b = nn.dtypes.promote_dtype(h, b.reshape(b.shape[-2:]), dtype=layer.dtype)
  return lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=layer.precision)


def _interceptor(adapters: dict[ModulePath, dict[str, Any]], scale: float) -> Callable:
  """The method interceptor that adds ``scale * B(A(x))`` to targeted Dense/Conv calls."""
  inside_branch = [False]  # the A conv is itself an nn.Conv call: do not intercept it

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if inside_branch[0] or context.method_name != '__call__' or module.scope is None:
      return next_fun(*args, **kwargs)
    adapter = adapters.get(tuple(module.scope.path))
    if adapter is None:
      return next_fun(*args, **kwargs)
    if not isinstance(module, (nn.Dense, nn.Conv)):
      raise TypeError(f'LoRA params at {"/".join(module.scope.path)} but that module is a '
                      f'{type(module).__name__}, not nn.Dense / nn.Conv')
    y = next_fun(*args, **kwargs)
    branch = _low_rank_dense if isinstance(module, nn.Dense) else _low_rank_conv
    inside_branch[0] = True
    try:
      delta = branch(module, args[0], adapter[LORA_A], adapter[LORA_B])
    finally:
      inside_branch[0] = False
    return y + (scale * delta).astype(y.dtype)

  return intercept


def apply(module: nn.Module, params: Mapping[str, Any], lora_params: Mapping[str, Any] | None,
          config: LoRAConfig, *args, method: str | Callable | None = None, rngs: Any = None,
          mutable: Any = False, **kwargs) -> Any:
  """``module.apply({'params': params}, *args, method=method, **kwargs)`` with LoRA on every layer in
  ``lora_params`` (LoRA Eq. 3: ``W x + (alpha / r) B A x``, the frozen ``W`` never touched).

  Works under ``jax.jit`` / ``jax.grad`` (the interception happens while tracing). Layers present in
  ``lora_params`` but not called by ``method`` (e.g. the encoder when decoding) are simply unused.
  """
  run = lambda: module.apply({'params': params}, *args, method=method, rngs=rngs, mutable=mutable,
                             **kwargs)
  if not lora_params:
    return run()
  with nn.intercept_methods(_interceptor(_adapters(lora_params), config.scale)):
    return run()


def merge(params: Mapping[str, Any], lora_params: Mapping[str, Any], config: LoRAConfig) -> dict:
  """Plain params with ``W + scale * (A o B)`` folded in (PEFT ``merge_and_unload``), for inference.

  For a conv, ``kernel[kh, kw, in, out] += scale * sum_r A[kh, kw, in, r] B[0, 0, r, out]``, which is
  exact because B is 1x1 with stride 1.
  """
  flat = dict(traverse_util.flatten_dict(params))
  for path, pair in _adapters(lora_params).items():
    key = path + ('kernel',)
    if key not in flat:
      raise KeyError(f'LoRA params at {"/".join(path)} but params have no kernel there')
    a, b, kernel = pair[LORA_A], pair[LORA_B], flat[key]
    # Host arrays merge in numpy: eager jnp ops would compile one program per layer shape.
    xp = np if all(isinstance(x, np.ndarray) for x in (a, b, kernel)) else jnp
    a32, b32 = xp.asarray(a, xp.float32), xp.asarray(b, xp.float32).reshape(b.shape[-2:])
    delta = (a32.reshape(-1, a32.shape[-1]) @ b32).reshape(a32.shape[:-1] + b32.shape[-1:]) \
        if xp is np else jnp.einsum('...ir,ro->...io', a32, b32, precision=lax.Precision.HIGHEST)
    if delta.shape != kernel.shape:
      raise ValueError(f'LoRA at {"/".join(path)} gives a {delta.shape} update for kernel {kernel.shape}')
    flat[key] = (xp.asarray(kernel, xp.float32) + config.scale * delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------------------------------
# PEFT layout: '<torch module name>.lora_A.weight' (Linear (r, in), Conv2d (r, in, kh, kw)) and
# '<torch module name>.lora_B.weight' (Linear (out, r), Conv2d (out, r, 1, 1)), the module names
# relative to ``module_prefix`` when one is given (see the module docstring).


def _check_patterns_stay_inside(patterns: tuple[str, ...] | str | None, module_prefix: str,
                                what: str) -> None:
  """Refuses suffix patterns that would match differently on names inside ``module_prefix`` and on
  whole-model names: those whose leading names are the trailing names of ``module_prefix`` (e.g.
  'encoder.conv_in' for module 'encoder' matches 'encoder.conv_in' but never the inner 'conv_in')."""
  if patterns is None or isinstance(patterns, str):
    return
  outer = module_prefix.split('.')
  for pattern in patterns:
    inner = pattern.split('.')
    if any(inner[:i] == outer[-i:] for i in range(1, min(len(inner), len(outer) + 1))):
      raise ValueError(f'LoRA {what} pattern {pattern!r} names part of the module prefix '
                       f'{module_prefix!r}; it would match other modules once read relative to it')


def _sub_module_config(config: LoRAConfig, module_prefix: str) -> LoRAConfig:
  """``config`` (matched on whole-model names) as PEFT sees it on the sub-module ``module_prefix``."""
  prefix = config.prefix
  if prefix is not None and prefix != module_prefix and not prefix.startswith(module_prefix + '.'):
    raise ValueError(f'LoRA config prefix {prefix!r} lies outside module_prefix {module_prefix!r}')
  for what in ('target_modules', 'exclude_modules'):
    patterns = getattr(config, what)
    if isinstance(patterns, str):
      raise ValueError(f'LoRA {what} regex {patterns!r} is matched against whole-model names and '
                       f'cannot be written relative to {module_prefix!r}; use a list of names')
    _check_patterns_stay_inside(patterns, module_prefix, what)
  inner = None if prefix in (None, module_prefix) else prefix[len(module_prefix) + 1:]
  return dataclasses.replace(config, prefix=inner)


def _whole_model_config(config: LoRAConfig, module_prefix: str) -> LoRAConfig:
  """Inverse of :func:`_sub_module_config`: a sub-module adapter's config on whole-model names (a
  regex is anchored below ``module_prefix``; with ``prefix`` set both select the same layers)."""
  def reroot(patterns, what):
    if isinstance(patterns, str):
      return rf'{re.escape(module_prefix)}\.(?:{patterns})'
    _check_patterns_stay_inside(patterns, module_prefix, what)
    return patterns
  prefix = module_prefix if config.prefix is None else f'{module_prefix}.{config.prefix}'
  exclude = None if config.exclude_modules is None else reroot(config.exclude_modules,
                                                               'exclude_modules')
  return dataclasses.replace(config, prefix=prefix, exclude_modules=exclude,
                             target_modules=reroot(config.target_modules, 'target_modules'))


def to_peft_state_dict(lora_params: Mapping[str, Any], config: LoRAConfig, key_prefix: str = '',
                       module_prefix: str | None = None) -> dict[str, np.ndarray]:
  """LoRA tree -> PEFT adapter state dict (numpy, torch layout), as ``get_peft_model_state_dict``.

  ``key_prefix=''`` gives the keys of a model with injected adapters (diffusers ``add_adapter``);
  :data:`PEFT_MODEL_PREFIX` gives those of a ``PeftModel`` file, which both loaders accept.
  ``module_prefix`` names the modules relative to that sub-module (every LoRA module must be in it).
  """
  del config  # the layout does not depend on it; kept for a symmetric signature
  state = {}
  for path, pair in _adapters(lora_params).items():
    torch_name = flax_path_to_torch_key(path)
    name = _relative_name(torch_name, module_prefix)
    if name is None:
      raise ValueError(f'LoRA on {torch_name} lies outside module_prefix {module_prefix!r}, the '
                       'sub-module this adapter is written for')
    for which in (LORA_A, LORA_B):
      state[f'{key_prefix}{name}.{which}.weight'] = np.ascontiguousarray(
          flax_to_torch_array(np.asarray(pair[which], np.float32), 'kernel'))
  return state


def _strip_peft_prefix(key: str) -> str:
  return key[len(PEFT_MODEL_PREFIX):] if key.startswith(PEFT_MODEL_PREFIX) else key


def _layout_hint(unknown: Sequence[str], expected: Mapping[str, Any],
                 module_prefix: str | None) -> str:
  """When every unknown key fits the other layout (whole model vs sub-module), says how to read it."""
  bare = [_strip_peft_prefix(k) for k in unknown]
  if not bare:
    return ''
  if module_prefix is not None:
    if all(k.startswith(module_prefix + '.') for k in bare):
      return (f'\n  the keys name whole-model modules ({module_prefix}.*), not modules of the '
              f'sub-module {module_prefix!r}: read them with module_prefix=None')
    return ''
  for top in sorted({k.split('.', 1)[0] for k in expected}):
    if all(f'{top}.{k}' in expected for k in bare):
      return (f'\n  the keys name modules of the sub-module {top!r} (an adapter of that module '
              f'alone): read them with module_prefix={top!r}')
  return ''


def from_peft_state_dict(state_dict: Mapping[str, Any], params: Mapping[str, Any],
                         config: LoRAConfig, dtype: Any = np.float32,
                         module_prefix: str | None = None) -> dict:
  """PEFT adapter state dict (with or without ``base_model.model.``) -> LoRA tree for ``params``.

  Every module that ``config`` targets in ``params`` must have both weights with the expected shapes.
  With ``module_prefix``, the keys and ``config`` are those of an adapter of that sub-module of
  ``params`` (``conv_in.lora_A.weight`` for ``encoder.conv_in``); the tree still mirrors ``params``.

  Raises:
    CheckpointError: naming every unknown and missing key, or the first key with a wrong shape.
  """
  kernels = _layer_kernels(params)
  expected = {}
  for path, name in _named_targets(params, config, module_prefix, allow_none=True).items():
    a_shape, b_shape = _lora_shapes(np.shape(kernels[path]), config.rank)
    expected[f'{name}.{LORA_A}.weight'] = (path + (LORA_A,), a_shape)
    expected[f'{name}.{LORA_B}.weight'] = (path + (LORA_B,), b_shape)
  flat, unknown = {}, []
  for key, value in state_dict.items():
    bare = _strip_peft_prefix(key)
    if bare not in expected:
      unknown.append(key)
      continue
    path, want = expected[bare]
    array = torch_to_flax_array(np.asarray(value, np.float32), 'kernel')
    if array.shape != want:
      raise CheckpointError(f'shape mismatch for {key}: {tuple(np.shape(value))} -> {array.shape} in '
                            f'Flax layout, expected {want} (rank {config.rank}) at {"/".join(path)}')
    flat[path] = array.astype(dtype)
  missing = [k for k, (path, _) in expected.items() if path not in flat]
  if unknown or missing:
    within = f' of sub-module {module_prefix!r}' if module_prefix else ''
    raise CheckpointError(
        f'LoRA state dict does not match the targeted modules{within}:\n'
        f'  unknown ({len(unknown)}): {sorted(unknown)}\n  missing ({len(missing)}): {sorted(missing)}'
        + _layout_hint(unknown, expected, module_prefix))
  return traverse_util.unflatten_dict(flat)


def _prefix_regex(prefix: str) -> str:
  """PEFT ``exclude_modules`` regex that excludes every module outside ``prefix.``."""
  return rf'(?!{re.escape(prefix)}\.).*'


def _suffix_regex(patterns: tuple[str, ...] | str) -> str:
  if isinstance(patterns, str):
    return patterns
  return r'(?:.*\.)?(?:' + '|'.join(re.escape(p) for p in patterns) + ')'


def peft_adapter_config(config: LoRAConfig, base_model_name_or_path: str | None = None,
                        module_prefix: str | None = None) -> dict:
  """The ``adapter_config.json`` dict that makes PEFT build exactly the layers :func:`apply` uses
  (on the sub-module ``module_prefix`` when given: no exclude regex is then needed for OMGSR)."""
  if module_prefix is not None:
    config = _sub_module_config(config, module_prefix)
  exclude: Any = list(config.exclude_modules) if isinstance(config.exclude_modules, tuple) else \
      config.exclude_modules
  if config.prefix is not None:
    exclude = _prefix_regex(config.prefix)
    if config.exclude_modules:
      exclude += '|' + _suffix_regex(config.exclude_modules)
  targets = config.target_modules
  return {
      'peft_type': 'LORA', 'task_type': None, 'base_model_name_or_path': base_model_name_or_path,
      'inference_mode': True, 'r': config.rank, 'lora_alpha': config.alpha, 'lora_dropout': 0.0,
      'target_modules': targets if isinstance(targets, str) else list(targets),
      'exclude_modules': exclude,
      'init_lora_weights': True if config.init == 'default' else config.init,
      'bias': 'none', 'lora_bias': False, 'use_rslora': False, 'use_dora': False,
      'fan_in_fan_out': False, 'modules_to_save': None, 'rank_pattern': {}, 'alpha_pattern': {},
      'layers_to_transform': None, 'layers_pattern': None,
  }


def config_from_peft(adapter_config: Mapping[str, Any]) -> LoRAConfig:
  """LoRAConfig from a PEFT ``adapter_config.json`` dict; refuses features this module lacks."""
  if adapter_config.get('peft_type', 'LORA') != 'LORA':
    raise ValueError(f'not a LoRA adapter: peft_type={adapter_config.get("peft_type")!r}')
  unsupported = {k: adapter_config[k] for k in (
      'rank_pattern', 'alpha_pattern', 'use_rslora', 'use_dora', 'lora_bias', 'modules_to_save',
      'layers_to_transform', 'target_parameters', 'trainable_token_indices')
                 if adapter_config.get(k)}
  if adapter_config.get('bias', 'none') != 'none':
    unsupported['bias'] = adapter_config['bias']
  if unsupported:
    raise ValueError(f'PEFT adapter options not supported: {unsupported}')
  exclude = adapter_config.get('exclude_modules')
  prefix = None
  if isinstance(exclude, str):
    found = re.fullmatch(r'\(\?!(.+)\\\.\)\.\*', exclude)
    if found and re.escape(re.sub(r'\\(.)', r'\1', found.group(1))) == found.group(1):
      prefix, exclude = re.sub(r'\\(.)', r'\1', found.group(1)), None
  targets = adapter_config.get('target_modules')
  if targets is None:
    raise ValueError('adapter_config.json has no target_modules')
  init = adapter_config.get('init_lora_weights', True)
  return LoRAConfig(rank=int(adapter_config['r']), alpha=adapter_config.get('lora_alpha', 8),
                    target_modules=targets if isinstance(targets, str) else tuple(targets),
                    init='gaussian' if init == 'gaussian' else 'default', prefix=prefix,
                    exclude_modules=exclude if isinstance(exclude, str) or exclude is None
                    else tuple(exclude))


def save_peft_adapter(directory: str | os.PathLike, lora_params: Mapping[str, Any], config: LoRAConfig,
                      base_model_name_or_path: str | None = None,
                      key_prefix: str = PEFT_MODEL_PREFIX,
                      module_prefix: str | None = None) -> str:
  """Writes a PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

  With the default ``key_prefix`` (``PeftModel.save_pretrained``'s layout) it loads with
  ``PeftModel.from_pretrained(torch_model, directory)`` and ``set_peft_model_state_dict``; with
  ``key_prefix=''`` it loads with diffusers ``model.load_lora_adapter(directory, prefix=None,
  weight_name='adapter_model.safetensors')``, which reads the LoRA config from the file's
  ``lora_adapter_metadata`` (written in both cases). With ``module_prefix`` (e.g. 'encoder') keys and
  config are those of that sub-module: ``PeftModel.from_pretrained(vae.encoder, directory)``, as the
  OMGSR inference code loads its VAE adapter.

  Raises:
    ValueError: a LoRA module outside ``module_prefix``, or one that the written config would not
      target (PEFT would not build it).
  """
  from safetensors.numpy import save_file
  directory = os.fspath(directory)
  adapter_config = peft_adapter_config(config, base_model_name_or_path, module_prefix)
  inner = config if module_prefix is None else _sub_module_config(config, module_prefix)
  state = to_peft_state_dict(lora_params, config, key_prefix='', module_prefix=module_prefix)
  untargeted = sorted({n for n in (k.rsplit('.', 2)[0] for k in state)
                       if not module_matches(inner, n)})
  if untargeted:
    raise ValueError(f'LoRA modules {untargeted} are not targeted by the adapter config '
                     f'(target_modules={inner.target_modules!r}, prefix={inner.prefix!r})')
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, ADAPTER_CONFIG_NAME), 'w') as f:
    json.dump(adapter_config, f, indent=2, sort_keys=True)
  metadata = {'format': 'pt', 'lora_adapter_metadata': json.dumps(adapter_config, sort_keys=True)}
  save_file({key_prefix + k: v for k, v in state.items()},
            os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata=metadata)
  return directory


def load_peft_adapter(directory: str | os.PathLike, params: Mapping[str, Any], dtype: Any = np.float32,
                      prefix: str | None = None, module_prefix: str | None = None
                      ) -> tuple[dict, LoRAConfig]:
  """Reads a PEFT adapter folder (ours or ``PeftModel.save_pretrained``'s) -> (LoRA tree, config).

  Layouts, chosen by the caller (never guessed):

  * ``module_prefix=None`` (default): keys of the model ``params`` mirrors, e.g. a whole-VAE
    adapter (``base_model.model.encoder.conv_in...``). ``prefix`` restricts the targets when the
    adapter was trained on a copy of the model missing some parts: an old OMGSR VAE adapter (saved
    from a VAE whose decoder was deleted) loads into full VAE params with ``prefix='encoder'``.
  * ``module_prefix='encoder'``: the adapter of the sub-module ``encoder`` alone
    (``base_model.model.conv_in...``), as OMGSR's trainer writes it (``PeftModel(vae.encoder)``) and
    :func:`save_peft_adapter` with the same ``module_prefix``. The LoRA tree still mirrors
    ``params``; the returned config matches whole-model names (its ``prefix`` is ``module_prefix``).

  Raises:
    CheckpointError: unknown / missing keys (with the other layout's ``module_prefix`` when the keys
      fit it) or a shape mismatch, prefixed with ``directory``.
  """
  from safetensors.numpy import load_file
  directory = os.fspath(directory)
  with open(os.path.join(directory, ADAPTER_CONFIG_NAME)) as f:
    config = config_from_peft(json.load(f))
  if prefix is not None:
    if module_prefix is not None:
      raise ValueError('pass prefix (whole-model adapter) or module_prefix (sub-module adapter), '
                       'not both')
    config = dataclasses.replace(config, prefix=prefix)
  weights = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
  if not os.path.isfile(weights):
    raise FileNotFoundError(f'{weights} not found (pickled adapter_model.bin files are not read)')
  try:
    tree = from_peft_state_dict(load_file(weights), params, config, dtype=dtype,
                                module_prefix=module_prefix)
  except CheckpointError as e:
    raise CheckpointError(f'{directory}: {e}') from None
  if module_prefix is not None:
    config = _whole_model_config(config, module_prefix)
  return tree, config
