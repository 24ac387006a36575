"""Config of the test-only toy method (``tests/toy_method.py``): a micro VAE, 3 steps, CPU seconds.

  python train.py --config=tests/toy_method_config.py --workdir=/tmp/toy
  python eval.py --config=tests/toy_method_config.py --checkpoint=/tmp/toy --input=LQ --output=OUT
"""
import ml_collections

from sr_jax.data import pipeline

# Two levels (VAE factor 2), mid-block attention: enough structure for the tiled VAE.
MICRO_VAE = dict(block_out_channels=[8, 16], down_block_types=['DownEncoderBlock2D'] * 2,
                 up_block_types=['UpDecoderBlock2D'] * 2, layers_per_block=1, latent_channels=4,
                 norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1)


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.method = 'tests.toy_method'
  c.seed = 5
  c.model = ml_collections.ConfigDict(dict(source='random', vae_config=MICRO_VAE))
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, b1=0.9, b2=0.999, weight_decay=0.0, eps=1e-8, clip_norm=1.0,
      grad_accum_steps=2))
  c.data = pipeline.source_config(paths=('skimage:',), crop_size=32, preset='omgsr_512')
  c.data_workers = 0
  c.batch_size = 4
  c.max_steps = 3
  c.log_every = 1
  c.sample_every = 3
  c.checkpoint_every = 2
  # 32 px process size, VAE factor 2: latent tiles of 16; the VAE runs tiled above 8^2 latent px.
  c.eval = ml_collections.ConfigDict(dict(process_size=32, upscale=4, latent_overlap=4,
                                          vae_tile=8, batch=4, color_fix='adain', seed=0))
  return c
