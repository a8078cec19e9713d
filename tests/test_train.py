"""End to end through the binary: train, resume, eval, and bad input."""

import csv
import json
import os
import pathlib
import signal
import sys

import jax
import numpy as np
import pytest

from allconv_jax import sharding, steps
from allconv_jax.errors import UserError
from conftest import TINY, load_config, run_binary, run_main, snapshot


@pytest.fixture(scope='module')
def trained(tiny_run):
  """A tiny All-CNN-C trained for two epochs on digits by the real binary
  (shared with other modules: nothing here writes into it)."""
  return tiny_run.workdir, tiny_run


def test_training_imports_neither_tensorflow_nor_tfds(trained):
  _, result = trained
  imported = {line.rsplit('|', 1)[-1].strip()
              for line in result.stderr.splitlines()
              if line.startswith('import time:')}
  assert 'jax' in imported and 'tensorboard.summary.writer.record_writer' in imported
  assert 'tensorflow' not in imported and 'tensorflow_datasets' not in imported


def _rows(workdir):
  with open(workdir / 'metrics.csv') as f:
    return list(csv.DictReader(f))


def test_training_writes_every_output_and_learns(trained):
  workdir, result = trained
  rows = _rows(workdir)
  assert list(rows[0]) == ['epoch', 'step', 'learning_rate', 'train_loss',
                           'train_accuracy', 'validation_loss',
                           'validation_accuracy', 'test_loss', 'test_accuracy',
                           'seconds']
  assert [int(r['epoch']) for r in rows] == [1, 2]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary == json.loads((workdir / 'summary.json').read_text())
  # The digits config holds out a validation split, which alone selects.
  assert summary['selection'] == 'best_validation_accuracy'
  best = max(rows, key=lambda r: float(r['validation_accuracy']))
  assert summary['selected_epoch'] == int(best['epoch'])
  assert summary['selected_test_accuracy'] == pytest.approx(float(best['test_accuracy']))
  assert summary['final_test_accuracy'] == pytest.approx(float(rows[-1]['test_accuracy']))
  assert 'best_test_accuracy' not in summary
  # Per-class results of the final state on the test split.
  final = json.loads((workdir / 'confusion.json').read_text())
  assert (final['split'], final['step']) == ('test', int(rows[-1]['step']))
  assert final['accuracy'] == pytest.approx(float(rows[-1]['test_accuracy']), abs=1e-6)
  # Five classes: chance is 20%.
  assert summary['selected_test_accuracy'] > 0.6
  assert 'classifier' in result.stdout and 'parameters' in result.stdout
  assert 'ETA' in result.stderr and 'val loss' in result.stderr
  for name in ('curves.png', 'preprocess.npz', 'config.json', 'confusion.csv',
               'confusion.png'):
    assert (workdir / name).is_file(), name
  # TensorBoard reads the event file: the CSV's test accuracy at each step.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events, = [n for n in os.listdir(workdir) if n.startswith('events.out.tfevents')]
  accumulator = event_accumulator.EventAccumulator(str(workdir / events))
  accumulator.Reload()
  assert [(e.step, round(e.value, 6)) for e in accumulator.Scalars('test_accuracy')] == [
      (int(r['step']), round(float(r['test_accuracy']), 6)) for r in rows]
  assert os.listdir(workdir / 'checkpoints' / 'latest')
  assert os.listdir(workdir / 'checkpoints' / 'best')


def test_eval_mode_reports_the_checkpoint_selected_on_validation(tiny_run, tmp_path):
  workdir = tiny_run.copy(tmp_path)  # The eval writes the test split's confusion.
  result = run_binary(*TINY, f'--workdir={workdir}', '--mode=eval')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(report) == {'test_accuracy', 'test_loss', 'step', 'per_class_accuracy',
                         'most_confused'}
  best = max(_rows(workdir), key=lambda r: float(r['validation_accuracy']))
  assert report['test_accuracy'] == pytest.approx(float(best['test_accuracy']), abs=1e-6)
  assert report['step'] == int(best['step'])


def test_several_steps_per_call_give_the_same_run_and_resume_exactly(trained, tmp_path):
  # Five steps per call (14 per epoch: calls of 5, 5, 4), stopped by SIGTERM
  # when the first call ends and resumed, against the plain one step per
  # call of `trained`: on this CPU bit for bit the same.
  numbers = lambda workdir: [{k: v for k, v in r.items() if k != 'seconds'}
                             for r in _rows(workdir)]
  stopped = tmp_path / 'stopped'
  args = [*TINY, '--config.num_epochs=2', '--config.steps_per_dispatch=5',
          f'--workdir={stopped}']
  signal_at = [sys.executable, str(pathlib.Path(__file__).parent / 'signal_at_step.py')]
  first = run_binary(*args, env={'SIGNAL_AT_STEP': '5'}, python=signal_at)
  assert first.returncode == 128 + signal.SIGTERM, first.stderr[-3000:]
  assert os.listdir(stopped / 'checkpoints' / 'latest') == ['5']
  second = run_binary(*args)
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resuming from step 5' in second.stderr
  assert numbers(stopped) == numbers(trained[0])


def _bad_inputs(tmp_path, trained_workdir):
  corrupt = tmp_path / 'cifar-10-binary.tar.gz'
  corrupt.write_bytes(b'not a tar file' * 100)
  data_dir = f'--config.dataset.data_dir={tmp_path / "tfds"}'
  return {
      'model': ['--config.model=all_cnn_d'],
      'dataset.name': ['--config.dataset.name=mnist'],
      'optimizer': ['--config.optimizer=adagrad'],
      'dataset.classes': ['--config.dataset.classes=0,eleven'],
      'batch_size': ['--config.batch_size=0'],
      'learning_rate': ['--config.learning_rate=-0.1'],
      'dataset.archive': ['--config.dataset.name=cifar10', data_dir,
                          f'--config.dataset.archive={tmp_path / "missing.tar.gz"}'],
      'dataset.archive ': ['--config.dataset.name=cifar10', data_dir,
                           f'--config.dataset.archive={corrupt}'],
      'model ': ['--config.model=model_a', f'--workdir={trained_workdir}'],
      'width': ['--config.width=0.5', f'--workdir={trained_workdir}'],
  }


@pytest.mark.parametrize('field', ['model', 'dataset.name', 'optimizer',
                                   'dataset.classes', 'batch_size',
                                   'learning_rate', 'dataset.archive',
                                   'dataset.archive ', 'model ', 'width'])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(
    field, tmp_path, trained, capsys):
  workdir, _ = trained
  args = _bad_inputs(tmp_path, workdir)[field]
  if not any(a.startswith('--workdir') for a in args):
    args.append(f'--workdir={tmp_path / "fresh"}')
  before = snapshot(workdir)
  code, err = run_main(capsys, *TINY, *args)
  assert code == 2
  lines = [l for l in err.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and lines[0].startswith(f'error: {field.strip()}:'), err
  assert 'Traceback' not in err
  assert not (tmp_path / 'fresh').exists()
  assert snapshot(workdir) == before


def test_bad_input_through_a_real_process(tmp_path):
  result = run_binary(*TINY, f'--workdir={tmp_path / "wd"}', '--config.model=vgg')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith('error: model: unknown network')
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'wd').exists()


def test_resume_continues_the_run_and_lsuv_runs_only_before_it(tmp_path):
  from allconv_jax import train  # pylint: disable=g-import-not-at-top
  config = load_config('digits.py')
  config.width, config.init, config.num_epochs = 0.25, 'lsuv', 1
  config.dataset.classes = '0,1,2,3,4'
  config.lsuv.batch_size = 64
  workdir = tmp_path / 'wd'
  train.train_and_evaluate(config, str(workdir))
  report_file = workdir / 'lsuv_report.json'
  report = json.loads(report_file.read_text())
  assert report['batch_size'] == 64 and report['layers'][0]['name'] == 'conv1'
  written = report_file.stat().st_mtime_ns
  config.num_epochs = 2
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['epochs'] == 2
  assert report_file.stat().st_mtime_ns == written  # Not run again on resume.
  # The first epoch is neither repeated nor lost.
  assert [int(r['epoch']) for r in _rows(workdir)] == [1, 2]
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints' / 'latest'))
  assert steps[-1] == summary['steps'] == int(_rows(workdir)[-1]['step'])


def test_preprocessing_is_fitted_on_the_training_images_only(trained):
  from allconv_jax import datasets, input_pipeline  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  config = load_config('digits.py').dataset
  config.classes = '0,1,2,3,4'
  data = datasets.load(config)
  saved = input_pipeline.Preprocessor.load(str(workdir / 'preprocess.npz'))
  np.testing.assert_allclose(
      saved.mean, input_pipeline.Preprocessor.fit(data.train.images).mean, rtol=1e-6)
  with_validation = np.concatenate([data.train.images, data.validation.images])
  assert not np.allclose(
      saved.mean, input_pipeline.Preprocessor.fit(with_validation).mean, rtol=1e-6)


def test_selection_follows_validation_not_test(tmp_path, monkeypatch):
  """Validation accuracy falls while test accuracy rises: epoch 1 is selected."""
  from allconv_jax import checkpoints, selection, steps, train  # pylint: disable=g-import-not-at-top
  config = load_config('digits.py')
  config.width, config.num_epochs, config.dataset.classes = 0.25, 2, '0,1,2,3,4'
  scripted = {'validation': [0.9, 0.5], 'test': [0.3, 0.8]}
  real_evaluate = steps.evaluate

  def evaluate(eval_step, state, mesh, images, labels, batch_size, **kwargs):
    measured = real_evaluate(eval_step, state, mesh, images, labels, batch_size,
                             **kwargs)
    split = 'validation' if len(labels) == config.dataset.validation_size else 'test'
    return dict(measured, accuracy=scripted[split].pop(0))

  monkeypatch.setattr(steps, 'evaluate', evaluate)
  workdir = tmp_path / 'wd'
  summary = train.train_and_evaluate(config, str(workdir))
  assert summary['selected_epoch'] == 1 and summary['selected_test_accuracy'] == 0.3
  assert summary['final_test_accuracy'] == 0.8
  best = workdir / 'checkpoints' / 'best'
  assert selection.checkpoint_dir(str(workdir)) == str(best)
  assert checkpoints.latest_step(str(best)) == summary['selected_step']
  with open(best / str(summary['selected_step']) / 'meta' / 'metadata') as f:
    meta = json.load(f)
  assert meta['best_epoch'] == 1 and meta['best_validation_accuracy'] == 0.9


def test_without_a_validation_split_the_final_checkpoint_is_used(tmp_path, capsys):
  workdir = tmp_path / 'wd'
  out = []
  code, err = run_main(capsys, *TINY, f'--workdir={workdir}', '--config.num_epochs=2',
                       '--config.dataset.validation_size=0', stdout=out)
  assert code == 0, err[-3000:]
  summary = json.loads(out[0].strip().splitlines()[-1])
  rows = _rows(workdir)
  assert summary['selection'] == 'final' and summary['selected_epoch'] == 2
  assert summary['selected_validation_accuracy'] is None
  assert all(r['validation_accuracy'] == 'nan' for r in rows)
  assert not os.listdir(workdir / 'checkpoints' / 'best')
  out = []
  code, err = run_main(capsys, *TINY, f'--workdir={workdir}', '--mode=eval',
                       '--config.dataset.validation_size=0', stdout=out)
  assert code == 0, err[-3000:]
  report = json.loads(out[0].strip().splitlines()[-1])
  assert report['step'] == int(rows[-1]['step'])
  assert report['test_accuracy'] == pytest.approx(float(rows[-1]['test_accuracy']), abs=1e-6)
  # A preprocessing file of the old definition (no version) is refused.
  np.savez(workdir / 'preprocess.npz', mean=np.zeros(3), std=np.ones(3), gcn_scale=55.0)
  code, err = run_main(capsys, *TINY, f'--workdir={workdir}', '--mode=eval',
                       '--config.dataset.validation_size=0')
  assert code == 2 and 'Traceback' not in err
  assert err.strip().splitlines()[-1].startswith('error: workdir:')
  assert 'start a new workdir' in err


def test_a_workdir_that_is_a_file_or_in_use_is_a_one_line_error(tmp_path, capsys):
  from allconv_jax import files  # pylint: disable=g-import-not-at-top
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('not a workdir')
  code, err = run_main(capsys, *TINY, f'--workdir={a_file}')
  assert code == 2 and 'Traceback' not in err
  assert err.strip().splitlines()[-1].startswith(f'error: workdir: {a_file} is a file')
  assert a_file.read_text() == 'not a workdir'

  workdir = tmp_path / 'wd'
  with files.lock(str(workdir)):  # As a training process holds it.
    code, err = run_main(capsys, *TINY, f'--workdir={workdir}')
  assert code == 2 and 'Traceback' not in err
  assert 'is in use by process' in err.strip().splitlines()[-1]
  assert os.listdir(workdir) == ['.lock']
  # Released on exit: a lock file left behind is no obstacle.
  with files.lock(str(workdir)):
    pass


def test_a_training_split_too_large_for_the_device_is_a_one_line_error(monkeypatch):
  # CPUs report no memory limit; a GPU's is stood in for.

  class Device:
    def memory_stats(self):
      return {'bytes_limit': 2**30}

  mesh = sharding.make_mesh()
  monkeypatch.setattr(jax, 'local_devices', lambda: [Device()])
  images = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32),
                                           (50000, 32, 32, 3), (0, 0, 0, 0))
  with pytest.raises(UserError, match=r'^dataset: the preprocessed training '
                     r'split takes 0\.6 GiB on each device, more than half of '
                     r'its 1\.0 GiB'):
    steps.resident(mesh, images, np.zeros(50000, np.int32))
