"""Initializer study: LSUV vs Glorot normal vs He uniform vs Gaussian(0.01).

Trains the same network once per initializer for the first `--steps`
batches, with the same batch order, augmentation and dropout randomness,
and writes to `--out`:

* ``init_study.png``: training and test loss, and accuracy, against step;
* ``results.md``: the setup and the test accuracy at fixed step counts;
* ``results.json``: every curve, for re-plotting.

The defaults are the paper-scale protocol of the second reference write-up:
All-CNN-C, 3000 batches of 32, SGD with learning rate 0.01 and Nesterov
momentum 0.9 (its Keras ``decay=1e-6`` changes the rate by 0.3% over 3000
steps and is left out). Examples:

  # CIFAR-10 from a local copy of the official archive (hours on a CPU):
  python experiments/init_study.py --dataset=cifar10 \\
      --archive=/path/to/cifar-10-binary.tar.gz \\
      --out=experiments/results/init_study_cifar10

  # Offline, on scikit-learn's digits, a few minutes on a 2-core CPU:
  python experiments/init_study.py --dataset=digits --width=0.25 \\
      --steps=300 --eval_every=25 --out=experiments/results/init_study_digits

Everything but the loop is the library's: `train.make_optimizer`,
`train.init_state`, `train.make_train_step`, `train.evaluate`, the
`input_pipeline` and `sharding` modules, and `lsuv.lsuv_init` for LSUV
(which starts from orthogonal kernels, as `models.create(init='lsuv')` does).
"""

import json
import math
import os
import platform
import shlex
import sys
import time

# Run as a script from anywhere: the library and `configs` are at the root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import matplotlib
import numpy as np
from absl import app, flags, logging

matplotlib.use('Agg')  # Headless.
import matplotlib.pyplot as plt

from allconv_jax import datasets, input_pipeline, lsuv, models, sharding, train
from allconv_jax.errors import UserError
from configs import default
# pylint: enable=g-import-not-at-top,wrong-import-position

INITIALIZERS = ('lsuv', 'glorot_normal', 'he_uniform', 'gaussian')
LABELS = {'lsuv': 'LSUV', 'glorot_normal': 'Glorot normal',
          'he_uniform': 'He uniform', 'gaussian': 'Gaussian (std 0.01)'}

FLAGS = flags.FLAGS
flags.DEFINE_enum('dataset', 'cifar10', ['cifar10', 'digits'],
                  'cifar10 (needs --archive or prepared tfds data) or digits '
                  '(offline).')
flags.DEFINE_string('archive', None,
                    'Local copy of the official cifar-10-binary.tar.gz.')
flags.DEFINE_string('data_dir', None, 'tensorflow-datasets data directory.')
flags.DEFINE_string('model', 'all_cnn_c', 'Network (allconv_jax.models.NAMES).')
flags.DEFINE_float('width', 1.0, 'Multiplier on the 96/192 channels.')
flags.DEFINE_integer('steps', 3000, 'Training batches per initializer.')
flags.DEFINE_integer('batch_size', 32, 'Training batch size.')
flags.DEFINE_integer('eval_every', 250, 'Evaluate on the test split every '
                     'this many steps (and at step 0).')
flags.DEFINE_integer('eval_examples', 0, 'Evaluate on the first this many '
                     'test examples (0: all).')
flags.DEFINE_integer('eval_batch_size', 250, 'Evaluation batch size.')
flags.DEFINE_float('learning_rate', 0.01, 'SGD learning rate.')
flags.DEFINE_float('momentum', 0.9, 'Nesterov momentum.')
flags.DEFINE_integer('lsuv_batch', 128, 'Training images LSUV measures on.')
flags.DEFINE_list('inits', list(INITIALIZERS), 'Initializers to compare.')
flags.DEFINE_integer('seed', 0, 'Seed of initialization, batches, '
                     'augmentation and dropout (the same for every run).')
flags.DEFINE_string('machine', None, 'Machine description for results.md '
                    '(default: from the OS).')
flags.DEFINE_string('out', None, 'Output directory (default: '
                    'experiments/results/init_study_<dataset>).')
flags.DEFINE_bool('replot', False, 'Only redraw init_study.png and rewrite '
                  'results.md (notes added by hand are lost) from the '
                  'results.json in --out.')


def make_config(init: str):
  """The experiment config: `configs.default` with the study's protocol."""
  config = default.get_config()
  config.model = FLAGS.model
  config.width = FLAGS.width
  config.init = init
  config.dataset.name = FLAGS.dataset
  config.dataset.archive = FLAGS.archive
  config.dataset.data_dir = FLAGS.data_dir
  config.batch_size = FLAGS.batch_size
  config.eval_batch_size = FLAGS.eval_batch_size
  config.optimizer = 'sgd'
  config.learning_rate = FLAGS.learning_rate
  config.momentum = FLAGS.momentum
  config.nesterov = True
  config.weight_decay = 0.0
  config.lr_schedule = 'piecewise'
  config.lr_boundaries = ()  # A constant rate over these few thousand steps.
  # Digits are not mirror-symmetric (as in configs/digits.py).
  config.augment.flip = FLAGS.dataset != 'digits'
  config.seed = FLAGS.seed
  return config


def run_one(init, data, preprocessed, mesh):
  """Trains with one initializer; returns its curve and LSUV report."""
  train_images, train_labels, test_images, test_labels = preprocessed
  config = make_config(init)
  num_classes = data.num_classes
  batches = input_pipeline.TrainBatches(len(train_labels), config.batch_size,
                                        config.seed)
  config.num_epochs = max(1, math.ceil(FLAGS.steps / batches.steps_per_epoch))
  tx, _ = train.make_optimizer(config, batches.steps_per_epoch)
  model = train.create_model(config, num_classes, bn_axis_name=sharding.AXIS)
  start = time.time()
  state = train.init_state(model, tx, config.seed, mesh)
  report = None
  if init == 'lsuv':
    rng = np.random.default_rng(config.seed)
    idx = rng.permutation(len(train_labels))[:FLAGS.lsuv_batch]
    (batch,) = sharding.global_batch(
        mesh, train_images[idx[sharding.local_slice(len(idx))]])
    variables, report = lsuv.lsuv_init(
        model, {'params': state.params, 'batch_stats': state.batch_stats},
        batch)
    logging.info('%s', report.table())
    state = jax.device_put(
        state.replace(params=variables['params'],
                      opt_state=tx.init(variables['params'])),
        sharding.replicated(mesh))
  init_seconds = time.time() - start

  train_step = train.make_train_step(
      model, tx, mesh, seed=config.seed,
      max_shift=input_pipeline.max_shift_pixels(config.augment.translate),
      flip=config.augment.flip)
  eval_model = train.create_model(config, num_classes)
  eval_step = train.make_eval_step(eval_model, mesh)
  local = sharding.local_slice(config.batch_size)

  def empty_metrics():
    return jax.device_put(train.TrainMetrics.empty(), sharding.replicated(mesh))

  def evaluate(step, window):
    test = train.evaluate(eval_step, state, mesh, test_images, test_labels,
                          config.eval_batch_size)
    point = dict(step=step, test_loss=test['loss'],
                 test_accuracy=test['accuracy'],
                 train_loss=None, train_accuracy=None)
    if window is not None:  # Averages over the steps since the last point.
      computed = {k: float(v) for k, v in window.compute().items()}
      point.update(train_loss=computed['loss'],
                   train_accuracy=computed['accuracy'])
    logging.info('%s step %d: %s', init, step, point)
    return point

  curve = [evaluate(0, None)]
  window = empty_metrics()
  start = time.time()
  for step in range(FLAGS.steps):
    idx = batches.indices(step)[local]
    images, labels = sharding.global_batch(mesh, train_images[idx],
                                           train_labels[idx])
    state, window = train_step(state, window, images, labels)
    if (step + 1) % FLAGS.eval_every == 0 or step + 1 == FLAGS.steps:
      curve.append(evaluate(step + 1, window))
      window = empty_metrics()
  return dict(init=init, curve=curve, init_seconds=round(init_seconds, 2),
              train_seconds=round(time.time() - start, 2),
              lsuv_report=report.to_dict() if report else None,
              lsuv_table=report.table() if report else None)


def plot(runs, path, title):
  """Loss and accuracy against step, one colour per initializer."""
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
  for index, run in enumerate(runs):
    color = f'C{index}'
    label = LABELS.get(run['init'], run['init'])
    curve = run['curve']
    steps = [p['step'] for p in curve]
    trained = [p for p in curve if p['train_loss'] is not None]
    ax_loss.plot([p['step'] for p in trained],
                 [p['train_loss'] for p in trained], '-', color=color,
                 label=f'{label}, train')
    ax_loss.plot(steps, [p['test_loss'] for p in curve], '--', color=color,
                 label=f'{label}, test')
    ax_acc.plot(steps, [100 * p['test_accuracy'] for p in curve], '-',
                color=color, label=f'{label}, test')
    ax_acc.plot([p['step'] for p in trained],
                [100 * p['train_accuracy'] for p in trained], ':', color=color,
                label=f'{label}, train')
  ax_loss.set(xlabel='training step (batch)', ylabel='cross-entropy loss',
              title='loss (train: mean since previous point)')
  ax_acc.set(xlabel='training step (batch)', ylabel='accuracy (%)',
             title='accuracy')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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


def write_markdown(runs, setup, path):
  """results.md: setup, accuracy at fixed steps, LSUV's report."""
  steps = table_steps([p['step'] for p in runs[0]['curve']])
  lines = [f"# Initializer study: {setup['model']} on {setup['dataset']}", '',
           'Generated by `experiments/init_study.py`; the command is below.',
           '',
           '## Setup', '']
  for key, value in setup.items():
    if key != 'command':
      lines.append(f'- {key}: {value}')
  lines += ['', '```', setup['command'], '```', '',
            '## Test accuracy (%) after a number of training batches', '',
            '| initializer | ' + ' | '.join(f'step {s}' for s in steps)
            + ' | train loss (last window) | seconds (init + train) |',
            '|---|' + '---:|' * (len(steps) + 2)]
  for run in runs:
    by_step = {p['step']: p for p in run['curve']}
    accs = ' | '.join(f"{100 * by_step[s]['test_accuracy']:.1f}" for s in steps)
    last = run['curve'][-1]
    lines.append(f"| {LABELS.get(run['init'], run['init'])} | {accs} | "
                 f"{last['train_loss']:.3f} | "
                 f"{run['init_seconds']:.0f} + {run['train_seconds']:.0f} |")
  chance = 100 / setup['classes']
  lines += ['', f'Chance level is {chance:.0f}%. Step 0 (before training):']
  for run in runs:
    first = run['curve'][0]
    lines.append(f"- {LABELS.get(run['init'], run['init'])}: test accuracy "
                 f"{100 * first['test_accuracy']:.1f}%, test loss "
                 f"{first['test_loss']:.3f}")
  for run in runs:
    if run['lsuv_table']:
      lines += ['', '## LSUV report', '', '```', run['lsuv_table'], '```']
  lines += ['', '![curves](init_study.png)', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def main(argv):
  del argv
  unknown = [i for i in FLAGS.inits if i not in INITIALIZERS]
  if unknown:
    raise app.UsageError(f'--inits: unknown {unknown}; allowed: {INITIALIZERS}')
  if FLAGS.model not in models.NAMES:
    raise app.UsageError(f'--model: unknown {FLAGS.model!r}')
  out = FLAGS.out or os.path.join(ROOT, 'experiments', 'results',
                                  f'init_study_{FLAGS.dataset}')
  os.makedirs(out, exist_ok=True)
  if FLAGS.replot:
    with open(os.path.join(out, 'results.json')) as f:
      saved = json.load(f)
    write_outputs(saved['runs'], saved['setup'], saved['title'], out)
    return

  try:
    data = datasets.load(make_config('lsuv').dataset)
  except UserError as e:  # E.g. CIFAR-10 with neither archive nor network.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  preprocessor = input_pipeline.Preprocessor.fit(data.train.images)
  test_images, test_labels = data.test.images, data.test.labels
  if FLAGS.eval_examples:
    test_images = test_images[:FLAGS.eval_examples]
    test_labels = test_labels[:FLAGS.eval_examples]
  preprocessed = (preprocessor(data.train.images), data.train.labels,
                  preprocessor(test_images), test_labels)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(FLAGS.batch_size)
  sharding.check_batch_size(FLAGS.eval_batch_size, 'eval_batch_size')

  start = time.time()
  runs = [run_one(init, data, preprocessed, mesh) for init in FLAGS.inits]
  total = time.time() - start

  epochs = FLAGS.steps * FLAGS.batch_size / len(preprocessed[1])
  machine = FLAGS.machine or (
      f'{os.cpu_count()}-core {platform.machine()} CPU, '
      f'{jax.device_count()} {jax.default_backend()} device(s)')
  setup = {
      'dataset': (f'{FLAGS.dataset}: {len(preprocessed[1])} training images, '
                  f'{len(test_labels)} test images (32x32)'),
      'model': FLAGS.model,
      'classes': data.num_classes,
      'width': f'{FLAGS.width:g} (x the paper\'s 96/192 channels)',
      'budget': (f'{FLAGS.steps} batches of {FLAGS.batch_size} per initializer '
                 f'(~{epochs:.1f} epochs), test evaluation every '
                 f'{FLAGS.eval_every} steps'),
      'optimizer': (f'SGD, learning rate {FLAGS.learning_rate:g}, Nesterov '
                    f'momentum {FLAGS.momentum:g}, no weight decay'),
      'regularization': ('paper dropout (20% input, 50% after each pooling '
                         'stage), random translation by up to 10%'
                         + ('' if FLAGS.dataset == 'digits' else
                            ', horizontal flips')),
      'preprocessing': 'per-channel standardization',
      'LSUV': (f'measured on {FLAGS.lsuv_batch} training images, '
               'pre-activation, tol 0.1, max 10 iterations, from orthogonal '
               'kernels'),
      'seed': f'{FLAGS.seed} (same batches, augmentation and dropout for all)',
      'machine': machine,
      'wall time': f'{total:.0f} s for all runs',
      'command': shlex.join(['python', 'experiments/init_study.py',
                             *sys.argv[1:]]),
  }
  title = (f'{FLAGS.model} (width {FLAGS.width:g}) on {FLAGS.dataset}: '
           f'{FLAGS.steps} batches of {FLAGS.batch_size}, '
           f'SGD {FLAGS.learning_rate:g} Nesterov {FLAGS.momentum:g}')
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(dict(setup=setup, title=title, runs=runs), f, indent=1)
  write_outputs(runs, setup, title, out)
  print(f'wrote {out}/init_study.png, results.md, results.json '
        f'({total:.0f} s)')


def write_outputs(runs, setup, title, out):
  plot(runs, os.path.join(out, 'init_study.png'), title)
  write_markdown(runs, setup, os.path.join(out, 'results.md'))


if __name__ == '__main__':
  app.run(main)
