"""The two contracts a method module fulfils: training (:class:`Method`) and inference (:class:`Generator`).

A method is one module ``sr_jax/methods/<name>.py`` (registered in ``sr_jax/methods/__init__.py``, or
named by its dotted path in ``config.method``) that defines::

  make_method(config) -> Method              # what the trainer runs (train.py)
  load_generator(config, checkpoint) -> Generator   # what eval.py runs, from a training workdir
                                             # or from the method's exported bundle

The trainer, the evaluation loop and the inference pipeline only ever see these two objects.

Inference (``sr_jax.inference.pipeline``) runs a :class:`Generator` stage by stage. One
:class:`LatentStage` is the one-step SR every method here shares::

  x (upscaled LQ, [-1, 1]) --VAE encode (tiled when large)--> (mean, logvar) --sample, codec--> z_L
  z_L --[condition(params, x, z_L): once per whole image]--> cond
  z_L --step(params, z, noise, cond) per latent tile, outputs Gaussian-blended--> z_P
  z_P --codec^-1, VAE decode (tiled when large)--> clamp to [-1, 1]

``step`` maps a batch of latent tiles to clean-latent predictions (e.g. OMGSR Eq. 7 on the UNet's
epsilon). Because every one-step prediction here is affine in the backbone output with per-pixel
coefficients (``x0 = (z - c eps) / s``, ``x0 = z - sigma v``, ``x0 = eps - u``), blending the predicted
clean latents with normalised weights equals blending the backbone outputs first, as the reference
tile loops do. A method whose generator is not one latent step (TUDSR: x M at t1, then x N at t2
with a second LoRA) lists several stages; the pipeline resizes the image between them.

Params convention (one tree, ``Generator.params``, shared by the stages): ``params[stage.vae_key]`` are
the stage's plain VAE params (any LoRA on the encoder merged in); everything else is the method's,
read by its own ``step`` / ``condition`` (e.g. ``'unet'``, ``'prompt_embeds'``, or an unmerged
``'unet_lora'`` tree when two adapters share one backbone).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax

from sr_jax.diffusion.latents import LatentCodec


@dataclasses.dataclass(frozen=True)
class Method:
  """What a training method gives the trainer. All functions are pure and jit-compatible.

  Attributes:
    init_state: ``rng -> state``. The whole mutable train state as one pytree (trainable params,
      optimizer states, the method's own step counter and PRNG keys). Run under ``jax.jit`` with
      output shardings, so it must not read host data; typed keys (``jax.random.key``) are fine.
    train_step: ``(state, frozen, batch) -> (state, metrics)``. One optimizer step (every group's
      update, gradient accumulation if wanted). ``batch`` is ``{'hq', 'lq'}`` float32 NHWC in
      [-1, 1], sharded over the batch axis. ``metrics``: dict of scalars (loss terms, grad norms...),
      averaged over ``log_every`` steps by the trainer and checked for NaN/Inf. Module-level, no
      closures over arrays: the trainer jits it with donated ``state``.
    frozen: pytree of arrays that are read, never updated (pretrained weights, prompt embeddings).
      Not checkpointed: the method reloads them each run. Numpy or jax arrays; the trainer shards
      them. ``None`` if there are none.
    sample: ``(state, frozen, batch) -> {'lq', 'sr', 'hq'}`` NHWC images in [-1, 1] (LQ may be
      smaller) for the image grid; ``None`` to skip grids.
    export: ``(state, frozen, directory) -> None``: writes the deliverables (adapters, the
      inference bundle of :func:`sr_jax.methods.common.write_bundle`). Called on every process after
      the final checkpoint; it must gather what it needs (``sharding.gather_to_host``) and write
      files only on process 0.
    flops_per_sample: FLOPs (2 per multiply-add) of one training example, for TFLOP/s and MFU;
      ``None``: taken from XLA's cost analysis of the compiled step.
    updates_per_step: optimizer updates of each network made by one ``train_step`` call (TUDSR
      stage 2 updates once per chunk: N^2). The trainer counts steps in updates: the step number of
      logs and checkpoints, ``max_steps`` and the ``*_every`` intervals (which must then be
      multiples of it).
  """
  init_state: Callable[[jax.Array], Any]
  train_step: Callable[[Any, Any, dict], tuple[Any, dict]]
  frozen: Any = None
  sample: Callable[[Any, Any, dict], dict] | None = None
  export: Callable[[Any, Any, str], None] | None = None
  flops_per_sample: float | None = None
  updates_per_step: int = 1


StepFn = Callable[[Any, jax.Array, 'jax.Array | None', Any], jax.Array]
ConditionFn = Callable[[Any, jax.Array, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class LatentStage:
  """One one-step SR stage over a whole image (see the module docstring).

  Attributes:
    vae: the ``AutoencoderKL`` (both halves) that codes this stage's latents.
    codec: latent scaling and shift of that VAE.
    step: ``(params, z, noise, cond) -> z_pred`` on a batch of latent tiles (B, h, w, C), jittable.
      ``noise`` is a standard-normal array like ``z`` (drawn for the whole latent, then tiled) when
      ``uses_noise``, else None; ``cond`` is the per-image output of ``condition`` (None without).
    upscale: the pixel scale factor this stage adds.
    process_size: the training crop in pixels; latent tiles are ``process_size / vae factor``.
    resize: how the stage input is enlarged by ``upscale`` (PIL filter name): the first stage also
      follows the reference preprocessing (short side, multiple of 8), later ones only resize.
    condition: ``(params, images, z) -> cond`` for one whole image (batch 1): e.g. a degradation
      estimate or CLIP tokens of the LQ image, broadcast to every tile. None: no conditioning.
    uses_noise: whether ``step`` reads ``noise`` (e.g. a generator that starts from pure noise).
    vae_key: ``params[vae_key]`` are the VAE params; ``params[vae_key + '_lora']``, when present, a
      LoRA tree on the encoder (training; inference bundles merge it, which the tiled VAE needs).
    vae_lora: the ``LoRAConfig`` of that tree.
    name: for log lines.
    enlarge_small_inputs: the first stage's reference preprocessing: an input whose short side is
      below ``process_size / upscale`` is first enlarged to it (and the output resized back).
      False (TUDSR) runs small inputs at their own size.
  """
  vae: Any
  codec: LatentCodec
  step: StepFn
  upscale: int
  process_size: int
  resize: str = 'bicubic'
  condition: ConditionFn | None = None
  uses_noise: bool = False
  vae_key: str = 'vae'
  vae_lora: Any = None
  name: str = 'stage'
  enlarge_small_inputs: bool = True

  @property
  def vae_factor(self) -> int:
    return 2 ** (len(self.vae.block_out_channels) - 1)

  @property
  def latent_tile(self) -> int:
    return self.process_size // self.vae_factor


@dataclasses.dataclass(frozen=True)
class Generator:
  """A loaded generator for inference: its stages and the one params tree they read.

  ``source`` records what it was loaded from ({'method', 'checkpoint', 'kind': 'workdir' | 'bundle',
  'step', ...}); evaluation writes it next to the outputs. ``exact_output_size``: the output is
  resized to exactly input x upscale when the stages' multiple-of-8 crops changed it.
  """
  method: str
  stages: tuple[LatentStage, ...]
  params: Mapping[str, Any]
  source: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  exact_output_size: bool = False

  @property
  def upscale(self) -> int:
    return math.prod(stage.upscale for stage in self.stages)
