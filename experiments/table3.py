"""Table 3 of the paper: twelve networks, a learning-rate grid, several seeds.

The paper trains each of its twelve networks (Model A, B, C and their
Strided-, ConvPool- and All-CNN variants) on CIFAR-10 without augmentation,
picking each network's learning rate from {0.25, 0.1, 0.05, 0.01}, and
reports one test error per network. Here every (network, rate, seed) is one
`train.train_and_evaluate` run of ``configs/paper.py:<network>`` with a
stratified validation split held out of the training images. Per network,
the rate with the highest mean final validation accuracy over the seeds is
selected, and the final test error at that rate is reported as mean ± sample
std over the seeds, beside the paper's number. Nothing is selected on the
test split. Runs that diverged (a non-finite loss) or never left chance
(final validation accuracy at most chance + `--chance_margin`) are counted;
a diverged run counts as chance accuracy in the means of its rate.

Each network's runs, every (rate, seed), train together as one population
(``config.sweep``) in ``<runs_dir>/<network>/``, each run a member in
``members/lr<rate>_seed<seed>/``; a member whose loss becomes non-finite is
frozen and counted as diverged. The same command skips finished networks and
resumes interrupted ones. Writes to `--out`: ``results.md``, ``table3.png``
(mean validation accuracy per epoch, per network and rate), ``table3_bars.png``
(each network's test error beside the paper's), ``results.json``
(every run's summary, rows and the selection) and a ``.gitignore``.

CIFAR-10, the paper's protocol (350 epochs per run, 5,000 validation images,
144 runs in 12 populations; not run here, it needs GPUs):

  python experiments/table3.py --dataset=cifar10 \\
      --archive=/path/to/cifar-10-binary.tar.gz

Digits, a CPU budget chosen from pilots (the paper's protocol with only the
dataset, the width, the epochs with the decays, the batch and the validation
size changed; 300 of the 1,347 training digits are held out; about 3 hours
on 2 CPU cores; the results and why this budget:
experiments/results/table3_digits/):

  python experiments/table3.py --dataset=digits --width=0.125 --epochs=60 \\
      --batch_size=32
"""

import math
import os
import sys
import time

import common
import table3_report as report

import numpy as np
from absl import app, flags

from allconv_jax import datasets, models, reporting, stopping
from allconv_jax.errors import UserError

PAPER = common.config_module('paper')  # Its protocol and Table 3.
# 10% of CIFAR-10's training images, as is usual; 300 of the 1,347 digits
# leave 30 per class to choose on and 1,047 to train on.
VALIDATION_SIZE = {'cifar10': 5000, 'digits': 300}

FLAGS = flags.FLAGS
flags.DEFINE_enum('dataset', 'digits', list(VALIDATION_SIZE),
                  'cifar10 (needs --archive or tfds data) or digits.')
flags.DEFINE_string('archive', None, 'Local copy of the official cifar-10-binary.tar.gz.')
flags.DEFINE_string('data_dir', None, 'tensorflow-datasets data directory.')
flags.DEFINE_list('networks', list(models.NAMES), 'Networks to train.')
flags.DEFINE_list('learning_rates', [f'{lr:g}' for lr in PAPER.LEARNING_RATES],
                  'The learning-rate grid.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of every (network, rate).')
flags.DEFINE_float('width', 1.0, 'Multiplier on the 96/192 channels.')
flags.DEFINE_integer('epochs', None, "Epochs per run (default: the paper's 350).")
flags.DEFINE_integer('batch_size', None, "Training batch (default: the paper's 128).")
flags.DEFINE_bool('scale_schedule', True, "With --epochs: move the paper's "
                  'decays (epochs 200, 250, 300 of 350) to the same fractions '
                  'of the budget.')
flags.DEFINE_integer('validation_size', None, 'Training images held out to '
                     'choose the rate on (default, or 0: 5000 on cifar10, '
                     '300 on digits).')
flags.DEFINE_string('classes', '', 'Train on these classes only (a '
                    'dataset.classes value, e.g. 0,1,2; for quick checks).')
flags.DEFINE_float('chance_margin', 0.05, 'A finished run whose final '
                   'validation accuracy is at most 1/classes + this never '
                   'left chance.')
flags.DEFINE_string('runs_dir', None, 'Where the runs go (default: <out>/runs).')
flags.DEFINE_bool('report_only', False, 'Train nothing: report the finished runs.')
flags.DEFINE_bool('prune', False, 'Delete the checkpoints and the fitted '
                  'preprocessing of each finished run (they only serve to '
                  'resume or re-evaluate it).')
flags.DEFINE_string('compilation_cache', os.path.join(
    common.ROOT, 'workdirs', 'jax_cache'), "JAX's persistent compilation "
                    "cache ('': off).")


def validation_size() -> int:
  return FLAGS.validation_size or VALIDATION_SIZE[FLAGS.dataset]


def scaled_boundaries(boundaries, epochs: int, paper_epochs: int) -> tuple:
  """The decay epochs at the same fractions of `epochs` as of the paper's
  `paper_epochs`; unchanged where so few epochs would merge two decays."""
  scaled = tuple(round(b * epochs / paper_epochs) for b in boundaries)
  ordered = all(a < b for a, b in zip((0, *scaled), scaled))
  return scaled if ordered else tuple(boundaries)


def make_config(network: str, rates: list[float], seeds: list[int]):
  """The paper's protocol; only data, width, epochs, batch and validation
  change, and every rate and seed is a member of one population."""
  config = PAPER.get_config(network)
  config.dataset.name = FLAGS.dataset
  config.dataset.archive = FLAGS.archive
  config.dataset.data_dir = FLAGS.data_dir
  config.dataset.classes = FLAGS.classes
  config.dataset.validation_size = validation_size()
  config.width = FLAGS.width
  if FLAGS.epochs and FLAGS.scale_schedule:
    config.lr_boundaries = scaled_boundaries(
        config.lr_boundaries, FLAGS.epochs, config.num_epochs)
  config.num_epochs = FLAGS.epochs or config.num_epochs
  config.batch_size = FLAGS.batch_size or config.batch_size
  config.sweep.learning_rates, config.sweep.seeds = tuple(rates), tuple(seeds)
  # A diverged member is frozen and recorded; a population of diverged
  # members stops.
  config.halt_on_nan = True
  return config


def sweep(networks: list[str], rates: list[float], seeds: list[int],
          root: str) -> list[dict]:
  """Trains every network's population not finished yet; returns the
  records of all their members.

  Prints a line per population started and ended, with the sweep's ETA
  (from the populations trained so far in this call).
  """
  finished = {n: common.load_run(os.path.join(root, n)) for n in networks}
  todo = [n for n in networks if finished[n] is None]
  runs = len(rates) * len(seeds)
  print(f'table3: {len(networks)} populations of {runs} runs, '
        f'{len(networks) - len(todo)} finished already (skipped), '
        f'{len(todo)} to train', flush=True)
  if FLAGS.report_only:
    todo = []
  spent = []
  for index, network in enumerate(todo, 1):
    workdir = os.path.join(root, network)
    verb = 'resume' if os.path.isdir(os.path.join(workdir, 'members')) else 'start'
    print(f'[{index}/{len(todo)}] {verb} {network}: {runs} runs as one program',
          flush=True)
    begin = time.time()
    finished[network] = record = common.train_run(
        make_config(network, rates, seeds), workdir)
    spent.append(time.time() - begin)
    eta = sum(spent) / len(spent) * (len(todo) - index)
    members = common.member_records(workdir, record)
    if FLAGS.prune:
      for path in [workdir, *(m['workdir'] for m in members)]:
        common.prune(os.path.join(common.ROOT, path))
    diverged = sum(m['status'] == 'diverged' for m in members)
    best = max((m for m in members if m['summary']), default=None,
               key=lambda m: m['summary']['final_validation_accuracy'] or 0)
    outcome = (f"best final validation "
               f"{100 * best['summary']['final_validation_accuracy']:.1f}% "
               f"(lr {best['learning_rate']:g} seed {best['seed']})"
               if best else 'no member finished')
    print(f'[{index}/{len(todo)}] done {network} in {spent[-1]:.0f} s: '
          f'{outcome}, {diverged} diverged; sweep ETA '
          f'{reporting.duration(eta)}', flush=True)
  return [dict(member, network=network)
          for network in networks if finished[network] is not None
          for member in common.member_records(os.path.join(root, network),
                                              finished[network])]


def final_accuracies(run: dict, chance: float) -> tuple[float, float]:
  """(validation, test) accuracy of the final network; chance if diverged."""
  if run['status'] == 'diverged':
    return chance, chance
  summary = run['summary']
  return summary['final_validation_accuracy'], summary['final_test_accuracy']


def select(runs: list[dict], rates: list[float], chance: float,
           margin: float) -> dict:
  """Per network: every rate's mean ± std, and the rate chosen on validation.

  The chosen rate has the highest mean final validation accuracy over its
  seeds (ties: the first in grid order). Test accuracies are carried along
  to be reported, never compared.
  """
  selection = {}
  for network in report.table_order({r['network'] for r in runs}):
    grid = {}
    for lr in rates:
      cell = [r for r in runs if r['network'] == network and
              math.isclose(r['learning_rate'], lr)]
      if not cell:
        continue
      accuracies = [final_accuracies(r, chance) for r in cell]
      grid[lr] = dict(
          seeds=[r['seed'] for r in cell],
          validation=[v for v, _ in accuracies],
          test=[t for _, t in accuracies],
          diverged=[r['seed'] for r in cell if r['status'] == 'diverged'],
          at_chance=[r['seed'] for r, (v, _) in zip(cell, accuracies)
                     if r['status'] == 'finished' and v <= chance + margin])
    chosen = max(grid, key=lambda lr: np.mean(grid[lr]['validation']))
    selection[network] = dict(learning_rate=chosen, grid=grid)
  return selection


def main(argv):
  del argv
  unknown = [n for n in FLAGS.networks if n not in models.NAMES]
  if unknown:
    raise app.UsageError(f'--networks: unknown {unknown}; allowed: '
                         f'{models.NAMES}')
  try:
    rates = [float(lr) for lr in FLAGS.learning_rates]
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f'--learning_rates or --seeds: {e}')
  out = common.results_dir(f'table3_{FLAGS.dataset}')
  root = FLAGS.runs_dir or os.path.join(out, 'runs')
  networks = report.table_order(FLAGS.networks)
  config = make_config(networks[0], rates, seeds)
  common.enable_compilation_cache(FLAGS.compilation_cache)
  begin = time.time()
  try:
    data = datasets.load(config.dataset)
    runs = sweep(networks, rates, seeds, root)
  except stopping.Interrupted as e:
    print(f'interrupted: {e}', file=sys.stderr)
    sys.exit(130)
  except UserError as e:  # E.g. CIFAR-10 with neither archive nor network.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if not runs:
    print('no finished run to report', file=sys.stderr)
    sys.exit(1)
  chance = 1 / data.num_classes
  selection = select(runs, rates, chance, FLAGS.chance_margin)
  trained = [r['seconds'] for r in runs if r['seconds'] is not None]
  steps = next((r['rows'][0]['step'] for r in runs if r['rows']), None)
  train_images = len(data.train.labels)
  validation = getattr(data, 'validation', None)
  if validation is not None:  # The library may return the split apart.
    train_images += len(validation.labels)
  epochs, paper = config.num_epochs, PAPER.get_config()
  decays = [b for b in config.lr_boundaries if b < epochs]
  setup = {
      'date': common.today(),
      'machine': common.machine(),
      'data': (f'{FLAGS.dataset}'
               + (f' classes {FLAGS.classes}' if FLAGS.classes else '')
               + f': {train_images} training images, of which '
               f'{validation_size()} are held out as the validation split '
               '(stratified by class, the same for every seed, never trained '
               f'on); {len(data.test.labels)} test images; '
               f'{data.num_classes} classes (chance {100 * chance:.0f}%)'),
      'networks': ', '.join(report.label(n) for n in selection),
      'width': f"{FLAGS.width:g} x the paper's 96/192 channels",
      'budget': (f'{epochs} epochs per run ({steps} steps of '
                 f'{config.batch_size}), {len(networks) * len(rates) * len(seeds)} '
                 f'runs in {len(networks)} populations (one per network)'
                 + (f' ({len(runs)} finished)'
                    if len(runs) < len(networks) * len(rates) * len(seeds) else '')),
      'protocol': (
          "configs/paper.py:<network>, the paper's: GCN (scale "
          f'{config.preprocess.gcn_scale:g}) + ZCA (filter bias '
          f'{config.preprocess.zca_filter_bias:g}) fitted on the training '
          'images outside the validation split, no augmentation, the '
          f"paper's dropout, SGD momentum {config.momentum:g}, weight decay "
          f'{config.weight_decay:g}, batch {config.batch_size}, lr '
          f'x{config.lr_decay:g} at epochs {tuple(config.lr_boundaries)}'
          + (f" (the paper's {', '.join(map(str, paper.lr_boundaries))} of "
             f'{paper.num_epochs} scaled to {epochs})'
             if tuple(config.lr_boundaries) != tuple(paper.lr_boundaries) else '')
          + ('' if decays == list(config.lr_boundaries) else
             f' (of which {len(decays)} fall within {epochs} epochs)')
          + f', {config.init} initialization; changed for this budget: '
          'dataset, width, epochs (the decays with them), batch, validation '
          'size only'),
      'learning rates': ', '.join(f'{lr:g}' for lr in rates),
      'seeds': ', '.join(str(s) for s in seeds),
      'selection': ('per network, the rate with the highest mean final '
                    'validation accuracy over seeds; the test split is only '
                    'reported'),
      'wall time': (f'{sum(trained) / 60:.0f} min of training over '
                    f'{len(trained)} runs (each population timed by this '
                    'runner, its time shared evenly by its runs); '
                    f'this invocation {(time.time() - begin) / 60:.0f} min'),
      'runs': os.path.relpath(root, common.ROOT),
  }
  on = 'CIFAR-10' if FLAGS.dataset == 'cifar10' else FLAGS.dataset
  title = (f"Table 3 (the paper's protocol) on {on}: width {FLAGS.width:g}, "
           f'{epochs} epochs, {len(seeds)} seeds')
  report.plot(runs, selection, chance, os.path.join(out, 'table3.png'), title)
  report.bars(selection, os.path.join(out, 'table3_bars.png'), title, FLAGS.dataset)
  report.write_gitignore(out)
  common.write_results(
      out, title=title, script='table3.py', setup=setup,
      # The command that trains the runs, even when this one only reports.
      command_line=common.command('table3.py').replace(' --report_only', ''),
      tables=report.tables(selection, chance, FLAGS.chance_margin, FLAGS.dataset),
      images=['table3.png', 'table3_bars.png'],
      data=dict(selection={n: dict(s, grid={f'{lr:g}': c for lr, c in
                                            s['grid'].items()})
                           for n, s in selection.items()},
                runs=runs))
  print(f'wrote {out}/table3.png, results.md, results.json')


if __name__ == '__main__':
  app.run(main)
