"""Several real JAX processes on this machine (`launch/local.py`: jax.distributed over localhost, fake
CPU devices): the train CLI in 2 processes × 4 devices, each process reading its own part of the data,
checkpointing; then resumed from its mid-run checkpoint as 1 process × 8 devices and as 1 process × 2
devices. The continued losses match the uninterrupted 2-process run and, by the per-process sample logs,
no sample is trained twice or skipped. A dead peer ends the survivors with an error, not a hang."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_train_cli import ROOT, SMALL, env, losses, shards  # noqa: F401  (shards is a fixture)

STEPS, RESUME_AT = 6, 3  # 6 steps × 8 rows = the fixture's 48 samples: one epoch, each sample once
# Another process count puts the same samples in another row order (each process contributes a block of
# rows); dropout masks are drawn per row, so with dropout the losses would differ by design. Off here.
NO_DROPOUT = ["model.abstractor.attention_dropout=0.0"]


def train_args(run_dir, shards_path, extra=()):
    return ["--config", "configs/tiny_test.yaml", *SMALL, *NO_DROPOUT, f"data.train_paths=['{shards_path}']",
            f"training.steps={STEPS}", f"training.checkpoint_every={RESUME_AT}", "training.keep_checkpoints=3",
            "logging.sample_log=true", f"training.output_dir={run_dir}", *extra]


def launch_two(run_dir, shards_path, timeout=600):
    cmd = [sys.executable, "launch/local.py", "--processes", "2", "--devices", "4", "--log-dir", f"{run_dir}-logs",
           "--heartbeat-timeout", "20", "--shutdown-timeout", "20", "--", *train_args(run_dir, shards_path)]
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    logs = "".join(open(os.path.join(f"{run_dir}-logs", f"process_{i}.log")).read()[-1500:] for i in range(2))
    assert result.returncode == 0, result.stderr[-2000:] + logs


def single_process(run_dir, shards_path, devices):
    e = env()
    e.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    result = subprocess.run([sys.executable, "-m", "owl_jax.train", *train_args(run_dir, shards_path)], cwd=ROOT,
                            env=e, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def samples_by_step(run_dir):
    """{step: sorted keys of the global batch} from every process's sample log."""
    out: dict[int, list[str]] = {}
    directory = os.path.join(run_dir, "samples")
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name)) as f:
            for record in map(json.loads, f):
                out.setdefault(record["step"], []).extend(record["samples"])
    return {step: sorted(keys) for step, keys in out.items()}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, shards):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("mp") / "run"
    launch_two(run_dir, shards)
    return run_dir


def test_two_processes_read_disjoint_data_and_checkpoint(two_process_run):
    per_process = []
    for i in range(2):
        with open(two_process_run / "samples" / f"process-{i}.jsonl") as f:
            per_process.append([k for r in map(json.loads, f) for k in r["samples"]])
    assert len(per_process[0]) == len(per_process[1]) == STEPS * 4  # 4 rows per process per step
    assert not set(per_process[0]) & set(per_process[1])  # each process reads its own samples
    everything = per_process[0] + per_process[1]
    assert len(set(everything)) == len(everything) == 48  # the whole epoch, nothing twice
    assert sorted(losses(two_process_run)) == list(range(1, STEPS + 1))
    checkpoints = sorted(int(p) for p in os.listdir(two_process_run / "checkpoints") if p.isdigit())
    assert checkpoints == [RESUME_AT, STEPS]


@pytest.mark.parametrize("devices", [8, 2])
def test_resume_on_one_process_continues_the_two_process_run(two_process_run, shards, tmp_path, devices):  # noqa: F811
    run_dir = tmp_path / f"resumed-{devices}"
    shutil.copytree(two_process_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / str(STEPS))  # as if preempted right after step RESUME_AT's save
    out = single_process(run_dir, shards, devices)
    assert f"resumed from {run_dir} at step {RESUME_AT}" in out
    expected, got = losses(two_process_run), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(RESUME_AT + 1, STEPS + 1):  # another device count: another reduction order
        np.testing.assert_allclose(got[step], expected[step], rtol=2e-5, err_msg=f"step {step}")
    # the same samples at every step as the uninterrupted run: none twice, none skipped
    assert samples_by_step(run_dir) == samples_by_step(two_process_run)


def test_a_dead_peer_ends_the_survivor_with_an_error(tmp_path, shards):  # noqa: F811
    """kill -9 of process 1 mid-run: process 0 (which also hosts the coordinator) must exit non-zero by
    itself within the heartbeat timeout plus a margin, saying what happened — not wait forever in a
    collective. (No launcher here: on a pod nothing would stop the survivors for them.)"""
    sys.path.insert(0, ROOT)
    from launch.local import free_port, plan
    run_dir = tmp_path / "run"
    args = train_args(run_dir, shards, ["training.steps=100000", "training.checkpoint_every=100000"])
    plans = plan(2, 2, free_port(), str(tmp_path / "logs"), ["--", *args], python=sys.executable,
                 heartbeat_timeout=10, shutdown_timeout=10)
    procs = []
    for p in plans:
        os.makedirs(os.path.dirname(p.log), exist_ok=True)
        procs.append(subprocess.Popen(p.argv, env={**env(), **p.env}, cwd=ROOT, stdout=open(p.log, "wb"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists() or max(losses(run_dir), default=0) < 2:
            assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        try:
            code = procs[0].wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still running 90 s after its peer died")
        took = time.time() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    log = open(plans[0].log).read()
    assert code != 0, log[-2000:]
    assert took < 60, f"{took:.0f}s"
    # Which path reports it is a race, and every one names the cause: inside a collective, CPU (gloo)
    # notices the closed connection at once and the CLI says "another process died"; between collectives
    # (and on TPU / GPU) the coordination service's heartbeat check ends the process with "Task 1
    # heartbeat timeout" or "... stopped sending heartbeats ... most likely ... another task died".
    causes = ("another process died", "heartbeat timeout", "stopped sending heartbeats", "another task died")
    assert any(c in log for c in causes), log[-3000:]
