"""Transfer learning: start a network from another run's best checkpoint.

Every parameter (and batch-norm statistic) of the source network is copied
into the new one, except the layers matching ``config.transfer.reinit``
(default: the ``classifier``), which keep their fresh initialization — random
kernel, zero bias — sized for the new classes. With
``config.transfer.freeze`` the copied layers are frozen (feature-extractor
mode); otherwise everything is fine-tuned.

A source whose architecture does not fit (another network, missing layers,
other shapes) is a one-line error naming the first mismatching parameter.
"""

import fnmatch
import os
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp

from allconv_jax import checkpoints, input_pipeline
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


def _path(key_path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in key_path)


def resolve_source(path: str) -> tuple[str, int]:
  """Finds the checkpoint a transfer starts from.

  Args:
    path: a workdir (its best checkpoint is used), a checkpoint directory
      such as ``<workdir>/checkpoints/latest`` (its newest step), or one step
      directory such as ``<workdir>/checkpoints/best/1200``.

  Returns:
    (checkpoint directory, step).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise UserError(f'{FIELD}: no such directory: {path}')
  if os.path.isdir(os.path.join(path, 'checkpoints', 'best')):
    path = os.path.join(path, 'checkpoints', 'best')
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    return os.path.dirname(path), int(name)
  step = checkpoints.latest_step(path)
  if step is None:
    raise UserError(f'{FIELD}: no checkpoint in {path}; give a trained workdir '
                    'or a checkpoint directory')
  return path, step


def load_source(path: str) -> tuple[dict, dict, str | None]:
  """Reads the params and batch stats of a trained run.

  Returns:
    (params, batch_stats, path of the run's preprocessing file or None).
  """
  directory, step = resolve_source(path)
  try:
    manager = checkpoints.open_manager(directory)
    tree = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']['state']
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{FIELD}: cannot read the checkpoint {directory}/{step} '
                    f'({type(e).__name__})') from None
  workdir = os.path.dirname(os.path.dirname(directory))
  preprocess = os.path.join(workdir, input_pipeline.PREPROCESS_FILE)
  return (tree['params'], tree.get('batch_stats') or {},
          preprocess if os.path.exists(preprocess) else None)


def copy_weights(target: Any, source: Any, reinit: list[str], what: str) -> Any:
  """Returns `target` with every leaf not matching `reinit` taken from `source`.

  Raises:
    UserError: naming the first parameter that is missing from `source` or
      has another shape there.
  """
  flat_source = {_path(p): v for p, v in
                 jax.tree_util.tree_flatten_with_path(source)[0]}

  def take(key_path, leaf):
    path = _path(key_path)
    if matches(path, reinit):
      return leaf
    if path not in flat_source:
      raise UserError(f'{FIELD}: the source checkpoint has no {what} {path}; '
                      'it is another architecture (or add the layer to '
                      'transfer.reinit)')
    value = np.asarray(flat_source[path])
    if value.shape != leaf.shape:
      raise UserError(f'{FIELD}: {what} {path} has shape {value.shape} in the '
                      f'source checkpoint but {tuple(leaf.shape)} in this network')
    return value.astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(take, target)


def freeze_mask(params: Any, reinit: list[str]) -> Any:
  """True for every parameter that feature-extractor mode keeps fixed."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not matches(_path(p), reinit), params)


def freeze(tx: optax.GradientTransformation, params: Any,
           reinit: list[str]) -> optax.GradientTransformation:
  """Zeroes the updates (weight decay included) of all but the new layers."""
  return optax.chain(tx, optax.transforms.freeze(freeze_mask(params, reinit)))
