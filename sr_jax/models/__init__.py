"""Flax linen modules, one file per model family (NHWC throughout).

Param names mirror the PyTorch reference modules so checkpoints convert mechanically; see
`sr_jax/weights.py` for the convention.
"""
