"""A single run or a population: what the training loop asks of either.

`train.setup` decides once which a config describes (`of`); from then on
the loop (`train.train_and_evaluate`) talks to the `Kind` it got and never
asks again. `Single` is one seed at one learning rate; a population (a
``config.sweep``) is `population.Population`, whose states are its
members' stacked.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
import optax

from allconv_jax import (history, input_pipeline, optimizers, population,
                         sharding, steps, writers)


class Record(Protocol):
  """A run's rows and selection so far, and its outputs (see `history`)."""

  def add(self, row: dict) -> Any:
    """Adds an evaluation's row; returns whether it is the best (of each
    member)."""

  def save(self, state, train_metrics, is_best=None) -> None:
    """Checkpoints the state; at an evaluation (`is_best` as `add` returned
    it) also as the selected one where it is the best."""

  def write(self) -> None:
    """The files and the log line of the row just added."""

  def write_confusion(self, counts: np.ndarray, class_names, step: int) -> None:
    """The test split's confusion counts (of each member)."""

  def finish(self) -> dict:
    """The summary, written once the run is complete."""


class Kind(Protocol):
  """What the loop needs to know: how many runs it trains, and how.

  Values of a row, metrics and divergence are the run's, or arrays over a
  population's members; the loop only passes them on.
  """
  batches: Any  # `input_pipeline.TrainBatches`' `steps_per_epoch` and `chunk`.
  seeds: list[int]  # Of initialization (and LSUV's sample), one per state.
  sweep: list | None  # The members' (seed, rate), for checkpoints' meta.
  description: str  # For the run's first log line.

  def optimizer(self, config, steps_per_epoch: int) -> tuple[
      optax.GradientTransformation, optax.Schedule]:
    """The optimizer, and the learning rate(s) by step."""

  def stack(self, states: list[steps.TrainState], mesh):
    """The state training runs on, from one initial state per seed."""

  def empty_metrics(self, mesh) -> steps.TrainMetrics:
    """Train metrics of no step yet, replicated."""

  def train_steps(self, model, tx, mesh, *, length: int, **options):
    """The jitted chunk of train steps (see `steps.make_train_steps`)."""

  def eval_step(self, model, mesh, *, flip: bool):
    """The jitted evaluation step (see `steps.eval_step`)."""

  def compute(self, collection) -> dict[str, jax.Array]:
    """A clu collection's values (of each member for a population's); the
    callers bring them to the host."""

  def diverged_step(self, state, train_metrics: steps.TrainMetrics) -> int:
    """The step at which training diverged, or -1 (see ``halt_on_nan``)."""

  def row_extras(self, state) -> dict:
    """Columns an evaluation's row adds beyond the metrics."""

  def record(self, run, resumed: dict | None, is_writer: bool) -> Record:
    """The run's record (`history.History`, or one per member)."""

  def run_dirs(self, workdir: str, config) -> list[tuple[str, ml_collections.ConfigDict]]:
    """Each directory that is a run's, with its config: the workdir, or each
    member's (the population's workdir gets the population's config too)."""


class Single:
  """One run: one seed, one learning rate (see `Kind`)."""

  def __init__(self, config: ml_collections.ConfigDict, num_examples: int):
    self.batches = input_pipeline.TrainBatches(num_examples, config.batch_size,
                                               config.seed)
    self.seeds, self.sweep, self.description = [config.seed], None, ''

  def optimizer(self, config, steps_per_epoch):
    return optimizers.make_optimizer(config, steps_per_epoch)

  def stack(self, states, mesh):
    del mesh
    state, = states
    return state

  def empty_metrics(self, mesh):
    return jax.device_put(steps.TrainMetrics.empty(), sharding.replicated(mesh))

  def train_steps(self, model, tx, mesh, *, length, **options):
    return steps.make_train_steps(model, tx, mesh, length=length,
                                  seed=self.seeds[0], **options)

  def eval_step(self, model, mesh, *, flip):
    return steps.make_eval_step(model, mesh, flip=flip)

  def compute(self, collection):
    return collection.compute()

  def diverged_step(self, state, train_metrics):
    del state
    return int(train_metrics.nonfinite_step.compute())

  def row_extras(self, state):
    del state
    return {}

  def record(self, run, resumed, is_writer):
    return history.History(run, resumed,
                           writers.for_run(run, run.workdir, files_too=is_writer))

  def run_dirs(self, workdir, config):
    return [(workdir, config)]


def of(config: ml_collections.ConfigDict, num_examples: int) -> Kind:
  """A population if `config` sweeps seeds or rates, else a single run."""
  members = population.members(config)
  if members:
    return population.Population(config, members, num_examples)
  return Single(config, num_examples)
