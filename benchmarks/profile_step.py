"""Where a train step's time goes, from a profile.

    python benchmarks/profile_step.py [--steps 3] [--width 1.0] [--case 'train b128']
    python benchmarks/profile_step.py --conv_impl=subpixel   # XLA's convolutions

Traces a few of the library's All-CNN-C steps (`common.LibrarySteps`, the
training settings of ``configs/default.py`` without augmentation) with
`jax.profiler` and sums, per kind of XLA:CPU kernel (the name without its
number: ``broadcast_add_fusion``, ``wrapped_reduce-window``, ...), the
time it ran on XLA's threads.

* oneDNN's convolutions (``conv_impl='auto'`` or ``'onednn'``) are custom
  calls, ``ffi_call`` in the trace: each blocks one XLA thread while
  oneDNN's OpenMP threads work, so their time is wall time, given as a share
  of the step's.
* XLA's own convolutions (``conv_impl='subpixel'``) run asynchronously in
  Eigen's thread pool and the profile only records their launch; they are
  not in the table, and what the other kernels do not take is, roughly,
  theirs.

The other kernels' times are summed over threads (a fusion split over both
cores runs on both at once), so their share is of the step's CPU time: the
step's wall time times the usable cores.
"""

import collections
import glob
import re
import statistics
import tempfile

import common
import allconv_jax  # pylint: disable=unused-import  # Before JAX: its XLA flags.
import jax
from absl import app, flags
from jax.profiler import ProfileData

FLAGS = flags.FLAGS
flags.DEFINE_integer('steps', 3, 'Profiled steps (after 5 untraced ones).')
flags.DEFINE_float('width', 1.0, 'Width multiplier (1.0 = the paper).')
flags.DEFINE_string('case', 'train b128', "'train bN' or 'eval bN'.")
flags.DEFINE_integer('top', 12, 'Fusion kinds listed.')
flags.DEFINE_string('conv_impl', 'auto', 'config.conv_impl.')
CUSTOM_CALL = 'ffi_call'  # oneDNN's convolutions.


def fusion_times(trace_dir: str) -> collections.Counter:
  """Thread-nanoseconds per kind of XLA:CPU kernel (fusions, copies, custom
  calls, ..., not XLA's own convolutions) in the trace under `trace_dir`."""
  path, = glob.glob(f'{trace_dir}/**/*.xplane.pb', recursive=True)
  kinds = collections.Counter()
  for plane in ProfileData.from_file(path).planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):  # XLA's threads, not Python's.
        continue
      for event in line.events:
        # Convolutions appear only as their launches (see above).
        if event.name.startswith(('ThunkExecutor', 'end: ', 'conv')):
          continue
        kinds[re.sub(r'[._]\d+$', '', event.name)] += event.duration_ns
  return kinds


def main(_):
  print('## machine\n\n' + common.machine(('jax', 'jaxlib', 'flax')))
  if common.busy():
    print('WARNING: the machine is busy (other work uses the cores): the '
          'step time, and so every share below, is off.')
  common.log('compiling ...')
  lib = common.LibrarySteps(width=FLAGS.width, augment=False,
                            conv_impl=FLAGS.conv_impl)
  lib.prepare(FLAGS.case)
  untraced = lib.run(FLAGS.case, 5)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      traced = lib.run(FLAGS.case, FLAGS.steps)
    kinds = fusion_times(trace_dir)
  step_ms = 1e3 * statistics.median(untraced)
  cpu_ms = step_ms * common.cores()
  per_step = {k: v / 1e6 / FLAGS.steps for k, v in kinds.items()}
  onednn_ms = per_step.pop(CUSTOM_CALL, 0.0)
  total = sum(per_step.values())
  rows = [[kind, f'{ms:.1f}', f'{100 * ms / cpu_ms:.1f}%']
          for kind, ms in sorted(per_step.items(), key=lambda kv: -kv[1])[:FLAGS.top]]
  rows.append(['all kinds', f'{total:.1f}', f'{100 * total / cpu_ms:.1f}%'])
  print(f'\n## {FLAGS.case}, All-CNN-C width {FLAGS.width}, '
        f'conv_impl={FLAGS.conv_impl!r}\n')
  print(f'step: median {step_ms:.0f} ms untraced (5 steps), '
        f'{1e3 * statistics.median(traced):.0f} ms traced ({FLAGS.steps} '
        f'steps); CPU time {cpu_ms:.0f} ms ({common.cores()} cores)')
  if onednn_ms:  # Measured in the traced steps: a share of their time.
    print(f'oneDNN convolutions (custom calls): {onednn_ms:.0f} ms wall per '
          f'step, {100 * onednn_ms / (1e3 * statistics.median(traced)):.0f}% '
          'of the traced step')
  print()
  print(common.table(['XLA:CPU kernel kind (not convolutions)',
                      'thread ms per step', 'of the CPU time'], rows))


if __name__ == '__main__':
  app.run(main)
