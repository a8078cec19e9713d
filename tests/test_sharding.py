"""Data parallelism on 4 fake CPU devices (`--xla_force_host_platform_device_count`).

XLA reads the flag when JAX initializes, so every multi-device check runs in
a fresh subprocess: one Python script (`_STEP_SCRIPT`) that compares the
sharded train step with a 1-device mesh in the same process and probes the
dropout masks of each device, and the real binary for training, resuming and
bad input. The pytest process itself keeps its single CPU device.
"""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY, run_binary

DEVICES = 4
_DEVICE_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S*')


def _env(devices):
  """The environment of a subprocess that sees `devices` CPU devices."""
  flags = _DEVICE_FLAG.sub('', os.environ.get('XLA_FLAGS', '')).strip()
  if devices > 1:
    flags = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  return {'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu',
          'TF_CPP_MIN_LOG_LEVEL': '2'}


# Runs in a process with 4 CPU devices; prints one JSON line of results.
_STEP_SCRIPT = r'''
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from allconv_jax import models, sharding, train
from configs import default

N = jax.device_count()
assert N == 4, jax.devices()
WIDTH = 0.125
mesh_n = sharding.make_mesh()
mesh_1 = Mesh(np.array(jax.devices()[:1]), (sharding.AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))

# The library's optimizer: SGD with momentum 0.9. Without weight decay the
# momentum trace after one step is exactly the gradient.
config = default.get_config()
config.weight_decay = 0.0
config.learning_rate = 0.05
tx, _ = train.make_optimizer(config, steps_per_epoch=100)


def initial_state(model, seed=0):
  # Random parameters drawn with numpy, in the shapes of `model.init`:
  # `train.init_state` compiles the model's forward pass (~10 s here),
  # which this test does not need to pay for.
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'mean' in name:
      return np.zeros(leaf.shape, leaf.dtype)
    if 'var' in name:
      return np.ones(leaf.shape, leaf.dtype)
    if 'kernel' in name:
      scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    else:  # Biases and BN scales and offsets, away from their usual 0 or 1.
      scale = 0.1
    base = 1.0 if 'scale' in name else 0.0
    return (base + scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  params = variables['params']
  return train.TrainState(step=np.zeros((), np.int32), params=params,
                          batch_stats=variables.get('batch_stats', {}),
                          opt_state=jax.device_get(tx.init(params)))


def on(mesh, tree):
  # A fresh replicated copy on `mesh` (the train step donates its arguments).
  return jax.device_put(tree, sharding.replicated(mesh))


def empty_metrics(mesh):
  return on(mesh, train.TrainMetrics.empty())


def leaves(tree):
  return {jax.tree_util.keystr(path): np.asarray(leaf, np.float64)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def max_abs(tree):
  return max((float(np.abs(v).max()) for v in leaves(tree).values()), default=0.0)


def max_diff(a, b):
  a, b = leaves(a), leaves(b)
  assert a.keys() == b.keys(), (sorted(a), sorted(b))
  return max((float(np.abs(a[k] - b[k]).max()) for k in a), default=0.0)


def norm(tree):
  return float(np.sqrt(sum((v ** 2).sum() for v in leaves(tree).values())))


def momentum(state):
  # The SGD momentum trace, which after one step is the gradient.
  is_trace = lambda s: isinstance(s, optax.TraceState)
  return [s.trace for s in jax.tree.leaves(state.opt_state, is_leaf=is_trace)
          if is_trace(s)]


# Images whose statistics differ a lot between the devices' slices (device k
# gets mean k and scale 1 + k), so per-device batch norm would be caught.
rng = np.random.default_rng(0)
B = 2 * N
per_device = np.repeat(np.arange(N, dtype=np.float32), B // N)[:, None, None, None]
images = rng.standard_normal((B, 32, 32, 3)).astype(np.float32)
images = (images * (1 + per_device) + per_device).astype(np.float32)
labels = rng.integers(0, 10, B).astype(np.int32)

out = {}

# 1. Dropout off: one step on N devices == the same global batch on 1 device.
for batch_norm in (False, True):
  model = models.create('all_cnn_c', 10, width=WIDTH, dropout=False,
                        batch_norm=batch_norm, bn_axis_name=sharding.AXIS)
  init = initial_state(model)
  new, metrics = {}, {}
  for name, mesh in (('n', mesh_n), ('1', mesh_1)):
    step = train.make_train_step(model, tx, mesh, seed=0, max_shift=0,
                                 flip=False)
    x, y = sharding.global_batch(mesh, images, labels)
    assert len(x.sharding.device_set) == mesh.size
    state, m = step(on(mesh, init), empty_metrics(mesh), x, y)
    new[name], metrics[name] = jax.device_get(state), m.compute()
  assert int(new['n'].step) == int(new['1'].step) == 1
  out['bn' if batch_norm else 'plain'] = dict(
      loss_n=float(metrics['n']['loss']), loss_1=float(metrics['1']['loss']),
      accuracy_n=float(metrics['n']['accuracy']),
      accuracy_1=float(metrics['1']['accuracy']),
      grad_diff=max_diff(momentum(new['n']), momentum(new['1'])),
      grad_scale=max_abs(momentum(new['1'])),
      grad_norm_ratio=norm(momentum(new['n'])) / norm(momentum(new['1'])),
      params_diff=max_diff(new['n'].params, new['1'].params),
      params_moved=max_diff(new['1'].params, init.params),
      opt_state_diff=max_diff(new['n'].opt_state, new['1'].opt_state),
      stats_diff=max_diff(new['n'].batch_stats, new['1'].batch_stats),
      stats_scale=max_abs(new['1'].batch_stats),
      stats_moved=max_diff(new['1'].batch_stats, init.batch_stats),
      num_stats=len(leaves(new['1'].batch_stats)))


# 2. Dropout on: what each device computes, seen through a wrapper of the
# model that adds every device's logits, gathered over the mesh, to the
# batch stats the library's train step returns.
class PerDeviceLogits:
  def __init__(self, model):
    self.model = model

  def apply(self, variables, images, *, train, rngs, mutable):
    del mutable
    logits = self.model.apply({'params': variables['params']}, images,
                              train=train, rngs=rngs)
    mine = jnp.zeros((N, *logits.shape), logits.dtype)
    mine = mine.at[jax.lax.axis_index(sharding.AXIS)].set(logits)
    return logits, {'batch_stats': {'logits': jax.lax.psum(mine, sharding.AXIS)}}


# One image, repeated on every device: all differences come from dropout.
same_x, same_y = sharding.global_batch(
    mesh_n, np.repeat(images[:1], N, axis=0), np.repeat(labels[:1], N))
model = models.create('all_cnn_c', 10, width=WIDTH, dropout=True)
step = train.make_train_step(PerDeviceLogits(model), tx, mesh_n, seed=0,
                             max_shift=0, flip=False)
init = initial_state(model)
runs = {}
for name, state in (('a', init), ('b', init),
                    ('next_step', init.replace(step=np.ones((), np.int32)))):
  new, _ = step(on(mesh_n, state), empty_metrics(mesh_n), same_x, same_y)
  runs[name] = (np.asarray(new.batch_stats['logits'])[:, 0],
                jax.device_get(new.params))
logits = runs['a'][0]
out['dropout'] = dict(
    per_device_logits=logits.tolist(),
    min_pair_diff=min(float(np.abs(logits[i] - logits[j]).max())
                      for i in range(N) for j in range(i + 1, N)),
    rerun_logits_diff=float(np.abs(logits - runs['b'][0]).max()),
    rerun_params_diff=max_diff(runs['a'][1], runs['b'][1]),
    next_step_min_diff=min(float(np.abs(logits[i] - runs['next_step'][0][i]).max())
                           for i in range(N)))
print('RESULT ' + json.dumps(out))
'''


@pytest.fixture(scope='module')
def step_results():
  """Runs `_STEP_SCRIPT` on 4 fake devices; returns its JSON."""
  result = subprocess.run(
      [sys.executable, '-c', _STEP_SCRIPT], cwd=REPO, capture_output=True,
      text=True, env=dict(os.environ, **_env(DEVICES)), timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT ')][-1]
  return json.loads(line[len('RESULT '):])


@pytest.mark.parametrize('case', ['plain', 'bn'])
def test_sharded_step_equals_one_device_step(step_results, case):
  r = step_results[case]
  assert r['loss_n'] == pytest.approx(r['loss_1'], rel=1e-5, abs=1e-5)
  assert r['accuracy_n'] == r['accuracy_1']
  # The gradients (the momentum trace after one step) are not tiny, and agree
  # to float32 rounding; a ratio of norms of N would mean summed instead of
  # averaged, and batch norm with per-device statistics would differ by the
  # order of the gradient itself (each device's images have other statistics).
  # With batch norm, the statistics are sums over 2 x 32 x 32 values per device
  # (pmean'd) or 8 x 32 x 32 on one device, which XLA:CPU accumulates in
  # float32 in different orders: agreement to 1e-4 of the gradient's scale.
  tolerance = (1e-4 if case == 'bn' else 1e-5) * max(1.0, r['grad_scale'])
  assert r['grad_scale'] > 1e-2
  assert r['grad_diff'] <= tolerance, (
      f"sharded gradient differs from the 1-device one by {r['grad_diff']:.3g} "
      f"(its norm is x{r['grad_norm_ratio']:.4f} the 1-device norm): {r}")
  assert r['opt_state_diff'] <= tolerance, r
  assert r['params_moved'] > 1e-3
  assert r['params_diff'] <= 1e-5, r
  if case == 'bn':
    # The running statistics of every BN layer moved, towards those of the
    # global batch (per-device statistics differ a lot by construction).
    assert r['num_stats'] == 2 * 8  # mean and var of bn1..bn8.
    assert r['stats_moved'] > 1e-2
    assert r['stats_diff'] <= 1e-5 * max(1.0, r['stats_scale']), r
  else:
    assert r['num_stats'] == 0


def test_dropout_masks_differ_across_devices_and_are_reproducible(step_results):
  r = step_results['dropout']
  # The same image and parameters on every device: each pair of devices
  # drew a different dropout mask ...
  assert r['min_pair_diff'] > 1e-3, r['per_device_logits']
  # ... the same ones again from the same state and step ...
  assert r['rerun_logits_diff'] == 0.0
  assert r['rerun_params_diff'] == 0.0
  # ... and new ones on every device at the next step.
  assert r['next_step_min_diff'] > 1e-3


def _rows(workdir):
  with open(workdir / 'metrics.csv') as f:
    return list(csv.DictReader(f))


def test_train_on_4_devices_then_resume_on_1(tmp_path):
  workdir = tmp_path / 'wd'
  first = run_binary(*TINY, f'--workdir={workdir}', '--config.num_epochs=1',
                     env=_env(DEVICES))
  assert first.returncode == 0, first.stderr[-3000:]
  assert f'{DEVICES} device(s)' in first.stderr
  first_rows = _rows(workdir)
  assert [int(r['epoch']) for r in first_rows] == [1]
  # Five classes: chance is 20%.
  assert float(first_rows[0]['test_accuracy']) > 0.45, first_rows
  assert os.listdir(workdir / 'checkpoints' / 'latest')

  second = run_binary(*TINY, f'--workdir={workdir}', '--config.num_epochs=2',
                      env=_env(1))
  assert second.returncode == 0, second.stderr[-3000:]
  assert '1 device(s)' in second.stderr
  assert 'Resuming from step' in second.stderr
  rows = _rows(workdir)
  assert [int(r['epoch']) for r in rows] == [1, 2]
  assert rows[0] == first_rows[0]  # Kept from the 4-device run's checkpoint.
  assert int(rows[1]['step']) == 2 * int(rows[0]['step'])
  assert max(float(r['test_accuracy']) for r in rows) > 0.6, rows
  summary = json.loads(second.stdout.strip().splitlines()[-1])
  assert summary['epochs'] == 2


def test_batch_size_not_divisible_by_devices_is_a_one_line_error(tmp_path):
  workdir = tmp_path / 'fresh'
  result = run_binary(*TINY, f'--workdir={workdir}', '--config.batch_size=30',
                      env=_env(DEVICES))
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: batch_size: 30 is not divisible by the 4 '
                             'devices'), lines
  assert 'Traceback' not in result.stderr
  assert not workdir.exists()
