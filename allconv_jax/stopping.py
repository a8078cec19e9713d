"""Stopping on request: SIGTERM or SIGINT end training at the next step."""

import signal


class Interrupted(Exception):
  """Training stopped by SIGTERM or SIGINT after saving a checkpoint."""

  def __init__(self, signum: int, step: int):
    super().__init__(f'{signal.Signals(signum).name}: saved a checkpoint at '
                     f'step {step}; run the same command to resume')
    self.signum = signum


class StopRequests:
  """Turns SIGTERM/SIGINT into a flag the loop checks between steps.

  A cluster scheduler preempts with SIGTERM, a person with Ctrl-C; either
  way the step under way finishes, a checkpoint is saved and `Interrupted`
  raised, so the same command resumes.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
