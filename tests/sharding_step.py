"""One sharded train step on 4 CPU devices against one device, and dropout.

Run by `test_sharding.py` in a process started with
``--xla_force_host_platform_device_count=4``; prints one line
``RESULT <json>`` of measurements that the tests check. Not a test module
itself (pytest collects ``test_*.py`` only).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from allconv_jax import config as config_lib, models, optimizers, sharding, steps

N = jax.device_count()
assert N == 4, jax.devices()
WIDTH = 0.125
mesh_n = sharding.make_mesh()
mesh_1 = Mesh(np.array(jax.devices()[:1]), (sharding.AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))

# The library's optimizer: SGD with momentum 0.9. Without weight decay the
# momentum trace after one step is exactly the gradient.
config = config_lib.defaults()
config.weight_decay = 0.0
config.learning_rate = 0.05
tx, _ = optimizers.make_optimizer(config, steps_per_epoch=100)


def initial_state(model, seed=0):
  # Random parameters drawn with numpy, in the shapes of `model.init`:
  # `steps.init_states` compiles the model's forward pass (~10 s here),
  # which this test does not need to pay for.
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, *models.INPUT_SHAPE)))

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
  return steps.TrainState(step=np.zeros((), np.int32), params=params,
                          batch_stats=variables.get('batch_stats', {}),
                          opt_state=jax.device_get(tx.init(params)))


def on(mesh, tree):
  # A fresh replicated copy on `mesh` (the train step donates its arguments).
  return jax.device_put(tree, sharding.replicated(mesh))


def one_step(model, mesh):
  """`steps.make_train_steps`, one step on the whole given global batch."""
  fn = steps.make_train_steps(model, tx, mesh, seed=0, max_shift=0, flip=False)

  def step(state, metrics, x, y):
    indices, = sharding.global_batch(
        mesh, np.arange(y.shape[0], dtype=np.int32)[:, None])
    return fn(state, metrics, x, y, indices, 1)
  return step


def empty_metrics(mesh):
  return on(mesh, steps.TrainMetrics.empty())


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
images = rng.standard_normal((B, *models.INPUT_SHAPE)).astype(np.float32)
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
    step = one_step(model, mesh)
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
step = one_step(PerDeviceLogits(model), mesh_n)
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
