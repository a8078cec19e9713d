"""All-CNN-C on the device JAX sees (GPU, TPU or CPU): steps, PyTorch, the loop.

  PYTHONPATH=. python benchmarks/accelerator.py     # on a GPU: the whole run
  python benchmarks/accelerator.py --preprocess=standardize   # no GCN/ZCA fit
  python benchmarks/accelerator.py --width=0.125 --train_size=256 \\
      --test_size=100 --batch_size=32 --steps=3 --epochs=2 \\
      --preprocess=standardize --notorch            # a smoke test on a CPU

Prints the machine and the device, then three Markdown tables:

1. the library's train step (`common.LibrarySteps`: the paper's All-CNN-C,
   SGD + momentum 0.9, weight decay 0.001, dropout, no augmentation) in
   float32 and bfloat16 on random data on the device, waiting for each step;
2. PyTorch on the same device: the same network and optimizer,
   channels_last, float32 and bfloat16 autocast, eager and `torch.compile`,
   timed alike. It runs in this process after JAX's steps (on a CPU the two
   never run at once; `vs_pytorch.py` is the careful CPU comparison);
   without PyTorch, or without its CUDA while JAX is on a GPU, a note says so;
3. `train.train_and_evaluate` with `configs/paper.py:all_cnn_c` on a
   synthetic CIFAR-sized split in a temporary workdir, epochs 2 on timed:
   seconds per epoch, images/s against the bare step's (PASS at 0.95 for the
   training alone) and the projected time of the paper's 350 epochs.
"""

from __future__ import annotations

import os

# JAX takes 75% of a GPU's memory when it first touches it, and PyTorch runs
# in this process too: leave it room. Set before JAX is imported, as JAX
# reads it then; a value set by hand wins. No effect on a CPU.
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '.45')

import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util
import io
import shutil
import statistics
import tempfile
import time
from unittest import mock

import jax
import numpy as np
from absl import app, flags, logging

import allconv_jax  # pylint: disable=unused-import  # XLA flags, read later.
import common
from allconv_jax import config as config_lib
from allconv_jax import datasets, reporting, sharding, train
from allconv_jax import steps as steps_lib

DTYPES = ('float32', 'bfloat16')
PAPER_EPOCHS = 350
TARGET = 0.95  # The loop's training must reach 95% of the bare step's rate.

FLAGS = flags.FLAGS
flags.DEFINE_float('width', 1.0, 'Width multiplier (1.0 = the paper; smaller '
                   'only to smoke-test this script).')
flags.DEFINE_integer('batch_size', 128, 'Train batch size (the paper: 128).')
flags.DEFINE_integer('steps', None, 'Timed steps per setting (default 100 on '
                     'an accelerator, 10 on a CPU).')
flags.DEFINE_integer('train_size', 50000, 'Synthetic training images.')
flags.DEFINE_integer('test_size', 10000, 'Synthetic test images.')
flags.DEFINE_integer('epochs', 3, 'Epochs of the full loop, at least 2: the '
                     'first compiles and is not timed.', lower_bound=2)
flags.DEFINE_list('dtype', None, 'Compute dtypes of the full loop (default '
                  'bfloat16 on an accelerator, float32 on a CPU).')
flags.DEFINE_integer('steps_per_dispatch', 0, 'config.steps_per_dispatch of '
                     'the loop (0: the library default, 1 on a CPU, 100 '
                     'elsewhere).', lower_bound=0)
flags.DEFINE_enum('preprocess', 'paper', ['paper', 'standardize'], "The "
                  "loop's preprocessing: the paper's GCN + ZCA (its fit takes "
                  'a 3072x3072 covariance) or per-channel standardization.')
flags.DEFINE_bool('torch', True, 'Time PyTorch too (if installed).')
flags.DEFINE_bool('torch_compile', True, 'Include torch.compile (about a '
                  'minute of compiling per setting).')
flags.register_validator('dtype', lambda v: v is None or set(v) <= set(DTYPES),
                         f"--dtype: a list of {', '.join(DTYPES)}")

HEADER = ['img/s', 'ms/step', 'min ms', 'max ms', 'steps', 'conv TFLOP/s',
          'compile s', 'loss']


def device_line() -> str:
  """The device kind and the memory JAX may use on it."""
  device = jax.devices()[0]
  try:  # CPUs report no memory statistics (None); some backends raise.
    limit = (device.memory_stats() or {}).get('bytes_limit')
  except Exception:  # pylint: disable=broad-except
    limit = None
  memory = (f'{limit / 2**30:.1f} GiB usable by JAX (XLA_PYTHON_CLIENT_MEM_'
            f"FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')})"
            if limit else 'memory not reported')
  return (f'device: {jax.device_count()} x {device.platform} '
          f"'{device.device_kind}', {memory}")


def _row(s: dict, name: str, compile_s: float, loss: float) -> list:
  """A table row of step statistics (`common.stats`), columns of HEADER."""
  tflops = s['images_per_s'] * common.conv_flops(FLAGS.width)[1] / 1e12
  return [name, f"{s['images_per_s']:.0f}", f"{1e3 * s['median_s']:.2f}",
          f"{1e3 * s['min_s']:.2f}", f"{1e3 * s['max_s']:.2f}", s['steps'],
          f'{tflops:.2f}', f'{compile_s:.1f}', f'{loss:.3f}']


# ------------------------------------------------ 1. the library's step


def library_steps(steps: int) -> tuple[dict, list]:
  """Times `common.LibrarySteps` in every dtype; returns stats and rows."""
  case, results, rows = f'train b{FLAGS.batch_size}', {}, []
  for dtype in DTYPES:
    common.log(f'[step] jax {dtype} {case} ...')
    library = common.LibrarySteps(dtype=dtype, width=FLAGS.width, augment=False)
    setup = library.prepare(case)
    library.run(case, 3)  # Warm-up: the first calls may still set things up.
    s = common.stats(library.run(case, steps), FLAGS.batch_size)
    results[dtype] = dict(s, params=library.num_params)
    rows.append(_row(s, dtype, setup['compile_s'], library.train_loss()))
    del library  # Frees its state on the device before the next one.
  return results, rows


# ---------------------------------------------------------- 2. PyTorch


def torch_device(platform: str) -> tuple[str | None, str]:
  """PyTorch's device for JAX's platform, or None and why not."""
  if not FLAGS.torch:
    return None, 'skipped (--notorch)'
  if importlib.util.find_spec('torch') is None:
    return None, 'skipped: PyTorch is not installed'
  import torch  # pylint: disable=g-import-not-at-top
  if platform == 'cpu' or platform == 'gpu' and torch.cuda.is_available():
    return 'cpu' if platform == 'cpu' else 'cuda', ''
  return None, (f'skipped: this PyTorch ({torch.__version__}) cannot run on '
                f'the {platform} JAX uses')


def torch_setting(device: str, dtype: str, compiled: bool,
                  steps: int) -> tuple[dict, list]:
  """Times one PyTorch setting; returns its stats and table row."""
  import torch  # pylint: disable=g-import-not-at-top
  config = config_lib.defaults()
  torch.manual_seed(0)
  model = common.torch_all_cnn_c(FLAGS.width).to(device=device,
                                    memory_format=torch.channels_last)
  optimizer = torch.optim.SGD(model.parameters(), lr=config.learning_rate,
                              momentum=config.momentum,
                              weight_decay=config.weight_decay)
  # dynamic=False: one static graph, as XLA compiles one program per shape.
  net = torch.compile(model, dynamic=False) if compiled else model
  images = torch.randn(FLAGS.batch_size, 3, 32, 32, device=device).contiguous(
      memory_format=torch.channels_last)
  labels = torch.randint(0, 10, (FLAGS.batch_size,), device=device)
  losses = []
  model.train()  # Dropout on, as in the library's step.

  def step() -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, torch.bfloat16, enabled=dtype == 'bfloat16'):
      loss = torch.nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    optimizer.step()
    losses.append(loss.detach())  # No .item(): it would wait for the GPU.
    if device == 'cuda':  # Asynchronous: wait, as JAX's timing does.
      torch.cuda.synchronize()
    return time.perf_counter() - start

  first = step()  # torch.compile compiles here (and cuDNN tunes).
  for _ in range(3):  # torch.compile may specialize again after the first.
    step()
  s = common.stats([step() for _ in range(steps)], FLAGS.batch_size)
  loss = float(torch.stack(losses).float().mean())
  name = f"{'torch.compile' if compiled else 'eager'}, {dtype}"
  return s, _row(s, name, first, loss)


def torch_rows(device: str, steps: int, jax_steps: dict) -> list:
  """Every PyTorch setting's row, with the library's rate as a ratio."""
  import torch  # pylint: disable=g-import-not-at-top
  if device == 'cuda':
    # Fixed shapes: let cuDNN pick its fastest algorithms, as XLA autotunes.
    torch.backends.cudnn.benchmark = True
  else:
    torch.set_num_threads(common.cores())
  rows = []
  for compiled in (False, True) if FLAGS.torch_compile else (False,):
    for dtype in DTYPES:
      common.log(f"[torch] {'compile' if compiled else 'eager'} {dtype} ...")
      s, row = torch_setting(device, dtype, compiled, steps)
      ratio = jax_steps[dtype]['images_per_s'] / s['images_per_s']
      rows.append(row + [f'{ratio:.2f}'])
  if device == 'cuda':
    torch.cuda.empty_cache()  # Gives its cached memory back for the loop.
  return rows


# -------------------------------------------------------- 3. the loop


def synthetic_data(train_size: int, test_size: int):
  """A CIFAR-sized `datasets.Dataset` of random uint8 images, 10 classes."""
  rng = np.random.default_rng(0)
  split = lambda n: datasets.Split(
      rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
      rng.integers(0, 10, n).astype(np.int32))
  return datasets.Dataset('synthetic', split(train_size), split(test_size),
                          tuple(f'class{i}' for i in range(10)))


def chunk_reference(found: dict, steps: int) -> float:
  """Images/s of the loop's own jitted chunk of steps, without the loop.

  The same compiled program, from the loop's final state on its training
  split on the device, waiting for each call: what the loop would reach if
  the host's work between calls cost nothing.
  """
  run, length = found['run'], found['length']
  state, metrics = found['state'], found['metrics']
  indices, = sharding.global_batch(run.mesh,
                                   run.batches.chunk(0, length, length))
  calls = max(2, -(-steps // length))  # Enough calls for `steps` steps.
  for i in range(calls + 1):  # The first call is a warm-up.
    if i == 1:
      start = time.perf_counter()
    state, metrics = found['fn'](state, metrics, *found['data'], indices,
                                 length)
    jax.block_until_ready(metrics)
  return calls * length * FLAGS.batch_size / (time.perf_counter() - start)


def full_loop(dtype: str, data, steps: int) -> dict:
  """Runs `train.train_and_evaluate` on `data` with the paper's protocol.

  `datasets.load` returns `data`; `steps.make_train_steps`,
  `steps.evaluate` and `train.evaluate_and_save` are wrapped (only during
  the run; `train`, and `kind.Single.train_steps` for the first, call them
  through their modules) to time each epoch's eval and end and to keep what
  `chunk_reference` needs.
  """
  config = config_lib.load(os.path.join(common.REPO, 'configs', 'paper.py:all_cnn_c'))
  config.width, config.dtype = FLAGS.width, dtype
  config.batch_size, config.num_epochs = FLAGS.batch_size, FLAGS.epochs
  config.steps_per_dispatch = FLAGS.steps_per_dispatch
  if FLAGS.preprocess == 'standardize':
    config.preprocess.gcn_zca, config.preprocess.standardize = False, True
  found, ends, evals = {}, [], [0.0] * FLAGS.epochs
  make_train_steps = steps_lib.make_train_steps
  evaluate, evaluate_and_save = steps_lib.evaluate, train.evaluate_and_save

  def capture(*args, length, **kwargs):
    jitted = make_train_steps(*args, length=length, **kwargs)
    found.update(fn=jitted, length=length)

    def train_steps(*call):
      found['data'] = call[2:4]  # The training split on the device.
      return jitted(*call)
    return train_steps

  def timed_evaluate(*args, **kwargs):
    start = time.perf_counter()
    result = evaluate(*args, **kwargs)  # Numpy arrays: the eval is done.
    evals[len(ends)] += time.perf_counter() - start
    return result

  def epoch_end(run, record, eval_step, state, *args):
    result = evaluate_and_save(run, record, eval_step, state, *args)
    ends.append(time.perf_counter())  # After the checkpoint, CSV and plots.
    # The last epoch's state and fresh metrics are never donated to a step.
    found.update(run=run, state=state, metrics=result[0])
    common.log(f'[loop] {dtype} epoch {len(ends)}/{FLAGS.epochs} done')
    return result

  workdir = tempfile.mkdtemp(prefix='allconv_accelerator_')
  try:
    with mock.patch.object(datasets, 'load', lambda _: data), \
        mock.patch.object(steps_lib, 'make_train_steps', capture), \
        mock.patch.object(steps_lib, 'evaluate', timed_evaluate), \
        mock.patch.object(train, 'evaluate_and_save', epoch_end), \
        contextlib.redirect_stdout(io.StringIO()):  # The model summary.
      begin = time.perf_counter()
      train.train_and_evaluate(config, workdir)
    rows = reporting.read_csv(os.path.join(workdir, 'metrics.csv'))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  common.log(f'[loop] {dtype} the jitted chunk alone ...')
  seconds = [r['seconds'] for r in rows[1:]]  # Training + eval, per epoch.
  return dict(
      steps_per_epoch=rows[0]['step'], length=found['length'],
      first_s=ends[0] - begin, seconds=seconds,
      train_s=[s - e for s, e in zip(seconds, evals[1:])],
      wall_s=[b - a for a, b in zip(ends, ends[1:])],
      chunk=chunk_reference(found, steps),
      test_accuracy=rows[-1]['test_accuracy'])


def loop_report(dtype: str, loop: dict, bare: float) -> tuple[list, str]:
  """Table rows (the bare step, the chunk, the loop) and the verdicts."""
  images = loop['steps_per_epoch'] * FLAGS.batch_size
  row = lambda what, s: [dtype, what, f'{s:.2f}', f'{images / s:.0f}',
                         f'{images / s / bare:.3f}']
  train_s, epoch = (statistics.mean(loop[k]) for k in ('train_s', 'wall_s'))
  rows = [
      row('bare step (table 1), waiting for each', images / bare),
      row(f"the loop's jitted chunk ({loop['length']} steps/call), alone",
          images / loop['chunk']),
      row('loop: training only', train_s),
      row('loop: training + test eval (metrics.csv seconds)',
          statistics.mean(loop['seconds'])),
      row('loop: wall (+ checkpoint, CSV, plot, TensorBoard)', epoch)]
  ratio = images / train_s / bare
  total = loop['first_s'] + (PAPER_EPOCHS - 1) * epoch
  return rows, (
      f"{'PASS' if ratio >= TARGET else 'FAIL'}: {dtype}, the loop's training "
      f'at x{ratio:.3f} of the bare step (target >= {TARGET} on a GPU)\n'
      f"projected time of the paper's {PAPER_EPOCHS} epochs, {dtype}: "
      f"{reporting.duration(total)} ({loop['first_s']:.1f} s for set-up, "
      f'preprocessing, compiling and epoch 1, then {PAPER_EPOCHS - 1} x '
      f"{epoch:.2f} s); test accuracy after {FLAGS.epochs} epochs "
      f"{loop['test_accuracy']:.3f} (random labels: chance)")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint.
  begin = time.perf_counter()
  platform = jax.default_backend()
  steps = FLAGS.steps or (10 if platform == 'cpu' else 100)
  print('## machine\n')  # XLA_FLAGS as the library has set them.
  print(common.machine())
  print(device_line())
  print(f'\nAll-CNN-C width {FLAGS.width}, batch {FLAGS.batch_size}, SGD + '
        'momentum 0.9, weight decay 0.001, dropout, no augmentation; '
        f'{steps} timed steps per setting, waiting for each')

  jax_steps, rows = library_steps(steps)
  print('\n## 1. library train step (common.LibrarySteps, '
        f"{jax_steps['float32']['params']:,} parameters)\n")
  print(common.table(['dtype', *HEADER], rows))

  print('\n## 2. PyTorch, same network, channels_last\n')
  device, note = torch_device(platform)
  if device is None:
    print(note)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    net = common.torch_all_cnn_c(FLAGS.width)
    params = sum(p.numel() for p in net.parameters())
    print(common.table(['setting', *HEADER, 'jax x'],
                       torch_rows(device, steps, jax_steps)))
    print(f'\ntorch {torch.__version__} on {device}, {params:,} parameters; '
          'eager SGD; torch.compile of the network (dynamic=False); bfloat16 '
          "= torch.autocast; compile s = the first step's time; jax x = the "
          "library step's images/s over this one")

  data = synthetic_data(FLAGS.train_size, FLAGS.test_size)
  rows, verdicts = [], []
  for dtype in FLAGS.dtype or ['float32' if platform == 'cpu' else 'bfloat16']:
    common.log(f'[loop] {dtype}: train_and_evaluate, {FLAGS.epochs} epochs ...')
    loop = full_loop(dtype, data, steps)
    more, verdict = loop_report(dtype, loop, jax_steps[dtype]['images_per_s'])
    rows, verdicts = rows + more, verdicts + [verdict]
  print("\n## 3. full loop: train_and_evaluate, configs/paper.py:all_cnn_c, "
        'preprocessing ' + ('GCN + ZCA (the paper)' if FLAGS.preprocess ==
                            'paper' else 'standardization (--preprocess='
                            'standardize, no GCN + ZCA)') + '\n')
  print(common.table(['dtype', 'measured', 's/epoch', 'img/s', 'x bare step'],
                     rows))
  print(f'\n{FLAGS.train_size:,} training and {FLAGS.test_size:,} test images '
        f"of random uint8, 10 classes; {loop['steps_per_epoch']} steps of "
        f"{FLAGS.batch_size} per epoch, {loop['length']} steps/dispatch; "
        f'epochs 2-{FLAGS.epochs} timed (means)')
  print('\n'.join(verdicts))
  print(f'\ntotal {time.perf_counter() - begin:.0f} s')


if __name__ == '__main__':
  app.run(main)
