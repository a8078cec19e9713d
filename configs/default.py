"""Defaults shared by every experiment: All-CNN-C on CIFAR-10.

Every field, its default and its meaning are in `allconv_jax.config.defaults`
(allconv_jax/config.py); this experiment is those defaults: the paper's
network and optimizer with the usual modern input pipeline (per-channel
standardization, random translations and flips) instead of the paper's
GCN + ZCA without augmentation (that is `paper.py`). Run it with

  python -m allconv_jax.main --config=configs/default.py --workdir=workdirs/default \
      --config.dataset.archive=/path/to/cifar-10-binary.tar.gz

Expected result: not measured here (no GPU); the paper reports 92.75% test
accuracy for All-CNN-C on CIFAR-10 with flips and translations.
"""

from allconv_jax import config


def get_config():
  """Returns the default configuration (`allconv_jax.config.defaults`)."""
  return config.defaults()
