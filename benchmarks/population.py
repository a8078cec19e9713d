"""Populations (`allconv_jax.population`) against single runs: speed, memory.

  python benchmarks/population.py --steps=1            # 24 min on 2 busy cores
  python benchmarks/population.py --quick              # smoke test, 1 min
  python benchmarks/population.py --devices=0          # sections 1-3 only

All-CNN-C, ``configs/default.py``'s training settings (SGD + momentum, weight
decay, dropout, translate + flip), float32, ``conv_impl='auto'``, random
32x32x3 10-class training data resident on the device, the library's steps
per call; compiled (timed apart), called once, then ``--rounds`` blocks of
``--steps`` calls per case, the order reversed every other round.

1. A population of ``--members`` (4) against as many single runs:
   `population.make_train_steps` with ``at_once=1`` (`jax.lax.map`, the CPU
   default) and all (`jax.vmap`), against `steps.make_train_steps`.
2. Populations of ``--populations``: aggregate images/s (members x batch /
   step time) against the single run, ``at_once`` all (and 1 on a CPU).
3. Memory per member, from XLA's `memory_analysis` of populations of 1, 2
   and 4, and the largest population fitting an 80 GB and a 141 GB card.
4. ``--device_members`` members over ``--devices`` fake CPU devices (a worker
   with ``--xla_force_host_platform_device_count``, sharing the cores): the
   library's step (members replicated, each batch split over the devices)
   against `split_train_steps` (members split, whole batches).
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import time

from absl import app, flags

import allconv_jax  # pylint: disable=unused-import  # Its XLA flags, before JAX starts.
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from allconv_jax import config as config_lib
from allconv_jax import input_pipeline, optimizers, population, sharding, steps, trained
import common

DEVICE_FLAG = '--xla_force_host_platform_device_count'
CIFAR10_BYTES = 50000 * (32 * 32 * 3 * 4 + 4)  # float32 images, int32 labels.
CARDS = (('80 GB', 80e9), ('141 GB', 141e9))

FLAGS = flags.FLAGS
flags.DEFINE_bool('quick', False, 'A smoke test: width 0.125, batch 16, 1 step '
                  'per block, 512 images, populations of 1 and 2 only.')
flags.DEFINE_float('width', None, 'Width multiplier (default 1.0, the paper).')
flags.DEFINE_integer('batch_size', None, 'Batch of every member (default 128).')
flags.DEFINE_integer('steps', None, 'Timed calls per block (default 2).')
flags.DEFINE_integer('rounds', 2, 'Timed blocks of every case.')
flags.DEFINE_integer('members', None, 'Population of section 1 (default 4).')
flags.DEFINE_list('populations', None, 'Section 2 (default 1,2,4,8,16).')
flags.DEFINE_integer('train_size', None, 'Random training images (default 50000).')
flags.DEFINE_integer('devices', 2, 'CPU devices of section 4 (0: skip it).')
flags.DEFINE_integer('device_members', None, 'Members of section 4, a multiple '
                     'of --devices (default 4).')
flags.DEFINE_integer('steps_per_call', None, 'Train steps per call, sections 1-3 '
                     "(default: the library's, 1 on a CPU, 100 on an accelerator).")
flags.DEFINE_integer('worker', None, 'Internal: section 4 with this many devices.')


def sizes() -> dict:
  """The flags, with the defaults of ``--quick`` or of the full run."""
  pick = lambda value, full, tiny: value if value is not None else (
      tiny if FLAGS.quick else full)
  return dict(width=pick(FLAGS.width, 1.0, 0.125), batch=pick(FLAGS.batch_size, 128, 16),
              steps=pick(FLAGS.steps, 2, 1), members=pick(FLAGS.members, 4, 2),
              populations=[int(p) for p in
                           pick(FLAGS.populations, [1, 2, 4, 8, 16], [1, 2])],
              train_size=pick(FLAGS.train_size, 50000, 512),
              device_members=pick(FLAGS.device_members, 4, 2))


class Case:
  """A compiled train step carrying its own state, ready to be timed:
  `lower()` gives its `jax.stages.Lowered`, `call(compiled, step)` runs a step
  (host work included, as in the library's loop) and returns what to wait
  for, `loss()` the latest losses."""

  def __init__(self, name: str, members: int, batch: int, lower, call, loss):
    self.name, self.members, self.batch = name, members, batch
    self._call, self._loss, self.step = call, loss, 0
    start = time.perf_counter()
    self.compiled = lower().compile()
    self.compile_s = time.perf_counter() - start
    self.times, self.cpu_s, self.length = [], 0.0, 1  # Steps per call.
    self.run(1)  # Untimed: the first call allocates.
    self.times, self.cpu_s = [], 0.0

  def run(self, n: int) -> None:
    for _ in range(n):
      cpu, start = time.process_time(), time.perf_counter()
      jax.block_until_ready(self._call(self.compiled, self.step))
      self.times.append(time.perf_counter() - start)
      self.cpu_s += time.process_time() - cpu
      self.step += 1

  def result(self) -> dict:
    """The median step and what follows from it, as JSON-able data."""
    s = common.stats([t / self.length for t in self.times], self.members * self.batch)
    return dict(name=self.name, members=self.members, median_ms=1e3 * s['median_s'],
                images_per_s=s['images_per_s'], compile_s=self.compile_s,
                cores_used=self.cpu_s / sum(self.times),
                finite=bool(all(math.isfinite(x) for x in self._loss())))


def memory(compiled) -> dict:
  """XLA's memory analysis of a compiled step in bytes (0 where unknown);
  ``total``: arguments, outputs not written over donated ones, temporaries."""
  stats = compiled.memory_analysis()
  get = lambda field: int(getattr(stats, field, 0) or 0) if stats else 0
  out = {f: get(f'{f}_size_in_bytes') for f in ('argument', 'output', 'alias', 'temp')}
  out['total'] = out['argument'] + out['output'] - out['alias'] + out['temp']
  return out


def time_cases(cases: list[Case], n: int, rounds: int) -> None:
  """Times every case in `rounds` blocks, the order reversed every round, so
  that a change of the machine's load hits all cases alike."""
  for r in range(rounds):
    for case in (cases if r % 2 == 0 else cases[::-1]):
      common.log(f'  round {r + 1}/{rounds}: {case.name} ...')
      case.run(n)


class Bench:
  """The library's steps of a single run and of populations, on the data mesh
  of all devices, with a random training split resident there."""

  def __init__(self, width: float, batch: int, train_size: int, length: int = 1):
    config = config_lib.defaults()
    config.width, config.batch_size = width, batch
    self.config, self.batch, self.train_size = config, batch, train_size
    self.mesh = sharding.make_mesh()
    sharding.check_batch_size(batch)
    # CIFAR-10's steps per epoch, for the schedule. A single run's optimizer
    # (False), and a population's (True), whose learning rates live in its
    # optimizer state, as `train.setup` builds them (`kind.Single.optimizer`,
    # `population.Population.optimizer`; the rates are set by `states`).
    spe = 50000 // batch
    kind = population.Population(
        config, [population.Member(config.seed, config.learning_rate)], train_size)
    self.tx = {False: optimizers.make_optimizer(config, spe)[0],
               True: kind.optimizer(config, spe)[0]}
    self.model = trained.create_model(config, 10, bn_axis_name=sharding.AXIS)
    shift = input_pipeline.max_shift_pixels(config.augment.translate)
    self.options = dict(length=length, max_shift=shift, flip=config.augment.flip,
                        **{k: config[k] for k in ('label_smoothing', 'ema_decay')})
    rng = np.random.default_rng(0)
    self.data_bytes = train_size * (32 * 32 * 3 * 4 + 4)
    self.images, self.labels = steps.resident(
        self.mesh, rng.standard_normal((train_size, 32, 32, 3), np.float32),
        rng.integers(0, 10, train_size).astype(np.int32))

  def states(self, model, seeds: list[int], mesh):
    """A population's stacked initial states (`population.stack`)."""
    tx, rate = self.tx[True], self.config.learning_rate
    states = [steps.with_ema(s, self.config.ema_decay)
              for s in steps.init_states(model, tx, seeds, mesh)]
    return population.stack(states, [population.Member(s, rate) for s in seeds], mesh)

  def case(self, members: int, at_once: int | None = None) -> Case:
    """A population of seeds 0..`members`-1 (`population.make_train_steps`),
    or with `at_once` None a single run (`steps.make_train_steps`)."""
    seeds, mesh = list(range(members)), self.mesh
    if at_once is None:
      name, tx = 'single run', self.tx[False]
      state = steps.with_ema(steps.init_states(self.model, tx, [0], mesh)[0],
                             self.config.ema_decay)
      metrics = jax.device_put(steps.TrainMetrics.empty(), sharding.replicated(mesh))
      fn = steps.make_train_steps(self.model, tx, mesh, seed=0, **self.options)
      batches = input_pipeline.TrainBatches(self.train_size, self.batch, 0)
      compute = lambda c: c.compute()
    else:
      name = f'population of {members}, at_once={at_once}'
      state = self.states(self.model, seeds, mesh)
      metrics = population.empty_metrics(members, mesh)
      fn = population.make_train_steps(self.model, self.tx[True], mesh, seeds=seeds,
                                       at_once=at_once, **self.options)
      batches = population.Batches(self.train_size, self.batch, seeds)
      compute = lambda c: jax.vmap(type(c).compute)(c)  # Each member's.
    carry = dict(state=state, metrics=metrics)
    n = self.options['length']
    args = lambda step: (self.images, self.labels, sharding.global_batch(
        mesh, batches.chunk(step * n, (step + 1) * n, n))[0], n)

    def call(compiled, step):
      carry['state'], carry['metrics'] = compiled(carry['state'], carry['metrics'],
                                                  *args(step))
      return carry['metrics']
    case = Case(name, members, self.batch,
                lambda: fn.lower(carry['state'], carry['metrics'], *args(0)), call,
                lambda: np.ravel(compute(carry['metrics'])['loss']))
    tree = getattr(state, 'members', state)  # A population's, or the run's.
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t)) // members
    case.state_bytes, case.param_bytes = nbytes(tree), nbytes(tree.params)
    case.length = n
    return case


def split_train_steps(model, tx, mesh, *, max_shift: int, flip: bool):
  """The jitted `(states, images, labels, indices, seeds) -> (states, losses)`
  of members split over the mesh's one axis, `indices` (members, batch):
  each device runs `jax.lax.map` of a plain train step (augmentation, loss,
  gradient, optax update; no collective) over its members, whole batches."""
  def member_step(state, images, labels, seed):
    augment_key, dropout_key = jax.random.split(
        jax.random.fold_in(jax.random.key(seed), state.step))
    images = input_pipeline.augment(augment_key, images, max_shift=max_shift,
                                    flip=flip)

    def loss_fn(params):
      logits, updates = model.apply(
          steps.model_variables(params, state.batch_stats), images, train=True,
          rngs={'dropout': dropout_key}, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates.get('batch_stats', state.batch_stats)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, batch_stats=batch_stats,
                         params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state), loss

  def local(states, images, labels, indices, seeds):
    return jax.lax.map(lambda a: member_step(a[0], images[a[1]], labels[a[1]], a[2]),
                       (states, indices, seeds))

  axis = P(mesh.axis_names[0])
  return jax.jit(jax.shard_map(local, mesh=mesh, out_specs=(axis, axis),
                               in_specs=(axis, P(), P(), axis, axis)),
                 donate_argnums=0)


def measure_devices(devices: int) -> dict:
  """Section 4, in a worker with `devices` CPU devices: both layouts."""
  size = sizes()
  members, seeds = size['device_members'], list(range(size['device_members']))
  bench = Bench(size['width'], size['batch'], size['train_size'])
  replicated = bench.case(members, 1 if jax.default_backend() == 'cpu' else members)
  replicated.name = f'replicated: {members} members on every device'

  mesh = jax.make_mesh((devices,), ('members',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  split = NamedSharding(mesh, P('members'))
  model = trained.create_model(bench.config, 10)  # No batch-norm axis.
  carry = dict(state=jax.device_put(bench.states(model, seeds, mesh).members, split),
               loss=np.zeros(members))
  data = jax.device_put((np.asarray(bench.images), np.asarray(bench.labels)),
                        NamedSharding(mesh, P()))
  member_seeds = jax.device_put(np.asarray(seeds, np.int32), split)
  batches = population.Batches(size['train_size'], size['batch'], seeds)
  args = lambda step: (*data, jax.device_put(
      batches.chunk(step, step + 1, 1)[..., 0].T, split), member_seeds)
  fn = split_train_steps(model, bench.tx[True], mesh, flip=bench.options['flip'],
                         max_shift=bench.options['max_shift'])

  def call(compiled, step):
    carry['state'], carry['loss'] = compiled(carry['state'], *args(step))
    return carry['loss']
  cases = [replicated, Case(
      f'split: {members // devices} member(s) per device', members, size['batch'],
      lambda: fn.lower(carry['state'], *args(0)), call,
      lambda: np.asarray(carry['loss']))]
  time_cases(cases, size['steps'], FLAGS.rounds)
  return dict(xla_flags=os.environ.get('XLA_FLAGS', ''),
              results=[c.result() for c in cases])


_HEADER = ['case', 'ms/step', 'ms/member-step', 'img/s', 'x single', 'cores used',
           'compile s', 'loss']


def _row(r: dict, single: dict) -> list:
  ips = r['images_per_s']
  return [r['name'], f"{r['median_ms']:.1f}", f"{r['median_ms'] / r['members']:.1f}",
          f'{ips:.1f}', f"x{ips / single['images_per_s']:.2f}", f"{r['cores_used']:.2f}",
          f"{r['compile_s']:.1f}", 'ok' if r['finite'] else 'NaN']


_mb = lambda n: f'{n / 1e6:.1f}'  # Bytes as MB.


def print_memory(cases: dict, bench: Bench) -> None:
  """Section 3: compiled memory by population size, and what fits."""
  mem = {k: memory(c.compiled) for k, c in sorted(cases.items())}
  print(common.table(
      ['members', 'at_once', 'arguments MB', 'outputs MB', 'aliased MB',
       'temporaries MB', 'total MB', 'state MB/member'],
      [[m, a, *(_mb(mem[m, a][f]) for f in ('argument', 'output', 'alias', 'temp',
                                            'total')),
        _mb(cases[m, a].state_bytes)] for m, a in mem]))
  print(f'every total includes the resident random training split '
        f'({_mb(bench.data_bytes)} MB); state per member (params, optimizer state, '
        f'step): {_mb(cases[1, 1].state_bytes)} MB, of which params '
        f'{_mb(cases[1, 1].param_bytes)} MB')
  fits = []
  for kind in ('all', 1):
    total = {m: t['total'] for (m, a), t in mem.items()
             if a == (m if kind == 'all' else 1)}
    ms = sorted(total)
    if len(ms) < 2:
      continue
    slopes = [(total[b] - total[a]) / (b - a) for a, b in zip(ms, ms[1:])]
    # From the largest population measured, where what the members share
    # weighs least, adding what a member added last.
    per = slopes[-1]
    fixed = total[ms[-1]] - ms[-1] * per - bench.data_bytes
    print(f'at_once={kind}: a member adds ' + ', '.join(
        f'{_mb(s)} MB ({a}->{b})' for s, a, b in zip(slopes, ms, ms[1:])) +
          f'; the rest without the training split: {_mb(fixed)} MB')
    for card, size in CARDS:
      for share in (1.0, 0.75):  # 0.75: what JAX preallocates of a GPU by default.
        n = math.floor((share * size - CIFAR10_BYTES - fixed) / per) if per > 0 else 0
        fits.append([card, f'{share:.0%}', f'at_once={kind}', max(n, 0)])
  if fits:
    print('\nthe largest population of this network and batch that fits beside '
          f'the CIFAR-10 training split ({_mb(CIFAR10_BYTES)} MB, float32); 75%: '
          "JAX's default preallocation; extrapolated from this backend's memory "
          "analysis (a GPU's buffers and convolution workspaces differ):\n")
    print(common.table(['card', 'usable', 'members', 'largest population'], fits))


def print_devices(argv, size: dict) -> None:
  """Section 4, measured in a worker process with fake CPU devices."""
  n = FLAGS.devices
  print(f"\n## 4. {size['device_members']} members over {n} CPU devices: "
        'replicated or split\n')
  common.log(f'[worker: {n} CPU devices] ...')
  xla = re.sub(DEVICE_FLAG + r'=\S*', '', os.environ.get('XLA_FLAGS', '')).strip()
  env = dict(XLA_FLAGS=f'{xla} {DEVICE_FLAG}={n}'.strip(), JAX_PLATFORMS='cpu')
  with common.Worker(__file__, [f'--worker={n}', *argv], env) as worker:
    res = worker.call('measure')
  print(common.table(_HEADER[:4] + _HEADER[5:], [
      r[:4] + r[5:] for r in (_row(x, x) for x in res['results'])]))
  rep, split = res['results']
  ratio = split['images_per_s'] / rep['images_per_s']
  faster = 'split' if ratio > 1 else 'replicated'
  print(f"split vs replicated: x{ratio:.2f} images/s, {faster} is faster; worker "
        f"XLA_FLAGS={res['xla_flags']!r}; the {n} devices share {common.cores()} cores")


def orchestrate(argv) -> None:
  started, size = time.perf_counter(), sizes()
  print(f"## machine\n\n{common.machine(('jax', 'jaxlib', 'flax'))}")
  cpu = jax.default_backend() == 'cpu'
  length = FLAGS.steps_per_call or (1 if cpu else 100)
  print(f"\nAll-CNN-C width {size['width']}, batch {size['batch']} per member, "
        f"float32, configs/default.py training settings, conv_impl='auto', "
        f"random {size['train_size']}x32x32x3 training split on the device, "
        f"{length} step(s) per call; {FLAGS.rounds} rounds of {size['steps']} timed "
        f"calls per case; {jax.device_count()} {jax.default_backend()} device(s)")
  if common.busy():
    print('WARNING: the machine is busy (other work uses the cores): figures are '
          'low and noisy; ratios of cases timed in alternating rounds hold better.')
  bench = Bench(size['width'], size['batch'], size['train_size'], length)
  common.log('compiling the single run ...')
  single, n, cases = bench.case(1), size['members'], {}
  for m in sorted(set(size['populations']) | {1, 2, n}):
    for at_once in dict.fromkeys([m] + ([1] if cpu else [])):
      common.log(f'compiling a population of {m}, at_once={at_once} ...')
      cases[m, at_once] = bench.case(m, at_once)
  time_cases([single] + [c for (m, _), c in cases.items()
                         if m in size['populations'] or m == n],
             size['steps'], FLAGS.rounds)
  one = single.result()

  print(f'\n## 1. a population of {n} against {n} single runs\n')
  singles = dict(one, name=f'{n} single runs ({n} x the single run)',
                 median_ms=n * one['median_ms'], members=n)
  keys = [k for k in dict.fromkeys([(n, 1), (n, n)]) if k in cases]
  rows = [_row(r, one) + [f"{r['median_ms'] / singles['median_ms']:.2f}"]
          for r in [one, singles] + [cases[k].result() for k in keys]]
  print(common.table(_HEADER + [f'time / {n} singles'], rows))
  print('ms/step: the median step (one step of every member); img/s: members x '
        'batch / that; cores used: CPU seconds / wall seconds while timed')

  print(f"\n## 2. populations of {','.join(map(str, size['populations']))}\n")
  print(common.table(_HEADER, [_row(c.result(), one) for (m, _), c in cases.items()
                               if m in size['populations']]))

  print('\n## 3. memory per member\n')
  print_memory({k: c for k, c in cases.items() if k[0] <= 4}, bench)
  if FLAGS.devices > 1:
    print_devices(argv, size)
  print(f'\nload average at the end {common.loadavg()}; total '
        f'{time.perf_counter() - started:.0f} s')


def main(argv):
  if FLAGS.worker:
    return common.serve(dict(measure=functools.partial(measure_devices, FLAGS.worker)))
  return orchestrate(argv)


if __name__ == '__main__':
  # The user's flags, passed on to the worker unchanged.
  _user_flags = list(sys.argv[1:])
  app.run(lambda argv: main(_user_flags))
