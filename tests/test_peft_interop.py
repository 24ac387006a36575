"""Our LoRA adapters load where the OMGSR reference code loads them, and theirs load into ours.

The reference inference code (wuer5/OMGSR ``infer/omgsr_s_infer_model.py``) does
``PeftModel.from_pretrained(vae.encoder, <vae_encoder_lora_adapter>)`` and
``PeftModel.from_pretrained(unet, <unet_lora_adapter>)``, then ``merge_and_unload()``; its trainer
(``train/train_omgsr_s.py``) wraps ``vae.encoder`` and ``unet`` in ``PeftModel`` and saves them.
On tiny diffusers models holding the same weights as our Flax params:

* our adapters (``common.save_adapters``, the VAE one with ``module_prefixes={...: 'encoder'}``) load
  exactly so, and the merged torch weights equal ``lora.merge`` (as state dicts, atol 1e-6);
* adapters PEFT writes in the reference layout, and in the whole-VAE layout, load with
  ``lora.load_peft_adapter`` (``module_prefix='encoder'`` / default) and merge to PEFT's weights;
* a mismatched adapter fails naming the unknown and missing keys (and the layout that would fit);
* the tiny OMGSR run's exported adapters load into PEFT on the tiny config's frozen random models
  and, merged, equal the exported inference bundle.
"""
import json
import os

import numpy as np
import pytest

import test_lora as toy
from configs import omgsr as omgsr_config
from sr_jax import pretrained
from sr_jax.methods import common, omgsr
from sr_jax.models import lora
from sr_jax.weights import CheckpointError, flax_to_state_dict

torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')
diffusers = pytest.importorskip('diffusers')
td = pytest.importorskip('tiny_diffusers')

RANK, ALPHA = 4, 8
UNET_LORA = lora.LoRAConfig(RANK, ALPHA, lora.OMGSR_TARGET_MODULES, init='gaussian')
VAE_LORA = lora.LoRAConfig(RANK, ALPHA, lora.OMGSR_TARGET_MODULES, init='gaussian', prefix='encoder')
VAE_ADAPTER, UNET_ADAPTER = 'vae_encoder_lora_adapter', 'unet_lora_adapter'
ATOL = 1e-6


def reference_lora_config(**kwargs):
  """train_omgsr_s.py set_vae_encoder_lora / set_unet_lora (with our alpha, not alpha = r)."""
  return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lora.OMGSR_TARGET_MODULES),
                         init_lora_weights='gaussian', **kwargs)


def randomise_lora(model, seed, std=0.05):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if '.lora_A.' in name or '.lora_B.' in name:
        param.copy_(std * torch.randn(param.shape, generator=gen))


def count_lora_layers(model) -> int:
  return sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in model.modules())


def merge_vae_encoder_as_reference(vae):
  """``vae.encoder.merge_and_unload()`` as the reference does, then the plain encoder back in place
  (the PeftModel wrapper would prefix every encoder key with ``base_model.model.``)."""
  vae.encoder.merge_and_unload()
  vae.encoder = vae.encoder.get_base_model()
  return vae


def assert_state_close(torch_model, flax_params, what):
  want = flax_to_state_dict(flax_params)
  got = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:8])
  err = max(float(np.abs(got[k] - want[k]).max()) for k in want)
  print(f'{what}: max abs err {err:.2e} over {len(want)} tensors')
  assert err <= ATOL, f'{what}: max abs err {err}'


def assert_lora_moves_weights(params, merged):
  """Guards the comparisons: the merged weights differ from the base ones."""
  base, after = flax_to_state_dict(params), flax_to_state_dict(merged)
  assert max(float(np.abs(after[k] - base[k]).max()) for k in base) > 1e-3


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp('peft_interop')
  vae_folder = td.save_tiny_vae(root / 'vae', td.TINY_VAE)
  unet_folder = td.save_tiny_unet(root / 'unet', td.TINY_UNET_SD21)
  _, vae_params = td.load_flax_vae(vae_folder)
  _, unet_params = td.load_flax_unet(unet_folder)
  return dict(vae_folder=vae_folder, unet_folder=unet_folder, vae=vae_params, unet=unet_params)


# ------------------------------------------------------------------------- ours -> reference


def test_our_vae_encoder_adapter_loads_into_vae_encoder_and_merges_as_ours(tiny, tmp_path):
  tree = toy.random_lora(tiny['vae'], VAE_LORA, seed=3, std=0.05)
  common.save_adapters(str(tmp_path), {VAE_ADAPTER: (tree, VAE_LORA)},
                       module_prefixes={VAE_ADAPTER: 'encoder'})
  with open(tmp_path / VAE_ADAPTER / lora.ADAPTER_CONFIG_NAME) as f:
    adapter_config = json.load(f)
  assert adapter_config['exclude_modules'] is None
  assert sorted(adapter_config['target_modules']) == sorted(lora.OMGSR_TARGET_MODULES)
  vae = td.load_torch_vae(tiny['vae_folder'])
  vae.encoder = peft.PeftModel.from_pretrained(vae.encoder, str(tmp_path / VAE_ADAPTER))
  assert count_lora_layers(vae.encoder) == len(lora.target_paths(tiny['vae'], VAE_LORA))
  merged = lora.merge(tiny['vae'], tree, VAE_LORA)
  assert_lora_moves_weights(tiny['vae'], merged)
  assert_state_close(merge_vae_encoder_as_reference(vae), merged, 'vae encoder adapter')


def test_our_unet_adapter_loads_into_unet_and_merges_as_ours(tiny, tmp_path):
  tree = toy.random_lora(tiny['unet'], UNET_LORA, seed=4, std=0.05)
  common.save_adapters(str(tmp_path), {UNET_ADAPTER: (tree, UNET_LORA)})
  unet = peft.PeftModel.from_pretrained(td.load_torch_unet(tiny['unet_folder']),
                                        str(tmp_path / UNET_ADAPTER))
  assert count_lora_layers(unet) == len(lora.target_paths(tiny['unet'], UNET_LORA))
  merged = lora.merge(tiny['unet'], tree, UNET_LORA)
  assert_lora_moves_weights(tiny['unet'], merged)
  assert_state_close(unet.merge_and_unload(), merged, 'unet adapter')


# ------------------------------------------------------------------------- reference -> ours


def test_adapters_the_reference_trainer_saves_load_into_ours(tiny, tmp_path):
  vae = td.load_torch_vae(tiny['vae_folder'])
  vae.encoder = peft.PeftModel(model=vae.encoder, peft_config=reference_lora_config(),
                               adapter_name=VAE_ADAPTER)
  randomise_lora(vae.encoder, seed=5)
  vae.encoder.save_pretrained(str(tmp_path))  # a non-default adapter: tmp_path/<adapter name>/
  tree, config = lora.load_peft_adapter(tmp_path / VAE_ADAPTER, tiny['vae'], module_prefix='encoder')
  assert (config.rank, config.alpha, config.prefix) == (RANK, ALPHA, 'encoder')
  assert lora.target_paths(tiny['vae'], config) == lora.target_paths(tiny['vae'], VAE_LORA)
  assert_state_close(merge_vae_encoder_as_reference(vae), lora.merge(tiny['vae'], tree, config),
                     'reference vae encoder adapter')

  unet = peft.PeftModel(model=td.load_torch_unet(tiny['unet_folder']),
                        peft_config=reference_lora_config(), adapter_name=UNET_ADAPTER)
  randomise_lora(unet, seed=6)
  unet.save_pretrained(str(tmp_path))
  tree, config = lora.load_peft_adapter(tmp_path / UNET_ADAPTER, tiny['unet'])
  assert_state_close(unet.merge_and_unload(), lora.merge(tiny['unet'], tree, config),
                     'reference unet adapter')


def test_whole_vae_adapter_written_by_peft_loads_into_ours(tiny, tmp_path):
  vae = peft.get_peft_model(td.load_torch_vae(tiny['vae_folder']),
                            reference_lora_config(exclude_modules=r'(?!encoder\.).*'))
  randomise_lora(vae, seed=7)
  vae.save_pretrained(str(tmp_path))
  tree, config = lora.load_peft_adapter(tmp_path, tiny['vae'])
  assert config.prefix == 'encoder'
  assert_state_close(vae.merge_and_unload(), lora.merge(tiny['vae'], tree, config),
                     'whole-vae adapter')


# ------------------------------------------------------------------------- mismatches


def test_adapter_in_the_other_layout_fails_naming_keys_and_the_fitting_module_prefix(tiny, tmp_path):
  tree = toy.random_lora(tiny['vae'], VAE_LORA, seed=8)
  lora.save_peft_adapter(tmp_path / 'encoder_layout', tree, VAE_LORA, module_prefix='encoder')
  lora.save_peft_adapter(tmp_path / 'vae_layout', tree, VAE_LORA)
  with pytest.raises(CheckpointError) as e:  # the reference layout read as a whole-VAE adapter
    lora.load_peft_adapter(tmp_path / 'encoder_layout', tiny['vae'])
  message = str(e.value)
  assert 'unknown (38)' in message and 'base_model.model.conv_in.lora_A.weight' in message
  assert 'decoder.conv_in.lora_A.weight' in message and "module_prefix='encoder'" in message
  with pytest.raises(CheckpointError, match=r'(?s)unknown \(38\).*base_model\.model\.encoder\.'
                                            r'conv_in\.lora_A\.weight.*module_prefix=None'):
    lora.load_peft_adapter(tmp_path / 'vae_layout', tiny['vae'], module_prefix='encoder')
  # a rank that does not fit, and a tree with LoRA outside the sub-module, are refused by name
  with pytest.raises(CheckpointError, match=r'shape mismatch for conv_in\.lora_A\.weight.*rank 2'):
    lora.from_peft_state_dict(lora.to_peft_state_dict(tree, VAE_LORA, module_prefix='encoder'),
                              tiny['vae'], lora.LoRAConfig(2, 2, lora.OMGSR_TARGET_MODULES),
                              module_prefix='encoder')
  whole = lora.LoRAConfig(RANK, ALPHA, lora.OMGSR_TARGET_MODULES)
  with pytest.raises(ValueError, match='decoder.conv_in lies outside module_prefix'):
    lora.save_peft_adapter(tmp_path / 'bad', toy.random_lora(tiny['vae'], whole), whole,
                           module_prefix='encoder')


# ------------------------------------------------------------------------- the OMGSR export


def test_omgsr_tiny_export_loads_in_peft_and_merges_to_the_exported_bundle(tiny_train_runs):
  export = os.path.join(tiny_train_runs[1], 'export')
  config = omgsr_config.get_config('tiny')
  frozen = omgsr.load_frozen(config, kinds=('unet', 'vae'))
  unet = diffusers.UNet2DConditionModel(**dict(config.model.unet_config))
  vae = diffusers.AutoencoderKL(**dict(config.model.vae_config))
  for model, params in ((unet, frozen['unet']), (vae, frozen['vae'])):
    state = {k: torch.from_numpy(v.copy()) for k, v in flax_to_state_dict(params).items()}
    model.load_state_dict(state, strict=True)
  vae.encoder = peft.PeftModel.from_pretrained(vae.encoder, os.path.join(export, VAE_ADAPTER))
  unet = peft.PeftModel.from_pretrained(unet, os.path.join(export, UNET_ADAPTER))
  bundle = os.path.join(export, 'inference')
  _, bundle_unet = pretrained.load_unet(bundle)
  _, bundle_vae = pretrained.load_vae(bundle)
  assert_lora_moves_weights(frozen['unet'], bundle_unet)
  assert_lora_moves_weights(frozen['vae'], bundle_vae)
  assert_state_close(unet.merge_and_unload(), bundle_unet, 'omgsr export unet')
  assert_state_close(merge_vae_encoder_as_reference(vae), bundle_vae, 'omgsr export vae')
