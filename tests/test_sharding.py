"""Mesh and sharding helpers: FSDP splits large arrays along the fsdp axis, batches split along the
data axes, state is created already sharded. Multi-device checks run in a subprocess with 8 fake CPU
devices (XLA_FLAGS must be set before jax is imported, and this pytest process has imported it)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from sr_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape_resolution():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 1}, 8) == (8, 1)
  assert sharding.mesh_shape({'data': -1, 'fsdp': 2}, 8) == (4, 2)
  assert sharding.mesh_shape({'data': 2, 'fsdp': -1}, 8) == (2, 4)
  assert sharding.mesh_shape(None, 1) == (1, 1)
  with pytest.raises(ValueError):
    sharding.mesh_shape({'data': 3, 'fsdp': 1}, 8)
  with pytest.raises(ValueError):
    sharding.mesh_shape({'data': -1, 'fsdp': -1}, 8)
  with pytest.raises(ValueError):
    sharding.mesh_shape({'tensor': 2}, 8)


def test_fsdp_spec_picks_largest_divisible_axis():
  big = 2 ** 20
  assert sharding.fsdp_spec((3, 3, 320, 640), 4) == P(None, None, None, 'fsdp')
  assert sharding.fsdp_spec((2048, 1023), 4) == P('fsdp', None)       # 1023 does not divide
  assert sharding.fsdp_spec((4096, 4096), 4) == P(None, 'fsdp')      # tie: the later axis
  assert sharding.fsdp_spec((2047, 1025), 4) == P()                  # nothing divides
  assert sharding.fsdp_spec((8, 8), 4) == P()                        # small: replicated
  assert sharding.fsdp_spec((8, 8), 4, min_size=64) == P(None, 'fsdp')
  assert sharding.fsdp_spec((big,), 1) == P()                        # no fsdp axis to use


def test_initialize_distributed_is_a_no_op_on_one_host(monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_JOB_ID',
              'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(var, raising=False)
  assert not sharding._multi_process_env_present()  # pylint: disable=protected-access
  sharding.initialize_distributed('auto')
  sharding.initialize_distributed('off')
  monkeypatch.setenv('SLURM_JOB_ID', '1')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not sharding._multi_process_env_present()  # pylint: disable=protected-access
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert sharding._multi_process_env_present()  # pylint: disable=protected-access
  with pytest.raises(ValueError):
    sharding.initialize_distributed('sometimes')


EIGHT_DEVICE_CHECKS = textwrap.dedent('''
  import json
  import jax, jax.numpy as jnp, numpy as np
  from sr_jax import sharding

  out = {'devices': jax.device_count()}
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 4})
  out['mesh'] = dict(mesh.shape)
  out['axis_types'] = [str(t) for t in mesh.axis_types]

  # A large frozen array (UNet-conv-like) and a small one, placed from host numpy.
  frozen = {'conv': np.arange(3 * 3 * 64 * 128, dtype=np.float32).reshape(3, 3, 64, 128),
            'bias': np.ones((128,), np.float32)}
  placed = sharding.put_global(frozen, sharding.fsdp_shardings(frozen, mesh, min_size=1024))
  out['conv_spec'] = str(placed['conv'].sharding.spec)
  out['conv_shard_shapes'] = sorted({s.data.shape for s in placed['conv'].addressable_shards})
  out['bias_spec'] = str(placed['bias'].sharding.spec)
  out['conv_roundtrip'] = bool(np.array_equal(np.asarray(placed['conv']), frozen['conv']))

  # A batch from host data: split along the batch axis over data x fsdp (8 shards of 2).
  batch = sharding.shard_batch({'lq': np.zeros((16, 8, 8, 3), np.float32)}, mesh)
  out['batch_spec'] = str(batch['lq'].sharding.spec)
  out['batch_shard_shapes'] = sorted({s.data.shape for s in batch['lq'].addressable_shards})

  # State created already sharded: jit(init, out_shardings) from eval_shape.
  def init(rng):
    return {'w': jax.random.uniform(rng, (256, 64)), 'b': jnp.zeros((64,)), 'key': rng}
  abstract, shardings = sharding.abstract_state(init, jax.random.key(0, impl='unsafe_rbg'), mesh,
                                                min_size=1024)
  state = sharding.create_sharded_state(init, jax.random.key(0, impl='unsafe_rbg'), shardings)
  out['state_w_spec'] = str(state['w'].sharding.spec)
  out['state_w_shard_shapes'] = sorted({s.data.shape for s in state['w'].addressable_shards})
  out['abstract_w_sharding_matches'] = abstract['w'].sharding == state['w'].sharding
  out['state_key_spec'] = str(state['key'].sharding.spec)
  print(json.dumps(out))
''')


def test_sharding_helpers_on_eight_devices():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  proc = subprocess.run([sys.executable, '-c', EIGHT_DEVICE_CHECKS], env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['devices'] == 8 and out['mesh'] == {'data': 2, 'fsdp': 4}
  assert all('Auto' in t for t in out['axis_types'])
  # Largest divisible axis (128 output channels) split 4 ways; replicated over data.
  assert out['conv_spec'] == str(P(None, None, None, 'fsdp'))
  assert out['conv_shard_shapes'] == [[3, 3, 64, 32]]
  assert out['conv_roundtrip']
  assert out['bias_spec'] == str(P())
  assert out['batch_spec'] == str(P(('data', 'fsdp')))
  assert out['batch_shard_shapes'] == [[2, 8, 8, 3]]
  assert out['state_w_spec'] == str(P('fsdp', None))
  assert out['state_w_shard_shapes'] == [[64, 64]]
  assert out['abstract_w_sharding_matches']
  assert out['state_key_spec'] == str(P())
