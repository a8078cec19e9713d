"""``--mode=predict``: a trained run's class probabilities for your own images.

  allconv --config=configs/digits.py --workdir=workdirs/digits --mode=predict \\
      --config.predict.images='photos/*.png'

Each image (a file, the files of a folder, or a glob: ``predict.images``) is
read with Pillow, turned upright by its EXIF orientation, converted to RGB
and resized to the network's 32x32 (``config.py`` documents how), then
preprocessed by the run's own fitted transform and classified by its
selected checkpoint (`allconv_jax.trained.load`). The class names, classes
and preprocessing are the run's (its ``config.json`` and
``preprocess.npz``), not those of the ``--config`` given.

Output: one dict per image, ``{'image', 'classes', 'probabilities'}`` with
the ``predict.top_k`` best classes first, printed by the binary as one JSON
line each, and the same rows in ``<workdir>/predictions.csv``. A file that
is not an image is one warning line on stderr and is skipped.
"""

from __future__ import annotations

import csv
import glob
import os
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image, ImageOps

from allconv_jax import config as config_lib
from allconv_jax import datasets, files, input_pipeline, models, trained
from allconv_jax.errors import UserError

# Pillow's bilinear filter; when shrinking, Pillow widens its support by the
# scale factor, so it averages every source pixel (antialiased) instead of
# sampling a few.
RESAMPLE = Image.Resampling.BILINEAR


def predict_images(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
  """Classifies the images of ``config.predict.images`` with `workdir`'s run.

  Returns:
    One ``{'image': path, 'classes': [name, ...], 'probabilities': [p, ...]}``
    per image that could be read, in path order, best class first.

  Raises:
    UserError: a bad config, ``predict.images`` unset or naming no image
      (nothing found, or only files that are not images), or a workdir
      without a checkpoint; nothing is written then.
  """
  config_lib.validate(config)
  # The images first: a mistake in them is found before the checkpoint is
  # loaded, and the files are read only once.
  paths, images = read_images(find_images(config.predict.images),
                              config.predict.images)
  run = trained.load(workdir)
  names = datasets.class_names(run.config.dataset)
  if len(names) != int(run.meta['num_classes']):
    # A run whose config.json and checkpoint disagree: nothing a flag fixes.
    raise ValueError(f'{workdir}: {len(names)} class names for a checkpoint '
                     f"of {run.meta['num_classes']} classes")
  probabilities = classify(run, images, config.eval_batch_size)
  top_k = min(config.predict.top_k, len(names))
  results = []
  for path, p in zip(paths, probabilities):
    # Stable, so equal probabilities keep the label order.
    best = np.argsort(-p, kind='stable')[:top_k]
    results.append({'image': path, 'classes': [names[i] for i in best],
                    'probabilities': [float(p[i]) for i in best]})
  write_csv(os.path.join(workdir, files.PREDICTIONS), results, top_k)
  return results


def find_images(spec: str | None) -> list[str]:
  """The files `spec` names: a file, a folder's files, or a glob's matches.

  A folder's subfolders and hidden files (``.DS_Store``) are left out, as a
  glob leaves them out. An existing path is taken as it is, even if it
  contains glob characters.

  Raises:
    UserError: `spec` is unset, names nothing, or names no file.
  """
  field = 'predict.images'
  if not spec:
    raise UserError(f'{field}: required: an image file, a folder of images or '
                    "a glob, e.g. --config.predict.images='photos/*.jpg'")
  path = os.path.expanduser(spec)
  if os.path.isdir(path):
    found = [os.path.join(path, n) for n in sorted(os.listdir(path))
             if not n.startswith('.') and os.path.isfile(os.path.join(path, n))]
    if not found:
      raise UserError(f'{field}: the folder {spec} has no files')
    return found
  if os.path.exists(path):
    return [path]
  if not any(c in path for c in '*?['):
    raise UserError(f'{field}: no such file or folder: {spec}')
  found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
  if not found:
    raise UserError(f'{field}: {spec!r} matches no file')
  return found


def load_image(path: str) -> np.ndarray:
  """One image file as uint8 (32, 32, 3) RGB, as `predict_images` reads it.

  Raises:
    OSError, ValueError, SyntaxError: what Pillow raises for a file it
      cannot read, decode or convert (`read_images` reports them).
  """
  height, width, _ = models.INPUT_SHAPE
  with Image.open(path) as image:
    # Phones store photos sideways with an EXIF rotation; honour it.
    image = ImageOps.exif_transpose(image)
    # 'RGB' replicates grayscale and drops alpha (the stored colour of
    # transparent pixels stays). Stretched, not cropped: CIFAR's images are
    # whole scenes.
    image = image.convert('RGB').resize((width, height), RESAMPLE)
    return np.asarray(image, np.uint8)


def read_images(paths: list[str], spec: str) -> tuple[list[str], np.ndarray]:
  """Loads `paths`, warning on stderr about each file that is not an image.

  Returns:
    (the paths read, their images as uint8 (N, 32, 32, 3)).

  Raises:
    UserError: none of `paths` is an image.
  """
  kept, images = [], []
  for path in paths:
    try:
      images.append(load_image(path))
      kept.append(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      print(f'warning: {path}: {_why(e)}; skipped', file=sys.stderr, flush=True)
  if not images:
    raise UserError(f'predict.images: none of the {len(paths)} file(s) of '
                    f'{spec} is an image Pillow can read')
  return kept, np.stack(images)


def _why(error: Exception) -> str:
  """A one-line reason for a file that could not be read as an image."""
  if isinstance(error, Image.UnidentifiedImageError):
    return 'not an image (Pillow recognizes no image format in it)'
  if isinstance(error, OSError) and error.strerror:  # Permissions, a FIFO...
    return f'cannot read ({error.strerror})'
  first_line = (str(error).splitlines() or [''])[0]
  return f'not an image ({type(error).__name__}: {first_line})'


def classify(run: trained.Trained, images: np.ndarray,
             batch_size: int) -> np.ndarray:
  """Class probabilities (N, num_classes) of uint8 images, float32.

  Batches of at most `batch_size`, the last one padded, so that the network
  compiles for one shape only.
  """
  apply = jax.jit(lambda variables, x: jax.nn.softmax(
      run.model.apply(variables, x, train=False).astype(np.float32), axis=-1))
  x = run.preprocessor(images)
  out = [np.asarray(apply(run.variables, x[idx]))[mask > 0] for idx, mask in
         input_pipeline.eval_batches(len(x), min(batch_size, len(x)))]
  return np.concatenate(out)


def write_csv(path: str, results: list[dict], top_k: int) -> None:
  """Writes `results` as ``image, class_1, probability_1, ...``, atomically."""
  header = ['image'] + [f'{field}_{rank}' for rank in range(1, top_k + 1)
                        for field in ('class', 'probability')]
  def write(tmp):
    with open(tmp, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(header)
      for r in results:
        writer.writerow([r['image'], *[v for pair in zip(
            r['classes'], r['probabilities']) for v in pair]])
  files.atomic_write(path, write)
