"""The DiT4SR LR branch of our SD3Transformer2DModel equals a plain-PyTorch reference built on
diffusers' SD3 blocks.

Reference (written here from DiT4SR's description, next-methods.md Sec. 1.5, on top of diffusers
0.42.1): a tiny random diffusers `SD3Transformer2DModel` (SD3.5 blocks: dual attention in blocks 0
and 1, rms qk-norm) gets DiT4SR's control modules under their torch names (``attn*.to_{q,k,v,out}
_control``, ``ff.control_conv``), an attention processor that runs the LR tokens through them
(r1 qk-norm, or the first release's doubled ``norm_k`` on the noisy keys), a feed-forward forward
with the control conv, and a model forward that appends the LR tokens and drops them at the end.
Every weight, the control ones included, is random and non-zero. Our params come from that state
dict (plus the unused attn2 context modules a DiT4SR checkpoint carries) via `convert_state_dict`.

Zero control (fresh init): the LR tokens' keys and values are exactly 0. Tested: the noisy output
does not depend on the LR latent, equals plain diffusers SD3.5 whose every attention gets N extra
zero-key / zero-value tokens, and differs from plain SD3.5 (so DiT4SR at init is not SD3.5).
"""
import functools

import jax
import numpy as np
import pytest

from sr_jax.models import mmdit
from sr_jax.weights import convert_state_dict, flax_to_torch_shapes

import test_mmdit_vs_reference as base

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
F = torch.nn.functional

CONFIG = base.CONFIGS['sd35']
SQUARE_HW, NON_SQUARE_HW = (8, 8), (6, 10)  # DiT4SR itself needs square token grids


# --- the plain-PyTorch DiT4SR reference ----------------------------------------------------------

def _heads(attn, t):
  b = t.shape[0]
  return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)


def _context_qkv(attn, context):
  q, k, v = (_heads(attn, f(context)) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
  if attn.norm_added_q is not None:
    q, k = attn.norm_added_q(q), attn.norm_added_k(k)
  return q, k, v


def _attend(attn, qs, ks, vs, num_image, encoder_hidden_states):
  """SDPA over the concatenated token groups; (image-token output, context output or None)."""
  out = F.scaled_dot_product_attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))
  out = out.transpose(1, 2).flatten(2)
  image, context = out[:, :num_image], out[:, num_image:]
  if encoder_hidden_states is not None and not attn.context_pre_only:
    context = attn.to_add_out(context)
  return image, context


class DiT4SRAttnProcessor:
  """Joint attention with the second half of the image tokens as DiT4SR LR tokens."""

  def __init__(self, quirk: bool):
    self.quirk = quirk

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
    n = hidden_states.shape[1] // 2
    noisy, lr = hidden_states[:, :n], hidden_states[:, n:]
    q, k, v = (_heads(attn, f(noisy)) for f in (attn.to_q, attn.to_k, attn.to_v))
    q_lr = _heads(attn, attn.to_q_control(attn.to_q(lr)))
    k_lr = _heads(attn, attn.to_k_control(attn.to_k(lr)))
    v_lr = _heads(attn, attn.to_v_control(attn.to_v(lr)))
    if attn.norm_q is not None:
      q, q_lr = attn.norm_q(q), attn.norm_q(q_lr)
      k = attn.norm_k(k)
      k_lr = attn.norm_k(k) if self.quirk else attn.norm_k(k_lr)  # quirk: the noisy keys, again
    qs, ks, vs = [q, q_lr], [k, k_lr], [v, v_lr]
    if encoder_hidden_states is not None:
      for group, t in zip((qs, ks, vs), _context_qkv(attn, encoder_hidden_states)):
        group.append(t)
    image, context = _attend(attn, qs, ks, vs, 2 * n, encoder_hidden_states)
    image = torch.cat([attn.to_out[0](image[:, :n]), attn.to_out_control(image[:, n:] + lr)], 1)
    return image if encoder_hidden_states is None else (image, context)


class ZeroTokensAttnProcessor:
  """diffusers' joint attention with ``num_zero`` extra tokens of key 0 and value 0 after the image
  tokens: what DiT4SR's noisy tokens see at zero control."""

  def __init__(self, num_zero: int):
    self.num_zero = num_zero

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
    n = hidden_states.shape[1]
    q, k, v = (_heads(attn, f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
      q, k = attn.norm_q(q), attn.norm_k(k)
    zeros = torch.zeros(k.shape[0], k.shape[1], self.num_zero, k.shape[3])
    qs, ks, vs = [q], [k, zeros], [v, zeros]
    if encoder_hidden_states is not None:
      for group, t in zip((qs, ks, vs), _context_qkv(attn, encoder_hidden_states)):
        group.append(t)
    out = F.scaled_dot_product_attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))
    out = out.transpose(1, 2).flatten(2)
    image, context = attn.to_out[0](out[:, :n]), out[:, n:]
    if encoder_hidden_states is None:
      return image
    return image, (context if attn.context_pre_only else attn.to_add_out(context))


def control_ff_forward(ff, hidden_states, grid, scale):
  """DiT4SR FeedForwardControl: control conv on the LR half's GELU activations, as a grid."""
  h = ff.net[1](ff.net[0](hidden_states))
  n = h.shape[1] // 2
  noisy, lr = h[:, :n], h[:, n:]
  b, _, c = lr.shape
  conv = ff.control_conv(lr.transpose(1, 2).reshape(b, c, *grid)).reshape(b, c, n).transpose(1, 2)
  return ff.net[2](torch.cat([noisy + scale * conv, lr], 1))


def add_control_modules(model) -> None:
  """DiT4SR's AttentionZero control layers and FeedForwardControl conv, under its torch names."""
  for block in model.transformer_blocks:
    for attn in (block.attn, block.attn2):
      if attn is None:
        continue
      dim = attn.inner_dim
      for name in ('to_q_control', 'to_k_control', 'to_v_control', 'to_out_control'):
        setattr(attn, name, torch.nn.Linear(dim, dim))
    channels = block.ff.net[2].in_features
    block.ff.control_conv = torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels)


def dit4sr_forward(model, inputs, lr_latents, quirk: bool, scale: float = 1.2) -> np.ndarray:
  """DiT4SR's transformer forward (NHWC numpy in and out)."""
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  latents = nchw(inputs['latents'])
  p = model.config.patch_size
  grid = (latents.shape[2] // p, latents.shape[3] // p)
  for block in model.transformer_blocks:
    block.ff.forward = functools.partial(control_ff_forward, block.ff, grid=grid, scale=scale)
    for attn in (block.attn, block.attn2):
      if attn is not None:
        attn.set_processor(DiT4SRAttnProcessor(quirk))
  with torch.no_grad():
    x = torch.cat([model.pos_embed(latents), model.pos_embed(nchw(lr_latents))], 1)
    temb = model.time_text_embed(torch.from_numpy(inputs['timesteps']),
                                 torch.from_numpy(inputs['pooled']))
    context = model.context_embedder(torch.from_numpy(inputs['context']))
    for block in model.transformer_blocks:
      context, x = block(x, context, temb)
    x = model.proj_out(model.norm_out(x[:, :grid[0] * grid[1]], temb))
    out = x.reshape(x.shape[0], *grid, p, p, -1).permute(0, 1, 3, 2, 4, 5)
  return out.reshape(x.shape[0], grid[0] * p, grid[1] * p, -1).numpy()


# --- fixtures ------------------------------------------------------------------------------------

def _lr_latents(hw, seed):
  return np.random.default_rng(seed).standard_normal((2, *hw, CONFIG['in_channels'])
                                                      ).astype(np.float32)


def with_dit4sr_unused_attn2_keys(state, dim, seed=0):
  """A DiT4SR checkpoint also stores attn2's never-used context projections and norms."""
  rng, state = np.random.default_rng(seed), dict(state)
  for i in CONFIG['dual_attention_layers']:
    for name in mmdit.DIT4SR_UNUSED_ATTN2_MODULES:
      weight_shape = (CONFIG['attention_head_dim'],) if name.startswith('norm') else (dim, dim)
      state[f'transformer_blocks.{i}.attn2.{name}.weight'] = rng.standard_normal(weight_shape)
      if not name.startswith('norm'):
        state[f'transformer_blocks.{i}.attn2.{name}.bias'] = rng.standard_normal((dim,))
  return state


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  plain = diffusers.SD3Transformer2DModel(**CONFIG).eval()
  base.randomise(plain, seed=1)
  dit4sr = diffusers.SD3Transformer2DModel(**CONFIG).eval()
  add_control_modules(dit4sr)
  base.randomise(dit4sr, seed=2)
  state = {k: v.numpy() for k, v in dit4sr.state_dict().items()}
  return dict(plain=plain, dit4sr=dit4sr, state=state)


def lr_model(**kwargs):
  return mmdit.SD3Transformer2DModel.from_config(CONFIG, lr_branch=True, **kwargs)


def converted(model, state):
  dim = CONFIG['num_attention_heads'] * CONFIG['attention_head_dim']
  return convert_state_dict(with_dit4sr_unused_attn2_keys(state, dim),
                            base.abstract_params(model),
                            ignore_prefixes=model.checkpoint_ignore_prefixes())


def run(model, params, inputs, lr):
  return jax.jit(model.apply)({'params': params}, *base.flax_inputs(inputs), lr)


# --- parity with random control weights ----------------------------------------------------------

@pytest.mark.parametrize('quirk,hw', [(False, SQUARE_HW), (False, NON_SQUARE_HW),
                                      (True, SQUARE_HW)])
def test_lr_branch_matches_reference(reference, quirk, hw):
  model = lr_model(lr_qk_norm_quirk=quirk)
  params = converted(model, reference['state'])
  inputs, lr = base.random_inputs(CONFIG, hw, seed=3), _lr_latents(hw, seed=4)
  ref = dit4sr_forward(reference['dit4sr'], inputs, lr, quirk)
  what = f'DiT4SR {"quirk" if quirk else "r1"} {hw[0]}x{hw[1]}'
  base.assert_close(run(model, params, inputs, lr), ref, what)
  # the LR latent reaches the output (through the non-zero control weights)
  other = dit4sr_forward(reference['dit4sr'], inputs, _lr_latents(hw, seed=5), quirk)
  assert np.abs(other - ref).max() > 1e-2 * np.abs(ref).max()


def test_quirk_differs_from_r1(reference):
  inputs, lr = base.random_inputs(CONFIG, SQUARE_HW, seed=3), _lr_latents(SQUARE_HW, seed=4)
  r1 = dit4sr_forward(reference['dit4sr'], inputs, lr, quirk=False)
  quirk = dit4sr_forward(reference['dit4sr'], inputs, lr, quirk=True)
  assert np.abs(r1 - quirk).max() > 1e-2 * np.abs(r1).max()


# --- zero control (fresh init) -------------------------------------------------------------------

def plain_with_zero_tokens(model, inputs, num_zero):
  for block in model.transformer_blocks:
    for attn in (block.attn, block.attn2):
      if attn is not None:
        attn.set_processor(ZeroTokensAttnProcessor(num_zero))
  try:
    return base.torch_forward(model, inputs)
  finally:
    model.set_attn_processor(diffusers.models.attention_processor.JointAttnProcessor2_0())


def test_zero_control_equals_sd35_with_zero_key_value_tokens(reference):
  """SD3.5 weights + fresh control init (the DiT4SR training start)."""
  model = lr_model()
  plain_state = {k: v.numpy() for k, v in reference['plain'].state_dict().items()}
  frozen = convert_state_dict(plain_state, mmdit.split_control_params(base.abstract_params(model))[0],
                              ignore_prefixes=model.checkpoint_ignore_prefixes())
  fresh = jax.jit(model.init)(jax.random.key(7), *model.dummy_inputs())['params']
  control = mmdit.split_control_params(fresh)[1]
  zero = [path for path, leaf in jax.tree_util.tree_leaves_with_path(control)
          if not np.any(np.asarray(leaf))]
  assert len(zero) == len(jax.tree.leaves(control)) - 2 * 5  # all but 5 to_out_control kernel+bias
  params = mmdit.merge_params(frozen, control)
  inputs = base.random_inputs(CONFIG, SQUARE_HW, seed=3)
  out = run(model, params, inputs, _lr_latents(SQUARE_HW, seed=4))
  out_other_lr = run(model, params, inputs, _lr_latents(SQUARE_HW, seed=5))
  np.testing.assert_allclose(np.asarray(out), np.asarray(out_other_lr), rtol=0, atol=1e-6)
  num_tokens = (SQUARE_HW[0] // 2) * (SQUARE_HW[1] // 2)
  ref = plain_with_zero_tokens(reference['plain'], inputs, num_tokens)
  base.assert_close(out, ref, 'zero control vs SD3.5 + N zero-key/value tokens')
  sd35 = base.torch_forward(reference['plain'], inputs)
  assert np.abs(sd35 - ref).max() > 1e-2 * np.abs(sd35).max()  # and that is not plain SD3.5


# --- trainable set -------------------------------------------------------------------------------

def test_control_params_full_size_count_and_mask():
  model = mmdit.SD3Transformer2DModel.from_config(mmdit.SD35_MEDIUM_CONFIG, lr_branch=True)
  shapes = base.abstract_params(model)
  mask = mmdit.trainable_control_mask(shapes)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  trainable = sum(int(np.prod(s.shape)) for s, m in zip(jax.tree.leaves(shapes),
                                                        jax.tree.leaves(mask)) if m)
  frozen, control = mmdit.split_control_params(shapes)
  assert trainable == count(control) == 350_877_696
  assert count(frozen) == 2_243_171_520
  assert jax.tree.structure(mmdit.merge_params(frozen, control)) == jax.tree.structure(shapes)
  assert len(jax.tree.leaves(control)) == 37 * 4 * 2 + 24 * 2  # 37 AttentionZero, 24 FFN convs
  assert '.attn2.add_q_proj.' in ''.join(model.checkpoint_ignore_prefixes())
  torch_shapes = flax_to_torch_shapes(shapes)  # DiT4SR's torch names and layouts
  assert torch_shapes['transformer_blocks.0.ff.control_conv.weight'] == (6144, 1, 3, 3)
  assert torch_shapes['transformer_blocks.12.attn2.to_out_control.weight'] == (1536, 1536)
