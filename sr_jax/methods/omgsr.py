"""OMGSR-S: one-step generation at a mid-timestep, trained as a GAN (OMGSR Sec. 3.4-3.8).

Data flow of one training step (the HEAD recipe of wuer5/OMGSR ``train/train_omgsr_s.py``)::

  LQ --LoRA VAE encoder--> z_L (sampled, x scaling) --LoRA UNet eps at t*--> z_P (Eq. 7)
     --frozen decoder--> x_P in [-1, 1]
  G loss (Eq. 13) = 5 LRR(z_L, E(HQ)) + 0.5 GAN_g(D(x_P)) + 5 Dv3CD(x_P, HQ) + 0.5 L1(x_P, HQ)
  D loss (Eq. 15) = 0.5 (BCE(D(stopgrad x_P), 0) + BCE(D(HQ), 0.8))

Only the LoRA A/B of the UNet and of the VAE encoder (group ``'generator'``) and the discriminator
heads (group ``'heads'``) are trained; every frozen weight is an input of the step and never
differentiated. The reference lets the G loss leak a gradient into the D heads (its D optimizer is
not zeroed after the G backward); we drop that term on purpose: the D update sees only the D loss.

The generator (encode, step, decode) is :func:`sr_jax.inference.one_step.generate` on the stage
of :func:`latent_stage`, in training (LoRA trees beside the frozen weights) and in inference
(LoRA merged).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from sr_jax.diffusion import latents, schedules
from sr_jax.inference import one_step
from sr_jax.losses import basic, dists, gan
from sr_jax.methods import base, common
from sr_jax.models import discriminator, lora
from sr_jax.models.dinov3 import DINOv3ConvNextModel
from sr_jax.models.unet import UNet2DConditionModel
from sr_jax.models.vae import AutoencoderKL

NAME = 'omgsr'
GROUPS = ('generator', 'heads')


@dataclasses.dataclass(frozen=True)
class OmgsrModels:
  """The static half of OMGSR: modules, LoRA configs and constants (no arrays)."""
  unet: UNet2DConditionModel
  vae: AutoencoderKL                    # both halves: LoRA'd encoder, frozen decoder
  dino: DINOv3ConvNextModel
  heads: discriminator.DiscriminatorHeads
  unet_lora: lora.LoRAConfig
  vae_lora: lora.LoRAConfig
  stage: base.LatentStage               # the generator (encode, UNet step at t*, decode)
  t_star: int
  alpha_bar: float                      # alpha-bar at t*
  loss_weights: tuple[tuple[str, float], ...]

  def weight(self, name: str) -> float:
    return dict(self.loss_weights)[name]


class TrainState(flax.struct.PyTreeNode):
  """Everything a step changes. ``params`` = {'generator': {'unet', 'vae_encoder'} LoRA trees,
  'heads': discriminator head params}; ``opt_state`` one optax state per group."""
  step: jax.Array
  params: Any
  spectral: Any                         # spectral-norm power-iteration vectors of the heads
  opt_state: Any
  rng: jax.Array

  @property
  def generator(self) -> Any:
    return self.params['generator']

  @property
  def heads(self) -> Any:
    return self.params['heads']


def latent_stage(unet: Any, vae: Any, codec: latents.LatentCodec, t_star: int, alpha_bar: float,
                 eval_config: Mapping[str, Any], unet_lora: lora.LoRAConfig | None = None,
                 vae_lora: lora.LoRAConfig | None = None) -> base.LatentStage:
  """OMGSR's one stage: the UNet's eps at t* -> z_P (Eq. 7), at ``eval_config``'s upscale."""
  step = common.UNetEpsilonStep(unet, t_star, alpha_bar, unet_lora)
  return base.LatentStage(vae=vae, codec=codec, step=step, upscale=int(eval_config['upscale']),
                          process_size=int(eval_config['process_size']), vae_lora=vae_lora,
                          name=f'omgsr t*={t_star}')


def generator_params(frozen: Mapping[str, Any], generator: Mapping[str, Any]) -> dict:
  """The frozen weights with the LoRA trees beside them, as the stage reads them."""
  return {**frozen, 'unet_lora': generator['unet'], 'vae_lora': generator['vae_encoder']}


def super_resolve(models: OmgsrModels, frozen: Mapping[str, Any], generator: Any, lq: jax.Array,
                  rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The one-step generator: LQ in [-1, 1] (already upscaled to the output size) -> (x_P, z_L)."""
  out = one_step.generate(models.stage, generator_params(frozen, generator), lq, rng)
  return out['sr'], out['z_lq']


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
  z_hq = jax.lax.stop_gradient(one_step.encode_latent(models.stage, frozen, hq, rng_hq))
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
  loss, metrics = common.weighted_loss(terms, dict(models.loss_weights))
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
  metrics = gan.discriminator_metrics(loss, loss_fake, loss_real, fake_logits, real_logits)
  return loss, (metrics, spectral)


# ---------------------------------------------------------------------------------- train step


def micro_step_gradients(models: OmgsrModels, state: TrainState, frozen: Mapping[str, Any],
                         micro_batch: Mapping[str, jax.Array], rng: jax.Array, spectral: Any):
  """G gradients (Eq. 13), then D gradients (Eq. 15) on the stopped-gradient x_P of one micro-batch.
  Both use the parameters from the start of the step, as the reference's accumulation window does."""
  g_rng, d_rng = jax.random.split(rng)
  g_grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
  (_, (g_metrics, spectral, sr)), g_grads = g_grad_fn(
      state.generator, models, frozen, state.heads, spectral, micro_batch, g_rng)
  d_grad_fn = jax.value_and_grad(discriminator_loss, has_aux=True)
  (_, (d_metrics, spectral)), d_grads = d_grad_fn(
      state.heads, models, frozen, spectral, sr, micro_batch['hq'], d_rng)
  return {'generator': g_grads, 'heads': d_grads}, spectral, {**g_metrics, **d_metrics}


def train_step(models: OmgsrModels, transforms: Mapping[str, optax.GradientTransformation],
               grad_accum_steps: int, state: TrainState, frozen: Mapping[str, Any],
               batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
  """One OMGSR optimizer step over ``grad_accum_steps`` micro-batches of ``batch``: mean G and D
  gradients, then one AdamW update of each group."""
  rng, step_rng = jax.random.split(state.rng)
  grads_fn = lambda micro, micro_rng, spectral: micro_step_gradients(
      models, state, frozen, micro, micro_rng, spectral)
  grads, spectral, metrics = common.accumulate_gradients(
      grads_fn, state.params, batch, grad_accum_steps, step_rng, state.spectral)
  params, opt_state, norms = common.optimizer_step(transforms, grads, state.opt_state, state.params)
  metrics.update(g_grad_norm=norms['generator'], d_grad_norm=norms['heads'])
  return state.replace(step=state.step + 1, params=params, spectral=spectral, opt_state=opt_state,
                       rng=rng), metrics


def init_state(models: OmgsrModels, transforms: Mapping[str, optax.GradientTransformation],
               frozen_shapes: Mapping[str, Any], rng: jax.Array) -> TrainState:
  """Fresh LoRA trees (B = 0: the generator starts as the pre-trained model), fresh D heads."""
  rng_unet, rng_vae, rng_heads, rng_state = jax.random.split(rng, 4)
  generator = {
      'unet': lora.init_lora_params(rng_unet, frozen_shapes['unet'], models.unet_lora),
      'vae_encoder': lora.init_lora_params(rng_vae, frozen_shapes['vae'], models.vae_lora),
  }
  head_vars = models.heads.init(rng_heads, models.heads.dummy_inputs())
  params = {'generator': generator, 'heads': head_vars['params']}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, spectral=head_vars['spectral'],
                    opt_state=common.init_optimizers(transforms, params), rng=rng_state)


optimizers = common.generator_and_heads_optimizers  # AdamW + clipping for G and D


def step_functions(models: OmgsrModels, optim: Mapping[str, Any]):
  """(init_state(frozen_shapes, rng), train_step(state, frozen, batch)) closed over the statics."""
  transforms = optimizers(optim)
  return (functools.partial(init_state, models, transforms),
          functools.partial(train_step, models, transforms, int(optim['grad_accum_steps'])))


# ------------------------------------------------------------------------------------ building


def model_configs(config) -> dict:
  """The reference configs (unet, vae, dinov3, scheduler) without loading any weight."""
  return common.sd_model_configs(config.model, 'dinov3')


def load_frozen(config, kinds=('unet', 'vae', 'dinov3')) -> dict:
  """Frozen params {unet, vae, dino, prompt_embeds}: converted folders, or tiny random models
  (seeded by ``config.seed``)."""
  m = config.model
  frozen_dtype = jnp.dtype(m.frozen_param_dtype)
  paths = {'unet': m.sd_path, 'vae': m.sd_path, 'dinov3': m.dinov3_path}
  frozen = {('dino' if kind == 'dinov3' else kind): common.load_frozen(
      m, kind, paths[kind], seed=config.seed, param_dtype=frozen_dtype)[1] for kind in kinds}
  frozen['prompt_embeds'] = common.prompt_embedding(config)
  return frozen


def build_models(config, cfgs: Mapping[str, Any]) -> OmgsrModels:
  """The static half (modules, LoRA configs, t*, alpha-bar, loss weights) from the config."""
  m = config.model
  compute = jnp.dtype(m.compute_dtype)
  t_star = int(m.t_star)
  alpha_bar = float(schedules.ddpm_alphas_cumprod(cfgs['scheduler'])[t_star])
  targets = tuple(m.lora_targets)
  kw = dict(dtype=compute, remat=bool(m.remat))  # remat: per block (see layers.maybe_remat)
  unet = UNet2DConditionModel.from_config(cfgs['unet'], **kw)
  vae = AutoencoderKL.from_config(cfgs['vae'], **kw)
  unet_lora = lora.LoRAConfig(m.unet_lora_rank, m.unet_lora_alpha, targets, init=m.lora_init)
  vae_lora = lora.LoRAConfig(m.vae_lora_rank, m.vae_lora_alpha, targets, init=m.lora_init,
                             prefix='encoder')
  return OmgsrModels(
      unet=unet, vae=vae,
      dino=DINOv3ConvNextModel.from_config(cfgs['dinov3'], **kw),
      heads=discriminator.DiscriminatorHeads(
          channels=tuple(cfgs['dinov3']['hidden_sizes'][:discriminator.NUM_LEVELS]),
          resolution=m.disc_resolution, dtype=compute),
      unet_lora=unet_lora, vae_lora=vae_lora,
      stage=latent_stage(unet, vae, latents.LatentCodec.from_vae_config(cfgs['vae']), t_star,
                         alpha_bar, config.eval, unet_lora, vae_lora),
      t_star=t_star, alpha_bar=alpha_bar, loss_weights=tuple(sorted(dict(config.loss).items())))


def build(config) -> tuple[OmgsrModels, dict, dict]:
  """Config -> (static models, frozen params, model configs). Frozen params are default-device
  arrays; the trainer places (and optionally FSDP-shards) them."""
  cfgs = model_configs(config)
  return build_models(config, cfgs), load_frozen(config), cfgs


# ------------------------------------------------------------------------- trainer integration


def sample_images(models: OmgsrModels, state: TrainState, frozen: Mapping[str, Any],
                  batch: Mapping[str, jax.Array]) -> dict:
  """LQ | SR | HQ for the trainer's image grid (a fixed key: grids differ only by training)."""
  sr, _ = super_resolve(models, frozen, state.generator, batch['lq'], jax.random.key(0))
  return {'lq': batch['lq'], 'sr': sr, 'hq': batch['hq']}


def merged_inference_params(models: OmgsrModels, generator: Any, frozen: Mapping[str, Any]) -> dict:
  """{unet, vae, prompt_embeds} with the LoRA folded in: the inference weights (the reference's
  ``merge_and_unload``)."""
  return {'unet': lora.merge(frozen['unet'], generator['unet'], models.unet_lora),
          'vae': lora.merge(frozen['vae'], generator['vae_encoder'], models.vae_lora),
          'prompt_embeds': frozen['prompt_embeds']}


def export(models: OmgsrModels, cfgs: Mapping[str, Any], config: Any, state: TrainState,
           frozen: Mapping[str, Any], directory: str) -> None:
  """Writes ``directory``/{unet_lora_adapter, vae_encoder_lora_adapter} (PEFT layout, loadable by
  diffusers + peft) and ``directory/inference``: a converted SD pipeline root with the LoRA merged
  (unet/, vae/, scheduler_config.json, prompt_embeds.*) plus ``generator.json`` (method, t*,
  prompt, the training config)."""
  from sr_jax import sharding  # pylint: disable=g-import-not-at-top
  host = sharding.gather_to_host((state.generator, frozen))
  if jax.process_index() != 0:
    return
  generator, frozen = host
  # The VAE adapter in the reference layout: keyed for vae.encoder, which OMGSR wraps in PEFT.
  common.save_adapters(directory, {
      'unet_lora_adapter': (generator['unet'], models.unet_lora),
      'vae_encoder_lora_adapter': (generator['vae_encoder'], models.vae_lora)},
                       module_prefixes={'vae_encoder_lora_adapter': 'encoder'})
  bundle = os.path.join(directory, 'inference')
  prompt = config.model.prompt
  common.write_sd_bundle(bundle, cfgs, merged_inference_params(models, generator, frozen), prompt,
                         source='omgsr export')
  common.write_bundle(bundle, NAME, config, {'t_star': models.t_star, 'prompt': prompt,
                                             'alpha_bar': models.alpha_bar,
                                             'step': int(state.step)})


def make_method(config) -> base.Method:
  """The OMGSR ``Method`` for ``config`` (see ``configs/omgsr.py``)."""
  models, frozen, cfgs = build(config)
  init_fn, step_fn = step_functions(models, config.optim)
  frozen_shapes = jax.eval_shape(lambda: frozen)
  return base.Method(
      init_state=functools.partial(init_fn, frozen_shapes),
      train_step=step_fn,
      frozen=frozen,
      sample=functools.partial(sample_images, models),
      export=functools.partial(export, models, cfgs, config),
      # XLA's cost analysis counts the accumulation scan body once, so give the count explicitly.
      flops_per_sample=config.get('flops_per_sample'))


# ----------------------------------------------------------------------------------- inference


def _bundle_generator(config, path: str) -> base.Generator:
  record = common.read_bundle(path, NAME)
  unet, vae, codec, params = common.read_sd_bundle(path, record['prompt'],
                                                   jnp.dtype(config.model.compute_dtype))
  stage = latent_stage(unet, vae, codec, int(record['t_star']), float(record['alpha_bar']),
                       config.eval)
  return base.Generator(NAME, (stage,), params, {'method': NAME, 'checkpoint': path,
                                                 'kind': 'bundle', 'step': record.get('step'),
                                                 't_star': stage.step.timestep})


def _workdir_generator(config, workdir: str, step: int | None) -> base.Generator:
  cfgs = model_configs(config)
  models = build_models(config, cfgs)
  frozen = load_frozen(config, kinds=('unet', 'vae'))
  init_fn, _ = step_functions(models, config.optim)
  state, step = common.restore_train_state(
      config, workdir, functools.partial(init_fn, jax.eval_shape(lambda: frozen)), step)
  params = merged_inference_params(models, state.generator, jax.device_get(frozen))
  dtype = jnp.dtype(config.model.compute_dtype)
  unet = UNet2DConditionModel.from_config(cfgs['unet'], dtype=dtype)
  vae = AutoencoderKL.from_config(cfgs['vae'], dtype=dtype)
  stage = latent_stage(unet, vae, models.stage.codec, models.t_star, models.alpha_bar, config.eval)
  return base.Generator(NAME, (stage,), params, {'method': NAME, 'checkpoint': workdir,
                                                 'kind': 'workdir', 'step': int(step),
                                                 't_star': models.t_star})


def load_generator(config, checkpoint: str, step: int | None = None) -> base.Generator:
  """The OMGSR generator of an exported bundle or of a training workdir's latest checkpoint (or
  ``step``), LoRA merged into the frozen weights that ``config`` names. ``config.eval`` gives
  the upscale and process size."""
  if common.checkpoint_kind(checkpoint) == 'bundle':
    return _bundle_generator(config, checkpoint)
  return _workdir_generator(config, checkpoint, step)
