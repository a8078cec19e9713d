"""The orthonormal start of LSUV: each kernel's polar factor (Saxe et al., 2014)."""

import functools

import jax
import jax.numpy as jnp


def orthonormalize(kernel: jax.Array) -> jax.Array:
  """The orthonormal matrix closest to a kernel, in the kernel's shape.

  The kernel is reshaped to ``fan_in x fan_out`` (all axes but the last are
  fan-in, as in flax's ``(kh, kw, in, out)`` layout) and replaced by its
  polar factor ``U @ Vt`` (from the SVD ``U S Vt``): its columns are
  orthonormal when ``fan_in >= fan_out`` and its rows otherwise. The random
  directions of the given kernel are kept, so no random key is needed and
  the result is deterministic; an orthonormal kernel comes back unchanged.

  The polar factor is computed from the eigendecomposition of the small
  Gram matrix (at most 192 x 192 here) rather than by an SVD of the tall
  matrix: LAPACK's SVD of a 1728 x 192 kernel took seconds on a busy 2-core
  CPU (OpenBLAS threads competing with XLA's), the Gram route milliseconds.
  In float32 one such pass is accurate only for well-conditioned kernels, so
  passes repeat until the Gram matrix is the identity to 1e-5 (one pass for
  random kernels, three or four for condition numbers of 1e6-1e8). A kernel
  of rank below min(fan_in, fan_out), such as all zeros, which no random
  initializer draws, cannot be made orthonormal in its missing directions.

  Args:
    kernel: an array with at least two axes.

  Returns:
    An array of the same shape and dtype.
  """
  return orthonormalize_all([kernel])[0]


def orthonormalize_all(kernels: list[jax.Array]) -> list[jax.Array]:
  """`orthonormalize` of each kernel.

  Kernels whose fan_in x fan_out matrices have the same shape are stacked
  and done together: XLA:CPU compiles every operation of the loop below
  separately, so one loop per shape instead of one per kernel saves a good
  part of LSUV's compile time (All-CNN-C's nine kernels have six shapes).
  """
  groups = {}
  for index, kernel in enumerate(kernels):
    matrix = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
    wide = matrix.shape[0] < matrix.shape[1]
    if wide:  # Work on the tall orientation: its Gram matrix is the small one.
      matrix = matrix.T
    groups.setdefault(matrix.shape, []).append((index, wide, matrix))
  out = list(kernels)
  for members in groups.values():
    matrices = _orthonormal_tall(jnp.stack([m for _, _, m in members]))
    for (index, wide, _), matrix in zip(members, matrices):
      matrix = matrix.T if wide else matrix
      kernel = kernels[index]
      out[index] = matrix.reshape(kernel.shape).astype(kernel.dtype)
  return out


def _orthonormal_tall(matrices: jax.Array) -> jax.Array:
  """Polar factors of a stack of tall matrices (rows >= columns)."""
  identity = jnp.eye(matrices.shape[-1], dtype=jnp.float32)

  def gram(m):
    return _dot(jnp.swapaxes(m, -1, -2), m)

  def not_orthonormal(carry):
    _, grams, passes = carry
    error = jnp.max(jnp.abs(grams - identity))
    # NaN compares false: a non-finite kernel stops instead of looping.
    return (error >= _ORTHONORMAL_TOL) & (passes < _MAX_POLAR_PASSES)

  def polar_pass(carry):
    matrices, grams, passes = carry
    matrices = jax.vmap(_polar_step)(matrices, grams)
    return matrices, gram(matrices), passes + 1

  matrices, _, _ = jax.lax.while_loop(
      not_orthonormal, polar_pass, (matrices, gram(matrices), 0))
  return matrices


_ORTHONORMAL_TOL = 1e-5
_MAX_POLAR_PASSES = 6
_dot = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def _polar_step(matrix: jax.Array, gram: jax.Array) -> jax.Array:
  """``A (A^T A)^(-1/2)`` for a tall A: its polar factor, up to float error."""
  eigenvalues, vectors = jnp.linalg.eigh(gram)
  # Eigenvalues below ~10 float32 ulps of the largest are rounding noise;
  # flooring them keeps those directions bounded (the next pass fixes them)
  # instead of amplifying noise, and a zero kernel finite.
  floor = jnp.maximum(eigenvalues[-1] * 1e-6, jnp.finfo(jnp.float32).tiny)
  inverse_sqrt = jax.lax.rsqrt(jnp.maximum(eigenvalues, floor))
  return _dot(matrix, _dot(vectors * inverse_sqrt, vectors.T))
