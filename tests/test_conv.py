"""The subpixel and oneDNN convolutions agree with XLA's; the CPU flags take effect.

The agreement is measured against XLA's convolution in float64: each float32
implementation may be at most `rounding.FACTOR` times as far from it as XLA's
own float32 convolution is, on this machine (tests/rounding.py). Both errors
come from the same float32 arithmetic of the same CPU, so the bound moves
with the CPU; a wrong window, stride or padding is off by O(1).
"""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from allconv_jax import config as config_lib
from allconv_jax import conv, models, onednn, trained, xla_flags
from allconv_jax.errors import UserError
from rounding import assert_within, max_abs_gap

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _network_convs():
  """(input size, kernel, stride, pads) of every conv of the twelve."""
  cases = set()
  for name in models.NAMES:
    size = models.INPUT_SHAPE[0]
    for layer in models.architecture(name, 10):
      if isinstance(layer, models.Pool):
        size = -(-size // 2)
      elif isinstance(layer, models.Conv):
        cases.add((size, layer.kernel, layer.stride, layer.pads))
        size = (size + sum(layer.pads[0]) - layer.kernel) // layer.stride + 1
  return sorted(cases, key=str)


# Beyond the networks: odd sizes, stride 3, a kernel narrower than the stride,
# explicit asymmetric padding.
EXTRA = [(7, 3, 2, 'SAME'), (9, 5, 3, 'VALID'), (8, 1, 3, 'SAME'),
         (11, 4, 2, ((2, 0), (1, 3)))]
STRIDED = [c for c in _network_convs() if c[2] > 1] + EXTRA
# The subpixel convolution is XLA's own at stride 1; oneDNN computes all.
CASES = ([('subpixel', *c) for c in STRIDED] +
         [('onednn', *c) for c in _network_convs() + EXTRA])


def test_the_networks_have_convs_of_each_kind():
  # Strided: 5x5 (strided_cnn_a), 1x1 (strided_cnn_b), 3x3 (the others) at
  # 32 and 16.
  assert {(s, k) for s, k, stride, _ in _network_convs() if stride > 1} == {
      (32, 5), (16, 5), (32, 1), (16, 1), (32, 3), (16, 3)}
  pads = lambda p: ((p, p), (p, p))
  assert {(k, p) for _, k, stride, p in _network_convs() if stride == 1} == {
      (1, pads(0)), (3, pads(1)), (3, pads(0)), (5, pads(2))}


def _ulps(exact, n=4):
  """`n` float32 ulps of the largest element: the bound where XLA's float32
  result happens to be exact (a floor of 0)."""
  return n * float(np.finfo(np.float32).eps) * float(np.max(np.abs(exact)))


@pytest.mark.rounding
@pytest.mark.parametrize('impl,size,kernel,stride,padding', CASES)
def test_matches_native_forward_and_gradients(impl, size, kernel, stride, padding):
  rng = np.random.default_rng(size * 100 + kernel * 10 + stride)
  x = jnp.asarray(rng.standard_normal((2, size, size + 1, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, 3, 5)), jnp.float32)

  def run(impl, x, w):
    fn = conv.conv_general_dilated(impl)
    def loss(x, w):
      y = fn(x, w, (stride, stride), padding, dimension_numbers=NHWC)
      # A non-uniform cotangent, so every output position matters.
      return jnp.sum(jnp.sin(y)), y
    (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
    return y, *grads

  with jax.enable_x64(True):
    exact = run('native', x.astype(jnp.float64), w.astype(jnp.float64))
  native, mine = run('native', x, w), run(impl, x, w)
  for what, e, a, b in zip(('output', 'input gradient', 'kernel gradient'),
                           exact, native, mine):
    assert a.shape == b.shape == e.shape, what
    assert_within(max_abs_gap(b, e), max_abs_gap(a, e), what,
                  minimum=_ulps(e))


@pytest.mark.rounding
@pytest.mark.parametrize('impl', ['subpixel', 'onednn'])
def test_whole_network_gradients_agree(impl):
  """All-CNN-C (two stride-2 convs) at a small width, every parameter."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, *models.INPUT_SHAPE)),
                  jnp.float32)
  labels = jnp.arange(4) % 10

  def grads(impl, dtype=jnp.float32):
    model = models.create('all_cnn_c', 10, width=0.125, dropout=False,
                          conv=conv.conv_general_dilated(impl)).clone(dtype=dtype)
    params = model.init(jax.random.key(0), x)['params']
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    def loss(p):
      logits = model.apply({'params': p}, x.astype(dtype))
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
    return jax.grad(loss)(params)

  with jax.enable_x64(True):
    exact = grads('native', jnp.float64)
  native, mine = grads('native'), grads(impl)
  for path, e in jax.tree_util.tree_leaves_with_path(exact):
    a, b = native, mine
    for key in path:
      a, b = a[key.key], b[key.key]
    assert_within(max_abs_gap(b, e), max_abs_gap(a, e),
                  jax.tree_util.keystr(path), minimum=_ulps(e))


@pytest.mark.parametrize('impl', ['subpixel', 'onednn'])
def test_bfloat16(impl):
  # oneDNN's convolutions are float32 only: bfloat16 ones go to subpixel.
  x = jnp.ones((2, 8, 8, 3), jnp.bfloat16)
  w = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
  fn = conv.conv_general_dilated(impl)
  dx = jax.grad(lambda x: jnp.sum(fn(x, w, (2, 2), 'SAME', dimension_numbers=NHWC)
                                  .astype(jnp.float32)))(x)
  ref = jax.grad(lambda x: jnp.sum(lax.conv_general_dilated(
      x, w, (2, 2), 'SAME', dimension_numbers=NHWC).astype(jnp.float32)))(x)
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(dx.astype(np.float32), ref.astype(np.float32))


def test_auto_is_onednn_on_this_cpu():
  assert jax.default_backend() == 'cpu'
  assert onednn.unavailable_reason() is None
  assert conv.resolve('auto') == 'onednn'
  assert conv.conv_general_dilated('native') is lax.conv_general_dilated


def test_without_onednn_auto_falls_back_and_onednn_is_a_user_error(monkeypatch, caplog):
  monkeypatch.setattr(onednn, 'unavailable_reason', lambda: 'no C++ compiler')
  assert conv.resolve('auto') == 'subpixel'
  assert 'no C++ compiler' in caplog.text
  # A UserError through a config: config.validate cannot know what this
  # machine can build.
  config = config_lib.defaults()
  config.conv_impl = 'onednn'
  with pytest.raises(UserError, match=r"conv_impl: 'onednn' is not available "
                     r'here \(no C\+\+ compiler\); allowed: auto, native, subpixel'):
    trained.create_model(config, 10)


def test_a_failed_build_is_a_reason_not_a_crash(tmp_path):
  env = dict(os.environ, CXX='false', ALLCONV_CACHE_DIR=str(tmp_path))
  out = subprocess.run(
      [sys.executable, '-c', 'from allconv_jax import conv, onednn; '
       'print(onednn.unavailable_reason()); print(conv.resolve("auto"))'],
      env=env, check=True, capture_output=True, text=True).stdout.splitlines()
  assert out == ['building onednn_conv.cc failed: false exited with status 1',
                 'subpixel']
  assert not list(tmp_path.iterdir())  # No half-written library left.


def test_unknown_impl_is_a_value_error():
  # Not a UserError: config.validate rules out an unknown conv_impl first.
  for resolve in (conv.resolve, conv.conv_general_dilated):
    with pytest.raises(ValueError, match='conv_impl:.*allowed: auto, native, '
                       'subpixel, onednn') as error:
      resolve('winograd')
    assert not isinstance(error.value, UserError)


_PROBE = str(pathlib.Path(__file__).parent / 'xla_flags_probe.py')


def _probe(env_update):
  env = {k: v for k, v in os.environ.items()
         if k not in ('XLA_FLAGS', xla_flags.OPT_OUT)}
  env.update(env_update)
  out = subprocess.run([sys.executable, _PROBE], env=env, check=True,
                       capture_output=True, text=True).stdout.splitlines()
  return out[0], out[1] == 'True'


def test_cpu_flags_are_applied_on_import_and_turn_ynnpack_off():
  flags, uses_ynn = _probe({})
  assert flags == '--xla_cpu_experimental_ynn_fusion_type='
  assert not uses_ynn
  # XLA's default, for contrast: the same convolution goes to YNNPACK.
  flags, uses_ynn = _probe({xla_flags.OPT_OUT: '0'})
  assert flags == '' and uses_ynn


def test_a_flag_the_user_set_is_kept():
  mine = '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'
  flags, _ = _probe({'XLA_FLAGS': f'--xla_force_host_platform_device_count=2 {mine}'})
  assert flags == f'--xla_force_host_platform_device_count=2 {mine}'
  flags, _ = _probe({'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  assert flags == ('--xla_force_host_platform_device_count=2 '
                   '--xla_cpu_experimental_ynn_fusion_type=')


def test_a_damaged_cached_build_is_rebuilt(tmp_path, monkeypatch):
  # The build's name depends on the environment, not on the cache: a damaged
  # file of that name in an empty cache costs one compile (the rebuild).
  name = onednn._build().name  # pylint: disable=protected-access
  monkeypatch.setenv('ALLCONV_CACHE_DIR', str(tmp_path))
  library = tmp_path / name
  library.write_bytes(b'not a shared library')
  out = subprocess.run(
      [sys.executable, '-c', 'from allconv_jax import onednn; '
       'print(onednn.unavailable_reason())'],
      env=dict(os.environ), check=True, capture_output=True, text=True).stdout
  assert out.strip() == 'None'
  assert library.read_bytes()[:4] == b'\x7fELF'
