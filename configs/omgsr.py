r"""OMGSR-S: SD2.1-base as a one-step GAN generator with a DINOv3-ConvNeXt discriminator.

Full recipe (wuer5/OMGSR HEAD ``configs/omgsr_s_512.yml``, ``train/train_omgsr_s.py``), on GPUs or TPUs::

  python -m convert_weights sd --src stabilityai/stable-diffusion-2-1-base --out weights/sd21b
  python -m convert_weights dinov3 --src facebook/dinov3-convnext-large-pretrain-lvd1689m \
      --out weights/dinov3_l
  python -m sr_jax.mid_timestep_search --config=configs/omgsr.py --num_pairs=1000  # prints t*
  python train.py --config=configs/omgsr.py --workdir=runs/omgsr_s \
      --config.data.paths="('/data/LSDIR', '/data/ffhq_first10k.txt')"

Tiny default (random tiny models, bundled scikit-image photos, 64 px crops; a few minutes on a CPU)::

  python train.py --config=configs/omgsr.py:tiny --workdir=/tmp/omgsr_tiny

Variants (``--config=configs/omgsr.py:VARIANT``): ``512`` (default), ``tiny``.

Choices where paper and reference code differ (we follow the HEAD code, wuer5/OMGSR 8996613):
* base model SD2.1-base with the empty prompt, t* = 273 (paper era: SD-Turbo, t* = 195);
* Dv3CD exactly as the HEAD DISTS code (stride-1 L2 pooling fed to the next stage, uniform weights);
* loss weights lambda = (LRR 5, GAN 0.5, Dv3CD 5, L1 0.5) (Eq. 13), D loss 0.5 (Eq. 15);
* the G loss does not update D (the reference leaks the G-loss gradient into the D heads);
* no warm-up: the reference's "constant" scheduler ignores its 500 warm-up steps.
"""
import ml_collections

from configs import common
from sr_jax.data import pipeline

UNET_LORA_TARGETS = common.UNET_LORA_TARGETS


def get_config(arg: str = '512') -> ml_collections.ConfigDict:
  """Returns the OMGSR-S config for variant ``arg`` ('512' or 'tiny')."""
  common.check_variant('OMGSR', arg, ('512', 'tiny'))
  c = ml_collections.ConfigDict()
  c.method = 'omgsr'
  c.seed = 123

  c.model = ml_collections.ConfigDict()
  c.model.source = 'converted'           # 'converted': folders from convert_weights; 'random': tiny
  c.model.sd_path = 'weights/sd21b'      # convert_weights sd --out (unet/, vae/, prompt_embeds)
  c.model.dinov3_path = 'weights/dinov3_l'
  c.model.prompt = ''                    # HEAD: the empty prompt, encoded once at conversion
  c.model.t_star = 273                   # mid-timestep (OMGSR Eq. 5); recompute for new data/degradations
  c.model.unet_lora_rank = 32
  c.model.unet_lora_alpha = 32           # alpha = r: LoRA scale 1
  c.model.vae_lora_rank = 16
  c.model.vae_lora_alpha = 16
  c.model.lora_targets = UNET_LORA_TARGETS
  c.model.lora_init = 'gaussian'
  c.model.compute_dtype = 'bfloat16'     # activations; params stay float32
  c.model.frozen_param_dtype = 'bfloat16'  # frozen UNet/VAE/DINOv3 weights (LoRA + heads stay fp32)
  c.model.remat = False                  # recompute each UNet/VAE/DINOv3 block in the backward pass
  c.model.disc_resolution = 512          # head table of dinov3_convnext_disc.py: 512 or 1024

  c.loss = ml_collections.ConfigDict(dict(lrr=5.0, gan=0.5, dv3cd=5.0, l1=0.5, disc=0.5))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=5e-5, b1=0.9, b2=0.999, weight_decay=1e-4, eps=1e-8, clip_norm=1.0,
      grad_accum_steps=4, d_learning_rate=None))  # None: the G learning rate, as the reference

  # LSDIR folder + a text file listing the first 10k FFHQ images (resized whole to 512, as OMGSR).
  c.data = pipeline.source_config(paths=('data/LSDIR', 'data/ffhq_first10k.txt'), crop_size=512,
                                  preset='omgsr_512')
  c.data.resize_to_crop = [False, True]
  c.data_workers = 8                     # grain worker processes per host

  c.batch_size = 16                      # global examples per optimizer step (4 GPUs x 1 x accum 4)
  c.max_steps = 6000                     # optimizer steps
  # FLOPs of one training example at 512 (XLA cost analysis, benchmarks/RESULTS.md), for MFU.
  c.flops_per_sample = 12.75e12
  c.log_every = 50
  c.sample_every = 1000
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.cpu_memory_scheduler = True          # CPU only: XLA's memory-optimised order (fits 24 GiB)
  c.cpu_optimization_level = None        # CPU only: XLA's backend level (None: its default)
  # Devices: 'data' x 'fsdp' (-1 = the rest). fsdp > 1 also splits large frozen weights over 'fsdp'.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))

  # Inference (eval.py; OMGSR infer_omgsr_s.sh): latent tile = process_size / VAE factor (64), overlap 32.
  c.eval = ml_collections.ConfigDict(dict(
      process_size=512, upscale=4, latent_overlap=32, vae_tile=128, batch=8, color_fix='adain',
      seed=0, perceptual_weights='',      # convert_weights perceptual --out DIR: LPIPS/DISTS in JAX
      cpu_optimization_level=None))

  if arg == 'tiny':
    common.use_tiny_sd_models(c.model)
    c.model.unet_lora_rank = c.model.unet_lora_alpha = 4
    c.model.vae_lora_rank = c.model.vae_lora_alpha = 4
    c.model.disc_resolution = 64
    c.data = pipeline.source_config(paths=('skimage:',), crop_size=64, preset='omgsr_512')
    c.data_workers = 0                   # the bundled scikit-image photos: no download
    c.optim.learning_rate = 1e-2         # toy models from scratch LoRA: a visible fall in 40 steps
    c.optim.d_learning_rate = 1e-4
    c.optim.grad_accum_steps = 1
    c.flops_per_sample = None
    c.cpu_memory_scheduler = False       # a tiny step fits anywhere; XLA's default order is faster
    c.cpu_optimization_level = 1         # compiles the tiny step faster (and it runs faster)
    c.batch_size = 2
    c.max_steps = 40
    c.log_every = 10
    c.sample_every = 20
    c.checkpoint_every = 20
    # 64 px training crops and a x4 VAE: latent tiles of 16 (overlap 8), VAE tiles above 32.
    c.eval.update(process_size=64, latent_overlap=8, vae_tile=32, cpu_optimization_level=1)
  return c
