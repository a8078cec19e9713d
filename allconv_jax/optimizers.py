"""The optimizer and its learning-rate schedule, as a config describes them.

The paper's: SGD with momentum, the rate multiplied by ``lr_decay`` at the
epochs of ``lr_boundaries``, weight decay as an L2 term on the gradient.
"""

import optax


def total_steps(config, steps_per_epoch: int) -> int:
  """``num_train_steps``, or else ``num_epochs`` epochs."""
  return config.num_train_steps or config.num_epochs * steps_per_epoch


def make_schedule(config, steps_per_epoch: int, peak: float) -> optax.Schedule:
  """The learning rate by step, starting at `peak`."""
  if config.lr_schedule == 'onecycle':
    return optax.cosine_onecycle_schedule(total_steps(config, steps_per_epoch), peak)
  return optax.piecewise_constant_schedule(
      peak, {int(b * steps_per_epoch): config.lr_decay for b in config.lr_boundaries})


def optimizer(config):
  """The optimizer of ``config.optimizer``, a function of the learning rate
  (a number or a schedule), without weight decay."""
  def make(learning_rate):
    if config.optimizer == 'sgd':
      return optax.sgd(learning_rate, momentum=config.momentum or None,
                       nesterov=config.nesterov)
    if config.optimizer == 'adam':
      return optax.adam(learning_rate)
    return optax.rmsprop(learning_rate, momentum=config.momentum)
  return make


def with_weight_decay(config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` after an L2 term on the gradient (as in the paper and PyTorch's
  SGD), before momentum."""
  return optax.chain(optax.add_decayed_weights(config.weight_decay), tx)


def make_optimizer(config, steps_per_epoch: int):
  """The optax optimizer of a run and its learning-rate schedule.

  A population's members each have their own rate: see
  `population.Population.optimizer`.
  """
  schedule = make_schedule(config, steps_per_epoch, config.learning_rate)
  return with_weight_decay(config, optimizer(config)(schedule)), schedule
