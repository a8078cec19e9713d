"""``--mode=export``: a trained run as a self-contained `jax.export` artifact.

  allconv --config=configs/digits.py --workdir=workdirs/digits --mode=export

writes ``<workdir>/export/``:

  model.jax   the selected checkpoint as serialized StableHLO
              (``jax.export.Exported.serialize()``): uint8 RGB images
              (b, 32, 32, 3), any batch size b, to float32 class
              probabilities (b, num_classes). The run's preprocessing and
              its weights are inside; nothing else is needed to call it.
  model.json  class names, input and output spec, versions, source step, and
              how to call it.

A consumer needs only JAX (of the same or a newer version, within JAX's
compatibility window for serialized exports), not this library:

  exported = jax.export.deserialize(bytearray(open('model.jax', 'rb').read()))
  probabilities = exported.call(images)

A TensorFlow SavedModel (jax2tf) is not written: TensorFlow is kept out of
this library's processes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

from allconv_jax import conv, datasets, disk, files, models, selection, trained
from allconv_jax import config as config_lib
from allconv_jax.errors import UserError
from allconv_jax.input_pipeline import Preprocessor

# Lowered for every platform JAX serves, so that an export made on a CPU runs
# on a GPU or TPU too (and the other way round).
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')


def export_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Exports the selected checkpoint of `workdir` to ``<workdir>/export/``.

  Returns:
    ``{'export', 'files', 'step', 'class_names'}``: the directory, the paths
    written, the checkpoint's step and the outputs' class names.

  Raises:
    UserError: a bad config, a workdir without a checkpoint, or an export
      path that cannot be written (named in the message).
  """
  config_lib.validate(config)
  out = os.path.join(workdir, files.EXPORT)
  # Before the checkpoint is loaded and the network lowered.
  if os.path.lexists(out) and not os.path.isdir(out):
    raise UserError(f'workdir: cannot write the export to {out}: it exists and '
                    'is not a directory; move it away')
  run = trained.load(workdir)
  names = datasets.class_names(run.config.dataset)
  spec = jax.ShapeDtypeStruct(
      jax.export.symbolic_shape('b, {}, {}, {}'.format(*models.INPUT_SHAPE)),
      jnp.uint8)
  exported = jax.export.export(jax.jit(probabilities_fn(run)),
                               platforms=PLATFORMS)(spec)
  info = describe(run, names, exported, os.path.relpath(
      selection.checkpoint_dir(workdir), workdir))
  write_dir(out, {files.EXPORT_MODEL: bytes(exported.serialize()),
                  files.EXPORT_INFO: (json.dumps(info, indent=2) + '\n').encode()})
  return dict(export=out, step=run.step, class_names=list(names),
              files=[os.path.join(out, n) for n in (files.EXPORT_MODEL,
                                                    files.EXPORT_INFO)])


def preprocess_fn(pre: Preprocessor) -> Callable[[jax.Array], jax.Array]:
  """`Preprocessor.__call__` in jnp: uint8 NHWC images to float32.

  The same steps in float32 throughout (the numpy version computes GCN in
  float64): the results agree to float32 rounding.
  """
  mean, std = jnp.asarray(pre.mean, jnp.float32), jnp.asarray(pre.std, jnp.float32)
  zca = None if pre.zca is None else jnp.asarray(pre.zca, jnp.float32)
  zca_mean = None if pre.zca is None else jnp.asarray(pre.zca_mean, jnp.float32)

  def preprocess(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    if zca is not None:
      n, d = images.shape[0], int(np.prod(images.shape[1:]))
      # GCN (input_pipeline.gcn). The pixel sum is exact in int32, so the
      # image mean is rounded once only.
      image_mean = images.reshape(n, d).astype(jnp.int32).sum(
          axis=1, keepdims=True).astype(jnp.float32) / d
      flat = x.reshape(n, d) - image_mean
      divisor = jnp.sqrt(jnp.sum(flat * flat, axis=1, keepdims=True)) / pre.gcn_scale
      flat = flat / jnp.where(divisor < 1e-8, 1.0, divisor)
      # HIGHEST: GPUs and TPUs would otherwise multiply float32 at lower
      # precision (TF32, bfloat16 passes), far from numpy's product.
      x = jnp.matmul(flat - zca_mean, zca,
                     precision=jax.lax.Precision.HIGHEST).reshape(images.shape)
    return (x - mean) / std

  return preprocess


def probabilities_fn(run: trained.Trained) -> Callable[[jax.Array], jax.Array]:
  """uint8 NHWC images to float32 class probabilities, weights inside."""
  # XLA's own convolutions: the run's conv_impl may be oneDNN, a custom call
  # that exists only in this library's process. Inference results agree to
  # float32 rounding either way.
  model = run.model.clone(conv=conv.conv_general_dilated('native'))
  preprocess = preprocess_fn(run.preprocessor)
  variables = run.variables  # Closed over: constants of the exported program.

  def probabilities(images: jax.Array) -> jax.Array:
    logits = model.apply(variables, preprocess(images), train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

  return probabilities


def describe(run: trained.Trained, names: tuple[str, ...],
             exported: jax.export.Exported, checkpoint_dir: str) -> dict:
  """The content of ``model.json``: what the artifact is and how to call it."""
  try:
    version = importlib.metadata.version('allconv_jax')
  except importlib.metadata.PackageNotFoundError:  # Run from a bare checkout.
    version = 'unknown'
  return {
      'format': 'jax.export (StableHLO), bytes of Exported.serialize()',
      'file': files.EXPORT_MODEL,
      'class_names': list(names),
      'input': {'shape': ['b', *models.INPUT_SHAPE], 'dtype': 'uint8',
                'layout': 'NHWC', 'channels': 'RGB', 'range': [0, 255],
                'note': 'any batch size b; resize images to 32x32 first '
                        '(--mode=predict uses Pillow, Image.BILINEAR)'},
      'output': {'shape': ['b', len(names)], 'dtype': 'float32',
                 'meaning': 'class probabilities (softmax), in the order of '
                            'class_names'},
      'preprocessing': 'included (the run\'s preprocess.npz: '
                       + ('GCN + ZCA, then ' if run.preprocessor.zca is not None else '')
                       + 'per-channel (x - mean) / std)',
      'platforms': list(exported.platforms),
      'calling_convention_version': exported.calling_convention_version,
      'versions': {'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
                   'flax': flax.__version__, 'allconv_jax': version},
      'source': {'step': int(run.step), 'checkpoint': checkpoint_dir,
                 'model': run.config.model, 'dataset': run.config.dataset.name,
                 'classes': run.config.dataset.get('classes', '')},
      'usage': ("import jax; exported = jax.export.deserialize(bytearray("
                f"open('{files.EXPORT_MODEL}', 'rb').read())); "
                'probabilities = exported.call(images)  # images: uint8 '
                '(b, 32, 32, 3)'),
  }


def write_dir(out: str, contents: dict[str, bytes]) -> None:
  """Writes `contents` (name -> bytes) as the directory `out`, atomically.

  Into a temporary directory beside it first, then renamed into place, so a
  crash leaves the previous export or none, never half of one.

  Raises:
    UserError: `out` or its parent cannot be written, naming `out`.
  """
  parent = os.path.dirname(os.path.abspath(out))
  tmp = old = None
  try:
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would hide it from other users.
    for name, data in contents.items():
      with open(os.path.join(tmp, name), 'wb') as f:
        f.write(data)
    if os.path.isdir(out):
      old = f'{tmp}-old'
      os.rename(out, old)
    try:
      os.rename(tmp, out)
    except OSError:
      if old:  # Put the previous export back.
        os.rename(old, out)
        old = None
      raise
  except OSError as e:
    if disk.fault(e):  # A full or read-only disk: one line of its own.
      raise disk.Fault(out, e.errno) from None
    raise UserError(f'workdir: cannot write the export to {out} '
                    f'({e.strerror or type(e).__name__})') from None
  finally:
    for path in (tmp, old):
      if path and os.path.islink(path):  # A previous export that was a link.
        os.remove(path)
      elif path and os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
