"""Per-class results: the confusion matrix of a split and what it shows.

``matrix[t, p]`` counts the images of true class ``t`` predicted as ``p``.
`write` puts it into the workdir three ways (names in `allconv_jax.files`):

  confusion.csv    rows = true class, columns = predicted class, a header of
                   class names and a last column of per-class accuracy
  confusion.json   class names, matrix, per-class and overall accuracy,
                   the most confused pairs, split and step
  confusion.png    a heat map coloured by the fraction of each true class,
                   counts written in the cells up to 20 classes

and returns the part of it that goes into a one-line JSON report.
The counts come from the eval step (`steps.Confusion`), which counts them on
the device beside loss and accuracy. ``--mode=eval``
(`trained.evaluate_checkpoint`) and the end of training call:

    result.update(confusion.write(workdir, counts, data.class_names, 'test', step))
"""

from __future__ import annotations

import csv
import os
from typing import Sequence

import numpy as np
from absl import logging
# The Figure API needs no GUI backend and leaves pyplot's state alone.
from matplotlib.figure import Figure

from allconv_jax import files

# Beyond this many classes the cells are too small for their counts.
MAX_ANNOTATED_CLASSES = 20


def per_class_accuracy(counts: np.ndarray) -> list[float | None]:
  """Each true class's fraction predicted right; None for a class absent."""
  totals = counts.sum(axis=1)
  return [float(counts[c, c] / totals[c]) if totals[c] else None
          for c in range(len(counts))]


def most_confused(counts: np.ndarray, top: int = 3) -> list[tuple[int, int, int]]:
  """The `top` largest off-diagonal cells as (true, predicted, count).

  Largest count first, ties in (true, predicted) order so the list is
  deterministic; cells of count 0 are no confusion and are left out.
  """
  off = counts.copy()
  np.fill_diagonal(off, 0)
  true, predicted = np.nonzero(off)
  # lexsort sorts by its last key first: count descending, then true, predicted.
  order = np.lexsort((predicted, true, -off[true, predicted]))[:top]
  return [(int(true[i]), int(predicted[i]), int(off[true[i], predicted[i]]))
          for i in order]


def report(counts: np.ndarray, class_names: Sequence[str]) -> dict:
  """What a one-line JSON report takes: per-class accuracy, most confused.

  Returns:
    ``{'per_class_accuracy': {name: accuracy or None}, 'most_confused':
    [[true name, predicted name, count], ...]}`` (at most three pairs).
  """
  names = [str(n) for n in class_names]
  return dict(
      per_class_accuracy=dict(zip(names, per_class_accuracy(counts))),
      most_confused=[[names[t], names[p], n] for t, p, n in most_confused(counts)])


def write(workdir: str, counts: np.ndarray, class_names: Sequence[str],
          split: str, step: int) -> dict:
  """Writes confusion.csv, .json and .png of a split into `workdir`.

  Args:
    workdir: the run's directory (it exists).
    counts: the (classes, classes) confusion matrix of the split.
    class_names: the name of each class, in label order.
    split: which split it is ('test', 'validation'), recorded in the files.
    step: the step of the checkpoint that predicted, recorded in the files.

  Returns:
    `report` of the matrix, to be merged into the caller's JSON line.
  """
  names = [str(n) for n in class_names]
  counts = np.asarray(counts, np.int64)
  result = report(counts, names)
  total = int(counts.sum())
  accuracy = float(np.trace(counts) / total) if total else None
  files.write_json(os.path.join(workdir, files.CONFUSION_JSON), dict(
      split=split, step=int(step), class_names=names, matrix=counts.tolist(),
      accuracy=accuracy, num_examples=total, **result))
  _write_csv(os.path.join(workdir, files.CONFUSION_CSV), counts, names,
             per_class_accuracy(counts))
  percent = '' if accuracy is None else f', accuracy {100 * accuracy:.2f}%'
  plot(os.path.join(workdir, files.CONFUSION_PNG), counts, names,
       f'{split} split, step {step}{percent}')
  logging.info('Wrote %s.{csv,json,png}; most confused: %s',
               os.path.join(workdir, 'confusion'),
               ', '.join(f'{t} → {p}: {n}' for t, p, n in result['most_confused'])
               or 'none')
  return result


def _write_csv(path: str, counts: np.ndarray, names: list[str],
               accuracies: list[float | None]) -> None:
  def write(tmp):
    with open(tmp, 'w', newline='') as f:
      # The csv module quotes names with commas (CIFAR-100 has none, but
      # class names are the dataset's to choose).
      writer = csv.writer(f)
      writer.writerow(['true \\ predicted', *names, 'accuracy'])
      for name, row, acc in zip(names, counts.tolist(), accuracies):
        writer.writerow([name, *row, '' if acc is None else f'{acc:.6f}'])
  files.atomic_write(path, write)


def plot(path: str, counts: np.ndarray, class_names: Sequence[str],
         title: str = '') -> None:
  """Draws the matrix as a heat map into a PNG, atomically.

  Colours are row-normalized (the fraction of each true class), so a rare
  class's mistakes show as clearly as a common one's; the counts themselves
  are written in the cells when there are at most `MAX_ANNOTATED_CLASSES`.
  """
  n = len(class_names)
  fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  # Cells of about 0.45 inch up to 20 classes; CIFAR-100 gets 0.28 inch.
  side = min(2.5 + 0.45 * n, 30)
  fig = Figure(figsize=(side + 1.5, side))
  ax = fig.subplots()
  image = ax.imshow(fractions, cmap='Blues', vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
               label='fraction of the true class')
  fontsize = 9 if n <= MAX_ANNOTATED_CLASSES else 6
  # Long names would overlap side by side on the x axis.
  rotation = 90 if max((len(c) for c in class_names), default=0) > 2 else 0
  ax.set_xticks(range(n), class_names, rotation=rotation, fontsize=fontsize)
  ax.set_yticks(range(n), class_names, fontsize=fontsize)
  ax.set(xlabel='predicted class', ylabel='true class', title=title)
  if n <= MAX_ANNOTATED_CLASSES:
    for (t, p), count in np.ndenumerate(counts):
      # White on the dark end of the colour map, to stay readable.
      ax.text(p, t, str(count), ha='center', va='center', fontsize=fontsize,
              color='white' if fractions[t, p] > 0.5 else 'black')
  fig.tight_layout()
  files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
