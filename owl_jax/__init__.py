"""owl-jax: mPLUG-Owl-style multimodal LLMs in JAX / Flax NNX.

Importing the package names the JAX platforms of a machine without TPU chips before JAX starts its
backends (`owl_jax.platforms`), so CPU and GPU commands do not print libtpu's start-up errors.
"""

from owl_jax.platforms import set_default_platforms as _set_default_platforms

_set_default_platforms()
