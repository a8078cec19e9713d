"""Six-model comparison: Model A, B, C, Strided-, ConvPool- and All-CNN-C.

The first reference's comparison: each network trained with one protocol,
then final and best test accuracy, parameters, time per epoch, and the test
curves of all six in one plot. Each network is one
`train.train_and_evaluate(config, workdir)` run (a workdir per network under
`--workdir_root`, resumed if it is there); its metrics.csv is read back.
Writes to `--out`: ``six_models.png`` (test accuracy and loss per epoch),
``results.md`` (setup and table) and ``results.json``.

Paper scale: the paper's CIFAR-10 protocol (`configs/paper.py`, e.g.
`configs/all_cnn_c.py`: GCN + ZCA, dropout, SGD 0.01 momentum 0.9, weight
decay 0.001, 350 epochs; a GPU job):

  python experiments/six_models.py --protocol=paper \\
      --archive=/path/to/cifar-10-binary.tar.gz

CPU budget, offline on scikit-learn's digits with `configs/digits.py` (batch
norm, Adam one-cycle: plain SGD without batch norm stalls on digits, see that
config's docstring), half width, 5 epochs each (about 10 minutes on 2 cores):

  python experiments/six_models.py --protocol=digits --width=0.5 --epochs=5
"""

import os
import sys

# pylint: disable=g-import-not-at-top,wrong-import-position
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # Puts the repository root on sys.path.

import matplotlib.pyplot as plt
from absl import app, flags, logging

from allconv_jax import reporting, train
from allconv_jax.errors import UserError
from configs import digits, paper
# pylint: enable=g-import-not-at-top,wrong-import-position

MODELS = ('model_a', 'model_b', 'model_c', 'strided_cnn_c', 'convpool_cnn_c',
          'all_cnn_c')
LABELS = {'model_a': 'Model A', 'model_b': 'Model B', 'model_c': 'Model C',
          'strided_cnn_c': 'Strided-CNN-C', 'convpool_cnn_c': 'ConvPool-CNN-C',
          'all_cnn_c': 'All-CNN-C'}
# Test accuracy in the first reference's Table 1 (CIFAR-10, the paper's
# protocol without augmentation, 350 epochs), for comparison.
REFERENCE_ACCURACY = {'model_a': 0.864, 'model_b': 0.844, 'model_c': 0.869,
                      'strided_cnn_c': 0.864, 'convpool_cnn_c': 0.891,
                      'all_cnn_c': 0.869}
PROTOCOLS = {'digits': 'digits', 'paper': 'cifar10'}

FLAGS = flags.FLAGS
flags.DEFINE_enum('protocol', 'digits', list(PROTOCOLS),
                  "digits: configs/digits.py (offline); paper: the paper's "
                  'CIFAR-10 protocol of configs/paper.py.')
flags.DEFINE_list('models', list(MODELS), 'Networks to compare.')
flags.DEFINE_float('width', 1.0, 'Multiplier on the 96/192 channels.')
flags.DEFINE_integer('epochs', None, "Epochs per network (default: the "
                     "protocol's, 5 on digits, 350 on CIFAR-10).")
flags.DEFINE_string('archive', None,
                    'Local copy of the official cifar-10-binary.tar.gz.')
flags.DEFINE_string('data_dir', None, 'tensorflow-datasets data directory.')
flags.DEFINE_string('workdir_root', None, 'Where the runs go, one workdir per '
                    'network (default: workdirs/six_models_<dataset>).')


def make_config(model: str):
  """The protocol's config for one network."""
  if FLAGS.protocol == 'digits':
    config = digits.get_config()
    config.model = model
  else:
    config = paper.get_config(model)
    config.dataset.archive = FLAGS.archive
    config.dataset.data_dir = FLAGS.data_dir
  config.width = FLAGS.width
  if FLAGS.epochs:
    config.num_epochs = FLAGS.epochs
  return config


def run_all(root: str) -> list[dict]:
  """Trains (or resumes) every network; returns their metrics and sizes."""
  runs = []
  for model in FLAGS.models:
    config = make_config(model)
    common.wait_for_lock()
    workdir = os.path.join(root, model)
    logging.info('training %s into %s', model, workdir)
    summary = train.train_and_evaluate(config, workdir)
    rows = reporting.read_csv(os.path.join(workdir, 'metrics.csv'))
    # Both protocols' datasets have ten classes.
    runs.append(dict(model=model, summary=summary, rows=rows,
                     parameters=common.parameter_count(config, 10)))
  return runs


def table(runs: list[dict], reference: bool) -> str:
  """The Markdown comparison table."""
  head = ('| network | parameters | test acc. after epoch 1 (%) | '
          'final test acc. (%) | best (%) @ epoch | final test loss | '
          's/epoch (epochs 2+) | s, epoch 1 (incl. compiling) |')
  rule = '|---|---:|---:|---:|---:|---:|---:|---:|'
  if reference:
    head += ' first reference, CIFAR-10 (%) |'
    rule += '---:|'
  lines = [head, rule]
  for run in runs:
    rows, summary = run['rows'], run['summary']
    line = (f"| {LABELS[run['model']]} | {run['parameters']:,} | "
            f"{100 * rows[0]['test_accuracy']:.2f} | "
            f"{100 * summary['final_test_accuracy']:.2f} | "
            f"{100 * summary['best_test_accuracy']:.2f} @ "
            f"{summary['best_epoch']} | {rows[-1]['test_loss']:.4f} | "
            f"{common.seconds_per_epoch(rows):.1f} | {rows[0]['seconds']:.1f} |")
    if reference:
      line += f" {100 * REFERENCE_ACCURACY[run['model']]:.1f} |"
    lines.append(line)
  return '\n'.join(lines)


def plot(runs: list[dict], path: str, title: str) -> None:
  """Test accuracy and loss per epoch, one colour per network."""
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
  for index, run in enumerate(runs):
    common.plot_epochs(ax_acc, ax_loss, run['rows'], LABELS[run['model']],
                       color=f'C{index}', marker='o', markersize=3)
  common.finish_axes(ax_acc, ax_loss)
  common.save_figure(fig, path, title)


def main(argv):
  del argv
  unknown = [m for m in FLAGS.models if m not in MODELS]
  if unknown:
    raise app.UsageError(f'--models: unknown {unknown}; allowed: {MODELS}')
  dataset = PROTOCOLS[FLAGS.protocol]
  out = common.results_dir(f'six_models_{dataset}')
  root = FLAGS.workdir_root or os.path.join(common.ROOT, 'workdirs',
                                            f'six_models_{dataset}')
  try:
    runs = run_all(root)
  except UserError as e:  # E.g. CIFAR-10 with neither archive nor network.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)

  config = make_config(FLAGS.models[0])
  steps = runs[0]['rows'][0]['step']
  if FLAGS.protocol == 'digits':
    protocol = ('configs/digits.py: batch norm after every hidden conv, no '
                'dropout, no ReLU on the class layer, Adam with a one-cycle '
                f'schedule peaking at {config.learning_rate:g}, batch '
                f'{config.batch_size}, random translation by up to 10%. Not '
                "the paper's SGD: on digits, All-CNN without batch norm under "
                'plain SGD stalled at 10-50% (see the docstring of '
                'configs/digits.py), so every network gets the protocol that '
                'trains All-CNN-C')
  else:
    protocol = ("configs/paper.py: GCN + ZCA, the paper's dropout, SGD "
                f'{config.learning_rate:g} momentum {config.momentum:g}, '
                f'weight decay {config.weight_decay:g}, lr x0.1 at epochs '
                f'{tuple(config.lr_boundaries)}, batch {config.batch_size}')
  setup = {
      'date': common.today(),
      'machine': common.machine(),
      'data': (f'{dataset}, the full training split ({steps} steps of '
               f'{config.batch_size} per epoch), evaluated on the test split '
               'after every epoch'),
      'networks': ', '.join(LABELS[r['model']] for r in runs),
      'width': f"{FLAGS.width:g} x the paper's 96/192 channels",
      'budget': f'{config.num_epochs} epochs per network',
      'protocol': protocol,
      'seed': f'{config.seed} for every network',
      'workdirs': os.path.relpath(root, common.ROOT),
  }
  title = (f'Six networks on {dataset}, width {FLAGS.width:g}, '
           f'{config.num_epochs} epochs ({FLAGS.protocol} protocol)')
  plot(runs, os.path.join(out, 'six_models.png'), title)
  common.write_results(
      out, title=title, script='six_models.py', setup=setup,
      command_line=common.command('six_models.py'),
      tables=[table(runs, reference=True),
              'Parameters include the batch-norm scales and offsets. Seconds '
              'are wall-clock per epoch as written in each run\'s '
              'metrics.csv (training and the test evaluation). The last '
              "column is the first reference's Table 1, CIFAR-10 at full width "
              'after 350 epochs: another dataset and budget, for orientation '
              'only.'],
      images=['six_models.png'], data=dict(runs=runs))
  print(f'wrote {out}/six_models.png, results.md, results.json')


if __name__ == '__main__':
  app.run(main)
