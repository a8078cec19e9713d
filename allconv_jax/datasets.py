"""Loads a whole dataset into memory as uint8 NHWC images and int32 labels.

CIFAR-10/100 are prepared once by the real tensorflow-datasets builders, from
the official archive or a download, and kept as arrays beside them
(``<data_dir>/allconv_jax/<name>.npz``): later runs read those and import
neither TensorFlow nor tfds. ``digits`` is scikit-learn's bundled 8x8 digits
set, upsampled to 32x32 RGB so that it can stand in for CIFAR on a machine
with neither network nor the CIFAR archives.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import socket
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
from absl import logging

from allconv_jax import files
from allconv_jax.errors import UserError

NAMES = ('cifar10', 'cifar100', 'digits')

# The official archives, as registered in tfds' checksum files.
_CIFAR_URLS = {
    'cifar10': 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz',
    'cifar100': 'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz',
}


# Named class subsets for transfer learning: the fine classes of two disjoint
# groups of CIFAR-100 superclasses, one close to CIFAR-10's classes (vehicles)
# and one far from them (flowers, fruit and vegetables).
SUBSETS = {
    ('cifar100', 'subset1'): (
        'bicycle', 'bus', 'motorcycle', 'pickup_truck', 'train',  # vehicles 1
        'lawn_mower', 'rocket', 'streetcar', 'tank', 'tractor'),  # vehicles 2
    ('cifar100', 'subset2'): (
        'orchid', 'poppy', 'rose', 'sunflower', 'tulip',  # flowers
        'apple', 'mushroom', 'orange', 'pear', 'sweet_pepper'),  # fruit, veg.
    # Offline stand-ins: pretrain on one half of the digits, transfer to the other.
    ('digits', 'subset1'): ('0', '1', '2', '3', '4'),
    ('digits', 'subset2'): ('5', '6', '7', '8', '9'),
}


# Every class name of each dataset in label order, as the prepared data holds
# them: the official archives' batches.meta.txt, fine_label_names.txt and
# coarse_label_names.txt, which tfds reads into its ClassLabel features.
# Constants, so that a trained run's names are known without loading its data
# (`class_names`).
_CLASS_NAMES = {
    ('cifar10', 'fine'): (
        'airplane', 'automobile', 'bird', 'cat', 'deer',
        'dog', 'frog', 'horse', 'ship', 'truck'),
    ('cifar100', 'fine'): (
        'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee',
        'beetle', 'bicycle', 'bottle', 'bowl', 'boy', 'bridge', 'bus',
        'butterfly', 'camel', 'can', 'castle', 'caterpillar', 'cattle', 'chair',
        'chimpanzee', 'clock', 'cloud', 'cockroach', 'couch', 'crab',
        'crocodile', 'cup', 'dinosaur', 'dolphin', 'elephant', 'flatfish',
        'forest', 'fox', 'girl', 'hamster', 'house', 'kangaroo', 'keyboard',
        'lamp', 'lawn_mower', 'leopard', 'lion', 'lizard', 'lobster', 'man',
        'maple_tree', 'motorcycle', 'mountain', 'mouse', 'mushroom', 'oak_tree',
        'orange', 'orchid', 'otter', 'palm_tree', 'pear', 'pickup_truck',
        'pine_tree', 'plain', 'plate', 'poppy', 'porcupine', 'possum', 'rabbit',
        'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea', 'seal', 'shark',
        'shrew', 'skunk', 'skyscraper', 'snail', 'snake', 'spider', 'squirrel',
        'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank', 'telephone',
        'television', 'tiger', 'tractor', 'train', 'trout', 'tulip', 'turtle',
        'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman', 'worm'),
    ('cifar100', 'coarse'): (
        'aquatic_mammals', 'fish', 'flowers', 'food_containers',
        'fruit_and_vegetables', 'household_electrical_devices',
        'household_furniture', 'insects', 'large_carnivores',
        'large_man-made_outdoor_things', 'large_natural_outdoor_scenes',
        'large_omnivores_and_herbivores', 'medium_mammals',
        'non-insect_invertebrates', 'people', 'reptiles', 'small_mammals',
        'trees', 'vehicles_1', 'vehicles_2'),
    ('digits', 'fine'): tuple(str(i) for i in range(10)),
}


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # uint8, (N, 32, 32, 3), NHWC
  labels: np.ndarray  # int32, (N,), values 0..num_classes-1


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  train: Split
  test: Split
  class_names: tuple[str, ...]  # after subsetting, in new label order
  # Held out of the official training split; empty without one.
  validation: Split | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def load(config) -> Dataset:
  """Loads the dataset described by the `dataset` sub-config into memory.

  Args:
    config: A ConfigDict with fields `name` (one of `NAMES`), `data_dir`
      (tfds data dir, or None for tfds' default), `archive` (path to a local
      copy of the official CIFAR binary archive, or None to download; not
      needed, and not read, once the dataset is prepared in `data_dir`),
      `classes` (None/'' for all, or class names and/or indices as a list or
      a comma-separated string) and `label` ('fine' or 'coarse'; 'coarse' is
      the 20 superclasses of cifar100).

  Returns:
    The dataset, restricted to `classes` and relabelled 0..k-1 in that
    order, with `validation_size` (default 0) training images moved to its
    validation split (see `split_validation`).

  Raises:
    ValueError: For an unknown name, which `config.validate` rules out.
    UserError: For an unknown label or class, a `validation_size` that does
      not fit the data, a missing or non-official archive, or CIFAR data
      that is neither prepared nor downloadable.
  """
  name = config.name
  if name not in NAMES:
    # Not a UserError: config.validate has checked dataset.name already.
    raise ValueError(
        f'dataset.name: unknown dataset {name!r}; allowed: {", ".join(NAMES)}'
    )
  label = config.get('label') or 'fine'
  if label not in (('fine', 'coarse') if name == 'cifar100' else ('fine',)):
    # Not a UserError: config.validate has checked dataset.label already.
    raise ValueError(f'dataset.label: {label!r} does not fit {name}')
  if name == 'digits':
    train, test, class_names = _load_digits()
  else:
    train, test, class_names = _load_cifar(
        name, config.get('data_dir') or None, config.get('archive'), label
    )
  data = _subset(name, train, test, class_names, config.get('classes'))
  size = config.get('validation_size') or 0
  if size:
    train, validation = split_validation(data.train, size)
    data = dataclasses.replace(data, train=train, validation=validation)
  return data


def class_names(config) -> tuple[str, ...]:
  """The class names of a `dataset` sub-config, without loading any data.

  The names `load` would give (``Dataset.class_names``): after subsetting by
  ``config.classes``, in the new label order, e.g. of a trained run's
  ``config.json`` to name its outputs.

  Raises:
    ValueError: For an unknown name or label, which `config.validate` rules
      out.
    UserError: For an unknown class, as `load`.
  """
  key = (config.name, config.get('label') or 'fine')
  if key not in _CLASS_NAMES:
    raise ValueError(f'dataset: no classes for {key[0]!r} with label {key[1]!r}')
  # The subsetting of `load` itself, on splits without images.
  empty = Split(np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int32))
  return _subset(config.name, empty, empty, _CLASS_NAMES[key],
                 config.get('classes')).class_names


def split_validation(split: Split, size: int) -> tuple[Split, Split]:
  """Holds `size` images of a training split out for validation.

  Stratified by class (each class keeps its share, to rounding) and
  deterministic: the same images for every run on the same data, whatever
  the run's seed, so that runs of a sweep are selected on the same images.

  Returns:
    (the remaining training split, the validation split), each in the
    original order.

  Raises:
    UserError: `size` leaves no training image or cannot hold every class.
  """
  import sklearn.model_selection  # pylint: disable=g-import-not-at-top

  classes = len(np.unique(split.labels))
  if not classes <= size <= len(split.labels) - classes:
    raise UserError(
        f'dataset.validation_size: {size} does not fit the {len(split.labels)} '
        f'training images of {classes} classes; allowed: 0 or '
        f'{classes}..{len(split.labels) - classes}')
  keep, held = sklearn.model_selection.train_test_split(
      np.arange(len(split.labels)), test_size=size, stratify=split.labels,
      random_state=0)
  keep, held = np.sort(keep), np.sort(held)
  return (Split(split.images[keep], split.labels[keep]),
          Split(split.images[held], split.labels[held]))


def _load_digits() -> tuple[Split, Split, tuple[str, ...]]:
  # Imported here so that importing this module stays cheap.
  import scipy.ndimage
  import sklearn.datasets
  import sklearn.model_selection

  digits = sklearn.datasets.load_digits()
  # Smooth (bilinear) upsampling; it never overshoots, so values stay 0..16.
  images = scipy.ndimage.zoom(digits.images, (1, 4, 4), order=1)
  images = np.round(images * (255 / 16)).clip(0, 255).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = sklearn.model_selection.train_test_split(
      images, labels, test_size=0.25, stratify=labels, random_state=0
  )
  class_names = _CLASS_NAMES['digits', 'fine']
  return Split(x_train, y_train), Split(x_test, y_test), class_names


def _load_cifar(
    name: str, data_dir: str | None, archive: str | None, label: str
) -> tuple[Split, Split, tuple[str, ...]]:
  """The arrays kept beside tfds' data, prepared first if there are none."""
  if archive and not os.path.isfile(archive):
    raise UserError(f'dataset.archive: no such file: {archive}')
  data_dir = data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets')  # tfds' own default.
  cache = os.path.join(data_dir, 'allconv_jax', f'{name}.npz')
  if not os.path.exists(cache):
    logging.info('Preparing %s with tensorflow-datasets, once (tfds shows its '
                 'progress); later runs read %s', name, cache)
    start = time.monotonic()
    arrays = _prepare_cifar(name, data_dir, archive)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    files.atomic_write(cache, lambda tmp: np.savez(tmp, **arrays))
    logging.info('Prepared %s in %.0f s', name, time.monotonic() - start)
  feature = 'coarse_label' if label == 'coarse' else 'label'
  try:
    with np.load(cache) as f:
      return (Split(f['train_image'], f[f'train_{feature}']),
              Split(f['test_image'], f[f'test_{feature}']),
              tuple(str(n) for n in f[f'{feature}_names']))
  except (OSError, KeyError, ValueError) as e:
    raise UserError(f'dataset.data_dir: cannot read {cache} '
                    f'({type(e).__name__}); delete it to prepare it again') from None


def _prepare_cifar(name: str, data_dir: str, archive: str | None) -> dict:
  """Prepares CIFAR with tfds; returns every split and label as arrays."""
  # Imported here because importing TensorFlow takes seconds.
  import requests
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.download import download_manager

  url = _CIFAR_URLS[name]
  archive_name = os.path.basename(url)
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    if not archive and not _reachable(url):
      # tfds retries a failed download for minutes before giving up.
      raise _not_downloadable(name, builder.data_dir, archive_name)
    with tempfile.TemporaryDirectory() as tmp:
      if archive:
        # tfds takes a file from manual_dir, instead of downloading it, when
        # its name is the URL's file name; it still verifies the checksum.
        os.symlink(os.path.abspath(archive), os.path.join(tmp, archive_name))
      download_config = tfds.download.DownloadConfig(
          manual_dir=tmp,
          # The extracted files are useless once the dataset is prepared.
          extract_dir=os.path.join(tmp, 'extracted'),
          try_download_gcs=False,
      )
      try:
        builder.download_and_prepare(download_config=download_config)
      except download_manager.NonMatchingChecksumError as e:
        if not archive:  # A download that came back corrupted.
          raise UserError(f'dataset.archive: download of {url} is corrupt; '
                          f'pass --config.dataset.archive=<path to '
                          f'{archive_name}>') from e
        raise UserError(
            f'dataset.archive: {archive} is not the official {archive_name} '
            '(checksum mismatch)'
        ) from e
      except requests.RequestException as e:
        raise _not_downloadable(name, builder.data_dir, archive_name) from e

  features = ('label', 'coarse_label') if name == 'cifar100' else ('label',)
  arrays = {f'{feature}_names': np.array(builder.info.features[feature].names)
            for feature in features}
  for split in ('train', 'test'):
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    arrays[f'{split}_image'] = data['image'].astype(np.uint8)
    arrays.update({f'{split}_{feature}': data[feature].astype(np.int32)
                   for feature in features})
  return arrays


def _reachable(url: str) -> bool:
  if urllib.request.getproxies():
    return True  # Only the proxy knows; let tfds try.
  host = urllib.parse.urlparse(url).hostname
  try:
    socket.create_connection((host, 443), timeout=10).close()
    return True
  except OSError:
    return False


def _not_downloadable(name: str, data_dir: str, archive_name: str) -> UserError:
  return UserError(
      f'dataset.archive: {name} is not prepared in {data_dir} and could not '
      f'be downloaded; pass --config.dataset.archive=<path to {archive_name}>'
  )


def _subset(
    name: str,
    train: Split,
    test: Split,
    class_names: tuple[str, ...],
    classes,
) -> Dataset:
  if classes is None or classes == '':
    return Dataset(name, train, test, class_names)
  if isinstance(classes, str) and (name, classes.strip()) in SUBSETS:
    classes = SUBSETS[name, classes.strip()]
  elif isinstance(classes, str):
    # As typed on a command line: 'apple,bear' or '0,3,5'.
    classes = [c.strip() for c in classes.split(',')]

  chosen = [_class_index(name, c, class_names) for c in classes]
  for i, index in enumerate(chosen):
    if index in chosen[:i]:
      raise UserError(
          f'dataset.classes: class {class_names[index]!r} is given twice; '
          'each class may appear once'
      )
  # new_label[old] is the position of `old` in `chosen`, or -1 if dropped.
  new_label = np.full(len(class_names), -1, np.int32)
  new_label[chosen] = np.arange(len(chosen), dtype=np.int32)

  def keep(split: Split) -> Split:
    labels = new_label[split.labels]
    mask = labels >= 0
    return Split(split.images[mask], labels[mask])

  names = tuple(class_names[i] for i in chosen)
  return Dataset(name, keep(train), keep(test), names)


def _class_index(name: str, cls, class_names: tuple[str, ...]) -> int:
  """Resolves a class name, or an index given as int or digit string."""
  if isinstance(cls, str) and cls in class_names:
    return class_names.index(cls)
  if isinstance(cls, str) and cls.isdigit():
    cls = int(cls)
  if isinstance(cls, numbers.Integral) and not isinstance(cls, bool):
    if 0 <= cls < len(class_names):
      return int(cls)
    raise UserError(
        f'dataset.classes: index {cls} out of range for {name}; '
        f'allowed: 0..{len(class_names) - 1} or a class name'
    )
  raise UserError(
      f'dataset.classes: unknown class {cls!r} for {name}; '
      f'allowed: {", ".join(class_names)}'
  )
