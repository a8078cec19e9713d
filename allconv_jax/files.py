"""A run's directory: the names of its files, its lock and atomic writes.

Layout of ``<workdir>/``:

  checkpoints/latest/<step>/   every epoch (and every checkpoint_every_steps)
  checkpoints/best/<step>/     the best by validation accuracy
  checkpoints/corrupt/         unreadable checkpoints, moved aside on resume
  preprocess.npz               the input transform fitted on the training split
  config.json                  the config the run started with
  model_summary.txt            the network's full layer table (nn.tabulate)
  metrics.csv, curves.png      one row / point per epoch (the curves are
                               redrawn at most every 30 s, and at the end)
  summary.json                 what the run reports, once it is complete
  lsuv_report.json             what LSUV did (init='lsuv')
  confusion.csv, .json, .png   confusion matrix and per-class accuracy
                               (of the test split, at the end of training
                               and by --mode=eval)
  events.out.tfevents.*        TensorBoard scalars
  visualizations/              written by --mode=visualize
  predictions.csv              written by --mode=predict
  export/model.jax, model.json written by --mode=export
  .lock                        held by the process training in it

A population (``config.sweep``; see `allconv_jax.population`) has the
checkpoints of all its members, preprocess.npz, config.json and
model_summary.txt, and:

  members/<name>/              each member's run directory: its config.json,
                               metrics, curves, TensorBoard scalars, summary
                               and selected checkpoint
  members.csv                  the members ranked by validation accuracy
  members.png                  every member's validation accuracy per epoch
  summary.json                 the same, once the population is complete

Every file is written under a temporary name and renamed into place, so a
crash or a full disk never leaves half a file (see `allconv_jax.disk`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from typing import Callable, Iterator

from allconv_jax import disk
from allconv_jax.errors import UserError

CHECKPOINTS = 'checkpoints'
PREPROCESS = 'preprocess.npz'
CONFIG = 'config.json'
MODEL_SUMMARY = 'model_summary.txt'
METRICS = 'metrics.csv'
CURVES = 'curves.png'
SUMMARY = 'summary.json'
LSUV_REPORT = 'lsuv_report.json'
# The confusion matrix of a split, with per-class accuracy (`confusion`).
CONFUSION_CSV = 'confusion.csv'
CONFUSION_JSON = 'confusion.json'
CONFUSION_PNG = 'confusion.png'
VISUALIZATIONS = 'visualizations'
PREDICTIONS = 'predictions.csv'
EXPORT = 'export'
EXPORT_MODEL = 'model.jax'  # In EXPORT: the serialized jax.export.Exported.
EXPORT_INFO = 'model.json'  # In EXPORT: how to call it.
LOCK = '.lock'
MEMBERS = 'members'
RANKING = 'members.csv'
MEMBERS_PLOT = 'members.png'


def check(workdir: str) -> None:
  """Raises a one-line `UserError` if `workdir` cannot be a directory."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'workdir: {workdir} is a file, not a directory; give a '
                    'directory (it is created if missing)')


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock while a run writes to it.

  The lock is the kernel's (`flock`) on ``<workdir>/.lock``: it is released
  when the process exits, however it exits, so the file a killed run leaves
  behind is no obstacle; the file only says which process holds the lock.

  Raises:
    UserError: another live process holds the lock.
  """
  check(workdir)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 100, 0).decode(errors='replace').strip() or 'another process'
      raise UserError(f'workdir: {workdir} is in use by {holder}; wait for it '
                      'to finish or use another workdir') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'process {os.getpid()} on {os.uname().nodename}\n'.encode(), 0)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def atomic_write(path: str, write: Callable[[str], None]) -> None:
  """Calls ``write(temporary path)``, then renames the file to `path`.

  The temporary name keeps the extension, for writers that go by it. A full
  or read-only disk raises `disk.Fault` naming `path`; `path` is unchanged.
  """
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{ext}'
  try:
    write(tmp)
    os.replace(tmp, path)
  except Exception as e:  # pylint: disable=broad-except
    found = disk.fault(e)
    if found is None:
      raise
    raise disk.Fault(path, found.code) from None  # The file, not its tmp.
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, value) -> None:
  """Writes `value` as indented JSON, atomically."""
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(value, f, indent=2)
      f.write('\n')
  atomic_write(path, write)


def write_text(path: str, text: str) -> None:
  """Writes `text`, atomically."""
  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)
  atomic_write(path, write)


def append(fd: int, data: bytes, path: str) -> None:
  """Appends `data` to the file open as `fd`, all of it or none.

  A write cut short (a full disk) is truncated away, so that a reader of the
  file, TensorBoard's included, never meets half a record.

  Raises:
    disk.Fault: the disk is full or read-only, naming `path`.
  """
  end = os.lseek(fd, 0, os.SEEK_END)
  view = memoryview(data)
  try:
    while view:
      view = view[os.write(fd, view):]
  except OSError as e:
    os.ftruncate(fd, end)
    found = disk.fault(e)
    if found is None:
      raise
    raise disk.Fault(path, found.code) from None
