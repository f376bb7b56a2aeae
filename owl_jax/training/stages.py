"""Training stages pick the trainable parameters by path (DESIGN.md §2).

- `pretrain`: vision tower + abstractor (incl. the learned queries) trained; LLM frozen, gradients flow
  through it to the visual tokens but its weights get none.
- `instruct_lora`: only the LoRA adapters (`nnx.LoRAParam`) are trained.
- `instruct_full`: the LLM trained; vision side frozen.
- `lm_pretrain`: text-only; the LLM trained.

Frozen leaves are excluded from `nnx.DiffState` and from the optimizer, so XLA never computes their
weight gradients and no optimizer state exists for them.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from flax import nnx

from owl_jax.models.layers import path_str

STAGES = ("pretrain", "instruct_lora", "instruct_full", "lm_pretrain")

_TRAINABLE_PATHS = {
    "pretrain": r"^(vision_model|abstractor)\.",
    "instruct_full": r"^language_model\.",
    "lm_pretrain": r"^language_model\.",
}


class StageError(ValueError):
    pass


def trainable_filter(stage: str) -> Callable[[tuple, Any], bool]:
    """An NNX filter `(path, variable) -> bool` selecting the stage's trainable leaves."""
    if stage not in STAGES:
        raise StageError(f"unknown training stage {stage!r}; choose one of {', '.join(STAGES)}")
    if stage == "instruct_lora":
        return lambda path, x: isinstance(x, nnx.LoRAParam)
    pattern = re.compile(_TRAINABLE_PATHS[stage])
    return lambda path, x: (isinstance(x, nnx.Param) and not isinstance(x, nnx.LoRAParam)
                            and bool(pattern.search(path_str(path))))


def uses_images(stage: str) -> bool:
    return stage != "lm_pretrain"


def check_stage(model: nnx.Module, stage: str) -> list[str]:
    """Names of the trainable leaves; an empty trainable set (e.g. `instruct_lora` on a model built without
    adapters) is an error rather than a run that trains nothing."""
    keep = trainable_filter(stage)
    names = [path_str(p) for p, v in nnx.to_flat_state(nnx.state(model, keep))]
    if not names:
        hint = " (set model.lora.rank > 0)" if stage == "instruct_lora" else ""
        raise StageError(f"stage {stage!r} selects no trainable parameters{hint}")
    return names
