"""TUDSR pieces without a training run: chunking (Eq. 11), bilinear x N (Eq. 10), level-mean BCE
(Eq. 6-7), the stage plan of inference, and the step-count rule of the trainer."""
import numpy as np
import pytest
import torch

import jax.numpy as jnp

from configs import tudsr as tudsr_config
from sr_jax import trainer
from sr_jax.losses import gan
from sr_jax.methods import tudsr


def test_chunks_are_raster_order_and_reassemble_to_the_identity():
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 9, 3)), jnp.float32)
  chunks = tudsr.chunk_image(images, 3)
  assert chunks.shape == (6, 2, 3, 3, 3)
  for k in range(6):  # left to right, then top to bottom
    row, col = divmod(k, 3)
    np.testing.assert_array_equal(chunks[k], images[:, 3 * row:3 * row + 3, 3 * col:3 * col + 3])
  np.testing.assert_array_equal(tudsr.assemble_chunks(chunks, 2, 3), images)


def test_chunking_refuses_sizes_that_do_not_cut():
  with pytest.raises(ValueError, match='do not cut'):
    tudsr.chunk_image(jnp.zeros((1, 8, 10, 3)), 4)
  with pytest.raises(ValueError, match='grid'):
    tudsr.assemble_chunks(jnp.zeros((4, 1, 2, 2, 3)), 3, 1)


def test_upsampling_is_torch_bilinear():
  x = np.random.default_rng(1).normal(size=(2, 5, 7, 3)).astype(np.float32)
  ours = np.asarray(tudsr.upsample_intermediate(jnp.asarray(x), 2))
  ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2,
                                        mode='bilinear', align_corners=False)
  np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_level_mean_bce_by_hand():
  rng = np.random.default_rng(2)
  levels = [rng.normal(size=(2, 4, 4)), rng.normal(size=(2, 2, 2)), rng.normal(size=(2, 1, 1))]
  for label in (0.8, 0.0):
    hand = np.mean([np.mean(-(label * np.log(1 / (1 + np.exp(-l)))
                              + (1 - label) * np.log(1 - 1 / (1 + np.exp(-l))))) for l in levels])
    ours = gan.level_mean_bce([jnp.asarray(l, jnp.float32) for l in levels], label)
    np.testing.assert_allclose(float(ours), hand, rtol=1e-6)
  # TUDSR averages the levels where OMGSR sums them.
  logits = [jnp.asarray(l, jnp.float32) for l in levels]
  np.testing.assert_allclose(float(gan.level_mean_bce(logits, 0.8)) * 3,
                             float(gan.multilevel_bce(logits, 0.8)), rtol=1e-6)


def _stage_plan(params, **eval_overrides):
  eval_config = {'upscale': 4, 'process_size': 64, 'mode': 'twice', **eval_overrides}
  consts = {'n': 2, 't1': 200, 'alpha_bar_t1': 0.75, 't2': 50, 'alpha_bar_t2': 0.95}
  lora_config = tudsr.unet_lora_config(tudsr_config.get_config('tiny_stage2').model)
  stages, out = tudsr.inference_stages(None, None, None, params, {1: lora_config, 2: lora_config},
                                       consts, eval_config)
  return [(s.upscale, s.step.timestep, s.step.lora_key, s.resize) for s in stages], out


def test_inference_presets_are_m2n2_and_m4n2_with_one_backbone():
  params = {'unet': {}, tudsr.STAGE1_LORA: {}, tudsr.STAGE2_LORA: {}}
  plan, out = _stage_plan(params, upscale=4)
  assert plan == [(2, 200, tudsr.STAGE1_LORA, 'bicubic'), (2, 50, tudsr.STAGE2_LORA, 'linear')]
  assert set(out) == set(params)  # both adapters on the one UNet
  plan, _ = _stage_plan(params, upscale=8)
  assert [p[0] for p in plan] == [4, 2]
  assert [p[:2] for p in _stage_plan(params, mode='stage1')[0]] == [(4, 200)]
  assert [p[:2] for p in _stage_plan(params, mode='stage2')[0]] == [(4, 50)]
  with pytest.raises(ValueError, match='M x N'):
    _stage_plan(params, upscale=3)
  with pytest.raises(ValueError, match='config.eval.mode'):
    _stage_plan(params, mode='thrice')
  # A stage-1 model runs its one LoRA at the whole scale.
  plan, _ = _stage_plan({'unet': {}, tudsr.STAGE1_LORA: {}}, upscale=4)
  assert [p[:2] for p in plan] == [(4, 200)]
  with pytest.raises(ValueError, match='stage-2 model'):
    _stage_plan({'unet': {}, tudsr.STAGE1_LORA: {}}, mode='stage2')


def test_stage_two_config_counts_updates_and_checks_intervals():
  config = tudsr_config.get_config('stage2')
  assert config.max_steps == 3500 and config.data.crop_size == 1024
  options = trainer.TrainerOptions.from_config(config)
  trainer.check_step_intervals(options, 4)
  config.log_every = 10
  with pytest.raises(ValueError, match='config.log_every=10 must be a multiple of the 4'):
    trainer.check_step_intervals(trainer.TrainerOptions.from_config(config), 4)


def test_wrong_crop_size_and_missing_init_from_are_named():
  config = tudsr_config.get_config('tiny_stage2')
  config.data.crop_size = 64
  with pytest.raises(ValueError, match=r'config.data.crop_size=64.*128'):
    tudsr.check_data(config)
  config.data.crop_size = 128
  with pytest.raises(ValueError, match='init_from'):
    tudsr.load_stage1_lora(config, None)


def test_ea_dists_is_the_shared_function():
  from sr_jax.losses import dists  # pylint: disable=g-import-not-at-top
  assert tudsr.dists.ea_dists_loss is dists.ea_dists_loss
  own = [name for name, value in vars(tudsr).items()
         if getattr(value, '__module__', None) == tudsr.__name__ and callable(value)]
  assert own and not [name for name in own if 'dists' in name or 'sobel' in name]


def test_stage2_refuses_a_run_that_is_not_stage1_on_the_same_backbone(tmp_path):
  stage1 = tudsr_config.get_config('tiny_stage1')
  stage1.model.unet_config = dict(stage1.model.unet_config, block_out_channels=[16, 32])
  (tmp_path / 'config.json').write_text(stage1.to_json_best_effort())
  config = tudsr_config.get_config('tiny_stage2')
  config.init_from = str(tmp_path)
  with pytest.raises(ValueError, match='config.model.unet_config is .* same backbone'):
    tudsr.load_stage1_lora(config, None)
  (tmp_path / 'config.json').write_text(tudsr_config.get_config('tiny_stage2').to_json_best_effort())
  with pytest.raises(ValueError, match='not a TUDSR stage-1 workdir'):
    tudsr.load_stage1_lora(config, None)
