"""The one exception type for mistakes the user can fix, and flag errors as one line."""

import re


class UserError(ValueError):
  """A bad config value, a missing or corrupt file, or a mismatching checkpoint.

  The binary prints its message as a single line and exits with status 2, so
  the message must name the offending field and say what is allowed, e.g.
  ``"model: unknown network 'foo'; allowed: model_a, model_b, ..."``.
  """


def flag_error(error: Exception, argv: list[str]) -> str:
  """The one-line message for an error of absl's flag parsing.

  Args:
    error: what parsing ``argv`` (with its ``--config`` file) raised.
    argv: the command line.

  Returns:
    ``'<field>: <what is wrong>'``, e.g. ``"config.batch_size: invalid value
    'abc' (...)"``.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if isinstance(error, flags.Error):
    message = lines[0]
    if message.endswith(':') and len(lines) > 1:  # The cause is on the last line.
      message += ' ' + lines[-1]
    # 'flag --config.batch_size=abc: invalid literal ...' names the field first.
    match = re.match(r'flag --([\w.]+)=(.*?): (.*)$', message)
    if match:
      name, value, reason = match.groups()
      message = f'{name}: invalid value {value!r} ({reason})'
    return message
  if isinstance(error, AttributeError):
    # How ml_collections reports an override of a field that does not exist.
    override = next((a[2:].split('=')[0] for a in argv[1:]
                     if a.startswith('--config.') and
                     a.split('=')[0].rsplit('.', 1)[-1] in str(error)),
                    'config.<field>')
    return (f'{override}: no such config field; the fields are listed in '
            'configs/default.py')
  # A config file that is missing or fails to import.
  return ('config: cannot load the config file '
          f'({lines[-1] if lines else type(error).__name__})')
