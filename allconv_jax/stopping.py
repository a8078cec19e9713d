"""How training stops early: on request (SIGTERM, SIGINT), or on divergence."""

import signal

from allconv_jax.errors import UserError


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
  raised, so the same command resumes. With several processes the signal may
  reach one host only, so the processes agree on it first (`requested`).
  """

  def __init__(self, check_every_steps: int = 1):
    self.signum = None
    self._previous = {}
    self._agreement = None
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_count() > 1:
      from allconv_jax import distributed  # pylint: disable=g-import-not-at-top
      self._agreement = distributed.Agreement(check_every_steps)

  def requested(self, step: int) -> int | None:
    """The signal to stop on after `step`, or None to go on.

    One process: the signal received, if any, at no cost. Several: the
    signal any of them received, agreed by all at the same step, every
    ``check_every_steps`` steps (see `allconv_jax.distributed.Agreement`);
    the same answer for every call at one step. The agreed signal becomes
    `signum` on every process.
    """
    if self._agreement is None:
      return self.signum
    agreed = self._agreement(step, self.signum)
    if agreed is not None:
      self.signum = agreed
    return agreed

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


class Diverged(UserError):
  """The loss became non-finite (``halt_on_nan``); the last good checkpoint is kept."""

  def __init__(self, step: int, last_checkpoint: int | None):
    kept = ('no checkpoint was written' if last_checkpoint is None else
            f'the last good checkpoint (step {last_checkpoint}) is kept')
    super().__init__(
        f'learning_rate: the loss became non-finite at step {step}; training '
        f'stopped and {kept}; lower learning_rate or set halt_on_nan=False')
    self.step = step
