"""Checkpoints: save on one mesh, restore bit-identically onto others (other device counts included) and
continue with the same loss; keep-last-K; data state / metadata / tokenizer round trip; config
compatibility; missing, crashed and corrupt checkpoints; the preemption (SIGTERM) flag.

One small trainer (text-only stage: the quickest step to compile) is built and saved once for the module.
"""

import dataclasses
import gc
import os
import re
import signal
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from owl_jax.checkpoint import CheckpointError, CheckpointStore, IncompatibleCheckpointError, check_compatible
from owl_jax.config import ConfigError, to_dict
from owl_jax.interrupts import RunSignals
from owl_jax.sharding import make_mesh
from owl_jax.training.train_step import abstract_train_state, create_trainer
from test_training import config, make_batch

STAGE = "lm_pretrain"
DATA_STATE = {"epoch": 0, "window": 3, "index": 17, "exclude": [[0, 3, 21]]}
EXTRA = {"loss": 6.25, "tokens_seen": 1234}


def with_mesh(cfg, shape):
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=shape[0], fsdp=shape[1],
                                                            tensor=shape[2]))


def host_values(state) -> dict:
    """path -> numpy copy of every leaf (PRNG keys as their key data), for bit-exact comparisons."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        x = var.get_value()
        is_key = jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
        out["/".join(map(str, path))] = (np.array(jax.random.key_data(x) if is_key else x), str(x.dtype))
    return out


def assert_bit_identical(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for name, (value, dtype) in want.items():
        assert got[name][1] == dtype, name
        assert got[name][0].dtype == value.dtype and np.array_equal(got[name][0], value), name
    assert any("rngs/key" in n for n in want), "the state should hold PRNG keys"
    assert any("/mu/" in n for n in want), "the state should hold optimizer moments"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps on a 2x2x2 mesh (8 devices), saved at step 2 (asynchronously, with a tokenizer file); the
    original then takes a third step right away (its state is donated while the save is in flight)."""
    base = config(STAGE)
    batch, _ = make_batch(base)
    cfg = with_mesh(base, (2, 2, 2))
    trainer = create_trainer(cfg, make_mesh(cfg.mesh, jax.devices()), batch_example=batch)
    for _ in range(2):
        trainer.step(trainer.put_batch(batch))
    saved = host_values(trainer.state)
    run_dir = tmp_path_factory.mktemp("run")
    tokenizer = run_dir / "tok.model"
    tokenizer.write_bytes(b"\x00sentencepiece\xff" * 10)
    store = CheckpointStore(run_dir, cfg, tokenizer_path=tokenizer)
    assert store.save(2, trainer.state, data_state=DATA_STATE, extra=EXTRA)
    next_metrics = jax.device_get(trainer.step(trainer.put_batch(batch)))
    store.wait()
    yield types.SimpleNamespace(base=base, cfg=cfg, batch=batch, run_dir=run_dir, saved=saved,
                                next_metrics=next_metrics, tokenizer=tokenizer, store=store)
    store.close()


def test_restore_onto_one_device_continues_identically(run):
    cfg = with_mesh(run.base, (1, 1, 1))
    trainer = create_trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), batch_example=run.batch)
    store = CheckpointStore(run.run_dir)  # read-only
    assert store.latest_step() == 2
    state, data_state, meta = store.restore(abstract_state=trainer.state, shardings=trainer.state_sharding,
                                            config=cfg)
    assert_bit_identical(host_values(state), run.saved)
    assert all(x.sharding == s for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(trainer.state_sharding)))
    trainer.state = state
    metrics = jax.device_get(trainer.step(trainer.put_batch(run.batch)))
    np.testing.assert_allclose(metrics["loss"], run.next_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], run.next_metrics["grad_norm"], rtol=1e-5)
    assert data_state == DATA_STATE
    assert meta["step"] == 2 and meta["extra"] == EXTRA and meta["config"] == to_dict(run.cfg)


def test_restore_onto_another_mesh_of_the_same_devices(run):
    cfg = with_mesh(run.base, (1, 8, 1))
    mesh = make_mesh(cfg.mesh, jax.devices())
    _, abstract, shardings, _, _ = abstract_train_state(cfg, mesh)
    state, data_state, _ = CheckpointStore(run.run_dir).restore(2, abstract_state=abstract, shardings=shardings,
                                                                config=cfg)
    assert_bit_identical(host_values(state), run.saved)
    leaves, targets = jax.tree.leaves(state), jax.tree.leaves(shardings)
    assert all(x.sharding == s for x, s in zip(leaves, targets))
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in leaves)
    assert data_state == DATA_STATE


def test_checkpoint_directory_is_self_contained(run):
    step_dir = run.run_dir / "checkpoints" / "2"
    assert (step_dir / "tokenizer" / "tok.model").read_bytes() == run.tokenizer.read_bytes()
    assert run.store.tokenizer_dir(2) == step_dir / "tokenizer"
    meta = run.store.read_metadata()
    assert meta["tokenizer"]["files"] == ["tok.model"] and meta["num_processes"] == 1
    assert run.store.all_data_states(2) == [DATA_STATE]


def test_incompatible_config_is_refused_with_the_differing_keys(run):
    saved = to_dict(run.cfg)
    changed = config(STAGE, "model.text.num_layers=2", "model.lora.rank=8", "data.seq_len=64",
                     "data.global_batch_size=16", "training.stage=instruct_full")
    with pytest.raises(IncompatibleCheckpointError) as err:
        check_compatible(saved, changed)
    message = str(err.value)
    for key, old, new in [("model.text.num_layers", 1, 2), ("model.lora.rank", 4, 8), ("data.seq_len", 96, 64),
                          ("data.global_batch_size", 8, 16), ("training.stage", "'lm_pretrain'", "'instruct_full'")]:
        assert f"{key}: saved {old}, now {new}" in message
    assert "training.steps" not in message
    assert isinstance(err.value, ConfigError)
    # Refused by restore too, before any array is read.
    _, abstract, shardings, _, _ = abstract_train_state(run.cfg, make_mesh(run.cfg.mesh, jax.devices()))
    with pytest.raises(IncompatibleCheckpointError, match="data.seq_len"):
        run.store.restore(abstract_state=abstract, shardings=shardings, config=config(STAGE, "data.seq_len=64"))


def test_compatible_changes_are_accepted(run):
    saved = to_dict(run.cfg)
    check_compatible(saved, config(STAGE, "training.steps=50", "training.log_every=5", "training.checkpoint_every=7",
                                   "training.output_dir=elsewhere", "mesh.data=2", "mesh.fsdp=4",
                                   "optimizer.learning_rate=3e-4", "training.keep_checkpoints=5"))
    # A config saved before some key existed compares that key at its default value.
    older = to_dict(run.cfg)
    del older["training"]["eval_every"], older["model"]["loss_chunk_size"]
    check_compatible(older, run.cfg)


def test_a_different_state_layout_is_refused(run):
    """Turning gradient clipping off is an allowed config change but removes a level of optimizer state:
    the leaf check names the leaves instead of failing inside Orbax."""
    cfg = config(STAGE, "optimizer.grad_clip_norm=0")
    _, abstract, shardings, _, _ = abstract_train_state(cfg, make_mesh(cfg.mesh, jax.devices()))
    with pytest.raises(IncompatibleCheckpointError, match="not in the checkpoint"):
        CheckpointStore(run.run_dir).restore(abstract_state=abstract, shardings=shardings, config=cfg)


# ---- small stores (a hand-made state: no trainer needed) ----------------------------------------------------


def small_state(seed=0):
    return nnx.State({"w": nnx.Param(jnp.arange(64.0).reshape(8, 8) + seed),
                      "rng": {"key": nnx.RngKey(jax.random.key(seed)), "count": nnx.RngCount(jnp.uint32(seed))}})


def small_targets(state):
    return (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
            jax.tree.map(lambda x: x.sharding, state))


def restore_small(store, step=None):
    abstract, shardings = small_targets(small_state())
    return store.restore(step, abstract_state=abstract, shardings=shardings)


def test_keep_last_k_and_step_lookup(tmp_path):
    store = CheckpointStore(tmp_path, config(STAGE), keep=2)
    for step in (1, 2, 3, 5):
        assert store.save(step, small_state(step), data_state={"step": step}, extra={"step": step})
    store.wait()
    assert store.all_steps() == [3, 5] and store.latest_step() == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name[0].isdigit()) == ["3", "5"]
    state, data_state, meta = restore_small(store, 3)
    assert_small_equal(state, small_state(3))
    assert data_state == {"step": 3} and meta["extra"] == {"step": 3}
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 1 .*available: 3, 5"):
        restore_small(store, 1)
    store.close()


def assert_small_equal(got, want):
    g, w = host_values(got), host_values(want)
    assert sorted(g) == sorted(w) and all(np.array_equal(g[k][0], w[k][0]) and g[k][1] == w[k][1] for k in w)


def test_no_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "never_ran"
    with pytest.raises(CheckpointError, match=re.escape(f"no checkpoint to restore in {missing}/checkpoints")):
        restore_small(CheckpointStore(missing))
    assert not missing.exists()  # a reader creates nothing
    with CheckpointStore(tmp_path / "empty", config(STAGE)) as empty:
        assert empty.latest_step() is None
        with pytest.raises(CheckpointError, match="no checkpoint to restore in .*empty/checkpoints .empty"):
            restore_small(empty)


# A restore that fails on one array leaves Orbax's other in-flight reads completing onto a closed event loop
# ("Exception ignored ... Event loop is closed"): noise from Orbax, not a failure of the store.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_crashed_save_is_ignored_and_corrupt_checkpoints_are_errors(tmp_path):
    store = CheckpointStore(tmp_path, config(STAGE), keep=3)
    store.save(4, small_state(4), data_state={"step": 4}, extra={})
    store.close()
    ckpt = tmp_path / "checkpoints"
    # What a crash mid-save leaves: a temporary directory (never renamed to its step) with partial content.
    partial = ckpt / "9.orbax-checkpoint-tmp-1732000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 7)
    reader = CheckpointStore(tmp_path)
    assert reader.latest_step() == 4 and reader.all_steps() == [4]
    state, data_state, _ = restore_small(reader)
    assert_small_equal(state, small_state(4)) and data_state == {"step": 4}
    with CheckpointStore(tmp_path, config(STAGE), keep=3) as writer:  # a writer removes the leftover (before saving)
        assert writer.latest_step() == 4
        writer.save(5, small_state(5), data_state={"step": 5}, extra={})
    assert not partial.exists() and (ckpt / "5").is_dir()

    # A step directory without its metadata.
    (ckpt / "7" / "state").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {ckpt / '7'} is incomplete or corrupt")):
        restore_small(CheckpointStore(tmp_path))
    # Truncated array files.
    data_files = [p for p in (ckpt / "4" / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files
    for p in data_files:
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=re.escape(f"cannot restore the train state from checkpoint {ckpt / '4'}")):
        restore_small(CheckpointStore(tmp_path), 4)
    time.sleep(0.5)  # let the aborted reads finish here, under this test's warning filter
    gc.collect()


def test_run_signals_in_training_set_the_flag_and_uninstall_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    exits = []
    signals = RunSignals(exit_now=exits.append)
    try:
        signals.training()
        assert not signals.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not signals.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert signals.requested and signals.signum == signal.SIGTERM and not signals.interrupted
        assert exits == []  # a preemption checkpoints: nothing exits at once
    finally:
        signals.uninstall()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_run_signals_before_the_first_step_exit_at_once_and_a_second_ctrl_c_too():
    exits = []
    signals = RunSignals(exit_now=exits.append)
    try:
        os.kill(os.getpid(), signal.SIGINT)  # start-up phase: exit 130 at once, no KeyboardInterrupt
        deadline = time.monotonic() + 5
        while not exits and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exits == [130] and not signals.requested
        signals.training()
        os.kill(os.getpid(), signal.SIGINT)  # first Ctrl-C in training: checkpoint, then exit 130
        while not signals.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert signals.interrupted and exits == [130]
        os.kill(os.getpid(), signal.SIGINT)  # second: at once
        while len(exits) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exits == [130, 130]
    finally:
        signals.uninstall()


def test_reading_a_run_does_not_warn_that_its_directory_is_read_only(run):
    """Orbax's "Given directory is read only" notice on every evaluation / export load is dropped."""
    import logging
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.levelno, record.getMessage()))

    handler = Keep(level=logging.DEBUG)
    absl_logger = logging.getLogger("absl")
    previous_level = absl_logger.level
    absl_logger.addHandler(handler)
    absl_logger.setLevel(logging.DEBUG)
    try:
        reader = CheckpointStore(run.run_dir)
        assert reader.latest_step() == 2
        reader.close()
    finally:
        absl_logger.removeHandler(handler)
        absl_logger.setLevel(previous_level)
    warnings = [m for level, m in seen if level >= logging.WARNING]
    assert seen and not any("read only" in m or "read_only" in m for m in warnings), warnings  # info still flows
