"""Transfer from All-CNN-C trained on CIFAR-10 to a 10-class CIFAR-100 subset.

The first reference's protocol: the best CIFAR-10 checkpoint is copied into a
new network whose 1x1 classifier is re-initialized for the new classes (at
zero, `transfer.head_init`; the reference drew a random kernel with a zero
bias, `--config.transfer.head_init=fresh`); everything is fine-tuned with SGD (momentum 0.9,
weight decay 0.001) for 100 epochs at a constant learning rate from the sweep
[0.0025, 0.001, 0.0005]. `dataset.classes` is `subset1` (vehicles, close to
CIFAR-10's classes) or `subset2` (flowers, fruit and vegetables, far from
them); see `allconv_jax.datasets.SUBSETS`. The scratch baseline is the same
config with `--config.transfer.from_workdir=` left unset.

Command (after training `configs/paper.py:all_cnn_c` into workdirs/all_cnn_c):

  python -m allconv_jax.main --config=configs/transfer_cifar100.py \
      --workdir=workdirs/transfer_subset1_lr0.001 \
      --config.dataset.archive=/path/to/cifar-100-binary.tar.gz

`experiments/transfer_study.py` runs the whole sweep (both subsets, three
learning rates, transfer and scratch) and plots it.

Expected result: not measured here (it needs CIFAR and a GPU). The first
reference found transfer clearly above scratch on both subsets and less prone
to stalling; `experiments/results/transfer_digits/` has the offline digits
analogue.
"""

import os

from allconv_jax import config as base

# The first reference's learning rates, run as a sweep.
LEARNING_RATES = (0.0025, 0.001, 0.0005)
SUBSETS = ('subset1', 'subset2')


def get_config():
  """Returns the transfer configuration (middle learning rate, subset1)."""
  # The paper's protocol (configs/paper.py, beside this file).
  config = base.load(os.path.join(os.path.dirname(__file__), 'paper.py:all_cnn_c'))
  config.dataset.name = 'cifar100'
  config.dataset.classes = 'subset1'
  config.transfer.from_workdir = 'workdirs/all_cnn_c'
  config.transfer.reinit = 'classifier'
  config.transfer.freeze = False
  config.num_epochs = 100
  config.learning_rate = 0.001
  config.lr_boundaries = ()
  config.weight_decay = 0.001
  return config


def sweep():
  """The runs of the study: (name, overrides) for each subset, rate and start."""
  for subset in SUBSETS:
    for lr in LEARNING_RATES:
      for start in ('transfer', 'scratch'):
        overrides = {'dataset.classes': subset, 'learning_rate': lr}
        if start == 'scratch':
          overrides['transfer.from_workdir'] = None
        yield f'{subset}_lr{lr}_{start}', overrides
