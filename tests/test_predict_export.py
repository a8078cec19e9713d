"""After training: --mode=predict on your own images and --mode=export.

One tiny run is trained by the real binary; predict and export run on it as
the binary too, and the exported artifact is called in a fresh process that
never imports allconv_jax. The error cases stop before any checkpoint is
loaded, so they run the same `main` in this process (`run_main`).
"""

import csv
import json
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY, run_binary, run_main

from allconv_jax import config as config_lib
from allconv_jax import datasets, export, input_pipeline, predict, trained
from allconv_jax.errors import UserError


@pytest.fixture(scope='module')
def workdir(tiny_run, tmp_path_factory):
  """All-CNN-C at a quarter width, two epochs on the digits 0-4 (a copy:
  predict and export write into it)."""
  return tiny_run.copy(tmp_path_factory.mktemp('run'))


@pytest.fixture(scope='module')
def library(workdir):
  """What the library itself computes: softmax(apply(preprocessor(images)))."""
  run = trained.load(str(workdir))
  apply = jax.jit(lambda v, x: jax.nn.softmax(run.model.apply(v, x, train=False)))
  return lambda images: np.asarray(apply(run.variables, run.preprocessor(images)))


def _stdout_json(result):
  return [json.loads(line) for line in result.stdout.strip().splitlines()]


def test_predict_reads_a_folder_and_skips_what_is_not_an_image(
    workdir, library, tmp_path):
  folder = tmp_path / 'mine'
  folder.mkdir()
  rng = np.random.default_rng(0)
  # Another size and mode each: RGBA 40x50 and a grayscale JPEG.
  Image.fromarray(rng.integers(0, 256, (50, 40, 4), np.uint8), 'RGBA').save(
      folder / 'a.png')
  Image.fromarray(rng.integers(0, 256, (20, 30), np.uint8), 'L').save(
      folder / 'b.jpg')
  (folder / 'x.png').write_text('not an image, whatever its name says\n')

  result = run_binary(*TINY, f'--workdir={workdir}', '--mode=predict',
                      f'--config.predict.images={folder}')
  assert result.returncode == 0, result.stderr[-3000:]
  lines = _stdout_json(result)
  assert [line['image'] for line in lines] == [str(folder / 'a.png'),
                                               str(folder / 'b.jpg')]
  warnings = [l for l in result.stderr.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1
  assert warnings[0].startswith(f'warning: {folder / "x.png"}: not an image (')

  images = np.stack([predict.load_image(str(folder / n)) for n in ('a.png', 'b.jpg')])
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
  assert (images[1] == images[1, :, :, :1]).all()  # Gray on all three channels.
  expected = library(images)
  for line, p in zip(lines, expected):
    assert set(line) == {'image', 'classes', 'probabilities'}
    # The default top_k=3 of the run's five classes, best first.
    assert len(line['classes']) == len(set(line['classes'])) == 3
    assert set(line['classes']) <= {'0', '1', '2', '3', '4'}
    assert line['probabilities'] == sorted(line['probabilities'], reverse=True)
    np.testing.assert_allclose(
        line['probabilities'], [p[int(c)] for c in line['classes']], atol=1e-5)
    assert line['classes'][0] == str(p.argmax())

  with open(workdir / 'predictions.csv', newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['image', 'class_1', 'probability_1', 'class_2',
                     'probability_2', 'class_3', 'probability_3']
  for row, line in zip(rows[1:], lines, strict=True):
    assert row[0] == line['image']
    assert row[1::2] == line['classes']
    assert [float(v) for v in row[2::2]] == line['probabilities']


def test_predict_without_an_image_is_a_one_line_error(workdir, tmp_path, capsys):
  empty = tmp_path / 'empty'
  empty.mkdir()
  code, err = run_main(capsys, *TINY, f'--workdir={workdir}', '--mode=predict',
                       f'--config.predict.images={empty}')
  assert code == 2
  assert err.strip().splitlines() == [f'error: predict.images: the folder {empty} has no files']
  with pytest.raises(UserError, match=r"^predict\.images: .* matches no file"):
    predict.find_images(str(tmp_path / '*.png'))
  with pytest.raises(UserError, match=r'^predict\.images: required'):
    predict.find_images(None)
  (tmp_path / 'notes.txt').write_text('text')
  with pytest.raises(UserError, match=r'^predict\.images: none of the 1 file'):
    predict.read_images([str(tmp_path / 'notes.txt')], 'notes.txt')
  config = config_lib.defaults()
  config.predict.top_k = 0
  with pytest.raises(UserError, match=r'^predict\.top_k: must be a positive'):
    config_lib.validate(config)


def test_export_runs_in_a_process_without_allconv_jax(workdir, library, tmp_path):
  result = run_binary(*TINY, f'--workdir={workdir}', '--mode=export')
  assert result.returncode == 0, result.stderr[-3000:]
  report, = _stdout_json(result)
  out = workdir / 'export'
  assert report['export'] == str(out)
  assert sorted(p.name for p in out.iterdir()) == ['model.jax', 'model.json']
  assert not [p for p in workdir.iterdir() if p.name.startswith('.export')]
  info = json.loads((out / 'model.json').read_text())
  assert info['class_names'] == ['0', '1', '2', '3', '4'] == report['class_names']
  assert info['input']['shape'] == ['b', 32, 32, 3]
  assert info['input']['dtype'] == 'uint8'
  assert info['source']['step'] == report['step'] == trained.load(str(workdir)).step
  assert set(info['versions']) == {'jax', 'jaxlib', 'flax', 'allconv_jax'}

  # Test digits of every class, noise and a constant image: a batch size the
  # export never saw.
  data = datasets.load(ml_collections.ConfigDict(dict(name='digits', classes='0,1,2,3,4')))
  rng = np.random.default_rng(0)
  images = np.concatenate([data.test.images[:5],
                           rng.integers(0, 256, (2, 32, 32, 3), np.uint8),
                           np.full((1, 32, 32, 3), 128, np.uint8)])
  np.save(tmp_path / 'images.npy', images)
  consumer = subprocess.run(
      [sys.executable, str(REPO / 'tests' / 'exported_consumer.py'), str(out),
       str(tmp_path / 'images.npy')],
      capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert consumer.returncode == 0, consumer.stderr[-3000:]
  answer = json.loads(consumer.stdout.strip().splitlines()[-1])
  assert answer['allconv_jax_imported'] is False
  probabilities = np.array(answer['probabilities'])
  expected = library(images)
  np.testing.assert_array_equal(probabilities.argmax(axis=1), expected.argmax(axis=1))
  np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_export_to_a_path_that_is_a_file_is_a_one_line_error(workdir, tmp_path, capsys):
  copy = tmp_path / 'wd'
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('export', '.lock'))
  (copy / 'export').write_text('in the way')
  code, err = run_main(capsys, *TINY, f'--workdir={copy}', '--mode=export')
  assert code == 2
  assert err.strip().splitlines() == [
      f'error: workdir: cannot write the export to {copy / "export"}: it exists '
      'and is not a directory; move it away']
  assert (copy / 'export').read_text() == 'in the way'


@pytest.mark.rounding
def test_exported_preprocessing_matches_the_preprocessor_with_gcn_zca():
  # numpy's transform against the exported XLA one: one pass of sums over
  # 192 values, a few float32 ulps apart in any order on any CPU (1e-5 of
  # the largest value is ~80); a wrong mean or matrix is off by O(1).
  # 8x8 images keep the ZCA fit small; the transform does not depend on size.
  rng = np.random.default_rng(0)
  train = rng.integers(0, 256, (300, 8, 8, 3), np.uint8)
  pre = input_pipeline.Preprocessor.fit(train, standardize=True, gcn_zca=True)
  images = np.concatenate([rng.integers(0, 256, (5, 8, 8, 3), np.uint8),
                           np.full((1, 8, 8, 3), 9, np.uint8)])  # GCN leaves it.
  expected = pre(images)
  got = np.asarray(jax.jit(export.preprocess_fn(pre))(images))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_class_names_are_those_of_the_data_without_loading_it():
  # pylint: disable=g-import-not-at-top
  from cifar_archives import (CIFAR10_NAMES, CIFAR100_COARSE_NAMES,
                              CIFAR100_FINE_NAMES)
  names = lambda **kw: datasets.class_names(ml_collections.ConfigDict(kw))
  assert names(name='cifar10', classes='') == CIFAR10_NAMES
  assert names(name='cifar100', classes='', label='fine') == CIFAR100_FINE_NAMES
  assert names(name='cifar100', classes='', label='coarse') == CIFAR100_COARSE_NAMES
  assert names(name='cifar10', classes='cat,0') == ('cat', 'airplane')
  assert names(name='cifar100', classes='subset2')[:2] == ('orchid', 'poppy')
  digits = ml_collections.ConfigDict(dict(name='digits', classes='7,3'))
  assert datasets.class_names(digits) == datasets.load(digits).class_names == ('7', '3')
  with pytest.raises(UserError, match='^dataset.classes: unknown class'):
    names(name='cifar10', classes='unicorn')
