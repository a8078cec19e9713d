"""Tests of the study scripts in experiments/, at a tiny budget.

Each script runs as a user would run it (a subprocess from the repository
root) on the digits, with a small network for an epoch or a few steps, into
tmp_path; the tests check that the table, the plots and the JSON are written
and that they describe the runs asked for. The Table 3 runner's bookkeeping
(skipping, resuming, divergence, selection on validation) is tested through
a driver that replaces the library's training with recorded outcomes, so
that it needs no training at all.
"""

import json
import os
import subprocess
import sys

import numpy as np

from allconv_jax import input_pipeline, reporting
from conftest import REPO, snapshot

TINY = ['--width=0.125', '--machine=test machine']


def run_script(name, *args):
  result = subprocess.run([sys.executable, f'experiments/{name}', *TINY, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def run_table3(out, *args, **env):
  """table3.py on three digit classes, one epoch, into `out`."""
  result = subprocess.run(
      [sys.executable, 'tests/table3_driver.py', '--dataset=digits',
       '--classes=0,1,2', '--validation_size=30', '--width=0.1', '--epochs=1',
       '--machine=test machine', '--compilation_cache=', f'--out={out}',
       *args],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH='experiments', **env))
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def table_rows(markdown: str) -> list[list[str]]:
  """The cells of every Markdown table row that is not a header rule."""
  return [[c.strip() for c in line.strip('|').split('|')]
          for line in markdown.splitlines()
          if line.startswith('|') and not line.startswith('|---')]


def test_table3_trains_and_records_a_divergence(tmp_path):
  # Two real runs of Model A as one population: a usual rate, and one so
  # large that the loss becomes non-finite in the first epoch.
  out = tmp_path / 'out'
  result = run_table3(out, '--networks=model_a', '--learning_rates=0.01,1e6',
                      '--seeds=0', TABLE3_NO_ZCA='1')
  assert ('table3: 1 populations of 2 runs, 0 finished already (skipped), '
          '1 to train') in result.stdout
  assert '[1/1] done model_a' in result.stdout and '1 diverged' in result.stdout
  runs = out / 'runs' / 'model_a' / 'members'
  summary = json.loads((runs / 'lr0.01_seed0' / 'summary.json').read_text())
  assert summary['selection'] == 'best_validation_accuracy'
  assert 0 <= summary['final_validation_accuracy'] <= 1
  saved = json.loads((out / 'results.json').read_text())
  assert saved['selection']['model_a']['grid']['1e+06']['diverged'] == [0]
  diverged, = [r for r in saved['runs'] if r['status'] == 'diverged']
  assert diverged['diverged']['step'] >= 1 and diverged['learning_rate'] == 1e6
  # The diverged rate counts as chance (1/3); 0.01 is chosen unless it did
  # no better than chance on validation.
  assert saved['selection']['model_a']['learning_rate'] == 0.01 or (
      summary['final_validation_accuracy'] <= 1 / 3)
  markdown = (out / 'results.md').read_text()
  assert 'Of 2 runs, 1 diverged' in markdown
  assert (out / 'table3.png').stat().st_size > 0
  assert (out / 'table3_bars.png').stat().st_size > 0
  # Only the small files of each run are meant for git.
  assert '!runs/*/members/*/summary.json' in (out / '.gitignore').read_text()


def test_table3_selects_on_validation_skips_and_resumes(tmp_path):
  out, log = tmp_path / 'out', tmp_path / 'calls.log'
  fake = {
      # Validation prefers 0.1, test would prefer 0.01.
      'model_a 0.1 0': [0.80, 0.60], 'model_a 0.1 1': [0.82, 0.62],
      'model_a 0.01 0': [0.70, 0.90], 'model_a 0.01 1': [0.72, 0.92],
      # One diverged run, and one that never left chance (1/3 + 0.05).
      'all_cnn_a 0.1 0': 'diverge', 'all_cnn_a 0.1 1': [0.90, 0.85],
      'all_cnn_a 0.01 0': [0.35, 0.30], 'all_cnn_a 0.01 1': [0.60, 0.55],
  }
  env = dict(TABLE3_FAKE=json.dumps(fake), TABLE3_LOG=str(log))
  args = ['--networks=all_cnn_a,model_a', '--learning_rates=0.1,0.01',
          '--seeds=0,1']
  run_table3(out, *args, **env)
  assert sorted(log.read_text().split('\n')[:-1]) == sorted(fake)

  saved = json.loads((out / 'results.json').read_text())
  model_a = saved['selection']['model_a']
  assert model_a['learning_rate'] == 0.1
  assert model_a['grid']['0.1']['test'] == [0.60, 0.62]
  # all_cnn_a: 0.1 has (1/3 + 0.90) / 2 = 0.62 against 0.475.
  all_cnn_a = saved['selection']['all_cnn_a']
  assert all_cnn_a['learning_rate'] == 0.1
  assert all_cnn_a['grid']['0.1']['diverged'] == [0]
  assert all_cnn_a['grid']['0.01']['at_chance'] == [0]
  rows = (out / 'runs' / 'all_cnn_a' / 'members' / 'lr0.1_seed0' / 'metrics.csv')
  assert rows.read_text().splitlines()[0].split(',')[-2] == 'diverged_step'
  rows = table_rows((out / 'results.md').read_text())
  # The paper's order (All-CNN-A after Model A) and the test error at the
  # rate chosen on validation: 100 - (60, 62) = 39.00 ± 1.41.
  assert [r[:3] for r in rows[1:3]] == [['Model A', '0.1', '2'],
                                        ['All-CNN-A', '0.1', '2']]
  assert rows[1][4] == '39.00 ± 1.41' and rows[1][5] == '12.47'
  grid = {r[0]: r[1:] for r in rows[4:]}
  assert grid['All-CNN-A'][0].endswith('[1 d]')
  assert grid['All-CNN-A'][1].endswith('[1 c]')
  # The failures pooled per variant: the diverged run at 0.1, the stuck one
  # at 0.01.
  variants = {r[0]: r[1:] for r in rows if r[0] in ('Model', 'All-CNN')}
  assert variants == {'Model': ['0 of 2', '0 of 2', '0 of 4'],
                      'All-CNN': ['1 of 2', '1 of 2', '2 of 4']}

  # The same command again, after one population was stopped before it
  # finished (no summary.json): the finished one is skipped, only that one
  # trains (the library resumes it from its checkpoint).
  (out / 'runs' / 'model_a' / 'summary.json').unlink()
  result = run_table3(out, *args, **env)
  assert '1 finished already (skipped), 1 to train' in result.stdout
  assert '[1/1] resume model_a: 4 runs as one program' in result.stdout
  assert sorted(log.read_text().split('\n')[8:-1]) == sorted(
      k for k in fake if k.startswith('model_a'))


def test_transfer_study(tmp_path):
  out, runs = tmp_path / 'out', tmp_path / 'runs'
  args = ['--dataset=digits', '--width=0.125', '--epochs=1', '--pretrain_epochs=1',
          '--seeds=0', '--learning_rates=0.0025', f'--out={out}', f'--workdir_root={runs}']
  run_script('transfer_study.py', *args)
  assert (out / 'transfer_subset2_curves.png').stat().st_size > 0
  assert (out / 'transfer_subset2_rates.png').stat().st_size > 0
  rows = table_rows((out / 'results.md').read_text())
  assert [tuple(r[:4]) for r in rows[1:4]] == [
      ('subset2', arm, '0.0025', '1') for arm in ('scratch', 'finetune', 'probe')]
  # Fine-tuning and the probe start from the source pretrained on the other
  # digits, the classifier at zero, the probe frozen; scratch from nothing;
  # all hold out the same validation images.
  seed = runs / 'seed0'
  source = json.loads((seed / 'pretrain_subset1' / 'config.json').read_text())
  assert source['dataset']['classes'] == 'subset1'
  configs = {arm: json.loads((seed / f'subset2_{arm}' / 'members' / 'lr0.0025_seed0' /
                              'config.json').read_text())
             for arm in ('scratch', 'finetune', 'probe')}
  assert configs['scratch']['transfer']['from_workdir'] is None
  for arm, frozen in (('finetune', False), ('probe', True)):
    assert configs[arm]['transfer']['from_workdir'] == str(seed / 'pretrain_subset1')
    assert configs[arm]['transfer']['head_init'] == 'zeros'
    assert configs[arm]['transfer']['freeze'] == frozen
  assert {c['optimizer'] for c in configs.values()} == {'sgd'}
  assert {c['dataset']['validation_size'] for c in configs.values()} == {100}
  saved = json.loads((out / 'results.json').read_text())
  assert [(c['arm'], c['seeds']) for c in saved['arms']] == [
      ('scratch', [0]), ('finetune', [0]), ('probe', [0])]
  assert saved['sizes'] == dict(validation=100, test=224, classes=5)
  # The same command again trains nothing: every run is finished; the
  # report is redrawn from results.json alone.
  before = snapshot(seed)
  run_script('transfer_study.py', *args)
  assert snapshot(seed) == before
  (out / 'results.md').unlink()
  run_script('transfer_study.py', '--report_only', f'--out={out}')
  assert table_rows((out / 'results.md').read_text()) == rows


def test_batch_study(tmp_path):
  # Both kinds of input of the augmentation study: pixels scaled to [0, 1]
  # and normalized ones. He uniform instead of LSUV saves compiling LSUV.
  # Each run is the library's, in a workdir of its own.
  out, runs = tmp_path / 'out', tmp_path / 'runs'
  args = ['--study=augmentation', '--dataset=digits',
          '--variants=none,shift_flip_norm', '--init=he_uniform', '--steps=5',
          '--eval_every=2', f'--out={out}', f'--workdir_root={runs}']
  run_script('batch_studies.py', *args)
  assert (out / 'augmentation.png').stat().st_size > 0
  saved = json.loads((out / 'results.json').read_text())
  assert [(run['variant'], run['seed']) for run in saved['runs']] == [
      ('none', 0), ('shift_flip_norm', 0)]
  for run in saved['runs']:
    # Every --eval_every steps and at the last step.
    assert [p['step'] for p in run['curve']] == [2, 4, 5]
  rows = table_rows((out / 'results.md').read_text())
  assert [r[0] for r in rows[1:]] == [
      'none (inputs in [0, 1])', 'shift + flip + normalization']
  # The runs' own files: the library's metrics, with pixels in [0, 1] where
  # the study has no normalization.
  none = runs / 'none' / 'seed0'
  assert [r['step'] for r in reporting.read_csv(none / 'metrics.csv')] == [2, 4, 5]
  assert json.loads((none / 'summary.json').read_text())['steps'] == 5
  preprocessor = input_pipeline.Preprocessor.load(none / 'preprocess.npz')
  assert preprocessor(np.full((1, 32, 32, 3), 255, np.uint8)).max() == 1.0
  # Again: nothing is trained; with other flags, a one-line error.
  before = snapshot(runs)
  run_script('batch_studies.py', *args)
  assert snapshot(runs) == before
  result = subprocess.run(
      [sys.executable, 'experiments/batch_studies.py', *TINY, *args,
       '--steps=6'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1].startswith(
      f'error: workdir: {none} holds a run of another config')


def test_batch_study_reports_mean_and_std_over_seeds(tmp_path):
  # The committed init study's runs as seed 0, and a copy 2 points more
  # accurate everywhere as seed 1: the table gives the mean ± std of both.
  committed = json.loads((REPO / 'experiments' / 'results' /
                          'init_study_digits' / 'results.json').read_text())
  runs = []
  for run in [r for r in committed['runs'] if r.get('seed', 0) == 0]:
    shifted = json.loads(json.dumps(run))
    for point in shifted['curve']:
      point['test_accuracy'] += 0.02
    runs += [dict(run, seed=0), dict(shifted, seed=1)]
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'results.json').write_text(json.dumps(dict(committed, runs=runs)))
  run_script('batch_studies.py', '--study=init', '--dataset=digits',
             '--replot', f'--out={out}')
  markdown = (out / 'results.md').read_text()
  assert 'mean ± sample std over 2 seeds' in markdown
  rows = table_rows(markdown)
  assert [r[0] for r in rows[1:]] == [
      'LSUV', 'Glorot normal', 'He uniform', 'Gaussian (std 0.01)']
  first = committed['runs'][0]['curve']
  step = int(rows[0][1].split()[1])
  accuracy = next(p['test_accuracy'] for p in first if p['step'] == step)
  # The std of two values 2 points apart is 2 / sqrt(2) = 1.41 points.
  assert rows[1][1] == f'{100 * accuracy + 1:.1f} ± 1.4'


def test_init_study_replots_its_committed_results(tmp_path):
  # init_study.py is batch_studies.py --study=init; --replot redraws from a
  # results.json, here the committed one, written before the two merged.
  out = tmp_path / 'out'
  out.mkdir()
  committed = REPO / 'experiments' / 'results' / 'init_study_digits'
  (out / 'results.json').write_text((committed / 'results.json').read_text())
  run_script('init_study.py', '--dataset=digits', '--replot', f'--out={out}')
  assert (out / 'init_study.png').stat().st_size > 0
  rows = table_rows((out / 'results.md').read_text())
  assert [r[0] for r in rows[1:]] == [
      'LSUV', 'Glorot normal', 'He uniform', 'Gaussian (std 0.01)']
  # The same accuracies at the same steps as the committed table.
  before = table_rows((committed / 'results.md').read_text())
  steps = len([c for c in before[0] if c.startswith('step')])
  columns = steps + 1  # The variant's name and its accuracies.
  assert [r[:columns] for r in rows[1:]] == [r[:columns] for r in before[1:]]


def test_table3_moves_the_papers_decays_to_the_same_fractions_of_a_budget():
  # The paper: x0.1 after epochs 200, 250 and 300 of 350 (its Section 3.1).
  code = ('import table3; print([table3.scaled_boundaries((200, 250, 300), e, 350) '
          'for e in (350, 60, 7, 5, 1)])')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, text=True,
                          capture_output=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH='experiments'))
  assert result.returncode == 0, result.stderr[-2000:]
  # 200/350 of 60 epochs is 34.3; at 5 epochs or fewer two decays would fall
  # on one epoch, so the paper's stay (none within the budget).
  assert result.stdout.split('\n')[0] == str(
      [(200, 250, 300), (34, 43, 51), (4, 5, 6), (200, 250, 300), (200, 250, 300)])
