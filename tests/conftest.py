"""Shared test setup: CPU only, fp32 matmuls, absl flags parsed (grain needs them in workers)."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_DEFAULT_MATMUL_PRECISION', 'highest')

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
