"""Command-line entry point.

  python -m allconv_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m allconv_jax.main --config=configs/digits.py --workdir=workdirs/digits --mode=eval

Any config field can be overridden, e.g. ``--config.num_epochs=10``. A
mistake the user can fix (bad value, missing file, mismatching checkpoint)
is printed as one line ``error: <field>: <what is allowed>`` with exit
status 2.
"""

import json
import logging as std_logging
import os
import sys

# TensorFlow (used by tensorflow-datasets and clu's TensorBoard writer) would
# otherwise print its C++ start-up banner on every run.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging
from ml_collections import config_flags

from allconv_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'],
                  'train (resumes if the workdir has a checkpoint) or eval '
                  '(best checkpoint on the test split; prints one JSON line).')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
  """Keeps INFO lines of this library and clu (progress, metrics) only."""
  if record.levelno >= std_logging.WARNING:
    return True
  return any(part in record.pathname for part in ('allconv_jax', 'clu'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.get_absl_handler().addFilter(_quiet_libraries)
  # Imported here so that --help and flag errors do not pay for JAX start-up.
  from allconv_jax import sharding, train  # pylint: disable=g-import-not-at-top
  try:
    sharding.initialize_distributed(FLAGS.config)
    if FLAGS.mode == 'train':
      summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
      logging.info('done: %s', summary)
      print(json.dumps(summary), flush=True)
    else:
      print(json.dumps(train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)),
            flush=True)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  except train.Interrupted as e:
    print(f'stopped: {e}', file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)


def run():
  """Console-script entry point (`allconv`)."""
  # Configs import each other as `configs.<name>`, relative to the repo root.
  sys.path.insert(0, os.getcwd())
  app.run(main)


if __name__ == '__main__':
  run()
