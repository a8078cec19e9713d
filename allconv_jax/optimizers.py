"""The optimizer and its learning-rate schedule, as a config describes them.

The paper's: SGD with momentum, the rate multiplied by ``lr_decay`` at the
epochs of ``lr_boundaries``, weight decay as an L2 term on the gradient.
"""

import optax


def total_steps(config, steps_per_epoch: int) -> int:
  """``num_train_steps``, or else ``num_epochs`` epochs."""
  return config.num_train_steps or config.num_epochs * steps_per_epoch


def make_optimizer(config, steps_per_epoch: int, rate_in_state: bool = False):
  """The optax optimizer and its learning-rate schedule.

  Weight decay is an L2 term added to the gradient (as in the paper and
  PyTorch's SGD), before momentum. With `rate_in_state` (a population's),
  the learning rate is a hyperparameter in the optimizer state
  (`optax.inject_hyperparams`) that the schedule, returned as a factor,
  scales: each member of a population can have its own.
  """
  peak = 1.0 if rate_in_state else config.learning_rate
  if config.lr_schedule == 'onecycle':
    schedule = optax.cosine_onecycle_schedule(
        total_steps(config, steps_per_epoch), peak)
  else:
    schedule = optax.piecewise_constant_schedule(
        peak, {int(b * steps_per_epoch): config.lr_decay for b in config.lr_boundaries})

  def optimizer(learning_rate):
    if config.optimizer == 'sgd':
      return optax.sgd(learning_rate, momentum=config.momentum or None,
                       nesterov=config.nesterov)
    if config.optimizer == 'adam':
      return optax.adam(learning_rate)
    return optax.rmsprop(learning_rate, momentum=config.momentum)

  if rate_in_state:
    opt = optax.chain(optax.inject_hyperparams(optimizer)(config.learning_rate),
                      optax.scale_by_schedule(schedule))
  else:
    opt = optimizer(schedule)
  return optax.chain(optax.add_decayed_weights(config.weight_decay), opt), schedule
