"""allconv_jax: the All Convolutional Net (Springenberg et al., 2014) in JAX/Flax.

One flat package, one module per concept (the README's "Where things are"
maps them). Subpackages by concept (model, data, training, run directory,
modes, parallel) were considered and not made: each concept is already one
file, so a subpackage would hold one to five of them, add a level to every
import of the tests, experiments, benchmarks and notebook, and leave the map
no shorter. Dependencies point one way: `main` -> `train` -> `kind`,
`population`, `history` -> `steps`, `models`, `input_pipeline`,
`checkpoints` -> `files`, `config`.
"""

from allconv_jax import xla_flags

# Before any JAX device is used: XLA reads its flags only then.
xla_flags.apply()
