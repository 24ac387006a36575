"""Pieces every method composes: optimizers over parameter groups, gradient accumulation, frozen
weights, the UNet one-step predictor, LoRA adapters, the inference bundle and checkpoint restore.

Optimizers. A train state holds its trainable params as named groups (``{'generator': ...,
'heads': ...}``) and one optax state per group. :func:`optimizer_step` updates any subset of the
groups with their own transforms, so one step can update a generator and a discriminator (OMGSR),
a generator and a VSD regulariser (OSEDiff, RCOD), or one group after another (TUDSR's chunk loop).

Frozen weights. ``config.model.source`` is ``'converted'`` (folders written by ``convert_weights``)
or ``'random'`` (tiny random models from ``config.model.<kind>_config`` dicts, seeded by
``config.seed + RANDOM_SEED_OFFSETS[kind]``, for runs without any download).

Bundle. ``<workdir>/export/inference`` holds the method's inference weights (converted folders)
and :data:`BUNDLE_FILE` naming the method, the config it was trained with, and the method's
constants; ``load_generator`` reads it back without the training code's state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from sr_jax.diffusion import latents
from sr_jax.models import lora
from sr_jax.models import vae as vae_lib

BUNDLE_FILE = 'generator.json'
LEGACY_BUNDLE_FILES = ('omgsr.json',)  # bundles exported before the method registry
BUNDLE_FORMAT_VERSION = 1
RANDOM_SEED_OFFSETS = {'unet': 0, 'vae': 1, 'dinov3': 2, 'prompt': 3, 'dinov3_vit': 4, 'perceptual': 5}


# ---------------------------------------------------------------------------------- optimizers


def adamw(optim: Mapping[str, Any], learning_rate: float | None = None
          ) -> optax.GradientTransformation:
  """AdamW after global-norm clipping (``optim``: b1, b2, eps, weight_decay, clip_norm) at a
  constant learning rate (default ``optim['learning_rate']``). Clipping sees the accumulated mean
  gradient, as accelerate's sync step does in the reference trainers."""
  rate = optim['learning_rate'] if learning_rate is None else learning_rate
  return optax.chain(
      optax.clip_by_global_norm(optim['clip_norm']),
      optax.adamw(rate, b1=optim['b1'], b2=optim['b2'], eps=optim['eps'],
                  weight_decay=optim['weight_decay']))


def init_optimizers(transforms: Mapping[str, optax.GradientTransformation],
                    params: Mapping[str, Any]) -> dict:
  """One optimizer state per parameter group: ``{group: transforms[group].init(params[group])}``."""
  missing = sorted(set(transforms) - set(params))
  if missing:
    raise KeyError(f'no params for the optimizer groups {missing}; groups: {sorted(params)}')
  return {name: tx.init(params[name]) for name, tx in transforms.items()}


def optimizer_step(transforms: Mapping[str, optax.GradientTransformation],
                   grads: Mapping[str, Any], opt_states: Mapping[str, Any],
                   params: Mapping[str, Any]) -> tuple[dict, dict, dict]:
  """Updates the groups named in ``grads`` (each with its own transform); the other groups and
  their optimizer states are returned unchanged. Returns ``(params, opt_states, grad_norms)``."""
  params, opt_states, norms = dict(params), dict(opt_states), {}
  for name, group_grads in grads.items():
    updates, opt_states[name] = transforms[name].update(group_grads, opt_states[name],
                                                        params[name])
    params[name] = optax.apply_updates(params[name], updates)
    norms[name] = optax.tree.norm(group_grads)
  return params, opt_states, norms


def split_micro_batches(batch: Mapping[str, jax.Array], count: int) -> dict:
  """(B, ...) -> (count, B / count, ...) taking every ``count``-th example, so that each micro-batch
  holds examples from every data-parallel shard (a contiguous split would idle most devices)."""
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f'batch of {x.shape[0]} does not split into {count} micro-batches')
    return x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)
  return {k: split(v) for k, v in batch.items()}


def accumulate_gradients(grads_fn: Callable, params: Any, batch: Mapping[str, jax.Array],
                         count: int, rng: jax.Array, carry: Any = None) -> tuple[Any, Any, dict]:
  """Mean gradients over ``count`` micro-batches of ``batch`` (``lax.scan``: the memory of one).

  ``grads_fn(micro_batch, rng, carry) -> (grads, carry, metrics)``, with ``grads`` shaped like
  ``params`` (all groups taken from the parameters at the start of the step, as the reference's
  accumulation window does); ``carry`` threads state such as spectral-norm vectors. Returns
  ``(mean grads, carry, metrics averaged over the micro-batches)``.
  """
  def body(state, inputs):
    total, carry = state
    micro_batch, micro_rng = inputs
    grads, carry, metrics = grads_fn(micro_batch, micro_rng, carry)
    return (jax.tree.map(jnp.add, total, grads), carry), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  rngs = jax.random.split(rng, count)
  (total, carry), metrics = jax.lax.scan(body, (zeros, carry),
                                         (split_micro_batches(batch, count), rngs))
  mean_grads = jax.tree.map(lambda g: g / count, total)
  return mean_grads, carry, jax.tree.map(jnp.mean, metrics)


# ------------------------------------------------------------------------------ frozen weights


def model_config(model_cfg: Mapping[str, Any], kind: str, path: str | None) -> dict:
  """The reference ``config.json`` dict of a frozen ``kind`` model, without reading weights:
  ``model_cfg['<kind>_config']`` for random models, else the converted folder's config."""
  if model_cfg['source'] == 'random':
    return dict(model_cfg[f'{kind}_config'])
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  folder = pretrained.resolve_model_folder(path, kind)
  with open(os.path.join(folder, pretrained.CONFIG_FILE)) as f:
    return json.load(f)


def check_source(model_cfg: Mapping[str, Any]) -> None:
  if model_cfg['source'] not in ('random', 'converted'):
    raise ValueError(f"config.model.source must be 'random' or 'converted', got "
                     f"{model_cfg['source']!r}")


def random_params(kind: str, module: Any, seed: int) -> dict:
  """Random weights of a frozen ``kind`` model for tiny runs, drawn with numpy from the param shapes
  (nothing is compiled: a jitted init of the tiny models took longer to compile than to train).

  Each leaf is drawn from its own generator seeded by ``seed + RANDOM_SEED_OFFSETS[kind]`` and its
  path, so an encoder-only VAE gets the encoder half of the full VAE's weights. Distributions as
  Flax's default initialisers: kernels LeCun-normal (truncated at 2 sigma), biases 0, norm scales 1,
  ConvNeXt layer scales ``layer_scale_init_value``; DINOv3-ViT layer scales ``lambda1`` =
  ``layerscale_value``, CLS / register tokens truncated normal of std 0.02 and the mask token 0
  (transformers' ``_init_weights``); any other leaf name is an error.
  """
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  base_seed = seed + RANDOM_SEED_OFFSETS[kind]
  layer_scale = getattr(module, 'layer_scale_init_value', None)
  vit_layer_scale = getattr(module, 'layerscale_value', None)

  def draw(path: tuple[str, ...], leaf: Any) -> np.ndarray:
    name, shape = path[-1], tuple(leaf.shape)
    if name == 'kernel':
      rng = np.random.default_rng([base_seed, zlib.crc32('/'.join(path).encode())])
      return truncated_normal(rng, shape) * np.float32(1.0 / np.sqrt(np.prod(shape[:-1])))
    if name in ('bias', 'scale') or (name == 'gamma' and layer_scale is not None):
      value = {'bias': 0.0, 'scale': 1.0, 'gamma': layer_scale}[name]
      return np.full(shape, value, np.float32)
    if vit_layer_scale is not None and name in ('lambda1', 'mask_token'):
      return np.full(shape, vit_layer_scale if name == 'lambda1' else 0.0, np.float32)
    if vit_layer_scale is not None and name in ('cls_token', 'register_tokens'):
      rng = np.random.default_rng([base_seed, zlib.crc32('/'.join(path).encode())])
      return truncated_normal(rng, shape) * np.float32(0.02)
    raise ValueError(f'random_params: no rule for the param {"/".join(path)} of a {kind}')

  flat = traverse_util.flatten_dict(pretrained.abstract_params(module))
  params = traverse_util.unflatten_dict({path: draw(path, leaf) for path, leaf in flat.items()})
  return near_deterministic_posterior(params) if kind == 'vae' else params


def truncated_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """Standard normal truncated to [-2, 2] and rescaled to unit variance (Flax's ``lecun_normal``)."""
  values = rng.standard_normal(shape).astype(np.float32)
  outside = np.abs(values) > 2
  while outside.any():
    values[outside] = rng.standard_normal(int(outside.sum())).astype(np.float32)
    outside = np.abs(values) > 2
  return values / np.float32(0.87962566103423978)  # the std of N(0, 1) truncated to [-2, 2]


def near_deterministic_posterior(vae_params: Mapping[str, Any], logvar: float = -10.0) -> dict:
  """A random VAE's posterior has std ~1, a trained one's ~1e-2 or less: shift the log-variance
  half of the last encoder bias (quant_conv, or conv_out for VAEs without quant convs) so tiny runs
  sample latents the way real VAEs do."""
  if 'quant_conv' in vae_params:
    path = ('quant_conv',)
  elif 'encoder' in vae_params:
    path = ('encoder', 'conv_out')
  else:
    return dict(vae_params)  # a decoder-only tree: nothing to shift
  node = vae_params
  for name in path:
    node = node[name]
  bias = np.array(node['bias'], np.float32)
  bias[bias.shape[0] // 2:] += logvar
  shifted = {**node, 'bias': bias}
  if len(path) == 1:
    return {**vae_params, path[0]: shifted}
  return {**vae_params, 'encoder': {**vae_params['encoder'], 'conv_out': shifted}}


def load_frozen(model_cfg: Mapping[str, Any], kind: str, path: str | None, *, seed: int,
                param_dtype: Any, **module_kwargs) -> tuple[Any, Any]:
  """``(module, params)`` of a frozen ``kind`` model ('unet' | 'vae' | 'dinov3'): a converted folder
  at ``path``, or a random model (``model_cfg['<kind>_config']``, seed offset per kind). Params come
  in ``param_dtype``; ``module_kwargs`` (dtype, remat, parts, ...) configure the module."""
  check_source(model_cfg)
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  if model_cfg['source'] == 'converted':
    return pretrained.load_model(kind, path, param_dtype=param_dtype, **module_kwargs)
  config = model_config(model_cfg, kind, path)
  module = pretrained.build_model(kind, config, **module_kwargs)
  # Initialised as the plain float32 model: values do not depend on compute dtype or remat.
  params = random_params(kind, pretrained.build_model(kind, config), seed)
  if kind == 'vae' and module_kwargs.get('parts'):
    encoder, decoder = vae_lib.split_vae_params(params)
    params = {**(encoder if 'encoder' in module.parts else {}),
              **(decoder if 'decoder' in module.parts else {})}
  dtype = jnp.dtype(param_dtype)
  return module, jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def frozen_shapes(module: Any, param_dtype: Any) -> Any:
  """The param tree of ``module`` as ShapeDtypeStructs in ``param_dtype`` (no file is read)."""
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(param_dtype)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype),
                      pretrained.abstract_params(module))


# ------------------------------------------------------------------- one-step UNet predictor


@dataclasses.dataclass(frozen=True)
class UNetEpsilonStep:
  """A :class:`~sr_jax.methods.base.LatentStage` step: the UNet's epsilon at one timestep, then
  the clean latent (OMGSR Eq. 7; OSEDiff/S3Diff at t = 999; TUDSR at t1 / t2).

  Reads ``params[unet_key]``, the optional LoRA tree ``params[lora_key]`` (``lora_config``) and the
  prompt embedding ``params['prompt_embeds']`` (1, L, C), broadcast over the batch.
  """
  unet: Any
  timestep: int
  alpha_bar: float
  lora_config: lora.LoRAConfig | None = None
  unet_key: str = 'unet'
  lora_key: str = 'unet_lora'

  def __call__(self, params: Mapping[str, Any], z: jax.Array, noise: jax.Array | None = None,
               cond: Any = None) -> jax.Array:
    del noise, cond  # a deterministic, unconditioned step
    batch = z.shape[0]
    prompt = params['prompt_embeds']
    context = jnp.broadcast_to(prompt, (batch,) + prompt.shape[1:]).astype(self.unet.dtype)
    timesteps = jnp.full((batch,), self.timestep, jnp.int32)
    eps = lora.apply(self.unet, params[self.unet_key], params.get(self.lora_key), self.lora_config,
                     z.astype(self.unet.dtype), timesteps, context)
    return latents.x0_from_epsilon(z, eps.astype(jnp.float32), self.alpha_bar)


# ------------------------------------------------------------------------ adapters and bundle


def save_adapters(directory: str, adapters: Mapping[str, tuple[Any, lora.LoRAConfig]],
                  module_prefixes: Mapping[str, str] | None = None) -> None:
  """``directory/<name>/`` PEFT adapter folders (loadable by diffusers + peft) for each
  ``name: (LoRA tree, LoRAConfig)``.

  ``module_prefixes[name]`` (e.g. ``'encoder'``) writes that adapter for the sub-module alone, the
  layout of a reference trainer that wraps ``vae.encoder`` in its own ``PeftModel`` (it loads with
  ``PeftModel.from_pretrained(vae.encoder, dir)``); other adapters are keyed for the whole model.
  """
  module_prefixes = dict(module_prefixes or {})
  unknown = sorted(set(module_prefixes) - set(adapters))
  if unknown:
    raise KeyError(f'module_prefixes for adapters {unknown} that are not saved: {sorted(adapters)}')
  for name, (tree, config) in adapters.items():
    lora.save_peft_adapter(os.path.join(directory, name), tree, config,
                           module_prefix=module_prefixes.get(name))


def config_as_dict(config: Any) -> dict:
  """A JSON-able dict of an ml_collections config (tuples become lists)."""
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def write_bundle(directory: str, method: str, config: Any, meta: Mapping[str, Any]) -> None:
  """``directory/generator.json``: the method, the training config and the method's constants."""
  os.makedirs(directory, exist_ok=True)
  record = {'method': method, 'format_version': BUNDLE_FORMAT_VERSION, **meta,
            'config': config_as_dict(config)}
  with open(os.path.join(directory, BUNDLE_FILE), 'w') as f:
    json.dump(record, f, indent=2, sort_keys=True)


def bundle_file(path: str) -> str | None:
  """The generator JSON of an exported bundle at ``path``, or None when ``path`` is not one."""
  for name in (BUNDLE_FILE,) + LEGACY_BUNDLE_FILES:
    candidate = os.path.join(path, name)
    if os.path.isfile(candidate):
      return candidate
  return None


def read_bundle(path: str, method: str) -> dict:
  """The bundle record at ``path``; a clear error when it belongs to another method."""
  file = bundle_file(path)
  if file is None:
    raise FileNotFoundError(f'{path} is not an exported bundle (no {BUNDLE_FILE})')
  with open(file) as f:
    record = json.load(f)
  found = record.get('method', 'omgsr')  # the legacy omgsr.json of older exports names it too
  if found != method:
    raise ValueError(f'{path} is a {found!r} bundle, but the config is for {method!r}: pass '
                     f'--config=configs/{found}.py (or the config it was trained with)')
  return record


def checkpoint_kind(path: str) -> str:
  """'bundle' (an exported bundle) or 'workdir' (a training workdir with checkpoints)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f'--checkpoint {path}: no such folder (give a training workdir or its '
                            f'export/inference bundle)')
  if bundle_file(path) is not None:
    return 'bundle'
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return 'workdir'
  raise FileNotFoundError(f'--checkpoint {path} is neither an inference bundle (no {BUNDLE_FILE}) '
                          f'nor a training workdir (no checkpoints/)')


def restore_train_state(config: Any, workdir: str, init_state: Callable[[jax.Array], Any],
                        step: int | None = None) -> tuple[Any, int]:
  """The train state of ``workdir``'s latest checkpoint (or ``step``) on this process's devices.

  ``init_state`` is the method's (abstract shapes are enough: nothing is initialised). Reads
  ``config.checkpoint_dir`` when the run wrote its checkpoints elsewhere.
  """
  from sr_jax import checkpointing, sharding  # pylint: disable=g-import-not-at-top
  directory = config.get('checkpoint_dir') or os.path.join(workdir, 'checkpoints')
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  key = jax.random.key(0, impl=config.get('prng_impl'))
  abstract, _ = sharding.abstract_state(init_state, key, mesh)
  manager = checkpointing.make_manager(directory, read_only=True)
  try:
    restored = checkpointing.restore(manager, abstract, None, step)
  finally:
    manager.close()
  if restored is None:
    raise FileNotFoundError(f'no checkpoint in {directory}')
  state, step = restored
  return sharding.gather_to_host(state), step


def load_perceptual(model_cfg: Mapping[str, Any], path: str | None, *, seed: int) -> dict:
  """The frozen perceptual-loss params ``{'vgg16', 'dists', ...}``: a ``convert_weights perceptual``
  folder at ``path``, or for ``source='random'`` a random VGG16 (drawn like :func:`random_params`)
  with random positive DISTS alpha / beta (for tiny runs and tests only: meaningless as a metric)."""
  check_source(model_cfg)
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  if model_cfg['source'] == 'converted':
    return pretrained.load_perceptual(path)
  from sr_jax.losses.dists import DISTS_CHANNELS  # pylint: disable=g-import-not-at-top
  from sr_jax.models.vgg import VGG16  # pylint: disable=g-import-not-at-top
  vgg = random_params('perceptual', VGG16(), seed)
  rng = np.random.default_rng(seed + RANDOM_SEED_OFFSETS['perceptual'])
  count = sum(DISTS_CHANNELS)
  alpha, beta = (rng.uniform(0.1, 1.0, count).astype(np.float32) for _ in range(2))
  return jax.tree.map(jnp.asarray, {'vgg16': vgg, 'dists': {'alpha': alpha, 'beta': beta}})


# ------------------------------------------------------- SD-based methods: configs, prompt, GAN


def sd_model_configs(model_cfg: Mapping[str, Any], dino_kind: str | None = None) -> dict:
  """The reference configs of an SD-based method without loading any weight: {unet, vae,
  scheduler} from ``model_cfg.sd_path`` (or the random ``*_config`` dicts), plus the
  discriminator backbone ``dino_kind`` ('dinov3' | 'dinov3_vit') from ``model_cfg.dinov3_path``."""
  check_source(model_cfg)
  cfgs = {kind: model_config(model_cfg, kind, model_cfg['sd_path']) for kind in ('unet', 'vae')}
  if dino_kind is not None:
    cfgs[dino_kind] = model_config(model_cfg, dino_kind, model_cfg['dinov3_path'])
  if model_cfg['source'] == 'random':
    cfgs['scheduler'] = dict(model_cfg['scheduler_config'])
  else:
    from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
    with open(os.path.join(model_cfg['sd_path'], pretrained.SCHEDULER_CONFIG_FILE)) as f:
      cfgs['scheduler'] = json.load(f)
  return cfgs


def prompt_embedding(config: Any) -> jax.Array:
  """The fixed prompt embedding (1, L, C) in the compute dtype: the one stored by
  ``convert_weights sd`` for ``model.prompt``, or a random one for random models."""
  m = config.model
  if m.source == 'random':
    width = model_config(m, 'unet', None)['cross_attention_dim']
    prompt = jax.random.normal(jax.random.key(config.seed + RANDOM_SEED_OFFSETS['prompt']),
                               (1, m.prompt_length, width))
  else:
    from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
    prompt = pretrained.load_prompt_embeds(m.sd_path, m.prompt)
  return jnp.asarray(prompt, jnp.dtype(m.compute_dtype))


def generator_and_heads_optimizers(optim: Mapping[str, Any]
                                   ) -> dict[str, optax.GradientTransformation]:
  """AdamW + clipping for the groups 'generator' and 'heads' of a one-step GAN (the D rate
  ``optim.d_learning_rate`` defaults to G's, as the OMGSR reference)."""
  d_rate = optim.get('d_learning_rate') or optim['learning_rate']
  return {'generator': adamw(optim), 'heads': adamw(optim, d_rate)}


def write_sd_bundle(bundle: str, cfgs: Mapping[str, Any], params: Mapping[str, Any], prompt: str,
                    source: str) -> None:
  """The weights half of an SD-based bundle: ``unet/``, ``vae/`` (converted folders of
  ``params['unet']``, ``params['vae']``), the scheduler config and the prompt embedding."""
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  for kind in ('unet', 'vae'):
    pretrained.save_converted(os.path.join(bundle, kind), kind, cfgs[kind], params[kind],
                              source=source)
  with open(os.path.join(bundle, pretrained.SCHEDULER_CONFIG_FILE), 'w') as f:
    json.dump(dict(cfgs['scheduler']), f, indent=2)
  pretrained.save_prompt_embeds(bundle, [prompt], [params['prompt_embeds']], source=source)
  pretrained.mark_pipeline_root(bundle, source=source, parts=('unet', 'vae'))


def read_sd_bundle(path: str, prompt: str, dtype: Any) -> tuple[Any, Any, latents.LatentCodec, dict]:
  """(unet, vae, codec, {unet, vae, prompt_embeds}) of :func:`write_sd_bundle`'s folder."""
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  unet, unet_params = pretrained.load_unet(path, dtype=dtype, param_dtype=dtype)
  vae, vae_params = pretrained.load_vae(path, dtype=dtype, param_dtype=dtype)
  codec = latents.LatentCodec.from_vae_config(model_config({'source': 'converted'}, 'vae', path))
  return unet, vae, codec, {'unet': unet_params, 'vae': vae_params,
                            'prompt_embeds': pretrained.load_prompt_embeds(path, prompt)}


def weighted_loss(terms: Mapping[str, jax.Array], weights: Mapping[str, float], prefix: str = 'g_'
                  ) -> tuple[jax.Array, dict]:
  """``sum_k weights[k] terms[k]`` and the metrics {prefix + k: term} plus {prefix + 'loss'}."""
  loss = sum(weights[name] * value for name, value in terms.items())
  metrics = {f'{prefix}{name}': value for name, value in terms.items()}
  metrics[f'{prefix}loss'] = loss
  return loss, metrics
