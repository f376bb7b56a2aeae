"""Checkpoints of a training run (Orbax): train state, data-iterator state, metadata and the tokenizer.

Layout (`run_dir/checkpoints/<step>/`, one directory per saved step, written by `ocp.CheckpointManager`):

    state/        model + optimizer arrays (Orbax PyTree handler: tensorstore/OCDBT, written shard by shard
                  from every process). Stored as a nested dict keyed by the NNX state path (string keys);
                  typed PRNG keys (`key<fry>`) are stored as their raw `uint32` key data and re-wrapped on
                  restore, so the on-disk format does not depend on how a given Orbax version treats keys.
    data_state/   `process_<i>.json`: the data-iterator state of each process (each process writes its own).
    metadata/     `metadata` (JSON): step, the resolved config, `extra` (metrics, ...), the number of
                  processes, the tokenizer's file names and the list of state leaves (path, shape, dtype).
    tokenizer/    a copy of the tokenizer file(s), when the store was given `tokenizer_path`, so that one
                  step directory is self-contained.

Saves are asynchronous: `save` returns once the arrays have been copied off the devices (the caller may
step, and donate, the state right away); the files are written in the background and the step directory
only appears under its final name once everything is written (Orbax writes into
`<step>.orbax-checkpoint-tmp-*` and renames). A crash mid-save therefore leaves at most a temporary
directory, which `latest_step()` ignores (and which the next writing store to open the directory
removes, at the latest before its first save), so the previous good checkpoint is never lost. The last `keep` checkpoints are kept.

Restoring reads every array straight into the target shardings (`jax.ShapeDtypeStruct(..., sharding=...)`),
so a checkpoint written on one mesh (say 2x2x2 over 8 devices) restores onto any other mesh or device
count; each process only reads the shards it needs.

`check_compatible` refuses to resume a run whose config changed in a way that invalidates the saved state.
(What SIGTERM / Ctrl-C do to a run is `owl_jax.interrupts`.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from owl_jax.config import Config, ConfigError, to_dict

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "checkpoints"
_STATE, _DATA, _META, _TOKENIZER = "state", "data_state", "metadata", "tokenizer"
_META_FILE = "metadata"  # JsonCheckpointHandler's default file name inside metadata/


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or unreadable. The message names the path."""


class IncompatibleCheckpointError(ConfigError):
    """The checkpoint was written by a run whose config (or state layout) differs from this one in a way that
    makes resuming meaningless. The message lists every differing key (saved vs now)."""


# ---- state <-> checkpoint tree ------------------------------------------------------------------------------


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _path_name(path: Sequence[Any]) -> str:
    return "/".join(str(p) for p in path)


def _nest(items: Sequence[tuple[tuple, Any]]) -> dict:
    """[(path, leaf)] -> nested dict with string keys (what Orbax stores)."""
    tree: dict = {}
    for path, leaf in items:
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = leaf
    return tree


def _lookup(tree: Mapping, path: Sequence[Any]) -> Any:
    node = tree
    for part in path:
        node = node[str(part)]
    return node


def _flat_values(state) -> list[tuple[tuple, Any]]:
    """(path, array) for every Variable of an nnx.State (arrays, ShapeDtypeStructs or shardings)."""
    return [(tuple(path), var.get_value() if isinstance(var, nnx.Variable) else var)
            for path, var in nnx.to_flat_state(state)]


def _storable(x: jax.Array) -> jax.Array:
    return jax.random.key_data(x) if _is_key(x) else x


def _leaf_manifest(state) -> dict[str, list]:
    """path -> [shape, dtype] of every leaf (logical: a key array's shape and key dtype)."""
    return {_path_name(path): [list(x.shape), str(x.dtype)] for path, x in _flat_values(state)}


def _restore_target(abstract: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    """The ShapeDtypeStruct Orbax restores one leaf into (key leaves: their key data, trailing dims replicated)."""
    if not _is_key(abstract):
        return jax.ShapeDtypeStruct(abstract.shape, abstract.dtype, sharding=sharding)
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(abstract.shape, abstract.dtype))
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (data.ndim - len(sharding.spec))
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*spec), memory_kind=sharding.memory_kind)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _from_restored(abstract: Any, sharding: Any, value: jax.Array) -> jax.Array:
    if not _is_key(abstract):
        return value
    return jax.device_put(jax.random.wrap_key_data(value, dtype=abstract.dtype), sharding)


#: Replica-parallel saving (R replicas of a replicated shard each write 1/R of it) only for slices of at
#: least this many bytes. Orbax's default (0) slices every replicated array, which costs one small XLA
#: compile per (shape, device) on the first save (~200 compiles, ~9 s for the tiny test model on 8 CPU
#: devices) and gains nothing for biases, norms and other small leaves.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _state_type_handlers():
    """The type handlers of the `state` item (a local registry: Orbax's global one is left untouched)."""
    th = ocp.type_handlers
    scalar = th.ScalarHandler()
    arrays = th.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    return th.create_type_handler_registry((int, scalar), (float, scalar), (np.number, scalar),
                                           (np.ndarray, th.NumpyHandler()), (jax.Array, arrays))


# ---- files item (the tokenizer) -----------------------------------------------------------------------------


class _FilesHandler(ocp.AsyncCheckpointHandler):
    """Copies a few small files (bytes read at save time) into the item directory; restore lists them."""

    def __init__(self, *, primary_host: int | None = 0):
        self._primary_host = primary_host

    def save(self, directory: epath.Path, args: "_FilesSave"):
        if self._primary_host is None or jax.process_index() == self._primary_host:
            for name, data in args.files.items():
                (directory / name).write_bytes(data)

    async def async_save(self, directory: epath.Path, args: "_FilesSave"):
        async def write():  # runs in the background commit, after Orbax has created `directory`
            self.save(directory, args)
        return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="owl_files_save")]

    def restore(self, directory: epath.Path, args: "_FilesRestore | None" = None) -> dict[str, str]:
        return {p.name: str(p) for p in sorted(directory.iterdir()) if p.is_file()}


@ocp.args.register_with_handler(_FilesHandler, for_save=True)
@dataclasses.dataclass
class _FilesSave(ocp.args.CheckpointArgs):
    files: Mapping[str, bytes]


@ocp.args.register_with_handler(_FilesHandler, for_restore=True)
@dataclasses.dataclass
class _FilesRestore(ocp.args.CheckpointArgs):
    pass


def _read_tokenizer(path: str | os.PathLike) -> dict[str, bytes]:
    """A tokenizer file, or every regular file at the top of a tokenizer directory (HF tokenizers)."""
    p = epath.Path(os.path.expanduser(str(path)))
    if p.is_file():
        return {p.name: p.read_bytes()}
    if p.is_dir():
        files = {f.name: f.read_bytes() for f in sorted(p.iterdir()) if f.is_file()}
        if files:
            return files
    raise CheckpointError(f"tokenizer path {str(p)!r} is not a file or a non-empty directory")


# ---- the store ---------------------------------------------------------------------------------------------


def _json_snapshot(value: Any, what: str) -> Any:
    """A deep copy through JSON: checks serialisability now and decouples the async write from later edits."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be JSON-serialisable: {e}") from None


class _ReadOnlyNoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _without_read_only_notice():
    """Orbax warns "Given directory is read only" for every reading manager — that is, on every evaluation,
    export and next-stage initialisation. Reading is what was asked for, so the notice is dropped (only
    while this store opens its manager; Orbax's other warnings stay)."""
    logger = logging.getLogger("absl")  # orbax logs through absl.logging, whose Python logger this is
    quiet = _ReadOnlyNoticeFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


class CheckpointStore:
    """Checkpoints of one run under `run_dir/checkpoints` (see the module docstring for the layout).

    `config` is saved with every checkpoint and is what `restore` checks the saved config against. Without
    it the store is read-only (`read_only` defaults to `config is None`): it never writes or deletes
    anything, so that e.g. an evaluation job can read the checkpoints of a run that is still training. A
    writing store deletes the temporary directories of saves that never finished (a crash) when it opens.
    `keep` defaults to `config.training.keep_checkpoints` (None or 0 = keep all). `tokenizer_path` (a file
    or a directory of files) is copied into every checkpoint. `async_save=False` makes `save` block.
    """

    def __init__(self, run_dir: str | os.PathLike, config: Config | None = None, *, keep: int | None = None,
                 tokenizer_path: str | os.PathLike | None = None, async_save: bool = True,
                 read_only: bool | None = None):
        self.run_dir = epath.Path(run_dir)  # local paths and gs:// alike
        self.directory = self.run_dir / CHECKPOINT_SUBDIR
        self.config = config
        if keep is None and config is not None:
            keep = config.training.keep_checkpoints
        self.keep = keep or None
        self.tokenizer_path = None if tokenizer_path is None else str(tokenizer_path)
        self._tokenizer_files = _read_tokenizer(tokenizer_path) if tokenizer_path is not None else None
        self.read_only = config is None if read_only is None else read_only
        options = ocp.CheckpointManagerOptions(
            # A reader neither saves nor deletes: said here, Orbax does not warn that it had to say it.
            max_to_keep=None if self.read_only else self.keep,
            save_interval_steps=0 if self.read_only else 1,
            enable_async_checkpointing=async_save,
            # Leftovers of a save interrupted by a crash/preemption (never committed) are deleted on open
            # (only by a writing store: a reader must not delete the in-flight save of a running job).
            cleanup_tmp_directories=not self.read_only,
            create=not self.read_only,
            read_only=self.read_only,
        )
        handlers = {
            _STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_state_type_handlers()),
            # Every process writes its own iterator state (primary_host=None: no single writer).
            _DATA: ocp.JsonCheckpointHandler(
                filename=f"process_{jax.process_index()}.json",
                multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None)),
            _META: ocp.JsonCheckpointHandler(filename=_META_FILE),
            _TOKENIZER: _FilesHandler(),
        }
        directory = self.directory if "://" in str(self.directory) else self.directory.absolute()
        with _without_read_only_notice():
            self._manager = ocp.CheckpointManager(directory, item_handlers=handlers, options=options)

    # -- inspection --

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (temporary directories of unfinished saves are not steps)."""
        if self.read_only:  # another job may be writing: look again
            self._manager.reload()
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def tokenizer_dir(self, step: int) -> epath.Path | None:
        """The checkpoint's own copy of the tokenizer, or None when it was saved without one."""
        path = self.step_dir(step) / _TOKENIZER
        return path if path.is_dir() else None

    # -- save --

    def save(self, step: int, state, *, data_state: Mapping[str, Any] | None = None,
             extra: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Start saving `state` (an nnx.State of the train state) at `step`; returns whether a save started.

        `data_state` (JSON) is this process's data-iterator state; `extra` (JSON) anything else to keep
        with the checkpoint (metrics, ...). Returns once the arrays are off the devices; the write finishes
        in the background (`wait()` blocks until it is committed).
        """
        if self.config is None or self.read_only:
            raise ValueError(f"this CheckpointStore of {self.directory} is read-only: saving needs the run's "
                             "config (CheckpointStore(run_dir, config))")
        step = int(step)
        metadata = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "config": to_dict(self.config),
            "extra": _json_snapshot(dict(extra or {}), "extra"),
            "num_processes": jax.process_count(),
            "tokenizer": {"source": self.tokenizer_path, "files": sorted(self._tokenizer_files or {})},
            "leaves": _leaf_manifest(state),
        }
        tree = _nest([(path, _storable(x)) for path, x in _flat_values(state)])
        items = {
            _STATE: ocp.args.PyTreeSave(tree),
            _DATA: ocp.args.JsonSave(_json_snapshot(dict(data_state or {}), "data_state")),
            _META: ocp.args.JsonSave(metadata),
        }
        if self._tokenizer_files:
            items[_TOKENIZER] = _FilesSave(self._tokenizer_files)
        return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

    def wait(self) -> None:
        """Block until every started save is committed (raises if a background write failed)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending writes and release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore --

    def read_metadata(self, step: int | None = None) -> dict:
        """The metadata JSON of `step` (default: the latest), without touching the arrays."""
        step = self._resolve_step(step)
        path = self.step_dir(step) / _META / _META_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint {self.step_dir(step)} is incomplete or corrupt: "
                                  f"its metadata file {path} is missing")
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.step_dir(step)} has an unreadable metadata file {path}: "
                                  f"{e}") from None
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CheckpointError(f"checkpoint {self.step_dir(step)}: metadata file {path} does not describe "
                                  f"step {step}")
        return meta

    def all_data_states(self, step: int | None = None) -> list[dict]:
        """The data-iterator states of every process that saved `step`, by process index (for
        `data_pipelines.order.remap_states` when the number of processes changed)."""
        step = self._resolve_step(step)
        n = self.read_metadata(step)["num_processes"]
        return [self._read_data_state(step, i) for i in range(n)]

    def _read_data_state(self, step: int, process: int) -> dict:
        path = self.step_dir(step) / _DATA / f"process_{process}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {self.step_dir(step)} is incomplete or corrupt: cannot read the "
                                  f"data state of process {process} ({path}): {e}") from None

    def restore(self, step: int | None = None, *, abstract_state, shardings, config: Config | None = None):
        """Restore `step` (default: the latest) into the target shardings: `(state, data_state, metadata)`.

        `abstract_state` / `shardings` are what `abstract_train_state(cfg, mesh)` gives for *this* run's
        mesh (any mesh and device count). The saved config is checked against `config` (default: the
        store's config) before any array is read. `data_state` is this process's saved iterator state, or
        None when the checkpoint was written by a different number of processes (see `all_data_states`).
        """
        step = self._resolve_step(step)
        where = self.step_dir(step)
        meta = self.read_metadata(step)
        config = config if config is not None else self.config
        if config is not None:
            check_compatible(meta.get("config", {}), config)
        _check_layout(meta.get("leaves", {}), abstract_state, where)
        data_state = None
        if meta.get("num_processes") == jax.process_count():
            data_state = self._read_data_state(step, jax.process_index())

        abstract = dict(_flat_values(abstract_state))
        target_shardings = dict(_flat_values(shardings))
        target = _nest([(p, _restore_target(a, target_shardings[p])) for p, a in abstract.items()])
        args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{_STATE: args}))[_STATE]
        except Exception as e:  # tensorstore / Orbax errors on missing or truncated files
            detail = str(e) if len(str(e)) <= 800 else str(e)[:800] + " ..."  # tensorstore appends its specs
            raise CheckpointError(f"cannot restore the train state from checkpoint {where} (corrupt or "
                                  f"incomplete files?): {type(e).__name__}: {detail}") from e

        def leaf(path, var):
            path = tuple(path)
            return var.copy(_from_restored(abstract[path], target_shardings[path], _lookup(restored, path)))

        state = nnx.map_state(leaf, abstract_state)
        return state, data_state, meta

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint to restore in {self.directory} "
                                      f"({'empty' if self.directory.is_dir() else 'the directory does not exist'})")
            return step
        step, have = int(step), self.all_steps()
        if step not in have:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(available: {', '.join(map(str, have)) or 'none'})")
        return step


def _check_layout(saved: Mapping[str, list], abstract_state, where: epath.Path) -> None:
    """Same leaves with the same shapes/dtypes as the run we restore into, else an error listing them."""
    if not saved:
        return
    now = _leaf_manifest(abstract_state)
    missing = sorted(set(now) - set(saved))
    unexpected = sorted(set(saved) - set(now))
    changed = sorted(k for k in set(now) & set(saved) if list(now[k]) != list(saved[k]))
    if not (missing or unexpected or changed):
        return
    lines = [f"  - {k}: saved {saved[k][1]}{saved[k][0]}, now {now[k][1]}{now[k][0]}" for k in changed[:20]]
    lines += [f"  - {k}: not in the checkpoint" for k in missing[:20]]
    lines += [f"  - {k}: in the checkpoint, not in this run" for k in unexpected[:20]]
    raise IncompatibleCheckpointError(f"checkpoint {where} holds a different train state layout than this run "
                                      f"({len(changed)} changed, {len(missing)} missing, {len(unexpected)} "
                                      "unexpected leaves):\n" + "\n".join(lines))


# ---- config compatibility ----------------------------------------------------------------------------------

#: Keys that may differ between the run that saved a checkpoint and the run resuming from it. Everything
#: else is compared, so that a config key added later is incompatible until someone decides otherwise.
#: Why these may change:
#:  - training.steps / log_every / checkpoint_every / keep_checkpoints / eval_every / output_dir: run length
#:    and bookkeeping; nothing in the saved state depends on them (a run is often extended or moved).
#:  - training.grad_accum_steps: the same global batch split differently (gradients are identical), the knob
#:    for fitting the same run onto fewer or smaller devices.
#:  - mesh.*: the arrays are restored into whatever shardings the new mesh gives (any device count).
#:  - optimizer.learning_rate / schedule / warmup_steps / decay_steps / end_learning_rate_ratio /
#:    weight_decay / grad_clip_norm: hyper-parameters read at each step, not stored in the optimizer state
#:    (turning clipping on or off changes the state layout; the leaf check in `restore` catches that).
#:  - model.dtype / remat_policy / attention_impl / loss_chunk_size: how the step computes, not what is
#:    stored (parameter storage dtypes, `param_dtype` / `frozen_param_dtype`, stay fixed).
#:  - data.eval_paths: evaluation only. data.tokenizer: the path may move; the checkpoint carries its own
#:    copy of the tokenizer and `model.text.vocab_size` is still compared.
#: Refused (examples): the model architecture and LoRA settings (the parameters would not fit or would mean
#: something else), training.stage (another trainable set and optimizer state), training.seed / data.*
#: (the saved data-iterator state and sample order belong to that data and seed), optimizer b1 / b2 / eps /
#: lr_multipliers (the moment estimates or the optimizer state layout).
MAY_CHANGE: tuple[str, ...] = (
    "training.steps", "training.log_every", "training.checkpoint_every", "training.keep_checkpoints",
    "training.eval_every", "training.output_dir", "training.grad_accum_steps",
    "mesh.*",
    "optimizer.learning_rate", "optimizer.schedule", "optimizer.warmup_steps", "optimizer.decay_steps",
    "optimizer.end_learning_rate_ratio", "optimizer.weight_decay", "optimizer.grad_clip_norm",
    "model.dtype", "model.remat_policy", "model.attention_impl", "model.loss_chunk_size",
    "data.eval_paths", "data.eval_sources", "data.tokenizer", "data.num_workers", "data.prefetch", "data.cache_dir",
    "data.max_skip_fraction",
    # How a run reports and evaluates itself, and where a *new* run's weights come from (a resumed run
    # always continues from its own checkpoint), never change what it computes.
    "training.eval_batches", "training.max_consecutive_nonfinite", "logging.*", "init.*",
)

_ABSENT = "<absent>"


def _may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in MAY_CHANGE)


def _flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of nested mappings; lists are compared whole."""
    if not isinstance(d, Mapping):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten_config(v, key) if isinstance(v, Mapping) else {key: v})
    return out


def config_differences(saved_config: Mapping[str, Any], config: Config) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved, now) for every key that differs and is not in MAY_CHANGE. Keys the saved config
    lacks (written before the key existed) compare as the key's default value."""
    saved = _flatten_config(_deep_merge(to_dict(Config()), saved_config))
    now = _flatten_config(to_dict(config))
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, _ABSENT), now.get(key, _ABSENT)
        if not _same(a, b) and not _may_change(key):
            diffs.append((key, a, b))
    return diffs


def check_compatible(saved_config: Mapping[str, Any], config: Config) -> None:
    """Refuse (IncompatibleCheckpointError listing every differing key, saved vs now) to resume a checkpoint
    written with an incompatible config; see MAY_CHANGE for what may differ and why."""
    diffs = config_differences(saved_config, config)
    if diffs:
        lines = "\n".join(f"  - {k}: saved {a!r}, now {b!r}" for k, a, b in diffs)
        raise IncompatibleCheckpointError(
            f"cannot resume: the checkpoint was written with a config that differs in {len(diffs)} "
            f"key{'s' if len(diffs) > 1 else ''} that must not change between runs:\n{lines}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _deep_merge(base: Mapping, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(out.get(k), Mapping) and isinstance(v, Mapping) else v
    return out


# ------------------------------------------------------------------------------------------------
# Reading a run for evaluation, export and the next training stage
# ------------------------------------------------------------------------------------------------


def locate(path: str | os.PathLike) -> tuple[epath.Path, int | None]:
    """A run directory (latest step) or one step directory `RUN/checkpoints/STEP` -> (run_dir, step)."""
    p = epath.Path(path)
    if (p / CHECKPOINT_SUBDIR).is_dir():
        return p, None
    if p.parent.name == CHECKPOINT_SUBDIR and p.name.isdigit():
        return p.parent.parent, int(p.name)
    raise CheckpointError(f"{path} is neither a training run directory (with {CHECKPOINT_SUBDIR}/) nor a step "
                          f"directory RUN/{CHECKPOINT_SUBDIR}/STEP")


def load_run(path: str | os.PathLike, *, mesh=None):
    """(config, model) of a saved run, restored onto one device (or `mesh`). The config's tokenizer points
    at the checkpoint's own copy when it has one, so the run directory is self-contained."""
    from owl_jax.config import config_from_dict
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import abstract_train_state
    run_dir, step = locate(path)
    store = CheckpointStore(run_dir)
    try:
        step = store._resolve_step(step)
        meta = store.read_metadata(step)
        cfg = config_from_dict(meta["config"])
        if mesh is None:
            cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.mesh.dcn_data = 1, 1, 1, 1
            mesh = make_mesh(cfg.mesh, jax.local_devices()[:1])  # this process's own device, on every host
        graphdef, abstract_state, shardings, _, _ = abstract_train_state(cfg, mesh)
        state, _, _ = store.restore(step, abstract_state=abstract_state, shardings=shardings, config=None)
        tokenizer_dir = store.tokenizer_dir(step)
        files = meta.get("tokenizer", {}).get("files") or []
        if tokenizer_dir is not None and files:
            source = meta["tokenizer"].get("source") or ""
            cfg.data.tokenizer = str(tokenizer_dir / files[0]) if len(files) == 1 or not os.path.isdir(source) \
                else str(tokenizer_dir)
    finally:
        store.close()
    return cfg, nnx.merge(graphdef, state).model


def load_model_params(path: str | os.PathLike) -> dict[str, jax.Array]:
    """Canonical parameters (see `owl_jax.convert.state`) of a saved run's model, for initialising the
    next stage (whose model may add LoRA adapters or change the layer layout)."""
    from owl_jax.convert.state import canonical_params
    _, model = load_run(path)
    return canonical_params(model)
