"""Connectors: what turns vision-encoder features into LLM-width visual tokens (DESIGN.md §6).

The composite is *vision encoder -> connector -> LLM*; `model.connector` picks the middle part:

- `abstractor` (`abstractor.py`): mPLUG-Owl's visual abstractor; reads the post-LayerNormed last layer with
  CLS, gives `num_queries + 1` tokens per image (learned queries + `vit_eos`);
- `linear`, `mlp{N}x_gelu`, `identity` (`mlp.py`): LLaVA's projectors (`mm_projector_type`): N Linear layers
  with exact GELU between them (`linear` = 1, `identity` = 0), one token per selected vision token; they read
  hidden state -2 without CLS and without a LayerNorm (576 tokens for CLIP-L/14 at 336 px);
- `qformer` (`qformer.py`): BLIP-2's Q-Former (also InstructBLIP's, which reads the instruction too, and
  MiniGPT-4's) and its `language_projection`; reads the post-LayerNormed last layer with CLS, gives
  `num_queries` (32) tokens per image.

Each connector module declares the same small interface, so that the composite, the config checks,
`ModelConfig.tokens_per_image`, the FLOP count and the training stages ask this package instead of
testing connector names: `ATTRIBUTE` (its name in the composite, hence its parameter paths), `DEFAULTS`
(vision feature selection), `TRAINED_WITH_VISION` (whether stage `pretrain` trains the tower with it),
`build`, `tokens_per_image`, `problems`, `step_flops` (from the names of the connector's trained children).
"""

from __future__ import annotations

import dataclasses
import re
from types import ModuleType

_MLP = re.compile(r"mlp([1-9][0-9]*)x_gelu")


def mlp_depth(name: str) -> int | None:
    """Linear layers of a LLaVA projector name (`linear` 1, `mlp{N}x_gelu` N, `identity` 0), else None."""
    if name == "linear":
        return 1
    if name == "identity":
        return 0
    m = _MLP.fullmatch(name)
    return int(m[1]) if m else None


def connector_module(name: str) -> ModuleType:
    """The module implementing connector `name`."""
    if name == "abstractor":
        from owl_jax.models.connectors import abstractor
        return abstractor
    if mlp_depth(name) is not None:
        from owl_jax.models.connectors import mlp
        return mlp
    if name == "qformer":
        from owl_jax.models.connectors import qformer
        return qformer
    raise ValueError(f"unknown connector {name!r}; choose one of abstractor, linear, mlp{{N}}x_gelu, identity, "
                     f"qformer")


@dataclasses.dataclass(frozen=True)
class FeatureDefaults:
    """A connector's vision feature selection when the config leaves it open."""

    layers: tuple[int, ...]
    strategy: str  # default (drop CLS) | full
    post_layernorm: bool


@dataclasses.dataclass(frozen=True)
class VisionFeatures:
    """Resolved selection: hidden-state indices >= 0 (0 = embeddings, i = after layer i) in concatenation
    order, whether CLS is dropped, whether the post-LayerNorm is applied."""

    layers: tuple[int, ...]
    drop_cls: bool
    post_layernorm: bool

    @property
    def depth(self) -> int:
        """Tower layers that must run (the ones after the deepest selected layer are skipped)."""
        return max(self.layers)


def vision_features(cfg) -> VisionFeatures:
    """The vision features `cfg` (a ModelConfig) feeds its connector."""
    defaults = connector_module(cfg.connector).DEFAULTS
    layers = cfg.vision_feature_layer
    layers = defaults.layers if layers is None else (layers,) if isinstance(layers, int) else tuple(layers)
    n = cfg.vision.num_layers
    strategy = cfg.vision_feature_select_strategy or defaults.strategy
    post = defaults.post_layernorm if cfg.vision_feature_post_layernorm is None else cfg.vision_feature_post_layernorm
    return VisionFeatures(layers=tuple(i % (n + 1) for i in layers), drop_cls=strategy == "default",
                          post_layernorm=bool(post))


def num_features(cfg) -> int:
    """Vision tokens per image that reach the connector."""
    return cfg.vision.num_patches + (0 if vision_features(cfg).drop_cls else 1)


def feature_dim(cfg) -> int:
    """Width of those tokens (selected layers concatenated on the feature axis)."""
    return cfg.vision.hidden_size * len(vision_features(cfg).layers)


def tokens_per_image(cfg) -> int:
    """Visual tokens spliced per `<image>`."""
    return connector_module(cfg.connector).tokens_per_image(cfg, num_features(cfg))


def connector_attribute(cfg) -> str:
    """The connector's attribute in the composite (`abstractor`, `projector` or `qformer`): its parameter paths."""
    return connector_module(cfg.connector).ATTRIBUTE


def build_connector(cfg, *, rngs):
    return connector_module(cfg.connector).build(cfg, feature_dim(cfg), rngs=rngs)


def connector_problems(cfg) -> list[str]:
    """Width mismatches the connector cannot take (config validation, before anything is built)."""
    return connector_module(cfg.connector).problems(cfg, feature_dim(cfg))


def trained_with_vision(cfg) -> bool:
    """Whether stage `pretrain` trains the vision tower with the connector (mPLUG-Owl stage 1) or the
    connector alone (LLaVA stage 1: the tower is always frozen)."""
    return connector_module(cfg.connector).TRAINED_WITH_VISION


def pretrain_pattern(cfg) -> str:
    """Path regex of the parameters stage `pretrain` trains."""
    attr = connector_attribute(cfg)
    return rf"^(vision_model|{attr})\." if trained_with_vision(cfg) else rf"^{attr}\."


def connector_step_flops(cfg, *, trained_parts: frozenset[str], input_grad: bool) -> float:
    """Matmul FLOPs of the connector per image in one train step: `trained_parts` names its children with
    trainable leaves (`query_tokens`, `language_projection`, ...; empty: frozen), `input_grad` whether
    gradients continue into the vision tower (see `owl_jax.flops`)."""
    return connector_module(cfg.connector).step_flops(cfg, num_features(cfg), feature_dim(cfg),
                                                      trained_parts=frozenset(trained_parts), input_grad=input_grad)
