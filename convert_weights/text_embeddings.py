"""Encodes fixed prompts once with an SD3 or FLUX pipeline's text encoders (transformers, PyTorch).

The formulas are diffusers' (0.42.1), which the tests check against the pipelines themselves:

* SD3 / SD3.5 (``pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py`` ``encode_prompt``;
  next-methods.md Sec. 1.4): each CLIP (``text_encoder`` CLIP-L, ``text_encoder_2`` CLIP-G, both
  ``CLIPTextModelWithProjection``) tokenises to its tokenizer's ``model_max_length`` (77; padded,
  truncated) and gives its penultimate hidden state ``hidden_states[-2]`` and its projected EOS
  embedding ``text_embeds``. The two hidden states are concatenated on channels (768 + 1280), zero
  padded to the T5 width (4096) and followed on the sequence axis by T5's (``text_encoder_3``,
  ``T5EncoderModel``) last hidden state over ``max_sequence_length`` tokens (diffusers' default 256;
  DiT4SR trains with 77): (1, 77 + L, 4096). Pooled: the two ``text_embeds`` concatenated (2048).
* FLUX.1 (``pipelines/flux/pipeline_flux.py`` ``encode_prompt``): T5 (``text_encoder_2``) last
  hidden state over ``max_sequence_length`` tokens (default 512): (1, 512, 4096); pooled: CLIP-L's
  (``text_encoder``, ``CLIPTextModel``) ``pooler_output`` (768). The text ids are zeros (not stored).

No attention masks, as in diffusers. Encoders are loaded one at a time and freed before the next
(T5-XXL is 4.76B parameters: 19 GB in float32, so ``dtype=torch.bfloat16`` halves the peak).
"""
from __future__ import annotations

import gc
import os
from typing import Any, Sequence

import numpy as np

from convert_weights.source import TRANSFORMERS_STEMS
from sr_jax.pretrained import find_checkpoint_files

SD3_T5_LENGTH = 256  # StableDiffusion3Pipeline.encode_prompt(max_sequence_length=256)
FLUX_T5_LENGTH = 512  # FluxPipeline.encode_prompt(max_sequence_length=512)


def check_folders(root: str, encoder: str, tokenizer: str, *, variant: str | None,
                   allow_pickle: bool) -> list[str]:
  """Names a missing config / tokenizer / weight file (or a refused pickle) before loading."""
  for path in (os.path.join(root, encoder, 'config.json'), os.path.join(root, tokenizer)):
    if not os.path.exists(path):
      raise FileNotFoundError(f'missing {path} (needed to encode the prompts)')
  return find_checkpoint_files(os.path.join(root, encoder), *TRANSFORMERS_STEMS, variant=variant,
                               allow_pickle=allow_pickle)


def _load(root: str, encoder: str, tokenizer: str, model_class: str, tokenizer_class: str, *,
          variant: str | None, allow_pickle: bool, dtype: Any) -> tuple[Any, Any]:
  files = check_folders(root, encoder, tokenizer, variant=variant, allow_pickle=allow_pickle)
  import transformers

  transformers.utils.logging.disable_progress_bar()  # keep the CLI output to its own lines
  tok = getattr(transformers, tokenizer_class).from_pretrained(os.path.join(root, tokenizer))
  model = getattr(transformers, model_class).from_pretrained(
      os.path.join(root, encoder), variant=variant, dtype=dtype,
      use_safetensors=files[0].endswith('.safetensors')).eval()
  return tok, model


def _token_ids(tokenizer: Any, prompt: str, max_length: int):
  return tokenizer([prompt], padding='max_length', max_length=max_length, truncation=True,
                   return_tensors='pt').input_ids


def _float32(tensor) -> np.ndarray:
  return tensor.float().numpy()


def _last_hidden_state(model, ids) -> tuple:
  return (model(ids).last_hidden_state,)


def _run_encoder(root: str, encoder: str, tokenizer: str, model_class: str, tokenizer_class: str,
                 prompts: Sequence[str], max_length: int | None, run, **load) -> list[tuple]:
  """Loads one encoder, runs every prompt through it, frees it. ``run(model, token_ids)`` returns
  the tensors kept; ``max_length`` None: the tokenizer's ``model_max_length`` (CLIP: 77)."""
  import torch

  tok, model = _load(root, encoder, tokenizer, model_class, tokenizer_class, **load)
  length = tok.model_max_length if max_length is None else max_length
  results = []
  with torch.no_grad():
    for prompt in prompts:
      results.append(tuple(_float32(t) for t in run(model, _token_ids(tok, prompt, length))))
  del tok, model
  gc.collect()
  return results


def encode_sd3_prompts(root: str, prompts: Sequence[str], *,
                       max_sequence_length: int = SD3_T5_LENGTH, variant: str | None = None,
                       allow_pickle: bool = False, dtype: Any = None
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
  """``(prompt_embeds (1, 77 + L, 4096), pooled (1, 2048))`` float32 per prompt (module docstring)."""
  import torch

  load = dict(variant=variant, allow_pickle=allow_pickle, dtype=dtype or torch.float32)
  def clip(model, ids):  # penultimate hidden state, projected EOS embedding
    out = model(ids, output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds

  clip_l = _run_encoder(root, 'text_encoder', 'tokenizer', 'CLIPTextModelWithProjection',
                        'CLIPTokenizer', prompts, None, clip, **load)
  clip_g = _run_encoder(root, 'text_encoder_2', 'tokenizer_2', 'CLIPTextModelWithProjection',
                        'CLIPTokenizer', prompts, None, clip, **load)
  t5 = _run_encoder(root, 'text_encoder_3', 'tokenizer_3', 'T5EncoderModel', 'T5Tokenizer',
                    prompts, max_sequence_length, _last_hidden_state, **load)
  embeds = []
  for (hidden_l, pooled_l), (hidden_g, pooled_g), (hidden_t5,) in zip(clip_l, clip_g, t5):
    clip_tokens = np.concatenate([hidden_l, hidden_g], axis=-1)
    width = hidden_t5.shape[-1]
    if clip_tokens.shape[-1] > width:
      raise ValueError(f'CLIP widths {hidden_l.shape[-1]} + {hidden_g.shape[-1]} exceed the T5 '
                       f'width {width}: not an SD3 pipeline')
    padded = np.pad(clip_tokens, ((0, 0), (0, 0), (0, width - clip_tokens.shape[-1])))
    embeds.append((np.concatenate([padded, hidden_t5], axis=-2),
                   np.concatenate([pooled_l, pooled_g], axis=-1)))
  return embeds


def encode_flux_prompts(root: str, prompts: Sequence[str], *,
                        max_sequence_length: int = FLUX_T5_LENGTH, variant: str | None = None,
                        allow_pickle: bool = False, dtype: Any = None
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
  """``(prompt_embeds (1, L, 4096), pooled (1, 768))`` float32 per prompt (module docstring)."""
  import torch

  load = dict(variant=variant, allow_pickle=allow_pickle, dtype=dtype or torch.float32)
  clip = _run_encoder(root, 'text_encoder', 'tokenizer', 'CLIPTextModel', 'CLIPTokenizer',
                      prompts, None, lambda model, ids: (model(ids).pooler_output,), **load)
  t5 = _run_encoder(root, 'text_encoder_2', 'tokenizer_2', 'T5EncoderModel', 'T5Tokenizer',
                    prompts, max_sequence_length, _last_hidden_state, **load)
  return [(hidden, pooled) for (pooled,), (hidden,) in zip(clip, t5)]
