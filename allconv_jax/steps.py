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


def abstract_variables(model) -> dict:
  """The shapes and dtypes of `model.init`'s variables, computing nothing."""
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *models.INPUT_SHAPE))))


def init_state(model, tx, seed: int, mesh) -> TrainState:
  """Initial parameters and optimizer state, replicated over the mesh."""
  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def init():
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *models.INPUT_SHAPE)))
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
  return jax.jit(_train_step(model, tx, mesh, seed=seed, max_shift=max_shift,
                             flip=flip), donate_argnums=(0, 1))


def make_train_steps(model, tx, mesh, *, length: int, **step_options):
  """Returns the jitted `(state, metrics, images, labels, indices, count)`.

  It runs the first `count` of `length` train steps in one call, step k on
  ``images[indices[:, k]]`` of the training split on the device (see
  `resident`); `indices` is (batch, length), sharded over the batch. One
  call per chunk instead of one per step, so that on an accelerator the
  host's dispatch does not decide the speed; `count` is traced, so chunks
  cut short (at an epoch's end) reuse the same program.

  Args:
    model, tx, mesh: as for `make_train_step`.
    length: the most steps a call runs.
    **step_options: ``seed``, ``max_shift`` and ``flip`` of `make_train_step`.
  """
  step = _train_step(model, tx, mesh, **step_options)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_steps(state, train_metrics, images, labels, indices, count):
    if length == 1:  # The plain step, as `make_train_step`'s.
      return step(state, train_metrics, images[indices[:, 0]],
                  labels[indices[:, 0]])

    def body(carry, k):
      idx = indices[:, k]
      return jax.lax.cond(k < count, lambda c: step(*c, images[idx], labels[idx]),
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


def _train_step(model, tx, mesh, *, seed: int, max_shift: int, flip: bool):
  """The train step, not jitted (see `make_train_step`)."""
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


def make_predict_step(model, mesh):
  """Returns the jitted `(state, images) -> predicted classes` (int32).

  Each device classifies its slice of the batch; the result is replicated,
  so that every process can read the whole batch's predictions (a
  batch-sharded result would be readable only where its devices are).
  """
  def device_step(params, batch_stats, images):
    logits = model.apply(model_variables(params, batch_stats), images, train=False)
    return jnp.argmax(logits, -1).astype(jnp.int32)

  sharded = jax.shard_map(
      device_step, mesh=mesh, in_specs=(P(), P(), P(sharding.AXIS)),
      out_specs=P(sharding.AXIS))

  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def predict_step(state: TrainState, images):
    return sharded(state.params, state.batch_stats, images)

  return predict_step


def predict(predict_step, state, mesh, images: np.ndarray,
            batch_size: int) -> np.ndarray:
  """The predicted class of every image of a split, in the split's order.

  Batched as `evaluate` (`input_pipeline.eval_batches`): the padding of the
  last batch, whose mask is 0, is dropped.
  """
  out = []
  local = sharding.local_slice(batch_size)
  for idx, mask in input_pipeline.eval_batches(len(images), batch_size):
    # The global batch is the processes' slices in process order, i.e. `idx`
    # in order, which is what the replicated predictions come back as.
    batch, = sharding.global_batch(mesh, images[idx[local]])
    out.append(np.asarray(predict_step(state, batch))[mask > 0])
  return np.concatenate(out) if out else np.zeros(0, np.int32)
