"""End to end through the binary: train, resume, eval, and bad input."""

import csv
import json
import os

import pytest

from conftest import TINY, run_binary, run_main, snapshot


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny All-CNN-C trained for two epochs on digits by the real binary."""
  workdir = tmp_path_factory.mktemp('run') / 'wd'
  result = run_binary(*TINY, f'--workdir={workdir}', '--config.num_epochs=2')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def _rows(workdir):
  with open(workdir / 'metrics.csv') as f:
    return list(csv.DictReader(f))


def test_training_writes_every_output_and_learns(trained):
  workdir, result = trained
  rows = _rows(workdir)
  assert list(rows[0]) == ['epoch', 'step', 'learning_rate', 'train_loss',
                           'train_accuracy', 'test_loss', 'test_accuracy', 'seconds']
  assert [int(r['epoch']) for r in rows] == [1, 2]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  # Five classes: chance is 20%.
  assert summary['best_test_accuracy'] > 0.6
  assert summary['best_test_accuracy'] == pytest.approx(
      max(float(r['test_accuracy']) for r in rows))
  assert 'classifier' in result.stdout and 'Total Parameters' in result.stdout
  assert 'ETA' in result.stderr
  for name in ('curves.png', 'preprocess.npz', 'config.json'):
    assert (workdir / name).is_file(), name
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(workdir))
  assert os.listdir(workdir / 'checkpoints' / 'latest')
  assert os.listdir(workdir / 'checkpoints' / 'best')


def test_eval_mode_reports_the_best_checkpoint(trained):
  workdir, _ = trained
  result = run_binary(*TINY, f'--workdir={workdir}', '--mode=eval')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(report) == {'test_accuracy', 'test_loss', 'step'}
  best = max(_rows(workdir), key=lambda r: float(r['test_accuracy']))
  assert report['test_accuracy'] == pytest.approx(float(best['test_accuracy']), abs=1e-6)
  assert report['step'] == int(best['step'])


def test_resume_continues_without_repeating_epochs(tmp_path):
  workdir = tmp_path / 'wd'
  first = run_binary(*TINY, f'--workdir={workdir}', '--config.num_epochs=1')
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_binary(*TINY, f'--workdir={workdir}', '--config.num_epochs=2')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resuming from step' in second.stderr
  assert [int(r['epoch']) for r in _rows(workdir)] == [1, 2]
  steps = sorted(int(s) for s in os.listdir(workdir / 'checkpoints' / 'latest'))
  assert steps[-1] == int(_rows(workdir)[-1]['step'])


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


def test_lsuv_runs_once_before_training_and_not_on_resume(tmp_path):
  from allconv_jax import train  # pylint: disable=g-import-not-at-top
  from configs import digits  # pylint: disable=g-import-not-at-top
  config = digits.get_config()
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
