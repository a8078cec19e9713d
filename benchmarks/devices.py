"""Overhead of data parallelism: the All-CNN-C train step on 1, 2 and 4 devices.

  python benchmarks/devices.py                 # ~3 min on 2 idle cores
  python benchmarks/devices.py --devices=1     # only the 1-device comparison
  python benchmarks/devices.py --width=0.25 --steps=2 --rounds=2  # smoke test

Measures images/s of the library's train step (`steps.make_train_steps`
with ``length=1``, one step per call: the batch gathered from the images on
the device by its indices, augmentation, then the loss and gradients inside
`jax.shard_map`, `pmean` over the ``data`` axis, optax update) for All-CNN-C
at full width, batch 128, float32, with the paper's training settings of
``configs/default.py`` (SGD + momentum, weight decay, translate + flip,
dropout), on random data already on the devices (`steps.resident`, as the
training loop keeps its split; the indices split over the devices), after
warm-up, blocking after every step:

1. on 1 device: the sharded step vs. a plain jitted step written here as a
   baseline (the same gather, model, augmentation, loss, optimizer and
   metrics, no `shard_map`, no `pmean`). The two are timed in alternating blocks in one
   process so that drift in the machine's load hits both alike. Target: the
   sharded step within 3% of the plain one. Before timing, one step of each
   from the same state is checked to give the same loss and parameters, so
   the baseline does the same work.
2. on N = 2 and 4 devices: the sharded step in a process started with
   ``XLA_FLAGS=--xla_force_host_platform_device_count=N``. These fake CPU
   devices share the same cores, so no speed-up is expected: the numbers show
   the cost of splitting the batch, of the cross-device `pmean` and of the
   per-device dispatch, not scaling.

The measured figures and the machine are in the README's Performance section.

Every measurement runs in a fresh subprocess of this script
(``--worker=N``, a `common.Worker`); the machine (CPU model, cores, load
average, jax version) is printed first. Run it on an idle
machine (check `uptime`); the load average is printed at the start and end.
"""

from __future__ import annotations

import functools
import os
import re
import statistics
import sys
import time

from absl import app, flags

import common

DEVICE_FLAG = '--xla_force_host_platform_device_count'
_DEVICE_RE = re.compile(DEVICE_FLAG + r'=\S*')
TARGET = 0.97  # Sharded step on 1 device: at least 97% of the plain step.

FLAGS = flags.FLAGS
flags.DEFINE_list('devices', ['1', '2', '4'], 'Device counts to measure.')
flags.DEFINE_integer('batch_size', 128, 'Global train batch size.')
flags.DEFINE_float('width', 1.0, 'Width multiplier (1.0 = the paper; smaller '
                   'only to smoke-test this script).')
flags.DEFINE_integer('steps', 8, 'Timed steps per measurement on N > 1 '
                     'devices, and per block of the 1-device comparison.')
flags.DEFINE_integer('rounds', 3, '1 device: alternating blocks of `steps` '
                     'steps of each step function (each round runs one block '
                     'of each, the order alternating between rounds).')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_integer('worker', None, 'Internal: measure with this many '
                     'devices in this process.')


# ------------------------------------------------------------ worker side


def plain_train_step(model, tx, *, seed: int, max_shift: int, flip: bool):
  """The unsharded baseline: `steps.make_train_steps` (``length=1``)
  without `shard_map`.

  The same arguments `(state, metrics, images, labels, indices, count)` and
  the same gather of the batch, augmentation, keys, loss, metrics and
  optimizer update; the dropout key is folded with 0 as device 0 of the
  sharded step folds it, so on one device both functions compute the same
  thing. One step per call: `count` is ignored, as ``length=1`` ignores it.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from allconv_jax import input_pipeline, steps  # pylint: disable=g-import-not-at-top

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(state, train_metrics, images, labels, indices, count):
    del count  # One step, as make_train_steps with length=1.
    idx = indices[:, 0]
    images, labels = images[idx], labels[idx]
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    augment_key, dropout_key = jax.random.split(key)
    images = input_pipeline.augment(augment_key, images, max_shift=max_shift,
                                    flip=flip)
    dropout_key = jax.random.fold_in(dropout_key, 0)
    variables = ({'params': state.params, 'batch_stats': state.batch_stats}
                 if state.batch_stats else {'params': state.params})

    def loss_fn(params):
      logits, updates = model.apply(
          dict(variables, params=params), images, train=True,
          rngs={'dropout': dropout_key}, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (logits, updates.get('batch_stats', state.batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = steps.TrainState(step=state.step + 1,
                             params=optax.apply_updates(state.params, updates),
                             batch_stats=batch_stats, opt_state=opt_state)
    update = steps.TrainMetrics.single_from_model_output(
        loss=loss, accuracy=accuracy, step=state.step)
    return state, train_metrics.merge(update)

  return train_step


def measure(devices: int) -> dict:
  """The worker's measurements with `devices` devices, as JSON-able data."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from allconv_jax import input_pipeline, optimizers, sharding, steps, trained  # pylint: disable=g-import-not-at-top
  from allconv_jax import config as config_lib  # pylint: disable=g-import-not-at-top

  if jax.device_count() != devices:
    raise RuntimeError(f'expected {devices} devices, got {jax.devices()}')
  config = config_lib.defaults()
  config.width = FLAGS.width
  config.batch_size = FLAGS.batch_size
  sharding.check_batch_size(config.batch_size)
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)
  tx, _ = optimizers.make_optimizer(config, 50000 // config.batch_size)
  model = trained.create_model(config, 10, bn_axis_name=sharding.AXIS)
  kwargs = dict(seed=config.seed,
                max_shift=input_pipeline.max_shift_pixels(config.augment.translate),
                flip=config.augment.flip)
  state = steps.init_states(model, tx, [config.seed], mesh)[0]
  rng = np.random.default_rng(0)
  # As the training loop sends them: the images on every device, and one
  # step's indices (here the whole batch in order) split over the devices.
  data = (*steps.resident(
      mesh, rng.standard_normal((config.batch_size, 32, 32, 3), np.float32),
      rng.integers(0, 10, config.batch_size).astype(np.int32)),
          *sharding.global_batch(mesh, np.arange(
              config.batch_size, dtype=np.int32)[:, None]), 1)
  fresh_metrics = lambda: jax.device_put(steps.TrainMetrics.empty(), replicated)
  copy = lambda tree: jax.tree.map(jnp.copy, tree)

  # Not `steps`: fresh_metrics needs the module.
  step_fns = {'sharded': steps.make_train_steps(model, tx, mesh, length=1,
                                                **kwargs)}
  if devices == 1:
    step_fns['plain'] = plain_train_step(trained.create_model(config, 10), tx,
                                      **kwargs)
  result = dict(devices=devices, batch_size=config.batch_size,
                width=config.width, jax=jax.__version__,
                device_kind=jax.devices()[0].device_kind,
                xla_flags=os.environ.get('XLA_FLAGS', ''), compile_s={},
                timings={})
  compiled, states = {}, {}
  for name, step in step_fns.items():
    common.log(f'    {devices} device(s): compiling the {name} step ...')
    t = time.perf_counter()
    compiled[name] = step.lower(state, fresh_metrics(), *data).compile()
    result['compile_s'][name] = time.perf_counter() - t

  # One step of each from the same state: the same loss and parameters.
  first = {name: c(copy(state), fresh_metrics(), *data)
           for name, c in compiled.items()}
  result['loss'] = {name: float(m.compute()['loss'])
                    for name, (_, m) in first.items()}
  if 'plain' in first:
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                        first['sharded'][0].params, first['plain'][0].params)
    result['max_param_diff'] = max(jax.tree.leaves(diff))
  for name, (s, m) in first.items():
    states[name] = (s, m)

  def block(name: str, n: int) -> tuple[list, float, float]:
    """Step times, and the process's CPU seconds and wall seconds."""
    s, m = states[name]
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
      t = time.perf_counter()
      s, m = compiled[name](s, m, *data)
      jax.block_until_ready((s, m))
      times.append(time.perf_counter() - t)
    states[name] = (s, m)
    return times, time.process_time() - cpu0, time.perf_counter() - wall0

  for name in compiled:
    block(name, FLAGS.warmup)
  times = {name: [] for name in compiled}
  cpu = {name: [0.0, 0.0] for name in compiled}
  blocks = {name: [] for name in compiled}  # Mean step time of each block.
  rounds = FLAGS.rounds if len(compiled) > 1 else 1
  order = list(compiled)
  for r in range(rounds):
    for name in (order if r % 2 == 0 else order[::-1]):
      common.log(f'    {devices} device(s): round {r + 1}/{rounds}, {name} step ...')
      t, cpu_s, wall_s = block(name, FLAGS.steps)
      times[name] += t
      blocks[name].append(float(np.mean(t)))
      cpu[name][0] += cpu_s
      cpu[name][1] += wall_s
  for name, t in times.items():
    result['timings'][name] = common.stats(t, config.batch_size)
    result['timings'][name].update(
        cores_used=cpu[name][0] / cpu[name][1], block_means_s=blocks[name],
        finite_loss=bool(np.isfinite(float(states[name][1].compute()['loss']))))
  return result


# ------------------------------------------------------- orchestrator side


def _env(devices: int) -> dict:
  """The worker's environment: `devices` CPU devices, no other change."""
  xla = _DEVICE_RE.sub('', os.environ.get('XLA_FLAGS', '')).strip()
  if devices > 1:
    xla = f'{xla} {DEVICE_FLAG}={devices}'.strip()
  return dict(XLA_FLAGS=xla or None, JAX_PLATFORMS='cpu')


def _spawn(devices: int, passthrough) -> dict:
  """Measures in a fresh worker process; returns its results (or an error)."""
  start = time.perf_counter()
  try:
    with common.Worker(__file__, [f'--worker={devices}', *passthrough],
                       _env(devices)) as worker:
      result = worker.call('measure')
  except RuntimeError as e:
    result = dict(error=f'worker with {devices} device(s) failed: {e}')
  result['wall_s'] = time.perf_counter() - start
  return result


def orchestrate(argv) -> None:
  passthrough = argv[1:]
  started = time.perf_counter()
  cores = common.cores()
  print('## machine\n')
  print(common.machine(('jax', 'jaxlib', 'flax')))
  print(f'all_cnn_c width {FLAGS.width}, batch {FLAGS.batch_size}, float32, '
        f'configs/default.py training settings (SGD+momentum, weight decay, '
        f'translate+flip, dropout), random data on device, blocked every step')
  print(f'NOTE: N > 1 devices are fake CPU devices ({DEVICE_FLAG}=N) sharing '
        f'the same {cores} cores: there is no extra hardware, so they show the '
        f'cost of splitting the batch, pmean and per-device dispatch, not '
        f'scaling. A speed-up over 1 device means that one device left cores '
        f'idle (XLA runs each device on its own thread; see "cores used") or '
        f'that the smaller per-device batch is faster per image (compare '
        f'--devices=1 --batch_size={FLAGS.batch_size}/N).', flush=True)

  results = []
  for devices in [int(d) for d in FLAGS.devices]:
    common.log(f'[{devices} device(s)] ...')
    res = _spawn(devices, passthrough)
    if 'error' in res:
      print(res['error'], flush=True)
      continue
    results.append(res)

  rows, one = [], None
  for res in results:
    if res['devices'] == 1:
      one = res
    for name, t in res['timings'].items():
      rows.append([res['devices'], name, f"{t['mean_images_per_s']:.1f}",
                   f"{t['median_s']:.3f}", f"{t['min_s']:.3f}",
                   f"{t['max_s']:.3f}", t['steps'], f"{t['cores_used']:.2f}",
                   f"{res['compile_s'][name]:.1f}",
                   'ok' if t['finite_loss'] else 'NaN'])
  print('\n## train step, images/s\n')
  print(common.table(['devices', 'step', 'img/s', 'median s', 'min s',
                      'max s', 'steps', 'cores used', 'compile s', 'loss'],
                     rows))
  print('cores used = CPU seconds of the process / wall seconds while timing')
  print('XLA_FLAGS of the workers: ' + '; '.join(
      f"{res['devices']} device(s) {res['xla_flags']!r}" for res in results))

  if one is not None and 'plain' in one['timings']:
    sh, pl = one['timings']['sharded'], one['timings']['plain']
    ratio = sh['mean_images_per_s'] / pl['mean_images_per_s']
    ratio_median = pl['median_s'] / sh['median_s']
    paired_median = statistics.median(
        p / s for s, p in zip(sh['block_means_s'], pl['block_means_s']))
    print(f"\n1 device, sharded vs plain step (images/s ratio): "
          f"x{ratio:.3f} (all steps), x{ratio_median:.3f} (median step "
          f"times), x{paired_median:.3f} (median over rounds of the paired "
          f"blocks); target >= {TARGET}: "
          f"{'ok' if paired_median >= TARGET else 'MISS'} (on the paired median)")
    print('  s/step per round (sharded / plain): ' + ', '.join(
        f'{s:.3f} / {p:.3f}' for s, p in zip(sh['block_means_s'],
                                             pl['block_means_s'])))
    print(f"  same work: first-step loss sharded {one['loss']['sharded']:.6f} "
          f"vs plain {one['loss']['plain']:.6f}, max parameter difference "
          f"after it {one['max_param_diff']:.2e}")
  if one is not None:
    base = one['timings']['sharded']['mean_images_per_s']
    for res in results:
      if res['devices'] > 1:
        ips = res['timings']['sharded']['mean_images_per_s']
        print(f"{res['devices']} fake devices vs 1: x{ips / base:.3f} "
              f"({ips:.1f} vs {base:.1f} img/s, same {cores} cores)")
  print(f'\nload average at end {common.loadavg()}; total '
        f'{time.perf_counter() - started:.0f}s')


def main(argv):
  if FLAGS.worker:
    common.serve(dict(measure=lambda: measure(FLAGS.worker)))
  else:
    orchestrate(argv)


if __name__ == '__main__':
  # Pass the user's flags on to the workers unchanged.
  _user_flags = list(sys.argv[1:])
  app.run(lambda argv: main(['devices.py', *_user_flags]))
