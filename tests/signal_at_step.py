"""The binary, sending itself SIGTERM when its loop reports step $SIGNAL_AT_STEP.

The loop reports every step to its `reporting.Progress`; this one signals at
the chosen step, so that tests/test_robustness.py can stop a run exactly
there.
"""

import os
import signal

from allconv_jax import main, reporting


class SignalAtStep(reporting.Progress):

  def __call__(self, step: int) -> None:
    if step == int(os.environ['SIGNAL_AT_STEP']):
      os.kill(os.getpid(), signal.SIGTERM)
    super().__call__(step)


if __name__ == '__main__':
  reporting.Progress = SignalAtStep
  main.run()
