"""OMGSR-S: one-step generation at a mid-timestep, trained as a GAN (OMGSR Sec. 3.4-3.8).

Data flow of one training step (HEAD recipe, method-facts §1.2)::

  LQ --LoRA VAE encoder--> z_L (sampled, x scaling) --LoRA UNet eps at t*--> z_P (Eq. 7)
     --frozen decoder--> x_P in [-1, 1]
  G loss (Eq. 13) = 5 LRR(z_L, E(HQ)) + 0.5 GAN_g(D(x_P)) + 5 Dv3CD(x_P, HQ) + 0.5 L1(x_P, HQ)
  D loss (Eq. 15) = 0.5 (BCE(D(stopgrad x_P), 0) + BCE(D(HQ), 0.8))

Only the LoRA A/B of the UNet and of the VAE encoder (the generator) and the discriminator heads are
trained; every frozen weight is an input of the step and never differentiated. The reference code lets
the G loss leak a gradient into the D heads (its D optimizer is not zeroed after the G backward); we
drop that term on purpose: the D update sees only the D loss.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from sr_jax.diffusion import schedules
from sr_jax.losses import basic, dists, gan
from sr_jax.models import discriminator, lora
from sr_jax.models.dinov3 import DINOv3ConvNextModel
from sr_jax.models.unet import UNet2DConditionModel
from sr_jax.models.vae import AutoencoderKL, DECODER_PARAMS, ENCODER_PARAMS


@dataclasses.dataclass(frozen=True)
class OmgsrModels:
  """The static half of OMGSR: modules, LoRA configs and constants (no arrays)."""
  unet: UNet2DConditionModel
  vae_encoder: AutoencoderKL            # parts=('encoder',): encoder + quant_conv
  vae_decoder: AutoencoderKL            # parts=('decoder',): post_quant_conv + decoder
  dino: DINOv3ConvNextModel
  heads: discriminator.DiscriminatorHeads
  unet_lora: lora.LoRAConfig
  vae_lora: lora.LoRAConfig
  t_star: int
  alpha_bar: float                      # alpha-bar at t*
  scaling_factor: float                 # VAE latent scaling
  loss_weights: tuple[tuple[str, float], ...]

  def weight(self, name: str) -> float:
    return dict(self.loss_weights)[name]


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes. ``generator`` = {'unet': LoRA tree, 'vae_encoder': LoRA tree}."""
  step: jax.Array
  generator: Any
  heads: Any                            # discriminator head params
  spectral: Any                         # spectral-norm power-iteration vectors of the heads
  g_opt_state: Any
  d_opt_state: Any
  rng: jax.Array


# ----------------------------------------------------------------------------------- generator


def encode_lq_latent(models: OmgsrModels, encoder_params: Any, encoder_lora: Any, images: jax.Array,
                     rng: jax.Array) -> jax.Array:
  """``z_L = E_w(x_L)``: LoRA VAE encoder, ``latent_dist.sample()`` x scaling factor (as the reference,
  in training and inference). ``encoder_lora=None`` gives the frozen encoder ``E``."""
  mean, logvar = lora.apply(models.vae_encoder, encoder_params, encoder_lora, models.vae_lora,
                            images.astype(models.vae_encoder.dtype), method='encode')
  noise = jax.random.normal(rng, mean.shape, jnp.float32)
  latent = mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise
  return latent * models.scaling_factor


def predict_clean_latent(models: OmgsrModels, unet_params: Any, unet_lora: Any, z_lq: jax.Array,
                         prompt_embeds: jax.Array) -> jax.Array:
  """OMGSR Eq. 7: ``z_P = (z_L - sqrt(1 - a) eps_theta(z_L, t*, c)) / sqrt(a)``, one UNet call."""
  batch = z_lq.shape[0]
  context = jnp.broadcast_to(prompt_embeds, (batch,) + prompt_embeds.shape[1:])
  timesteps = jnp.full((batch,), models.t_star, jnp.int32)

  eps = lora.apply(models.unet, unet_params, unet_lora, models.unet_lora,
                   z_lq.astype(models.unet.dtype), timesteps, context.astype(models.unet.dtype))
  eps = eps.astype(jnp.float32)
  return schedules.ddpm_x0_from_epsilon(z_lq, eps, models.alpha_bar)


def decode_latent(models: OmgsrModels, decoder_params: Any, z: jax.Array) -> jax.Array:
  """``x_P = D(z_P)`` with the frozen decoder, clamped to [-1, 1] as the reference."""
  images = models.vae_decoder.apply(
      {'params': decoder_params}, (z / models.scaling_factor).astype(models.vae_decoder.dtype),
      method='decode')
  return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


def super_resolve(models: OmgsrModels, frozen: Mapping[str, Any], generator: Any, lq: jax.Array,
                  rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The whole one-step generator: LQ in [-1, 1] (already upscaled to the output size) -> (x_P, z_L)."""
  z_lq = encode_lq_latent(models, frozen['vae_encoder'], generator['vae_encoder'], lq, rng)
  z_pred = predict_clean_latent(models, frozen['unet'], generator['unet'], z_lq,
                                frozen['prompt_embeds'])
  return decode_latent(models, frozen['vae_decoder'], z_pred), z_lq


# --------------------------------------------------------------------------------------- losses


def _disc_call(models, frozen, heads_params, spectral, images, rng):
  return discriminator.discriminator_logits(
      models.dino, frozen['dino'], models.heads, {'params': heads_params, 'spectral': spectral},
      images, rng, train=True)


def generator_loss(generator: Any, models: OmgsrModels, frozen: Mapping[str, Any], heads_params: Any,
                   spectral: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
  """OMGSR Eq. 13: ``5 LRR + 0.5 L_g + 5 Dv3CD + 0.5 L1``. Differentiated w.r.t. ``generator`` only.

  Returns ``(loss, (metrics, new spectral state, x_P))``.
  """
  rng_lq, rng_hq, rng_lrr, rng_aug = jax.random.split(rng, 4)
  lq, hq = batch['lq'], batch['hq']
  sr, z_lq = super_resolve(models, frozen, generator, lq, rng_lq)
  z_hq = jax.lax.stop_gradient(encode_lq_latent(models, frozen['vae_encoder'], None, hq, rng_hq))
  noise = jax.random.normal(rng_lrr, z_hq.shape, jnp.float32)
  terms = {
      'lrr': basic.lrr_loss(z_lq, z_hq, noise, models.alpha_bar),
      'dv3cd': dists.dv3cd_loss(models.dino, frozen['dino'], sr, hq),
      'l1': basic.l1_loss(sr, hq),
  }
  # The heads are constants here: the G loss must not move D (see module docstring).
  fake_logits, spectral = _disc_call(models, frozen, jax.lax.stop_gradient(heads_params), spectral,
                                     sr, rng_aug)
  terms['gan'] = gan.generator_gan_loss(fake_logits)
  loss = sum(models.weight(name) * value for name, value in terms.items())
  metrics = {f'g_{name}': value for name, value in terms.items()}
  metrics['g_loss'] = loss
  return loss, (metrics, spectral, sr)


def discriminator_loss(heads_params: Any, models: OmgsrModels, frozen: Mapping[str, Any],
                       spectral: Any, fake: jax.Array, real: jax.Array, rng: jax.Array):
  """OMGSR Eq. 14-15: ``0.5 (BCE(D(stopgrad x_P), 0) + BCE(D(x_H), 0.8))``; w.r.t. the heads only."""
  rng_fake, rng_real = jax.random.split(rng)
  fake_logits, spectral = _disc_call(models, frozen, heads_params, spectral,
                                     jax.lax.stop_gradient(fake), rng_fake)
  real_logits, spectral = _disc_call(models, frozen, heads_params, spectral, real, rng_real)
  loss_fake, loss_real = gan.discriminator_gan_loss(fake_logits, real_logits)
  loss = models.weight('disc') * (loss_fake + loss_real)
  metrics = {'d_loss': loss, 'd_fake': loss_fake, 'd_real': loss_real,
             'd_logit_fake': jnp.mean(jnp.stack([jnp.mean(l) for l in fake_logits])),
             'd_logit_real': jnp.mean(jnp.stack([jnp.mean(l) for l in real_logits]))}
  return loss, (metrics, spectral)


# ---------------------------------------------------------------------------------- train step


def make_optimizer(optim: Mapping[str, Any], learning_rate: float) -> optax.GradientTransformation:
  """AdamW + global-norm clipping at a constant LR (clipping sees the accumulated mean gradient, as
  accelerate's sync step does)."""
  return optax.chain(
      optax.clip_by_global_norm(optim['clip_norm']),
      optax.adamw(learning_rate, b1=optim['b1'], b2=optim['b2'], eps=optim['eps'],
                  weight_decay=optim['weight_decay']))


def split_micro_batches(batch: Mapping[str, jax.Array], count: int) -> dict:
  """(B, ...) -> (count, B / count, ...) taking every ``count``-th example, so that each micro-batch
  holds examples from every data-parallel shard (a contiguous split would idle most devices)."""
  def split(x):
    if x.shape[0] % count:
      raise ValueError(f'batch of {x.shape[0]} does not split into {count} micro-batches')
    return x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)
  return {k: split(v) for k, v in batch.items()}


def micro_step_gradients(models: OmgsrModels, state: TrainState, frozen: Mapping[str, Any],
                         spectral: Any, micro_batch: Mapping[str, jax.Array], rng: jax.Array):
  """G gradients (Eq. 13), then D gradients (Eq. 15) on the stopped-gradient x_P of one micro-batch.
  Both use the parameters from the start of the step, as the reference's accumulation window does."""
  g_rng, d_rng = jax.random.split(rng)
  g_grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  (_, (g_metrics, spectral, sr)), g_grads = g_grad_fn(
      state.generator, models, frozen, state.heads, spectral, micro_batch, g_rng)
  d_grad_fn = jax.value_and_grad(discriminator_loss, has_aux=True)
  (_, (d_metrics, spectral)), d_grads = d_grad_fn(
      state.heads, models, frozen, spectral, sr, micro_batch['hq'], d_rng)
  return g_grads, d_grads, spectral, {**g_metrics, **d_metrics}


def train_step(models: OmgsrModels, g_tx: optax.GradientTransformation,
               d_tx: optax.GradientTransformation, grad_accum_steps: int, state: TrainState,
               frozen: Mapping[str, Any], batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
  """One OMGSR optimizer step over ``grad_accum_steps`` micro-batches of ``batch`` (lax.scan, so
  memory is that of one micro-batch): mean G and D gradients, then one AdamW update of each."""
  rng, step_rng = jax.random.split(state.rng)
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)

  def accumulate(carry, inputs):
    g_sum, d_sum, spectral = carry
    micro_batch, micro_rng = inputs
    g_grads, d_grads, spectral, metrics = micro_step_gradients(
        models, state, frozen, spectral, micro_batch, micro_rng)
    add = lambda total, new: jax.tree.map(jnp.add, total, new)
    return (add(g_sum, g_grads), add(d_sum, d_grads), spectral), metrics

  micro_batches = split_micro_batches(batch, grad_accum_steps)
  rngs = jax.random.split(step_rng, grad_accum_steps)
  (g_grads, d_grads, spectral), metrics = jax.lax.scan(
      accumulate, (zeros(state.generator), zeros(state.heads), state.spectral), (micro_batches, rngs))
  mean = lambda tree: jax.tree.map(lambda g: g / grad_accum_steps, tree)
  g_grads, d_grads = mean(g_grads), mean(d_grads)

  g_updates, g_opt_state = g_tx.update(g_grads, state.g_opt_state, state.generator)
  d_updates, d_opt_state = d_tx.update(d_grads, state.d_opt_state, state.heads)
  metrics = jax.tree.map(jnp.mean, metrics)
  metrics.update(g_grad_norm=optax.global_norm(g_grads), d_grad_norm=optax.global_norm(d_grads))
  new_state = state.replace(
      step=state.step + 1, generator=optax.apply_updates(state.generator, g_updates),
      heads=optax.apply_updates(state.heads, d_updates), spectral=spectral,
      g_opt_state=g_opt_state, d_opt_state=d_opt_state, rng=rng)
  return new_state, metrics


def init_state(models: OmgsrModels, g_tx: optax.GradientTransformation,
               d_tx: optax.GradientTransformation, frozen_shapes: Mapping[str, Any],
               rng: jax.Array) -> TrainState:
  """Fresh LoRA trees (B = 0: the generator starts as the pre-trained model), fresh D heads."""
  rng_unet, rng_vae, rng_heads, rng_state = jax.random.split(rng, 4)
  generator = {
      'unet': lora.init_lora_params(rng_unet, frozen_shapes['unet'], models.unet_lora),
      'vae_encoder': lora.init_lora_params(rng_vae, frozen_shapes['vae_encoder'], models.vae_lora),
  }
  head_vars = models.heads.init(rng_heads, models.heads.dummy_inputs())
  return TrainState(step=jnp.zeros((), jnp.int32), generator=generator,
                    heads=head_vars['params'], spectral=head_vars['spectral'],
                    g_opt_state=g_tx.init(generator), d_opt_state=d_tx.init(head_vars['params']),
                    rng=rng_state)


def split_vae_params(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """Full AutoencoderKL params -> (encoder + quant_conv, post_quant_conv + decoder)."""
  return ({k: params[k] for k in ENCODER_PARAMS}, {k: params[k] for k in DECODER_PARAMS})


def step_functions(models: OmgsrModels, optim: Mapping[str, Any]):
  """(init_state(frozen_shapes, rng), train_step(state, frozen, batch)) closed over the statics."""
  d_learning_rate = optim.get('d_learning_rate') or optim['learning_rate']
  g_tx = make_optimizer(optim, optim['learning_rate'])
  d_tx = make_optimizer(optim, d_learning_rate)
  return (functools.partial(init_state, models, g_tx, d_tx),
          functools.partial(train_step, models, g_tx, d_tx, int(optim['grad_accum_steps'])))


# ------------------------------------------------------------------------------------ building


# Seed offsets of the tiny runs' random frozen models (config.seed + offset).
RANDOM_SEED_OFFSETS = {'unet': 0, 'vae': 1, 'dinov3': 2, 'prompt': 3}


def random_params(config, kind: str, module) -> Any:
  """Random weights of a frozen ``kind`` model for tiny runs, initialised under jit (eager init of even
  a tiny UNet is slow). Flax derives each param from its module path, so an encoder-only VAE gets the
  encoder half of the full VAE's weights."""
  params = jax.jit(lambda rng: module.init(rng, *_as_tuple(module.dummy_inputs()))['params'])(
      jax.random.key(config.seed + RANDOM_SEED_OFFSETS[kind]))
  return _near_deterministic_posterior(params) if kind == 'vae' else params


def _as_tuple(inputs) -> tuple:
  return inputs if isinstance(inputs, tuple) else (inputs,)


def _near_deterministic_posterior(vae_params: Mapping[str, Any], logvar: float = -10.0) -> dict:
  """A random VAE's posterior has std ~1, a trained one's ~1e-2 or less: shift the log-variance half
  of the random quant_conv bias so tiny runs sample latents the way the real SD VAE does."""
  bias = vae_params['quant_conv']['bias']
  latent_channels = bias.shape[0] // 2
  quant_conv = {**vae_params['quant_conv'], 'bias': bias.at[latent_channels:].add(logvar)}
  return {**vae_params, 'quant_conv': quant_conv}


def _read_model_config(path: str, kind: str) -> dict:
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  folder = pretrained.resolve_model_folder(path, kind)
  with open(os.path.join(folder, pretrained.CONFIG_FILE)) as f:
    return json.load(f)


def model_configs(config) -> dict:
  """The reference configs (unet, vae, dinov3, scheduler) without loading any weight."""
  m = config.model
  if m.source == 'random':
    return {'unet': dict(m.unet_config), 'vae': dict(m.vae_config),
            'dinov3': dict(m.dinov3_config), 'scheduler': dict(m.scheduler_config)}
  if m.source == 'converted':
    from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
    with open(os.path.join(m.sd_path, pretrained.SCHEDULER_CONFIG_FILE)) as f:
      scheduler = json.load(f)
    return {'unet': _read_model_config(m.sd_path, 'unet'), 'vae': _read_model_config(m.sd_path, 'vae'),
            'dinov3': _read_model_config(m.dinov3_path, 'dinov3'), 'scheduler': scheduler}
  raise ValueError(f"config.model.source must be 'random' or 'converted', got {m.source!r}")


def load_frozen(config, cfgs: Mapping[str, Any]) -> dict:
  """Frozen params {unet, vae_encoder, vae_decoder, dino, prompt_embeds}: converted folders, or tiny
  random models (seeded by ``config.seed``). Usable under ``jax.eval_shape`` for shapes only."""
  m = config.model
  compute, frozen_dtype = jnp.dtype(m.compute_dtype), jnp.dtype(m.frozen_param_dtype)
  if m.source == 'random':
    params = {kind: random_params(config, kind, cls.from_config(cfgs[kind]))
              for kind, cls in [('unet', UNet2DConditionModel), ('vae', AutoencoderKL),
                                ('dinov3', DINOv3ConvNextModel)]}
    prompt = jax.random.normal(jax.random.key(config.seed + RANDOM_SEED_OFFSETS['prompt']),
                               (1, m.prompt_length, cfgs['unet']['cross_attention_dim']))
  else:
    from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
    params = {'unet': pretrained.load_unet(m.sd_path, param_dtype=frozen_dtype)[1],
              'vae': pretrained.load_vae(m.sd_path, param_dtype=frozen_dtype)[1],
              'dinov3': pretrained.load_dinov3(m.dinov3_path, param_dtype=frozen_dtype)[1]}
    prompt = pretrained.load_prompt_embeds(m.sd_path, m.prompt)
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, frozen_dtype), tree)
  encoder, decoder = split_vae_params(params['vae'])
  return {'unet': cast(params['unet']), 'vae_encoder': cast(encoder), 'vae_decoder': cast(decoder),
          'dino': cast(params['dinov3']), 'prompt_embeds': jnp.asarray(prompt, compute)}


def build_models(config, cfgs: Mapping[str, Any]) -> OmgsrModels:
  """The static half (modules, LoRA configs, t*, alpha-bar, loss weights) from the config."""
  m = config.model
  compute = jnp.dtype(m.compute_dtype)
  alphas_cumprod = schedules.ddpm_alphas_cumprod(cfgs['scheduler'])
  targets = tuple(m.lora_targets)
  kw = dict(dtype=compute, remat=bool(m.remat))  # remat: per block (see layers.maybe_remat)
  return OmgsrModels(
      unet=UNet2DConditionModel.from_config(cfgs['unet'], **kw),
      vae_encoder=AutoencoderKL.from_config(cfgs['vae'], parts=('encoder',), **kw),
      vae_decoder=AutoencoderKL.from_config(cfgs['vae'], parts=('decoder',), **kw),
      dino=DINOv3ConvNextModel.from_config(cfgs['dinov3'], **kw),
      heads=discriminator.DiscriminatorHeads(
          channels=tuple(cfgs['dinov3']['hidden_sizes'][:discriminator.NUM_LEVELS]),
          resolution=m.disc_resolution, dtype=compute),
      unet_lora=lora.LoRAConfig(m.unet_lora_rank, m.unet_lora_alpha, targets, init=m.lora_init),
      vae_lora=lora.LoRAConfig(m.vae_lora_rank, m.vae_lora_alpha, targets, init=m.lora_init,
                               prefix='encoder'),
      t_star=int(m.t_star), alpha_bar=float(alphas_cumprod[m.t_star]),
      scaling_factor=float(cfgs['vae'].get('scaling_factor', 0.18215)),
      loss_weights=tuple(sorted(dict(config.loss).items())))


def build(config) -> tuple[OmgsrModels, dict, dict]:
  """Config -> (static models, frozen params, model configs). Frozen params are default-device
  arrays; the trainer places (and optionally FSDP-shards) them."""
  cfgs = model_configs(config)
  return build_models(config, cfgs), load_frozen(config, cfgs), cfgs


# ------------------------------------------------------------------------- trainer integration


def sample_images(models: OmgsrModels, state: TrainState, frozen: Mapping[str, Any],
                  batch: Mapping[str, jax.Array]) -> dict:
  """LQ | SR | HQ for the trainer's image grid (a fixed key: grids differ only by training)."""
  sr, _ = super_resolve(models, frozen, state.generator, batch['lq'], jax.random.key(0))
  return {'lq': batch['lq'], 'sr': sr, 'hq': batch['hq']}


def merged_inference_params(models: OmgsrModels, generator: Any, frozen: Mapping[str, Any]) -> dict:
  """{unet, vae (encoder + decoder), prompt_embeds} with the LoRA folded in: the inference weights
  (the reference's ``merge_and_unload``)."""
  encoder = lora.merge(frozen['vae_encoder'], generator['vae_encoder'], models.vae_lora)
  return {'unet': lora.merge(frozen['unet'], generator['unet'], models.unet_lora),
          'vae': {**encoder, **frozen['vae_decoder']}, 'prompt_embeds': frozen['prompt_embeds']}


def _write_converted(out: str, kind: str, model_config: Mapping[str, Any], params: Any,
                     source: str) -> None:
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  pretrained.save_converted(out, kind, model_config, params, source=source)


def export_inference_bundle(models: OmgsrModels, cfgs: Mapping[str, Any], prompt: str,
                            state: TrainState, frozen: Mapping[str, Any], directory: str) -> None:
  """Writes ``directory``/{unet_lora_adapter, vae_encoder_lora_adapter} (PEFT layout, loadable by
  diffusers + peft) and ``directory/inference``: a converted SD pipeline root with the LoRA merged
  (unet/, vae/, scheduler_config.json, prompt_embeds.*) plus ``omgsr.json`` (t*, prompt)."""
  from sr_jax import pretrained, sharding  # pylint: disable=g-import-not-at-top
  host = sharding.gather_to_host((state.generator, frozen))
  if jax.process_index() != 0:
    return
  generator, frozen = host
  lora.save_peft_adapter(os.path.join(directory, 'unet_lora_adapter'), generator['unet'],
                         models.unet_lora)
  lora.save_peft_adapter(os.path.join(directory, 'vae_encoder_lora_adapter'),
                         generator['vae_encoder'], models.vae_lora)
  bundle = os.path.join(directory, 'inference')
  merged = merged_inference_params(models, generator, frozen)
  _write_converted(os.path.join(bundle, 'unet'), 'unet', cfgs['unet'], merged['unet'], 'omgsr export')
  _write_converted(os.path.join(bundle, 'vae'), 'vae', cfgs['vae'], merged['vae'], 'omgsr export')
  with open(os.path.join(bundle, pretrained.SCHEDULER_CONFIG_FILE), 'w') as f:
    json.dump(dict(cfgs['scheduler']), f, indent=2)
  pretrained.save_prompt_embeds(bundle, [prompt], [frozen['prompt_embeds']], source='omgsr export')
  pretrained.mark_pipeline_root(bundle, source='omgsr export', parts=('unet', 'vae'))
  with open(os.path.join(bundle, 'omgsr.json'), 'w') as f:
    json.dump({'method': 'omgsr', 't_star': models.t_star, 'prompt': prompt,
               'alpha_bar': models.alpha_bar, 'scaling_factor': models.scaling_factor}, f, indent=2)


def make_method(config):
  """The OMGSR ``trainer.Method`` for ``config`` (see ``configs/omgsr.py``)."""
  from sr_jax import trainer  # pylint: disable=g-import-not-at-top
  models, frozen, cfgs = build(config)
  init_fn, step_fn = step_functions(models, config.optim)
  frozen_shapes = jax.eval_shape(lambda: frozen)
  return trainer.Method(
      init_state=functools.partial(init_fn, frozen_shapes),
      train_step=step_fn,
      frozen=frozen,
      sample=functools.partial(sample_images, models),
      export=functools.partial(export_inference_bundle, models, cfgs, config.model.prompt),
      # XLA's cost analysis counts the accumulation scan body once, so give the count explicitly.
      flops_per_sample=config.get('flops_per_sample'))
