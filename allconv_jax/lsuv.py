"""Layer-sequential unit-variance (LSUV) initialization (Mishkin & Matas, 2015).

LSUV is a data-driven initialization in two steps:

1. Every convolution kernel is replaced by an orthonormal matrix of the same
   shape (Saxe et al., 2014): the kernel, reshaped to ``fan_in x fan_out``,
   becomes the orthonormal factor ``U @ Vt`` of its own SVD.
2. From the input to the class layer, each convolution's output variance on
   a batch of real images is measured and its kernel divided by the square
   root of that variance, until the variance is within ``tol`` of 1 or
   ``max_iters`` rescalings have been done. Biases are left as they are.

    variables, report = lsuv_init(model, variables, images)
    print(report.table())  # See allconv_jax/lsuv_report.py.

How it is computed. Convolution is linear in its kernel, so with the kernel
scaled by ``s`` a layer's output is ``s * (out - b) + b``, where ``out`` is
its output with the orthonormal kernel and ``b`` its bias. The whole
initialization is therefore one jitted forward pass: when the pass reaches
a convolution, a flax method interceptor captures its output, a
`jax.lax.while_loop` finds the scale, and the rescaled output is what the
following layers see, exactly as if the kernel had been scaled. Measured
before the ReLU, the variance of ``s * (out - b) + b`` is a quadratic in
``s`` whose coefficients come from per-channel moments of ``out``, so the
loop is scalar arithmetic; after the ReLU it re-measures the captured
output (element-wise work, no convolution). No Python runs per iteration,
a layer costs one convolution however many iterations it takes, and LSUV
compiles once per (network, batch shape, measure): a second call reuses the
compiled function. Orthonormalizing is part of the same compiled function.

Where the variance is measured (``measure``):

* ``'pre_activation'`` (default, as in the paper): the convolution's output,
  before the ReLU (and before batch norm, when there is one).
* ``'post_activation'``: the output after the ReLU that follows the
  convolution (the class layer's own output when the network has no class
  ReLU). With batch norm this is the ReLU of the convolution's output, not
  of the batch norm's: anything after batch norm has unit variance whatever
  the kernel's scale, so a loop measuring there could never converge.

Batch norm. The measurement runs the network the way training sees it:
batch norm normalizes with the statistics of the batch itself (not the
running averages), and dropout is off. ``batch_stats`` are returned
unchanged: the running averages start at mean 0, variance 1, which is what
a unit-variance convolution output has anyway.

Sharding. Pass a batch sharded over the devices (e.g. from
`sharding.global_batch`) and the variances are those of the whole global
batch: the forward pass is jitted over the global array.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple

import flax
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from allconv_jax import lsuv_report, orthonormal

MEASURES = ('pre_activation', 'post_activation')

# Layers with fewer output elements per example are skipped, as in the
# reference implementations: their variance is too noisy to normalize.
MIN_ELEMENTS = 32

# Below this a variance counts as zero: dividing the kernel by its square
# root would overflow float32 or blow up rounding noise.
_ZERO_VARIANCE = 1e-12


# ----------------------------------------------------------------- helpers


class _Layer(NamedTuple):
  """Static facts about one convolution, found by tracing the network."""
  path: tuple[str, ...]
  elements: int        # output elements per example
  relu_follows: bool   # what 'post_activation' applies to the output

  @property
  def name(self) -> str:
    return '/'.join(self.path)


def _measurement_model(model: nn.Module) -> nn.Module:
  """The network as LSUV runs it: no dropout, no cross-device batch norm.

  `bn_axis_name` only works inside `shard_map`; under plain jit over a
  sharded batch, batch-norm statistics are global without it.
  """
  overrides = {field: value for field, value in
               (('dropout', False), ('bn_axis_name', None))
               if hasattr(model, field)}
  return model.clone(**overrides) if overrides else model


def _is_conv_call(module: nn.Module, method_name: str) -> bool:
  return isinstance(module, nn.Conv) and method_name == '__call__'


def _apply(model, variables, batch, **kwargs):
  # train=True so that batch norm uses the batch's statistics (dropout is off
  # in the measurement model); the updated running averages are discarded.
  return model.apply(variables, batch, train=True, mutable=['batch_stats'],
                     **kwargs)


@functools.lru_cache(maxsize=64)
def _conv_layers(model: nn.Module, example_shape: tuple[int, ...],
                 dtype: Any) -> tuple[_Layer, ...]:
  """The convolutions of `model` in call order, by an abstract trace."""
  found = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if _is_conv_call(context.module, context.method_name):
      path = tuple(context.module.path)
      # A ReLU follows every conv of AllConvNet except a class layer without
      # the class ReLU.
      relu_follows = not (path[-1] == 'classifier'
                          and not getattr(model, 'class_relu', True))
      found.append(_Layer(path, math.prod(out.shape[1:]), relu_follows))
    return out

  def init():
    with nn.intercept_methods(interceptor):
      model.init(jax.random.key(0), jnp.zeros((1, *example_shape), dtype),
                 train=True)

  jax.eval_shape(init)
  return tuple(found)


def _variance(x: jax.Array) -> jax.Array:
  # One variance over batch, space and channels, as in the paper; float32 so
  # bfloat16 networks get exact statistics.
  return jnp.var(x.astype(jnp.float32))


# ----------------------------------------------------------------- LSUV


def _rescale(out, bias, tol, max_iters, layer: _Layer, relu: bool):
  """Finds the kernel scale of one layer from its output.

  Args:
    out: the layer's float32 output ``conv(x, W) + bias``, W orthonormal.
    bias: the layer's float32 bias (a zero scalar if it has none).
    tol, max_iters: as for `lsuv_init`.
    layer: the layer's static facts.
    relu: measure the variance after a ReLU.

  Returns:
    Scalars (scale, variance before, variance after, iterations, variance
    of the output minus the bias); a layer is skipped, with scale 1, when the
    last is zero or when it has too few elements.
  """
  if relu:
    # The ReLU does not commute with the scale once there is a bias, so each
    # iteration measures the whole rescaled output again.
    z = out - bias
    def variance(scale):
      return _variance(jax.nn.relu(scale * z + bias))
    kernel_part = _variance(z)
  else:
    # Without a ReLU, var(scale * z + bias) = a scale^2 + 2 b scale + c, with
    # a = var(z), b = cov(z, bias), c = var(bias) over all output elements.
    # They follow from per-channel moments of the output, taken once, so the
    # loop itself is scalar arithmetic. Every array operation costs compile
    # time (XLA:CPU compiles each separately), hence one reduction for all
    # the moments over channels.
    axes = tuple(range(out.ndim - 1))
    channel_means = jnp.mean(out, axis=axes)
    channel_var = jnp.mean(jnp.square(out - channel_means), axis=axes)
    z_means = channel_means - bias
    bias = jnp.broadcast_to(bias, z_means.shape)
    m = jnp.mean(jnp.stack([channel_var, z_means, bias, z_means**2,
                            z_means * bias, bias**2]), axis=1)
    # Total variance = mean of the channel variances + variance of the means.
    a = m[0] + m[3] - m[1]**2
    b = m[4] - m[1] * m[2]
    c = m[5] - m[2]**2
    def variance(scale):
      return (a * scale + 2 * b) * scale + c
    kernel_part = a

  before = variance(jnp.float32(1))
  if layer.elements < MIN_ELEMENTS:
    return jnp.float32(1), before, before, jnp.int32(0), kernel_part

  def cond(carry):
    _, var, iterations = carry
    # A kernel that contributes nothing on this batch (the output minus the
    # bias is constant) cannot change the variance: the loop would only
    # blow it up. Non-finite variances stop the loop too.
    usable = (kernel_part > _ZERO_VARIANCE) & jnp.isfinite(var) & (var > 0)
    return usable & (jnp.abs(var - 1) >= tol) & (iterations < max_iters)

  def body(carry):
    scale, var, iterations = carry
    scale = scale / jnp.sqrt(var)
    return scale, variance(scale), iterations + 1

  scale, after, iterations = jax.lax.while_loop(
      cond, body, (jnp.float32(1), before, jnp.int32(0)))
  return scale, before, after, iterations, kernel_part


@functools.partial(jax.jit, static_argnames=('model', 'layers', 'measure'))
def _lsuv_pass(variables, batch, tol, max_iters, *, model, layers, measure):
  """Orthonormalizes all kernels, then rescales them layer by layer."""
  flat = traverse_util.flatten_dict(variables['params'])
  kernel_paths = [layer.path + ('kernel',) for layer in layers]
  kernels = orthonormal.orthonormalize_all([flat[path] for path in kernel_paths])
  flat.update(zip(kernel_paths, kernels))
  params = traverse_util.unflatten_dict(flat)
  by_path = {layer.path: layer for layer in layers}
  stats = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if not _is_conv_call(context.module, context.method_name):
      return out
    layer = by_path[tuple(context.module.path)]
    bias = flat.get(layer.path + ('bias',), jnp.zeros((), jnp.float32))
    bias = bias.astype(jnp.float32)
    relu = measure == 'post_activation' and layer.relu_follows
    out32 = out.astype(jnp.float32)
    scale, before, after, iterations, kernel_part = _rescale(
        out32, bias, tol, max_iters, layer, relu)
    stats[layer.name] = dict(scale=scale, before=before, after=after,
                             iterations=iterations, kernel_part=kernel_part)
    # The next layers see this layer as if its kernel were scaled already:
    # conv(x, scale * W) + b = scale * (out - b) + b.
    return (scale * out32 + (1 - scale) * bias).astype(out.dtype)

  with nn.intercept_methods(interceptor):
    _apply(model, dict(variables, params=params), batch)
  for layer, path in zip(layers, kernel_paths):
    flat[path] = flat[path] * stats[layer.name]['scale']
  return traverse_util.unflatten_dict(flat), stats


def _skip_reason(layer: _Layer, stats: Mapping[str, Any]) -> str:
  """Why `_rescale` left a layer unscaled, or ''; its loop cannot say why."""
  if layer.elements < MIN_ELEMENTS:
    return f'fewer than {MIN_ELEMENTS} elements per example'
  if not math.isfinite(float(stats['before'])):
    return 'non-finite variance'
  if not float(stats['kernel_part']) > _ZERO_VARIANCE:
    return 'zero variance'
  return ''


def _prepare(model, variables, batch, measure):
  """Checks the arguments; returns them as the compiled passes take them."""
  if not isinstance(batch, jax.Array):
    batch = np.asarray(batch)
  # Programming errors: config.validate checks lsuv.measure, and the batch
  # and model come from the library (every network in models.NAMES has convs).
  if measure not in MEASURES:
    raise ValueError(f"measure: unknown measure {measure!r}; allowed: "
                     f"{', '.join(MEASURES)}")
  if not isinstance(variables, Mapping) or 'params' not in variables:
    raise TypeError('variables must be the dict model.init returns, with a '
                    "'params' entry (and 'batch_stats' with batch norm)")
  if batch.ndim != 4:
    raise ValueError(f'batch: expected NHWC images, got shape {batch.shape}')
  if not jnp.issubdtype(batch.dtype, jnp.floating):
    raise ValueError(f'batch: expected preprocessed float images (see '
                     f'input_pipeline.Preprocessor), got {batch.dtype}')
  model = _measurement_model(model)
  layers = _conv_layers(model, tuple(batch.shape[1:]), jnp.dtype(batch.dtype))
  if not layers:
    raise ValueError(f'model: {type(model).__name__} has no nn.Conv layers '
                     'to initialize')
  return model, layers, batch, _colocate(_without_empty(variables), batch)


def _without_empty(variables: Mapping) -> dict:
  # train.TrainState keeps batch_stats={} without batch norm; dropping it
  # gives the structure model.init returns, and one compiled pass for both.
  return {k: v for k, v in variables.items() if k == 'params' or v}


def _colocate(variables, batch):
  """Replicates `variables` over the mesh of a sharded batch.

  jit refuses arguments committed to different device sets, and a caller
  may have initialized the parameters on one device only.
  """
  if (isinstance(batch, jax.Array) and isinstance(batch.sharding, NamedSharding)
      and len(batch.sharding.device_set) > 1):
    return jax.device_put(variables, NamedSharding(batch.sharding.mesh, P()))
  return variables


def lsuv_init(model: nn.Module, variables: Mapping[str, Any], batch, *,
              tol: float = 0.1, max_iters: int = 10,
              measure: str = 'pre_activation'
              ) -> tuple[dict, lsuv_report.Report]:
  """LSUV-initializes every convolution of a network; a pure function.

  Args:
    model: the flax module, e.g. from `models.create` (any ``init``; the
      kernels are orthonormalized here). Dropout is switched off and
      ``bn_axis_name`` ignored during the measurement.
    variables: the variables dict of the model, as `model.init` returns it:
      ``{'params': ...}`` or ``{'params': ..., 'batch_stats': ...}``. It is
      not modified.
    batch: preprocessed float images, NHWC, on one device or sharded over
      several (see the module docstring). 32-128 images are plenty.
    tol: stop rescaling a layer when ``|variance - 1| < tol``.
    max_iters: at most this many rescalings per layer (0 only
      orthonormalizes and measures).
    measure: ``'pre_activation'`` or ``'post_activation'`` (see the module
      docstring).

  Returns:
    ``(variables, report)``: a new variables dict of the same structure with
    every conv kernel replaced (same shapes; biases and ``batch_stats``
    unchanged) and a `lsuv_report.Report` of what happened to each layer.
    Skipped layers and layers that did not converge are also logged as
    warnings.

  Raises:
    ValueError: for an unknown `measure`, a non-positive `tol` or a negative
      `max_iters` (all checked in `config.validate` first), a batch that is
      not float NHWC images, or a model without convolutions.
  """
  if not tol > 0:
    raise ValueError(f'tol: must be positive, got {tol!r}')
  if not (isinstance(max_iters, (int, np.integer)) and max_iters >= 0):
    raise ValueError(
        f'max_iters: must be a non-negative integer, got {max_iters!r}')
  net, layers, batch, inputs = _prepare(model, variables, batch, measure)
  params, stats = _lsuv_pass(inputs, batch, jnp.float32(tol),
                             jnp.int32(max_iters), model=net,
                             layers=layers, measure=measure)
  stats = jax.device_get(stats)
  report = lsuv_report.build(
      [(layer.name, layer.elements, _skip_reason(layer, stats[layer.name]))
       for layer in layers], stats, measure=measure, tol=tol,
      max_iters=max_iters, batch_size=batch.shape[0])

  out = dict(variables, params=params)
  if isinstance(variables, flax.core.FrozenDict):
    out = flax.core.freeze(out)
  return out, report


# ----------------------------------------------------------------- checking


@functools.partial(jax.jit, static_argnames=('model', 'layers', 'measure'))
def _variances_pass(variables, batch, *, model, layers, measure):
  _, state = _apply(model, variables, batch,
                    capture_intermediates=_is_conv_call)
  variances = {}
  for layer in layers:
    (out,) = traverse_util.flatten_dict(state['intermediates'])[
        layer.path + ('__call__',)]
    if measure == 'post_activation' and layer.relu_follows:
      out = jax.nn.relu(out)
    variances[layer.name] = _variance(out)
  return variances


def layer_variances(model: nn.Module, variables: Mapping[str, Any], batch, *,
                    measure: str = 'pre_activation') -> dict[str, float]:
  """Each convolution's output variance on a batch, measured as LSUV does.

  An independent check of `lsuv_init` (it captures the outputs with flax's
  ``capture_intermediates`` from a plain forward pass).

  Args:
    model, variables, batch, measure: as for `lsuv_init`.

  Returns:
    ``{layer name: variance}``.
  """
  net, layers, batch, inputs = _prepare(model, variables, batch, measure)
  variances = _variances_pass(inputs, batch, model=net, layers=layers,
                              measure=measure)
  return {name: float(v) for name, v in jax.device_get(variances).items()}
