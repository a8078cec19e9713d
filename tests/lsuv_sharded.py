"""LSUV on a batch split over 2 devices measures the whole batch's variance.

Run by tests/test_lsuv.py with 2 forced CPU devices (XLA_FLAGS), which must
be set before JAX starts; prints OK.
"""

import jax
import jax.numpy as jnp
import numpy as np

from allconv_jax import lsuv, models, sharding

if __name__ == '__main__':
  assert jax.device_count() == 2, jax.devices()
  model = models.create('all_cnn_c', 10, width=0.0625, batch_norm=True)
  images = np.array(jax.random.normal(jax.random.key(1), (8, 32, 32, 3)))
  # Give the halves different means and spreads: an average of per-device
  # variances would then differ from the variance of the whole batch.
  images[4:] = 3.0 * images[4:] + 2.0
  # Random kernels without compiling the random initializers.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1]))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(
          rng.normal(0, 0.1, leaf.shape) if path[-1].key == 'kernel'
          else np.full(leaf.shape, float(path[-1].key in ('scale', 'var'))),
          jnp.float32), shapes)
  mesh = sharding.make_mesh()
  (batch,) = sharding.global_batch(mesh, images)
  assert len(batch.sharding.device_set) == 2
  assert batch.addressable_shards[0].data.shape[0] == 4

  single, single_report = lsuv.lsuv_init(model, variables, images)
  sharded, sharded_report = lsuv.lsuv_init(model, variables, batch)
  for a, b in zip(single_report.layers, sharded_report.layers):
    assert a.name == b.name and a.iterations == b.iterations, (a, b)
    np.testing.assert_allclose(b.variance_before, a.variance_before,
                               rtol=1e-4)
    np.testing.assert_allclose(b.variance_after, a.variance_after, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), single, sharded)
  print('OK')
