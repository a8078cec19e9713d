"""allconv_jax: the All Convolutional Net (Springenberg et al., 2014) in JAX/Flax."""

from allconv_jax import xla_flags

# Before any JAX device is used: XLA reads its flags only then.
xla_flags.apply()
