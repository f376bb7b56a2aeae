"""Streaming import: checkpoint tensors go one at a time from disk into their target shardings.

Importing a 7B checkpoint by first building a dict of every tensor needs host memory for the whole model
(several times over, with transposes and dtype casts). Here the checkpoint is checked against the model
from the file headers alone (keys, and shapes after each rule's transform on a zero-stride probe), so a
checkpoint that does not fit fails before any parameter changes; then each parameter is read, transformed,
cast to the parameter's dtype and placed with the parameter's current sharding
(`jax.make_array_from_callback`: each process only transfers its own shards). Host memory stays near one
tensor.

Scanned layer stacks (`LayerStack(scan=True)`) store one array with a leading layer axis that the
checkpoint splits into per-layer tensors. Each layer's tensor is placed with the stack's sharding minus
its first axis and written into the stack by a jitted update that donates the stack, so neither the host
nor the devices ever hold a second copy of a stacked parameter.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from owl_jax.convert.keymap import (CheckpointMismatchError, TensorRule, _listing, check_keys,
                                    transformed_shape)
from owl_jax.convert.sources import TensorSource
from owl_jax.convert.state import check_shapes, parameter_layout, place_on


def stream_params(model: nnx.Module, source: TensorSource, rules: list[TensorRule], *,
                  include: Callable[[str], bool] = lambda path: True, ignore: Iterable[str] = ()) -> int:
    """Load the parameters that `rules` map from `source` into `model` (those selected by `include`, each
    exactly once), keeping every parameter's dtype and sharding. Returns the number of tensors read.

    Raises CheckpointMismatchError (missing / unexpected / mis-shaped checkpoint keys) or
    StateMismatchError (parameters the rules leave unset or give the wrong shape) before anything is
    assigned. An I/O error part-way (a file truncated after its header was read) can leave a partial load.
    """
    check_keys(source.keys(), rules, ignore=ignore, source=source.name)
    shapes, misshaped = {}, []
    for rule in rules:
        shape = tuple(source.shape(rule.key))
        try:
            shapes[rule.path] = transformed_shape(rule, shape, source.dtype(rule.key))
        except ValueError as e:
            misshaped.append(f"{rule.key} {shape} ({e})")
    if misshaped:
        raise CheckpointMismatchError(f"{source.name} does not match the model: " + _listing("mis-shaped", misshaped))
    selected = check_shapes(model, shapes, include=include)
    rule_of = {r.path: r for r in rules if r.path in selected}

    layout = parameter_layout(model)
    seen: dict[int, int] = {}
    for var, _, _ in layout:
        seen[id(var.get_value())] = seen.get(id(var.get_value()), 0) + 1
    count = 0
    for var, per_layer, name in layout:
        if per_layer is None:
            if name in rule_of:
                sharding = _sharding_of(var.get_value())
                var.set_value(jax.block_until_ready(place_on(_host_value(source, rule_of[name], var.dtype), sharding)))
                count += 1
        elif per_layer[0] in rule_of:
            stacked = var.get_value()
            if seen[id(stacked)] > 1:  # shared with another variable: never donate a buffer someone else reads
                stacked = jax.numpy.array(stacked, copy=True)
            if not isinstance(stacked, jax.Array):
                stacked = jax.device_put(stacked, _sharding_of(stacked))
            update = _layer_update(stacked.sharding)
            layer_sharding = _drop_leading_axis(stacked.sharding)
            for i, key in enumerate(per_layer):
                value = place_on(_host_value(source, rule_of[key], var.dtype), layer_sharding)
                # wait for each layer: asynchronous dispatch would otherwise queue the host copies of many
                stacked = jax.block_until_ready(update(stacked, value, np.int32(i)))
                count += 1
            var.set_value(stacked)
    return count


def _host_value(source: TensorSource, rule: TensorRule, dtype) -> np.ndarray:
    """One parameter on the host: read, transformed, cast, as a fresh contiguous array. The copy matters
    on the CPU backend, where a device array may alias the host buffer it was made from: the tensor read
    is then released as soon as this returns, whatever the placement keeps."""
    return np.array(rule.to_jax(source.read(rule.key)), dtype=dtype, order="C", copy=True)


def _sharding_of(value) -> Sharding:
    sharding = getattr(value, "sharding", None)
    # an unplaced (host) value goes to this process's first device: jax.devices()[0] belongs to
    # process 0 and cannot be written by the others
    return sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _drop_leading_axis(sharding: Sharding) -> Sharding:
    """The sharding of one layer of a stacked parameter placed with `sharding`."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec)[1:]
        return NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)
    if len(sharding.device_set) == 1 or sharding.is_fully_replicated:
        return sharding
    raise TypeError(f"cannot derive a per-layer sharding from {sharding!r} (expected a NamedSharding)")


def _set_layer(stacked: jax.Array, value: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), index, 0)


def _layer_update(sharding: Sharding) -> Callable:
    """`(stack, layer value, i) -> stack with layer i replaced`, in place (the stack is donated)."""
    return jax.jit(_set_layer, donate_argnums=0, out_shardings=sharding)
