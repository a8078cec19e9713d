"""Process harness and shared helpers for tests/test_robustness.py.

Not a test module (pytest collects only ``test_*.py``): it starts the real
binary as subprocesses with their output in files, runs them in lanes on
threads (`Lab`), and reads what they leave behind (checkpoints, metrics.csv,
stderr lines). It knows nothing about which runs a test module starts, except
that it also holds the table of bad inputs: pure data, kept here so that
test_robustness.py stays short.
"""

import concurrent.futures
import contextlib
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np

from conftest import REPO

TIMEOUT = 600  # seconds, per process


# ----------------------------------------------------------------- processes


@dataclasses.dataclass
class Result:
  """How a finished process ended: exit code, its output and its wall time."""

  returncode: int
  stdout: str
  stderr: str
  seconds: float

  def tail(self) -> str:
    return f'exit {self.returncode}\n{self.stderr[-3000:]}'


class Proc:
  """A binary run with its output in files (a full pipe would block it)."""

  def __init__(self, lab, name, cmd, env):
    self.out_path = lab.logs / f'{name}.out'
    self.err_path = lab.logs / f'{name}.err'
    self.started = time.monotonic()
    with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
      self.popen = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=err,
                                    env=env, text=True)
    lab.procs.append(self.popen)

  def wait(self) -> Result:
    try:
      code = self.popen.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      self.popen.kill()
      self.popen.wait()
      raise
    return Result(code, self.out_path.read_text(), self.err_path.read_text(),
                  round(time.monotonic() - self.started, 1))

  def signal_when(self, workdir, ready, signum) -> list[int]:
    """Sends `signum` once `ready(committed steps)`; returns those steps."""
    deadline = time.monotonic() + TIMEOUT
    while True:
      steps = committed_steps(workdir)
      if ready(steps):
        self.popen.send_signal(signum)
        return steps
      if self.popen.poll() is not None:
        raise AssertionError(
            f'the run ended before the signal {signum} (committed steps '
            f'{steps}):\n{self.wait().tail()}')
      if time.monotonic() > deadline:
        self.popen.kill()
        raise AssertionError(f'no checkpoint for the signal {signum}: {steps}')
      time.sleep(0.01)


class Lab:
  """The runs of a test module: where they live, how they start, their results."""

  def __init__(self, base):
    self.base = base
    self.logs = base / 'logs'
    self.logs.mkdir()
    self.cache_env = {
        'JAX_COMPILATION_CACHE_DIR': str(base / 'jax_cache'),
        'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
        'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
    }
    self.procs = []
    self.futures = {}
    self.closing = False

  def start(self, name, args, cache=True, env=None, script=None) -> Proc:
    if self.closing:
      raise RuntimeError('the module is tearing down')
    full_env = dict(os.environ)
    for var in self.cache_env:
      full_env.pop(var, None)
    if cache:
      full_env.update(self.cache_env)
    full_env.update(env or {})
    python = [sys.executable, script] if script else [
        sys.executable, '-m', 'allconv_jax.main']
    return Proc(self, name, [*python, *args], full_env)

  def run(self, name, args, **kwargs) -> Result:
    return self.start(name, args, **kwargs).wait()

  def result(self, name):
    return self.futures[name].result(timeout=4 * TIMEOUT)

  def lane(self, jobs):
    """Runs `jobs` [(name, fn, args)] one after the other."""
    for name, fn, args in jobs:
      future = self.futures[name]
      if self.closing or not future.set_running_or_notify_cancel():
        continue
      try:
        future.set_result(fn(self, *args))
      except BaseException as e:  # pylint: disable=broad-except
        future.set_exception(e)

  @contextlib.contextmanager
  def running(self, lanes):
    """Runs each lane (a list of jobs, see `lane`) on a thread of its own,
    all at once, until the block ends; then stops whatever still runs."""
    for name, _, _ in sum(lanes, []):
      self.futures[name] = concurrent.futures.Future()
    threads = [threading.Thread(target=self.lane, args=(jobs,), daemon=True)
               for jobs in lanes]
    for thread in threads:
      thread.start()
    try:
      yield self
    finally:
      self.stop()
      for thread in threads:
        thread.join(timeout=60)

  def stop(self):
    self.closing = True
    for future in self.futures.values():
      future.cancel()
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------- what runs leave


def committed_steps(workdir, kind='latest') -> list[int]:
  """Steps with a committed checkpoint; orbax writes to a tmp dir and renames."""
  try:
    names = os.listdir(workdir / 'checkpoints' / kind)
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def resumed_from(result: Result) -> list[int]:
  return [int(s) for s in re.findall(r'Resuming from step (\d+) ', result.stderr)]


def lines_starting(text: str, prefix: str) -> list[str]:
  return [l for l in text.splitlines() if l.startswith(prefix)]


def read_rows(workdir) -> list[dict]:
  with open(workdir / 'metrics.csv') as f:
    return list(csv.DictReader(f))


def only(rows, *columns):
  return [{k: r[k] for k in columns} for r in rows]


def without_seconds(rows):
  return [{k: v for k, v in r.items() if k != 'seconds'} for r in rows]


TEST_COLUMNS = ('epoch', 'step', 'learning_rate', 'test_loss', 'test_accuracy')


def load_checkpoint(workdir, kind='latest', step=None, with_state=True):
  """(step, state tree as saved, meta) of a committed checkpoint; no template."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = committed_steps(workdir, kind)[-1] if step is None else step
  path = workdir / 'checkpoints' / kind / str(step)
  with open(path / 'meta' / 'metadata') as f:
    meta = json.load(f)
  if not with_state:
    return step, None, meta
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(path / 'state')
  return step, tree, meta


def assert_trees_equal(a, b):
  import jax  # pylint: disable=g-import-not-at-top
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v)
                    for k, v in jax.tree_util.tree_leaves_with_path(t)}
  flat_a, flat_b = flat(a), flat(b)
  assert sorted(flat_a) == sorted(flat_b)
  assert len(flat_a) > 50  # params, batch stats, Adam moments, metrics
  differ = [k for k in flat_a if flat_a[k].dtype != flat_b[k].dtype
            or not np.array_equal(flat_a[k], flat_b[k])]
  assert not differ, f'{len(differ)} arrays differ, e.g. {differ[:5]}'


# ----------------------------------------------------------------- bad inputs


# Bad inputs: (id, extra args, field named by the error, workdir).
# workdir 'fresh': a path that does not exist and must not be created;
# 'trained': a copy of run A, which must be left exactly as it was.
# {case} is a directory of the case's own, {shared} one shared by all cases.
CIFAR = ['--config.dataset.name=cifar10', '--config.dataset.data_dir={case}/tfds']
BAD_INPUTS = [
    # Config values.
    ('unknown-model', ['--config.model=all_cnn_d'], 'model', 'fresh'),
    ('unknown-dataset', ['--config.dataset.name=mnist'], 'dataset.name', 'fresh'),
    ('unknown-optimizer', ['--config.optimizer=adagrad'], 'optimizer', 'fresh'),
    ('unknown-schedule', ['--config.lr_schedule=cosine'], 'lr_schedule', 'fresh'),
    ('unknown-dtype', ['--config.dtype=float16'], 'dtype', 'fresh'),
    ('unknown-conv-impl', ['--config.conv_impl=winograd'], 'conv_impl', 'fresh'),
    ('unknown-init', ['--config.init=xavier'], 'init', 'fresh'),
    ('batch-size-0', ['--config.batch_size=0'], 'batch_size', 'fresh'),
    ('negative-lr', ['--config.learning_rate=-0.1'], 'learning_rate', 'trained'),
    ('momentum-1', ['--config.momentum=1.0'], 'momentum', 'fresh'),
    ('unsorted-boundaries', ['--config.lr_boundaries=(3, 2)'], 'lr_boundaries',
     'fresh'),
    ('translate-0.5', ['--config.augment.translate=0.5'], 'augment.translate',
     'fresh'),
    ('unknown-class', ['--config.dataset.classes=0,eleven'], 'dataset.classes',
     'trained'),
    ('coarse-cifar10', ['--config.dataset.name=cifar10',
                        '--config.dataset.label=coarse'], 'dataset.label', 'fresh'),
    ('num-classes-mismatch', ['--config.num_classes=7'], 'num_classes', 'fresh'),
    # Data.
    ('missing-archive', [*CIFAR, '--config.dataset.archive={case}/missing.tar.gz'],
     'dataset.archive', 'fresh'),
    ('corrupt-archive',
     [*CIFAR, '--config.dataset.archive={shared}/cifar-10-binary.tar.gz'],
     'dataset.archive', 'fresh'),
    ('eval-without-checkpoint', ['--mode=eval'], 'workdir', 'fresh'),
    # Checkpoints of another network or optimizer.
    ('other-model', ['--config.model=model_a'], 'model', 'trained'),
    ('other-width', ['--config.width=0.25'], 'width', 'trained'),
    ('other-batch-norm', ['--config.batch_norm=False'], 'batch_norm', 'trained'),
    # Command line.
    ('unknown-field', ['--config.foo=1'], 'config.foo', 'trained'),
    ('non-int', ['--config.batch_size=abc'], 'config.batch_size', 'fresh'),
    ('non-float', ['--config.learning_rate=fast'], 'config.learning_rate', 'fresh'),
    ('missing-config-file', ['--config=configs/no_such_config.py'], 'config',
     'fresh'),
    ('unknown-mode', ['--mode=serve'], 'mode', 'fresh'),
]
