"""Smoke tests of the study scripts in experiments/, at a tiny budget.

Each script runs as a user would run it (a subprocess from the repository
root) on the digits, with an eighth-width network for an epoch or a few
steps, into tmp_path; the tests check that the table, the plots and the JSON
are written and that they describe the runs asked for.
"""

import json
import subprocess
import sys

from conftest import REPO

TINY = ['--width=0.125', '--machine=test machine']


def run_script(name, *args):
  result = subprocess.run([sys.executable, f'experiments/{name}', *TINY, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def table_rows(markdown: str) -> list[list[str]]:
  """The cells of every Markdown table row that is not a header rule."""
  return [[c.strip() for c in line.strip('|').split('|')]
          for line in markdown.splitlines()
          if line.startswith('|') and not line.startswith('|---')]


def test_six_models(tmp_path):
  out = tmp_path / 'out'
  # The two cheapest networks.
  run_script('six_models.py', '--models=model_a,strided_cnn_c', '--epochs=1',
             f'--out={out}', f'--workdir_root={tmp_path / "runs"}')
  assert (out / 'six_models.png').stat().st_size > 0
  rows = table_rows((out / 'results.md').read_text())
  assert [r[0] for r in rows[1:]] == ['Model A', 'Strided-CNN-C']
  saved = json.loads((out / 'results.json').read_text())
  # Strided-CNN-C has two 3x3 convs per stage where Model A has one 5x5:
  # more parameters at any width.
  params = [run['parameters'] for run in saved['runs']]
  assert 0 < params[0] < params[1]
  assert all(len(run['rows']) == 1 for run in saved['runs'])
  assert 'test machine' in (out / 'results.md').read_text()


def test_transfer_study(tmp_path):
  out, runs = tmp_path / 'out', tmp_path / 'runs'
  run_script('transfer_study.py', '--dataset=digits', '--epochs=1',
             '--pretrain_epochs=1', '--subsets=subset2',
             '--learning_rates=0.0025', f'--out={out}', f'--workdir_root={runs}')
  assert (out / 'transfer_subset2.png').stat().st_size > 0
  rows = table_rows((out / 'results.md').read_text())
  assert [(r[0], r[1], r[2]) for r in rows[1:3]] == [
      ('subset2', '0.0025', 'transfer'), ('subset2', '0.0025', 'scratch')]
  # The transfer run starts from the source pretrained on the other digits;
  # the scratch run from nothing.
  source = json.loads((runs / 'pretrain_subset1' / 'config.json').read_text())
  assert source['dataset']['classes'] == 'subset1'
  transfer = json.loads(
      (runs / 'subset2_lr0.0025_transfer' / 'config.json').read_text())
  scratch = json.loads(
      (runs / 'subset2_lr0.0025_scratch' / 'config.json').read_text())
  assert transfer['transfer']['from_workdir'] == str(runs / 'pretrain_subset1')
  assert scratch['transfer']['from_workdir'] is None
  assert transfer['optimizer'] == 'sgd' and transfer['learning_rate'] == 0.0025


def test_batch_study(tmp_path):
  # Both kinds of input of the augmentation study: pixels scaled to [0, 1]
  # and normalized ones. He uniform instead of LSUV saves compiling LSUV.
  out = tmp_path / 'out'
  run_script('batch_studies.py', '--study=augmentation', '--dataset=digits',
             '--variants=none,shift_flip_norm', '--init=he_uniform',
             '--steps=4', '--eval_every=2', '--eval_examples=100',
             f'--out={out}')
  assert (out / 'augmentation.png').stat().st_size > 0
  saved = json.loads((out / 'results.json').read_text())
  assert [run['variant'] for run in saved['runs']] == [
      'none', 'shift_flip_norm']
  for run in saved['runs']:
    assert [p['step'] for p in run['curve']] == [0, 2, 4]
  rows = table_rows((out / 'results.md').read_text())
  assert [r[0] for r in rows[1:]] == [
      'none (inputs in [0, 1])', 'shift + flip + normalization']


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
