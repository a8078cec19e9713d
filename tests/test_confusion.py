"""Per-class results: the confusion matrix, its files, the eval step's counts, and
--mode=eval's confusion files on a tiny trained run."""

import csv
import json

import flax.linen as nn
import jax
import matplotlib.image
import numpy as np
import pytest

from allconv_jax import (confusion, datasets, files, models, reporting, sharding,
                         steps, trained)
from conftest import TINY, load_config, run_binary

# Four classes, the last with no example: true 0 is twice taken for 1.
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDICTIONS = np.array([0, 1, 1, 1, 0, 2, 0, 2, 1])
EXPECTED = [[1, 2, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 2, 0],
            [0, 0, 0, 0]]
NAMES = ('cat', 'dog, big', 'ship', 'frog')


COUNTS = np.array(EXPECTED)


def test_per_class_accuracy_of_hand_made_counts():
  assert confusion.per_class_accuracy(COUNTS) == [1 / 3, 1 / 2, 1 / 2, None]


def test_most_confused_is_largest_first_then_in_class_order():
  counts = COUNTS
  # (1, 0), (2, 0) and (2, 1) tie at 1: the first two in (true, predicted) order.
  assert confusion.most_confused(counts) == [(0, 1, 2), (1, 0, 1), (2, 0, 1)]
  assert confusion.most_confused(counts, top=10)[-1] == (2, 1, 1)
  # A perfect classifier confuses nothing, and no zero cell is listed.
  assert confusion.most_confused(np.diag([3, 4])) == []
  assert confusion.report(counts, NAMES) == {
      'per_class_accuracy': {'cat': 1 / 3, 'dog, big': 0.5, 'ship': 0.5,
                             'frog': None},
      'most_confused': [['cat', 'dog, big', 2], ['dog, big', 'cat', 1],
                        ['ship', 'cat', 1]]}


def test_write_produces_csv_json_and_png(tmp_path):
  result = confusion.write(str(tmp_path), COUNTS, NAMES, 'test', 42)
  assert result == confusion.report(COUNTS, NAMES)
  with open(tmp_path / files.CONFUSION_CSV, newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['true \\ predicted', *NAMES, 'accuracy']
  assert [r[0] for r in rows[1:]] == list(NAMES)
  assert [[int(c) for c in r[1:5]] for r in rows[1:]] == EXPECTED
  assert [r[5] for r in rows[1:]] == ['0.333333', '0.500000', '0.500000', '']
  saved = json.loads((tmp_path / files.CONFUSION_JSON).read_text())
  assert saved == dict(split='test', step=42, class_names=list(NAMES),
                       matrix=EXPECTED, accuracy=4 / 9, num_examples=9, **result)
  image = matplotlib.image.imread(tmp_path / files.CONFUSION_PNG)
  assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [files.CONFUSION_CSV, files.CONFUSION_JSON, files.CONFUSION_PNG])


def test_plot_of_many_classes_leaves_counts_out(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 30, 300)
  counts = np.zeros((30, 30), np.int64)
  np.add.at(counts, (labels, rng.integers(0, 30, 300)), 1)
  path = tmp_path / 'many.png'
  confusion.plot(str(path), counts, [f'class_{i}' for i in range(30)])
  assert path.stat().st_size > 0


class _Linear(nn.Module):
  """A stand-in for the network, quick to compile: one dense class layer."""

  @nn.compact
  def __call__(self, images, train: bool):
    del train
    return nn.Dense(5)(images.reshape(len(images), -1))


@pytest.mark.parametrize('flip', [False, True])
def test_eval_step_counts_the_networks_classes_and_drops_padding(flip):
  model = _Linear()
  images = np.asarray(jax.random.normal(jax.random.key(1), (10, *models.INPUT_SHAPE)))
  labels = np.arange(10) % 5
  variables = model.init(jax.random.key(0), images[:1], train=False)
  mesh = sharding.make_mesh()
  # 10 images in batches of 4: the last batch holds 2 and 2 of padding.
  measured = steps.evaluate(steps.make_eval_step(model, mesh, flip=flip),
                            variables, mesh, images, labels, batch_size=4)
  logits = np.asarray(model.apply(variables, images, train=False))
  predicted = logits.argmax(-1)
  assert len(set(predicted)) > 1  # Not a constant that any order would match.
  expected = np.zeros((5, 5), np.int64)
  np.add.at(expected, (labels, predicted), 1)
  np.testing.assert_array_equal(measured['confusion'], expected)
  assert measured['accuracy'] == pytest.approx(np.mean(predicted == labels))
  assert set(measured) == {'loss', 'accuracy', 'confusion', *(['flip_accuracy'] * flip)}
  if flip:  # The class of the mean softmax of each image and its mirror.
    mirrored = np.asarray(model.apply(variables, images[:, :, ::-1], train=False))
    softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
        x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    both = (softmax(logits) + softmax(mirrored)).argmax(-1)
    assert not np.array_equal(both, predicted)  # The mirror changed something.
    assert measured['flip_accuracy'] == pytest.approx(np.mean(both == labels))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A tiny All-CNN-C trained by the binary on five digits for two epochs,
  with a moving average of the weights and flip test-time augmentation."""
  workdir = tmp_path_factory.mktemp('confusion') / 'wd'
  options = ['--config.num_epochs=2', '--config.ema_decay=0.9',
             '--config.eval_flip=True']
  result = run_binary(*TINY, f'--workdir={workdir}', *options)
  assert result.returncode == 0, result.stderr[-3000:]
  config = load_config('digits.py')
  config.width, config.dataset.classes = 0.25, '0,1,2,3,4'
  config.num_epochs, config.ema_decay, config.eval_flip = 2, 0.9, True
  return config, workdir, result


def test_training_options_are_reported_and_the_average_is_selected(tiny_run):
  _, workdir, result = tiny_run
  rows = reporting.read_csv(str(workdir / files.METRICS))
  assert len(rows) == 2
  for prefix in ('', 'ema_'):
    for split in ('validation', 'test'):
      for metric in ('loss', 'accuracy', 'flip_accuracy'):
        assert 0 <= rows[-1][f'{prefix}{split}_{metric}'] < float('inf')
  summary = json.loads(result.stdout.splitlines()[-1])
  assert summary == json.loads((workdir / files.SUMMARY).read_text())
  assert summary['weights'] == 'moving_average'
  best = max(rows, key=lambda r: r['ema_validation_accuracy'])
  assert summary['selected_epoch'] == best['epoch']
  assert summary['selected_test_accuracy'] == pytest.approx(best['ema_test_accuracy'])
  assert summary['selected_test_flip_accuracy'] == pytest.approx(
      best['ema_test_flip_accuracy'])
  # The compact table on stdout, the full one in the workdir.
  assert result.stdout.count('conv') < 20 and 'parameters' in result.stdout
  assert 'AllConvNet Summary' in (workdir / files.MODEL_SUMMARY).read_text()


def test_eval_writes_the_test_splits_confusion(tiny_run):
  config, workdir, _ = tiny_run
  report = trained.evaluate_checkpoint(config, str(workdir))
  # Of the selected checkpoint's moving average, as training measured it.
  summary = json.loads((workdir / files.SUMMARY).read_text())
  assert report['step'] == summary['selected_step']
  assert report['test_accuracy'] == pytest.approx(summary['selected_test_accuracy'],
                                                  abs=1e-6)
  json.dumps(report)  # The binary prints it as one JSON line.
  assert set(report) == {'test_accuracy', 'test_loss', 'step',
                         'per_class_accuracy', 'most_confused'}
  test = datasets.load(config.dataset).test
  saved = json.loads((workdir / files.CONFUSION_JSON).read_text())
  counts = np.array(saved['matrix'])
  assert saved['class_names'] == ['0', '1', '2', '3', '4']
  assert (saved['split'], saved['step']) == ('test', report['step'])
  # Every test image once, in the row of its true class.
  np.testing.assert_array_equal(counts.sum(axis=1), np.bincount(test.labels, minlength=5))
  assert np.trace(counts) / counts.sum() == pytest.approx(report['test_accuracy'], abs=1e-6)
  assert saved['accuracy'] == pytest.approx(report['test_accuracy'], abs=1e-6)
  assert report['per_class_accuracy'] == saved['per_class_accuracy']
  assert list(report['per_class_accuracy']) == saved['class_names']
  for name, accuracy in report['per_class_accuracy'].items():
    c = saved['class_names'].index(name)
    assert accuracy == pytest.approx(counts[c, c] / counts[c].sum())
  assert report['most_confused'] == saved['most_confused']
  assert len(report['most_confused']) <= 3
  for true, predicted, count in report['most_confused']:
    assert true != predicted
    assert counts[saved['class_names'].index(true),
                  saved['class_names'].index(predicted)] == count
  assert (workdir / files.CONFUSION_CSV).is_file()
  assert (workdir / files.CONFUSION_PNG).stat().st_size > 0
