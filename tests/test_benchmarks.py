"""The benchmark scripts' shared helpers (benchmarks/common.py) and profile parser."""

import math
import re
import pathlib

import jax
import jax.numpy as jnp
import pytest

from allconv_jax import models

# benchmarks/ is on pytest's path (pyproject.toml), as it is on a benchmark
# script's own.
import common  # pylint: disable=g-bad-import-order

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / 'benchmarks'


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops']


def test_conv_flops_agree_with_xla_cost_analysis():
  # XLA counts the same convolutions but skips the taps on the zero padding
  # (4-8% of them here), so its count is a little lower, never higher.
  width, batch = 0.25, 2
  forward, train = common.conv_flops(width)
  model = models.create('all_cnn_c', 10, width=width)  # XLA's own convolutions.
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, *models.INPUT_SHAPE))))
  images = jax.ShapeDtypeStruct((batch, *models.INPUT_SHAPE), jnp.float32)
  xla_forward = _xla_flops(model.apply, variables, images) / batch
  # Gradients with respect to the parameters only: no input gradient of the
  # first layer, as in a train step.
  grad = jax.grad(lambda v, x: model.apply(v, x).sum())
  xla_train = _xla_flops(grad, variables, images) / batch
  assert 0.9 * forward < xla_forward <= forward
  assert 0.9 * train < xla_train <= train
  # The train step is about three forward passes.
  assert 2.9 < train / forward < 3.0


def test_conv_flops_of_the_paper_network():
  # conv2 alone: 32*32 positions * 96 * 96 channels * 9 taps, 2 FLOPs each.
  forward, _ = common.conv_flops(1.0)
  assert forward > 2 * 32 * 32 * 96 * 96 * 9
  assert math.isclose(forward, 541_596_672)


def test_table_is_markdown_with_figures_right_aligned():
  text = common.table(['setting', 'img/s'], [['jax', '91.5'], ['torch', 'x']])
  assert text.splitlines()[1] == '|:--------|:------|'  # 'x' is no figure.
  text = common.table(['setting', 'img/s'], [['jax', 91.5], ['torch', 'x1.2']])
  lines = text.splitlines()
  assert lines == ['| setting | img/s |', '|:--------|------:|',
                   '| jax     |  91.5 |', '| torch   |  x1.2 |']


def test_stats():
  s = common.stats([0.5, 1.0, 4.0], batch_size=100)
  assert s['median_s'] == 1.0 and s['min_s'] == 0.5 and s['max_s'] == 4.0
  assert s['images_per_s'] == 100.0 and s['best_images_per_s'] == 200.0
  assert math.isclose(s['mean_images_per_s'], 300 / 5.5)


def test_worker_answers_and_reports_failures():
  script = pathlib.Path(__file__).parent / 'benchmark_worker.py'
  with common.Worker(str(script), env={'UNUSED_VARIABLE': None,
                                       'PYTHONPATH': str(BENCHMARKS)}) as worker:
    assert worker.call('add', a=2, b=3) == 5
    with pytest.raises(RuntimeError, match='ZeroDivisionError'):
      worker.call('fail')
    assert worker.call('add', a=[1], b=[2]) == [1, 2]  # Still serving.
  assert worker.proc.returncode == 0


def test_library_steps_train_and_evaluate():
  steps = common.LibrarySteps(width=0.25, augment=False)
  assert steps.num_params == 86_698
  for case in ('train b8', 'eval b8'):
    assert set(steps.prepare(case)) == {'compile_s', 'first_call_s'}
    times = steps.run(case, 2)
    assert len(times) == 2 and all(t > 0 for t in times)
  assert math.isfinite(steps.train_loss())


def test_profile_step_sums_fusion_time_by_kind(tmp_path):
  import profile_step  # pylint: disable=g-import-not-at-top
  x = jnp.ones((64, 8, 8, 32))
  # A transpose of an elementwise result: XLA:CPU fuses the two into one
  # kernel, as it does for the weight-gradient inputs of the train step.
  fn = jax.jit(lambda x: jnp.transpose(jnp.maximum(x + 1, 0), (3, 1, 2, 0)))
  fn(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    fn(x).block_until_ready()
  kinds = profile_step.fusion_times(str(tmp_path))
  assert kinds and all(not re.search(r'[._]\d+$', k) for k in kinds)
  fused = [ns for kind, ns in kinds.items() if 'fusion' in kind]
  assert fused and max(fused) > 0


def test_all_cnn_c_convs_follow_the_network():
  convs = common.all_cnn_c_convs()
  assert [(name, size, channels, out)
          for name, size, channels, out, _ in convs] == [
      ('conv1', 32, 3, 32), ('conv2', 32, 96, 32), ('conv3', 32, 96, 16),
      ('conv4', 16, 96, 16), ('conv5', 16, 192, 16), ('conv6', 16, 192, 8),
      ('conv7', 8, 192, 6), ('conv8', 6, 192, 6), ('classifier', 6, 192, 6)]
  # Each layer's output is the next one's input.
  assert all(out == nxt[1] for (*_, out, _), nxt in zip(convs, convs[1:]))


def test_accelerator_benchmark_runs_tiny():
  # The whole script at a tiny size, in its own process as it is run. On the
  # CPU: on a GPU this pytest process may already hold most of its memory.
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, 'benchmarks/accelerator.py', '--width=0.125',
       '--train_size=256', '--test_size=100', '--batch_size=32', '--steps=2',
       '--epochs=2', '--preprocess=standardize', '--notorch'],
      cwd=BENCHMARKS.parent, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "device: 1 x cpu 'cpu'" in out
  for header in ('## 1. library train step', '## 2. PyTorch',
                 '## 3. full loop'):
    assert header in out
  assert re.search(r'^\| float32 +\| +\d+ \|', out, re.M)
  assert re.search(r'^\| bfloat16 +\| +\d+ \|', out, re.M)
  assert 'skipped (--notorch)' in out
  assert 'preprocessing standardization' in out
  assert re.search(r'^\| float32 \| loop: training only +\| +[\d.]+ \| +\d+ \|',
                   out, re.M)
  assert re.search(r'^(PASS|FAIL): float32', out, re.M)
  assert re.search(r"^projected time of the paper's 350 epochs, float32: "
                   r'\d+:\d\d:\d\d \(', out, re.M)
