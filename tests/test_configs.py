"""Every experiment config loads, validates and documents its command.

The paper's twelve networks are one config, ``configs/paper.py:<network>``;
each is loaded through the binary's own flag parsing and its network built
and counted against the paper's Tables 1 and 2.
"""

import ast
import os
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from allconv_jax import config as base
from allconv_jax import models, trained
from allconv_jax.errors import UserError
from conftest import REPO

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
EXPERIMENTS = sorted(p.stem for p in CONFIG_DIR.glob('*.py')
                     if p.stem != '__init__')

# Tables 1 and 2 of the paper, transcribed: each network's layers from the
# input up to the shared top. The paper's Table 2 shows the variants of C
# only; those of A and B follow the rules of its Section 3.1 (below).
TABLE_1 = {
    'a': ['5x5 conv 96', '3x3 max-pool /2',
          '5x5 conv 192', '3x3 max-pool /2'],
    'b': ['5x5 conv 96', '1x1 conv 96', '3x3 max-pool /2',
          '5x5 conv 192', '1x1 conv 192', '3x3 max-pool /2'],
    'c': ['3x3 conv 96', '3x3 conv 96', '3x3 max-pool /2',
          '3x3 conv 192', '3x3 conv 192', '3x3 max-pool /2'],
}
TABLE_2 = {
    'strided_cnn_c': ['3x3 conv 96', '3x3 conv 96 /2',
                      '3x3 conv 192', '3x3 conv 192 /2'],
    'convpool_cnn_c': ['3x3 conv 96', '3x3 conv 96', '3x3 conv 96',
                       '3x3 max-pool /2',
                       '3x3 conv 192', '3x3 conv 192', '3x3 conv 192',
                       '3x3 max-pool /2'],
    'all_cnn_c': ['3x3 conv 96', '3x3 conv 96', '3x3 conv 96 /2',
                  '3x3 conv 192', '3x3 conv 192', '3x3 conv 192 /2'],
}
TOP = ['3x3 conv 192 valid', '1x1 conv 192', '1x1 conv 10']

# The second reference's Keras summary of its All-CNN-C, layer by layer.
KERAS_ALL_CNN_C = [2688, 83040, 83040, 166080, 331968, 331968, 331968, 37056,
                   1930]


def _table(network):
  """The transcribed layers of `network`."""
  if network in TABLE_2:
    return TABLE_2[network] + TOP
  variant, base_name = network.rsplit('_', 1)
  layers = []
  for layer in TABLE_1[base_name]:
    if 'max-pool' not in layer:
      layers.append(layer)
      continue
    last = layers.pop()
    width = last.split()[-1]
    if variant == 'model':
      layers += [last, layer]
    elif variant == 'strided_cnn':  # The conv before the pool gets stride 2.
      layers.append(f'{last} /2')
    elif variant == 'convpool_cnn':  # A 3x3 conv before the pool.
      layers += [last, f'3x3 conv {width}', layer]
    else:  # all_cnn: the pool becomes a 3x3 conv of stride 2.
      layers += [last, f'3x3 conv {width} /2']
  return layers + TOP


def _table_parameters(network):
  """Weights and biases of each conv of the transcription, input first."""
  counts, channels = [], 3
  for layer in _table(network):
    if 'conv' not in layer:
      continue
    kernel, _, width = layer.split()[:3]
    k = int(kernel.split('x')[0])
    counts.append(k * k * channels * int(width) + int(width))
    channels = int(width)
  return counts


def _parse(capsys, *args):
  """The binary's flag parsing alone: (exit code, config or None, stderr)."""
  from allconv_jax import main  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)
  cwd, argv = os.getcwd(), sys.argv
  os.chdir(REPO)
  sys.argv = ['allconv', '--workdir=/nonexistent/never-written', *args]
  try:
    try:
      main.parse_flags(sys.argv)
      code, config = 0, flags.FLAGS.config
    except SystemExit as e:
      code, config = e.code, None
  finally:
    os.chdir(cwd)
    sys.argv = argv
    flags.FLAGS.unparse_flags()
  return code, config, capsys.readouterr().err


def _parameter_counts(model):
  x = jnp.zeros((1, *models.INPUT_SHAPE))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))['params']
  names = models.conv_names(model.layers)
  return [sum(p.size for p in jax.tree.leaves(params[n])) for n in names]


def test_the_issue_configs_exist():
  assert {'default', 'paper', 'digits', 'all_cnn_c_cifar100',
          'transfer_cifar100', 'lsuv_all_cnn_c'} <= set(EXPERIMENTS)
  # One config for the twelve networks, no file per network.
  assert not set(EXPERIMENTS) & set(models.NAMES)


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_config_is_valid_and_documents_its_command(name):
  path = CONFIG_DIR / f'{name}.py'
  config = base.load(str(path))
  base.validate(config)
  doc = ast.get_docstring(ast.parse(path.read_text()))
  assert f'--config=configs/{name}.py' in doc
  assert 'Expected result' in doc


PAPER = base.load_module(str(CONFIG_DIR / 'paper.py'))


def test_the_twelve_networks_and_their_table_3_errors():
  assert tuple(PAPER.TEST_ERROR) == models.NAMES
  assert PAPER.TEST_ERROR['all_cnn_c'] == 9.08
  assert PAPER.TEST_ERROR['model_a'] == 12.47
  assert PAPER.LEARNING_RATES == (0.25, 0.1, 0.05, 0.01)


def test_the_transcription_matches_the_second_references_summary():
  assert _table_parameters('all_cnn_c') == KERAS_ALL_CNN_C
  assert sum(KERAS_ALL_CNN_C) == 1_369_738


@pytest.mark.parametrize('network', models.NAMES)
def test_paper_config_of_each_network(capsys, network):
  code, config, err = _parse(capsys, f'--config=configs/paper.py:{network}')
  assert code == 0, err
  base.validate(config)
  assert config.model == network
  assert (config.optimizer, config.momentum, config.weight_decay) == ('sgd', 0.9, 0.001)
  assert tuple(config.lr_boundaries) == (200, 250, 300) and config.num_epochs == 350
  assert config.lr_decay == 0.1 and config.dropout and config.input_dropout
  assert config.preprocess.gcn_zca and not config.preprocess.standardize
  assert config.augment.translate == 0 and not config.augment.flip
  assert config.dataset.name == 'cifar10' and config.dataset.validation_size == 0
  assert config.learning_rate in PAPER.LEARNING_RATES
  counts = _parameter_counts(trained.create_model(config, 10))
  assert counts == _table_parameters(network)


def test_paper_config_without_a_network_is_all_cnn_c(capsys):
  code, config, err = _parse(capsys, '--config=configs/paper.py')
  assert code == 0, err
  assert config.model == 'all_cnn_c'


@pytest.mark.parametrize('network', ['vgg', 'All_CNN_C', ''])
def test_an_unknown_network_is_a_one_line_error(capsys, network):
  code, config, err = _parse(capsys, f'--config=configs/paper.py:{network}')
  assert code == 2 and config is None
  assert len(err.strip().splitlines()) == 1, err
  assert err.startswith('error: config: ')
  assert f'unknown network {network!r}' in err
  assert 'allowed: ' + ', '.join(models.NAMES) in err


def test_the_second_references_final_model(capsys):
  code, config, err = _parse(capsys, '--config=configs/lsuv_all_cnn_c.py')
  assert code == 0, err
  base.validate(config)
  assert config.model == 'all_cnn_c' and config.init == 'lsuv'
  assert config.dropout and not config.input_dropout
  assert not config.class_relu
  assert config.batch_size == 32
  assert (config.optimizer, config.learning_rate, config.momentum,
          config.nesterov) == ('sgd', 0.01, 0.9, True)
  assert config.augment.translate == 0.1 and not config.augment.flip
  model = trained.create_model(config, 10)
  assert not model.input_dropout and not model.class_relu
  assert _parameter_counts(model) == KERAS_ALL_CNN_C


@pytest.mark.parametrize('field,value,message', [
    ('dataset.label', 'coarse', "dataset.label: 'coarse' is only for cifar100; allowed: fine"),
    ('lsuv.max_iters', -1, 'lsuv.max_iters: must be a non-negative integer, got -1'),
    ('transfer.head_init', 'random',
     "transfer.head_init: unknown head 'random'; allowed: zeros, fresh"),
])
def test_validate_names_the_field(field, value, message):
  config = base.defaults()
  config.init = 'lsuv'  # So that the LSUV fields are checked.
  config.update_from_flattened_dict({field: value})
  with pytest.raises(UserError, match=f'^{re.escape(message)}$'):
    base.validate(config)
