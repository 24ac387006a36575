"""Where a conversion reads from: a local folder, or a hub id fetched with ``snapshot_download``.

Hub downloads honour ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` (huggingface_hub reads them)
and fetch only the files a conversion needs (``allow_patterns``): the configs, the weights of the
requested variant (pickles only with ``--allow-pickle``), the tokenizer and the scheduler config.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

# diffusers saves UNet/VAE as diffusion_pytorch_model.*, transformers as model.* / pytorch_model.bin.
DIFFUSERS_STEMS = ('diffusion_pytorch_model', 'diffusion_pytorch_model')
TRANSFORMERS_STEMS = ('model', 'pytorch_model')
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$')


class SourceError(OSError):
  """The source of a conversion cannot be found or fetched (the message says why)."""


def weight_patterns(subfolder: str, stems: tuple[str, str], *, variant: str | None,
                    allow_pickle: bool) -> list[str]:
  """``allow_patterns`` matching one model's config and weight files (only the requested variant)."""
  prefix = f'{subfolder}/' if subfolder else ''
  stem, pickle_stem = stems
  v = f'.{variant}' if variant else ''
  patterns = [f'{prefix}config.json', f'{prefix}{stem}{v}.safetensors',
              f'{prefix}{stem}{v}-*-of-*.safetensors',
              f'{prefix}{stem}.safetensors.index{v}.json', f'{prefix}{stem}{v}.safetensors.index.json']
  if allow_pickle:
    patterns.append(f'{prefix}{pickle_stem}{v}.bin')
  return patterns


def sd_patterns(*, variant: str | None, allow_pickle: bool) -> list[str]:
  """The files of an SD pipeline repository that ``convert_weights sd`` reads."""
  patterns = ['model_index.json', 'scheduler/scheduler_config.json', 'tokenizer/*']
  for sub, stems in (('unet', DIFFUSERS_STEMS), ('vae', DIFFUSERS_STEMS),
                     ('text_encoder', TRANSFORMERS_STEMS)):
    patterns += weight_patterns(sub, stems, variant=variant, allow_pickle=allow_pickle)
  return patterns


def resolve_source(src: str, *, allow_patterns: Sequence[str], revision: str | None = None) -> str:
  """Returns a local folder for ``src``: the folder itself, or the hub snapshot of a repo id."""
  if os.path.isdir(src):
    return src
  if not _HUB_ID.match(src):
    raise SourceError(f'{src}: no such folder (and not a hub repo id of the form owner/name)')
  import huggingface_hub  # only for hub ids
  from huggingface_hub import errors as hub_errors
  try:
    return huggingface_hub.snapshot_download(src, revision=revision,
                                             allow_patterns=list(allow_patterns))
  except hub_errors.LocalEntryNotFoundError as e:
    offline = os.environ.get('HF_HUB_OFFLINE', '0') not in ('', '0', 'false', 'False')
    why = ('HF_HUB_OFFLINE is set and the hub cache has no snapshot of it'
           if offline else 'the hub cannot be reached and the cache has no snapshot of it')
    raise SourceError(f'{src} is not a local folder and cannot be fetched: {why} '
                      f'(cache: {huggingface_hub.constants.HF_HUB_CACHE}). Pass a local folder, '
                      f'or download it first. [{type(e).__name__}]') from None
  except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError) as e:
    raise SourceError(f'{src} (revision {revision or "main"}): not found on the hub: '
                      f'{str(e).splitlines()[0]}') from None
  except (hub_errors.HfHubHTTPError, hub_errors.HFValidationError, OSError) as e:
    raise SourceError(f'cannot fetch {src} from the hub: {type(e).__name__}: '
                      f'{str(e).splitlines()[0] if str(e) else ""}') from None
