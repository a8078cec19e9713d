"""Preemption soak: many interruptions in a row, and nothing lost (issue 30).

    python benchmarks/preemption_soak.py [--interruptions 20] [--seed 0]

Two kinds of run, each on a tiny All-CNN-C (width 0.125, digits 0-4, 6
epochs of 14 steps, a checkpoint every 2 steps):

* a population of 2 members (seeds 0 and 1), one process;
* a pair: two processes joined by JAX's distributed runtime on 127.0.0.1
  (2 forced CPU devices each), as tests/test_distributed.py starts them.

Each kind runs once uninterrupted (the reference), then again on another
workdir, interrupted at `--interruptions` random points and restarted with
the same command each time until it finishes: SIGTERM and SIGKILL
alternating (SIGTERM to one process of the pair, which the processes agree
on; SIGKILL to every process, a preempted job), every third one as soon as
a checkpoint write of the start has begun (its ``*.orbax-checkpoint-tmp``
directory exists), the others a random 0-0.5 s after the start has
committed a checkpoint at or past a random step of its share of the run.
Then every ``metrics.csv`` (the population's members' too, without the
``seconds`` column) and every checkpoint's arrays must be bit-identical to
the reference's. Prints one Markdown table; progress goes to stderr. All
processes share one XLA compilation cache, so restarts do not compile.
"""

import argparse
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

import common

EPOCHS, STEPS_PER_EPOCH, EVERY = 6, 14, 2
TOTAL = EPOCHS * STEPS_PER_EPOCH
ARGS = ['--config=configs/digits.py', '--config.width=0.125',
        '--config.dataset.classes=0,1,2,3,4', f'--config.num_epochs={EPOCHS}',
        f'--config.checkpoint_every_steps={EVERY}']
KINDS = {
    'population': ['--config.sweep.seeds=(0, 1)'],
    'pair': ['--config.distributed.stop_check_every_steps=1',
             '--config.distributed.heartbeat_timeout=20',
             '--config.distributed.initialization_timeout=120'],
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(kind: str, workdir: str, logs: str, name: str, env: dict) -> list:
  """The processes of one start of `kind` on `workdir`."""
  args = [*ARGS, *KINDS[kind], f'--workdir={workdir}']
  per_process = [[]]
  run_env = dict(env)
  if kind == 'pair':
    port = _free_port()
    per_process = [[f'--config.distributed.coordinator_address=127.0.0.1:{port}',
                    '--config.distributed.num_processes=2',
                    f'--config.distributed.process_id={i}'] for i in range(2)]
    run_env['XLA_FLAGS'] = (f"{env.get('XLA_FLAGS', '')} "
                            '--xla_force_host_platform_device_count=2').strip()
  procs = []
  for i, extra in enumerate(per_process):
    with open(os.path.join(logs, f'{name}.p{i}.err'), 'w') as err:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'allconv_jax.main', *args, *extra],
          cwd=common.REPO, stdout=subprocess.DEVNULL, stderr=err, env=run_env))
  return procs


def committed(workdir: str) -> list[int]:
  try:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints',
                                                          'latest')) if n.isdigit())
  except FileNotFoundError:
    return []


def writing(workdir: str) -> bool:
  """Whether a checkpoint write has begun and is not committed yet."""
  root = os.path.join(workdir, 'checkpoints')
  try:
    return any('orbax-checkpoint-tmp' in n for d in os.listdir(root)
               for n in os.listdir(os.path.join(root, d)))
  except FileNotFoundError:
    return False


def wait(procs, timeout=900) -> list[int]:
  deadline = time.monotonic() + timeout
  codes = []
  for p in procs:
    try:
      codes.append(p.wait(timeout=max(1, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
      p.kill()
      codes.append(p.wait())
  return codes


def soak(kind, workdir, logs, env, count, rng) -> dict:
  """Interrupts `kind` on `workdir` `count` times, then lets it finish."""
  done = dict(SIGTERM=0, SIGKILL=0, during_write=0, restarts=0, finished_early=0)
  for i in range(count + 1):
    procs = start(kind, workdir, logs, f'{kind}-{i}', env)
    if i == count:
      break
    signum = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
    during_write = i % 3 == 2
    # A step in the share of the run this interruption stands for; the
    # interruption comes once this start has committed a checkpoint of its
    # own at or past it (or, every third time, has begun writing one).
    target = rng.randint(i * TOTAL // (count + 1), (i + 1) * TOTAL // (count + 1))
    before = committed(workdir)[-1:]
    while all(p.poll() is None for p in procs):
      steps = committed(workdir)
      progressed = steps[-1:] != before
      if during_write and progressed and writing(workdir):
        break
      if not during_write and progressed and steps[-1] >= target:
        time.sleep(rng.uniform(0, 0.5))
        break
      time.sleep(0.002)
    if any(p.poll() is not None for p in procs):
      done['finished_early'] += 1
    elif signum == signal.SIGTERM:
      rng.choice(procs).send_signal(signum)
    else:
      for p in procs:
        p.kill()
    codes = wait(procs)
    done[signum.name] += 1
    done['during_write'] += during_write
    done['restarts'] += 1
    common.log(f'{kind} {i + 1}/{count}: {signum.name} at committed '
               f'{committed(workdir)[-1:]}, exit {codes}')
  codes = wait(procs)
  if codes != [0] * len(codes):
    raise SystemExit(f'{kind}: the last start ended {codes}; see {logs}')
  return done


def metrics(workdir: str) -> dict:
  out = {}
  for root, _, names in os.walk(workdir):
    if 'metrics.csv' in names:
      with open(os.path.join(root, 'metrics.csv')) as f:
        rows = [{k: v for k, v in r.items() if k != 'seconds'} for r in csv.DictReader(f)]
      out[os.path.relpath(root, workdir)] = rows
  return out


def arrays(workdir: str) -> dict:
  """Every committed checkpoint's arrays (by directory and path) and meta."""
  # pylint: disable=g-import-not-at-top
  import jax
  import orbax.checkpoint as ocp
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = {}
  for root, dirs, _ in os.walk(workdir):
    if os.path.basename(root) not in ('latest', 'best'):
      continue
    for step in (d for d in dirs if d.isdigit()):
      path = os.path.join(root, step, 'state')
      with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path).item_metadata.tree
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(
            m.shape, m.dtype, sharding=device), tree)
        restored = checkpointer.restore(path, target)
      key = os.path.relpath(os.path.join(root, step), workdir)
      for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        out[f'{key}:{jax.tree_util.keystr(leaf_path)}'] = np.asarray(leaf)
      with open(os.path.join(root, step, 'meta', 'metadata')) as f:
        meta = json.load(f)
      out[f'{key}:meta'] = _without_seconds(meta)
  return out


def _without_seconds(value):
  """`value` without the wall times of its rows: the rest must not differ."""
  if isinstance(value, dict):
    return {k: _without_seconds(v) for k, v in value.items() if k != 'seconds'}
  if isinstance(value, list):
    return [_without_seconds(v) for v in value]
  return value


def identical(a: dict, b: dict) -> list[str]:
  if sorted(a) != sorted(b):
    return [f'keys differ: {sorted(set(a) ^ set(b))[:5]}']
  return [k for k in a if (
      a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])
      if isinstance(a[k], np.ndarray) else a[k] != b[k])]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--interruptions', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--kinds', default='population,pair')
  args = parser.parse_args()
  print(common.machine(packages=('jax', 'jaxlib', 'flax', 'orbax-checkpoint')))
  rng = random.Random(args.seed)
  base = tempfile.mkdtemp(prefix='allconv-soak-')
  logs = os.path.join(base, 'logs')
  os.makedirs(logs)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(base, 'xla_cache'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  rows = []
  for kind in args.kinds.split(','):
    reference, soaked = os.path.join(base, f'{kind}-ref'), os.path.join(base, kind)
    started = time.monotonic()
    codes = wait(start(kind, reference, logs, f'{kind}-ref', env))
    if codes != [0] * len(codes):
      raise SystemExit(f'{kind}: the reference ended {codes}; see {logs}')
    reference_seconds = time.monotonic() - started
    started = time.monotonic()
    done = soak(kind, soaked, logs, env, args.interruptions, rng)
    seconds = time.monotonic() - started
    differ = identical(metrics(reference), metrics(soaked)) + identical(
        arrays(reference), arrays(soaked))
    rows.append([kind, done['SIGTERM'], done['SIGKILL'], done['during_write'],
                 done['finished_early'], done['restarts'],
                 f'{reference_seconds:.0f} s', f'{seconds:.0f} s',
                 'yes' if not differ else f'NO: {differ[:3]}'])
    common.log(f'{kind}: {rows[-1]}')
  print(common.table(['run', 'SIGTERM', 'SIGKILL', 'of them during a checkpoint write',
                      'ended before its interruption', 'restarts', 'uninterrupted',
                      'soak', 'metrics.csv and checkpoints bit-identical'], rows))
  print(f'\nworkdirs and logs: {base}')


if __name__ == '__main__':
  main()
