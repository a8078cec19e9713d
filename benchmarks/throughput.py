"""Throughput of All-CNN-C (full width, batch 128): bare steps vs. the full loop.

  python benchmarks/throughput.py              # everything, ~4-6 min on 2 idle cores
  python benchmarks/throughput.py --quick      # fewer steps, epochs and cases
  python benchmarks/throughput.py --noxla_ynn  # skip the XLA-flag comparison

Prints the machine, then

1. images/s of the bare jitted train step (`train.make_train_step` on random
   data already on the device, after warm-up, `block_until_ready` after
   every step), float32 and bfloat16, with the step's lower/compile time;
2. images/s of the eval step (`train.make_eval_step`), float32 and bfloat16,
   at batch 128 and at the config's eval batch size (500);
   with ``--xla_ynn`` (default) 1 and 2 run in two worker processes, one
   started with ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
   (XLA reads it when JAX initializes, hence a process of its own), timed
   alternately in rounds so that load changes hit both alike, and the
   flag's speed-up per case;
3. images/s of the full loop `train.train_and_evaluate` (host data,
   augmentation, metrics, per-epoch eval, checkpoints, CSV, curves,
   TensorBoard) on the digits data with the paper's training settings of
   ``configs/default.py`` (SGD + momentum, weight decay, translate + flip,
   batch 128, float32), timed over epochs 2.. (epoch 1 compiles), with and
   without the per-epoch eval, as a ratio to the bare step of the very same
   jitted function, timed in the same process right after each of those
   epochs' eval (so both see the same machine load);

and a summary table. Nothing runs in this process: workers are this script
with ``--worker=bare`` (commands on stdin) or ``--worker=full`` (JSON file).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # For `from configs import ...`.

YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
_YNN_RE = re.compile(r'--xla_cpu_experimental_ynn_fusion_type=\S*')
TARGET = 0.95  # The full loop must reach 95% of the bare step's images/s.

FLAGS = flags.FLAGS
flags.DEFINE_bool('quick', False, 'Fewer steps, reps and epochs, eval at '
                  'batch 500 only.')
flags.DEFINE_bool('xla_ynn', True,
                  f'Also measure the bare steps with XLA_FLAGS+={YNN_FLAG}.')
flags.DEFINE_bool('full_loop', True, 'Measure the full training loop.')
flags.DEFINE_bool('full_loop_ynn', False,
                  'Also measure the full loop with the XLA flag (~+2 min).')
flags.DEFINE_bool('eval', True, 'Measure the eval step.')
flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes.')
flags.DEFINE_integer('batch_size', 128, 'Train batch size.')
flags.DEFINE_list('eval_batch_sizes', ['128', '500'], 'Eval batch sizes.')
flags.DEFINE_integer('train_steps', None,
                     'Timed train steps per dtype and per bare reference '
                     'block of the full loop (default 6, --quick 4).')
flags.DEFINE_integer('eval_reps', None,
                     'Timed eval steps per case (default 3, --quick 2).')
flags.DEFINE_integer('epochs', None,
                     'Epochs of the full loop; the first is not timed '
                     '(default 3, --quick 2).')
flags.DEFINE_float('width', 1.0, 'Width multiplier (1.0 = the paper; smaller '
                   'only to smoke-test this script).')
flags.DEFINE_string('worker', None, 'Internal: run one measurement '
                    '(bare or full) in this process and write JSON.')
flags.DEFINE_string('json_out', None, 'Internal: where the worker writes.')


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------ worker side


def _base_config(dtype: str = 'float32'):
  """The paper's All-CNN-C settings (configs/default.py), 10 classes."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.width = FLAGS.width
  config.dtype = dtype
  config.batch_size = FLAGS.batch_size
  return config


def _random_batch(mesh, batch_size: int, num_classes: int = 10, seed: int = 0):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from allconv_jax import sharding  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, 32, 32, 3), np.float32)
  labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
  mask = np.ones(batch_size, np.float32)
  return sharding.global_batch(mesh, images, labels, mask)


def _time_train(train_step, state, train_metrics, images, labels, steps: int,
                warmup: int = 2):
  """Times `steps` calls of a (compiled) train step, blocking after each."""
  import jax  # pylint: disable=g-import-not-at-top
  for _ in range(warmup):
    state, train_metrics = train_step(state, train_metrics, images, labels)
  jax.block_until_ready((state, train_metrics))
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, train_metrics = train_step(state, train_metrics, images, labels)
    jax.block_until_ready((state, train_metrics))
    times.append(time.perf_counter() - t)
  return times, state, train_metrics


def _stats(times, batch_size):
  import numpy as np  # pylint: disable=g-import-not-at-top
  t = np.asarray(times)
  return dict(batch_size=batch_size, steps=len(t),
              mean_s=float(t.mean()), median_s=float(np.median(t)),
              min_s=float(t.min()), max_s=float(t.max()),
              images_per_s=batch_size * len(t) / float(t.sum()))


class _BareBench:
  """Section 1 and 2: the library's train and eval steps on random data
  already on the device, compiled once per case and timed in blocks on
  request (`setup`, then `run` any number of times, then `release`)."""

  def __init__(self):
    self.cases = {}

  def setup(self, kind: str, dtype: str, batch_size: int) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    from allconv_jax import input_pipeline, sharding, train  # pylint: disable=g-import-not-at-top
    config = _base_config(dtype)
    config.batch_size = batch_size
    mesh = sharding.make_mesh()
    # CIFAR-10's steps per epoch, for the learning-rate schedule.
    tx, _ = train.make_optimizer(config, 50000 // config.batch_size)
    model = train.create_model(config, 10, bn_axis_name=sharding.AXIS)
    state = train.init_state(model, tx, config.seed, mesh)
    images, labels, mask = _random_batch(mesh, batch_size)
    if kind == 'train':
      metrics = jax.device_put(train.TrainMetrics.empty(),
                               sharding.replicated(mesh))
      step = train.make_train_step(
          model, tx, mesh, seed=config.seed,
          max_shift=input_pipeline.max_shift_pixels(config.augment.translate),
          flip=config.augment.flip)
      args = [state, metrics, images, labels]
    else:
      step = train.make_eval_step(train.create_model(config, 10), mesh)
      args = [state, images, labels, mask]
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    # First call of the executable (buffer allocation, thread-pool start).
    out = compiled(*args)
    jax.block_until_ready(out)
    t3 = time.perf_counter()
    if kind == 'train':
      args[:2] = out
    jax.block_until_ready(self._call(kind, compiled, args))  # Warm-up.
    self.cases[(kind, dtype, batch_size)] = (compiled, args)
    return dict(lower_s=t1 - t0, compile_s=t2 - t1, first_call_s=t3 - t2)

  @staticmethod
  def _call(kind, compiled, args):
    out = compiled(*args)
    if kind == 'train':  # The state and metrics were donated.
      args[:2] = out
    return out

  def run(self, kind: str, dtype: str, batch_size: int, n: int) -> dict:
    import jax  # pylint: disable=g-import-not-at-top
    compiled, args = self.cases[(kind, dtype, batch_size)]
    times = []
    for _ in range(n):
      t = time.perf_counter()
      jax.block_until_ready(self._call(kind, compiled, args))
      times.append(time.perf_counter() - t)
    return dict(times=times)

  def release(self, kind: str, dtype: str, batch_size: int) -> dict:
    compiled, args = self.cases.pop((kind, dtype, batch_size))
    finite = True
    if kind == 'train':
      loss = float(args[1].compute()['loss'])
      finite = loss == loss and abs(loss) != float('inf')
    del compiled, args
    return dict(finite_loss=finite)


def _serve() -> None:
  """The bare-step worker: one JSON command per stdin line, one answer line."""
  import traceback  # pylint: disable=g-import-not-at-top
  bench = _BareBench()
  print('READY ' + json.dumps(_machine_jax()), flush=True)
  for line in sys.stdin:
    cmd = json.loads(line)
    if cmd['op'] == 'quit':
      break
    try:
      out = getattr(bench, cmd['op'])(**cmd['args'])
    except Exception:  # pylint: disable=broad-except
      print('ERROR ' + json.dumps(traceback.format_exc()), flush=True)
      continue
    print('RESULT ' + json.dumps(out), flush=True)


class _Probe:
  """Wraps library functions (in this process only) to time the full loop."""

  def __init__(self, after_eval=None):
    self.events = []  # (name, t_start, t_end)
    self.index_calls = []  # (step, t) of every TrainBatches.indices call
    self.captured = {}
    self.after_eval = after_eval  # Called as after_eval(probe, epoch).
    self._undo = []

  def _patch(self, owner, name, wrapper_factory):
    original = getattr(owner, name)
    setattr(owner, name, wrapper_factory(original))
    self._undo.append((owner, name, original))

  def _timed(self, label):
    def factory(fn):
      def wrapped(*args, **kwargs):
        t = time.perf_counter()
        try:
          return fn(*args, **kwargs)
        finally:
          self.events.append((label, t, time.perf_counter()))
      return wrapped
    return factory

  def install(self):
    from allconv_jax import checkpoints, input_pipeline, reporting, train  # pylint: disable=g-import-not-at-top
    probe = self

    def indices_factory(fn):
      def wrapped(batches, step):
        probe.index_calls.append((step, time.perf_counter()))
        return fn(batches, step)
      return wrapped

    def make_train_step_factory(fn):
      def wrapped(model, tx, mesh, **kwargs):
        step_fn = fn(model, tx, mesh, **kwargs)
        probe.captured.update(model=model, tx=tx, mesh=mesh, kwargs=kwargs,
                              train_step=step_fn)

        def timed_step(*args):
          t = time.perf_counter()
          out = step_fn(*args)
          probe.events.append(('train_step_call', t, time.perf_counter()))
          return out
        return timed_step
      return wrapped

    self._patch(input_pipeline.TrainBatches, 'indices', indices_factory)
    self._patch(train, 'make_train_step', make_train_step_factory)

    def evaluate_factory(fn):
      def wrapped(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)  # Ends in float(): the eval is done.
        probe.events.append(('eval', t, time.perf_counter()))
        if probe.after_eval:
          epoch = sum(1 for e in probe.events if e[0] == 'eval')
          t = time.perf_counter()
          probe.after_eval(probe, epoch)
          probe.events.append(('reference', t, time.perf_counter()))
        return out
      return wrapped

    self._patch(train, 'evaluate', evaluate_factory)
    self._patch(checkpoints.Checkpoints, 'save', self._timed('checkpoint_save'))
    self._patch(checkpoints.Checkpoints, 'wait', self._timed('checkpoint_wait'))
    self._patch(reporting, 'write_csv', self._timed('write_csv'))
    self._patch(reporting, 'plot_curves', self._timed('plot_curves'))

  def uninstall(self):
    for owner, name, original in reversed(self._undo):
      setattr(owner, name, original)


def _full_loop(epochs: int, ref_steps: int) -> dict:
  """Section 3: `train.train_and_evaluate` on digits, timed from outside.

  After the eval of every epoch but the first, the same jitted train step is
  timed bare (`ref_steps` steps on random on-device data, separate state)
  right there, so that each epoch is compared with a reference measured
  under the same machine load; that time is left out of the epoch's
  bookkeeping.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from allconv_jax import input_pipeline, reporting, sharding, train  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  config = _base_config('float32')
  config.dataset.name = 'digits'
  config.num_epochs = epochs
  workdir = tempfile.mkdtemp(prefix='allconv_bench_')
  ref = {'times': {}}

  def reference(probe, epoch):
    if epoch < 2:
      return
    cap = probe.captured
    if 'state' not in ref:
      ref['state'] = train.init_state(cap['model'], cap['tx'], config.seed,
                                      cap['mesh'])
      ref['metrics'] = jax.device_put(train.TrainMetrics.empty(),
                                      sharding.replicated(cap['mesh']))
      ref['batch'] = _random_batch(cap['mesh'], config.batch_size)[:2]
    times, ref['state'], ref['metrics'] = _time_train(
        cap['train_step'], ref['state'], ref['metrics'], *ref['batch'],
        ref_steps, warmup=1)
    ref['times'][epoch] = times

  probe = _Probe(after_eval=reference)
  probe.install()
  try:
    t_start = time.perf_counter()
    summary = train.train_and_evaluate(config, workdir)
    t_end = time.perf_counter()
  finally:
    probe.uninstall()
  rows = reporting.read_csv(os.path.join(workdir, 'metrics.csv'))
  files = sorted(os.listdir(workdir))
  steps_per_epoch = rows[0]['step'] if rows else 0
  batch_size = config.batch_size

  # Epoch k starts at the first TrainBatches.indices call of its steps and its
  # training ends where its eval starts; everything between that eval's end
  # and the next epoch's first batch is per-epoch bookkeeping.
  epoch_start = {}
  for step, t in probe.index_calls:
    epoch_start.setdefault(step // steps_per_epoch + 1, t)
  evals = [(t0, t1) for name, t0, t1 in probe.events if name == 'eval']
  per_epoch = []
  for k in range(1, len(evals) + 1):
    t_train0 = epoch_start[k]
    t_eval0, t_eval1 = evals[k - 1]
    t_next = epoch_start.get(k + 1)
    if t_next is None:  # Last epoch: up to the end of its bookkeeping.
      t_next = max(end for name, _, end in probe.events
                   if end >= t_eval1 and name != 'checkpoint_wait')
    parts = {}
    for name, t0, t1 in probe.events:
      if t_eval1 <= t0 and t1 <= t_next and name != 'train_step_call':
        parts[name] = parts.get(name, 0.0) + (t1 - t0)
    ref_s = parts.pop('reference', 0.0)
    other = (t_next - t_eval1) - ref_s - sum(parts.values())
    ref_times = ref['times'].get(k)
    ref_ips = (batch_size * len(ref_times) / sum(ref_times)
               if ref_times else None)
    in_calls = sum(t1 - t0 for name, t0, t1 in probe.events
                   if name == 'train_step_call' and t_train0 <= t0 < t_eval0)
    per_epoch.append(dict(
        epoch=k, train_s=t_eval0 - t_train0, eval_s=t_eval1 - t_eval0,
        in_step_calls_s=in_calls, reference_images_per_s=ref_ips,
        train_images_per_s=steps_per_epoch * batch_size / (t_eval0 - t_train0),
        bookkeeping_s=t_next - t_eval1 - ref_s, other_s=other,
        # metrics.csv measures up to the end of the eval, which here
        # includes the reference block: taken out again.
        csv_seconds=rows[k - 1]['seconds'] - ref_s if k <= len(rows) else None,
        **{f'{n}_s': v for n, v in parts.items()}))
  steady = per_epoch[1:] if len(per_epoch) > 1 else per_epoch
  images = steps_per_epoch * batch_size * len(steady)
  train_s = sum(e['train_s'] for e in steady)
  eval_s = sum(e['eval_s'] for e in steady)
  book_s = sum(e['bookkeeping_s'] for e in steady)
  full = dict(
      epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
      steady_epochs=[e['epoch'] for e in steady],
      images_per_s_train_only=images / train_s,
      images_per_s_no_eval=images / (train_s + book_s),
      images_per_s_all=images / (train_s + eval_s + book_s),
      images_per_s_csv_seconds=images / sum(e['csv_seconds'] for e in steady),
      first_epoch_s=per_epoch[0]['train_s'],
      setup_s=epoch_start[1] - t_start, total_s=t_end - t_start,
      per_epoch=per_epoch, workdir_files=files, summary=summary,
      test_images=450, eval_batch_size=config.eval_batch_size)

  # Reference: the very same jitted train step (no recompilation: same
  # shapes and shardings) on random on-device data, timed after each steady
  # epoch's eval.
  all_times = [t for e in full['steady_epochs'] for t in ref['times'].get(e, [])]
  full['reference_bare'] = _stats(all_times, batch_size)
  cap = probe.captured
  state, train_metrics = ref['state'], ref['metrics']
  # Diagnostic between the two: the same step fed as the loop feeds it (a
  # fresh host batch through `sharding.global_batch` every step, no blocking
  # until the end), without eval, checkpoints or any other bookkeeping.
  rng = np.random.default_rng(0)
  host_images = rng.standard_normal((1347, 32, 32, 3), np.float32)
  host_labels = rng.integers(0, 10, 1347).astype(np.int32)
  batches = input_pipeline.TrainBatches(1347, batch_size, config.seed)
  jax.block_until_ready((state, train_metrics))
  t = time.perf_counter()
  for step in range(ref_steps):
    idx = batches.indices(step)
    b = sharding.global_batch(cap['mesh'], host_images[idx], host_labels[idx])
    state, train_metrics = cap['train_step'](state, train_metrics, *b)
  float(train_metrics.compute()['loss'])
  full['loop_pattern'] = dict(
      steps=ref_steps,
      images_per_s=ref_steps * batch_size / (time.perf_counter() - t))
  for key in ('images_per_s_train_only', 'images_per_s_no_eval',
              'images_per_s_all', 'images_per_s_csv_seconds'):
    full[key.replace('images_per_s', 'ratio')] = (
        full[key] / full['reference_bare']['images_per_s'])
  shutil.rmtree(workdir, ignore_errors=True)
  return full


def _machine_jax() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return dict(jax=jax.__version__, jaxlib=jaxlib.__version__,
              backend=jax.default_backend(), devices=len(devices),
              device_kind=devices[0].device_kind,
              xla_flags=os.environ.get('XLA_FLAGS', ''))


def _budget():
  """(train steps, eval reps, epochs) of this run."""
  quick = FLAGS.quick
  steps = FLAGS.train_steps or (4 if quick else 6)
  reps = FLAGS.eval_reps or (2 if quick else 3)
  epochs = max(2, FLAGS.epochs or (2 if quick else 3))  # Epoch 1 compiles.
  return steps, reps, epochs


def run_worker(kind: str) -> None:
  # Importing the library first: if it ever sets XLA flags on import, the
  # reported flags are the effective ones.
  from allconv_jax import train  # pylint: disable=g-import-not-at-top,unused-import
  if kind == 'bare':
    _serve()
    return
  if kind != 'full':
    raise ValueError(kind)
  steps, _, epochs = _budget()
  result = dict(kind=kind, machine=_machine_jax())
  _log(f'    train_and_evaluate, {epochs} epochs of digits ...')
  result['full'] = _full_loop(epochs, steps)
  with open(FLAGS.json_out, 'w') as f:
    json.dump(result, f)


# ------------------------------------------------------- orchestrator side


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
  except OSError:
    return platform.processor() or 'unknown'
  model = re.search(r'^model name\s*:\s*(.*)$', info, re.M)
  flags_line = re.search(r'^flags\s*:\s*(.*)$', info, re.M)
  isa = []
  if flags_line:
    have = set(flags_line.group(1).split())
    isa = [f for f in ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni',
                       'amx_bf16') if f in have]
  return f"{model.group(1) if model else 'unknown'} [{' '.join(isa)}]"


def _loadavg() -> str:
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return 'n/a'


def _env(ynn: bool) -> dict:
  env = dict(os.environ)
  base = _YNN_RE.sub('', env.get('XLA_FLAGS', '')).strip()
  env['XLA_FLAGS'] = f'{base} {YNN_FLAG}'.strip() if ynn else base
  if not env['XLA_FLAGS']:
    env.pop('XLA_FLAGS')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  return env


def _spawn(kind: str, ynn: bool, passthrough) -> dict:
  """Runs one worker in a fresh process; returns its JSON (or an error)."""
  fd, out = tempfile.mkstemp(suffix='.json', prefix='allconv_bench_')
  os.close(fd)
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={kind}',
         f'--json_out={out}', *passthrough]
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, env=_env(ynn), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
  wall = time.perf_counter() - t
  for line in proc.stderr.splitlines():  # Our progress lines only.
    if line.startswith('    '):
      _log(line)
  try:
    with open(out) as f:
      result = json.load(f)
  except (OSError, ValueError):
    tail = '\n'.join(proc.stderr.splitlines()[-25:])
    result = dict(error=f'worker {kind} (ynn={ynn}) failed with exit code '
                  f'{proc.returncode}:\n{tail}')
  finally:
    os.remove(out)
  result['wall_s'] = wall
  return result


class _Worker:
  """A running bare-step worker (`--worker=bare`) and its command pipe."""

  def __init__(self, ynn: bool, passthrough):
    self.ynn = ynn
    self._stderr = tempfile.TemporaryFile(mode='w+')
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--worker=bare',
         *passthrough], cwd=REPO, env=_env(ynn), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self._stderr, text=True)
    self.machine = self._read('READY')

  def _read(self, tag: str):
    for line in self.proc.stdout:
      if line.startswith(tag + ' '):
        return json.loads(line[len(tag) + 1:])
      if line.startswith('ERROR '):
        raise RuntimeError(json.loads(line[6:]))
    self._stderr.seek(0)
    tail = '\n'.join(self._stderr.read().splitlines()[-25:])
    raise RuntimeError(f'worker (ynn={self.ynn}) exited with code '
                       f'{self.proc.wait()}:\n{tail}')

  def call(self, op: str, **args):
    self.proc.stdin.write(json.dumps(dict(op=op, args=args)) + '\n')
    self.proc.stdin.flush()
    return self._read('RESULT')

  def close(self):
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps(dict(op='quit')) + '\n')
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()
    self._stderr.close()


def _bare_section(workers: dict) -> dict:
  """Times every case in every worker, alternating the workers in rounds.

  With two workers (XLA default and the flag), each case is compiled in
  both, then timed in rounds A, B, B, A, A, ... so that a change of machine
  load hits both alike.
  """
  steps, reps, _ = _budget()
  eval_sizes = [int(b) for b in FLAGS.eval_batch_sizes]
  if FLAGS.quick and not FLAGS['eval_batch_sizes'].present:
    eval_sizes = [500]
  cases = [('train', d, FLAGS.batch_size) for d in FLAGS.dtypes]
  if FLAGS.eval:
    cases += [('eval', d, b) for d in FLAGS.dtypes for b in eval_sizes]
  results = {name: dict(train=[], eval=[]) for name in workers}
  for kind, dtype, batch_size in cases:
    _log(f'    {kind} step {dtype} batch {batch_size} ...')
    case = dict(kind=kind, dtype=dtype, batch_size=batch_size)
    setups = {name: w.call('setup', **case) for name, w in workers.items()}
    n = steps if kind == 'train' else reps
    rounds = min(n, 3) if len(workers) > 1 else 1
    chunks = [n // rounds + (r < n % rounds) for r in range(rounds)]
    times = {name: [] for name in workers}
    per_round = {name: [] for name in workers}
    order = list(workers)
    for chunk in chunks:
      for name in order:
        t = workers[name].call('run', n=chunk, **case)['times']
        times[name] += t
        per_round[name].append(batch_size * len(t) / sum(t))
      order.reverse()
    for name, w in workers.items():
      out = _stats(times[name], batch_size)
      out.update(setups[name], dtype=dtype, round_images_per_s=per_round[name],
                 load=_loadavg().split()[0], **w.call('release', **case))
      results[name][kind].append(out)
  return results


def _row(cells, widths):
  return '  '.join(str(c).rjust(w) if i else str(c).ljust(w)
                   for i, (c, w) in enumerate(zip(cells, widths)))


def _table(header, rows):
  widths = [max(len(str(r[i])) for r in [header, *rows])
            for i in range(len(header))]
  lines = [_row(header, widths), _row(['-' * w for w in widths], widths)]
  lines += [_row(r, widths) for r in rows]
  return '\n'.join(lines)


def _print_bare(label, result, flags_text):
  print(f'\n== {label} ==   XLA_FLAGS={flags_text!r}')
  rows = [[t['dtype'], t['batch_size'], f"{t['images_per_s']:.1f}",
           f"{t['median_s']:.3f}", f"{t['min_s']:.3f}", f"{t['max_s']:.3f}",
           t['steps'], f"{t['lower_s']:.1f}", f"{t['compile_s']:.1f}",
           f"{t['first_call_s']:.2f}", 'ok' if t['finite_loss'] else 'NaN',
           t['load']]
          for t in result['train']]
  print('train step (random data on device, blocked every step):')
  print(_table(['dtype', 'batch', 'img/s', 'median s', 'min s', 'max s',
                'steps', 'lower s', 'compile s', '1st call s', 'loss',
                'load'], rows))
  if result['eval']:
    rows = [[e['dtype'], e['batch_size'], f"{e['images_per_s']:.1f}",
             f"{e['median_s']:.3f}", f"{e['min_s']:.3f}", f"{e['max_s']:.3f}",
             e['steps'], f"{e['compile_s']:.1f}", e['load']]
            for e in result['eval']]
    print('eval step:')
    print(_table(['dtype', 'batch', 'img/s', 'median s', 'min s', 'max s',
                  'reps', 'compile s', 'load'], rows))


def _speedups(bare, ynn):
  """(label, aggregate ratio, per-round ratios) of the flag over the default."""
  out = []
  for kind in ('train', 'eval'):
    for a, b in zip(bare[kind], ynn[kind]):
      rounds = [y / x for x, y in zip(a['round_images_per_s'],
                                      b['round_images_per_s'])]
      out.append((f"{kind} {a['dtype']} b{a['batch_size']}",
                  b['images_per_s'] / a['images_per_s'], rounds))
  return out


def _print_full(label, result):
  full = result['full']
  ref = full['reference_bare']
  print(f'\n== {label} ==   XLA_FLAGS={result["machine"]["xla_flags"]!r}  '
        f'(worker wall {result["wall_s"]:.0f}s)')
  print(f"train_and_evaluate: configs/default.py (SGD+momentum, wd, "
        f"translate+flip, float32) on digits, batch {full['batch_size']}, "
        f"{full['steps_per_epoch']} steps/epoch, {full['epochs']} epochs, "
        f"eval on {full['test_images']} test images each epoch; timed epochs "
        f"{full['steady_epochs']}")
  print(f"setup (data, preprocessing, init, summary) {full['setup_s']:.1f}s, "
        f"epoch 1 training incl. compile {full['first_epoch_s']:.1f}s, "
        f"total {full['total_s']:.1f}s")
  keys = ['train_s', 'in_step_calls_s', 'eval_s', 'checkpoint_save_s',
          'write_csv_s', 'plot_curves_s', 'other_s', 'csv_seconds']
  rows = [[e['epoch'], *(f"{e.get(k, 0.0):.2f}" for k in keys),
           f"{e['train_images_per_s']:.1f}",
           f"{e['reference_images_per_s']:.1f}" if e['reference_images_per_s'] else '-',
           f"{e['train_images_per_s'] / e['reference_images_per_s']:.3f}"
           if e['reference_images_per_s'] else '-']
          for e in full['per_epoch']]
  print('per epoch (s): train = host batches + train steps + metric sync; '
        'in calls = host time inside train_step calls (dispatch, waiting); '
        'other = TensorBoard, logging, gaps; csv seconds = `seconds` column '
        'of metrics.csv')
  print('train img/s = this epoch\'s training; bare img/s = the same step '
        'timed bare right after this epoch\'s eval')
  print(_table(['epoch', 'train', 'in calls', 'eval', 'ckpt save', 'csv',
                'plot', 'other', 'csv seconds', 'train img/s', 'bare img/s',
                'ratio'], rows))
  print(f"reference (bare): the same jitted train step on random on-device "
        f"data, timed after each timed epoch's eval: {ref['images_per_s']:.1f} "
        f"img/s over {ref['steps']} steps (median {ref['median_s']:.3f}s)")
  lp = full['loop_pattern']
  print(f"diagnostic: the same step fed like the loop (fresh host batch via "
        f"sharding.global_batch, no per-step block), {lp['steps']} steps: "
        f"{lp['images_per_s']:.1f} img/s = x{lp['images_per_s'] / ref['images_per_s']:.3f} of bare")
  rows = [
      ['train steps only (data+aug+metrics)', full['images_per_s_train_only'],
       full['ratio_train_only']],
      ['+ ckpt/CSV/plot (no eval)', full['images_per_s_no_eval'],
       full['ratio_no_eval']],
      ['+ eval (everything)', full['images_per_s_all'], full['ratio_all']],
      ["metrics.csv 'seconds' (incl. eval, excl. ckpt/CSV/plot)",
       full['images_per_s_csv_seconds'], full['ratio_csv_seconds']],
  ]
  print(_table(['full loop, steady epochs', 'img/s', 'vs bare', 'target'],
               [[n, f'{v:.1f}', f'{r:.3f}', 'ok' if r >= TARGET else 'MISS']
                for n, v, r in rows]))


def _cifar_estimate(full) -> tuple:
  """The digits run's per-step rate, eval rate and bookkeeping, scaled to
  CIFAR-10's 390 steps and 10,000 test images (20 eval batches) per epoch."""
  f = full['full']
  steady = f['per_epoch'][1:] or f['per_epoch']
  fixed = sum(e['bookkeeping_s'] for e in steady) / len(steady)
  eval_batches = -(-f['test_images'] // f['eval_batch_size'])
  eval_ips = (eval_batches * f['eval_batch_size'] * len(steady)
              / sum(e['eval_s'] for e in steady))
  train_s = 390 * 128 / f['images_per_s_train_only']
  eval_s = 10000 / eval_ips
  ref = f['reference_bare']['images_per_s']
  no_eval = 390 * 128 / (train_s + fixed) / ref
  everything = 390 * 128 / (train_s + fixed + eval_s) / ref
  return (f'estimate for CIFAR-10 (390 steps + 10,000 test images per epoch, '
          f'at this run\'s training rate, eval rate ({eval_ips:.0f} img/s) and '
          f'bookkeeping ({fixed:.1f}s/epoch)): x{no_eval:.3f} of bare without '
          f'eval, x{everything:.3f} with eval', no_eval, everything)


def orchestrate(argv) -> None:
  passthrough = [a for a in argv[1:]]
  started = time.perf_counter()
  import jax  # pylint: disable=g-import-not-at-top
  print('== machine ==')
  print(f'cpu: {_cpu_model()}, {os.cpu_count()} cores visible, '
        f'load average {_loadavg()} (at start)')
  print(f'python {platform.python_version()}, jax {jax.__version__}, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'model all_cnn_c width {FLAGS.width}, batch {FLAGS.batch_size}, '
        f'{"quick" if FLAGS.quick else "default"} run', flush=True)
  if float(_loadavg().split()[0]) > 0.5:
    print('WARNING: the machine is busy (1-minute load above 0.5): absolute '
          'numbers are noisy; the full-loop ratios compare with a bare step '
          'timed right after each epoch and are the most robust figures.')

  names = ['XLA default'] + (['-individual_convolution'] if FLAGS.xla_ynn else [])
  _log(f"[1/2] bare train and eval steps ({' vs '.join(names)}) ...")
  bare = ynn = None
  workers = {}
  try:
    for name in names:
      workers[name] = _Worker(name != 'XLA default', passthrough)
    m = workers['XLA default'].machine
    print(f"worker: jax {m['jax']}, jaxlib {m['jaxlib']}, backend {m['backend']} "
          f"({m['devices']} x {m['device_kind']})")
    if len(workers) > 1:
      print('the two XLA settings run in two worker processes, alternately '
            '(rounds A,B,B,A,...) so that load changes hit both alike')
    results = _bare_section(workers)
    bare = results['XLA default']
    _print_bare('bare steps, XLA default', bare, m['xla_flags'])
    if FLAGS.xla_ynn:
      ynn = results['-individual_convolution']
      _print_bare(f'bare steps, {YNN_FLAG}', ynn,
                  workers['-individual_convolution'].machine['xla_flags'])
      print('\nflag speed-up (img/s with the flag / without; per round in '
            'brackets):')
      for label, ratio, rounds in _speedups(bare, ynn):
        print(f"  {label:<22} x{ratio:.2f}  "
              f"[{' '.join(f'{r:.2f}' for r in rounds)}]")
  except RuntimeError as e:
    print(f'bare-step worker failed: {e}')
  finally:
    for w in workers.values():
      w.close()
  sys.stdout.flush()

  fulls = []
  if FLAGS.full_loop:
    for use_ynn in ([False, True] if FLAGS.full_loop_ynn else [False]):
      _log(f'[2/2] full training loop{" with the flag" if use_ynn else ""} ...')
      full = _spawn('full', use_ynn, passthrough)
      label = 'full loop' + (f', {YNN_FLAG}' if use_ynn else ', XLA default')
      if 'error' in full:
        print(full['error'])
      else:
        _print_full(label, full)
        estimate = _cifar_estimate(full)
        print(estimate[0])
        full['cifar_estimate'] = estimate[1:]
      fulls.append((use_ynn, full))
      sys.stdout.flush()

  # ---- summary
  print('\n== summary (images/s, all_cnn_c, float32 unless noted) ==')
  rows = []
  for name, res in (('XLA default', bare), ('-individual_convolution', ynn)):
    if not res:
      continue
    for t in res['train']:
      rows.append([f'train step {t["dtype"]} b{t["batch_size"]}', name,
                   f"{t['images_per_s']:.1f}",
                   f"compile {t['lower_s'] + t['compile_s']:.1f}s"])
    for e in res['eval']:
      rows.append([f'eval step {e["dtype"]} b{e["batch_size"]}', name,
                   f"{e['images_per_s']:.1f}", ''])
  if bare and ynn:
    for label, ratio, rounds in _speedups(bare, ynn):
      rows.append([f'flag speed-up, {label}', '', f'x{ratio:.2f}',
                   f"rounds {min(rounds):.2f}..{max(rounds):.2f}"])
  for use_ynn, full in fulls:
    if 'error' in full:
      continue
    f = full['full']
    name = '-individual_convolution' if use_ynn else 'XLA default'
    rows.append(['full loop: bare reference', name,
                 f"{f['reference_bare']['images_per_s']:.1f}", ''])
    rows.append(['full loop: no eval', name, f"{f['images_per_s_no_eval']:.1f}",
                 f"x{f['ratio_no_eval']:.3f} of bare "
                 f"({'ok' if f['ratio_no_eval'] >= TARGET else 'MISS'} >= {TARGET})"])
    rows.append(['full loop: with eval', name, f"{f['images_per_s_all']:.1f}",
                 f"x{f['ratio_all']:.3f} of bare "
                 f"({'ok' if f['ratio_all'] >= TARGET else 'MISS'} >= {TARGET})"])
    if 'cifar_estimate' in full:
      no_eval, everything = full['cifar_estimate']
      rows.append(['CIFAR-10 estimate', name, '',
                   f'x{no_eval:.3f} no eval, x{everything:.3f} with eval'])
  print(_table(['measurement', 'XLA flags', 'img/s', 'note'], rows))
  print(f'load average at end {_loadavg()}; total '
        f'{time.perf_counter() - started:.0f}s')


def main(argv):
  if FLAGS.worker:
    run_worker(FLAGS.worker)
  else:
    orchestrate(argv)


if __name__ == '__main__':
  # Pass the user's flags on to the workers unchanged.
  _user_flags = [a for a in sys.argv[1:]]
  app.run(lambda argv: main(['throughput.py', *_user_flags]))
