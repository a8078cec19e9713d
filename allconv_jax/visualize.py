"""What a unit responds to: guided backpropagation, deconvnet, saliency.

The paper's third contribution (Section 5) is guided backpropagation: to see
which part of an image makes a unit fire, differentiate the unit's activation
with respect to the image, but let only positive signal through each ReLU on
the way down. The three methods here differ only in that backward ReLU:

* ``'saliency'`` (Simonyan et al., 2014): the ordinary gradient; the signal
  passes where the ReLU's forward input was positive.
* ``'deconvnet'`` (Zeiler & Fergus, 2014): the signal passes where it is
  positive itself, whatever the forward input was.
* ``'guided'`` (the paper): both conditions, so only positive signal at
  positions the forward pass kept.

Convolutions are transposed and max-pools route the signal to the position
that won, as in an ordinary gradient, for all three. Each backward ReLU is a
`jax.custom_vjp` swapped into `AllConvNet` through its ``activation``
attribute; the network's forward pass is unchanged.

    maps = reconstruct(model, variables, images, 'conv4', units, 'guided')

The objective of image ``i`` is the activation of channel ``units[i]`` of the
layer (after its ReLU), summed over spatial positions, so a batch of images,
each with its own unit, takes one backward pass.

``--mode=visualize`` (`visualize_checkpoint`) loads the selected checkpoint of a
workdir, picks units of a few layers and the test images that excite them
most, and draws the three maps beside each image into
``<workdir>/visualizations/<layer>.png``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from matplotlib.figure import Figure  # No GUI backend needed, none changed.

from allconv_jax import (config as config_lib, datasets, files, input_pipeline,
                         models, trained)
from allconv_jax.errors import UserError

METHODS = ('guided', 'deconvnet', 'saliency')
TITLES = {'guided': 'guided backprop', 'deconvnet': 'deconvnet',
          'saliency': 'saliency'}


# ----------------------------------------------------------------- ReLUs


def _relu_with_backward(backward: Callable[[jax.Array, jax.Array], jax.Array]):
  """A ReLU whose gradient is `backward(forward input, incoming gradient)`."""

  @jax.custom_vjp
  def relu(x):
    return jnp.maximum(x, 0)

  def forward(x):
    return relu(x), x

  def backward_pass(x, g):
    return (backward(x, g),)

  relu.defvjp(forward, backward_pass)
  return relu


# Built once, so that a model cloned with one of them is the same static
# argument of `jax.jit` every time and compiles once.
RELUS = {
    'guided': _relu_with_backward(
        lambda x, g: jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g))),
    'deconvnet': _relu_with_backward(
        lambda x, g: jnp.where(g > 0, g, jnp.zeros_like(g))),
    'saliency': _relu_with_backward(
        lambda x, g: jnp.where(x > 0, g, jnp.zeros_like(g))),
}


def relu(method: str) -> Callable[[jax.Array], jax.Array]:
  """The ReLU whose backward pass implements `method`.

  Args:
    method: one of `METHODS`.

  Returns:
    A function equal to ``jax.nn.relu`` in the forward pass.
  """
  if method not in RELUS:
    raise UserError(f"method: unknown method {method!r}; allowed: {', '.join(METHODS)}")
  return RELUS[method]


# ----------------------------------------------------------------- layers


def layer_channels(model: models.AllConvNet) -> dict[str, int]:
  """``{layer name: output channels}`` from ``conv1`` to ``classifier``."""
  return {layer.name: layer.features for layer in model.layers
          if isinstance(layer, models.Conv)}


def default_layers(model: models.AllConvNet) -> list[str]:
  """A low, a middle and a top hidden layer, e.g. conv1, conv4, conv8."""
  hidden = list(layer_channels(model))[:-1]
  picks = [hidden[0], hidden[(len(hidden) - 1) // 2], hidden[-1]]
  return list(dict.fromkeys(picks))  # A very shallow network repeats one.


def check_layer(model: models.AllConvNet, layer: str, field: str = 'layer') -> None:
  """Raises a one-line `UserError` unless `model` has a layer named `layer`."""
  names = layer_channels(model)
  if layer not in names:
    raise UserError(f"{field}: unknown layer {layer!r}; allowed: {', '.join(names)}")


def _ends_in_relu(model: models.AllConvNet, layer: str) -> bool:
  return layer != 'classifier' or model.class_relu


# ----------------------------------------------------------------- maps


def _layer_output(model, variables, images, layer):
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  (out,) = state['intermediates'][f'{layer}_activation']
  return out


@functools.partial(jax.jit, static_argnames=('model',))
def _mean_activations(variables, images, *, model):
  # Dropout is off and batch norm uses its running averages at train=False,
  # so the forward pass is deterministic.
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  return {name[:-len('_activation')]: jnp.mean(out.astype(jnp.float32), axis=(1, 2))
          for name, (out,) in state['intermediates'].items()}


def mean_activations(model: models.AllConvNet, variables: Mapping[str, Any],
                     images: np.ndarray, batch_size: int = 500) -> dict[str, np.ndarray]:
  """Every layer's channels averaged over positions, for each image.

  Args:
    model: the network (an `AllConvNet`).
    variables: its ``params`` (and ``batch_stats``).
    images: preprocessed NHWC images.
    batch_size: images per forward pass.

  Returns:
    ``{layer name: (N, channels) float32 array}``; the layers are
    ``conv1``, ... and ``classifier``, each after its ReLU (the classifier
    has none when the model's ``class_relu`` is off).
  """
  parts = []
  for idx, mask in input_pipeline.eval_batches(len(images), batch_size):
    out = jax.device_get(_mean_activations(variables, images[idx], model=model))
    parts.append({k: v[mask > 0] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@functools.partial(jax.jit, static_argnames=('model', 'layer', 'method'))
def _reconstruct(variables, images, units, *, model, layer, method):
  model = model.clone(activation=RELUS[method])

  def objective(images):
    out = _layer_output(model, variables, images, layer)
    if _ends_in_relu(model, layer):
      # Start only where the unit fires: the deconvnet's backward ReLU would
      # otherwise let the signal down at positions the forward ReLU zeroed.
      # The value is unchanged (the output is zero there anyway).
      out = jnp.where(jax.lax.stop_gradient(out) > 0, out, jnp.zeros_like(out))
    picked = jnp.take_along_axis(out, units[:, None, None, None], axis=-1)
    # Images do not interact at train=False, so the gradient of the batch's
    # sum with respect to image i is that of image i's own objective.
    return jnp.sum(picked.astype(jnp.float32))

  return jax.grad(objective)(images.astype(jnp.float32))


def reconstruct(model: models.AllConvNet, variables: Mapping[str, Any],
                images, layer: str, units, method: str = 'guided') -> jax.Array:
  """The input-space map of one unit per image.

  Args:
    model: the network (an `AllConvNet`; its dropout and batch norm run as in
      evaluation).
    variables: its ``params`` (and ``batch_stats``).
    images: preprocessed (N, H, W, C) images.
    layer: ``'conv1'``, ... or ``'classifier'`` (see `layer_channels`).
    units: the channel to explain for each image, an int or (N,) ints.
    method: ``'guided'``, ``'deconvnet'`` or ``'saliency'``.

  Returns:
    float32 maps of the images' shape: the gradient of the unit's spatially
    summed activation with respect to the image, through the `method`'s
    backward ReLUs.

  Raises:
    UserError: for an unknown layer or method, or a unit the layer lacks.
  """
  check_layer(model, layer)
  relu(method)  # Checks the name.
  images = jnp.asarray(images)
  units = np.broadcast_to(np.asarray(units, np.int32), (images.shape[0],))
  channels = layer_channels(model)[layer]
  if units.size and not 0 <= units.min() <= units.max() < channels:
    raise UserError(f'units: {layer} has {channels} channels (0-{channels - 1}), '
                    f'got {sorted(set(units.tolist()))}')
  return _reconstruct(variables, images, jnp.asarray(units), model=model,
                      layer=layer, method=method)


# ----------------------------------------------------------------- config


def _positive(settings, field: str) -> int:
  value = settings[field]
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise UserError(f'visualize.{field}: must be a positive integer, got {value!r}')
  return value


def resolve_targets(model: models.AllConvNet, settings: ml_collections.ConfigDict
                    ) -> tuple[list[str], list[int] | None]:
  """The layers and units `config.visualize` asks for, checked.

  Returns:
    (layer names, unit indices or None for the most active ones).

  Raises:
    UserError: naming the field, for an unknown layer, a unit some chosen
      layer does not have, or a count that is not a positive integer.
  """
  _positive(settings, 'num_units')
  _positive(settings, 'num_images')
  names = [n.strip() for n in str(settings.layers).split(',') if n.strip()]
  layers = list(dict.fromkeys(names)) or default_layers(model)
  for layer in layers:
    check_layer(model, layer, 'visualize.layers')
  text = [u.strip() for u in str(settings.units).split(',') if u.strip()]
  if not text:
    return layers, None
  try:
    units = list(dict.fromkeys(int(u) for u in text))
  except ValueError:
    raise UserError(f'visualize.units: {settings.units!r} is not a list of '
                    "channel indices; give e.g. '0,3' or '' for the most "
                    'active channels') from None
  channels = layer_channels(model)
  for layer in layers:
    bad = [u for u in units if not 0 <= u < channels[layer]]
    if bad:
      raise UserError(f'visualize.units: unit {bad[0]} does not exist in {layer}, '
                      f'which has {channels[layer]} channels (0-{channels[layer] - 1})')
  return layers, units


# ----------------------------------------------------------------- drawing


def display(grad_map: np.ndarray) -> np.ndarray:
  """Scales a signed map into [0, 1] for imshow, zero at mid-gray.

  Each map gets its own scale (its 99.5th percentile of magnitudes, so that
  a few extreme pixels do not wash the rest out); the maps' absolute sizes
  are not comparable across methods anyway.
  """
  scale = np.percentile(np.abs(grad_map), 99.5)
  if not scale > 0:
    return np.full_like(grad_map, 0.5)
  return np.clip(0.5 + 0.5 * grad_map / scale, 0.0, 1.0)


def draw(path: str, title: str, rows: Sequence[dict]) -> None:
  """Writes one PNG: a row per (unit, image), columns image then the maps.

  Args:
    path: the PNG to write (atomically).
    title: figure title.
    rows: dicts with ``label`` (row label), ``image`` (uint8 HWC) and one
      map per method of `METHODS`.
  """
  columns = ['image', *METHODS]
  # Constrained layout leaves room for the suptitle and the row labels.
  fig = Figure(figsize=(1.6 * len(columns) + 0.6, 1.6 * len(rows) + 0.6),
               layout='constrained')
  axes = fig.subplots(len(rows), len(columns), squeeze=False)
  for r, row in enumerate(rows):
    for c, column in enumerate(columns):
      ax = axes[r, c]
      ax.imshow(row['image'] if column == 'image' else display(row[column]),
                interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(TITLES.get(column, column), fontsize=9)
    axes[r, 0].set_ylabel(row['label'], fontsize=8)
  fig.suptitle(title, fontsize=10)
  files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))


# ----------------------------------------------------------------- mode


def visualize_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Draws guided backprop, deconvnet and saliency maps of a trained run.

  Loads the selected checkpoint of `workdir`, takes the layers and units of
  ``config.visualize`` (by default a low, a middle and a top layer, and
  each layer's most active channels on the test split), finds for each unit
  the test images on which its mean activation is highest, and writes
  ``<workdir>/visualizations/<layer>.png`` and an ``index.json`` of what
  was drawn.

  Returns:
    ``{'step', 'files', 'units'}``: the checkpoint's step, the paths
    written, and the units drawn per layer.

  Raises:
    UserError: for a bad config field or a workdir with no checkpoint,
      before anything is written.
  """
  config_lib.validate(config)
  data = datasets.load(config.dataset)
  model = trained.create_model(config, data.num_classes)
  settings = config.visualize
  layers, chosen_units = resolve_targets(model, settings)
  run = trained.load(workdir, trained.architecture(config, data.num_classes))
  variables, meta = run.variables, run.meta
  images, labels = run.preprocessor(data.test.images), data.test.labels
  raw_images = data.test.images

  scores = mean_activations(model, variables, images, config.eval_batch_size)
  out_dir = os.path.join(workdir, files.VISUALIZATIONS)
  os.makedirs(out_dir, exist_ok=True)
  written, drawn = [], {}
  index = dict(step=int(meta['step']), layers={})
  for layer in layers:
    layer_scores = scores[layer]
    # The channels with the highest mean activation over the test split.
    units = chosen_units or [int(u) for u in np.argsort(
        -layer_scores.mean(axis=0), kind='stable')[:settings.num_units]]
    # (unit, test image) pairs: each unit's most exciting images.
    picks = [(u, int(i)) for u in units for i in np.argsort(
        -layer_scores[:, u], kind='stable')[:settings.num_images]]
    unit_ids = np.array([u for u, _ in picks])
    image_ids = np.array([i for _, i in picks])
    chunk = config.eval_batch_size
    maps = {method: np.concatenate([
        np.asarray(reconstruct(model, variables, images[image_ids[s:s + chunk]],
                               layer, unit_ids[s:s + chunk], method))
        for s in range(0, len(picks), chunk)]) for method in METHODS}
    rows = [dict(label=f'unit {u}\ntest #{i}\nact {layer_scores[i, u]:.2f}',
                 image=raw_images[i], **{m: maps[m][n] for m in METHODS})
            for n, (u, i) in enumerate(picks)]
    path = os.path.join(out_dir, f'{layer}.png')
    draw(path, f'{config.model} {layer} (step {index["step"]}): top '
         f'{settings.num_images} test images per unit', rows)
    written.append(path)
    drawn[layer] = units
    index['layers'][layer] = {
        str(u): [dict(image=i, label=int(labels[i]),
                      mean_activation=float(layer_scores[i, u]))
                 for pu, i in picks if pu == u] for u in units}
    logging.info('Wrote %s (units %s)', path, units)
  index_path = os.path.join(out_dir, 'index.json')
  files.write_json(index_path, index)
  written.append(index_path)
  return dict(step=index['step'], files=written, units=drawn)
