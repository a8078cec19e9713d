"""Transfer learning: start a network from another run's selected checkpoint.

Every parameter (and batch-norm statistic) of the source network is copied
into the new one, except the layers matching ``config.transfer.reinit``
(default: the ``classifier``), which are sized for the new classes
(`merge`). A re-initialized class layer starts at zero by default
(``transfer.head_init='zeros'``, `start_head`), as big_vision's
``head_zeroinit`` does: its logits are 0, so the network predicts the k new
classes uniformly and its first loss is ln k whatever the copied features;
``'fresh'`` keeps the kernel initializer's draw (and a zero bias), whose
random logits on top of large copied features start the loss above ln k.
With ``config.transfer.freeze`` the copied layers are frozen (a linear probe
of the source's features); otherwise everything is fine-tuned.

The source run is loaded by `allconv_jax.trained.load`; `merge` copies its
weights. A source whose architecture does not fit (another network, missing
layers, other shapes) is a one-line error naming the first mismatching
parameter.
"""

import fnmatch
from typing import Any

import numpy as np
import optax
from flax import traverse_util

from allconv_jax import models
from allconv_jax.errors import UserError

FIELD = 'transfer.from_workdir'


def patterns(text: str) -> list[str]:
  """Splits ``'classifier,conv8'`` into glob patterns over layer names."""
  return [p.strip() for p in text.split(',') if p.strip()]


def matches(path: str, globs: list[str]) -> bool:
  """Whether a parameter path such as ``'conv3/kernel'`` is in `globs`.

  A pattern matches the layer name (``'classifier'``, ``'conv*'``) or the
  whole path (``'bn*/scale'``).
  """
  layer = path.split('/', 1)[0]
  return any(fnmatch.fnmatchcase(layer, g) or fnmatch.fnmatchcase(path, g)
             for g in globs)


def merge(loaded: Any, inited: Any, dont_load: list[str],
          what: str = 'parameter') -> Any:
  """`inited` with every leaf not matching `dont_load` taken from `loaded`.

  big_vision's ``merge_params``: the layers to re-initialize keep their
  fresh values (sized for the new classes), everything else is copied.

  Args:
    loaded: nested dict of the source run's arrays.
    inited: nested dict of this network's freshly initialized arrays.
    dont_load: glob patterns of layers (or paths) to keep from `inited`.
    what: what the leaves are, for messages (``'batch statistic'``).

  Raises:
    UserError: naming the first leaf missing from `loaded` or shaped
      otherwise there.
  """
  flat_loaded = traverse_util.flatten_dict(loaded, sep='/')
  merged = {}
  for path, leaf in traverse_util.flatten_dict(inited, sep='/').items():
    if matches(path, dont_load):
      merged[path] = leaf
      continue
    if path not in flat_loaded:
      raise UserError(f'{FIELD}: the source checkpoint has no {what} {path}; '
                      'it is another architecture (or add the layer to '
                      'transfer.reinit)')
    value = np.asarray(flat_loaded[path])
    if value.shape != leaf.shape:
      raise UserError(f'{FIELD}: {what} {path} has shape {value.shape} in the '
                      f'source checkpoint but {tuple(leaf.shape)} in this network')
    merged[path] = value.astype(leaf.dtype)
  return traverse_util.unflatten_dict(merged, sep='/')


def start_head(params: Any, reinit: list[str], head_init: str) -> Any:
  """`params` with the class layer zeroed if it is re-initialized.

  With ``head_init='zeros'`` (big_vision's ``head_zeroinit``) the class
  layer's kernel and bias are zero when `reinit` matches it; other
  re-initialized layers keep their fresh values, since a layer behind a
  zero one would get no gradient. ``'fresh'`` changes nothing.
  """
  if head_init == 'fresh':
    return params
  flat = traverse_util.flatten_dict(params, sep='/')
  return traverse_util.unflatten_dict(
      {path: (np.zeros_like(leaf) if path.split('/', 1)[0] == models.CLASSIFIER
              and matches(path, reinit) else leaf)
       for path, leaf in flat.items()}, sep='/')


def freeze_mask(params: Any, reinit: list[str]) -> Any:
  """True for every parameter that feature-extractor mode keeps fixed."""
  flat = traverse_util.flatten_dict(params, sep='/')
  return traverse_util.unflatten_dict(
      {path: not matches(path, reinit) for path in flat}, sep='/')


def freeze(tx: optax.GradientTransformation, params: Any,
           reinit: list[str]) -> optax.GradientTransformation:
  """Zeroes the updates (weight decay included) of all but the new layers."""
  return optax.chain(tx, optax.transforms.freeze(freeze_mask(params, reinit)))
