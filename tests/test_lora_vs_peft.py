"""Our LoRA (sr_jax.models.lora) reproduces PEFT's LoRA on diffusers models, in both directions.

A toy torch model mirroring test_lora.ToyNet, a tiny diffusers UNet and a tiny diffusers VAE encoder
get PEFT LoRA (OMGSR's targets, rank 4, alpha 8) with random non-zero A and B. Their adapter state
dict, imported with ``from_peft_state_dict``, must give our outputs unmerged and merged (max abs err
<= 1e-4 * max(1, output scale)); our ``save_peft_adapter`` folder, loaded by
``PeftModel.from_pretrained`` into a fresh torch model, must give our output; PEFT's own
``save_pretrained`` folder must load with ``load_peft_adapter``.
"""
import copy

import jax
import numpy as np
import peft
import pytest
import torch
from torch import nn

import test_lora as toy
import tiny_diffusers as td
from sr_jax.models import lora
from sr_jax.weights import flax_path_to_torch_key, flax_to_state_dict

RANK, ALPHA = 4, 8
CONFIG = lora.LoRAConfig(rank=RANK, alpha=ALPHA, init='gaussian')


def peft_config(**kwargs) -> peft.LoraConfig:
  return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights='gaussian',
                         target_modules=list(lora.OMGSR_TARGET_MODULES), **kwargs)


def randomise_lora(model: nn.Module, seed: int, std: float) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if '.lora_A.' in name or '.lora_B.' in name:
        param.copy_(std * torch.randn(param.shape, generator=gen))


def peft_state_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}


def lora_module_names(model: nn.Module) -> set[str]:
  return {name.removeprefix('base_model.model.') for name, m in model.named_modules()
          if isinstance(m, peft.tuners.lora.LoraLayer)}


def assert_close(out, ref, what):
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert out.shape == ref.shape, (what, out.shape, ref.shape)
  err = np.abs(out - ref).max()
  print(f'{what}: max abs err {err:.2e}, output scale {np.abs(ref).max():.3g}')
  assert err <= 1e-4 * max(1.0, np.abs(ref).max()), f'{what}: max abs err {err}'
  return err


# --- toy model: the torch mirror of test_lora.ToyNet ---------------------------------------------

def _conv3(i, o, stride=1):
  return nn.Conv2d(i, o, 3, stride=stride, padding=1)


class TorchResnet(nn.Module):
  def __init__(self, i, o):
    super().__init__()
    self.conv1, self.conv2 = _conv3(i, o), _conv3(o, o)
    self.conv_shortcut = nn.Conv2d(i, o, 1) if i != o else None

  def forward(self, x):
    h = self.conv2(nn.functional.silu(self.conv1(nn.functional.silu(x))))
    return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class TorchAttention(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.to_q, self.to_k, self.to_v = (nn.Linear(c, c, bias=False) for _ in range(3))
    self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

  def forward(self, x):
    b, c, h, w = x.shape
    tokens = x.flatten(2).transpose(1, 2)
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    weights = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1)
    out = self.to_out[1](self.to_out[0](weights @ v))
    return x + out.transpose(1, 2).reshape(b, c, h, w)


class TorchDownsample(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = _conv3(c, c, stride=2)

  def forward(self, x):
    return self.conv(x)


class TorchBlock(nn.Module):
  def __init__(self, i, o):
    super().__init__()
    self.resnets = nn.ModuleList([TorchResnet(i, o)])
    self.attentions = nn.ModuleList([TorchAttention(o)])
    self.downsamplers = nn.ModuleList([TorchDownsample(o)])

  def forward(self, x):
    return self.downsamplers[0](self.attentions[0](self.resnets[0](x)))


class TorchEncoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.conv_in, self.down_blocks = _conv3(3, 8), nn.ModuleList([TorchBlock(8, 12)])
    self.proj_in, self.conv_out = nn.Linear(12, 12), _conv3(12, 6)

  def forward(self, x):
    x = self.down_blocks[0](self.conv_in(x))
    x = self.proj_in(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return self.conv_out(nn.functional.silu(x))


class TorchDecoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.conv_in, self.conv_out = _conv3(6, 5), _conv3(5, 3)

  def forward(self, z):
    return self.conv_out(nn.functional.silu(self.conv_in(z)))


class TorchToyNet(nn.Module):
  def __init__(self):
    super().__init__()
    self.encoder, self.quant_conv, self.decoder = TorchEncoder(), nn.Conv2d(6, 6, 1), TorchDecoder()

  def forward(self, x):
    return self.decoder(self.quant_conv(self.encoder(x)))


def torch_toy(params) -> TorchToyNet:
  model = TorchToyNet().eval()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in flax_to_state_dict(params).items()})
  return model


@pytest.fixture(scope='module')
def toy_case():
  params, x = toy.toy_params(), toy.toy_inputs()
  run = jax.jit(lambda p, lp: lora.apply(toy.ToyNet(), p, lp, CONFIG, x))
  with torch.no_grad():
    base_ref = torch_toy(params)(td.nchw(x))
  assert_close(run(params, {}), td.nhwc(base_ref), 'toy mirror without LoRA')
  return dict(params=params, x=x, run=run)


def test_toy_targets_match_peft_and_peft_weights_give_our_outputs(toy_case):
  params, x, run = toy_case['params'], toy_case['x'], toy_case['run']
  model = peft.get_peft_model(torch_toy(params), peft_config())
  assert lora_module_names(model) == {flax_path_to_torch_key(p)
                                      for p in lora.target_paths(params, CONFIG)}
  randomise_lora(model, seed=0, std=0.1)
  tree = lora.from_peft_state_dict(peft_state_numpy(model), params, CONFIG)
  with torch.no_grad():
    ref = td.nhwc(model(td.nchw(x)))
    merged_ref = td.nhwc(model.merge_and_unload()(td.nchw(x)))
  assert np.abs(ref - run(params, {})).max() > 0.1 * np.abs(ref).max()  # the LoRA branch matters
  assert_close(run(params, tree), ref, 'toy unmerged')
  assert_close(run(lora.merge(params, tree, CONFIG), {}), merged_ref, 'toy merged')


def test_toy_export_loads_in_peft_both_ways(toy_case, tmp_path):
  params, x, run = toy_case['params'], toy_case['x'], toy_case['run']
  tree = toy.random_lora(params, CONFIG, seed=5)
  ours = run(params, tree)
  lora.save_peft_adapter(tmp_path, tree, CONFIG)
  with torch.no_grad():
    wrapped = peft.PeftModel.from_pretrained(torch_toy(params), str(tmp_path)).eval()
    assert_close(td.nhwc(wrapped(td.nchw(x))), ours, 'PeftModel.from_pretrained')
  # diffusers-style injection (no PeftModel wrapper) takes the same file through set_peft_model_state_dict
  from safetensors.torch import load_file
  injected = peft.inject_adapter_in_model(peft_config(), torch_toy(params))
  result = peft.set_peft_model_state_dict(injected, load_file(str(tmp_path / lora.ADAPTER_WEIGHTS_NAME)))
  assert not result.unexpected_keys
  with torch.no_grad():
    assert_close(td.nhwc(injected(td.nchw(x))), ours, 'inject_adapter_in_model')
  # and PEFT's own save_pretrained folder loads back into ours
  wrapped.save_pretrained(str(tmp_path / 'peft_saved'))
  back, back_config = lora.load_peft_adapter(tmp_path / 'peft_saved', params)
  assert (back_config.rank, back_config.alpha, back_config.init) == (RANK, ALPHA, 'gaussian')
  assert_close(run(params, back), ours, 'load_peft_adapter(PeftModel.save_pretrained)')


# --- tiny diffusers UNet --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def unet_case(tmp_path_factory):
  folder = td.save_tiny_unet(tmp_path_factory.mktemp('lora_unet'), td.TINY_UNET_SD21)
  unet, params = td.load_flax_unet(folder)
  rng = np.random.default_rng(0)
  inputs = (rng.standard_normal((2, 16, 16, 4)).astype(np.float32), np.array([10.0, 700.0], np.float32),
            rng.standard_normal((2, 7, td.TINY_UNET_SD21['cross_attention_dim'])).astype(np.float32))
  torch_inputs = (td.nchw(inputs[0]), torch.from_numpy(inputs[1]), torch.from_numpy(inputs[2]))
  run = jax.jit(lambda p, lp: lora.apply(unet, p, lp, CONFIG, *inputs))
  return dict(folder=folder, unet=unet, params=params, inputs=inputs, torch_inputs=torch_inputs, run=run)


def test_unet_peft_weights_give_our_outputs_unmerged_and_merged(unet_case):
  params, run = unet_case['params'], unet_case['run']
  model = peft.get_peft_model(td.load_torch_unet(unet_case['folder']), peft_config())
  assert lora_module_names(model) == {flax_path_to_torch_key(p)
                                      for p in lora.target_paths(params, CONFIG)}
  randomise_lora(model, seed=1, std=0.05)
  tree = lora.from_peft_state_dict(peft_state_numpy(model), params, CONFIG)
  with torch.no_grad():
    ref = td.nhwc(model(*unet_case['torch_inputs']).sample)
    merged_ref = td.nhwc(model.merge_and_unload()(*unet_case['torch_inputs']).sample)
  out = run(params, tree)
  assert np.abs(out - run(params, {})).max() > 0.1 * np.abs(ref).max()  # the LoRA branch matters
  assert_close(out, ref, 'unet unmerged')
  assert_close(run(lora.merge(params, tree, CONFIG), {}), merged_ref, 'unet merged')


def test_unet_export_loads_in_peft_and_diffusers(unet_case, tmp_path):
  params = unet_case['params']
  tree = toy.random_lora(params, CONFIG, seed=7, std=0.05)
  ours = unet_case['run'](params, tree)
  lora.save_peft_adapter(tmp_path / 'peft', tree, CONFIG)
  lora.save_peft_adapter(tmp_path / 'diffusers', tree, CONFIG, key_prefix='')
  with torch.no_grad():
    wrapped = peft.PeftModel.from_pretrained(td.load_torch_unet(unet_case['folder']),
                                             str(tmp_path / 'peft'))
    assert_close(ours, td.nhwc(wrapped(*unet_case['torch_inputs']).sample), 'unet export (PeftModel)')
    unet = td.load_torch_unet(unet_case['folder'])
    unet.load_lora_adapter(str(tmp_path / 'diffusers'), prefix=None,
                           weight_name=lora.ADAPTER_WEIGHTS_NAME)
    assert_close(ours, td.nhwc(unet(*unet_case['torch_inputs']).sample), 'unet export (diffusers)')


def test_unet_grad_wrt_lora_is_low_rank_only(unet_case):
  """Traced only (make_jaxpr / eval_shape): no compile of the backward pass. Rank 3, because a rank-4
  conv A (3, 3, 32, 4) would have the shape of the frozen conv_out kernel and blur the check. A 16x12
  latent for the same reason: at 16x16 the mid block's per-head attention scores (64 x 64 tokens)
  have the shape of its frozen 64 x 64 Dense kernels."""
  config = lora.LoRAConfig(rank=3, alpha=3)
  tree = toy.random_lora(unet_case['params'], config, seed=2, std=0.05)
  sample, timesteps, context = unet_case['inputs']
  toy.assert_lora_grad_is_low_rank_only(unet_case['unet'], unet_case['params'], config, tree,
                                        sample[:, :, :12], timesteps, context, execute=False)


# --- tiny diffusers VAE encoder (OMGSR: LoRA on the encoder only, quant_conv and decoder frozen) ---

@pytest.fixture(scope='module')
def vae_case(tmp_path_factory):
  folder = td.save_tiny_vae(tmp_path_factory.mktemp('lora_vae'), td.TINY_VAE)
  vae, params = td.load_flax_vae(folder)
  images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)
  config = lora.LoRAConfig(rank=RANK, alpha=ALPHA, init='gaussian', prefix='encoder')
  run = jax.jit(lambda p, lp: lora.apply(vae, p, lp, config, images, method='encode')[0])
  return dict(folder=folder, vae=vae, params=params, images=images, config=config, run=run)


def torch_encode_mean(vae, images):
  with torch.no_grad():
    return td.nhwc(vae.encode(td.nchw(images)).latent_dist.mean)


def test_vae_encoder_peft_weights_give_our_latents_unmerged_and_merged(vae_case):
  params, config, run = vae_case['params'], vae_case['config'], vae_case['run']
  torch_vae = td.load_torch_vae(vae_case['folder'])
  model = peft.get_peft_model(torch_vae, peft_config(exclude_modules=r'(?!encoder\.).*'))
  names = lora_module_names(model)
  assert names == {flax_path_to_torch_key(p) for p in lora.target_paths(params, config)}
  assert all(n.startswith('encoder.') for n in names) and 'encoder.conv_out' in names
  randomise_lora(model, seed=3, std=0.05)
  tree = lora.from_peft_state_dict(peft_state_numpy(model), params, config)
  ref = torch_encode_mean(torch_vae, vae_case['images'])
  out = run(params, tree)
  assert np.abs(out - run(params, {})).max() > 0.1 * np.abs(ref).max()
  assert_close(out, ref, 'vae encoder unmerged')
  merged_ref = torch_encode_mean(model.merge_and_unload(), vae_case['images'])
  assert_close(run(lora.merge(params, tree, config), {}), merged_ref, 'vae encoder merged')


def test_vae_encoder_export_and_omgsr_style_adapter(vae_case, tmp_path):
  params, config, run = vae_case['params'], vae_case['config'], vae_case['run']
  tree = toy.random_lora(params, config, seed=9, std=0.05)
  ours = run(params, tree)
  lora.save_peft_adapter(tmp_path / 'ours', tree, config)
  wrapped = peft.PeftModel.from_pretrained(td.load_torch_vae(vae_case['folder']), str(tmp_path / 'ours'))
  assert all(n.startswith('encoder.') for n in lora_module_names(wrapped))  # exclude regex honoured
  assert_close(torch_encode_mean(wrapped, vae_case['images']), ours, 'vae export')
  # OMGSR saves the adapter of a VAE copy whose decoder was deleted, with the plain target list
  encoder_only = copy.deepcopy(td.load_torch_vae(vae_case['folder']))
  del encoder_only.decoder
  omgsr = peft.get_peft_model(encoder_only, peft_config())
  randomise_lora(omgsr, seed=4, std=0.05)
  omgsr.save_pretrained(str(tmp_path / 'omgsr'))
  ref = torch_encode_mean(encoder_only, vae_case['images'])
  back, back_config = lora.load_peft_adapter(tmp_path / 'omgsr', params, prefix='encoder')
  assert set(back_config.target_modules) == set(config.target_modules)
  assert (back_config.rank, back_config.alpha, back_config.prefix) == (RANK, ALPHA, 'encoder')
  assert_close(run(params, back), ref, 'OMGSR-style adapter')
