"""The sharded train state and the jitted train step (pjit: `jax.jit` with NamedShardings, donated state).

- Trainable leaves (`training.trainable` or the stage's preset: `training.stages`) get gradients and
  optimizer state; frozen leaves get neither, so XLA drops their weight-gradient matmuls. Frozen leaves may be stored in a lower precision
  (`model.frozen_param_dtype`), trainable ones stay float32 master copies.
- Gradient accumulation: the global batch is split into `k` strided micro-batches
  (`models.splice.plan_micro_batched_slots`) run under `lax.scan`; NLL sums and token counts are
  accumulated, so k micro-batches of b rows give exactly the gradient of one batch of k·b rows.
- A step whose loss or gradient norm is not finite leaves parameters and optimizer state unchanged and
  reports `skipped = 1`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from owl_jax.config import Config
from owl_jax.models.layers import dtype_of
from owl_jax.models.owl import MplugOwl, build_model
from owl_jax.sharding import batch_shardings, state_shardings
from owl_jax.training.optimizer import check_param_groups, make_optimizer
from owl_jax.training.stages import TrainableSet, check_stage, resolve_trainable, trainable_filter

# Models whose parameters fit comfortably on one host are built eagerly and then placed on the mesh;
# bigger ones are initialised by a jitted function that writes every shard in place.
EAGER_INIT_MAX_BYTES = 2 * 2**30


class TrainState(nnx.Module):
    def __init__(self, model: MplugOwl, optimizer: nnx.Optimizer):
        self.model = model
        self.optimizer = optimizer


@dataclasses.dataclass
class Trainer:
    """Everything a run needs to step: the static graph, shardings and the compiled step function."""

    graphdef: Any
    state: Any
    state_sharding: Any
    mesh: Mesh
    step_fn: Callable
    schedule: optax.Schedule
    trainable: list[str]  # internal (nnx state) paths of the trainable leaves
    trainable_set: TrainableSet | None = None  # the same leaves by user-facing path, with their source

    def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Host arrays (the full global batch, single-process) -> globally sharded arrays."""
        shardings = batch_shardings(batch, self.mesh)
        return {k: jax.device_put(np.asarray(v), shardings[k]) for k, v in batch.items()}

    def step(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        with jax.set_mesh(self.mesh):  # the context mesh: kernels without a partitioning rule shard_map on it
            self.state, metrics = self.step_fn(self.state, dict(batch))
        return metrics

    def model(self) -> MplugOwl:
        """The current model (a view over the live state)."""
        return nnx.merge(self.graphdef, self.state).model

    @functools.cached_property
    def _eval_fn(self) -> Callable:
        graphdef = self.graphdef

        def loss_terms(state, batch):
            model = nnx.merge(graphdef, state).model
            model.eval()  # no dropout
            return model.loss_terms(batch)

        return jax.jit(loss_terms)

    def eval_terms(self, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        """(summed token loss, token count) of `batch` under the current weights, in eval mode; compiled
        once per batch shape, separately from the train step."""
        with jax.set_mesh(self.mesh):  # traced as the step is (see `step`)
            return self._eval_fn(self.state, dict(batch))


def _cast_frozen(model: MplugOwl, keep: Callable, dtype) -> None:
    """Store frozen parameters in `dtype` (e.g. bfloat16 halves the frozen LLM's memory)."""
    frozen = nnx.All(nnx.Param, nnx.Not(keep))
    for _, var in nnx.to_flat_state(nnx.state(model, frozen)):
        var.set_value(var[...].astype(dtype))  # (`var[...] =` would cast back to the old dtype)


def _init_fn(cfg: Config, tx: optax.GradientTransformation, seed: int) -> Callable[[], TrainState]:
    keep = trainable_filter(cfg.training, cfg.model)

    def init() -> TrainState:
        model = build_model(cfg.model, seed=seed)
        if cfg.model.frozen_param_dtype and cfg.model.frozen_param_dtype != cfg.model.param_dtype:
            _cast_frozen(model, keep, dtype_of(cfg.model.frozen_param_dtype))
        return TrainState(model, nnx.Optimizer(model, tx, wrt=keep))

    return init


def _state_bytes(abstract_state) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)
               if jnp.issubdtype(x.dtype, jnp.number))


def abstract_train_state(cfg: Config, mesh: Mesh, *, total_steps: int | None = None, seed: int = 0):
    """(graphdef, abstract state, state shardings, schedule, init function) without allocating anything."""
    tx, schedule = make_optimizer(cfg.optimizer, total_steps or cfg.training.steps)
    init = _init_fn(cfg, tx, seed)
    abstract = nnx.eval_shape(init)
    check_param_groups(cfg.optimizer, resolve_trainable(abstract.model, cfg.training, cfg.model).names)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, cfg.mesh.logical_axis_rules)
    return graphdef, abstract_state, shardings, schedule, init


def _select(pred, new, old):
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _split_micro_batches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, ...] -> [k, B/k, ...] with micro-batch j = rows j, j+k, ... (see plan_micro_batched_slots)."""
    def split(x):
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return {name: split(x) for name, x in batch.items()}


def make_step_function(graphdef, cfg: Config, schedule: optax.Schedule) -> Callable:
    """The pure train step `(state, batch) -> (state, metrics)` (not yet jitted)."""
    keep = trainable_filter(cfg.training, cfg.model)
    k = cfg.training.grad_accum_steps
    group_schedules = getattr(schedule, "groups", {})

    def step(state, batch):
        ts = nnx.merge(graphdef, state)
        model, optimizer = ts.model, ts.optimizer
        gdef, params, rngs, rest = nnx.split(model, keep, nnx.RngState, ...)

        def loss_terms(params, rngs, micro):
            # Fresh Variable objects at this trace level (tree.map rebuilds them), so that dropout may
            # advance its RNG counters inside grad/scan.
            m = nnx.merge(gdef, *jax.tree.map(lambda x: x, (params, rngs, rest)))
            total, count = m.loss_terms(micro)
            return total, (count, nnx.state(m, nnx.RngState))

        grad_fn = jax.value_and_grad(loss_terms, has_aux=True)

        def accumulate(carry, micro):
            grads, total, count, rngs = carry
            (t, (c, rngs)), g = grad_fn(params, rngs, micro)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, total + t, count + c, rngs), None

        if k == 1:
            (total, (count, rngs)), grads = grad_fn(params, rngs, batch)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), rngs)
            (grads, total, count, rngs), _ = jax.lax.scan(accumulate, init, _split_micro_batches(batch, k))
        denom = jnp.maximum(count, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g, p: (g.astype(jnp.float32) / denom).astype(p.dtype), grads, params)
        nnx.update(model, rngs)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Snapshots (tree.map makes new Variable objects; nnx.state alone would alias the live ones).
        old_params, old_opt = jax.tree.map(lambda x: x, (nnx.state(model, keep), nnx.state(optimizer)))
        lr = schedule(optimizer.step[...])
        group_lrs = {f"learning_rate/{name}": s(optimizer.step[...]) for name, s in group_schedules.items()}
        optimizer.update(model, grads)
        new_params = nnx.state(model, keep)
        update_norm = optax.tree.norm(jax.tree.map(lambda n, o: n.astype(jnp.float32) - o, new_params, old_params))
        param_norm = optax.tree.norm(old_params)
        nnx.update(model, _select(finite, new_params, old_params))
        nnx.update(optimizer, _select(finite, nnx.state(optimizer), old_opt))

        metrics = {"loss": loss, "tokens": count, "grad_norm": grad_norm, "learning_rate": lr,
                   "update_ratio": update_norm / jnp.maximum(param_norm, 1e-12),
                   "skipped": (~finite).astype(jnp.int32)}
        metrics.update(group_lrs)  # each learning-rate group's rate this step (optimizer.param_groups)
        return nnx.state(ts), metrics

    return step


def jit_step(graphdef, cfg: Config, schedule: optax.Schedule, state_sharding, batch_shardings=None) -> Callable:
    """The train step as pjit: explicit in/out shardings, the state donated (updated in place)."""
    step = make_step_function(graphdef, cfg, schedule)
    return jax.jit(step, in_shardings=(state_sharding, batch_shardings), out_shardings=(state_sharding, None),
                   donate_argnums=(0,))


def abstract_batch(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global batch as the data config describes it (images unless the stage is
    text-only)."""
    from owl_jax.training.stages import uses_images
    b, t = cfg.data.global_batch_size, cfg.data.seq_len
    batch = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32), "targets": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.bool_),
             "positions": jax.ShapeDtypeStruct((b, t), jnp.int32),
             "segment_ids": jax.ShapeDtypeStruct((b, t), jnp.int32)}
    if uses_images(cfg.training):
        size = cfg.model.vision.image_size
        batch["pixel_values"] = jax.ShapeDtypeStruct((cfg.data.images_per_batch, size, size, 3), jnp.float32)
        batch["image_index"] = jax.ShapeDtypeStruct((b, t), jnp.int32)
        from owl_jax.data import reads_instructions
        if reads_instructions(cfg) and cfg.data.kind == "instructions":  # InstructBLIP: each image's instruction
            batch["qformer_tokens"] = jax.ShapeDtypeStruct((cfg.data.images_per_batch, cfg.model.qformer.max_text_len),
                                                           jnp.int32)
    return batch


def _host_copy(x):
    """A numpy copy of a device array (typed PRNG keys stay as they are: numpy cannot hold them)."""
    if isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(x)
    return x


def create_trainer(cfg: Config, mesh: Mesh, *, seed: int | None = None, total_steps: int | None = None,
                   batch_example: Mapping[str, Any] | None = None) -> Trainer:
    """Initialise the sharded train state and jit the step with explicit in/out shardings and the
    state donated. `batch_example` (host arrays or ShapeDtypeStructs) fixes the batch shardings."""
    seed = cfg.training.seed if seed is None else seed
    graphdef, abstract_state, shardings, schedule, init = abstract_train_state(cfg, mesh, total_steps=total_steps,
                                                                               seed=seed)
    if _state_bytes(abstract_state) <= EAGER_INIT_MAX_BYTES and jax.process_count() == 1:
        # Eager ops are cached per shape across builds; placing afterwards keeps that cache warm. Placed
        # from host copies: resharding device arrays compiles a transfer per parameter shape (~4.5 s for
        # the tiny test model on 8 CPU devices, vs 0.04 s from numpy). Several processes cannot place host
        # arrays on devices they do not own: they initialise under jit, each computing its own shards.
        state = jax.device_put(jax.tree.map(_host_copy, nnx.state(init())), shardings)
    else:
        with jax.set_mesh(mesh):
            state = jax.jit(lambda: nnx.state(init()), out_shardings=shardings)()
    model = nnx.merge(graphdef, state).model
    trainable = check_stage(model, cfg.training, cfg.model)
    trainable_set = resolve_trainable(model, cfg.training, cfg.model)
    in_batch = batch_shardings(batch_example, mesh) if batch_example is not None else None
    step_fn = jit_step(graphdef, cfg, schedule, shardings, in_batch)
    return Trainer(graphdef=graphdef, state=state, state_sharding=shardings, mesh=mesh, step_fn=step_fn,
                   schedule=schedule, trainable=trainable, trainable_set=trainable_set)
