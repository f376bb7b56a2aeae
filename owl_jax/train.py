"""`python -m owl_jax.train --config configs/<recipe>.yaml [section.key=value ...]`

Prints the resolved config, the mesh and parameter counts, then trains: input pipeline -> global batches
-> the jitted sharded step; `metrics.jsonl` / TensorBoard / W&B logging and a progress line on process
0; Orbax checkpoints every `training.checkpoint_every` steps, at the end and on SIGTERM (preemption).
Re-running the same command resumes from the latest checkpoint of `training.output_dir` — model,
optimizer, RNG and data-iterator state — so the continued run is the run that was interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import threading
import time
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from owl_jax.chips import mfu
from owl_jax.config import Config, ConfigError, dump_config, load_config
from owl_jax.flops import step_flops
from owl_jax.training.stages import describe

log = logging.getLogger("owl_jax.train")


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); the last good checkpoint is kept."""


def _print(*args) -> None:
    if jax.process_index() == 0:
        print(*args, flush=True)


def _init_weights(cfg: Config, trainer) -> None:
    """Apply `init.*` (pretrained or earlier-stage weights) to a fresh run's model, then re-shard. The
    checkpoint kinds and their order come from `owl_jax.convert.IMPORTERS`."""
    from owl_jax.convert import IMPORTERS
    init = cfg.init
    given = [(key, load, getattr(init, key)) for key, load in IMPORTERS if getattr(init, key)]
    if not (given or init.from_checkpoint):
        return
    ts = nnx.merge(trainer.graphdef, trainer.state)
    model = ts.model
    for _, load, path in given:
        load(model, cfg.model, path, _print)
    if init.from_checkpoint:
        from owl_jax.checkpoint import load_model_params
        from owl_jax.convert.state import assign_canonical_params
        params = load_model_params(init.from_checkpoint)
        assign_canonical_params(model, params, include=lambda p: p in params)
        _print(f"initialised {len(params)} parameters from {init.from_checkpoint}")
    trainer.state = jax.device_put(nnx.state(ts), trainer.state_sharding)


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def evaluate(cfg: Config, trainer, tokenizer, mesh, keys) -> dict[str, float]:
    """Token-mean loss over `training.eval_batches` batches of the held-out split (deterministic)."""
    from owl_jax.data import batches, make_pipeline
    pipeline = make_pipeline(cfg, tokenizer, split="eval")
    total = count = 0.0
    try:
        for i, batch in enumerate(batches(pipeline, mesh, keys)):
            if i >= cfg.training.eval_batches:
                break
            s, c = jax.device_get(trainer.eval_terms(batch))
            total, count = total + float(s), count + float(c)
    finally:
        if hasattr(pipeline, "close"):
            pipeline.close()
    return {"loss": total / max(count, 1.0), "tokens": count}


def _finished(cfg: Config) -> dict | None:
    """The last metrics of a run whose latest checkpoint is already at `training.steps`, else None. Read
    from the checkpoint's metadata alone: re-running a finished command builds and compiles nothing."""
    from owl_jax.checkpoint import CheckpointStore, check_compatible
    if not os.path.isdir(os.path.join(cfg.training.output_dir, "checkpoints")):
        return None
    store = CheckpointStore(cfg.training.output_dir)
    try:
        latest = store.latest_step()
        if latest is None or latest < cfg.training.steps:
            return None
        meta = store.read_metadata(latest)
        check_compatible(meta.get("config", {}), cfg)  # another recipe into the same directory is refused
        return {**meta.get("extra", {}).get("metrics", {}), "step": latest}
    finally:
        store.close()


def run(cfg: Config, signals=None) -> dict:
    """Train according to `cfg`; returns the final metrics (with `interrupted` / `preempted` / `already_done`
    set when the run stopped for a signal or had nothing left to do). Raises ConfigError / TrainingError /
    DataError / OutputPathError / RunDirectoryBusy. `signals` (an `owl_jax.interrupts.RunSignals`, installed
    by the CLI before anything else) decides what Ctrl-C and SIGTERM do; without one (library use) a
    one-process run on the main thread installs its own for the duration of the call."""
    from owl_jax.interrupts import RunSignals
    from owl_jax.paths import check_writable_dir
    from owl_jax.run_lock import RunLock

    run_dir = cfg.training.output_dir
    lead = jax.process_index() == 0
    # Output mistakes fail here, in one line, before the model is built; one training per run directory
    # (process 0 holds the lock for all processes of the run).
    if lead:
        check_writable_dir(run_dir, "training.output_dir")
    multi_process = jax.process_count() > 1
    own_signals = signals is None and not multi_process and threading.current_thread() is threading.main_thread()
    with RunLock(run_dir, enabled=lead):
        done = _finished(cfg)
        if done is not None:
            return {**done, "already_done": True}
        if own_signals:  # library use: signals ask for a checkpoint, they never end the caller's process
            signals = RunSignals()
            signals.training()
        try:
            return _train(cfg, signals, multi_process)
        finally:
            if own_signals:
                signals.uninstall()


def _train(cfg: Config, signals, multi_process: bool) -> dict:
    """The training loop of `run` (the run directory is checked and locked)."""
    from data_pipelines.tokenizers import load_tokenizer
    from owl_jax.checkpoint import CheckpointStore
    from owl_jax.compile_counter import count_compiles
    from owl_jax.data import batch_keys, batches, make_pipeline
    from owl_jax.metrics_log import MetricsWriter, SampleLog, batch_sample_keys
    from owl_jax.sharding import make_mesh
    from owl_jax.training.train_step import abstract_batch, create_trainer

    t_cfg = cfg.training
    run_dir = t_cfg.output_dir
    mesh = make_mesh(cfg.mesh)
    _print(f"mesh: {dict(mesh.shape)} over {jax.device_count()} devices ({jax.devices()[0].platform}), "
           f"{jax.process_count()} process(es)")
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty (path to tokenizer.model / tokenizer.json)")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.text.vocab_size:
        raise ConfigError(f"tokenizer has {tokenizer.vocab_size} tokens but model.text.vocab_size is "
                          f"{cfg.model.text.vocab_size}")

    keys = batch_keys(cfg)
    example = {k: v for k, v in abstract_batch(cfg).items() if k in keys}
    trainer = create_trainer(cfg, mesh, batch_example=example)
    model = trainer.model()
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    trainable_paths = set(trainer.trainable)
    trainable = sum(int(np.prod(x.shape)) for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param))
                    if ".".join(map(str, p)) in trainable_paths)
    _print(f"parameters: {total:,} total, {trainable:,} trainable ({describe(trainer.trainable_set)})")

    # The tokenizer file(s) travel with every checkpoint (built-in tokenizers like `toy:512` have none).
    tokenizer_path = cfg.data.tokenizer if os.path.exists(cfg.data.tokenizer) else None
    store = CheckpointStore(run_dir, cfg, keep=t_cfg.keep_checkpoints, tokenizer_path=tokenizer_path)
    writer = MetricsWriter(run_dir, cfg.logging, enabled=jax.process_index() == 0,
                           config_dict=dataclasses.asdict(cfg))
    sample_log = SampleLog(run_dir, enabled=cfg.logging.sample_log, process_index=jax.process_index(),
                           process_count=jax.process_count())
    data_state, start_step = None, 0
    latest = store.latest_step()
    if latest is not None:
        # Checks the saved config against this one (IncompatibleCheckpointError lists what differs).
        state, data_state, _ = store.restore(latest, abstract_state=trainer.state, shardings=trainer.state_sharding)
        trainer.state = state
        if data_state is None:  # saved by a different number of processes
            data_state = _own_data_state(store.all_data_states(latest), make_pipeline, cfg, tokenizer)
        start_step = latest
        writer.truncate_after(latest)
        sample_log.truncate_after(latest)
        _print(f"resumed from {run_dir} at step {latest}")
    else:
        _init_weights(cfg, trainer)
        if jax.process_index() == 0:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "config.yaml"), "w") as f:
                f.write(dump_config(cfg))

    pipeline = make_pipeline(cfg, tokenizer, state=data_state)
    stream = batches(pipeline, mesh, keys)
    if signals is not None:
        signals.describe_checkpoint = lambda: _kept_checkpoint(store)

    # One process: the signal handler turns SIGTERM/SIGINT into a flag. Several: hosts receive the notice
    # at different steps, and one host saving (a collective) while the others step would deadlock; jax's
    # preemption service (on with jax.distributed) propagates the notice and names one safe step that
    # every host reaches (a Ctrl-C on one host ends that host at once: it cannot save alone).
    def preempted(at_step: int) -> bool:
        if multi_process:
            from jax.experimental import multihost_utils
            return multihost_utils.reached_preemption_sync_point(at_step)
        return signals is not None and signals.requested

    step, last_metrics, nonfinite_run, stopped = start_step, {}, 0, ""
    started, window_start, window_step = time.time(), time.time(), start_step
    images_per_step = cfg.data.images_per_batch if "pixel_values" in keys else 0
    model_flops_per_step = step_flops(cfg.model, trainer.trainable_set, tokens=cfg.data.global_batch_size * cfg.data.seq_len,
                                      seq_len=cfg.data.seq_len, images=images_per_step).total
    device_kind = jax.devices()[0].device_kind

    def save(force: bool = False) -> None:
        store.save(step, trainer.state, data_state=pipeline.state(), extra={"metrics": last_metrics}, force=force)

    try:
        with count_compiles() as compiles:
            while step < t_cfg.steps:
                metrics = trainer.step(next(stream))
                step += 1
                if signals is not None and signals.phase != "training":
                    jax.block_until_ready(metrics)  # the first step (and its compile) is done:
                    signals.training()             # from here on a signal means "checkpoint, then stop"
                sample_log.write(step, batch_sample_keys(pipeline))
                if int(metrics["skipped"]):
                    nonfinite_run += 1
                    log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step,
                                nonfinite_run)
                    if nonfinite_run >= t_cfg.max_consecutive_nonfinite:
                        raise TrainingError(f"{nonfinite_run} consecutive steps with a non-finite loss or "
                                            f"gradient (step {step}); stopping. The last good checkpoint is kept "
                                            f"in {run_dir}.")
                else:
                    nonfinite_run = 0
                if step % t_cfg.log_every == 0 or step == t_cfg.steps:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.time() - window_start
                    steps_in_window = step - window_step
                    # trained (loss) tokens per second, estimated from this step's count
                    values["tokens_per_s"] = values["tokens"] * steps_in_window / max(elapsed, 1e-9)
                    values["images_per_s"] = images_per_step * steps_in_window / max(elapsed, 1e-9)
                    values["seconds_per_step"] = elapsed / max(steps_in_window, 1)
                    values["step_compiles"] = compiles["jit(step)"]
                    skips = _skip_counts(pipeline, multi_process)
                    values["skipped_samples"] = float(sum(skips.values()))
                    values.update({f"skipped_samples/{reason}": float(n) for reason, n in skips.items()})
                    flops_per_s = model_flops_per_step * steps_in_window / max(elapsed, 1e-9)
                    values["model_tflops_per_s"] = flops_per_s / 1e12
                    utilisation = mfu(flops_per_s, device_kind, jax.device_count())
                    if utilisation is not None:  # unknown chips (CPU included) report none
                        values["mfu"] = utilisation
                    writer.write(step, values)
                    eta = (t_cfg.steps - step) * elapsed / max(steps_in_window, 1)
                    if cfg.logging.progress:
                        _print(f"step {step}/{t_cfg.steps} loss {values['loss']:.4f} lr {values['learning_rate']:.2e} "
                               f"grad_norm {values['grad_norm']:.3f} tokens/s {values['tokens_per_s']:.0f} "
                               f"images/s {values['images_per_s']:.1f} "
                               + (f"MFU {100 * values['mfu']:.1f}% " if "mfu" in values else "")
                               + (f"skipped {_format_skips(skips)} " if skips else "")
                               + f"ETA {_format_eta(eta)}")
                    last_metrics, window_start, window_step = values, time.time(), step
                if t_cfg.eval_every and step % t_cfg.eval_every == 0 and (cfg.data.eval_paths or cfg.data.eval_sources):
                    ev = evaluate(cfg, trainer, tokenizer, mesh, keys)
                    writer.write(step, ev, prefix="eval")
                    _print(f"step {step}: eval loss {ev['loss']:.4f} over {ev['tokens']:.0f} tokens")
                if preempted(step):
                    interrupted = signals is not None and signals.interrupted
                    _print(f"{'interrupted' if interrupted else 'preemption signal'}: checkpointing step {step} "
                           f"and exiting")
                    save(force=True)
                    stopped = "interrupted" if interrupted else "preempted"
                    break
                if step % t_cfg.checkpoint_every == 0:
                    save()
            if step == t_cfg.steps and store.latest_step() != step:
                save(force=True)
        store.wait()
        skips = _skip_counts(pipeline, multi_process)
    finally:
        if hasattr(pipeline, "close"):
            pipeline.close()
        store.close()
        writer.close()
    last_metrics["step"] = step
    last_metrics["seconds"] = time.time() - started
    last_metrics["skipped_samples"] = float(sum(skips.values()))
    last_metrics["skips"] = skips
    if stopped:
        last_metrics[stopped] = True
    return last_metrics


def _kept_checkpoint(store) -> str:
    """For messages on the way out: which checkpoint a re-run resumes from."""
    try:
        latest = store.latest_step()
    except Exception:  # noqa: BLE001 - a message must not fail
        return ""
    return f"re-running resumes from step {latest}" if latest is not None else "no checkpoint yet"


def _skip_counts(pipeline, multi_process: bool) -> dict[str, int]:
    """Skipped samples by reason, summed over all processes (each process skips its own samples).
    Pipelines count each bad sample once over the run (`skip_counts()`); one without the method has none."""
    counts = dict(pipeline.skip_counts()) if hasattr(pipeline, "skip_counts") else {}
    if not multi_process:
        return {k: int(v) for k, v in sorted(counts.items()) if v}
    from jax.experimental import multihost_utils
    size = 4096  # bytes of JSON per process: the reasons are a handful of short names
    blob = json.dumps(counts).encode()[:size]
    padded = np.zeros(size, np.uint8)
    padded[:len(blob)] = np.frombuffer(blob, np.uint8)
    total: dict[str, int] = {}
    for row in np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, size):
        for k, v in json.loads(bytes(row).rstrip(b"\0").decode() or "{}").items():
            total[k] = total.get(k, 0) + int(v)
    return {k: v for k, v in sorted(total.items()) if v}


def _format_skips(skips: dict[str, int]) -> str:
    return f"{sum(skips.values())} ({', '.join(f'{k} {v}' for k, v in skips.items())})"


def _own_data_state(saved: list[dict], make_pipeline, cfg: Config, tokenizer) -> dict | None:
    """This process's iterator state, remapped from all saved processes' states (the process count
    changed since the save)."""
    probe = make_pipeline(cfg, tokenizer)
    if not hasattr(probe, "remap_states"):
        raise TrainingError(f"the checkpoint was written by {len(saved)} processes and this {cfg.data.kind} "
                            f"pipeline cannot re-split its iterator state for {jax.process_count()}; resume "
                            f"with {len(saved)} processes")
    try:
        return probe.remap_states(saved, jax.process_count())[jax.process_index()]
    finally:
        if hasattr(probe, "close"):
            probe.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m owl_jax.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/demo_stage1.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    # First of all: a Ctrl-C from here until the first step ends the process at once (owl_jax.interrupts).
    from owl_jax.interrupts import EXIT_INTERRUPTED, RunSignals
    signals = RunSignals(handle_sigterm=False)
    try:
        return _main(args, signals, EXIT_INTERRUPTED)
    finally:
        signals.uninstall()


def _main(args, signals, exit_interrupted: int) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from data_pipelines.captions import DataError
    from owl_jax.checkpoint import CheckpointError
    from owl_jax.distributed import initialize as init_distributed
    from owl_jax.convert.io import WeightFileError
    from owl_jax.convert.keymap import CheckpointMismatchError
    from owl_jax.convert.state import StateMismatchError
    from owl_jax.models.layers import LoRATargetError
    from owl_jax.paths import OutputPathError
    from owl_jax.run_lock import RunDirectoryBusy
    # init.* pointing at the wrong checkpoint (another architecture, missing or unreadable weight files)
    # is a user mistake like a config typo: one line, exit 2, before any training.
    user_mistake = (ConfigError, FileNotFoundError, OutputPathError, RunDirectoryBusy, LoRATargetError,
                    CheckpointMismatchError, StateMismatchError, WeightFileError)
    try:
        cfg = load_config(args.config, args.overrides)  # a typo fails here, before waiting for any peer
        # Multi-process runs (TPU pods, SLURM, GKE, OWL_* variables; see launch/README.md) join here,
        # before the first JAX call; a single process is a no-op.
        init_distributed()
        if jax.process_count() == 1:
            signals.add_sigterm()  # several processes: SIGTERM belongs to jax's preemption service
        else:
            signals.multi_process = True
        _print(dump_config(cfg).rstrip())
        metrics = run(cfg, signals)
    except (DataError, TrainingError, CheckpointError, *user_mistake) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, user_mistake) else 1
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() > 1:  # a collective failed: usually a peer died (its log says why)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: process {jax.process_index()} of {jax.process_count()}: a computation with the other "
                  f"processes failed, most likely because another process died or was preempted (see the "
                  f"other processes' logs); the last checkpoint is kept. ({first})", file=sys.stderr)
            return 1
        raise
    loss = metrics.get("loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "not recorded"
    if metrics.get("already_done"):
        _print(f"already complete: {cfg.training.output_dir} is at step {metrics['step']} of "
               f"{cfg.training.steps}, last logged loss {loss_text}; nothing to do (raise training.steps to "
               f"train on, or choose another training.output_dir)")
        return 0
    skips = metrics.get("skips") or {}
    skipped = f", skipped samples {_format_skips(skips)}" if skips else ", no samples skipped"
    if metrics.get("interrupted"):
        _print(f"interrupted at step {metrics['step']} of {cfg.training.steps} after {metrics['seconds']:.0f}s "
               f"(checkpointed; re-run the same command to resume), last loss {loss_text}{skipped}")
        return exit_interrupted
    if metrics.get("preempted"):
        _print(f"preempted at step {metrics['step']} of {cfg.training.steps} (checkpointed; re-run the same "
               f"command to resume), last loss {loss_text}{skipped}")
        return 0
    _print(f"done: step {metrics['step']} in {metrics['seconds']:.0f}s, final loss {loss_text}{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
