"""What agreeing on a stop costs a train step of two processes.

    python benchmarks/distributed_stop.py [--width 1.0] [--rounds 8] [--steps 10]

Starts two processes of this script on this machine (2 forced CPU devices
each, a coordinator on 127.0.0.1), joined by `allconv_jax.distributed` as the
binary joins them, and times the library's train step of the digits config
(All-CNN-C with batch norm, batch 32, Adam; ``--width`` scales it):
`steps.make_train_steps` with ``length=1``, one step per call, its batch
gathered from random images on the devices (`steps.resident`) by indices
split over the devices, as the training loop sends them.

Two measures, because a few milliseconds per step are far below what other
work on a shared machine does to a step:

* Direct: the steps in three settings, alternated round by round so that
  the machine's load hits them alike: ``no check`` (the steps dispatched back
  to back, as a single process runs them), ``every 10`` (the default
  ``distributed.stop_check_every_steps``) and ``every 1``, with the loop's
  `allconv_jax.distributed.Agreement` after each step. Seconds per step, the
  best round and the median round of each.
* Parts: what a check adds to a step is the agreement itself (an all-reduce
  of one integer per device, timed alone between finished steps) and the
  host's dispatch of the next step, which a check stops from overlapping the
  running one (the time a step call takes to return). Their sum over the
  check interval, against the median blocking step, is the cost per step.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import common


def _child(args) -> None:
  # pylint: disable=g-import-not-at-top
  from allconv_jax import config as config_lib  # Before JAX: its XLA flags.
  from allconv_jax import distributed
  config = config_lib.load(os.path.join(common.REPO, 'configs', 'digits.py'))
  config.width = args.width
  config.distributed.coordinator_address = f'127.0.0.1:{args.port}'
  config.distributed.num_processes = 2
  config.distributed.process_id = args.process_id
  distributed.initialize(config)
  import jax
  import numpy as np
  from allconv_jax import optimizers, sharding, steps, trained

  mesh = sharding.make_mesh()
  tx, _ = optimizers.make_optimizer(config, 15)
  model = trained.create_model(config, 10, bn_axis_name=sharding.AXIS)
  state = steps.init_states(model, tx, [config.seed], mesh)[0]
  metrics = jax.device_put(steps.TrainMetrics.empty(), sharding.replicated(mesh))
  train_steps = steps.make_train_steps(model, tx, mesh, seed=config.seed,
                                       length=1, max_shift=0, flip=False)
  # The same random batch in both processes, on every device; each process
  # sends the indices of its half of it.
  rng = np.random.default_rng(0)
  batch = config.batch_size
  data = steps.resident(
      mesh, rng.standard_normal((batch, 32, 32, 3), np.float32),
      rng.integers(0, 10, batch).astype(np.int32))
  indices, = sharding.global_batch(mesh, np.arange(batch, dtype=np.int32)[
      sharding.local_slice(batch), None])
  step = lambda state, metrics: train_steps(state, metrics, *data, indices, 1)

  def run(every):
    nonlocal state, metrics
    agreement = distributed.Agreement(every) if every else None
    start = time.perf_counter()
    for k in range(args.steps):
      state, metrics = step(state, metrics)
      if agreement:
        agreement(k + 1, None)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / args.steps

  run(0)  # Compiles and warms up.
  run(1)
  settings = {'no check': 0, 'every 10': 10, 'every 1': 1}
  times = {name: [] for name in settings}
  for _ in range(args.rounds):
    for name, every in settings.items():
      times[name].append(run(every))
  agreement = distributed.Agreement(1)
  alone, dispatch, blocking = [], [], []
  for k in range(30):
    start = time.perf_counter()
    agreement(k, None)
    alone.append(time.perf_counter() - start)
    start = time.perf_counter()
    state, metrics = step(state, metrics)
    dispatch.append(time.perf_counter() - start)
    jax.block_until_ready(metrics)
    blocking.append(time.perf_counter() - start)
  print(json.dumps(dict(times=times, alone=statistics.median(alone),
                        dispatch=statistics.median(dispatch),
                        step=statistics.median(blocking))), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--rounds', type=int, default=8)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--port', type=int, default=None)
  args = parser.parse_args()
  if args.process_id is not None:
    _child(args)
    return

  print(common.machine(), flush=True)
  if common.busy():
    print('warning: other work is using the cores; the figures will be noisy',
          flush=True)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                                    ' --xla_force_host_platform_device_count=2'))
  children = [subprocess.Popen(
      [sys.executable, __file__, f'--width={args.width}', f'--rounds={args.rounds}',
       f'--steps={args.steps}', f'--process_id={i}', f'--port={port}'],
      stdout=subprocess.PIPE, text=True, env=env) for i in range(2)]
  outputs = [c.communicate()[0] for c in children]
  if any(c.returncode for c in children):
    sys.exit(f'a process failed: exit {[c.returncode for c in children]}')
  result = json.loads(outputs[0].strip().splitlines()[-1])
  print(f'\nAll-CNN-C width {args.width}, batch 32 over 2 processes x 2 CPU '
        f'devices; direct: {args.rounds} rounds of {args.steps} steps per '
        'setting\n')
  best = {k: min(v) for k, v in result['times'].items()}
  median = {k: statistics.median(v) for k, v in result['times'].items()}
  print(common.table(
      ['setting', 's/step, best round', 'extra', 's/step, median round', 'extra'],
      [[name, f'{best[name]:.4f}',
        f'{100 * (best[name] - best["no check"]) / best["no check"]:+.2f}%',
        f'{median[name]:.4f}',
        f'{100 * (median[name] - median["no check"]) / median["no check"]:+.2f}%']
       for name in best]))
  check = result['alone'] + result['dispatch']
  print(f'\nParts (medians of 30): one agreement {1000 * result["alone"]:.2f} ms, '
        f'dispatch of a step {1000 * result["dispatch"]:.2f} ms, a blocking step '
        f'{1000 * result["step"]:.1f} ms\n')
  print(common.table(
      ['check interval', 'cost per step', 'of a step'],
      [[f'every {n}', f'{1000 * check / n:.2f} ms',
        f'{100 * check / n / result["step"]:.2f}%'] for n in (1, 10)]))


if __name__ == '__main__':
  main()
