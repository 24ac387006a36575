r"""TUDSR-S: twice upsampling-diffusion on SD2.1-base with two LoRAs and a DINOv3-ViT-B discriminator.

Full recipe (TUDSR Sec. 4.1; LSDIR + the first 10k FFHQ faces, Real-ESRGAN degradations)::

  python -m convert_weights sd --src stabilityai/stable-diffusion-2-1-base --out weights/sd21b
  python -m convert_weights dinov3 --src facebook/dinov3-vitb16-pretrain-lvd1689m \
      --out weights/dinov3_vitb16
  python -m convert_weights perceptual --out weights/perceptual       # VGG16 + DISTS alpha/beta
  python train.py --config=configs/tudsr.py:stage1 --workdir=runs/tudsr_s1 \
      --config.data.paths=/data/LSDIR,/data/ffhq_first10k.txt
  python train.py --config=configs/tudsr.py:stage2 --workdir=runs/tudsr_s2 \
      --config.init_from=runs/tudsr_s1 --config.data.paths=/data/LSDIR,/data/ffhq_first10k.txt
  python eval.py --config=configs/tudsr.py:stage2 --checkpoint=runs/tudsr_s2/export/inference \
      --upscale=8 --input=LQ --output=out                         # x4 = M2N2, x8 = M4N2

Tiny default (random tiny UNet / VAE / ViT / VGG16, bundled photos; minutes each on a CPU)::

  python train.py --config=configs/tudsr.py:tiny_stage1 --workdir=/tmp/tudsr_s1
  python train.py --config=configs/tudsr.py:tiny_stage2 --workdir=/tmp/tudsr_s2 \
      --config.init_from=/tmp/tudsr_s1
  python eval.py --config=configs/tudsr.py:tiny_stage2 --checkpoint=/tmp/tudsr_s2 \
      --input=/tmp/lq --output=/tmp/tudsr_out --gt=/tmp/hq --upscale=4   # /tmp/lq: README

Variants: ``stage1`` (default), ``stage2``, ``tiny_stage1``, ``tiny_stage2``.

From the paper: SD2.1-base, UNet LoRA r = 32 in both stages, t1 = 200, t2 = 50, R = 512, N = 2,
L_G = 5 ea-DISTS + 0.5 L_gen + 0.5 L1, L_D = 0.5 (L_real + L_fake), soft labels gen 0.8 / real 0.8 /
fake 0 with the levels averaged, D = DINOv3-ViT-B + heads on hidden states 3, 6, 9, AdamW 5e-5,
batch 1 x accumulation 4 (on 4 GPUs: 16 per update), 5,100 + 3,500 steps. Chosen where the paper
is silent (each a key below):
* no VAE-encoder LoRA: the paper names only the UNet LoRA, and one plain VAE then serves both
  stages and the tiled VAE; the prompt is empty (OMGSR HEAD); LoRA alpha = r, the OMGSR targets;
* ea-DISTS = VGG16 DISTS with the official weights on the image and on its Sobel magnitude (the
  author's OMGSR OC-EA-DISTS); the heads follow the author's OMGSR DINOv3-ViT discriminator;
* AdamW betas / weight decay / clipping as OMGSR (0.9, 0.999, 1e-4, 1.0), constant rate;
* stage-2 pairs: the same Real-ESRGAN pipeline (x4 preset) on N R = 1024 crops, so the LQ is a
  256 px degradation upsampled to 1024 by the pipeline; G_theta1's input x_L is that LQ resized
  to R (``model.stage2_lq_resize``, antialiased linear), i.e. the x2 first stage of M2N2;
* stage 2: one chunk update averages the chunk's gradients over the accumulation micro-batches;
  the heads phi2 start fresh; ``max_steps`` and the intervals count updates (N^2 = 4 per batch);
* inference: x M by bicubic (the paper does not say), x N bilinear (Eq. 10), both stages tiled at
  R with the shared latent tiler; the adapters are applied unmerged on one UNet
  (``eval.merge_adapters`` folds each into its own copy instead).
"""
import ml_collections

from configs import common
from sr_jax.data import pipeline

VARIANTS = ('stage1', 'stage2', 'tiny_stage1', 'tiny_stage2')


def get_config(arg: str = 'stage1') -> ml_collections.ConfigDict:
  """Returns the TUDSR config for variant ``arg`` (see the module docstring)."""
  common.check_variant('TUDSR', arg, VARIANTS)
  stage = 2 if arg.endswith('stage2') else 1
  c = ml_collections.ConfigDict()
  c.method = 'tudsr'
  c.seed = 123
  c.init_from = ''                       # stage 2: the stage-1 workdir (theta1, frozen)
  c.init_from_step = None                # its checkpoint step (None: the latest)

  c.model = ml_collections.ConfigDict()
  c.model.stage = stage
  c.model.source = 'converted'           # 'converted': convert_weights folders; 'random': tiny
  c.model.sd_path = 'weights/sd21b'
  c.model.dinov3_path = 'weights/dinov3_vitb16'
  c.model.perceptual_path = 'weights/perceptual'
  c.model.prompt = ''
  c.model.resolution = 512               # R
  c.model.n = 2                          # N (stage-2 scale)
  c.model.t1 = 200
  c.model.t2 = 50
  c.model.unet_lora_rank = 32
  c.model.unet_lora_alpha = 32
  c.model.lora_targets = common.UNET_LORA_TARGETS
  c.model.lora_init = 'gaussian'
  c.model.disc_levels = (3, 6, 9)        # DINOv3-ViT hidden states (1-indexed blocks)
  c.model.stage2_lq_resize = 'linear'    # N R LQ crop -> x_L at R for G_theta1 (antialiased)
  c.model.compute_dtype = 'bfloat16'
  c.model.frozen_param_dtype = 'bfloat16'
  c.model.remat = False

  c.loss = ml_collections.ConfigDict(dict(ea_dists=5.0, gan=0.5, l1=0.5, disc=0.5))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=5e-5, b1=0.9, b2=0.999, weight_decay=1e-4, eps=1e-8, clip_norm=1.0,
      grad_accum_steps=4, d_learning_rate=None))

  crop = c.model.resolution * (c.model.n if stage == 2 else 1)
  c.data = pipeline.source_config(paths=('data/LSDIR', 'data/ffhq_first10k.txt'), crop_size=crop,
                                  preset='omgsr_512')
  c.data.resize_to_crop = [False, True]
  c.data_workers = 8

  c.batch_size = 16
  c.max_steps = 5100 if stage == 1 else 3500   # optimizer updates (stage 2: 4 per batch)
  c.flops_per_sample = None
  c.log_every = 50 if stage == 1 else 20
  c.sample_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.cpu_memory_scheduler = True
  c.cpu_optimization_level = None
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

  c.eval = ml_collections.ConfigDict(dict(
      process_size=512, upscale=4, mode='twice', merge_adapters=False, latent_overlap=32,
      vae_tile=128, batch=8, color_fix='adain', seed=0, perceptual_weights='',
      cpu_optimization_level=None))

  if arg.startswith('tiny'):
    common.use_tiny_sd_models(c.model)
    del c.model['dinov3_config']        # the ConvNeXt of OMGSR's tiny set; TUDSR's D is a ViT
    c.model.dinov3_vit_config = common.TINY_DINOV3_VIT
    c.model.resolution = 64
    c.model.unet_lora_rank = c.model.unet_lora_alpha = 4
    crop = 64 * (c.model.n if stage == 2 else 1)
    c.data = pipeline.source_config(paths=('skimage:',), crop_size=crop, preset='omgsr_512')
    c.data_workers = 0
    c.optim.learning_rate = 1e-2
    c.optim.d_learning_rate = 1e-4
    c.optim.grad_accum_steps = 1
    c.cpu_memory_scheduler = False
    c.cpu_optimization_level = 1
    c.batch_size = 2
    c.max_steps = 20 if stage == 1 else 16
    c.log_every = 4
    c.sample_every = c.checkpoint_every = 8
    c.eval.update(process_size=64, latent_overlap=8, vae_tile=32, cpu_optimization_level=1)
  return c
