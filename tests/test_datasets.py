"""Tests of allconv_jax.datasets, CIFAR through the real tfds builders."""

import dataclasses
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums

import cifar_archives
from allconv_jax import datasets
from allconv_jax.errors import UserError


def _config(name, **overrides):
  fields = dict(name=name, data_dir=None, archive=None, classes=None,
                label='fine')
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def accept_archive(monkeypatch, name, path):
  """Makes tfds take the test archive at `path` for the official `name` one.

  tfds checks a manually supplied archive against the sha256 it has
  registered for the official file, which a tiny test archive cannot match.
  Registering the test archive's own checksum keeps everything else real:
  manual_dir pickup, checksum validation, extraction and parsing.
  """
  builder_cls = tfds.builder_cls(name)
  (url, official), = builder_cls.url_infos.items()
  info = checksums.compute_url_info(path)
  info = dataclasses.replace(info, filename=official.filename)
  monkeypatch.setattr(builder_cls, 'url_infos', {url: info})


def _sorted_by_image(images, *labels):
  """Sorts examples by pixels, as tfds stores them in a shuffled order."""
  order = sorted(range(len(images)), key=lambda i: images[i].tobytes())
  return (images[order],) + tuple(l[order] for l in labels)


def _prepare(tmp_path_factory, name, write):
  tmp = tmp_path_factory.mktemp(name)
  archive = tmp / 'my_copy.tar.gz'  # Any name: load() renames it for tfds.
  contents = write(archive)
  data_dir = str(tmp / 'tfds')
  with pytest.MonkeyPatch.context() as monkeypatch:
    accept_archive(monkeypatch, name, archive)
    ds = datasets.load(_config(name, data_dir=data_dir, archive=str(archive)))
  return data_dir, contents, ds


@pytest.fixture(scope='module')
def cifar10(tmp_path_factory):
  return _prepare(tmp_path_factory, 'cifar10', cifar_archives.write_cifar10)


@pytest.fixture(scope='module')
def cifar100(tmp_path_factory):
  return _prepare(tmp_path_factory, 'cifar100', cifar_archives.write_cifar100)


def test_cifar10_round_trip(cifar10):
  _, contents, ds = cifar10
  assert ds.name == 'cifar10'
  assert ds.class_names == cifar_archives.CIFAR10_NAMES
  assert ds.num_classes == 10
  assert ds.train.images.shape == (50, 32, 32, 3)
  assert ds.test.images.shape == (10, 32, 32, 3)
  for split in ('train', 'test'):
    got = getattr(ds, split)
    assert got.images.dtype == np.uint8 and got.labels.dtype == np.int32
    got_images, got_labels = _sorted_by_image(got.images, got.labels)
    want_images, want_labels = _sorted_by_image(
        contents.images[split], contents.labels[split])
    np.testing.assert_array_equal(got_images, want_images)
    np.testing.assert_array_equal(got_labels, want_labels)


def test_prepared_cifar10_loads_without_archive_and_without_tensorflow(cifar10):
  # A fresh process: the arrays kept beside tfds' data need neither
  # TensorFlow nor tfds, and hold what the preparation read.
  data_dir, _, ds = cifar10
  code = ('import hashlib, sys, ml_collections; from allconv_jax import datasets; '
          f'ds = datasets.load(ml_collections.ConfigDict(dict(name="cifar10", data_dir={data_dir!r}))); '
          'assert "tensorflow" not in sys.modules, "TF imported"; '
          'assert "tensorflow_datasets" not in sys.modules, "tfds imported"; '
          'print(hashlib.sha1(ds.train.images.tobytes() + ds.test.labels.tobytes()).hexdigest())')
  out = subprocess.run([sys.executable, '-c', code], check=True,
                       capture_output=True, text=True).stdout.strip()
  assert out == hashlib.sha1(ds.train.images.tobytes() +
                             ds.test.labels.tobytes()).hexdigest()


def test_a_corrupt_prepared_copy_is_a_user_error(cifar10, tmp_path):
  data_dir, _, _ = cifar10
  copy = tmp_path / 'tfds'
  shutil.copytree(data_dir, copy)
  (copy / 'allconv_jax' / 'cifar10.npz').write_bytes(b'not an npz')
  _raises(_config('cifar10', data_dir=str(copy)), 'dataset.data_dir: cannot read',
          'delete it to prepare it again')


@pytest.mark.parametrize('label', ['fine', 'coarse'])
def test_cifar100(cifar100, label):
  data_dir, contents, _ = cifar100
  ds = datasets.load(_config('cifar100', data_dir=data_dir, label=label))
  if label == 'fine':
    names, want = cifar_archives.CIFAR100_FINE_NAMES, contents.labels
  else:
    names, want = cifar_archives.CIFAR100_COARSE_NAMES, contents.coarse_labels
  assert ds.class_names == names
  assert ds.num_classes == len(names)
  for split in ('train', 'test'):
    got = getattr(ds, split)
    got_images, got_labels = _sorted_by_image(got.images, got.labels)
    want_images, want_labels = _sorted_by_image(
        contents.images[split], want[split])
    np.testing.assert_array_equal(got_images, want_images)
    np.testing.assert_array_equal(got_labels, want_labels)


@pytest.mark.parametrize('classes', [
    'cat,airplane', ' cat , airplane ', '3,0', ['cat', 'airplane'], (3, 0),
    ['cat', 0],
])
def test_cifar10_class_subset(cifar10, classes):
  data_dir, _, full = cifar10
  ds = datasets.load(_config('cifar10', data_dir=data_dir, classes=classes))
  assert ds.class_names == ('cat', 'airplane')
  assert ds.num_classes == 2
  for split in ('train', 'test'):
    whole, part = getattr(full, split), getattr(ds, split)
    keep = np.isin(whole.labels, [3, 0])
    np.testing.assert_array_equal(part.images, whole.images[keep])
    np.testing.assert_array_equal(
        part.labels, np.where(whole.labels[keep] == 3, 0, 1))
    assert set(part.labels) == {0, 1}


def test_cifar100_coarse_subset(cifar100):
  data_dir, _, _ = cifar100
  ds = datasets.load(_config('cifar100', data_dir=data_dir, label='coarse',
                             classes='vehicles_2,fish'))
  assert ds.class_names == ('vehicles_2', 'fish')
  assert set(ds.train.labels) <= {0, 1}


@pytest.mark.parametrize('subset', ['subset1', 'subset2'])
def test_cifar100_named_subsets(cifar100, subset):
  data_dir, _, _ = cifar100
  ds = datasets.load(_config('cifar100', data_dir=data_dir, classes=subset))
  assert ds.class_names == datasets.SUBSETS['cifar100', subset]
  assert len(ds.class_names) == 10
  assert set(ds.class_names) <= set(cifar_archives.CIFAR100_FINE_NAMES)
  assert set(ds.train.labels) <= set(range(10))


def test_named_subsets_are_disjoint():
  for name in ('cifar100', 'digits'):
    assert not set(datasets.SUBSETS[name, 'subset1']) & set(
        datasets.SUBSETS[name, 'subset2'])


@pytest.fixture(scope='module')
def digits():
  return datasets.load(_config('digits'))


def test_digits(digits):
  assert digits.class_names == tuple('0123456789')
  assert digits.train.images.shape == (1347, 32, 32, 3)
  assert digits.test.images.shape == (450, 32, 32, 3)
  for split in (digits.train, digits.test):
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert set(split.labels) == set(range(10))
    np.testing.assert_array_equal(split.images[..., 0], split.images[..., 2])
  assert digits.train.images.max() == 255 and digits.train.images.min() == 0
  again = datasets.load(_config('digits'))
  np.testing.assert_array_equal(again.train.images, digits.train.images)
  np.testing.assert_array_equal(again.test.labels, digits.test.labels)


@pytest.mark.parametrize('classes', ['0,1,2,3,4', 'subset1'])
def test_digits_subset(digits, classes):
  ds = datasets.load(_config('digits', classes=classes))
  assert ds.class_names == ('0', '1', '2', '3', '4')
  keep = digits.test.labels < 5
  np.testing.assert_array_equal(ds.test.labels, digits.test.labels[keep])
  np.testing.assert_array_equal(ds.test.images, digits.test.images[keep])


def test_validation_split_is_held_out_stratified_and_fixed(digits):
  ds = datasets.load(_config('digits', validation_size=300))
  assert digits.validation is None
  assert (len(ds.train.labels), len(ds.validation.labels)) == (1047, 300)
  # Disjoint, and together the whole official training split.
  key = lambda split: {(im.tobytes(), int(l)) for im, l in zip(*dataclasses.astuple(split))}
  assert not key(ds.train) & key(ds.validation)
  assert key(ds.train) | key(ds.validation) == key(digits.train)
  # Each class keeps its share of the training split, to rounding.
  share = np.bincount(digits.train.labels) * 300 / 1347
  assert np.abs(np.bincount(ds.validation.labels) - share).max() <= 1
  np.testing.assert_array_equal(ds.test.labels, digits.test.labels)
  again = datasets.load(_config('digits', validation_size=300))
  np.testing.assert_array_equal(again.validation.images, ds.validation.images)


@pytest.mark.parametrize('size', [3, 1347])
def test_validation_split_that_does_not_fit(size):
  _raises(_config('digits', validation_size=size), 'dataset.validation_size:',
          'allowed: 0 or 10..1337')


def test_digits_does_not_import_tensorflow():
  code = ('import sys, ml_collections; from allconv_jax import datasets; '
          'datasets.load(ml_collections.ConfigDict(dict(name="digits"))); '
          'assert "tensorflow" not in sys.modules, "TF imported"')
  subprocess.run([sys.executable, '-c', code], check=True)


def _raises(config, *fragments, error=UserError):
  with pytest.raises(error) as info:
    datasets.load(config)
  # UserError is a ValueError too; only it is reported as the user's to fix.
  assert (error is UserError) == isinstance(info.value, UserError)
  message = str(info.value)
  assert '\n' not in message
  for fragment in fragments:
    assert fragment in message
  return message


def test_unknown_dataset():
  # config.validate rejects it first: here it is a programming error.
  _raises(_config('foo'), "dataset.name: unknown dataset 'foo'",
          'allowed: cifar10, cifar100, digits', error=ValueError)


@pytest.mark.parametrize('name,label', [('cifar10', 'coarse'),
                                        ('digits', 'coarse'),
                                        ('cifar100', 'medium')])
def test_label_that_does_not_fit(name, label):
  # config.validate rejects it first (tests/test_configs.py): here it is a
  # programming error.
  _raises(_config(name, label=label), f'dataset.label: {label!r}',
          error=ValueError)


def test_bad_classes(cifar10):
  data_dir, _, _ = cifar10
  _raises(_config('cifar10', data_dir=data_dir, classes='cat,zebra'),
          "dataset.classes: unknown class 'zebra' for cifar10",
          'allowed: airplane, automobile, bird')
  _raises(_config('cifar10', data_dir=data_dir, classes=[1, 10]),
          'dataset.classes: index 10 out of range', '0..9')
  _raises(_config('cifar10', data_dir=data_dir, classes='cat,3'),
          "dataset.classes: class 'cat' is given twice")


def test_unknown_cifar100_class_lists_all_names(cifar100):
  data_dir, _, _ = cifar100
  message = _raises(_config('cifar100', data_dir=data_dir, classes='zebra'),
                    'dataset.classes', 'apple', 'worm')
  assert 'vehicles_1' not in message


def test_missing_archive(tmp_path):
  missing = str(tmp_path / 'nope.tar.gz')
  _raises(_config('cifar10', data_dir=str(tmp_path), archive=missing),
          f'dataset.archive: no such file: {missing}')


def test_corrupt_archive(tmp_path, monkeypatch):
  archive = tmp_path / 'cifar-10-binary.tar.gz'
  cifar_archives.write_cifar10(archive)
  accept_archive(monkeypatch, 'cifar10', archive)
  data = bytearray(archive.read_bytes())
  data[len(data) // 2] ^= 0xFF
  archive.write_bytes(bytes(data))
  _raises(_config('cifar10', data_dir=str(tmp_path / 'tfds'),
                  archive=str(archive)),
          f'dataset.archive: {archive} is not the official '
          'cifar-10-binary.tar.gz (checksum mismatch)')
  assert not tfds.builder('cifar10', data_dir=str(tmp_path / 'tfds')
                          ).is_prepared()


def test_wrong_archive(tmp_path):
  # A cifar-100 archive given for cifar10, checked against the real checksum.
  archive = tmp_path / 'cifar-100-binary.tar.gz'
  cifar_archives.write_cifar100(archive)
  _raises(_config('cifar10', data_dir=str(tmp_path), archive=str(archive)),
          'dataset.archive', 'checksum mismatch')


def test_no_archive_no_network_fails_fast(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, 'Name or service not known')

  monkeypatch.setattr(socket, 'getaddrinfo', no_network)
  for var in list(os.environ):
    if var.lower().endswith('_proxy'):
      monkeypatch.delenv(var)
  start = time.monotonic()
  _raises(_config('cifar100', data_dir=str(tmp_path)),
          'dataset.archive: cifar100 is not prepared in ',
          'could not be downloaded; '
          'pass --config.dataset.archive=<path to cifar-100-binary.tar.gz>')
  assert time.monotonic() - start < 10
