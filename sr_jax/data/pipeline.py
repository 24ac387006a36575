"""The training-pair stream: a grain pipeline of (HQ crop, degraded LQ) batches.

    from sr_jax.data import pipeline
    config = pipeline.source_config()                  # tiny default: bundled scikit-image photos
    it = pipeline.make_train_iterator(config, seed=0, batch_size=4, worker_count=2)
    batch = next(it)                                   # {'hq', 'lq'}: float32 (B, S, S, 3) in [-1, 1]
    state = it.get_state()                             # goes into the training checkpoint
    it.set_state(state)                                # resumes exactly there

Determinism. The stream is a pure function of (config, seed): global record g is position p = g mod N of
epoch e = g div N over the N listed images; epoch e visits the images in a permutation drawn from
(seed, e) and record g draws its crop, flip and degradation from `np.random.default_rng([seed, e, p])`.
Nothing depends on worker or thread count: grain's `mp_prefetch` gives worker w the records w, w + W, ...
and interleaves them back in order, and batches are formed after that, so 0, 1 or 2 workers give the same
batches. Process i of P (multi-host) takes the records i, i + P, ... of the global stream.

Bad files. A record whose image cannot be used (see `sources`) is replaced by the next images of the same
epoch permutation (positions p + 1, p + 2, ...) until one loads, keeping the record's own generator:
the replacement is as deterministic as the files. Each skip is logged once per path and counted in
`sources.SKIPS` of the process that read it.
"""
from __future__ import annotations

import sys
import threading
from typing import Sequence

import ml_collections
import numpy as np

from sr_jax.data import degradations
from sr_jax.data import sources

_SHUFFLE_STREAM = 1  # SeedSequence spawn key of the per-epoch permutation (records use the plain key)


def source_config(paths: Sequence[str] = ('skimage:',), crop_size: int = 512,
                  preset: str = 'omgsr_512') -> ml_collections.ConfigDict:
  """The data block a training config embeds.

  Fields:
    paths: folders, .txt path lists or 'skimage:[names]' (see `sources`).
    resize_to_crop: [] (all False), [flag] (all) or one flag per path: resize the whole image to
      crop_size^2 with Lanczos before cropping (OMGSR does this for FFHQ faces at 512).
    repeats: [] (all 1) or one int per path: how often a source is listed per epoch (OSEDiff-style
      weighting of sources).
    crop_size: HQ crop side S.
    preset: degradation preset name (`degradations.PRESET_NAMES`).
    min_image_side: images with a shorter side are skipped as too small.
    max_resample: how many replacement images a record tries before giving up with an error.
  """
  return ml_collections.ConfigDict(dict(
      paths=list(paths),
      resize_to_crop=[],
      repeats=[],
      crop_size=crop_size,
      preset=preset,
      min_image_side=32,
      max_resample=64,
  ))


class PairMaker:
  """Global record index -> {'hq', 'lq'} (float32 (S, S, 3) in [-1, 1]). Picklable for grain workers."""

  def __init__(self, entries: Sequence[sources.ImageEntry], crop_size: int,
               degradation: ml_collections.ConfigDict, seed: int, min_image_side: int = 32,
               max_resample: int = 64):
    if seed < 0:
      raise ValueError(f'seed must be non-negative (it seeds numpy SeedSequences), got {seed}')
    if not entries:
      raise ValueError('no images to draw records from')
    self.entries = list(entries)
    self.crop_size = int(crop_size)
    self.degradation = degradation
    self.seed = int(seed)
    self.min_image_side = int(min_image_side)
    self.max_resample = int(max_resample)
    self._permutations: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_permutations'], state['_lock'] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    """Order in which epoch `epoch` visits the images (cached for the two latest epochs)."""
    with self._lock:
      perm = self._permutations.get(epoch)
      if perm is None:
        sequence = np.random.SeedSequence([self.seed, epoch], spawn_key=(_SHUFFLE_STREAM,))
        perm = np.random.default_rng(sequence).permutation(len(self.entries))
        self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
        self._permutations[epoch] = perm
      return perm

  def load(self, epoch: int, position: int) -> np.ndarray:
    """uint8 image of the record, replacing unreadable files by the next ones of the permutation."""
    perm, count = self.permutation(epoch), len(self.entries)
    for attempt in range(self.max_resample + 1):
      entry = self.entries[perm[(position + attempt) % count]]
      if sources.SKIPS.known_bad(entry.path) is not None:
        sources.SKIPS.record(entry.path, '')
        continue
      try:
        return sources.load_rgb(entry, self.crop_size, self.min_image_side)
      except sources.BadImageError as e:
        sources.SKIPS.record(entry.path, str(e))
    raise RuntimeError(f'{self.max_resample + 1} images in a row were unreadable at epoch {epoch}, position '
                       f'{position}; last bad: {entry.path}')

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    epoch, position = divmod(int(index), len(self.entries))
    rng = np.random.default_rng([self.seed, epoch, position])
    image = self.load(epoch, position)
    crop = sources.random_hflip(sources.random_crop(image, self.crop_size, rng), rng)
    hq = crop.astype(np.float32) / np.float32(255.0)
    lq = degradations.degrade(hq, rng, self.degradation)
    return {'hq': hq * 2.0 - 1.0, 'lq': lq * 2.0 - 1.0}


def make_pair_maker(config: ml_collections.ConfigDict, seed: int, check: bool = True) -> PairMaker:
  """Lists the sources of `config` (a `source_config()`), checks each has a readable image, builds the map."""
  listed = sources.list_sources(list(config.paths))
  if check:
    sources.check_sources(listed, config.min_image_side)
  entries = sources.build_index(list(config.paths), config.resize_to_crop, config.repeats, listed)
  return PairMaker(entries, config.crop_size, degradations.preset(config.preset), seed,
                   config.min_image_side, config.max_resample)


def _init_worker(worker_index: int, worker_count: int) -> None:
  """grain worker start: one OpenCV thread per worker process (the workers are the parallelism)."""
  del worker_index, worker_count
  import cv2  # pylint: disable=g-import-not-at-top
  cv2.setNumThreads(1)


def _ensure_absl_flags_parsed() -> None:
  """grain 0.2.18 multi-worker paths read absl flags; outside `absl.app.run` mark them parsed."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(config: ml_collections.ConfigDict, seed: int, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 worker_count: int = 0, read_threads: int = 1, num_epochs: int | None = None,
                 worker_buffer_size: int = 2):
  """The grain IterDataset of batches (see the module docstring); `num_epochs=None` repeats forever."""
  import grain  # pylint: disable=g-import-not-at-top
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  maker = make_pair_maker(config, seed)
  stop = sys.maxsize if num_epochs is None else num_epochs * len(maker.entries)
  dataset = grain.MapDataset.range(process_index, stop, process_count).map(maker)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=max(1, read_threads), prefetch_buffer_size=max(2, 2 * read_threads)))
  if worker_count > 0:
    _ensure_absl_flags_parsed()
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=worker_buffer_size),
        worker_init_fn=_init_worker)
  return dataset.batch(batch_size, drop_remainder=True)


def make_train_iterator(config: ml_collections.ConfigDict, seed: int, batch_size: int,
                        process_index: int | None = None, process_count: int | None = None,
                        worker_count: int = 0, read_threads: int = 1, num_epochs: int | None = None):
  """Iterator of this process's batches {'hq', 'lq'}: float32 (batch_size, S, S, 3) in [-1, 1].

  `batch_size` is per process. `get_state()` / `set_state()` save and restore the position (restore
  into an iterator built with the same arguments). Close it (`it.close()`) when workers are used.
  """
  return iter(make_dataset(config, seed, batch_size, process_index, process_count, worker_count,
                           read_threads, num_epochs))
