"""Architecture tests: parameter counts, shapes and names of all twelve."""

import jax
import jax.numpy as jnp
import pytest

from allconv_jax import models

# Counts for CIFAR-10 (10 classes), float32, no batch norm, all with biases.
# All-CNN-C's 1,369,738 is also the Keras summary of the second reference.
PARAM_COUNTS = {
    'model_a': 839_242,
    'model_b': 885_610,
    'model_c': 954_730,
    'strided_cnn_a': 839_242,
    'strided_cnn_b': 885_610,
    'strided_cnn_c': 954_730,
    'convpool_cnn_a': 1_254_250,
    'convpool_cnn_b': 1_300_618,
    'convpool_cnn_c': 1_369_738,
    'all_cnn_a': 1_254_250,
    'all_cnn_b': 1_300_618,
    'all_cnn_c': 1_369_738,
}


def _shapes(model, batch=2):
  x = jnp.zeros((batch, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  out = jax.eval_shape(lambda v: model.apply(v, x), variables)
  return variables, out


def test_names_are_the_twelve_networks():
  assert len(models.NAMES) == 12
  assert set(PARAM_COUNTS) == set(models.NAMES)


@pytest.mark.parametrize('name', models.NAMES)
def test_parameter_count_and_output_shape(name):
  variables, out = _shapes(models.create(name, 10))
  count = sum(p.size for p in jax.tree.leaves(variables['params']))
  assert count == PARAM_COUNTS[name]
  assert out.shape == (2, 10) and out.dtype == jnp.float32


@pytest.mark.parametrize('name', models.NAMES)
def test_layers_are_named_in_order(name):
  layers = models.architecture(name, 10)
  num_convs = sum(isinstance(l, models.Conv) for l in layers)
  variables, _ = _shapes(models.create(name, 10))
  expected = {f'conv{i}' for i in range(1, num_convs)} | {'classifier'}
  assert set(variables['params']) == expected


def test_spatial_sizes_follow_the_paper():
  # 32 -> 16 -> 8 -> 6 for pooled, strided and all-conv networks alike.
  for name in ('model_a', 'strided_cnn_b', 'all_cnn_c', 'convpool_cnn_c'):
    model = models.create(name, 10)
    _, state = model.apply(
        model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))),
        jnp.zeros((1, 32, 32, 3)), capture_intermediates=True, mutable=['intermediates'])
    out = state['intermediates']['classifier']['__call__'][0]
    assert out.shape == (1, 6, 6, 10), name


def test_dropout_placement():
  layers = models.architecture('all_cnn_c', 10)
  drops = [(i, l.rate) for i, l in enumerate(layers) if isinstance(l, models.Drop)]
  assert drops[0] == (0, 0.2)
  # 50% right after each stride-2 conv that replaces a pool.
  for i, rate in drops[1:]:
    assert rate == 0.5 and layers[i - 1].stride == 2
  pooled = models.architecture('model_c', 10)
  for i, l in enumerate(pooled):
    if isinstance(l, models.Drop) and l.rate == 0.5:
      assert isinstance(pooled[i - 1], models.Pool)


def test_options_num_classes_batch_norm_dtype():
  variables, out = _shapes(models.create('all_cnn_c', 100, batch_norm=True,
                                         dtype='bfloat16'))
  assert out.shape == (2, 100) and out.dtype == jnp.float32
  assert 'bn1' in variables['params'] and 'batch_stats' in variables
  assert 'bias' not in variables['params']['conv1']  # BN's shift replaces it.
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))


def test_dropout_is_active_only_in_training():
  model = models.create('all_cnn_c', 10, width=0.25)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  v = model.init(jax.random.key(0), x)
  assert jnp.array_equal(model.apply(v, x), model.apply(v, x))
  a = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(2)})
  b = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(3)})
  assert not jnp.allclose(a, b)
  no_drop = models.create('all_cnn_c', 10, width=0.25, dropout=False)
  assert jnp.array_equal(no_drop.apply(v, x, train=True), model.apply(v, x))


def test_initializers():
  x = jnp.zeros((1, 32, 32, 3))
  for init in ('he_uniform', 'glorot_normal', 'gaussian', 'orthogonal', 'lsuv'):
    v = models.create('model_a', 10, init=init).init(jax.random.key(0), x)
    kernel = v['params']['conv2']['kernel']
    assert jnp.all(v['params']['conv2']['bias'] == 0)
    if init == 'gaussian':
      assert abs(float(kernel.std()) - 0.01) < 0.001
    if init == 'he_uniform':
      limit = (6 / (5 * 5 * 96)) ** 0.5
      assert float(jnp.abs(kernel).max()) <= limit


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match='allowed: model_a, model_b'):
    models.create('all_cnn_d')
  with pytest.raises(ValueError, match='init: .*he_uniform'):
    models.create('all_cnn_c', init='xavier')


def test_summary_table_lists_layers_and_total():
  text = models.summary(models.create('all_cnn_c', 10))
  assert 'classifier' in text and 'conv8' in text
  assert '1,369,738' in text
