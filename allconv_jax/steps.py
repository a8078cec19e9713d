"""The jitted steps: train, evaluate, and the state they carry.

A train step augments the global batch on device, then inside
`jax.shard_map` each device computes the loss and gradients of its slice of
the batch, gradients and metrics are averaged over the ``data`` axis, and
the optax update runs on the replicated parameters. On one device this is
the plain step. The training loop runs several steps per call
(`make_train_steps`), each gathering its batch on the device from the
training split that stays there (`resident`): the host sends only indices.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics
from jax.sharding import PartitionSpec as P

from allconv_jax import input_pipeline, models, sharding
from allconv_jax.errors import UserError


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training; checkpointed as a whole.

  `ema` is ``{}``, or with ``ema_decay`` the moving average of the weights:
  ``{'params': ..., 'batch_stats': ...}`` (see `with_ema`).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any = flax.struct.field(default_factory=dict)

  def variables(self, ema: bool = False) -> dict:
    """What `model.apply` takes: the trained weights, or their average."""
    if ema:
      return model_variables(self.ema['params'], self.ema['batch_stats'])
    return model_variables(self.params, self.batch_stats)


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
class Confusion(metrics.Metric):
  """Counts of (true class, predicted class); padding (mask 0) left out."""
  counts: jax.Array

  @classmethod
  def from_model_output(cls, logits, labels, mask, **_) -> 'Confusion':
    n = logits.shape[-1]
    counts = jnp.zeros((n, n), jnp.int32).at[labels, jnp.argmax(logits, -1)].add(
        mask.astype(jnp.int32))
    return cls(counts=counts)

  def merge(self, other: 'Confusion') -> 'Confusion':
    return type(self)(counts=self.counts + other.counts)

  def compute(self) -> jax.Array:
    return self.counts


def _cross_entropy(logits, labels, **_):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _correct(logits, labels, **_):
  return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def _flip_correct(logits, flip_logits, labels, **_):
  # The mean of the two softmaxes: the usual test-time augmentation.
  probabilities = jax.nn.softmax(logits) + jax.nn.softmax(flip_logits)
  return (jnp.argmax(probabilities, -1) == labels).astype(jnp.float32)


_EVAL_METRICS = dict(loss=metrics.Average.from_fun(_cross_entropy),
                     accuracy=metrics.Average.from_fun(_correct))
EvalMetrics = metrics.Collection.create(**_EVAL_METRICS, confusion=Confusion)
# With horizontal-flip test-time augmentation reported beside.
FlipEvalMetrics = metrics.Collection.create(
    **_EVAL_METRICS, confusion=Confusion,
    flip_accuracy=metrics.Average.from_fun(_flip_correct))


def metric_names(flip: bool) -> tuple[str, ...]:
  """The scalar metrics of `make_eval_step`'s, with or without `flip`."""
  return (*_EVAL_METRICS, 'flip_accuracy') if flip else tuple(_EVAL_METRICS)


def abstract_variables(model) -> dict:
  """The shapes and dtypes of `model.init`'s variables, computing nothing."""
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *models.INPUT_SHAPE))))


def init_states(model, tx, seeds, mesh) -> list[TrainState]:
  """Initial parameters and optimizer state of each seed, replicated over
  the mesh (one compiled function for all seeds)."""
  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def init(seed):
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *models.INPUT_SHAPE)))
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(params))
  return [init(seed) for seed in seeds]


def with_ema(state: TrainState, ema_decay: float) -> TrainState:
  """`state` whose moving average starts at its weights (``{}`` if decay 0)."""
  if not ema_decay:
    return state.replace(ema={})
  # Copies: the train step donates the state, and a buffer must not be
  # donated twice.
  return state.replace(ema=jax.tree.map(
      jnp.copy, dict(params=state.params, batch_stats=state.batch_stats)))


def model_variables(params, batch_stats) -> dict:
  """The variables `model.apply` takes: params, and batch stats if any."""
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def make_train_steps(model, tx, mesh, *, seed: int, length: int = 1, **options):
  """Returns the jitted train steps `(state, metrics, images, labels, indices,
  count) -> (state, metrics)`, the one way to train (a population's wrap
  the same `train_step`: `population.make_train_steps`).

  It runs the first `count` of `length` train steps in one call, step k on
  ``images[indices[:, k]]`` of the training split on the device (see
  `resident`); `indices` is (batch, length), sharded over the batch. One
  call per chunk instead of one per step, so that on an accelerator the
  host's dispatch does not decide the speed; `count` is traced, so chunks
  cut short (at an epoch's end) reuse the same program.

  Args:
    model: built with ``bn_axis_name=sharding.AXIS``, so that batch-norm
      statistics are averaged over the devices.
    tx: the optax optimizer.
    mesh: see `sharding.make_mesh`.
    seed: of augmentation and dropout.
    length: the most steps a call runs (1: the plain step).
    **options: ``max_shift`` (pixels) and ``flip`` (augmentation),
      ``label_smoothing`` and ``ema_decay`` (see ``configs/default.py``; both
      default to 0, off).
  """
  step = train_step(model, tx, mesh, **options)
  return scan_steps(lambda state, metrics, images, labels, idx: step(
      state, metrics, images[idx], labels[idx], seed), length)


def scan_steps(step, length: int):
  """Jits `step(state, metrics, images, labels, idx)` into chunks of steps.

  `idx` is ``indices[..., k]`` of the call's `indices` (see
  `make_train_steps`); the state and metrics are donated.
  """
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_steps(state, train_metrics, images, labels, indices, count):
    if length == 1:  # The plain step.
      return step(state, train_metrics, images, labels, indices[..., 0])

    def body(carry, k):
      return jax.lax.cond(k < count, lambda c: step(*c, images, labels, indices[..., k]),
                          lambda c: c, carry), None
    carry, _ = jax.lax.scan(body, (state, train_metrics), jnp.arange(length))
    return carry

  return train_steps


def resident(mesh, images: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """A whole (preprocessed) split, copied once to every device of the mesh.

  Raises:
    UserError: it would take more than half a device's memory (where the
      device reports its memory: GPUs and TPUs do, CPUs do not).
  """
  stats = jax.local_devices()[0].memory_stats() or {}
  limit, needed = stats.get('bytes_limit'), images.nbytes + labels.nbytes
  if limit and needed > limit / 2:
    raise UserError(
        f'dataset: the preprocessed training split takes {needed / 2**30:.1f} '
        f'GiB on each device, more than half of its {limit / 2**30:.1f} GiB; '
        'use dataset.classes or a device with more memory')
  return jax.device_put((images, labels), sharding.replicated(mesh))


def train_step(model, tx, mesh, *, max_shift: int, flip: bool,
               label_smoothing: float = 0.0, ema_decay: float = 0.0):
  """The train step `(state, metrics, images, labels, seed)`, not jitted.

  See `make_train_steps`; the seed (of augmentation and dropout) is an
  argument, so that the members of a population can each have their own.
  """
  def device_step(params, batch_stats, images, labels, key):
    # Each device draws its own dropout mask.
    key = jax.random.fold_in(key, jax.lax.axis_index(sharding.AXIS))

    def loss_fn(params):
      logits, updates = model.apply(
          model_variables(params, batch_stats), images, train=True,
          rngs={'dropout': key}, mutable=['batch_stats'])
      if label_smoothing:
        targets = optax.smooth_labels(
            jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
      else:
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

  def step(state: TrainState, train_metrics: TrainMetrics, images, labels, seed):
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    augment_key, dropout_key = jax.random.split(key)
    images = input_pipeline.augment(augment_key, images, max_shift=max_shift,
                                    flip=flip)
    grads, batch_stats, loss, accuracy = sharded(
        state.params, state.batch_stats, images, labels, dropout_key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema
    if ema_decay:
      # TensorFlow's ExponentialMovingAverage with num_updates: a lower decay
      # early on, so that the average soon forgets the initialization.
      decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
      ema = optax.incremental_update(
          dict(params=params, batch_stats=batch_stats), ema, 1.0 - decay)
    state = TrainState(step=state.step + 1, params=params,
                       batch_stats=batch_stats, opt_state=opt_state, ema=ema)
    update = TrainMetrics.single_from_model_output(loss=loss, accuracy=accuracy,
                                                   step=state.step)
    return state, train_metrics.merge(update)

  return step


def eval_step(model, mesh, *, flip: bool = False):
  """The evaluation step `(variables, images, labels, mask) -> metrics`, not
  jitted (see `make_eval_step`; a population's maps it over its members)."""
  def device_step(variables, images):
    logits = model.apply(variables, images, train=False)
    # NHWC: axis 2 is the width.
    flipped = model.apply(variables, images[:, :, ::-1], train=False) if flip else logits
    return logits, flipped

  sharded = jax.shard_map(
      device_step, mesh=mesh, in_specs=(P(), P(sharding.AXIS)),
      out_specs=(P(sharding.AXIS), P(sharding.AXIS)))
  collection = FlipEvalMetrics if flip else EvalMetrics

  def step(variables, images, labels, mask):
    logits, flip_logits = sharded(variables, images)
    return collection.single_from_model_output(
        logits=logits, flip_logits=flip_logits, labels=labels, mask=mask)

  return step


def make_eval_step(model, mesh, *, flip: bool = False):
  """Returns the jitted `(variables, images, labels, mask) -> metrics`.

  The metrics are `EvalMetrics` (loss, accuracy, confusion counts), or with
  `flip` `FlipEvalMetrics`, which add the accuracy of the mean softmax of
  each image and of its mirror image.
  """
  # Replicated, so that every process can read the results.
  return jax.jit(eval_step(model, mesh, flip=flip),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_step, variables, mesh, images: np.ndarray, labels: np.ndarray,
             batch_size: int, compute=metrics.Collection.compute) -> dict:
  """Loss and accuracy (and flip accuracy) over a whole split, and
  ``confusion``: the (true class, predicted class) counts; numpy arrays.

  `compute` turns the merged metrics into values (a population's computes
  each member's, see `population.Population.compute`).
  """
  total = None
  local = sharding.local_slice(batch_size)
  for idx, mask in input_pipeline.eval_batches(len(images), batch_size):
    idx, mask = idx[local], mask[local]
    batch = sharding.global_batch(mesh, images[idx], labels[idx], mask)
    m = eval_step(variables, *batch)
    total = m if total is None else total.merge(m)
  return jax.tree.map(np.asarray, compute(total))
