"""Guided backprop, deconvnet and saliency (issue 7): the backward ReLUs, the
maps of a tiny network, and --mode=visualize on a tiny trained run."""

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from allconv_jax import files, models, visualize
from allconv_jax.errors import UserError
from conftest import TINY, run_main, snapshot


# ----------------------------------------------------------------- ReLUs


@pytest.mark.parametrize('method, expected', [
    # Forward input x = [-1, 2, 3, -4], incoming gradient g = [5, -6, 7, 8].
    ('guided', [0, 0, 7, 0]),      # x > 0 and g > 0
    ('deconvnet', [5, 0, 7, 8]),   # g > 0, whatever x
    ('saliency', [0, -6, 7, 0]),   # x > 0: the ordinary gradient
])
def test_backward_relu_against_hand_computed_case(method, expected):
  x = jnp.array([-1.0, 2.0, 3.0, -4.0])
  y, vjp = jax.vjp(visualize.relu(method), x)
  np.testing.assert_array_equal(y, jax.nn.relu(x))
  (grad,) = vjp(jnp.array([5.0, -6.0, 7.0, 8.0]))
  np.testing.assert_array_equal(grad, expected)


def test_saliency_relu_is_the_ordinary_gradient():
  x = jax.random.normal(jax.random.key(0), (50,))
  g = jax.random.normal(jax.random.key(1), (50,))
  _, ours = jax.vjp(visualize.relu('saliency'), x)
  _, plain = jax.vjp(jax.nn.relu, x)
  np.testing.assert_array_equal(ours(g)[0], plain(g)[0])


# ----------------------------------------------------------------- maps


@pytest.fixture(scope='module')
def tiny():
  model = models.create('all_cnn_c', 5, width=0.25, batch_norm=True)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *models.INPUT_SHAPE)))
  images = jax.random.normal(jax.random.key(1), (3, *models.INPUT_SHAPE))
  return model, variables, images


@pytest.mark.parametrize('method', visualize.METHODS)
@pytest.mark.parametrize('layer', ['conv1', 'conv4', 'classifier'])
def test_maps_have_the_input_shape_and_are_finite(tiny, method, layer):
  model, variables, images = tiny
  maps = visualize.reconstruct(model, variables, images, layer, [0, 1, 2], method)
  assert maps.shape == images.shape and maps.dtype == jnp.float32
  assert np.all(np.isfinite(maps))
  assert np.any(maps != 0)


@pytest.mark.rounding
def test_each_image_gets_its_own_units_map(tiny):
  # One backward pass, compared before anything amplifies rounding: a batch
  # of 3 and a batch of 1 may sum in other orders (a few ulps on any CPU;
  # 1e-5 is ~80), where another image's map would be off by O(1).
  # The batch is one backward pass of a summed objective; image 1's map must
  # still be the map of image 1 alone.
  model, variables, images = tiny
  batch = visualize.reconstruct(model, variables, images, 'conv4', [0, 5, 2])
  alone = visualize.reconstruct(model, variables, images[1:2], 'conv4', 5)
  np.testing.assert_allclose(batch[1:2], alone, rtol=1e-5, atol=1e-6)


def test_methods_agree_below_the_first_relu(tiny):
  # conv1 has no ReLU under it, so the three backward passes coincide there
  # (and differ above it).
  model, variables, images = tiny
  for layer, agree in (('conv1', True), ('conv4', False)):
    maps = [visualize.reconstruct(model, variables, images, layer, 3, method)
            for method in visualize.METHODS]
    assert all(np.allclose(maps[0], m) for m in maps[1:]) == agree, layer


def test_default_layers_are_low_middle_top():
  assert visualize.default_layers(models.create('all_cnn_c', 10)) == [
      'conv1', 'conv4', 'conv8']
  assert visualize.default_layers(models.create('model_a', 10)) == [
      'conv1', 'conv2', 'conv4']


def test_the_forward_pass_is_unchanged(tiny):
  model, variables, images = tiny
  for method in visualize.METHODS:
    swapped = model.clone(activation=visualize.relu(method))
    np.testing.assert_array_equal(swapped.apply(variables, images),
                                  model.apply(variables, images))


def test_mean_activations_cover_every_layer(tiny):
  model, variables, images = tiny
  scores = visualize.mean_activations(model, variables, np.asarray(images),
                                      batch_size=2)  # A padded last batch.
  assert {k: v.shape[1] for k, v in scores.items()} == visualize.layer_channels(model)
  assert all(v.shape[0] == 3 and np.all(v >= 0) for v in scores.values())


def test_api_names_what_exists(tiny):
  model, variables, images = tiny
  with pytest.raises(UserError, match=r"unknown layer 'conv99'; allowed: conv1, .*conv8, classifier"):
    visualize.reconstruct(model, variables, images, 'conv99', 0)
  with pytest.raises(UserError, match=r'classifier has 5 channels \(0-4\)'):
    visualize.reconstruct(model, variables, images, 'classifier', 7)
  with pytest.raises(UserError, match='allowed: guided, deconvnet, saliency'):
    visualize.relu('occlusion')


# ----------------------------------------------------------------- the mode


@pytest.fixture(scope='module')
def trained(tiny_run, tmp_path_factory):
  """A tiny All-CNN-C trained by the real binary (a copy: the mode writes
  into it)."""
  return tiny_run.copy(tmp_path_factory.mktemp('run'))


def test_mode_writes_png_grids(trained, capsys):
  code, err = run_main(capsys, *TINY, f'--workdir={trained}', '--mode=visualize',
                       '--config.visualize.layers=conv1,conv6,classifier',
                       '--config.visualize.num_units=2',
                       '--config.visualize.num_images=3')
  assert code == 0, err
  out = files.VISUALIZATIONS
  pngs = sorted(p.name for p in (trained / out).glob('*.png'))
  assert pngs == ['classifier.png', 'conv1.png', 'conv6.png']
  for name in pngs:
    image = matplotlib.image.imread(trained / out / name)
    # Three rows of images per unit, two units: taller than wide.
    assert image.ndim == 3 and image.shape[0] > image.shape[1] > 200
  assert (trained / out / 'index.json').exists()
  assert not list((trained / out).glob('*.tmp*'))


@pytest.mark.parametrize('overrides, message', [
    (['--config.visualize.layers=conv1,conv42'],
     "visualize.layers: unknown layer 'conv42'; allowed: conv1, conv2, conv3, "
     'conv4, conv5, conv6, conv7, conv8, classifier'),
    # The default layers are conv1, conv4 and conv8; conv1 has 24 channels.
    (['--config.visualize.units=0,30'],
     'visualize.units: unit 30 does not exist in conv1, which has 24 channels '
     '(0-23)'),
    # Five digit classes: the classifier has units 0-4.
    (['--config.visualize.layers=conv1,classifier', '--config.visualize.units=5'],
     'visualize.units: unit 5 does not exist in classifier, which has 5 '
     'channels (0-4)'),
    (['--config.visualize.units=first'],
     "visualize.units: 'first' is not a list of channel indices; give e.g. "
     "'0,3' or '' for the most active channels"),
    (['--config.visualize.num_images=0'],
     'visualize.num_images: must be a positive integer, got 0'),
])
def test_bad_layer_or_unit_is_one_line_error(trained, capsys, overrides, message):
  before = snapshot(trained)
  code, err = run_main(capsys, *TINY, f'--workdir={trained}', '--mode=visualize',
                       *overrides)
  assert (code, err) == (2, f'error: {message}\n')
  assert snapshot(trained) == before  # Nothing written, visualizations/ included.
