"""Populations (config.sweep): members trained together as one program.

One population of four members (seeds 0 and 3 times two learning rates) and
the single run of one of its members train in this process for two steps of
a tiny All-CNN-C (width 0.125, batch 8, digits 0 and 1), with XLA's
convolutions, beside that run's twin with the subpixel convolutions, which
measures the rounding noise the comparison allows (tests/rounding.py). Other
modules test what every run does; here, what a population adds: each member
is its single run, a run of its own on disk, loadable alone, frozen when it
diverges, and resumable only as the same population. Resume after SIGKILL
runs the real binary (see the end).
"""

import json
import os
import signal

import jax
import numpy as np
import pytest

from conftest import TINY, load_config, run_main, snapshot
from robustness_lab import Lab, assert_trees_equal, load_checkpoint
from rounding import assert_within, max_abs_gap, max_relative_gap

from allconv_jax import (checkpoints, config as config_lib, population, reporting,
                         stopping, train, trained, transfer, visualize)
from allconv_jax.errors import UserError

SEEDS, RATES = (0, 3), (0.002, 0.02)
MEMBER = population.Member(3, 0.02)  # Compared with its single run.
COLUMNS = ('train_loss', 'train_accuracy', 'validation_loss',
           'validation_accuracy', 'test_loss', 'test_accuracy')


# What the eval of a member is given on the command line.
FLAGS = ['--config=configs/digits.py', '--config.width=0.125', '--config.batch_size=8',
         '--config.dataset.classes=0,1', '--config.dataset.validation_size=40',
         '--config.conv_impl=native', '--config.optimizer=sgd']


def _config(seeds=(), rates=(), **fields):
  config = load_config('digits.py')
  config.width, config.batch_size = 0.125, 8
  # XLA's convolutions at the suite's optimization level 0 are slow: few
  # images (digits 0 and 1: 229 for training, 40 for validation, 91 for test).
  config.dataset.classes, config.dataset.validation_size = '0,1', 40
  # XLA's convolutions: oneDNN's weight gradients sum in an order that
  # depends on the thread they run on, a population's differs from a run's.
  config.conv_impl = 'native'
  # SGD, the paper's: Adam divides rounding-level gradients of a parameter
  # by their own size and turns them into whole steps.
  config.optimizer, config.lr_schedule = 'sgd', 'piecewise'
  config.num_train_steps, config.eval_every_steps = 2, 1
  config.sweep.seeds, config.sweep.learning_rates = seeds, rates
  for field, value in fields.items():
    setattr(config, field, value)
  return config


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('population')
  summary = train.train_and_evaluate(_config(SEEDS, RATES), str(base / 'pop'))
  for name, conv_impl in (('single', 'native'), ('twin', 'subpixel')):
    train.train_and_evaluate(
        _config(seed=MEMBER.seed, learning_rate=MEMBER.learning_rate,
                conv_impl=conv_impl), str(base / name))
  return base, summary


def _rows(directory):
  return reporting.read_csv(os.path.join(directory, 'metrics.csv'))


def _member_params(tree, k):
  return jax.tree.map(lambda x: x[k], tree['state']['members']['params'])


@pytest.mark.rounding
def test_member_ends_with_the_parameters_of_its_single_run(runs):
  base, _ = runs
  k = population.members(_config(SEEDS, RATES)).index(MEMBER)
  _, pop, _ = load_checkpoint(base / 'pop')
  _, single, _ = load_checkpoint(base / 'single')
  _, twin, _ = load_checkpoint(base / 'twin')
  member, alone = _member_params(pop, k), single['state']['params']
  # Float32 rounding: XLA compiles the member's step inside a loop over the
  # members and fuses it otherwise (1e-7 apart after two steps); SGD, not
  # Adam, so that it grows no faster than the gradients do. The noise floor
  # is the single run against its twin with the subpixel convolutions (the
  # strided ones summed in another order), measured here (tests/rounding.py).
  # In ulps of each layer's largest value (a few here), the largest over the
  # layers, with 16 ulps as the bound where the floor happens to be smaller.
  eps = float(np.finfo(np.float32).eps)
  ulps = lambda x, y: max(jax.tree.leaves(jax.tree.map(
      lambda p, q: max_abs_gap(p, q) / (eps * float(np.abs(q).max() or 1)), x, y)))
  assert_within(ulps(member, alone), ulps(twin['state']['params'], alone),
                'parameters, in ulps', minimum=16)
  rows = _rows(population.member_dir(base / 'pop', MEMBER))
  rows_alone, rows_twin = _rows(base / 'single'), _rows(base / 'twin')
  assert [r['step'] for r in rows] == [1, 2]
  for row, row_alone, row_twin in zip(rows, rows_alone, rows_twin):
    assert row['learning_rate'] == pytest.approx(row_alone['learning_rate'], rel=1e-6)
    assert_within(max_relative_gap(row, row_alone, COLUMNS),
                  max_relative_gap(row_twin, row_alone, COLUMNS),
                  f'step {row["step"]}', minimum=16 * eps)
  # The members differ: each has its own seed and rate.
  others = [_member_params(pop, j)['conv1']['kernel'] for j in range(4)]
  assert all(not np.allclose(a, b) for i, a in enumerate(others) for b in others[:i])


def test_each_member_is_a_run_of_its_own(runs):
  base, summary = runs
  for member in population.members(_config(SEEDS, RATES)):
    directory = population.member_dir(base / 'pop', member)
    with open(os.path.join(directory, 'config.json')) as f:
      config = json.load(f)
    assert (config['seed'], config['learning_rate']) == (member.seed, member.learning_rate)
    assert config['sweep'] == {'seeds': [], 'learning_rates': [], 'members_at_once': 0}
    names = set(os.listdir(directory))
    assert {'metrics.csv', 'curves.png', 'summary.json', 'confusion.csv',
            'preprocess.npz'} <= names
    assert any(n.startswith('events.out.tfevents') for n in names)
    loaded = trained.load(directory)
    with open(os.path.join(directory, 'summary.json')) as f:
      assert loaded.step == json.load(f)['selected_step']
  # Ranked by validation accuracy, never by test accuracy.
  table = summary['members']
  accuracies = [r['selected_validation_accuracy'] for r in table]
  assert accuracies == sorted(accuracies, reverse=True)
  assert summary['best_member'] == table[0]['member']
  with open(base / 'pop' / 'members.csv') as f:
    assert [line.split(',')[0] for line in f.read().splitlines()[1:]] == [
        r['member'] for r in table]
  assert (base / 'pop' / 'members.png').stat().st_size > 0
  assert not (base / 'pop' / 'metrics.csv').exists()
  # The library's reading of a finished population, for the experiments.
  read = population.member_summaries(str(base / 'pop'))
  assert sorted((m['seed'], m['learning_rate']) for m in read) == sorted(
      (m.seed, m.learning_rate) for m in population.members(_config(SEEDS, RATES)))
  by_name = {r['member']: r for r in table}
  for member in read:
    assert member['summary']['selected_step'] == by_name[member['name']]['selected_step']
    assert member['rows'] == _rows(member['workdir']) and member['diverged_step'] == -1


def test_eval_visualize_and_transfer_load_one_member(runs, capsys, tmp_path):
  base, _ = runs
  directory = population.member_dir(str(base / 'pop'), MEMBER)
  out = []
  code, err = run_main(capsys, *FLAGS, f'--workdir={directory}', '--mode=eval',
                       stdout=out)
  assert code == 0, err
  with open(os.path.join(directory, 'summary.json')) as f:
    selected = json.load(f)['selected_test_accuracy']
  assert json.loads(out[0])['test_accuracy'] == pytest.approx(selected)

  config = _config()
  config.visualize.layers, config.visualize.num_units = 'conv1', 1
  config.visualize.num_images = 1
  visualize.visualize_checkpoint(config, directory)
  assert os.path.exists(os.path.join(directory, 'visualizations', 'conv1.png'))

  config = _config()
  config.transfer.from_workdir = directory
  start = train.initial_state(train.setup(config, str(tmp_path / 'transfer')))
  member = trained.load(directory).variables['params']
  assert_params_equal_but(start.state.params, member, 'classifier')

  with pytest.raises(UserError, match=r'^workdir: .* is a population of 4 members; '
                     r'give one of them'):
    trained.load(str(base / 'pop'))


def assert_params_equal_but(params, source, reinit):
  for name in params:
    if not transfer.matches(name, [reinit]):
      jax.tree.map(np.testing.assert_array_equal, params[name], source[name])


def test_resume_with_other_members_is_a_one_line_error(runs):
  base, _ = runs
  before = snapshot(base / 'pop')
  for config in (_config((0,), RATES), _config(SEEDS, RATES[:1]), _config()):
    with pytest.raises(UserError, match=r'^sweep: the checkpoint in .* has sweep='):
      train.train_and_evaluate(config, str(base / 'pop'))
  assert snapshot(base / 'pop') == before


@pytest.mark.parametrize('field, value, message', [
    ('seeds', (0, 0), 'must be distinct non-negative integers'),
    ('seeds', (-1,), 'must be distinct non-negative integers'),
    ('learning_rates', (0.1, 0.0), 'must be distinct positive numbers'),
    ('members_at_once', -1, 'must be 0 .* or a positive integer'),
])
def test_bad_sweep_values_are_one_line_errors(field, value, message):
  config = _config()
  setattr(config.sweep, field, value)
  with pytest.raises(UserError, match=rf'^sweep\.{field}: {message}'):
    config_lib.validate(config)


# The populations below have the shape of the one above (four members; the
# rates are state, not constants), so their programs come from the cache.


def test_a_diverging_member_is_frozen_and_leaves_the_others_unchanged(runs, tmp_path):
  base, _ = runs
  config = _config(SEEDS, (MEMBER.learning_rate, 1e30))
  members = population.members(config)
  summary = train.train_and_evaluate(config, str(tmp_path / 'pop'))
  by_name = {r['member']: r for r in summary['members']}
  for member in members:
    diverged = by_name[member.name]['diverged_step']
    assert diverged >= 1 if member.learning_rate == 1e30 else diverged == -1
  rows = _rows(tmp_path / 'pop' / 'members' / 'lr1e+30_seed3')
  assert rows[-1]['diverged_step'] >= 1 and len(rows) == 2
  _, tree, _ = load_checkpoint(tmp_path / 'pop')
  frozen = _member_params(tree, members.index(population.Member(3, 1e30)))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(frozen))
  # The healthy members' first two steps are those of the population above,
  # whatever their neighbours do.
  _, other, _ = load_checkpoint(base / 'pop', step=2)
  _, two_steps, _ = load_checkpoint(tmp_path / 'pop', step=2)
  before = population.members(_config(SEEDS, RATES))
  for seed in SEEDS:
    member = population.Member(seed, MEMBER.learning_rate)
    jax.tree.map(np.testing.assert_array_equal,
                 _member_params(two_steps, members.index(member)),
                 _member_params(other, before.index(member)))


def test_a_population_whose_members_all_diverge_stops(tmp_path):
  # Checked before the evaluation of step 2, which it skips.
  with pytest.raises(stopping.Diverged):
    train.train_and_evaluate(_config(SEEDS, (1e30, 2e30), eval_every_steps=2),
                             str(tmp_path / 'pop'))


# ------------------------------------------------- SIGKILL and resume (binary)

# 475 training digits, batch 32: 14 steps, a checkpoint after each (all
# kept), killed after the fifth.
KILL_ARGS = [*(a for a in TINY if not a.startswith('--config.width=')),
             '--config.width=0.125', '--config.num_epochs=1',
             '--config.checkpoint_every_steps=1', '--config.checkpoint_keep=20',
             '--config.sweep.seeds=(0,1)',
             '--config.optimizer=sgd', '--config.lr_schedule=piecewise',
             '--config.learning_rate=0.02']


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
  lab = Lab(tmp_path_factory.mktemp('population_lab'))

  def killed(lab):
    workdir = lab.base / 'b'
    proc = lab.start('b1', [*KILL_ARGS, f'--workdir={workdir}'])
    proc.signal_when(workdir, lambda s: bool(s) and s[-1] >= 5, signal.SIGKILL)
    first = proc.wait()
    return first, lab.run('b2', [*KILL_ARGS, f'--workdir={workdir}'])

  def two_devices(lab):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    return lab.run('c', [*KILL_ARGS, f'--workdir={lab.base / "c"}'],
                   env={'XLA_FLAGS': flags.strip()})

  with lab.running([[('a', lambda lab: lab.run(
      'a', [*KILL_ARGS, f'--workdir={lab.base / "a"}']), ()), ('c', two_devices, ())],
                    [('b', killed, ())]]):
    yield lab


def test_killed_and_resumed_population_ends_bit_for_bit_like_an_uninterrupted_one(lab):
  a = lab.result('a')
  first, resumed = lab.result('b')
  assert a.returncode == 0, a.tail()
  assert first.returncode == -signal.SIGKILL, first.tail()
  assert resumed.returncode == 0 and 'Resuming from step' in resumed.stderr, resumed.tail()
  step_a, tree_a, meta_a = load_checkpoint(lab.base / 'a')
  step_b, tree_b, meta_b = load_checkpoint(lab.base / 'b')
  assert step_a == step_b
  assert_trees_equal(tree_a, tree_b)
  strip = lambda rows: [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]
  assert ([strip(h['history']) for h in meta_a['member_histories']] ==
          [strip(h['history']) for h in meta_b['member_histories']])
  for name in os.listdir(lab.base / 'a' / 'members'):
    member_a, member_b = lab.base / 'a' / 'members' / name, lab.base / 'b' / 'members' / name
    _, best_a, _ = load_checkpoint(member_a, 'best')
    _, best_b, _ = load_checkpoint(member_b, 'best')
    jax.tree.map(np.testing.assert_array_equal, best_a, best_b)
    assert strip(_rows(member_a)) == strip(_rows(member_b))


def test_a_population_trains_data_parallel_on_several_devices(lab):
  c = lab.result('c')
  assert c.returncode == 0 and '2 device(s), 2 members' in c.stderr, c.tail()
  # Each member's batch split over the two devices: the same first step up
  # to float32 rounding: 1e-5 between one device and two for a single run
  # (tests/test_sharding.py), 2e-5 more from oneDNN's thread-dependent sums
  # (see above); a member trained on another's batch or seed would be 1e-2
  # off. Later on, ties flip on digits (3e-3 apart after five steps).
  latest = lambda name: str(lab.base / name / 'checkpoints' / 'latest')
  # Read back on one device, as --mode=eval does whatever wrote it.
  one, _ = checkpoints.restore_tree(latest('a'), 1)
  two, _ = checkpoints.restore_tree(latest('c'), 1)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-4),
               one['state']['members']['params'], two['state']['members']['params'])
  for name in os.listdir(lab.base / 'c' / 'members'):
    assert trained.load(str(lab.base / 'c' / 'members' / name)).step == 14
