"""Defaults shared by every experiment: All-CNN-C on CIFAR-10.

Every other config starts from this one and changes a few fields. It is the
paper's network and optimizer with the usual modern input pipeline
(per-channel standardization, random translations and flips) instead of the
paper's GCN + ZCA without augmentation (that is `paper.py`). Run it with

  python -m allconv_jax.main --config=configs/default.py --workdir=workdirs/default \
      --config.dataset.archive=/path/to/cifar-10-binary.tar.gz

Expected result: not measured here (no GPU); the paper reports 92.75% test
accuracy for All-CNN-C on CIFAR-10 with flips and translations.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration, every field documented."""
  config = ml_collections.ConfigDict()

  # Network: one of allconv_jax.models.NAMES (model_a .. all_cnn_c).
  config.model = 'all_cnn_c'
  # Classes of the class layer; None takes it from the data.
  config.num_classes = config_dict.placeholder(int)
  # Multiplier on the 96/192 channels of the paper (1.0 = the paper).
  config.width = 1.0
  # 20% dropout on the input, 50% after each pooling layer or its replacement.
  config.dropout = True
  # Batch norm after every hidden conv (not in the paper).
  config.batch_norm = False
  # ReLU on the 1x1 class layer before global averaging, as in the paper.
  config.class_relu = True
  # Compute dtype: 'float32' or 'bfloat16' (parameters and loss stay float32).
  config.dtype = 'float32'
  # How convolutions are computed: 'auto' (the fastest measured on the
  # platform: 'onednn' on CPU where it can be built, else 'subpixel';
  # 'native' on GPU/TPU), 'native' (XLA's), 'subpixel' (strided convs get an
  # input gradient without XLA's zero dilation) or 'onednn' (oneDNN's
  # convolutions; see allconv_jax/conv.py and onednn.py). Results agree to
  # float32 rounding.
  config.conv_impl = 'auto'
  # Kernel initializer: he_uniform, glorot_normal, gaussian (std 0.01),
  # orthogonal, or lsuv (data-driven; see allconv_jax/lsuv.py).
  config.init = 'he_uniform'

  # LSUV (init='lsuv'): run once before the first step on this many
  # preprocessed training images; rescale each conv until its output variance
  # is within tol of 1 (at most max_iters times), measured before the ReLU
  # ('pre_activation', as in the paper) or after it ('post_activation').
  config.lsuv = ml_collections.ConfigDict()
  config.lsuv.batch_size = 128
  config.lsuv.tol = 0.1
  config.lsuv.max_iters = 10
  config.lsuv.measure = 'pre_activation'

  config.dataset = ml_collections.ConfigDict()
  # cifar10, cifar100 or digits (scikit-learn's 8x8 digits, offline).
  config.dataset.name = 'cifar10'
  # Where tensorflow-datasets keeps prepared data (None: ~/tensorflow_datasets).
  config.dataset.data_dir = config_dict.placeholder(str)
  # A local copy of the official cifar-10-binary.tar.gz / cifar-100-binary.tar.gz
  # to prepare from with no network.
  config.dataset.archive = config_dict.placeholder(str)
  # Class subset: comma-separated names or indices, relabelled 0..k-1 in that
  # order ('' = all classes), e.g. 'cat,dog' or '3,5'.
  config.dataset.classes = ''
  # CIFAR-100 labels: 'fine' (100 classes) or 'coarse' (20 superclasses).
  config.dataset.label = 'fine'

  # Preprocessing, fitted on the training split and stored in the workdir.
  config.preprocess = ml_collections.ConfigDict()
  # Per-channel standardization (zero mean, unit variance).
  config.preprocess.standardize = True
  # Global contrast normalization + ZCA whitening (as in the paper).
  config.preprocess.gcn_zca = False
  # Added to the covariance eigenvalues before whitening.
  config.preprocess.zca_epsilon = 0.01

  # Augmentation, on device inside the train step.
  config.augment = ml_collections.ConfigDict()
  # Random translation by pad-and-crop, as a fraction of the image side.
  config.augment.translate = 0.1
  # Random horizontal flip.
  config.augment.flip = True

  # Optimization: the paper's protocol.
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 350
  # sgd, adam or rmsprop.
  config.optimizer = 'sgd'
  config.learning_rate = 0.01
  # 'piecewise': multiply by lr_decay at each epoch of lr_boundaries;
  # 'onecycle': cosine warm-up to learning_rate and annealing to zero.
  config.lr_schedule = 'piecewise'
  config.lr_boundaries = (200, 250, 300)
  config.lr_decay = 0.1
  # SGD momentum (RMSProp momentum too); 0 turns it off.
  config.momentum = 0.9
  config.nesterov = False
  # L2 penalty added to the gradient of every parameter.
  config.weight_decay = 0.001

  # Seed of initialization, batch order, augmentation and dropout.
  config.seed = 0

  # Checkpoints: every epoch, and every this many steps too (0: epochs only).
  config.checkpoint_every_steps = 0
  # How many of the latest checkpoints to keep (the best is kept apart).
  config.checkpoint_keep = 3
  # Stop at the first non-finite loss, keeping the last good checkpoint.
  config.halt_on_nan = True

  # Transfer learning (see allconv_jax/transfer.py): start from the best
  # checkpoint of another run (a workdir, or a checkpoint directory).
  config.transfer = ml_collections.ConfigDict()
  config.transfer.from_workdir = config_dict.placeholder(str)
  # Comma-separated layer patterns that are re-initialized instead of copied.
  config.transfer.reinit = 'classifier'
  # Feature-extractor mode: train only the re-initialized layers.
  config.transfer.freeze = False

  # --mode=visualize (see allconv_jax/visualize.py): guided backpropagation,
  # deconvnet and saliency maps of the best checkpoint, written to
  # <workdir>/visualizations/<layer>.png.
  config.visualize = ml_collections.ConfigDict()
  # Comma-separated layers (conv1, conv2, ..., classifier); '' = a low, a
  # middle and a top hidden layer, e.g. conv1, conv4, conv8 of All-CNN-C.
  config.visualize.layers = ''
  # Comma-separated channel indices drawn for every chosen layer; '' = each
  # layer's num_units channels of highest mean activation on the test split.
  config.visualize.units = ''
  config.visualize.num_units = 4
  # Test images per unit: those on which its mean activation is highest.
  config.visualize.num_images = 4

  # Several processes (hosts). Single-process runs leave this alone; every
  # local device is used either way. Unset fields are detected by JAX in
  # SLURM, Open MPI and Cloud TPU environments.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False
  config.distributed.coordinator_address = config_dict.placeholder(str)  # 'host:port'
  config.distributed.num_processes = config_dict.placeholder(int)
  config.distributed.process_id = config_dict.placeholder(int)
  return config
