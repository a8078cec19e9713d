"""Experiment configs: every field with its default, loading a config file,
and the one check of a config.

The files in the repository's ``configs/`` directory are experiments: each a
``get_config()`` that starts from `defaults` (or from ``configs/paper.py``,
the paper's protocol beside its tables) and changes a few fields. They
import only this module (and load each other by path, `load`), so that they
load from any directory (``--config=/path/to/configs/paper.py:model_a``).
Every entry point calls `validate` before anything else, so a mistake is one
line naming the field and what is allowed, before any data is loaded or file
written.
"""

import importlib.util
import operator
import os

import ml_collections
from ml_collections import config_dict

from allconv_jax.errors import UserError

OPTIMIZERS = ('sgd', 'adam', 'rmsprop')
SCHEDULES = ('piecewise', 'onecycle')
TRANSFER_HEADS = ('zeros', 'fresh')  # transfer.head_init


def defaults() -> ml_collections.ConfigDict:
  """Every field of an experiment config, documented, with its default.

  All-CNN-C on CIFAR-10 with the paper's optimizer and the usual modern
  input pipeline (per-channel standardization, random translations and
  flips); ``configs/paper.py`` changes it to the paper's protocol.
  """
  config = ml_collections.ConfigDict()
  # Each group of fields is set, and documented, by its function below.
  _network(config)
  _data(config)
  _training(config)
  _population(config)
  _checkpoints(config)
  _transfer(config)
  _modes(config)
  _hosts(config)
  return config


def _network(config: ml_collections.ConfigDict) -> None:
  """The network, its compute and its initialization (LSUV included)."""

  config.model = 'all_cnn_c'  # One of allconv_jax.models.NAMES.
  # Classes of the class layer; None takes it from the data.
  config.num_classes = config_dict.placeholder(int)
  # Multiplier on the 96/192 channels of the paper (1.0 = the paper).
  config.width = 1.0
  # 20% dropout on the input, 50% after each pooling layer or its replacement.
  config.dropout = True
  # The 20% input dropout alone (only with dropout=True); the second
  # reference's final model has none.
  config.input_dropout = True
  # Batch norm after every hidden conv (not in the paper).
  config.batch_norm = False
  # ReLU on the 1x1 class layer before global averaging, as in the paper.
  config.class_relu = True
  # Compute dtype: 'float32' or 'bfloat16' (parameters and loss stay float32).
  config.dtype = 'float32'
  # How convolutions are computed: 'auto' (the fastest measured: 'onednn' on
  # CPU where it can be built, else 'subpixel'; 'native' on GPU/TPU), 'native'
  # (XLA's), 'subpixel' (strided convs get an input gradient without XLA's
  # zero dilation) or 'onednn' (see allconv_jax/conv.py and onednn.py).
  # Results agree to float32 rounding.
  config.conv_impl = 'auto'
  # Kernel initializer: he_uniform, glorot_normal, gaussian (std 0.01),
  # orthogonal, or lsuv (data-driven; see allconv_jax/lsuv.py).
  config.init = 'he_uniform'

  # LSUV (init='lsuv'), once before the first step on this many preprocessed
  # training images: each conv rescaled until its output variance is within tol
  # of 1 (max_iters times at most), before the ReLU ('pre_activation', the
  # paper's) or after it ('post_activation').
  config.lsuv = ml_collections.ConfigDict()
  config.lsuv.batch_size = 128
  config.lsuv.tol = 0.1
  config.lsuv.max_iters = 10
  config.lsuv.measure = 'pre_activation'


def _data(config: ml_collections.ConfigDict) -> None:
  """The dataset, its preprocessing and the augmentation."""
  config.dataset = ml_collections.ConfigDict()
  # cifar10, cifar100 or digits (scikit-learn's 8x8 digits, offline).
  config.dataset.name = 'cifar10'
  # Where tensorflow-datasets keeps prepared data (None: ~/tensorflow_datasets).
  config.dataset.data_dir = config_dict.placeholder(str)
  # A local copy of the official cifar-10-binary.tar.gz / cifar-100-binary.tar.gz
  # to prepare from with no network.
  config.dataset.archive = config_dict.placeholder(str)
  # Images held out of the training split for model selection: never trained
  # on, never used to fit the preprocessing; stratified by class, the same for
  # every seed. 0: no validation split (the final checkpoint is selected).
  config.dataset.validation_size = 0
  # Class subset: comma-separated names or indices, relabelled 0..k-1 in that
  # order ('' = all classes), e.g. 'cat,dog' or '3,5'.
  config.dataset.classes = ''
  # CIFAR-100 labels: 'fine' (100 classes) or 'coarse' (20 superclasses).
  config.dataset.label = 'fine'

  # Preprocessing, fitted on the training split and stored in the workdir.
  config.preprocess = ml_collections.ConfigDict()
  # Per-channel standardization (zero mean, unit variance). With neither it
  # nor gcn_zca, pixels are scaled to [0, 1].
  config.preprocess.standardize = True
  # Global contrast normalization + ZCA whitening, as in the paper (pylearn2's
  # pipeline of Goodfellow et al.'s maxout networks), fitted on the training
  # split only. GCN, per image x of all 32*32*3 values:
  #   x <- x - mean(x);  x <- x / (||x||_2 / gcn_scale)
  # (images with ||x||_2 / gcn_scale < 1e-8 are left undivided). ZCA, over the
  # N GCN'd training images: m = their mean, C = (X - m)^T (X - m) / N =
  # V diag(lambda) V^T, P = V diag(1 / sqrt(lambda + zca_filter_bias)) V^T,
  # applied as (x - m) P.
  config.preprocess.gcn_zca = False
  # The L2 norm of every image after GCN (pylearn2's scale=55).
  config.preprocess.gcn_scale = 55.0
  # Added to the covariance eigenvalues before whitening (pylearn2's
  # filter_bias=0.1).
  config.preprocess.zca_filter_bias = 0.1

  # Augmentation, on device inside the train step.
  config.augment = ml_collections.ConfigDict()
  # Random translation by pad-and-crop, as a fraction of the image side.
  config.augment.translate = 0.1
  # Random horizontal flip.
  config.augment.flip = True


def _training(config: ml_collections.ConfigDict) -> None:
  """Optimization (the paper's protocol), the options the paper does not
  use, and the seed."""
  # Optimization: the paper's protocol.
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 350
  # Train this many steps instead of num_epochs epochs (0: num_epochs epochs).
  # Schedule boundaries still count epochs of the training split.
  config.num_train_steps = 0
  # Train steps per dispatch (one jitted call runs them from the training
  # split kept on the device), cut short at evaluations and checkpoints;
  # signals are handled between calls. 0: 1 on a CPU, where a call costs
  # little beside a step, 100 on an accelerator, where it decides the speed.
  config.steps_per_dispatch = 0
  # Evaluate (checkpoint, select) every this many steps, and at the last
  # step, instead of at the end of every epoch (0: every epoch).
  config.eval_every_steps = 0
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

  # Options the paper does not use (experiments/results/training_options_digits/).
  # Label smoothing (optax.smooth_labels): this much of the targets' mass goes
  # evenly to all classes (0: one-hot); evaluation losses stay cross-entropy.
  config.label_smoothing = 0.0
  # Moving average of the weights and batch-norm statistics, updated after
  # each step t with decay min(ema_decay, (1 + t) / (10 + t)) (TensorFlow's
  # ExponentialMovingAverage with num_updates); 0: off. Evaluated beside the
  # trained weights (ema_* columns), checkpointed, it selects on validation
  # and is what eval, visualize, predict, export and transfer load.
  config.ema_decay = 0.0
  # Also evaluate with horizontal-flip test-time augmentation (the mean
  # softmax of each image and its mirror; *_flip_accuracy columns), which
  # never selects; eval, predict and export stay plain.
  config.eval_flip = False

  config.seed = 0  # Of initialization, batch order, augmentation and dropout.


def _population(config: ml_collections.ConfigDict) -> None:
  """A population: the sweep over seeds and learning rates."""
  # A population (see allconv_jax/population.py): every learning rate times
  # every seed trained together as one program, each member a run of its own
  # in <workdir>/members/<name>/. Empty: the run's learning_rate (or seed).
  config.sweep = ml_collections.ConfigDict()
  config.sweep.seeds = ()
  config.sweep.learning_rates = ()
  # Members whose steps are computed at once (jax.vmap), the next ones after
  # them. 0: all on an accelerator, 1 on a CPU (one member's step fills it).
  config.sweep.members_at_once = 0


def _checkpoints(config: ml_collections.ConfigDict) -> None:
  """Checkpoints, and what a diverged run does."""
  # Checkpoints: every epoch, and every this many steps too (0: epochs only).
  config.checkpoint_every_steps = 0
  # How many of the latest checkpoints to keep (the best by validation
  # accuracy is kept apart).
  config.checkpoint_keep = 3
  # Stop at the first non-finite loss, keeping the last good checkpoint.
  config.halt_on_nan = True


def _transfer(config: ml_collections.ConfigDict) -> None:
  """Fine-tuning from another run (``transfer.from_workdir``)."""
  # Transfer learning (allconv_jax/transfer.py): from another run's workdir.
  config.transfer = ml_collections.ConfigDict()
  config.transfer.from_workdir = config_dict.placeholder(str)
  # Comma-separated layer patterns that are re-initialized instead of copied.
  config.transfer.reinit = 'classifier'
  # Feature-extractor mode: train only the re-initialized layers.
  config.transfer.freeze = False
  # A re-initialized class layer starts at 'zeros' (kernel and bias: a uniform
  # prediction, loss ln k; big_vision's head_zeroinit) or 'fresh' (the kernel
  # initializer's draw, zero bias); other re-initialized layers start fresh.
  config.transfer.head_init = 'zeros'


def _modes(config: ml_collections.ConfigDict) -> None:
  """The fields of ``--mode=visualize`` and ``--mode=predict``."""
  # --mode=visualize (allconv_jax/visualize.py): guided backpropagation,
  # deconvnet and saliency maps into <workdir>/visualizations/<layer>.png.
  config.visualize = ml_collections.ConfigDict()
  # Comma-separated layers (conv1, ..., classifier); '' = a low, a middle and
  # a top hidden layer, e.g. conv1, conv4, conv8 of All-CNN-C.
  config.visualize.layers = ''
  # Comma-separated channel indices drawn for every chosen layer; '' = each
  # layer's num_units channels of highest mean activation on the test split.
  config.visualize.units = ''
  config.visualize.num_units = 4
  # Test images per unit: those on which its mean activation is highest.
  config.visualize.num_images = 4

  # --mode=predict (allconv_jax/predict.py): class probabilities of the
  # selected checkpoint for your own images (the run's classes and
  # preprocessing), one JSON line per image and <workdir>/predictions.csv.
  config.predict = ml_collections.ConfigDict()
  # An image file (any format Pillow reads), a folder or a glob ('*.jpg');
  # each is turned upright (EXIF), made RGB and stretched to 32x32 (bilinear,
  # antialiased); files that are not images are skipped.
  config.predict.images = config_dict.placeholder(str)
  # Classes reported per image, best first (at most the number of classes).
  config.predict.top_k = 3


def _hosts(config: ml_collections.ConfigDict) -> None:
  """Several processes (``--config.distributed.*``)."""
  # Several processes (hosts); every local device is used either way. Unset
  # fields are detected by JAX in SLURM, Open MPI and Cloud TPU.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False
  config.distributed.coordinator_address = config_dict.placeholder(str)  # 'host:port'
  config.distributed.num_processes = config_dict.placeholder(int)
  config.distributed.process_id = config_dict.placeholder(int)
  # Seconds a process waits for the others to join (JAX's default).
  config.distributed.initialization_timeout = 300
  # Seconds without a heartbeat after which a process counts as dead and the
  # others stop with a one-line error (JAX's default).
  config.distributed.heartbeat_timeout = 100
  # Every this many steps the processes agree (one all-reduce) whether any
  # got SIGTERM or SIGINT; then all save at the same step and stop. Unused in
  # a single process, which checks its signals every step.
  config.distributed.stop_check_every_steps = 10


def load_module(path: str):
  """A config file as a module, for its constants (e.g. a sweep's rates)."""
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(path: str) -> ml_collections.ConfigDict:
  """Loads a config file as ``--config`` does: ``'configs/paper.py:model_a'``.

  The text after the colon, if any, is passed to the file's ``get_config``.
  """
  path, _, arg = path.partition(':')
  module = load_module(path)
  return module.get_config(arg) if arg else module.get_config()


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line `UserError` for the first bad config value.

  The one place where a config is checked: the library below it takes the
  values as given.
  """
  # pylint: disable=g-import-not-at-top
  # Here, not at the top: loading a config file must not start JAX.
  from allconv_jax import conv, datasets, lsuv, models, sharding
  # pylint: enable=g-import-not-at-top
  def need(ok: bool, field: str, message: str):
    if not ok:
      raise UserError(f'{field}: {message}')

  need(config.model in models.NAMES, 'model',
       f"unknown network {config.model!r}; allowed: {', '.join(models.NAMES)}")
  need(config.dataset.name in datasets.NAMES, 'dataset.name',
       f"unknown dataset {config.dataset.name!r}; allowed: {', '.join(datasets.NAMES)}")
  need(config.optimizer in OPTIMIZERS, 'optimizer',
       f"unknown optimizer {config.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
  need(config.lr_schedule in SCHEDULES, 'lr_schedule',
       f"unknown schedule {config.lr_schedule!r}; allowed: {', '.join(SCHEDULES)}")
  need(config.transfer.head_init in TRANSFER_HEADS, 'transfer.head_init', f"unknown "
       f"head {config.transfer.head_init!r}; allowed: {', '.join(TRANSFER_HEADS)}")
  need(config.dtype in models.DTYPES, 'dtype',
       f"unknown dtype {config.dtype!r}; allowed: {', '.join(models.DTYPES)}")
  need(config.conv_impl in conv.IMPLS, 'conv_impl',
       f"unknown implementation {config.conv_impl!r}; allowed: {', '.join(conv.IMPLS)}")
  inits = [*models.INITIALIZERS, 'lsuv']
  need(config.init in inits, 'init',
       f"unknown initializer {config.init!r}; allowed: {', '.join(inits)}")
  for field in ('batch_size', 'eval_batch_size', 'num_epochs', 'checkpoint_keep',
                'predict.top_k'):
    value = operator.attrgetter(field)(config)
    need(isinstance(value, int) and value > 0, field,
         f'must be a positive integer, got {value!r}')
  for field in ('learning_rate', 'lr_decay', 'width', 'preprocess.gcn_scale',
                'preprocess.zca_filter_bias'):
    value = operator.attrgetter(field)(config)
    need(value > 0, field, f'must be positive, got {value!r}')
  need(0 <= config.label_smoothing < 1, 'label_smoothing',
       f'must be in [0, 1), got {config.label_smoothing!r}')
  need(0 <= config.ema_decay < 1, 'ema_decay',
       f'must be in [0, 1) (0: off), got {config.ema_decay!r}')
  need(config.weight_decay >= 0, 'weight_decay',
       f'must be zero or positive, got {config.weight_decay!r}')
  need(0 <= config.momentum < 1, 'momentum',
       f'must be in [0, 1), got {config.momentum!r}')
  bounds = list(config.lr_boundaries)
  need(all(b > 0 for b in bounds) and bounds == sorted(set(bounds)),
       'lr_boundaries', f'must be increasing positive epochs, got {bounds!r}')
  need(0 <= config.augment.translate < 0.5, 'augment.translate',
       f'must be a fraction of the side in [0, 0.5), got {config.augment.translate!r}')
  need(config.num_classes is None or config.num_classes > 0, 'num_classes',
       f'must be positive or None (from the data), got {config.num_classes!r}')
  for field, zero in (('checkpoint_every_steps', 'each evaluation only'),
                      ('num_train_steps', 'num_epochs epochs'),
                      ('eval_every_steps', 'every epoch'),
                      ('steps_per_dispatch', '1 on a CPU, 100 elsewhere'),
                      ('sweep.members_at_once', 'all on an accelerator, 1 on a CPU'),
                      ('dataset.validation_size', 'no validation split')):
    value = operator.attrgetter(field)(config)
    need(isinstance(value, int) and value >= 0, field,
         f'must be 0 ({zero}) or a positive integer, got {value!r}')
  if config.init == 'lsuv':
    sharding.check_batch_size(config.lsuv.batch_size, 'lsuv.batch_size')
    need(config.lsuv.tol > 0, 'lsuv.tol', f'must be positive, got {config.lsuv.tol!r}')
    need(config.lsuv.measure in lsuv.MEASURES, 'lsuv.measure',
         f"unknown {config.lsuv.measure!r}; allowed: {', '.join(lsuv.MEASURES)}")
    iters = config.lsuv.max_iters
    need(isinstance(iters, int) and iters >= 0, 'lsuv.max_iters',
         f'must be a non-negative integer, got {iters!r}')
  labels = ('fine', 'coarse') if config.dataset.name == 'cifar100' else ('fine',)
  label = config.dataset.label
  need(label in labels, 'dataset.label',
       f"{label!r} is {'only for cifar100' if label == 'coarse' else 'unknown'}; "
       f"allowed: {', '.join(labels)}")
  seeds, rates = list(config.sweep.seeds), list(config.sweep.learning_rates)
  need(all(isinstance(v, int) and v >= 0 for v in seeds) and len(set(seeds)) == len(seeds),
       'sweep.seeds', f'must be distinct non-negative integers, got {seeds!r}')
  need(all(isinstance(v, (int, float)) and v > 0 for v in rates) and
       len(set(rates)) == len(rates), 'sweep.learning_rates',
       f'must be distinct positive numbers, got {rates!r}')
  validate_distributed(config)


def validate_distributed(config: ml_collections.ConfigDict) -> None:
  """The checks of ``config.distributed``, also made before JAX starts."""
  dist = config.distributed
  for field in ('initialization_timeout', 'heartbeat_timeout',
                'stop_check_every_steps'):
    value = dist[field]
    if not (isinstance(value, int) and value > 0):
      raise UserError(f'distributed.{field}: must be a positive integer, '
                      f'got {value!r}')
  count, index = dist.num_processes, dist.process_id
  if count is not None and count < 1:
    raise UserError(f'distributed.num_processes: must be a positive integer, '
                    f'got {count!r}')
  if (count is None) != (index is None) and dist.coordinator_address:
    raise UserError('distributed.process_id: set num_processes and process_id '
                    'together (or neither, for JAX to detect them)')
  if index is not None and not 0 <= index < (count or index + 1):
    raise UserError(f'distributed.process_id: {index} is not in 0..{count - 1} '
                    f'(num_processes={count})')
