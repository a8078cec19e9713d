"""A `benchmarks/common.serve` worker for tests/test_benchmarks.py.

Run with benchmarks/ on PYTHONPATH, as the benchmark scripts' workers are.
"""

import common

if __name__ == '__main__':
  print('noise the parent must skip')
  common.serve(dict(add=lambda a, b: a + b, fail=lambda: 1 / 0))
