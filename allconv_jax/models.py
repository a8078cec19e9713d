"""The twelve networks of "Striving for Simplicity: The All Convolutional Net".

Tables 1 and 2 of the paper define three base models and three variants of
each:

* ``model_a``: 5x5 conv 96, max-pool, 5x5 conv 192, max-pool.
* ``model_b``: 5x5 conv 96, 1x1 conv 96, max-pool, 5x5 conv 192, 1x1 conv 192,
  max-pool.
* ``model_c``: 3x3 conv 96, 3x3 conv 96, max-pool, 3x3 conv 192, 3x3 conv 192,
  max-pool.
* ``strided_cnn_X``: the conv before each pool gets stride 2, pooling removed.
* ``convpool_cnn_X``: an extra 3x3 conv of the same width before each pool.
* ``all_cnn_X``: each pool replaced by a 3x3 stride-2 conv of the same width.

All share the top: 3x3 conv 192 (VALID), 1x1 conv 192, 1x1 conv num_classes,
global average pooling over the 6x6 map. Every conv is followed by a ReLU.
Dropout drops 20% of the input (unless ``input_dropout`` is off) and 50% after
each pool (or the layer that replaced it).

Padding follows Caffe, in which the paper's networks were trained: every kxk
conv except the VALID one is padded by k//2 zeros on each side, stride 2
included (`Conv.pads`). Flax's 'SAME' would pad a stride-2 3x3 conv of an
even-sized input by (0, 1) instead, moving each window one pixel down and
right. Max-pooling is 3x3/2 with flax's 'SAME', i.e. pads (0, 1) on the 32-
and 16-pixel maps: the same windows as Caffe's pooling, which rounds its
output size up and so adds a window at the bottom/right edge. The spatial size
goes 32 -> 16 -> 8 -> 6 as in the paper.

`architecture` names every layer with parameters or a random mask, and
`AllConvNet` uses those names as given: convolutions ``conv1``, ``conv2``, ...
in input order and the class layer ``classifier``; batch norms, when on,
``bn1``, ``bn2``, ... after the conv of the same number; dropouts ``dropout0``
(input), ``dropout1``, ... (``dropout0`` is absent without input dropout).
Checkpoints, LSUV and transfer learning address layers by these names.

How convolutions are computed is the caller's choice, passed in as a
function: `allconv_jax.conv.conv_general_dilated` resolves a config's
``conv_impl`` to one. This module never picks one itself, so building a
network never builds the oneDNN extension.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

BASES = ('a', 'b', 'c')
VARIANTS = ('model', 'strided_cnn', 'convpool_cnn', 'all_cnn')
NAMES = tuple(f'{v}_{b}' for v in VARIANTS for b in BASES)

INITIALIZERS = {
    'he_uniform': nn.initializers.he_uniform(),
    'glorot_normal': nn.initializers.glorot_normal(),
    'gaussian': nn.initializers.normal(stddev=0.01),
    'orthogonal': nn.initializers.orthogonal(),
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# (height, width, channels) of every network's input: CIFAR's, and the digits
# upsampled to it.
INPUT_SHAPE = (32, 32, 3)

# The name of the class layer, the last convolution.
CLASSIFIER = 'classifier'


@dataclasses.dataclass(frozen=True)
class Conv:
  """One convolution: a hidden layer or the class layer.

  Attributes:
    name: its parameters' name, ``'conv<n>'`` or `CLASSIFIER`.
    features: output channels.
    kernel: side of the square kernel (odd).
    stride: the same along both axes.
    padding: ``'SAME'``, Caffe's kernel//2 zeros on every side, which keeps
      the size at stride 1 and halves an even size at stride 2 as flax's
      'SAME' does, but places the windows as Caffe does; or ``'VALID'``.
    bn: the name of the batch norm after it in networks with batch norm;
      None for the class layer, which has none.
  """
  name: str
  features: int
  kernel: int
  stride: int = 1
  padding: str = 'SAME'
  bn: str | None = None

  @property
  def pads(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """The explicit ((top, bottom), (left, right)) zero padding."""
    p = self.kernel // 2 if self.padding == 'SAME' else 0
    return ((p, p), (p, p))


@dataclasses.dataclass(frozen=True)
class Pool:
  """A 3x3 stride-2 max-pool (no name: it has no parameters and no mask)."""


@dataclasses.dataclass(frozen=True)
class Drop:
  """Dropout.

  Attributes:
    name: the name its mask's random stream is drawn under.
    rate: the fraction dropped.
    on_input: whether it drops the input's pixels, which
      `AllConvNet.input_dropout` can switch off alone.
  """
  name: str
  rate: float
  on_input: bool = False


Layer = Conv | Pool | Drop


# The two convolutions of each stage of the base models, per base.
_STAGE_KERNELS = {'a': (5,), 'b': (5, 1), 'c': (3, 3)}


def architecture(name: str, num_classes: int,
                 width: float = 1.0) -> list[Layer]:
  """Returns the named layers of a network.

  Args:
    name: one of `NAMES`.
    num_classes: channels of the class layer.
    width: multiplier on the 96/192 channels (1.0 is the paper's network).

  Returns:
    `Conv`, `Pool` and `Drop` entries from input to class layer; the class
    layer is the last `Conv`.

  Raises:
    ValueError: for a name not in `NAMES`.
  """
  if name not in NAMES:
    # Not a UserError: config.validate has checked config.model already.
    raise ValueError(f"model: unknown network {name!r}; allowed: {', '.join(NAMES)}")
  variant, base = name.rsplit('_', 1)
  layers: list[Layer] = [Drop('dropout0', 0.2, on_input=True)]

  def add_conv(features: int, kernel: int, stride: int = 1,
               padding: str = 'SAME'):
    n = 1 + sum(isinstance(layer, Conv) for layer in layers)
    layers.append(Conv(f'conv{n}', features, kernel, stride, padding,
                       bn=f'bn{n}'))

  for stage, paper_width in enumerate((96, 192), start=1):
    w = max(1, round(paper_width * width))
    *first, last = _STAGE_KERNELS[base]
    for kernel in first:
      add_conv(w, kernel)
    # Strided-CNN's stage ends in this conv at stride 2 instead of a pool.
    add_conv(w, last, stride=2 if variant == 'strided_cnn' else 1)
    if variant == 'convpool_cnn':
      add_conv(w, 3)
    if variant in ('model', 'convpool_cnn'):
      layers.append(Pool())
    elif variant == 'all_cnn':
      add_conv(w, 3, stride=2)
    layers.append(Drop(f'dropout{stage}', 0.5))
  top = max(1, round(192 * width))
  add_conv(top, 3, padding='VALID')
  add_conv(top, 1)
  layers.append(Conv(CLASSIFIER, num_classes, 1))
  return layers


def conv_names(layers: Sequence[Layer]) -> list[str]:
  """The names of the convolutions of `architecture`'s list, in order."""
  return [layer.name for layer in layers if isinstance(layer, Conv)]


class AllConvNet(nn.Module):
  """Any of the twelve networks, as a flat sequence of named layers.

  Attributes:
    layers: the output of `architecture`, whose names the layers take.
    dropout: whether to apply the dropout layers in training.
    input_dropout: whether that includes the 20% dropout of the input (with
      it off, only the 50% dropouts after the pools or their replacements).
    batch_norm: batch norm after every hidden conv (not the class layer).
    class_relu: ReLU on the class layer, as in the paper's tables.
    dtype: compute dtype; parameters stay float32 and logits are float32.
    kernel_init: initializer of the conv kernels (biases start at zero).
    bn_axis_name: mesh axis over which batch-norm statistics are averaged
      when the model runs inside `shard_map`; None outside it.
    conv: computes every convolution, a drop-in `lax.conv_general_dilated`
      (XLA's own by default); `allconv_jax.conv.conv_general_dilated` turns
      a ``conv_impl`` into one.
    activation: the ReLU; `allconv_jax.visualize` swaps in ReLUs with other
      backward passes. Each layer's output after it is sown into the
      ``intermediates`` collection as ``'<layer>_activation'``.
  """
  layers: Sequence[Layer]
  dropout: bool = True
  input_dropout: bool = True
  batch_norm: bool = False
  class_relu: bool = True
  dtype: Any = jnp.float32
  kernel_init: Any = INITIALIZERS['he_uniform']
  bn_axis_name: str | None = None
  conv: Callable[..., jax.Array] = lax.conv_general_dilated
  activation: Callable[[jax.Array], jax.Array] = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps NHWC images to float32 logits of shape (N, num_classes)."""
    x = x.astype(self.dtype)
    for layer in self.layers:
      if isinstance(layer, Drop):
        if self.dropout and (self.input_dropout or not layer.on_input):
          x = nn.Dropout(layer.rate, deterministic=not train,
                         name=layer.name)(x)
      elif isinstance(layer, Pool):
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
      else:
        use_bn = self.batch_norm and layer.bn is not None
        x = nn.Conv(
            layer.features, (layer.kernel, layer.kernel),
            strides=(layer.stride, layer.stride), padding=layer.pads,
            use_bias=not use_bn, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=self.kernel_init, conv_general_dilated=self.conv,
            name=layer.name)(x)
        if use_bn:
          # Two-pass variance: E[x^2] - E[x]^2 cancels badly in float32 (the
          # batch-norm gradients of one and of four devices differed by 3e-3
          # of their size with it).
          x = nn.BatchNorm(
              use_running_average=not train, momentum=0.9,
              use_fast_variance=False,
              dtype=self.dtype, param_dtype=jnp.float32,
              axis_name=self.bn_axis_name if train else None,
              name=layer.bn)(x)
        if layer.name != CLASSIFIER or self.class_relu:
          x = self.activation(x)
        # A no-op unless 'intermediates' is mutable. Not under the conv's own
        # name: capture_intermediates stores the conv's outputs there.
        self.sow('intermediates', f'{layer.name}_activation', x)
    # Average and softmax in float32 so bfloat16 runs keep an exact loss.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def create(name: str, num_classes: int = 10, *, width: float = 1.0,
           dropout: bool = True, input_dropout: bool = True,
           batch_norm: bool = False,
           class_relu: bool = True, dtype: str = 'float32',
           init: str = 'he_uniform', bn_axis_name: str | None = None,
           conv: Callable[..., jax.Array] = lax.conv_general_dilated,
           ) -> AllConvNet:
  """Builds one of the twelve networks.

  `allconv_jax.trained.create_model` builds the network a config describes;
  this is the same with the options given one by one.

  Args:
    name: one of `NAMES`, e.g. ``'all_cnn_c'``.
    num_classes: size of the class layer.
    width: multiplier on the 96/192 channels; small widths make fast tests.
    dropout: apply the paper's dropout in training.
    input_dropout: with `dropout`, include its 20% dropout of the input.
    batch_norm: batch norm after each hidden conv.
    class_relu: ReLU on the class layer (the paper has one).
    dtype: ``'float32'`` or ``'bfloat16'`` compute dtype.
    init: kernel initializer, one of `INITIALIZERS` (``'lsuv'`` starts from
      ``'orthogonal'``; `allconv_jax.lsuv` rescales it from data).
    bn_axis_name: see `AllConvNet`.
    conv: see `AllConvNet`; e.g.
      ``allconv_jax.conv.conv_general_dilated('auto')`` is the fastest
      measured on the platform.

  Returns:
    The `AllConvNet` module.

  Raises:
    ValueError: for an unknown name, dtype or initializer, or a class count
      or width that is not positive.
  """
  # Not UserErrors: config.validate has checked these for a config's network.
  if num_classes < 1:
    raise ValueError(f'num_classes: must be a positive integer, got {num_classes}')
  if not width > 0:
    raise ValueError(f'width: must be positive, got {width}')
  if dtype not in DTYPES:
    raise ValueError(f"dtype: unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
  kernel_init = 'orthogonal' if init == 'lsuv' else init
  if kernel_init not in INITIALIZERS:
    allowed = ', '.join([*INITIALIZERS, 'lsuv'])
    raise ValueError(f'init: unknown initializer {init!r}; allowed: {allowed}')
  return AllConvNet(
      layers=tuple(architecture(name, num_classes, width)), dropout=dropout,
      input_dropout=input_dropout, batch_norm=batch_norm,
      class_relu=class_relu, dtype=DTYPES[dtype],
      kernel_init=INITIALIZERS[kernel_init], bn_axis_name=bn_axis_name,
      conv=conv)


def summary(model: AllConvNet, image_shape=INPUT_SHAPE, full: bool = False) -> str:
  """Returns a Keras-style table of the layers, output shapes and parameters.

  Args:
    model: an `AllConvNet`.
    image_shape: (height, width, channels) of one input image.
    full: flax's `nn.tabulate` table (inputs, outputs and every variable of
      every module, ~100 lines) instead of one line per layer.
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  if full:
    return nn.tabulate(model, jax.random.key(0), depth=1,
                       console_kwargs={'width': 120, 'force_terminal': False})(x)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  _, captured = jax.eval_shape(lambda v: model.apply(
      v, x, capture_intermediates=True, mutable=['intermediates']), variables)
  outputs = captured['intermediates']
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  params = variables['params']
  shape = x.shape
  rows = [('layer', 'type', 'output', 'parameters')]
  for layer in model.layers:
    if isinstance(layer, Pool):
      shape = jax.eval_shape(
          lambda y: nn.max_pool(y, (3, 3), strides=(2, 2), padding='SAME'),
          jax.ShapeDtypeStruct(shape, jnp.float32)).shape
      rows.append(('pool', 'max-pool 3x3/2', shape, 0))
    elif layer.name in outputs:  # Dropout that is on, or a convolution.
      shape = outputs[layer.name]['__call__'][0].shape
      if isinstance(layer, Drop):
        rows.append((layer.name, f'dropout {layer.rate:.0%}', shape, 0))
        continue
      kind = f'conv {layer.kernel}x{layer.kernel}/{layer.stride}'
      n = count(params[layer.name])
      if layer.bn in params:
        kind, n = kind + ' + batch norm', n + count(params[layer.bn])
      rows.append((layer.name, kind, shape, n))
  rows.append(('', 'global average', (1, shape[-1]), 0))
  total = count(params)
  lines = [f'{name:<12}{kind:<28}{"x".join(map(str, out[1:])):>12}{n:>14,}'
           if i else f'{name:<12}{kind:<28}{out:>12}{n:>14}'
           for i, (name, kind, out, n) in enumerate(rows)]
  stats = count(variables.get('batch_stats', {}))
  lines.append(f'{model.__class__.__name__}: {total:,} parameters '
               f'({total * 4 / 2**20:.1f} MiB in float32)'
               + (f' and {stats:,} batch-norm statistics' if stats else ''))
  return '\n'.join(lines)
