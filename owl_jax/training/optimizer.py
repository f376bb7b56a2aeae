"""AdamW with warmup + decay schedules, a weight-decay mask, per-group learning rates and global-norm
clipping (optax).

Learning-rate groups (`optimizer.param_groups`: name, path patterns, peak learning rate) share one AdamW:
Adam's moments and the decoupled weight decay are computed for every trainable leaf alike, and the last
step, `-learning_rate * update`, takes each leaf's rate from its group's schedule (the first group whose
pattern matches its user-facing path, `models.layers.user_path`; `default`, `optimizer.learning_rate`, for
the rest). That is exactly AdamW per group, as LLaVA-LoRA's `--mm_projector_lr` gives the projector its
own torch param group, with the optimizer state of a plain AdamW (`optax.multi_transform` would fill it with
`MaskedNode` placeholders, which checkpoints cannot hold). All groups share the schedule's shape (warmup,
decay, end ratio), scaled to their peak; each group's rate is logged as `learning_rate/<name>`. The older
`optimizer.lr_multipliers` (regex -> factor of `learning_rate`) become groups `lr_x0, lr_x1, ...`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from owl_jax.config import ConfigError, OptimizerConfig
from owl_jax.models.layers import path_str, user_path

# Leaves that get weight decay: matrices. Norm scales, biases, the learned queries, class/position
# embeddings and `vit_eos` are not decayed (decaying them only pulls them toward zero).
_DECAYED_LEAVES = ("kernel", "patch_embed", "embed_tokens", "lora_a", "lora_b")
DEFAULT_GROUP = "default"


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """Warmup then decay to `end_learning_rate_ratio` of `peak` (default `cfg.learning_rate`)."""
    peak = cfg.learning_rate if peak is None else peak
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


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    patterns: tuple[str, ...]
    peak: float


def parameter_groups(cfg: OptimizerConfig) -> list[Group]:
    """The configured learning-rate groups in matching order (without `default`)."""
    if cfg.param_groups:
        return [Group(g.name, tuple(g.patterns), g.learning_rate) for g in cfg.param_groups]
    return [Group(f"lr_x{i}", (pattern,), cfg.learning_rate * float(m))
            for i, (pattern, m) in enumerate(cfg.lr_multipliers.items())]


def group_of(name: str, groups: Sequence[Group]) -> str:
    """The group a user-facing parameter path belongs to (first match; `default` if none)."""
    for g in groups:
        if any(re.search(p, name) for p in g.patterns):
            return g.name
    return DEFAULT_GROUP


class LearningRates:
    """The base schedule (called as one: `schedule(step)`, what the progress line shows) and each group's
    (`groups[name](step)`), for logging `learning_rate/<name>` from the step."""

    def __init__(self, base: optax.Schedule, groups: dict[str, optax.Schedule]):
        self.base, self.groups = base, groups

    def __call__(self, step):
        return self.base(step)


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


def _group_labels(params, groups: Sequence[Group]):
    return jax.tree_util.tree_map_with_path(lambda kp, _: group_of(user_path(path_str(_names(kp))), groups), params)


def check_param_groups(cfg: OptimizerConfig, trainable: Sequence[str]) -> dict[str, int]:
    """Leaves per group over the trainable leaves' user paths; a `param_groups` group that takes none is a
    config error (a typo, or a group of frozen parameters). The older `lr_multipliers` are not checked, as
    they never were."""
    groups = parameter_groups(cfg)
    counts = {g.name: 0 for g in groups}
    counts[DEFAULT_GROUP] = 0
    for name in trainable:
        counts[group_of(name, groups)] += 1
    for i, g in enumerate(cfg.param_groups):
        if not counts[g.name]:
            raise ConfigError(f"optimizer.param_groups[{i}] ({g.name}): patterns {', '.join(g.patterns)} match no "
                              f"trainable parameter (groups take trainable leaves only; see training.trainable)")
    return counts


def scale_by_group_learning_rates(schedules: dict[str, optax.Schedule], groups: Sequence[Group]):
    """`optax.scale_by_learning_rate` with each leaf's rate from its group's schedule (`schedules` holds
    `default` too); the same state (`ScaleByScheduleState`: the step count)."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        rates = {name: s(state.count) for name, s in schedules.items()}
        labels = _group_labels(updates, groups)
        updates = jax.tree.map(lambda u, g: -jnp.array(rates[g], dtype=u.dtype) * u, updates, labels)
        return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, LearningRates]:
    """The optimizer for the trainable leaves and its schedules (for logging the learning rates)."""
    base = learning_rate_schedule(cfg, total_steps)
    groups = parameter_groups(cfg)
    schedules = {g.name: learning_rate_schedule(cfg, total_steps, peak=g.peak) for g in groups}
    if groups:  # optax.adamw's own chain, with the per-group rates as its last step
        inner = optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                            optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                            scale_by_group_learning_rates({**schedules, DEFAULT_GROUP: base}, groups))
    else:
        inner = optax.adamw(base, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    return optax.chain(*chain, inner), LearningRates(base, schedules)
