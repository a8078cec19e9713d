"""Shared helpers: running the real binary, in a subprocess or in-process."""

import atexit
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import pytest
from absl import flags

# One persistent XLA compilation cache for this test session, inherited by
# every subprocess: the binary is run many times with the same small config,
# and compiling the same train step again would be most of the suite's time.
# A fresh directory per session, so nothing carries over between runs, removed
# when the session (its first process: pytest-xdist workers inherit it) ends.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
      prefix='allconv-test-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'],
                  ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

# The tests compile many programs and run each on a few tiny batches: LLVM's
# optimizations are most of a compile here (an All-CNN-C train step compiles
# in ~4 s instead of ~20 s) and buy nothing at these sizes. Inherited by the
# subprocesses; the benchmarks, which time, never set it.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# First, so that the library's XLA flags apply to the in-process tests too.
import allconv_jax  # pylint: disable=unused-import,g-import-not-at-top

from allconv_jax import config  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
  """A config of the repository's configs/, e.g. ``'digits.py'``, loaded by path."""
  return config.load(str(REPO / 'configs' / name))

# Small and quick, but the real network: All-CNN-C at a quarter width, on
# five of the ten digits (chance is 20%).
TINY = ['--config=configs/digits.py', '--config.width=0.25',
        '--config.dataset.classes=0,1,2,3,4']


def run_binary(*args, env=None, timeout=600, python=None):
  """Runs `python -m allconv_jax.main ARGS` (or `python`) from the repo root."""
  full_env = dict(os.environ, **(env or {}))
  python = python or [sys.executable, '-m', 'allconv_jax.main']
  return subprocess.run([*python, *args],
                        cwd=REPO, capture_output=True, text=True,
                        env=full_env, timeout=timeout)


def run_main(capsys, *args, stdout=None):
  """Runs the binary's `main` in this process; returns (exit code, stderr).

  With a list as `stdout`, what the run printed there is appended to it.

  Same flag parsing, config loading and error handling as the binary, without
  paying for a new Python and JAX start-up per case.
  """
  from allconv_jax import main  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  # Each parse defines one flag per --config.<field> override; drop the last
  # call's so they can be defined again.
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)
  cwd, argv = os.getcwd(), sys.argv
  os.chdir(REPO)
  # ml_collections reads the --config.<field> overrides from sys.argv.
  sys.argv = ['allconv', *args]
  try:
    try:
      main.main(main.parse_flags(sys.argv))
      code = 0
    except SystemExit as e:
      code = e.code
  finally:
    os.chdir(cwd)
    sys.argv = argv
    flags.FLAGS.unparse_flags()
  captured = capsys.readouterr()
  if stdout is not None:
    stdout.append(captured.out)
  return code, captured.err


def snapshot(directory):
  """Every file below `directory` with its size and modification time."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      st = os.stat(path)
      out[os.path.relpath(path, directory)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope='session')
def repo():
  return REPO


class TinyRun:
  """`TINY` trained for two epochs by the binary: its workdir and output."""

  def __init__(self, base: pathlib.Path):
    self.workdir = base / 'wd'
    self.stdout = (base / 'stdout').read_text()
    self.stderr = (base / 'stderr').read_text()

  def copy(self, directory: pathlib.Path) -> pathlib.Path:
    """A copy of the workdir, for a test that writes into one."""
    return pathlib.Path(shutil.copytree(self.workdir, directory / 'wd'))


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, worker_id) -> TinyRun:
  """One `TinyRun` for the whole suite, read-only: the first of the xdist
  workers to ask trains it, in their shared directory, while the other waits.

  Python lists on stderr every module the run imports (-X importtime).
  """
  root = tmp_path_factory.getbasetemp()
  if worker_id != 'master':  # The workers' directories share a parent.
    root = root.parent
  base = root / 'tiny_run'
  with open(root / 'tiny_run.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (base / 'stderr').exists():
      shutil.rmtree(base, ignore_errors=True)  # A failed attempt's.
      result = run_binary(*TINY, f'--workdir={base / "wd"}', '--config.num_epochs=2',
                          env={'PYTHONPROFILEIMPORTTIME': '1'})
      assert result.returncode == 0, result.stderr[-3000:]
      (base / 'stdout').write_text(result.stdout)
      (base / 'stderr').write_text(result.stderr)
  return TinyRun(base)


# The modules that run longest (most of them start processes of their own)
# go first: `make test` hands each of its two workers a file at a time, and a
# long module picked up last would run alone while the other worker idles.
_LONGEST_FIRST = ('test_distributed.py', 'test_robustness.py', 'test_population.py',
                  'test_train.py', 'test_transfer.py', 'test_experiments.py',
                  'test_disk_faults.py', 'test_conv.py', 'test_lsuv.py',
                  'test_notebook.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'rounding: compares two programs that round differently, '
      'within a noise floor measured in the test (tests/rounding.py); '
      '`make test-isa` runs them with the instruction set capped')
