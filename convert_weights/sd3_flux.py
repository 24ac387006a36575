"""``convert_weights sd3`` and ``convert_weights flux``: an SD3 / SD3.5 or FLUX.1 diffusers pipeline
into a converted root.

::

  python -m convert_weights sd3 --src stabilityai/stable-diffusion-3.5-medium --out ckpt/sd35m \\
      [--prompt TEXT ...] [--max-sequence-length 256] [--dtype source] [--max-shard-size 2GB] \\
      [--text-encoder-dtype float32] [--variant V] [--revision R] [--allow-pickle]
  python -m convert_weights flux --src black-forest-labs/FLUX.1-dev --out ckpt/flux1-dev \\
      [--prompt TEXT ...] [--max-sequence-length 512] ...

Writes ``OUT/transformer`` (kind ``sd3_transformer`` / ``flux_transformer``) and ``OUT/vae``
(float32) as converted folders (`sr_jax.pretrained`), ``OUT/scheduler_config.json`` (copied), and
the text embeddings of the empty prompt and of each ``--prompt``, with their pooled embeddings
(`convert_weights.text_embeddings`; read back with ``pretrained.load_pooled_prompt_embeds``).
The transformer is converted one tensor at a time into shards of ``--max-shard-size``: peak memory
is about one shard, whatever the checkpoint's size (FLUX.1-dev: 23.8 GB). ``--dtype source`` (the
default) keeps the checkpoint's dtype (bf16 for FLUX.1-dev), a float32 copy would double the disk
for no information; loaders cast to their ``param_dtype``. Every input file (scheduler config,
tokenizers, text-encoder weights) is checked before the long conversion starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from typing import Callable

from convert_weights.source import (DIFFUSERS_STEMS, TRANSFORMERS_STEMS, resolve_source,
                                    weight_patterns)


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
  """What one pipeline family holds and how its prompts are encoded."""
  transformer_kind: str
  text_encoders: tuple[tuple[str, str], ...]  # (encoder subfolder, tokenizer subfolder)
  default_t5_length: int
  encoder_name: str  # function of convert_weights.text_embeddings


PIPELINES = {
    'sd3': PipelineSpec('sd3_transformer', (('text_encoder', 'tokenizer'),
                                            ('text_encoder_2', 'tokenizer_2'),
                                            ('text_encoder_3', 'tokenizer_3')), 256,
                        'encode_sd3_prompts'),
    'flux': PipelineSpec('flux_transformer', (('text_encoder', 'tokenizer'),
                                              ('text_encoder_2', 'tokenizer_2')), 512,
                         'encode_flux_prompts'),
}
HELP = {'sd3': 'SD3 / SD3.5 MMDiT + 16-channel VAE + CLIP-L/CLIP-G/T5 prompt embeddings',
        'flux': 'FLUX.1 transformer + 16-channel VAE + T5/CLIP-L prompt embeddings'}


def add_parsers(commands: argparse._SubParsersAction) -> None:
  for name, spec in PIPELINES.items():
    sub = commands.add_parser(name, help=HELP[name])
    sub.add_argument('--src', required=True, help='local pipeline folder or hub repo id')
    sub.add_argument('--out', required=True, help='output folder')
    sub.add_argument('--prompt', action='append', default=[], metavar='TEXT',
                     help='prompt to encode (repeatable); the empty prompt is always encoded')
    sub.add_argument('--max-sequence-length', type=int, default=spec.default_t5_length,
                     help=f'T5 tokens (diffusers default {spec.default_t5_length}'
                          f'{"; DiT4SR trains with 77" if name == "sd3" else ""})')
    sub.add_argument('--dtype', default='source',
                     choices=('source', 'float32', 'bfloat16', 'float16'),
                     help="transformer storage dtype ('source': the checkpoint's); the VAE is "
                          'stored in float32')
    sub.add_argument('--max-shard-size', default='2GB',
                     help='largest params file of the converted folders (e.g. 2GB, 5GiB)')
    sub.add_argument('--text-encoder-dtype', default='float32', choices=('float32', 'bfloat16'),
                     help='dtype the text encoders run in (T5-XXL needs ~19 GB RAM in float32)')
    sub.add_argument('--revision', default=None, help='hub revision (branch, tag or commit)')
    sub.add_argument('--variant', default=None, help='weight file variant, e.g. fp16')
    sub.add_argument('--allow-pickle', action='store_true',
                     help='also read *.bin pickles (unpickling can run code: trusted files only)')


def hub_patterns(spec: PipelineSpec, *, variant: str | None, allow_pickle: bool) -> list[str]:
  """The files of the pipeline repository that the conversion reads."""
  patterns = ['model_index.json', 'scheduler/scheduler_config.json']
  for sub in ('transformer', 'vae'):
    patterns += weight_patterns(sub, DIFFUSERS_STEMS, variant=variant, allow_pickle=allow_pickle)
  for encoder, tokenizer in spec.text_encoders:
    patterns.append(f'{tokenizer}/*')
    patterns += weight_patterns(encoder, TRANSFORMERS_STEMS, variant=variant,
                                allow_pickle=allow_pickle)
  return patterns


def _unique_prompts(prompts: list[str]) -> list[str]:
  """The empty prompt first (the null prompt every method needs), then each given one once."""
  return list(dict.fromkeys(['', *prompts]))


def _check_embeddings_fit(transformer_config: dict, embeds, pooled) -> None:
  """The text widths the transformer takes must be the encoders' (else the pipeline is mixed up)."""
  want = (transformer_config.get('joint_attention_dim'),
          transformer_config.get('pooled_projection_dim'))
  got = (embeds.shape[-1], pooled.shape[-1])
  if want != got:
    raise ValueError(f'the text encoders give prompt / pooled widths {got}, the transformer takes '
                     f'joint_attention_dim / pooled_projection_dim {want}')


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> None:
  """Converts the pipeline ``args.src`` into ``args.out`` (module docstring)."""
  from convert_weights import text_embeddings  # imports sr_jax (jax); torch only when encoding
  from sr_jax import pretrained
  from sr_jax.safetensors_io import parse_size

  spec = PIPELINES[args.command]
  max_shard_bytes = parse_size(args.max_shard_size)
  root = resolve_source(args.src, revision=args.revision,
                        allow_patterns=hub_patterns(spec, variant=args.variant,
                                                    allow_pickle=args.allow_pickle))
  scheduler_config = os.path.join(root, 'scheduler', 'scheduler_config.json')
  if not os.path.isfile(scheduler_config):
    raise FileNotFoundError(f'missing {scheduler_config}')
  for encoder, tokenizer in spec.text_encoders:  # before the long transformer conversion
    text_embeddings.check_folders(root, encoder, tokenizer, variant=args.variant,
                                  allow_pickle=args.allow_pickle)
  parts = ((spec.transformer_kind, 'transformer', args.dtype), ('vae', 'vae', 'float32'))
  for kind, sub, dtype in parts:
    out = os.path.join(args.out, sub)
    pretrained.convert_folder(os.path.join(root, sub), out, kind, source=f'{args.src}/{sub}',
                              dtype=dtype, variant=args.variant, allow_pickle=args.allow_pickle,
                              max_shard_size=max_shard_bytes)
    log(f'{kind}: {os.path.join(root, sub)} -> {out} ({dtype})')
  shutil.copyfile(scheduler_config, os.path.join(args.out, pretrained.SCHEDULER_CONFIG_FILE))

  import torch
  prompts = _unique_prompts(args.prompt)
  encode = getattr(text_embeddings, spec.encoder_name)
  encoded = encode(root, prompts, max_sequence_length=args.max_sequence_length,
                   variant=args.variant, allow_pickle=args.allow_pickle,
                   dtype=getattr(torch, args.text_encoder_dtype))
  embeds, pooled = [e for e, _ in encoded], [p for _, p in encoded]
  with open(os.path.join(root, 'transformer', pretrained.CONFIG_FILE)) as f:
    _check_embeddings_fit(json.load(f), embeds[0], pooled[0])
  pretrained.save_prompt_embeds(args.out, prompts, embeds, pooled=pooled,
                                source=f'{args.src} ({", ".join(e for e, _ in spec.text_encoders)})')
  pretrained.mark_pipeline_root(args.out, source=args.src, parts=('transformer', 'vae'),
                                kind=args.command)
  log(f'prompt embeddings {embeds[0].shape}, pooled {pooled[0].shape} for {prompts!r} -> '
      f'{os.path.join(args.out, pretrained.PROMPT_EMBEDS_FILE)}')
