"""experiments/table3.py, with the library's training replaced for its tests.

Run by tests/test_experiments.py as a subprocess, with the experiments folder
on PYTHONPATH. Optionally, the library's training is replaced (TABLE3_FAKE:
"network rate seed" -> [final validation accuracy, final test accuracy] or
"diverge", for each member of the population it trains; each member is
appended to TABLE3_LOG) or GCN + ZCA off (TABLE3_NO_ZCA: its 3072 x 3072
eigendecomposition takes up to a minute on 2 shared cores; the
preprocessing has its own tests).
"""

import json
import os
import sys

import table3
from absl import app

from allconv_jax import reporting, stopping, train


def fake_train_and_evaluate(config, workdir):
  """Writes the recorded outcome of each (network, rate, seed) of a
  population as its member's files; all members diverged: `Diverged`."""
  from allconv_jax import files, population  # pylint: disable=g-import-not-at-top
  members = population.members(config)
  outcomes = json.loads(os.environ['TABLE3_FAKE'])
  table = []
  for member in members:
    key = f'{config.model} {member.learning_rate:g} {member.seed}'
    with open(os.environ['TABLE3_LOG'], 'a') as f:
      f.write(key + '\n')
    outcome = outcomes[key]
    directory = population.member_dir(workdir, member)
    os.makedirs(directory, exist_ok=True)
    files.write_text(os.path.join(directory, files.CONFIG),
                     population.member_config(config, member).to_json_best_effort())
    validation, test = (0.1, 0.1) if outcome == 'diverge' else outcome
    reporting.write_csv(os.path.join(directory, 'metrics.csv'), [dict(
        epoch=1, step=3, learning_rate=member.learning_rate, train_loss=1.0,
        train_accuracy=0.5, validation_loss=1.0,
        validation_accuracy=validation, test_loss=1.0, test_accuracy=test,
        diverged_step=2 if outcome == 'diverge' else -1, seconds=1.0)])
    summary = dict(
        selection='best_validation_accuracy', selected_epoch=1,
        selected_step=3, selected_validation_accuracy=validation,
        selected_test_accuracy=test, final_validation_accuracy=validation,
        final_test_accuracy=test, epochs=1)
    files.write_json(os.path.join(directory, 'summary.json'), summary)
    table.append(dict(member=member.name, diverged=outcome == 'diverge'))
  if all(m['diverged'] for m in table):
    raise stopping.Diverged(2, None)
  return dict(selection='best_validation_accuracy', members=table)


def without_zca(*args, make_config=table3.make_config):
  config = make_config(*args)
  config.preprocess.gcn_zca = False
  return config


if __name__ == '__main__':
  if 'TABLE3_FAKE' in os.environ:
    train.train_and_evaluate = fake_train_and_evaluate
  if os.environ.get('TABLE3_NO_ZCA'):
    table3.make_config = without_zca
  sys.argv[0] = 'experiments/table3.py'
  app.run(table3.main)
