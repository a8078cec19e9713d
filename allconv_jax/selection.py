"""What a run reports: which row, which checkpoint, which weights.

One rule, asked by the record of a run while it trains, by its summary, by
the loaders of trained runs and by a population's ranking of its members:
the row of best validation accuracy (the first, on ties), or the final row
without a validation split; the weights are the moving average with
``ema_decay``, else the trained ones. Test accuracy never selects anything.
"""

import dataclasses
import math
import os

from allconv_jax import checkpoints, files


@dataclasses.dataclass(frozen=True)
class Selection:
  """The selection rule of a run (see `of`)."""
  has_validation: bool
  moving_average: bool

  @property
  def prefix(self) -> str:
    """The column prefix of the selected weights' metrics: ``'ema_'`` or ``''``."""
    return 'ema_' if self.moving_average else ''

  @property
  def rule(self) -> str:
    return 'best_validation_accuracy' if self.has_validation else 'final'

  @property
  def weights(self) -> str:
    return 'moving_average' if self.moving_average else 'trained'

  def score(self, row: dict) -> float:
    """The validation accuracy of the selected weights at `row`."""
    return row[f'{self.prefix}validation_accuracy']

  def improves(self, row: dict, best_accuracy: float) -> bool:
    """Whether `row` is selected over the best so far (never without a
    validation split: the final checkpoint stands)."""
    return self.has_validation and self.score(row) > best_accuracy

  def row(self, rows: list[dict], best_epoch) -> dict:
    """The selected row: that of `best_epoch`, or the final one."""
    if not self.has_validation:
      return rows[-1]
    return next(r for r in rows if r['epoch'] == best_epoch)

  def state_weights(self, state):
    """The selected weights of a checkpointed state (a dict or a
    `steps.TrainState`): its moving average, or the state itself."""
    if not self.moving_average:
      return state
    return state['ema'] if isinstance(state, dict) else state.ema

  def summary(self, rows: list[dict], best_epoch) -> dict:
    """The selected row's numbers and the final row's, as a run reports them
    (the flip test-time augmentation's where the rows have them)."""
    if not rows:
      return dict(selection=None, epochs=0)
    final, selected = rows[-1], self.row(rows, best_epoch)
    optional = lambda v: float(v) if math.isfinite(v) else None
    out = dict(selection=self.rule, weights=self.weights,
               selected_epoch=selected['epoch'], selected_step=selected['step'])
    for which, row in (('selected', selected), ('final', final)):
      out[f'{which}_validation_accuracy'] = optional(self.score(row))
      out[f'{which}_test_accuracy'] = row[f'{self.prefix}test_accuracy']
      if f'{self.prefix}test_flip_accuracy' in row:
        out[f'{which}_test_flip_accuracy'] = row[f'{self.prefix}test_flip_accuracy']
    return dict(out, epochs=final['epoch'], steps=final['step'])


def of(config, has_validation: bool) -> Selection:
  """The selection rule of a run of `config`, with or without a validation
  split."""
  return Selection(has_validation, bool(config.get('ema_decay')))


def checkpoint_dir(workdir: str) -> str:
  """The directory of a workdir's selected checkpoint.

  ``checkpoints/best`` when it holds a checkpoint (the run had a validation
  split), else ``checkpoints/latest``, whose newest step is the final one.
  """
  root = os.path.join(os.path.abspath(workdir), files.CHECKPOINTS)
  best = os.path.join(root, 'best')
  return best if checkpoints.latest_step(best) is not None else os.path.join(root, 'latest')
