"""A consumer of ``--mode=export``'s artifact that knows nothing of allconv_jax.

  python tests/exported_consumer.py <export dir> <images.npy>

Loads ``model.jax`` with `jax.export.deserialize` alone, calls it on the
uint8 (N, 32, 32, 3) images of the .npy file and prints one JSON line:
``{"probabilities": [[...], ...], "class_names": [...],
"allconv_jax_imported": false}``. Only jax, numpy and the standard library
are imported, as in a program that receives nothing but the export.
"""

import json
import os
import sys

import jax
import numpy as np


def main(export_dir: str, images_path: str) -> None:
  with open(os.path.join(export_dir, 'model.json')) as f:
    info = json.load(f)
  with open(os.path.join(export_dir, info['file']), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  probabilities = np.asarray(exported.call(np.load(images_path)))
  print(json.dumps({
      'probabilities': probabilities.tolist(),
      'class_names': info['class_names'],
      # Proof that the artifact alone did the work.
      'allconv_jax_imported': any(m.split('.')[0] == 'allconv_jax'
                                  for m in sys.modules),
  }))


if __name__ == '__main__':
  main(*sys.argv[1:])
