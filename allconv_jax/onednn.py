"""oneDNN convolutions on CPU, as XLA FFI custom calls.

On the CPU measured (`benchmarks/conv_layers.py`) oneDNN's convolutions, the
ones PyTorch uses on CPU, are faster than XLA:CPU's own in every layer and
every pass of All-CNN-C's training, 1.3x over all and 1.5x for the kernel
gradients. `conv2d` calls them from JAX:
`onednn_conv.cc`, beside this file, wraps oneDNN's forward, input-gradient
and weight-gradient convolutions as three XLA FFI handlers, and `conv2d`
joins them with a `jax.custom_vjp`.

The C++ file is compiled on first use, against the headers of the jaxlib
that runs and of the oneDNN that the ``onednn-cpu-gomp`` and
``onednn-devel-cpu-gomp`` packages install into the environment (dependencies
of this library on Linux x86-64), and cached in ``$ALLCONV_CACHE_DIR`` or
``~/.cache/allconv_jax``. `unavailable_reason` says why it could not be
(another OS, no C++ compiler, ...); ``conv_impl='auto'`` then uses XLA's
convolutions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from absl import logging
import jax
from jax import lax
import jaxlib
import numpy as np

SOURCE = pathlib.Path(__file__).with_name('onednn_conv.cc')
_PASSES = ('Forward', 'InputGrad', 'WeightGrad')
_INSTALL = 'pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0'


def cache_dir() -> pathlib.Path:
  """Where the compiled library is kept."""
  default = pathlib.Path(os.environ.get('XDG_CACHE_HOME', '~/.cache'),
                         'allconv_jax')
  return pathlib.Path(os.environ.get('ALLCONV_CACHE_DIR', default)).expanduser()


@functools.cache
def unavailable_reason() -> str | None:
  """Builds and registers the custom calls once per process.

  Returns:
    None when `conv2d` can run, else why not, in one line.
  """
  if not (sys.platform == 'linux' and jax.default_backend() == 'cpu'):
    return f'oneDNN convolutions are built for Linux CPUs only (this is ' \
           f'{sys.platform}, {jax.default_backend()})'
  try:
    path = _build()
    try:
      library = ctypes.CDLL(str(path))
    except OSError:  # A damaged cached build (a full disk, say): once more.
      path.unlink(missing_ok=True)
      library = ctypes.CDLL(str(_build()))
  except (_Unavailable, OSError) as e:
    return str(e)
  for name in _PASSES:
    jax.ffi.register_ffi_target(
        _target(name), jax.ffi.pycapsule(getattr(library, f'AllconvConv{name}')),
        platform='cpu')
  return None


class _Unavailable(Exception):
  pass


def _build() -> pathlib.Path:
  """Compiles `SOURCE` unless a build for this environment is cached."""
  prefix = pathlib.Path(sys.prefix)
  include, lib = prefix / 'include', prefix / 'lib'
  if not (include / 'dnnl.hpp').exists() or not (lib / 'libdnnl.so').exists():
    raise _Unavailable(f'oneDNN not found in {prefix} ({_INSTALL})')
  compiler = os.environ.get('CXX', 'g++')
  if not shutil.which(compiler):
    raise _Unavailable(f'no C++ compiler {compiler!r} to build {SOURCE.name} '
                       '(install g++ or set CXX)')
  key = hashlib.sha256(b'\0'.join(
      [SOURCE.read_bytes(), jaxlib.__version__.encode(), str(prefix).encode(),
       compiler.encode(),
       (include / 'oneapi/dnnl/dnnl_version.h').read_bytes()])).hexdigest()[:16]
  target = cache_dir() / f'onednn_conv-{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: concurrent processes (pytest
  # workers) never load a half-written file.
  logging.info('Compiling %s for oneDNN convolutions (once, a few seconds) '
               'into %s', SOURCE.name, target)
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  command = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
             f'-I{jax.ffi.include_dir()}', f'-I{include}', str(SOURCE),
             f'-L{lib}', '-ldnnl', f'-Wl,-rpath,{lib}', '-o', tmp]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode:
    os.unlink(tmp)
    lines = result.stderr.splitlines()
    detail = ([line for line in lines if 'error' in line] + lines +
              [f'{compiler} exited with status {result.returncode}'])[0]
    raise _Unavailable(f'building {SOURCE.name} failed: {detail}')
  os.replace(tmp, target)
  return target


def _target(name: str) -> str:
  return f'allconv_onednn_conv_{name}'


def _call(name: str, shape, a, b, strides, pads):
  (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
  # `a`'s type with another shape: inside shard_map the result varies over
  # the same mesh axes as `a`.
  result = jax.typeof(a).update(shape=shape)
  return jax.ffi.ffi_call(_target(name), result, vmap_method='sequential')(
      a, b, sh=np.int64(sh), sw=np.int64(sw), pt=np.int64(pt), pb=np.int64(pb),
      pl=np.int64(pl), pr=np.int64(pr))


def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int],
           pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """A float32 NHWC x HWIO convolution on oneDNN.

  Needs `unavailable_reason()` to have returned None in this process.
  Differentiable once (reverse mode).

  Args:
    x: (N, H, W, C) float32 input.
    w: (KH, KW, C, O) float32 kernel.
    strides: (row, column) strides.
    pads: ((top, bottom), (left, right)) zero padding, non-negative.

  Returns:
    The (N, OH, OW, O) output, as `lax.conv_general_dilated` computes it.
  """
  # Inside shard_map, replicated weights meet per-device images. A custom
  # call needs both to vary over the same mesh axes; lax primitives cast
  # the weights implicitly, and the cast's transpose sums their gradients
  # over the devices, as it does for XLA's convolutions.
  varying = [jax.typeof(a).manual_axis_type.varying for a in (x, w)]
  both = varying[0] | varying[1]
  x, w = (lax.pcast(a, tuple(both - own), to='varying') if both - own else a
          for a, own in zip((x, w), varying))
  return _conv2d(x, w, strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, w, strides, pads):
  n, height, width, _ = x.shape
  kh, kw, _, features = w.shape
  (sh, sw), ((pt, pb), (pl, pr)) = strides, pads
  shape = (n, (height + pt + pb - kh) // sh + 1,
           (width + pl + pr - kw) // sw + 1, features)
  return _call('Forward', shape, x, w, strides, pads)


def _conv2d_fwd(x, w, strides, pads):
  return _conv2d(x, w, strides, pads), (x, w)


def _conv2d_bwd(strides, pads, residuals, g):
  x, w = residuals
  return (_call('InputGrad', x.shape, g, w, strides, pads),
          _call('WeightGrad', w.shape, x, g, strides, pads))


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
