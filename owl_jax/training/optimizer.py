"""AdamW with warmup + decay schedules, a weight-decay mask, per-module learning-rate multipliers and
global-norm clipping (optax)."""

from __future__ import annotations

import re

import jax
import optax

from owl_jax.config import OptimizerConfig
from owl_jax.models.layers import path_str

# Leaves that get weight decay: matrices. Norm scales, biases, the learned queries, class/position
# embeddings and `vit_eos` are not decayed (decaying them only pulls them toward zero).
_DECAYED_LEAVES = ("kernel", "patch_embed", "embed_tokens", "lora_a", "lora_b")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    peak = cfg.learning_rate
    warmup = max(cfg.warmup_steps, 0)
    decay_steps = max((cfg.decay_steps or total_steps) - warmup, 1)
    end = peak * cfg.end_learning_rate_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def _names(keypath) -> tuple:
    """Parameter path of a pytree key path through an NNX State (Variables add a `.value` attribute key)."""
    out = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            out.append(k.key)
        elif isinstance(k, jax.tree_util.SequenceKey):
            out.append(k.idx)
    return tuple(out)


def decay_mask(params):
    """Pytree of bools matching `params`: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: str(_names(kp)[-1]) in _DECAYED_LEAVES, params)


def _group_labels(params, multipliers: dict[str, float]):
    patterns = [(re.compile(k), f"lr_x{i}") for i, k in enumerate(multipliers)]

    def label(keypath, _) -> str:
        name = path_str(_names(keypath))
        return next((g for p, g in patterns if p.search(name)), "default")

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for the trainable leaves and its base schedule (for logging the learning rate).

    Per-module multipliers (`optimizer.lr_multipliers`: path regex -> factor; first match wins) become
    separate AdamW groups sharing the schedule shape.
    """
    schedule = learning_rate_schedule(cfg, total_steps)

    def adamw(scale: float) -> optax.GradientTransformation:
        lr = schedule if scale == 1.0 else (lambda step: schedule(step) * scale)
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)

    if cfg.lr_multipliers:
        groups = {f"lr_x{i}": adamw(float(m)) for i, m in enumerate(cfg.lr_multipliers.values())}
        groups["default"] = adamw(1.0)
        inner = optax.multi_transform(groups, lambda params: _group_labels(params, cfg.lr_multipliers))
    else:
        inner = adamw(1.0)
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    return optax.chain(*chain, inner), schedule
