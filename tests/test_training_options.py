"""The training options beyond the paper: label smoothing, a moving average of
the weights, and what the history selects and reports with it.

The steps are the library's, on a stand-in network that compiles in a
moment (one dense class layer and a batch norm); the options on the real
network and the binary are checked in test_confusion.py's trained run.
"""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from allconv_jax import (checkpoints, config as config_lib, models,
                         reporting, selection, sharding, steps)

NUM_CLASSES = 5
BATCH = 8


class _Tiny(nn.Module):
  """Batch norm then one dense class layer: params and batch statistics."""
  axis_name: str | None = sharding.AXIS  # None outside the train step.

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = images.reshape(len(images), -1)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5,
                     axis_name=self.axis_name if train else None)(x)
    return nn.Dense(NUM_CLASSES)(x)


def _batch(seed):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((BATCH, *models.INPUT_SHAPE)).astype(np.float32)
  return images, (np.arange(BATCH) % NUM_CLASSES).astype(np.int32)


def _start(model, tx, ema_decay):
  mesh = sharding.make_mesh()
  state = steps.with_ema(steps.init_states(model, tx, [0], mesh)[0], ema_decay)
  return mesh, state, steps.TrainMetrics.empty()


def _step(model, tx, mesh, **options):
  """One step on the whole given batch, as the training loop builds it."""
  fn = steps.make_train_steps(model, tx, mesh, seed=0, max_shift=0, flip=False,
                              **options)
  indices, = sharding.global_batch(mesh, np.arange(BATCH, dtype=np.int32)[:, None])
  return lambda state, metrics, images, labels: fn(
      state, metrics, images, labels, indices, 1)


def test_label_smoothing_trains_on_the_smoothed_targets():
  model, tx, alpha = _Tiny(), optax.sgd(0.1), 0.2
  mesh, state, metrics = _start(model, tx, 0.0)
  images, labels = _batch(0)
  variables = jax.device_get(state.variables())
  logits, _ = _Tiny(axis_name=None).apply(variables, images, train=True,
                                          mutable=['batch_stats'])
  # The definition: targets (1 - alpha) one_hot + alpha / K.
  targets = (1 - alpha) * np.eye(NUM_CLASSES)[labels] + alpha / NUM_CLASSES
  log_p = np.asarray(jax.nn.log_softmax(logits))
  expected = -(targets * log_p).sum(-1).mean()
  plain = -log_p[np.arange(BATCH), labels].mean()
  assert abs(expected - plain) > 1e-3  # The smoothing changes the loss.
  _, smoothed = _step(model, tx, mesh, label_smoothing=alpha)(state, metrics, images, labels)
  assert float(smoothed.loss.compute()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.rounding
def test_moving_average_follows_its_definition_for_params_and_batch_stats():
  # numpy's average against the jitted one: four multiply-adds, an ulp or
  # two apart (FMA or not) on any CPU; 1e-5 is ~80 ulps.
  model, tx, decay = _Tiny(), optax.sgd(0.5), 0.6
  mesh, state, metrics = _start(model, tx, decay)
  step = _step(model, tx, mesh, ema_decay=decay)
  flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(
      jax.device_get(dict(params=s.params, batch_stats=s.batch_stats)))])
  average = flat(state)
  for t in range(4):
    state, metrics = step(state, metrics, *_batch(t))
    # TensorFlow's ExponentialMovingAverage with num_updates = t.
    d = min(decay, (1 + t) / (10 + t))
    average = d * average + (1 - d) * flat(state)
    ema = np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        jax.device_get(state.ema))])
    np.testing.assert_allclose(ema, average, rtol=1e-5, atol=1e-6)
  assert not np.allclose(average, flat(state))  # It lags the weights.
  # Off, the state carries no average at all.
  assert steps.with_ema(state, 0.0).ema == {}


def _row(epoch, val, ema_val, test, ema_test):
  return dict(epoch=epoch, step=epoch, validation_accuracy=val,
              ema_validation_accuracy=ema_val, test_accuracy=test,
              ema_test_accuracy=ema_test, test_flip_accuracy=test,
              ema_test_flip_accuracy=ema_test + 0.01)


def test_with_a_moving_average_its_validation_accuracy_selects():
  rows = [_row(1, 0.9, 0.5, 0.91, 0.52), _row(2, 0.6, 0.8, 0.61, 0.82),
          _row(3, 0.7, 0.7, 0.71, 0.72)]
  config = config_lib.defaults()
  config.ema_decay = 0.99

  def best_epoch(rule):  # As History.add keeps it.
    best = dict(accuracy=-1.0, epoch=0)
    for row in rows:
      if rule.improves(row, best['accuracy']):
        best = dict(accuracy=rule.score(row), epoch=row['epoch'])
    return best['epoch']

  rule = selection.of(config, has_validation=True)
  assert rule.prefix == 'ema_' and best_epoch(rule) == 2
  out = rule.summary(rows, best_epoch(rule))
  assert out['weights'] == 'moving_average'
  assert (out['selected_epoch'], out['selected_validation_accuracy'],
          out['selected_test_accuracy'], out['selected_test_flip_accuracy']) == (
              2, 0.8, 0.82, 0.83)
  assert out['final_test_accuracy'] == 0.72
  config.ema_decay = 0.0
  rule = selection.of(config, has_validation=True)
  assert rule.prefix == '' and best_epoch(rule) == 1
  assert rule.summary(rows, best_epoch(rule))['selected_test_accuracy'] == 0.91
  # Without a validation split the final row stands.
  rule = selection.of(config, has_validation=False)
  assert best_epoch(rule) == 0 and rule.summary(rows, 0)['selected_epoch'] == 3


def test_csv_keeps_the_extra_columns_before_seconds(tmp_path):
  row = dict.fromkeys(reporting.COLUMNS, 0.5)
  row.update(step=1, epoch=1, ema_test_accuracy=0.25, test_flip_accuracy=0.75)
  path = str(tmp_path / 'm.csv')
  reporting.write_csv(path, [row])
  header = (tmp_path / 'm.csv').read_text().splitlines()[0].split(',')
  assert header == [*reporting.COLUMNS[:-1], 'ema_test_accuracy',
                    'test_flip_accuracy', 'seconds']
  assert reporting.read_csv(path)[0]['test_flip_accuracy'] == 0.75


def test_a_checkpoint_saved_before_the_moving_average_existed_resumes(tmp_path):
  # Saved as earlier versions did: no `ema` in the state. Restored into
  # today's state, whose `ema` is {} without ema_decay. Read as unreadable,
  # it would be quarantined and the run would start over.
  saved = checkpoints.Checkpoints(str(tmp_path))
  params = {'dense': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}}
  old = dict(step=np.array(7, np.int32), params=params, batch_stats={}, opt_state={})
  saved.save(7, dict(state=old, train_metrics={}), dict(step=7))
  saved.wait()
  saved.close()
  template = dict(state=steps.TrainState(
      step=np.array(0, np.int32), params=jax.tree.map(np.zeros_like, params),
      batch_stats={}, opt_state={}), train_metrics={})
  restored, meta = checkpoints.restore(saved.latest_dir, template)
  assert meta['step'] == 7 and int(restored['state'].step) == 7
  assert restored['state'].ema == {}
  np.testing.assert_array_equal(restored['state'].params['dense']['kernel'],
                                params['dense']['kernel'])
