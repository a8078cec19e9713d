"""Tolerances from rounding noise measured in the test itself (issue 27).

Two programs that compute the same thing in another order (other devices,
another all-reduce, a loop over population members, oneDNN's convolutions
instead of XLA's) round differently, and how far apart they end depends on
the CPU: its vector width decides XLA's and oneDNN's summation orders and
whether FMAs are used, and training then amplifies the first ulps. A bound
fitted to one machine fails on another (issue 27: 1.13e-3 against a bound of
1e-3 on an AVX-512 machine).

So a test that compares two such programs also measures, in the same run on
the same machine, the gap between a twin pair that differs *only* in rounding
(a float64 reference, or the same program on another device count), and
allows `FACTOR` times that gap. Both gaps come from the same arithmetic of
the same CPU, so the ratio between them, not their size, is what the bound
depends on; `FACTOR` covers that ratio (a max over many elements or rows is a
stable statistic, within a few times between two orderings), and a real bug
(a wrong batch, seed or layer) is orders of magnitude beyond it.

`make test-isa` runs the tests that use this module with the instruction set
capped (SSE4.2 for XLA, SSE4.1 for oneDNN), which changes the rounding as
another CPU would.
"""

import numpy as np

FACTOR = 10


def max_relative_gap(a: dict, b: dict, keys) -> float:
  """The largest ``|a[k] - b[k]| / |b[k]|`` over `keys` (0 where both are 0)."""
  gaps = [abs(float(a[k]) - float(b[k])) / max(abs(float(b[k])), 1e-30)
          for k in keys]
  return max(gaps, default=0.0)


def max_abs_gap(a, b) -> float:
  """The largest elementwise ``|a - b|`` of two arrays, in float64."""
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)),
                      initial=0.0))


def assert_within(gap: float, floor: float, what: str, minimum: float = 0.0):
  """`gap` is at most ``FACTOR * floor`` (and never held below `minimum`).

  Args:
    gap: how far apart the two compared programs are.
    floor: how far apart the twin pair that differs only in rounding is,
      measured on this machine in the same test.
    what: names the comparison in the failure message.
    minimum: a bound never tightened below this, for a floor that happens to
      be (near) zero; it must itself come from the arithmetic (ulps), not
      from one machine's measurement.
  """
  bound = max(FACTOR * floor, minimum)
  assert gap <= bound, (f'{what}: {gap:.3g} apart, more than {FACTOR} x the '
                        f'noise floor {floor:.3g} measured here (bound {bound:.3g})')
