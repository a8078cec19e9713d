"""Every experiment config loads, validates and documents its command."""

import importlib
import pathlib

import pytest

from allconv_jax import models, train

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
EXPERIMENTS = sorted(p.stem for p in CONFIG_DIR.glob('*.py')
                     if p.stem not in ('__init__', 'paper'))


def test_the_issue_configs_exist():
  assert {'default', 'model_a', 'model_b', 'model_c', 'strided_cnn_c',
          'convpool_cnn_c', 'all_cnn_c', 'all_cnn_c_cifar100',
          'digits'} <= set(EXPERIMENTS)


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_config_is_valid_and_documents_its_command(name):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config()
  train.validate_config(config)
  assert f'--config=configs/{name}.py' in module.__doc__
  assert 'Expected result' in module.__doc__


@pytest.mark.parametrize('name', ['model_a', 'model_b', 'model_c',
                                  'strided_cnn_c', 'convpool_cnn_c', 'all_cnn_c'])
def test_paper_configs_keep_the_papers_protocol(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.model == name and config.model in models.NAMES
  assert (config.optimizer, config.momentum, config.weight_decay) == ('sgd', 0.9, 0.001)
  assert tuple(config.lr_boundaries) == (200, 250, 300) and config.num_epochs == 350
  assert config.lr_decay == 0.1 and config.dropout
  assert config.preprocess.gcn_zca
