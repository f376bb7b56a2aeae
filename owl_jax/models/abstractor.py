"""Old home of the visual abstractor; it is now a connector (`owl_jax.models.connectors.abstractor`)."""

from owl_jax.models.connectors.abstractor import (AbstractorAttention, AbstractorLayer, AbstractorMLP,  # noqa: F401
                                                  VisualAbstractor)
