"""Command-line entry point (the console script ``allconv``).

  allconv --config=configs/digits.py --workdir=workdirs/digits
  allconv --config=configs/digits.py --workdir=workdirs/digits --mode=eval
  allconv --config=configs/digits.py --workdir=workdirs/digits --mode=visualize
  allconv --config=configs/digits.py --workdir=workdirs/digits --mode=predict \
      --config.predict.images='photos/*.jpg'
  allconv --config=configs/digits.py --workdir=workdirs/digits --mode=export

Any config field can be overridden, e.g. ``--config.num_epochs=10``. A
mistake the user can fix (bad value, missing file, mismatching checkpoint)
is printed as one line ``error: <field>: <what is allowed>`` with exit
status 2.
"""

import asyncio
import json
import logging as std_logging
import os
import sys

# TensorFlow (imported only to prepare CIFAR with tensorflow-datasets) would
# otherwise print its C++ start-up banner.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from allconv_jax import disk, errors  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.DEFINE_enum('mode', 'train',
                  ['train', 'eval', 'visualize', 'predict', 'export'],
                  'train (resumes if the workdir has a checkpoint), eval '
                  '(the selected checkpoint, best by validation or else the '
                  'final one, on the test split), visualize (guided '
                  'backprop, deconvnet and saliency maps of the selected '
                  'checkpoint into <workdir>/visualizations/), predict (the '
                  'selected checkpoint\'s top classes for the images of '
                  '--config.predict.images, also into '
                  '<workdir>/predictions.csv; one JSON line per image) or '
                  'export (the selected checkpoint with its preprocessing as '
                  'a jax.export artifact in <workdir>/export/). Each other '
                  'mode prints one JSON line.')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
  """Keeps INFO lines of this library only (epochs, progress), and no
  library's report of a disk fault: the run's one line says it.

  With several processes, a checkpoint write that failed on this one alone
  would leave every process waiting at orbax's barriers: this one ends at
  once on its line, and the others on theirs (`distributed.end_now`).
  """
  fault = disk.in_log(record) if record.levelno >= std_logging.ERROR else None
  if fault is not None and 'allconv_jax.distributed' in sys.modules:
    sys.modules['allconv_jax.distributed'].end_now('error: ' + disk.message(
        fault, FLAGS.workdir, FLAGS.mode, clean=False), 2)
  return fault is None and (record.levelno >= std_logging.WARNING or
                            'allconv_jax' in record.pathname)


class _EventLoop(asyncio.SelectorEventLoop):
  """asyncio's loop, deaf once closed.

  Orbax runs each step of a checkpoint write on a loop of its own and closes
  it when the step fails (a full disk); TensorStore's writes still under way
  then call it back from C++, and each `RuntimeError('Event loop is
  closed')` would be printed as a traceback of its own.
  """

  def call_soon_threadsafe(self, *args, **kwargs):
    if self.is_closed():
      return None
    return super().call_soon_threadsafe(*args, **kwargs)


class _EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
  _loop_factory = _EventLoop


def _exit(message: str, status: int) -> None:
  print(message, file=sys.stderr, flush=True)
  # The other processes of a multi-process run learn how this one ended.
  if 'allconv_jax.distributed' in sys.modules:
    sys.modules['allconv_jax.distributed'].exiting(status, message)
  sys.exit(status)


def main(argv):
  del argv  # parse_flags has checked there is nothing else.
  logging.get_absl_handler().addFilter(_quiet_libraries)
  asyncio.set_event_loop_policy(_EventLoopPolicy())
  # Imported here so that --help and flag errors do not pay for JAX start-up.
  # pylint: disable=g-import-not-at-top
  import jax
  from allconv_jax import (distributed, export, predict, stopping, train,
                           trained, visualize)
  try:
    distributed.initialize(FLAGS.config)
    disk.check_writable(FLAGS.workdir)  # Before any work starts.
    run = {'train': train.train_and_evaluate,
           'eval': trained.evaluate_checkpoint,
           'visualize': visualize.visualize_checkpoint,
           'predict': predict.predict_images,
           'export': export.export_checkpoint}[FLAGS.mode]
    result = run(FLAGS.config, FLAGS.workdir)
    # A list (predict's, one per image) is printed one JSON line per item.
    for line in result if isinstance(result, list) else [result]:
      print(json.dumps(line), flush=True)
  except errors.UserError as e:
    _exit(f'error: {e}', 2)
  except stopping.Interrupted as e:
    _exit(f'stopped: {e}', 128 + e.signum)
  except KeyboardInterrupt:  # Before training started: nothing to save yet.
    _exit('stopped: SIGINT before training started', 130)
  except Exception as e:  # pylint: disable=broad-except
    fault = disk.fault(e)  # A full or read-only disk: status 2, as for input.
    if fault is not None:
      global _disk_fault
      _disk_fault = True
      _exit('error: ' + disk.message(fault, FLAGS.workdir, FLAGS.mode,
                                     clean=jax.process_count() == 1), 2)
    line = distributed.failure_line(e)  # Between processes: one line.
    if line is None:
      raise
    _exit(line, 1)


def parse_flags(argv):
  """absl's flag parsing, with its errors as one line and exit status 2."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get('model')  # The file is loaded lazily; load it now.
  except Exception as e:  # pylint: disable=broad-except
    _exit(f'error: {errors.flag_error(e, argv)}', 2)
  if len(rest) > 1:
    _exit(f'error: arguments: unexpected {" ".join(rest[1:])!r}; every option '
          'is a --flag (see --help)', 2)
  return rest


_disk_fault = False  # Set when the run ends on a full or read-only disk.


def run():
  """Console-script entry point (`allconv`)."""
  try:
    app.run(main, flags_parser=parse_flags)
  except SystemExit:
    if _disk_fault:
      # Orbax's threads may still be finishing the failed write, and the
      # interpreter's shutdown under them makes each print a traceback of
      # the fault already said in one line. Only the binary does this: an
      # in-process caller of `main` keeps its stderr.
      sys.stderr.flush()
      os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    raise


if __name__ == '__main__':
  run()
