"""Progress of training: a bar per period on a terminal, lines elsewhere; the
curves, redrawn at most every 30 s."""

import io
import types

import ml_collections
from absl import logging

from allconv_jax import reporting


def test_bar_runs_per_period_and_closes_at_its_end():
  out = io.StringIO()
  progress = reporting.Progress(total_steps=10, every=4, bar=True,
                                label=lambda end: f'to {end}', file=out)
  progress(1)
  progress(3)
  assert (progress._bar.total, progress._bar.n) == (4, 3)
  progress(4)
  assert progress._bar is None  # Closed at the period's end.
  assert 'to 4' in out.getvalue()
  progress(6)  # Resumed mid-period: the bar starts where the period did.
  assert (progress._bar.total, progress._bar.n) == (4, 2)
  progress(10)  # The last period is cut short by the run's end.
  assert progress._bar is None and 'to 10' in out.getvalue()


def test_without_a_bar_lines_give_the_rate_and_eta(monkeypatch):
  lines, clock = [], iter([0.0, 10.0, 40.0, 200.0, 210.0, 240.0])
  monkeypatch.setattr(reporting.time, 'monotonic', lambda: next(clock))
  monkeypatch.setattr(logging, 'info', lambda fmt, *a: lines.append(fmt % a))
  progress = reporting.Progress(total_steps=100, every=10, bar=False,
                                every_secs=30.0)
  progress(1)   # t=0: starts the clock (compiling).
  progress(5)   # t=10: too soon for a line.
  progress(31)  # t=40: 30 steps in 40 s.
  progress(40)  # An evaluation's step: its own line follows.
  progress(41)  # t=200, after the evaluation: starts the clock again.
  progress(45)  # t=210: too soon for a line.
  progress(71)  # t=240: 30 steps in 40 s, the evaluation's time left out.
  assert lines == ['step 31/100  0.8 steps/s  ETA 0:01:32',
                   'step 71/100  0.8 steps/s  ETA 0:00:38']


def test_curves_are_redrawn_at_most_every_30_s_and_at_the_end(monkeypatch, tmp_path):
  from allconv_jax import history, selection, writers  # pylint: disable=g-import-not-at-top
  drawn, clock = [], iter([0.0, 0.0, 10.0, 31.0, 31.0, 40.0, 41.0])
  monkeypatch.setattr(writers.time, 'monotonic', lambda: next(clock))
  monkeypatch.setattr(reporting, 'plot_curves', lambda rows, *_, **__: drawn.append(
      rows[-1]['step']))
  run = types.SimpleNamespace(
      workdir=str(tmp_path), total_steps=50,
      selection=selection.Selection(has_validation=False, moving_average=False),
      config=ml_collections.ConfigDict(dict(model='m', dataset=dict(name='d'))),
      batches=types.SimpleNamespace(steps_per_epoch=10))
  record = history.History(run, None, writers.for_run(run, str(tmp_path), files_too=True,
                                                      log=False))
  for step in (10, 20, 30, 40, 50):  # At t = 0, 10, 31, 40 and 41 s.
    record.add(dict(dict.fromkeys(reporting.COLUMNS, 0.5), epoch=step // 10, step=step))
    record.write()
  assert drawn == [10, 30, 50]
  assert [r['step'] for r in reporting.read_csv(tmp_path / 'metrics.csv')] == [
      10, 20, 30, 40, 50]
