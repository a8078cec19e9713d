"""Transfer vs scratch on two 10-class subsets, for each learning rate.

The first reference's study (its Figures 3-6): All-CNN-C trained on a source
task is copied into a network with a new classifier (random kernel, zero
bias) and fine-tuned on a target subset with SGD (momentum 0.9, weight decay
0.001) at each constant learning rate of `configs/transfer_cifar100.py`'s
sweep (0.0025, 0.001, 0.0005); the same runs from a random initialization are
the scratch baseline. Every run is one `train.train_and_evaluate` in its own
workdir under `--workdir_root` (resumed if it is there; the library's
transfer is ``config.transfer.from_workdir``), read back from its
metrics.csv. Writes to `--out`: ``transfer_<subset>.png`` per target subset
(test accuracy and loss per epoch: three learning rates, transfer solid,
scratch dashed), ``results.md`` and ``results.json``.

Paper scale: CIFAR-10 -> the CIFAR-100 subsets ``subset1`` (vehicles) and
``subset2`` (flowers, fruit and vegetables), 100 epochs per run, from an
All-CNN-C trained with `configs/all_cnn_c.py` (a GPU job):

  python experiments/transfer_study.py --dataset=cifar100 \\
      --source_workdir=workdirs/all_cnn_c \\
      --archive=/path/to/cifar-100-binary.tar.gz

CPU budget, offline on scikit-learn's digits: for each target subset
(``subset2`` = digits 5-9, ``subset1`` = 0-4) the source is an All-CNN-C
pretrained here on the other half of the digits (with `configs/digits.py`'s
protocol). Batch norm is on in source, transfer and scratch alike: plain SGD
without it stalls on digits (see `configs/digits.py`). About 15 minutes on 2
cores:

  python experiments/transfer_study.py --dataset=digits --width=0.5 \\
      --epochs=8 --pretrain_epochs=5
"""

import math
import os
import sys

# pylint: disable=g-import-not-at-top,wrong-import-position
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # Puts the repository root on sys.path.

import matplotlib.pyplot as plt
from absl import app, flags, logging

from allconv_jax import reporting, train
from allconv_jax.errors import UserError
from configs import digits, transfer_cifar100
# pylint: enable=g-import-not-at-top,wrong-import-position

SOURCE = {'digits': 'the other half of the digits (pretrained here)',
          'cifar100': 'CIFAR-10 (--source_workdir)'}
# On digits, each target subset's source task is the other subset.
OTHER = {'subset1': 'subset2', 'subset2': 'subset1'}

FLAGS = flags.FLAGS
flags.DEFINE_enum('dataset', 'digits', list(SOURCE),
                  'digits (offline; pretrains its own sources) or cifar100 '
                  '(needs --source_workdir and --archive or prepared data).')
flags.DEFINE_string('source_workdir', None, 'cifar100: the workdir of an '
                    'All-CNN-C trained on CIFAR-10 (configs/all_cnn_c.py).')
flags.DEFINE_string('archive', None,
                    'Local copy of the official cifar-100-binary.tar.gz.')
flags.DEFINE_string('data_dir', None, 'tensorflow-datasets data directory.')
flags.DEFINE_list('subsets', list(transfer_cifar100.SUBSETS),
                  'Target subsets.')
flags.DEFINE_list('learning_rates',
                  [str(lr) for lr in transfer_cifar100.LEARNING_RATES],
                  'Learning rates of the sweep to run.')
flags.DEFINE_integer('epochs', None, 'Epochs per target run (default: the '
                     "config's 100).")
flags.DEFINE_float('width', 1.0, 'Multiplier on the 96/192 channels (must '
                   "be the source's).")
flags.DEFINE_bool('batch_norm', None, "Batch norm (must be the source's; "
                  'default: on for digits, off for cifar100).')
flags.DEFINE_integer('pretrain_epochs', 5, 'digits: epochs of each source.')
flags.DEFINE_string('workdir_root', None, 'Where the runs go, one workdir per '
                    'run (default: workdirs/transfer_<dataset>).')


def batch_norm() -> bool:
  """--batch_norm, or its default for the dataset."""
  if FLAGS.batch_norm is None:
    return FLAGS.dataset == 'digits'
  return FLAGS.batch_norm


def pretrain_config(subset: str):
  """digits: the source run, configs/digits.py on one half of the digits."""
  config = digits.get_config()
  config.dataset.classes = subset
  config.width = FLAGS.width
  config.batch_norm = batch_norm()
  config.num_epochs = FLAGS.pretrain_epochs
  return config


def target_config(overrides: dict, source: str):
  """The reference's transfer protocol with one run's overrides of the sweep."""
  config = transfer_cifar100.get_config()
  config.width = FLAGS.width
  config.batch_norm = batch_norm()
  config.dataset.archive = FLAGS.archive
  config.dataset.data_dir = FLAGS.data_dir
  if FLAGS.epochs:
    config.num_epochs = FLAGS.epochs
  if FLAGS.dataset == 'digits':
    # The source's input pipeline and head (configs/digits.py): batches of
    # 32 (the 670 images of a subset make 5 batches of 128), shifts, no
    # flips, no class ReLU, and no dropout with batch norm.
    source_config = pretrain_config('subset1')
    config.dataset.name = 'digits'
    config.preprocess = source_config.preprocess
    config.augment = source_config.augment
    config.batch_size = source_config.batch_size
    config.class_relu = source_config.class_relu
    config.dropout = not config.batch_norm
  config.transfer.from_workdir = source
  config.update_from_flattened_dict(overrides)  # Scratch unsets the source.
  return config


def train_run(config, workdir: str) -> dict:
  """Trains (or resumes) one run; returns its summary and metrics.csv rows."""
  common.wait_for_lock()
  logging.info('training %s', workdir)
  summary = train.train_and_evaluate(config, workdir)
  return dict(summary=summary,
              rows=reporting.read_csv(os.path.join(workdir, 'metrics.csv')))


def run_all(root: str, learning_rates: list[float]):
  """Every source and sweep run; returns (sources, runs)."""
  sources, runs = {}, []
  for name, overrides in transfer_cifar100.sweep():
    subset = overrides['dataset.classes']
    if subset not in FLAGS.subsets or not any(
        math.isclose(overrides['learning_rate'], lr) for lr in learning_rates):
      continue
    if FLAGS.dataset == 'digits':
      source = os.path.join(root, f'pretrain_{OTHER[subset]}')
      if subset not in sources:
        sources[subset] = dict(
            train_run(pretrain_config(OTHER[subset]), source),
            subset=OTHER[subset])
    else:
      source = FLAGS.source_workdir
    start = 'scratch' if 'transfer.from_workdir' in overrides else 'transfer'
    runs.append(dict(train_run(target_config(overrides, source),
                               os.path.join(root, name)),
                     name=name, subset=subset, start=start,
                     learning_rate=overrides['learning_rate']))
  return sources, runs


def plot(runs: list[dict], subset: str, path: str, title: str) -> None:
  """Transfer (solid) and scratch (dashed), one colour per learning rate."""
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
  rates = sorted({r['learning_rate'] for r in runs}, reverse=True)
  for run in runs:
    if run['subset'] != subset:
      continue
    color = f"C{rates.index(run['learning_rate'])}"
    common.plot_epochs(
        ax_acc, ax_loss, run['rows'],
        f"{run['start']}, lr {run['learning_rate']:g}", color=color,
        linestyle='-' if run['start'] == 'transfer' else '--', marker='o',
        markersize=3)
  common.finish_axes(ax_acc, ax_loss)
  common.save_figure(fig, path, title)


def table(runs: list[dict]) -> str:
  """The Markdown table of every run of the sweep."""
  lines = ['| target | learning rate | start | test acc. after epoch 1 (%) | '
           'final (%) | best (%) @ epoch | s/epoch (epochs 2+) |',
           '|---|---:|---|---:|---:|---:|---:|']
  for run in runs:
    rows, summary = run['rows'], run['summary']
    lines.append(
        f"| {run['subset']} | {run['learning_rate']:g} | {run['start']} | "
        f"{100 * rows[0]['test_accuracy']:.2f} | "
        f"{100 * summary['final_test_accuracy']:.2f} | "
        f"{100 * summary['best_test_accuracy']:.2f} @ {summary['best_epoch']} "
        f"| {common.seconds_per_epoch(rows):.1f} |")
  return '\n'.join(lines)


def source_table(sources: dict) -> str:
  """The Markdown table of the digits sources."""
  lines = ['Sources (configs/digits.py on the other half):', '',
           '| for target | source subset | source test acc. (%) |',
           '|---|---|---:|']
  for target, source in sources.items():
    lines.append(f"| {target} | {source['subset']} | "
                 f"{100 * source['summary']['final_test_accuracy']:.2f} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  try:
    learning_rates = [float(lr) for lr in FLAGS.learning_rates]
  except ValueError as e:
    raise app.UsageError(f'--learning_rates: {e}')
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
    sources, runs = run_all(root, learning_rates)
  except UserError as e:  # E.g. no CIFAR-100 data, a mismatching source.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not runs:
    raise app.UsageError('--learning_rates: none is in the sweep '
                         f'{transfer_cifar100.LEARNING_RATES}')

  config = target_config({}, '')
  steps = runs[0]['rows'][0]['step']
  setup = {
      'date': common.today(),
      'machine': common.machine(),
      'data': (f'{FLAGS.dataset}, target subsets {", ".join(FLAGS.subsets)} '
               f'({steps} steps of {config.batch_size} per epoch on '
               f'{runs[0]["subset"]}); source: {SOURCE[FLAGS.dataset]}'),
      'network': (f"all_cnn_c, width {FLAGS.width:g} x the paper's channels, "
                  f"batch norm {'on' if config.batch_norm else 'off'}, "
                  f"dropout {'on' if config.dropout else 'off'}"),
      'budget': (f'{config.num_epochs} epochs per run'
                 + (f', {FLAGS.pretrain_epochs} epochs per source'
                    if FLAGS.dataset == 'digits' else '')),
      'protocol': (f'SGD momentum {config.momentum:g}, weight decay '
                   f'{config.weight_decay:g}, constant learning rate from '
                   f'{", ".join(f"{lr:g}" for lr in learning_rates)}; '
                   'transfer copies every layer but the classifier '
                   '(random kernel, zero bias) and fine-tunes all; scratch '
                   'starts from a random initialization (He uniform)'),
      'seed': f'{config.seed} for every run',
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
         f'width {FLAGS.width:g}')
    images.append(name)
  blocks = [table(runs)]
  if sources:
    blocks.append(source_table(sources))
  common.write_results(
      out, title=f'Transfer vs scratch on {FLAGS.dataset} subsets',
      script='transfer_study.py', setup=setup,
      command_line=common.command('transfer_study.py'), tables=blocks,
      images=images, data=dict(sources=sources, runs=runs))
  print(f'wrote {out}/{", ".join(images)}, results.md, results.json')


if __name__ == '__main__':
  app.run(main)
