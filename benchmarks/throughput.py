"""Throughput of All-CNN-C (full width, batch 128): bare steps and the full loop.

  python benchmarks/throughput.py           # ~3 min on 2 idle cores
  python benchmarks/throughput.py --quick   # fewer steps and epochs
  make benchmark                            # the same as the first

Prints the machine, then

1. **bare steps**: images/s of the library's train step (batch 128) and eval
   step (batch 128 and 500), float32 and bfloat16, on random data already
   on the device, after warm-up, waiting for every step (`common.LibrarySteps`:
   the training settings of ``configs/default.py``, translate + flip
   included), with the time to lower and compile each;
2. **full loop**: `train.train_and_evaluate` on the digits data (10 steps of
   128 per epoch, 450 test images) with the same settings, so host batching,
   on-device augmentation, metrics, the per-epoch eval, Orbax checkpoints,
   ``metrics.csv``, ``curves.png`` and TensorBoard all run. Epoch 1 compiles
   and is not timed. Right after each epoch's eval the very same jitted
   train step is timed bare (its own state, random data on the device), so
   each epoch is compared with a reference taken under the same machine
   load. The loop's images/s over the timed epochs, with and without the
   eval's time, as a ratio to that bare step: the loop without eval must
   reach 95% of it (PASS/FAIL). The eval does work the bare step does not
   (a third of the training images again, on digits); its share is also
   estimated for CIFAR-10.

The library's default XLA flags and ``conv_impl='auto'`` apply; PyTorch and
XLA's own defaults are compared in ``vs_pytorch.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import time
from unittest import mock

from absl import app, flags, logging

import common

TARGET = 0.95  # The full loop must reach 95% of the bare step's images/s.

FLAGS = flags.FLAGS
flags.DEFINE_bool('quick', False, 'Fewer steps and epochs (debugging).')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes of the '
                  'bare steps.')
flags.DEFINE_integer('steps', None, 'Timed train steps per case (default 6, '
                     '--quick 3) and bare reference steps per epoch.')
flags.DEFINE_integer('epochs', None, 'Epochs of the full loop; the first is '
                     'not timed (default 4, --quick 2).')
flags.DEFINE_float('width', 1.0, 'Width multiplier (1.0 = the paper; smaller '
                   'only to smoke-test this script).')

CASES = ('train b128', 'eval b128', 'eval b500')


def bare_steps(dtype: str, steps: int) -> list[list[str]]:
  """Table rows: every case of one dtype, timed in this process."""
  library = common.LibrarySteps(dtype=dtype, width=FLAGS.width)
  rows = []
  for case in CASES:
    common.log(f'[bare] {dtype} {case} ...')
    setup = library.prepare(case)
    batch = int(case.split('b')[1])
    # Eval steps are cheaper: about as many seconds as the train steps.
    n = steps if case.startswith('train') else max(2, steps * 128 // batch)
    s = common.stats(library.run(case, n), batch)
    rows.append([dtype, case, f"{s['images_per_s']:.1f}",
                 f"{s['median_s']:.3f}", f"{s['min_s']:.3f}",
                 f"{s['max_s']:.3f}", s['steps'], f"{setup['compile_s']:.1f}"])
  loss = library.train_loss()
  rows[0].append('finite' if loss == loss else 'NaN')
  return rows


class _BareReference:
  """The loop's own jitted train steps, timed with a state of its own.

  Each call runs the chunk's `length` steps (1 on a CPU, the library's
  default) on one random batch of 128 on the device (`steps.resident`, as
  the loop keeps its split; every step's indices are the whole batch); the
  times are per step.
  """

  def __init__(self, step, model, tx, mesh, seed: int, length: int,
               ema_decay: float):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from allconv_jax import sharding, steps  # pylint: disable=g-import-not-at-top
    self.step, self.jax, self.length = step, jax, length
    self.state = steps.with_ema(steps.init_states(model, tx, [seed], mesh)[0],
                                ema_decay)
    self.metrics = jax.device_put(steps.TrainMetrics.empty(),
                                  sharding.replicated(mesh))
    rng = np.random.default_rng(0)
    indices = np.tile(np.arange(128, dtype=np.int32)[:, None], (1, length))
    self.batch = (
        *steps.resident(mesh, rng.standard_normal((128, 32, 32, 3), np.float32),
                        rng.integers(0, 10, 128).astype(np.int32)),
        *sharding.global_batch(mesh, indices[sharding.local_slice(128)]), length)

  def run(self, n: int) -> list[float]:
    times = []
    for _ in range(n):
      start = time.perf_counter()
      self.state, self.metrics = self.step(self.state, self.metrics,
                                           *self.batch)
      self.jax.block_until_ready(self.metrics)
      times.append((time.perf_counter() - start) / self.length)
    return times


def full_loop(epochs: int, ref_steps: int) -> dict:
  """Times `train.train_and_evaluate` on digits against its bare step.

  `steps.make_train_steps` (which the loop's `kind.Single.train_steps`
  calls) and `steps.evaluate` are wrapped (only while the loop runs) to get
  hold of the jitted steps and to mark when each epoch's eval starts and
  ends; the bare reference runs inside the eval's wrapper,
  after the eval, and its time is not counted.

  Returns:
    Images/s of the loop (with and without eval) and of the bare step, over
    epochs 2 to `epochs`, and the loop's eval rate.
  """
  from allconv_jax import reporting, steps, train  # pylint: disable=g-import-not-at-top
  from allconv_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.defaults()
  config.dataset.name, config.num_epochs = 'digits', epochs
  config.width = FLAGS.width
  make_train_steps, evaluate = steps.make_train_steps, steps.evaluate
  found = {}
  marks = []  # Per epoch: (eval start, eval end, reference end, step times).

  def capture_step(model, tx, mesh, **kwargs):
    found['args'] = (model, tx, mesh, kwargs['seed'], kwargs.get('length', 1),
                     kwargs.get('ema_decay', 0.0))
    found['step'] = make_train_steps(model, tx, mesh, **kwargs)
    return found['step']

  def timed_evaluate(*args, **kwargs):
    start = time.perf_counter()
    result = evaluate(*args, **kwargs)  # Numpy arrays: the eval is done.
    end = time.perf_counter()
    common.log(f'[full loop] epoch {len(marks) + 1}/{epochs} done')
    if 'reference' not in found:  # Its set-up compiles: after epoch 1.
      found['reference'] = _BareReference(found['step'], *found['args'])
    times = found['reference'].run(ref_steps)
    marks.append((start, end, time.perf_counter(), times))
    return result

  workdir = tempfile.mkdtemp(prefix='allconv_throughput_')
  try:
    with mock.patch.object(steps, 'make_train_steps', capture_step), \
        mock.patch.object(steps, 'evaluate', timed_evaluate), \
        contextlib.redirect_stdout(io.StringIO()):  # The model summary.
      train.train_and_evaluate(config, workdir)
    steps_per_epoch = reporting.read_csv(
        os.path.join(workdir, 'metrics.csv'))[0]['step']
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  # Epoch k's span, from the end of epoch k-1's reference to the end of its
  # own eval, holds epoch k-1's checkpoint, CSV, plot and TensorBoard writes,
  # epoch k's training and its eval.
  spans = [end - previous[2] for previous, (_, end, _, _) in zip(marks, marks[1:])]
  evals = [end - start for start, end, _, _ in marks[1:]]
  images = steps_per_epoch * config.batch_size * len(spans)
  reference = common.stats([t for *_, times in marks[1:] for t in times],
                           config.batch_size)
  return dict(epochs=f'2-{epochs}', steps_per_epoch=steps_per_epoch,
              with_eval=images / sum(spans),
              without_eval=images / (sum(spans) - sum(evals)),
              bare=reference['mean_images_per_s'],
              eval_images_per_s=450 * len(evals) / sum(evals))


def _cifar10_with_eval(full: dict) -> float:
  """The with-eval ratio for CIFAR-10's 390 steps and 10,000 test images."""
  train_s = 390 * 128 / full['without_eval']
  eval_s = 10000 / full['eval_images_per_s']
  return 390 * 128 / (train_s + eval_s) / full['bare']


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint.
  started = time.perf_counter()
  steps = FLAGS.steps or (3 if FLAGS.quick else 6)
  epochs = max(2, FLAGS.epochs or (2 if FLAGS.quick else 4))
  import allconv_jax  # pylint: disable=g-import-not-at-top,unused-import
  print('## machine\n')  # XLA_FLAGS as the library has set them.
  print(common.machine(('jax', 'jaxlib', 'flax')))
  print(f'\nAll-CNN-C width {FLAGS.width}, configs/default.py training '
        "settings, conv_impl='auto'")
  if common.busy():
    print('WARNING: the machine is busy (other work uses the cores): absolute '
          'figures are low and noisy; the full-loop ratios, each against a '
          'bare step timed right beside it, hold better.')

  rows = []
  for dtype in FLAGS.dtypes:
    rows += bare_steps(dtype, steps)
  print('\n## bare steps (random data on the device, waiting for each step)\n')
  print(common.table(['dtype', 'step', 'img/s', 'median s', 'min s', 'max s',
                      'steps', 'compile s', 'loss'],
                     [r + [''] * (9 - len(r)) for r in rows]))

  common.log('[full loop] train_and_evaluate on digits ...')
  full = full_loop(epochs, steps)
  print(f"\n## full loop: train_and_evaluate on digits, float32, "
        f"{full['steps_per_epoch']} steps of 128 per epoch, epochs "
        f"{full['epochs']} timed\n")
  no_eval = full['without_eval'] / full['bare']
  print(common.table(['', 'img/s', 'x bare'], [
      ['bare train step (the loop\'s own, timed after each eval)',
       f"{full['bare']:.1f}", '1.00'],
      ['loop without the per-epoch eval', f"{full['without_eval']:.1f}",
       f'{no_eval:.3f}'],
      ['loop with the per-epoch eval (450 test images)',
       f"{full['with_eval']:.1f}", f"{full['with_eval'] / full['bare']:.3f}"],
  ]))
  print(f"\nthe eval ran at {full['eval_images_per_s']:.0f} images/s; with "
        f"10,000 test images per 390 steps (CIFAR-10) the loop with eval "
        f"would be x{_cifar10_with_eval(full):.3f} of the bare step")
  print(f"{'PASS' if no_eval >= TARGET else 'FAIL'}: the full loop (without "
        f"eval) runs at x{no_eval:.3f} of the bare step (target >= {TARGET})")
  print(f'\nload average at the end {common.loadavg()}; total '
        f'{time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
  app.run(main)
