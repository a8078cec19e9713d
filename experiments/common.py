"""What every study script of `experiments/` shares.

The flags common to all studies (output folder, machine label, a lock file to
wait for), the description of the machine and the date, the parameter count
of a network, one-epoch-per-point curves, and the layout of ``results.md``.
Each study script imports this module after putting the repository root on
``sys.path`` (`ROOT`), so that it runs as ``python experiments/<study>.py``
from anywhere.
"""

import datetime
import json
import math
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import matplotlib
import numpy as np
from absl import flags, logging

matplotlib.use('Agg')  # Headless.
import matplotlib.pyplot as plt
from matplotlib import ticker

from allconv_jax import models
from benchmarks import common as bench  # The machine description.
# pylint: enable=g-import-not-at-top,wrong-import-position

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


def parameter_count(config, num_classes: int) -> int:
  """Trainable parameters of the network a config describes (no compute)."""
  model = models.create(config.model, num_classes, width=config.width,
                        dropout=config.dropout, batch_norm=config.batch_norm)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))['params'])
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


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
    script: the script's file name, e.g. ``'six_models.py'``.
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
