"""Preprocessing, batch order, augmentation and the learning-rate schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from allconv_jax import config as config_lib, files, input_pipeline, optimizers
from allconv_jax.errors import UserError


def _images(n=6, h=32, w=32):
  # Every pixel distinct, so any flip or shift is recognisable.
  x = np.arange(n * h * w * 3, dtype=np.float32).reshape(n, h, w, 3)
  return jnp.asarray(x + 1)  # No zeros: zero marks padding.


def test_flip_is_horizontal_and_random():
  x = _images(32)
  out = np.asarray(input_pipeline.augment(jax.random.key(0), x, max_shift=0, flip=True))
  flipped = [np.array_equal(o, np.asarray(i)[:, ::-1]) for o, i in zip(out, x)]
  same = [np.array_equal(o, np.asarray(i)) for o, i in zip(out, x)]
  assert all(f or s for f, s in zip(flipped, same))
  assert 0 < sum(flipped) < len(out)


def test_translation_is_bounded_by_max_shift():
  x = _images(32)
  shift = 3
  out = np.asarray(input_pipeline.augment(jax.random.key(1), x, max_shift=shift, flip=False))
  padded = np.pad(np.asarray(x), ((0, 0), (shift, shift), (shift, shift), (0, 0)))
  seen = set()
  for o, p in zip(out, padded):
    matches = [(dy, dx) for dy in range(2 * shift + 1) for dx in range(2 * shift + 1)
               if np.array_equal(o, p[dy:dy + 32, dx:dx + 32])]
    assert len(matches) == 1
    seen.add(matches[0])
  assert len(seen) > 5  # Offsets vary across the batch.
  assert input_pipeline.max_shift_pixels(0.1) == 3


def test_same_key_same_batch():
  x = _images(8)
  a = input_pipeline.augment(jax.random.key(5), x, max_shift=3, flip=True)
  b = input_pipeline.augment(jax.random.key(5), x, max_shift=3, flip=True)
  c = input_pipeline.augment(jax.random.key(6), x, max_shift=3, flip=True)
  assert jnp.array_equal(a, b) and not jnp.array_equal(a, c)


def test_batch_order_is_a_function_of_seed_and_step():
  batches = input_pipeline.TrainBatches(100, 32, seed=3)
  assert batches.steps_per_epoch == 3
  epoch0 = np.concatenate([batches.indices(s) for s in range(3)])
  assert len(set(epoch0.tolist())) == 96  # No repeats within an epoch.
  # A fresh object (a resumed run) jumping straight to step 4 agrees.
  again = input_pipeline.TrainBatches(100, 32, seed=3)
  assert np.array_equal(again.indices(4), batches.indices(4))
  assert not np.array_equal(batches.indices(3), batches.indices(0))  # New epoch.
  other = input_pipeline.TrainBatches(100, 32, seed=4)
  assert not np.array_equal(other.indices(0), batches.indices(0))


def test_batch_larger_than_dataset_is_a_user_error():
  with pytest.raises(UserError, match='batch_size'):
    input_pipeline.TrainBatches(10, 32, seed=0)


def test_eval_batches_cover_every_example_once():
  seen = []
  for idx, mask in input_pipeline.eval_batches(10, 4):
    assert len(idx) == 4
    seen += idx[mask > 0].tolist()
  assert seen == list(range(10))


def test_standardization_fitted_on_train():
  rng = np.random.default_rng(0)
  train_x = rng.integers(0, 256, (200, 8, 8, 3), dtype=np.uint8)
  pre = input_pipeline.Preprocessor.fit(train_x)
  out = pre(train_x)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-3)


def test_gcn_zca_whitens_and_round_trips_through_a_file(tmp_path):
  rng = np.random.default_rng(0)
  # Correlated pixels: a smooth random field plus noise.
  base = rng.normal(size=(3000, 4, 4, 1)).repeat(2, 1).repeat(2, 2)
  x = np.clip(128 + 40 * base + 10 * rng.normal(size=(3000, 8, 8, 3)), 0, 255)
  x = x.astype(np.uint8)
  pre = input_pipeline.Preprocessor.fit(x, standardize=False, gcn_zca=True,
                                        zca_filter_bias=1e-3)
  flat = pre(x).reshape(len(x), -1)
  cov = np.cov(flat, rowvar=False)
  # Whitened: near-identity covariance (GCN removes one direction, the mean).
  off_diagonal = cov - np.diag(np.diag(cov))
  assert np.abs(off_diagonal).max() < 0.1
  assert np.median(np.diag(cov)) == pytest.approx(1, abs=0.1)
  path = str(tmp_path / files.PREPROCESS)
  pre.save(path)
  np.testing.assert_array_equal(input_pipeline.Preprocessor.load(path)(x[:5]), pre(x[:5]))


def _structured_images(n, seed=0, side=32):
  """Images with spatial and colour structure, not white noise."""
  rng = np.random.default_rng(seed)
  smooth = rng.normal(size=(n, 4, 4, 1)).repeat(side // 4, 1).repeat(side // 4, 2)
  colour = rng.normal(size=(n, 1, 1, 3))
  x = 128 + 50 * smooth + 20 * colour + 8 * rng.normal(size=(n, side, side, 3))
  x = np.clip(x, 0, 255).astype(np.uint8)
  x[0] = 77  # A constant image: its norm is zero, so GCN leaves it undivided.
  return x


def test_gcn_zca_is_pylearn2s_definition():
  """The preprocessor against a float64 transcription of the paper's pipeline.

  pylearn2's global_contrast_normalize(X, scale=55.) with its defaults, then
  ZCA(filter_bias=0.1) fitted on the training images. On 16x16 images: the
  definition does not depend on the size, and the eigendecomposition of
  768 dimensions takes a fraction of a second where 3072 take many seconds.
  """
  train_x = _structured_images(600, side=16)
  test_x = _structured_images(50, seed=1, side=16)

  def gcn(images):
    x = images.reshape(len(images), -1).astype(np.float64)
    x = x - x.mean(axis=1)[:, None]
    normalizers = np.sqrt((x ** 2).sum(axis=1)) / 55.0
    normalizers[normalizers < 1e-8] = 1.0
    return x / normalizers[:, None]

  x = gcn(train_x)
  m = x.mean(axis=0)
  c = (x - m).T @ (x - m) / len(x)
  lam, v = np.linalg.eigh(c)
  p = v @ np.diag(1 / np.sqrt(lam + 0.1)) @ v.T
  expected = ((gcn(test_x) - m) @ p).reshape(test_x.shape)

  pre = input_pipeline.Preprocessor.fit(train_x, standardize=False, gcn_zca=True,
                                        gcn_scale=55.0, zca_filter_bias=0.1)
  got = pre(test_x)
  assert np.linalg.norm(gcn(train_x)[1]) == pytest.approx(55.0)
  assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4
  np.testing.assert_allclose(got, expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())


def test_a_preprocessing_file_of_the_old_definition_is_refused(tmp_path):
  # What versions before the pylearn2 definition wrote: no version field.
  path = str(tmp_path / files.PREPROCESS)
  np.savez(path, mean=np.zeros(3, np.float32), std=np.ones(3, np.float32),
           gcn_scale=55.0)
  with pytest.raises(UserError, match='older version.*start a new workdir') as e:
    input_pipeline.Preprocessor.load(path)
  assert '\n' not in str(e.value)


def test_piecewise_schedule_at_epoch_boundaries():
  config = config_lib.defaults()  # lr 0.01, x0.1 at epochs 200, 250, 300 of 350.
  steps_per_epoch = 390
  _, schedule = optimizers.make_optimizer(config, steps_per_epoch)
  for epoch, lr in ((0, 0.01), (199, 0.01), (200, 1e-3), (249, 1e-3),
                    (250, 1e-4), (300, 1e-5), (349, 1e-5)):
    step = epoch * steps_per_epoch
    assert float(schedule(step)) == pytest.approx(lr, rel=1e-5), epoch
  assert float(schedule(200 * steps_per_epoch - 1)) == pytest.approx(0.01)


def test_sgd_is_the_papers():
  config = config_lib.defaults()
  assert (config.optimizer, config.momentum, config.weight_decay) == ('sgd', 0.9, 0.001)
  tx, _ = optimizers.make_optimizer(config, 10)
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  grads = {'w': jnp.full(3, 2.0)}
  updates, state = tx.update(grads, state, params)
  # First step: -lr * (grad + weight_decay * w).
  np.testing.assert_allclose(updates['w'], -0.01 * (2.0 + 0.001), rtol=1e-6)


def test_without_preprocessing_pixels_are_scaled_to_unit_range():
  images = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
  pre = input_pipeline.Preprocessor.fit(images, standardize=False, gcn_zca=False)
  np.testing.assert_array_equal(pre(images).ravel(),
                                np.repeat(np.float32([0, 0.2, 1]), 3))


def test_a_fit_is_reused_for_the_same_images_and_settings():
  # A sweep's runs in one process fit the same transform once (the ZCA of
  # CIFAR took 15-70 s); other images or settings get a fit of their own.
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (40, 4, 4, 3), np.uint8)
  fit = lambda x, **kw: input_pipeline.Preprocessor.fit(x, gcn_zca=True, **kw)
  first = fit(images)
  assert fit(images.copy()) is first
  other = images.copy()
  other[0, 0, 0, 0] ^= 1
  assert fit(other) is not first
  assert fit(images, zca_filter_bias=0.2) is not fit(images)
  assert not np.array_equal(fit(images, zca_filter_bias=0.2).zca, first.zca)
