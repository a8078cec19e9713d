"""A run's record: its rows, the row selected on validation so far, and the
checkpoints that carry both.

The history lives in every checkpoint's meta, so that a resumed run rebuilds
its files from it and neither loses nor repeats an evaluation. The record
writes no file people read: the `writers` it is handed do (``metrics.csv``,
``curves.png``, TensorBoard, the log line, per-class files, the summary).
"""

from __future__ import annotations

import time

import numpy as np

from allconv_jax import writers as writers_lib


def checkpoint_meta(run, step: int, architecture: dict, **extra) -> dict:
  """A checkpoint's meta: `architecture`, where the run is, and `extra`
  (a history, see `History.meta`)."""
  return dict(architecture, step=step, epoch=step // run.batches.steps_per_epoch,
              **extra)


class History:
  """The rows of a run so far and the best one by validation.

  Args:
    run: the run's `train.Setup` (its selection rule and checkpoints).
    resumed: the meta of the checkpoint the run resumes from, or None.
    writers: where each row goes (`writers.Writer`s; none on processes
      other than the first).
    workdir: the run's directory, if not the run's (a population's member).
  """

  def __init__(self, run, resumed: dict | None,
               writers: list[writers_lib.Writer] = (), workdir: str | None = None):
    self.run, self.writers = run, list(writers)
    self.workdir = workdir or run.workdir
    self.selection = run.selection
    self.rows = resumed['history'] if resumed else []
    self.best = (dict(accuracy=resumed['best_validation_accuracy'],
                      epoch=resumed['best_epoch']) if resumed
                 else dict(accuracy=-1.0, epoch=0))
    self.period_start = (time.time(), resumed['step'] if resumed else 0)
    for writer in self.writers:  # A resumed run's files, rebuilt.
      writer.start(self)

  def add(self, row: dict) -> bool:
    """Appends a row (its arrays as numbers); returns whether it is selected
    so far (see `selection.Selection.improves`)."""
    row = {k: v.item() if isinstance(v, np.ndarray) else v for k, v in row.items()}
    row['seconds'] = round(time.time() - self.period_start[0], 3)
    is_best = self.selection.improves(row, self.best['accuracy'])
    if is_best:
      self.best = dict(accuracy=self.selection.score(row), epoch=row['epoch'])
    self.rows = self.rows + [row]
    return is_best

  def meta(self) -> dict:
    """The history as a checkpoint's meta holds it, for resume."""
    return dict(history=self.rows, best_validation_accuracy=self.best['accuracy'],
                best_epoch=self.best['epoch'])

  def save(self, state, train_metrics, is_best: bool = False):
    """Checkpoints the state with the history so far in its meta (and as the
    best, if `is_best`)."""
    step = int(state.step)
    self.run.checkpoints.save(step, dict(state=state, train_metrics=train_metrics),
                              checkpoint_meta(self.run, step, self.run.architecture,
                                              **self.meta()),
                              self.best['accuracy'], is_best)
    # Committed before anything refers to it, so that a kill never leaves
    # metrics of an epoch the checkpoints do not have.
    self.run.checkpoints.wait()

  def write(self) -> None:
    """Hands the newest row to the writers; the next period starts."""
    for writer in self.writers:
      writer.write(self)
    self.period_start = (time.time(), self.rows[-1]['step'])

  def write_confusion(self, counts: np.ndarray, class_names, step: int) -> None:
    """The test split's confusion counts, to the writers."""
    for writer in self.writers:
      writer.write_confusion(counts, class_names, step)

  def finish(self) -> dict:
    """The summary (see `selection.Selection.summary`), handed to the
    writers, which write it once the run is complete."""
    summary = self.selection.summary(self.rows, self.best['epoch'])
    complete = bool(self.rows) and self.rows[-1]['step'] == self.run.total_steps
    for writer in self.writers:
      writer.finish(summary, complete)
    return summary
