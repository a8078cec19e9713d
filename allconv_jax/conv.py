"""Convolution implementations, chosen for speed per platform.

XLA differentiates a strided convolution by convolving the output gradient,
dilated with zeros, with the kernel: for stride 2 three quarters of the
multiply-adds are by those zeros, and on this library's CPU measurements the
input gradients of the two stride-2 layers of All-CNN-C cost as much as the
rest of their layers. `subpixel` computes the same input gradient without
the zeros: each of the s*s phases of the input (rows r, r+s, ...; columns q,
q+s, ...) receives gradient from the kernel taps of its own phase only, a
stride-1 convolution of the output gradient with that sub-kernel; the phases
are then interleaved. The forward pass and the weight gradient stay XLA's
(the same phase split of the weight gradient measured slower than XLA's).

Faster still on CPU are oneDNN's convolutions (`allconv_jax.onednn`), in all
three passes.

`IMPLS`:

* ``native``: `lax.conv_general_dilated` as it is.
* ``subpixel``: as above for strided convolutions; others are native.
* ``onednn``: float32 convolutions on oneDNN (CPU only); others (bfloat16,
  or a kernel narrower than its stride) as ``subpixel``.
* ``auto``: ``onednn`` on CPU where it can be built, else ``subpixel``;
  ``native`` on GPU and TPU, whose convolution libraries are their own.

`conv_general_dilated` turns one into the function a network is given
(`allconv_jax.models.AllConvNet.conv`). Resolving ``onednn``, or ``auto`` on
CPU, builds the oneDNN extension on first use; nothing else here does.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax

from allconv_jax import onednn
from allconv_jax.errors import UserError

IMPLS = ('auto', 'native', 'subpixel', 'onednn')
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def resolve(impl: str) -> str:
  """Returns the implementation `impl` stands for on the default backend.

  Args:
    impl: one of `IMPLS`.

  Returns:
    ``'native'``, ``'subpixel'`` or ``'onednn'``.

  Raises:
    ValueError: for an `impl` not in `IMPLS`.
    UserError: for ``'onednn'`` where it cannot be built, with the reason.
  """
  if impl not in IMPLS:
    # Not a UserError: config.validate has checked config.conv_impl already.
    raise ValueError(f"conv_impl: unknown implementation {impl!r}; "
                     f"allowed: {', '.join(IMPLS)}")
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'native'
    reason = onednn.unavailable_reason()
    if reason is None:
      return 'onednn'
    _warn_once(f'conv_impl auto: using XLA\'s convolutions; {reason}')
    return 'subpixel'
  if impl == 'onednn' and (reason := onednn.unavailable_reason()):
    # A UserError: config.validate cannot know what this machine can build.
    raise UserError(f"conv_impl: 'onednn' is not available here ({reason}); "
                    "allowed: auto, native, subpixel")
  return impl


@functools.cache
def _warn_once(message: str):
  logging.warning(message)


def conv_general_dilated(impl: str) -> Callable[..., jax.Array]:
  """Returns a drop-in `lax.conv_general_dilated` for `flax.linen.Conv`.

  The same function for the same implementation, so that modules given it
  compare equal and jitted functions of them are not traced again.

  Args:
    impl: one of `IMPLS`.

  Raises:
    ValueError: for an `impl` not in `IMPLS`.
    UserError: for ``'onednn'`` where it cannot be built, with the reason.
  """
  return {'native': lax.conv_general_dilated, 'subpixel': _subpixel_conv,
          'onednn': _onednn_conv}[resolve(impl)]


def _native(x, w, strides, pads, precision=None):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                  precision=precision)


def _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
           dimension_numbers, feature_group_count, batch_group_count,
           preferred_element_type):
  """(strides, pads) of a 2-D NHWC convolution without extras, else None."""
  if not (all(d == 1 for d in (lhs_dilation or ())) and
          all(d == 1 for d in (rhs_dilation or ())) and
          feature_group_count == 1 and batch_group_count == 1 and
          preferred_element_type is None and lhs.ndim == 4 and
          lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          == _NHWC):
    return None
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides,
                                  padding)
  return strides, tuple(tuple(int(p) for p in pair) for pair in padding)


def _subpixel_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None,
                   feature_group_count=1, batch_group_count=1, precision=None,
                   preferred_element_type=None):
  """`lax.conv_general_dilated` whose input gradient skips the zeros."""
  plain = _plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count, batch_group_count,
                 preferred_element_type)
  if plain is None or all(s == 1 for s in plain[0]):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
        dimension_numbers, feature_group_count, batch_group_count, precision,
        preferred_element_type)
  return _strided_conv(lhs, rhs, *plain, precision)


def _onednn_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None,
                 feature_group_count=1, batch_group_count=1, precision=None,
                 preferred_element_type=None):
  """`lax.conv_general_dilated` on oneDNN for float32, else `_subpixel_conv`.

  `precision` does not apply: oneDNN computes float32 in float32, as XLA:CPU.
  """
  args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
          dimension_numbers, feature_group_count, batch_group_count)
  plain = _plain(*args, preferred_element_type)
  # A kernel narrower than its stride (1x1/2): the oneDNN weight gradient
  # (oneDNN 2023.2) then writes out of bounds for fewer than 8 input
  # channels: wrong kernels, heap corruption, hangs (tests/test_models.py).
  if (plain is None or lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32
      or min(p for pair in plain[1] for p in pair) < 0
      or any(k < s for k, s in zip(rhs.shape[:2], plain[0]))):
    return _subpixel_conv(*args, precision, preferred_element_type)
  return onednn.conv2d(lhs, rhs, *plain)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided_conv(x, w, strides, pads, precision):
  return _native(x, w, strides, pads, precision)


def _strided_conv_fwd(x, w, strides, pads, precision):
  return _native(x, w, strides, pads, precision), (x, w)


def _strided_conv_bwd(strides, pads, precision, residuals, g):
  x, w = residuals
  _, weight_vjp = jax.vjp(lambda w: _native(x, w, strides, pads, precision), w)
  return (_input_grad(g, w, x.shape, strides, pads, precision),
          weight_vjp(g)[0])


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _phase(size: int, kernel: int, stride: int, pad_lo: int, out_size: int,
           r: int):
  """Taps and padding of input phase `r` along one spatial dimension.

  The forward pass is ``y[i] = sum_k x[s*i + k - pad_lo] * w[k]``, so input
  position ``m = s*p + r`` meets the taps ``k = k0 + s*t`` (``k0`` the tap
  congruent to ``r + pad_lo``) at outputs ``i = p + c - t``; as a stride-1
  correlation of the output gradient with the taps reversed, that is a
  window starting ``c - (T - 1)`` positions before ``p``.

  Returns:
    (first tap ``k0``, number of taps, gradient padding (lo, hi), phase
    length).
  """
  k0 = (r + pad_lo) % stride
  count = len(range(k0, kernel, stride))
  length = math.ceil((size - r) / stride)
  lo = count - 1 - (r + pad_lo - k0) // stride
  hi = length + count - 1 - out_size - lo
  return k0, count, (lo, hi), length


def _input_grad(g, w, x_shape, strides: Sequence[int], pads, precision):
  """The gradient of a strided NHWC convolution with respect to its input."""
  n, height, width, channels = x_shape
  (sh, sw), ((ph, _), (pw, _)) = strides, pads
  rows = math.ceil(height / sh)
  cols = math.ceil(width / sw)
  # The transposed kernel maps output channels back to input channels.
  w_t = jnp.swapaxes(w, 2, 3)
  phases = []
  for r in range(sh):
    row = []
    kh, taps_h, pad_h, len_h = _phase(height, w.shape[0], sh, ph, g.shape[1], r)
    for q in range(sw):
      kw, taps_w, pad_w, len_w = _phase(width, w.shape[1], sw, pw, g.shape[2], q)
      if taps_h and taps_w:
        sub = w_t[kh::sh, kw::sw][::-1, ::-1]  # Correlation order.
        grad = lax.conv_general_dilated(
            lax.pad(g, jnp.zeros((), g.dtype),
                    ((0, 0, 0), (*pad_h, 0), (*pad_w, 0), (0, 0, 0))),
            sub, (1, 1), 'VALID', dimension_numbers=_NHWC, precision=precision)
      else:  # A kernel narrower than the stride never touches this phase.
        grad = jnp.zeros((n, len_h, len_w, channels), g.dtype)
      # Phases past the end are one shorter; pad them to stack and interleave.
      row.append(jnp.pad(grad, ((0, 0), (0, rows - len_h), (0, cols - len_w),
                                (0, 0))))
    phases.append(jnp.stack(row, axis=3))
  grad = jnp.stack(phases, axis=2)  # (n, rows, sh, cols, sw, channels)
  grad = grad.reshape(n, rows * sh, cols * sw, channels)
  return grad[:, :height, :width]
