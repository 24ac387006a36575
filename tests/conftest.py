"""Shared test setup: CPU only, fp32 matmuls, absl flags parsed (grain needs them in workers), and a
persistent XLA compilation cache shared with the subprocesses tests start (the tiny OMGSR step takes
a minute to compile on 2 cores; trainer runs with the same config then reuse it)."""
import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='sr_jax_xla_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '2')

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
