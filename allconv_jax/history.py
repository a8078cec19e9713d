"""A run's history: its rows, the selection on validation, its checkpoints,
and the files people read (``metrics.csv``, ``curves.png``, TensorBoard).

The history lives in every checkpoint's meta, so that a resumed run rebuilds
the CSV from it and neither loses nor repeats an evaluation.
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


def checkpoint_meta(run, step: int, architecture: dict, **extra) -> dict:
  """A checkpoint's meta: `architecture`, where the run is, and `extra`
  (a history, see `History.meta`)."""
  return dict(architecture, step=step, epoch=step // run.batches.steps_per_epoch,
              **extra)


def weights_prefix(config) -> str:
  """The column prefix of the weights a run selects and loads: ``'ema_'``
  for the moving average (``ema_decay``), else ``''``."""
  return 'ema_' if config.get('ema_decay') else ''


class History:
  """The rows of a run so far, the best one by validation, and its outputs.

  Args:
    run: the run's `train.Setup`.
    resumed: the meta of the checkpoint the run resumes from, or None.
    is_writer: whether this process writes the files (process 0).
    workdir: where the files go, if not the run's (a population's member).
  """

  def __init__(self, run, resumed: dict | None, is_writer: bool,
               workdir: str | None = None):
    self.run, self.is_writer = run, is_writer
    self.workdir = workdir or run.workdir
    self.has_validation = run.data.validation is not None
    self.prefix = weights_prefix(run.config)
    self.rows = resumed['history'] if resumed else []
    self.best = (dict(accuracy=resumed['best_validation_accuracy'],
                      epoch=resumed['best_epoch']) if resumed
                 else dict(accuracy=-1.0, epoch=0))
    self.tensorboard = None
    if is_writer:
      os.makedirs(self.workdir, exist_ok=True)
      self.tensorboard = reporting.TensorBoard(self.workdir)
      reporting.write_csv(self._path(files.METRICS), self.rows)
    self.period_start = (time.time(), resumed['step'] if resumed else 0)
    self.plotted = -float('inf')  # When curves.png was last drawn.

  def _path(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def add(self, row: dict) -> bool:
    """Appends a row; returns whether its validation accuracy is the best.

    The accuracy is that of the weights the run selects (the moving average
    with ``ema_decay``). Without a validation split nothing is selected: the
    final checkpoint stands. Test accuracy never selects.
    """
    row['seconds'] = round(time.time() - self.period_start[0], 3)
    accuracy = row[f'{self.prefix}validation_accuracy']
    is_best = self.has_validation and accuracy > self.best['accuracy']
    if is_best:
      self.best = dict(accuracy=accuracy, epoch=row['epoch'])
    self.rows = self.rows + [row]
    return is_best

  def meta(self) -> dict:
    """The history as a checkpoint's meta holds it, for resume."""
    return dict(history=self.rows, best_validation_accuracy=self.best['accuracy'],
                best_epoch=self.best['epoch'])

  def save(self, state, train_metrics, validation_accuracy=None, is_best=False):
    """Checkpoints the state with the history so far in its meta."""
    step = int(state.step)
    self.run.checkpoints.save(step, dict(state=state, train_metrics=train_metrics),
                              checkpoint_meta(self.run, step, self.run.architecture,
                                              **self.meta()),
                              validation_accuracy, is_best)
    # Committed before anything refers to it, so that a kill never leaves
    # metrics of an epoch the checkpoints do not have.
    self.run.checkpoints.wait()

  def write(self, row: dict, log: bool = True, plot: bool | None = None) -> None:
    """The CSV, TensorBoard, curves (if `plot`, by default if `plot_due`)
    and (if `log`) the log line of a row."""
    if self.is_writer:
      self.tensorboard.write_scalars(row['step'], {
          k: v for k, v in row.items()
          if k not in ('epoch', 'step') and np.isfinite(v)})
      reporting.write_csv(self._path(files.METRICS), self.rows)
      if plot is None:
        plot = self.plot_due(row)
      if plot:
        reporting.plot_curves(self.rows, self._path(files.CURVES), title=(
            f'{self.run.config.model} on {self.run.config.dataset.name}'))
        self.plotted = time.monotonic()
    if log:
      logging.info('epoch %g/%g  %s  %s', row['epoch'], self.run.epochs,
                   reporting.epoch_line(row, self.best), self.timing(row))
    self.period_start = (time.time(), row['step'])

  def plot_due(self, row: dict) -> bool:
    """Whether the curves are drawn at `row`: the first row this process
    writes, the run's last, and others `PLOT_EVERY_SECONDS` after the last
    drawing."""
    return (row['step'] == self.run.total_steps or
            time.monotonic() - self.plotted >= PLOT_EVERY_SECONDS)

  def timing(self, row: dict) -> str:
    """Seconds per epoch of the period a row ends, and the run's ETA."""
    per_step = row['seconds'] / (row['step'] - self.period_start[1])
    spe, total = self.run.batches.steps_per_epoch, self.run.total_steps
    return (f'{per_step * spe:.1f}s/epoch  ETA '
            f'{reporting.duration((total - row["step"]) * per_step)}')

  def write_confusion(self, counts: np.ndarray, class_names, step: int) -> None:
    """The test split's confusion matrix and per-class accuracy files."""
    if self.is_writer:
      confusion.write(self.workdir, counts, class_names, 'test', step)

  def finish(self) -> dict:
    """The summary (see `reporting.summary`), written once the run is complete."""
    if self.tensorboard:
      self.tensorboard.close()
    summary = reporting.summary(self.rows, self.best, self.has_validation,
                                self.prefix)
    if self.is_writer and self.rows and self.rows[-1]['step'] == self.run.total_steps:
      files.write_json(self._path(files.SUMMARY), summary)
    return summary
