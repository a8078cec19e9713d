"""Faults of the disk under a run: full, or not writable.

Any write of a run can meet a full disk: an orbax checkpoint (written by
TensorStore in C++, whose error is a ``ValueError`` that quotes the errno),
``metrics.csv``, the curves, TensorBoard, the summary, the confusion files,
predictions or an export. Every such write is atomic (a temporary name, then a
rename; orbax commits a checkpoint by renaming its ``*.orbax-checkpoint-tmp``
directory; TensorBoard's records are appended whole or not at all), so a
fault damages nothing written before. `fault` recognizes one in whatever
exception it surfaces as, and the binary (`allconv_jax.main`) prints it as
one line (`message`) with exit status 2: the file, what is wrong, and the
last good checkpoint, which the same command resumes from once there is
space. The temporary directories of the checkpoint that failed are removed
then, and again when a run starts (`remove_partial_checkpoints`).

A workdir that cannot be written (a read-only file system, a directory
without write permission) is refused before any work starts (`check_writable`).
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import re
import shutil

from allconv_jax.errors import UserError

# Written with RLIMIT_FSIZE (ulimit -f), a file may not grow past the limit:
# EFBIG, a full disk as far as the run can tell.
FULL = {errno.ENOSPC: 'the disk is full', errno.EDQUOT: 'the disk quota is used up',
        errno.EFBIG: 'the file size limit (ulimit -f) is reached'}
READ_ONLY = {errno.EROFS: 'the file system is read-only'}
_WHY = {**FULL, **READ_ONLY}
# How TensorStore (orbax's writer) reports an errno, and the file it names.
_TS_ERRNO = re.compile(r"\[os_error_code='?(\d+)'?\]")
_TS_PATH = re.compile(r'"(/[^"]+)"')
_TMP = '.orbax-checkpoint-tmp'


@dataclasses.dataclass(eq=False)
class Fault(Exception):
  """A write that failed because the disk is full or read-only."""
  path: str
  code: int

  @property
  def why(self) -> str:
    return _WHY[self.code]


def fault(error: BaseException | None) -> Fault | None:
  """The disk fault behind `error` (its causes and context included), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, Fault):
      return error
    found = _one(error)
    if found is not None:
      return found
    for inner in getattr(error, 'exceptions', ()):  # An ExceptionGroup.
      found = fault(inner)
      if found is not None:
        return found
    error = error.__cause__ or error.__context__
  return None


def _one(error: BaseException) -> Fault | None:
  if isinstance(error, OSError) and error.errno in _WHY:
    return Fault(os.fsdecode(error.filename or error.filename2 or ''), error.errno)
  text = str(error)
  code = _TS_ERRNO.search(text)
  if code and int(code.group(1)) in _WHY:
    paths = _TS_PATH.findall(text)
    return Fault(paths[-1] if paths else '', int(code.group(1)))
  return None


def in_log(record) -> Fault | None:
  """The disk fault a log record reports, or None (orbax logs each failed
  thread's traceback before the error reaches the run; those are left to
  the run's one line)."""
  found = fault(record.exc_info[1]) if record.exc_info else None
  if found is not None:
    return found
  try:
    return _one(Exception(record.getMessage()))
  except Exception:  # pylint: disable=broad-except
    return None


def what(path: str) -> str:
  """The file a user knows: a checkpoint for anything in one being written."""
  match = re.match(rf'(.*?/\d+){re.escape(_TMP)}', path)
  return f'the checkpoint {match.group(1)}' if match else (path or 'a file')


def message(found: Fault, workdir: str, mode: str, clean: bool = True) -> str:
  """The one line for a fault of a run on `workdir` in `mode`.

  For training, it names the last good (committed) checkpoint and, if
  `clean` (a single process: no other one may be writing into them), removes
  the failed checkpoint's temporary directories to free their space; a run
  of several processes leaves them to its next start.
  """
  path = found.path or next(iter(sorted(_partial(workdir))), '')
  head = f'workdir: cannot write {what(path) if path else f"into {workdir}"}: {found.why}'
  then = {errno.EFBIG: 'raise the limit',
          errno.EROFS: 'make it writable'}.get(found.code, 'free some space')
  if mode != 'train':
    return (f'{head}; nothing else was changed; {then} and run the same '
            'command again')
  from allconv_jax import files  # pylint: disable=g-import-not-at-top
  if clean:
    remove_partial_checkpoints(workdir)
  latest = os.path.join(os.path.abspath(workdir), files.CHECKPOINTS, 'latest')
  # Committed steps are the directories named by a number (orbax commits by
  # renaming); an orbax manager here would wait for the other processes.
  try:
    step = max((int(n) for n in os.listdir(latest) if n.isdigit()), default=None)
  except OSError:
    step = None
  if step is None:
    return (f'{head}; no checkpoint was written yet; {then} and run the same '
            'command to start again')
  return (f'{head}; the last good checkpoint is step {step} ({latest}/{step}), '
          f'kept; {then} and run the same command to resume')


def remove_partial_checkpoints(workdir: str) -> list[str]:
  """Removes the temporary directories of checkpoints that were never
  committed (a full disk, a kill during a save); returns them.

  Orbax ignores them, but they hold the space a full disk needs back. Only
  process 0 may call this, and only while no save is under way.
  """
  found = _partial(workdir)
  for path in found:
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      try:
        os.remove(path)
      except OSError:
        pass
  return found


def _partial(workdir: str) -> list[str]:
  """The temporary directories of uncommitted checkpoints in a workdir."""
  from allconv_jax import files  # pylint: disable=g-import-not-at-top
  root = os.path.abspath(workdir)
  return [p for pattern in (
      os.path.join(root, files.CHECKPOINTS, '*', f'*{_TMP}*'),
      os.path.join(root, files.MEMBERS, '*', files.CHECKPOINTS, '*', f'*{_TMP}*'))
          for p in glob.glob(pattern)]


def check_writable(workdir: str) -> None:
  """Raises a one-line `UserError` if `workdir` (or, where it does not exist
  yet, the directory it would be created in) cannot be written."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path) or os.access(path, os.W_OK | os.X_OK):
    return  # A file is `files.check`'s error.
  try:
    read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
  except OSError:
    read_only = False
  why = 'is on a read-only file system' if read_only else 'is not writable'
  where = (path if path == os.path.abspath(workdir) else
           f'{path}, where the workdir {workdir} would be created,')
  raise UserError(f'workdir: {where} {why}; give a workdir on a writable '
                  'disk (nothing was started)')
