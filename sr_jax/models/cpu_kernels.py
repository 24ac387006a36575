"""Convolution and attention that run fast on XLA:CPU, numerically equivalent to the plain lax ops.

XLA:CPU lowers convolutions to Eigen and ``jax.nn.dot_product_attention`` to a plain softmax over
the whole score tensor; on the models of this project that made the jitted JAX forward slower than
PyTorch eager on the same CPU (benchmarks/models_vs_torch.py, benchmarks/RESULTS.md). The functions
here take other routes on the CPU backend only, chosen when the model is traced; on GPU/TPU they are
exactly the lax / cuDNN ops:

* :func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` that Flax's ``nn.Conv``
  takes as its ``conv_general_dilated`` attribute, so modules, param names and LoRA interception are
  unchanged. On CPU it computes
  - depthwise convolutions (ConvNeXt's 7x7) as a sum of shifted multiply-adds, one block of channels
    per loop step: Eigen has no depthwise kernel;
  - (no im2col route: convolutions of small maps as one matmul of the image patches were up to
    15% faster on the UNet's 16x16 level, but with the batch split over several CPU devices the
    program gave wrong scores for some images (2026-12-03, ea-DISTS of TUDSR's 8-device test);
    XLA's convolution is used there instead;)
  - stride-1 3x3 float32 convolutions over at least ``WINOGRAD_MIN_PIXELS`` output pixels (the VAE
    at 128² and above) with Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016): 16
    batched matmuls instead of 36 multiply-adds per output 2x2 tile. The transforms only add and
    halve, so fp32 rounding stays at the level of the direct sum.
  The thresholds come from per-shape and whole-model timings on the 2-core development VM (the
  figures are in benchmarks/RESULTS.md, "Models vs PyTorch"): elsewhere (the UNet's 64x64 and
  32x32 levels) XLA's own convolution was the fastest of the three.
* Compile model code with :func:`sr_jax.xla.compiler_options` (no YNNPACK fusions on the CPU).
* :func:`dot_product_attention` keeps cuDNN on GPU and otherwise runs matmuls over (head, query
  block) steps (``lax.map``), so a step's keys, values and float32 scores stay cache-sized and XLA
  never rearranges a score-sized tensor; the softmax is exact (max-subtracted, float32; the max via
  :func:`row_max`, since XLA:CPU does not vectorise a max reduction). Like flash
  attention, the backward pass recomputes each chunk's scores instead of keeping them (kept, the
  SD2.1 UNet's five 4096-token self-attentions would hold 5 x 5 heads x 4096^2 float32 scores).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from sr_jax.xla import on_cpu

# Per-image output sizes (H x W) where Winograd beats XLA's convolution (fp32, batch 1; the timings
# are in benchmarks/RESULTS.md): from 128x128 (the VAE); at the UNet's 64x64 level XLA's was faster.
WINOGRAD_MIN_PIXELS = 128 * 128
# CPU attention block: about this many float32 scores (8 MiB) per (head, query block) step.
ATTENTION_CHUNK_SCORES = 1 << 21
# Row max over the keys: elementwise maximum of slices this wide (128-256 were equally fast).
ROW_MAX_SLICE = 128
# Depthwise convolution: channels per loop step (64 float32 = one 256-byte run per pixel).
DEPTHWISE_CHANNEL_BLOCK = 64

# F(2x2, 3x3) transforms: kernel G, input B^T and output A^T (Lavin & Gray 2016, Eq. 7-8).
_WINOGRAD_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float32)


def _is_nhwc_hwio(dimension_numbers: Any, ndim: int) -> bool:
  if ndim != 4:
    return False
  if dimension_numbers is None:  # lax's default is NCHW/OIHW
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return (tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
            and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
            and tuple(dimension_numbers.out_spec) == (0, 3, 1, 2))
  return tuple(dimension_numbers) == ('NHWC', 'HWIO', 'NHWC')


def _trivial(seq: Sequence[int] | None) -> bool:
  return seq is None or all(s == 1 for s in seq)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` with CPU fast paths for NHWC/HWIO depthwise and 3x3 convs."""
  simple = (on_cpu() and _is_nhwc_hwio(dimension_numbers, lhs.ndim) and not isinstance(padding, str)
            and _trivial(window_strides) and _trivial(lhs_dilation) and _trivial(rhs_dilation)
            and batch_group_count == 1 and preferred_element_type is None)
  if simple:
    padding = tuple(tuple(p) for p in padding)
    channels = lhs.shape[-1]
    if feature_group_count == channels > 1 and rhs.shape[2:] == (1, channels):
      return depthwise_conv(lhs, rhs, padding)
    # Per image, not per batch: the algorithm (and so the rounding) of one example must not depend on
    # how a batch is split over devices, or 1 and 8 devices would train differently.
    out_pixels = ((lhs.shape[1] + sum(padding[0]) - rhs.shape[0] + 1)
                  * (lhs.shape[2] + sum(padding[1]) - rhs.shape[1] + 1))
    dense = feature_group_count == 1 and lhs.dtype == rhs.dtype == jnp.float32
    if dense and rhs.shape[:2] == (3, 3) and out_pixels >= WINOGRAD_MIN_PIXELS:
      return winograd_conv3x3(lhs, rhs, padding, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def depthwise_conv(x: jax.Array, kernel: jax.Array,
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """Stride-1 depthwise convolution, NHWC input and (kh, kw, 1, C) kernel, as shifted
  multiply-adds accumulated in float32 at least, one block of channels per loop step.

  The loop is what makes XLA keep the result: written as one expression, XLA fused the 49
  multiply-adds into each consumer (ConvNeXt's LayerNorm: mean, mean of squares, normalisation) and
  so computed the convolution three times. Each kernel row is summed on its own and the rows
  pairwise: one chain of 49 dependent adds kept the CPU waiting on each add's latency.
  """
  kh, kw = kernel.shape[:2]
  acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
  xp = jnp.pad(x.astype(acc_dtype), ((0, 0), padding[0], padding[1], (0, 0)))
  h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  k = kernel.astype(acc_dtype)
  channels = x.shape[-1]
  block = _channel_block(channels)

  def conv_block(index, out):
    xs = lax.dynamic_slice_in_dim(xp, index * block, block, axis=3)
    ks = lax.dynamic_slice_in_dim(k, index * block, block, axis=3)
    rows = []
    for i in range(kh):
      row = xs[:, i:i + h, :w, :] * ks[i, 0, 0]
      for j in range(1, kw):
        row = row + xs[:, i:i + h, j:j + w, :] * ks[i, j, 0]
      rows.append(row)
    while len(rows) > 1:  # pairwise, so the rows' sums do not wait on one another
      rows = [rows[r] + rows[r + 1] if r + 1 < len(rows) else rows[r]
              for r in range(0, len(rows), 2)]
    return lax.dynamic_update_slice_in_dim(out, rows[0], index * block, axis=3)

  out = jnp.zeros(x.shape[:1] + (h, w, channels), acc_dtype)
  out = lax.fori_loop(0, channels // block, conv_block, out)
  return out.astype(jnp.result_type(x.dtype, kernel.dtype))


def _channel_block(channels: int) -> int:
  """The largest divisor of ``channels`` up to DEPTHWISE_CHANNEL_BLOCK that leaves >= 2 blocks (XLA
  drops a one-step loop, and with it the materialisation)."""
  limit = min(DEPTHWISE_CHANNEL_BLOCK, max(1, channels // 2))
  return next(d for d in range(limit, 0, -1) if channels % d == 0)


def _bt(d: list) -> list:
  """B^T d along one tile axis (4 input rows -> 4 transformed rows)."""
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _at(m: list) -> list:
  """A^T m along one tile axis (4 transformed rows -> 2 output rows)."""
  return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def winograd_conv3x3(x: jax.Array, kernel: jax.Array,
                     padding: tuple[tuple[int, int], tuple[int, int]],
                     precision: Any = None) -> jax.Array:
  """Stride-1 3x3 convolution (NHWC, HWIO kernel) by Winograd F(2x2, 3x3).

  Output tile (a, b) covers rows/cols 2a..2a+1 / 2b..2b+1 and reads a 4x4 input patch:
  ``Y = A^T [(G g G^T) * (B^T d B)] A``, the elementwise product being 16 matmuls over channels.
  The transformed input is 4x the input, so a batch runs image by image (``lax.map``): memory stays
  that of one image (a batch of 8 at 512² would otherwise hold 8 x 4 x 256² x 128 floats per VAE
  conv).

  Derivatives (:func:`_winograd_jvp`) are those of the direct convolution, which is the same linear
  map: differentiating the transforms instead would keep 4x-sized tiles for the backward pass.
  """
  if x.shape[0] > 1:
    return lax.map(lambda image: _winograd_batch(image[None], kernel, padding, precision)[0], x)
  return _winograd_batch(x, kernel, padding, precision)


def _direct_conv3x3(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)


@functools.partial(winograd_conv3x3.defjvp, symbolic_zeros=True)
def _winograd_jvp(padding, precision, primals, tangents):
  """Tangents through the direct convolution; a frozen (undifferentiated) operand adds no term, so
  no gradient of a frozen kernel is ever formed and ``x`` is not kept when only ``x`` is perturbed."""
  x, kernel = primals
  dx, dkernel = tangents
  out = winograd_conv3x3(x, kernel, padding, precision)
  terms = []
  if not isinstance(dx, SymbolicZero):
    terms.append(_direct_conv3x3(dx, kernel, padding, precision))
  if not isinstance(dkernel, SymbolicZero):
    terms.append(_direct_conv3x3(x, dkernel, padding, precision))
  return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


def _winograd_batch(x: jax.Array, kernel: jax.Array,
                    padding: tuple[tuple[int, int], tuple[int, int]],
                    precision: Any = None) -> jax.Array:
  b, _, _, cin = x.shape
  cout = kernel.shape[-1]
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_h, out_w = xp.shape[1] - 2, xp.shape[2] - 2
  th, tw = (out_h + 1) // 2, (out_w + 1) // 2  # tiles; odd sizes get one padded row/col, cropped
  xp = jnp.pad(xp, ((0, 0), (0, 2 * th + 2 - xp.shape[1]), (0, 2 * tw + 2 - xp.shape[2]), (0, 0)))
  g = jnp.asarray(_WINOGRAD_G)
  u = jnp.einsum('ai,ijcd,bj->abcd', g, kernel, g, precision=lax.Precision.HIGHEST)
  d = [[xp[:, i:i + 2 * th:2, j:j + 2 * tw:2, :] for j in range(4)] for i in range(4)]
  cols = [_bt([d[i][j] for i in range(4)]) for j in range(4)]  # cols[j][r]: rows transformed
  v = [_bt([cols[j][r] for j in range(4)]) for r in range(4)]   # v[r][s]: both transformed
  v = jnp.stack([v[r][s] for r in range(4) for s in range(4)]).reshape(16, b * th * tw, cin)
  m = jnp.matmul(v, u.reshape(16, cin, cout), precision=precision)
  m = m.reshape(4, 4, b, th, tw, cout)
  rows = _at([m[r] for r in range(4)])                     # 2 x (4, b, th, tw, cout)
  y = [_at([rows[p][s] for s in range(4)]) for p in range(2)]  # y[p][q]: output (2a+p, 2b+q)
  y = jnp.stack([jnp.stack(y[p], axis=3) for p in range(2)], axis=2)  # (b, th, 2, tw, 2, cout)
  return y.reshape(b, 2 * th, 2 * tw, cout)[:, :out_h, :out_w]


def row_max(x: jax.Array, width: int = ROW_MAX_SLICE) -> jax.Array:
  """``x.max(axis=-1)``, exactly, as the elementwise maximum of ``width``-wide column slices, then
  the max over ``width``: XLA:CPU does not vectorise a max reduction along the minor axis (NaN
  propagation), but does an elementwise maximum."""
  n = x.shape[-1]
  if n % width or n < 2 * width:
    return x.max(axis=-1)
  slices = [lax.slice_in_dim(x, i, i + width, axis=x.ndim - 1) for i in range(0, n, width)]
  return functools.reduce(jnp.maximum, slices).max(axis=-1)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          implementation: str | None = None) -> jax.Array:
  """``jax.nn.dot_product_attention`` (B, L, heads, D) layout, scale ``D ** -0.5``, no mask.

  ``implementation`` ('cudnn' or None) is honoured off the CPU; on the CPU the chunked
  heads-major path runs instead (see the module docstring).
  """
  if not on_cpu():
    return jax.nn.dot_product_attention(query, key, value, implementation=implementation)
  return chunked_attention(query, key, value)


def chunked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      chunk_scores: int | None = None) -> jax.Array:
  """Exact softmax attention, one head and a block of queries at a time (``lax.map``): each step
  scores a block of about ``chunk_scores`` (default `ATTENTION_CHUNK_SCORES`) queries x keys
  against that head's keys and values only, which stay cache-resident (faster than all heads per
  step on SD2.1's 4096-token layers)."""
  b, lq, heads, d = query.shape
  lk, dv = key.shape[1], value.shape[-1]
  bh = b * heads
  scale = jnp.asarray(d ** -0.5, query.dtype)
  q = (query * scale).transpose(0, 2, 1, 3).reshape(bh, lq, d)
  k = key.transpose(0, 2, 1, 3).reshape(bh, lk, d)
  v = value.transpose(0, 2, 1, 3).reshape(bh, lk, dv)
  rows = max(1, (chunk_scores or ATTENTION_CHUNK_SCORES) // lk)
  rows = min(1 << (rows.bit_length() - 1), lq)  # a power of two, or all queries
  blocks = -(-lq // rows)
  q = jnp.pad(q, ((0, 0), (0, blocks * rows - lq), (0, 0))).reshape(bh * blocks, rows, d)

  @jax.checkpoint  # backward: recompute this block's scores rather than storing all of them
  def attend(step: tuple[jax.Array, jax.Array]) -> jax.Array:
    index, q_block = step
    k_head, v_head = k[index // blocks], v[index // blocks]
    scores = jnp.einsum('qd,kd->qk', q_block, k_head, preferred_element_type=jnp.float32)
    # The max only keeps exp in range; softmax does not depend on it (so no gradient through it).
    weights = jnp.exp(scores - lax.stop_gradient(row_max(scores))[:, None])
    out = jnp.einsum('qk,kd->qd', weights.astype(v.dtype), v_head,
                     preferred_element_type=jnp.float32)
    return (out / weights.sum(axis=-1, keepdims=True)).astype(query.dtype)

  out = lax.map(attend, (jnp.arange(bh * blocks), q))
  out = out.reshape(bh, blocks * rows, dv)[:, :lq]
  return out.reshape(b, heads, lq, dv).transpose(0, 2, 1, 3)
