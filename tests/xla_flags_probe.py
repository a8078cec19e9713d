"""Prints the XLA flags this library set on import and whether a conv used YNNPACK.

Run by tests/test_conv.py in a fresh process, since XLA reads its flags once.
"""

import os

import allconv_jax  # pylint: disable=unused-import  # Sets the XLA flags.
import jax
import jax.numpy as jnp
from jax import lax

if __name__ == '__main__':
  f = jax.jit(lambda x, w: jax.nn.relu(lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))))
  hlo = f.lower(jnp.zeros((8, 32, 32, 32)),
                jnp.zeros((3, 3, 32, 32))).compile().as_text()
  print(os.environ.get('XLA_FLAGS', ''))
  print('ynn' in hlo)
