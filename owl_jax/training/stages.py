"""Which parameters train: path patterns from the config, with a named preset per published recipe.

A trainable set is a list of regular expressions searched in the user-facing parameter paths
(`models.layers.user_path`: `language_model.layers.0.self_attn.q_proj.kernel`, `projector.linear_1.bias`,
`abstractor.query_tokens`; a scanned stack's leaf has no layer index and stands for every layer). A leaf
trains when some pattern matches it and no `!`-prefixed pattern does. `training.trainable` gives the
patterns; left empty, `training.stage` names a preset (`PRESETS`). Presets name the model's parts rather
than a family's paths: `{connector}` is the composite's connector attribute (`abstractor` or `projector`),
so every preset works with every connector (`llava_stage1` on an mPLUG-Owl model trains its abstractor
alone).

Frozen leaves are excluded from `nnx.DiffState` and from the optimizer, so XLA never computes their
weight gradients and no optimizer state exists for them. A pattern that selects nothing is a config error
(`StageError`, one line in the CLIs): a typo must not silently train less, or nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Callable, Sequence

from flax import nnx

from owl_jax.config import ConfigError, TrainingConfig, field_choices
from owl_jax.models.layers import path_str, user_path

STAGES = field_choices(TrainingConfig, "stage")  # the one list: the config field declares it

LORA = r"\.lora_[ab]$"  # the adapters' leaves (`nnx.LoRAParam`): `...q_proj.lora.lora_a`, `.lora_b`
_NOT_LORA = "!" + LORA  # base-weight presets leave adapters built into the model alone
_VISION, _CONNECTOR, _LLM = r"^vision_model\.", r"^{connector}\.", r"^language_model\."
_LN_VISION = r"^vision_model\.post_layernorm\."  # LAVIS's `ln_vision`, outside its frozen `visual_encoder`


@dataclasses.dataclass(frozen=True)
class Preset:
    patterns: tuple[str, ...]  # `{connector}` stands for the connector's attribute
    recipe: str  # what it reproduces, and where that comes from
    images: bool = True  # False: text-only batches


PRESETS: dict[str, Preset] = {
    "owl_stage1": Preset((_VISION, _CONNECTOR, _NOT_LORA),
                         "mPLUG-Owl stage 1: vision tower + abstractor, LLM frozen (paper §3.2)"),
    "owl_stage2_lora": Preset((LORA,), "mPLUG-Owl stage 2 as the released pipeline/train.py --use-lora does "
                                       "it: the LoRA adapters only"),
    "owl_stage2_paper": Preset((LORA, _CONNECTOR), "mPLUG-Owl stage 2 as the paper describes it: the LoRA "
                                                   "adapters and the abstractor"),
    "llava_stage1": Preset((_CONNECTOR, _NOT_LORA), "LLaVA stage 1 (feature alignment): the projector only "
                                                    "(scripts/v1_5/pretrain.sh --tune_mm_mlp_adapter)"),
    "llava_stage2": Preset((_CONNECTOR, _LLM, _NOT_LORA), "LLaVA stage 2: projector + LLM, vision tower frozen "
                                                          "(scripts/v1_5/finetune.sh)"),
    "llava_lora": Preset((LORA, _CONNECTOR), "LLaVA LoRA: LoRA on every LLM linear + the projector "
                                             "(scripts/v1_5/finetune_lora.sh)"),
    # The Q-Former family: `{connector}` is `qformer` there (transformers' `qformer.*`, `query_tokens`,
    # `language_projection.*` all live under it in owl-jax).
    "minigpt4": Preset((r"^{connector}\.language_projection\.",),
                       "MiniGPT-4 stages 1 and 2: the linear projection into the LLM only (llama_proj; ViT, Q-Former "
                       "and LLM frozen: minigpt4/models/mini_gpt4.py freeze_vit / freeze_qformer)"),
    "blip2_stage2": Preset((_CONNECTOR, _LN_VISION, _NOT_LORA),
                           "BLIP-2 stage 2 (generative pretraining): Q-Former, queries, language_projection and "
                           "ln_vision (the tower's post-LayerNorm); ViT blocks and LLM frozen (LAVIS blip2_opt.py "
                           "freeze_vit freezes visual_encoder only)"),
    "instructblip": Preset((_CONNECTOR, _LN_VISION, _NOT_LORA),
                           "InstructBLIP: Q-Former (with its text embeddings), queries, language_projection and "
                           "ln_vision; ViT blocks and LLM frozen (LAVIS blip2_vicuna_instruct.py)"),
    # The names of the first release. `pretrain` is resolved per connector (`pretrain_preset`).
    "instruct_lora": Preset((LORA,), "the LoRA adapters only (= owl_stage2_lora)"),
    "instruct_full": Preset((_LLM, _NOT_LORA), "the LLM, vision side frozen"),
    "lm_pretrain": Preset((_LLM, _NOT_LORA), "the LLM on text-only batches", images=False),
}


class StageError(ConfigError, ValueError):
    """The configured trainable set selects nothing, or a pattern of it matches no parameter (a config
    mistake: the CLIs show it as one line)."""


def pretrain_preset(model_cfg=None) -> str:
    """`pretrain` is the connector's own stage 1: mPLUG-Owl trains the tower with the abstractor, LLaVA's
    projectors train alone (`models.connectors.trained_with_vision`); without a model config, mPLUG-Owl's."""
    if model_cfg is None:
        return "owl_stage1"
    from owl_jax.models.connectors import trained_with_vision
    return "owl_stage1" if trained_with_vision(model_cfg) else "llava_stage1"


def _stage_of(training: TrainingConfig | str) -> str:
    stage = training if isinstance(training, str) else training.stage
    if stage not in STAGES:
        raise StageError(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    return stage


def trainable_patterns(training: TrainingConfig | str, model_cfg=None) -> tuple[tuple[str, ...], str]:
    """(patterns, label): `training.trainable` when given, else the stage's preset with `{connector}`
    filled in. The label names the source in messages (`stage llava_lora`, `training.trainable`)."""
    stage = _stage_of(training)
    if not isinstance(training, str) and training.trainable:
        return tuple(training.trainable), "training.trainable"
    name = pretrain_preset(model_cfg) if stage == "pretrain" else stage
    connector = "abstractor"
    if model_cfg is not None:
        from owl_jax.models.connectors import connector_attribute
        connector = connector_attribute(model_cfg)
    patterns = tuple(p.replace("{connector}", re.escape(connector)) for p in PRESETS[name].patterns)
    return patterns, f"stage {stage}" + (f" ({name})" if name != stage else "")


def uses_images(training: TrainingConfig | str) -> bool:
    """Whether batches carry images (every preset but `lm_pretrain`, whatever `training.trainable` says)."""
    stage = _stage_of(training)
    return stage == "pretrain" or PRESETS[stage].images


class _Matcher:
    """Include / `!`-exclude patterns over user paths."""

    def __init__(self, patterns: Sequence[str]):
        self.include = [re.compile(p) for p in patterns if not p.startswith("!")]
        self.exclude = [re.compile(p[1:]) for p in patterns if p.startswith("!")]

    def __call__(self, name: str) -> bool:
        return any(p.search(name) for p in self.include) and not any(p.search(name) for p in self.exclude)


def trainable_filter(training: TrainingConfig | str, model_cfg=None) -> Callable[[tuple, Any], bool]:
    """An NNX filter `(path, variable) -> bool` selecting the trainable `nnx.Param` leaves (LoRA adapters
    included) by their user-facing path. `training` is a TrainingConfig or a stage (preset) name."""
    match = _Matcher(trainable_patterns(training, model_cfg)[0])
    return lambda path, x: isinstance(x, nnx.Param) and match(user_path(path_str(path)))


@dataclasses.dataclass(frozen=True)
class TrainableSet:
    """The resolved trainable set of one model: what the train step, the optimizer groups and the FLOP
    count (`owl_jax.flops`) read. Names are user-facing paths as the model has them (scanned stacks
    without a layer index)."""

    label: str
    patterns: tuple[str, ...]
    names: tuple[str, ...]  # trainable leaves
    params: tuple[str, ...]  # every parameter leaf
    scanned: bool = False

    def __contains__(self, name: str) -> bool:
        return name in self._lookup

    @functools.cached_property
    def _lookup(self) -> frozenset:
        return frozenset(self.names)


# `layers.0.`, `layers\.0\.`, `layers\.[0-3]\.`, `layers\.\d+\.`: a pattern naming layer indices
_LAYER_INDEX = re.compile(r"layers(?:\\\.|\.)(?:\d|\[|\\d)")


def _no_match_hint(pattern: str, params: Sequence[str], model_cfg, scanned: bool) -> str:
    if pattern == LORA:
        return " (the model has no LoRA adapters: set model.lora.rank > 0)"
    if model_cfg is not None and model_cfg.connector != "qformer" and "language_projection" in pattern:
        return " (language_projection is the Q-Former's projection: model.connector qformer)"
    if model_cfg is not None and model_cfg.connector == "identity" and "projector" in pattern:
        return " (the identity connector has no parameters and LLaVA keeps the vision tower frozen)"
    if scanned and _LAYER_INDEX.search(pattern):
        return " (with model.scan_layers a stack's leaves name no layer index: they stand for every layer)"
    tops = sorted({p.split(".")[0] for p in params})
    examples = [next(p for p in params if p.startswith(t + ".") or p == t) for t in tops]
    return f" (paths look like {', '.join(examples)})"


def resolve_trainable(model: nnx.Module, training: TrainingConfig | str, model_cfg=None) -> TrainableSet:
    """The model's trainable set; every pattern must select something: an include pattern must match a
    parameter, a `!` pattern must remove one of the included leaves (presets' `!` patterns, which exclude
    adapters that may not exist, are exempt), and the set must not be empty."""
    patterns, label = trainable_patterns(training, model_cfg)
    from_config = label == "training.trainable"
    params = [user_path(path_str(p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    scanned = bool(model_cfg.scan_layers) if model_cfg is not None else False
    where = "training.trainable" if from_config else f"training.{label}"
    include = _Matcher([p for p in patterns if not p.startswith("!")])
    for pattern in patterns:
        if pattern.startswith("!"):
            if from_config:
                rx = re.compile(pattern[1:])
                if not any(rx.search(n) and include(n) for n in params):
                    raise StageError(f"{where}: pattern '{pattern}' excludes none of the parameters the other "
                                     f"patterns select")
            continue
        rx = re.compile(pattern)
        if not any(rx.search(n) for n in params):
            raise StageError(f"{where}: pattern '{pattern}' matches no parameter"
                             f"{_no_match_hint(pattern, params, model_cfg, scanned)}")
    match = _Matcher(patterns)
    names = tuple(n for n in params if match(n))
    if not names:
        raise StageError(f"{where}: patterns {', '.join(patterns)} select no trainable parameter")
    return TrainableSet(label=label, patterns=patterns, names=names, params=tuple(params), scanned=scanned)


def check_stage(model: nnx.Module, training: TrainingConfig | str, model_cfg=None) -> list[str]:
    """Internal (`nnx` state) paths of the trainable leaves, after `resolve_trainable`'s checks: a set that
    selects nothing (e.g. `instruct_lora` on a model built without adapters, `pretrain` with the
    parameter-free `identity` connector) is an error rather than a run that trains nothing."""
    resolve_trainable(model, training, model_cfg)
    keep = trainable_filter(training, model_cfg)
    return [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, keep))]


def describe(trainable: TrainableSet) -> str:
    """One line for the train CLI: where the set comes from and its patterns."""
    return f"{trainable.label}: {len(trainable.names)} trainable leaves ({', '.join(trainable.patterns)})"
