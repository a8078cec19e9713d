"""notebooks/explore.ipynb runs top to bottom on its quick budget (issue 5).

The notebook is executed in a fresh Jupyter kernel, as a user would run it
from notebooks/: jupyter_client starts the ``python3`` kernel with this
test's own interpreter, and PYTHONPATH makes it import this checkout's
package.
"""

import nbclient
import nbformat

from allconv_jax import reporting

QUICK_EPOCHS = 2  # EPOCHS of the notebook when ALLCONV_NOTEBOOK_QUICK=1.


def _cell(nb, marker):
  """The one code cell whose source contains `marker`."""
  cells = [c for c in nb.cells if c.cell_type == 'code' and marker in c.source]
  assert len(cells) == 1, marker
  return cells[0]


def _images(cell):
  return sum('image/png' in out.get('data', {}) for out in cell.outputs)


def _stream(cell, name):
  return ''.join(out.text for out in cell.outputs
                 if out.output_type == 'stream' and out.name == name)


def test_notebook_runs_top_to_bottom(repo, tmp_path, monkeypatch):
  monkeypatch.setenv('ALLCONV_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('ALLCONV_NOTEBOOK_WORKDIR', str(tmp_path))
  monkeypatch.setenv('PYTHONPATH', str(repo))
  nb = nbformat.read(repo / 'notebooks' / 'explore.ipynb', as_version=4)
  # Raises CellExecutionError, with the cell and its traceback, on any error.
  nbclient.NotebookClient(
      nb, timeout=600, kernel_name='python3',
      resources={'metadata': {'path': str(repo / 'notebooks')}}).execute()

  assert f'repository: {repo}' in _stream(_cell(nb, 'find_repo_root'), 'stdout')
  assert 'QUICK=True' in _stream(_cell(nb, "QUICK = os.environ"), 'stdout')
  # The LSUV report and its bar plot.
  lsuv = _cell(nb, 'lsuv.lsuv_init')
  assert '9 layers, 0 skipped' in _stream(lsuv, 'stdout')
  assert _images(lsuv) == 1
  # The training run went to the given workdir, not to workdirs/notebook.
  digits = tmp_path / 'quick' / 'digits'
  assert len(reporting.read_csv(digits / 'metrics.csv')) == QUICK_EPOCHS
  assert _images(_cell(nb, 'curves.png')) == 1
  # Fine-tuning really started from the 0-4 run; both runs left their curves.
  assert 'Transferred all but' in _stream(_cell(nb, 'subset_config'), 'stderr')
  for run in ('subset1', 'subset2_transfer', 'subset2_scratch'):
    assert reporting.read_csv(tmp_path / 'quick' / run / 'metrics.csv'), run
  assert _images(_cell(nb, "ax.axhline(20")) == 1
  # Predictions: the first ten digits and, if any, the mistakes.
  predictions = _cell(nb, 'trained.load(digits_dir)')
  assert 'selected checkpoint: step' in _stream(predictions, 'stdout')
  assert _images(predictions) >= 1
  # Per-class results, predictions on image files, the exported model.
  per_class = _cell(nb, "'confusion.json'")
  assert 'per-class test accuracy: 0:' in _stream(per_class, 'stdout')
  assert _images(per_class) == 1
  own = _cell(nb, 'predict.predict_images')
  assert _stream(own, 'stdout').count('.png') == 4
  assert 'notes.txt' in _stream(own, 'stderr')
  exported = _stream(_cell(nb, 'export.export_checkpoint'), 'stdout')
  assert 'the same classes as the network above: True' in exported
  assert _images(_cell(nb, "'classifier', test_labels[picks]")) == 1
  # visualize_checkpoint: one PNG per default layer (conv1, conv4, conv8).
  assert _images(_cell(nb, 'visualize.visualize_checkpoint')) == 3
  assert sorted(p.name for p in (digits / 'visualizations').glob('*.png')) == [
      'conv1.png', 'conv4.png', 'conv8.png']
