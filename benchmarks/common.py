"""Helpers shared by the benchmark scripts.

* `machine`: what the figures were measured on (CPU, cores, load, versions).
* `stats`: median / best / mean of a list of step times.
* `table`: a Markdown table, readable in a terminal and pasteable in a README.
* `Worker` and `serve`: run part of a benchmark in a subprocess of the same
  script. XLA and PyTorch read their flags and size their thread pools once
  per process, so every setting compared gets a fresh process; the parent
  keeps the workers alive and sends them JSON commands, so that it can time
  them alternately while the compiled functions stay in memory.

* `LibrarySteps`: the library's train and eval steps on random data;
  `all_cnn_c_convs`, the shapes of their convolutions, and `conv_flops`,
  the FLOPs they compute.

Only these import JAX, when called (in a worker):
the parent process of a benchmark stays light and starts no thread pool of
its own.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Instruction-set extensions that decide how fast convolutions can run.
_ISA = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16')


def log(msg: str) -> None:
  """Progress to stderr, so that stdout holds only the results."""
  print(msg, file=sys.stderr, flush=True)


def cores() -> int:
  """CPU cores this process may run on."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def cpu_model() -> str:
  """The CPU's model name and its relevant ISA extensions."""
  model, flags = 'unknown', set()
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
    found = re.search(r'^model name\s*:\s*(.*)$', info, re.M)
    model = found.group(1).strip() if found else model
    found = re.search(r'^flags\s*:\s*(.*)$', info, re.M)
    flags = set(found.group(1).split()) if found else flags
  except OSError:
    model = platform.processor() or model
  try:  # lscpu knows the model where /proc/cpuinfo does not (e.g. on ARM).
    out = subprocess.run(['lscpu'], capture_output=True, text=True,
                         check=True).stdout
    found = re.search(r'^Model name:\s*(.*)$', out, re.M)
    if model == 'unknown' and found:
      model = found.group(1).strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  isa = [f for f in _ISA if f in flags]
  return f"{model} [{' '.join(isa)}]" if isa else model


def loadavg() -> str:
  """The 1, 5 and 15 minute load averages."""
  try:
    return ' '.join(f'{load:.2f}' for load in os.getloadavg())
  except OSError:
    return 'n/a'


def cpu_in_use(seconds: float = 1.0) -> float | None:
  """Share of all cores busy during the next `seconds`, whatever the process.

  Unlike the load average, which trails the last minutes (a benchmark run
  right after another sees the first one's load), this is the present.
  """
  def sample():
    with open('/proc/stat') as f:
      ticks = [int(x) for x in f.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all.
  try:
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
  except (OSError, ValueError, IndexError):
    return None
  return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def busy() -> bool:
  """Whether other work is using the CPU (over 20% of the cores, now)."""
  in_use = cpu_in_use()
  return in_use is not None and in_use > 0.2


def version(package: str) -> str | None:
  """The installed version of `package`, without importing it."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine(packages=('jax', 'jaxlib', 'flax', 'torch')) -> str:
  """A few lines saying where and when a benchmark ran."""
  versions = ', '.join(f'{p} {version(p)}' for p in packages if version(p))
  now = datetime.datetime.now(datetime.timezone.utc)
  return '\n'.join([
      f'date: {now:%Y-%m-%d %H:%M} UTC',
      f'cpu: {cpu_model()}, {cores()} cores usable '
      f'(of {os.cpu_count()}), load average {loadavg()}, '
      f'{_percent(cpu_in_use())} of the cores in use before the start',
      f'python {platform.python_version()}, {versions}',
      f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
  ])


def _percent(share: float | None) -> str:
  return 'n/a' if share is None else f'{100 * share:.0f}%'


def stats(times, batch_size: int) -> dict:
  """Summary of step times (seconds) for steps of `batch_size` images.

  ``images_per_s`` comes from the median step, ``best_images_per_s`` from the
  fastest and ``mean_images_per_s`` from the total time (the figure to
  compare with a loop timed as a whole).
  """
  times = list(times)
  median = statistics.median(times)
  return dict(steps=len(times), median_s=median, min_s=min(times),
              max_s=max(times), images_per_s=batch_size / median,
              best_images_per_s=batch_size / min(times),
              mean_images_per_s=batch_size * len(times) / sum(times))


def table(header, rows) -> str:
  """A Markdown table; columns of figures are right-aligned."""
  rows = [[str(c) for c in row] for row in rows]
  header = [str(h) for h in header]
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  # A column is figures if every cell starts like one: 12.5, -3, x1.02, 45%.
  right = [bool(rows) and all(re.match(r'[-+x]?[0-9]', r[i]) for r in rows)
           for i in range(len(header))]

  def line(cells):
    return '| ' + ' | '.join(c.rjust(w) if r else c.ljust(w)
                             for c, w, r in zip(cells, widths, right)) + ' |'

  rule = '|' + '|'.join('-' * (w + 1) + ':' if r else ':' + '-' * (w + 1)
                        for w, r in zip(widths, right)) + '|'
  return '\n'.join([line(header), rule, *(line(r) for r in rows)])


# ------------------------------------------------------------ workers

_TAG = '@@worker '  # Marks protocol lines among whatever else is printed.


class Worker:
  """A benchmark script running `serve` in a subprocess.

  Its stderr (progress, warnings) goes to this process's stderr; its stdout
  carries one tagged JSON line per answer (other lines, e.g. a model summary
  the library prints, are skipped).

  Args:
    script: the script to run (usually ``__file__`` of the caller).
    args: its command-line arguments, e.g. ``['--worker=jax']``.
    env: changes to this process's environment for the worker
      (a value of None removes the variable).
  """

  def __init__(self, script: str, args=(), env: dict | None = None):
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    for key, value in (env or {}).items():
      if value is None:
        full_env.pop(key, None)
      else:
        full_env[key] = value
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(script), *args], cwd=REPO,
        env=full_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)

  def call(self, op: str, **kwargs) -> Any:
    """Runs ``op(**kwargs)`` in the worker and returns its JSON result.

    Raises:
      RuntimeError: the operation failed (with the worker's traceback) or
        the worker died.
    """
    self.proc.stdin.write(json.dumps(dict(op=op, kwargs=kwargs)) + '\n')
    self.proc.stdin.flush()
    for line in self.proc.stdout:
      if line.startswith(_TAG):
        answer = json.loads(line[len(_TAG):])
        if 'error' in answer:
          raise RuntimeError(answer['error'])
        return answer['result']
    raise RuntimeError(f'worker exited with status {self.proc.wait()} '
                       f'during {op!r} (see its messages above)')

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()

  def __enter__(self) -> 'Worker':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def serve(ops: dict[str, Callable[..., Any]]) -> None:
  """The worker's side: answers `Worker.call` requests until stdin closes.

  Args:
    ops: the operations the parent may call, by name; each returns
      something JSON can encode.
  """
  for line in sys.stdin:
    request = json.loads(line)
    try:
      answer = dict(result=ops[request['op']](**request['kwargs']))
    except Exception:  # pylint: disable=broad-except
      answer = dict(error=traceback.format_exc())
    print(_TAG + json.dumps(answer), flush=True)


# ------------------------------------------------- the library's steps


def all_cnn_c_convs(width: float = 1.0) -> list[tuple]:
  """All-CNN-C's convolutions, in order: (name, input size, input channels,
  output size, `models.Conv`), for 32x32 RGB images."""
  from allconv_jax import models  # pylint: disable=g-import-not-at-top
  specs = [layer for layer in models.architecture('all_cnn_c', 10, width)
           if isinstance(layer, models.Conv)]
  size, channels, convs = 32, 3, []
  for layer in specs:
    out = size - (layer.kernel - 1 if layer.padding == 'VALID' else 0)
    out = math.ceil(out / layer.stride)
    convs.append((layer.name, size, channels, out, layer))
    size, channels = out, layer.features
  return convs


def conv_flops(width: float = 1.0) -> tuple[float, float]:
  """FLOPs per image of All-CNN-C's convolutions: (forward, train step).

  A multiply-add counts 2. The train step is the forward pass, the gradient
  with respect to each layer's input (not the first layer's: the images need
  none) and to each kernel; each costs what the forward convolution costs.
  Biases, ReLUs, dropout, the loss and the optimizer are left out (well
  under 1%). Taps on the zero padding count, as FLOP counts usually do
  (XLA's cost analysis skips them and finds about 6% less).
  """
  forward = input_grads = 0.0
  for _, _, channels, size, layer in all_cnn_c_convs(width):
    flops = 2 * size * size * layer.features * channels * layer.kernel ** 2
    if forward:  # Not the first layer.
      input_grads += flops
    forward += flops
  return forward, 2 * forward + input_grads  # + kernel gradients.


class LibrarySteps:
  """The library's All-CNN-C train and eval steps, ready to be timed.

  `steps.make_train_steps` (one step per call, ``length=1``) and
  `steps.make_eval_step` with the training settings of ``configs/default.py``
  (the paper's All-CNN-C, SGD + momentum 0.9, weight decay 0.001, dropout),
  on one random batch already on the device, so that only the step itself is
  timed. The train step takes its batch as the training loop does: the
  images resident on the device (`steps.resident`) and the batch's indices
  into them, here all of them in order. Cases are named ``'train b128'``,
  ``'eval b500'`` and so on.

  Args:
    dtype: compute dtype, ``'float32'`` or ``'bfloat16'``.
    conv_impl: ``config.conv_impl`` (``'auto'`` is the library's default).
    width: width multiplier (1.0 is the paper's network).
    augment: the default config's translate + flip inside the train step;
      False leaves only the network's work.
  """

  def __init__(self, dtype: str = 'float32', conv_impl: str = 'auto',
               width: float = 1.0, augment: bool = True):
    # pylint: disable=g-import-not-at-top
    import jax
    from allconv_jax import input_pipeline, optimizers, sharding, steps, trained
    from allconv_jax import config as config_lib
    # pylint: enable=g-import-not-at-top
    config = config_lib.defaults()
    config.dtype, config.conv_impl, config.width = dtype, conv_impl, width
    self._jax, self._steps, self._sharding = jax, steps, sharding
    self.mesh = sharding.make_mesh()
    # CIFAR-10's steps per epoch, for the learning-rate schedule.
    self.tx, _ = optimizers.make_optimizer(config, 50000 // config.batch_size)
    model = trained.create_model(config, 10, bn_axis_name=sharding.AXIS)
    self.state = steps.init_states(model, self.tx, [config.seed], self.mesh)[0]
    self.metrics = self._empty_metrics()
    self.train_step = steps.make_train_steps(
        model, self.tx, self.mesh, seed=config.seed, length=1,
        max_shift=(input_pipeline.max_shift_pixels(config.augment.translate)
                   if augment else 0),
        flip=config.augment.flip and augment)
    self.eval_step = steps.make_eval_step(trained.create_model(config, 10),
                                          self.mesh)
    self.num_params = sum(x.size for x in jax.tree.leaves(self.state.params))
    self._compiled = {}

  def _empty_metrics(self):
    return self._jax.device_put(self._steps.TrainMetrics.empty(),
                                self._sharding.replicated(self.mesh))

  def _batch(self, batch_size: int) -> tuple:
    """A random batch: images, labels and mask (all ones), on the host."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(batch_size)
    return (rng.standard_normal((batch_size, 32, 32, 3), np.float32),
            rng.integers(0, 10, batch_size).astype(np.int32),
            np.ones(batch_size, np.float32))

  def prepare(self, case: str) -> dict:
    """Compiles a case and runs it once; returns the seconds both took."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    kind, batch_size = case.split(' b')
    batch_size = int(batch_size)
    images, labels, mask = self._batch(batch_size)
    if kind == 'train':
      # One step (count 1) on the whole batch: indices 0..batch_size-1.
      local = np.arange(batch_size, dtype=np.int32)[
          self._sharding.local_slice(batch_size), None]
      indices, = self._sharding.global_batch(self.mesh, local)
      step, data = self.train_step, (
          *self._steps.resident(self.mesh, images, labels), indices, 1)
      args = (self.state, self.metrics)
    else:
      step, data = self.eval_step, tuple(self._sharding.global_batch(
          self.mesh, images, labels, mask))
      args = (self.state.variables(),)
    start = time.perf_counter()
    compiled = step.lower(*args, *data).compile()
    compiled_at = time.perf_counter()
    self._compiled[case] = (compiled, data)
    self.run(case, 1)
    return dict(compile_s=compiled_at - start,
                first_call_s=time.perf_counter() - compiled_at)

  def run(self, case: str, n: int) -> list[float]:
    """Times `n` calls of a prepared case, waiting for each to finish."""
    compiled, data = self._compiled[case]
    times = []
    for _ in range(n):
      start = time.perf_counter()
      if case.startswith('train'):
        # The state and metrics are donated: carry them on.
        self.state, self.metrics = compiled(self.state, self.metrics, *data)
        self._jax.block_until_ready(self.metrics)
      else:
        self._jax.block_until_ready(compiled(self.state.variables(), *data))
      times.append(time.perf_counter() - start)
    return times

  def train_loss(self) -> float:
    """Mean loss of the train steps so far (NaN would mean a broken step)."""
    return float(self.metrics.compute()['loss'])


def torch_all_cnn_c(width: float = 1.0, num_classes: int = 10):
  """All-CNN-C in plain PyTorch: the layers of `allconv_jax.models`, every
  3x3 conv padded by one pixel, stride 2 included (Caffe's padding)."""
  from torch import nn  # pylint: disable=g-import-not-at-top
  c1, c2 = round(96 * width), round(192 * width)

  def conv(cin, cout, kernel, stride=1, padding=1):
    return [nn.Conv2d(cin, cout, kernel, stride, padding), nn.ReLU()]

  return nn.Sequential(
      nn.Dropout(0.2),
      *conv(3, c1, 3), *conv(c1, c1, 3), *conv(c1, c1, 3, stride=2),
      nn.Dropout(0.5),
      *conv(c1, c2, 3), *conv(c2, c2, 3), *conv(c2, c2, 3, stride=2),
      nn.Dropout(0.5),
      *conv(c2, c2, 3, padding=0), *conv(c2, c2, 1, padding=0),
      *conv(c2, num_classes, 1, padding=0),  # ReLU on the class layer too.
      nn.AdaptiveAvgPool2d(1), nn.Flatten())
