"""Architecture tests: parameter counts, shapes, names, padding and dropout."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from allconv_jax import conv, models, onednn
from allconv_jax.errors import UserError

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
  x = jnp.zeros((batch, *models.INPUT_SHAPE))
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
  assert set(models.conv_names(layers)) == expected
  variables, _ = _shapes(models.create(name, 10, batch_norm=True))
  bns = {f'bn{i}' for i in range(1, num_convs)}
  assert set(variables['params']) == expected | bns
  assert set(variables['batch_stats']) == bns


def test_the_spec_names_every_layer_with_a_name():
  # Checkpoints, LSUV and transfer patterns address layers by these names.
  layers = models.architecture('all_cnn_c', 10)
  assert [getattr(l, 'name', None) for l in layers] == [
      'dropout0', 'conv1', 'conv2', 'conv3', 'dropout1', 'conv4', 'conv5',
      'conv6', 'dropout2', 'conv7', 'conv8', 'classifier']
  convs = [l for l in layers if isinstance(l, models.Conv)]
  assert [l.bn for l in convs] == [f'bn{i}' for i in range(1, 9)] + [None]
  assert [l.on_input for l in layers if isinstance(l, models.Drop)] == [
      True, False, False]
  pooled = models.architecture('model_b', 10)
  assert models.conv_names(pooled) == [
      'conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'conv6', 'classifier']
  assert sum(isinstance(l, models.Pool) for l in pooled) == 2


def test_the_module_takes_its_names_from_the_spec():
  # A renamed spec renames the parameters: nothing re-derives them.
  layers = tuple(dataclasses.replace(l, name=f'my_{l.name}', bn=f'my_{l.bn}')
                 if isinstance(l, models.Conv) and l.bn else l
                 for l in models.architecture('model_a', 10, 0.125))
  variables, _ = _shapes(models.AllConvNet(layers=layers, batch_norm=True))
  assert set(variables['params']) == {
      'my_conv1', 'my_bn1', 'my_conv2', 'my_bn2', 'my_conv3', 'my_bn3',
      'my_conv4', 'my_bn4', 'classifier'}


def test_spatial_sizes_follow_the_paper():
  # 32 -> 16 -> 8 -> 6 for pooled, strided and all-conv networks alike.
  for name in ('model_a', 'strided_cnn_b', 'all_cnn_c', 'convpool_cnn_c'):
    model = models.create(name, 10)
    x = jnp.zeros((1, *models.INPUT_SHAPE))
    _, state = model.apply(model.init(jax.random.key(0), x), x,
                           capture_intermediates=True, mutable=['intermediates'])
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
  x = jax.random.normal(jax.random.key(1), (4, *models.INPUT_SHAPE))
  v = model.init(jax.random.key(0), x)
  assert jnp.array_equal(model.apply(v, x), model.apply(v, x))
  a = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(2)})
  b = model.apply(v, x, train=True, rngs={'dropout': jax.random.key(3)})
  assert not jnp.allclose(a, b)
  no_drop = models.create('all_cnn_c', 10, width=0.25, dropout=False)
  assert jnp.array_equal(no_drop.apply(v, x, train=True), model.apply(v, x))


def test_initializers():
  x = jnp.zeros((1, *models.INPUT_SHAPE))
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
  # ValueErrors, not UserErrors: config.validate checks a config's values
  # before they get here, so these are programming errors.
  cases = [(dict(name='all_cnn_d'), 'allowed: model_a, model_b'),
           (dict(init='xavier'), 'init: .*he_uniform'),
           (dict(dtype='float16'), 'dtype: .*float32, bfloat16'),
           (dict(width=0), 'width: must be positive'),
           (dict(num_classes=0), 'num_classes: must be a positive integer')]
  for kwargs, message in cases:
    with pytest.raises(ValueError, match=message) as error:
      models.create(**{'name': 'all_cnn_c', **kwargs})
    assert not isinstance(error.value, UserError), kwargs


def test_building_and_running_a_model_never_builds_onednn(monkeypatch):
  def build():
    raise AssertionError('models built the oneDNN extension')
  monkeypatch.setattr(onednn, 'unavailable_reason', build)
  _shapes(models.create('all_cnn_c', 10, width=0.125))
  # Nor does importing models import the module that builds it.
  code = 'import sys, allconv_jax.models; print("allconv_jax.onednn" in sys.modules)'
  out = subprocess.run([sys.executable, '-c', code], check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == 'False'


def test_summary_has_a_line_per_layer_with_its_shape_and_parameters():
  model = models.create('all_cnn_c', 10)
  lines = models.summary(model).splitlines()
  rows = {line.split()[0]: line.split() for line in lines[1:-2]}
  # Every convolution and dropout of the spec, in order, and nothing else.
  assert list(rows) == [layer.name for layer in model.layers]
  assert rows['conv3'][-2:] == ['16x16x96', '83,040']  # 3*3*96*96 + 96
  assert rows['conv7'][-2] == '6x6x192'
  assert rows['dropout0'][-2:] == ['32x32x3', '0']
  assert sum(int(r[-1].replace(',', '')) for r in rows.values()) == 1_369_738
  assert lines[-1].startswith('AllConvNet: 1,369,738 parameters')


# ------------------------------------------------ padding as in Caffe

NHWC = ('NHWC', 'HWIO', 'NHWC')
# Caffe's pad (PyTorch's padding=k//2) of a k x k conv, on every side.
CAFFE_PAD = {1: 0, 3: 1, 5: 2}
IMPLS = ('native', 'subpixel', 'onednn')
# Between them every kind of conv of the twelve: 3x3/1, 3x3/2, VALID 3x3 and
# 1x1/1 (all_cnn_c), 5x5/1 and 1x1/2 (strided_cnn_b), 5x5/2 (strided_cnn_a),
# and max-pooling (convpool_cnn_a).
PADDING_NETWORKS = ('all_cnn_c', 'strided_cnn_b', 'strided_cnn_a',
                    'convpool_cnn_a')
# 5 and 10 channels: oneDNN's 1x1/2 weight gradient once broke below 8.
WIDTH = 0.05


def _caffe_pool(x):
  # Caffe rounds the pooled size up; the last window overhangs the bottom and
  # right edges, which count as -inf.
  size = x.shape[1]
  out = -(-(size - 3) // 2) + 1
  extra = (out - 1) * 2 + 3 - size
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                           ((0, 0), (0, extra), (0, extra), (0, 0)))


def _reference(layers, params, x):
  """The network with explicit pads: (logits, {conv: its pre-ReLU output})."""
  outputs = {}
  for layer in layers:
    if isinstance(layer, models.Pool):
      x = _caffe_pool(x)
    elif isinstance(layer, models.Conv):
      name = layer.name
      p = 0 if layer.padding == 'VALID' else CAFFE_PAD[layer.kernel]
      y = lax.conv_general_dilated(
          x, params[name]['kernel'], (layer.stride, layer.stride),
          ((p, p), (p, p)), dimension_numbers=NHWC,
          precision=lax.Precision.HIGHEST) + params[name]['bias']
      outputs[name] = y
      x = jax.nn.relu(y)
  return jnp.mean(x, axis=(1, 2)), outputs


def _random_params(layers, seed):
  """Kernels of unit gain and non-zero biases, so every tap and bias counts."""
  rng = np.random.default_rng(seed)
  params, channels = {}, models.INPUT_SHAPE[-1]
  for layer in (l for l in layers if isinstance(l, models.Conv)):
    k, c = layer.kernel, layer.features
    params[layer.name] = {
        'kernel': jnp.asarray(rng.standard_normal((k, k, channels, c))
                              / np.sqrt(k * k * channels), jnp.float32),
        'bias': jnp.asarray(0.1 * rng.standard_normal(c), jnp.float32)}
    channels = c
  return params


def _loss_and_grads(apply, params, x):
  """A loss in which every logit counts; its gradients for params and x."""
  def loss(params, x):
    logits, outputs = apply(params, x)
    return jnp.sum(jnp.sin(3 * logits)), outputs
  return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(params, x)


def _assert_close(actual, expected, what):
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * scale,
                             err_msg=what)


@pytest.mark.parametrize('name', PADDING_NETWORKS)
def test_convs_pad_as_caffe_forward_and_gradients(name):
  layers = models.architecture(name, 10, WIDTH)
  params = _random_params(layers, seed=len(name))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *models.INPUT_SHAPE)),
                  jnp.float32)
  (_, expected), grads = _loss_and_grads(
      lambda p, x: _reference(layers, p, x), params, x)
  for impl in IMPLS:
    model = models.create(name, 10, width=WIDTH,
                          conv=conv.conv_general_dilated(impl))

    def apply(p, x):
      logits, state = model.apply({'params': p}, x, capture_intermediates=True,
                                  mutable=['intermediates'])
      inter = state['intermediates']
      return logits, {n: inter[n]['__call__'][0] for n in expected}
    (_, outputs), mine = _loss_and_grads(apply, params, x)
    for conv_name, want in expected.items():
      assert outputs[conv_name].shape == want.shape, (impl, conv_name)
      _assert_close(outputs[conv_name], want, f'{impl} {conv_name} output')
    _assert_close(mine[1], grads[1], f'{impl} input gradient')
    for conv_name in params:
      for leaf in ('kernel', 'bias'):
        _assert_close(mine[0][conv_name][leaf], grads[0][conv_name][leaf],
                      f'{impl} {conv_name} {leaf} gradient')


def test_first_strided_conv_is_centred_on_the_pixel():
  # All-CNN-C's conv3 (3x3, stride 2): output (i, j) is the window of input
  # rows 2i-1..2i+1 and columns 2j-1..2j+1, zeros outside; flax's 'SAME'
  # would take rows and columns 2i..2i+2 instead.
  model = models.create('all_cnn_c', 10, width=WIDTH)
  params = _random_params(models.architecture('all_cnn_c', 10, WIDTH), seed=3)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, *models.INPUT_SHAPE)),
                  jnp.float32)

  @jax.jit
  def run(params, x):
    _, state = model.apply({'params': params}, x, capture_intermediates=True,
                           mutable=['intermediates'])
    inter = state['intermediates']
    return inter['conv2_activation'][0][0], inter['conv3']['__call__'][0][0]
  inputs, out = map(np.asarray, run(params, x))
  kernel, bias = (np.asarray(params['conv3'][k]) for k in ('kernel', 'bias'))
  padded = np.pad(inputs, ((1, 1), (1, 1), (0, 0)))  # padded[r + 1] = x[r]

  def window(top, left):  # Rows top..top+2, columns left..left+2 of x.
    patch = padded[top + 1:top + 4, left + 1:left + 4]
    return np.einsum('hwc,hwcd->d', patch, kernel) + bias

  assert out.shape == (16, 16, kernel.shape[-1])
  # x[0, 0] is the centre of output (0, 0); row and column -1 are padding.
  np.testing.assert_allclose(out[0, 0], window(-1, -1), rtol=1e-5, atol=1e-5)
  assert not np.allclose(out[0, 0], window(0, 0), rtol=1e-3, atol=1e-3)
  for i, j in ((0, 5), (7, 0), (15, 15), (9, 12)):
    np.testing.assert_allclose(out[i, j], window(2 * i - 1, 2 * j - 1),
                               rtol=1e-5, atol=1e-5)


def test_pads_are_explicit_and_keep_the_sizes():
  for name in models.NAMES:
    size, sizes = models.INPUT_SHAPE[0], []
    for layer in models.architecture(name, 10):
      if isinstance(layer, models.Pool):
        size = -(-(size - 3) // 2) + 1  # Caffe's rounding up.
      elif isinstance(layer, models.Conv):
        p = 0 if layer.padding == 'VALID' else CAFFE_PAD[layer.kernel]
        assert layer.pads == ((p, p), (p, p)), (name, layer)
        size = (size + 2 * p - layer.kernel) // layer.stride + 1
      sizes.append(size)
    assert sorted(set(sizes), reverse=True) == [32, 16, 8, 6], name


# ------------------------------------------------------ input dropout


def _dropouts_that_run(model, variables, x):
  """The names of the dropout layers a training step goes through."""
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, capture_intermediates=True,
                               mutable=['intermediates'],
                               rngs={'dropout': jax.random.key(0)}),
      variables, x)
  return sorted(n for n in state['intermediates'] if n.startswith('dropout'))


def test_input_dropout_can_be_switched_off():
  layers = models.architecture('all_cnn_c', 10, WIDTH)
  variables = {'params': _random_params(layers, seed=4)}
  x = jnp.asarray(np.random.default_rng(2).standard_normal((4, *models.INPUT_SHAPE)),
                  jnp.float32)
  off = models.create('all_cnn_c', 10, width=WIDTH, input_dropout=False)
  on = models.create('all_cnn_c', 10, width=WIDTH)
  assert _dropouts_that_run(on, variables, x) == [
      'dropout0', 'dropout1', 'dropout2']
  assert _dropouts_that_run(off, variables, x) == ['dropout1', 'dropout2']
  # Without dropout, input_dropout has nothing to switch.
  assert _dropouts_that_run(models.create(
      'all_cnn_c', 10, width=WIDTH, dropout=False), variables, x) == []
  # The same network with a 0% input dropout: each dropout's mask comes from
  # its own name, so the hidden ones drop the same units as in `off`.
  zero = models.AllConvNet(
      layers=(dataclasses.replace(layers[0], rate=0.0), *layers[1:]))

  @jax.jit
  def run(variables, x):
    # An 'rbg' key: XLA compiles its masks in a second where threefry's take
    # several.
    rngs = {'dropout': jax.random.key(2, impl='rbg')}
    return [model.apply(variables, x, train=True, rngs=rngs)
            for model in (off, zero)] + [off.apply(variables, x)]
  out, zero_out, eval_out = run(variables, x)
  np.testing.assert_array_equal(out, zero_out)
  assert not np.allclose(out, eval_out)  # The 50% dropouts stay.
