"""TUDSR: twice upsampling-diffusion, two LoRAs on one SD backbone (TUDSR Sec. 3.4-3.8, Alg. 1-2).

Stage 1 (``model.stage = 1``) is a one-step GAN at R (Alg. 1)::

  x_L (R) --frozen VAE encoder--> z_L --UNet + LoRA theta1, eps at t1--> z_H (Eq. 2) --decoder--> x_H^
  L_G (Eq. 8) = 5 ea-DISTS(x_H^, x_H) + 0.5 L_gen(D(x_H^)) + 0.5 L1(x_H^, x_H)
  L_D (Eq. 9) = 0.5 (L_real(D(x_H)) + L_fake(D(stopgrad x_H^)))

Stage 2 (``model.stage = 2``, ``init_from`` = the stage-1 workdir) trains a second LoRA theta2 and
new heads phi2 at N R with theta1 frozen (Alg. 2): ``m = G_theta1(x_L)``, ``y_L = bilinear x N of
m`` (Eq. 10), ``y_L`` and the N R HQ image cut into N^2 R x R chunks in raster order (Eq. 11), and
for each chunk one G update of theta2 (at t2) then one D update of phi2. One ``train_step`` call
therefore makes N^2 updates of each network (``Method.updates_per_step``: steps count updates).

The D is a frozen DINOv3-ViT-B with trainable heads on hidden states 3, 6, 9
(``sr_jax.models.vit_discriminator``); the GAN losses average the levels (Eq. 6-7,
``losses.gan.level_mean_bce``); ea-DISTS is ``losses.dists.ea_dists_loss`` (Eq. 5). Only the LoRA
of the stage (group ``'generator'``) and the heads (group ``'heads'``) are trained; the UNet, VAE,
ViT, VGG16 and theta1 are inputs of the step, never differentiated. As in ``omgsr.py``, the G loss
does not move D, and G and D gradients of one update both use the parameters from its start.

Inference (Fig. 2b) is the shared pipeline on two ``LatentStage``s over one UNet: x M, theta1 at
t1; bilinear x N, theta2 at t2, tiled at R. Presets: x4 = M2N2, x8 = M4N2 (``eval.upscale``).
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
import ml_collections
import optax

from sr_jax.diffusion import latents, schedules
from sr_jax.inference import one_step
from sr_jax.losses import basic, dists, gan
from sr_jax.methods import base, common
from sr_jax.models import lora, vit_discriminator
from sr_jax.models.unet import UNet2DConditionModel
from sr_jax.models.vae import AutoencoderKL

NAME = 'tudsr'
DINO_KIND = 'dinov3_vit'
STAGE1_LORA = 'unet_lora_stage1'   # params key of theta1 (frozen in stage 2, and in inference)
STAGE2_LORA = 'unet_lora_stage2'   # params key of theta2 in inference bundles
ADAPTER_DIRS = {1: 'unet_lora_stage1_adapter', 2: 'unet_lora_stage2_adapter'}


@dataclasses.dataclass(frozen=True)
class TudsrModels:
  """The static half of one TUDSR stage: modules, LoRA config and constants (no arrays)."""
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  dino: Any                                  # DINOv3ViTModel
  heads: vit_discriminator.ViTDiscriminatorHeads
  unet_lora: lora.LoRAConfig
  stage: int                                 # 1 or 2: which LoRA this run trains
  generator_stage: base.LatentStage          # G being trained (t1 in stage 1, t2 in stage 2)
  stage1: base.LatentStage | None            # stage 2 only: the frozen G_theta1 (t1)
  resolution: int                            # R: the chunk / crop side in pixels
  n: int                                     # N: the stage-2 scale
  lq_resize: str                             # stage 2: how the N R LQ crop is brought to R
  loss_weights: tuple[tuple[str, float], ...]

  def weight(self, name: str) -> float:
    return dict(self.loss_weights)[name]

  @property
  def updates_per_step(self) -> int:
    return self.n ** 2 if self.stage == 2 else 1


class TrainState(flax.struct.PyTreeNode):
  """``params`` = {'generator': {'unet': LoRA tree of this stage}, 'heads': head params}; one optax
  state per group; ``step`` counts optimizer updates."""
  step: jax.Array
  params: Any
  spectral: Any
  opt_state: Any
  rng: jax.Array


# ------------------------------------------------------------------------------ chunking (Eq. 11)


def chunk_image(images: jax.Array, size: int) -> jax.Array:
  """TUDSR Eq. 11: (B, a size, b size, C) -> (a b, B, size, size, C), non-overlapping chunks in
  raster order (left to right, then top to bottom)."""
  batch, height, width, channels = images.shape
  if height % size or width % size:
    raise ValueError(f'images of {height}x{width} do not cut into {size}x{size} chunks')
  rows, cols = height // size, width // size
  x = images.reshape(batch, rows, size, cols, size, channels)
  return x.transpose(1, 3, 0, 2, 4, 5).reshape(rows * cols, batch, size, size, channels)


def assemble_chunks(chunks: jax.Array, rows: int, cols: int) -> jax.Array:
  """The inverse of :func:`chunk_image`: (rows cols, B, s, s, C) -> (B, rows s, cols s, C)."""
  count, batch, size, _, channels = chunks.shape
  if count != rows * cols:
    raise ValueError(f'{count} chunks do not make a {rows}x{cols} grid')
  x = chunks.reshape(rows, cols, batch, size, size, channels).transpose(2, 0, 3, 1, 4, 5)
  return x.reshape(batch, rows * size, cols * size, channels)


def upsample_intermediate(images: jax.Array, n: int) -> jax.Array:
  """TUDSR Eq. 10: bilinear x ``n`` (half-pixel centres, ``F.interpolate(mode='bilinear')``)."""
  batch, height, width, channels = images.shape
  return jax.image.resize(images, (batch, height * n, width * n, channels), 'linear')


def stage2_generator_inputs(models: TudsrModels, frozen: Mapping[str, Any], lq: jax.Array,
                            rng: jax.Array) -> jax.Array:
  """Alg. 2 lines 1-2 on N R LQ crops: ``y_L = Upsampling(G_theta1(x_L), N)`` with x_L the LQ at R
  (``lq_resize``, antialiased) and theta1 frozen. Returns (B, N R, N R, 3), a constant."""
  r = models.resolution
  x_lq = jax.image.resize(lq, (lq.shape[0], r, r, lq.shape[-1]), models.lq_resize, antialias=True)
  params = {**frozen, 'unet_lora': frozen[STAGE1_LORA]}
  m = one_step.generate(models.stage1, params, x_lq, rng)['sr']
  return jax.lax.stop_gradient(upsample_intermediate(m, models.n))


# ------------------------------------------------------------------------------------- losses


def _to_unit(images: jax.Array) -> jax.Array:
  return images * 0.5 + 0.5


def _disc_call(models, frozen, heads_params, spectral, images, rng):
  return vit_discriminator.vit_discriminator_logits(
      models.dino, frozen['dino'], models.heads, {'params': heads_params, 'spectral': spectral},
      images, rng, train=True)


def generator_loss(generator: Any, models: TudsrModels, frozen: Mapping[str, Any],
                   heads_params: Any, spectral: Any, batch: Mapping[str, jax.Array], rng: jax.Array):
  """TUDSR Eq. 8: ``5 ea-DISTS + 0.5 L_gen + 0.5 L1`` on G's output for ``batch['lq']`` (the
  stage's G input at R). Differentiated w.r.t. ``generator`` only. -> (loss, (metrics, spectral, sr))."""
  rng_g, rng_aug = jax.random.split(rng)
  params = {**frozen, 'unet_lora': generator['unet']}
  sr = one_step.generate(models.generator_stage, params, batch['lq'], rng_g)['sr']
  hq = batch['hq']
  terms = {'ea_dists': dists.ea_dists_loss(frozen['perceptual'], _to_unit(sr), _to_unit(hq)),
           'l1': basic.l1_loss(sr, hq)}
  fake_logits, spectral = _disc_call(models, frozen, jax.lax.stop_gradient(heads_params), spectral,
                                     sr, rng_aug)
  terms['gan'] = gan.level_mean_bce(fake_logits, gan.REAL_LABEL)  # Eq. 6, label_gen = 0.8
  loss, metrics = common.weighted_loss(terms, dict(models.loss_weights))
  return loss, (metrics, spectral, sr)


def discriminator_loss(heads_params: Any, models: TudsrModels, frozen: Mapping[str, Any],
                       spectral: Any, fake: jax.Array, real: jax.Array, rng: jax.Array):
  """TUDSR Eq. 7 and 9: ``0.5 (L_real + L_fake)``, labels real 0.8 / fake 0, levels averaged."""
  rng_fake, rng_real = jax.random.split(rng)
  fake_logits, spectral = _disc_call(models, frozen, heads_params, spectral,
                                     jax.lax.stop_gradient(fake), rng_fake)
  real_logits, spectral = _disc_call(models, frozen, heads_params, spectral, real, rng_real)
  loss_fake = gan.level_mean_bce(fake_logits, gan.FAKE_LABEL)
  loss_real = gan.level_mean_bce(real_logits, gan.REAL_LABEL)
  loss = models.weight('disc') * (loss_real + loss_fake)
  metrics = gan.discriminator_metrics(loss, loss_fake, loss_real, fake_logits, real_logits)
  return loss, (metrics, spectral)


# -------------------------------------------------------------------------------- GAN updates


def update_gradients(models: TudsrModels, params: Any, frozen: Mapping[str, Any],
                     micro_batch: Mapping[str, jax.Array], rng: jax.Array, spectral: Any):
  """G gradients (Eq. 8), then D gradients (Eq. 9) on the detached output, both at ``params``."""
  g_rng, d_rng = jax.random.split(rng)
  (_, (g_metrics, spectral, sr)), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(
      params['generator'], models, frozen, params['heads'], spectral, micro_batch, g_rng)
  (_, (d_metrics, spectral)), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
      params['heads'], models, frozen, spectral, sr, micro_batch['hq'], d_rng)
  return {'generator': g_grads, 'heads': d_grads}, spectral, {**g_metrics, **d_metrics}


def gan_update(models: TudsrModels, transforms: Mapping[str, optax.GradientTransformation],
               grad_accum_steps: int, params: Any, opt_state: Any, spectral: Any,
               frozen: Mapping[str, Any], batch: Mapping[str, jax.Array], rng: jax.Array):
  """One G update then one D update (Alg. 1; one chunk of Alg. 2) on ``batch`` {'lq' (G input at
  R), 'hq'}, gradients averaged over ``grad_accum_steps`` micro-batches.
  -> (params, opt_state, spectral, metrics)."""
  grads_fn = lambda micro, micro_rng, carry: update_gradients(models, params, frozen, micro,
                                                              micro_rng, carry)
  grads, spectral, metrics = common.accumulate_gradients(grads_fn, params, batch, grad_accum_steps,
                                                         rng, spectral)
  params, opt_state, norms = common.optimizer_step(transforms, grads, opt_state, params)
  return params, opt_state, spectral, {**metrics, 'g_grad_norm': norms['generator'],
                                       'd_grad_norm': norms['heads']}


def train_step(models: TudsrModels, transforms: Mapping[str, optax.GradientTransformation],
               grad_accum_steps: int, state: TrainState, frozen: Mapping[str, Any],
               batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]:
  """Stage 1: one :func:`gan_update` on the R crops. Stage 2: Alg. 2, a ``lax.scan`` of N^2
  :func:`gan_update`s over the chunks of ``y_L`` and of the N R HQ crops (metrics: chunk means)."""
  rng, step_rng = jax.random.split(state.rng)
  carry = (state.params, state.opt_state, state.spectral)
  if models.stage == 1:
    params, opt_state, spectral, metrics = gan_update(models, transforms, grad_accum_steps, *carry,
                                                      frozen, batch, step_rng)
  else:
    inputs_rng, chunks_rng = jax.random.split(step_rng)
    micro = common.split_micro_batches({'lq': batch['lq']}, grad_accum_steps)['lq']
    keys = jax.random.split(inputs_rng, grad_accum_steps)
    # G_theta1 one micro-batch at a time (the memory of one), back in the batch's order.
    y_lq = jax.lax.map(lambda xs: stage2_generator_inputs(models, frozen, *xs), (micro, keys))
    y_lq = y_lq.swapaxes(0, 1).reshape(batch['lq'].shape[:1] + y_lq.shape[2:])
    chunks = {'lq': chunk_image(y_lq, models.resolution),
              'hq': chunk_image(batch['hq'], models.resolution)}

    def chunk_update(carry, xs):
      chunk, key = xs
      *carry, metrics = gan_update(models, transforms, grad_accum_steps, *carry, frozen, chunk, key)
      return tuple(carry), metrics

    (params, opt_state, spectral), metrics = jax.lax.scan(
        chunk_update, carry, (chunks, jax.random.split(chunks_rng, models.n ** 2)))
    metrics = jax.tree.map(jnp.mean, metrics)
  return state.replace(step=state.step + models.updates_per_step, params=params, spectral=spectral,
                       opt_state=opt_state, rng=rng), metrics


def init_state(models: TudsrModels, transforms: Mapping[str, optax.GradientTransformation],
               frozen_shapes: Mapping[str, Any], rng: jax.Array) -> TrainState:
  """A fresh LoRA (B = 0: G starts as the pre-trained model) and fresh heads; in stage 2 these are
  theta2 and phi2 (the paper does not say how phi2 starts: new heads, as its text reads)."""
  rng_lora, rng_heads, rng_state = jax.random.split(rng, 3)
  head_vars = models.heads.init(rng_heads, models.heads.dummy_inputs())
  params = {'generator': {'unet': lora.init_lora_params(rng_lora, frozen_shapes['unet'],
                                                        models.unet_lora)},
            'heads': head_vars['params']}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, spectral=head_vars['spectral'],
                    opt_state=common.init_optimizers(transforms, params), rng=rng_state)


optimizers = common.generator_and_heads_optimizers  # AdamW + clipping for the LoRA and heads


def step_functions(models: TudsrModels, optim: Mapping[str, Any]):
  """(init_state(frozen_shapes, rng), train_step(state, frozen, batch)) closed over the statics."""
  transforms = optimizers(optim)
  return (functools.partial(init_state, models, transforms),
          functools.partial(train_step, models, transforms, int(optim['grad_accum_steps'])))


# ------------------------------------------------------------------------------------ building


def model_configs(config) -> dict:
  """The reference configs (unet, vae, dinov3_vit, scheduler) without loading any weight."""
  return common.sd_model_configs(config.model, DINO_KIND)


def unet_lora_config(m: Mapping[str, Any]) -> lora.LoRAConfig:
  return lora.LoRAConfig(m['unet_lora_rank'], m['unet_lora_alpha'], tuple(m['lora_targets']),
                         init=m['lora_init'])


def one_step_stage(unet: Any, vae: Any, codec: latents.LatentCodec, timestep: int,
                   alpha_bar: float, upscale: int, process_size: int, lora_config=None,
                   lora_key: str = 'unet_lora', unet_key: str = 'unet', resize: str = 'bicubic',
                   name: str = 'tudsr') -> base.LatentStage:
  """One TUDSR generator G(x, t, c) (Eq. 2) as a pipeline stage; small inputs keep their size."""
  step = common.UNetEpsilonStep(unet, timestep, alpha_bar, lora_config, unet_key=unet_key,
                                lora_key=lora_key)
  return base.LatentStage(vae=vae, codec=codec, step=step, upscale=upscale,
                          process_size=process_size, resize=resize, name=name,
                          enlarge_small_inputs=False)


def _alpha_bar(cfgs: Mapping[str, Any], timestep: int) -> float:
  return float(schedules.ddpm_alphas_cumprod(cfgs['scheduler'])[timestep])


def build_models(config, cfgs: Mapping[str, Any],
                 stage1_model: Mapping[str, Any] | None = None) -> TudsrModels:
  """The static half of ``config``'s stage; ``stage1_model`` (stage 2) is the stage-1 run's
  ``config.model`` (its t1 and LoRA shape)."""
  m = config.model
  stage = int(m.stage)
  if stage not in (1, 2):
    raise ValueError(f'config.model.stage must be 1 or 2, got {m.stage!r}')
  compute = jnp.dtype(m.compute_dtype)
  kw = dict(dtype=compute, remat=bool(m.remat))
  from sr_jax import pretrained  # pylint: disable=g-import-not-at-top
  unet = UNet2DConditionModel.from_config(cfgs['unet'], **kw)
  vae = AutoencoderKL.from_config(cfgs['vae'], **kw)
  dino = pretrained.build_model(DINO_KIND, cfgs[DINO_KIND], **kw)
  codec = latents.LatentCodec.from_vae_config(cfgs['vae'])
  r = int(m.resolution)
  timestep = int(m.t1 if stage == 1 else m.t2)
  generator_stage = one_step_stage(unet, vae, codec, timestep, _alpha_bar(cfgs, timestep), 1, r,
                                   unet_lora_config(m), name=f'tudsr stage {stage} t={timestep}')
  stage1 = None
  if stage == 2:
    s1 = stage1_model if stage1_model is not None else m
    stage1 = one_step_stage(unet, vae, codec, int(s1['t1']), _alpha_bar(cfgs, int(s1['t1'])), 1, r,
                            unet_lora_config(s1), name='tudsr stage 1 (frozen)')
  heads = vit_discriminator.ViTDiscriminatorHeads(
      channels=int(cfgs[DINO_KIND]['hidden_size']), levels=tuple(m.disc_levels),
      resolution=r, patch_size=int(cfgs[DINO_KIND]['patch_size']), dtype=compute)
  return TudsrModels(unet=unet, vae=vae, dino=dino, heads=heads, unet_lora=unet_lora_config(m),
                     stage=stage, generator_stage=generator_stage, stage1=stage1, resolution=r,
                     n=int(m.n), lq_resize=str(m.stage2_lq_resize),
                     loss_weights=tuple(sorted(dict(config.loss).items())))


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run in ``workdir`` was started with (``<workdir>/config.json``)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{workdir} is not a training workdir (no config.json)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def check_stage1_run(config, stage1_config) -> None:
  """Stage 2 must start from a TUDSR stage-1 run on the same backbone."""
  where = f'config.init_from={config.init_from}'
  if stage1_config.get('method') != NAME or int(stage1_config.model.stage) != 1:
    raise ValueError(f'{where}: not a TUDSR stage-1 workdir (method '
                     f'{stage1_config.get("method")!r}, stage {stage1_config.model.get("stage")!r})')
  plain = lambda v: json.dumps(v.to_dict() if hasattr(v, 'to_dict') else v, sort_keys=True)
  keys = ('source', 'unet_config', 'resolution') + (('sd_path',) if config.model.source ==
                                                    'converted' else ())
  for key in keys:
    mine, theirs = config.model.get(key), stage1_config.model.get(key)
    if plain(mine) != plain(theirs):
      raise ValueError(f'{where}: config.model.{key} is {plain(mine)} here but {plain(theirs)} in '
                       f'the stage-1 run: both LoRAs must sit on the same backbone')


def load_stage1_lora(config, frozen_unet_shapes: Any) -> tuple[Any, ml_collections.ConfigDict, int]:
  """theta1: the stage-1 LoRA of ``config.init_from``'s latest checkpoint (or
  ``config.init_from_step``). Returns (LoRA tree, the stage-1 config, its step)."""
  if not config.get('init_from'):
    raise ValueError('TUDSR stage 2 needs the stage-1 run: pass --config.init_from=STAGE1_WORKDIR')
  stage1_config = run_config(config.init_from)
  check_stage1_run(config, stage1_config)
  models1 = build_models(stage1_config, model_configs(stage1_config))
  init_fn, _ = step_functions(models1, stage1_config.optim)
  state, step = common.restore_train_state(
      stage1_config, config.init_from,
      functools.partial(init_fn, {'unet': frozen_unet_shapes}), config.get('init_from_step'))
  return state.params['generator']['unet'], stage1_config, step


def load_frozen(config, kinds=('unet', 'vae', DINO_KIND, 'perceptual')) -> dict:
  """Frozen params {unet, vae, dino, perceptual, prompt_embeds}: converted folders, or tiny random
  models (seeded by ``config.seed``)."""
  m = config.model
  frozen_dtype = jnp.dtype(m.frozen_param_dtype)
  paths = {'unet': m.sd_path, 'vae': m.sd_path, DINO_KIND: m.dinov3_path}
  names = {DINO_KIND: 'dino'}
  frozen = {}
  for kind in kinds:
    if kind == 'perceptual':
      frozen['perceptual'] = common.load_perceptual(m, m.perceptual_path, seed=config.seed)
    else:
      frozen[names.get(kind, kind)] = common.load_frozen(m, kind, paths[kind], seed=config.seed,
                                                         param_dtype=frozen_dtype)[1]
  frozen['prompt_embeds'] = common.prompt_embedding(config)
  return frozen


def check_data(config) -> None:
  """The data pipeline's crops are R (stage 1) or N R (stage 2): named keys when they are not."""
  m, crop = config.model, int(config.data.crop_size)
  want = int(m.resolution) * (int(m.n) if int(m.stage) == 2 else 1)
  if crop != want:
    raise ValueError(f'config.data.crop_size={crop}, but TUDSR stage {m.stage} trains on '
                     f'{want} px crops (config.model.resolution={m.resolution}'
                     + (f' x config.model.n={m.n}' if int(m.stage) == 2 else '') + ')')


def build(config) -> tuple[TudsrModels, dict, dict]:
  """Config -> (static models, frozen params (+ theta1 in stage 2), model configs)."""
  check_data(config)
  cfgs = model_configs(config)
  frozen = load_frozen(config)
  stage1_model = None
  if int(config.model.stage) == 2:
    unet_shapes = jax.eval_shape(lambda: frozen['unet'])
    frozen[STAGE1_LORA], stage1_config, _ = load_stage1_lora(config, unet_shapes)
    stage1_model = stage1_config.model
  return build_models(config, cfgs, stage1_model), frozen, cfgs


# ------------------------------------------------------------------------- trainer integration


def sample_images(models: TudsrModels, state: TrainState, frozen: Mapping[str, Any],
                  batch: Mapping[str, jax.Array]) -> dict:
  """LQ | SR | HQ for the trainer's grid; stage 2 runs G_theta2 on the chunks, reassembled."""
  key = jax.random.key(0)
  params = {**frozen, 'unet_lora': state.params['generator']['unet']}
  if models.stage == 1:
    sr = one_step.generate(models.generator_stage, params, batch['lq'], key)['sr']
  else:
    chunks = chunk_image(stage2_generator_inputs(models, frozen, batch['lq'], key),
                         models.resolution)
    flat = chunks.reshape((-1,) + chunks.shape[2:])
    out = one_step.generate(models.generator_stage, params, flat, key)['sr']
    sr = assemble_chunks(out.reshape(chunks.shape), models.n, models.n)
  return {'lq': batch['lq'], 'sr': sr, 'hq': batch['hq']}


def export(models: TudsrModels, cfgs: Mapping[str, Any], config: Any, state: TrainState,
           frozen: Mapping[str, Any], directory: str) -> None:
  """Writes ``directory``/unet_lora_stage{1,2}_adapter (PEFT, loadable by diffusers + peft; stage
  2 also writes theta1) and ``directory/inference``: the base UNet and VAE, scheduler, prompt
  embedding, the adapters, and ``generator.json`` (stage, t1, t2, N, R, the training config)."""
  from sr_jax import sharding  # pylint: disable=g-import-not-at-top
  host = sharding.gather_to_host((state.params['generator']['unet'], frozen))
  if jax.process_index() != 0:
    return
  theta, frozen = host
  adapters = {models.stage: theta}
  lora_configs = {models.stage: models.unet_lora}
  if models.stage == 2:
    adapters[1], lora_configs[1] = frozen[STAGE1_LORA], models.stage1.step.lora_config
  bundle = os.path.join(directory, 'inference')
  for where in (directory, bundle):
    common.save_adapters(where, {ADAPTER_DIRS[k]: (adapters[k], lora_configs[k]) for k in adapters})
  prompt = config.model.prompt
  common.write_sd_bundle(bundle, cfgs, frozen, prompt, source='tudsr export')
  stage1 = models.stage1 if models.stage == 2 else models.generator_stage
  meta = {'stage': models.stage, 'n': models.n, 'resolution': models.resolution,
          't1': stage1.step.timestep, 'alpha_bar_t1': stage1.step.alpha_bar,
          'prompt': prompt, 'step': int(state.step)}
  if models.stage == 2:
    meta.update(t2=models.generator_stage.step.timestep,
                alpha_bar_t2=models.generator_stage.step.alpha_bar)
  common.write_bundle(bundle, NAME, config, meta)


def make_method(config) -> base.Method:
  """The TUDSR ``Method`` of ``config``'s stage (see ``configs/tudsr.py``)."""
  models, frozen, cfgs = build(config)
  init_fn, step_fn = step_functions(models, config.optim)
  return base.Method(
      init_state=functools.partial(init_fn, jax.eval_shape(lambda: frozen)),
      train_step=step_fn,
      frozen=frozen,
      sample=functools.partial(sample_images, models),
      export=functools.partial(export, models, cfgs, config),
      flops_per_sample=config.get('flops_per_sample'),
      updates_per_step=models.updates_per_step)


# ----------------------------------------------------------------------------------- inference

EVAL_MODES = ('twice', 'stage1', 'stage2')


def inference_stages(unet: Any, vae: Any, codec: latents.LatentCodec, params: dict,
                     lora_configs: Mapping[int, lora.LoRAConfig], consts: Mapping[str, Any],
                     eval_config: Mapping[str, Any]) -> tuple[tuple[base.LatentStage, ...], dict]:
  """The stages of Fig. 2b over one UNet, and the params they read.

  ``eval.mode``: 'twice' (x M with theta1 at t1, then bilinear x N with theta2 at t2; M = upscale /
  N), or one LoRA alone at x upscale ('stage1': the paper's M4 / M8, 'stage2': N4 / N8 ablations).
  ``eval.merge_adapters``: fold each LoRA into its own copy of the UNet (no LoRA matmuls per call,
  one more UNet in memory) instead of applying both adapters to the one backbone.
  """
  upscale, n = int(eval_config['upscale']), int(consts['n'])
  mode = eval_config.get('mode', 'twice')
  has_stage2 = STAGE2_LORA in params
  if mode not in EVAL_MODES:
    raise ValueError(f'config.eval.mode must be one of {EVAL_MODES}, got {mode!r}')
  if mode == 'twice' and not has_stage2:
    mode = 'stage1'  # a stage-1 model: its one LoRA at x upscale
  if mode == 'stage2' and not has_stage2:
    raise ValueError("config.eval.mode='stage2' needs a stage-2 model (this one has theta1 only)")
  if mode == 'twice' and upscale % n:
    raise ValueError(f'--upscale {upscale} is not M x N with N = {n} (x4 = M2N2, x8 = M4N2)')
  process = int(eval_config['process_size'])
  merge = bool(eval_config.get('merge_adapters', False))
  params = dict(params)
  plan = {'twice': ((1, upscale // n), (2, n)), 'stage1': ((1, upscale),),
          'stage2': ((2, upscale),)}[mode]
  stages = []
  for index, (k, scale) in enumerate(plan):
    lora_key = (STAGE1_LORA, STAGE2_LORA)[k - 1]
    timestep, alpha_bar = int(consts[f't{k}']), float(consts[f'alpha_bar_t{k}'])
    unet_key, lora_config = 'unet', lora_configs[k]
    if merge:
      unet_key, lora_config = f'unet_stage{k}', None
      params[unet_key] = lora.merge(params['unet'], params[lora_key], lora_configs[k])
    stages.append(one_step_stage(unet, vae, codec, timestep, alpha_bar, scale, process,
                                 lora_config, lora_key, unet_key,
                                 resize='linear' if index else 'bicubic',
                                 name=f'tudsr theta{k} t={timestep} x{scale}'))
  if merge:
    for key in ('unet', STAGE1_LORA, STAGE2_LORA):
      params.pop(key, None)
  return tuple(stages), params


def _generator(config, unet, vae, codec, params, lora_configs, consts, source) -> base.Generator:
  stages, params = inference_stages(unet, vae, codec, params, lora_configs, consts, config.eval)
  return base.Generator(NAME, stages, params, {**source, 'method': NAME,
                                               'stages': [s.name for s in stages]},
                        exact_output_size=True)


def _bundle_generator(config, path: str) -> base.Generator:
  record = common.read_bundle(path, NAME)
  dtype = jnp.dtype(config.model.compute_dtype)
  unet, vae, codec, params = common.read_sd_bundle(path, record['prompt'], dtype)
  lora_configs = {}
  for k in range(1, int(record['stage']) + 1):
    tree, lora_configs[k] = lora.load_peft_adapter(os.path.join(path, ADAPTER_DIRS[k]),
                                                   params['unet'], dtype=dtype)
    params[(STAGE1_LORA, STAGE2_LORA)[k - 1]] = tree
  return _generator(config, unet, vae, codec, params, lora_configs, record,
                    {'checkpoint': path, 'kind': 'bundle', 'step': record.get('step')})


def _workdir_generator(config, workdir: str, step: int | None) -> base.Generator:
  run = run_config(workdir) if os.path.isfile(os.path.join(workdir, 'config.json')) else config
  run_stage = int(run.model.stage)
  if run_stage == 2 and run.get('init_from'):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.init_from = run.init_from  # the stage-1 run this one was trained from
  cfgs = model_configs(config)
  frozen = load_frozen(config, kinds=('unet', 'vae'))
  unet_shapes = jax.eval_shape(lambda: frozen['unet'])
  params = {'unet': frozen['unet'], 'vae': frozen['vae'], 'prompt_embeds': frozen['prompt_embeds']}
  model = run.model
  if run_stage == 2:
    params[STAGE1_LORA], stage1_config, _ = load_stage1_lora(config, unet_shapes)
    stage1_model = stage1_config.model
  else:
    stage1_model = model
  models = build_models(run, cfgs, stage1_model)
  init_fn, _ = step_functions(models, run.optim)
  state, step = common.restore_train_state(run, workdir, functools.partial(
      init_fn, {'unet': unet_shapes}), step)
  params[(STAGE1_LORA, STAGE2_LORA)[run_stage - 1]] = state.params['generator']['unet']
  lora_configs = {1: unet_lora_config(stage1_model), 2: unet_lora_config(model)}
  consts = {'n': model.n, 't1': stage1_model.t1, 'alpha_bar_t1': _alpha_bar(cfgs, stage1_model.t1),
            't2': model.t2, 'alpha_bar_t2': _alpha_bar(cfgs, model.t2)}
  dtype = jnp.dtype(config.model.compute_dtype)
  unet = UNet2DConditionModel.from_config(cfgs['unet'], dtype=dtype)
  vae = AutoencoderKL.from_config(cfgs['vae'], dtype=dtype)
  return _generator(config, unet, vae, models.generator_stage.codec, jax.device_get(params),
                    lora_configs, consts, {'checkpoint': workdir, 'kind': 'workdir',
                                           'step': int(step), 'stage': run_stage})


def load_generator(config, checkpoint: str, step: int | None = None) -> base.Generator:
  """The TUDSR generator of an exported bundle or of a training workdir (stage 1: theta1 alone;
  stage 2: both LoRAs, theta1 from the run's ``init_from``). ``config.eval`` gives the upscale,
  the mode and the process size (R)."""
  if common.checkpoint_kind(checkpoint) == 'bundle':
    return _bundle_generator(config, checkpoint)
  return _workdir_generator(config, checkpoint, step)
