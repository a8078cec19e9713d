"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

One jitted train step: augment the global batch on device, then inside
`jax.shard_map` each device computes the loss and gradients of its slice of
the batch, gradients and metrics are averaged over the ``data`` axis, and
the optax update runs on the replicated parameters. On one device this is
the plain step.
"""


import functools
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics
from jax.sharding import PartitionSpec as P

from allconv_jax import (checkpoints, conv, datasets, input_pipeline, models,
                         reporting, sharding, transfer)
from allconv_jax.errors import UserError

OPTIMIZERS = ('sgd', 'adam', 'rmsprop')
SCHEDULES = ('piecewise', 'onecycle')


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; checkpointed as a whole."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@flax.struct.dataclass
class FirstNonFiniteStep(metrics.Metric):
  """The first step whose loss was NaN or infinite, or -1."""
  step: jax.Array

  @classmethod
  def empty(cls) -> 'FirstNonFiniteStep':
    return cls(step=jnp.array(-1, jnp.int32))

  @classmethod
  def from_model_output(cls, loss, step, **_) -> 'FirstNonFiniteStep':
    return cls(step=jnp.where(jnp.isfinite(loss), -1, step).astype(jnp.int32))

  def merge(self, other: 'FirstNonFiniteStep') -> 'FirstNonFiniteStep':
    return type(self)(step=jnp.where(self.step >= 0, self.step, other.step))

  def compute(self) -> jax.Array:
    return self.step


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')
  nonfinite_step: FirstNonFiniteStep


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')


# ----------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line `UserError` for the first bad config value."""
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
  need(config.dtype in models.DTYPES, 'dtype',
       f"unknown dtype {config.dtype!r}; allowed: {', '.join(models.DTYPES)}")
  need(config.conv_impl in conv.IMPLS, 'conv_impl',
       f"unknown implementation {config.conv_impl!r}; allowed: {', '.join(conv.IMPLS)}")
  inits = [*models.INITIALIZERS, 'lsuv']
  need(config.init in inits, 'init',
       f"unknown initializer {config.init!r}; allowed: {', '.join(inits)}")
  for field in ('batch_size', 'eval_batch_size', 'num_epochs'):
    value = config[field]
    need(isinstance(value, int) and value > 0, field,
         f'must be a positive integer, got {value!r}')
  need(config.learning_rate > 0, 'learning_rate',
       f'must be positive, got {config.learning_rate!r}')
  need(config.weight_decay >= 0, 'weight_decay',
       f'must be zero or positive, got {config.weight_decay!r}')
  need(0 <= config.momentum < 1, 'momentum',
       f'must be in [0, 1), got {config.momentum!r}')
  need(config.lr_decay > 0, 'lr_decay', f'must be positive, got {config.lr_decay!r}')
  bounds = list(config.lr_boundaries)
  need(all(b > 0 for b in bounds) and bounds == sorted(set(bounds)),
       'lr_boundaries', f'must be increasing positive epochs, got {bounds!r}')
  need(config.width > 0, 'width', f'must be positive, got {config.width!r}')
  need(0 <= config.augment.translate < 0.5, 'augment.translate',
       f'must be a fraction of the side in [0, 0.5), got {config.augment.translate!r}')
  need(config.num_classes is None or config.num_classes > 0, 'num_classes',
       f'must be positive or None (from the data), got {config.num_classes!r}')
  need(config.checkpoint_every_steps >= 0, 'checkpoint_every_steps',
       f'must be 0 (each epoch only) or positive, got {config.checkpoint_every_steps!r}')
  if config.init == 'lsuv':
    sharding.check_batch_size(config.lsuv.batch_size, 'lsuv.batch_size')
    need(config.lsuv.tol > 0, 'lsuv.tol', f'must be positive, got {config.lsuv.tol!r}')
    need(config.lsuv.measure in ('pre_activation', 'post_activation'), 'lsuv.measure',
         f'unknown {config.lsuv.measure!r}; allowed: pre_activation, post_activation')
  need(config.checkpoint_keep >= 1, 'checkpoint_keep',
       f'must be at least 1, got {config.checkpoint_keep!r}')


def make_optimizer(config, steps_per_epoch: int):
  """The optax optimizer and its learning-rate schedule.

  Weight decay is an L2 term added to the gradient (as in the paper and
  PyTorch's SGD), before momentum.
  """
  total = config.num_epochs * steps_per_epoch
  if config.lr_schedule == 'onecycle':
    schedule = optax.cosine_onecycle_schedule(total, config.learning_rate)
  else:
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate,
        {int(b * steps_per_epoch): config.lr_decay for b in config.lr_boundaries})
  if config.optimizer == 'sgd':
    opt = optax.sgd(schedule, momentum=config.momentum or None,
                    nesterov=config.nesterov)
  elif config.optimizer == 'adam':
    opt = optax.adam(schedule)
  else:
    opt = optax.rmsprop(schedule, momentum=config.momentum)
  return optax.chain(optax.add_decayed_weights(config.weight_decay), opt), schedule


def create_model(config, num_classes: int, bn_axis_name: str | None = None):
  """The network the config describes."""
  return models.create(
      config.model, num_classes, width=config.width, dropout=config.dropout,
      batch_norm=config.batch_norm, class_relu=config.class_relu,
      dtype=config.dtype, init=config.init, bn_axis_name=bn_axis_name,
      conv_impl=config.conv_impl)


def architecture_meta(config, num_classes: int) -> dict:
  """What a checkpoint must agree on to be restored into this network."""
  return dict(model=config.model, num_classes=num_classes, width=config.width,
              batch_norm=config.batch_norm, optimizer=config.optimizer)


# ----------------------------------------------------------------- steps


def init_state(model, tx, seed: int, mesh) -> TrainState:
  """Initial parameters and optimizer state, replicated over the mesh."""
  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def init():
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params))
  return init()


def model_variables(params, batch_stats) -> dict:
  """The variables `model.apply` takes: params, and batch stats if any."""
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def make_train_step(model, tx, mesh, *, seed: int, max_shift: int, flip: bool):
  """Returns the jitted `(state, metrics, images, labels) -> (state, metrics)`.

  `model` must be built with ``bn_axis_name=sharding.AXIS`` so batch-norm
  statistics are averaged over the devices.
  """
  def device_step(params, batch_stats, images, labels, key):
    # Each device draws its own dropout mask.
    key = jax.random.fold_in(key, jax.lax.axis_index(sharding.AXIS))

    def loss_fn(params):
      logits, updates = model.apply(
          model_variables(params, batch_stats), images, train=True,
          rngs={'dropout': key}, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      # The loss of the global batch. Differentiating it with respect to the
      # replicated parameters sums the devices' contributions (shard_map
      # transposes the implicit broadcast of the parameters into a psum), so
      # the gradient is the global batch's with no further reduction.
      return jax.lax.pmean(loss, sharding.AXIS), (logits, updates.get('batch_stats', batch_stats))

    (loss, (logits, new_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    accuracy = jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == labels), sharding.AXIS)
    return grads, new_stats, loss, accuracy

  sharded = jax.shard_map(
      device_step, mesh=mesh,
      in_specs=(P(), P(), P(sharding.AXIS), P(sharding.AXIS), P()),
      out_specs=(P(), P(), P(), P()))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(state: TrainState, train_metrics: TrainMetrics, images, labels):
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    augment_key, dropout_key = jax.random.split(key)
    images = input_pipeline.augment(augment_key, images, max_shift=max_shift,
                                    flip=flip)
    grads, batch_stats, loss, accuracy = sharded(
        state.params, state.batch_stats, images, labels, dropout_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = TrainState(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       batch_stats=batch_stats, opt_state=opt_state)
    update = TrainMetrics.single_from_model_output(loss=loss, accuracy=accuracy,
                                                   step=state.step)
    return state, train_metrics.merge(update)

  return train_step


def make_eval_step(model, mesh):
  """Returns the jitted `(state, images, labels, mask) -> EvalMetrics`."""
  def device_step(params, batch_stats, images, labels):
    logits = model.apply(model_variables(params, batch_stats), images, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss, jnp.argmax(logits, -1) == labels

  sharded = jax.shard_map(
      device_step, mesh=mesh,
      in_specs=(P(), P(), P(sharding.AXIS), P(sharding.AXIS)),
      out_specs=(P(sharding.AXIS), P(sharding.AXIS)))

  @jax.jit
  def eval_step(state: TrainState, images, labels, mask):
    loss, correct = sharded(state.params, state.batch_stats, images, labels)
    return EvalMetrics.single_from_model_output(
        loss=loss, accuracy=correct.astype(jnp.float32), mask=mask)

  return eval_step


def evaluate(eval_step, state, mesh, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> dict:
  """Loss and accuracy over a whole split."""
  total = None
  local = sharding.local_slice(batch_size)
  for idx, mask in input_pipeline.eval_batches(len(images), batch_size):
    idx, mask = idx[local], mask[local]
    batch = sharding.global_batch(mesh, images[idx], labels[idx], mask)
    m = eval_step(state, *batch)
    total = m if total is None else total.merge(m)
  return {k: float(v) for k, v in total.compute().items()}


# ----------------------------------------------------------------- run


class Run:
  """Everything `train_and_evaluate` and `evaluate_checkpoint` set up.

  Building a `Run` validates the config, loads the data and checks any
  checkpoint in the workdir, and writes nothing: a bad input fails here with
  the workdir untouched.
  """

  def __init__(self, config, workdir: str):
    validate_config(config)
    self.config = config
    self.workdir = workdir
    self.data = datasets.load(config.dataset)
    num_classes = self.data.num_classes
    if config.num_classes is not None and config.num_classes != num_classes:
      raise UserError(f'num_classes: {config.num_classes} does not match the '
                      f'{num_classes} classes of the data; leave it None')
    self.num_classes = num_classes
    self.meta = architecture_meta(config, num_classes)
    sharding.check_batch_size(config.batch_size)
    sharding.check_batch_size(config.eval_batch_size, 'eval_batch_size')
    self.mesh = sharding.make_mesh()
    self.batches = input_pipeline.TrainBatches(
        len(self.data.train.labels), config.batch_size, config.seed)
    self.tx, self.schedule = make_optimizer(config, self.batches.steps_per_epoch)
    self.model = create_model(config, num_classes, bn_axis_name=sharding.AXIS)
    source = config.transfer.from_workdir
    reinit = transfer.patterns(config.transfer.reinit)
    if source and config.transfer.freeze:
      shapes = jax.eval_shape(lambda: self.model.init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])
      self.tx = transfer.freeze(self.tx, shapes, reinit)
    self.checkpoints = checkpoints.Checkpoints(workdir, keep=config.checkpoint_keep)
    checkpoints.check_architecture(self.checkpoints.latest_dir, self.meta)
    replicated = sharding.replicated(self.mesh)
    self.state = init_state(self.model, self.tx, config.seed, self.mesh)
    self.train_metrics = jax.device_put(TrainMetrics.empty(), replicated)
    self.resumed_meta = None
    template = dict(state=self.state, train_metrics=self.train_metrics)
    restored = checkpoints.restore_latest_good(
        self.checkpoints.latest_dir, template, self.meta)
    if restored is not None:
      tree, self.resumed_meta = restored
      tree = jax.device_put(tree, replicated)
      self.state, self.train_metrics = tree['state'], tree['train_metrics']
    preprocess_path = os.path.join(workdir, input_pipeline.PREPROCESS_FILE)
    source_preprocess = None
    if restored is None and source:
      params, stats, source_preprocess = transfer.load_source(source)
      params = transfer.copy_weights(self.state.params, params, reinit, 'parameter')
      stats = transfer.copy_weights(self.state.batch_stats, stats, reinit,
                                    'batch statistic')
      self.state = jax.device_put(
          self.state.replace(params=params, batch_stats=stats,
                             opt_state=self.tx.init(params)), replicated)
      logging.info('Transferred all but %s from %s', reinit, source)
    if self.resumed_meta is not None and os.path.exists(preprocess_path):
      self.preprocessor = input_pipeline.Preprocessor.load(preprocess_path)
    elif source_preprocess:
      # The copied layers expect the inputs normalized as they were trained.
      self.preprocessor = input_pipeline.Preprocessor.load(source_preprocess)
    else:
      self.preprocessor = input_pipeline.Preprocessor.fit(
          self.data.train.images, standardize=config.preprocess.standardize,
          gcn_zca=config.preprocess.gcn_zca,
          zca_epsilon=config.preprocess.zca_epsilon)
    self.preprocess_path = preprocess_path

  def restore_best(self):
    """Returns (state, meta) of the best checkpoint.

    Raises:
      UserError: when the workdir has no checkpoint.
    """
    if checkpoints.latest_step(self.checkpoints.best_dir) is None:
      raise UserError(f'workdir: no checkpoint in {self.workdir}; train first')
    template = dict(state=self.state, train_metrics=self.train_metrics)
    tree, meta = checkpoints.restore(self.checkpoints.best_dir, template, self.meta)
    return tree['state'], meta

  def test_arrays(self):
    return self.preprocessor(self.data.test.images), self.data.test.labels


class Interrupted(Exception):
  """Training stopped by SIGTERM or SIGINT after saving a checkpoint."""

  def __init__(self, signum: int, step: int):
    super().__init__(f'{signal.Signals(signum).name}: saved a checkpoint at '
                     f'step {step}; run the same command to resume')
    self.signum = signum


class _StopRequests:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains the configured network, evaluating on the test split each epoch.

  Resumes from the latest good checkpoint in `workdir` if there is one; the
  batches, augmentation and dropout masks depend only on (seed, step), so a
  resumed run ends bit for bit where an uninterrupted run would.

  Args:
    config: an experiment config (see ``configs/default.py``).
    workdir: where checkpoints, metrics.csv, curves.png and TensorBoard
      events go.

  Returns:
    A summary: final and best test accuracy, the best epoch, epochs run.

  Raises:
    UserError: for bad config values, data or checkpoints, before anything is
      written to `workdir`; or a non-finite loss (``halt_on_nan``), with the
      last good checkpoint kept.
    Interrupted: after SIGTERM or SIGINT, once a checkpoint is saved.
  """
  run = Run(config, workdir)
  # Imported here: they import TensorFlow, which takes seconds, and a bad
  # input should fail before that.
  from clu import metric_writers, periodic_actions  # pylint: disable=g-import-not-at-top
  is_writer = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if run.resumed_meta is None and is_writer:
    run.preprocessor.save(run.preprocess_path)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  train_images = run.preprocessor(run.data.train.images)
  train_labels = run.data.train.labels
  test_images, test_labels = run.test_arrays()

  logging.info('%s on %s (%d classes, %d train / %d test images), %d device(s)',
               config.model, config.dataset.name, run.num_classes,
               len(train_labels), len(test_labels), jax.device_count())
  if is_writer:
    print(models.summary(create_model(config, run.num_classes)), flush=True)

  spe = run.batches.steps_per_epoch
  total_steps = config.num_epochs * spe
  state, train_metrics = run.state, run.train_metrics
  if config.init == 'lsuv' and run.resumed_meta is None and not config.transfer.from_workdir:
    state = _lsuv(run, state, train_images, workdir if is_writer else None)
  start_step = int(state.step)
  # The CSV is rebuilt from the checkpoint's history, so a run killed between
  # a checkpoint and a CSV write neither loses nor repeats an epoch.
  rows, best = [], dict(accuracy=-1.0, epoch=0)
  if run.resumed_meta is not None:
    rows = run.resumed_meta['history']
    best = dict(accuracy=run.resumed_meta['best_accuracy'],
                epoch=run.resumed_meta['best_epoch'])
    logging.info('Resuming from step %d (epoch %d) of %s', start_step,
                 start_step // spe, workdir)
  csv_path = os.path.join(workdir, 'metrics.csv')
  curves_path = os.path.join(workdir, 'curves.png')
  title = f'{config.model} on {config.dataset.name}'
  if is_writer:
    reporting.write_csv(csv_path, rows)

  train_step = make_train_step(
      run.model, run.tx, run.mesh, seed=config.seed,
      max_shift=input_pipeline.max_shift_pixels(config.augment.translate),
      flip=config.augment.flip)
  eval_step = make_eval_step(create_model(config, run.num_classes), run.mesh)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_writer)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in config.to_dict().items()
                          if isinstance(v, (int, float, str, bool))})
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, writer=writer, every_secs=30)
  local = sharding.local_slice(config.batch_size)

  def check_finite():
    """Stops before a diverged state can be checkpointed (halt_on_nan)."""
    bad = int(train_metrics.nonfinite_step.compute())
    if bad >= 0 and config.halt_on_nan:
      last = checkpoints.latest_step(run.checkpoints.latest_dir)
      kept = ('no checkpoint was written' if last is None else
              f'the last good checkpoint (step {last}) is kept')
      raise UserError(
          f'learning_rate: the loss became non-finite at step {bad}; training '
          f'stopped and {kept}; lower learning_rate or set halt_on_nan=False')

  def save(step: int, test_accuracy=None, is_best=False):
    meta = dict(run.meta, step=step, epoch=step // spe, history=rows,
                best_accuracy=best['accuracy'], best_epoch=best['epoch'])
    run.checkpoints.save(step, dict(state=state, train_metrics=train_metrics),
                         meta, test_accuracy, is_best)
    # Committed before anything refers to it, so that a kill never leaves
    # metrics of an epoch the checkpoints do not have.
    run.checkpoints.wait()

  epoch_start = time.time()
  with _StopRequests() as stop:
    for step in range(start_step, total_steps):
      idx = run.batches.indices(step)[local]
      images, labels = sharding.global_batch(run.mesh, train_images[idx],
                                             train_labels[idx])
      state, train_metrics = train_step(state, train_metrics, images, labels)
      report_progress(step + 1)
      saved = False
      if (step + 1) % spe == 0:
        check_finite()
        epoch = (step + 1) // spe
        train = {k: float(v) for k, v in train_metrics.compute().items()}
        test = evaluate(eval_step, state, run.mesh, test_images, test_labels,
                        config.eval_batch_size)
        row = dict(epoch=epoch, step=step + 1,
                   learning_rate=float(run.schedule(step)),
                   train_loss=train['loss'], train_accuracy=train['accuracy'],
                   test_loss=test['loss'], test_accuracy=test['accuracy'],
                   seconds=round(time.time() - epoch_start, 3))
        is_best = test['accuracy'] > best['accuracy']
        if is_best:
          best = dict(accuracy=test['accuracy'], epoch=epoch)
        rows = rows + [row]
        # The next epoch's metrics start empty, in this run and a resumed one.
        train_metrics = jax.device_put(TrainMetrics.empty(),
                                       sharding.replicated(run.mesh))
        save(step + 1, test['accuracy'], is_best)
        saved = True
        if is_writer:
          writer.write_scalars(step + 1, {k: v for k, v in row.items()
                                          if k not in ('epoch', 'step')})
          reporting.write_csv(csv_path, rows)
          reporting.plot_curves(rows, curves_path, title=title)
        eta = (total_steps - step - 1) / spe * row['seconds']
        logging.info(
            'epoch %d/%d  train loss %.4f acc %.2f%%  test loss %.4f acc %.2f%%  '
            '(best %.2f%% @%d)  %.1fs/epoch  ETA %s', epoch, config.num_epochs,
            train['loss'], 100 * train['accuracy'], test['loss'],
            100 * test['accuracy'], 100 * best['accuracy'], best['epoch'],
            row['seconds'], _duration(eta))
        epoch_start = time.time()
      elif (config.checkpoint_every_steps and
            (step + 1) % config.checkpoint_every_steps == 0):
        check_finite()
        save(step + 1)
        saved = True
      if stop.signum is not None:
        if not saved:
          check_finite()
          save(step + 1)
        raise Interrupted(stop.signum, step + 1)
  run.checkpoints.close()
  writer.flush()
  last = rows[-1] if rows else {}
  return dict(final_test_accuracy=last.get('test_accuracy'),
              best_test_accuracy=best['accuracy'], best_epoch=best['epoch'],
              epochs=len(rows))


def _lsuv(run: Run, state: TrainState, train_images: np.ndarray,
          workdir: str | None) -> TrainState:
  """LSUV-initializes the kernels on a batch of preprocessed training images."""
  from allconv_jax import lsuv  # pylint: disable=g-import-not-at-top
  cfg = run.config.lsuv
  rng = np.random.default_rng(run.config.seed)
  idx = rng.choice(len(train_images), min(cfg.batch_size, len(train_images)),
                   replace=False)
  idx = np.sort(idx)[sharding.local_slice(len(idx))]
  batch, = sharding.global_batch(run.mesh, train_images[idx])
  variables = model_variables(state.params, state.batch_stats)
  start = time.time()
  variables, report = lsuv.lsuv_init(run.model, variables, batch, tol=cfg.tol,
                                     max_iters=cfg.max_iters, measure=cfg.measure)
  logging.info('LSUV on %d images in %.1fs:\n%s', len(idx) * jax.process_count(),
               time.time() - start, report.table())
  if workdir is not None:
    report.save(os.path.join(workdir, 'lsuv_report.json'))
  # SGD and Adam states start at zero whatever the parameters, so the
  # optimizer state of `init_state` still fits.
  return state.replace(params=jax.device_put(variables['params'],
                                             sharding.replicated(run.mesh)))


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the best checkpoint of `workdir` on the test split.

  Returns:
    ``{'test_accuracy', 'test_loss', 'step'}``.
  """
  run = Run(config, workdir)
  state, meta = run.restore_best()
  state = jax.device_put(state, sharding.replicated(run.mesh))
  images, labels = run.test_arrays()
  eval_step = make_eval_step(create_model(config, run.num_classes), run.mesh)
  test = evaluate(eval_step, state, run.mesh, images, labels,
                  config.eval_batch_size)
  return dict(test_accuracy=test['accuracy'], test_loss=test['loss'],
              step=int(meta['step']))


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
