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


def parameter_layout(model: nnx.Module) -> list[tuple[nnx.Variable, list[str] | None, str]]:
    """(variable, canonical names of its layer slices or None, canonical name) per Param/LoRAParam.

    For a scanned stack's variable the list names layer i's slice `value[i]`; otherwise it is None and
    the variable maps whole to the canonical name (its real dotted path). The one place that knows how
    the two layouts correspond; reading, shape listing and assignment all go through it."""
    stacks = _scanned_stack_prefixes(model)
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = path_str(path)
        prefix = next((p for p in stacks if name.startswith(p + ".")), None)
        if prefix is None:
            out.append((var, None, name))
        else:
            rest = name[len(prefix) + 1:]
            out.append((var, [f"{prefix}.{i}.{rest}" for i in range(var.shape[0])], name))
    return out


def canonical_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Canonical dotted path -> array (stacked layers split into per-layer entries)."""
    out = {}
    for var, per_layer, name in parameter_layout(model):
        value = var[...]
        if per_layer is None:
            out[name] = value
        else:
            out.update((k, value[i]) for i, k in enumerate(per_layer))
    return out


def canonical_shapes(model: nnx.Module) -> dict[str, tuple[tuple[int, ...], object]]:
    """Canonical dotted path -> (shape, dtype) without touching values (works on abstract models)."""
    out = {}
    for var, per_layer, name in parameter_layout(model):
        shape, dtype = tuple(var.shape), var.dtype
        if per_layer is None:
            out[name] = (shape, dtype)
        else:
            out.update((k, (shape[1:], dtype)) for k in per_layer)
    return out


class StateMismatchError(ValueError):
    """Tensors given for a model do not match its parameters."""


def check_shapes(model: nnx.Module, shapes: dict[str, tuple[int, ...]], *,
                 include: Callable[[str], bool] = lambda path: True) -> dict[str, tuple[tuple[int, ...], object]]:
    """Check canonical-path shapes against the parameters selected by `include`: each given exactly once
    with the right shape, else a StateMismatchError listing the missing, unexpected and mis-shaped names.
    Returns the selected parameters' (shape, dtype)."""
    expected = {k: v for k, v in canonical_shapes(model).items() if include(k)}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = sorted(f"{k}: model {expected[k][0]} vs given {tuple(shapes[k])}"
                       for k in set(expected) & set(shapes) if tuple(shapes[k]) != expected[k][0])
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title}: {shown}")
        raise StateMismatchError("parameters do not match the model; " + "; ".join(parts))
    return expected


def assign_canonical_params(model: nnx.Module, params: dict[str, np.ndarray | jax.Array], *,
                            include: Callable[[str], bool] = lambda path: True) -> None:
    """Set the parameters selected by `include` (canonical path predicate) from canonical-path arrays,
    cast to each parameter's dtype.

    Every selected parameter must be given exactly once with the right shape; otherwise a
    StateMismatchError lists the missing, unexpected and mis-shaped names, and nothing is assigned, so a
    wrong checkpoint never half-loads.
    """
    expected = check_shapes(model, {k: tuple(np.shape(v)) for k, v in params.items()}, include=include)
    for var, per_layer, name in parameter_layout(model):
        if per_layer is None:
            if name in expected:
                _set_keeping_placement(var, params[name])
        elif per_layer[0] in expected:
            _set_keeping_placement(var, np.stack([np.asarray(params[k]) for k in per_layer]))


def place_on(value: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host array placed with `sharding`: each process builds only its own shards, so this works for
    shardings over devices of several processes as well as for one process."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _set_keeping_placement(var: nnx.Variable, value) -> None:
    """Replace a variable's value, cast to its dtype and placed with its current sharding (values may come
    from the host or from another device set, e.g. a checkpoint restored onto one device)."""
    current = var.get_value()
    host = np.asarray(value).astype(current.dtype)
    sharding = getattr(current, "sharding", None)
    var.set_value(jnp.asarray(host) if sharding is None else place_on(host, sharding))
