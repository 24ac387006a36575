"""Flax FLUX transformer equals diffusers' `FluxTransformer2DModel`, with and without LoRA.

Two tiny random diffusers models, FLUX.1-dev-like (guidance embeds) and FLUX.1-schnell-like (none,
out_channels 8 != in_channels), 2 double + 2 single blocks, 2 heads x 16 (RoPE axes summing to 16):
every weight randomised (qk RMSNorm scales away from 1, biases non-zero), `save_pretrained`, read
back with numpy and converted with the generic `convert_state_dict`. The torch side gets the
inputs exactly as FluxPipeline hands them over (`_pack_latents`, `_prepare_latent_image_ids`, zero
text ids, sigma and the raw guidance scale) and its output is `_unpack_latents`-ed; ours takes the
NHWC latents. Latents are non-square (6 x 10 -> a 3 x 5 token grid), batch 2 with different
timesteps. LoRA: OMGSR-F's 13 target suffixes on the PEFT-wrapped diffusers model (unmerged and
merged), and our export loaded by diffusers `load_lora_adapter` and by `PeftModel.from_pretrained`.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sr_jax.models import lora
from sr_jax.models.flux import OMGSR_F_LORA_TARGETS, FluxTransformer2DModel
from sr_jax.weights import (convert_state_dict, find_weight_files, flax_path_to_torch_key,
                            read_state_dict)

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
peft = pytest.importorskip('peft')

BASE = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12)
CONFIGS = {
    'dev': dict(BASE, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    'schnell': dict(BASE, guidance_embeds=False, axes_dims_rope=(2, 6, 8), out_channels=8),
}
BATCH, HEIGHT, WIDTH, TEXT_LEN = 2, 6, 10, 7
SIGMAS = np.array([0.3, 0.9], np.float32)
GUIDANCE = np.array([3.5, 1.0], np.float32)
# sigma * 1000 and guidance * 1000 exact in bfloat16, so bf16 and fp32 see the same t (see
# test_bf16_rounds_the_timestep_as_diffusers for the other case).
BF16_EXACT_SIGMAS = np.array([0.25, 0.5], np.float32)
BF16_EXACT_GUIDANCE = np.array([1.0, 2.0], np.float32)
RANK, ALPHA = 4, 8
LORA_CONFIG = lora.LoRAConfig(rank=RANK, alpha=ALPHA, target_modules=OMGSR_F_LORA_TARGETS,
                              init='gaussian')


def _randomise(model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and name.endswith('weight'):  # qk RMSNorm scales
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.sqrt(p.shape[1]))


def torch_forward(model, latents, sigmas, context, pooled, guidance=None):
  """diffusers' transformer called as FluxPipeline calls it; NHWC numpy output."""
  b, h, w, c = latents.shape
  packed = diffusers.FluxPipeline._pack_latents(
      torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))), b, c, h, w)
  img_ids = diffusers.FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, 'cpu',
                                                             torch.float32)
  with torch.no_grad():
    out = model(hidden_states=packed, encoder_hidden_states=torch.from_numpy(context),
                pooled_projections=torch.from_numpy(pooled), timestep=torch.from_numpy(sigmas),
                img_ids=img_ids, txt_ids=torch.zeros(context.shape[1], 3),
                guidance=None if guidance is None else torch.from_numpy(guidance)).sample
  vae_scale = 8
  out = diffusers.FluxPipeline._unpack_latents(out, h * vae_scale, w * vae_scale, vae_scale)
  return out.numpy().transpose(0, 2, 3, 1)


def assert_close(out, ref, what, rel=1e-4):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert out.shape == ref.shape, (what, out.shape, ref.shape)
  err, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
  print(f'{what}: max abs err {err:.2e}, output scale {scale:.3g}')
  assert err <= rel * max(1.0, scale), f'{what}: max abs err {err:.3g} (scale {scale:.3g})'
  return err


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  name = request.param
  torch.manual_seed(0)
  torch_model = diffusers.FluxTransformer2DModel(**CONFIGS[name]).eval()
  _randomise(torch_model)
  folder = str(tmp_path_factory.mktemp(f'flux_{name}'))
  torch_model.save_pretrained(folder)
  with open(os.path.join(folder, 'config.json')) as f:
    config = json.load(f)
  model = FluxTransformer2DModel.from_config(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']
  params = convert_state_dict(read_state_dict(find_weight_files(folder, 'diffusion_pytorch_model')),
                              shapes)
  rng = np.random.default_rng(1)
  inputs = dict(latents=rng.standard_normal((BATCH, HEIGHT, WIDTH, model.latent_channels)),
                context=rng.standard_normal((BATCH, TEXT_LEN, BASE['joint_attention_dim'])),
                pooled=rng.standard_normal((BATCH, BASE['pooled_projection_dim'])))
  inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
  guided = model.guidance_embeds
  # One jitted function for every call of this model: LoRA tree {} is the plain forward.
  run = jax.jit(lambda m, p, lp, sigmas, guidance: lora.apply(
      m, p, lp, LORA_CONFIG, inputs['latents'], sigmas, inputs['context'], inputs['pooled'],
      guidance if guided else None), static_argnums=0)
  return dict(name=name, torch_model=torch_model, folder=folder, model=model, params=params,
              inputs=inputs, guided=guided, run=run)


def _reference(case, sigmas=SIGMAS, guidance=GUIDANCE, model=None):
  i = case['inputs']
  return torch_forward(model or case['torch_model'], i['latents'], sigmas, i['context'],
                       i['pooled'], guidance if case['guided'] else None)


def test_packing_ids_and_rope_tables_equal_diffusers():
  from diffusers.models.transformers.transformer_flux import FluxPosEmbed
  from sr_jax.models import flux
  pipe = diffusers.FluxPipeline
  latents = np.random.default_rng(0).standard_normal((2, HEIGHT, WIDTH, 3)).astype(np.float32)
  nchw = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2)))
  packed = pipe._pack_latents(nchw, 2, 3, HEIGHT, WIDTH).numpy()
  np.testing.assert_array_equal(np.asarray(flux.pack_latents(latents)), packed)
  unpacked = pipe._unpack_latents(torch.from_numpy(packed), HEIGHT * 8, WIDTH * 8, 8).numpy()
  np.testing.assert_array_equal(np.asarray(flux.unpack_latents(packed, HEIGHT, WIDTH)),
                                unpacked.transpose(0, 2, 3, 1))
  ids = flux.position_ids(TEXT_LEN, HEIGHT // 2, WIDTH // 2)
  img_ids = pipe._prepare_latent_image_ids(1, HEIGHT // 2, WIDTH // 2, 'cpu', torch.float32)
  np.testing.assert_array_equal(ids, torch.cat([torch.zeros(TEXT_LEN, 3), img_ids]).numpy())
  axes = (16, 56, 56)  # FLUX.1's: many frequencies
  ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=list(axes))(torch.from_numpy(ids).float())
  cos, sin = flux.rope_cos_sin(ids, axes)
  np.testing.assert_array_equal(np.repeat(cos, 2, axis=-1), ref_cos.numpy())
  np.testing.assert_array_equal(np.repeat(sin, 2, axis=-1), ref_sin.numpy())
  x = np.random.default_rng(1).standard_normal((2, len(ids), 3, sum(axes))).astype(np.float32)
  ref = diffusers.models.embeddings.apply_rotary_emb(torch.from_numpy(x), (ref_cos, ref_sin),
                                                     sequence_dim=1).numpy()
  np.testing.assert_allclose(np.asarray(flux.apply_rope(x, cos, sin)), ref, rtol=0, atol=1e-6)


def test_fp32_matches_diffusers(case):
  out = case['run'](case['model'], case['params'], {}, SIGMAS, GUIDANCE)
  assert out.shape == (BATCH, HEIGHT, WIDTH, case['model'].output_channels // 4)
  assert_close(out, _reference(case), f'{case["name"]} fp32')


def test_bf16_compute_close_to_fp32_reference(case):
  model = case['model'].clone(dtype=jnp.bfloat16)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), case['params'])
  out = case['run'](model, params, {}, BF16_EXACT_SIGMAS, BF16_EXACT_GUIDANCE)
  assert out.dtype == jnp.bfloat16
  ref = _reference(case, BF16_EXACT_SIGMAS, BF16_EXACT_GUIDANCE)
  assert_close(out, ref, f'{case["name"]} bf16 compute + bf16 params', rel=2e-2)


@pytest.mark.parametrize('case', ['dev'], indirect=True)
def test_bf16_rounds_the_timestep_as_diffusers(case):
  """diffusers: ``timestep.to(bf16) * 1000`` (rounded twice); OMGSR-F's sigma 0.50511 -> t = 504.
  Without the rounding (XLA elides a plain astype round trip) this test fails by ~30% of scale."""
  sigmas, guidance = np.array([0.50511, 0.3], np.float32), np.array([1.0, 3.5], np.float32)
  as_diffusers = lambda v: (torch.from_numpy(v).to(torch.bfloat16) * 1000).float().numpy() / 1000
  assert as_diffusers(sigmas)[0] * 1000 == pytest.approx(504.0)
  model = case['model'].clone(dtype=jnp.bfloat16)
  out = case['run'](model, case['params'], {}, sigmas, guidance)
  ref = _reference(case, as_diffusers(sigmas), as_diffusers(guidance))
  assert_close(out, ref, 'bf16 with rounded timesteps', rel=2e-2)


def test_remat_and_guidance_checks(case):
  model, params, run = case['model'], case['params'], case['run']
  assert_close(run(model.clone(remat=True), params, {}, SIGMAS, GUIDANCE),
               run(model, params, {}, SIGMAS, GUIDANCE), 'remat forward', rel=1e-6)
  i = case['inputs']
  args = (i['latents'], SIGMAS, i['context'], i['pooled'])
  with pytest.raises(ValueError, match='guidance'):
    jax.eval_shape(lambda p: model.apply({'params': p}, *args,
                                         None if case['guided'] else GUIDANCE), params)
  with pytest.raises(ValueError, match='even'):
    jax.eval_shape(lambda p: model.apply({'params': p}, i['latents'][:, :5], *args[1:],
                                         GUIDANCE if case['guided'] else None), params)


def test_config_checks():
  with pytest.raises(ValueError, match='sum to attention_head_dim'):
    FluxTransformer2DModel.from_config(dict(CONFIGS['dev'], axes_dims_rope=(4, 4, 4)))
  with pytest.raises(ValueError, match='patch_size'):
    FluxTransformer2DModel.from_config(dict(CONFIGS['dev'], patch_size=2))
  model = FluxTransformer2DModel.from_config(dict(CONFIGS['dev'], out_channels=None),
                                             remat=True, dtype=jnp.bfloat16)
  assert (model.output_channels, model.remat, model.dtype) == (16, True, jnp.bfloat16)


# --- LoRA (OMGSR-F targets) against PEFT on the diffusers model --------------------------------

def _peft_config():
  return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights='gaussian',
                         target_modules=list(OMGSR_F_LORA_TARGETS))


def _lora_module_names(model):
  return {name.removeprefix('base_model.model.') for name, m in model.named_modules()
          if isinstance(m, peft.tuners.lora.LoraLayer)}


def _fresh_torch(case):
  return diffusers.FluxTransformer2DModel.from_pretrained(case['folder']).eval()


def test_lora_peft_weights_give_our_outputs_unmerged_and_merged(case):
  model, params, run = case['model'], case['params'], case['run']
  wrapped = peft.get_peft_model(_fresh_torch(case), _peft_config())
  ours = {flax_path_to_torch_key(p) for p in lora.target_paths(params, LORA_CONFIG)}
  assert _lora_module_names(wrapped) == ours
  per_double, per_single = 12, 3
  assert len(ours) == BASE['num_layers'] * per_double + BASE['num_single_layers'] * per_single + 1
  gen = torch.Generator().manual_seed(2)
  with torch.no_grad():
    for name, p in wrapped.named_parameters():
      if '.lora_A.' in name or '.lora_B.' in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
  state = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(wrapped).items()}
  tree = lora.from_peft_state_dict(state, params, LORA_CONFIG)
  ref = _reference(case, model=wrapped)
  out = run(model, params, tree, SIGMAS, GUIDANCE)
  base = run(model, params, {}, SIGMAS, GUIDANCE)
  assert np.abs(np.asarray(out) - base).max() > 0.1 * np.abs(ref).max()  # the LoRA branch matters
  assert_close(out, ref, f'{case["name"]} LoRA unmerged')
  merged_ref = _reference(case, model=wrapped.merge_and_unload())
  assert_close(run(model, lora.merge(params, tree, LORA_CONFIG), {}, SIGMAS, GUIDANCE), merged_ref,
               f'{case["name"]} LoRA merged')


def test_lora_export_loads_in_diffusers_and_peft(case, tmp_path):
  model, params, run = case['model'], case['params'], case['run']
  shapes = jax.eval_shape(lambda: lora.init_lora_params(jax.random.key(0), params, LORA_CONFIG))
  rng = np.random.default_rng(3)
  tree = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  ours = run(model, params, tree, SIGMAS, GUIDANCE)
  lora.save_peft_adapter(tmp_path / 'diffusers', tree, LORA_CONFIG, key_prefix='')
  lora.save_peft_adapter(tmp_path / 'peft', tree, LORA_CONFIG)
  injected = _fresh_torch(case)
  injected.load_lora_adapter(str(tmp_path / 'diffusers'), prefix=None,
                             weight_name=lora.ADAPTER_WEIGHTS_NAME)
  assert_close(ours, _reference(case, model=injected), 'export -> diffusers load_lora_adapter')
  wrapped = peft.PeftModel.from_pretrained(_fresh_torch(case), str(tmp_path / 'peft')).eval()
  assert_close(ours, _reference(case, model=wrapped), 'export -> PeftModel.from_pretrained')
