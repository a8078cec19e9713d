"""Per-epoch outputs people read: ``metrics.csv`` and ``curves.png``."""

from __future__ import annotations

import csv
import os

# The Figure API needs no GUI backend and leaves pyplot's (and a notebook's)
# alone.
from matplotlib.figure import Figure

COLUMNS = ('epoch', 'step', 'learning_rate', 'train_loss', 'train_accuracy',
           'test_loss', 'test_accuracy', 'seconds')


def read_csv(path: str) -> list[dict]:
  """Rows of a metrics CSV with numeric values ([] if there is none)."""
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
  for row in rows:
    row['epoch'], row['step'] = int(row['epoch']), int(row['step'])
  return rows


def write_csv(path: str, rows: list[dict]) -> None:
  """Rewrites the whole CSV atomically, so a crash never leaves half a row."""
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: row[k] for k in COLUMNS})
  os.replace(tmp, path)


def plot_curves(rows: list[dict], path: str, title: str = '') -> None:
  """Draws loss and accuracy per epoch, train and test, into a PNG."""
  epochs = [r['epoch'] for r in rows]
  fig = Figure(figsize=(11, 4))
  ax_loss, ax_acc = fig.subplots(1, 2)
  for split, style in (('train', '-'), ('test', '--')):
    ax_loss.plot(epochs, [r[f'{split}_loss'] for r in rows], style, label=split)
    ax_acc.plot(epochs, [100 * r[f'{split}_accuracy'] for r in rows], style,
                label=split)
  ax_loss.set(xlabel='epoch', ylabel='cross-entropy loss', title='loss')
  ax_acc.set(xlabel='epoch', ylabel='accuracy (%)', title='accuracy')
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=100)
  os.replace(tmp, path)
