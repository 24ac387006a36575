"""Tiny random SD3 and FLUX diffusers pipelines (all parts, tokenizers included), built offline.

The tokenizers are made from vocabularies written here: a CLIP BPE tokenizer (vocab.json +
merges.txt) and a T5 Unigram tokenizer (transformers' ``T5Tokenizer(vocab=...)``, saved as
tokenizer.json), so nothing is downloaded. Text widths are chosen as in the real pipelines'
structure: SD3 CLIP-L + CLIP-G hidden (16 + 24) < T5 width (48) = the transformer's
joint_attention_dim, pooled = 16 + 24 projections; FLUX pooled = CLIP-L hidden (16). Every
transformer weight is random (`test_mmdit_vs_reference.randomise`), VAE norms too.
"""
from __future__ import annotations

import json
import os

import diffusers
import torch
import transformers

import test_mmdit_vs_reference as mmdit_ref
import tiny_diffusers as td

CLIP_LENGTH = 16
T5_WIDTH = 48
SPECIAL = {'bos_token': '<|startoftext|>', 'eos_token': '<|endoftext|>',
           'unk_token': '<|endoftext|>', 'pad_token': '<|endoftext|>'}
WORDS = ('hello', 'photo', 'sharp', 'a')
VAE16 = dict(block_out_channels=[8, 16], down_block_types=['DownEncoderBlock2D'] * 2,
             up_block_types=['UpDecoderBlock2D'] * 2, layers_per_block=1, latent_channels=16,
             norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False)
SD3_TRANSFORMER = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                       caption_projection_dim=32, pooled_projection_dim=40, pos_embed_max_size=12,
                       dual_attention_layers=(0,), qk_norm='rms_norm')
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                        pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def clip_tokenizer(folder: str) -> transformers.CLIPTokenizer:
  """A CLIP BPE tokenizer: letters, end-of-word letters and the merges of :data:`WORDS`."""
  os.makedirs(folder, exist_ok=True)
  letters = 'abcdefghijklmnopqrstuvwxyz'
  merges, tokens = [], ['<|startoftext|>', '<|endoftext|>', *letters, *(c + '</w>' for c in letters)]
  for word in WORDS:  # left-to-right merges: h e -> he, he l -> hel, ..., hell o</w> -> hello</w>
    pieces = list(word[:-1]) + [word[-1] + '</w>']
    while len(pieces) > 1:
      merges.append(f'{pieces[0]} {pieces[1]}')
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
      if pieces[0] not in tokens:
        tokens.append(pieces[0])
  with open(os.path.join(folder, 'vocab.json'), 'w') as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f)
  with open(os.path.join(folder, 'merges.txt'), 'w') as f:
    f.write('#version: 0.2\n' + '\n'.join(dict.fromkeys(merges)) + '\n')
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'tokenizer_class': 'CLIPTokenizer', 'model_max_length': CLIP_LENGTH, **SPECIAL}, f)
  return transformers.CLIPTokenizer.from_pretrained(folder)


def t5_tokenizer() -> transformers.T5Tokenizer:
  """A T5 Unigram tokenizer over whole words and letters (ids: pad 0, eos 1, unk 2)."""
  vocab = [('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0), ('\u2581', -2.0)]
  vocab += [(f'\u2581{w}', -3.0) for w in WORDS] + [(c, -5.0) for c in 'abcdefghijklmnopqrstuvwxyz']
  return transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def clip_encoder(vocab_size: int, hidden: int, with_projection: bool):
  config = transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
      num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, bos_token_id=0, eos_token_id=1,
      pad_token_id=1, projection_dim=hidden)
  cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
  return cls(config).eval()


def t5_encoder(vocab_size: int) -> transformers.T5EncoderModel:
  config = transformers.T5Config(
      vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      feed_forward_proj='gated-gelu', relative_attention_num_buckets=8,
      relative_attention_max_distance=16, decoder_start_token_id=0, pad_token_id=0,
      eos_token_id=1)
  return transformers.T5EncoderModel(config).eval()


def _vae() -> diffusers.AutoencoderKL:
  vae = diffusers.AutoencoderKL(**VAE16).eval()
  td._randomise_norms(vae, seed=3)  # pylint: disable=protected-access
  return vae


def _transformer(cls, config: dict, seed: int):
  torch.manual_seed(seed)
  model = cls(**config).eval()
  mmdit_ref.randomise(model, seed=seed + 1)
  return model


def sd3_pipeline(tmp: str) -> diffusers.StableDiffusion3Pipeline:
  """A tiny random StableDiffusion3Pipeline (tokenizers written under ``tmp``)."""
  torch.manual_seed(0)
  tok_l = clip_tokenizer(os.path.join(tmp, 'tok_l'))
  tok_g = clip_tokenizer(os.path.join(tmp, 'tok_g'))
  t5_tok = t5_tokenizer()
  return diffusers.StableDiffusion3Pipeline(
      transformer=_transformer(diffusers.SD3Transformer2DModel, SD3_TRANSFORMER, seed=1),
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(),
      text_encoder=clip_encoder(len(tok_l), 16, True), tokenizer=tok_l,
      text_encoder_2=clip_encoder(len(tok_g), 24, True), tokenizer_2=tok_g,
      text_encoder_3=t5_encoder(len(t5_tok)), tokenizer_3=t5_tok)


def flux_pipeline(tmp: str) -> diffusers.FluxPipeline:
  """A tiny random FluxPipeline (FLUX.1-dev-like: guidance embeds)."""
  torch.manual_seed(0)
  tok = clip_tokenizer(os.path.join(tmp, 'tok_l'))
  t5_tok = t5_tokenizer()
  return diffusers.FluxPipeline(
      transformer=_transformer(diffusers.FluxTransformer2DModel, FLUX_TRANSFORMER, seed=2),
      scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
      vae=_vae(), text_encoder=clip_encoder(len(tok), 16, False), tokenizer=tok,
      text_encoder_2=t5_encoder(len(t5_tok)), tokenizer_2=t5_tok)
