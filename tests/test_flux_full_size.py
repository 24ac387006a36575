"""FLUX.1-dev at full size without weights: parameter counts, diffusers key names and shapes, the
OMGSR-F LoRA, and FSDP over 8 (fake CPU) devices; plus per-block remat under FSDP on a tiny model.

Everything full-size is abstract (`jax.eval_shape`; the diffusers model is built on torch's meta
device). Sizes: shared/reference/next-methods.md Sec. 6. The 8-device checks run in a subprocess
(XLA_FLAGS must be set before jax is imported, and this pytest process has imported it).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from sr_jax.models import lora
from sr_jax.models.flux import FLUX1_DEV_CONFIG, OMGSR_F_LORA_TARGETS, FluxTransformer2DModel
from sr_jax.weights import flax_to_torch_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUX1_DEV_PARAMS = 11_901_408_320
DOUBLE_BLOCK_PARAMS, SINGLE_BLOCK_PARAMS = 339_831_296, 141_591_808
FLUX1_DEV_TENSORS = 1160
OMGSR_F_LORA_MODULES, OMGSR_F_LORA_PARAMS = 343, 179_507_200


def _size(tree) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def abstract_dev():
  model = FluxTransformer2DModel.from_config(FLUX1_DEV_CONFIG, param_dtype=jnp.bfloat16)
  return jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']


def test_flux1_dev_parameter_count(abstract_dev):
  assert _size(abstract_dev) == FLUX1_DEV_PARAMS
  assert len(jax.tree.leaves(abstract_dev)) == FLUX1_DEV_TENSORS
  assert _size(abstract_dev['transformer_blocks_18']) == DOUBLE_BLOCK_PARAMS
  assert _size(abstract_dev['single_transformer_blocks_37']) == SINGLE_BLOCK_PARAMS
  assert 'transformer_blocks_19' not in abstract_dev
  assert 'guidance_embedder' in abstract_dev['time_text_embed']
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(abstract_dev))


def test_flux1_dev_keys_and_shapes_equal_diffusers(abstract_dev):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  config = {k: v for k, v in FLUX1_DEV_CONFIG.items() if not k.startswith('_')}
  with torch.device('meta'):
    reference = diffusers.FluxTransformer2DModel(**config)
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  assert flax_to_torch_shapes(abstract_dev) == expected


def test_omgsr_f_lora_selects_343_modules(abstract_dev):
  config = lora.LoRAConfig(rank=64, alpha=64, target_modules=OMGSR_F_LORA_TARGETS, init='gaussian')
  paths = lora.target_paths(abstract_dev, config)
  assert len(paths) == OMGSR_F_LORA_MODULES
  names = [p[0] for p in paths]
  assert names.count('x_embedder') == 1
  assert sum(n.startswith('single_transformer_blocks_') for n in names) == 38 * 3
  assert all(p[1] == 'attn' and p[2] in ('to_q', 'to_k', 'to_v') for p in paths
             if p[0].startswith('single_'))
  tree = jax.eval_shape(lambda: lora.init_lora_params(jax.random.key(0), abstract_dev, config))
  assert _size(tree) == OMGSR_F_LORA_PARAMS
  a = tree['transformer_blocks_0']['attn']['to_q']
  assert (a['lora_A'].shape, a['lora_B'].shape) == ((3072, 64), (64, 3072))


EIGHT_DEVICE_CHECKS = textwrap.dedent('''
  import json, math
  import jax, jax.numpy as jnp, numpy as np
  from sr_jax import sharding
  from sr_jax.models import lora
  from sr_jax.models.flux import FLUX1_DEV_CONFIG, OMGSR_F_LORA_TARGETS, FluxTransformer2DModel

  out = {'devices': jax.device_count()}
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 8})

  # Full-size FLUX.1-dev, bf16, FSDP: bytes each device holds.
  model = FluxTransformer2DModel.from_config(FLUX1_DEV_CONFIG, param_dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *model.dummy_inputs())['params']
  shards = sharding.fsdp_shardings(shapes, mesh)
  nbytes = lambda shape, dtype: math.prod(shape) * jnp.dtype(dtype).itemsize
  leaves = list(zip(jax.tree.leaves(shapes), jax.tree.leaves(shards)))
  out['total_bytes'] = sum(nbytes(s.shape, s.dtype) for s, _ in leaves)
  out['per_device_bytes'] = sum(nbytes(sh.shard_shape(s.shape), s.dtype) for s, sh in leaves)
  out['replicated_bytes'] = sum(nbytes(s.shape, s.dtype) for s, sh in leaves
                                if sh.shard_shape(s.shape) == tuple(s.shape))

  # Tiny model, remat per block, FSDP-split params and LoRA, batch split 8 ways: LoRA grads equal
  # those of the unsharded, non-remat model.
  cfg = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16,
             guidance_embeds=True, axes_dims_rope=(4, 6, 6))
  tiny = FluxTransformer2DModel.from_config(cfg)
  params = jax.jit(tiny.init)(jax.random.key(0), *tiny.dummy_inputs())['params']
  config = lora.LoRAConfig(rank=8, alpha=8, target_modules=OMGSR_F_LORA_TARGETS, init='gaussian')
  tree = lora.init_lora_params(jax.random.key(1), params, config)
  tree = jax.tree.map(lambda a: a + 0.1, tree)  # B != 0, so every LoRA factor gets a gradient
  rng = np.random.default_rng(0)
  batch = (rng.standard_normal((8, 4, 6, 4)), np.linspace(0.1, 0.9, 8),
           rng.standard_normal((8, 5, 24)), rng.standard_normal((8, 16)), np.full((8,), 3.5))
  batch = tuple(np.asarray(b, np.float32) for b in batch)

  def loss_fn(m):
    def loss(tr, p, *inputs):
      return jnp.mean(lora.apply(m, p, tr, config, *inputs) ** 2)
    return jax.value_and_grad(loss)

  ref_loss, ref_grads = jax.jit(loss_fn(tiny))(tree, params, *batch)
  small = 1024  # shard the tiny kernels too
  p_sh, t_sh = (sharding.fsdp_shardings(t, mesh, min_size=small) for t in (params, tree))
  b_sh = sharding.batch_sharding(mesh)
  step = jax.jit(loss_fn(tiny.clone(remat=True)), in_shardings=(t_sh, p_sh) + (b_sh,) * 5)
  compiled = step.lower(tree, params, *batch).compile()
  # nn.remat puts each block in a `remat2` (the CPU attention checkpoints its chunks anyway).
  forward = lambda m: jax.make_jaxpr(lambda p: m.apply({'params': p}, *batch))(params)
  out['checkpoints'] = [str(forward(m)).count('remat2[') for m in (tiny, tiny.clone(remat=True))]
  out['sharded_params'] = sum(not s.is_fully_replicated for s in jax.tree.leaves(p_sh))
  loss, grads = compiled(sharding.put_global(tree, t_sh), sharding.put_global(params, p_sh),
                         *sharding.put_global(batch, (b_sh,) * 5))
  out['loss'], out['ref_loss'] = float(loss), float(ref_loss)
  out['grad_max_err'] = max(float(jnp.abs(a - b).max()) for a, b in
                            zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
  out['grad_scale'] = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(ref_grads))
  out['grad_spec'] = str(jax.tree.leaves(grads)[0].sharding.spec)
  print(json.dumps(out))
''')


def test_fsdp_on_eight_devices_and_remat_per_block():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             JAX_DEFAULT_MATMUL_PRECISION='highest',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-c', EIGHT_DEVICE_CHECKS], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['devices'] == 8
  total, per_device = out['total_bytes'], out['per_device_bytes']
  replicated = out['replicated_bytes']
  print(f"FLUX.1-dev bf16: {total / 2**30:.2f} GiB total, {per_device / 2**30:.3f} GiB per device "
        f"under fsdp=8 ({replicated / 2**20:.1f} MiB replicated)")
  assert total == 2 * FLUX1_DEV_PARAMS
  assert per_device == pytest.approx((total - replicated) / 8 + replicated)
  assert replicated < 0.002 * total  # biases, norm scales: each below the FSDP size threshold
  assert per_device <= total / 8 + replicated
  assert out['sharded_params'] > 0
  plain, remat = out['checkpoints']
  assert remat >= plain + 4, out['checkpoints']  # one per block of the tiny model (2 + 2)
  assert out['loss'] == pytest.approx(out['ref_loss'], rel=1e-5)
  assert out['grad_max_err'] <= 1e-4 * max(1.0, out['grad_scale']), out
