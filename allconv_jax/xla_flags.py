"""XLA flags that the library sets for speed on CPU.

With jax 0.10.2, XLA's CPU backend hands convolutions, and whole chains of
convolutions with their bias and ReLU, to YNNPACK. On the CPUs measured
(`benchmarks/vs_pytorch.py`) Eigen's convolutions are about twice as fast
for these networks, in training and in evaluation, so the library turns the
YNNPACK fusions off. This matters wherever XLA's own convolutions run on
CPU: without oneDNN (`allconv_jax.onednn`), for ``conv_impl='subpixel'`` or
``'native'``, and in bfloat16. The flag concerns XLA:CPU only; GPU and TPU
programs do not change.

XLA reads ``XLA_FLAGS`` once, when JAX first uses a device, so `apply` runs
when `allconv_jax` is imported. A flag the user already set in ``XLA_FLAGS``
is left alone, and ``ALLCONV_XLA_DEFAULTS=0`` keeps XLA's own defaults.
"""

import os
import warnings

# Empty list: no YNNPACK library fusions (Eigen convolutions and XLA's own
# fused elementwise code instead).
CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)
OPT_OUT = 'ALLCONV_XLA_DEFAULTS'


def apply() -> list[str]:
  """Adds `CPU_FLAGS` to ``XLA_FLAGS`` where the user has not set them.

  Returns:
    The flags added (none when opted out or all set already).
  """
  if os.environ.get(OPT_OUT, '1') == '0':
    return []
  current = os.environ.get('XLA_FLAGS', '')
  added = [flag for flag in CPU_FLAGS if flag.split('=')[0] not in current]
  if not added:
    return []
  os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  if _backends_started():
    warnings.warn(
        'allconv_jax was imported after JAX started, so its CPU speed flags '
        f'({" ".join(added)}) take effect only in a new process that imports '
        'allconv_jax before using JAX.', stacklevel=3)
  return added


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # A JAX without this helper.
    return False
