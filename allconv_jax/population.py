"""A population: the runs of a sweep over seeds and learning rates of one
network, trained together as one program.

The members are ``config.sweep.learning_rates`` times ``config.sweep.seeds``
(`members`), trained as the `Population` the loop is given (see
`allconv_jax.kind`). Their train states are stacked along a leading axis
(`Stacked`) and the train step of `allconv_jax.steps` is `jax.vmap`ped
over them (`make_train_steps`): each member has its own seed (initialization,
batch order, augmentation, dropout) and its own learning rate, which lives in
the optimizer state (`optax.inject_hyperparams`) while the schedule scales
it. The members are replicated over the devices of the data mesh, so every
member's batch is split over the devices as a single run's is.

A member whose loss is not finite is frozen (its weights and optimizer state
stay those of its last finite step) and marked diverged, while the others go
on. Each member is reported as a run of its own in
``<workdir>/members/<name>/`` (`Records`): its metrics, curves, TensorBoard
scalars, summary and selected checkpoint, which ``--mode=eval``,
``--mode=visualize`` and transfer learning load as any run's. The
population's own checkpoints, in ``<workdir>/checkpoints/``, hold every
member, for exact resume; ``<workdir>/members.csv`` ranks the members by
validation accuracy.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from allconv_jax import (checkpoints, files, history, input_pipeline, optimizers,
                         reporting, sharding, steps, writers)


@dataclasses.dataclass(frozen=True)
class Member:
  seed: int
  learning_rate: float

  @property
  def name(self) -> str:
    return f'lr{self.learning_rate:g}_seed{self.seed}'


def members(config: ml_collections.ConfigDict) -> list[Member]:
  """The members of `config`'s sweep, rate by rate; [] for a single run."""
  sweep = config.sweep
  if not (sweep.seeds or sweep.learning_rates):
    return []
  return [Member(int(seed), float(rate))
          for rate in sweep.learning_rates or (config.learning_rate,)
          for seed in sweep.seeds or (config.seed,)]


def member_config(config: ml_collections.ConfigDict,
                  member: Member) -> ml_collections.ConfigDict:
  """The config of the single run a member stands for."""
  config = config.copy_and_resolve_references()
  config.seed, config.learning_rate = member.seed, member.learning_rate
  config.sweep.seeds, config.sweep.learning_rates = (), ()
  return config


def member_dir(workdir: str, member: Member) -> str:
  return os.path.join(workdir, files.MEMBERS, member.name)


def member_summaries(workdir: str) -> list[dict]:
  """Each member of the population in `workdir`, as its files record it.

  Returns:
    One dict per member, in name order: ``name``, ``seed``,
    ``learning_rate``, ``workdir``, ``rows`` (its metrics), ``diverged_step``
    (-1 if its loss stayed finite) and ``summary`` (None until the
    population finished).
  """
  root = os.path.join(workdir, files.MEMBERS)
  out = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    path = lambda f, name=name: os.path.join(root, name, f)
    with open(path(files.CONFIG)) as f:
      config = json.load(f)
    rows = reporting.read_csv(path(files.METRICS))
    summary = None
    if os.path.exists(path(files.SUMMARY)):
      with open(path(files.SUMMARY)) as f:
        summary = json.load(f)
    out.append(dict(name=name, seed=config['seed'],
                    learning_rate=config['learning_rate'],
                    workdir=os.path.join(root, name), rows=rows, summary=summary,
                    diverged_step=int(rows[-1]['diverged_step']) if rows else -1))
  return out


class Stacked(flax.struct.PyTreeNode):
  """The members' train states, stacked along a leading axis.

  `diverged_at` is each member's first step with a non-finite loss, or -1.
  """
  members: steps.TrainState
  diverged_at: jax.Array

  @property
  def step(self) -> jax.Array:
    return self.members.step[0]

  def variables(self, ema: bool = False) -> dict:
    return self.members.variables(ema)

  def member(self, k: int) -> steps.TrainState:
    return jax.tree.map(lambda x: x[k], self.members)


def stack(states: list[steps.TrainState], population: list[Member],
          mesh) -> Stacked:
  """The population of `states`, each member's learning rate set in its
  optimizer state (built by `Population.optimizer`)."""
  @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
  def build(states, rates):
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *states)
    opt_state = optax.tree_utils.tree_set(stacked.opt_state, learning_rate=rates)
    return Stacked(stacked.replace(opt_state=opt_state),
                   jnp.full(len(states), -1, jnp.int32))
  return build(states, jnp.asarray([m.learning_rate for m in population], jnp.float32))


def empty_metrics(count: int, mesh) -> steps.TrainMetrics:
  """Empty train metrics of `count` members, replicated."""
  return jax.device_put(
      jax.tree.map(lambda x: jnp.stack([x] * count), steps.TrainMetrics.empty()),
      sharding.replicated(mesh))


class Batches:
  """The batches of every member, each from its own seed (see
  `input_pipeline.TrainBatches`): `chunk` is (batch, members, length)."""

  def __init__(self, num_examples: int, batch_size: int, seeds: list[int]):
    self._members = [input_pipeline.TrainBatches(num_examples, batch_size, s)
                     for s in seeds]
    self.steps_per_epoch = self._members[0].steps_per_epoch

  def chunk(self, start: int, stop: int, length: int) -> np.ndarray:
    return np.stack([b.chunk(start, stop, length) for b in self._members], axis=1)


def make_train_steps(model, tx, mesh, *, length: int, seeds: list[int],
                     at_once: int, **options):
  """`steps.make_train_steps` of a population's `Stacked` states.

  Indices are (batch, members, length), and a member whose loss is not
  finite is frozen. The step of `at_once` members is computed as one
  (`jax.vmap`: on an accelerator, convolutions batched over the members), the
  next ones after them (`jax.lax.map`: on a CPU, with 1, each member's step is
  a single run's, with no copies of stacked activations).
  """
  step = steps.train_step(model, tx, mesh, **options)

  def member_step(state, metrics, diverged_at, images, labels, seed):
    new, metrics = step(state, metrics, images, labels, seed)
    bad = metrics.nonfinite_step.compute()  # This period's first, or -1.
    ok = (diverged_at < 0) & (bad < 0)
    new = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state).replace(
        step=new.step)
    return new, metrics, jnp.where((diverged_at < 0) & (bad >= 0), bad, diverged_at)

  seeds = np.asarray(seeds, np.int32)

  def population_step(population, metrics, images, labels, idx):
    # idx is (batch, members): the batch axis stays the one split over devices.
    images, labels = jnp.swapaxes(images[idx], 0, 1), labels[idx].T
    states, metrics, diverged_at = jax.lax.map(
        lambda args: member_step(*args),
        (population.members, metrics, population.diverged_at, images, labels, seeds),
        # batch_size=1 would still vmap, over one member.
        batch_size=at_once if at_once > 1 else None)
    return Stacked(states, diverged_at), metrics

  return steps.scan_steps(population_step, length)


class Population:
  """The `kind.Kind` of a sweep: every member's state, batches and rate."""

  def __init__(self, config: ml_collections.ConfigDict, population: list[Member],
               num_examples: int):
    self.config, self.members = config, population
    self.seeds = [m.seed for m in population]
    self.sweep = [[m.seed, m.learning_rate] for m in population]
    self.batches = Batches(num_examples, config.batch_size, self.seeds)
    self.description = f', {len(population)} members'

  def optimizer(self, config, steps_per_epoch):
    """Each member's rate lives in its optimizer state
    (`optax.inject_hyperparams`) and the schedule, a factor, scales it."""
    factor = optimizers.make_schedule(config, steps_per_epoch, 1.0)
    tx = optimizers.with_weight_decay(config, optax.chain(
        optax.inject_hyperparams(optimizers.optimizer(config))(config.learning_rate),
        optax.scale_by_schedule(factor)))
    rates = np.array([m.learning_rate for m in self.members], np.float32)
    return tx, lambda step: rates * factor(step)

  def stack(self, states, mesh):
    return stack(states, self.members, mesh)

  def empty_metrics(self, mesh):
    return empty_metrics(len(self.members), mesh)

  def train_steps(self, model, tx, mesh, *, length, **options):
    on_cpu = jax.default_backend() == 'cpu'
    at_once = self.config.sweep.members_at_once or (1 if on_cpu else len(self.members))
    return make_train_steps(model, tx, mesh, length=length, seeds=self.seeds,
                            at_once=at_once, **options)

  def eval_step(self, model, mesh, *, flip):
    step = jax.vmap(steps.eval_step(model, mesh, flip=flip), in_axes=(0, None, None, None))
    return jax.jit(step, out_shardings=sharding.replicated(mesh))

  def compute(self, collection):
    return jax.vmap(type(collection).compute)(collection)

  def diverged_step(self, state, train_metrics):
    """The last member's divergence once all have diverged, else -1: a
    population stops only then."""
    del train_metrics
    bad = np.asarray(state.diverged_at)
    return int(bad.max()) if (bad >= 0).all() else -1

  def row_extras(self, state):
    return dict(diverged_step=np.asarray(state.diverged_at))

  def record(self, run, resumed, is_writer):
    return Records(run, resumed, is_writer)

  def run_dirs(self, workdir, config):
    return [(workdir, config)] + [(member_dir(workdir, m), member_config(config, m))
                                  for m in self.members]


class Records:
  """The `history.History` of every member, and the population's checkpoints.

  The same methods as a `history.History`, for `train.train_and_evaluate`:
  a row's values are arrays over the members.
  """

  def __init__(self, run, resumed: dict | None, is_writer: bool):
    self.run = run
    clock = writers.PlotClock(run.total_steps)  # The members' plots go together.
    self.members = []
    for k, m in enumerate(run.kind.members):
      directory = member_dir(run.workdir, m)
      self.members.append(history.History(
          run, resumed and dict(resumed, **resumed['member_histories'][k]),
          writers.for_run(run, directory, files_too=is_writer, clock=clock, log=False),
          workdir=directory))
    self.writers = [writers.PopulationLogLine(run.epochs, run.batches.steps_per_epoch,
                                              run.total_steps)]
    if is_writer:
      self.writers += [writers.MembersPlot(
          run.workdir, f'{run.config.model} on {run.config.dataset.name}: '
          f'{len(self.members)} members', [m.name for m in run.kind.members], clock),
                       writers.Ranking(run.workdir)]
    self.checkpoints = [checkpoints.Checkpoints(h.workdir, keep=1) for h in self.members]
    if resumed:  # Recomputed exactly by the resumed run.
      for c in self.checkpoints:
        for directory in (c.best_dir, c.latest_dir):
          checkpoints.prune_after(directory, resumed['step'])

  def add(self, row: dict) -> list[bool]:
    """Adds each member's row; returns whether it is that member's best."""
    is_best = []
    for i, (h, member) in enumerate(zip(self.members, self.run.kind.members)):
      was = h.rows[-1]['diverged_step'] if h.rows else -1
      is_best.append(h.add({k: v[i].item() if np.ndim(v) else v
                            for k, v in row.items()}))
      if was < 0 <= h.rows[-1]['diverged_step']:
        logging.warning('Member %s diverged at step %d: it stays at its last '
                        'finite step while the others go on', member.name,
                        h.rows[-1]['diverged_step'])
    return is_best

  def save(self, state: Stacked, train_metrics, is_best=None):
    """Checkpoints the population; at an evaluation also each member's
    selected checkpoint: its best, or without a validation split its last."""
    step = int(state.step)
    arch = {k: v for k, v in self.run.architecture.items() if k != 'sweep'}
    if is_best is not None:
      for k, (h, member) in enumerate(zip(self.members, self.run.kind.members)):
        if is_best[k] or not h.selection.has_validation:
          meta = history.checkpoint_meta(
              self.run, step, arch, **h.meta(), seed=member.seed,
              learning_rate=member.learning_rate,
              diverged_step=int(state.diverged_at[k]))
          self.checkpoints[k].save(step, dict(state=state.member(k)), meta,
                                   h.best['accuracy'], is_best[k],
                                   latest=not h.selection.has_validation)
      for c in self.checkpoints:
        c.wait()
    self.run.checkpoints.save(
        step, dict(state=state, train_metrics=train_metrics),
        history.checkpoint_meta(self.run, step, self.run.architecture,
                                member_histories=[h.meta() for h in self.members]))
    self.run.checkpoints.wait()

  def write(self) -> None:
    """The population's writers (its log line and plot, before the members
    start their next period), then each member's."""
    for writer in self.writers:
      writer.write(self)
    for h in self.members:
      h.write()

  def write_confusion(self, counts: np.ndarray, class_names, step: int) -> None:
    for k, h in enumerate(self.members):
      h.write_confusion(counts[k], class_names, step)

  def finish(self) -> dict:
    """Each member's summary, and the members ranked by validation accuracy
    (in their order without a validation split: nothing selects them)."""
    for c in self.checkpoints:
      c.close()
    table = []
    for h, member in zip(self.members, self.run.kind.members):
      summary = h.finish()
      table.append(dict(member=member.name, seed=member.seed,
                        learning_rate=member.learning_rate,
                        diverged_step=int(h.rows[-1]['diverged_step']) if h.rows else -1,
                        **{k: v for k, v in summary.items() if k.startswith(
                            ('selected_', 'final_', 'epochs', 'steps'))}))
    has_validation = self.members[0].selection.has_validation
    if has_validation:
      table.sort(key=lambda r: -(r.get('selected_validation_accuracy') or -1.0))
    summary = dict(selection='best_validation_accuracy' if has_validation else None,
                   best_member=table[0]['member'] if has_validation else None,
                   members=table)
    rows = self.members[0].rows
    complete = bool(rows) and rows[-1]['step'] == self.run.total_steps
    for writer in self.writers:
      writer.finish(summary, complete)
    return summary
