"""LLaVA's projectors: `linear`, `mlp{N}x_gelu` and `identity` (`llava/model/multimodal_projector/builder.py`).

`mlp{N}x_gelu` is Linear(D_features -> D_llm) followed by N-1 times [GELU, Linear(D_llm -> D_llm)]; `linear` is
the N = 1 case and `identity` N = 0 (no parameters; the feature width must be the LLM width). GELU is the
exact (erf) one, as torch `nn.GELU()` and transformers' `gelu` compute it. Each vision token becomes one
visual token, so `tokens_per_image` is the number of selected vision tokens (576 = 24x24 patches for
CLIP-L/14 at 336 px with CLS dropped).

Parameters are `projector.linear_1 ... linear_N` (transformers' `multi_modal_projector.linear_{1,2}` names).
The first layer is column-parallel (`mlp` on its output), the last row-parallel (`mlp` on its input), so a
tensor-parallel mesh splits the hidden width between them without a gather.
"""

from __future__ import annotations

import jax
from flax import nnx

from owl_jax.config import ModelConfig
from owl_jax.models.connectors import FeatureDefaults, mlp_depth
from owl_jax.models.layers import Dense, dtype_of

ATTRIBUTE = "projector"
DEFAULTS = FeatureDefaults(layers=(-2,), strategy="default", post_layernorm=False)
TRAINED_WITH_VISION = False  # LLaVA freezes the vision tower in every stage


def _axes(i: int, depth: int) -> tuple[str, str]:
    return ("vision_embed" if i == 0 else "mlp", "embed" if i == depth - 1 else "mlp")


class Projector(nnx.Module):
    """[N, P, D_features] -> [N, P, D_llm]."""

    def __init__(self, cfg: ModelConfig, feature_dim: int, *, rngs: nnx.Rngs):
        self.depth = mlp_depth(cfg.connector)
        d = cfg.text.hidden_size
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        for i in range(self.depth):
            setattr(self, f"linear_{i + 1}", Dense(feature_dim if i == 0 else d, d, axes=_axes(i, self.depth),
                                                   use_bias=cfg.projector_bias, dtype=dtype,
                                                   param_dtype=param_dtype, rngs=rngs))

    def __call__(self, features: jax.Array) -> jax.Array:
        x = features
        for i in range(self.depth):
            if i:
                x = jax.nn.gelu(x, approximate=False)
            x = getattr(self, f"linear_{i + 1}")(x)
        return x


# ---- connector interface (see owl_jax.models.connectors) -------------------------------------------------


def build(cfg: ModelConfig, feature_dim: int, *, rngs: nnx.Rngs) -> Projector:
    return Projector(cfg, feature_dim, rngs=rngs)


def tokens_per_image(cfg: ModelConfig, num_features: int) -> int:
    return num_features


def problems(cfg: ModelConfig, feature_dim: int) -> list[str]:
    if mlp_depth(cfg.connector) == 0 and feature_dim != cfg.text.hidden_size:
        return [f"model.connector identity passes the vision features through unchanged, so their width "
                f"({feature_dim}) must equal model.text.hidden_size ({cfg.text.hidden_size})"]
    return []


def step_flops(cfg: ModelConfig, num_features: int, feature_dim: int, *, trained_parts: frozenset[str],
               input_grad: bool) -> float:
    """Per image: trained layers x3, except the first x2 when no gradient goes on into the tower; frozen
    layers x2 when gradients pass through to the tower, else x1."""
    trained = bool(trained_parts)  # counted as a unit
    d, depth = cfg.text.hidden_size, mlp_depth(cfg.connector)
    total = 0.0
    for i in range(depth):
        forward = 2.0 * num_features * (feature_dim if i == 0 else d) * d
        if trained:
            total += forward * (3 if i or input_grad else 2)
        else:
            total += forward * (2 if input_grad else 1)
    return total
