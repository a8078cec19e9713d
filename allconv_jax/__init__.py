"""allconv_jax: the All Convolutional Net (Springenberg et al., 2014) in JAX/Flax."""
