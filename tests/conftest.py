"""Shared test setup: CPU only, fp32 matmuls, absl flags parsed (grain needs them in workers), and a
persistent XLA compilation cache shared with the subprocesses tests start (the tiny OMGSR step takes
a minute to compile on 2 cores; trainer runs with the same config then reuse it)."""
import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='sr_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '2')

import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope='session')
def tiny_train_runs(tmp_path_factory):
  """{devices: workdir} of `train.py --config=configs/omgsr.py:tiny` (2 steps) on 1 and 8 devices."""
  import tiny_runs  # pylint: disable=g-import-not-at-top
  runs = {}
  for devices in (1, 8):
    workdir = str(tmp_path_factory.mktemp(f'train_py_{devices}dev'))
    result = tiny_runs.run_train_py(workdir, devices)
    assert result.returncode == 0, result.stderr[-4000:]
    runs[devices] = workdir
  return runs
