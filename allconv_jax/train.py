"""Training: `train_and_evaluate(config, workdir)`, read top to bottom.

The config is checked and the run's parts are built from it (`setup`: data,
mesh, network, optimizer; nothing is written). The state training starts
from is found (`initial_state`: resume, else fine-tune from another run, else
from scratch). The loop runs the jitted steps of `allconv_jax.steps`, and
`evaluate_and_save` evaluates, selects on validation, checkpoints and logs
at the end of every epoch (or every ``eval_every_steps`` steps).

A population (``config.sweep``: several seeds and learning rates) runs
through the same loop: `setup` decides once whether the config is a single
run or a population, and the loop asks the `kind.Kind` it got (its states
stacked, its steps those of `allconv_jax.population`); each of a
population's members is written as a run of its own.

The batches, augmentation and dropout masks depend only on (seed, step), so a
resumed run ends bit for bit where an uninterrupted run would.
"""

import contextlib
import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from allconv_jax import (checkpoints, config as config_lib, datasets, disk,
                         files, input_pipeline, kind as kind_lib, models,
                         optimizers, reporting, selection as selection_lib,
                         sharding, steps, stopping, trained, transfer)
from allconv_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Setup:
  """The parts of a run, built from its config by `setup`.

  `kind` is a single run or a population; `batches` and `schedule` are its
  (a population's: of every member).
  """
  config: ml_collections.ConfigDict
  workdir: str
  data: datasets.Dataset
  mesh: jax.sharding.Mesh
  model: models.AllConvNet
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  checkpoints: checkpoints.Checkpoints
  kind: kind_lib.Kind
  selection: selection_lib.Selection

  @property
  def batches(self):
    """The kind's batches (`input_pipeline.TrainBatches` or a population's)."""
    return self.kind.batches

  @property
  def architecture(self) -> dict:
    """What the run's checkpoints must match: the network and the members."""
    return dict(trained.architecture(self.config, self.data.num_classes),
                sweep=self.kind.sweep)

  @property
  def total_steps(self) -> int:
    return optimizers.total_steps(self.config, self.batches.steps_per_epoch)

  @property
  def epochs(self) -> float:
    """The run's length in epochs (fractional with ``num_train_steps``)."""
    return self.total_steps / self.batches.steps_per_epoch


def setup(config: ml_collections.ConfigDict, workdir: str) -> Setup:
  """Checks the config and builds the run's parts; writes nothing.

  Raises:
    UserError: for a bad config value, data, or a workdir whose checkpoint
      is of another network.
  """
  config_lib.validate(config)
  files.check(workdir)
  data = datasets.load(config.dataset)
  if config.num_classes is not None and config.num_classes != data.num_classes:
    raise UserError(f'num_classes: {config.num_classes} does not match the '
                    f'{data.num_classes} classes of the data; leave it None')
  sharding.check_batch_size(config.batch_size)
  sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
  kind = kind_lib.of(config, len(data.train.labels))
  model = trained.create_model(config, data.num_classes, bn_axis_name=sharding.AXIS)
  tx, schedule = kind.optimizer(config, kind.batches.steps_per_epoch)
  # The rate of each evaluation's row: one program, where op by op its first
  # call compiles every operation of the schedule (1.6 s on a 2-core CPU).
  schedule = jax.jit(schedule)
  if config.transfer.from_workdir and config.transfer.freeze:
    tx = transfer.freeze(tx, steps.abstract_variables(model)['params'],
                         transfer.patterns(config.transfer.reinit))
  run = Setup(config, workdir, data, sharding.make_mesh(), model, tx,
              schedule, checkpoints.Checkpoints(workdir, keep=config.checkpoint_keep),
              kind, selection_lib.of(config, data.validation is not None))
  checkpoints.check_architecture(run.checkpoints.latest_dir, run.architecture)
  return run


@dataclasses.dataclass(frozen=True)
class Start:
  """The state training starts from (see `initial_state`)."""
  state: steps.TrainState
  train_metrics: steps.TrainMetrics
  preprocessor: input_pipeline.Preprocessor
  resumed: dict | None  # The resumed checkpoint's meta; None for a new run.
  lsuv_reports: Any = None  # Of each member (one for a single run).


def initial_state(run: Setup) -> Start:
  """Where the weights come from, in this order.

  1. Resume: the newest readable checkpoint of the workdir, with the
     preprocessing the run was fitted with.
  2. Else fine-tune from another run (``transfer.from_workdir``): its selected
     checkpoint merged into a fresh initialization, every layer copied but
     those of ``transfer.reinit``, with that run's preprocessing (the copied
     layers expect inputs normalized as they were trained).
  3. Else from scratch: the kernel initializer, then LSUV (``init='lsuv'``),
     with the preprocessing fitted on the training split.

  Writes nothing.
  """
  config = run.config
  replicated = sharding.replicated(run.mesh)
  # The moving average (ema_decay) starts at the weights training starts from.
  start_ema = lambda state: steps.with_ema(state, config.ema_decay)
  seeds = run.kind.seeds
  fresh = [start_ema(s) for s in steps.init_states(run.model, run.tx, seeds, run.mesh)]
  # A population's states are its members' stacked (see `population`).
  combine = lambda states: run.kind.stack(states, run.mesh)
  train_metrics = run.kind.empty_metrics(run.mesh)
  preprocess_path = os.path.join(run.workdir, files.PREPROCESS)
  fit = lambda: input_pipeline.Preprocessor.fit(run.data.train.images,
                                                **config.preprocess)

  restored = checkpoints.restore_latest_good(
      run.checkpoints.latest_dir,
      dict(state=combine(fresh), train_metrics=train_metrics), run.architecture)
  if restored is not None:
    tree, meta = restored
    logging.info('Resuming from step %d (epoch %d) of %s', meta['step'],
                 meta['epoch'], run.workdir)
    tree = jax.device_put(tree, replicated)
    preprocessor = (input_pipeline.Preprocessor.load(preprocess_path)
                    if os.path.exists(preprocess_path) else fit())
    return Start(tree['state'], tree['train_metrics'], preprocessor, meta)

  if config.transfer.from_workdir:
    source = trained.load(config.transfer.from_workdir, field=transfer.FIELD)
    reinit = transfer.patterns(config.transfer.reinit)

    def transferred(state):
      params = transfer.start_head(transfer.merge(
          source.variables['params'], state.params, reinit), reinit, config.transfer.head_init)
      batch_stats = transfer.merge(source.variables.get('batch_stats', {}),
                                   state.batch_stats, reinit)
      return start_ema(state.replace(params=params, batch_stats=batch_stats,
                                     opt_state=run.tx.init(params)))
    state = combine([transferred(s) for s in fresh])
    logging.info('Transferred all but %s from %s', reinit, config.transfer.from_workdir)
    return Start(jax.device_put(state, replicated), train_metrics,
                 source.preprocessor, None)

  preprocessor = fit()
  if config.init != 'lsuv':
    return Start(combine(fresh), train_metrics, preprocessor, None)
  states, reports = zip(*[_lsuv(run, state, preprocessor, seed)
                          for state, seed in zip(fresh, seeds)])
  return Start(combine([start_ema(s) for s in states]), train_metrics,
               preprocessor, None, list(reports))


def _lsuv(run: Setup, state: steps.TrainState, preprocessor, seed: int):
  """LSUV-initializes the kernels on a sample of preprocessed training images
  drawn with `seed`."""
  from allconv_jax import lsuv  # pylint: disable=g-import-not-at-top
  settings, images = run.config.lsuv, run.data.train.images
  rng = np.random.default_rng(seed)
  idx = np.sort(rng.choice(len(images), min(settings.batch_size, len(images)),
                           replace=False))
  local = idx[sharding.local_slice(len(idx))]
  batch, = sharding.global_batch(run.mesh, preprocessor(images[local]))
  logging.info('LSUV: rescaling each convolution on %d training images...', len(idx))
  start = time.time()
  variables, report = lsuv.lsuv_init(
      run.model, steps.model_variables(state.params, state.batch_stats), batch,
      tol=settings.tol, max_iters=settings.max_iters, measure=settings.measure)
  logging.info('LSUV on %d images in %.1fs:\n%s', len(idx), time.time() - start,
               report.table())
  # SGD and Adam states start at zero whatever the parameters, so the
  # optimizer state of `steps.init_states` still fits.
  params = jax.device_put(variables['params'], sharding.replicated(run.mesh))
  return state.replace(params=params), report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the configured network, evaluating every epoch.

  Each epoch (or ``eval_every_steps`` steps) is evaluated on the validation
  split (``dataset.validation_size``) and on the test split; only validation
  accuracy selects a checkpoint.

  Args:
    config: an experiment config (see ``configs/default.py``).
    workdir: where the run's files go (see `allconv_jax.files`).

  Returns:
    The summary, also written to ``summary.json`` once the run is complete.

  Raises:
    UserError: for bad config values, data or checkpoints, or a workdir in
      use, before anything is written to `workdir`.
    stopping.Diverged: a non-finite loss (``halt_on_nan``), with the last good
      checkpoint kept.
    stopping.Interrupted: after SIGTERM or SIGINT, once a checkpoint is saved.
  """
  run = setup(config, workdir)
  is_writer = jax.process_index() == 0
  with files.lock(workdir) if is_writer else contextlib.nullcontext():
    if is_writer:  # A save cut short (a full disk, a kill) left these.
      disk.remove_partial_checkpoints(workdir)
    start = initial_state(run)
    splits = {name: (start.preprocessor(split.images), split.labels)
              for name, split in (('train', run.data.train),
                                  ('validation', run.data.validation),
                                  ('test', run.data.test)) if split is not None}
    # On the devices before anything is written: it may not fit.
    images, labels = steps.resident(run.mesh, *splits['train'])
    record = run.kind.record(run, start.resumed, is_writer)
    if is_writer and start.resumed is None:
      _write_start_files(run, start)
    logging.info('%s on %s (%s), %d device(s)%s', config.model, config.dataset.name,
                 ', '.join(f'{len(l)} {n}' for n, (_, l) in splits.items()),
                 jax.device_count(), run.kind.description)
    if is_writer:  # The full table is in the workdir (files.MODEL_SUMMARY).
      print(models.summary(run.model), flush=True)

    on_cpu = jax.default_backend() == 'cpu'
    length = config.steps_per_dispatch or (1 if on_cpu else 100)
    options = dict(
        length=length, max_shift=input_pipeline.max_shift_pixels(config.augment.translate),
        flip=config.augment.flip, label_smoothing=config.label_smoothing,
        ema_decay=config.ema_decay)
    train_steps = run.kind.train_steps(run.model, run.tx, run.mesh, **options)
    eval_step = run.kind.eval_step(run.model, run.mesh, flip=config.eval_flip)
    state, train_metrics, step = start.state, start.train_metrics, int(start.state.step)
    local = sharding.local_slice(config.batch_size)
    every = config.eval_every_steps or run.batches.steps_per_epoch
    progress = reporting.Progress(run.total_steps, every, lambda end: (
        f'epoch {reporting.epoch_of(end, run.batches.steps_per_epoch)}/{run.epochs:g}'))
    test_confusion = None
    with stopping.StopRequests(config.distributed.stop_check_every_steps) as stop:
      while step < run.total_steps:
        end = _chunk_end(run, step, length)
        indices, = sharding.global_batch(
            run.mesh, run.batches.chunk(step, end, length)[local])
        state, train_metrics = train_steps(state, train_metrics, images, labels,
                                           indices, end - step)
        step = end
        progress(step)
        if step % every == 0 or step == run.total_steps:
          _check_finite(run, state, train_metrics)
          train_metrics, test_confusion = evaluate_and_save(
              run, record, eval_step, state, train_metrics, splits)
        elif stop.requested(step) or (
            config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0):
          _check_finite(run, state, train_metrics)
          record.save(state, train_metrics)
        if stop.requested(step):
          raise stopping.Interrupted(stop.signum, step)
    run.checkpoints.close()
    # Per-class results of the final state (--mode=eval: of the selected
    # one), unless the run was complete already.
    if test_confusion is not None:
      record.write_confusion(test_confusion, run.data.class_names, step)
    return record.finish()


def _chunk_end(run: Setup, step: int, length: int) -> int:
  """Where the chunk from `step` ends: at most `length` steps, and at the
  next evaluation, checkpoint or the last step (signals are checked there)."""
  every = [run.config.eval_every_steps or run.batches.steps_per_epoch,
           run.config.checkpoint_every_steps]
  return min([run.total_steps, step + length] +
             [(step // n + 1) * n for n in every if n])


def _check_finite(run: Setup, state, train_metrics: steps.TrainMetrics) -> None:
  """Stops before a diverged state can be checkpointed (halt_on_nan).

  A population's diverged members are frozen instead (see `population`):
  it stops once all of them are.
  """
  bad = run.kind.diverged_step(state, train_metrics)
  if bad >= 0 and run.config.halt_on_nan:
    raise stopping.Diverged(bad, checkpoints.latest_step(run.checkpoints.latest_dir))


def _write_start_files(run: Setup, start: Start) -> None:
  """The files a new run starts with; each member of a population gets a
  config and preprocessing of its own, so that its directory is a run's."""
  dirs = run.kind.run_dirs(run.workdir, run.config)
  for directory, config in dirs:
    os.makedirs(directory, exist_ok=True)
    start.preprocessor.save(os.path.join(directory, files.PREPROCESS))
    files.write_text(os.path.join(directory, files.CONFIG),
                     config.to_json_best_effort(indent=2))
  files.write_text(os.path.join(run.workdir, files.MODEL_SUMMARY),
                   models.summary(run.model, full=True))
  # One LSUV report per seed, into the last directories: a single run's
  # workdir, or each member's.
  for (directory, _), report in zip(dirs[-len(run.kind.seeds):],
                                    start.lsuv_reports or []):
    report.save(os.path.join(directory, files.LSUV_REPORT))


def evaluate_and_save(run: Setup, record: kind_lib.Record, eval_step, state,
                      train_metrics, splits: dict):
  """Evaluates, selects on validation, checkpoints and logs an epoch's end.

  Or the end of ``eval_every_steps`` steps: the row's train columns average
  the steps since the previous row, and its epoch may be fractional. With
  ``ema_decay`` the moving average is evaluated too (``ema_`` columns), and
  selects.

  Returns:
    The next period's train metrics: empty, and checkpointed so, so that a
    run resumed from this checkpoint starts the next period as this one does;
    and the test split's confusion counts of the selected kind of weights.
  """
  step = int(state.step)
  # Numpy arrays; a population's are over its members.
  row = dict(epoch=reporting.epoch_of(step, run.batches.steps_per_epoch),
             step=step, learning_rate=np.asarray(run.schedule(step - 1)))
  row.update({f'train_{k}': np.asarray(v)
              for k, v in run.kind.compute(train_metrics).items()
              if k != 'nonfinite_step'})
  kinds = ['', 'ema_'] if run.config.ema_decay else ['']
  for prefix in kinds:
    for name in ('validation', 'test'):
      if name in splits:
        measured = steps.evaluate(eval_step, state.variables(ema=bool(prefix)),
                                  run.mesh, *splits[name], run.config.eval_batch_size,
                                  compute=run.kind.compute)
        if name == 'test' and prefix == run.selection.prefix:
          test_confusion = measured['confusion']
      else:
        measured = dict.fromkeys(steps.metric_names(run.config.eval_flip), float('nan'))
      row.update({f'{prefix}{name}_{k}': v for k, v in measured.items()
                  if k != 'confusion'})
  row.update(run.kind.row_extras(state))
  is_best = record.add(row)
  train_metrics = run.kind.empty_metrics(run.mesh)
  record.save(state, train_metrics, is_best)
  record.write()
  return train_metrics, test_confusion
