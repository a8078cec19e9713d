"""Initializer study: LSUV vs Glorot normal vs He uniform vs Gaussian(0.01).

`experiments/batch_studies.py --study=init` under its historical name (and
with its historical flag `--inits` for `--variants`); see that script for the
protocol and the outputs (``init_study.png``, ``results.md``,
``results.json``). Examples:

  # CIFAR-10 from a local copy of the official archive (hours on a CPU):
  python experiments/init_study.py --dataset=cifar10 \\
      --archive=/path/to/cifar-10-binary.tar.gz \\
      --out=experiments/results/init_study_cifar10

  # Offline, on scikit-learn's digits, a few minutes on a 2-core CPU:
  python experiments/init_study.py --dataset=digits --width=0.25 \\
      --steps=500 --eval_every=25 --out=experiments/results/init_study_digits
"""

import batch_studies

from absl import app, flags

flags.DEFINE_alias('inits', 'variants')

if __name__ == '__main__':
  flags.FLAGS.set_default('study', 'init')
  app.run(batch_studies.main)
