"""The training options beyond the paper, each against the default, per seed.

Label smoothing (``label_smoothing``) and a moving average of the weights
(``ema_decay``) are each switched on alone in a config (`--config`,
``configs/digits.py`` by default), and every run also evaluates with
horizontal-flip test-time augmentation (``eval_flip``, which changes no
training), so each run gives the plain and the flip accuracy of the same
network. Every (variant, seed) is one `train.train_and_evaluate` in its own
workdir ``<workdir_root>/<variant>/seed<seed>`` (skipped when finished).
The checkpoint is selected on the config's validation split, as the library
always does; the test split is only reported.

Writes ``results.md`` (selected checkpoint's test accuracy, mean ± sample std
over the seeds, and its per-seed difference from the default) and
``results.json`` to `--out`.

On the embedded digits (full width, three seeds; about 30 minutes on 2
cores):

  python experiments/training_options.py --seeds=0,1,2

On CIFAR-10 with the paper's protocol (a GPU job):

  python experiments/training_options.py --config=configs/paper.py:all_cnn_c \\
      --archive=/path/to/cifar-10-binary.tar.gz --out=experiments/results/training_options_cifar10
"""

import os
import sys
import time

import common
import numpy as np
from absl import app, flags

from allconv_jax import config as config_lib
from allconv_jax.errors import UserError

# name -> (label, config changes). The first is the baseline.
VARIANTS = {
    'default': ('default', {}),
    'label_smoothing': ('label smoothing 0.1', {'label_smoothing': 0.1}),
    'ema': ('moving average of the weights, decay 0.98', {'ema_decay': 0.98}),
}

FLAGS = flags.FLAGS
flags.DEFINE_string('config', os.path.join(common.ROOT, 'configs', 'digits.py'),
                    'The default every variant changes (a config file, '
                    'optionally with :argument).')
flags.DEFINE_string('archive', None, 'Local copy of the official CIFAR archive.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; every variant runs once per seed.')
flags.DEFINE_string('workdir_root', None, 'Where the runs go (default: '
                    'workdirs/training_options_<dataset>).')


def make_config(variant: str, seed: int):
  """The default config with `variant`'s changes, flip TTA on, and `seed`."""
  config = config_lib.load(FLAGS.config)
  if FLAGS.archive:
    config.dataset.archive = FLAGS.archive
  config.eval_flip = True
  config.seed = seed
  config.update_from_flattened_dict(VARIANTS[variant][1])
  return config


def accuracies(record: dict) -> dict:
  """The selected checkpoint's test accuracies of a finished run."""
  summary = record['summary']
  return dict(plain=summary['selected_test_accuracy'],
              flip=summary['selected_test_flip_accuracy'],
              validation=summary['selected_validation_accuracy'],
              epoch=summary['selected_epoch'])


def table(results: dict, seeds: list[int]) -> str:
  """Markdown: per variant, plain and flip test accuracy and the gain."""
  base = np.array([results['default'][s]['plain'] for s in seeds])
  lines = ['| variant | test accuracy (%) | with flip TTA (%) | vs default, per '
           'seed (points) | flip TTA vs plain, per seed (points) |',
           '|---|---:|---:|---|---|']
  for name, (label, _) in VARIANTS.items():
    plain = np.array([results[name][s]['plain'] for s in seeds])
    flip = np.array([results[name][s]['flip'] for s in seeds])
    gain = ', '.join(f'{100 * d:+.1f}' for d in plain - base)
    tta = ', '.join(f'{100 * d:+.1f}' for d in flip - plain)
    lines.append(f'| {label} | {common.format_mean_std(plain)} | '
                 f'{common.format_mean_std(flip)} | '
                 f'{"—" if name == "default" else gain} | {tta} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError as e:
    raise app.UsageError(f'--seeds: {e}')
  base = make_config('default', seeds[0])
  dataset = base.dataset.name
  out = common.results_dir(f'training_options_{dataset}')
  root = FLAGS.workdir_root or os.path.join(
      common.ROOT, 'workdirs', f'training_options_{dataset}')
  start, results, seconds = time.time(), {}, {}
  runs = [(name, seed) for name in VARIANTS for seed in seeds]
  try:
    config_lib.validate(base)
    for index, (name, seed) in enumerate(runs, 1):
      print(f'[{index}/{len(runs)}] {name} seed {seed}', flush=True)
      record = common.train_run(make_config(name, seed),
                                os.path.join(root, name, f'seed{seed}'))
      if record is None or record['summary'] is None:
        raise UserError(f'{name} seed {seed}: diverged; see its workdir')
      results.setdefault(name, {})[seed] = accuracies(record)
      seconds.setdefault(name, []).append(record['seconds'])
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  total = time.time() - start

  setup = {
      'date': common.today(),
      'machine': common.machine(),
      'default': (f'`{os.path.relpath(FLAGS.config.partition(":")[0], common.ROOT)}` '
                  f'({base.model}, width {base.width:g}, {base.num_epochs} epochs '
                  f'of batch {base.batch_size}, {base.optimizer}, '
                  f'{base.lr_schedule} schedule)'),
      'variants': '; '.join(f'{label}: {changes or "nothing changed"}'
                            for label, changes in VARIANTS.values()),
      'selection': (f'the checkpoint of best validation accuracy '
                    f'({base.dataset.validation_size} held-out training '
                    'images); with the moving average, its accuracy selects '
                    'and its weights are reported'),
      'flip TTA': ('every run also evaluates the class of the mean softmax of '
                   'each test image and its mirror image; it changes no '
                   'training and selects nothing'),
      'seeds': ', '.join(map(str, seeds)),
      'seconds per run (mean)': ', '.join(
          f'{name} {np.mean(s):.0f}' for name, s in seconds.items()),
      'wall time': f'{total:.0f} s for this call (finished runs are not trained again)',
  }
  common.write_results(
      out, title=f'Training options on {dataset}: each against the default',
      script='training_options.py', setup=setup,
      command_line=common.command('training_options.py'),
      tables=[f'Test accuracy of the selected checkpoint, mean ± sample std '
              f'over {len(seeds)} seeds:', table(results, seeds)],
      images=[], data=dict(results={n: {str(s): r for s, r in v.items()}
                                    for n, v in results.items()}))
  print(f'wrote {out}/results.md ({total:.0f} s)')


if __name__ == '__main__':
  app.run(main)
