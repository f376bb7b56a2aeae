"""A layout-independent flat view of a model's parameters.

Scanned models store each `LayerStack` as arrays with a leading layer axis; unscanned ones as
`layers.0`, `layers.1`, .... Conversion code is written once against the *canonical* (unscanned) dotted
paths, e.g. `language_model.layers.layers.3.self_attn.q_proj.kernel`; this module translates between that
view and the model's real state, whichever layout it uses.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from owl_jax.models.layers import LayerStack, path_str


def _scanned_stack_prefixes(model: nnx.Module) -> list[str]:
    """Dotted paths of the `layers` attribute of every scanned LayerStack (`vision_model.layers.layers`)."""
    return [path_str(tuple(path) + ("layers",)) for path, node in nnx.iter_graph(model)
            if isinstance(node, LayerStack) and node.scan]


def _flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Dotted path -> Param/LoRAParam variable of the model (real layout)."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {path_str(path): var for path, var in flat}


def canonical_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Canonical dotted path -> array (stacked layers split into per-layer entries)."""
    stacks = _scanned_stack_prefixes(model)
    out = {}
    for name, var in _flat_variables(model).items():
        value = var[...]
        prefix = next((p for p in stacks if name.startswith(p + ".")), None)
        if prefix is None:
            out[name] = value
            continue
        rest = name[len(prefix) + 1:]
        for i in range(value.shape[0]):
            out[f"{prefix}.{i}.{rest}"] = value[i]
    return out


def canonical_shapes(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], object]]:
    """Canonical dotted path -> (shape, dtype) without touching values (works on abstract models)."""
    stacks = _scanned_stack_prefixes(model)
    out = {}
    for name, var in _flat_variables(model).items():
        shape, dtype = tuple(var.shape), var.dtype
        prefix = next((p for p in stacks if name.startswith(p + ".")), None)
        if prefix is None:
            out[name] = (shape, dtype)
            continue
        rest = name[len(prefix) + 1:]
        for i in range(shape[0]):
            out[f"{prefix}.{i}.{rest}"] = (shape[1:], dtype)
    return out


class StateMismatchError(ValueError):
    """Tensors given for a model do not match its parameters."""


def assign_canonical_params(model: nnx.Module, params: dict[str, np.ndarray | jax.Array], *,
                            include: Callable[[str], bool] = lambda path: True) -> None:
    """Set the parameters selected by `include` (canonical path predicate) from canonical-path arrays,
    cast to each parameter's dtype.

    Every selected parameter must be given exactly once with the right shape; otherwise a
    StateMismatchError lists the missing, unexpected and mis-shaped names, and nothing is assigned, so a
    wrong checkpoint never half-loads.
    """
    expected = {k: v for k, v in canonical_shapes(model).items() if include(k)}
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    misshaped = sorted(f"{k}: model {expected[k][0]} vs given {tuple(np.shape(params[k]))}"
                       for k in set(expected) & set(params) if tuple(np.shape(params[k])) != expected[k][0])
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title}: {shown}")
        raise StateMismatchError("parameters do not match the model; " + "; ".join(parts))

    stacks = _scanned_stack_prefixes(model)
    for name, var in _flat_variables(model).items():
        prefix = next((p for p in stacks if name.startswith(p + ".")), None)
        if prefix is None:
            if name not in expected:
                continue
            value = params[name]
        else:
            rest = name[len(prefix) + 1:]
            per_layer = [f"{prefix}.{i}.{rest}" for i in range(var.shape[0])]
            if per_layer[0] not in expected:
                continue
            value = np.stack([np.asarray(params[k]) for k in per_layer])
        _set_keeping_placement(var, value)


def _set_keeping_placement(var: nnx.Variable, value) -> None:
    """Replace a variable's value, cast to its dtype and placed with its current sharding (values may come
    from the host or from another device set, e.g. a checkpoint restored onto one device)."""
    current = var.get_value()
    new = jnp.asarray(np.asarray(value), dtype=current.dtype)
    sharding = getattr(current, "sharding", None)
    if sharding is not None:
        new = jax.device_put(new, sharding)
    var.set_value(new)
