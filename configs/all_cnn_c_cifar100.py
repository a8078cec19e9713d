"""All-CNN-C on CIFAR-100 (100 fine classes) with the paper's protocol.

Command:

  python -m allconv_jax.main --config=configs/all_cnn_c_cifar100.py \
      --workdir=workdirs/all_cnn_c_cifar100 \
      --config.dataset.archive=/path/to/cifar-100-binary.tar.gz

Expected result after 350 epochs: about 66% test accuracy (the paper reports
33.71% error for All-CNN on CIFAR-100 without augmentation). Coarse labels:
add --config.dataset.label=coarse (20 superclasses).
"""

import os

from allconv_jax import config as base


def get_config():
  """Returns the configuration of this experiment."""
  # The paper's protocol (configs/paper.py, beside this file).
  config = base.load(os.path.join(os.path.dirname(__file__), 'paper.py:all_cnn_c'))
  config.dataset.name = 'cifar100'
  return config
