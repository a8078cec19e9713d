"""The one exception type for mistakes the user can fix."""


class UserError(ValueError):
  """A bad config value, a missing or corrupt file, or a mismatching checkpoint.

  The binary prints its message as a single line and exits with status 2, so
  the message must name the offending field and say what is allowed, e.g.
  ``"model: unknown network 'foo'; allowed: model_a, model_b, ..."``.
  """
