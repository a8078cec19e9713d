"""Model A (5x5 convs and max-pooling) on CIFAR-10 with the paper's protocol (see `paper.py`).

Command (CIFAR-10 prepared offline from a local copy of the official archive):

  python -m allconv_jax.main --config=configs/model_a.py --workdir=workdirs/model_a \
      --config.dataset.archive=/path/to/cifar-10-binary.tar.gz

Expected result after 350 epochs: about 87.5% test accuracy (the paper's
Table 3, no augmentation); the first reference's PyTorch re-implementation
reached 86.4%. A GPU run: on a 2-core CPU one epoch takes well over ten minutes.
"""

from configs import paper


def get_config():
  """Returns the configuration of this experiment."""
  return paper.get_config('model_a')
