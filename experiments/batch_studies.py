"""The second reference's studies over the first few thousand batches.

One network is trained once per variant of a study and seed (`--seeds`) for
the first `--steps` batches, every variant from the same seeds (same initial
kernels where the variants allow, same batch order, augmentation and dropout
randomness), with the test split evaluated every `--eval_every` steps; the
curves are only reported, nothing is selected on them. The studies
(`--study`):

* ``init``: LSUV, Glorot normal, He uniform, Gaussian (std 0.01).
* ``augmentation``: cumulative, as in the reference: none, + random shift
  (10%), + horizontal flip, + per-channel normalization, + GCN and ZCA
  whitening (`config.preprocess.gcn_scale`, `zca_filter_bias`). Without
  normalization the inputs are scaled to [0, 1].
* ``regularization``: the paper's dropout, batch norm, both, neither.
* ``optimizer``: SGD with Nesterov momentum, RMSProp, Adam.

Every variant changes only its study's fields of a shared protocol, that of
the reference: All-CNN-C, batches of 32, SGD at 0.01 with Nesterov momentum
0.9 (its Keras ``decay=1e-6`` changes the rate by 0.3% over 3000 steps and is
left out), the paper's dropout, random shifts of up to 10% (plus flips on
CIFAR), per-channel normalization, and LSUV initialization (`--init`; the
init study varies it). Writes to `--out`:

* ``<study>.png`` (``init_study.png`` for ``init``): training and test loss
  and accuracy against step;
* ``results.md``: the setup and the test accuracy at fixed step counts
  (mean ± sample std over the seeds when there are several);
* ``results.json``: every curve, for re-plotting (`--replot`, see
  `batch_report.py`).

Paper scale (CIFAR-10, 3000 batches, full width; hours on a CPU):

  python experiments/batch_studies.py --study=augmentation --dataset=cifar10 \\
      --archive=/path/to/cifar-10-binary.tar.gz

CPU budget, offline on scikit-learn's digits (about a minute per variant
on 2 cores):

  python experiments/batch_studies.py --study=regularization --dataset=digits \\
      --width=0.25 --steps=500 --eval_every=25 --seeds=0,1,2

`experiments/init_study.py` is ``--study=init`` under its historical name.
Each run is the library's `train.train_and_evaluate` with
``num_train_steps`` and ``eval_every_steps`` set, in its own workdir under
`--workdir_root` (``<variant>/seed<seed>``): a finished run is not trained
again.
"""

import dataclasses
import json
import os
import sys
import time

import batch_report
import common

from absl import app, flags

from allconv_jax import config as config_lib, datasets, files, lsuv_report
from allconv_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Variant:
  """One run of a study: a name, a plot label and its config changes."""
  name: str
  label: str
  overrides: dict


@dataclasses.dataclass(frozen=True)
class Study:
  """A list of variants; `slug` names its PNG and results folder."""
  title: str
  slug: str
  variants: tuple[Variant, ...]
  varies: str  # What the variants change, for results.md.


def _augmentation(shift: bool, flip: bool, normalize: bool, zca: bool) -> dict:
  return {'augment.translate': 0.1 if shift else 0.0, 'augment.flip': flip,
          'preprocess.standardize': normalize, 'preprocess.gcn_zca': zca}


STUDIES = {
    'init': Study('Initializer study', 'init_study', (
        Variant('lsuv', 'LSUV', {'init': 'lsuv'}),
        Variant('glorot_normal', 'Glorot normal', {'init': 'glorot_normal'}),
        Variant('he_uniform', 'He uniform', {'init': 'he_uniform'}),
        Variant('gaussian', 'Gaussian (std 0.01)', {'init': 'gaussian'}),
    ), 'the kernel initializer'),
    'augmentation': Study('Augmentation and preprocessing study',
                          'augmentation', (
        Variant('none', 'none (inputs in [0, 1])',
                _augmentation(False, False, False, False)),
        Variant('shift', 'shift', _augmentation(True, False, False, False)),
        Variant('shift_flip', 'shift + flip',
                _augmentation(True, True, False, False)),
        Variant('shift_flip_norm', 'shift + flip + normalization',
                _augmentation(True, True, True, False)),
        Variant('shift_flip_norm_zca', 'shift + flip + normalization + ZCA',
                _augmentation(True, True, True, True)),
    ), 'augmentation (random shift by up to 10% of the side, horizontal flip) '
       'and preprocessing (per-channel normalization; before it, global '
       'contrast normalization (every image scaled to L2 norm 55) and ZCA '
       'whitening (filter bias 0.1), as pylearn2)'),
    'regularization': Study('Regularization study', 'regularization', (
        Variant('dropout', 'dropout', {'dropout': True, 'batch_norm': False}),
        Variant('batch_norm', 'batch norm',
                {'dropout': False, 'batch_norm': True}),
        Variant('both', 'dropout + batch norm',
                {'dropout': True, 'batch_norm': True}),
        Variant('neither', 'neither', {'dropout': False, 'batch_norm': False}),
    ), "the paper's dropout (20% input, 50% after each stride-2 stage) and "
       'batch norm after every hidden conv'),
    'optimizer': Study('Optimizer study', 'optimizer', (
        Variant('sgd', 'SGD 0.01, Nesterov 0.9', {}),
        # The reference's Keras RMSprop has rho=0 and a learning-rate decay
        # of 1e-3 per step; this is optax's RMSProp (decay 0.9), no momentum,
        # at a constant rate.
        Variant('rmsprop', 'RMSProp 0.001',
                {'optimizer': 'rmsprop', 'learning_rate': 0.001,
                 'momentum': 0.0}),
        Variant('adam', 'Adam 0.001',
                {'optimizer': 'adam', 'learning_rate': 0.001}),
    ), 'the optimizer (the learning rates are the reference\'s)'),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum('study', None, list(STUDIES), 'Which study to run.')
flags.DEFINE_list('variants', None, "Variants to run (default: all of the "
                  "study's).")
flags.DEFINE_enum('dataset', 'cifar10', ['cifar10', 'digits'],
                  'cifar10 (needs --archive or prepared tfds data) or digits '
                  '(offline).')
flags.DEFINE_string('archive', None,
                    'Local copy of the official cifar-10-binary.tar.gz.')
flags.DEFINE_string('data_dir', None, 'tensorflow-datasets data directory.')
flags.DEFINE_string('model', 'all_cnn_c', 'Network (allconv_jax.models.NAMES).')
flags.DEFINE_float('width', 1.0, 'Multiplier on the 96/192 channels.')
flags.DEFINE_string('init', 'lsuv', 'Initializer of the studies that do not '
                    'vary it.')
flags.DEFINE_integer('steps', 3000, 'Training batches per variant.')
flags.DEFINE_integer('batch_size', 32, 'Training batch size.')
flags.DEFINE_integer('eval_every', 250, 'Evaluate on the test split every '
                     'this many steps.')
flags.DEFINE_integer('eval_batch_size', 250, 'Evaluation batch size.')
flags.DEFINE_float('learning_rate', 0.01, 'SGD learning rate.')
flags.DEFINE_float('momentum', 0.9, 'Nesterov momentum.')
flags.DEFINE_integer('lsuv_batch', 128, 'Training images LSUV measures on.')
flags.DEFINE_list('seeds', ['0'], 'Seeds of initialization, batches, '
                  'augmentation and dropout: every variant runs once per '
                  'seed, and the tables give the mean ± std over them.')
flags.DEFINE_alias('seed', 'seeds')
flags.DEFINE_string('workdir_root', None, 'Where the runs go, one workdir '
                    'per variant and seed (default: workdirs/<study>_<dataset>).')
flags.DEFINE_bool('replot', False, 'Only redraw the PNG and rewrite '
                  'results.md from the results.json in --out.')


def make_config(variant: Variant, seed: int = 0):
  """The experiment config: the shared protocol with the variant's changes."""
  config = config_lib.defaults()
  config.model = FLAGS.model
  config.width = FLAGS.width
  config.init = FLAGS.init
  config.dataset.name = FLAGS.dataset
  config.dataset.archive = FLAGS.archive
  config.dataset.data_dir = FLAGS.data_dir
  config.batch_size = FLAGS.batch_size
  config.eval_batch_size = FLAGS.eval_batch_size
  config.num_train_steps = FLAGS.steps
  config.eval_every_steps = FLAGS.eval_every
  config.optimizer = 'sgd'
  config.learning_rate = FLAGS.learning_rate
  config.momentum = FLAGS.momentum
  config.nesterov = True
  config.weight_decay = 0.0
  config.lr_schedule = 'piecewise'
  config.lr_boundaries = ()  # A constant rate over these few thousand steps.
  config.dropout = True
  config.batch_norm = False
  config.augment.translate = 0.1
  # Digits are not mirror-symmetric (the augmentation study still tries).
  config.augment.flip = FLAGS.dataset != 'digits'
  config.preprocess.standardize = True
  config.preprocess.gcn_zca = False
  config.lsuv.batch_size = FLAGS.lsuv_batch
  # The curves go on after a non-finite loss, as the reference's did.
  config.halt_on_nan = False
  config.seed = seed
  config.update_from_flattened_dict(variant.overrides)
  return config


def run_one(variant: Variant, seed: int, root: str) -> dict:
  """Trains one variant from one seed (unless finished); returns its curve."""
  workdir = os.path.join(root, variant.name, f'seed{seed}')
  record = common.train_run(make_config(variant, seed), workdir)
  curve = [{k: row[k] for k in ('step', 'test_loss', 'test_accuracy',
                                'train_loss', 'train_accuracy')}
           for row in record['rows']]
  report_path = os.path.join(workdir, files.LSUV_REPORT)
  report = (lsuv_report.Report.load(report_path) if os.path.exists(report_path)
            else None)
  return dict(variant=variant.name, label=variant.label, seed=seed,
              curve=curve, seconds=record['seconds'],
              lsuv_report=report.to_dict() if report else None,
              lsuv_table=report.table() if report else None)


def main(argv):
  del argv
  if FLAGS.study is None:
    raise app.UsageError(f'--study: one of {list(STUDIES)}')
  study = STUDIES[FLAGS.study]
  names = [v.name for v in study.variants]
  unknown = [v for v in FLAGS.variants or () if v not in names]
  if unknown:
    raise app.UsageError(f'--variants: unknown {unknown}; allowed: {names}')
  out = common.results_dir(f'{study.slug}_{FLAGS.dataset}')
  if FLAGS.replot:
    with open(os.path.join(out, 'results.json')) as f:
      batch_report.write_outputs(study.slug, json.load(f), out)
    return
  variants = [v for v in study.variants
              if FLAGS.variants is None or v.name in FLAGS.variants]
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f'--seeds: {e}')

  root = FLAGS.workdir_root or os.path.join(
      common.ROOT, 'workdirs', f'{study.slug}_{FLAGS.dataset}')
  start = time.time()
  runs = []
  try:
    config_lib.validate(make_config(variants[0]))
    data = datasets.load(make_config(variants[0]).dataset)
    for variant in variants:
      for seed in seeds:
        runs.append(run_one(variant, seed, root))
  except UserError as e:  # E.g. CIFAR-10 with neither archive nor network.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  total = time.time() - start

  test_size = len(data.test.labels)
  epochs = FLAGS.steps * FLAGS.batch_size / len(data.train.labels)
  base = make_config(Variant('base', '', {}))
  setup = {
      'date': common.today(),
      'machine': common.machine(),
      'dataset': (f'{FLAGS.dataset}: {len(data.train.labels)} training '
                  f'images, {test_size} test images (32x32)'),
      'model': FLAGS.model,
      'classes': data.num_classes,
      'width': f'{FLAGS.width:g} (x the paper\'s 96/192 channels)',
      'budget': (f'{FLAGS.steps} batches of {FLAGS.batch_size} per variant '
                 f'(~{epochs:.1f} epochs), test evaluation every '
                 f'{FLAGS.eval_every} steps'),
      'varies': study.varies,
      'shared protocol': (
          f'SGD, learning rate {FLAGS.learning_rate:g}, Nesterov momentum '
          f'{FLAGS.momentum:g}, no weight decay, constant rate; the paper\'s '
          'dropout; random translation by up to 10%'
          + (', horizontal flips' if base.augment.flip else '')
          + '; per-channel normalization; '
          + ('the initializer of each variant' if FLAGS.study == 'init' else
             f'{FLAGS.init} initialization')
          + '; everything the study varies is set by the variant'),
      'LSUV': (f'measured on {FLAGS.lsuv_batch} training images, '
               'pre-activation, tol 0.1, max 10 iterations, from orthogonal '
               'kernels'),
      'seeds': (f'{", ".join(map(str, seeds))}: each variant runs once per '
                'seed; a seed gives every variant the same batches, '
                'augmentation and dropout'),
      'wall time': (f'{total:.0f} s for this call (runs finished before it '
                    'are not trained again)'),
  }
  title = (f'{study.title}: {FLAGS.model} (width {FLAGS.width:g}) on '
           f'{FLAGS.dataset}, {FLAGS.steps} batches of {FLAGS.batch_size}')
  batch_report.write_outputs(study.slug, dict(
      setup=setup, title=title, runs=runs,
      command=common.command(os.path.basename(sys.argv[0]))), out)
  print(f'wrote {out}/{study.slug}.png, results.md, results.json '
        f'({total:.0f} s)')


if __name__ == '__main__':
  app.run(main)
