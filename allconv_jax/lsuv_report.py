"""The per-layer report of LSUV initialization (see `allconv_jax.lsuv`).

`lsuv.lsuv_init` returns a `Report`; training logs its `table` and saves it
as ``<workdir>/lsuv_report.json`` (`Report.load` reads it back), and the
experiments keep its `to_dict` in their results. `lsuv` does the computing;
this module only describes it.

    variables, report = lsuv.lsuv_init(model, variables, images)
    print(report.table())
    report.save(os.path.join(workdir, 'lsuv_report.json'))
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Iterable, Mapping

from absl import logging

from allconv_jax import files
from allconv_jax.errors import UserError

NOT_CONVERGED = 'not converged'


@dataclasses.dataclass(frozen=True)
class LayerReport:
  """What LSUV did to one convolution.

  Attributes:
    name: the layer's path in the parameters, e.g. ``'conv3'``.
    elements_per_example: output elements per example (H * W * C).
    variance_before: output variance with the orthonormal kernel, before
      any rescaling (earlier layers already rescaled).
    variance_after: output variance with the final kernel.
    iterations: rescalings done (0 for a skipped layer).
    scale: factor the orthonormal kernel was multiplied by (1 if skipped).
    skipped: True if the layer was left orthonormal and unscaled.
    reason: why it was skipped, or ``'not converged'`` when `max_iters` ran
      out before the variance came within `tol` of 1; empty otherwise.
  """
  name: str
  elements_per_example: int
  variance_before: float
  variance_after: float
  iterations: int
  scale: float
  skipped: bool
  reason: str = ''


@dataclasses.dataclass(frozen=True)
class Report:
  """The per-layer outcome of `lsuv.lsuv_init`, in input-to-output order."""
  layers: tuple[LayerReport, ...]
  measure: str
  tol: float
  max_iters: int
  batch_size: int

  def table(self) -> str:
    """Formats the report as a fixed-width text table for logs."""
    skipped = sum(layer.skipped for layer in self.layers)
    lines = [f'LSUV ({self.measure}, tol {self.tol:g}, max_iters '
             f'{self.max_iters}, batch {self.batch_size}): '
             f'{len(self.layers)} layers, {skipped} skipped']
    width = max([len('layer')] + [len(layer.name) for layer in self.layers])
    lines.append(f"{'layer':<{width}}  {'elements':>8}  {'var before':>10}  "
                 f"{'var after':>10}  {'iters':>5}  {'scale':>9}  status")
    for layer in self.layers:
      status = f'skipped: {layer.reason}' if layer.skipped else (
          layer.reason or 'ok')
      lines.append(
          f'{layer.name:<{width}}  {layer.elements_per_example:>8}  '
          f'{layer.variance_before:>10.4g}  {layer.variance_after:>10.4g}  '
          f'{layer.iterations:>5}  {layer.scale:>9.4g}  {status}')
    return '\n'.join(lines)

  __str__ = table

  def to_dict(self) -> dict:
    """A JSON-serializable dict; non-finite numbers become None."""
    def clean(value):
      # JSON has no NaN or infinity; Python's json would write invalid JSON.
      if isinstance(value, float) and not math.isfinite(value):
        return None
      return value
    layers = [{k: clean(v) for k, v in dataclasses.asdict(layer).items()}
              for layer in self.layers]
    return dict(measure=self.measure, tol=self.tol, max_iters=self.max_iters,
                batch_size=self.batch_size, layers=layers)

  def to_json(self) -> str:
    """`to_dict` as indented JSON text."""
    return json.dumps(self.to_dict(), indent=2)

  def save(self, path: str) -> None:
    """Writes `to_json()` to `path` atomically."""
    files.write_text(path, self.to_json() + '\n')

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> Report:
    """The inverse of `to_dict`; a None number (non-finite) becomes NaN."""
    def number(value):
      return math.nan if value is None else float(value)
    layers = tuple(
        LayerReport(**{**layer, **{k: number(layer[k]) for k in _FLOATS}})
        for layer in data['layers'])
    return cls(layers=layers, measure=data['measure'], tol=float(data['tol']),
               max_iters=int(data['max_iters']),
               batch_size=int(data['batch_size']))

  @classmethod
  def load(cls, path: str) -> Report:
    """Reads a report written by `save`, e.g. from a finished run's workdir.

    Raises:
      UserError: the file is unreadable or not an LSUV report.
    """
    try:
      with open(path) as f:
        return cls.from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f'workdir: cannot read the LSUV report {path} '
                      f'({type(e).__name__})') from None


# The LayerReport fields that `to_dict` may write as None.
_FLOATS = ('variance_before', 'variance_after', 'scale')


def build(layers: Iterable[tuple[str, int, str]],
          stats: Mapping[str, Mapping[str, Any]], *, measure: str, tol: float,
          max_iters: int, batch_size: int) -> Report:
  """The report of one LSUV run, from the scalars it computed.

  Skipped layers and layers that did not converge are also logged as
  warnings: a run's log should show them without anyone opening the report.

  Args:
    layers: ``(name, output elements per example, skip reason)`` of each
      convolution in input-to-output order; the reason is ``''`` for a
      layer LSUV rescaled.
    stats: for each layer name, its scalars ``before``, ``after``,
      ``iterations`` and ``scale``, already on the host.
    measure: where LSUV measured the variance.
    tol: the tolerance LSUV ran with; a rescaled layer whose final variance
      is not within it of 1 is reported as not converged.
    max_iters: the most rescalings LSUV allowed per layer.
    batch_size: the number of images LSUV measured on.

  Returns:
    The `Report`.
  """
  return Report(
      layers=tuple(_layer_report(name, elements, stats[name], reason, tol)
                   for name, elements, reason in layers),
      measure=measure, tol=float(tol), max_iters=int(max_iters),
      batch_size=int(batch_size))


def _layer_report(name: str, elements: int, stats: Mapping[str, Any],
                  skip_reason: str, tol: float) -> LayerReport:
  after = float(stats['after'])
  iterations = int(stats['iterations'])
  reason = skip_reason
  if skip_reason:
    logging.warning('LSUV: skipping %s (%s); its kernel stays orthonormal',
                    name, skip_reason)
  elif not abs(after - 1) < tol:
    reason = NOT_CONVERGED
    logging.warning('LSUV: %s has variance %.4g after %d iterations '
                    '(tol %g)', name, after, iterations, tol)
  return LayerReport(
      name=name, elements_per_example=elements,
      variance_before=float(stats['before']), variance_after=after,
      iterations=iterations, scale=float(stats['scale']),
      skipped=bool(skip_reason), reason=reason)
