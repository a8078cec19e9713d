"""Writes tiny CIFAR archives in exactly the official binary format.

The layout and record format follow https://www.cs.toronto.edu/~kriz/cifar.html
("binary version"): each record is the label byte(s) followed by 3072 pixel
bytes, 1024 red, then 1024 green, then 1024 blue, each channel row-major.
Images and labels are random; the writers return them for comparison.
"""

import dataclasses
import io
import pathlib
import tarfile

import numpy as np

CIFAR10_NAMES = (
    'airplane', 'automobile', 'bird', 'cat', 'deer',
    'dog', 'frog', 'horse', 'ship', 'truck',
)
CIFAR100_FINE_NAMES = (
    'apple', 'aquarium_fish', 'baby', 'bear', 'beaver', 'bed', 'bee', 'beetle',
    'bicycle', 'bottle', 'bowl', 'boy', 'bridge', 'bus', 'butterfly', 'camel',
    'can', 'castle', 'caterpillar', 'cattle', 'chair', 'chimpanzee', 'clock',
    'cloud', 'cockroach', 'couch', 'crab', 'crocodile', 'cup', 'dinosaur',
    'dolphin', 'elephant', 'flatfish', 'forest', 'fox', 'girl', 'hamster',
    'house', 'kangaroo', 'keyboard', 'lamp', 'lawn_mower', 'leopard', 'lion',
    'lizard', 'lobster', 'man', 'maple_tree', 'motorcycle', 'mountain', 'mouse',
    'mushroom', 'oak_tree', 'orange', 'orchid', 'otter', 'palm_tree', 'pear',
    'pickup_truck', 'pine_tree', 'plain', 'plate', 'poppy', 'porcupine',
    'possum', 'rabbit', 'raccoon', 'ray', 'road', 'rocket', 'rose', 'sea',
    'seal', 'shark', 'shrew', 'skunk', 'skyscraper', 'snail', 'snake', 'spider',
    'squirrel', 'streetcar', 'sunflower', 'sweet_pepper', 'table', 'tank',
    'telephone', 'television', 'tiger', 'tractor', 'train', 'trout', 'tulip',
    'turtle', 'wardrobe', 'whale', 'willow_tree', 'wolf', 'woman', 'worm',
)
CIFAR100_COARSE_NAMES = (
    'aquatic_mammals', 'fish', 'flowers', 'food_containers',
    'fruit_and_vegetables', 'household_electrical_devices',
    'household_furniture', 'insects', 'large_carnivores',
    'large_man-made_outdoor_things', 'large_natural_outdoor_scenes',
    'large_omnivores_and_herbivores', 'medium_mammals',
    'non-insect_invertebrates', 'people', 'reptiles', 'small_mammals', 'trees',
    'vehicles_1', 'vehicles_2',
)


@dataclasses.dataclass
class Contents:
  """What a written archive holds, per split ('train', 'test')."""

  images: dict[str, np.ndarray]  # uint8 (N, 32, 32, 3), in archive order
  labels: dict[str, np.ndarray]  # the fine label for cifar100
  coarse_labels: dict[str, np.ndarray] | None = None  # cifar100 only


def _records(images: np.ndarray, *label_columns: np.ndarray) -> bytes:
  out = bytearray()
  for i, image in enumerate(images):
    out += bytes(int(column[i]) for column in label_columns)
    out += image.transpose(2, 0, 1).tobytes()  # HWC -> planar R, G, B
  return bytes(out)


def _names_file(names) -> bytes:
  # The official files end with blank lines, which tfds skips.
  return ('\n'.join(names) + '\n\n').encode()


def _write_tar_gz(path: pathlib.Path, files: dict[str, bytes]) -> None:
  with tarfile.open(path, 'w:gz') as tar:
    for name, data in files.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
  return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def write_cifar10(path, per_file: int = 10, seed: int = 0) -> Contents:
  """Writes a cifar-10-binary.tar.gz look-alike with 5 train files + 1 test.

  With `per_file` a multiple of 10, every file holds every class equally.
  """
  rng = np.random.default_rng(seed)
  files, images, labels = {}, {'train': [], 'test': []}, {'train': [], 'test': []}
  names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
  for name in names:
    split = 'test' if name.startswith('test') else 'train'
    file_labels = rng.permutation(np.arange(per_file) % 10).astype(np.uint8)
    file_images = _images(rng, per_file)
    files[f'cifar-10-batches-bin/{name}'] = _records(file_images, file_labels)
    images[split].append(file_images)
    labels[split].append(file_labels)
  files['cifar-10-batches-bin/batches.meta.txt'] = _names_file(CIFAR10_NAMES)
  _write_tar_gz(pathlib.Path(path), files)
  return Contents(
      images={k: np.concatenate(v) for k, v in images.items()},
      labels={k: np.concatenate(v) for k, v in labels.items()},
  )


def write_cifar100(
    path, n_train: int = 100, n_test: int = 20, seed: int = 0
) -> Contents:
  """Writes a cifar-100-binary.tar.gz look-alike (train.bin and test.bin)."""
  rng = np.random.default_rng(seed)
  files = {}
  contents = Contents(images={}, labels={}, coarse_labels={})
  for split, n in (('train', n_train), ('test', n_test)):
    fine = rng.permutation(np.arange(n) % 100).astype(np.uint8)
    coarse = rng.integers(0, 20, n, dtype=np.uint8)
    images = _images(rng, n)
    # Coarse label first, then fine, as in the official files.
    files[f'cifar-100-binary/{split}.bin'] = _records(images, coarse, fine)
    contents.images[split] = images
    contents.labels[split] = fine
    contents.coarse_labels[split] = coarse
  files['cifar-100-binary/coarse_label_names.txt'] = _names_file(
      CIFAR100_COARSE_NAMES
  )
  files['cifar-100-binary/fine_label_names.txt'] = _names_file(
      CIFAR100_FINE_NAMES
  )
  _write_tar_gz(pathlib.Path(path), files)
  return contents
