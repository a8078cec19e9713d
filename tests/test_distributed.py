"""Several processes for real (issue 19): two processes of the binary on this
machine, joined by JAX's distributed runtime.

Each process sees 2 forced CPU devices, so a pair trains on 4 devices, with
the coordinator of process 0 on 127.0.0.1 at a free port and Gloo for the
collectives between processes (JAX's default on CPU). The network is the
tiny All-CNN-C of tests/test_robustness.py (width 0.125, digits 0-4, batch
32: 14 steps per epoch), 2 epochs, a checkpoint every 5 steps.

The module fixture `lab` starts all runs at once, in two lanes (each pair
is two processes at once; the machine has two cores):

* A, a pair, uninterrupted; then B, a pair on another workdir: its process 1
  alone gets SIGTERM (both must stop at one step); restarted, with a short
  heartbeat timeout, its process 1 is SIGKILLed (process 0 must end by
  itself with one line); restarted again, it must end bit for bit like A;
* R, one process with 4 devices (A's metrics must match it within float
  rounding); the bad inputs that need processes; and one process with 4
  devices resuming a copy of B's workdir at its SIGTERM checkpoint.

Every process of a pair runs through tests/distributed_worker.py, which
records the files it opens for writing. All share conftest.py's compilation
cache. 4-6.5 minutes of wall time on 2 cores busy with other work (5.5-7.5
CPU-minutes), over the 2 minutes wanted: 15 process start-ups and two cold
compilations (a pair, one process with 4 devices) are most of it.
"""

import json
import os
import re
import shutil
import signal
import socket
import time

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS, TINY, run_main
from robustness_lab import (Lab, assert_trees_equal, committed_steps,
                            lines_starting, load_checkpoint, read_rows,
                            resumed_from, without_seconds)

STEPS_PER_EPOCH = 14
EPOCHS = 2
LAST_STEP = EPOCHS * STEPS_PER_EPOCH
CHECK_EVERY = 3  # distributed.stop_check_every_steps
HEARTBEAT = 8  # distributed.heartbeat_timeout of the dead-peer run, seconds
ARGS = [*(a for a in TINY if not a.startswith('--config.width=')),
        '--config.width=0.125', f'--config.num_epochs={EPOCHS}',
        '--config.checkpoint_every_steps=5']
# Generous for the runs that must not fail: the two cores are shared.
PAIR_ARGS = [f'--config.distributed.stop_check_every_steps={CHECK_EVERY}',
             '--config.distributed.heartbeat_timeout=60',
             '--config.distributed.initialization_timeout=120']
WORKER = os.path.join(os.path.dirname(__file__), 'distributed_worker.py')
# The CSV, TensorBoard and plots: process 0's alone.
REPORTS = re.compile(r'^(metrics\.csv|events\.out\.tfevents\..*|curves\.png|'
                     r'confusion\..*|summary\.json|config\.json|preprocess\.npz)')
# Losses of a pair and of one process with 4 devices differ by the order of
# the cross-device sums (Gloo's against XLA's in-process all-reduce): float32
# rounding, grown over 28 Adam steps. Accuracies may differ by a few images
# whose top two classes are that close.
LOSS_RTOL = 1e-3
ACCURACY_ATOL = 3 / 200  # three images of the 200 validation digits


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  # XLA's default optimization level, not the rest of the suite's 0: at level
  # 0 a pair and one process with 4 devices drifted apart ten times faster
  # (validation loss 0.6% apart after an epoch, against < 0.1%).
  flags = os.environ.get('XLA_FLAGS', '').replace(TEST_XLA_FLAGS, '')
  return {'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={devices}'.strip()}


def start_pair(lab, name, workdir, extra=(), per_process=((), ())):
  """Starts processes 0 and 1 of a run on `workdir`; returns their `Proc`s."""
  port = _free_port()
  procs = []
  for i in range(2):
    args = [*ARGS, *extra, f'--workdir={workdir}',
            f'--config.distributed.coordinator_address=127.0.0.1:{port}',
            '--config.distributed.num_processes=2',
            f'--config.distributed.process_id={i}', *per_process[i]]
    procs.append(lab.start(f'{name}.p{i}', args, script=WORKER,
                           env={**_env(2), 'WRITES_LOG': str(lab.logs / f'{name}.p{i}.writes')}))
  return procs


def wait_until(procs, workdir, ready, timeout=300) -> list[int]:
  """Polls the committed checkpoints until `ready(steps)`; returns them."""
  deadline = time.monotonic() + timeout
  while True:
    steps = committed_steps(workdir)
    if ready(steps):
      return steps
    ended = [p for p in procs if p.popen.poll() is not None]
    if ended or time.monotonic() > deadline:
      raise AssertionError(f'not ready ({steps}); ended: '
                           f'{[p.wait().tail() for p in ended]}')
    time.sleep(0.01)


def load_state(workdir, step=None):
  """(step, state tree) of a committed checkpoint, onto this process's device.

  Saved by processes with 4 devices, so orbax needs to be told where the
  arrays go here.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = committed_steps(workdir)[-1] if step is None else step
  path = workdir / 'checkpoints' / 'latest' / str(step) / 'state'
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.metadata(path).item_metadata.tree
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return step, checkpointer.restore(path, target)


def writes(lab, name) -> set:
  path = lab.logs / f'{name}.writes'
  return set(path.read_text().split()) if path.exists() else set()


# ----------------------------------------------------------------- the runs


def pair_run(lab, name):
  procs = start_pair(lab, name, lab.base / name, PAIR_ARGS)
  return [p.wait() for p in procs]


def single_run(lab, name, workdir, extra=()):
  return lab.run(name, [*ARGS, *extra, f'--workdir={workdir}'], env=_env(4))


def preempted_pair(lab, workdir):
  """B, part 1: SIGTERM to process 1 only, once a checkpoint is committed."""
  procs = start_pair(lab, 'b1', workdir, PAIR_ARGS)
  signalled = wait_until(procs, workdir, lambda s: bool(s))
  procs[1].popen.send_signal(signal.SIGTERM)
  results = [p.wait() for p in procs]
  shutil.copytree(workdir, lab.base / 'single')  # For `single_resume`.
  return signalled, results, committed_steps(workdir)


def dead_peer_and_restart(lab, workdir):
  """B, part 2: restarted with a short heartbeat timeout; process 1 SIGKILLed
  after the first epoch's checkpoint, process 0 left to end by itself; then
  both restarted to the end."""
  procs = start_pair(lab, 'b2', workdir, [
      *PAIR_ARGS, f'--config.distributed.heartbeat_timeout={HEARTBEAT}'])
  wait_until(procs, workdir, lambda s: bool(s) and s[-1] > STEPS_PER_EPOCH)
  procs[1].popen.kill()
  killed_at = time.monotonic()
  alone = procs[0].wait()
  seconds = time.monotonic() - killed_at
  killed = procs[1].wait()
  at_restart = committed_steps(workdir)
  final = [p.wait() for p in start_pair(lab, 'b3', workdir, PAIR_ARGS)]
  return killed, alone, seconds, at_restart, final


def single_resume(lab):
  """One process with 4 devices resumes the checkpoint the pair stopped at."""
  lab.result('b1')
  return single_run(lab, 'single', lab.base / 'single')


def bad_pair(lab, name, per_process, extra=()):
  workdir = lab.base / name
  procs = start_pair(lab, name, workdir, [
      *PAIR_ARGS, '--config.distributed.initialization_timeout=30', *extra],
      per_process)
  return [p.wait() for p in procs], workdir


def bad_single(lab, name, extra):
  workdir = lab.base / name
  result = lab.run(name, [*ARGS, *extra, f'--workdir={workdir}'], env=_env(2))
  return [result], workdir


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
  """Starts every run of this module; the tests wait for the ones they need."""
  lab = Lab(tmp_path_factory.mktemp('distributed'))
  # conftest.py's cache, not a module cache of the lab's own.
  lab.cache_env = {k: os.environ[k] for k in lab.cache_env if k in os.environ}
  job = lambda name, fn, *args: (name, fn, args)
  unreachable = f'127.0.0.1:{_free_port()}'
  lanes = [
      [job('a', pair_run, 'a'),
       job('b1', preempted_pair, lab.base / 'b'),
       job('b2', dead_peer_and_restart, lab.base / 'b')],
      [job('r', single_run, 'r', lab.base / 'r'),
       job('bad-unreachable', bad_single, 'bad-unreachable', [
           f'--config.distributed.coordinator_address={unreachable}',
           '--config.distributed.num_processes=2',
           '--config.distributed.process_id=1',
           '--config.distributed.initialization_timeout=3']),
       job('bad-batch', bad_pair, 'bad-batch', ((), ()), ['--config.batch_size=30']),
       job('bad-num-processes', bad_pair, 'bad-num-processes',
           ((), ('--config.distributed.num_processes=3',))),
       job('single', single_resume)],
  ]
  with lab.running(lanes):
    yield lab


# ----------------------------------------------------------------- tests


def _assert_close(rows, reference):
  assert [r['step'] for r in rows] == [r['step'] for r in reference]
  for row, ref in zip(rows, reference):
    for key in row:
      if key == 'seconds':
        continue
      a, b = float(row[key]), float(ref[key])
      if key.endswith('accuracy'):
        assert abs(a - b) <= ACCURACY_ATOL, (key, row, ref)
      else:
        assert np.isclose(a, b, rtol=LOSS_RTOL, atol=0), (key, row, ref)


def test_pair_trains_like_one_process_with_four_devices(lab):
  pair, single = lab.result('a'), lab.result('r')
  for result in (*pair, single):
    assert result.returncode == 0, result.tail()
    assert 'Traceback' not in result.stderr
  assert '4 device(s)' in pair[0].stderr and '4 device(s)' in single.stderr
  # Both processes return the same summary.
  summaries = [json.loads(r.stdout.strip().splitlines()[-1]) for r in pair]
  assert summaries[0] == summaries[1] and summaries[0]['steps'] == LAST_STEP
  rows, reference = read_rows(lab.base / 'a'), read_rows(lab.base / 'r')
  assert [int(r['epoch']) for r in rows] == [1, 2]
  _assert_close(rows, reference)
  assert float(rows[-1]['test_accuracy']) > 0.3  # It learns (chance: 20%).


def test_only_process_0_writes_the_reports(lab):
  lab.result('a')
  first, second = writes(lab, 'a.p0'), writes(lab, 'a.p1')
  for name in ('metrics.csv', 'curves.png', 'summary.json', 'confusion.csv'):
    assert any(w.startswith(name) for w in first), (name, sorted(first))
  assert any(w.startswith('events.out.tfevents.') for w in first), sorted(first)
  assert not [w for w in second if REPORTS.match(w)], sorted(second)
  assert not [w for w in second if not w.startswith('checkpoints')], sorted(second)


def test_sigterm_to_one_process_stops_both_at_the_same_step(lab):
  signalled, results, committed = lab.result('b1')
  steps = []
  for result in results:
    assert result.returncode == 128 + signal.SIGTERM, result.tail()
    assert 'Traceback' not in result.stderr
    stopped = lines_starting(result.stderr, 'stopped:')
    assert len(stopped) == 1, result.tail()
    steps.append(int(re.fullmatch(
        r'stopped: SIGTERM: saved a checkpoint at step (\d+); run the same '
        r'command to resume', stopped[0]).group(1)))
  # One step for both, agreed within CHECK_EVERY steps of the signal (plus
  # the step under way), and one checkpoint of it.
  assert steps[0] == steps[1], steps
  assert signalled[-1] <= steps[0] <= signalled[-1] + CHECK_EVERY + 1, (signalled, steps)
  assert committed[-1] == steps[0]
  assert load_checkpoint(lab.base / 'single', with_state=False)[2]['step'] == steps[0]


def test_one_process_resumes_the_checkpoint_of_the_pair(lab):
  _, results, committed = lab.result('b1')
  result = lab.result('single')
  assert result.returncode == 0, result.tail()
  assert resumed_from(result) == [committed[-1]]
  assert '4 device(s)' in result.stderr
  rows = read_rows(lab.base / 'single')
  assert [int(r['epoch']) for r in rows] == [1, 2]
  _assert_close(rows, read_rows(lab.base / 'r'))


def test_a_dead_peer_ends_the_other_process_with_one_line_in_bounded_time(lab):
  killed, alone, seconds, _, _ = lab.result('b2')
  assert killed.returncode == -signal.SIGKILL, killed.tail()
  assert alone.returncode == 1, alone.tail()
  assert 'Traceback' not in alone.stderr and 'Fatal' not in alone.stderr, alone.tail()
  errors = lines_starting(alone.stderr, 'error:')
  assert errors == alone.stderr.strip().splitlines()[-1:], alone.tail()
  assert errors[0].startswith(
      f'error: distributed: process 1 sent no heartbeat for {HEARTBEAT} s'), errors
  # The watchdog looks every second; a few more for the loaded machine.
  assert seconds < HEARTBEAT + 5, seconds


def test_killed_and_restarted_pair_ends_bit_for_bit_like_an_uninterrupted_one(lab):
  # B was stopped by SIGTERM, and later by a SIGKILL of process 1 with
  # process 0 ending at once (os._exit, nothing cleaned up), at any point of
  # its loop, a save included.
  _, _, _, at_restart, final = lab.result('b2')
  for result in final:
    assert result.returncode == 0, result.tail()
    assert resumed_from(result) == [at_restart[-1]]
  assert at_restart[-1] > STEPS_PER_EPOCH
  workdir = lab.base / 'b'
  assert without_seconds(read_rows(workdir)) == without_seconds(read_rows(lab.base / 'a'))
  step_a, tree_a = load_state(lab.base / 'a')
  step_b, tree_b = load_state(workdir)
  assert step_a == step_b == LAST_STEP
  assert_trees_equal(tree_a, tree_b)


@pytest.mark.parametrize('extra,field', [
    (['--config.distributed.num_processes=2',
      '--config.distributed.process_id=2'], 'distributed.process_id'),
    (['--config.distributed.process_id=1'], 'distributed.process_id'),
    (['--config.distributed.heartbeat_timeout=0'], 'distributed.heartbeat_timeout'),
], ids=['process-id-out-of-range', 'process-id-alone', 'heartbeat-0'])
def test_inconsistent_distributed_fields_are_one_line_before_jax_starts(
    capsys, tmp_path, extra, field):
  # Checked before `jax.distributed.initialize`, so in this process.
  workdir = tmp_path / 'wd'
  code, err = run_main(capsys, *ARGS, f'--workdir={workdir}',
                       '--config.distributed.coordinator_address=127.0.0.1:1',
                       *extra)
  assert code == 2, err
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith(f'error: {field}: '), err
  assert not workdir.exists()


@pytest.mark.parametrize('name,field', [
    ('bad-unreachable', 'distributed.coordinator_address'),
    ('bad-batch', 'batch_size'),
    ('bad-num-processes', 'distributed.num_processes'),
])
def test_bad_distributed_input_is_one_line_exit_2_and_writes_nothing(lab, name, field):
  results, workdir = lab.result(name)
  for result in results:
    assert result.returncode == 2, result.tail()
    assert 'Traceback' not in result.stderr, result.tail()
    errors = lines_starting(result.stderr, 'error:')
    assert errors == result.stderr.strip().splitlines()[-1:], result.tail()
  # Each process names the field, or (the one whose settings were right) the
  # process that failed.
  first = lines_starting(results[-1].stderr, 'error:')[0]
  assert first.startswith(f'error: {field}: '), first
  assert not workdir.exists()
  if name == 'bad-unreachable':
    assert results[0].seconds < 3 + 30, results[0].seconds
