"""A trained run: its network built from a config, and loading it from a workdir.

`load` is the one way to get a trained network back: ``--mode=eval``,
``--mode=visualize``, transfer learning and the notebook all use it. It
reads the workdir's selected checkpoint (the best by validation accuracy,
else the final one), the preprocessing the run was trained with, and the
run's own ``config.json`` to rebuild the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from allconv_jax import (checkpoints, config as config_lib, confusion, conv,
                         datasets, files, input_pipeline, models, selection,
                         sharding, steps)
from allconv_jax.errors import UserError

def create_model(config: ml_collections.ConfigDict, num_classes: int,
                 bn_axis_name: str | None = None) -> models.AllConvNet:
  """The network `config` describes, with `num_classes` outputs.

  Args:
    config: a validated config (`config.validate`).
    num_classes: size of the class layer.
    bn_axis_name: see `models.AllConvNet`.

  Raises:
    UserError: for ``conv_impl='onednn'`` where oneDNN cannot be built.
  """
  # Resolved here, the one place a config becomes a network: on CPU 'auto'
  # and 'onednn' build the oneDNN extension (once per process), which
  # `models` never does.
  return models.create(
      config.model, num_classes, width=config.width, dropout=config.dropout,
      input_dropout=config.input_dropout, batch_norm=config.batch_norm,
      class_relu=config.class_relu, dtype=config.dtype, init=config.init,
      bn_axis_name=bn_axis_name,
      conv=conv.conv_general_dilated(config.conv_impl))


def architecture(config: ml_collections.ConfigDict, num_classes: int) -> dict:
  """What a checkpoint records of its network, to be checked on restore."""
  return {f: num_classes if f == 'num_classes' else config[f]
          for f in checkpoints.ARCHITECTURE_FIELDS}


@dataclasses.dataclass(frozen=True)
class Trained:
  """A network as trained in a workdir.

  Attributes:
    config: the run's config, as it started (``config.json``).
    model: its network (evaluation only: no mesh axis).
    variables: ``{'params': ...}`` (and ``'batch_stats'``), numpy arrays:
      the moving average of the weights for a run with ``ema_decay``.
    preprocessor: the input transform the run was trained with.
    step: the checkpoint's step.
    meta: the checkpoint's meta (architecture, epoch, history).
  """
  config: ml_collections.ConfigDict
  model: models.AllConvNet
  variables: dict[str, Any]
  preprocessor: input_pipeline.Preprocessor
  step: int
  meta: dict


def load(workdir: str, expected: dict | None = None, field: str = 'workdir') -> Trained:
  """Loads the selected checkpoint of a trained workdir.

  Args:
    workdir: a run's directory.
    expected: architecture fields (see `architecture`) the checkpoint must
      match, e.g. those of the config the caller was given.
    field: the config field that named `workdir`, for error messages.

  Raises:
    UserError: no such workdir, no checkpoint, or a checkpoint of another
      architecture; before anything is written.
  """
  if not os.path.isdir(workdir):
    raise UserError(f'{field}: no such directory: {workdir}')
  members = os.path.join(workdir, files.MEMBERS)
  if os.path.isdir(members):
    raise UserError(f'{field}: {workdir} is a population of '
                    f'{len(os.listdir(members))} members; give one of them, '
                    f'e.g. {os.path.join(members, min(os.listdir(members), default="<name>"))}')
  config_path = os.path.join(workdir, files.CONFIG)
  directory = selection.checkpoint_dir(workdir)
  step = checkpoints.latest_step(directory)
  if step is None or not os.path.exists(config_path):
    raise UserError(f'{field}: no checkpoint in {workdir}; train first')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tree, meta = checkpoints.restore_tree(directory, step, expected, field)
  # The selected weights: the moving average with ema_decay.
  weights = selection.of(config, has_validation=True).state_weights(tree['state'])
  variables = {'params': weights['params']}
  if weights.get('batch_stats'):
    variables['batch_stats'] = weights['batch_stats']
  model = create_model(config, int(meta['num_classes']))
  checkpoints.check_compatible(steps.abstract_variables(model), variables,
                               directory)
  preprocessor = input_pipeline.Preprocessor.load(
      os.path.join(workdir, files.PREPROCESS))
  return Trained(config, model, variables, preprocessor, step, meta)


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the selected checkpoint of `workdir` on the test split.

  Also writes the test split's confusion matrix and per-class accuracy into
  `workdir` (``confusion.csv``, ``.json``, ``.png``; see `confusion`).

  Returns:
    ``{'test_accuracy', 'test_loss', 'step', 'per_class_accuracy',
    'most_confused'}``: the last two as `confusion.report`.

  Raises:
    UserError: a bad config, a workdir without a checkpoint, or one of
      another architecture than `config`'s.
  """
  config_lib.validate(config)
  sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  data = datasets.load(config.dataset)
  run = load(workdir, architecture(config, data.num_classes))
  mesh = sharding.make_mesh()
  variables = jax.device_put(run.variables, sharding.replicated(mesh))
  images, labels = run.preprocessor(data.test.images), data.test.labels
  test = steps.evaluate(steps.make_eval_step(run.model, mesh), variables, mesh,
                        images, labels, config.eval_batch_size)
  if jax.process_index() == 0:  # Every process has the counts; one writes.
    per_class = confusion.write(workdir, test['confusion'], data.class_names,
                                'test', run.step)
  else:
    per_class = confusion.report(test['confusion'], data.class_names)
  return dict(test_accuracy=float(test['accuracy']), test_loss=float(test['loss']),
              step=run.step, **per_class)
