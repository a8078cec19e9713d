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
  rounding, measured against the same run on 2 and on 1 device: see
  tests/rounding.py); the bad inputs that need processes; and one process with 4
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
from rounding import assert_within, max_relative_gap
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
# A pair and one process with 4 devices sum across devices in another order
# (Gloo's against XLA's in-process all-reduce): float32 rounding, which 28
# steps of this tiny network with batch norm amplify by an amount that depends
# on the CPU and varies a lot from one ordering to another (measured here:
# 2e-5 to 1e-2 of the validation loss between 4, 2 and 1 devices; issue 27's
# AVX-512 machine: 1.1e-3). So the bound is measured: one process with 2
# devices (the same sums in yet another order) against the one with 4 gives
# the noise floor, and so does one with 1 device: the larger of the two, as
# a single ordering may by chance be much closer than others (tests/rounding.py).
# The bound is loose, and means "trains
# like", not "computes the same": that the sharded step computes the same to
# float32 rounding is test_sharding.py's one-step comparison, and that the
# pair's state is exact, the bit-for-bit resume below.
TWINS = {'r2': 2, 'r1': 1}  # Their device counts.
# A hundred float32 ulps: the bound if the floor happens to be 0.
LOSS_MINIMUM = 100 * float(np.finfo(np.float32).eps)
# Accuracy is a step function of the logits: whether any image sits within
# the noise of a tie between its top two classes is chance, so a floor of 0
# flipped images says little. Three of the 200 validation digits at least.
VALIDATION_IMAGES = 200
MIN_FLIPS = 3


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


def single_run(lab, name, workdir, extra=(), devices=4):
  return lab.run(name, [*ARGS, *extra, f'--workdir={workdir}'], env=_env(devices))


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
       *(job(name, single_run, name, lab.base / name, (), devices)
         for name, devices in TWINS.items()),
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


def _assert_close(rows, lab):
  """`rows` match one process with 4 devices (R) within the rounding noise
  between R and the same run on 2 and on 1 device, measured on this machine:
  every column but the accuracies relative, accuracies in flipped images."""
  for name in ('r', *TWINS):
    assert lab.result(name).returncode == 0, lab.result(name).tail()
  reference = read_rows(lab.base / 'r')
  twins = [read_rows(lab.base / name) for name in TWINS]
  for other in (rows, *twins):
    assert [r['step'] for r in other] == [r['step'] for r in reference]
  accuracies = [k for k in reference[0] if k.endswith('accuracy')]
  others = [k for k in reference[0] if k != 'seconds' and k not in accuracies]
  gap = lambda a: max(max_relative_gap(x, r, others) for x, r in zip(a, reference))
  flips = lambda a: max(round(VALIDATION_IMAGES * abs(float(x[k]) - float(r[k])))
                        for x, r in zip(a, reference) for k in accuracies)
  assert_within(gap(rows), max(map(gap, twins)), 'losses, relative', LOSS_MINIMUM)
  assert_within(flips(rows), max(map(flips, twins)), 'accuracies, images', MIN_FLIPS)


@pytest.mark.rounding
def test_pair_trains_like_one_process_with_four_devices(lab):
  pair, single = lab.result('a'), lab.result('r')
  for result in (*pair, single):
    assert result.returncode == 0, result.tail()
    assert 'Traceback' not in result.stderr
  assert '4 device(s)' in pair[0].stderr and '4 device(s)' in single.stderr
  # Both processes return the same summary.
  summaries = [json.loads(r.stdout.strip().splitlines()[-1]) for r in pair]
  assert summaries[0] == summaries[1] and summaries[0]['steps'] == LAST_STEP
  rows = read_rows(lab.base / 'a')
  assert [int(r['epoch']) for r in rows] == [1, 2]
  _assert_close(rows, lab)
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


@pytest.mark.rounding
def test_one_process_resumes_the_checkpoint_of_the_pair(lab):
  _, results, committed = lab.result('b1')
  result = lab.result('single')
  assert result.returncode == 0, result.tail()
  assert resumed_from(result) == [committed[-1]]
  assert '4 device(s)' in result.stderr
  rows = read_rows(lab.base / 'single')
  assert [int(r['epoch']) for r in rows] == [1, 2]
  _assert_close(rows, lab)


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
