"""Tiled VAE attention: error of the windowed mode against the exact mode, and the attention's cost.

    python benchmarks/tiled_vae_attention.py [--skip-sd] [--skip-timing] [--out results.json]

Error: the same inputs through `TiledVAE` with the exact global attention and with the windowed
attention at several margins (latent px of context each side of a query tile); max / mean abs
difference of the decoded image and of the posterior mean. Random-weight VAEs (the draw of
`tests/test_tiled_vae.py`: kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.3^2), biases N(0, 0.3^2)):

* `test`: the tiny VAE and inputs of `tests/test_tiled_vae.py` (i.i.d. image and latent, 16x20
  latent, tile 4): the case its windowed-error test asserts;
* `tiny photo`: the same VAE on a photo (scikit-image `coffee` at 384x256, latent 64x96, tile 16),
  decoding the posterior mean of that photo: structured content, whose local means differ from the
  global one, unlike i.i.d. noise;
* `SD photo`: SD 2.1's VAE layout (`tests/tiny_diffusers.SD21_BASE_VAE_CONFIG`: 512 channels at the
  latent, 32 groups, factor 8) on `astronaut` at 768x768 (latent 96x96, tile 32).

Timing: the attention stages alone (keys/values, then attention and output projection) of the
decoder at large latents, exact vs windowed, on random activations: the first call (compiles) and a
second one. A new latent size compiles the attention stage again in both modes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'tests'))

from sr_jax.data import sources  # noqa: E402
from sr_jax.inference import tiled_vae  # noqa: E402
import tiny_diffusers  # noqa: E402  pylint: disable=g-import-not-at-top

TEST_CONFIG = dict(block_out_channels=[32, 64, 64], down_block_types=['DownEncoderBlock2D'] * 3,
                   up_block_types=['UpDecoderBlock2D'] * 3, layers_per_block=1, latent_channels=4,
                   norm_num_groups=8)  # tests/test_tiled_vae.py CONFIG
SD_CONFIG = {k: v for k, v in tiny_diffusers.SD21_BASE_VAE_CONFIG.items() if not k.startswith('_')}


def random_vae(config: dict, seed: int = 0):
  """The VAE of ``config`` and random params drawn as ``tests/test_tiled_vae.tiny_vae``."""
  return tiny_diffusers.random_flax_vae(config, seed)


def photo(name: str, width: int, height: int) -> np.ndarray:
  """A bundled scikit-image photo resized to width x height, float32 in [-1, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgb = Image.fromarray(sources.load_rgb(sources.SKIMAGE_PREFIX + name))
  return np.asarray(rgb.resize((width, height), Image.BICUBIC), np.float32) / 127.5 - 1.0


def abs_error(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
  diff = np.abs(out.astype(np.float64) - ref)
  return dict(max=float(diff.max()), mean=float(diff.mean()))


def error_case(name: str, vae, params, image: np.ndarray, latent: np.ndarray | None, tile: int,
               margins: list[int]) -> list[dict]:
  """Rows of windowed-vs-exact errors; ``latent`` None: decode the exact posterior mean."""
  exact = tiled_vae.TiledVAE(vae, tile=tile, batch=8, attention_max_tokens=sys.maxsize)
  ref_mean, _ = exact.encode(params, image)
  latent = ref_mean if latent is None else latent
  ref_image = exact.decode(params, latent)
  rows = []
  for margin in margins:
    windowed = tiled_vae.TiledVAE(vae, tile=tile, batch=8, attention_max_tokens=0,
                                  attention_margin=margin)
    mean, _ = windowed.encode(params, image)
    decoded = windowed.decode(params, latent)
    rows.append(dict(case=name, latent=list(latent.shape[:2]), tile=tile, margin=margin,
                     window=list(windowed.last_attention.window),
                     decoded=abs_error(decoded, ref_image), posterior_mean=abs_error(mean, ref_mean),
                     decoded_scale=float(np.abs(ref_image).max()),
                     mean_scale=float(np.abs(ref_mean).max())))
    print(json.dumps(rows[-1]), flush=True)
  return rows


def attention_seconds(vae, params, h: int, w: int, tile: int, max_tokens: int, margin: int,
                      repeats: int = 2) -> dict:
  """Seconds of the decoder's two attention stages over an (h, w) latent of random activations:
  one entry per call (the first compiles). Drives ``TiledVAE``'s per-stage executor directly."""
  runner = tiled_vae.TiledVAE(vae, tile=tile, batch=8, attention_max_tokens=max_tokens,
                              attention_margin=margin)
  geometry = runner.geometry(h, w)
  runner.last_attention = mode = runner.attention_mode(h, w)
  stages = [s for s in tiled_vae.decoder_program(vae) if s.kind.startswith('attention')]
  channels = vae.block_out_channels[-1]
  hp, wp = geometry.padded(runner.latent_level)
  x = np.zeros((hp + 2 * tiled_vae.BORDER, wp + 2 * tiled_vae.BORDER, channels), np.float32)
  b = tiled_vae.BORDER
  x[b:b + h, b:b + w] = np.random.default_rng(0).standard_normal((h, w, channels))
  stats = {'x': (np.zeros(channels, np.float32), np.ones(channels, np.float32))}
  times = []
  # pylint: disable=protected-access
  stage_params = [{role: tiled_vae._get(params, path) for role, path in s.params} for s in stages]
  for _ in range(repeats):
    buffers = {'x': x.copy()}
    start = time.perf_counter()
    for stage, p in zip(stages, stage_params):
      buffers[stage.dst], stats[stage.dst] = runner._run_stage(stage, p, buffers, stats, geometry)
    times.append(time.perf_counter() - start)
  keys = mode.window[0] * mode.window[1] if mode.windowed else hp * wp
  return dict(latent=[h, w], tile=tile, channels=channels, mode=str(mode), keys_per_query=keys,
              seconds=times)


def print_tables(rows: list[dict], timings: list[dict]) -> None:
  print('\n| case | latent | tile | margin | window | decoded max / mean | posterior mean max / mean'
        ' |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    d, m = r['decoded'], r['posterior_mean']
    print(f"| {r['case']} | {r['latent'][0]}x{r['latent'][1]} | {r['tile']} | {r['margin']} | "
          f"{r['window'][0]}x{r['window'][1]} | {d['max']:.3g} / {d['mean']:.3g} "
          f"(scale {r['decoded_scale']:.2g}) | {m['max']:.3g} / {m['mean']:.3g} "
          f"(scale {r['mean_scale']:.2g}) |")
  print('\n| latent | C | tile | mode | keys per query | first call s | second call s |')
  print('|---|---|---|---|---|---|---|')
  for t in timings:
    print(f"| {t['latent'][0]}x{t['latent'][1]} | {t['channels']} | {t['tile']} | {t['mode']} | "
          f"{t['keys_per_query']} | {t['seconds'][0]:.2f} | {t['seconds'][-1]:.2f} |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--skip-sd', action='store_true', help='no SD-layout error case')
  parser.add_argument('--skip-timing', action='store_true')
  parser.add_argument('--sd-timing', action='store_true',
                      help='also time SD channels (512) at a 256x256 latent (minutes on a CPU)')
  parser.add_argument('--out', default=os.path.join(REPO, 'benchmarks', 'out',
                                                    'tiled_vae_attention.json'))
  args = parser.parse_args()
  results = dict(backend=jax.default_backend(), cpu=platform.processor() or platform.machine(),
                 cores=os.cpu_count(), load_average_start=os.getloadavg()[0])

  vae, params = random_vae(TEST_CONFIG)
  h, w = 16, 20  # tests/test_tiled_vae.py full_encode(4 h, 4 w) / full_decode(h, w) inputs
  image = np.random.default_rng(4 * h * 1000 + 4 * w).uniform(-1, 1, (4 * h, 4 * w, 3))
  image = image.astype(np.float32)
  latent = np.random.default_rng(h * 1000 + w + 1).standard_normal((h, w, 4)).astype(np.float32)
  rows = error_case('test', vae, params, image, latent, 4, [2, 4, 8])
  rows += error_case('tiny photo', vae, params, photo('coffee', 384, 256), None, 16, [4, 8, 16, 32])
  if not args.skip_sd:
    sd_vae, sd_params = random_vae(SD_CONFIG)
    rows += error_case('SD photo', sd_vae, sd_params, photo('astronaut', 768, 768), None, 32,
                       [8, 16, 32])
  timings = []
  if not args.skip_timing:
    cases = [(vae, params, 256, 256, 32), (vae, params, 1500, 100, 32)]
    if args.sd_timing:
      sd_vae, sd_params = random_vae(SD_CONFIG)
      cases.append((sd_vae, sd_params, 256, 256, 128))
    for case_vae, case_params, th, tw, tile in cases:
      for max_tokens in (sys.maxsize, 0):
        timings.append(attention_seconds(case_vae, case_params, th, tw, tile, max_tokens,
                                         tiled_vae.DEFAULT_ATTENTION_MARGIN))
        print(json.dumps(timings[-1]), flush=True)
  results.update(errors=rows, timings=timings, load_average_end=os.getloadavg()[0])
  print_tables(rows, timings)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
