"""The plot and the tables of `batch_studies.py`, from its results.json.

Apart from the training loop so that ``--replot`` redraws committed results
without training. A study's runs are one per (variant, seed); with several
seeds every number is the mean ± sample std over them and the curves are
means. Runs in results.json files written before seeds existed carry none
and count as one seed.
"""

import os
import sys

import common

import matplotlib.pyplot as plt
import numpy as np

# What init_study.py called its variants before it became a batch study.
_OLD_INIT_LABELS = {'lsuv': 'LSUV', 'glorot_normal': 'Glorot normal',
                    'he_uniform': 'He uniform',
                    'gaussian': 'Gaussian (std 0.01)'}


def label(run: dict) -> str:
  """The plot label of a run (older init-study runs name only ``init``)."""
  return run.get('label') or _OLD_INIT_LABELS[run['init']]


def by_variant(runs: list[dict]) -> list[tuple[str, list[dict]]]:
  """(label, that variant's runs over seeds), in the order run."""
  groups = {}
  for run in runs:
    groups.setdefault(label(run), []).append(run)
  return list(groups.items())


def _mean_points(group: list[dict], key: str):
  """Steps, and the mean and sample std (0 for one run) of `key` over the
  group's curves, where present."""
  steps = [p['step'] for p in group[0]['curve'] if p[key] is not None]
  values = np.array([[next(p[key] for p in run['curve'] if p['step'] == step)
                      for run in group] for step in steps])
  std = values.std(axis=1, ddof=1) if len(group) > 1 else np.zeros(len(steps))
  return steps, values.mean(axis=1), std


def plot(runs, path, title):
  """Loss and accuracy against step, one colour per variant: the mean over
  seeds, and for the test curves a band of ± one sample std."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
  for index, (name, group) in enumerate(by_variant(runs)):
    color = f'C{index}'
    for ax, key, style, scale, what in (
        (ax_loss, 'train_loss', '-', 1, 'train'),
        (ax_loss, 'test_loss', '--', 1, 'test'),
        (ax_acc, 'test_accuracy', '-', 100, 'test'),
        (ax_acc, 'train_accuracy', ':', 100, 'train')):
      steps, means, std = _mean_points(group, key)
      ax.plot(steps, scale * means, style, color=color, label=f'{name}, {what}')
      if what == 'test' and len(group) > 1:
        ax.fill_between(steps, scale * (means - std), scale * (means + std),
                        color=color, alpha=0.12, linewidth=0)
  seeds = len(by_variant(runs)[0][1])
  mean = f', mean of {seeds} seeds, test ± std' if seeds > 1 else ''
  ax_loss.set(xlabel='training step (batch)', ylabel='cross-entropy loss',
              title=f'loss (train: mean since previous point{mean})')
  ax_acc.set(xlabel='training step (batch)', ylabel='accuracy (%)',
             title=f'accuracy{mean}')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  common.save_figure(fig, path, title)


def table_steps(curve_steps, columns=6):
  """At most `columns` + 1 evaluated steps at a regular stride, and the last.

  The stride is a multiple of the evaluation interval, a round one (100,
  250, 500, ...) when there is one.
  """
  steps = [s for s in curve_steps if s > 0]
  if len(steps) <= columns:
    return steps
  interval, last = steps[0], steps[-1]
  multiples = range(interval, last + 1, interval)
  round_ones = [m for m in multiples
                if any(m == r * 10**k for k in range(7) for r in (1, 2, 5))]
  stride = next((m for m in (*round_ones, *multiples)
                 if last // m <= columns), last)
  return sorted({*range(stride, last + 1, stride), last} & {*steps})


def _cell(values, scale=100.0, digits=1) -> str:
  """One value as before seeds existed; several as mean ± std."""
  if len(values) == 1:
    return f'{scale * values[0]:.{digits}f}'
  return common.format_mean_std(values, scale=scale, digits=digits)


def _seconds(run: dict) -> float:
  """A run's wall time (earlier results.json: initialization + training)."""
  if 'seconds' in run:
    return run['seconds'] or 0.0
  return run['init_seconds'] + run['train_seconds']


def tables(runs, classes: int) -> list[str]:
  """The Markdown blocks of results.md: accuracies, chance, LSUV reports."""
  steps = table_steps([p['step'] for p in runs[0]['curve']])
  groups = by_variant(runs)
  seeds = len(groups[0][1])
  spread = (f'mean ± sample std over {seeds} seeds' if seeds > 1 else
            'one seed')
  lines = [f'Test accuracy (%) after a number of training batches ({spread}'
           '):', '',
           '| variant | ' + ' | '.join(f'step {s}' for s in steps)
           + ' | train loss (last window) | seconds |',
           '|---|' + '---:|' * (len(steps) + 2)]
  for name, group in groups:
    at = lambda run, step: next(p for p in run['curve'] if p['step'] == step)
    accs = ' | '.join(_cell([at(r, s)['test_accuracy'] for r in group])
                      for s in steps)
    loss = _cell([r['curve'][-1]['train_loss'] for r in group], 1, 3)
    lines.append(f'| {name} | {accs} | {loss} | '
                 f'{sum(_seconds(r) for r in group):.0f} |')
  blocks = ['\n'.join(lines), f'Chance level is {100 / classes:.0f}%.']
  if runs[0]['curve'][0]['step'] == 0:  # Results of the earlier own loop.
    blocks[-1] += ' Step 0 (before training):\n'
    for name, group in groups:
      blocks[-1] += (
          f'\n- {name}: test accuracy '
          f"{_cell([r['curve'][0]['test_accuracy'] for r in group])}%, test "
          f"loss {_cell([r['curve'][0]['test_loss'] for r in group], 1, 3)}")
  for name, group in groups:
    if group[0].get('lsuv_table'):
      seed = group[0].get('seed')
      which = f', seed {seed}' if seeds > 1 else ''
      blocks.append(f'LSUV report ({name}{which}):\n\n```\n'
                    f"{group[0]['lsuv_table']}\n```")
  return blocks


def write_outputs(slug: str, saved: dict, out: str) -> None:
  """The PNG, results.md and results.json of `saved` (setup, title, runs)."""
  png = f'{slug}.png'
  plot(saved['runs'], os.path.join(out, png), saved['title'])
  setup = dict(saved['setup'])
  # Older results.json files keep the command in the setup.
  command_line = saved.get('command') or setup.pop('command')
  setup.pop('command', None)
  common.write_results(
      out, title=saved['title'], script=os.path.basename(sys.argv[0]),
      setup=setup, command_line=command_line,
      tables=tables(saved['runs'], setup['classes']), images=[png],
      data=dict(title=saved['title'], runs=saved['runs']))
