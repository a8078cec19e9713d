"""Wall time of LSUV on the paper's All-CNN-C, against plain forward passes.

    python benchmarks/lsuv_benchmark.py [--batch 128] [--width 1.0]

Prints the time of `lsuv.lsuv_init` on a batch of random images, first call
(tracing and compilation included) and second call (compiled function
reused), the number of rescaling iterations it performed, and the time of
that many plain jitted forward passes of the same network and batch, with
the ratio. Targets on a 2-core CPU: first call under 3 s, second call under
2x the forward passes. Run it on a quiet machine: other processes competing
for the cores distort every number here.
"""

import argparse
import time

import common
from allconv_jax import conv, lsuv, models  # Before JAX starts: its XLA flags.
import jax
import jax.numpy as jnp
import numpy as np


def _random_variables(model, seed: int = 0):
  """He-uniform kernels, zero biases, drawn with NumPy.

  `model.init` would compile the random initializers (seconds on a 2-core
  CPU) and that is not what is being measured.
  """
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *models.INPUT_SHAPE))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == 'kernel':
      limit = np.sqrt(6 / np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.uniform(-limit, limit, leaf.shape), jnp.float32)
    return jnp.full(leaf.shape, float(path[-1].key in ('scale', 'var')),
                    leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='all_cnn_c')
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--batch_norm', action='store_true')
  parser.add_argument('--measure', default='pre_activation',
                      choices=lsuv.MEASURES)
  args = parser.parse_args()

  model = models.create(args.model, 10, width=args.width,
                        batch_norm=args.batch_norm,
                        conv=conv.conv_general_dilated('auto'))
  variables = _random_variables(model)
  images = jax.random.normal(jax.random.key(1), (args.batch, *models.INPUT_SHAPE))
  jax.block_until_ready((variables, images))

  start = time.perf_counter()
  new, report = lsuv.lsuv_init(model, variables, images, measure=args.measure)
  jax.block_until_ready(new)
  first = time.perf_counter() - start

  start = time.perf_counter()
  new, report = lsuv.lsuv_init(model, variables, images, measure=args.measure)
  jax.block_until_ready(new)
  cached = time.perf_counter() - start

  iterations = sum(layer.iterations for layer in report.layers)
  forward = jax.jit(lambda v, x: model.apply(v, x))
  jax.block_until_ready(forward(new, images))  # Compile outside the timing.
  start = time.perf_counter()
  for _ in range(max(iterations, 1)):
    jax.block_until_ready(forward(new, images))
  forwards = time.perf_counter() - start
  single = forwards / max(iterations, 1)

  print(report.table())
  print()
  print(common.machine(('jax', 'jaxlib', 'flax')))
  print(f'{args.model} width {args.width:g}, batch {args.batch}, '
        f'{jax.device_count()} {jax.default_backend()} device(s)')
  print(f'LSUV first call (incl. compilation): {first:7.3f} s')
  print(f'LSUV second call (compiled):         {cached:7.3f} s')
  print(f'rescaling iterations performed:      {iterations:7d}')
  print(f'{max(iterations, 1)} jitted forward passes:{"":12s}'[:37]
        + f'{forwards:7.3f} s  ({single:.3f} s each)')
  print(f'ratio LSUV (compiled) / forward passes: {cached / forwards:.2f}')
  print(f'ratio LSUV (compiled) / one forward pass: {cached / single:.2f}')


if __name__ == '__main__':
  main()
