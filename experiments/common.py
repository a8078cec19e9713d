"""What every study script of `experiments/` shares.

The flags common to all studies (output folder, machine label, a lock file to
wait for), the description of the machine and the date, the parameter count
of a network, mean ± std over seeds, one-epoch-per-point curves, and the
layout of ``results.md``. A study runs as ``python experiments/<study>.py``
(from anywhere: Python puts the script's folder on its path) with the
package installed (``pip install -e .``).
"""

import datetime
import json
import math
import os
import shlex
import shutil
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import matplotlib
import numpy as np
from absl import flags, logging

matplotlib.use('Agg')  # Headless.
import matplotlib.pyplot as plt
from matplotlib import ticker

from allconv_jax import (config as config_lib, files, models, population,
                         reporting, stopping, train)
from allconv_jax.errors import UserError
# pylint: enable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The benchmarks' description of the machine, loaded by path: neither folder
# is a package.
bench = config_lib.load_module(os.path.join(ROOT, 'benchmarks', 'common.py'))

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Output directory for results.md, the PNGs '
                    'and results.json (default: experiments/results/'
                    '<study>_<dataset>).')
flags.DEFINE_string('machine', None, 'Machine description for results.md '
                    '(default: the CPU model from lscpu, the core count and '
                    'the JAX backend).')
flags.DEFINE_string('lock_file', None, 'Before each training run, wait while '
                    'this file exists (on a machine shared with timing '
                    'benchmarks that hold a lock).')


def results_dir(default_name: str) -> str:
  """--out, or experiments/results/<default_name>; created."""
  out = FLAGS.out or os.path.join(ROOT, 'experiments', 'results', default_name)
  os.makedirs(out, exist_ok=True)
  return out


def wait_for_lock() -> None:
  """Blocks while --lock_file exists, so timings of others stay clean."""
  if not FLAGS.lock_file:
    return
  announced = False
  while os.path.exists(FLAGS.lock_file):
    if not announced:
      logging.info('waiting while %s exists', FLAGS.lock_file)
      announced = True
    time.sleep(15)


def machine() -> str:
  """--machine, or the CPU model, core count, JAX backend and load.

  The load average tells whether other jobs shared the cores, which the
  seconds per epoch depend on (a study alone on the machine adds 1-2).
  """
  if FLAGS.machine:
    return FLAGS.machine
  return (f'{bench.cpu_model()}, {bench.cores()} cores, {jax.device_count()} '
          f'{jax.default_backend()} device(s); 1-min load average '
          f'{os.getloadavg()[0]:.1f} when the results were written')


def command(script: str) -> str:
  """The command line that ran this script, to paste into results.md."""
  return shlex.join(['python', f'experiments/{script}', *sys.argv[1:]])


def today() -> str:
  """The date and time in UTC, to the minute."""
  return datetime.datetime.now(datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M UTC')


def config_module(name: str):
  """``configs/<name>.py`` as a module (its ``get_config`` and constants)."""
  return config_lib.load_module(os.path.join(ROOT, 'configs', f'{name}.py'))


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def load_run(workdir: str) -> dict | None:
  """A finished run's record, or None while it still has to (re)train.

  A run is finished when its workdir holds ``summary.json`` (the library
  writes it when training completes) or ``diverged.json`` (`train_run`
  writes it when the loss became non-finite). The record: ``status``
  ('finished' or 'diverged'), ``summary`` (None if diverged), ``diverged``
  (the step and message, or None), ``seconds`` (the runner's wall time, None
  if unknown) and ``rows`` (metrics.csv, up to the divergence).
  """
  record = None
  if os.path.exists(os.path.join(workdir, 'diverged.json')):
    record = dict(status='diverged', summary=None,
                  diverged=read_json(os.path.join(workdir, 'diverged.json')))
  elif os.path.exists(os.path.join(workdir, 'summary.json')):
    record = dict(status='finished', diverged=None,
                  summary=read_json(os.path.join(workdir, 'summary.json')))
  if record is None:
    return None
  timing = os.path.join(workdir, 'runner.json')
  record['seconds'] = (read_json(timing)['seconds']
                       if os.path.exists(timing) else None)
  record['rows'] = reporting.read_csv(os.path.join(workdir, 'metrics.csv'))
  return record


def train_run(config, workdir: str) -> dict:
  """Trains (or resumes) one run to its end or its divergence.

  A finished run (see `load_run`) is not touched. A diverged run
  (`stopping.Diverged`) is a result, recorded in ``diverged.json``; the wall
  time goes to ``runner.json``. Returns `load_run`'s record.

  Raises:
    UserError: the workdir holds a run of another config (a study re-run
      with other flags into the same folder).
  """
  saved = os.path.join(workdir, files.CONFIG)
  if os.path.exists(saved) and (read_json(saved) !=
                                json.loads(config.to_json_best_effort())):
    raise UserError(f'workdir: {workdir} holds a run of another config; '
                    'choose another --out/--workdir_root or delete it')
  record = load_run(workdir)
  if record is not None:
    return record
  wait_for_lock()
  start = time.time()
  try:
    summary = train.train_and_evaluate(config, workdir)
    if not os.path.exists(os.path.join(workdir, 'summary.json')):
      files.write_json(os.path.join(workdir, 'summary.json'), summary)
  except stopping.Diverged as e:
    os.makedirs(workdir, exist_ok=True)
    files.write_json(os.path.join(workdir, 'diverged.json'),
               dict(step=e.step, message=str(e), date=today()))
  files.write_json(os.path.join(workdir, 'runner.json'),
             dict(seconds=round(time.time() - start, 1), date=today()))
  return load_run(workdir)


def member_records(workdir: str, population_record: dict) -> list[dict]:
  """The `load_run` record of each member of a finished population
  (`population.member_summaries`), diverged if its loss ever became
  non-finite, with its ``learning_rate``, ``seed`` and ``workdir``; the
  population's wall time is shared evenly."""
  members = population.member_summaries(workdir)
  records = []
  for member in members:
    diverged_at = member['diverged_step']
    if population_record['status'] == 'diverged' or diverged_at >= 0:
      step = (diverged_at if diverged_at >= 0
              else population_record['diverged']['step'])
      record = dict(status='diverged', summary=None, diverged=dict(
          step=step, message=f'non-finite loss at step {step}'))
    else:
      record = dict(status='finished', diverged=None, summary=member['summary'])
    seconds = population_record['seconds']
    records.append(dict(
        record, rows=member['rows'], learning_rate=member['learning_rate'],
        seed=member['seed'], workdir=os.path.relpath(member['workdir'], ROOT),
        seconds=seconds and seconds / len(members)))
  return records


def enable_compilation_cache(path: str | None) -> None:
  """Keeps compiled XLA programs in `path` (None or '': off) across runs.

  The runs of a sweep that differ only in the learning rate or the seed
  recompile their training step (both are constants of the program), but
  their initialization and evaluation programs are the same: on 2 CPU cores
  this cut a one-epoch digits run from 28 to 22 s.
  """
  if path:
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def prune(workdir: str) -> None:
  """Deletes what only resuming or re-evaluating a finished run needs.

  The checkpoints and the fitted preprocessing (37 MB with ZCA) of each run;
  the metrics, summary and config stay.
  """
  shutil.rmtree(os.path.join(workdir, 'checkpoints'), ignore_errors=True)
  for name in os.listdir(workdir):
    if name.endswith('.npz') or name.startswith('events.out.tfevents'):
      os.remove(os.path.join(workdir, name))


def parameter_count(config, num_classes: int) -> int:
  """Trainable parameters of the network a config describes (no compute)."""
  model = models.create(config.model, num_classes, width=config.width,
                        dropout=config.dropout, batch_norm=config.batch_norm)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, *models.INPUT_SHAPE), np.float32))['params'])
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1 in the denominator).

  The std of a single value is nan: one seed says nothing about the spread.
  """
  values = np.asarray(list(values), np.float64)
  if not len(values):
    return math.nan, math.nan
  std = float(values.std(ddof=1)) if len(values) > 1 else math.nan
  return float(values.mean()), std


def format_mean_std(values, scale: float = 100.0, digits: int = 1) -> str:
  """``'mean ± std'`` of `values` times `scale` (accuracies to percent).

  One value is written with ``(1 seed)`` instead of a std, none as ``-``.
  """
  values = list(values)
  if not values:
    return '-'
  mean, std = mean_std(values)
  if len(values) == 1:
    return f'{scale * mean:.{digits}f} (1 seed)'
  return f'{scale * mean:.{digits}f} ± {scale * std:.{digits}f}'


def seconds_per_epoch(rows: list[dict]) -> float:
  """Mean seconds of the epochs after the first (which includes compiling)."""
  later = [r['seconds'] for r in rows[1:]] or [r['seconds'] for r in rows]
  return sum(later) / len(later)


def plot_epochs(ax_acc, ax_loss, rows: list[dict], label: str, **style):
  """Draws test accuracy and loss per epoch from a run's metrics.csv rows."""
  epochs = [r['epoch'] for r in rows]
  ax_acc.plot(epochs, [100 * r['test_accuracy'] for r in rows], label=label,
              **style)
  ax_loss.plot(epochs, [r['test_loss'] for r in rows], label=label, **style)


def mean_curve(runs_rows: list[list[dict]], column: str):
  """Epochs and the mean of `column` over the runs that reached each epoch.

  Runs that stopped early (a diverged one) leave the mean of the later
  epochs to the others. Returns (epochs, means), both lists.
  """
  by_epoch = {}
  for rows in runs_rows:
    for row in rows:
      value = row.get(column)
      if value is not None and math.isfinite(value):
        by_epoch.setdefault(row['epoch'], []).append(value)
  epochs = sorted(by_epoch)
  return epochs, [float(np.mean(by_epoch[e])) for e in epochs]


def finish_axes(ax_acc, ax_loss):
  """Labels, integer epoch ticks, grid and legend of the two panels."""
  ax_acc.set(xlabel='epoch', ylabel='test accuracy (%)', title='test accuracy')
  ax_loss.set(xlabel='epoch', ylabel='test cross-entropy loss',
              title='test loss')
  for ax in (ax_acc, ax_loss):
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig, path: str, title: str) -> None:
  """Titles, lays out, writes and closes a figure."""
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_results(out: str, *, title: str, script: str, setup: dict,
                  command_line: str, tables: list[str], images: list[str],
                  data: dict) -> None:
  """Writes results.md and results.json into `out`.

  What a run shows is judged by a person: the text of ``<out>/notes.md``, if
  there is one, is copied under "What it shows and what it does not", so
  that re-running the study keeps it (check it still holds).

  Args:
    out: the results folder.
    title: the Markdown title.
    script: the script's file name, e.g. ``'table3.py'``.
    setup: ordered ``field -> value`` lines of the setup section.
    command_line: the exact command (see `command`).
    tables: Markdown blocks of the results section, in order.
    images: PNG file names in `out` to embed.
    data: everything plotted and tabulated, for results.json.
  """
  lines = [f'# {title}', '', f'Generated by `experiments/{script}`; the exact '
           'command is below.', '', '## Setup', '']
  lines += [f'- {key}: {value}' for key, value in setup.items()]
  lines += ['', '```', command_line, '```', '', '## Results', '']
  for block in tables:
    lines += [block, '']
  notes = os.path.join(out, 'notes.md')
  if os.path.exists(notes):
    with open(notes) as f:
      lines += ['## What it shows and what it does not', '', f.read().strip(),
                '']
  lines += [f'![{os.path.splitext(name)[0]}]({name})' for name in images]
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(dict(setup=setup, command=command_line, **data), f, indent=1)
