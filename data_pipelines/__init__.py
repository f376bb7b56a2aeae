"""Input pipelines and shard tools. Importing `owl_jax` first names the JAX platforms of this machine
(see `owl_jax.platforms`) before any pipeline starts a JAX backend."""

import owl_jax  # noqa: F401  (imported for its side effect)
