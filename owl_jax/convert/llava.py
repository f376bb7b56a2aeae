"""LLaVA weights: the Hugging Face llava layout (`LlavaForConditionalGeneration`), the original LLaVA
repository layout (`LlavaLlamaForCausalLM`) and a stage-1 `mm_projector.bin` (DESIGN.md §6).

Every layout is first seen under one key space, without reading any tensor:

    vision_model.<official vision keys>     the CLIP tower (q/k/v fused per head on read, `clip.HFClipAsOfficial`)
    language_model.<LlamaForCausalLM keys>  `model.layers.*`, `model.embed_tokens`, `model.norm`, `lm_head`
    projector.linear_<i>.{weight,bias}      the projector's Linear layers

so that one rule table (`llava_rules`, the official vision and HF LLaMA tables under those prefixes, plus the
projector) imports all of them through the streaming importer (`convert.stream`), and exports llava-hf.

| layout | vision | projector | LLM |
| --- | --- | --- | --- |
| llava-hf (transformers >= 4.52) | `model.vision_tower.*` (5.x: no `vision_model.` inside) | `model.multi_modal_projector.linear_{1,2}` | `model.language_model.*`, `lm_head` |
| llava-hf legacy (hub checkpoints) | `vision_tower.vision_model.*` | `multi_modal_projector.linear_{1,2}` | `language_model.model.*`, `language_model.lm_head` |
| original LLaVA | (not saved: `mm_vision_tower` names it) | `model.mm_projector.{0,2,..}` or `model.mm_projector` (linear) | `model.*`, `lm_head` |
| `mm_projector.bin` | - | as the original | - |

transformers' projector is always Linear -> act -> Linear. A `linear` (or `identity`) owl-jax projector is
exported exactly as that with `projector_hidden_act: linear` and identity matrices (zero biases) for the
layers it lacks; importing such a checkpoint into a `linear` / `identity` model checks that they are
identities and skips them, so import(export(x)) == x.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
from flax import nnx

from owl_jax.config import ModelConfig
from owl_jax.convert import clip, io
from owl_jax.convert.keymap import CheckpointMismatchError, TensorRule, linear, params_to_tensors, prefixed
from owl_jax.convert.llama import IGNORED_BUFFERS, llama_rules
from owl_jax.convert.sources import TensorSource, open_source
from owl_jax.convert.state import canonical_params
from owl_jax.convert.stream import stream_params
from owl_jax.models.connectors import connector_attribute, mlp_depth

LAYOUTS = ("llava-hf", "llava-hf-legacy", "llava-original", "mm-projector")
PROJECTOR = "projector"


class KeyView(TensorSource):
    """Tensors of other sources under new names: `{new key: (source, key there)}`. Reads nothing early."""

    def __init__(self, mapping: dict[str, tuple[TensorSource, str]], name: str):
        self._map = mapping
        self.name = name

    def keys(self) -> list[str]:
        return list(self._map)

    def __contains__(self, key: str) -> bool:
        return key in self._map

    def shape(self, key: str) -> tuple[int, ...]:
        source, k = self._map[key]
        return tuple(source.shape(k))

    def dtype(self, key: str) -> np.dtype:
        source, k = self._map[key]
        return source.dtype(k)

    def read(self, key: str) -> np.ndarray:
        source, k = self._map[key]
        return source.read(k)


def detect_layout(keys: list[str]) -> str:
    """Which LLaVA layout a checkpoint's keys are in (see the module docstring)."""
    if any(k.startswith(("model.multi_modal_projector.", "model.language_model.")) for k in keys):
        return "llava-hf"
    if any(k.startswith(("multi_modal_projector.", "language_model.model.")) for k in keys):
        return "llava-hf-legacy"
    if any("mm_projector" in k for k in keys):
        rest = [k for k in keys if "mm_projector" not in k]
        return "llava-original" if rest else "mm-projector"
    raise CheckpointMismatchError("not a LLaVA checkpoint: no multi_modal_projector / mm_projector / "
                                  f"language_model keys (first keys: {sorted(keys)[:5]})")


def _original_projector_key(key: str) -> str | None:
    """`model.mm_projector.2.weight` -> `projector.linear_2.weight`; `mm_projector.weight` (the `linear`
    projector is a bare nn.Linear) -> `projector.linear_1.weight`; None for other keys."""
    i = key.find("mm_projector.")
    if i < 0:
        return None
    rest = key[i + len("mm_projector."):].split(".")
    if len(rest) == 1:
        return f"{PROJECTOR}.linear_1.{rest[0]}"
    if len(rest) == 2 and rest[0].isdigit() and int(rest[0]) % 2 == 0:
        return f"{PROJECTOR}.linear_{int(rest[0]) // 2 + 1}.{rest[1]}"
    return None


def _unified_name(key: str, layout: str) -> str:
    """A checkpoint key in the unified key space before the vision tower's own renaming: `vision_tower.`,
    `projector.` and `language_model.` prefixes; keys of no known part keep their name (so the importer
    reports them as unexpected)."""
    if layout == "llava-hf":
        renames = (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", f"{PROJECTOR}."),
                   ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))
    elif layout == "llava-hf-legacy":
        renames = (("vision_tower.", "vision_tower."), ("multi_modal_projector.", f"{PROJECTOR}."),
                   ("language_model.", "language_model."))
    else:  # original LLaVA: LlavaLlamaForCausalLM (the tower, when saved, at model.vision_tower.vision_tower.)
        projector = _original_projector_key(key)
        if projector is not None:
            return projector
        renames = (("model.vision_tower.vision_tower.", "vision_tower."), ("model.", "language_model.model."),
                   ("lm_head.", "language_model.lm_head."))
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def unified_source(source: TensorSource, cfg: ModelConfig, layout: str | None = None) -> tuple[TensorSource, str]:
    """(the checkpoint under `vision_model.` / `projector.` / `language_model.` keys, its layout)."""
    layout = layout or detect_layout(source.keys())
    names = {k: _unified_name(k, layout) for k in source.keys()}
    vision = {n[len("vision_tower."):]: k for k, n in names.items() if n.startswith("vision_tower.")}
    mapping = {n: (source, k) for k, n in names.items() if not n.startswith("vision_tower.")}
    if vision:
        tower = clip.HFClipAsOfficial(KeyView({n: (source, k) for n, k in vision.items()}, source.name), cfg.vision)
        mapping.update({f"vision_model.{k}": (tower, k) for k in tower.keys()})
    return KeyView(mapping, source.name), layout


def projector_rules(cfg: ModelConfig) -> list[TensorRule]:
    depth = mlp_depth(cfg.connector)
    if depth is None:
        raise CheckpointMismatchError(f"model.connector {cfg.connector!r} is not a LLaVA projector (linear, "
                                      f"mlp{{N}}x_gelu, identity)")
    return [r for i in range(1, depth + 1)
            for r in linear(f"{PROJECTOR}.linear_{i}", f"{PROJECTOR}.linear_{i}", bias=cfg.projector_bias)]


def llava_rules(cfg: ModelConfig) -> list[TensorRule]:
    """Unified keys <-> owl-jax paths of a LLaVA-connector model."""
    return [*prefixed(clip.official_vision_rules(cfg.vision), key_prefix="vision_model."), *projector_rules(cfg),
            *prefixed(llama_rules(cfg.text), key_prefix="language_model.")]


def _is_identity(source: TensorSource, key: str) -> bool:
    x = source.read(key)
    if key.endswith(".bias"):
        return not np.any(x)
    return x.ndim == 2 and x.shape[0] == x.shape[1] and np.array_equal(x, np.eye(x.shape[0], dtype=x.dtype))


def _without_identity_layers(source: TensorSource, cfg: ModelConfig) -> TensorSource:
    """Hide the projector layers that a `linear` / `identity` export filled with identities (see the module
    docstring), after checking that they are exactly that."""
    depth = mlp_depth(cfg.connector) or 0
    if depth >= 2:
        return source
    extra = [k for k in source.keys() if k.startswith(f"{PROJECTOR}.linear_")
             and int(k[len(f"{PROJECTOR}.linear_"):].split(".")[0]) > depth]
    if depth == 0 and not extra:
        return source
    if not any(k.startswith(f"{PROJECTOR}.linear_2.") for k in extra):
        return source  # a genuine single Linear (original LLaVA `linear`): nothing to hide
    if depth == 1:
        extra = [k for k in extra if k.startswith(f"{PROJECTOR}.linear_2.")]
    bad = [k for k in extra if not _is_identity(source, k)]
    if bad:
        raise CheckpointMismatchError(f"{source.name}: the checkpoint's projector has more layers than "
                                      f"model.connector {cfg.connector!r} ({', '.join(sorted(bad)[:4])} are not "
                                      f"identities); use model.connector=mlp2x_gelu")
    hidden = set(extra)
    return KeyView({k: (source, k) for k in source.keys() if k not in hidden}, source.name)


def _without_tied_head(source: TensorSource, cfg: ModelConfig) -> TensorSource:
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if not cfg.text.tie_word_embeddings or head not in source:
        return source
    if embed in source and not np.array_equal(source.read(head), source.read(embed)):
        raise CheckpointMismatchError(f"{source.name}: the config ties the embeddings but lm_head.weight differs "
                                      f"from embed_tokens.weight")
    return KeyView({k: (source, k) for k in source.keys() if k != head}, source.name)


def _is_lora(path: str) -> bool:
    return ".lora." in path


def load_llava(model: nnx.Module, cfg: ModelConfig, path: str | os.PathLike) -> str:
    """Stream LLaVA weights (any layout of the module docstring) into a LLaVA-connector model; returns the
    layout. Each layout sets what it holds: llava-hf everything; the original layout the LLM and projector
    (and the tower if it was saved); `mm_projector.bin` the projector. Keys and shapes are checked against
    the model from the headers before any parameter changes."""
    if connector_attribute(cfg) != PROJECTOR:
        raise CheckpointMismatchError(f"LLaVA weights need a LLaVA projector (model.connector linear, "
                                      f"mlp{{N}}x_gelu or identity), not {cfg.connector!r}")
    source, layout = unified_source(open_source(path), cfg)
    source = _without_tied_head(_without_identity_layers(source, cfg), cfg)
    parts = {k.split(".", 1)[0] for k in source.keys()}
    wanted = [p for p in ("vision_model", PROJECTOR, "language_model") if p in parts]
    rules = [r for r in llava_rules(cfg) if r.key.split(".", 1)[0] in wanted]
    stream_params(model, source, rules, ignore=IGNORED_BUFFERS + ("embeddings.position_ids",),
                  include=lambda p: p.split(".", 1)[0] in wanted and not _is_lora(p))
    return layout


# ------------------------------------------------------------------------------------------------
# Export (llava-hf, current keys)
# ------------------------------------------------------------------------------------------------

_HF_KEYS = (("vision_model.", "model.vision_tower.vision_model."), (f"{PROJECTOR}.", "model.multi_modal_projector."),
            ("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."))


def hf_projector_layers(cfg: ModelConfig) -> int:
    """How many of transformers' two projector layers the model's projector fills (the rest identities)."""
    depth = mlp_depth(cfg.connector)
    if depth is None or depth > 2:
        raise CheckpointMismatchError(f"model.connector {cfg.connector!r} has no llava-hf equivalent "
                                      f"(transformers' projector is linear, mlp2x_gelu or, exactly, identity)")
    return depth


def export_llava_hf(model: nnx.Module, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Base weights (LoRA excluded: merge first) as `LlavaForConditionalGeneration` tensors."""
    depth = hf_projector_layers(cfg)
    if vision_post_layernorm(cfg):
        raise CheckpointMismatchError("model.vision_feature_post_layernorm is true, which transformers' llava "
                                      "cannot express (it reads hidden states without the post-LayerNorm)")
    params = {k: np.asarray(v) for k, v in canonical_params(model).items() if not _is_lora(k)}
    unified = params_to_tensors(params, llava_rules(cfg))
    vision = {k[len("vision_model."):]: unified.pop(k) for k in list(unified) if k.startswith("vision_model.")}
    for k, v in clip.official_to_hf_clip(vision, cfg.vision).items():
        unified[f"vision_model.{k}"] = v
    d = cfg.text.hidden_size
    for i in range(depth + 1, 3):  # identities for the layers a linear / identity projector lacks
        width = cfg.vision.hidden_size * len(_feature_layers(cfg)) if i == 1 else d
        dtype = unified["language_model.model.embed_tokens.weight"].dtype
        unified[f"{PROJECTOR}.linear_{i}.weight"] = np.eye(d, width, dtype=dtype)
        if cfg.projector_bias:
            unified[f"{PROJECTOR}.linear_{i}.bias"] = np.zeros(d, dtype)
    out = {}
    for k, v in unified.items():
        old, new = next((o, n) for o, n in _HF_KEYS if k.startswith(o))
        out[new + k[len(old):]] = v
    return out


def _feature_layers(cfg: ModelConfig) -> list[int]:
    from owl_jax.models.connectors import connector_module
    layer = cfg.vision_feature_layer
    if layer is None:
        layer = list(connector_module(cfg.connector).DEFAULTS.layers)
    return [layer] if isinstance(layer, int) else list(layer)


def vision_post_layernorm(cfg: ModelConfig) -> bool:
    from owl_jax.models.connectors import vision_features
    return vision_features(cfg).post_layernorm


def image_token_index(cfg: ModelConfig) -> int:
    return cfg.image_token_index if cfg.image_token_index >= 0 else cfg.text.vocab_size - 1


def llava_hf_config(cfg: ModelConfig, *, dtype: str) -> dict:
    """`config.json` of a `LlavaForConditionalGeneration` directory."""
    from owl_jax.convert import hf_configs
    from owl_jax.models.connectors import vision_features
    depth = hf_projector_layers(cfg)
    layers = _feature_layers(cfg)
    vision = hf_configs.clip_vision_config(cfg.vision, dtype=dtype)
    vision.pop("architectures")
    text = hf_configs.llama_config(cfg.text, dtype=dtype)
    text.pop("architectures")
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_token_index(cfg),
        "image_seq_length": cfg.tokens_per_image,
        "projector_hidden_act": "gelu" if depth == 2 else "linear",
        "vision_feature_layer": layers[0] if len(layers) == 1 else layers,
        "vision_feature_select_strategy": "default" if vision_features(cfg).drop_cls else "full",
        "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        "torch_dtype": dtype,
        "text_config": text,
        "vision_config": vision,
    }


def processor_files(cfg: ModelConfig) -> dict[str, dict]:
    """`preprocessor_config.json` (owl-jax's inference preprocessing: bicubic square resize, CLIP mean/std)
    and `processor_config.json` (`LlavaProcessor`: `<image>` expands to `image_seq_length` tokens)."""
    from owl_jax.convert import hf_configs
    from owl_jax.models.connectors import vision_features
    strategy = "default" if vision_features(cfg).drop_cls else "full"
    return {"preprocessor_config.json": hf_configs.clip_image_processor_config(cfg.vision),
            "processor_config.json": {"processor_class": "LlavaProcessor", "image_token": "<image>",
                                      "patch_size": cfg.vision.patch_size, "num_additional_image_tokens": 1,
                                      "vision_feature_select_strategy": strategy}}


# ------------------------------------------------------------------------------------------------
# Configs in
# ------------------------------------------------------------------------------------------------


def _connector_from_hf(c: dict, source: TensorSource | None) -> str:
    act = c.get("projector_hidden_act", "gelu")
    if act == "gelu":
        return "mlp2x_gelu"
    if act == "linear" and source is not None:
        unified, _ = unified_source(source, _probe_cfg(c))
        one = _without_identity_layers(unified, _probe_cfg(c, "linear"))
        if f"{PROJECTOR}.linear_2.weight" not in one:
            return "linear"
    raise CheckpointMismatchError(f"projector_hidden_act {act!r}: owl-jax's projectors use exact GELU "
                                  f"(mlp{{N}}x_gelu), or are a single linear layer exported as linear + identity")


def _probe_cfg(c: dict, connector: str = "mlp2x_gelu") -> ModelConfig:
    from owl_jax.convert.mplug_owl import vision_config_from_hf
    return ModelConfig(vision=vision_config_from_hf(c["vision_config"]), connector=connector)


def model_config_from_llava_hf(c: dict, base: ModelConfig | None = None,
                               source: TensorSource | None = None) -> ModelConfig:
    """llava-hf `config.json` -> ModelConfig (non-architecture settings from `base`). `source` (the
    checkpoint) tells a `linear` projector exported as linear + identity from a linear-activation MLP."""
    import dataclasses
    from owl_jax.convert.mplug_owl import text_config_from_hf, vision_config_from_hf
    base = base or ModelConfig()
    vision = vision_config_from_hf(c["vision_config"])
    vision = dataclasses.replace(vision, hidden_act=c["vision_config"].get("hidden_act", "quick_gelu"),
                                 layer_norm_eps=c["vision_config"].get("layer_norm_eps", 1e-5))
    text = c.get("text_config") or {}
    text_cfg = text_config_from_hf({**text, "tie_word_embeddings": c.get("tie_word_embeddings",
                                                                         text.get("tie_word_embeddings", False))})
    layer = c.get("vision_feature_layer", -2)
    return dataclasses.replace(base, vision=vision, text=text_cfg, connector=_connector_from_hf(c, source),
                               vision_feature_layer=layer if isinstance(layer, int) else list(layer),
                               vision_feature_select_strategy=c.get("vision_feature_select_strategy", "default"),
                               vision_feature_post_layernorm=False,
                               projector_bias=bool(c.get("multimodal_projector_bias", True)),
                               image_token_index=int(c.get("image_token_index", c.get("image_token_id", 32000))))


def read_llava_config(directory: str | os.PathLike, base: ModelConfig | None = None) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise io.WeightFileError(f"{directory}: no config.json")
    c = json.loads(path.read_text())
    if c.get("model_type") != "llava":
        raise CheckpointMismatchError(f"{path}: model_type {c.get('model_type')!r} is not a llava-hf checkpoint")
    return model_config_from_llava_hf(c, base, open_source(directory))


def original_llava_settings(c: dict) -> dict:
    """The ModelConfig fields an original LLaVA `config.json` fixes (its tower is only named, by
    `mm_vision_tower`, so vision sizes come from the tower's own config)."""
    strategy = {"patch": "default", "cls_patch": "full"}.get(c.get("mm_vision_select_feature", "patch"))
    if strategy is None:
        raise CheckpointMismatchError(f"mm_vision_select_feature {c.get('mm_vision_select_feature')!r} is not "
                                      f"patch or cls_patch")
    return {"connector": c.get("mm_projector_type", "linear"),
            "vision_feature_layer": int(c.get("mm_vision_select_layer", -2)),
            "vision_feature_select_strategy": strategy, "vision_feature_post_layernorm": False}


def check_original_config(c: dict, cfg: ModelConfig, where: str) -> None:
    """Refuse an original LLaVA checkpoint whose `mm_*` settings disagree with the model config."""
    from owl_jax.models.connectors import feature_dim
    want = original_llava_settings(c)
    got = {"connector": cfg.connector, "vision_feature_layer": cfg.vision_feature_layer,
           "vision_feature_select_strategy": cfg.vision_feature_select_strategy or "default"}
    diff = [f"{k}: checkpoint {want[k]!r}, model {got[k]!r}" for k in got
            if got[k] is not None and want[k] != got[k]]
    if "mm_hidden_size" in c and int(c["mm_hidden_size"]) != feature_dim(cfg):
        diff.append(f"mm_hidden_size: checkpoint {c['mm_hidden_size']}, model feature width {feature_dim(cfg)}")
    if diff:
        raise CheckpointMismatchError(f"{where} does not match the model config: " + "; ".join(diff))


def load_llava_checked(model: nnx.Module, cfg: ModelConfig, path: str | os.PathLike,
                       log: Callable[[str], None] = lambda s: None) -> str:
    """`init.llava_from`: `load_llava` after checking an original LLaVA `config.json` (if there is one)
    against the model config."""
    config = Path(path) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        if "mm_projector_type" in c or "mm_hidden_size" in c:
            check_original_config(c, cfg, str(config))
    layout = load_llava(model, cfg, path)
    log(f"loaded LLaVA weights ({layout}) from {path}")
    return layout
