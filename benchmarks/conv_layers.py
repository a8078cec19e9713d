"""Each convolution of All-CNN-C, pass by pass: XLA's against oneDNN's.

    python benchmarks/conv_layers.py [--batch 128] [--repeats 7]

For every conv layer of the paper's All-CNN-C (full width, float32) and
every pass training runs through it (forward, input gradient, kernel
gradient; the first layer needs no input gradient), times a jitted function
that computes only that pass, with ``conv_impl='subpixel'`` (XLA's
convolutions, under the library's XLA flags) and with ``'onednn'``, the
two alternating call by call. Prints the median milliseconds, GFLOP/s (a
multiply-add counts 2, taps on the padding included) and oneDNN's speed-up,
per layer and pass and summed per pass: the measurements behind
``conv_impl='auto'``.
"""

import argparse
import statistics
import time

import common
from allconv_jax import conv, models  # Before JAX starts: its XLA flags.
import jax

IMPLS = ('subpixel', 'onednn')
PASSES = ('forward', 'input grad', 'kernel grad')
NHWC = ('NHWC', 'HWIO', 'NHWC')


def pass_functions(impl: str, layer: models.Conv):
  """Jitted (x, w, g) -> one pass of `layer`'s convolution."""
  fn = conv.conv_general_dilated(impl)
  strides = (layer.stride, layer.stride)

  def forward(x, w):
    return fn(x, w, strides, layer.pads, dimension_numbers=NHWC)

  return {
      'forward': jax.jit(lambda x, w, g: forward(x, w)),
      'input grad': jax.jit(
          lambda x, w, g: jax.vjp(lambda x: forward(x, w), x)[1](g)[0]),
      'kernel grad': jax.jit(
          lambda x, w, g: jax.vjp(lambda w: forward(x, w), w)[1](g)[0]),
  }


def _seconds(fn, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--width', type=float, default=1.0,
                      help='1.0 = the paper; smaller only to smoke-test.')
  args = parser.parse_args()
  print('## machine\n\n' + common.machine(('jax', 'jaxlib', 'flax')))
  if common.busy():
    print('WARNING: the machine is busy (other work uses the cores).')
  print(f'\nAll-CNN-C width {args.width}, batch {args.batch}, float32; '
        f'median of {args.repeats} calls per pass and implementation\n')

  rows, totals = [], {(p, i): 0.0 for p in PASSES for i in IMPLS}
  keys = iter(jax.random.split(jax.random.key(0), 3 * 9))
  for name, size, channels, out, layer in common.all_cnn_c_convs(args.width):
    common.log(f'{name} ...')
    x = jax.random.normal(next(keys), (args.batch, size, size, channels))
    w = jax.random.normal(next(keys), (layer.kernel, layer.kernel, channels,
                                       layer.features)) * 0.05
    g = jax.random.normal(next(keys), (args.batch, out, out, layer.features))
    flops = 2 * g.size * channels * layer.kernel ** 2
    functions = {impl: pass_functions(impl, layer) for impl in IMPLS}
    for what in PASSES:
      if what == 'input grad' and name == 'conv1':
        continue  # Images need no gradient.
      times = {impl: [] for impl in IMPLS}
      for impl in IMPLS:  # Compile and warm up.
        _seconds(functions[impl][what], (x, w, g))
      for _ in range(args.repeats):
        for impl in IMPLS:
          times[impl].append(_seconds(functions[impl][what], (x, w, g)))
      ms = {impl: 1e3 * statistics.median(t) for impl, t in times.items()}
      for impl in IMPLS:
        totals[what, impl] += ms[impl]
      rows.append([
          name, f'{size}x{size} {channels}->{layer.features} '
          f'{layer.kernel}x{layer.kernel}/{layer.stride} pad {layer.pads[0][0]}',
          what, *(f'{ms[i]:.1f}' for i in IMPLS),
          *(f'{flops / ms[i] / 1e6:.0f}' for i in IMPLS),
          f"x{ms['subpixel'] / ms['onednn']:.2f}"])
  header = ['layer', 'input, channels, kernel/stride', 'pass', 'XLA ms',
            'oneDNN ms', 'XLA GFLOP/s', 'oneDNN GFLOP/s', 'oneDNN speed-up']
  print(common.table(header, rows))
  print()
  sums = [[what, *(f'{totals[what, i]:.1f}' for i in IMPLS),
           f"x{totals[what, 'subpixel'] / totals[what, 'onednn']:.2f}"]
          for what in PASSES]
  all_ms = {i: sum(totals[p, i] for p in PASSES) for i in IMPLS}
  sums.append(['all passes', *(f'{all_ms[i]:.1f}' for i in IMPLS),
               f"x{all_ms['subpixel'] / all_ms['onednn']:.2f}"])
  print(common.table(['pass, all layers', 'XLA ms', 'oneDNN ms',
                      'oneDNN speed-up'], sums))


if __name__ == '__main__':
  main()
