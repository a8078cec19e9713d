"""The tables and plots of `table3.py`, from the runs it selected among.

Apart from the runner so that it reads as training and choosing alone; the
selection these draw from is `table3.select`'s: per network, every rate's
final validation and test accuracies over seeds and the rate chosen on
validation.
"""

import math
import os

import common

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

PAPER = common.config_module('paper')  # Its Table 3.

_PREFIX = {'model': 'Model ', 'strided_cnn': 'Strided-CNN-',
           'convpool_cnn': 'ConvPool-CNN-', 'all_cnn': 'All-CNN-'}


def _variant(network: str) -> str:
  return network.rsplit('_', 1)[0]  # 'all_cnn_c' -> 'all_cnn'.


def label(network: str) -> str:
  return _PREFIX[_variant(network)] + network[-1].upper()  # 'All-CNN-C'.


def table_order(networks) -> list[str]:
  """The paper's order: by base model, then plain, Strided, ConvPool, All."""
  variants = list(_PREFIX)
  return sorted(networks,
                key=lambda n: (n[-1], variants.index(_variant(n))))


def _error(accuracies) -> str:
  return common.format_mean_std([1 - a for a in accuracies], digits=2)


def tables(selection: dict, chance: float, margin: float,
           dataset: str) -> list[str]:
  """The Markdown blocks: chosen rates, the grid, failures, per variant."""
  paper_column = ('paper, CIFAR-10 (other data: orientation only)'
                  if dataset != 'cifar10' else 'paper')
  main = [f'| network | rate (chosen on validation) | seeds | final '
          f'validation acc. (%) | final test error (%) | {paper_column}: '
          'test error (%) |', '|---|---:|---:|---:|---:|---:|']
  for network, chosen in selection.items():
    cell = chosen['grid'][chosen['learning_rate']]
    main.append(f"| {label(network)} | {chosen['learning_rate']:g} | "
                f"{len(cell['seeds'])} | "
                f"{common.format_mean_std(cell['validation'])} | "
                f"{_error(cell['test'])} | {PAPER.TEST_ERROR[network]:.2f} |")
  rates = sorted({lr for c in selection.values() for lr in c['grid']},
                 reverse=True)
  grid = ['Mean ± std over seeds of the final validation accuracy (%) at '
          'every rate; the chosen rate in bold; [d: runs that diverged, c: '
          'runs that never left chance]:', '',
          '| network | ' + ' | '.join(f'lr {lr:g}' for lr in rates) + ' |',
          '|---|' + '---:|' * len(rates)]
  for network, chosen in selection.items():
    cells = []
    for lr in rates:
      cell = chosen['grid'].get(lr)
      if cell is None:
        cells.append('-')
        continue
      text = common.format_mean_std(cell['validation'])
      if lr == chosen['learning_rate']:
        text = f'**{text}**'
      marks = [f'{n} {k}' for n, k in ((len(cell['diverged']), 'd'),
                                       (len(cell['at_chance']), 'c')) if n]
      cells.append(text + (f" [{', '.join(marks)}]" if marks else ''))
    grid.append(f'| {label(network)} | ' + ' | '.join(cells) + ' |')
  cells = [c for s in selection.values() for c in s['grid'].values()]
  runs = sum(len(c['seeds']) for c in cells)
  diverged = sum(len(c['diverged']) for c in cells)
  stuck = sum(len(c['at_chance']) for c in cells)
  failures = (f'Of {runs} runs, {diverged} diverged (a non-finite loss; '
              'counted as chance accuracy, '
              f'{100 * chance:.0f}%, in the means) and {stuck} finished at '
              f'most {100 * margin:.0f} points above chance in final '
              'validation accuracy. Errors are 100 - accuracy; the std is '
              'the sample std (n - 1) over seeds.')
  return ['\n'.join(main), '\n'.join(grid), failures,
          by_variant(selection, rates)]


def by_variant(selection: dict, rates: list[float]) -> str:
  """Failed runs (diverged or never left chance) per variant and rate.

  The first reference found its Strided-, ConvPool- and All-CNN-C stuck
  more often than the base models A, B and C; the "Model" row pools exactly
  those three, and the grid gives each C variant's count.
  """
  variants = [v for v in _PREFIX if any(_variant(n) == v for n in selection)]
  lines = ['Runs that diverged or never left chance, of all runs, per '
           "variant (its networks' runs pooled) and rate:", '',
           '| variant | ' + ' | '.join(f'lr {lr:g}' for lr in rates)
           + ' | all rates |', '|---|' + '---:|' * (len(rates) + 1)]
  for variant in variants:
    failed, total = [], []
    for lr in rates:
      cells = [s['grid'][lr] for n, s in selection.items()
               if _variant(n) == variant and lr in s['grid']]
      failed.append(sum(len(c['diverged']) + len(c['at_chance'])
                        for c in cells))
      total.append(sum(len(c['seeds']) for c in cells))
    counts = [f'{f} of {t}' for f, t in zip(failed, total)]
    counts.append(f'{sum(failed)} of {sum(total)}')
    name = _PREFIX[variant].rstrip(' -')
    lines.append(f'| {name} | ' + ' | '.join(counts) + ' |')
  return '\n'.join(lines)


def plot(runs: list[dict], selection: dict, chance: float, path: str,
         title: str) -> None:
  """Validation accuracy per epoch per rate, one panel per network.

  The mean over seeds is drawn thick, each seed faintly beneath it.
  """
  columns = min(4, len(selection))
  rows = math.ceil(len(selection) / columns)
  fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.2 * rows),
                           squeeze=False)
  rates = sorted({r['learning_rate'] for r in runs}, reverse=True)
  for ax, (network, chosen) in zip(axes.flat, selection.items()):
    for index, lr in enumerate(rates):
      cell = [r['rows'] for r in runs if r['network'] == network and
              math.isclose(r['learning_rate'], lr)]
      # Each seed faintly: a mean over one stuck and two trained seeds
      # would look like a network that plateaus at two thirds.
      for rows in cell:
        seed = [(r['epoch'], 100 * r['validation_accuracy']) for r in rows
                if r.get('validation_accuracy') is not None]
        ax.plot(*zip(*seed), color=f'C{index}', linewidth=0.6, alpha=0.35)
      epochs, means = common.mean_curve(cell, 'validation_accuracy')
      grid = chosen['grid'].get(lr, {})
      name = f'lr {lr:g}' + (f" ({len(grid['diverged'])} div.)"
                             if grid.get('diverged') else '')
      ax.plot(epochs, [100 * m for m in means], color=f'C{index}',
              marker='o', markersize=2, label=name,
              linewidth=2.5 if lr == chosen['learning_rate'] else 1)
    ax.axhline(100 * chance, color='grey', linestyle=':', linewidth=1)
    ax.set(title=label(network), xlabel='epoch',
           ylabel='validation acc. (%)', ylim=(0, 100))
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  for ax in axes.flat[len(selection):]:
    ax.axis('off')
  common.save_figure(fig, path, f'{title}\n(validation accuracy: thick the '
                     'mean over seeds, faint each seed; the chosen rate widest)')


def bars(selection: dict, path: str, title: str, dataset: str) -> None:
  """Each network's test error at its chosen rate (mean ± std over seeds,
  the seeds as dots) beside the paper's, in the paper's order."""
  networks = list(selection)
  x = np.arange(len(networks))
  errors = [[100 * (1 - a) for a in selection[n]['grid'][
      selection[n]['learning_rate']]['test']] for n in networks]
  means, stds = zip(*map(common.mean_std, errors))  # One seed: no std bar.
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(networks) + 2), 4))
  on = 'CIFAR-10' if dataset == 'cifar10' else dataset
  ax.bar(x - 0.2, means, 0.4, color='C0', yerr=stds, capsize=3,
         label=f'this library, {on} (mean ± std over seeds)')
  for i, e in enumerate(errors):
    ax.plot([x[i] - 0.2] * len(e), e, 'k.', markersize=3)
  ax.bar(x + 0.2, [PAPER.TEST_ERROR[n] for n in networks], 0.4, color='C7',
         label='the paper, CIFAR-10')
  ax.set_xticks(x, [label(n) for n in networks], rotation=30, ha='right')
  ax.set(ylabel='final test error (%)', ylim=(0, None))
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  common.save_figure(fig, path, title)


def write_gitignore(out: str) -> None:
  """Keeps each run's small text files; checkpoints and the rest stay out."""
  with open(os.path.join(out, '.gitignore'), 'w') as f:
    f.write('runs/*/*\n' + ''.join(
        f'!runs/*/{name}\n' for name in ('summary.json', 'diverged.json',
                                         'runner.json', 'members.csv',
                                         'members/'))
            + 'runs/*/members/*/*\n' + ''.join(
                f'!runs/*/members/*/{name}\n' for name in (
                    'metrics.csv', 'summary.json', 'config.json')))
