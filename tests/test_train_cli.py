"""The train CLI as users run it (subprocesses): kill -9 and resume reproduces the uninterrupted run bit
for bit on CPU; SIGTERM checkpoints and exits 0; user mistakes exit 2 without a traceback."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from data_pipelines.writer import write_caption_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["model.vision.num_layers=1", "model.abstractor.num_layers=1", "model.text.num_layers=1",
         "data.tokenizer=toy:512", "data.seq_len=32", "data.global_batch_size=8", "data.images_per_batch=8", "data.num_workers=0", "data.kind=captions",
         "training.checkpoint_every=2", "training.keep_checkpoints=2", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_data")
    colours = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]
    names = ["red", "green", "blue"]
    rng = np.random.default_rng(0)

    def samples():
        for i in range(48):
            arr = np.clip(np.array(colours[i % 3]) + rng.normal(0, 20, (56, 56, 3)), 0, 255).astype(np.uint8)
            yield f"{i:05d}", Image.fromarray(arr), f"a {names[i % 3]} picture"

    write_caption_shards(samples(), str(d / "c-%03d.tar"), 12)
    return str(d / "c-{000..003}.tar")


def command(run_dir, shards, steps):
    return [sys.executable, "-m", "owl_jax.train", "--config", "configs/tiny_test.yaml", *SMALL,
            f"data.train_paths=['{shards}']", f"training.steps={steps}", f"training.output_dir={run_dir}"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + os.pathsep + e.get("PYTHONPATH", "")
    return e


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def wait_for_step(run_dir, step, proc, timeout=300):
    path = os.path.join(run_dir, "metrics.jsonl")
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.returncode}")
        if os.path.exists(path) and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting for training")


def wait_for_committed_checkpoint(run_dir, proc, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        ckpt = os.path.join(run_dir, "checkpoints")
        if os.path.isdir(ckpt) and any(p.isdigit() for p in os.listdir(ckpt)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.returncode}")
        time.sleep(0.1)
    raise AssertionError("timed out waiting for a checkpoint")


def test_kill_9_then_rerun_reproduces_the_uninterrupted_run(tmp_path, shards):
    steps = 8
    reference = tmp_path / "reference"
    subprocess.run(command(reference, shards, steps), cwd=ROOT, env=env(), check=True, capture_output=True)
    expected = losses(reference)
    assert sorted(expected) == list(range(1, steps + 1))
    with open(reference / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "loss" in r]
    assert all(r["model_tflops_per_s"] > 0 and "mfu" not in r for r in rows)  # CPU: no peak, no MFU

    run = tmp_path / "interrupted"
    kill_at = random.Random().randint(3, 6)
    proc = subprocess.Popen(command(run, shards, steps), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(run, kill_at, proc)
    wait_for_committed_checkpoint(run, proc)  # (async saves: the step-2 save may still be in flight)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = subprocess.run(command(run, shards, steps), cwd=ROOT, env=env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout
    assert losses(run) == expected  # bit for bit: same floats in the JSON


def test_sigterm_checkpoints_and_exits_0(tmp_path, shards):
    run = tmp_path / "preempted"
    proc = subprocess.Popen(command(run, shards, 200), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    last = max(losses(run))
    steps = sorted(int(p) for p in os.listdir(run / "checkpoints") if p.isdigit())
    assert steps[-1] == last and "preemption signal" in out


@pytest.mark.parametrize("args, message", [
    (["model.text.hiden_size=3"], "did you mean 'hidden_size'"),
    (["training.steps=many"], "training.steps"),
    (["data.tokenizer=/no/such/tokenizer.model"], "/no/such/tokenizer.model"),
])
def test_user_mistakes_exit_2_without_traceback(tmp_path, args, message):
    cmd = [sys.executable, "-m", "owl_jax.train", "--config", "configs/tiny_test.yaml",
           f"training.output_dir={tmp_path}", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "owl_jax.train", "--config", str(tmp_path / "nope.yaml")],
                            cwd=ROOT, env=env(), capture_output=True, text=True)
    assert result.returncode == 2 and "nope.yaml" in result.stderr and "Traceback" not in result.stderr
