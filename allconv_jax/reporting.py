"""Per-epoch outputs people read: ``metrics.csv`` and ``curves.png``."""

from __future__ import annotations

import csv
import os

import matplotlib

matplotlib.use('Agg')  # Headless: runs on servers and in CI.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

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
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
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
  plt.close(fig)
  os.replace(tmp, path)
