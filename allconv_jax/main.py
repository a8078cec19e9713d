"""Command-line entry point.

  python -m allconv_jax.main --config=configs/digits.py --workdir=workdirs/digits
  python -m allconv_jax.main --config=configs/digits.py --workdir=workdirs/digits --mode=eval
  python -m allconv_jax.main --config=configs/digits.py --workdir=workdirs/digits --mode=visualize

Any config field can be overridden, e.g. ``--config.num_epochs=10``. A
mistake the user can fix (bad value, missing file, mismatching checkpoint)
is printed as one line ``error: <field>: <what is allowed>`` with exit
status 2.
"""

import json
import logging as std_logging
import os
import re
import sys

# TensorFlow (used by tensorflow-datasets and clu's TensorBoard writer) would
# otherwise print its C++ start-up banner on every run.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags, logging
from ml_collections import config_flags

from allconv_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'visualize'],
                  'train (resumes if the workdir has a checkpoint), eval '
                  '(the selected checkpoint, best by validation or else the '
                  'final one, on the test split; prints one JSON line) '
                  'or visualize (guided backprop, deconvnet and saliency maps '
                  'of the selected checkpoint into <workdir>/visualizations/; '
                  'prints one JSON line).')
config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def _quiet_libraries(record: std_logging.LogRecord) -> bool:
  """Keeps INFO lines of this library and clu (progress, metrics) only."""
  if record.levelno >= std_logging.WARNING:
    return True
  return any(part in record.pathname for part in ('allconv_jax', 'clu'))


def main(argv):
  del argv  # parse_flags has checked there is nothing else.
  logging.get_absl_handler().addFilter(_quiet_libraries)
  # Imported here so that --help and flag errors do not pay for JAX start-up.
  from allconv_jax import sharding, stopping, train, trained  # pylint: disable=g-import-not-at-top
  try:
    sharding.initialize_distributed(FLAGS.config)
    if FLAGS.mode == 'train':
      summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
      logging.info('done: %s', summary)
      print(json.dumps(summary), flush=True)
    elif FLAGS.mode == 'eval':
      print(json.dumps(trained.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)),
            flush=True)
    else:
      from allconv_jax import visualize  # pylint: disable=g-import-not-at-top
      print(json.dumps(visualize.visualize_checkpoint(FLAGS.config, FLAGS.workdir)),
            flush=True)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)
  except stopping.Interrupted as e:
    print(f'stopped: {e}', file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:
    # Ctrl-C before training started: there is nothing to save yet.
    print('stopped: SIGINT before training started', file=sys.stderr, flush=True)
    sys.exit(130)


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def parse_flags(argv):
  """absl's flag parsing, with its errors as one line and exit status 2."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get('model')  # The file is loaded lazily; load it now.
  except flags.Error as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    message = lines[0]
    if message.endswith(':') and len(lines) > 1:  # The cause is on the last line.
      message += ' ' + lines[-1]
    # 'flag --config.batch_size=abc: invalid literal ...' names the field first.
    match = re.match(r'flag --([\w.]+)=(.*?): (.*)$', message)
    if match:
      name, value, reason = match.groups()
      message = f'{name}: invalid value {value!r} ({reason})'
    _fail(message)
  except AttributeError as e:
    # How ml_collections reports an override of a field that does not exist.
    override = next((a[2:].split('=')[0] for a in argv[1:]
                     if a.startswith('--config.') and
                     a.split('=')[0].rsplit('.', 1)[-1] in str(e)),
                    'config.<field>')
    _fail(f'{override}: no such config field; the fields are listed in '
          'configs/default.py')
  except Exception as e:  # pylint: disable=broad-except
    # A config file that is missing or fails to import.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f'config: cannot load the config file ({lines[-1] if lines else type(e).__name__})')
  if len(rest) > 1:
    _fail(f'arguments: unexpected {" ".join(rest[1:])!r}; every option is a '
          '--flag (see --help)')
  return rest


def run():
  """Console-script entry point (`allconv`)."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
