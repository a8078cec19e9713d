"""Tests of LSUV initialization (allconv_jax/lsuv.py).

Networks are narrow (width 0.25 or less) and batches small so the file runs
in well under a minute on a 2-core CPU; the cases that share a network and
batch shape reuse one compiled LSUV pass.
"""

import json
import logging
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from allconv_jax import (datasets, input_pipeline, lsuv, lsuv_report, models,
                         orthonormal)
from allconv_jax.errors import UserError
from conftest import TEST_XLA_FLAGS

TOL = 0.1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def digits():
  """Two disjoint batches of 32 preprocessed digits, and their labels."""
  data = datasets.load(ml_collections.ConfigDict(dict(name='digits')))
  images = input_pipeline.Preprocessor.fit(data.train.images)(
      data.train.images[:64])
  labels = data.train.labels[:64]
  return (images[:32], labels[:32]), (images[32:], labels[32:])


def _kernels(params):
  """{conv name: kernel} of a flat AllConvNet's params (no batch norms)."""
  return {name: layer['kernel'] for name, layer in params.items()
          if 'kernel' in layer}


def _init(model, image_shape=(32, 32, 3), kernel_std=None, bias_std=0.0,
          seed=0):
  """Variables for `model` filled with NumPy draws.

  `model.init` would compile the random initializers, which takes seconds
  per network on a 2-core CPU. Kernels are He-uniform (or normal with
  `kernel_std`), conv biases zero (or normal with `bias_std`), batch-norm
  offsets zero, scales and running variances one.
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      if kernel_std is not None:
        return jnp.asarray(rng.normal(0, kernel_std, leaf.shape), jnp.float32)
      limit = math.sqrt(6 / math.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.uniform(-limit, limit, leaf.shape), jnp.float32)
    if name == 'bias' and not path[-2].key.startswith('bn'):
      return jnp.asarray(rng.normal(0, bias_std, leaf.shape), jnp.float32)
    value = 1.0 if name in ('scale', 'var') else 0.0
    return jnp.full(leaf.shape, value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _gram_error(kernel) -> float:
  """max |G - I| for the Gram matrix of the kernel's smaller side."""
  matrix = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
  if matrix.shape[0] < matrix.shape[1]:
    matrix = matrix.T
  return float(np.abs(matrix.T @ matrix - np.eye(matrix.shape[1])).max())


# ----------------------------------------------------------------- helper


@pytest.mark.parametrize('shape', [(3, 3, 3, 32), (3, 3, 16, 32)])
def test_orthonormalize_gives_orthonormal_kernel_of_same_shape(shape):
  kernel = jax.random.normal(jax.random.key(0), shape)
  q = orthonormal.orthonormalize(kernel)
  assert q.shape == kernel.shape and q.dtype == kernel.dtype
  assert _gram_error(q) < 1e-5
  # It is the polar factor U @ Vt of the kernel, not just any orthonormal
  # matrix: the kernel's directions are kept.
  u, _, vt = np.linalg.svd(np.asarray(kernel, np.float64).reshape(
      -1, shape[-1]), full_matrices=False)
  np.testing.assert_allclose(np.asarray(q).reshape(u.shape[0], -1), u @ vt,
                             atol=1e-4)
  # An orthonormal kernel is left exactly as it is.
  np.testing.assert_array_equal(orthonormal.orthonormalize(q), q)


def test_orthonormalize_handles_ill_conditioned_kernels():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.standard_normal((48, 48)))
  v, _ = np.linalg.qr(rng.standard_normal((48, 48)))
  kernel = (u * np.logspace(0, -7, 48)) @ v.T  # condition number 1e7
  q = orthonormal.orthonormalize(
      jnp.asarray(kernel.reshape(1, 1, 48, 48), jnp.float32))
  assert _gram_error(q) < 1e-5


# ----------------------------------------------------------------- LSUV


CASES = [  # (batch_norm, measure)
    (False, 'pre_activation'),
    (True, 'pre_activation'),
    (False, 'post_activation'),
    (True, 'post_activation'),
]


@pytest.mark.parametrize('batch_norm,measure', CASES)
def test_lsuv_gives_unit_variance(digits, batch_norm, measure):
  (x, _), (x2, _) = digits
  model = models.create('all_cnn_c', 10, width=0.25, batch_norm=batch_norm)
  if batch_norm:  # The convs have no biases.
    variables, tol = _init(model), TOL
  else:
    # Nonzero biases and a tight tolerance make layers iterate more than once.
    variables, tol = _init(model, bias_std=0.3), 0.02
  before = jax.tree.map(np.asarray, variables)

  new, report = lsuv.lsuv_init(model, variables, x, tol=tol, measure=measure)

  names = [f'conv{i}' for i in range(1, 9)] + ['classifier']
  assert [layer.name for layer in report.layers] == names
  assert not any(layer.skipped for layer in report.layers)
  for layer in report.layers:
    assert abs(layer.variance_after - 1) < tol, layer
    assert layer.iterations <= 10
  if not batch_norm:
    assert max(layer.iterations for layer in report.layers) >= 2
  # Measured again, independently, on the network with the new kernels.
  variances = lsuv.layer_variances(model, new, x, measure=measure)
  for name in names:
    assert abs(variances[name] - 1) < tol + 1e-3, (name, variances[name])
  # Close to 1 on images it has not seen too.
  held_out = lsuv.layer_variances(model, new, x2, measure=measure)
  for name in names:
    assert abs(held_out[name] - 1) < 0.3, (name, held_out[name])

  # The input is untouched, the output has the same structure and shapes.
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, variables))
  assert jax.tree.structure(new) == jax.tree.structure(variables)
  if batch_norm:
    jax.tree.map(np.testing.assert_array_equal, new['batch_stats'],
                 variables['batch_stats'])
  # Only conv kernels change: biases, and batch-norm scales and offsets, not.
  for name, layer in new['params'].items():
    old = variables['params'][name]
    for key, value in layer.items():
      assert value.shape == old[key].shape
      if key != 'kernel':
        np.testing.assert_array_equal(value, old[key])
  # Each kernel is an orthonormal one times the reported scale.
  scales = {layer.name: layer.scale for layer in report.layers}
  for name, kernel in _kernels(new['params']).items():
    assert _gram_error(np.asarray(kernel) / scales[name]) < 1e-4, name

  # Deterministic: the same inputs give bit-identical parameters.
  again, report_again = lsuv.lsuv_init(model, variables, x, tol=tol,
                                       measure=measure)
  jax.tree.map(np.testing.assert_array_equal, again, new)
  assert report_again == report


def test_report_formats_as_table_and_json(digits, tmp_path):
  (x, _), _ = digits
  model = models.create('all_cnn_c', 10, width=0.25)
  _, report = lsuv.lsuv_init(model, _init(model), x)  # Compiled above.
  table = report.table()
  assert str(report) == table
  lines = table.splitlines()
  assert lines[0].startswith('LSUV (pre_activation, tol 0.1, max_iters 10, '
                             'batch 32): 9 layers, 0 skipped')
  assert len(lines) == 2 + 9 and lines[-1].split()[0] == 'classifier'
  path = tmp_path / 'lsuv_report.json'
  report.save(str(path))
  saved = json.loads(path.read_text())
  assert saved == report.to_dict()
  assert lsuv_report.Report.load(str(path)) == report
  assert saved['measure'] == 'pre_activation' and len(saved['layers']) == 9
  assert set(saved['layers'][0]) == {
      'name', 'elements_per_example', 'variance_before', 'variance_after',
      'iterations', 'scale', 'skipped', 'reason'}


def test_report_load_keeps_non_finite_numbers_and_refuses_garbage(tmp_path):
  # JSON has no NaN: `save` writes None, and `load` must read it back.
  layer = lsuv_report.LayerReport('conv1', 96, math.nan, math.inf, 0, 1.0,
                                  True, 'non-finite variance')
  report = lsuv_report.Report((layer,), 'pre_activation', 0.1, 10, 32)
  path = tmp_path / 'lsuv_report.json'
  report.save(str(path))
  loaded = lsuv_report.Report.load(str(path))
  assert math.isnan(loaded.layers[0].variance_before)
  # Infinity comes back as NaN too: None does not say which it was.
  assert math.isnan(loaded.layers[0].variance_after)
  assert loaded.layers[0].reason == 'non-finite variance'
  path.write_text('{"layers": ')
  with pytest.raises(UserError, match='cannot read the LSUV report'):
    lsuv_report.Report.load(str(path))


def test_skips_layers_with_few_elements_and_zero_variance(caplog):
  # On 16x16 images the 2-class layer outputs 2x2x2 = 8 < 32 elements.
  model = models.create('all_cnn_c', 2, width=0.125)
  x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
  variables = _init(model, image_shape=(16, 16, 3))
  with caplog.at_level(logging.WARNING):
    new, report = lsuv.lsuv_init(model, variables, x)
  by_name = {layer.name: layer for layer in report.layers}
  small = by_name.pop('classifier')
  assert small.skipped and small.elements_per_example == 8
  assert small.reason == 'fewer than 32 elements per example'
  assert small.iterations == 0 and small.scale == 1
  assert 'skipping classifier' in caplog.text
  assert not any(layer.skipped for layer in by_name.values())
  assert _gram_error(new['params']['classifier']['kernel']) < 1e-5

  # A zero batch gives zero variance everywhere (biases start at zero): every
  # layer is skipped instead of dividing by zero.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    new, report = lsuv.lsuv_init(model, variables, jnp.zeros_like(x))
  assert all(layer.skipped for layer in report.layers)
  assert {layer.reason for layer in report.layers} == {
      'zero variance', 'fewer than 32 elements per example'}
  assert caplog.text.count('LSUV: skipping') == len(report.layers)
  for name, kernel in _kernels(new['params']).items():
    assert np.all(np.isfinite(kernel))
    assert _gram_error(kernel) < 1e-5, name


def test_gaussian_init_stalls_and_lsuv_learns(digits, seed=0):
  # All-CNN-C has nine conv layers: with Gaussian(0.01) kernels the signal
  # shrinks ~10x per layer, so the logits do not depend on the input and
  # SGD only moves the biases. LSUV of the very same kernels learns.
  (x, y), _ = digits
  model = models.create('all_cnn_c', 10, width=0.25, dropout=False)
  gaussian = _init(model, kernel_std=0.01, seed=seed)
  lsuv_vars, _ = lsuv.lsuv_init(model, gaussian, x)
  tx = optax.sgd(0.01, momentum=0.9, nesterov=True)  # The paper's optimizer.

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      logits = model.apply({'params': params}, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, logits

  def train(params, steps=10):
    """Losses, logit spread over examples, first-layer relative change."""
    first = params['conv1']['kernel']
    opt_state, losses = tx.init(params), []
    for _ in range(steps):
      params, opt_state, loss, logits = step(params, opt_state)
      losses.append(float(loss))
    change = (jnp.linalg.norm(params['conv1']['kernel'] - first)
              / jnp.linalg.norm(first))
    return losses, float(jnp.std(logits, axis=0).mean()), float(change)

  losses, spread, change = train(gaussian['params'])
  # Over six seeds: loss drop <= 0.007, spread ~2e-9, change < 1e-9.
  assert losses[0] - min(losses) < 0.02, losses
  assert spread < 1e-6 and change < 1e-6, (spread, change)
  losses, spread, change = train(lsuv_vars['params'])
  # Over six seeds: loss drop >= 0.2, spread >= 0.013, change >= 0.006.
  assert losses[0] - min(losses) > 0.1, losses
  assert spread > 1e-3 and change > 1e-3, (spread, change)


@pytest.mark.parametrize('name', models.NAMES)
def test_every_network_traces(name):
  # An abstract trace of the whole LSUV pass (no compile) for each network,
  # with and without batch norm; all_cnn_c and model_b also run for real.
  x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
  for batch_norm in (False, True):
    model = lsuv._measurement_model(
        models.create(name, 10, width=0.0625, batch_norm=batch_norm))
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    layers = lsuv._conv_layers(model, (32, 32, 3), jnp.dtype(jnp.float32))
    params, stats = jax.eval_shape(
        lambda v, x: lsuv._lsuv_pass(v, x, TOL, 10, model=model, layers=layers,
                                     measure='pre_activation'),
        variables, x)
    assert jax.tree.structure(params) == jax.tree.structure(variables['params'])
    assert set(stats) == set(_kernels(variables['params']))


def test_model_b_with_batch_norm(digits):
  # Max-pooling, 1x1 convolutions and batch norm, run for real.
  (x, _), _ = digits
  model = models.create('model_b', 10, width=0.125, batch_norm=True,
                        bn_axis_name='data')  # As train.py builds it.
  variables = _init(model)
  _, report = lsuv.lsuv_init(model, variables, x[:16])
  assert len(report.layers) == 7
  for layer in report.layers:
    assert not layer.skipped and abs(layer.variance_after - 1) < TOL


def test_bad_arguments_raise(digits):
  (x, _), _ = digits
  model = models.create('all_cnn_c', 10, width=0.25)
  variables = {'params': {}}  # Never reached: arguments are checked first.
  # config.validate checks lsuv.measure and lsuv.tol, and the batch comes
  # from the library: programming errors here.
  bad_calls = [
      ('^measure: unknown measure', lambda: lsuv.lsuv_init(
          model, variables, x, measure='after_relu')),
      ('^tol: must be positive', lambda: lsuv.lsuv_init(
          model, variables, x, tol=0)),
      ('^batch: expected preprocessed float', lambda: lsuv.lsuv_init(
          model, variables, np.zeros((4, 32, 32, 3), np.uint8))),
      ('^batch: expected NHWC', lambda: lsuv.lsuv_init(model, variables, x[0])),
      ('^max_iters: ', lambda: lsuv.lsuv_init(model, variables, x, max_iters=-1)),
  ]
  for match, call in bad_calls:
    with pytest.raises(ValueError, match=match) as info:
      call()
    # UserError is a ValueError too; only it is reported as the user's to fix.
    assert not isinstance(info.value, UserError)


_SHARDED_SCRIPT = str(pathlib.Path(__file__).parent / 'lsuv_sharded.py')


@pytest.mark.rounding
def test_sharded_batch_gives_global_variance():
  """One pass, compared before anything can amplify rounding (issue 27):
  each variance is a float32 sum over 4 x 32 x 32 values per channel, whose
  rounding in any order on any CPU is near sqrt(4096) x 2**-24 ~ 4e-6 of it;
  lsuv_sharded.py allows 1e-4, and an average of per-device variances is off
  by O(1) there."""
  flags = os.environ.get('XLA_FLAGS', '')  # Keeps an instruction-set cap.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
      f'{flags} --xla_force_host_platform_device_count=2 {TEST_XLA_FLAGS}'))
  result = subprocess.run([sys.executable, _SHARDED_SCRIPT], env=env,
                          cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('OK')
