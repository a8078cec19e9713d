"""Model B (5x5 and 1x1 convs, max-pooling) on CIFAR-10 with the paper's protocol (see `paper.py`).

Command (CIFAR-10 prepared offline from a local copy of the official archive):

  python -m allconv_jax.main --config=configs/model_b.py --workdir=workdirs/model_b \
      --config.dataset.archive=/path/to/cifar-10-binary.tar.gz

Expected result after 350 epochs: about 89.8% test accuracy (the paper's
Table 3, no augmentation); the first reference's PyTorch re-implementation
reached 84.4%. A GPU run: on a 2-core CPU one epoch takes well over ten minutes.
"""

from configs import paper


def get_config():
  """Returns the configuration of this experiment."""
  return paper.get_config('model_b')
