"""Device mesh and logical-axis sharding (the pjit model).

Parameters carry *logical* axis names (`embed`, `mlp`, `heads`, ...; see `owl_jax.models.layers`). The
config's `mesh.logical_axis_rules` maps each logical name to mesh axes, in the spirit of MaxText's
`logical_axis_rules`; every sharding of the train state and of the batch is derived from those rules
here, never written by hand at a call site.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters/optimizer state sharded),
`tensor` (tensor parallel). All axes are `AxisType.Auto`: the partitioner propagates shardings from
the annotated inputs/outputs, which is the pjit/GSPMD model (the JAX default is now Explicit axes).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from owl_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

log = logging.getLogger(__name__)


class MeshError(ConfigError, ValueError):
    """The mesh shape (or batch) in the config does not fit the available devices: a user error."""


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with the one `-1` axis filled in; `dcn_data` multiplies `data`."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    sizes[0] *= cfg.dcn_data
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices "
                            f"({num_devices} is not a multiple of {known})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"mesh data×fsdp×tensor = {'×'.join(map(str, sizes))} = {math.prod(sizes)} devices, "
                        f"but {num_devices} are available; set one axis to -1 to use the rest")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[Any]] = None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh; multi-slice TPU (`dcn_data > 1`) uses a hybrid ICI/DCN
    device layout so that only the `data` axis crosses slices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if cfg.dcn_data > 1:
        from jax.experimental import mesh_utils
        ici = (shape[0] // cfg.dcn_data, shape[1], shape[2])
        grid = mesh_utils.create_hybrid_device_mesh(ici, (cfg.dcn_data, 1, 1), devices=devices)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def _rules_table(rules: Sequence[Sequence[Any]]) -> dict[str, tuple[str, ...]]:
    table = {}
    for rule in rules:
        if len(rule) != 2:
            raise MeshError(f"logical axis rule {rule!r} must be [logical_name, mesh_axes]")
        name, target = rule
        if target is None:
            axes = ()
        elif isinstance(target, str):
            axes = (target,)
        else:
            axes = tuple(target)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise MeshError(f"logical axis rule for {name!r} names unknown mesh axes {unknown} "
                            f"(mesh axes: {', '.join(MESH_AXES)})")
        table[name] = axes
    return table


def logical_to_mesh_spec(logical: Sequence[Optional[str]], shape: Sequence[int], mesh: Mesh,
                         rules: Sequence[Sequence[Any]]) -> PartitionSpec:
    """Map a logical spec (one name or None per dimension) to a mesh PartitionSpec.

    A mesh axis is used at most once per array (first dimension wins), size-1 mesh axes are dropped,
    and a dimension that the mesh axes do not divide is replicated rather than padded, so tiny test
    models and odd vocabulary sizes still shard where they can. Unknown logical names are errors.
    """
    table = _rules_table(rules)
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, logical):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise MeshError(f"logical axis {name!r} has no rule in mesh.logical_axis_rules")
        axes = tuple(a for a in table[name] if a not in used and mesh.shape[a] > 1)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def _logical_spec(var: nnx.Variable) -> tuple:
    names = var.get_metadata().get("out_sharding") if hasattr(var, "get_metadata") else None
    return tuple(names) if names else (None,) * len(var.shape)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[Sequence[Any]]) -> nnx.State:
    """NamedShardings for every leaf of an (abstract or concrete) NNX state from its logical metadata.
    Leaves without metadata (RNG counters, optimizer step) are replicated."""

    def one(var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        shape = tuple(var.shape) if hasattr(var, "shape") else ()
        if not shape:
            return var.replace(NamedSharding(mesh, PartitionSpec()))
        spec = logical_to_mesh_spec(_logical_spec(var), shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, shape: Sequence[int], name: str = "batch") -> NamedSharding:
    """Leading (batch) dimension over `data` and `fsdp`; the rest replicated. The leading dimension must
    divide evenly (static shapes: a ragged global batch is a configuration error, not a padding job)."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    ways = math.prod(mesh.shape[a] for a in axes)
    if shape and shape[0] % ways:
        raise MeshError(f"{name}: leading dimension {shape[0]} is not divisible by the {ways} data-parallel "
                        f"shards (data×fsdp); adjust data.global_batch_size / data.images_per_batch or the mesh")
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (len(shape) - 1))))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Shardings for a batch dict of arrays or ShapeDtypeStructs."""
    return {k: batch_sharding(mesh, tuple(np.shape(v)), k) for k, v in batch.items()}
