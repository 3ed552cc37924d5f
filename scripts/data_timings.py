"""Times the input pipeline of a `folder:` dataset: decoded at each batch, or cached.

  python scripts/data_timings.py [--folder=DIR] [--images=1024] [--batch=64] [--batches=20]

Prints one JSON line per reader with its images/s over `--batches` random training
batches (after one untimed batch), the rate a training step has to stay under for the
input pipeline not to be the bottleneck: `folder_decoded_each_batch` (PIL decoding, crop
and resize on data.py's thread pool, what a folder without room for its cache does),
`folder_cache_build` (the one-time decoding into the cache) and `folder_cached` (the
memory-mapped cache). The images are the first `--images` of --folder (linked into a
temporary folder, so that the cache stays that small), or made up: JPEGs of CelebA's
aligned size (218x178), smooth colour fields with noise. The geometry is
configs/celeba.py's (crop 148, 96x96x3) unless --image_size/--crop_size/--channels say
otherwise. The cache is written to a temporary directory, never the user's.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avae_jax import cli  # pylint: disable=wrong-import-position
from avae_jax import data  # pylint: disable=wrong-import-position
from configs import celeba  # pylint: disable=wrong-import-position

_FOLDER = cli.define_path_flag('folder', None, 'folder of images (default: made up)')
_IMAGES = flags.DEFINE_integer('images', 1024, 'images timed (of --folder, or made up)',
                               lower_bound=1)
_BATCH = flags.DEFINE_integer('batch', 64, 'images per batch', lower_bound=1)
_BATCHES = flags.DEFINE_integer('batches', 20, 'timed batches per reader', lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 96, 'side of the preprocessed images',
                                   lower_bound=1)
_CROP_SIZE = flags.DEFINE_integer('crop_size', 148, 'centre crop before resizing (0: largest)',
                                  lower_bound=0)
_CHANNELS = flags.DEFINE_integer('channels', 3, '1 or 3')


def make_images(folder: str, count: int) -> int:
  """Writes `count` CelebA-sized JPEGs (smooth colour fields with noise); returns count."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  for i in range(count):
    coarse = Image.fromarray((rng.random((28, 22, 3)) * 255).astype(np.uint8))
    smooth = np.asarray(coarse.resize((178, 218), Image.BICUBIC), np.float32)
    noisy = np.clip(smooth + rng.normal(0.0, 8.0, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(os.path.join(folder, f'{i:06d}.jpg'), quality=90)
  return count


def link_images(source: str, folder: str, count: int) -> int:
  """Links the first `count` images of `source` into `folder`; returns how many."""
  paths = data._list_images(source)[:count]  # pylint: disable=protected-access
  if not paths:
    sys.exit(f'data_timings.py: error: --folder={source} holds no images')
  os.makedirs(folder)
  for i, path in enumerate(paths):
    os.symlink(os.path.abspath(path), os.path.join(folder, f'{i:06d}{os.path.splitext(path)[1]}'))
  return len(paths)


def images_per_s(source: data.Source, batch: int, batches: int) -> float:
  """Images/s of source.get over random batches, after one untimed batch."""
  rng = np.random.default_rng(0)
  draws = [rng.choice(source.num_examples, batch, replace=False) for _ in range(batches + 1)]
  source.get(draws[0])
  start = time.perf_counter()
  for indices in draws[1:]:
    source.get(indices)
  return batch * batches / (time.perf_counter() - start)


def main(argv: list[str]) -> None:
  """Prints the three readers' rates; a setting the data refuses is one line, as it says."""
  if len(argv) > 1:
    # A folder given without --folder= would time the made-up images instead.
    sys.exit(f'data_timings.py: error: unexpected arguments {argv[1:]} (a folder is '
             '--folder=DIR)')
  try:
    _time_readers()
  except data.DataError as e:  # --channels=2, a crop larger than the images
    sys.exit(f'data_timings.py: error: {e}')


def _time_readers() -> None:
  """main's work: prints one JSON line per reader."""
  with tempfile.TemporaryDirectory() as tmp:
    folder = os.path.join(tmp, 'images')
    if _FOLDER.value:
      total = link_images(_FOLDER.value, folder, _IMAGES.value)
    else:
      total = make_images(folder, _IMAGES.value)
    config = celeba.get_config()
    config.dataset = f'folder:{folder}'
    config.image_size, config.crop_size = _IMAGE_SIZE.value, _CROP_SIZE.value
    config.channels = _CHANNELS.value
    os.environ['AVAE_JAX_CACHE'] = os.path.join(tmp, 'cache')
    common = dict(batch=_BATCH.value, cpus=len(os.sched_getaffinity(0)),
                  image_shape=[config.image_size, config.image_size, config.channels])

    cached = data._folder_cached  # pylint: disable=protected-access
    data._folder_cached = lambda *args: None  # pylint: disable=protected-access
    try:
      lazy = data.load(config, 'train')
    finally:
      data._folder_cached = cached  # pylint: disable=protected-access
    if lazy.num_examples < _BATCH.value:
      # One line: absl's UsageError would print the whole docstring before it.
      sys.exit(f'data_timings.py: error: --batch={_BATCH.value} is more than the '
               f'{lazy.num_examples} training images of the folder')
    rate = images_per_s(lazy, _BATCH.value, _BATCHES.value)
    print(json.dumps(dict(reader='folder_decoded_each_batch', images_per_s=round(rate, 1),
                          **common)), flush=True)

    start = time.perf_counter()
    train = data.load(config, 'train')
    print(json.dumps(dict(reader='folder_cache_build', images=total,
                          images_per_s=round(total / (time.perf_counter() - start), 1),
                          **common)), flush=True)
    rate = images_per_s(train, _BATCH.value, _BATCHES.value)
    print(json.dumps(dict(reader='folder_cached', images_per_s=round(rate, 1), **common)),
          flush=True)


if __name__ == '__main__':
  app.run(main)
