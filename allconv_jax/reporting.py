"""Outputs people read: ``metrics.csv``, ``curves.png``, TensorBoard, progress.

None of them needs TensorFlow.
"""

from __future__ import annotations

import csv
import io
import math
import os
import socket
import sys
import time

from absl import logging

# The Figure API needs no GUI backend and leaves pyplot's (and a notebook's)
# alone.
from matplotlib.figure import Figure

from allconv_jax import files

# The validation columns are nan for a run without a validation split. Runs
# with ema_decay or eval_flip have more (ema_*, *_flip_accuracy), before
# 'seconds'.
COLUMNS = ('epoch', 'step', 'learning_rate', 'train_loss', 'train_accuracy',
           'validation_loss', 'validation_accuracy', 'test_loss',
           'test_accuracy', 'seconds')


def read_csv(path: str) -> list[dict]:
  """Rows of a metrics CSV with numeric values ([] if there is none)."""
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
  for row in rows:
    row['step'] = int(row['step'])
    row['epoch'] = int(row['epoch']) if row['epoch'].is_integer() else row['epoch']
  return rows


def epoch_of(step: int, steps_per_epoch: int) -> int | float:
  """Epochs done after `step` steps: whole at an epoch's end, else a fraction."""
  whole, rest = divmod(step, steps_per_epoch)
  return whole if rest == 0 else round(step / steps_per_epoch, 4)


def write_csv(path: str, rows: list[dict]) -> None:
  """Rewrites the whole CSV atomically, so a crash never leaves half a row."""
  extra = [k for k in (rows[0] if rows else {}) if k not in COLUMNS]
  write_table(path, rows, [*COLUMNS[:-1], *extra, COLUMNS[-1]])


def write_table(path: str, rows: list[dict], columns=None) -> None:
  """Writes `rows` as a CSV atomically: `columns`, or the first row's keys."""
  columns = list(columns or (rows[0] if rows else []))

  def write(tmp):
    with open(tmp, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=columns)
      writer.writeheader()
      for row in rows:
        writer.writerow({k: row[k] for k in columns})
  files.atomic_write(path, write)


def format_table(rows: list[dict], columns: list[str]) -> str:
  """`rows` as aligned text, numbers as 4 significant digits."""
  cells = [columns] + [[f'{r[c]:.4g}' if isinstance(r[c], float) else str(r[c])
                        for c in columns] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
  return '\n'.join('  '.join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def plot_curves(rows: list[dict], path: str, title: str = '') -> None:
  """Draws loss and accuracy per epoch, per split, into a PNG."""
  epochs = [r['epoch'] for r in rows]
  fig = Figure(figsize=(11, 4))
  ax_loss, ax_acc = fig.subplots(1, 2)
  splits = [('train', '-'), ('validation', '-.'), ('test', '--')]
  if not any(math.isfinite(r['validation_accuracy']) for r in rows):
    del splits[1]
  for split, style in splits:
    ax_loss.plot(epochs, [r[f'{split}_loss'] for r in rows], style, label=split)
    ax_acc.plot(epochs, [100 * r[f'{split}_accuracy'] for r in rows], style,
                label=split)
  ax_loss.set(xlabel='epoch', ylabel='cross-entropy loss', title='loss')
  ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='accuracy')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))


def epoch_line(row: dict, best: dict) -> str:
  """The losses and accuracies of an epoch's row, for its log line."""
  def accuracies(split):
    text = f"acc {100 * row[f'{split}_accuracy']:.2f}%"
    if f'{split}_flip_accuracy' in row:
      text += f" (flip {100 * row[f'{split}_flip_accuracy']:.2f}%)"
    if f'ema_{split}_accuracy' in row:
      text += f" ema {100 * row[f'ema_{split}_accuracy']:.2f}%"
    return text
  parts = [f"train loss {row['train_loss']:.4f} acc {100 * row['train_accuracy']:.2f}%"]
  if math.isfinite(row['validation_accuracy']):
    parts.append(f"val loss {row['validation_loss']:.4f} {accuracies('validation')} "
                 f"(best {100 * best['accuracy']:.2f}% @{best['epoch']})")
  parts.append(f"test loss {row['test_loss']:.4f} {accuracies('test')}")
  return '  '.join(parts)


def duration(seconds: float) -> str:
  """``h:mm:ss``."""
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class TensorBoard:
  """Scalars into a TensorBoard event file in `logdir`.

  Written with the ``tensorboard`` package's record format and protos
  directly: its `EventFileWriter` would import TensorFlow where it is
  installed, through ``tensorboard.compat.tf``.
  """

  def __init__(self, logdir: str):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer import record_writer
    # pylint: enable=g-import-not-at-top
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    name = f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}'
    self.path = os.path.join(logdir, name)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    # Records are framed in memory, then appended whole (`files.append`).
    self._buffer = io.BytesIO()
    self._records = record_writer.RecordWriter(self._buffer)
    self._write(self._event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    # Written at once: a killed run keeps every evaluation it logged, and a
    # full disk leaves the file as it was.
    self._records.write(event.SerializeToString())
    data = self._buffer.getvalue()
    self._buffer.seek(0)
    self._buffer.truncate()
    files.append(self._fd, data, self.path)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    values = [self._summary.Value(tag=k, simple_value=float(v))
              for k, v in scalars.items()]
    self._write(self._event(wall_time=time.time(), step=step,
                            summary=self._summary(value=values)))

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def wants_bar() -> bool:
  """Whether progress should be a bar: on a terminal or in a notebook.

  Elsewhere (a log file, a batch job) a bar's carriage returns would be
  noise, so periodic lines are written instead.
  """
  return sys.stderr.isatty() or 'ipykernel' in sys.modules


class Progress:
  """Progress and ETA of training, between one evaluation and the next.

  A tqdm bar per period (an epoch, or ``eval_every_steps`` steps) where
  `wants_bar`, closed when the period ends so that the epoch's line follows
  it; otherwise a line with steps/s and the ETA of the run every
  `every_secs` seconds.

  Args:
    total_steps: the run's last step.
    every: steps between evaluations.
    label: names the period ending at a step, e.g. ``'epoch 3/5'``.
    bar: force a bar (True) or lines (False); None: `wants_bar`.
    every_secs: seconds between lines.
    file: where the bar goes (stderr).
  """

  def __init__(self, total_steps: int, every: int, label=str, bar: bool | None = None,
               every_secs: float = 30.0, file=None):
    self.total_steps, self.every, self.label = total_steps, every, label
    self.use_bar = wants_bar() if bar is None else bar
    self.every_secs, self.file = every_secs, file
    self._bar, self._end = None, None  # The bar of the period ending at _end.
    self._last = None  # (time, step) of the last line; the first call sets it.

  def __call__(self, step: int) -> None:
    if self.use_bar:
      self._update_bar(step)
    else:
      self._line(step)

  def _update_bar(self, step: int) -> None:
    start = (step - 1) // self.every * self.every
    end = min(start + self.every, self.total_steps)
    if self._bar is not None and self._end != end:
      self._bar.close()  # A period skipped over: the loop never does.
      self._bar = None
    if self._bar is None:
      self._end = end
      # pylint: disable-next=g-import-not-at-top
      from tqdm.auto import tqdm  # Picks a widget in a notebook.
      self._bar = tqdm(total=end - start, desc=self.label(end), unit='step',
                       leave=False, dynamic_ncols=True, file=self.file)
    self._bar.update(step - start - self._bar.n)
    if step == end:
      self._bar.close()
      self._bar = None

  def _line(self, step: int) -> None:
    if step % self.every == 0 or step == self.total_steps:
      # The evaluation's line follows, with the run's ETA. The next period's
      # rate counts from its first step: not the evaluation's time.
      self._last = None
      return
    now = time.monotonic()
    if self._last is None:  # The first step's time is mostly compiling.
      self._last = (now, step)
      return
    then, before = self._last
    if now - then >= self.every_secs and step > before:
      rate = (step - before) / (now - then)
      logging.info('step %d/%d  %.1f steps/s  ETA %s', step, self.total_steps,
                   rate, duration((self.total_steps - step) / rate))
      self._last = (now, step)


def plot_members(curves: dict[str, list[dict]], path: str, title: str = '') -> None:
  """One curve per member of a population: validation accuracy per epoch (or
  training loss without a validation split), a diverged member dashed."""
  rows = next(iter(curves.values()))
  validation = any(math.isfinite(r['validation_accuracy']) for r in rows)
  column, ylabel = (('validation_accuracy', 'validation accuracy (%)') if validation
                    else ('train_loss', 'training loss'))
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for name, rows in curves.items():
    scale = 100 if validation else 1
    diverged = bool(rows) and rows[-1].get('diverged_step', -1) >= 0
    ax.plot([r['epoch'] for r in rows], [scale * r[column] for r in rows],
            '--' if diverged else '-', label=name + (' (diverged)' if diverged else ''))
  ax.set(xlabel='epoch', ylabel=ylabel, title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
