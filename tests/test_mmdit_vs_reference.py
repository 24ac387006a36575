"""Flax SD3Transformer2DModel equals diffusers `SD3Transformer2DModel` (SD3 and SD3.5 blocks).

Tiny random diffusers models (every weight randomised, RMSNorm weights away from 1, biases non-zero)
are written with `save_pretrained`, read back with `sr_jax.weights.read_state_dict` and converted
against the abstract params of our module (`jax.eval_shape(model.init)`), with only the sin-cos
buffer ignored. Two configs: SD3 (no dual attention, no qk-norm) and SD3.5 (dual attention in
blocks 0 and 1, i.e. up to the last-but-one; qk-norm rms_norm). The latent is non-square (6 x 10,
3 x 5 tokens; pos_embed_max_size 12) with a batch of two timesteps. Checked: fp32 max error
<= 1e-4 x max(1, output scale); bf16 compute within 2e-2 x scale; our sin-cos table against
diffusers'; full-size SD3.5-M keys, shapes and counts against diffusers on the meta device; LoRA
against PEFT (unmerged, merged, exported adapter loaded by diffusers `load_lora_adapter`); FSDP on 8
fake CPU devices and remat per block (subprocess).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sr_jax.models import lora, mmdit
from sr_jax.weights import (CheckpointError, convert_state_dict, find_weight_files,
                            flax_path_to_torch_key, flax_to_torch_shapes, read_state_dict)

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
peft = pytest.importorskip('peft')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=6, num_layers=3,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
            caption_projection_dim=32, pooled_projection_dim=20, pos_embed_max_size=12)
CONFIGS = {
    'sd3': dict(TINY, dual_attention_layers=(), qk_norm=None),
    'sd35': dict(TINY, dual_attention_layers=(0, 1), qk_norm='rms_norm'),
}
LATENT_HW = (6, 10)
CONTEXT_TOKENS = 7
TIMESTEPS = np.array([10.0, 700.0], np.float32)  # sigma * 1000, as diffusers' transformer gets them
# OMGSR-F's FLUX LoRA targets (method-facts Sec. 1.3) in SD3 names, plus the patch-embedding conv.
MMDIT_LORA_TARGETS = ('pos_embed.proj', 'to_q', 'to_k', 'to_v', 'to_out.0', 'add_q_proj',
                      'add_k_proj', 'add_v_proj', 'to_add_out', 'ff.net.0.proj', 'ff.net.2',
                      'ff_context.net.0.proj', 'ff_context.net.2')
RANK, ALPHA = 4, 8


def randomise(model, seed: int) -> None:
  """Every parameter random: matrices ~ N(0, 1/fan_in), norm weights 1 + N(0, 0.2²), biases
  N(0, 0.1²) (a mapping mistake in any leaf changes the output)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(noise / np.sqrt(p[0].numel()))
      elif 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.2 * noise)
      else:
        p.copy_(0.1 * noise)


def random_inputs(config, hw=LATENT_HW, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return dict(latents=rng.standard_normal((2, *hw, config['in_channels'])).astype(np.float32),
              timesteps=TIMESTEPS,
              context=rng.standard_normal((2, CONTEXT_TOKENS, config['joint_attention_dim'])
                                          ).astype(np.float32),
              pooled=rng.standard_normal((2, config['pooled_projection_dim'])).astype(np.float32))


def torch_forward(model, inputs) -> np.ndarray:
  """diffusers forward on our NHWC inputs; NHWC numpy output."""
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(inputs['latents'].transpose(0, 3, 1, 2).copy()),
                encoder_hidden_states=torch.from_numpy(inputs['context']),
                pooled_projections=torch.from_numpy(inputs['pooled']),
                timestep=torch.from_numpy(inputs['timesteps'])).sample
  return out.numpy().transpose(0, 2, 3, 1)


def abstract_params(model):
  return jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']


def flax_inputs(inputs):
  return (inputs['latents'], inputs['timesteps'], inputs['context'], inputs['pooled'])


def assert_close(out, ref, what, tol=1e-4):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert out.shape == ref.shape, (what, out.shape, ref.shape)
  err, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
  print(f'{what}: max abs err {err:.2e}, output scale {scale:.3g}')
  assert err <= tol * max(1.0, scale), f'{what}: max abs err {err:.3g} (scale {scale:.3g})'
  return err


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  """A saved tiny diffusers model, its converted params and the reference output."""
  config = CONFIGS[request.param]
  torch.manual_seed(0)
  torch_model = diffusers.SD3Transformer2DModel(**config).eval()
  randomise(torch_model, seed=1)
  folder = str(tmp_path_factory.mktemp(f'mmdit_{request.param}'))
  torch_model.save_pretrained(folder)
  with open(os.path.join(folder, 'config.json')) as f:
    model = mmdit.SD3Transformer2DModel.from_config(json.load(f))
  state = read_state_dict(find_weight_files(folder, 'diffusion_pytorch_model'))
  params = convert_state_dict(state, abstract_params(model),
                              ignore_prefixes=model.checkpoint_ignore_prefixes())
  inputs = random_inputs(config)
  return dict(name=request.param, config=config, torch_model=torch_model, folder=folder,
              model=model, state=state, params=params, inputs=inputs,
              ref=torch_forward(torch_model, inputs))


def test_fp32_matches_diffusers(case):
  model = case['model']
  assert model.dual_attention_layers == tuple(case['config']['dual_attention_layers'])
  out = jax.jit(model.apply)({'params': case['params']}, *flax_inputs(case['inputs']))
  assert out.shape == (2, *LATENT_HW, case['config']['out_channels'])
  assert_close(out, case['ref'], f'{case["name"]} fp32')


def test_bf16_compute_and_bf16_params(case):
  model = mmdit.SD3Transformer2DModel.from_config(case['config'], dtype=jnp.bfloat16)
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), case['params'])
  for what, p in (('bf16 compute, fp32 params', case['params']), ('bf16 compute and params', params)):
    out = jax.jit(model.apply)({'params': p}, *flax_inputs(case['inputs']))
    assert out.dtype == jnp.bfloat16
    assert_close(out, case['ref'], f'{case["name"]} {what}', tol=2e-2)


def test_pos_embed_buffer_is_recomputed_exactly(case):
  """The stored buffer equals our table; without the ignore prefix conversion names the key."""
  c = case['config']
  max_size, dim = c['pos_embed_max_size'], c['num_attention_heads'] * c['attention_head_dim']
  idx = np.arange(max_size)
  ours = mmdit.sincos_pos_embed(dim, idx, idx, max_size, c['sample_size'] // c['patch_size'])
  np.testing.assert_allclose(ours, case['state']['pos_embed.pos_embed'][0], rtol=0, atol=1e-6)
  with pytest.raises(CheckpointError, match='pos_embed.pos_embed'):
    convert_state_dict(case['state'], abstract_params(case['model']))


def test_sincos_table_matches_diffusers_at_sd35_width():
  """SD3.5-M's width (1536) and base size (64) on a 48-wide grid (the 384 table is 0.9 GB)."""
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  ref = get_2d_sincos_pos_embed(1536, 48, base_size=64, output_type='pt').float().numpy()
  idx = np.arange(48)
  np.testing.assert_allclose(mmdit.sincos_pos_embed(1536, idx, idx, 48, 64), ref, rtol=0,
                             atol=1e-6)
  crop = mmdit.cropped_pos_embed(1536, 3, 5, 48, 64)  # rows 22..24, cols 21..25
  np.testing.assert_array_equal(crop, ref.reshape(48, 48, -1)[22:25, 21:26].reshape(15, -1))


def test_full_size_sd35_medium_matches_diffusers_keys_shapes_and_count():
  model = mmdit.SD3Transformer2DModel.from_config(mmdit.SD35_MEDIUM_CONFIG)
  shapes = flax_to_torch_shapes(abstract_params(model))
  assert sum(int(np.prod(s)) for s in shapes.values()) == 2_243_171_520
  config = {k: v for k, v in mmdit.SD35_MEDIUM_CONFIG.items() if not k.startswith('_')}
  with torch.device('meta'):
    reference = diffusers.SD3Transformer2DModel(**config)
  ref = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert len(ref) == 909 and ref.pop('pos_embed.pos_embed') == (1, 384 * 384, 1536)
  assert shapes == ref


# --- LoRA against PEFT --------------------------------------------------------------------------

def peft_lora_config():
  return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights='gaussian',
                         target_modules=list(MMDIT_LORA_TARGETS))


@pytest.mark.parametrize('case', ['sd35'], indirect=True)  # SD3.5 layers: a superset of SD3's
def test_lora_matches_peft_unmerged_merged_and_exported(case, tmp_path):
  model, params, inputs = case['model'], case['params'], case['inputs']
  config = lora.LoRAConfig(rank=RANK, alpha=ALPHA, init='gaussian',
                           target_modules=MMDIT_LORA_TARGETS)
  torch_model = diffusers.SD3Transformer2DModel.from_pretrained(case['folder']).eval()
  wrapped = peft.get_peft_model(torch_model, peft_lora_config())
  names = {n.removeprefix('base_model.model.') for n, m in wrapped.named_modules()
           if isinstance(m, peft.tuners.lora.LoraLayer)}
  assert names == {flax_path_to_torch_key(p) for p in lora.target_paths(params, config)}
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, p in wrapped.named_parameters():
      if '.lora_A.' in name or '.lora_B.' in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
  state = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(wrapped).items()}
  tree = lora.from_peft_state_dict(state, params, config)
  run = jax.jit(lambda p, lp: lora.apply(model, p, lp, config, *flax_inputs(inputs)))
  ref = torch_forward(wrapped, inputs)
  ours = run(params, tree)
  assert np.abs(ref - case['ref']).max() > 0.1 * np.abs(ref).max()  # the LoRA branch matters
  assert_close(ours, ref, 'sd35 LoRA unmerged')
  merged_ref = torch_forward(wrapped.merge_and_unload(), inputs)
  assert_close(run(lora.merge(params, tree, config), {}), merged_ref, 'sd35 LoRA merged')
  lora.save_peft_adapter(tmp_path, tree, config, key_prefix='')
  fresh = diffusers.SD3Transformer2DModel.from_pretrained(case['folder']).eval()
  fresh.load_lora_adapter(str(tmp_path), prefix=None, weight_name=lora.ADAPTER_WEIGHTS_NAME)
  assert_close(torch_forward(fresh, inputs), ours, 'sd35 LoRA export -> diffusers load_lora_adapter')


# --- FSDP over 8 fake devices, remat per block ---------------------------------------------------

REMAT_TINY = dict(TINY, num_layers=2, out_channels=4, dual_attention_layers=[0], qk_norm='rms_norm')

EIGHT_DEVICE_CHECKS = textwrap.dedent('''
  import json, sys
  import jax, jax.numpy as jnp, numpy as np
  from flax import traverse_util
  from sr_jax import sharding
  from sr_jax.models import mmdit

  tiny, npz = json.loads(sys.argv[1]), sys.argv[2]
  out = {}
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 8})
  full = mmdit.SD3Transformer2DModel.from_config(mmdit.SD35_MEDIUM_CONFIG, param_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(full.init, jax.random.key(0), *full.dummy_inputs())['params']
  shards = sharding.fsdp_shardings(shapes, mesh)
  total = per_device = 0
  for leaf, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(shards)):
    nbytes = leaf.size * leaf.dtype.itemsize
    total += nbytes
    per_device += nbytes * int(np.prod(sh.shard_shape(leaf.shape))) // leaf.size
  out.update(total_bytes=total, per_device_bytes=per_device)

  # remat per block with FSDP-sharded params: the compiled gradient, saved for the parent to check.
  model = mmdit.SD3Transformer2DModel.from_config(tiny, remat=True)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']
  rng = np.random.default_rng(0)
  flat = {k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in traverse_util.flatten_dict(abstract, sep='/').items()}
  params = traverse_util.unflatten_dict(flat, sep='/')
  placed = jax.device_put(params, sharding.fsdp_shardings(params, mesh, min_size=256))
  out['sharded_leaves'] = sum(len(l.sharding.device_set) == 8 and not l.sharding.is_fully_replicated
                              for l in jax.tree.leaves(placed))
  inputs = tuple(np.asarray(x) for x in json.loads(sys.argv[3]))
  loss = lambda p: jnp.mean(model.apply({'params': p}, *inputs) ** 2)
  def top_level_remats(remat):  # remat2 equations (chunked attention has its own, hence compare)
    m = mmdit.SD3Transformer2DModel.from_config(tiny, remat=remat)
    f = lambda p: jnp.mean(m.apply({'params': p}, *inputs) ** 2)
    return sum(e.primitive.name == 'remat2' for e in jax.make_jaxpr(jax.grad(f))(placed).eqns)
  out['remat_eqns'] = [top_level_remats(False), top_level_remats(True)]
  grads = jax.jit(jax.grad(loss))(placed)
  np.savez(npz, **{'param/' + k: v for k, v in flat.items()},
           **{'grad/' + k: np.asarray(v)
              for k, v in traverse_util.flatten_dict(grads, sep='/').items()})
  print(json.dumps(out))
''')


def test_fsdp_splits_sd35_medium_over_eight_devices_and_remat_compiles(tmp_path):
  rng = np.random.default_rng(5)
  inputs = [rng.standard_normal((2, 4, 4, 4)), [500.0, 20.0], rng.standard_normal((2, 3, 24)),
            rng.standard_normal((2, 20))]
  npz = str(tmp_path / 'remat_grads.npz')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-c', EIGHT_DEVICE_CHECKS, json.dumps(REMAT_TINY), npz,
                         json.dumps([np.asarray(x).tolist() for x in inputs])],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  total, per_device = out['total_bytes'], out['per_device_bytes']
  print(f'SD3.5-M bf16 params: {total / 2**30:.3f} GiB total, {per_device / 2**30:.3f} GiB per '
        f'device of 8 (ideal {total / 8 / 2**30:.3f}); top-level remat eqns without/with remat '
        f'{out["remat_eqns"]}')
  assert total == 2 * 2_243_171_520
  assert per_device <= 1.01 * total / 8
  assert out['sharded_leaves'] > 0
  assert out['remat_eqns'][1] > out['remat_eqns'][0], out['remat_eqns']  # remat per block is on
  # The remat'd, sharded gradient equals the plain single-device one.
  saved = np.load(npz)
  params = traverse_util.unflatten_dict({k[6:]: saved[k] for k in saved if k.startswith('param/')},
                                        sep='/')
  model = mmdit.SD3Transformer2DModel.from_config(REMAT_TINY)
  inputs = tuple(np.asarray(x, np.float32) for x in inputs)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({'params': p}, *inputs) ** 2)))(params)
  flat = traverse_util.flatten_dict(grads, sep='/')
  assert len(flat) == sum(k.startswith('grad/') for k in saved)
  scale = max(float(np.abs(g).max()) for g in flat.values())
  err = max(float(np.abs(np.asarray(g) - saved['grad/' + k]).max()) for k, g in flat.items())
  print(f'remat + FSDP gradient vs plain: max abs err {err:.2e} (grad scale {scale:.3g})')
  assert err <= 1e-5 * max(1.0, scale)
