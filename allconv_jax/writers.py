"""Where a run's rows go: the files people read, and the log line.

A `history.History` keeps the rows and the selection; it is handed these
writers, as clu's metric writers are handed to a training loop, and calls
each after every evaluation (`Writer.write`, with the record), with the test
split's confusion counts (`Writer.write_confusion`) and with the summary
once training stops (`Writer.finish`). Only the writing process has writers.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

from allconv_jax import confusion, files, reporting

# Drawing the curves takes about half a second, as long as an epoch of
# CIFAR-10 on a GPU: between evaluations closer than this they are drawn
# again only once the run ends. The CSV and TensorBoard get every row.
PLOT_EVERY_SECONDS = 30.0


class Writer:
  """A sink of a run's record; every method does nothing unless overridden."""

  def start(self, record) -> None:
    """Before training: the record holds the rows of a resumed run, if any."""

  def write(self, record) -> None:
    """After the record's newest row (``record.rows[-1]``) was added."""

  def write_confusion(self, counts: np.ndarray, class_names, step: int) -> None:
    """The test split's confusion counts of the run's final weights."""

  def finish(self, summary: dict, complete: bool) -> None:
    """Training stopped: `summary` is the run's; `complete` if it ran to
    its last step."""


class Csv(Writer):
  """``metrics.csv``: every row, rewritten whole (a resumed run's first)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, files.METRICS)

  def write(self, record):
    reporting.write_csv(self.path, record.rows)

  start = write


class TensorBoard(Writer):
  """TensorBoard scalars of every row."""

  def __init__(self, workdir: str):
    self.events = reporting.TensorBoard(workdir)

  def write(self, record):
    row = record.rows[-1]
    self.events.write_scalars(row['step'], {
        k: v for k, v in row.items() if k not in ('epoch', 'step') and np.isfinite(v)})

  def finish(self, summary, complete):
    self.events.close()


class PlotClock:
  """When curves are drawn: at the first row, the run's last, and others
  `PLOT_EVERY_SECONDS` after the previous drawing. Shared by a population's
  members, whose plots are drawn together."""

  def __init__(self, total_steps: int):
    self.total_steps, self.drawn = total_steps, -float('inf')
    self.decided = (None, False)  # (step, due): asked once per row.

  def due(self, step: int) -> bool:
    if self.decided[0] != step:
      due = (step == self.total_steps or
             time.monotonic() - self.drawn >= PLOT_EVERY_SECONDS)
      if due:
        self.drawn = time.monotonic()
      self.decided = (step, due)
    return self.decided[1]


class Curves(Writer):
  """``curves.png``: loss and accuracy per epoch, when `clock` says so."""

  def __init__(self, workdir: str, title: str, clock: PlotClock):
    self.path, self.title, self.clock = os.path.join(workdir, files.CURVES), title, clock

  def write(self, record):
    if self.clock.due(record.rows[-1]['step']):
      reporting.plot_curves(record.rows, self.path, title=self.title)


class Outcome(Writer):
  """The per-class files of the final weights and ``summary.json``."""

  def __init__(self, workdir: str):
    self.workdir = workdir

  def write_confusion(self, counts, class_names, step):
    confusion.write(self.workdir, counts, class_names, 'test', step)

  def finish(self, summary, complete):
    if complete:
      files.write_json(os.path.join(self.workdir, files.SUMMARY), summary)


def timing(record, steps_per_epoch: int, total_steps: int) -> str:
  """Seconds per epoch of the period the record's newest row ends, and the
  run's ETA."""
  row = record.rows[-1]
  per_step = row['seconds'] / (row['step'] - record.period_start[1])
  return (f'{per_step * steps_per_epoch:.1f}s/epoch  ETA '
          f'{reporting.duration((total_steps - row["step"]) * per_step)}')


class LogLine(Writer):
  """One log line per row: its numbers, the best so far, speed and ETA."""

  def __init__(self, epochs: float, steps_per_epoch: int, total_steps: int):
    self.epochs, self.steps_per_epoch, self.total_steps = (
        epochs, steps_per_epoch, total_steps)

  def write(self, record):
    row = record.rows[-1]
    logging.info('epoch %g/%g  %s  %s', row['epoch'], self.epochs,
                 reporting.epoch_line(row, record.best),
                 timing(record, self.steps_per_epoch, self.total_steps))


def for_run(run, workdir: str, *, files_too: bool, clock: PlotClock | None = None,
            log: bool = True) -> list[Writer]:
  """The writers of a run: with `files_too` (the writing process) its
  directory's CSV, TensorBoard, curves (drawn by `clock`, by default the
  run's own), per-class files and summary; with `log` the log line."""
  out = []
  if files_too:
    os.makedirs(workdir, exist_ok=True)
    title = f'{run.config.model} on {run.config.dataset.name}'
    out += [Csv(workdir), TensorBoard(workdir),
            Curves(workdir, title, clock or PlotClock(run.total_steps)), Outcome(workdir)]
  if log:
    out.append(LogLine(run.epochs, run.batches.steps_per_epoch, run.total_steps))
  return out


class MembersPlot(Writer):
  """A population's ``members.png``: every member's curves, drawn when the
  members' curves are (`clock`)."""

  def __init__(self, workdir: str, title: str, names: list[str], clock: PlotClock):
    self.path = os.path.join(workdir, files.MEMBERS_PLOT)
    self.title, self.names, self.clock = title, names, clock

  def write(self, record):
    if self.clock.due(record.members[0].rows[-1]['step']):
      reporting.plot_members({n: h.rows for n, h in zip(self.names, record.members)},
                             self.path, self.title)


class PopulationLogLine(LogLine):
  """One log line per row of a population: the member selected so far (by
  validation, else by training loss), how many diverged, speed and ETA."""

  def write(self, record):
    members = record.members
    scores = [h.best['accuracy'] if h.selection.has_validation else -h.rows[-1]['train_loss']
              for h in members]
    best = members[int(np.argmax(np.nan_to_num(scores, nan=-np.inf)))]
    diverged = sum(h.rows[-1]['diverged_step'] >= 0 for h in members)
    logging.info('epoch %g/%g  %d members (%d diverged), leading %s: %s  %s',
                 members[0].rows[-1]['epoch'], self.epochs, len(members), diverged,
                 os.path.basename(best.workdir),
                 reporting.epoch_line(best.rows[-1], best.best),
                 timing(members[0], self.steps_per_epoch, self.total_steps))


class Ranking(Writer):
  """Once a population completes: its ``summary.json``, ``members.csv`` (the
  members ranked) and the ranking in the log."""

  def __init__(self, workdir: str):
    self.workdir = workdir

  def finish(self, summary, complete):
    if not complete:
      return
    files.write_json(os.path.join(self.workdir, files.SUMMARY), summary)
    reporting.write_table(os.path.join(self.workdir, files.RANKING), summary['members'])
    logging.info('Members%s:\n%s', ', best by validation accuracy first'
                 if summary['selection'] else '', reporting.format_table(
                     summary['members'], ['member', 'selected_validation_accuracy',
                                          'selected_test_accuracy', 'diverged_step']))
