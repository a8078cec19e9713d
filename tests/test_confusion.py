"""Per-class results: the confusion matrix, its files, the predict step, and
--mode=eval's confusion files on a tiny trained run."""

import csv
import json

import flax.linen as nn
import jax
import matplotlib.image
import numpy as np
import pytest

from allconv_jax import confusion, datasets, files, models, sharding, steps, trained
from conftest import TINY, load_config, run_binary

# Four classes, the last with no example: true 0 is twice taken for 1.
LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
PREDICTIONS = np.array([0, 1, 1, 1, 0, 2, 0, 2, 1])
EXPECTED = [[1, 2, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 2, 0],
            [0, 0, 0, 0]]
NAMES = ('cat', 'dog, big', 'ship', 'frog')


def test_matrix_of_hand_made_labels():
  counts = confusion.matrix(LABELS, PREDICTIONS, 4)
  np.testing.assert_array_equal(counts, EXPECTED)
  assert counts.dtype == np.int64
  assert confusion.per_class_accuracy(counts) == [1 / 3, 1 / 2, 1 / 2, None]


def test_most_confused_is_largest_first_then_in_class_order():
  counts = confusion.matrix(LABELS, PREDICTIONS, 4)
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


@pytest.mark.parametrize('labels, predictions', [
    ([0, 1], [0]),        # different lengths
    ([0, 4], [0, 1]),     # a label out of range
    ([0, 1], [0, -1]),    # a prediction out of range
])
def test_matrix_refuses_mismatched_or_out_of_range_classes(labels, predictions):
  with pytest.raises(ValueError):
    confusion.matrix(np.array(labels), np.array(predictions), 4)


def test_write_produces_csv_json_and_png(tmp_path):
  result = confusion.write(str(tmp_path), LABELS, PREDICTIONS, NAMES, 'test', 42)
  assert result == confusion.report(confusion.matrix(LABELS, PREDICTIONS, 4), NAMES)
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
  counts = confusion.matrix(labels, rng.integers(0, 30, 300), 30)
  path = tmp_path / 'many.png'
  confusion.plot(str(path), counts, [f'class_{i}' for i in range(30)])
  assert path.stat().st_size > 0


class _Linear(nn.Module):
  """A stand-in for the network, quick to compile: one dense class layer."""

  @nn.compact
  def __call__(self, images, train: bool):
    del train
    return nn.Dense(5)(images.reshape(len(images), -1))


def test_predict_step_is_argmax_of_the_network_and_drops_padding():
  model = _Linear()
  images = np.asarray(jax.random.normal(jax.random.key(1), (10, *models.INPUT_SHAPE)))
  variables = model.init(jax.random.key(0), images[:1], train=False)
  mesh = sharding.make_mesh()
  state = steps.TrainState(step=0, params=variables['params'], batch_stats={},
                           opt_state=None)
  # 10 images in batches of 4: the last batch holds 2 and 2 of padding.
  predictions = steps.predict(steps.make_predict_step(model, mesh), state, mesh,
                              images, batch_size=4)
  expected = np.argmax(np.asarray(model.apply(variables, images, train=False)), -1)
  assert len(set(expected)) > 1  # Not a constant that any order would match.
  assert predictions.dtype == np.int32
  np.testing.assert_array_equal(predictions, expected)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A tiny All-CNN-C trained for one epoch on five digits by the binary."""
  workdir = tmp_path_factory.mktemp('confusion') / 'wd'
  result = run_binary(*TINY, f'--workdir={workdir}', '--config.num_epochs=1')
  assert result.returncode == 0, result.stderr[-3000:]
  config = load_config('digits.py')
  config.width, config.dataset.classes = 0.25, '0,1,2,3,4'
  return config, workdir


def test_eval_writes_the_test_splits_confusion(tiny_run):
  config, workdir = tiny_run
  report = trained.evaluate_checkpoint(config, str(workdir))
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
