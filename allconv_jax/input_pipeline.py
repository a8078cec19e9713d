"""Preprocessing, batching and on-device augmentation.

The raw splits come from `allconv_jax.datasets` as uint8 arrays in memory.
Here they are turned into float32 once (per-channel standardization, and
optionally global contrast normalization + ZCA whitening fitted on the
training split only), cut into batches whose order is a pure function of
(seed, step), and augmented inside the jitted train step (random translation
by pad-and-crop, horizontal flip) from a key that is also a function of
(seed, step). A run resumed at step s therefore sees exactly the batches an
uninterrupted run sees from step s on.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from allconv_jax import files
from allconv_jax.errors import UserError

# Bumped whenever the meaning of the stored transform changes, so that a file
# written under an older definition is never applied with the new meaning.
# 2: GCN to an L2 norm of `gcn_scale` (pylearn2), ZCA with a filter bias.
PREPROCESS_VERSION = 2


_FITTED: dict = {}  # Preprocessor.fit's last fits, by images and settings.
_KEEP = 2


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """A fitted image transform: optional GCN + ZCA, then standardization.

  The GCN + ZCA definitions are those of ``configs/default.py``'s
  ``preprocess`` fields (pylearn2's, as used by the paper).

  Attributes:
    zca: (D, D) whitening matrix P on GCN'd flattened images, or None.
    zca_mean: (D,) mean m subtracted before whitening, or None.
    gcn_scale: the L2 norm of each image after global contrast normalization.
    mean: (C,) per-channel mean subtracted last (zeros when off).
    std: (C,) per-channel std divided last (ones when off).
  """
  zca: np.ndarray | None
  zca_mean: np.ndarray | None
  gcn_scale: float
  mean: np.ndarray
  std: np.ndarray

  @classmethod
  def fit(cls, images: np.ndarray, *, standardize: bool = True,
          gcn_zca: bool = False, gcn_scale: float = 55.0,
          zca_filter_bias: float = 0.1, chunk: int = 4096) -> 'Preprocessor':
    """Fits the transform on the training images (uint8, NHWC).

    The ZCA mean and covariance are accumulated in float64 over chunks of
    images, so CIFAR's 50,000 images never exist as one float64 array.

    The fit is a pure function of the images and the settings, and the
    runs of a sweep in one process (a study's seeds and rates) fit the same
    one: the last `_KEEP` fits are kept and returned again. ZCA's
    eigendecomposition of a 3072 x 3072 covariance took 15-70 s on 2 CPU
    cores, longer than a digits run.
    """
    key = (hashlib.sha1(np.ascontiguousarray(images)).hexdigest(),
           images.shape, images.dtype.str, standardize, gcn_zca, gcn_scale,
           zca_filter_bias)
    if key not in _FITTED:
      _FITTED[key] = cls._fit(images, standardize, gcn_zca, gcn_scale,
                              zca_filter_bias, chunk)
      while len(_FITTED) > _KEEP:
        del _FITTED[next(iter(_FITTED))]
    return _FITTED[key]

  @classmethod
  def _fit(cls, images, standardize, gcn_zca, gcn_scale, zca_filter_bias,
           chunk) -> 'Preprocessor':
    zca = zca_mean = None
    if gcn_zca:
      chunks = lambda: (gcn(images[i:i + chunk], gcn_scale)
                        for i in range(0, len(images), chunk))
      zca_mean = sum(c.sum(axis=0) for c in chunks()) / len(images)
      cov = sum((c - zca_mean).T @ (c - zca_mean) for c in chunks()) / len(images)
      eigenvalues, eigenvectors = np.linalg.eigh(cov)
      # Rounding can leave the null directions' eigenvalues slightly negative.
      eigenvalues = np.maximum(eigenvalues, 0)
      zca = (eigenvectors / np.sqrt(eigenvalues + zca_filter_bias)) @ eigenvectors.T
      # Applied in float32: a float64 product over CIFAR takes a minute, and
      # float32 keeps the result within 1e-6 of it.
      zca = zca.astype(np.float32)
    pre = cls(zca, zca_mean, gcn_scale, np.zeros(images.shape[-1], np.float32),
              np.ones(images.shape[-1], np.float32))
    if not (standardize or gcn_zca):  # Pixels in [0, 1], as Keras' 1/255.
      pre = dataclasses.replace(pre, std=np.full_like(pre.std, 255.0))
    if standardize:
      x = pre(images)
      mean = x.mean(axis=(0, 1, 2), dtype=np.float64)
      std = x.std(axis=(0, 1, 2), dtype=np.float64) + 1e-6
      pre = dataclasses.replace(pre, mean=mean.astype(np.float32),
                                std=std.astype(np.float32))
    return pre

  def __call__(self, images: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Maps uint8 NHWC images to float32, in chunks to bound memory."""
    out = np.empty(images.shape, np.float32)
    for i in range(0, len(images), chunk):
      x = images[i:i + chunk]
      if self.zca is not None:
        flat = (gcn(x, self.gcn_scale) - self.zca_mean).astype(np.float32)
        x = (flat @ self.zca).reshape(x.shape)
      out[i:i + chunk] = (x - self.mean) / self.std
    return out

  def save(self, path: str) -> None:
    """Writes the transform so that evaluation applies the same one."""
    arrays = dict(version=PREPROCESS_VERSION, mean=self.mean, std=self.std,
                  gcn_scale=self.gcn_scale)
    if self.zca is not None:
      arrays.update(zca=self.zca, zca_mean=self.zca_mean)
    files.atomic_write(path, lambda tmp: np.savez(tmp, **arrays))

  @classmethod
  def load(cls, path: str) -> 'Preprocessor':
    """Reads a transform written by `save`.

    Raises:
      UserError: the file is unreadable, or was written by an older version
        of this library whose transform meant something else.
    """
    try:
      with np.load(path) as f:
        version = int(f['version']) if 'version' in f else 1
        if version != PREPROCESS_VERSION:
          raise UserError(
              f'workdir: {path} was written by an older version of allconv_jax '
              f'(preprocessing version {version}, now {PREPROCESS_VERSION}: GCN '
              'and ZCA are defined differently); start a new workdir')
        return cls(f['zca'] if 'zca' in f else None,
                   f['zca_mean'] if 'zca_mean' in f else None,
                   float(f['gcn_scale']), f['mean'], f['std'])
    except UserError:
      raise
    except (OSError, KeyError, ValueError) as e:
      raise UserError(f'workdir: cannot read the preprocessing file {path} '
                      f'({type(e).__name__}); delete it to refit') from None


def gcn(images: np.ndarray, scale: float) -> np.ndarray:
  """Global contrast normalization of each image, in float64.

  pylearn2's ``global_contrast_normalize(X, scale, subtract_mean=True,
  use_std=False, sqrt_bias=0, min_divisor=1e-8)``: every image (all its
  values) minus its mean, divided by its L2 norm over `scale`; an image whose
  norm over `scale` is below 1e-8 (a constant image) is left undivided.

  Args:
    images: (N, ...) images of any dtype.
    scale: the L2 norm of each image afterwards.

  Returns:
    (N, D) float64, D the number of values per image.
  """
  flat = images.reshape(len(images), -1).astype(np.float64)
  flat -= flat.mean(axis=1, keepdims=True)
  divisor = np.linalg.norm(flat, axis=1, keepdims=True) / scale
  return flat / np.where(divisor < 1e-8, 1.0, divisor)


class TrainBatches:
  """Training batch indices as a pure function of (seed, step).

  Each epoch is a fresh permutation drawn from (seed, epoch); the last
  incomplete batch of an epoch is dropped so every step has the same shape.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    # A UserError: config.validate cannot know the size of the training split.
    if batch_size > num_examples:
      raise UserError(f'batch_size: {batch_size} is larger than the '
                      f'{num_examples} training examples')
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.seed = seed
    self.steps_per_epoch = num_examples // batch_size
    self._epoch, self._perm = -1, None

  def indices(self, step: int) -> np.ndarray:
    """Returns the example indices of the global batch of `step`."""
    epoch, i = divmod(step, self.steps_per_epoch)
    if epoch != self._epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._epoch, self._perm = epoch, rng.permutation(self.num_examples)
    return self._perm[i * self.batch_size:(i + 1) * self.batch_size]

  def chunk(self, start: int, stop: int, length: int) -> np.ndarray:
    """The batches of steps start..stop-1 as the columns of (batch, length).

    Columns past ``stop - start`` are zeros: steps a call does not run.
    """
    out = np.zeros((self.batch_size, length), np.int32)
    for column, step in enumerate(range(start, stop)):
      out[:, column] = self.indices(step)
    return out


def eval_batches(num_examples: int, batch_size: int):
  """Yields (indices, mask) covering every example once, last batch padded.

  The padding repeats index 0 with mask 0 so every batch has one shape and
  the evaluation step compiles once.
  """
  for start in range(0, num_examples, batch_size):
    idx = np.arange(start, min(start + batch_size, num_examples))
    mask = np.ones(batch_size, np.float32)
    if len(idx) < batch_size:
      mask[len(idx):] = 0
      idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
    yield idx, mask


def augment(key: jax.Array, images: jax.Array, *, max_shift: int,
            flip: bool) -> jax.Array:
  """Random translation and horizontal flip of a NHWC batch, on device.

  Args:
    key: PRNG key; the same key gives the same augmented batch.
    images: (N, H, W, C) float batch.
    max_shift: largest translation in pixels along each axis; the image is
      zero-padded (zero is the mean after standardization) and cropped back.
    flip: mirror each image left-right with probability 1/2.

  Returns:
    The augmented batch, same shape and dtype.
  """
  n, h, w, c = images.shape
  shift_key, flip_key = jax.random.split(key)
  if max_shift > 0:
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift),
                              (max_shift, max_shift), (0, 0)))
    offsets = jax.random.randint(shift_key, (n, 2), 0, 2 * max_shift + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mirror = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
    images = jnp.where(mirror, images[:, :, ::-1, :], images)
  return images


def max_shift_pixels(fraction: float, side: int = 32) -> int:
  """Translation bound in pixels for a fraction of the image side."""
  return int(round(fraction * side))
