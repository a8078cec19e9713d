"""Transfer against scratch: three arms, each at its own rate, several seeds.

The first reference's study (its Figures 3-6) fine-tunes an All-CNN-C trained
on a source task on a target subset and compares it with the same network
trained from scratch. Here three arms are compared, as fine-tuning code
compares them:

* ``scratch``: a random initialization (He uniform);
* ``finetune``: every layer but the classifier copied from the source's
  selected checkpoint, the classifier zero-initialized
  (``transfer.head_init='zeros'``, a uniform first prediction), everything
  trained;
* ``probe``: the same start with the copied layers frozen
  (``transfer.freeze``): a linear probe of the source's features.

All use the reference's transfer protocol (SGD, momentum 0.9, weight decay
0.001, a constant rate). Each arm's rate is chosen from a grid
(``--learning_rates``) on the validation split, as the paper chose its rates:
the highest mean final validation accuracy over the seeds (ties: the lower
mean final validation loss). The test split is only reported. For each seed
and arm the rates of the grid train together as one population
(``config.sweep``; see allconv_jax/population.py) in
``<workdir_root>/seed<seed>/<subset>_<arm>/``, each rate a member in
``members/lr<rate>_seed<seed>/``. On digits each seed has a source of its own,
``seed<seed>/pretrain_<other subset>`` (`configs/digits.py`'s protocol on the
other half of the digits). A finished run (``summary.json``) is skipped and an
interrupted one resumed, so the same command continues a study; the
checkpoints of finished target runs are deleted (the sources' are kept),
and the metrics and summaries stay (the default workdir root is the
results folder's ``runs/``, whose small files are committed).

`transfer_report` writes ``results.json`` (per arm at its chosen rate, and per
arm and rate: seeds, mean and std of every metric; paired differences; every
run's curves), and from it ``results.md`` and the plots.

Digits, 0-4 -> 5-9, the committed results (60 min on 2 cores shared with
other jobs; 5 sources and 15 populations of 4 runs):

  python experiments/transfer_study.py --dataset=digits --width=0.25 \\
      --epochs=6 --pretrain_epochs=3 --seeds=0,1,2,3,4

CIFAR-10 -> a CIFAR-100 subset (GPU; ``{seed}`` in the source path is
replaced by each seed; ``configs/paper.py:all_cnn_c`` trained per seed):

  python experiments/transfer_study.py --dataset=cifar100 --subsets=subset2 \\
      --source_workdir=workdirs/all_cnn_c_seed{seed} --epochs=100 \\
      --archive=/path/to/cifar-100-binary.tar.gz
"""

import os
import sys
import time

import common
import transfer_report

from absl import app, flags

from allconv_jax import datasets, stopping
from allconv_jax.errors import UserError

digits = common.config_module('digits')
transfer_cifar100 = common.config_module('transfer_cifar100')

ARMS = transfer_report.ARMS
SOURCE = {'digits': 'the other half of the digits (pretrained here per seed)',
          'cifar100': 'CIFAR-10 (--source_workdir)'}
# About 15% of a digits subset (~670 images), 10% of a CIFAR-100 subset.
VALIDATION_SIZE = {'digits': 100, 'cifar100': 500}
# On digits, each target subset's source task is the other subset.
OTHER = {'subset1': 'subset2', 'subset2': 'subset1'}
# The reference's largest rate (0.0025) and three steps of 4 up to the
# paper's grid (0.25, 0.1, 0.05, 0.01).
GRID = ('0.0025', '0.01', '0.04', '0.16')

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
flags.DEFINE_list('subsets', ['subset2'], 'Target subsets.')
flags.DEFINE_list('arms', list(ARMS), 'Arms to run.')
flags.DEFINE_list('learning_rates', list(GRID), 'The grid each arm chooses '
                  'its rate from on validation.')
flags.DEFINE_list('seeds', ['0', '1', '2', '3', '4'], 'Seeds of every run.')
flags.DEFINE_integer('epochs', None, 'Epochs per target run (default: the '
                     "config's 100).")
flags.DEFINE_float('width', 1.0, 'Multiplier on the 96/192 channels (must '
                   "be the source's).")
flags.DEFINE_bool('batch_norm', None, "Batch norm (must be the source's; "
                  'default: on for digits, off for cifar100).')
flags.DEFINE_integer('validation_size', None, 'Training images of each '
                     'subset held out for every selection (default: 100 on '
                     'digits, 500 on cifar100).')
flags.DEFINE_integer('pretrain_epochs', 3, 'digits: epochs of each source.')
flags.DEFINE_string('workdir_root', None, 'Where the runs go (default: '
                    '<out>/runs).')
flags.DEFINE_bool('report_only', False, 'Train nothing: redraw results.md and '
                  'the plots from <out>/results.json.')


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


def target_config(subset: str, arm: str, source: str | None, seed: int,
                  rates: list[float]):
  """The reference's transfer protocol for one arm: a population of `rates`."""
  config = transfer_cifar100.get_config()
  config.dataset.classes = subset
  config.width = FLAGS.width
  config.batch_norm = batch_norm()
  config.dataset.archive = FLAGS.archive
  config.dataset.data_dir = FLAGS.data_dir
  config.dataset.validation_size = validation_size()
  config.sweep.seeds, config.sweep.learning_rates = (seed,), tuple(rates)
  config.checkpoint_keep = 1
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
  config.transfer.from_workdir = None if arm == 'scratch' else source
  config.transfer.head_init = 'zeros'
  config.transfer.freeze = arm == 'probe'
  return config


def prune_population(workdir: str) -> None:
  """Deletes a finished population's checkpoints, its members' too."""
  common.prune(workdir)
  members = os.path.join(workdir, 'members')
  for name in os.listdir(members) if os.path.isdir(members) else ():
    common.prune(os.path.join(members, name))


def run_all(root: str, rates: list[float], seeds: list[int]):
  """Every source and population, seed by seed; returns (sources, runs)."""
  plan = [(seed, subset, arm) for seed in seeds for subset in FLAGS.subsets
          for arm in FLAGS.arms]
  sources, runs, begin = [], [], time.time()
  for index, (seed, subset, arm) in enumerate(plan, 1):
    seed_root = os.path.join(root, f'seed{seed}')
    if FLAGS.dataset == 'digits':
      source = os.path.join(seed_root, f'pretrain_{OTHER[subset]}')
      if not any(s['workdir'] == source for s in sources):
        record = common.train_run(pretrain_config(OTHER[subset], seed), source)
        sources.append(dict(record, subset=OTHER[subset], seed=seed,
                            workdir=source))
    else:
      source = FLAGS.source_workdir.replace('{seed}', str(seed))
    workdir = os.path.join(seed_root, f'{subset}_{arm}')
    record = common.train_run(target_config(subset, arm, source, seed, rates),
                              workdir)
    prune_population(workdir)
    for member in common.member_records(workdir, record):
      runs.append(dict(member, subset=subset, arm=arm))
    elapsed = time.time() - begin
    print(f'[{index}/{len(plan)}] seed {seed} {subset} {arm}: '
          f'{record["status"]} ({elapsed / 60:.1f} min so far)', flush=True)
  return sources, runs


def setup_lines(root: str, seeds: list[int], rates: list[float],
                sources: list[dict], runs: list[dict]) -> dict:
  """The setup section of results.md."""
  config = target_config(FLAGS.subsets[0], 'finetune', '', seeds[0], rates)
  data = datasets.load(config.dataset)
  steps = next((r['rows'][0]['step'] for r in runs if r['rows']), None)
  seconds = [r['seconds'] for r in runs + sources if r['seconds']]
  setup = {
      'date': common.today(),
      'machine': common.machine(),
      'data': (f'{FLAGS.dataset}, target {", ".join(FLAGS.subsets)}: '
               f'{len(data.train.labels)} training images ({steps} steps of '
               f'{config.batch_size} per epoch), {len(data.validation.labels)} '
               'held out for validation (stratified, the same for every '
               f'seed), {len(data.test.labels)} test images; source: '
               f'{SOURCE[FLAGS.dataset]}'),
      'network': (f"all_cnn_c, width {FLAGS.width:g} x the paper's channels, "
                  f"batch norm {'on' if config.batch_norm else 'off'}, "
                  f"dropout {'on' if config.dropout else 'off'}"),
      'budget': (f'{config.num_epochs} epochs per run'
                 + (f', {FLAGS.pretrain_epochs} epochs per source'
                    if FLAGS.dataset == 'digits' else '')
                 + '; each arm chooses its rate on validation from '
                 + ', '.join(f'{lr:g}' for lr in rates)),
      'protocol': (f'SGD momentum {config.momentum:g}, weight decay '
                   f'{config.weight_decay:g}, constant rate; finetune and '
                   'probe copy every layer but the classifier from the '
                   "source's checkpoint of best validation accuracy (its "
                   'batch-norm statistics included) and start the classifier '
                   'at zero (transfer.head_init=zeros); probe freezes the '
                   'copied layers; scratch starts from He uniform'),
      'seeds': (f'{", ".join(map(str, seeds))}: each seed sets the source '
                "run, the target runs' initialization, batch order and "
                'augmentation'),
      'wall time': (f'{sum(seconds) / 60:.0f} min of training over '
                    f'{len(seconds)} runs and populations, timed by the '
                    'runner'),
      'workdirs': os.path.relpath(root, common.ROOT),
  }
  if sources:
    setup['sources'] = (f'configs/digits.py (Adam one-cycle, batch norm) on '
                        f'the other subset, {FLAGS.pretrain_epochs} epochs')
  return setup, dict(validation=len(data.validation.labels),
                     test=len(data.test.labels), classes=data.num_classes)


def main(argv):
  del argv
  try:
    rates = [float(lr) for lr in FLAGS.learning_rates]
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f'--learning_rates or --seeds: {e}')
  unknown = [s for s in FLAGS.subsets if s not in transfer_cifar100.SUBSETS]
  if unknown:
    raise app.UsageError(f'--subsets: unknown {unknown}; allowed: '
                         f'{", ".join(transfer_cifar100.SUBSETS)}')
  unknown = [a for a in FLAGS.arms if a not in ARMS]
  if unknown:
    raise app.UsageError(f'--arms: unknown {unknown}; allowed: {", ".join(ARMS)}')
  if FLAGS.dataset == 'cifar100' and not FLAGS.source_workdir:
    raise app.UsageError('--source_workdir: needed with --dataset=cifar100')
  out = common.results_dir(f'transfer_{FLAGS.dataset}')
  if FLAGS.report_only:
    transfer_report.write(out, common.read_json(os.path.join(out, 'results.json')))
    print(f'redrew {out} from results.json')
    return
  root = FLAGS.workdir_root or os.path.join(out, 'runs')
  try:
    sources, runs = run_all(root, rates, seeds)
    setup, sizes = setup_lines(root, seeds, rates, sources, runs)
  except stopping.Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.exit(130)
  except UserError as e:  # E.g. no CIFAR-100 data, a mismatching source.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  data = transfer_report.summarize(runs, sources, rates, sizes)
  data.update(setup=setup, command=common.command('transfer_study.py'))
  transfer_report.write(out, data)
  print(f'wrote {out}/results.json, results.md and the plots')


if __name__ == '__main__':
  app.run(main)
