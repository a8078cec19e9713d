"""The paper's CIFAR-10 protocol, shared by the per-network configs.

Not an experiment of its own: `model_a.py`, ..., `all_cnn_c.py` call
`get_config(model)`. The protocol (Springenberg et al., 2014, Section 3.1 and
the first reference's re-implementation): global contrast normalization and
ZCA whitening, dropout 20% on the input and 50% after each pooling layer (or
its replacement), SGD with momentum 0.9, weight decay 0.001, 350 epochs with
the learning rate multiplied by 0.1 after epochs 200, 250 and 300, batch 128,
no augmentation (the paper's Table 3 columns without data augmentation).
The paper picks the learning rate per network from {0.25, 0.1, 0.05, 0.01};
0.01 is the rate the first reference used for all six networks.
"""

from configs import default


def get_config(model: str = 'all_cnn_c'):
  """Returns the paper's CIFAR-10 configuration for `model`."""
  config = default.get_config()
  config.model = model
  config.dataset.name = 'cifar10'
  config.preprocess.standardize = False
  config.preprocess.gcn_zca = True
  config.augment.translate = 0.0
  config.augment.flip = False
  # The optimizer, schedule, batch size and epochs of default.py are the
  # paper's already.
  return config
