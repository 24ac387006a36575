"""Encodes fixed prompts once with an SD pipeline's CLIP text encoder (transformers, PyTorch, CPU).

OMGSR conditions the UNet on one fixed prompt (by default the empty string) encoded once: the CLIP
tokenizer pads to ``model_max_length`` (truncating longer prompts) and the text encoder's last hidden
state, without an attention mask as in diffusers' SD pipelines, is the UNet context (OMGSR
``train/train_omgsr_s.py``). This is the only place that imports torch and transformers.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from convert_weights.source import TRANSFORMERS_STEMS
from sr_jax.pretrained import find_checkpoint_files


def encode_prompts(root: str, prompts: Sequence[str], *, variant: str | None = None,
                   allow_pickle: bool = False) -> list[np.ndarray]:
  """Returns one float32 (1, L, C) last-hidden-state array per prompt, L = tokenizer max length."""
  encoder_dir = os.path.join(root, 'text_encoder')
  tokenizer_dir = os.path.join(root, 'tokenizer')
  for folder, what in ((encoder_dir, 'config.json'), (tokenizer_dir, None)):
    path = os.path.join(folder, what) if what else folder
    if not os.path.exists(path):
      raise FileNotFoundError(f'missing {path} (needed to encode the prompt)')
  # Checks the weights first so a missing file or a refused pickle reads as in the other models.
  files = find_checkpoint_files(encoder_dir, *TRANSFORMERS_STEMS, variant=variant,
                                allow_pickle=allow_pickle)
  import torch
  import transformers

  transformers.utils.logging.disable_progress_bar()  # keep the CLI output to its own lines

  tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
  model = transformers.CLIPTextModel.from_pretrained(
      encoder_dir, variant=variant, dtype=torch.float32,
      use_safetensors=files[0].endswith('.safetensors')).eval()
  embeds = []
  for prompt in prompts:
    tokens = tokenizer([prompt], padding='max_length', max_length=tokenizer.model_max_length,
                       truncation=True, return_tensors='pt')
    with torch.no_grad():
      hidden = model(tokens.input_ids).last_hidden_state
    embeds.append(hidden.float().numpy())
  return embeds
