"""Robustness of the real binary (issue 6): kills, signals, corrupt
checkpoints, NaN, determinism and a table of bad inputs.

Every run here is a subprocess of ``python -m allconv_jax.main`` on a tiny
All-CNN-C (width 0.125, digits 0-4: 675 training images, batch 32, so 21
steps per epoch), 3 epochs, with a checkpoint every 5 steps:

* A and C: uninterrupted, started together (reference and determinism);
* B: the same command killed and restarted until it finishes (SIGKILL
  mid-epoch, SIGKILL after the first epoch, SIGTERM, SIGINT);
* copies of A: corrupt checkpoints, a resume at an absurd learning rate;
* a fresh run at an absurd learning rate, a run told to stop at the last step
  of an epoch, and the table of bad inputs (`BAD_INPUTS`, robustness_lab.py).

Each run costs 15-40 s (about 8 s before its first step: imports, digits,
setup), so the module fixture `lab` starts them all at once in two lanes (two
CPU cores) and each test waits for the runs it looks at. All runs share a
JAX compilation cache of their own, so restarts do not compile again, except
C, which compiles from scratch.
"""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal

import pytest

from conftest import TINY, snapshot
from robustness_lab import (BAD_INPUTS, Lab, Result, TEST_COLUMNS,
                            assert_trees_equal, committed_steps,
                            lines_starting, load_checkpoint, only, read_rows,
                            resumed_from, without_seconds)

# 475 training digits of classes 0-4 (of their 675, the digits config holds 200
# out for validation), batch 32: epoch 2 is steps 15-28, epoch 3 steps 29-42.
STEPS_PER_EPOCH = 14
EPOCHS = 3
EVERY = 5  # checkpoint_every_steps
LAST_STEP = EPOCHS * STEPS_PER_EPOCH
# The two mid-epoch checkpoints before the last, kept with it (keep=3).
PREVIOUS = (LAST_STEP - 1) // EVERY * EVERY
BEFORE_PREVIOUS = PREVIOUS - EVERY
ARGS = [*(a for a in TINY if not a.startswith('--config.width=')),
        '--config.width=0.125', f'--config.num_epochs={EPOCHS}',
        f'--config.checkpoint_every_steps={EVERY}']

# The binary, stopped by SIGTERM at an exact step (see signal_at_step.py).
SIGNAL_AT_STEP = str(pathlib.Path(__file__).parent / 'signal_at_step.py')


# ----------------------------------------------------------------- the runs


def reference_run(lab, name, cache):
  result = lab.run(name, [*ARGS, f'--workdir={lab.base / name}'], cache=cache)
  assert result.returncode == 0, result.tail()
  if name == 'a':  # Copies for the runs that change a finished workdir.
    for copy in ('corrupt', 'nan', 'trained'):
      shutil.copytree(lab.base / 'a', lab.base / copy)
  return result


def needs_a(lab):
  lab.result('a')  # Raises if A failed.


@dataclasses.dataclass
class Stage:
  what: str
  result: Result
  signalled_at: list[int]  # committed steps when the signal was sent
  committed: list[int]  # committed steps once the process had exited
  meta: dict | None  # of the newest of those (older ones get pruned later)


def interrupted_run(lab, workdir) -> list[Stage]:
  """Run B: interrupted four times, restarted with the same command each time."""
  needs_a(lab)  # Not for correctness: for the compilation cache.
  args = [*ARGS, f'--workdir={workdir}']
  after = lambda step: lambda s: bool(s) and s[-1] >= step
  plan = [
      # Right after a mid-epoch checkpoint (step 10) is committed.
      ('SIGKILL mid-epoch 1', after(10), signal.SIGKILL),
      # Right after the first epoch's checkpoint, maybe before its CSV row.
      ('SIGKILL after epoch 1', after(STEPS_PER_EPOCH), signal.SIGKILL),
      ('SIGTERM in epoch 2', after(20), signal.SIGTERM),
      ('SIGINT in epoch 3', after(35), signal.SIGINT),
      ('to the end', None, None),
  ]
  stages = []
  for i, (what, ready, signum) in enumerate(plan):
    proc = lab.start(f'b{i + 1}', args)
    seen = proc.signal_when(workdir, ready, signum) if ready else []
    result = proc.wait()
    committed = committed_steps(workdir)
    meta = load_checkpoint(workdir, with_state=False)[2] if committed else None
    stages.append(Stage(what, result, seen, committed, meta))
  return stages


def signal_at_epoch_end(lab, workdir):
  """SIGTERM arriving during the last step of epoch 1, then a resume."""
  needs_a(lab)
  args = [*ARGS, f'--workdir={workdir}']
  stopped = lab.run('signal21', args, script=SIGNAL_AT_STEP,
                    env={'SIGNAL_AT_STEP': str(STEPS_PER_EPOCH)})
  return stopped, lab.run('signal21-resume', args)


def corrupt_resume(lab, workdir) -> Result:
  """A copy of A with its newest checkpoint truncated and the one before
  missing its state, run again with the same command."""
  needs_a(lab)
  latest = workdir / 'checkpoints' / 'latest'
  assert committed_steps(workdir) == [BEFORE_PREVIOUS, PREVIOUS, LAST_STEP]
  files = [os.path.join(root, name) for root, _, names
           in os.walk(latest / str(LAST_STEP) / 'state') for name in names]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 2)
  shutil.rmtree(latest / str(PREVIOUS) / 'state')
  return lab.run('corrupt', [*ARGS, f'--workdir={workdir}'])


def nan_resume(lab, workdir):
  """A copy of A resumed for a 4th epoch at an absurd learning rate."""
  needs_a(lab)
  before = snapshot(workdir / 'checkpoints')
  rows = read_rows(workdir)
  result = lab.run('nan_resume', [*ARGS, f'--workdir={workdir}',
                                  '--config.num_epochs=4',
                                  '--config.learning_rate=1e6'])
  return result, before, rows


def nan_fresh(lab, workdir) -> Result:
  """A fresh run at an absurd learning rate, checkpointing each epoch only.

  The same schedule as `nan_resume`, so it compiles nothing new.
  """
  return lab.run('nan_fresh', [*ARGS, f'--workdir={workdir}',
                               '--config.num_epochs=4',
                               '--config.learning_rate=1e6',
                               '--config.checkpoint_every_steps=0'])


def bad_input_run(lab, case_id, extra, where):
  case = lab.base / 'bad' / case_id
  case.mkdir(parents=True)
  shared = lab.base / 'bad'
  if where == 'trained':
    needs_a(lab)
    workdir = lab.base / 'trained'
  else:
    workdir = case / 'wd'
  args = [*ARGS, *(a.format(case=case, shared=shared) for a in extra)]
  # One config file (the case's if it has one), before the overrides.
  config_file = [a for a in args if a.startswith('--config=')][-1]
  args = [config_file, *(a for a in args if not a.startswith('--config='))]
  before = snapshot(workdir)
  result = lab.run(f'bad-{case_id}', [*args, f'--workdir={workdir}'])
  return dict(result=result, workdir=workdir, touched=snapshot(workdir) != before)


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
  """Starts every run of this module; the tests wait for the ones they need."""
  lab = Lab(tmp_path_factory.mktemp('robustness'))
  (lab.base / 'bad').mkdir()
  (lab.base / 'bad' / 'cifar-10-binary.tar.gz').write_bytes(b'not a tar file' * 100)
  job = lambda name, fn, *args: (name, fn, args)
  bad = {where: [job(case_id, bad_input_run, case_id, extra, where)
                 for case_id, extra, _, w in BAD_INPUTS if w == where]
         for where in ('fresh', 'trained')}
  lanes = [
      [job('a', reference_run, 'a', True),
       job('b', interrupted_run, lab.base / 'b'),
       job('signal21', signal_at_epoch_end, lab.base / 'signal21'),
       job('nan_fresh', nan_fresh, lab.base / 'nan_fresh')],
      [job('c', reference_run, 'c', False),
       *bad['fresh'],
       job('corrupt', corrupt_resume, lab.base / 'corrupt'),
       job('nan_resume', nan_resume, lab.base / 'nan'),
       *bad['trained']],
  ]
  with lab.running(lanes):
    yield lab


# ----------------------------------------------------------------- tests


def test_same_config_and_seed_give_identical_metrics_and_parameters(lab):
  for name in ('a', 'c'):
    result = lab.result(name)
    assert json.loads(result.stdout.strip().splitlines()[-1])['epochs'] == EPOCHS
  rows_a, rows_c = read_rows(lab.base / 'a'), read_rows(lab.base / 'c')
  assert [int(r['epoch']) for r in rows_a] == [1, 2, 3]
  assert without_seconds(rows_a) == without_seconds(rows_c)
  # The runs learn: five classes, chance is 20%.
  assert float(rows_a[-1]['test_accuracy']) > 0.5
  step_a, tree_a, _ = load_checkpoint(lab.base / 'a')
  step_c, tree_c, _ = load_checkpoint(lab.base / 'c')
  assert step_a == step_c == LAST_STEP
  assert_trees_equal(tree_a, tree_c)


def test_killed_and_restarted_run_ends_bit_for_bit_like_an_uninterrupted_one(lab):
  stages = lab.result('b')
  kill1, kill2, term, _, last = stages
  assert kill1.result.returncode == -signal.SIGKILL, kill1.result.tail()
  assert kill2.result.returncode == -signal.SIGKILL, kill2.result.tail()
  # The first kill left a mid-epoch checkpoint and the run resumed from it.
  assert kill1.committed[-1] % STEPS_PER_EPOCH, kill1
  assert resumed_from(kill2.result) == [kill1.committed[-1]]
  # The second kill came right after the first epoch's checkpoint.
  assert kill2.committed[-1] == STEPS_PER_EPOCH, kill2
  assert resumed_from(term.result) == [STEPS_PER_EPOCH]
  assert last.result.returncode == 0, last.result.tail()
  for stage in stages:
    assert 'Traceback' not in stage.result.stderr, stage.result.tail()

  workdir = lab.base / 'b'
  step_a, tree_a, meta_a = load_checkpoint(lab.base / 'a')
  step_b, tree_b, meta_b = load_checkpoint(workdir)
  assert step_a == step_b == LAST_STEP
  assert_trees_equal(tree_a, tree_b)
  best_a, best_tree_a, _ = load_checkpoint(lab.base / 'a', 'best')
  best_b, best_tree_b, _ = load_checkpoint(workdir, 'best')
  assert committed_steps(workdir, 'best') == [best_b]
  assert best_a == best_b
  assert_trees_equal(best_tree_a, best_tree_b)

  # Each epoch once, with the same test metrics.
  rows_a, rows_b = read_rows(lab.base / 'a'), read_rows(workdir)
  assert [int(r['epoch']) for r in rows_b] == [1, 2, 3]
  assert only(rows_b, *TEST_COLUMNS) == only(rows_a, *TEST_COLUMNS)
  assert only(meta_b['history'], *TEST_COLUMNS) == only(meta_a['history'], *TEST_COLUMNS)
  summary = json.loads(last.result.stdout.strip().splitlines()[-1])
  assert summary['epochs'] == EPOCHS
  assert summary['final_test_accuracy'] == float(rows_a[-1]['test_accuracy'])


def test_killed_and_restarted_run_reports_the_same_train_metrics(lab):
  stages = lab.result('b')
  assert stages[-1].result.returncode == 0, stages[-1].result.tail()
  rows_a, rows_b = read_rows(lab.base / 'a'), read_rows(lab.base / 'b')
  assert without_seconds(rows_b) == without_seconds(rows_a)


@pytest.mark.parametrize('index,signum,after', [(2, signal.SIGTERM, 20),
                                                (3, signal.SIGINT, 35)],
                         ids=['SIGTERM', 'SIGINT'])
def test_signal_saves_a_checkpoint_at_the_current_step_and_resume_completes(
    lab, index, signum, after):
  stages = lab.result('b')
  stage, resume = stages[index], stages[index + 1]
  result = stage.result
  assert result.returncode == 128 + signum, result.tail()
  assert 'Traceback' not in result.stderr
  stopped = lines_starting(result.stderr, 'stopped:')
  assert len(stopped) == 1, result.tail()
  match = re.fullmatch(rf'stopped: {signum.name}: saved a checkpoint at step '
                       r'(\d+); run the same command to resume', stopped[0])
  assert match, stopped
  step = int(match.group(1))
  # The signal came once step `after` was committed; the loop saved at the
  # step it was in (`after` itself if the signal arrived during that save),
  # mid-epoch.
  assert step >= after and step % STEPS_PER_EPOCH, (step, stage)
  assert stage.committed[-1] == step
  assert stage.meta['step'] == step
  assert resumed_from(resume.result) == [step]
  assert resume.result.returncode in (0, 128 + signal.SIGINT), resume.result.tail()
  assert stages[-1].result.returncode == 0, stages[-1].result.tail()
  assert [int(r['epoch']) for r in read_rows(lab.base / 'b')] == [1, 2, 3]


def test_signal_during_the_last_step_of_an_epoch_loses_no_epoch(lab):
  stopped, resumed = lab.result('signal21')
  assert stopped.returncode == 128 + signal.SIGTERM, stopped.tail()
  assert resumed.returncode == 0, resumed.tail()
  assert resumed_from(resumed) == [STEPS_PER_EPOCH]
  rows = read_rows(lab.base / 'signal21')
  assert [int(r['epoch']) for r in rows] == [1, 2, 3]
  assert without_seconds(rows) == without_seconds(read_rows(lab.base / 'a'))


def test_corrupt_checkpoints_are_moved_aside_and_the_previous_one_is_used(lab):
  result = lab.result('corrupt')
  workdir = lab.base / 'corrupt'
  assert result.returncode == 0, result.tail()
  # Reading a corrupt checkpoint sometimes makes orbax's background event
  # loop print an asyncio traceback of its own; none may come from the
  # library's code.
  assert not re.search(r'File "[^"]*allconv_jax', result.stderr)
  for step in (LAST_STEP, PREVIOUS):
    warnings = [l for l in result.stderr.splitlines()
                if f'latest/{step} is unreadable' in l]
    assert len(warnings) == 1 and warnings[0].startswith('W'), result.tail()
    assert (workdir / 'checkpoints' / 'corrupt' / f'latest-{step}').is_dir()
  # Not started over: resumed from the newest good checkpoint, and ended
  # exactly where the uninterrupted run did.
  assert resumed_from(result) == [BEFORE_PREVIOUS]
  assert [int(r['epoch']) for r in read_rows(workdir)] == [1, 2, 3]
  assert without_seconds(read_rows(workdir)) == without_seconds(
      read_rows(lab.base / 'a'))
  step, tree, _ = load_checkpoint(workdir)
  assert step == LAST_STEP
  assert_trees_equal(tree, load_checkpoint(lab.base / 'a')[1])
  assert committed_steps(workdir, 'best') == committed_steps(lab.base / 'a', 'best')


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(lab):
  result, checkpoints_before, rows_before = lab.result('nan_resume')
  workdir = lab.base / 'nan'
  assert result.returncode == 2, result.tail()
  assert 'Traceback' not in result.stderr
  errors = lines_starting(result.stderr, 'error:')
  assert len(errors) == 1 and errors[0].startswith('error: learning_rate: '), result.tail()
  assert errors == result.stderr.strip().splitlines()[-1:]
  bad = int(re.search(r'non-finite at step (\d+)', errors[0]).group(1))
  # Resumed at step 63; the first save after it (step 65) found the NaN.
  assert resumed_from(result) == [LAST_STEP]
  assert LAST_STEP < bad <= LAST_STEP + EVERY
  assert f'last good checkpoint (step {LAST_STEP}) is kept' in errors[0]
  assert snapshot(workdir / 'checkpoints') == checkpoints_before
  assert read_rows(workdir) == rows_before


def test_nan_loss_in_a_fresh_run_writes_no_checkpoint(lab):
  result = lab.result('nan_fresh')
  workdir = lab.base / 'nan_fresh'
  assert result.returncode == 2, result.tail()
  assert 'Traceback' not in result.stderr
  errors = lines_starting(result.stderr, 'error:')
  assert len(errors) == 1 and errors[0].startswith('error: learning_rate: '), result.tail()
  bad = int(re.search(r'non-finite at step (\d+)', errors[0]).group(1))
  assert 1 <= bad <= STEPS_PER_EPOCH
  assert committed_steps(workdir) == [] and committed_steps(workdir, 'best') == []
  assert read_rows(workdir) == []


def test_nan_message_does_not_claim_a_checkpoint_that_does_not_exist(lab):
  result = lab.result('nan_fresh')
  errors = lines_starting(result.stderr, 'error:')
  assert len(errors) == 1
  assert 'step None' not in errors[0]


def _error_field(line: str) -> str:
  """'error: width: ...' -> 'width'; 'error: --config.x=abc: ...' -> 'config.x'."""
  head = line[len('error: '):].split(': ', 1)[0]
  return head.lstrip('-').split('=', 1)[0]


@pytest.mark.parametrize('case_id,field,where',
                         [(c, f, w) for c, _, f, w in BAD_INPUTS],
                         ids=[c for c, *_ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(lab, case_id, field, where):
  run = lab.result(case_id)
  result = run['result']
  assert result.returncode == 2, result.tail()
  assert 'Traceback' not in result.stderr, result.tail()
  errors = lines_starting(result.stderr, 'error:')
  assert len(errors) == 1, result.tail()
  assert _error_field(errors[0]) == field, errors[0]
  # The error is the last thing printed; training never started.
  assert result.stderr.strip().splitlines()[-1] == errors[0], result.tail()
  assert 'Total Parameters' not in result.stdout
  assert not run['touched']
  if where == 'fresh':
    assert not run['workdir'].exists()


def test_stray_argument_is_one_line_exit_2(lab):
  result = lab.run('stray', [*ARGS, f'--workdir={lab.base / "stray"}', 'extra'])
  assert result.returncode == 2, result.tail()
  assert len(result.stderr.strip().splitlines()) == 1, result.tail()
  assert result.stderr.startswith('error: ')
  assert not (lab.base / 'stray').exists()
