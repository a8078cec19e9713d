"""Orbax checkpoints of a run: the latest few and the best by validation accuracy.

Layout under ``<workdir>/checkpoints``::

  latest/<step>/{state,meta}   every epoch, the last `keep` kept
  best/<step>/{state,meta}     the one with the highest validation accuracy
                               (only for runs with a validation split)

The selected checkpoint of a workdir, the one evaluation, visualization and
transfer use, is the best one, or the newest one for a run without a
validation split (`selection.checkpoint_dir`); test accuracy never selects.

``state`` is the train state as a plain nested dict of arrays
(`flax.serialization.to_state_dict`), ``meta`` a JSON object with the
architecture, the epoch and the best accuracy so far. A checkpoint is checked
against the network it is restored into before any array is read, so a
checkpoint of another architecture is a one-line error, not a crash.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from absl import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

from allconv_jax import files
from allconv_jax.errors import UserError

# The meta fields that must match for a checkpoint to fit a network.
ARCHITECTURE_FIELDS = ('model', 'num_classes', 'width', 'batch_norm', 'optimizer')


def _manager(directory: str, best: bool, keep: int = 3, create: bool = True
             ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=1 if best else keep, create=create,
      best_fn=(lambda m: m['validation_accuracy']) if best else None,
      best_mode='max',
      # With several processes, orbax names its barriers by step: the best
      # and the latest save of one step would share (and break) one.
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix='best' if best else 'latest'))
  # Naming the handlers lets a fresh process read item metadata (shapes)
  # before restoring anything.
  handlers = {'state': ocp.StandardCheckpointHandler(),
              'meta': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def open_manager(directory: str) -> ocp.CheckpointManager:
  """A read-only manager of an existing checkpoint directory."""
  return _manager(directory, best=False, create=False)


class Checkpoints:
  """The latest and best checkpoints of one workdir."""

  def __init__(self, workdir: str, keep: int = 3):
    root = os.path.join(os.path.abspath(workdir), files.CHECKPOINTS)
    self.latest_dir = os.path.join(root, 'latest')
    self.best_dir = os.path.join(root, 'best')
    self._keep = keep
    self._latest = self._best = None

  def _open(self):
    # Created lazily so that merely looking at a workdir writes nothing.
    if self._latest is None:
      self._latest = _manager(self.latest_dir, best=False, keep=self._keep)
      self._best = _manager(self.best_dir, best=True)

  def save(self, step: int, state: Any, meta: dict,
           validation_accuracy: float | None = None, is_best: bool = False,
           latest: bool = True) -> None:
    """Saves `state` as the latest (unless not `latest`) and, if `is_best`,
    as the best.

    The best is written first: a run killed in between resumes from the
    previous latest checkpoint and writes this best again (see `prune_after`).
    """
    self._open()
    tree = serialization.to_state_dict(state)
    args = lambda: ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                      meta=ocp.args.JsonSave(meta))
    if is_best:
      self._best.save(step, args=args(),
                      metrics={'validation_accuracy': validation_accuracy},
                      force=True)
    if latest:
      self._latest.save(step, args=args(), force=True)

  def wait(self) -> None:
    """Blocks until every save has been committed to disk."""
    if self._latest is not None:
      self._latest.wait_until_finished()
      self._best.wait_until_finished()

  def close(self) -> None:
    if self._latest is not None:
      self._latest.close()
      self._best.close()


def latest_step(directory: str) -> int | None:
  """The newest committed step in `directory`, or None if there is none."""
  if not os.path.isdir(directory):
    return None
  return open_manager(directory).latest_step()


def restore(directory: str, template: Any, expected_meta: dict | None = None,
            step: int | None = None) -> tuple[Any, dict]:
  """Restores a state saved by `Checkpoints.save` into the shape of `template`.

  Args:
    directory: ``checkpoints/latest`` or ``checkpoints/best`` of a workdir.
    template: a state of the network to restore into (arrays or shapes).
    expected_meta: architecture fields the checkpoint must match.
    step: which step; the newest if None.

  Returns:
    (state, meta).

  Raises:
    UserError: no checkpoint, or one whose architecture or parameter shapes
      differ from `template`; the message names the first difference.
  """
  step = latest_step(directory) if step is None else step
  if step is None:
    raise UserError(f'checkpoint: no checkpoint in {directory}')
  manager = open_manager(directory)
  meta = _check_meta(manager, step, directory, expected_meta)
  full = serialization.to_state_dict(template)
  have = manager.item_metadata(step)['state'].tree
  check_compatible(full, have, directory)
  want = _present(full, have)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, want)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))['state']
  return serialization.from_state_dict(template, _filled(restored, full)), meta


def _present(want: dict, have: dict) -> dict:
  """`want` without its empty subtrees that `have` lacks: a checkpoint of an
  earlier version has no ``ema`` (nor, without batch norm, ``batch_stats``)."""
  return {k: _present(v, have[k]) if isinstance(v, dict) and isinstance(
      have.get(k), dict) else v
          for k, v in want.items() if k in have or jax.tree.leaves(v)}


def _filled(restored: dict, full: dict) -> dict:
  """`restored` with the empty subtrees `_present` left out put back."""
  return {k: _filled(restored[k], v) if isinstance(v, dict) and k in restored
          else restored.get(k, v) for k, v in full.items()}


def restore_tree(directory: str, step: int, expected_meta: dict | None = None,
                 field: str = 'checkpoint') -> tuple[dict, dict]:
  """Restores a checkpoint as saved, without a template (numpy arrays).

  Returns:
    (the saved tree, its meta).

  Raises:
    UserError: the checkpoint cannot be read, or its meta differs from
      `expected_meta`; `field` names the config field that pointed here.
  """
  manager = open_manager(directory)
  meta = _check_meta(manager, step, directory, expected_meta)
  try:
    # Onto one local device: the checkpoint may come from another number of
    # devices, whose shardings orbax would otherwise try to rebuild.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        manager.item_metadata(step)['state'].tree)
    tree = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{field}: cannot read the checkpoint {directory}/{step} '
                    f'({type(e).__name__})') from None
  return jax.tree.map(np.asarray, tree), meta


def _check_meta(manager, step: int, directory: str, expected: dict | None) -> dict:
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta']
  for field in expected or {}:
    if meta.get(field) != expected[field]:
      raise UserError(
          f'{field}: the checkpoint in {directory} has {field}={meta.get(field)!r} '
          f'but the config asks for {expected[field]!r}; use another workdir '
          f'or the same {field}')
  return meta


def check_architecture(directory: str, expected: dict) -> None:
  """Fails fast if the newest checkpoint in `directory` is of another network.

  Reads only the small JSON meta; an unreadable one is left to
  `restore_latest_good`.
  """
  step = latest_step(directory)
  if step is None:
    return
  try:
    _check_meta(open_manager(directory), step, directory, expected)
  except UserError:
    raise
  except Exception:  # pylint: disable=broad-except
    pass


def restore_latest_good(directory: str, template: Any,
                        expected_meta: dict) -> tuple[Any, dict] | None:
  """Restores the newest readable checkpoint, or returns None if there is none.

  A checkpoint that cannot be read (a truncated file, a missing directory) is
  moved to ``checkpoints/corrupt/`` with a warning and the one before it is
  tried. A checkpoint of another architecture is an error, not skipped.
  Best checkpoints newer than the one restored are removed: the resumed run
  recomputes them exactly.
  """
  if not os.path.isdir(directory):
    return None
  steps = sorted(open_manager(directory).all_steps(),
                 reverse=True)
  for step in steps:
    try:
      restored = restore(directory, template, expected_meta, step)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      corrupt = os.path.join(os.path.dirname(directory), 'corrupt',
                             f'{os.path.basename(directory)}-{step}')
      logging.warning('Checkpoint %s/%d is unreadable (%s: %s); moved to %s, '
                      'trying the previous one', directory, step,
                      type(e).__name__, str(e).splitlines()[0][:200], corrupt)
      os.makedirs(os.path.dirname(corrupt), exist_ok=True)
      shutil.move(os.path.join(directory, str(step)), corrupt)
      continue
    prune_after(os.path.join(os.path.dirname(directory), 'best'), step)
    return restored
  return None


def prune_after(directory: str, step: int) -> None:
  """Deletes the checkpoints in `directory` newer than `step`."""
  if not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(directory, name))


def check_compatible(want: Any, have: Any, source: str) -> None:
  """Raises a `UserError` naming the first path where two trees differ.

  Args:
    want: nested dict of arrays (or shape-carrying leaves) expected.
    have: nested dict of arrays or orbax `ArrayMetadata` found.
    source: where `have` comes from, for the message.
  """
  want_flat = traverse_util.flatten_dict(want, sep='/')
  have_flat = traverse_util.flatten_dict(have, sep='/')
  for path, leaf in want_flat.items():
    if path not in have_flat:
      raise UserError(f'checkpoint: {source} has no parameter {path}; it '
                      f'belongs to another architecture')
    if tuple(np.shape(leaf)) != tuple(have_flat[path].shape):
      raise UserError(
          f'checkpoint: {path} has shape {tuple(have_flat[path].shape)} in '
          f'{source} but {tuple(np.shape(leaf))} in this network')
  for path in have_flat:
    if path not in want_flat:
      raise UserError(f'checkpoint: {source} has parameter {path} that this '
                      f'network does not have; it belongs to another architecture')
