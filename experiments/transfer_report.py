"""The transfer study's numbers, tables and plots (see `transfer_study`).

`summarize` turns the runs into what ``results.json`` holds: every metric of
every (arm, rate) cell over the seeds, each arm at its rate chosen on
validation, the paired differences between arms, and every run's curve.
`write` draws ``results.md`` and the plots from that alone, so that
``--report_only`` redraws them from a committed ``results.json``.
"""

import itertools
import math
import os

import common

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker

ARMS = ('scratch', 'finetune', 'probe')
STYLE = {'scratch': 'C0', 'finetune': 'C3', 'probe': 'C2'}
# A run "stuck" at chance: final validation accuracy at most this far above.
STUCK_MARGIN = 0.1
COLUMNS = ('train_loss', 'train_accuracy', 'validation_loss',
           'validation_accuracy', 'test_loss', 'test_accuracy')
# name: (what it is, in results.md; percent?)
METRICS = {
    'first_train_loss': ('train loss, epoch 1 (mean over its steps)', False),
    'first_validation_accuracy': ('val. acc. after epoch 1 (%)', True),
    'first_test_accuracy': ('test acc. after epoch 1 (%)', True),
    'mean_validation_accuracy': ('val. acc., mean over epochs (%)', True),
    'final_validation_accuracy': ('final val. acc. (%)', True),
    'final_validation_loss': ('final val. loss', False),
    'final_test_accuracy': ('final test acc. (%)', True),
    'final_test_loss': ('final test loss', False),
    'selected_test_accuracy': ('test acc. at the best val. epoch (%)', True),
    'stuck': (f'runs stuck (final val. acc. <= chance + {100 * STUCK_MARGIN:g})',
              False),
}
PAIRED = ('first_test_accuracy', 'final_validation_accuracy',
          'final_test_accuracy')


def run_metrics(run: dict, chance: float) -> dict:
  """A run's metrics; a diverged run's final accuracies are chance."""
  rows, summary = run['rows'], run['summary']
  out = {}
  if rows:
    out.update(first_train_loss=rows[0]['train_loss'],
               first_validation_accuracy=rows[0]['validation_accuracy'],
               first_test_accuracy=rows[0]['test_accuracy'])
  if summary is None:
    return dict(out, final_validation_accuracy=chance, final_test_accuracy=chance,
                stuck=1.0)
  return dict(out, final_validation_accuracy=rows[-1]['validation_accuracy'],
              final_validation_loss=rows[-1]['validation_loss'],
              final_test_accuracy=rows[-1]['test_accuracy'],
              final_test_loss=rows[-1]['test_loss'],
              selected_test_accuracy=summary['selected_test_accuracy'],
              mean_validation_accuracy=float(np.mean(
                  [r['validation_accuracy'] for r in rows])),
              stuck=float(rows[-1]['validation_accuracy'] <= chance + STUCK_MARGIN))


def stats(values: list[float]) -> dict:
  mean, std = common.mean_std(values)
  return dict(mean=mean, std=std, values=values)


def summarize(runs: list[dict], sources: list[dict], rates: list[float],
              sizes: dict) -> dict:
  """What results.json holds (see the module docstring)."""
  chance = 1 / sizes['classes']
  cells = {}
  for run in runs:
    key = (run['subset'], run['arm'], run['learning_rate'])
    cells.setdefault(key, []).append(run)
  grid = []
  for (subset, arm, lr), group in sorted(cells.items(), key=lambda kv: (
      kv[0][0], ARMS.index(kv[0][1]), kv[0][2])):
    group.sort(key=lambda r: r['seed'])
    per_run = [run_metrics(r, chance) for r in group]
    grid.append(dict(subset=subset, arm=arm, learning_rate=lr,
                     seeds=[r['seed'] for r in group],
                     diverged=[r['seed'] for r in group if r['summary'] is None],
                     metrics={m: stats([p[m] for p in per_run if m in p])
                              for m in METRICS}))
  chosen = {}
  for cell in grid:
    key = (cell['subset'], cell['arm'])
    m = cell['metrics']
    score = (m['final_validation_accuracy']['mean'],
             -np.nan_to_num(m['final_validation_loss']['mean'], nan=np.inf))
    if key not in chosen or score > chosen[key][0]:
      chosen[key] = (score, cell)
  arms = [cell for _, cell in chosen.values()]
  paired = []
  for subset in sorted({c['subset'] for c in arms}):
    by_arm = {c['arm']: c for c in arms if c['subset'] == subset}
    for a, b in itertools.combinations([x for x in ARMS if x in by_arm], 2):
      for metric in PAIRED:
        ma, mb = (dict(zip(by_arm[x]['seeds'], by_arm[x]['metrics'][metric]['values']))
                  for x in (b, a))
        seeds = sorted(set(ma) & set(mb))
        diff = [ma[s] - mb[s] for s in seeds]
        paired.append(dict(subset=subset, pair=f'{b} - {a}', metric=metric,
                           seeds=seeds, **stats(diff),
                           ahead=sum(d > 0 for d in diff),
                           behind=sum(d < 0 for d in diff)))
  curves = [dict(subset=r['subset'], arm=r['arm'], learning_rate=r['learning_rate'],
                 seed=r['seed'], status=r['status'],
                 rows=[{'epoch': row['epoch'], **{c: row[c] for c in COLUMNS}}
                       for row in r['rows']]) for r in runs]
  return dict(sizes=sizes, learning_rates=rates, chance=chance, arms=arms,
              grid=grid, paired=paired, runs=curves,
              sources=[dict(seed=s['seed'], subset=s['subset'],
                            workdir=os.path.relpath(s['workdir'], common.ROOT),
                            summary=s['summary']) for s in sources])


def _fmt(stat: dict, percent: bool, name: str = '') -> str:
  values = [v for v in stat['values'] if v is not None]
  if name == 'stuck':
    return f'{int(sum(values))} of {len(values)}'
  if percent:
    return common.format_mean_std(values)
  return common.format_mean_std(values, scale=1, digits=3)


def arm_table(cells: list[dict], names: list[str]) -> str:
  lines = ['| target | arm | rate | seeds | ' + ' | '.join(
      METRICS[n][0] for n in names) + ' |', '|---|---|---:|---:|' +
           '---:|' * len(names)]
  for c in cells:
    lines.append(f"| {c['subset']} | {c['arm']} | {c['learning_rate']:g} | "
                 f"{len(c['seeds'])} | " + ' | '.join(
                     _fmt(c['metrics'][n], METRICS[n][1], n) for n in names) + ' |')
  return '\n'.join(lines)


def paired_table(paired: list[dict]) -> str:
  lines = ['| target | difference | metric | per seed (points) | mean ± std '
           '(points) | std / sqrt(n) | seeds ahead / behind |',
           '|---|---|---|---|---:|---:|---:|']
  for p in paired:
    n = len(p['values'])
    lines.append(
        f"| {p['subset']} | {p['pair']} | {METRICS[p['metric']][0]} | "
        + ', '.join(f'{100 * v:+.1f}' for v in p['values'])
        + f" | {common.format_mean_std(p['values'])} | "
        f"{100 * p['std'] / math.sqrt(n) if n > 1 else math.nan:.1f} | "
        f"{p['ahead']} / {p['behind']} |")
  return '\n'.join(lines)


def noise_text(data: dict) -> str:
  """How large a difference is on splits of these sizes (binomial)."""
  lines = []
  for split in ('validation', 'test'):
    n = data['sizes'][split]
    ses = []
    for c in data['arms']:
      p = c['metrics'][f'final_{split}_accuracy']['mean']
      ses.append(f"{c['arm']} {100 * math.sqrt(p * (1 - p) / n):.1f}")
    lines.append(f'- {split}: {n} images, one image = {100 / n:.2f} points; '
                 'binomial standard error of one run\'s accuracy at each '
                 f"arm's mean: {', '.join(ses)} points")
  lines.append('- Two runs evaluated on the same images differ by more than '
               'the sampling noise of the split when the difference exceeds '
               'about 2 sqrt(2) standard errors. The same images serve every '
               'seed, so averaging seeds shrinks the seeds\' spread, not the '
               "split's own sampling error: a ranking on 100 validation "
               'images cannot resolve differences of a few points.')
  return '\n'.join(lines)


def source_table(sources: list[dict]) -> str:
  lines = ['| seed | source subset | selected epoch / epochs | selected val. '
           'acc. (%) | its test acc. (%) |', '|---:|---|---:|---:|---:|']
  for s in sources:
    d = s['summary']
    if d:
      lines.append(f"| {s['seed']} | {s['subset']} | {d['selected_epoch']} / "
                   f"{d['epochs']} | {100 * d['selected_validation_accuracy']:.1f}"
                   f" | {100 * d['selected_test_accuracy']:.1f} |")
  return '\n'.join(lines)


def _band(ax, runs, column, scale, **style):
  epochs = sorted({row['epoch'] for r in runs for row in r['rows']})
  values = [[row[column] * scale for r in runs for row in r['rows']
             if row['epoch'] == e and math.isfinite(row[column])] for e in epochs]
  mean = np.array([np.mean(v) for v in values])
  std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
  ax.plot(epochs, mean, marker='o', markersize=3, **style)
  ax.fill_between(epochs, mean - std, mean + std, alpha=0.2,
                  color=style.get('color'))


def plot_curves(data: dict, subset: str, path: str, title: str) -> None:
  """Mean ± std over seeds per epoch of each arm at its chosen rate."""
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
  for cell in data['arms']:
    if cell['subset'] != subset:
      continue
    runs = [r for r in data['runs'] if r['subset'] == subset and r['arm'] ==
            cell['arm'] and r['learning_rate'] == cell['learning_rate']]
    style = dict(color=STYLE[cell['arm']], label=f"{cell['arm']}, lr "
                 f"{cell['learning_rate']:g} ({len(runs)} seeds)")
    _band(axes[0], runs, 'validation_accuracy', 100, **style)
    _band(axes[1], runs, 'test_accuracy', 100, **style)
    _band(axes[2], runs, 'train_loss', 1, **style)
  for ax in axes[:2]:
    ax.axhline(100 * data['chance'], color='gray', lw=0.8, ls=':', label='chance')
  axes[2].axhline(-math.log(data['chance']), color='gray', lw=0.8, ls=':',
                  label='ln k (uniform guess)')
  for ax, what in zip(axes, ('validation accuracy (%)', 'test accuracy (%)',
                             'training loss (mean over the epoch)')):
    ax.set(xlabel='epoch', ylabel=what, title=what)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  common.save_figure(fig, path, title)


def plot_rates(data: dict, subset: str, path: str, title: str) -> None:
  """Final validation accuracy per rate of the grid: how each arm chose."""
  fig, ax = plt.subplots(figsize=(6.5, 4.3))
  for arm in ARMS:
    cells = [c for c in data['grid'] if c['subset'] == subset and c['arm'] == arm]
    if not cells:
      continue
    m = [c['metrics']['final_validation_accuracy'] for c in cells]
    ax.errorbar([c['learning_rate'] for c in cells], [100 * s['mean'] for s in m],
                yerr=[100 * np.nan_to_num(s['std']) for s in m], marker='o',
                capsize=3, color=STYLE[arm], label=arm)
  for c in data['arms']:
    if c['subset'] == subset:
      ax.plot(c['learning_rate'], 100 * c['metrics']['final_validation_accuracy']['mean'],
              marker='*', markersize=14, color=STYLE[c['arm']], ls='none')
  ax.axhline(100 * data['chance'], color='gray', lw=0.8, ls=':', label='chance')
  ax.set(xscale='log', xlabel='learning rate', ylabel='final validation accuracy (%)',
         title='the rate of each arm, chosen on validation (star)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  common.save_figure(fig, path, title)


def write(out: str, data: dict) -> None:
  """results.md, results.json and the plots, from `summarize`'s data."""
  data = dict(data)
  setup, command_line = data.pop('setup'), data.pop('command')
  images = []
  for subset in sorted({c['subset'] for c in data['arms']}):
    for kind, draw in (('curves', plot_curves), ('rates', plot_rates)):
      name = f'transfer_{subset}_{kind}.png'
      seeds = max(len(c['seeds']) for c in data['arms'])
      draw(data, subset, os.path.join(out, name),
           f'{subset}: scratch, fine-tuning and linear probe; mean ± std '
           f'over {seeds} seeds')
      images.append(name)
  first = ['first_train_loss', 'first_validation_accuracy', 'first_test_accuracy',
           'mean_validation_accuracy']
  final = ['final_validation_accuracy', 'final_test_accuracy',
           'selected_test_accuracy', 'final_test_loss', 'stuck']
  blocks = [
      'Each arm at its rate chosen on validation (highest mean final '
      'validation accuracy over the seeds; mean ± sample std over seeds):',
      arm_table(data['arms'], first), arm_table(data['arms'], final),
      'Paired by seed (each arm at its own chosen rate), in points of '
      'accuracy:', paired_table(data['paired']),
      'How large a difference is, given the sizes of the splits:',
      noise_text(data),
      'Every arm at every rate of the grid:',
      arm_table(data['grid'], ['first_test_accuracy', 'final_validation_accuracy',
                               'final_test_accuracy', 'stuck'])]
  if data['sources']:
    blocks += ["Sources (configs/digits.py on the other half, one per seed; "
               "the checkpoint of best validation accuracy is transferred):",
               source_table(data['sources'])]
  common.write_results(
      out, title='Transfer: scratch, fine-tuning and linear probe',
      script='transfer_study.py', setup=setup, command_line=command_line,
      tables=blocks, images=images, data=data)
