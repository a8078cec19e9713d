"""Data parallelism on 4 fake CPU devices (`--xla_force_host_platform_device_count`).

XLA reads the flag when JAX initializes, so every multi-device check runs in
a fresh subprocess: one Python script (`sharding_step.py`) that compares the
sharded train step with a 1-device mesh in the same process and probes the
dropout masks of each device, and the real binary for training, resuming and
bad input. The pytest process itself keeps its single CPU device.
"""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY, run_binary

DEVICES = 4
_DEVICE_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S*')


def _env(devices):
  """The environment of a subprocess that sees `devices` CPU devices."""
  flags = _DEVICE_FLAG.sub('', os.environ.get('XLA_FLAGS', '')).strip()
  if devices > 1:
    flags = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  return {'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu',
          'TF_CPP_MIN_LOG_LEVEL': '2'}


@pytest.fixture(scope='module')
def step_results():
  """Runs `sharding_step.py` on 4 fake devices; returns its JSON."""
  result = subprocess.run(
      [sys.executable, str(REPO / 'tests' / 'sharding_step.py')], cwd=REPO,
      capture_output=True,
      text=True, env=dict(os.environ, **_env(DEVICES)), timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


@pytest.mark.rounding
@pytest.mark.parametrize('case', ['plain', 'bn'])
def test_sharded_step_equals_one_device_step(step_results, case):
  """One step, compared before training can amplify rounding (issue 27).

  The two programs differ only in the order of float32 sums, and after one
  step nothing has amplified it: each gradient entry is a sum of at most
  8 x 32 x 32 = 8192 products, whose rounding in any order, on any CPU, is
  about sqrt(8192) x 2**-24 ~ 5e-6 of its scale in the usual case; 1e-5
  (1e-4 with batch norm, whose statistics and their gradients are two more
  such sums) leaves room for the worst orders, while a gradient summed instead
  of averaged, or per-device batch statistics, is off by O(1).
  """
  r = step_results[case]
  assert r['loss_n'] == pytest.approx(r['loss_1'], rel=1e-5, abs=1e-5)
  assert r['accuracy_n'] == r['accuracy_1']
  # The gradients (the momentum trace after one step) are not tiny, and agree
  # to float32 rounding; a ratio of norms of N would mean summed instead of
  # averaged, and batch norm with per-device statistics would differ by the
  # order of the gradient itself (each device's images have other statistics).
  # With batch norm, the statistics are sums over 2 x 32 x 32 values per device
  # (pmean'd) or 8 x 32 x 32 on one device, which XLA:CPU accumulates in
  # float32 in different orders: agreement to 1e-4 of the gradient's scale.
  tolerance = (1e-4 if case == 'bn' else 1e-5) * max(1.0, r['grad_scale'])
  assert r['grad_scale'] > 1e-2
  assert r['grad_diff'] <= tolerance, (
      f"sharded gradient differs from the 1-device one by {r['grad_diff']:.3g} "
      f"(its norm is x{r['grad_norm_ratio']:.4f} the 1-device norm): {r}")
  assert r['opt_state_diff'] <= tolerance, r
  assert r['params_moved'] > 1e-3
  assert r['params_diff'] <= 1e-5, r
  if case == 'bn':
    # The running statistics of every BN layer moved, towards those of the
    # global batch (per-device statistics differ a lot by construction).
    assert r['num_stats'] == 2 * 8  # mean and var of bn1..bn8.
    assert r['stats_moved'] > 1e-2
    assert r['stats_diff'] <= 1e-5 * max(1.0, r['stats_scale']), r
  else:
    assert r['num_stats'] == 0


def test_dropout_masks_differ_across_devices_and_are_reproducible(step_results):
  r = step_results['dropout']
  # The same image and parameters on every device: each pair of devices
  # drew a different dropout mask ...
  assert r['min_pair_diff'] > 1e-3, r['per_device_logits']
  # ... the same ones again from the same state and step ...
  assert r['rerun_logits_diff'] == 0.0
  assert r['rerun_params_diff'] == 0.0
  # ... and new ones on every device at the next step.
  assert r['next_step_min_diff'] > 1e-3


def _rows(workdir):
  with open(workdir / 'metrics.csv') as f:
    return list(csv.DictReader(f))


def test_train_on_4_devices_then_resume_on_1(tmp_path):
  workdir = tmp_path / 'wd'
  # All the training digits (no validation split): the accuracy bounds below
  # were set for the 21 steps of that epoch.
  args = (*TINY, f'--workdir={workdir}', '--config.dataset.validation_size=0')
  # Several steps per call on 4 devices: each gathers its slice of every
  # batch from the training split kept on the devices.
  first = run_binary(*args, '--config.num_epochs=1', '--config.steps_per_dispatch=8',
                     env=_env(DEVICES))
  assert first.returncode == 0, first.stderr[-3000:]
  assert f'{DEVICES} device(s)' in first.stderr
  first_rows = _rows(workdir)
  assert [int(r['epoch']) for r in first_rows] == [1]
  # Five classes: chance is 20%.
  assert float(first_rows[0]['test_accuracy']) > 0.45, first_rows
  assert os.listdir(workdir / 'checkpoints' / 'latest')

  second = run_binary(*args, '--config.num_epochs=2', env=_env(1))
  assert second.returncode == 0, second.stderr[-3000:]
  assert '1 device(s)' in second.stderr
  assert 'Resuming from step' in second.stderr
  rows = _rows(workdir)
  assert [int(r['epoch']) for r in rows] == [1, 2]
  assert rows[0] == first_rows[0]  # Kept from the 4-device run's checkpoint.
  assert int(rows[1]['step']) == 2 * int(rows[0]['step'])
  assert max(float(r['test_accuracy']) for r in rows) > 0.6, rows
  summary = json.loads(second.stdout.strip().splitlines()[-1])
  assert summary['epochs'] == 2


def test_batch_size_not_divisible_by_devices_is_a_one_line_error(tmp_path):
  workdir = tmp_path / 'fresh'
  result = run_binary(*TINY, f'--workdir={workdir}', '--config.batch_size=30',
                      env=_env(DEVICES))
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: batch_size: 30 is not divisible by the 4 '
                             'devices'), lines
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()
