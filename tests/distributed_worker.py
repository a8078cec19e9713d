"""The binary, recording which files under --workdir it opens for writing.

tests/test_distributed.py runs every process of a multi-process run through
this, so that it can tell which process wrote the CSV, TensorBoard events and
plots. A Python audit hook sees each `open` with a writing mode (and each
rename or new directory) made from Python; orbax's checkpoint files are
written by TensorStore in C++ and are not seen, which is fine: checkpoints
are written collectively by design. The paths, relative to the workdir, go
one per line to $WRITES_LOG as they happen (a killed process keeps them).
"""

import os
import sys

from allconv_jax import main


def _record_writes(workdir: str, log_path: str) -> None:
  workdir = os.path.abspath(workdir)
  log = open(log_path, 'a', buffering=1)  # pylint: disable=consider-using-with

  def under(path) -> str | None:
    if isinstance(path, int):
      return None
    path = os.path.abspath(os.fsdecode(path))
    return os.path.relpath(path, workdir) if path.startswith(workdir + os.sep) else None

  def hook(event, args):
    if event == 'open':  # From `open` (a mode) and `os.open` (no mode).
      path, mode, flags = args
      writes = isinstance(mode, str) and any(c in mode for c in 'wax+')
      writes = writes or bool((flags or 0) & (os.O_WRONLY | os.O_RDWR))
    elif event in ('os.rename', 'os.replace', 'os.mkdir'):
      path, writes = args[1] if event != 'os.mkdir' else args[0], True
    else:
      return
    if writes and (relative := under(path)) is not None:
      log.write(relative + '\n')

  sys.addaudithook(hook)


if __name__ == '__main__':
  _record_writes(next(a.split('=', 1)[1] for a in sys.argv
                      if a.startswith('--workdir=')), os.environ['WRITES_LOG'])
  main.run()
