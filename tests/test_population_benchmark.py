"""benchmarks/population.py at its tiny --quick size: every section prints."""

import math
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _rows(out: str, section: str) -> list[list[str]]:
  """The cells of the first Markdown table after `section`, without header."""
  text = out[out.index(section):]
  rows, started = [], False
  for line in text.splitlines()[1:]:
    if line.startswith('|'):
      started = True
      rows.append([c.strip() for c in line.strip('|').split('|')])
    elif started:
      break
  return rows[2:]  # Past the header and the rule.


def _positive(cell: str) -> bool:
  value = float(cell.lstrip('x'))
  return math.isfinite(value) and value > 0


def test_population_benchmark_runs_quick():
  # In its own process, as it is run: it defines absl flags that other
  # benchmark scripts define too, and starts a worker with 2 CPU devices.
  result = subprocess.run(
      [sys.executable, 'benchmarks/population.py', '--quick'], cwd=REPO,
      capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert out.startswith('## machine')

  # 1. The single run, n singles, and the population with at_once 1 and all.
  rows = _rows(out, '## 1. a population of 2 against 2 single runs')
  assert [r[0] for r in rows] == [
      'single run', '2 single runs (2 x the single run)',
      'population of 2, at_once=1', 'population of 2, at_once=2']
  for row in rows:
    assert all(_positive(c) for c in row[1:7]), row  # ms ... compile s.
    assert row[7] == 'ok' and _positive(row[8])  # Finite loss; time ratio.
  # n singles take n times the single run's step (to the printed 0.1 ms).
  assert math.isclose(float(rows[1][1]), 2 * float(rows[0][1]), abs_tol=0.11)

  # 2. Populations of 1 and 2.
  rows = _rows(out, '## 2. populations of 1,2')
  assert {r[0] for r in rows} == {'population of 1, at_once=1',
                                  'population of 2, at_once=2',
                                  'population of 2, at_once=1'}
  assert all(_positive(c) for r in rows for c in r[1:7])

  # 3. Memory: a member adds bytes, and some population fits on each card.
  added = re.findall(r'^at_once=(all|1): a member adds ([-\d.]+) MB', out, re.M)
  assert {kind for kind, _ in added} == {'all', '1'}
  assert all(float(mb) > 0 for _, mb in added)
  rows = _rows(out, 'the largest population')
  assert len(rows) == 8 and all(int(r[3]) > 0 for r in rows)

  # 4. Replicated and split members over 2 CPU devices, both measured.
  rows = _rows(out, '## 4. 2 members over 2 CPU devices')
  assert [r[0].split(':')[0] for r in rows] == ['replicated', 'split']
  assert all(_positive(c) for r in rows for c in r[1:6])
  assert all(r[6] == 'ok' for r in rows)
  assert re.search(r'^split vs replicated: x[\d.]+ images/s, (split|replicated) '
                   r'is faster', out, re.M)
