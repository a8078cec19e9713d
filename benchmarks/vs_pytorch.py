"""This library's All-CNN-C steps against the same network in PyTorch, on CPU.

  pip install -e '.[bench]'                   # PyTorch, for this script only
  python benchmarks/vs_pytorch.py             # ~5 min on 2 idle cores
  python benchmarks/vs_pytorch.py --quick     # fewer steps and rounds
  python benchmarks/vs_pytorch.py --notorch_compile   # skip torch.compile

Times, in float32 on random data in memory:

* the train step at batch 128 and the eval step at batch 128 and 500 of this
  library (`common.LibrarySteps`: `steps.make_train_steps` with one step per
  call / `steps.make_eval_step`, the paper's All-CNN-C, SGD + momentum 0.9,
  weight decay 0.001, dropout; augmentation off, since the PyTorch step has
  none), with the library's defaults (its
  XLA flags and ``conv_impl='auto'``, i.e. oneDNN's convolutions where they
  can be built), with XLA's convolutions (``conv_impl='subpixel'``), and
  with XLA's own defaults (``ALLCONV_XLA_DEFAULTS=0``,
  ``conv_impl='native'``);
* a plain PyTorch All-CNN-C (`all_cnn_c`, the same layers and parameter count),
  cross-entropy, ``torch.optim.SGD`` with the same momentum and weight decay:
  eager, eager in ``channels_last`` memory format, and under `torch.compile`.

Each setting runs in its own worker process (JAX and PyTorch each size a
thread pool to the cores, and XLA reads its flags once per process). All are
compiled and warmed up first, then timed in rounds, one block of steps per
setting and case per round, the order reversed every round, so that a change
of the machine's load hits all settings alike. Printed per case: images/s
(median over rounds of each block's median step, with the range over
rounds), the ratio to PyTorch eager and to torch.compile (median over rounds
of the ratio within each round), and GFLOP/s from an analytic count of the
network's convolution FLOPs (`common.conv_flops`) against the machine's
matmul peak (the faster of a jitted 2048x2048 `jnp.dot` and `torch.mm`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import statistics
import sys
import time

from absl import app, flags

import common

# Setting name -> (worker argument, environment changes, description).
SETTINGS = {
    'jax, library defaults': ('jax', {}, "conv_impl='auto', library XLA flags"),
    'jax, XLA convolutions': ('jax_subpixel', {},
                              "conv_impl='subpixel', library XLA flags"),
    'jax, XLA defaults': ('jax_xla', {'ALLCONV_XLA_DEFAULTS': '0'},
                          "conv_impl='native', ALLCONV_XLA_DEFAULTS=0"),
    'torch eager': ('torch', {}, 'NCHW'),
    'torch eager channels_last': ('torch_cl', {}, 'NHWC memory format'),
    'torch.compile': ('torch_compile', {}, 'default mode, dynamic=False'),
}
EAGER, COMPILED = 'torch eager', 'torch.compile'
TRAIN_BATCH = 128
CASES = ('train b128', 'eval b128', 'eval b500')

FLAGS = flags.FLAGS
flags.DEFINE_bool('quick', False, 'Fewer steps and two rounds (debugging).')
flags.DEFINE_bool('torch_compile', True, 'Include torch.compile (compiling '
                  'takes a minute or two).')
flags.DEFINE_integer('rounds', None, 'Timing rounds (default 3, --quick 2).')
flags.DEFINE_integer('steps', None, 'Train steps per block (default 4, '
                     '--quick 2); eval blocks take as many seconds or so.')
flags.DEFINE_float('width', 1.0, 'Width multiplier (1.0 = the paper; smaller '
                   'only to smoke-test this script).')
flags.DEFINE_string('worker', None, 'Internal: serve one setting.')


# ------------------------------------------------------------ JAX worker


def serve_jax(conv_impl: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  steps = common.LibrarySteps(conv_impl=conv_impl, width=FLAGS.width,
                              augment=False)

  def info():
    from allconv_jax import conv  # pylint: disable=g-import-not-at-top
    return dict(threads=f'{common.cores()} (XLA)', params=steps.num_params,
                conv_impl=conv.resolve(conv_impl),
                xla_flags=os.environ.get('XLA_FLAGS', ''),
                flops=common.conv_flops(FLAGS.width))

  def matmul_peak():
    a = jnp.ones((2048, 2048), jnp.float32)
    dot = jax.jit(jnp.dot)
    return _peak(lambda: dot(a, a).block_until_ready())

  common.serve(dict(info=info, prepare=steps.prepare, run=steps.run,
                    train_loss=steps.train_loss, matmul_peak=matmul_peak))


def _peak(matmul) -> float:
  """GFLOP/s of the fastest of 10 calls of a 2048x2048 float32 matmul."""
  matmul()
  best = min(_seconds(matmul) for _ in range(10))
  return 2 * 2048 ** 3 / best / 1e9


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# ---------------------------------------------------------- torch worker


def serve_torch(channels_last: bool, compiled: bool) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from allconv_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(common.cores())
  torch.manual_seed(0)
  config = config_lib.defaults()
  layout = torch.channels_last if channels_last else torch.contiguous_format
  model = common.torch_all_cnn_c(FLAGS.width).to(memory_format=layout)
  optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                              momentum=config.momentum,
                              weight_decay=config.weight_decay)
  # dynamic=False: one static graph per batch size, as XLA compiles them.
  net = torch.compile(model, dynamic=False) if compiled else model
  losses = []

  def batch(size):
    images = torch.randn(size, 3, 32, 32).contiguous(memory_format=layout)
    return images, torch.randint(0, 10, (size,))

  def train_step(images, labels):
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(images), labels)
    loss.backward()
    optimizer.step()
    losses.append(loss.item())

  @torch.no_grad()
  def eval_step(images, labels):
    # What the library's eval step computes: per-image loss and correctness.
    model.eval()
    logits = net(images)
    loss = F.cross_entropy(logits, labels, reduction='none').sum()
    correct = (logits.argmax(-1) == labels).sum()
    return loss.item(), correct.item()

  cases = {}

  def prepare(case):
    kind, size = case.split(' b')
    cases[case] = (train_step if kind == 'train' else eval_step,
                   batch(int(size)))
    return dict(compile_s=0.0, first_call_s=min(run(case, 1)))

  def run(case, n):
    step, data = cases[case]
    return [_seconds(lambda: step(*data)) for _ in range(n)]

  def info():
    return dict(threads=f'{torch.get_num_threads()} (intra-op), '
                f'{torch.get_num_interop_threads()} (inter-op)',
                params=sum(p.numel() for p in model.parameters()))

  def matmul_peak():
    a = torch.ones(2048, 2048)
    return _peak(lambda: torch.mm(a, a))

  common.serve(dict(info=info, prepare=prepare, run=run,
                    train_loss=lambda: statistics.mean(losses),
                    matmul_peak=matmul_peak))


def serve(worker: str) -> None:
  if worker.startswith('jax'):
    serve_jax({'jax': 'auto', 'jax_subpixel': 'subpixel',
               'jax_xla': 'native'}[worker])
  else:
    serve_torch(channels_last=worker == 'torch_cl',
                compiled=worker == 'torch_compile')


# ------------------------------------------------------- the parent side


def _env(worker: str, changes: dict) -> dict:
  env = dict(changes, JAX_PLATFORMS='cpu')
  if worker == 'jax_xla':  # Also without the library's flags set by hand.
    from allconv_jax import xla_flags  # pylint: disable=g-import-not-at-top
    xla = os.environ.get('XLA_FLAGS', '')
    for flag in xla_flags.CPU_FLAGS:
      xla = re.sub(re.escape(flag.split('=')[0]) + r'=\S*', '', xla)
    env['XLA_FLAGS'] = xla.strip() or None
  return env


def _ratio(rates: dict, name: str, ref: str) -> str:
  """Median over rounds of rates[name] / rates[ref] (same-round pairs)."""
  if ref not in rates:
    return '-'
  return f'{statistics.median(a / b for a, b in zip(rates[name], rates[ref])):.2f}'


REQUIRED = ('jax, library defaults', EAGER)  # The rest may fail and be left out.


def start_workers(names, started: dict) -> None:
  """Starts a worker per setting and compiles and warms up every case.

  Args:
    names: the settings.
    started: filled with each setting that started: its worker and its
      `info` and `prepare` results (the caller closes the workers).
  """
  for name in names:
    arg, env, _ = SETTINGS[name]
    common.log(f'[setup] {name}: starting, compiling, warming up ...')
    worker = common.Worker(__file__, [f'--worker={arg}', f'--width={FLAGS.width}'],
                           _env(arg, env))
    try:
      info = worker.call('info')
      setup = {case: worker.call('prepare', case=case) for case in CASES}
      # A second call: torch.compile may specialize again after the first.
      for case in CASES:
        worker.call('run', case=case, n=1)
    except RuntimeError as e:
      worker.close()
      if name in REQUIRED:
        raise
      print(f'{name} left out, it failed:\n{e}')
      continue
    started[name] = dict(worker=worker, info=info, setup=setup)


def time_rounds(workers: dict, rounds: int, train_steps: int) -> dict:
  """Images/s of every case and worker, one figure per round.

  Within a round each worker runs a block of every case, the order of the
  workers reversed every round.
  """
  # Eval blocks take about as long as train blocks.
  reps = {case: train_steps if case.startswith('train') else
          max(2, round(train_steps * TRAIN_BATCH / _batch(case)))
          for case in CASES}
  rates = {case: {name: [] for name in workers} for case in CASES}
  order = list(workers)
  for r in range(rounds):
    for name in order:
      common.log(f'[round {r + 1}/{rounds}] {name} ...')
      time.sleep(1)  # Lets the previous worker's threads fall idle.
      for case in CASES:
        times = workers[name].call('run', case=case, n=reps[case])
        rates[case][name].append(_batch(case) / statistics.median(times))
    order.reverse()
  return rates


def _batch(case: str) -> int:
  return int(case.split(' b')[1])


def report(started: dict, rates: dict, losses: dict, peaks: dict,
           rounds: int) -> None:
  """Prints the settings, one table per case and the issue's targets."""
  print('\n## settings\n')
  print(common.table(
      ['setting', 'what', 'threads', 'parameters', 'first train step s',
       'train loss'],
      [[name, SETTINGS[name][2] + (f" (runs {s['info']['conv_impl']})"
                                   if 'conv_impl' in s['info'] else ''),
        s['info']['threads'],
        f"{s['info']['params']:,}",
        f"{sum(s['setup']['train b128'].values()):.1f}",
        f'{losses[name]:.3f}'] for name, s in started.items()]))
  print('\nXLA_FLAGS of the JAX workers: ' + '; '.join(
      f"{name} {s['info']['xla_flags']!r}" for name, s in started.items()
      if 'xla_flags' in s['info']))
  forward, train = started['jax, library defaults']['info']['flops']
  peak = max(peaks.values())
  print(f'convolution FLOPs per image: forward {forward / 1e9:.3f} G, train '
        f'step {train / 1e9:.3f} G; matmul peak (best of 10, 2048x2048 '
        f"float32): jnp.dot {peaks['jax, library defaults']:.0f}, torch.mm "
        f'{peaks[EAGER]:.0f} GFLOP/s -> peak {peak:.0f} GFLOP/s')

  for case in CASES:
    flops = train if case.startswith('train') else forward
    print(f'\n## {case}: images/s (median over {rounds} rounds, range)\n')
    rows = []
    for name, values in rates[case].items():
      median = statistics.median(values)
      rows.append([name, f'{median:.1f}',
                   f'{min(values):.1f}-{max(values):.1f}',
                   _ratio(rates[case], name, EAGER),
                   _ratio(rates[case], name, COMPILED),
                   f'{median * flops / 1e9:.0f}',
                   f'{100 * median * flops / 1e9 / peak:.0f}%'])
    print(common.table(['setting', 'img/s', 'range', 'x eager', 'x compiled',
                        'GFLOP/s', 'of peak'], rows))

  print('\n## issue 8 targets (library defaults vs PyTorch eager, same-round '
        'ratios)\n')
  for case in CASES:
    ratio = float(_ratio(rates[case], 'jax, library defaults', EAGER))
    print(f"{case}: x{ratio:.2f} of eager -> "
          f"{'PASS' if ratio >= 1.0 else 'FAIL'} (target >= 1.0)")


def orchestrate() -> None:
  if importlib.util.find_spec('torch') is None:
    print("error: PyTorch is not installed; install the benchmark extra with "
          "`pip install -e '.[bench]'` (torch==2.13.0; CPU-only wheel: add "
          "--index-url https://download.pytorch.org/whl/cpu)", file=sys.stderr)
    sys.exit(2)
  rounds = FLAGS.rounds or (2 if FLAGS.quick else 3)
  train_steps = FLAGS.steps or (2 if FLAGS.quick else 4)
  names = [n for n in SETTINGS if FLAGS.torch_compile or n != COMPILED]
  begin = time.perf_counter()
  print('## machine\n')
  print(common.machine())
  print(f'\nAll-CNN-C width {FLAGS.width}, float32, random data; train batch '
        f'{TRAIN_BATCH}, {rounds} rounds of {train_steps} train steps and '
        f'about as many seconds of eval steps per setting')
  if common.busy():
    print('WARNING: the machine is busy (other work uses the cores): absolute '
          'figures are low and noisy; the same-round ratios hold better.')
  started = {}
  try:
    start_workers(names, started)
    workers = {name: s['worker'] for name, s in started.items()}
    peaks = {name: workers[name].call('matmul_peak') for name in REQUIRED}
    rates = time_rounds(workers, rounds, train_steps)
    losses = {name: w.call('train_loss') for name, w in workers.items()}
  finally:
    for s in started.values():
      s['worker'].close()
  report(started, rates, losses, peaks, rounds)
  print(f'\nload average at the end {common.loadavg()}; total '
        f'{time.perf_counter() - begin:.0f} s')


def main(argv):
  del argv
  if FLAGS.worker:
    serve(FLAGS.worker)
  else:
    orchestrate()


if __name__ == '__main__':
  app.run(main)
