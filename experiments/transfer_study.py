"""Transfer vs scratch on two 10-class subsets, per learning rate and seed.

The first reference's study (its Figures 3-6): All-CNN-C trained on a source
task is copied into a network with a new classifier (random kernel, zero
bias) and fine-tuned on a target subset with SGD (momentum 0.9, weight decay
0.001) at each constant learning rate of `configs/transfer_cifar100.py`'s
sweep (0.0025, 0.001, 0.0005); the same runs from a random initialization are
the scratch baseline. Every (subset, rate, arm) runs once per seed (`--seeds`),
each a `train.train_and_evaluate` in its own workdir
``<workdir_root>/seed<seed>/<subset>_lr<rate>_<arm>`` (skipped when finished,
resumed when interrupted; see `common.train_run`). Every run holds out
`--validation_size` training images of its subset (stratified, the same for
every seed); anything chosen is chosen on them: the rate of each arm (highest
mean final validation accuracy over seeds) and, in the library, the checkpoint
of each source. The test split is only reported.

Writes to `--out`: ``transfer_<subset>.png`` per target subset (mean over
seeds of the validation accuracy and loss per epoch: one colour per rate,
transfer solid, scratch dashed), ``results.md`` (mean ± sample std over seeds
per subset, rate and arm) and ``results.json``.

Paper scale: CIFAR-10 -> the CIFAR-100 subsets ``subset1`` (vehicles) and
``subset2`` (flowers, fruit and vegetables; this project's choice of
subsets: the first reference's were given to its authors and are not
listed), 100 epochs per run, from an All-CNN-C trained with
``configs/paper.py:all_cnn_c`` (a GPU job; ``{seed}`` in the path, if any,
is replaced by each seed, so that every seed has its own source):

  python experiments/transfer_study.py --dataset=cifar100 \\
      --source_workdir=workdirs/all_cnn_c_seed{seed} \\
      --archive=/path/to/cifar-100-binary.tar.gz

CPU budget, offline on scikit-learn's digits: for each target subset
(``subset2`` = digits 5-9, ``subset1`` = 0-4) the source is an All-CNN-C
pretrained here, per seed, on the other half of the digits (with
`configs/digits.py`'s protocol). Batch norm is on in source, transfer and
scratch alike: plain SGD without it stalls on digits (see
`configs/digits.py`). Full width, three seeds, the largest rate of the sweep
(about 20 minutes on 2 shared cores):

  python experiments/transfer_study.py --dataset=digits \\
      --learning_rates=0.0025 --epochs=3 --pretrain_epochs=2
"""

import math
import os
import sys

import common

import matplotlib.pyplot as plt
from absl import app, flags

from allconv_jax import datasets, stopping
from allconv_jax.errors import UserError

digits = common.config_module('digits')
transfer_cifar100 = common.config_module('transfer_cifar100')

SOURCE = {'digits': 'the other half of the digits (pretrained here per seed)',
          'cifar100': 'CIFAR-10 (--source_workdir)'}
# About 15% of a digits subset (~670 images), 10% of a CIFAR-100 subset.
VALIDATION_SIZE = {'digits': 100, 'cifar100': 500}
# On digits, each target subset's source task is the other subset.
OTHER = {'subset1': 'subset2', 'subset2': 'subset1'}
ARMS = ('transfer', 'scratch')

FLAGS = flags.FLAGS
flags.DEFINE_enum('dataset', 'digits', list(SOURCE),
                  'digits (offline; pretrains its own sources) or cifar100 '
                  '(needs --source_workdir and --archive or prepared data).')
flags.DEFINE_string('source_workdir', None, 'cifar100: the workdir of an '
                    'All-CNN-C trained on CIFAR-10; {seed} is replaced by '
                    'the seed.')
flags.DEFINE_string('archive', None,
                    'Local copy of the official cifar-100-binary.tar.gz.')
flags.DEFINE_string('data_dir', None, 'tensorflow-datasets data directory.')
flags.DEFINE_list('subsets', list(transfer_cifar100.SUBSETS),
                  'Target subsets.')
flags.DEFINE_list('learning_rates',
                  [str(lr) for lr in transfer_cifar100.LEARNING_RATES],
                  'Learning rates of the sweep to run.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of every run.')
flags.DEFINE_integer('epochs', None, 'Epochs per target run (default: the '
                     "config's 100).")
flags.DEFINE_float('width', 1.0, 'Multiplier on the 96/192 channels (must '
                   "be the source's).")
flags.DEFINE_bool('batch_norm', None, "Batch norm (must be the source's; "
                  'default: on for digits, off for cifar100).')
flags.DEFINE_integer('validation_size', None, 'Training images of each '
                     'subset held out for every selection (default: 100 on '
                     'digits, 500 on cifar100).')
flags.DEFINE_integer('pretrain_epochs', 5, 'digits: epochs of each source.')
flags.DEFINE_string('workdir_root', None, 'Where the runs go, one workdir per '
                    'run (default: workdirs/transfer_<dataset>).')


def batch_norm() -> bool:
  """--batch_norm, or its default for the dataset."""
  if FLAGS.batch_norm is None:
    return FLAGS.dataset == 'digits'
  return FLAGS.batch_norm


def validation_size() -> int:
  return FLAGS.validation_size or VALIDATION_SIZE[FLAGS.dataset]


def pretrain_config(subset: str, seed: int):
  """digits: the source run, configs/digits.py on one half of the digits."""
  config = digits.get_config()
  config.dataset.classes = subset
  config.dataset.validation_size = validation_size()
  config.width = FLAGS.width
  config.batch_norm = batch_norm()
  config.num_epochs = FLAGS.pretrain_epochs
  config.seed = seed
  return config


def target_config(overrides: dict, source: str, seed: int):
  """The reference's transfer protocol with one run's overrides of the sweep."""
  config = transfer_cifar100.get_config()
  config.width = FLAGS.width
  config.batch_norm = batch_norm()
  config.dataset.archive = FLAGS.archive
  config.dataset.data_dir = FLAGS.data_dir
  config.dataset.validation_size = validation_size()
  config.seed = seed
  if FLAGS.epochs:
    config.num_epochs = FLAGS.epochs
  if FLAGS.dataset == 'digits':
    # The source's input pipeline and head (configs/digits.py): batches of
    # 32 (the ~570 training images of a subset make 4 batches of 128),
    # shifts, no flips, no class ReLU, and no dropout with batch norm.
    source_config = pretrain_config('subset1', seed)
    config.dataset.name = 'digits'
    config.preprocess = source_config.preprocess
    config.augment = source_config.augment
    config.batch_size = source_config.batch_size
    config.class_relu = source_config.class_relu
    config.dropout = not config.batch_norm
  config.transfer.from_workdir = source
  config.update_from_flattened_dict(overrides)  # Scratch unsets the source.
  return config


def run_all(root: str, learning_rates: list[float], seeds: list[int]):
  """Every source and sweep run, seed by seed; returns (sources, runs)."""
  plan = []
  for seed in seeds:
    for name, overrides in transfer_cifar100.sweep():
      lr = overrides['learning_rate']
      if overrides['dataset.classes'] in FLAGS.subsets and any(
          math.isclose(lr, wanted) for wanted in learning_rates):
        plan.append((seed, name, overrides))
  sources, runs = [], []
  for index, (seed, name, overrides) in enumerate(plan, 1):
    subset = overrides['dataset.classes']
    seed_root = os.path.join(root, f'seed{seed}')
    if FLAGS.dataset == 'digits':
      source = os.path.join(seed_root, f'pretrain_{OTHER[subset]}')
      if not any(s['workdir'] == source for s in sources):
        record = common.train_run(pretrain_config(OTHER[subset], seed), source)
        sources.append(dict(record, subset=OTHER[subset], seed=seed,
                            workdir=source))
    else:
      source = FLAGS.source_workdir.replace('{seed}', str(seed))
    arm = 'scratch' if 'transfer.from_workdir' in overrides else 'transfer'
    record = common.train_run(target_config(overrides, source, seed),
                              os.path.join(seed_root, name))
    runs.append(dict(record, name=name, subset=subset, arm=arm, seed=seed,
                     learning_rate=overrides['learning_rate']))
    print(f'[{index}/{len(plan)}] seed {seed} {name}: {record["status"]}',
          flush=True)
  return sources, runs


def _final(run: dict, key: str) -> float:
  """A run's final validation or test accuracy; chance if it diverged."""
  if run['summary'] is None:
    return 1 / len(datasets.SUBSETS[FLAGS.dataset, run['subset']])
  return run['summary'][key]


def cells(runs: list[dict]) -> list[dict]:
  """Runs grouped by (subset, rate, arm), with their per-seed values.

  A diverged run counts as chance accuracy in the final validation and test
  accuracies, and is left out of the first epoch's accuracy and the loss.
  """
  groups = {}
  for run in runs:
    key = (run['subset'], run['learning_rate'], run['arm'])
    groups.setdefault(key, []).append(run)
  out = []
  for (subset, lr, arm), group in groups.items():
    finished = [r for r in group if r['summary'] is not None]
    out.append(dict(
        subset=subset, learning_rate=lr, arm=arm,
        seeds=[r['seed'] for r in group],
        diverged=[r['seed'] for r in group if r['summary'] is None],
        first_test=[r['rows'][0]['test_accuracy'] for r in finished],
        validation=[_final(r, 'final_validation_accuracy') for r in group],
        test=[_final(r, 'final_test_accuracy') for r in group],
        test_loss=[r['rows'][-1]['test_loss'] for r in finished]))
  return out


def chosen_rates(grid: list[dict]) -> dict:
  """(subset, arm) -> the cell of its highest mean final validation accuracy."""
  best = {}
  for cell in grid:
    key = (cell['subset'], cell['arm'])
    score = sum(cell['validation']) / max(1, len(cell['validation']))
    if key not in best or score > best[key][0]:
      best[key] = (score, cell)
  return {key: cell for key, (_, cell) in best.items()}


def table(grid: list[dict]) -> str:
  """Mean ± std over seeds of every (subset, rate, arm)."""
  f = common.format_mean_std
  lines = ['| target | learning rate | start | seeds | test acc. after epoch 1 '
           '(%) | final validation acc. (%) | final test acc. (%) | final '
           'test loss | diverged |', '|---|---:|---|---:|---:|---:|---:|---:|'
           '---:|']
  for c in grid:
    lines.append(f"| {c['subset']} | {c['learning_rate']:g} | {c['arm']} | "
                 f"{len(c['seeds'])} | {f(c['first_test'])} | "
                 f"{f(c['validation'])} | {f(c['test'])} | "
                 f"{f(c['test_loss'], scale=1, digits=3)} | "
                 f"{len(c['diverged'])} |")
  return '\n'.join(lines)


def chosen_table(grid: list[dict], runs: list[dict]) -> str:
  """Each arm at its rate chosen on validation; the paired difference."""
  chosen = chosen_rates(grid)
  lines = ['Each arm at the rate of its highest mean final validation '
           'accuracy; the difference is transfer - scratch in final test '
           'accuracy, paired by seed (each at its own chosen rate):', '',
           '| target | arm | rate | final validation acc. (%) | final test '
           'acc. (%) |', '|---|---|---:|---:|---:|']
  for (subset, arm), c in sorted(chosen.items()):
    lines.append(f"| {subset} | {arm} | {c['learning_rate']:g} | "
                 f"{common.format_mean_std(c['validation'])} | "
                 f"{common.format_mean_std(c['test'])} |")
  for subset in sorted({s for s, _ in chosen}):
    if (subset, 'transfer') not in chosen or (subset, 'scratch') not in chosen:
      continue
    final = {}
    for arm in ARMS:
      lr = chosen[subset, arm]['learning_rate']
      final[arm] = {r['seed']: _final(r, 'final_test_accuracy') for r in runs
                    if r['subset'] == subset and r['arm'] == arm and
                    r['learning_rate'] == lr}
    paired = [final['transfer'][s] - final['scratch'][s]
              for s in final['transfer'] if s in final['scratch']]
    lines.append(f'| {subset} | transfer - scratch | | | '
                 f'{common.format_mean_std(paired)} points |')
  return '\n'.join(lines)


def source_table(sources: list[dict]) -> str:
  """The digits sources, mean ± std over seeds."""
  lines = ['Sources (configs/digits.py on the other half, one per seed; the '
           'checkpoint of best validation accuracy is transferred):', '',
           '| source subset | seeds | selected validation acc. (%) | its test '
           'acc. (%) |', '|---|---:|---:|---:|']
  for subset in sorted({s['subset'] for s in sources}):
    done = [s['summary'] for s in sources
            if s['subset'] == subset and s['summary'] is not None]
    validation = [d['selected_validation_accuracy'] for d in done]
    test = [d['selected_test_accuracy'] for d in done]
    lines.append(f'| {subset} | {len(done)} | '
                 f'{common.format_mean_std(validation)} | '
                 f'{common.format_mean_std(test)} |')
  return '\n'.join(lines)


def plot(runs: list[dict], subset: str, path: str, title: str) -> None:
  """Mean validation curves: transfer solid, scratch dashed, colour per rate."""
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
  rates = sorted({r['learning_rate'] for r in runs}, reverse=True)
  for lr in rates:
    for arm in ARMS:
      rows = [r['rows'] for r in runs if r['subset'] == subset and
              r['arm'] == arm and r['learning_rate'] == lr]
      style = dict(color=f'C{rates.index(lr)}', marker='o', markersize=3,
                   linestyle='-' if arm == 'transfer' else '--',
                   label=f'{arm}, lr {lr:g} ({len(rows)} seeds)')
      epochs, acc = common.mean_curve(rows, 'validation_accuracy')
      ax_acc.plot(epochs, [100 * a for a in acc], **style)
      epochs, loss = common.mean_curve(rows, 'validation_loss')
      ax_loss.plot(epochs, loss, **style)
  common.finish_axes(ax_acc, ax_loss)
  ax_acc.set(ylabel='validation accuracy (%)', title='validation accuracy '
             '(mean over seeds)')
  ax_loss.set(ylabel='validation cross-entropy loss',
              title='validation loss (mean over seeds)')
  common.save_figure(fig, path, title)


def main(argv):
  del argv
  try:
    learning_rates = [float(lr) for lr in FLAGS.learning_rates]
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f'--learning_rates or --seeds: {e}')
  unknown = [s for s in FLAGS.subsets if s not in transfer_cifar100.SUBSETS]
  if unknown:
    raise app.UsageError(f'--subsets: unknown {unknown}; allowed: '
                         f'{transfer_cifar100.SUBSETS}')
  if FLAGS.dataset == 'cifar100' and not FLAGS.source_workdir:
    raise app.UsageError('--source_workdir: needed with --dataset=cifar100')
  out = common.results_dir(f'transfer_{FLAGS.dataset}')
  root = FLAGS.workdir_root or os.path.join(common.ROOT, 'workdirs',
                                            f'transfer_{FLAGS.dataset}')
  try:
    sources, runs = run_all(root, learning_rates, seeds)
  except stopping.Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.exit(130)
  except UserError as e:  # E.g. no CIFAR-100 data, a mismatching source.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not runs:
    raise app.UsageError('--learning_rates: none is in the sweep '
                         f'{transfer_cifar100.LEARNING_RATES}')

  config = target_config({}, '', seeds[0])
  steps = next((r['rows'][0]['step'] for r in runs if r['rows']), None)
  seconds = [r['seconds'] for r in runs + sources if r['seconds']]
  setup = {
      'date': common.today(),
      'machine': common.machine(),
      'data': (f'{FLAGS.dataset}, target subsets {", ".join(FLAGS.subsets)}, '
               f'{validation_size()} training images of each held out for '
               'validation (stratified, the same for every seed) '
               f'({steps} steps of {config.batch_size} per epoch on '
               f'{runs[0]["subset"]}); source: {SOURCE[FLAGS.dataset]}'),
      'network': (f"all_cnn_c, width {FLAGS.width:g} x the paper's channels, "
                  f"batch norm {'on' if config.batch_norm else 'off'}, "
                  f"dropout {'on' if config.dropout else 'off'}"),
      'budget': (f'{config.num_epochs} epochs per run'
                 + (f', {FLAGS.pretrain_epochs} epochs per source'
                    if FLAGS.dataset == 'digits' else '')
                 + '; learning rates '
                 + ', '.join(f'{lr:g}' for lr in learning_rates)
                 + f' of the sweep {transfer_cifar100.LEARNING_RATES}'),
      'protocol': (f'SGD momentum {config.momentum:g}, weight decay '
                   f'{config.weight_decay:g}, constant learning rate; '
                   'transfer copies every layer but the classifier '
                   '(random kernel, zero bias) from the source\'s checkpoint '
                   'of best validation accuracy and fine-tunes all; scratch '
                   'starts from a random initialization (He uniform)'),
      'seeds': (f'{", ".join(map(str, seeds))}: each seed sets the source '
                'run, the target runs\' initialization, batch order and '
                'augmentation'),
      'wall time': (f'{sum(seconds) / 60:.0f} min of training over '
                    f'{len(seconds)} runs, timed by the runner'),
      'workdirs': os.path.relpath(root, common.ROOT),
  }
  if sources:
    setup['sources'] = (f'configs/digits.py (Adam one-cycle, batch norm) on '
                        f'the other subset, {FLAGS.pretrain_epochs} epochs')
  images = []
  for subset in FLAGS.subsets:
    name = f'transfer_{subset}.png'
    plot(runs, subset, os.path.join(out, name),
         f'{FLAGS.dataset} {subset}: transfer (solid) vs scratch (dashed), '
         f'width {FLAGS.width:g}, {len(seeds)} seeds')
    images.append(name)
  grid = cells(runs)
  blocks = [table(grid) + '\n\nMean ± sample std (n - 1) over seeds.',
            chosen_table(grid, runs)]
  if sources:
    blocks.append(source_table(sources))
  common.write_results(
      out, title=f'Transfer vs scratch on {FLAGS.dataset} subsets',
      script='transfer_study.py', setup=setup,
      command_line=common.command('transfer_study.py'), tables=blocks,
      images=images, data=dict(sources=sources, runs=runs, cells=grid))
  print(f'wrote {out}/{", ".join(images)}, results.md, results.json')


if __name__ == '__main__':
  app.run(main)
